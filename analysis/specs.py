"""What a model "spec" in the dashboard means, and opening it safely.

A spec is the string that names a model in the dashboard's selection and in shared URLs:

- ``demo:<name>``: a model of the offline demo (:mod:`demo`), e.g. ``demo:base``,
  ``demo:lora-r8``;
- ``upload:<sha256>``: files uploaded in the page (:mod:`analysis.uploads`);
- ``series:...``: the checkpoints of one training run (:mod:`analysis.series`);
- anything else: a hub id, or a local folder or file when local paths are allowed.

Demo and upload specs name files the *server* chose, so they open even where visitors may
not name local paths (``WSE_ALLOW_LOCAL_PATHS=0``); uploads are read without pickle.
Every problem is an :class:`~analysis.errors.InputError`.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

from analysis.errors import InputError
from analysis.plan import ComparisonPlan, require_matrices
from analysis.uploads import UploadStore, is_upload_spec

DEMO_PREFIX = "demo:"


#: The longest spec taken: longer ones are refused before any file system call.
MAX_SPEC_LENGTH = 1024


def local_path(spec: str, allow_local_paths: bool) -> Path | None:
    """The existing file or folder ``spec`` names on this server, or ``None``.

    Nothing touches the file system when local paths are off (no ``~user`` expansion,
    no existence check); a spec no file system call can take (``~nosuchuser``, a name
    over 255 characters, a NUL byte) names nothing.
    """
    if not allow_local_paths:
        return None
    try:
        path = Path(spec).expanduser()
        return path if path.exists() else None
    except (OSError, RuntimeError, ValueError):  # no such user, name too long, NUL byte
        return None


def check_spec(spec: str) -> str:
    """``spec`` stripped, or an :class:`InputError` for one no source could have."""
    text = spec.strip()
    if len(text) > MAX_SPEC_LENGTH:
        raise InputError(text[:40] + "…", f"is {len(text)} characters long; a model name has at most {MAX_SPEC_LENGTH}")
    if "\x00" in text:
        raise InputError(text.replace("\x00", "?"), "contains a NUL character")
    return text


def local_paths_allowed() -> bool:
    """``WSE_ALLOW_LOCAL_PATHS`` is not ``0``/``false``/``no`` (hosted instances set ``0``)."""
    from analysis.config import env_flag

    return env_flag("WSE_ALLOW_LOCAL_PATHS", True)


@dataclass(frozen=True)
class ResolvedSpec:
    """A spec with its display label and, for server-chosen files, the path it names.

    ``summary`` holds what the dashboard knows beyond the files (for demo models: how
    they were trained and how well they do), merged into the comparison's summary.
    """

    spec: str
    label: str
    path: Path | None = None
    summary: dict = field(default_factory=dict)


@dataclass
class SpecResolver:
    """Turns specs into labels and opened sources.

    Parameters
    ----------
    uploads:
        Where uploads are stored.
    demo_root:
        Where the demo was built (``None``: its default, ``<cache dir>/demo``).
    allow_local_paths:
        Whether visitors may name server paths; default from ``WSE_ALLOW_LOCAL_PATHS``.
    """

    uploads: UploadStore = field(default_factory=UploadStore)
    demo_root: Path | None = None
    allow_local_paths: bool = field(default_factory=local_paths_allowed)

    def demo(self):
        """The built demo's manifest, or ``None`` when it has not been built yet."""
        from demo import demo_manifest

        return demo_manifest(self.demo_root)

    def resolve(self, spec: str) -> ResolvedSpec:
        spec = check_spec(spec)
        if spec.startswith(DEMO_PREFIX):
            manifest = self.demo()
            if manifest is None:
                raise InputError(spec, "the offline demo is not built on this server; run: python -m analysis demo")
            name, _, checkpoint = spec.removeprefix(DEMO_PREFIX).partition("/")
            try:
                model = manifest.model(name)
            except KeyError as exc:
                raise InputError(spec, str(exc.args[0])) from None
            if checkpoint:  # one checkpoint the demo saved while training (analysis.series)
                from analysis.series import demo_checkpoint_path, step_from_name

                path = demo_checkpoint_path(model, checkpoint)
                label = f"{model.label} · step {step_from_name(checkpoint)}"
                return ResolvedSpec(spec, label, path, {"label": label})
            measured = {name: value for name, value in model.metrics.items() if math.isfinite(value)}
            summary = {"label": model.label, "demo": {"metrics": measured, "lr": model.lr, "steps": model.steps}}
            if model.r:
                summary["lora_rank"] = model.r
            return ResolvedSpec(spec, model.label, Path(model.path), summary)
        if spec.startswith("series:"):  # checkpoints of one run (analysis.series); jobs run per checkpoint
            from analysis.series import resolve_series

            series = resolve_series(spec, self)
            label = f"{series.label} (series of {len(series.checkpoints)})"
            return ResolvedSpec(spec, label, None, {"label": label})
        if is_upload_spec(spec):
            stored = self.uploads.get(spec)
            return ResolvedSpec(spec, f"upload {stored.label}", stored.path, {"label": f"upload {stored.label}"})
        if not spec:
            raise InputError("(empty)", "no model given: expected a hub model id, a folder or a .safetensors file")
        looks_local = local_path(spec, self.allow_local_paths) is not None
        label = Path(spec.rstrip("/")).name if looks_local else spec
        return ResolvedSpec(spec, label, None, {"label": label})

    def version(self, spec: str) -> str:
        """A stamp of the files ``spec`` names now (sizes, times, inodes; nothing is read).

        It changes when a local folder or file, or the demo, is rewritten in place, so a
        finished dashboard job for the old files is not shown for the new ones. Uploads
        are content-addressed and hub ids are re-resolved when a job starts: ``""``.
        """
        if is_upload_spec(spec):
            return ""
        try:
            path = self.resolve(spec).path
        except InputError:
            return ""
        if path is None:
            path = local_path(spec.strip(), self.allow_local_paths)
        if path is None:
            return ""
        try:
            files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
        except OSError:
            return ""
        stamp = hashlib.sha256()
        for file in files:
            try:
                st = file.stat()
            except OSError:
                continue
            stamp.update(f"{file.name}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}\n".encode())
        return stamp.hexdigest()[:16]

    def label(self, spec: str) -> str:
        """A spec's display label, or the spec itself when it cannot be resolved."""
        try:
            return self.resolve(spec).label
        except InputError:
            return spec

    def open(self, spec: str):
        """Open ``spec`` as a :class:`~analysis.sources.WeightSource` or ``LoraAdapter``.

        The source's label is the spec, so results and reports name models the way the
        URL does (``demo:lora-r8``, ``upload:<sha256>``) and never a server path.
        """
        from analysis.sources import open_file, open_folder, open_source

        resolved = self.resolve(spec)
        if resolved.path is None:
            return open_source(spec, allow_local_paths=self.allow_local_paths)
        if resolved.path.is_dir():
            return open_folder(spec, resolved.path, allow_pickle=False)
        return open_file(spec, resolved.path)

    def plan(self, base: str, tuned: str, *, include_non_block: bool = False) -> ComparisonPlan:
        """Pair ``tuned`` with ``base`` (light: reads headers and adapter configs only).

        The plan's ``summary`` gains the tuned model's display ``label`` and what the
        server knows about it (:attr:`ResolvedSpec.summary`).
        """
        from analysis.adapters import is_adapter
        from analysis.pairing import plan_comparison

        base_source = self.open(base)
        if is_adapter(base_source):
            raise InputError(base, "is a LoRA adapter; the base must be a full model (add adapters as fine-tunes)")
        plan = plan_comparison(base_source, self.open(tuned), include_non_block=include_non_block)
        plan.base_label, plan.tuned_label = base, tuned
        plan.summary = {**plan.summary, **self.resolve(tuned).summary}
        return require_matrices(plan)

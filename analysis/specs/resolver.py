"""The one door from a model name ("spec", :mod:`analysis.specs.names`) to opened weights.

The command line, the dashboard and Ray workers all open models through
:class:`SpecResolver`. Demo and upload specs name files the *server* chose, so they open even where visitors may
not name local paths (``WSE_ALLOW_LOCAL_PATHS=0``); uploads are read without pickle.
Every problem is an :class:`~analysis.errors.InputError`.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from analysis.adapters import LoraAdapter, is_adapter
from analysis.errors import InputError
from analysis.pairing import plan_comparison
from analysis.plan import ComparisonPlan, require_matrices
from analysis.sources import WeightSource, local_path, open_file, open_folder, open_location
from analysis.specs.demo import DemoManifest, demo_manifest
from analysis.specs.labels import local_label
from analysis.specs.names import DEMO_PREFIX, check_spec, local_paths_allowed, shortened
from analysis.specs.series import SERIES_PREFIX, demo_checkpoint_path, resolve_series, step_from_name
from analysis.specs.uploads import UploadFolder, is_upload_spec


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
    uploads : UploadFolder
        Where uploads are stored (the dashboard passes its
        :class:`hosting.uploads.UploadStore`, which also stores them).
    demo_root : pathlib.Path, optional
        Where the demo was built (``None``: its default, ``<cache dir>/demo``).
    allow_local_paths : bool
        Whether visitors may name server paths; default from ``WSE_ALLOW_LOCAL_PATHS``.

    Examples
    --------
    A folder written by ``save_pretrained`` opens as a :class:`~analysis.sources.WeightSource`
    whose label is the name as given:

    >>> import tempfile, torch
    >>> from safetensors.torch import save_file
    >>> folder = tempfile.mkdtemp()
    >>> save_file({"layers.0.q_proj.weight": torch.eye(4)}, f"{folder}/model.safetensors")
    >>> source = SpecResolver(allow_local_paths=True).open(folder)
    >>> source.names()
    ['layers.0.q_proj.weight']
    >>> SpecResolver(allow_local_paths=False).open(folder)
    Traceback (most recent call last):
    ...
    analysis.errors.InputError: ...: local paths are disabled on this server; give a Hugging Face hub model id instead
    """

    uploads: UploadFolder = field(default_factory=UploadFolder)
    demo_root: Path | None = None
    allow_local_paths: bool = field(default_factory=local_paths_allowed)

    def demo(self) -> DemoManifest | None:
        """The built demo's manifest, or ``None`` when it has not been built yet."""
        return demo_manifest(self.demo_root)

    def resolve(self, spec: str | os.PathLike) -> ResolvedSpec:
        """What ``spec`` names: its label, the server-chosen path (demo, upload) and what is known of it."""
        spec = check_spec(os.fspath(spec))
        if spec.startswith(DEMO_PREFIX):
            manifest = self.demo()
            if manifest is None:
                raise InputError(spec, "the offline demo is not built on this server; run: python -m demo")
            name, _, checkpoint = spec.removeprefix(DEMO_PREFIX).partition("/")
            try:
                model = manifest.model(name)
            except KeyError as exc:
                raise InputError(spec, str(exc.args[0])) from None
            if checkpoint:  # one checkpoint the demo saved while training (analysis.specs.series)
                path = demo_checkpoint_path(model, checkpoint)
                label = f"{model.label} · step {step_from_name(checkpoint)}"
                return ResolvedSpec(spec, label, path, {"label": label})
            measured = {name: value for name, value in model.metrics.items() if math.isfinite(value)}
            summary = {"label": model.label, "demo": {"metrics": measured, "lr": model.lr, "steps": model.steps}}
            if model.r:
                summary["lora_rank"] = model.r
            return ResolvedSpec(spec, model.label, Path(model.path), summary)
        if spec.startswith(SERIES_PREFIX):  # checkpoints of one run (analysis.specs.series); jobs run per checkpoint
            series = resolve_series(spec, self)
            label = f"{series.label} (series of {len(series.checkpoints)})"
            return ResolvedSpec(spec, label, None, {"label": label})
        if is_upload_spec(spec):
            stored = self.uploads.get(spec)
            return ResolvedSpec(spec, f"upload {stored.label}", stored.path, {"label": f"upload {stored.label}"})
        if not spec:
            raise InputError("(empty)", "no model given: expected a hub model id, a folder or a .safetensors file")
        found = local_path(spec, self.allow_local_paths)
        label = local_label(found) if found is not None else spec
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

    def on_disk(self, spec: str) -> bool:
        """Whether ``spec`` names files already on this machine, so opening it reaches no network.

        ``True`` for a built demo model, an upload, a local path where those are allowed;
        ``False`` for hub ids (resolved online), series (many checkpoints) and bad specs.
        """
        return self.local(spec) is not None

    def local(self, spec: str) -> Path | None:
        """The file or folder ``spec`` names on this machine (see :meth:`on_disk`), else ``None``."""
        try:
            if spec.startswith(SERIES_PREFIX):
                return None
            if spec.startswith(DEMO_PREFIX) or is_upload_spec(spec):
                return self.resolve(spec).path
            return local_path(check_spec(spec), self.allow_local_paths)
        except InputError:
            return None

    def label(self, spec: str) -> str:
        """A spec's display label, or the spec itself when it cannot be resolved.

        A spec too long to be a name is shown by its start (:func:`~analysis.specs.names.shortened`).
        """
        try:
            return self.resolve(spec).label
        except InputError:
            return shortened(spec)

    def open(self, spec: str | os.PathLike) -> WeightSource | LoraAdapter:
        """Open ``spec`` as a :class:`~analysis.sources.WeightSource` or ``LoraAdapter``.

        The source's label is the spec, so results and reports name models the way the
        URL does (``demo:lora-r8``, ``upload:<sha256>``) and never a server path. A hub
        id or a local path is opened by :func:`analysis.sources.open_location`; folders
        the server chose (demo, uploads) are read without pickle.
        """
        resolved = self.resolve(spec)
        if resolved.path is None:
            return open_location(spec, allow_local_paths=self.allow_local_paths)
        if resolved.path.is_dir():
            return open_folder(spec, resolved.path, allow_pickle=False)
        return open_file(spec, resolved.path)

    def plan_models(self, base: str, tuned: Sequence[str], *, include_non_block: bool = False) -> list[ComparisonPlan]:
        """Open every model and pair each fine-tune with the base, before any heavy work runs.

        Bad input anywhere (a missing file, a wrong base, an unsupported adapter) raises
        :class:`~analysis.errors.InputError` here, so a long run never fails half way for a
        typo. The base is opened once.
        """
        base_source = self.open(base)
        if is_adapter(base_source):
            raise InputError(base, "is a LoRA adapter; the base must be a full model (apply adapters as TUNED)")
        return [
            require_matrices(plan_comparison(base_source, self.open(spec), include_non_block=include_non_block))
            for spec in tuned
        ]

    def plan(self, base: str, tuned: str, *, include_non_block: bool = False) -> ComparisonPlan:
        """Pair ``tuned`` with ``base`` (light: reads headers and adapter configs only).

        The plan's ``summary`` gains the tuned model's display ``label`` and what the
        server knows about it (:attr:`ResolvedSpec.summary`).
        """
        (plan,) = self.plan_models(base, [tuned], include_non_block=include_non_block)
        plan.base_label, plan.tuned_label = base, tuned
        plan.summary = {**plan.summary, **self.resolve(tuned).summary}
        return plan


def open_model(spec: str | os.PathLike, *, allow_local_paths: bool = True) -> WeightSource | LoraAdapter:
    """Open one model name with a :class:`SpecResolver` (the command line's local-path rule).

    Parameters
    ----------
    spec : str or path
        Any model name the resolver understands.
    allow_local_paths : bool, default True
        ``False`` refuses local folders and files, as a hosted dashboard does.

    Returns
    -------
    WeightSource or LoraAdapter
        The opened weights (an adapter is applied later, when paired with a base).
    """
    return SpecResolver(allow_local_paths=allow_local_paths).open(spec)

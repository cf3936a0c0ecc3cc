"""Server-wide resources and the jobs behind the current selection.

One :class:`~analysis.jobs.JobManager`, one spectrum cache and one spec resolver per
server process (``st.cache_resource``), shared by every session: a second visitor asking
for a comparison that is running or done joins it. Analyses never run in a page script.
"""

from __future__ import annotations

import os
import re
import uuid
from dataclasses import dataclass, replace

import streamlit as st

from analysis.cache import SpectrumCache, default_cache_dir
from analysis.errors import InputError
from analysis.jobs import Job, JobManager, JobState, comparison_job, comparison_key
from analysis.pipeline import AnalysisSettings, available_cores, model_result
from analysis.results import ModelResult
from analysis.series import Series, is_series_spec, resolve_series
from analysis.specs import DEMO_PREFIX, SpecResolver, local_paths_allowed
from analysis.uploads import UploadStore

SETTINGS = AnalysisSettings()
DEVICE = os.environ.get("WSE_DEVICE", "auto")
#: A Ray cluster to run analyses on (``local``, ``auto`` or an address); unset: this process.
RAY_ADDRESS = os.environ.get("WSE_RAY_ADDRESS") or None


@st.cache_resource(show_spinner=False)
def job_manager(max_workers: int = 1) -> JobManager:
    return JobManager(max_workers=max_workers)


@st.cache_resource(show_spinner=False)
def _resolver(cache_dir: str, allow_local_paths: bool) -> SpecResolver:
    return SpecResolver(uploads=UploadStore(os.path.join(cache_dir, "uploads")), allow_local_paths=allow_local_paths)


@st.cache_resource(show_spinner=False)
def _spectrum_cache(cache_dir: str) -> SpectrumCache:
    return SpectrumCache(os.path.join(cache_dir, "spectra"))


def resolver() -> SpecResolver:
    """The spec resolver for this server's cache folder and ``WSE_ALLOW_LOCAL_PATHS``."""
    return _resolver(str(default_cache_dir()), local_paths_allowed())


def spectrum_cache() -> SpectrumCache:
    return _spectrum_cache(str(default_cache_dir()))


def _max_jobs() -> int:
    return max(1, int(os.environ.get("WSE_MAX_JOBS", "1")))


def manager() -> JobManager:
    return job_manager(_max_jobs())


def _job_workers() -> int | None:
    """Matrices one job analyses at once: the engine's choice, or a share of the cores when
    ``WSE_MAX_JOBS`` jobs may run together (so they never oversubscribe the machine)."""
    jobs = _max_jobs()
    return None if jobs == 1 else max(1, available_cores() // jobs)


def session_id() -> str:
    """A random id for this browser session (who is watching which job)."""
    if "wse_session" not in st.session_state:
        st.session_state.wse_session = uuid.uuid4().hex
    return st.session_state.wse_session


def friendly(error: str) -> str:
    """An error message with upload folders on the server named as the visitor knows them."""
    uploads = re.escape(str(resolver().uploads.root))
    error = re.sub(uploads + r"[/\\]([0-9a-f]{64})[/\\]files[/\\]?", lambda m: f"upload [{m.group(1)[:8]}] ", error)
    return re.sub(uploads, "uploads", error)


def demo_defaults() -> tuple[str, list[str]]:
    """The offline demo's base and fine-tunes as specs, or nothing if it is not built."""
    try:
        manifest = resolver().demo()
    except InputError:
        return "", []
    if manifest is None:
        return "", []
    return DEMO_PREFIX + manifest.base.name, [DEMO_PREFIX + m.name for m in manifest.fine_tunes]


@dataclass
class Tracked:
    """One fine-tune of the selection and its job (``None`` when not started).

    A checkpoint of a series carries its ``step`` and ``label``; ``alias`` is the series
    spec when the checkpoint stands for its whole series (the final one, on pages that
    show single fine-tunes), so its result is named like the selection names it.
    """

    spec: str
    job: Job | None
    step: int | None = None
    label: str | None = None
    alias: str | None = None

    @property
    def state(self) -> JobState | None:
        return None if self.job is None else self.job.state

    def result(self) -> ModelResult | None:
        """The finished result, or the matrices done so far while it runs."""
        job = self.job
        if job is None:
            return None
        if job.state is JobState.DONE:
            return self._named(job.result)
        if job.plan is not None and job.state in (JobState.RUNNING, JobState.QUEUED):
            return self._named(model_result(job.plan, job.items()))
        return None

    def _named(self, result: ModelResult) -> ModelResult:
        if self.step is None and self.alias is None:
            return result
        summary = {**result.summary, "label": self.label or result.label}
        return replace(result, source=self.alias or result.source, step=self.step, summary=summary)


def job_key(base: str, tuned: str) -> tuple:
    """The job comparing ``tuned`` with ``base`` on this server.

    The cache folder is part of it: it decides what ``demo:`` and ``upload:`` specs name;
    so are the versions of local files (:meth:`SpecResolver.version`): a folder rewritten
    in place is analysed again (cheaply: the spectrum cache is content-addressed).
    """
    versions = (resolver().version(base), resolver().version(tuned))
    return (*comparison_key(base, tuned, SETTINGS, DEVICE), str(default_cache_dir()), versions)


def track(base: str, tuned: tuple[str, ...] | list[str], *, start: bool, restart: bool = False) -> list[Tracked]:
    """The job of each fine-tune against ``base``.

    ``start`` submits missing jobs (joining any that another session started);
    ``restart`` also re-runs failed and cancelled ones (the user asked again). A failed
    job is otherwise left as it is, so a bad input is shown, not retried on every rerun.
    """
    jobs = manager()
    tracked = []
    for spec in tuned:
        if is_series_spec(spec):  # on single-model pages a series is its final checkpoint
            tracked.append(_track_final(base, spec, start=start, restart=restart))
            continue
        key = job_key(base, spec)
        job = jobs.get(key)
        stale = job is not None and job.state in (JobState.FAILED, JobState.CANCELLED)
        if start and (job is None or (restart and stale)):
            fn = comparison_job(
                resolver(),
                base,
                spec,
                settings=SETTINGS,
                device=DEVICE,
                cache=spectrum_cache(),
                workers=_job_workers(),
                ray_address=RAY_ADDRESS,
            )
            job = jobs.submit(key, fn, label=resolver().label(spec), watcher=session_id())
        elif start and job is not None and not job.should_stop():
            job.watch(session_id())
        tracked.append(Tracked(spec, job))
    return tracked


def series(spec: str) -> Series:
    """The checkpoints a ``series:`` spec names on this server (raises ``InputError``)."""
    return resolve_series(spec, resolver())


def _failed(key: tuple, label: str, error: InputError, *, start: bool, restart: bool) -> Job | None:
    """A job that fails with ``error``, so a bad series is reported like any bad input."""

    def fail(job: Job):
        raise error

    jobs = manager()
    job = jobs.get(key)
    if start and (job is None or (restart and job.state.finished)):
        job = jobs.submit(key, fail, label=label, watcher=session_id())
    return job


def _track_final(base: str, spec: str, *, start: bool, restart: bool) -> Tracked:
    try:
        found = series(spec)
    except InputError as exc:
        job = _failed(("series", base, spec, str(default_cache_dir())), spec, exc, start=start, restart=restart)
        return Tracked(spec, job)
    final = found.final
    member = track(base, [final.spec], start=start, restart=restart)[0]
    return Tracked(final.spec, member.job, final.step, found.member_label(final), alias=spec)


def track_series(base: str, found: Series, *, start: bool, restart: bool = False) -> list[Tracked]:
    """The job of every checkpoint of a series, in step order (one job per checkpoint, shared
    with any other page or session asking for the same checkpoint)."""
    members = track(base, [c.spec for c in found.checkpoints], start=start, restart=restart)
    return [
        Tracked(c.spec, t.job, c.step, found.member_label(c)) for c, t in zip(found.checkpoints, members, strict=True)
    ]

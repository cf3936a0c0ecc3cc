"""Server-wide resources and the jobs behind the current selection.

One :class:`~analysis.jobs.JobManager`, one spectrum cache and one spec resolver per
server process (``st.cache_resource``), shared by every session: a second visitor asking
for a comparison that is running or done joins it. Analyses never run in a page script.
"""

from __future__ import annotations

import os
import re
import uuid
from dataclasses import dataclass

import streamlit as st

from analysis.cache import SpectrumCache, default_cache_dir
from analysis.errors import InputError
from analysis.jobs import Job, JobManager, JobState, comparison_job, comparison_key
from analysis.pipeline import AnalysisSettings, available_cores, model_result
from analysis.results import ModelResult
from analysis.specs import DEMO_PREFIX, SpecResolver, local_paths_allowed
from analysis.uploads import UploadStore

SETTINGS = AnalysisSettings()
DEVICE = os.environ.get("WSE_DEVICE", "auto")


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
    """One fine-tune of the selection and its job (``None`` when not started)."""

    spec: str
    job: Job | None

    @property
    def state(self) -> JobState | None:
        return None if self.job is None else self.job.state

    def result(self) -> ModelResult | None:
        """The finished result, or the matrices done so far while it runs."""
        job = self.job
        if job is None:
            return None
        if job.state is JobState.DONE:
            return job.result
        if job.plan is not None and job.state in (JobState.RUNNING, JobState.QUEUED):
            return model_result(job.plan, job.items())
        return None


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
        key = job_key(base, spec)
        job = jobs.get(key)
        stale = job is not None and job.state in (JobState.FAILED, JobState.CANCELLED)
        if start and (job is None or (restart and stale)):
            fn = comparison_job(
                resolver(), base, spec, settings=SETTINGS, device=DEVICE, cache=spectrum_cache(), workers=_job_workers()
            )
            job = jobs.submit(key, fn, label=resolver().label(spec), watcher=session_id())
        elif start and job is not None and not job.should_stop():
            job.watch(session_id())
        tracked.append(Tracked(spec, job))
    return tracked


# -- the offline demo, built in the dashboard ---------------------------------------------------
#: Session key: the demo fine-tunes this session's selection was last set to while it
#: follows a demo build (absent once the visitor chose something else or the build ended).
DEMO_FOLLOW = "wse_follow_demo"


@st.cache_resource(show_spinner=False)
def _demo_jobs() -> JobManager:
    """A worker of its own, so the analyses of fine-tunes already built run beside the build."""
    return JobManager(max_workers=1)


def demo_key() -> tuple:
    from demo import default_demo_root

    return ("demo-build", str(default_demo_root()))


def demo_job() -> Job | None:
    """This server's demo build job (running or finished), or ``None``."""
    return _demo_jobs().get(demo_key())


def demo_state():
    """``(manifest or None, error or None)``: the demo as built so far."""
    try:
        return resolver().demo(), None
    except InputError as exc:
        return None, str(exc)


def _build_demo(job: Job):
    import time

    from analysis.jobs import Progress
    from demo import build_demo

    started = time.time()

    def on_step(done: int, total: int, what: str) -> None:
        job.report(Progress(done, total, what, time.time() - started))

    return build_demo(progress=False, on_step=on_step, should_stop=job.should_stop)


def start_demo_build() -> Job:
    """Start (or join) building the demo; a stopped build resumes where it was left."""
    return _demo_jobs().submit(demo_key(), _build_demo, label="offline demo", watcher=session_id())


def cancel_demo_build() -> None:
    """Withdraw this session from the build; it stops when nobody else watches it (the
    fine-tunes finished so far stay)."""
    job = demo_job()
    if job is not None:
        job.unwatch(session_id())
    st.session_state.pop(DEMO_FOLLOW, None)


def ensure_demo(follow: bool) -> None:
    """On a server without a complete demo, build it in the background (once per server
    process: a cancelled build is resumed only when asked; ``WSE_DEMO_AUTOBUILD=0`` turns
    this off, leaving the Models page's button). ``follow``: this session
    opened on the demo (no link named models), so its selection grows with the build."""
    manifest, error = demo_state()
    if error is not None or (manifest is not None and manifest.complete):
        return
    job = demo_job()
    if job is None and os.environ.get("WSE_DEMO_AUTOBUILD", "1") != "0":
        job = start_demo_build()
    elif job is not None and not job.state.finished:
        job.watch(session_id())
    if follow and job is not None and not job.state.finished and DEMO_FOLLOW not in st.session_state:
        st.session_state[DEMO_FOLLOW] = ()


def follow_demo() -> None:
    """While this session follows the demo build, select every fine-tune built so far.

    Stops following as soon as the visitor's selection is no longer what was set here
    (they chose other models), or when the build is complete.
    """
    if DEMO_FOLLOW not in st.session_state:
        return
    from ui import state

    last = tuple(st.session_state[DEMO_FOLLOW])
    chosen = state.current()
    if last and (chosen.base, chosen.tuned) != (DEMO_PREFIX + "base", last):
        st.session_state.pop(DEMO_FOLLOW)
        return
    base, tuned = demo_defaults()
    if tuned and tuple(tuned) != last:
        state.set("base", base)
        state.set("tuned", list(tuned))
        st.session_state[DEMO_FOLLOW] = tuple(tuned)
    manifest, _ = demo_state()
    if manifest is not None and manifest.complete:
        st.session_state.pop(DEMO_FOLLOW, None)

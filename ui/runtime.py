"""Server-wide resources and the jobs behind the current selection.

One :class:`~hosting.jobs.JobManager`, one spectrum cache and one spec resolver per
server process (``st.cache_resource``), shared by every session: a second visitor asking
for a comparison that is running or done joins it. Analyses never run in a page script.
"""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from dataclasses import dataclass, replace

import streamlit as st

from analysis.cache import SpectrumCache, default_budget_bytes, default_cache_dir
from analysis.config import env_flag, env_number, env_text
from analysis.errors import InputError, say_once
from analysis.pair_metrics import AnalysisSettings
from analysis.pipeline import model_result
from analysis.results import ModelResult
from analysis.scheduler import available_cores
from analysis.specs import DEMO_PREFIX, UPLOAD_PREFIX, SpecResolver, is_upload_spec, local_paths_allowed
from analysis.specs.series import Series, is_series_spec, resolve_series
from hosting.jobs import (
    Job,
    JobManager,
    JobState,
    cached_comparison,
    comparison_job,
    comparison_key,
    comparison_work,
    server_cache,
    server_resolver,
)
from hosting.public import public_message, server_places

SETTINGS = AnalysisSettings()


def device() -> str:
    """``WSE_DEVICE``: ``auto`` (default), ``cpu`` or ``cuda[:n]``."""
    return env_text("WSE_DEVICE", "auto", strip=True, pattern=r"auto|cpu|cuda(:\d+)?", expected="auto, cpu or cuda")


#: A Ray cluster to run analyses on (``local``, ``auto`` or an address); unset: this process.
RAY_ADDRESS = env_text("WSE_RAY_ADDRESS")


def check_settings() -> None:
    """Read every ``WSE_*`` setting the dashboard uses, each through its checked reader.

    Called first thing in every run of ``app.py``, so a typo is one plain line naming the
    variable and its value on whatever page is opened (:class:`InputError`), not a
    redacted exception when some visitor first starts an analysis or uploads a file.
    """
    import torch

    from analysis.distributed import ray_settings
    from analysis.linalg import default_method
    from analysis.quant import dequantise_setting

    local_paths_allowed()
    default_cache_dir()
    default_budget_bytes()
    resolver()  # its upload store reads WSE_UPLOAD_BUDGET_GB
    _max_jobs()
    _worker_processes()
    _max_jobs_per_visitor()
    _upload_limits()
    demo_autobuild()
    wanted = device()
    if wanted.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("WSE_DEVICE", f"asks for {wanted!r}, but this machine has no CUDA device")
    default_method(torch.device("cuda" if wanted.startswith("cuda") else "cpu"))  # WSE_SVD_METHOD
    dequantise_setting()  # WSE_DEQUANTISE_DEVICE (quantised checkpoints)
    if RAY_ADDRESS:
        ray_settings()


@st.cache_resource(show_spinner=False)
def job_manager(max_workers: int = 1, processes: bool = True) -> JobManager:
    """The server's job manager: analyses run in ``max_workers`` worker processes (with
    ``processes``; :mod:`hosting.workers`), each job's progress read by one thread of this
    process. Jobs nobody is left waiting for (every visitor who asked closed the tab) are
    stopped within seconds. Under a real server the workers are started at once, in the
    background, so the first analysis does not wait for their imports; elsewhere (tests)
    on the first job."""
    manager = JobManager(max_workers=max_workers, processes=processes)
    manager.reap_every(_session_alive, REAP_SECONDS)
    from streamlit import runtime as streamlit_runtime

    if manager.workers is not None and streamlit_runtime.exists():
        threading.Thread(target=manager.workers.start, name="wse-worker-warm", daemon=True).start()
    return manager


#: How often jobs are checked for visitors still waiting.
REAP_SECONDS = 5.0


def _session_alive(session: str) -> bool:
    """Whether the browser session ``session`` is still connected to this server."""
    from streamlit import runtime as streamlit_runtime

    if not streamlit_runtime.exists():
        return True  # not under a server (AppTest): never reap
    return streamlit_runtime.get_instance().is_active_session(session)


@st.cache_resource(show_spinner=False)
def _resolver(cache_dir: str, allow_local_paths: bool) -> SpecResolver:
    return server_resolver.__wrapped__(cache_dir, allow_local_paths)


@st.cache_resource(show_spinner=False)
def _spectrum_cache(cache_dir: str) -> SpectrumCache:
    return server_cache.__wrapped__(cache_dir)


def resolver() -> SpecResolver:
    """The spec resolver for this server's cache folder and ``WSE_ALLOW_LOCAL_PATHS``."""
    return _resolver(str(default_cache_dir()), local_paths_allowed())


def spectrum_cache() -> SpectrumCache:
    return _spectrum_cache(str(default_cache_dir()))


def _max_jobs() -> int:
    return int(env_number("WSE_MAX_JOBS", 1, minimum=1, integer=True))


def _max_jobs_per_visitor() -> int:
    return int(env_number("WSE_MAX_JOBS_PER_VISITOR", 8, minimum=1, integer=True))


def _worker_processes() -> bool:
    """``WSE_WORKER_PROCESSES``: analyses in worker processes (default on); off, they run on
    threads of the web server's process (as before; for debugging and comparisons)."""
    return env_flag("WSE_WORKER_PROCESSES", True)


def manager() -> JobManager:
    return job_manager(_max_jobs(), _worker_processes() and not RAY_ADDRESS)


def _job_workers() -> int | None:
    """Matrices one job analyses at once: the engine's choice, or a share of the cores when
    ``WSE_MAX_JOBS`` jobs may run together (so they never oversubscribe the machine)."""
    jobs = _max_jobs()
    return None if jobs == 1 else max(1, available_cores() // jobs)


def session_id() -> str:
    """This browser session's id (who is watching which job): Streamlit's own, so the
    job manager can tell when the visitor has gone."""
    from streamlit.runtime.scriptrunner import get_script_run_ctx

    ctx = get_script_run_ctx()
    if ctx is not None:
        return ctx.session_id
    if "wse_session" not in st.session_state:  # pragma: no cover - outside a script run
        st.session_state.wse_session = uuid.uuid4().hex
    return st.session_state.wse_session


@st.cache_resource(show_spinner=False)
def _places(cache_dir: str) -> dict[str, str]:
    return server_places(cache_dir)


def friendly(error: str, subject: str | None = None, *, spec: str | None = None, short_hashes: bool = True) -> str:
    """``error`` as a visitor may see it: every server folder under a neutral name
    (:func:`analysis.errors.public_message`, the one place this is done), and without
    what the page names already: a leading ``subject`` (the model's label), the
    ``spec`` itself, and, for an upload, its hash before each of its file names."""
    cache_dir = str(default_cache_dir())
    if spec:
        error = say_once(spec, error)
    text = public_message(error, _places(cache_dir), resolver().uploads.root, short_hashes=short_hashes)
    if spec and is_upload_spec(spec):
        text = text.replace(f"upload {spec.removeprefix(UPLOAD_PREFIX)[:8]}/", "")
    return say_once(subject, text) if subject else text


# -- who a visitor is ----------------------------------------------------------------------------
#: Streamlit's XSRF cookie (``server.enableXsrfProtection``, on in .streamlit/config.toml):
#: one random token per browser, sent by every tab of it, masked afresh on each page load.
XSRF_COOKIE = "_streamlit_xsrf"


def xsrf_token(cookie: str | None) -> str | None:
    """The token inside an XSRF cookie's value (hex), or ``None`` for none or a malformed one.

    Tornado writes version 2 as ``2|mask|token XOR mask|timestamp``; an older value is the
    token itself.
    """
    if not isinstance(cookie, str) or not cookie:  # AppTest's context holds stand-ins
        return None
    parts = cookie.split("|")
    if parts[0] != "2":
        return cookie if "|" not in cookie else None
    try:
        mask, masked = bytes.fromhex(parts[1]), bytes.fromhex(parts[2])
    except (IndexError, ValueError):
        return None
    if len(mask) != 4 or not masked:
        return None
    return bytes(b ^ mask[i % 4] for i, b in enumerate(masked)).hex()


def browser_token() -> str | None:
    """The XSRF token of the browser this run serves, or ``None`` (no cookie: XSRF protection
    off, or no browser, as in AppTest)."""
    try:
        return xsrf_token(st.context.cookies.get(XSRF_COOKIE))
    except Exception:  # outside a server's script run  # pragma: no cover
        return None


@st.cache_resource(show_spinner=False)
def _visitors() -> tuple[threading.Lock, dict[str, set[str]], dict[str, list[int]]]:
    """Server-wide: the browser sessions (tabs) seen of each visitor, and each visitor's uploads."""
    return threading.Lock(), {}, {}


def visitor_id() -> str:
    """Who is asking, for per-visitor quotas: their browser, the same in every tab of it.

    A hash of the browser's XSRF token (:func:`browser_token`); this session's id where
    there is none. Best effort: a visitor who clears cookies, or opens another browser, is
    a new visitor; the server has no surer way to tell people apart (no accounts, and the
    address is often a proxy's). Records this session as one of the visitor's tabs.
    """
    session = session_id()
    token = browser_token()
    if not token:
        return session
    visitor = "browser-" + hashlib.sha256(token.encode()).hexdigest()[:16]
    lock, sessions, _ = _visitors()
    with lock:
        if len(sessions) > 100_000:  # a long-running server: forget the oldest visitors
            sessions.clear()
        sessions.setdefault(visitor, set()).add(session)
    return visitor


def visitor_sessions() -> set[str]:
    """The sessions (tabs) of this visitor seen so far, this one included."""
    visitor = visitor_id()
    lock, sessions, _ = _visitors()
    with lock:
        return set(sessions.get(visitor, ())) | {session_id()}


def upload_quota(size: int, *, count: bool = False, pending: int = 0) -> None:
    """Check (or, with ``count``, record) one upload of ``size`` bytes against this
    visitor's quota: ``WSE_UPLOADS_PER_VISITOR`` uploads (default 10) and
    ``WSE_UPLOAD_MB_PER_VISITOR`` megabytes (default 2000) per visitor (:func:`visitor_id`:
    per browser, however many tabs). ``pending``: bytes the visitor's other tabs hold, not
    added yet (:func:`ui.upload_memory.pending_elsewhere`), counted with what was stored."""
    lock, _, quotas = _visitors()
    if browser_token():
        visitor = visitor_id()
        with lock:
            used = quotas.setdefault(visitor, [0, 0])
    else:  # no browser to recognise: this session is the visitor
        used = st.session_state.setdefault("wse_upload_quota", [0, 0])
    with lock:
        if count:
            used[0] += 1
            used[1] += size
            return
        uploads, stored = used
    most, megabytes = _upload_limits()
    if uploads >= most:
        raise InputError("your uploads", f"one visitor may add at most {most}")
    if stored + pending + size > megabytes * 1024**2:
        held = f" (your other tabs hold {pending / 1024**2:.0f} MB of files not yet added)" if pending else ""
        raise InputError("your uploads", f"one visitor may upload at most {megabytes:g} MB in all{held}")


def _upload_limits() -> tuple[int, float]:
    """``WSE_UPLOADS_PER_VISITOR`` (uploads) and ``WSE_UPLOAD_MB_PER_VISITOR`` (megabytes)."""
    most = int(env_number("WSE_UPLOADS_PER_VISITOR", 10, minimum=1, integer=True))
    return most, env_number("WSE_UPLOAD_MB_PER_VISITOR", 2000, minimum=1)


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
    #: Why the job was not started (this visitor's quota of running jobs is used up).
    refused: str | None = None

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


def _busy_message() -> str:
    return (
        f"not started: one visitor may run {_max_jobs_per_visitor()} analyses at once "
        "(WSE_MAX_JOBS_PER_VISITOR); it starts when one of yours finishes"
    )


def job_key(base: str, tuned: str) -> tuple:
    """The job comparing ``tuned`` with ``base`` on this server.

    The cache folder is part of it: it decides what ``demo:`` and ``upload:`` specs name;
    so are the versions of local files (:meth:`SpecResolver.version`): a folder rewritten
    in place is analysed again (cheaply: the spectrum cache is content-addressed).
    """
    versions = (_version(base), _version(tuned))
    return (*comparison_key(base, tuned, SETTINGS, device()), str(default_cache_dir()), versions)


#: How long a spec's file stamp (:meth:`SpecResolver.version`) is reused. Every watching
#: page polls its jobs each second; eight visitors on a cold server spent most of the
#: process's time re-stating the same folders there, starving the one analysis thread
#: they were all waiting for (measured: a tiny model's analysis took minutes). A folder
#: rewritten in place is still seen within a few seconds.
VERSION_TTL_S = 5.0
_versions: dict[str, tuple[float, str]] = {}
_versions_lock = threading.Lock()


def _version(spec: str) -> str:
    now = time.monotonic()
    with _versions_lock:
        hit = _versions.get(spec)
    if hit is not None and now - hit[0] < VERSION_TTL_S:
        return hit[1]
    value = resolver().version(spec)
    with _versions_lock:
        if len(_versions) > 4096:
            _versions.clear()
        _versions[spec] = (now, value)
    return value


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
        abandoned = job is not None and job.abandoned and job.state is JobState.CANCELLED
        if start and (job is None or (restart and stale) or abandoned):
            found = cached_comparison(resolver(), base, spec, settings=SETTINGS, cache=spectrum_cache())
            if found is not None:  # analysed before: read here, no worker needed
                job = jobs.finished(key, found, label=resolver().label(spec), watcher=session_id())
                tracked.append(Tracked(spec, job))
                continue
            if sum(jobs.active_for(tab) for tab in visitor_sessions()) >= _max_jobs_per_visitor():
                tracked.append(Tracked(spec, None, refused=_busy_message()))
                continue
            job = jobs.submit(key, _comparison(base, spec), label=resolver().label(spec), watcher=session_id())
        elif start and job is not None and not job.should_stop():
            job.watch(session_id())
        tracked.append(Tracked(spec, job))
    return tracked


def _comparison(base: str, spec: str):
    """The job function comparing ``spec`` with ``base``: picklable :class:`~hosting.jobs.Work`
    for a worker process, or, with ``WSE_RAY_ADDRESS``, a function driving Ray tasks from
    a thread of this process (the work itself runs on the cluster)."""
    if RAY_ADDRESS:
        return comparison_job(
            resolver(),
            base,
            spec,
            settings=SETTINGS,
            device=device(),
            cache=spectrum_cache(),
            workers=_job_workers(),
            ray_address=RAY_ADDRESS,
        )
    cache_dir = str(default_cache_dir())
    return comparison_work(
        cache_dir, local_paths_allowed(), base, spec, settings=SETTINGS, device=device(), workers=_job_workers()
    )


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


def demo_autobuild() -> bool:
    """``WSE_DEMO_AUTOBUILD``: build the demo in the background on a server without one (default on)."""
    return env_flag("WSE_DEMO_AUTOBUILD", True)

"""The offline demo, built in the dashboard: one background build per server, followed by the
sessions that opened on the demo (their selection grows with each fine-tune trained)."""

from __future__ import annotations

import streamlit as st

from analysis.errors import InputError
from analysis.specs import DEMO_PREFIX
from hosting.jobs import Job, JobManager
from ui import runtime

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
        return runtime.resolver().demo(), None
    except InputError as exc:
        return None, str(exc)


def _build_demo(job: Job):
    import time

    from demo import build_demo
    from hosting.jobs import Progress

    started = time.time()

    def on_step(done: int, total: int, what: str) -> None:
        job.report(Progress(done, total, what, time.time() - started))

    return build_demo(progress=False, on_step=on_step, should_stop=job.should_stop)


def start_demo_build() -> Job:
    """Start (or join) building the demo; a stopped build resumes where it was left."""
    return _demo_jobs().submit(demo_key(), _build_demo, label="offline demo", watcher=runtime.session_id())


def cancel_demo_build() -> None:
    """Withdraw this session from the build; it stops when nobody else watches it (the
    fine-tunes finished so far stay)."""
    job = demo_job()
    if job is not None:
        job.unwatch(runtime.session_id())
    st.session_state.pop(DEMO_FOLLOW, None)


def ensure_demo(follow: bool) -> None:
    """On a server without a complete demo, build it in the background (once per server
    process: a cancelled build is resumed only when asked; ``WSE_DEMO_AUTOBUILD=0`` turns
    this off, as ``false``, ``no`` or ``off`` do, leaving the Models page's button). ``follow``: this session
    opened on the demo (no link named models), so its selection grows with the build."""
    manifest, error = demo_state()
    if error is not None or (manifest is not None and manifest.complete):
        return
    job = demo_job()
    if job is None and runtime.demo_autobuild():
        job = start_demo_build()
    elif job is not None and not job.state.finished:
        job.watch(runtime.session_id())
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
    base, tuned = runtime.demo_defaults()
    if tuned and tuple(tuned) != last:
        state.set("base", base)
        state.set("tuned", list(tuned))
        st.session_state[DEMO_FOLLOW] = tuple(tuned)
    manifest, _ = demo_state()
    if manifest is not None and manifest.complete:
        st.session_state.pop(DEMO_FOLLOW, None)

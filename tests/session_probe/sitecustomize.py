"""A probe inside a test's Streamlit server (tests/test_session_memory.py only): on ``SIGUSR1``
it writes, as JSON to ``$WSE_TEST_SESSION_PROBE``, the Streamlit sessions whose objects are
still alive after a full garbage collection, and which of them Streamlit still knows.

Python imports ``sitecustomize`` at start-up from ``PYTHONPATH``; the test puts this folder
there for the server it starts. Nothing in the dashboard imports it. It reads Streamlit's
private session manager (``Runtime._session_mgr``): a test-only look inside the server.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import threading
import time


def _alive(kind: str) -> list:
    return [o for o in gc.get_objects() if type(o).__name__ == kind]


def _held_by_runtime_loop(session) -> bool:
    """Whether ``session`` is the last one Streamlit's ``Runtime._loop_coroutine`` flushed: the
    coroutine's ``for active_session_info in ...`` variable keeps it until another session's
    messages are flushed (streamlit/runtime/runtime.py)."""
    for info in gc.get_referrers(session):
        if type(info).__name__ == "ActiveSessionInfo":
            for holder in gc.get_referrers(info):
                code = getattr(holder, "cr_code", None)
                if code is not None and code.co_name == "_loop_coroutine":
                    return True
    return False


def _probe() -> dict:
    from streamlit import runtime

    before = {kind: len(_alive(kind)) for kind in ("AppSession", "SessionState", "ScriptRunContext")}
    started = time.perf_counter()
    gc.collect()
    collect_s = time.perf_counter() - started
    manager = runtime.get_instance()._session_mgr
    known = {info.session.id for info in manager.list_sessions()}
    sessions = _alive("AppSession")
    loop_held = {s.id for s in sessions if s.id not in known and _held_by_runtime_loop(s)}
    allowed = known | loop_held
    own_states = {id(s._session_state) for s in sessions if s.id in allowed}
    report = {
        "before_collect": before,
        "collect_s": round(collect_s, 3),
        "known": sorted(known),
        "loop_held": sorted(loop_held),
        "sessions": sorted(s.id for s in sessions),
        "stray_sessions": sorted(s.id for s in sessions if s.id not in allowed),
        "stray_states": sum(1 for s in _alive("SessionState") if id(s) not in own_states),
        "stray_contexts": sorted(c.session_id for c in _alive("ScriptRunContext") if c.session_id not in allowed),
        "threads_with_stray_context": sorted(
            thread.name
            for thread in threading.enumerate()
            if getattr(getattr(thread, "streamlit_script_run_ctx", None), "session_id", None) not in (None, *known)
        ),
    }
    del sessions
    return report


def _write(path: str) -> None:
    try:
        report = _probe()
    except Exception as exc:  # say so in the file: the test shows it
        report = {"error": repr(exc)}
    with open(path + ".tmp", "w") as out:
        json.dump(report, out)
    os.replace(path + ".tmp", path)


if os.environ.get("WSE_TEST_SESSION_PROBE") and not os.environ.get("WSE_TEST_SESSION_PROBE_CHILD"):
    _path = os.environ["WSE_TEST_SESSION_PROBE"]
    os.environ["WSE_TEST_SESSION_PROBE_CHILD"] = "1"  # the worker processes it spawns stay out of it
    signal.signal(
        signal.SIGUSR1, lambda *_: threading.Thread(target=_write, args=(_path,), name="session-probe").start()
    )

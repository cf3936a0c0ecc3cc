"""Uploaded files in the server's memory: let go of once stored or refused, or once the tab
that chose them has gone (issue 26, item 3; docs/hosting.md, "Upload memory").

Streamlit keeps every uploaded file whole in the server process (its
``MemoryUploadedFileManager``) until the browser deletes it or the session ends; the
uploader's values in session state wrap the same bytes.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
import weakref

import streamlit as st

from ui.runtime import REAP_SECONDS, session_id, visitor_sessions


def release_uploads(files) -> None:
    """Let go of uploaded files at once, once they are stored or refused.

    Streamlit keeps every uploaded file whole in server memory (its
    ``MemoryUploadedFileManager``) until the browser deletes it or the session ends,
    minutes after the tab closed; the widget's own values wrap the same bytes. Removing
    them from the manager, closing the values and collecting frees them now (a large
    ``bytes`` is its own ``mmap``: freeing it returns the memory to the system).
    """
    from streamlit import runtime as streamlit_runtime

    if streamlit_runtime.exists():
        manager = streamlit_runtime.get_instance().uploaded_file_mgr
        for f in files:
            manager.remove_file(session_id(), f.file_id)
    for f in files:
        f.close()
    gc.collect()
    # What still holds them once this run is over (the widget's old values, an error's
    # traceback in a reference cycle) goes with the collections after it.
    for delay in (2.0, 10.0):
        timer = threading.Timer(delay, gc.collect)
        timer.daemon = True
        timer.start()


def _held_files() -> dict:
    """The files Streamlit holds in the server's memory, by session and file id: its
    ``MemoryUploadedFileManager``'s store (empty for another upload manager, or outside a
    server). The one place that reads that store, which has no public reader."""
    from streamlit import runtime as streamlit_runtime

    if not streamlit_runtime.exists():
        return {}
    storage = getattr(streamlit_runtime.get_instance().uploaded_file_mgr, "file_storage", None)
    return storage if isinstance(storage, dict) else {}


def pending_elsewhere() -> int:
    """Bytes of files this visitor chose in their other tabs and has not added (or had
    refused) yet: Streamlit holds them in the server's memory while those tabs are open,
    so they count against the visitor's quota too (:func:`ui.runtime.upload_quota`)."""
    storage = _held_files()
    return sum(
        len(record.data)
        for session in visitor_sessions() - {session_id()}
        for record in list(storage.get(session, {}).values())
    )


# -- files chosen in a tab that closed ------------------------------------------------------------
#: When each session holding files was first seen disconnected (used by the reaper's thread only).
_gone: dict[str, float] = {}
#: Seconds a tab may stay disconnected before the files it chose and did not add are let go:
#: long enough for a page reload or a short network blip, short of Streamlit's
#: ``server.disconnectedSessionTTL`` (120 s), after which it would keep them anyway.
UPLOAD_GRACE_S = 10.0


@st.cache_resource(show_spinner=False)
def _chosen() -> tuple[threading.Lock, dict[str, weakref.WeakSet], set[str]]:
    """Server-wide: the uploader's values each session holds (weakly), and the sessions whose
    files were let go while they were disconnected (told once if they come back)."""
    return threading.Lock(), {}, set()


def chosen_files(value) -> list:
    """The files an uploader's value in session state holds, still open.

    Streamlit leaves a ``DeletedFile`` stand-in in the value for a file its upload manager no
    longer has (the widget's return value filters them out, session state does not), and a
    value let go of while its tab was disconnected is closed (:func:`drop_abandoned_uploads`).
    """
    from streamlit.typing import UploadedFile  # Streamlit's public name for the type

    return [f for f in value or () if isinstance(f, UploadedFile) and not f.closed]


def hold_uploads(files) -> None:
    """Note the files this tab chose and has not added (the uploader's values), so they can
    be closed if the tab goes away (:func:`drop_abandoned_uploads`); starts the thread that
    looks for such tabs."""
    files = chosen_files(files)
    if not files:
        return
    lock, chosen, _ = _chosen()
    with lock:
        chosen.setdefault(session_id(), weakref.WeakSet()).update(files)
    _upload_reaper()


def uploads_dropped() -> bool:
    """Whether this tab's chosen files were let go while it was disconnected (once)."""
    lock, _, dropped = _chosen()
    with lock:
        if session_id() in dropped:
            dropped.discard(session_id())
            return True
    return False


def drop_abandoned_uploads(now: float | None = None, grace: float = UPLOAD_GRACE_S) -> list[str]:
    """Let go of the files of every tab disconnected for ``grace`` seconds; the sessions dropped.

    Streamlit keeps a closed tab's session, and with it the files chosen in its uploader, for
    ``server.disconnectedSessionTTL`` (120 s) and then until some other session writes to its
    session storage (measured: 3 x 450 MiB held 150-180 s; after that the dropped session's
    state sat in reference cycles that only a full ``gc`` frees: Streamlit's ``ScriptRunner``
    keeps its finished script thread, which carries the run's ``ScriptRunContext``, which holds
    the session state and a method of the runner; and Streamlit's runtime loop keeps the last
    session it flushed until another session's messages go out; docs/hosting.md, "Closed
    sessions"). Two
    things hold each file's bytes: the upload manager's record (removed with
    ``remove_session_files``, the method of Streamlit's ``UploadedFileManager`` interface
    that a session's shutdown calls) and the uploader's ``UploadedFile`` values in the
    session's widget state, which share the record's buffer (closed here: closing a
    ``BytesIO`` drops its buffer, whoever still refers to the object). Only public runtime
    calls (``Runtime.is_active_session``, ``remove_session_files``) and our own record of the
    values (:func:`hold_uploads`), so nothing depends on how Streamlit stores sessions.

    A tab that reconnects after this (within the TTL, so Streamlit resumes its session) has no
    files on the server: its uploader's value holds Streamlit's ``DeletedFile`` stand-ins or
    the closed values (:func:`chosen_files` skips both), and the page renews the uploader and
    asks for the files again (:func:`uploads_dropped`).
    """
    from streamlit import runtime as streamlit_runtime

    if not streamlit_runtime.exists():
        return []
    instance = streamlit_runtime.get_instance()
    files = instance.uploaded_file_mgr
    now = time.monotonic() if now is None else now
    lock, chosen, dropped = _chosen()
    gone = _gone
    with lock:
        sessions = set(chosen) | set(_held_files())
    released = []
    for session in sessions:
        if instance.is_active_session(session):
            gone.pop(session, None)
            continue
        if now - gone.setdefault(session, now) < grace:
            continue
        files.remove_session_files(session)
        with lock:
            values = [value for value in chosen.pop(session, ()) if not value.closed]
            if len(dropped) > 100_000:  # a long-running server: forget the oldest
                dropped.clear()
            if values:
                dropped.add(session)
        for value in values:
            value.close()
        gone.pop(session, None)
        released.append(session)
    for session in set(gone) - sessions:  # files added or removed meanwhile
        gone.pop(session, None)
    if released:
        gc.collect()  # the dropped session's state may sit in reference cycles (postScriptGC is off)
    return released


@st.cache_resource(show_spinner=False)
def _upload_reaper() -> threading.Thread:
    """One thread per server looking every ``REAP_SECONDS`` for tabs gone with files chosen."""

    def loop() -> None:
        while True:
            time.sleep(REAP_SECONDS)
            try:
                drop_abandoned_uploads()
            except Exception:  # pragma: no cover - never let the reaper die
                logging.getLogger(__name__).exception("letting go of abandoned uploads failed")

    thread = threading.Thread(target=loop, name="wse-upload-reaper", daemon=True)
    thread.start()
    return thread

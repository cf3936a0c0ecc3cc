"""What a server starts before its first visitor needs it.

Only Streamlit and :mod:`hosting.workers` are imported here (a few hundred milliseconds).
:func:`warm_up` runs when the server starts (``serve.py``'s lifespan hook): it starts the
analysis workers and imports the pages' modules on a background thread, so the first visitor
finds both ready (or well under way) instead of starting them. ``app.py`` calls
:func:`start_workers` as well, for a server started on ``app.py`` itself (once per server either way).
"""

from __future__ import annotations

import importlib
import logging
import threading
import time

from analysis.config import env_flag, env_number, env_text
from analysis.errors import InputError
from hosting import workers

log = logging.getLogger(__name__)

#: What the pages import (the engine with torch, pandas, Plotly, the chart modules): seconds of a
#: cold server's first page run when a visitor pays for it.
WEB_IMPORTS = (
    "ui.runtime",
    "ui.state",
    "ui.views",
    "ui.mitigation",
    "charts.overview",
    "charts.comparison",
    "charts.spectra",
    "charts.series",
    "charts.rl_measures",
    "charts.mitigation",
)


def start_workers() -> None:
    """Start the job manager's worker processes now (once per server; nothing with
    ``WSE_WORKER_PROCESSES=0`` or ``WSE_RAY_ADDRESS``; a bad setting is left for
    :func:`ui.runtime.check_settings` to report)."""
    try:
        if not env_flag("WSE_WORKER_PROCESSES", True) or env_text("WSE_RAY_ADDRESS"):
            return
        size = int(env_number("WSE_MAX_JOBS", 1, minimum=1, integer=True))
    except InputError:
        return
    workers.prestart(size, workers.WARM)


def warm_up() -> threading.Thread:
    """Start the workers, then import :data:`WEB_IMPORTS` on a daemon thread (returned).

    A module that fails to import is left for the page that needs it to report.
    """
    start_workers()

    def imports() -> None:
        started = time.perf_counter()
        for name in WEB_IMPORTS:
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - the page importing it says what is wrong
                log.exception("warming up: importing %s failed", name)
        log.info("warmed up in %.1f s", time.perf_counter() - started)

    thread = threading.Thread(target=imports, name="wse-warm-up", daemon=True)
    thread.start()
    return thread

"""What a server's first page run starts before importing anything heavy.

Only Streamlit and :mod:`hosting.workers` are imported here (a few hundred milliseconds):
``app.py`` calls :func:`start_workers` right after drawing the page list and title, so the
analysis workers import torch while the web process imports the engine and the pages.
"""

from __future__ import annotations

from analysis.config import env_flag, env_number, env_text
from analysis.errors import InputError
from hosting import workers

#: What the job manager's workers import before their first job (``hosting.jobs``: its pool's ``warm``).
WORKER_IMPORTS = ("hosting.jobs",)


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
    workers.prestart(size, WORKER_IMPORTS)

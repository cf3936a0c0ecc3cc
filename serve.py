"""The dashboard as its server runs it: ``streamlit run serve.py`` (``run.sh`` starts this).

The same dashboard as ``streamlit run app.py`` (``app.py`` is the script every visitor's
session runs); served through Streamlit's ``st.App`` for its lifespan hook, so a server warms
up when it starts, not when its first visitor arrives: the analysis worker processes start
importing torch, and the pages' modules (the engine, pandas, Plotly, the charts) are imported
on a background thread while the server already answers (:func:`ui.early.warm_up`).
"""

from __future__ import annotations

from contextlib import asynccontextmanager

import streamlit as st


@asynccontextmanager
async def lifespan(_app):
    """Warm the server up as it starts (nothing to undo when it stops: workers end with it)."""
    from ui import early

    early.warm_up()
    yield


app = st.App("app.py", lifespan=lifespan)

"""Streamlit-side glue for the dashboard (the engine, ``analysis``, never imports this)."""

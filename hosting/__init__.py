"""Serving the engine to many visitors at once (no Streamlit).

- :mod:`hosting.jobs`: background jobs shared between visitors, watched and reaped;
- :mod:`hosting.uploads`: checking and storing uploads, per-visitor quotas;
- :mod:`hosting.public`: what a visitor may read of an error (no server paths).
"""

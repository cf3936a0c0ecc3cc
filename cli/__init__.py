"""The command line: ``python -m analysis report|mitigate|demo`` (:func:`cli.main.main`).

A composition root beside the dashboard: it drives the engine (:mod:`analysis`), writes
reports the chart package draws (:mod:`charts`) and builds the demo (:mod:`demo`), so it
sits above all three; ``analysis/__main__.py`` only hands ``python -m analysis`` to it.
"""

from cli.main import main

__all__ = ["main"]

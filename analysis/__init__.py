"""Weight-spectrum explorer engine: what did a fine-tune do to a model's weights?

The engine never imports Streamlit. Public entry points:

- :func:`analysis.sources.open_source` -- a hub id, folder, file or adapter -> weights.
- :func:`analysis.pairing.plan_comparison` -- pair base and tuned matrices.
- :func:`analysis.pipeline.compare` -- run a whole comparison (cached, on the best device).
- :mod:`analysis.metrics` -- the metrics of docs/metrics.md as pure functions.
- :func:`analysis.report.to_report` -- the JSON report of the command line.
"""

ALGORITHM_VERSION = "1"

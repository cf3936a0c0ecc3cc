"""Weight-spectrum explorer engine: what did a fine-tune do to a model's weights?

The engine never imports Streamlit. Public entry points:

- :func:`analysis.sources.open_location` -- a hub id, folder, file or adapter -> weights.
- :func:`analysis.pairing.plan_comparison` -- pair base and tuned matrices.
- :func:`analysis.pipeline.compare` -- run a whole comparison (cached, on the best device).
- :mod:`analysis.metrics` -- the metrics of docs/metrics.md as pure functions.
- :func:`analysis.report.to_report` -- the JSON report of the command line.
"""

#: Version of what cache entries hold and how they are keyed (the cache folder is
#: ``v<version>``). Bump it when a digest or a stored decomposition changes, never for a
#: derived metric: those are computed from stored spectra when an entry is read.
#: 2: BLAKE3 digests and keys (1 used SHA-256; its entries are not reused).
ALGORITHM_VERSION = "2"

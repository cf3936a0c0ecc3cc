"""Weight-spectrum explorer engine: what a fine-tune did to a model's weights.

The engine imports no Streamlit, Plotly or pandas (import contracts in ``pyproject.toml``).
Public entry points:

- :func:`analysis.compare.compare` -- model names in, a whole comparison out (cached, on the
  best device, or on a Ray cluster).
- :class:`analysis.specs.SpecResolver` -- the one door from a model name to opened weights.
- :func:`analysis.pairing.plan_comparison` -- pair base and tuned matrices.
- :mod:`analysis.metrics` -- the metrics of docs/metrics.md as pure functions.
- :func:`analysis.adapters.merge_lora` -- PEFT's LoRA / DoRA merge rule.
- :mod:`analysis.mitigation` -- intruder mitigation (Shuttleworth et al. 2024, section 6).
- :func:`analysis.report.to_report` -- the JSON report of the command line.

See ``docs/architecture.md`` for where each formula lives.
"""

#: Version of what cache entries hold and how they are keyed (the cache folder is
#: ``v<version>``). Bump it when a digest or a stored decomposition changes, never for a
#: derived metric: those are computed from stored spectra when an entry is read.
#: 2: BLAKE3 digests and keys (1 used SHA-256; its entries are not reused).
ALGORITHM_VERSION = "2"

"""Benchmarks of the engine against the papers' procedure (not tests: run by hand).

``python -m benchmarks.run --help``; results and the machine they came from are in
``benchmarks/README.md``.
"""

"""The chance level of an intruder score, kept in the persistent cache (issue 23).

:func:`analysis.measures.chance_level` is the formula: a seeded simulation per shape (2,000
random unit vectors of ``R^rows``; a quarter of a second for a 4096-row shape). This keeps
its result as an entry of the content-addressed cache (kind ``chance``; one entry per rows,
base vectors, draws, seed and :data:`CHANCE_VERSION`), so a shape is simulated once for every
process, session and report, and memoises it in the process in front of the disk. A cache
that cannot be written (read-only) is read if it can be and otherwise computed past: the
values are the same either way (the simulation is seeded; the entry keeps their float64 bytes).
"""

from __future__ import annotations

import threading

import torch

from analysis import measures
from analysis.cache import SpectrumCache

#: Version of the simulation :func:`analysis.measures.chance_level` runs (part of the key):
#: changing how it draws, or what it returns, needs a new one.
CHANCE_VERSION = "1"

_memo: dict[tuple[int, int, int, int], tuple[float, float, float]] = {}
_memo_lock = threading.Lock()


def chance_key(rows: int, base_vectors: int, samples: int, seed: int) -> str:
    """The ``chance`` entry of one shape, draw count and seed."""
    return SpectrumCache.key(
        "chance", CHANCE_VERSION, f"rows={rows}", f"vectors={base_vectors}", f"samples={samples}", f"seed={seed}"
    )


def chance_level(
    rows: int,
    base_vectors: int,
    *,
    samples: int = measures.CHANCE_SAMPLES,
    seed: int = 0,
    cache: SpectrumCache | None = None,
) -> tuple[float, float, float]:
    """(median, 5th, 95th percentile) of :func:`analysis.measures.chance_level`, from ``cache`` if stored there.

    Computed once per process and shape; with a ``cache``, once per cache: read from its
    ``chance`` entry, or simulated and stored there. ``cache=None`` keeps it in the process only.
    """
    memo_key = (int(rows), int(base_vectors), int(samples), int(seed))
    with _memo_lock:
        found = _memo.get(memo_key)
    if found is not None:
        return found
    if cache is None:
        found = measures.chance_level(*memo_key)
    else:
        key = chance_key(*memo_key)
        entry = cache.get_or_compute("chance", key, lambda: _entry(*memo_key))
        found = tuple(float(x) for x in entry[0]["levels"].tolist())
    with _memo_lock:
        _memo[memo_key] = found
    return found  # type: ignore[return-value]


def _entry(rows: int, base_vectors: int, samples: int, seed: int):
    levels = measures.chance_level(rows, base_vectors, samples, seed)
    return {"levels": torch.tensor(levels, dtype=torch.float64)}, {"rows": rows, "base_vectors": base_vectors}


def forget() -> None:
    """Empty the process memo (tests: the next call reads the cache, or simulates)."""
    with _memo_lock:
        _memo.clear()
    measures.chance_level.cache_clear()

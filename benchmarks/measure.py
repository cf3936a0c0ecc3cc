"""One measurement in a fresh process: ``python -m benchmarks.measure SPEC.json OUT.json``.

Peak memory is only honest in a process that did nothing else (``ru_maxrss`` never goes
down), so :mod:`benchmarks.run` starts one of these per measurement. Imports happen
before the clock starts, for the baseline and the engine alike; the timed part is
exactly "open the files, analyse every matrix, have the numbers".

SPEC keys: ``what`` (``baseline`` or ``engine``), ``base``, ``tuned``, ``kind`` (``full``
or ``adapter``), ``names`` (base tensor names; the baseline's matrices), ``device``,
``cache_dir`` (engine; ``null`` for no cache), ``workers`` (engine, optional), ``threads``
(``torch.set_num_threads`` for either side, optional).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import psutil
import torch

from analysis.cache import SpectrumCache
from analysis.compare import plan_models
from analysis.pipeline import analyse_plan
from analysis.results import DEFAULT_EPSILONS, DEFAULT_TOP_K
from benchmarks import baseline


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_engine(spec: dict) -> dict:
    device = torch.device(spec["device"])
    cache = SpectrumCache(spec["cache_dir"]) if spec.get("cache_dir") else None
    workers = spec.get("workers")  # None: the engine's default
    start = time.perf_counter()
    # What `compare` does, with the analysis streamed so the timing is the same call path.
    (plan,) = plan_models(spec["base"], [spec["tuned"]])
    wanted = set(spec["names"])  # the same matrices as the baseline (all of them unless --modules)
    plan.matrices = [m for m in plan.matrices if m.name in wanted]
    results = list(analyse_plan(plan, device=device, cache=cache, workers=workers))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    matrices = {
        m.name: {
            "scores": [float(x) for x in m.intruder_scores],
            "tuned_s": [float(x) for x in m.tuned_singular_values[:100]],
            "base_s": [float(x) for x in m.base_singular_values[:100]],
            "delta_s": [float(x) for x in m.delta_singular_values[:100]],
            "counts": m.intruder_counts(DEFAULT_TOP_K, DEFAULT_EPSILONS),
            "effective_rank": m.effective_rank,
            "rank90": m.rank90,
        }
        for m in results
    }
    out = {"seconds": seconds, "matrices": matrices}
    if cache is not None:
        stats = cache.stats
        out["cache"] = {
            "hits": stats.hits,
            "misses": stats.misses,
            "computed": dict(stats.computed),
            "hashed_tensors": cache.fingerprints.hashed,
            "base_entry_bytes": _base_entry_bytes(cache),
        }
    return out


def _base_entry_bytes(cache: SpectrumCache) -> dict:
    """Bytes per stored vector element of the base entries (the U of every base matrix)."""
    from safetensors import safe_open

    files = [p for p in cache.entries() if "/base/" in p.as_posix()]
    elements = 0
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            shape = handle.get_slice("U").get_shape()
        elements += shape[0] * shape[1]
    total = sum(p.stat().st_size for p in files)
    return {"entries": len(files), "bytes": total, "vector_elements": elements}


def run_baseline(spec: dict) -> dict:
    device = torch.device(spec["device"])
    runner = baseline.run_full if spec["kind"] == "full" else baseline.run_adapter
    return runner(Path(spec["base"]), Path(spec["tuned"]), spec["names"], device)


def main(argv: list[str]) -> int:
    spec_path, out_path = argv
    spec = json.loads(Path(spec_path).read_text())
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    device = torch.device(spec["device"])
    if device.type == "cuda":
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = psutil.Process().memory_info().rss
    cpu_before = _cpu_seconds()
    result = run_engine(spec) if spec["what"] == "engine" else run_baseline(spec)
    result["cpu_seconds"] = _cpu_seconds() - cpu_before  # all threads, user + system
    result.update(
        {
            "what": spec["what"],
            "rss_before_bytes": rss_before,
            "rss_peak_bytes": _rss_peak_bytes(),
            "gpu_peak_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
            "loadavg": os.getloadavg()[0],
            "threads": torch.get_num_threads(),
        }
    )
    Path(out_path).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Ray scale-out benchmark: ``python -m benchmarks.run --workload ray``.

Measures, on local Ray instances started here (no dashboard):

- **no-op task**: the round trip of an empty Ray task (submit, run, fetch), one after
  another (latency) and 400 at once (throughput per task on the CPUs given);
- **engine task overhead**: the demo workload's full fine-tune with every pair cached,
  locally (``analysis.pipeline.analyse_plan``) and on Ray (``analysis.distributed``):
  the difference per task is what a task costs beyond its work (submission, planning
  again on the worker, cache lookups in another process, results back);
- **speed-up**: the full fine-tune and the r=8 adapter cold (no cache, every
  decomposition computed) on a Ray instance with one CPU, then with two; best of
  ``--repeat`` after a warm-up run that starts the workers and imports torch. The local
  engine on the same machine is shown for reference.

The worked estimate for a 70B base in docs/ray.md is built from these
per-task overheads and the per-shape GPU costs measured in issue 13.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from analysis.cache import SpectrumCache
from analysis.compare import plan_models
from analysis.pair_metrics import AnalysisSettings
from analysis.pipeline import analyse_plan
from benchmarks.workloads import demo_workload


def _ray_session(cpus: int):
    import ray

    ray.shutdown()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level="error")
    return ray


def _noop() -> int:
    return 0


def _timed(fn, repeat: int) -> tuple[float, object]:
    best, value = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - start)
    return best, value


def run_ray(args: argparse.Namespace) -> dict:
    from analysis import distributed

    repeat = args.repeat or 3
    workload = demo_workload(args.data_dir)
    base = str(workload.base)
    specs = [str(workload.fine_tune("full-ft").path), str(workload.fine_tune("lora-r8").path)]
    settings = AnalysisSettings()
    report: dict = {"workload": "ray", "description": workload.description, "repeat": repeat}

    # -- no-op tasks ------------------------------------------------------------------------
    ray = _ray_session(2)
    noop = ray.remote(_noop)
    ray.get([noop.remote() for _ in range(20)])  # start the workers
    latencies = []
    for _ in range(200):
        start = time.perf_counter()
        ray.get(noop.remote())
        latencies.append(time.perf_counter() - start)
    parallel, _ = _timed(lambda: ray.get([noop.remote() for _ in range(400)]), repeat)
    report["noop_latency_ms"] = 1e3 * statistics.median(latencies)
    report["noop_throughput_ms_per_task"] = 1e3 * parallel / 400

    # -- engine task overhead: everything cached ----------------------------------------------
    with tempfile.TemporaryDirectory() as scratch:
        cache = SpectrumCache(Path(scratch) / "spectra")
        plans = plan_models(base, specs[:1])
        list(analyse_plan(plans[0], settings=settings, cache=cache))  # fill the cache
        local, _ = _timed(
            lambda: list(analyse_plan(plan_models(base, specs[:1])[0], settings=settings, cache=cache)), repeat
        )
        stats = distributed.RayRunStats()

        def on_ray() -> None:
            distributed.compare(base, specs[:1], address=None, cache=cache, settings=settings, stats=stats)

        on_ray()  # warm-up: imports on the workers
        far, _ = _timed(on_ray, repeat)
        report["cached"] = {
            "local_s": local,
            "ray_s": far,
            "tasks": stats.tasks,
            "overhead_ms_per_task": 1e3 * (far - local) / max(1, stats.tasks),
            "matrices": len(plans[0].matrices),
        }

    # -- speed-up from one to two workers, cold -----------------------------------------------
    def cold_ray() -> distributed.RayRunStats:
        stats = distributed.RayRunStats()
        distributed.compare(base, specs, address=None, cache=None, settings=settings, stats=stats)
        return stats

    speedup = {}
    for cpus in (1, 2):
        _ray_session(cpus)
        cold_ray()  # warm-up
        seconds, stats = _timed(cold_ray, repeat)
        speedup[cpus] = {"seconds": seconds, "tasks": stats.tasks}
    ray.shutdown()

    def cold_local() -> None:
        for plan in plan_models(base, specs):
            list(analyse_plan(plan, settings=settings, cache=None))

    local_cold, _ = _timed(cold_local, repeat)
    report["cold"] = {
        "fine_tunes": ["full-ft", "lora-r8"],
        "ray_1_cpu_s": speedup[1]["seconds"],
        "ray_2_cpu_s": speedup[2]["seconds"],
        "tasks_1": speedup[1]["tasks"],
        "tasks_2": speedup[2]["tasks"],
        "speedup": speedup[1]["seconds"] / speedup[2]["seconds"],
        "local_engine_s": local_cold,
    }
    return report


def markdown(report: dict) -> str:
    c, k = report["cached"], report["cold"]
    return "\n".join(
        [
            f"# Ray scale-out ({report['description']})",
            "",
            f"best of {report['repeat']}; local Ray instances (no dashboard) on this machine",
            "",
            "| measurement | value |",
            "|---|---:|",
            f"| no-op task round trip, one at a time | {report['noop_latency_ms']:.2f} ms |",
            f"| no-op tasks, 400 at once on 2 CPUs | {report['noop_throughput_ms_per_task']:.2f} ms per task |",
            f"| full fine-tune, all cached: local engine | {c['local_s']:.3f} s ({c['matrices']} matrices) |",
            f"| full fine-tune, all cached: Ray, {c['tasks']} tasks | {c['ray_s']:.3f} s |",
            f"| engine overhead per task | {c['overhead_ms_per_task']:.1f} ms |",
            f"| cold, full-ft + lora-r8: Ray 1 CPU ({k['tasks_1']} tasks) | {k['ray_1_cpu_s']:.2f} s |",
            f"| cold, full-ft + lora-r8: Ray 2 CPUs ({k['tasks_2']} tasks) | {k['ray_2_cpu_s']:.2f} s |",
            f"| speed-up 1 -> 2 workers | {k['speedup']:.2f}x |",
            f"| cold, same pairs: local engine (both cores) | {k['local_engine_s']:.2f} s |",
            "",
        ]
    )

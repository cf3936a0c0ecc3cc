"""Benchmark the engine against the papers' procedure: ``python -m benchmarks.run``.

::

    python -m benchmarks.run                                  # demo workload, CPU
    python -m benchmarks.run --workload llama7b-shape --layers 1 --modules q_proj,gate_proj,down_proj
    python -m benchmarks.run --workload llama7b-shape --device cuda     # all 32 layers on a GPU
    python -m benchmarks.run --workload kernels --device cuda           # SVD methods per shape
    python -m benchmarks.run --workload ray                             # Ray: task overhead, 1 -> 2 workers

For each workload and scenario it prints the baseline's time (:mod:`benchmarks.baseline`,
the released script's procedure), the engine's time, their ratio against the target,
peak host memory (and GPU memory on CUDA) of each, and two checks:

- **agreement**: the engine's intruder counts (top 10, every eps of the grid) equal the
  baseline's, except where either score lies within 1e-3 of eps;
- **guard**: every approximation the engine makes (Gram eigendecomposition, float16 base
  vectors, low-rank update spectra, gesvda) is held to a float64 reference on these very
  matrices: counts equal at every eps (same exception), top-10 singular values of base,
  tuned and update within 1e-4 relative.

Scenarios (the fine-tune is the workload's full fine-tune unless named): ``cold`` (empty
cache), ``cached-base`` (base spectra cached, the pair not: another fine-tune of this
base was analysed before), ``all-cached`` (the same run again), and ``<adapter>
cached-base`` per LoRA adapter. Every measurement runs in a fresh process
(:mod:`benchmarks.measure`), baseline and engine alternating, on the same files, with
the page cache warmed first; times are the best of ``--repeat`` runs, peaks the largest.
Results go to ``benchmarks/results/<workload>-<device>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from analysis import ALGORITHM_VERSION
from analysis.cache import REPO_ROOT, SpectrumCache
from analysis.results import DEFAULT_EPSILONS, DEFAULT_TOP_K
from benchmarks.workloads import DEFAULT_DATA_DIR, Workload, demo_workload, llama7b_workload

RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
SCORE_MARGIN = 1e-3  # counts may differ only where a score lies this close to eps
VALUE_RTOL = 1e-4  # top-k singular values must agree this closely with float64

#: (workload, scenario kind, device type) -> target ratio engine / baseline (the issue's).
TARGETS = {
    ("demo", "cold", "cpu"): 0.8,
    ("demo", "cached-base", "cpu"): 0.45,
    ("demo", "all-cached", "cpu"): 0.05,
    ("demo", "adapter", "cpu"): 0.3,
    # issue 13, on a 4-layer slice (--layers 4, 28 matrices):
    ("llama7b-shape", "cold", "cuda"): 0.18,
    ("llama7b-shape", "cached-base", "cuda"): 0.12,
    ("llama7b-shape", "all-cached", "cuda"): 0.01,
    ("llama7b-shape", "adapter", "cuda"): 0.06,
}
#: --engine-only: (workload, scenario kind, device type) -> target seconds for the whole
#: 32-layer model (issue 13); no baseline runs.
ENGINE_TARGETS_S = {
    ("llama7b-shape", "cold", "cuda"): 90.0,
    ("llama7b-shape", "adapter", "cuda"): 20.0,
}
HOST_PEAK_LIMIT = 4 * 1024**3
GPU_PEAK_LIMIT = 16 * 1024**3


@dataclass
class Scenario:
    label: str
    kind: str  # cold, cached-base, all-cached, adapter
    tuned: str  # fine-tune name in the workload
    baseline: list[dict] = field(default_factory=list)
    engine: list[dict] = field(default_factory=list)


# -- measurements -------------------------------------------------------------------------


def measure(spec: dict, workdir: Path) -> dict:
    """Run one :mod:`benchmarks.measure` process and return what it wrote."""
    fd, spec_path = tempfile.mkstemp(dir=workdir, suffix=".json")
    os.close(fd)
    out_path = spec_path.replace(".json", ".out.json")
    Path(spec_path).write_text(json.dumps(spec))
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO_ROOT))
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.measure", spec_path, out_path], cwd=REPO_ROOT, env=env, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"measurement failed ({done.returncode}): {spec['what']} {spec['tuned']}")
    return json.loads(Path(out_path).read_text())


def warm_page_cache(paths: list[Path]) -> None:
    """Read every file once, so neither side pays for a cold disk."""
    for root in paths:
        for path in [root] if root.is_file() else sorted(root.rglob("*")):
            if path.is_file():
                with open(path, "rb") as handle:
                    while handle.read(1 << 24):
                        pass


def seed_cache(source: Path, target: Path, base_files: list[Path]) -> None:
    """``target`` holds only the base spectra of ``source`` (and the base files' digests)."""
    shutil.rmtree(target, ignore_errors=True)
    version = f"v{ALGORITHM_VERSION}"
    if (source / version / "base").is_dir():
        shutil.copytree(source / version / "base", target / version / "base")
    src_index, dst_index = SpectrumCache(source).fingerprints, SpectrumCache(target).fingerprints
    for file in base_files:
        index = src_index.path_for(file)
        if index.is_file():
            copy = dst_index.path_for(file)
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(index, copy)


def matrix_sizes(workload: Workload, tuned: str) -> dict[str, int]:
    from analysis.compare import plan_models

    (plan,) = plan_models(str(workload.base), [str(workload.fine_tune(tuned).path)])
    return {m.name: m.shape[0] * m.shape[1] for m in plan.matrices}


def matrix_names(workload: Workload, tuned: str) -> list[str]:
    from analysis.compare import plan_models

    (plan,) = plan_models(str(workload.base), [str(workload.fine_tune(tuned).path)])
    return [m.name for m in plan.matrices]


# -- checks -------------------------------------------------------------------------------


def counts_agree(scores_a: list[float], scores_b: list[float], k: int) -> tuple[bool, int]:
    """Counts at every eps equal, except where either score is within SCORE_MARGIN of eps."""
    a, b = np.asarray(scores_a[:k]), np.asarray(scores_b[:k])
    checked = 0
    for eps in DEFAULT_EPSILONS:
        if np.any(np.abs(a - eps) <= SCORE_MARGIN) or np.any(np.abs(b - eps) <= SCORE_MARGIN):
            continue
        checked += 1
        if int(np.sum(a < eps)) != int(np.sum(b < eps)):
            return False, checked
    return True, checked


def agreement(engine: dict, baseline: dict) -> dict:
    names = sorted(engine["matrices"])
    bad = [
        n
        for n in names
        if not counts_agree(engine["matrices"][n]["scores"], baseline["matrices"][n]["scores"], DEFAULT_TOP_K)[0]
    ]
    total = {
        "engine": [sum(engine["matrices"][n]["counts"][i] for n in names) for i in range(len(DEFAULT_EPSILONS))],
        "baseline": [
            sum(int(np.sum(np.asarray(baseline["matrices"][n]["scores"][:DEFAULT_TOP_K]) < eps)) for n in names)
            for eps in DEFAULT_EPSILONS
        ],
    }
    return {"matrices": len(names), "disagreeing": bad, "ok": not bad, "total_counts": total}


def float64_reference(workload: Workload, tuned: str, names: list[str], device: torch.device) -> dict:
    """Scores, top singular values of base, tuned and update, all from float64 SVDs."""
    from analysis.compare import plan_models

    (plan,) = plan_models(str(workload.base), [str(workload.fine_tune(tuned).path)])
    by_name = {m.name: m for m in plan.matrices}
    out = {}
    for name in names:
        matrix = by_name[name]
        base = matrix.load_base().to(device, torch.float64)
        tuned_weight = matrix.load_tuned().weight.to(device, torch.float64)
        U0, S0, _ = torch.linalg.svd(base, full_matrices=False)
        Ut, St, _ = torch.linalg.svd(tuned_weight, full_matrices=False)
        Sd = torch.linalg.svdvals(tuned_weight - base)
        scores = (Ut[:, :100].T @ U0).abs().max(dim=1).values
        out[name] = {
            "scores": scores.cpu().tolist(),
            "tuned_s": St[:100].cpu().tolist(),
            "base_s": S0[:100].cpu().tolist(),
            "delta_s": Sd[:100].cpu().tolist(),
        }
        del base, tuned_weight, U0, Ut
    return out


def guard(engine: dict, reference: dict) -> dict:
    """The approximation guard: counts at every eps and top-k values against float64."""
    failures, worst_value, checked_eps = [], 0.0, 0
    deviation_100 = 0.0
    for name, ref in reference.items():
        got = engine["matrices"][name]
        ok, checked = counts_agree(got["scores"], ref["scores"], DEFAULT_TOP_K)
        checked_eps += checked
        if not ok:
            failures.append(f"{name}: counts")
        for field_name in ("base_s", "tuned_s", "delta_s"):
            # A low-rank update has r values; the dense float64 reference has round-off after them.
            n = min(DEFAULT_TOP_K, len(got[field_name]), len(ref[field_name]))
            expected, actual = np.asarray(ref[field_name][:n]), np.asarray(got[field_name][:n])
            if n == 0 or expected[0] == 0:
                rel = float(np.max(np.abs(actual), initial=0.0))
            else:
                rel = float(np.max(np.abs(actual - expected) / np.maximum(expected, expected[0] * 1e-6)))
            worst_value = max(worst_value, rel)
            if rel > VALUE_RTOL:
                failures.append(f"{name}: {field_name} rel {rel:.1e}")
        n = min(len(got["scores"]), len(ref["scores"]))
        deviation_100 = max(deviation_100, float(np.max(np.abs(np.subtract(got["scores"][:n], ref["scores"][:n])))))
    return {
        "matrices": len(reference),
        "eps_checked": checked_eps,
        "worst_top10_value_rel": worst_value,
        "worst_score_abs_top100": deviation_100,
        "failures": failures,
        "ok": not failures,
    }


# -- the run ------------------------------------------------------------------------------


def run_workload(workload: Workload, args: argparse.Namespace, device: torch.device) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="wse-bench-"))
    try:
        return _run_workload(workload, args, device, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _run_workload(workload: Workload, args: argparse.Namespace, device: torch.device, workdir: Path) -> dict:
    print(f"\n== {workload.name}: {workload.description}", flush=True)
    for note in workload.notes:
        print(f"   note: {note}")
    warm_page_cache([workload.base] + [t.path for t in workload.tuned])
    full = next(t for t in workload.tuned if t.kind == "full")
    adapters = [t for t in workload.tuned if t.kind == "adapter"]
    names = {t.name: _filtered(matrix_names(workload, t.name), args.modules) for t in workload.tuned}
    base_files = sorted({p for p in workload.base.glob("*.safetensors")})
    scenarios = [
        Scenario("cold (empty cache)", "cold", full.name),
        Scenario("cached base, pair not", "cached-base", full.name),
        Scenario("everything cached (2nd run)", "all-cached", full.name),
    ] + [Scenario(f"{a.name} against cached base", "adapter", a.name) for a in adapters]
    if args.engine_only:  # the whole-model run: what the engine costs, no baseline
        scenarios = [s for s in scenarios if s.kind in ("cold", "all-cached", "adapter")]
        return _run_engine_only(
            workload, args, scenarios, names=names, base_files=base_files, device=device, workdir=workdir
        )

    def spec(what: str, tuned: str, cache_dir: Path | None) -> dict:
        t = workload.fine_tune(tuned)
        return {
            "what": what,
            "base": str(workload.base),
            "tuned": str(t.path),
            "kind": t.kind,
            "names": names[tuned],
            "device": str(device),
            "cache_dir": str(cache_dir) if cache_dir else None,
            "workers": args.workers,
            "threads": args.threads,
            "modules": args.modules,
        }

    # Paired design: each engine run is followed by a baseline run on the same fine-tune,
    # so a change in the machine's load between rounds hits both sides of a ratio alike.
    # --shared-baseline measures each fine-tune's baseline once per round instead.
    for repeat in range(args.repeat):
        print(f"-- round {repeat + 1}/{args.repeat}", flush=True)
        cold_dir = workdir / f"cache-cold-{repeat}"
        measured: dict[str, dict] = {}
        for scenario in scenarios:
            if scenario.kind == "cold":
                cache_dir = cold_dir
            elif scenario.kind == "all-cached":
                cache_dir = cold_dir  # the cold run filled it
            else:
                cache_dir = workdir / f"cache-{scenario.tuned}-{repeat}"
                seed_cache(cold_dir, cache_dir, base_files)
            result = measure(spec("engine", scenario.tuned, cache_dir), workdir)
            scenario.engine.append(result)
            if not args.shared_baseline or scenario.tuned not in measured:
                measured[scenario.tuned] = measure(spec("baseline", scenario.tuned, None), workdir)
            scenario.baseline.append(measured[scenario.tuned])
            print(
                f"   {scenario.label:<34} engine {result['seconds']:8.2f} s   "
                f"baseline {scenario.baseline[-1]['seconds']:8.2f} s",
                flush=True,
            )
        if repeat + 1 < args.repeat:
            shutil.rmtree(cold_dir, ignore_errors=True)

    rows = []
    references: dict[str, dict] = {}
    for scenario in scenarios:
        pairs = zip(scenario.engine, scenario.baseline, strict=True)
        paired = float(np.median([e["seconds"] / b["seconds"] for e, b in pairs]))
        engine_best = min(scenario.engine, key=lambda r: r["seconds"])
        baseline_best = min(scenario.baseline, key=lambda r: r["seconds"])
        target = TARGETS.get((workload.name, scenario.kind, device.type))
        ratio = engine_best["seconds"] / baseline_best["seconds"]
        row = {
            "scenario": scenario.label,
            "kind": scenario.kind,
            "fine_tune": scenario.tuned,
            "matrices": len(names[scenario.tuned]),
            "baseline_s": baseline_best["seconds"],
            "engine_s": engine_best["seconds"],
            "ratio": ratio,
            "target": target,
            "meets_target": None if target is None else ratio <= target,
            "baseline_runs_s": [r["seconds"] for r in scenario.baseline],
            "engine_runs_s": [r["seconds"] for r in scenario.engine],
            "paired_ratio_median": paired,
            "baseline_cpu_s": min(r["cpu_seconds"] for r in scenario.baseline),
            "engine_cpu_s": min(r["cpu_seconds"] for r in scenario.engine),
            "baseline_peak_rss": max(r["rss_peak_bytes"] for r in scenario.baseline),
            "engine_peak_rss": max(r["rss_peak_bytes"] for r in scenario.engine),
            "engine_rss_before": min(r["rss_before_bytes"] for r in scenario.engine),
            "baseline_gpu_peak": _max_or_none(r["gpu_peak_bytes"] for r in scenario.baseline),
            "engine_gpu_peak": _max_or_none(r["gpu_peak_bytes"] for r in scenario.engine),
            "cache": engine_best.get("cache"),
            "agreement": agreement(engine_best, baseline_best),
        }
        if scenario.kind in ("cold", "adapter") and not args.no_guard:
            guarded = names[scenario.tuned]
            if args.guard_matrices:  # the smallest ones: float64 SVDs of the largest take many minutes on CPU
                sizes = matrix_sizes(workload, scenario.tuned)
                guarded = sorted(guarded, key=lambda n: (sizes[n], n))[: args.guard_matrices]
            if scenario.tuned not in references:
                print(f"   float64 reference for {scenario.tuned} ({len(guarded)} matrices) ...", flush=True)
                references[scenario.tuned] = float64_reference(workload, scenario.tuned, guarded, device)
            row["guard"] = guard(engine_best, references[scenario.tuned])
        rows.append(row)
    return {"workload": workload.name, "description": workload.description, "notes": workload.notes, "rows": rows}


def _engine_spec(
    workload: Workload, args: argparse.Namespace, names: dict, device, tuned: str, cache_dir: Path
) -> dict:
    t = workload.fine_tune(tuned)
    return {
        "what": "engine",
        "base": str(workload.base),
        "tuned": str(t.path),
        "kind": t.kind,
        "names": names[tuned],
        "device": str(device),
        "cache_dir": str(cache_dir),
        "workers": args.workers,
        "threads": args.threads,
        "modules": args.modules,
    }


def _run_engine_only(
    workload: Workload,
    args: argparse.Namespace,
    scenarios: list[Scenario],
    *,
    names: dict,
    base_files: list[Path],
    device: torch.device,
    workdir: Path,
) -> dict:
    """``--engine-only``: each scenario once per round, the engine alone (whole-model time
    and peaks against :data:`ENGINE_TARGETS_S`); no baseline, no float64 guard."""
    for repeat in range(args.repeat):
        print(f"-- round {repeat + 1}/{args.repeat} (engine only)", flush=True)
        cold_dir = workdir / f"cache-cold-{repeat}"
        for scenario in scenarios:
            if scenario.kind in ("cold", "all-cached"):
                cache_dir = cold_dir
            else:
                cache_dir = workdir / f"cache-{scenario.tuned}-{repeat}"
                seed_cache(cold_dir, cache_dir, base_files)
            result = measure(_engine_spec(workload, args, names, device, scenario.tuned, cache_dir), workdir)
            scenario.engine.append(result)
            print(f"   {scenario.label:<34} engine {result['seconds']:8.2f} s", flush=True)
        if repeat + 1 < args.repeat:
            shutil.rmtree(cold_dir, ignore_errors=True)
    rows = []
    for scenario in scenarios:
        best = min(scenario.engine, key=lambda r: r["seconds"])
        target = ENGINE_TARGETS_S.get((workload.name, scenario.kind, device.type))
        gpu_peak = _max_or_none(r["gpu_peak_bytes"] for r in scenario.engine)
        rows.append(
            {
                "scenario": scenario.label,
                "kind": scenario.kind,
                "fine_tune": scenario.tuned,
                "matrices": len(names[scenario.tuned]),
                "engine_s": best["seconds"],
                "engine_runs_s": [r["seconds"] for r in scenario.engine],
                "engine_cpu_s": min(r["cpu_seconds"] for r in scenario.engine),
                "engine_peak_rss": max(r["rss_peak_bytes"] for r in scenario.engine),
                "engine_gpu_peak": gpu_peak,
                "target_s": target,
                "meets_target": None if target is None else best["seconds"] <= target,
                "host_peak_ok": max(r["rss_peak_bytes"] for r in scenario.engine) <= HOST_PEAK_LIMIT,
                "gpu_peak_ok": None if gpu_peak is None else gpu_peak <= GPU_PEAK_LIMIT,
                "cache": best.get("cache"),
            }
        )
    return {
        "workload": workload.name,
        "description": workload.description,
        "notes": workload.notes,
        "engine_only": True,
        "rows": rows,
    }


def _filtered(names: list[str], modules: str | None) -> list[str]:
    if not modules:
        return names
    wanted = [m.strip() for m in modules.split(",") if m.strip()]
    return [n for n in names if any(f".{m}." in n or n.endswith(f".{m}.weight") for m in wanted)]


def _max_or_none(values) -> int | None:
    values = [v for v in values if v is not None]
    return max(values) if values else None


# -- kernels ------------------------------------------------------------------------------


def run_kernels(args: argparse.Namespace, device: torch.device) -> dict:
    """Each decomposition method per matrix shape, timed and checked against float64."""
    from analysis.linalg import decompose_many

    shapes = [(384, 384), (1536, 384), (384, 1536)]
    if args.big:
        shapes += [(4096, 4096), (11008, 4096), (4096, 11008)]
    methods = ["svd", "gram"] + (["gesvda"] if device.type == "cuda" else [])
    rows = []
    generator = torch.Generator().manual_seed(0)
    from benchmarks.workloads import synthetic_weight

    for shape in shapes:
        weight = synthetic_weight(*shape, generator, torch.device("cpu"))
        ref_u, ref_s, _ = torch.linalg.svd(weight.double(), full_matrices=False)
        for method in methods:
            batch = [weight.to(device)] * (4 if method == "gesvda" else 1)
            decompose_many(batch[:1], device, method)  # warm-up (CUDA context, MKL)
            times = []
            for _ in range(args.repeat):
                _sync(device)
                start = time.perf_counter()
                (spectrum,) = decompose_many(batch[:1], device, method)
                spectrum.left(100)
                _sync(device)
                times.append(time.perf_counter() - start)
            s = spectrum.values.double().cpu()
            u = spectrum.left(10).double().cpu()
            row = {
                "shape": list(shape),
                "method": method,
                "seconds": min(times),
                "top10_value_rel": float(((s[:10] - ref_s[:10]).abs() / ref_s[:10]).max()),
                "top10_vector_cos_min": float((u * ref_u[:, :10]).sum(0).abs().min()),
                "tail_value_abs_rel_s1": float(((s - ref_s).abs() / ref_s[0]).max()),
            }
            if method == "gesvda":
                _sync(device)
                start = time.perf_counter()
                decompose_many(batch, device, method)
                _sync(device)
                row["batch4_seconds"] = time.perf_counter() - start
            rows.append(row)
            print(
                f"   {str(shape):<14} {method:<7} {row['seconds']:8.3f} s  top10 rel {row['top10_value_rel']:.1e}  "
                f"cos min {row['top10_vector_cos_min']:.6f}  tail {row['tail_value_abs_rel_s1']:.1e}"
                + (f"  batch of 4: {row['batch4_seconds']:.3f} s" if "batch4_seconds" in row else ""),
                flush=True,
            )
    return {"workload": "kernels", "rows": rows}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- output -------------------------------------------------------------------------------


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1),
        "loadavg_start": os.getloadavg()[0],
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 1024**3:.2f}"


def markdown(report: dict) -> str:
    threads = report["args"].get("threads")
    default = threads in (None, "None")
    setting = "torch's default threads" if default else f"torch.set_num_threads({threads}) on both sides"
    lines = [f"### {report['workload']} on {report['device']}, {setting}", ""]
    m = report["machine"]
    lines.append(
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, torch {m['torch']}"
        + (f", GPU {m['gpu']}" if "gpu" in m else "")
        + f"; load average {m['loadavg_start']:.1f} at start, {m.get('loadavg_end', 0):.1f} at end. "
        + f"{report['when']}."
    )
    lines.append("")
    if report["workload"] == "kernels":
        lines += [
            "| shape | method | seconds | top-10 values rel. err | top-10 vectors min cos | tail abs err / s1 "
            "| batch of 4 |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for r in report["rows"]:
            lines.append(
                f"| {r['shape'][0]}x{r['shape'][1]} | {r['method']} | {r['seconds']:.3f} | {r['top10_value_rel']:.1e} "
                f"| {r['top10_vector_cos_min']:.6f} | {r['tail_value_abs_rel_s1']:.1e} | "
                f"{r.get('batch4_seconds', float('nan')):.3f} |"
            )
        return "\n".join(lines) + "\n"
    lines.append(report["description"] + ".")
    if report.get("engine_only"):
        lines += [
            "",
            "| scenario | matrices | engine s | target s | CPU s | peak host GiB | peak GPU GiB |",
            "|---|---:|---:|---|---:|---|---|",
        ]
        for r in report["rows"]:
            target = (
                "-" if r["target_s"] is None else f"<= {r['target_s']:g}" + (" ok" if r["meets_target"] else " MISSED")
            )
            host = _gib(r["engine_peak_rss"]) + ("" if r["host_peak_ok"] else f" (over {_gib(HOST_PEAK_LIMIT)})")
            gpu = "-" if r["engine_gpu_peak"] is None else _gib(r["engine_gpu_peak"])
            if r["gpu_peak_ok"] is False:
                gpu += f" (over {_gib(GPU_PEAK_LIMIT)})"
            lines.append(
                f"| {r['scenario']} | {r['matrices']} | {r['engine_s']:.2f} | {target} | {r['engine_cpu_s']:.2f} "
                f"| {host} | {gpu} |"
            )
        for note in report.get("notes", []):
            lines.append(f"Note: {note}.")
        return "\n".join(lines) + "\n"
    lines += [
        "",
        "| scenario | matrices | baseline s | engine s | ratio | paired median | target | CPU s (baseline / engine) "
        "| peak host GiB (baseline / engine) | peak GPU GiB | counts vs baseline | float64 guard |",
        "|---|---:|---:|---:|---:|---:|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        target = "-" if r["target"] is None else f"<= {r['target']}" + (" ok" if r["meets_target"] else " MISSED")
        g = r.get("guard")
        guard_text = "-" if g is None else ("ok" if g["ok"] else "FAILED") + f" ({g['matrices']} matrices)"
        agree = r["agreement"]
        agree_text = "equal" if agree["ok"] else f"{len(agree['disagreeing'])} differ"
        gpu = "-" if r["engine_gpu_peak"] is None else f"{_gib(r['baseline_gpu_peak'])} / {_gib(r['engine_gpu_peak'])}"
        lines.append(
            f"| {r['scenario']} | {r['matrices']} | {r['baseline_s']:.2f} | {r['engine_s']:.2f} | {r['ratio']:.3f} "
            f"| {r['paired_ratio_median']:.3f} | {target} | {r['baseline_cpu_s']:.2f} / {r['engine_cpu_s']:.2f} "
            f"| {_gib(r['baseline_peak_rss'])} / {_gib(r['engine_peak_rss'])} | {gpu} | {agree_text} | {guard_text} |"
        )
    lines.append("")
    for r in report["rows"]:
        cache = r.get("cache") or {}
        base = cache.get("base_entry_bytes") or {}
        if r["kind"] == "cold" and base.get("vector_elements"):
            lines.append(
                f"Base cache: {base['entries']} entries, {base['bytes'] / base['vector_elements']:.4f} bytes per "
                f"stored vector element (float16 vectors plus float32 singular values and a header)."
            )
        g = r.get("guard")
        if g:
            lines.append(
                f"Guard ({r['scenario']}): worst top-10 singular value rel. error {g['worst_top10_value_rel']:.1e}, "
                f"worst |score - float64 score| over the top 100 {g['worst_score_abs_top100']:.1e}, "
                f"{g['eps_checked']} (matrix, eps) counts checked"
                + (f"; failures: {', '.join(g['failures'])}" if g["failures"] else "")
                + "."
            )
    for note in report.get("notes", []):
        lines.append(f"Note: {note}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=["demo", "llama7b-shape", "kernels", "ray"], default="demo")
    parser.add_argument("--layers", type=int, default=None, help="llama7b-shape: blocks to build and analyse")
    parser.add_argument(
        "--modules", default=None, help="analyse only these modules, e.g. q_proj,gate_proj,down_proj (a slice)"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--repeat", type=int, default=None, help="rounds (default 3 demo/kernels, 1 llama7b-shape)")
    parser.add_argument("--workers", type=int, default=None, help="engine worker threads (default: the engine's)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads for both sides (default: torch's own, what a user of either gets)",
    )
    parser.add_argument("--guard-matrices", type=int, default=None, help="float64-guard only the N smallest matrices")
    parser.add_argument("--no-guard", action="store_true", help="skip the float64 guard")
    parser.add_argument(
        "--engine-only",
        action="store_true",
        help="the engine alone (cold, all cached, adapter against a cached base): whole-model time and peaks",
    )
    parser.add_argument(
        "--shared-baseline",
        action="store_true",
        help="one baseline run per fine-tune and round instead of one per scenario (default for llama7b-shape)",
    )
    parser.add_argument("--big", action="store_true", help="kernels: include the 7B shapes")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if args.repeat is None:
        args.repeat = 1 if args.workload == "llama7b-shape" else 3
    if args.workload == "llama7b-shape":
        args.shared_baseline = True
    if args.threads == 0:  # the former spelling of the default
        args.threads = None

    info = machine()
    if args.workload == "ray":  # its own report (benchmarks/ray_bench.py)
        from benchmarks import ray_bench

        report = ray_bench.run_ray(args)
        info["loadavg_end"] = os.getloadavg()[0]
        report |= {"machine": info, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "ray-cpu.json").write_text(json.dumps(report, indent=2))
        text = ray_bench.markdown(report)
        (args.out / "ray-cpu.md").write_text(text)
        print("\n" + text)
        return 0
    if args.workload == "kernels":
        report = run_kernels(args, device)
    else:
        if args.workload == "demo":
            workload = demo_workload(args.data_dir)
        else:
            layers = args.layers or (32 if device.type == "cuda" else 1)
            workload = llama7b_workload(args.data_dir, layers, device="cuda" if device.type == "cuda" else "cpu")
            if args.modules:
                workload.notes.append(f"only modules {args.modules} analysed (by both sides)")
        report = run_workload(workload, args, device)
    info["loadavg_end"] = os.getloadavg()[0]
    report |= {
        "device": str(device),
        "machine": info,
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{report['workload']}-{device.type}"
    if args.workload == "llama7b-shape":
        stem += f"-{args.layers or (32 if device.type == 'cuda' else 1)}layers"
    if args.threads:
        stem += f"-threads{args.threads}"
    if args.engine_only:
        stem += "-engine"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    text = markdown(report)
    (args.out / f"{stem}.md").write_text(text)
    print("\n" + text)
    failed = (
        [r for r in report["rows"] if r.get("guard") and not r["guard"]["ok"]]
        + [r for r in report["rows"] if r.get("host_peak_ok") is False or r.get("gpu_peak_ok") is False]
        + [r for r in report["rows"] if "agreement" in r and not r["agreement"]["ok"]]
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

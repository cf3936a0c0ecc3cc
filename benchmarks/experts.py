"""A mixture-of-experts layer at real size: experts analysed in groups or one by one.

Issue 13 asks the GPU engine to batch the many small matrices of MoE models. This builds
one layer of Qwen3-30B-A3B-shaped experts in memory (``gate_proj``/``up_proj`` 768 x 2048,
``down_proj`` 2048 x 768 by default; every expert a full fine-tune of its base, weights
shaped like trained ones by :func:`benchmarks.workloads.synthetic_weight`) and times, in one process:

- the papers' procedure (:func:`benchmarks.baseline.intruder_scores`: two default-driver
  SVDs per matrix) on the first few matrices, for the per-matrix baseline;
- the engine with same-shaped experts analysed in groups (:data:`analysis.grouping.MAX_GROUP`
  pairs; their decompositions in batched calls), cold, no cache;
- the engine with every pair on its own (``MAX_GROUP = 1``), cold, no cache.

It prints per-matrix times and ratios against the baseline, and checks that the grouped
and the one-by-one runs give every pair the same bytes (a pair's result must not depend
on which pairs it was analysed with). The ``eig`` method is the CUDA default; on a CPU
pass ``--method eig`` to run the same code (the CPU default, ``gram``, never groups).

    python -m benchmarks.experts --device cuda --experts 64 [--out DIR]
    python -m benchmarks.experts --device cpu --method eig --experts 4 --shape 96x160   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from analysis import grouping, pipeline
from analysis.identity import MatrixId
from analysis.linalg import resolve_device
from analysis.plan import ComparisonPlan, MatrixPlan, TunedMatrix
from benchmarks.baseline import intruder_scores
from benchmarks.workloads import synthetic_weight

CPU = torch.device("cpu")


def expert_layer(experts: int, shape: tuple[int, int], seed: int = 0) -> list[MatrixPlan]:
    """``gate``, ``up`` (``shape``) and ``down`` (transposed) of each expert, base and tuned."""
    g = torch.Generator().manual_seed(seed)
    matrices = []
    for e in range(experts):
        for module, (m, n) in (("gate", shape), ("up", shape), ("down", shape[::-1])):
            base = synthetic_weight(m, n, g, CPU)
            tuned = TunedMatrix(base + 0.02 * synthetic_weight(m, n, g, CPU))
            name = f"model.layers.0.mlp.experts.{e}.{module}_proj.weight"
            matrices.append(
                MatrixPlan(MatrixId(name, 0, module, (m, n), expert=e), lambda b=base: b, lambda t=tuned: t)
            )
    return matrices


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _engine(matrices: list[MatrixPlan], device: torch.device, group: int) -> tuple[float, list[bytes], int]:
    saved = grouping.MAX_GROUP
    grouping.MAX_GROUP = group
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        _sync(device)
        start = time.perf_counter()
        results = list(pipeline.analyse_plan(ComparisonPlan("base", "tuned", "full", matrices), device=device))
        _sync(device)
        seconds = time.perf_counter() - start
    finally:
        grouping.MAX_GROUP = saved
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    fields = [
        b"".join(
            a.tobytes()
            for a in (r.base_singular_values, r.tuned_singular_values, r.delta_singular_values, r.intruder_scores)
        )
        for r in results
    ]
    return seconds, fields, peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--shape", default="768x2048", help="gate/up shape (out x in); down is its transpose")
    parser.add_argument("--baseline-matrices", type=int, default=6)
    parser.add_argument("--method", default=None, help="WSE_SVD_METHOD for the engine (default: the device's)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.method:
        os.environ["WSE_SVD_METHOD"] = args.method
    device = resolve_device(args.device)
    m, n = (int(x) for x in args.shape.split("x"))
    matrices = expert_layer(args.experts, (m, n))
    print(f"{len(matrices)} matrices ({args.experts} experts x gate, up, down of {m}x{n}) on {device}", flush=True)

    warm = expert_layer(1, (m, n), seed=1)  # CUDA context, cuSOLVER handles, first-call costs
    _engine(warm, device, grouping.MAX_GROUP)
    for matrix in warm[:1]:
        intruder_scores(matrix.load_base().to(device), matrix.load_tuned().weight.to(device))

    sample = matrices[: args.baseline_matrices]
    _sync(device)
    start = time.perf_counter()
    for matrix in sample:
        intruder_scores(matrix.load_base().to(device), matrix.load_tuned().weight.to(device))
    _sync(device)
    baseline = (time.perf_counter() - start) / len(sample)

    grouped_s, grouped, grouped_peak = _engine(matrices, device, grouping.MAX_GROUP)
    single_s, single, single_peak = _engine(matrices, device, 1)
    same = grouped == single
    count = len(matrices)
    rows = [
        (f"papers' procedure (per matrix, first {len(sample)})", baseline, 1.0, None),
        (f"engine, groups of {grouping.MAX_GROUP}", grouped_s / count, grouped_s / count / baseline, grouped_peak),
        ("engine, one pair at a time", single_s / count, single_s / count / baseline, single_peak),
    ]
    print("\n| run | ms per matrix | ratio to the papers' procedure | GPU peak MiB |\n|---|---:|---:|---:|")
    for name, seconds, ratio, peak in rows:
        peak_text = "-" if not peak else f"{peak / 2**20:.0f}"
        print(f"| {name} | {seconds * 1000:.1f} | {ratio:.3f} | {peak_text} |")
    print(f"\ngrouped / one at a time: {grouped_s / single_s:.3f}; every pair's bytes equal: {same}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        record = {
            "device": str(device),
            "torch": torch.__version__,
            "matrices": count,
            "shape": [m, n],
            "group": grouping.MAX_GROUP,
            "baseline_s_per_matrix": baseline,
            "grouped_s": grouped_s,
            "single_s": single_s,
            "grouped_peak_bytes": grouped_peak,
            "single_peak_bytes": single_peak,
            "bytes_equal": same,
        }
        (args.out / f"experts-{device.type}.json").write_text(json.dumps(record, indent=2) + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())

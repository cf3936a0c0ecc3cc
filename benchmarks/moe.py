"""MoE-shaped workload: many small matrices (issue 10).

A 128-expert, 48-block model is about 18,000 small matrices. This benchmark builds a
synthetic Qwen3-MoE-shaped checkpoint with tiny matrices (hidden 32, expert
intermediate 16, so the maths is cheap and what is measured is the per-matrix overhead)
and its full fine-tune, in one of the two expert layouts:

- ``per-expert``: ``mlp.experts.{e}.{gate,up,down}_proj.weight`` 2-D tensors (what
  ``save_pretrained`` writes; 3 matrices per expert, 18,432 for 128 x 48);
- ``fused``: ``mlp.experts.gate_up_proj`` ``[E, 2I, H]`` and ``mlp.experts.down_proj``
  ``[E, H, I]`` (transformers 5's in-memory layout; 2 matrices per expert, read one
  expert slice at a time).

Wall times on a shared machine mislead; CPU times (``process_time``, all threads of
this process) are reported beside them, with the load average.

It measures: the plan (open both checkpoints, build transformers' meta model for the
key mapping, pair every matrix, list every skipped tensor); a cold analysis through a
fresh cache (per matrix: digests, SVDs, metrics, progress); a warm one (every pair found
in the cache: the pure per-matrix overhead); writing the JSON report.

    python -m benchmarks.moe [--layers 48] [--experts 128] [--layout per-expert|fused] [--plan-only]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN = 32
EXPERT_INTERMEDIATE = 16


def config(layers: int, experts: int) -> dict:
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "hidden_size": HIDDEN,
        "intermediate_size": 64,
        "moe_intermediate_size": EXPERT_INTERMEDIATE,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "num_experts": experts,
        "num_experts_per_tok": 8,
        "decoder_sparse_step": 1,
        "vocab_size": 128,
    }


def write_checkpoint(out: Path, layers: int, experts: int, layout: str, seed: int, noise: float = 0.0) -> Path:
    """A synthetic checkpoint; ``noise`` > 0 perturbs a seed-0 base (a full fine-tune)."""
    out.mkdir(parents=True, exist_ok=True)
    base = torch.Generator().manual_seed(0)
    delta = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}

    def weight(*shape: int) -> torch.Tensor:
        w = torch.randn(shape, generator=base) / shape[-1] ** 0.5
        return w + noise * torch.randn(shape, generator=delta) / shape[-1] ** 0.5 if noise else w

    tensors["model.embed_tokens.weight"] = weight(128, HIDDEN)
    tensors["model.norm.weight"] = torch.ones(HIDDEN)
    for layer in range(layers):
        p = f"model.layers.{layer}."
        for name, shape in {"q_proj": (32, 32), "k_proj": (16, 32), "v_proj": (16, 32), "o_proj": (32, 32)}.items():
            tensors[f"{p}self_attn.{name}.weight"] = weight(*shape)
        tensors[f"{p}self_attn.q_norm.weight"] = torch.ones(8)
        tensors[f"{p}self_attn.k_norm.weight"] = torch.ones(8)
        tensors[f"{p}input_layernorm.weight"] = torch.ones(HIDDEN)
        tensors[f"{p}post_attention_layernorm.weight"] = torch.ones(HIDDEN)
        tensors[f"{p}mlp.gate.weight"] = weight(experts, HIDDEN)
        if layout == "fused":
            tensors[f"{p}mlp.experts.gate_up_proj"] = weight(experts, 2 * EXPERT_INTERMEDIATE, HIDDEN)
            tensors[f"{p}mlp.experts.down_proj"] = weight(experts, HIDDEN, EXPERT_INTERMEDIATE)
        else:
            for e in range(experts):
                tensors[f"{p}mlp.experts.{e}.gate_proj.weight"] = weight(EXPERT_INTERMEDIATE, HIDDEN)
                tensors[f"{p}mlp.experts.{e}.up_proj.weight"] = weight(EXPERT_INTERMEDIATE, HIDDEN)
                tensors[f"{p}mlp.experts.{e}.down_proj.weight"] = weight(HIDDEN, EXPERT_INTERMEDIATE)
    save_file(tensors, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(config(layers, experts)))
    return out


def run(layers: int, experts: int, layout: str, workdir: Path, analyse: bool = True) -> dict:
    from analysis.cache import SpectrumCache
    from analysis.compare import plan_models
    from analysis.pipeline import analyse_plan, model_result
    from analysis.report import to_report, write_report
    from analysis.results import ComparisonResult

    t = time.perf_counter()
    base = write_checkpoint(workdir / "base", layers, experts, layout, seed=0)
    full = write_checkpoint(workdir / "full", layers, experts, layout, seed=1, noise=0.05)
    build_s = time.perf_counter() - t

    t = time.perf_counter()
    # Imported once per process (the dashboard has them already): the plan's meta model.
    import transformers
    import transformers.conversion_mapping  # noqa: F401
    import transformers.core_model_loading  # noqa: F401

    transformers.Qwen3MoeForCausalLM  # noqa: B018  (loads the model's module)
    import_s = time.perf_counter() - t
    t, cpu = time.perf_counter(), time.process_time()
    (plan,) = plan_models(str(base), [str(full)])
    plan_s, plan_cpu_s = time.perf_counter() - t, time.process_time() - cpu
    matrices = len(plan.matrices)
    t, cpu = time.perf_counter(), time.process_time()
    plan_models(str(base), [str(full)])
    replan_s, replan_cpu_s = time.perf_counter() - t, time.process_time() - cpu  # meta model remembered

    numbers = {
        "layout": layout,
        "layers": layers,
        "experts": experts,
        "matrices": matrices,
        "skipped": len(plan.skipped),
        "build_s": round(build_s, 2),
        "import_transformers_s": round(import_s, 2),
        "plan_s": round(plan_s, 3),
        "plan_us_per_matrix": round(1e6 * plan_s / matrices, 1),
        "plan_cpu_s": round(plan_cpu_s, 3),
        "plan_cpu_us_per_matrix": round(1e6 * plan_cpu_s / matrices, 1),
        "replan_s": round(replan_s, 3),
        "replan_cpu_s": round(replan_cpu_s, 3),
        "load_average": open("/proc/loadavg").read().split()[0],
        "torch_threads": torch.get_num_threads(),
    }
    if not analyse:
        return numbers
    cache = SpectrumCache(workdir / "cache")
    events = []
    results = {}
    for which in ("cold", "warm"):
        t, cpu = time.perf_counter(), time.process_time()
        found = list(analyse_plan(plan, device="cpu", cache=cache, progress=events.append))
        results[which], results[f"{which}_cpu"] = time.perf_counter() - t, time.process_time() - cpu
    t = time.perf_counter()
    result = ComparisonResult(base=str(base), top_k=10, epsilons=[0.5])
    result.models.append(model_result(plan, found))
    write_report(to_report(result), workdir / "report.json")
    report_s = time.perf_counter() - t
    return numbers | {
        "cold_s": round(results["cold"], 2),
        "cold_ms_per_matrix": round(1e3 * results["cold"] / matrices, 3),
        "warm_s": round(results["warm"], 2),
        "warm_ms_per_matrix": round(1e3 * results["warm"] / matrices, 3),
        "cold_cpu_ms_per_matrix": round(1e3 * results["cold_cpu"] / matrices, 3),
        "warm_cpu_ms_per_matrix": round(1e3 * results["warm_cpu"] / matrices, 3),
        "progress_events": len(events),
        "report_s": round(report_s, 2),
        "report_mib": round((workdir / "report.json").stat().st_size / 2**20, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.moe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--layout", choices=["per-expert", "fused"], default="per-expert")
    parser.add_argument("--plan-only", action="store_true", help="measure the plan only (no analysis)")
    parser.add_argument("--out", type=Path, default=None, help="also write the numbers as JSON here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="wse-moe-") as tmp:
        numbers = run(args.layers, args.experts, args.layout, Path(tmp), analyse=not args.plan_only)
    print(json.dumps(numbers, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(numbers, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Dequantisation cost per matrix, against just reading the same matrix stored in bf16.

Issue 22: quantised checkpoints are dequantised one matrix (or one expert) at a time
before anything else sees them. This writes, in a scratch folder, in one run:

- a 7B-shaped FP8 matrix (``4096 x 11008``, ``float8_e4m3fn`` codes, ``128 x 128``
  block scales: DeepSeek-V3 / Qwen3-FP8 storage), quantised by transformers' own
  ``Fp8Quantize``, and the same matrix in bf16;
- an MXFP4 expert layer shaped like gpt-oss-20b's ``gate_up_proj`` (32 experts,
  ``[E, 2880, 5760]``: ``_blocks`` ``[32, 5760, 90, 16]`` and ``_scales``), and the same
  layer in bf16;

and times, through :class:`analysis.sources.WeightSource` (what the engine runs), reading
the bf16 matrix as float32 against reading and dequantising the quantised one, each the
median of ``--repeat`` rounds after a warm-up (page cache warm).

    python -m benchmarks.dequant [--repeat 5] [--experts 32] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import save_file

from analysis.sources import open_location


def _median_ms(fn, repeat: int) -> float:
    fn()  # warm-up: page cache, lazy imports
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _write(folder: Path, tensors: dict, quantization_config: dict | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "benchmark"} | ({"quantization_config": quantization_config} if quantization_config else {})
    (folder / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def fp8_matrix(root: Path, repeat: int) -> dict:
    """The FP8 7B-shaped matrix against its bf16 twin."""
    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    name = "model.layers.0.mlp.up_proj.weight"
    weight = torch.randn(11008, 4096, generator=torch.Generator().manual_seed(0)) * 0.02
    quantise = Fp8Quantize(SimpleNamespace(quantization_config=FineGrainedFP8Config(weight_block_size=(128, 128))))
    qconfig = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    quantised = open_location(str(_write(root / "fp8", quantise.convert({name: weight}), qconfig)))
    plain = open_location(str(_write(root / "bf16", {name: weight.to(torch.bfloat16)}, None)))
    return {
        "what": "FP8 e4m3 matrix 11008 x 4096, 128x128 blocks",
        "read_bf16_ms": _median_ms(lambda: plain.load(name).float(), repeat),
        "read_fp8_codes_ms": _median_ms(lambda: quantised.load_stored(name).clone(), repeat),
        "read_and_dequantise_ms": _median_ms(lambda: quantised.load(name), repeat),
        "storage": quantised.storage(name),
    }


def mxfp4_layer(root: Path, repeat: int, experts: int) -> dict:
    """A gpt-oss-20b-shaped MXFP4 ``gate_up_proj`` layer, expert by expert, against its bf16 twin."""
    name = "model.layers.0.mlp.experts.gate_up_proj"
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (experts, 5760, 90, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(118, 128, (experts, 5760, 90), generator=g, dtype=torch.uint8)
    quantised = open_location(
        str(_write(root / "mxfp4", {name + "_blocks": blocks, name + "_scales": scales}, {"quant_method": "mxfp4"}))
    )
    plain_layer = quantised.load(name).to(torch.bfloat16)
    del blocks, scales
    plain = open_location(str(_write(root / "mxfp4-bf16", {name: plain_layer}, None)))
    del plain_layer

    def each(source):
        for e in range(experts):
            source.load_slice(name, e).float()

    read = _median_ms(lambda: each(plain), repeat)
    dequantised = _median_ms(lambda: each(quantised), repeat)
    return {
        "what": f"MXFP4 expert layer {experts} x [2880, 5760] (gpt-oss-20b gate_up_proj), one expert at a time",
        "read_bf16_layer_ms": read,
        "read_and_dequantise_layer_ms": dequantised,
        "read_bf16_per_expert_ms": read / experts,
        "read_and_dequantise_per_expert_ms": dequantised / experts,
        "storage": quantised.storage(name),
    }


def main() -> None:
    """Run both measurements and write ``dequant-cpu.json``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        results = {
            "threads": torch.get_num_threads(),
            "fp8": fp8_matrix(Path(scratch), args.repeat),
            "mxfp4": mxfp4_layer(Path(scratch), args.repeat, args.experts),
        }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dequant-cpu.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

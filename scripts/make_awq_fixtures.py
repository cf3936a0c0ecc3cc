"""Regenerate tests/data/awq: tiny AWQ checkpoints written by auto-round, and their reference weights.

auto-round (Intel; quantises on the CPU) exports AutoAWQ's GEMM layout (``format="auto_awq"``:
``qweight``/``qzeros``/``scales`` per linear, ``quantization_config`` with ``quant_method:
awq``, ``version: gemm``, ``zero_point: not sym``; symmetric cases still store ``qzeros``,
every field 8). The reference is AutoAWQ's own dequantisation (``awq.utils.packing_utils.
dequantize_gemm``, pure torch; AutoAWQ's CUDA kernels are not needed for it). Neither
package is a dependency of this project; install them apart from the project's
environment, without their dependencies (both import and run on the project's torch 2.13
CPU build), e.g.::

    pip install --no-deps --target /tmp/awq auto-round==0.16.1 py-cpuinfo==9.0.0 \\
        datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0 autoawq==0.2.9
    PYTHONHASHSEED=0 PYTHONPATH=/tmp/awq .venv/bin/python scripts/make_awq_fixtures.py

The models and the quantisation are scripts/make_gptq_fixtures.py's (its ``quantise``, with
``fmt="auto_awq"``): seed 0, one block, round-to-nearest (``iters=0``, ``amp=False``), 4 bits
(the only width AutoAWQ's GEMM layout packs), groups of 16 or one group per output
(``group_size: -1``, which AutoAWQ's ``WQLinear_GEMM`` reads as a group of all the inputs): a
Llama, a Mixtral and a Qwen3-MoE (four experts, written one module per expert, routers not
quantised) and a LLaVA (the language model's linears; the vision tower and projector are not
quantised). auto-round quantises no matrix with a dimension not a multiple of 32, so an
8-output router (one AWQ word a row) is not among them (tests/quantised.py ``awq_gemm``
packs that case). auto-round lists ``modules_to_not_convert`` in a set's order: run it with
``PYTHONHASHSEED=0`` (as above) to get these files byte for byte.

Next to each checkpoint, ``reference.safetensors`` holds every quantised weight ``[out, in]``
as ``dequantize_gemm`` returns it, in fp16 (it multiplies the fp16 scales by the code
differences in fp16; the values are stored as they come, transposed). The script also checks
that AutoAWQ's ``WQLinear_GEMM`` loaded with the checkpoint's tensors gives the same weights
(its forward on the identity matrix; without AutoAWQ's CUDA extension or Triton it takes the
same ``dequantize_gemm`` path).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from make_gptq_fixtures import quantise
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "data" / "awq"
CASES = {  # name: (family, bits, group_size, sym, layer_config, model config overrides)
    "llama-w4g16": ("llama", 4, 16, False, None, {}),
    "llama-w4-channel": ("llama", 4, -1, False, None, {}),
    "mixtral-w4g16": ("mixtral", 4, 16, False, None, {}),
    "qwen3-moe-w4g16-sym": ("qwen3_moe", 4, 16, True, None, {}),
    "llava-w4g16": ("llava", 4, 16, False, None, {}),
}


def _each_module(folder: Path, dequantise) -> dict[str, torch.Tensor]:
    """``dequantise(qconfig, stored, module)`` of every module with a ``qweight``, as ``module.weight``."""
    qconfig = json.loads((folder / "config.json").read_text())["quantization_config"]
    stored = load_file(folder / "model.safetensors")
    modules = sorted(n.removesuffix(".qweight") for n in stored if n.endswith(".qweight"))
    return {module + ".weight": dequantise(qconfig, stored, module) for module in modules}


def library_dequantised(folder: Path) -> dict[str, torch.Tensor]:
    """Every ``qweight`` as AutoAWQ's ``dequantize_gemm`` computes it, ``[out, in]`` (fp16)."""
    from awq.utils.packing_utils import dequantize_gemm

    def one(qconfig: dict, stored: dict, module: str) -> torch.Tensor:
        qweight = stored[module + ".qweight"]
        group = qconfig["group_size"] if qconfig["group_size"] > 0 else qweight.shape[0]  # as WQLinear_GEMM
        zeros, scales = stored[module + ".qzeros"], stored[module + ".scales"]
        return dequantize_gemm(qweight, zeros, scales, qconfig["bits"], group).T.contiguous()

    return _each_module(folder, one)


def module_dequantised(folder: Path) -> dict[str, torch.Tensor]:
    """Every ``qweight`` as AutoAWQ's ``WQLinear_GEMM`` module gives it: its forward on the identity."""
    from awq.modules.linear.gemm import WQLinear_GEMM

    def one(qconfig: dict, stored: dict, module: str) -> torch.Tensor:
        inputs, outputs = stored[module + ".qweight"].shape[0], stored[module + ".scales"].shape[1]
        layer = WQLinear_GEMM(qconfig["bits"], qconfig["group_size"], inputs, outputs, False, "cpu")
        layer.load_state_dict({p: stored[f"{module}.{p}"] for p in ("qweight", "qzeros", "scales")})
        with torch.no_grad():
            return layer.eval()(torch.eye(inputs, dtype=torch.float16)).T.contiguous()

    return _each_module(folder, one)


def main() -> None:
    from importlib.metadata import version

    shutil.rmtree(OUT, ignore_errors=True)
    for name, settings in CASES.items():
        folder = quantise(name, *settings, fmt="auto_awq", root=OUT)
        qconfig = json.loads((folder / "config.json").read_text())["quantization_config"]
        assert (qconfig["quant_method"], qconfig["version"], qconfig["zero_point"]) == ("awq", "gemm", not settings[3])
        reference, module = library_dequantised(folder), module_dequantised(folder)
        assert reference and reference.keys() == module.keys(), name
        assert all(torch.equal(module[n], w) and w.dtype == torch.float16 for n, w in reference.items()), name
        save_file(reference, str(folder / "reference.safetensors"))
    versions = {"auto-round": version("auto-round"), "autoawq": version("autoawq"), "torch": torch.__version__}
    (OUT / "VERSIONS.json").write_text(json.dumps(versions, indent=2) + "\n")
    for folder in sorted(OUT.iterdir()):
        if folder.is_dir():
            print(f"{folder.name}: {sum(p.stat().st_size for p in folder.iterdir())} bytes")


if __name__ == "__main__":
    main()

"""Regenerate tests/data/mxfp4: a tiny gpt-oss whose experts triton_kernels' own MXFP4 quantiser wrote.

transformers' MXFP4 quantiser (``transformers.integrations.mxfp4.quantize_to_mxfp4``)
calls ``downcast_to_mxfp_torch`` of OpenAI's ``triton_kernels`` (the Triton project's
``python/triton_kernels``), which it loads from the kernels hub and then swizzles for the
GPU. That function is plain torch and runs on the CPU; it is used here directly, with the
stored layout that transformers' save path (``Mxfp4ReverseDeserialize``) and OpenAI's
reference loader (``gpt_oss/triton/model.py``: ``quantize_mx4(weight.mT)``) both give.

None of these is a dependency of this project. ``triton_kernels`` is not on PyPI under
that name (PyPI's ``triton-kernels`` 0.1.0 is an unrelated Kernelize AI project); install
it from the Triton repository at the tag its VERSION pins, and the Triton wheel of the same
version (which imports on a CPU-only machine), apart from the project's environment and
without dependencies; ``gpt-oss`` (OpenAI's reference implementation, whose
``gpt_oss/torch/weights.py`` reads MXFP4 with its own lookup table) declares Python >= 3.12
but its torch reader runs on 3.11::

    pip install --no-deps --target /tmp/mxfp4 triton==3.5.1 \\
        "triton_kernels @ git+https://github.com/triton-lang/triton.git@v3.5.1#subdirectory=python/triton_kernels"
    pip install --no-deps --ignore-requires-python --target /tmp/mxfp4 gpt-oss==0.0.9
    PYTHONPATH=/tmp/mxfp4 .venv/bin/python scripts/make_mxfp4_fixtures.py

(Where pip cannot reach GitHub, the five files that ``numerics_details.mxfp`` imports at
v3.5.1, ``triton_kernels/__init__.py``, ``numerics_details/__init__.py``, ``mxfp.py`` and
``mxfp_details/_downcast_to_mxfp.py``, ``_upcast_from_mxfp.py``, laid out as the package on
``PYTHONPATH``, are enough: the Triton kernels are imported, never run. The committed
fixtures were written so, and the script writes the same bytes on every run.)

The model is :func:`tests.quantised.gpt_oss_model` (seed 0, 2 blocks, 4 experts, hidden
and intermediate size 32, so that every expert matrix is whole 32-value blocks), stored in
bf16 as gpt-oss is released: each fused expert weight ``[E, in, out]`` quantised along
``in`` by ``downcast_to_mxfp_torch(w, torch.uint8, axis=1)`` and stored as
``*_blocks`` ``[E, out, in/32, 16]`` and ``*_scales`` ``[E, out, in/32]``, every other
tensor in bf16, the config's ``quantization_config`` that of ``openai/gpt-oss-20b``. Next to
it:

- ``source.safetensors``: the bf16 expert weights that were quantised;
- ``reference-gpt-oss.safetensors``: each expert weight as gpt-oss's reader
  (``gpt_oss.torch.weights.Checkpoint._get_mxfp4_tensor``, bf16, its own default)
  dequantises the written file, transposed to ``[E, in, out]``;
- ``reference-triton-kernels.safetensors``: each as triton_kernels' own
  ``upcast_from_mxfp_torch`` (bf16) dequantises the codes and scales it returned.

Every MXFP4 value is exact in bf16, so these are the float32 values too. The script checks
that the two references are equal, equal transformers' ``convert_moe_packed_tensors`` and
what ``GptOssForCausalLM.from_pretrained(..., Mxfp4Config(dequantize=True))`` loads on the
CPU, that every value is within its block's scale of the bf16 weight (the rounding bound
of e2m1, whose steps are at most 2), and that all 16 FP4 codes occur.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OUT = ROOT / "tests" / "data" / "mxfp4" / "gpt-oss"
#: ``quantization_config`` of openai/gpt-oss-20b's config.json.
QUANTIZATION_CONFIG = {
    "modules_to_not_convert": [
        "model.layers.*.self_attn",
        "model.layers.*.mlp.router",
        "model.embed_tokens",
        "lm_head",
    ],
    "quant_method": "mxfp4",
}
EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def quantise(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[E, in, out]`` bf16 -> (blocks, scales) as gpt-oss stores them, and the library's raw (codes, scales)."""
    from triton_kernels.numerics_details.mxfp import downcast_to_mxfp_torch

    experts, inputs, outputs = weight.shape
    codes, exponents = downcast_to_mxfp_torch(weight.to(torch.bfloat16), torch.uint8, axis=1)
    assert codes.shape == (experts, inputs // 2, outputs) and exponents.shape == (experts, inputs // 32, outputs)
    blocks = codes.transpose(1, 2).reshape(experts, outputs, inputs // 32, 16).contiguous()
    return blocks, exponents.transpose(1, 2).contiguous(), codes, exponents


def write(folder: Path) -> dict[str, torch.Tensor]:
    """The bf16 model saved by ``save_pretrained``, rewritten into ``OUT``; returns the bf16 expert weights."""
    from triton_kernels.numerics_details.mxfp import upcast_from_mxfp_torch

    from tests import families
    from tests.quantised import gpt_oss_model

    families.quiet()
    families.save(gpt_oss_model().to(torch.bfloat16), "gpt_oss", folder)
    state, source, library = {}, {}, {}
    for name, tensor in load_file(folder / "model.safetensors").items():
        if not name.endswith(EXPERTS):
            state[name] = tensor.to(torch.bfloat16)
            continue
        source[name] = tensor
        blocks, scales, codes, exponents = quantise(tensor)
        state[name + "_blocks"], state[name + "_scales"] = blocks, scales
        library[name] = upcast_from_mxfp_torch(codes, exponents, torch.bfloat16, axis=1).contiguous()
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = QUANTIZATION_CONFIG
    (OUT / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(state, str(OUT / "model.safetensors"), metadata={"format": "pt"})
    save_file(source, str(OUT / "source.safetensors"))
    save_file(library, str(OUT / "reference-triton-kernels.safetensors"))
    return source


def gpt_oss_read(folder: Path) -> dict[str, torch.Tensor]:
    """Each expert weight as gpt-oss's own reader dequantises it, ``[E, in, out]`` bf16."""
    from gpt_oss.torch.weights import Checkpoint

    checkpoint = Checkpoint(str(folder), torch.device("cpu"))
    out = {}
    for name in sorted(n for n in load_file(folder / "model.safetensors") if n.endswith("_blocks")):
        weight = name.removesuffix("_blocks")
        read = checkpoint._get_mxfp4_tensor(name, weight + "_scales", dtype=torch.bfloat16)  # [E, out, in]
        wide = checkpoint._get_mxfp4_tensor(name, weight + "_scales", dtype=torch.float32)
        assert torch.equal(read.float(), wide), weight  # every MXFP4 value is exact in bf16
        out[weight] = read.transpose(1, 2).contiguous()
    return out


def check(source: dict[str, torch.Tensor]) -> None:
    from transformers import GptOssForCausalLM, Mxfp4Config
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    stored = load_file(OUT / "model.safetensors")
    ours = load_file(OUT / "reference-gpt-oss.safetensors")
    library = load_file(OUT / "reference-triton-kernels.safetensors")
    loaded = GptOssForCausalLM.from_pretrained(
        OUT, quantization_config=Mxfp4Config(dequantize=True), dtype=torch.float32, device_map="cpu"
    ).state_dict()
    codes = set()
    for name, weight in source.items():
        blocks, scales = stored[name + "_blocks"], stored[name + "_scales"]
        transformers_read = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
        assert torch.equal(ours[name].float(), transformers_read), name
        assert torch.equal(library[name].float(), transformers_read), name
        assert torch.equal(loaded[name], transformers_read), name
        step = (
            torch.ldexp(torch.ones(scales.shape), scales.to(torch.int32) - 127)
            .repeat_interleave(32, -1)
            .transpose(1, 2)
        )
        assert ((transformers_read - weight.float()).abs() <= step).all(), name
        codes |= set((blocks & 0xF).unique().tolist()) | set((blocks >> 4).unique().tolist())
    assert codes == set(range(16)), sorted(codes)


def main() -> None:
    from importlib.metadata import version

    import gpt_oss  # noqa: F401
    import transformers
    import triton

    with tempfile.TemporaryDirectory() as tmp:
        source = write(Path(tmp) / "bf16")
    save_file(gpt_oss_read(OUT), str(OUT / "reference-gpt-oss.safetensors"))
    check(source)
    versions = {
        "triton_kernels": "v3.5.1 (triton-lang/triton python/triton_kernels)",
        "triton": triton.__version__,
        "gpt-oss": version("gpt-oss"),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }
    (OUT.parent / "VERSIONS.json").write_text(json.dumps(versions, indent=2) + "\n")
    print(f"{OUT.name}: {sum(p.stat().st_size for p in OUT.iterdir())} bytes")


if __name__ == "__main__":
    main()

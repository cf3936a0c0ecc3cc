"""Tiny checkpoints stored the way quantised hub releases store them (issue 22).

Each writer takes a full-precision checkpoint folder (written by ``save_pretrained``) and
writes a copy whose block matrices are quantised by the format's own code: transformers'
``Fp8Quantize`` (fine-grained FP8), compressed-tensors' ``compress`` with
``calculate_qparams``, transformers' ``from_pretrained`` with a
bitsandbytes config and ``save_pretrained`` (bitsandbytes runs on the CPU). (MXFP4 and
GPTQ checkpoints are committed under tests/data, written by scripts/make_mxfp4_fixtures.py
and scripts/make_gptq_fixtures.py with libraries this project does not depend on.)
:func:`dequantised_copy` writes the reference: the same
checkpoint with every quantised weight dequantised by the library's own function, as
float32, without the quantisation config.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file, save_file

from tests import families

_BLOCK_WEIGHT = ("layers.", "layer.", ".h.")


def gpt_oss_model():
    """gpt-oss with intermediate size 32: MXFP4 blocks hold 32 values, so every expert matrix is whole blocks."""
    return families.build("gpt_oss", intermediate_size=32)


def _quantisable(name: str, tensor: torch.Tensor) -> bool:
    return (
        tensor.dim() == 2
        and name.endswith(".weight")
        and any(b in name for b in _BLOCK_WEIGHT)
        and "norm" not in name
        and "embed" not in name
    )


def _write(src: Path, out: Path, state: dict, quantization_config: dict | None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():
        if path.suffix == ".json" and path.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy2(path, out / path.name)
    config = json.loads((src / "config.json").read_text())
    config.pop("quantization_config", None)
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (out / "config.json").write_text(json.dumps(config, indent=1))
    save_file({n: t.contiguous() for n, t in state.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def fp8_blocks(src: Path, out: Path, block: int = 16) -> Path:
    """Every block matrix (and fused 3-D expert tensor) as FP8 e4m3 with ``block x block`` scales."""
    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    qconfig = FineGrainedFP8Config(weight_block_size=(block, block))
    quantise = Fp8Quantize(SimpleNamespace(quantization_config=qconfig))
    state = {}
    for name, tensor in load_file(src / "model.safetensors").items():
        fused = tensor.dim() == 3 and "experts" in name and not name.endswith("bias")
        if _quantisable(name, tensor) or fused:
            state |= quantise.convert({name: tensor})
        else:
            state[name] = tensor
    config = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [block, block]}
    return _write(src, out, state, config)


def compressed(
    src: Path, out: Path, scheme: dict, fmt: str, ignore: tuple[str, ...] = (), fake: dict | None = None
) -> Path:
    """Every block ``Linear`` compressed by compressed-tensors with ``scheme`` (``weights`` args).

    ``fake``, when given, receives each compressed weight as the library's own
    ``fake_quantize`` returns it (quantised and dequantised in one step, no packing), as float32.
    """
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams
    from compressed_tensors.utils.match import match_name

    parsed = QuantizationScheme(targets=["Linear"], weights=scheme, format=fmt)
    args = parsed.weights
    compressor = BaseCompressor.get_value_from_registry(fmt)
    state = {}
    for name, tensor in load_file(src / "model.safetensors").items():
        module = name.removesuffix(".weight")
        if not _quantisable(name, tensor) or any(match_name(module, i) for i in ignore):
            state[name] = tensor
            continue
        weight = tensor.to(torch.bfloat16)
        if args.strategy == "group":
            view = weight.reshape(weight.shape[0], -1, args.group_size)
            low, high = view.amin(-1), view.amax(-1)
        elif args.strategy == "channel":
            low, high = weight.amin(1, keepdim=True), weight.amax(1, keepdim=True)
        else:
            low, high = weight.amin().reshape(1), weight.amax().reshape(1)
        scale, zero_point = calculate_qparams(low, high, args)
        local = {"weight": weight, "weight_scale": scale.to(torch.bfloat16), "weight_zero_point": zero_point}
        if fake is not None:
            fake[name] = fake_quantize(weight, local["weight_scale"], zero_point, args).to(torch.float32)
        for param, value in compressor.compress(local, parsed).items():
            state[f"{module}.{param}"] = value
    config = {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": args.model_dump(), "format": fmt}},
        "ignore": list(ignore),
    }
    return _write(src, out, state, config)


def bnb_4bit(src: Path, out: Path, quant_type: str = "nf4", double: bool = True) -> Path:
    """``src`` loaded 4-bit by transformers with bitsandbytes (on the CPU) and saved by ``save_pretrained``."""
    return _bnb_saved(
        src,
        out,
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double,
        bnb_4bit_compute_dtype=torch.float32,
    )


def bnb_8bit(src: Path, out: Path) -> Path:
    """``src`` loaded 8-bit (LLM.int8) by transformers with bitsandbytes and saved by ``save_pretrained``."""
    return _bnb_saved(src, out, load_in_8bit=True)


def _bnb_saved(src: Path, out: Path, **settings) -> Path:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model = AutoModelForCausalLM.from_pretrained(
        src, quantization_config=BitsAndBytesConfig(**settings), device_map="cpu"
    )
    model.save_pretrained(out)
    return out


def dequantised_copy(folder: Path, out: Path, weights: dict[str, torch.Tensor]) -> Path:
    """``folder`` with its quantised weights replaced by ``weights`` (float32), no quantisation config."""
    stored = load_file(folder / "model.safetensors")
    used: set[str] = set()
    for name in weights:
        module = name.removesuffix(".weight")
        used |= {n for n in stored if n in (name + "_scale_inv", name + "_blocks", name + "_scales", module + ".SCB")}
        used |= {module + p for p in (".qweight", ".qzeros", ".scales", ".g_idx") if module + p in stored}  # AWQ, GPTQ
        used |= {n for n in stored if n.startswith(name + ".")}  # bitsandbytes' quant state
        used |= {
            n for n in stored if n.startswith(module + ".") and n.rsplit(".", 1)[1].startswith(("weight_", "input_"))
        }
    state = {n: t for n, t in stored.items() if n not in used and n not in weights} | weights
    return _write(folder, out, state, None)


def full_precision_copy(folder: Path, out: Path, state: dict[str, torch.Tensor]) -> Path:
    """``folder``'s config and side files with ``state`` as its weights, without the quantisation config."""
    return _write(folder, out, state, None)


def fine_tune_of(folder: Path, out: Path, *, in_memory: bool = False) -> Path:
    """A bf16 full fine-tune of the model that ``folder`` (a quantised checkpoint) stores.

    The architecture of its ``config.json`` (without the quantisation config), initialised
    with seed 0 as scripts/make_gptq_fixtures.py initialised it, given a small full-rank
    change of every parameter (:func:`tests.families.perturb`), and written as users get
    it: by ``save_pretrained`` (transformers 5 writes Mixtral's and Qwen3-MoE's experts one
    tensor per expert, LLaVA in its checkpoint naming) or, ``in_memory``, as the model's
    state dict (fused experts ``[E, 2I, H]`` and ``[E, H, I]``, LLaVA's in-memory naming).
    """
    import transformers

    config = json.loads((folder / "config.json").read_text())
    config.pop("quantization_config", None)
    torch.manual_seed(0)
    model = getattr(transformers, config["architectures"][0])(transformers.AutoConfig.for_model(**config))
    families.perturb(model)
    model = model.to(torch.bfloat16)
    if not in_memory:
        model.save_pretrained(out)
        return out
    out.mkdir(parents=True, exist_ok=True)
    state = {n: t.detach().clone().contiguous() for n, t in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"))
    (out / "config.json").write_text(model.config.to_json_string())
    return out


def awq_gemm(src: Path, out: Path, group: int = 16) -> tuple[Path, dict[str, torch.Tensor]]:
    """Every block matrix in AutoAWQ's GEMM layout (4-bit, zero points, ``group`` columns a scale).

    Packed as AutoAWQ's ``WQLinear_GEMM.from_linear`` packs (AutoAWQ 0.2.9, which needs CUDA
    to install): codes ``[in, out]`` eight to an int32 word in the order ``0 2 4 6 1 3 5 7``,
    zero points the same way, scales ``[in/group, out]`` in fp16. Returns the folder and, per
    weight, ``(q - z) * s`` in float64 (the format's definition) as the reference.
    """
    order = [0, 2, 4, 6, 1, 3, 5, 7]

    def pack(codes: torch.Tensor) -> torch.Tensor:  # [rows, cols] ints 0..15 -> [rows, cols/8] int32
        words = torch.zeros(codes.shape[0], codes.shape[1] // 8, dtype=torch.int64)
        for i, j in enumerate(order):
            words |= codes[:, j::8].to(torch.int64) << (4 * i)
        return words.to(torch.int32) if words.max() < 2**31 else (words - (words >= 2**31) * 2**32).to(torch.int32)

    state, expected = {}, {}
    for name, tensor in load_file(src / "model.safetensors").items():
        if not _quantisable(name, tensor):
            state[name] = tensor
            continue
        w = tensor.to(torch.float64).T  # [in, out]
        view = w.reshape(w.shape[0] // group, group, w.shape[1])
        low, high = view.amin(1).clamp(max=0), view.amax(1).clamp(min=0)
        scales = ((high - low) / 15).clamp(min=1e-5).to(torch.float16)
        zeros = (-low / scales.double()).round().clamp(0, 15).to(torch.int64)
        codes = (view / scales.double()[:, None] + zeros[:, None]).round().clamp(0, 15).to(torch.int64)
        codes = codes.reshape(w.shape)
        module = name.removesuffix(".weight")
        state[module + ".qweight"] = pack(codes)
        state[module + ".qzeros"] = pack(zeros)
        state[module + ".scales"] = scales
        spread = lambda t: t.repeat_interleave(group, 0)  # noqa: E731
        expected[name] = ((codes - spread(zeros)) * spread(scales.double())).T.contiguous()
    config = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm"}
    return _write(src, out, state, config), expected

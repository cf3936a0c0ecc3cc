"""FP8 weights: fine-grained block scales (``quant_method: fp8``) and per-channel ``fbgemm_fp8``.

- **Fine-grained** (DeepSeek-V3/R1, Qwen3-*-FP8, GLM-4.5-FP8, MiniMax-M2): ``weight`` in
  ``float8_e4m3fn`` and ``weight_scale_inv`` with one float32 scale per
  ``weight_block_size`` block (``[128, 128]``; the last blocks may be partial); without a
  block size one scale per tensor. Fused experts ``[E, out, in]`` carry ``[E, ...]``
  scales. Dequantised by transformers' own code
  (``transformers.integrations.finegrained_fp8``, what ``from_pretrained`` runs with
  ``dequantize=True`` and in the backward pass), in float32.
- **fbgemm_fp8**: ``weight`` in ``float8_e4m3fn`` and ``weight_scale`` ``[out, 1]``, one
  scale per output channel: ``W = weight * weight_scale``, as
  ``transformers.integrations.fbgemm_fp8`` dequantises it.

Activation scales (``input_scale``, ``input_scale_ub``) are parts of their weight.
"""

from __future__ import annotations

import math

import torch

from analysis.quant.base import Claims, QuantTensor, misfit, register, require
from analysis.readers import TensorInfo

FP8_DTYPES = {torch.float8_e4m3fn: "e4m3", torch.float8_e5m2: "e5m2"}
_ACTIVATION_SCALES = ("input_scale", "input_scale_ub", "activation_scale")


def dequantise_blocks(weight: torch.Tensor, scale: torch.Tensor, block: list[int] | None) -> torch.Tensor:
    """``weight * scale`` with each scale spread over its block, in float32 (transformers' code)."""
    from transformers.integrations import finegrained_fp8

    if block is None:
        return weight.to(torch.float32) * scale.to(torch.float32)
    return finegrained_fp8._dequantize_fp8_weight(weight, scale, list(block), torch.float32)


def _fine(parts: dict[str, torch.Tensor], index: int | None, block: list[int] | None) -> torch.Tensor:
    return dequantise_blocks(parts["weight"], parts["scale"], block)


def _channel(parts: dict[str, torch.Tensor], index: int | None) -> torch.Tensor:
    scale = parts["scale"].to(torch.float32)
    if scale.dim() == 1 and scale.numel() > 1:  # [out]: one scale per row
        scale = scale[:, None]
    return parts["weight"].to(torch.float32) * scale


def _activation_parts(infos: dict[str, TensorInfo], prefix: str) -> set[str]:
    return {prefix + s for s in _ACTIVATION_SCALES if prefix + s in infos}


def _check_blocks(infos: dict[str, TensorInfo], name: str, scale_name: str, block: list[int] | None) -> None:
    shape, scale = infos[name].shape, infos[scale_name].shape
    if block is None:
        if math.prod(scale) != 1:
            raise misfit(infos, name, f"has {math.prod(scale)} scales but the config gives no weight_block_size")
        return
    lead = shape[:-2]
    want = (*lead, math.ceil(shape[-2] / block[0]), math.ceil(shape[-1] / block[1]))
    if tuple(scale) != want:
        raise misfit(
            infos,
            name,
            f"its {scale_name.rsplit('.', 1)[-1]} has shape {tuple(scale)}, but shape {tuple(shape)} "
            f"in {block[0]}x{block[1]} blocks needs {want}",
        )


def inferred_block(infos: dict[str, TensorInfo]) -> list[int] | None:
    """The square block size every ``weight_scale_inv`` fits, for a checkpoint without a config.

    (An upload of a lone ``.safetensors`` file.) ``None``: per-tensor scales, or no size fits.
    """
    pairs = [
        (info.shape, infos[name + "_scale_inv"].shape)
        for name, info in infos.items()
        if info.dtype in FP8_DTYPES and name + "_scale_inv" in infos and len(info.shape) in (2, 3)
    ]
    for size in (128, 256, 64, 32, 16, 8):
        want = [(math.ceil(w[-2] / size), math.ceil(w[-1] / size)) for w, _ in pairs]
        if pairs and all(tuple(s[-2:]) == t for (_, s), t in zip(pairs, want, strict=True)):
            return [size, size]
    return None


@register("fp8")
def claim_fine_grained(infos: dict[str, TensorInfo], config: dict) -> Claims:
    """Every FP8 ``weight`` with a ``weight_scale_inv`` (block-scaled FP8).

    With a config (``quant_method: fp8``) every FP8 weight must have its scales; found by
    names alone (no config), only the FP8 weights that have them are claimed, in blocks of
    :func:`inferred_block`.
    """
    by_name = "quant_method" not in config
    block = config.get("weight_block_size") or (inferred_block(infos) if by_name else None)
    block = None if block is None else [int(b) for b in block]
    if block is not None and (len(block) != 2 or min(block) < 1):
        raise misfit(infos, "config.json", f"weight_block_size {block} is not two positive sizes")
    claims = Claims()
    for name, info in infos.items():
        if info.dtype not in FP8_DTYPES or len(info.shape) not in (2, 3):
            continue
        if not name.endswith("weight") and not name.endswith(("gate_up_proj", "down_proj")):
            continue
        scale_name = f"{name}_scale_inv"
        if by_name and scale_name not in infos:
            continue  # no config, no scales: a plain FP8 tensor, read as its values
        require(infos, scale_name, name, "block scales (weight_scale_inv)")
        _check_blocks(infos, name, scale_name, block)
        fmt = FP8_DTYPES[info.dtype]
        label = f"fp8 {fmt}, {block[0]}x{block[1]} blocks" if block else f"fp8 {fmt}, per tensor"
        prefix = name.removesuffix("weight")
        parts = {"weight": name, "scale": scale_name}
        parts |= {p.rsplit(".", 1)[-1]: p for p in _activation_parts(infos, prefix)}
        claims.tensors.append(
            QuantTensor(
                name,
                info.shape,
                parts,
                label,
                lambda parts, index, block=block: _fine(parts, index, block),
                sliced=("weight", "scale") if len(info.shape) == 3 else (),
                method="fp8-blocks-1",
            )
        )
    return claims


@register("fbgemm_fp8")
def claim_per_channel(infos: dict[str, TensorInfo], config: dict) -> Claims:
    """Every FP8 ``weight`` with a per-channel ``weight_scale``."""
    claims = Claims()
    for name, info in infos.items():
        if info.dtype not in FP8_DTYPES or not name.endswith(".weight") or len(info.shape) != 2:
            continue
        scale_name = name + "_scale"
        require(infos, scale_name, name, "per-channel scales (weight_scale)")
        if infos[scale_name].shape not in ((info.shape[0], 1), (info.shape[0],), (1,), ()):
            raise misfit(infos, name, f"its weight_scale has shape {infos[scale_name].shape}, not ({info.shape[0]}, 1)")
        prefix = name.removesuffix("weight")
        parts = {"weight": name, "scale": scale_name}
        parts |= {p.rsplit(".", 1)[-1]: p for p in _activation_parts(infos, prefix)}
        per = "per tensor" if infos[scale_name].shape in ((1,), ()) else "per channel"
        label = f"fp8 {FP8_DTYPES[info.dtype]}, {per}"
        claims.tensors.append(QuantTensor(name, info.shape, parts, label, _channel, method="fp8-channel-1"))
    return claims

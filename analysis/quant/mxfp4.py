"""MXFP4 experts (gpt-oss as released, ``quant_method: mxfp4``).

A fused expert weight ``...experts.gate_up_proj`` is stored as ``gate_up_proj_blocks``
(``uint8`` ``[E, out, G, 16]``: two FP4 e2m1 codes a byte, 32 codes a block) and
``gate_up_proj_scales`` (``uint8`` ``[E, out, G]``: one e8m0 power-of-two exponent a
block, biased by 127). Dequantised by transformers' own
``transformers.integrations.mxfp4.convert_moe_packed_tensors`` (what ``from_pretrained``
runs to dequantise gpt-oss), one expert at a time, in float32; the result is the
``[E, in, out]`` tensor the bf16 gpt-oss checkpoints store.
"""

from __future__ import annotations

import torch

from analysis.quant.base import Claims, QuantTensor, misfit, register, require
from analysis.readers import TensorInfo

LABEL = "mxfp4"


def dequantise(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``[E, out, G, 16]`` codes and ``[E, out, G]`` exponents as float32 ``[E, G*32, out]``."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    return convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)


def _experts(parts: dict[str, torch.Tensor], index: int | None) -> torch.Tensor:
    if index is None:
        return dequantise(parts["blocks"], parts["scales"])
    return dequantise(parts["blocks"][None], parts["scales"][None])[0]


@register("mxfp4")
def claim(infos: dict[str, TensorInfo], config: dict) -> Claims:
    """Every ``*_blocks`` / ``*_scales`` pair of ``uint8`` tensors."""
    claims = Claims()
    for name, info in infos.items():
        if not name.endswith("_blocks") or info.dtype != torch.uint8:
            continue
        weight = name.removesuffix("_blocks")
        scales = require(infos, weight + "_scales", name, "e8m0 block scales (_scales)")
        if len(info.shape) != 4 or info.shape[-1] != 16:
            claims.unhandled[name] = f"MXFP4 blocks of shape {info.shape}: only fused experts [E, out, G, 16] are read"
            claims.hidden.add(weight + "_scales")
            continue
        if scales.shape != info.shape[:-1]:
            raise misfit(infos, name, f"its scales have shape {scales.shape}, the blocks need {info.shape[:-1]}")
        experts, rows, groups, _ = info.shape
        claims.tensors.append(
            QuantTensor(
                weight,
                (experts, groups * 32, rows),
                {"blocks": name, "scales": weight + "_scales"},
                LABEL,
                _experts,
                sliced=("blocks", "scales"),
                method="mxfp4-1",
            )
        )
    return claims

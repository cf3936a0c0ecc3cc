"""Which quantisation a checkpoint uses, and the resulting :class:`QuantIndex`.

Detected from ``config.json``'s ``quantization_config`` (``compression_config`` in older
compressed-tensors releases) and, without one, from tensor names that only quantised
checkpoints use (``weight_scale_inv``, gpt-oss ``*_blocks``/``*_scales``, bitsandbytes
``quant_state``): an upload of a lone ``.safetensors`` file has no config.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from analysis.quant import awq, bnb, compressed, fp8, gptq, mxfp4  # noqa: F401  (each registers its format)
from analysis.quant.base import FORMATS, QuantTensor, dtype_label
from analysis.readers import TensorInfo

#: Formats recognised by tensor names alone, tried when the config declares none.
_BY_NAME = ("fp8", "mxfp4", "bitsandbytes")


@dataclass
class QuantIndex:
    """A checkpoint's quantised weights, by logical name, and the stored tensors they use.

    ``method`` is the ``quant_method`` (``None``: not quantised); ``stored`` every stored
    tensor that is part of a quantised weight (hidden from the names a source lists);
    ``skipped`` one entry per weight that is quantised but cannot be dequantised here.
    """

    method: str | None = None
    tensors: dict[str, QuantTensor] = field(default_factory=dict)
    stored: set[str] = field(default_factory=set)
    skipped: list[dict] = field(default_factory=list)

    def label(self, name: str, dtype: torch.dtype) -> str:
        """How tensor ``name`` is stored: its quantisation, or its dtype (``bf16``)."""
        found = self.tensors.get(name)
        return found.label if found is not None else dtype_label(dtype)


def quantization_config(config: dict) -> dict | None:
    """``quantization_config`` of a ``config.json`` (also under ``text_config``), or ``None``."""
    for holder in (config, config.get("text_config") or {}):
        if isinstance(holder, dict):
            found = holder.get("quantization_config") or holder.get("compression_config")
            if isinstance(found, dict):
                return found
    return None


def index_checkpoint(config: dict, infos: dict[str, TensorInfo]) -> QuantIndex:
    """The :class:`QuantIndex` of a checkpoint with these headers and this config.

    Raises
    ------
    InputError
        A quantised weight misses a part or its parts' shapes do not fit.
    """
    qconfig = quantization_config(config)
    if qconfig is not None:
        method = str(qconfig.get("quant_method") or "unknown")
        methods: tuple[str, ...] = (method,)
    else:
        method, methods = None, _BY_NAME
    index = QuantIndex(method)
    for name in methods:
        claimer = FORMATS.get(name)
        if claimer is None:
            index.skipped.extend(_unknown(infos, name))
            continue
        claims = claimer(infos, qconfig or {})
        if claims.tensors or claims.unhandled:
            index.method = name
        for tensor in claims.tensors:
            index.tensors[tensor.name] = tensor
            index.stored.update(tensor.parts.values())
        index.stored.update(claims.hidden | set(claims.unhandled))
        index.skipped.extend({"name": n, "reason": r} for n, r in sorted(claims.unhandled.items()))
    if qconfig is not None:  # never raw: FP8 codes the declared format's dequantiser did not take
        claimed = index.stored | set(index.tensors)
        index.skipped.extend(
            {"name": n, "reason": f"FP8 tensor of a {method} checkpoint that its dequantiser does not read"}
            for n, info in sorted(infos.items())
            if info.dtype in fp8.FP8_DTYPES and n not in claimed
        )
        index.stored.update(n for n, info in infos.items() if info.dtype in fp8.FP8_DTYPES and n not in claimed)
    return index


def _unknown(infos: dict[str, TensorInfo], method: str) -> list[dict]:
    """A ``quant_method`` no dequantiser here knows: its non-float matrices are skipped, naming it."""
    return [
        {"name": name, "reason": f"quantised ({method}): this tool has no dequantiser for that format"}
        for name, info in sorted(infos.items())
        if (not info.dtype.is_floating_point or info.dtype in fp8.FP8_DTYPES) and len(info.shape) >= 2
    ]

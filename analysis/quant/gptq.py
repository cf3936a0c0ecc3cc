"""GPTQ checkpoints (``quant_method: gptq``), as GPTQModel, AutoGPTQ and auto-round store them.

A linear weight ``[out, in]`` is stored as ``qweight`` (int32 ``[in * bits / 32, out]``:
the codes of each output column packed along the input dimension, a little-endian bit
stream, ``32 / bits`` codes a word at 2, 4 and 8 bits, 32 codes in three words at 3
bits), ``qzeros`` (int32 ``[groups, out * bits / 32]``, the zero points packed the same
way along the output dimension), ``scales`` (``[groups, out]``, fp16) and ``g_idx``
(``[in]``, the group of each input column: ``i // group_size`` in order, any permutation of
that with act-order, ``desc_act``). ``group_size: -1`` is one group. The weight is
``W[o, i] = scales[g, o] * (q[i, o] - z[g, o])`` with ``g = g_idx[i]``, where ``z`` is the
stored zero point plus one in the original layout (``checkpoint_format: gptq``, which
stores ``z - 1``) and the stored zero point itself in GPTQModel's ``gptq_v2``. Symmetric
checkpoints store their (constant) zero points too. ``dynamic`` overrides bits and group
size per module (GPTQModel's ``+:regex`` / ``regex`` keys, first match wins).

The maintained GPTQ library, GPTQModel 7, requires torch 2.14 (this project pins 2.13) and
cannot be a dependency; AutoGPTQ needs a CUDA build. So this module unpacks the documented
layout itself and computes what GPTQModel's own model-free dequantiser
(``gptqmodel.utils.model_dequant.convert_gptq_file``, which turns a GPTQ checkpoint into a
full-precision one) computes with float32 as its target: the v1 zero points shifted by one
field by field, modulo ``2**bits``, and ``(q - z) * scale`` in float32, where every product
is exact. (GPTQModel's and auto-round's CPU kernels multiply in fp16: the same values
rounded to fp16.) It is tested against checkpoints auto-round wrote and the weights
GPTQModel's dequantiser computes from them (``tests/data/gptq``). Other bit widths,
packing dtypes and checkpoint formats (Marlin, BitBLAS, GPTQModel's planar ``gptq_p``)
are listed as skipped, naming them. (AWQ, stored alike, is read by
:mod:`analysis.quant.awq`, which lists the AWQ variants it cannot read through
:func:`unread`.)
"""

from __future__ import annotations

import re

import torch

from analysis.quant.base import Claims, QuantTensor, misfit, register, require
from analysis.readers import TensorInfo

_PARTS = ("qzeros", "scales", "g_idx")
_BITS = (2, 3, 4, 8)
_FORMATS = ("gptq", "gptq_v2")


def unread(infos: dict[str, TensorInfo], reason: str) -> Claims:
    """Every ``qweight`` skipped with ``reason``; its ``qzeros``/``scales``/``g_idx`` hidden as its parts."""
    claims = Claims()
    for name in infos:
        if name.endswith(".qweight"):
            module = name.removesuffix("qweight")
            claims.unhandled[name] = reason
            claims.hidden.update(module + part for part in _PARTS if module + part in infos)
    return claims


def module_settings(config: dict, module: str) -> dict:
    """``bits``, ``group_size``, ``sym``, ``desc_act`` of ``module``, with its first matching ``dynamic`` override."""
    settings = {"bits": 4, "group_size": -1, "sym": True, "desc_act": False}
    settings |= {key: config[key] for key in settings if config.get(key) is not None}
    for pattern, override in (config.get("dynamic") or {}).items():
        if not pattern.startswith("-:") and isinstance(override, dict) and re.match(pattern.removeprefix("+:"), module):
            settings |= {key: override[key] for key in settings if override.get(key) is not None}
            break
    return settings


def _unpack(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The first ``count`` ``bits``-bit codes of each column of ``words``, packed down dimension 0."""
    mask = (1 << bits) - 1
    if 32 % bits == 0:
        shifts = torch.arange(0, 32, bits, device=words.device, dtype=torch.int32)
        codes = (words.unsqueeze(1) >> shifts[None, :, None]) & mask  # sign bits are masked off
        return codes.reshape(-1, words.shape[1])[:count]
    stream = words.to(torch.int64) & 0xFFFFFFFF
    start = torch.arange(count, device=words.device) * bits
    word, offset = start // 32, (start % 32)[:, None]
    low = stream[word] >> offset
    high = stream[(word + 1).clamp(max=stream.shape[0] - 1)] << (32 - offset)
    return torch.where(offset + bits > 32, low | high, low) & mask


def _dequantise(parts: dict[str, torch.Tensor], bits: int, group: int, offset: int) -> torch.Tensor:
    scales = parts["scales"]
    outputs = scales.shape[1]
    inputs = parts["g_idx"].numel() if "g_idx" in parts else parts["qweight"].shape[0] * 32 // bits
    codes = _unpack(parts["qweight"], bits, inputs)  # [in, out]
    zeros = (_unpack(parts["qzeros"].T, bits, outputs).T + offset) & ((1 << bits) - 1)  # [groups, out]
    if "g_idx" in parts:
        groups = parts["g_idx"].to(torch.int64)
        if groups.numel() and (int(groups.min()) < 0 or int(groups.max()) >= scales.shape[0]):
            raise ValueError(f"its g_idx names groups outside 0..{scales.shape[0] - 1}")
    else:
        groups = torch.arange(inputs, device=scales.device) // (group if group > 0 else inputs)
    # float32 holds every product of an fp16/bf16 scale and a difference of 8-bit codes exactly
    weight = (codes - zeros[groups]).to(torch.float32) * scales.to(torch.float32)[groups]
    return weight.T


def _label(settings: dict) -> str:
    group = int(settings["group_size"])
    spread = f"groups of {group}" if group > 0 else "per channel"
    order = ", act-order" if settings["desc_act"] else ""
    sym = ", symmetric" if settings["sym"] else ""
    return f"int{settings['bits']} {spread}{order}{sym} (GPTQ)"


def _unsupported(config: dict) -> str | None:
    fmt = str(config.get("checkpoint_format") or "gptq").lower()
    if fmt not in _FORMATS:
        return f"GPTQ weight in the {fmt!r} checkpoint format: only gptq and gptq_v2 are read (not read raw)"
    if str(config.get("pack_dtype") or "int32").removeprefix("torch.") != "int32":
        return f"GPTQ weight packed in {config['pack_dtype']}: only int32 packing is read (not read raw)"
    return None


@register("gptq")
def claim(infos: dict[str, TensorInfo], config: dict) -> Claims:
    """Every ``qweight`` of a GPTQ checkpoint, with its ``qzeros``, ``scales`` and ``g_idx``."""
    reason = _unsupported(config)
    if reason is not None:
        return unread(infos, reason)
    offset = 1 if str(config.get("checkpoint_format") or "gptq").lower() == "gptq" else 0
    claims = Claims()
    for name, info in infos.items():
        if not name.endswith(".qweight"):
            continue
        module = name.removesuffix(".qweight")
        settings = module_settings(config, module)
        bits, group = int(settings["bits"]), int(settings["group_size"])
        if bits not in _BITS or info.dtype != torch.int32 or len(info.shape) != 2:
            packed = f"{len(info.shape)}-D {str(info.dtype).removeprefix('torch.')}"
            claims.unhandled[name] = (
                f"GPTQ {bits}-bit weight packed in {packed}: only 2, 3, 4 and 8 bits packed in 2-D int32 are read"
                " (not read raw)"
            )
            claims.hidden.update(f"{module}.{part}" for part in _PARTS if f"{module}.{part}" in infos)
            continue
        parts = {"qweight": name} | {part: f"{module}.{part}" for part in _PARTS if f"{module}.{part}" in infos}
        for role in ("qzeros", "scales"):
            require(infos, f"{module}.{role}", name, role)
        shape = _check(infos, parts, bits, group)
        claims.tensors.append(
            QuantTensor(
                module + ".weight",
                shape,
                parts,
                _label(settings),
                lambda p, i, b=bits, g=group, z=offset: _dequantise(p, b, g, z),
                method=f"gptq-{'v1' if offset else 'v2'}-1",
            )
        )
    return claims


def _check(infos: dict[str, TensorInfo], parts: dict[str, str], bits: int, group: int) -> tuple[int, int]:
    """``(out, in)`` of the weight whose stored parts are ``parts``, after checking that they fit."""
    owner = parts["qweight"]
    packed, outputs = infos[owner].shape
    inputs = infos[parts["g_idx"]].shape[0] if "g_idx" in parts else packed * 32 // bits
    groups = -(-inputs // group) if group > 0 else 1
    expected = {
        "qweight": (-(-inputs * bits // 32), outputs),
        "scales": (groups, outputs),
        "qzeros": (groups, -(-outputs * bits // 32)),
    }
    if "g_idx" in parts:
        expected["g_idx"] = (inputs,)
    if infos[parts["qzeros"]].dtype != torch.int32:
        raise misfit(infos, owner, f"its qzeros are {infos[parts['qzeros']].dtype}, not torch.int32")
    for role, shape in expected.items():
        if tuple(infos[parts[role]].shape) != shape:
            found = tuple(infos[parts[role]].shape)
            raise misfit(infos, owner, f"its {role} has shape {found}, not {shape} ({bits}-bit, groups of {group})")
    return outputs, inputs

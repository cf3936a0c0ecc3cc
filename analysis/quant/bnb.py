"""bitsandbytes 4-bit (NF4, FP4, with or without double quantisation) and 8-bit (LLM.int8).

As transformers' ``save_pretrained`` writes them (``quant_method: bitsandbytes``):

- **4-bit**: ``weight`` (``uint8`` ``[n/2, 1]``, two codes a byte) with ``weight.absmax``,
  ``weight.quant_map``, for double quantisation ``weight.nested_absmax`` /
  ``weight.nested_quant_map``, and ``weight.quant_state.bitsandbytes__nf4`` (or ``__fp4``:
  the rest of the quant state, JSON in a ``uint8`` tensor, which holds the weight's
  shape). Dequantised by ``bitsandbytes.functional.dequantize_4bit`` with the
  ``QuantState.from_dict`` bitsandbytes itself loads them with (both run on the CPU).
- **8-bit**: ``weight`` (``int8`` ``[out, in]``) and ``SCB`` (``float32`` ``[out]``, the
  absolute maximum of each row); ``bitsandbytes.functional.int8_vectorwise_dequant``.

``bitsandbytes`` is imported only when a checkpoint needs it.
"""

from __future__ import annotations

import json
from importlib.util import find_spec

import torch

from analysis.errors import InputError
from analysis.quant.base import Claims, QuantTensor, misfit, read_small, register
from analysis.readers import TensorInfo

PACKAGE = "bitsandbytes"
_STATE = ".quant_state.bitsandbytes__"


def _library():
    try:
        import bitsandbytes.functional as functional
    except ImportError:
        return None
    return functional


def _four_bit(parts: dict[str, torch.Tensor], index: int | None) -> torch.Tensor:
    functional = _library()
    state = {role: tensor for role, tensor in parts.items() if role != "weight"}
    quant_state = functional.QuantState.from_dict(state, device=torch.device("cpu"))
    return functional.dequantize_4bit(parts["weight"], quant_state).to(torch.float32)


def _eight_bit(parts: dict[str, torch.Tensor], index: int | None) -> torch.Tensor:
    return _library().int8_vectorwise_dequant(parts["weight"], parts["SCB"].to(torch.float32)).to(torch.float32)


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for d in shape:
        count *= d
    return count


def _states(infos: dict[str, TensorInfo], names: list[str]) -> dict[str, dict]:
    """The JSON quant states (shape, blocksize, dtype) of these weights, read together."""
    states = {}
    for name, tensor in read_small(infos, names).items():
        try:
            states[name] = json.loads(bytes(tensor.tolist()).decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as error:
            raise InputError(infos[name].file, f"bitsandbytes quant state {name!r} is not readable JSON") from error
    return states


def _claim_four_bit(infos: dict[str, TensorInfo], claims: Claims, reason: str | None) -> None:
    state_names = [n for n in infos if _STATE in n]
    states = _states(infos, state_names) if reason is None else {}
    for state_name in state_names:
        weight = state_name.split(_STATE)[0]
        kind = state_name.rsplit("__", 1)[-1]
        if weight not in infos:
            raise InputError(
                infos[state_name].file, f"bitsandbytes quant state {state_name!r} has no weight {weight!r}"
            )
        parts = {"weight": weight, f"quant_state.bitsandbytes__{kind}": state_name}
        for role in ("absmax", "quant_map", "nested_absmax", "nested_quant_map"):
            if f"{weight}.{role}" in infos:
                parts[role] = f"{weight}.{role}"
        if reason is not None:
            claims.unhandled[weight] = reason
            claims.hidden.update(p for p in parts.values() if p != weight)
            continue
        for role in ("absmax", "quant_map"):
            if role not in parts:
                raise InputError(
                    infos[weight].file, f"quantised weight {weight!r} has no {role} (expected {weight}.{role})"
                )
        shape = tuple(int(d) for d in states[state_name].get("shape") or ())
        stored = infos[weight].shape
        if len(shape) != 2 or (shape[0] * shape[1] + 1) // 2 != _numel(stored):
            raise misfit(infos, weight, f"its quant state gives shape {shape}, which {stored} 4-bit codes do not hold")
        double = ", double-quantised" if "nested_absmax" in parts else ""
        claims.tensors.append(
            QuantTensor(weight, shape, parts, f"{kind}{double}", _four_bit, method="bnb-4bit-1", any_device=False)
        )


def _claim_eight_bit(infos: dict[str, TensorInfo], claims: Claims, reason: str | None) -> None:
    for scb in [n for n in infos if n.endswith(".SCB")]:
        weight = scb.removesuffix("SCB") + "weight"
        if weight not in infos or infos[weight].dtype != torch.int8:
            continue
        if infos[scb].shape != (infos[weight].shape[0],):
            raise misfit(infos, weight, f"its SCB has shape {infos[scb].shape}, not ({infos[weight].shape[0]},)")
        parts = {"weight": weight, "SCB": scb}
        extra = scb.removesuffix("SCB") + "weight_format"
        if extra in infos:
            parts["weight_format"] = extra
        if reason is not None:
            claims.unhandled[weight] = reason
            claims.hidden.update(p for p in parts.values() if p != weight)
            continue
        claims.tensors.append(
            QuantTensor(
                weight, infos[weight].shape, parts, "int8 (LLM.int8)", _eight_bit, method="bnb-int8-1", any_device=False
            )
        )


@register("bitsandbytes", "bitsandbytes_4bit", "bitsandbytes_8bit")
def claim(infos: dict[str, TensorInfo], config: dict) -> Claims:
    """Every bitsandbytes 4-bit weight (found by its quant state) and 8-bit weight (by its ``SCB``)."""
    reason = (
        None
        if find_spec("bitsandbytes") is not None
        else f"bitsandbytes weight: install {PACKAGE} to read it (not read raw)"
    )
    claims = Claims()
    _claim_four_bit(infos, claims, reason)
    _claim_eight_bit(infos, claims, reason)
    return claims

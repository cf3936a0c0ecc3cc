"""GPTQ checkpoints (``quant_method: gptq``): recognised, not dequantised.

Their weights are stored as ``qweight`` (int32 words of packed 4-bit codes), ``qzeros``,
``scales`` and ``g_idx``; no maintained CPU dequantiser installs here without a CUDA build
(gptqmodel, auto-gptq), so each such weight is listed in ``skipped`` with the format
named, its other tensors counted as parts of it, and nothing is read raw. (AWQ, stored the
same way, is read by :mod:`analysis.quant.awq`; an AWQ variant it cannot read comes here.)
"""

from __future__ import annotations

from analysis.quant.base import Claims, register
from analysis.readers import TensorInfo

_PARTS = ("qzeros", "scales", "g_idx", "bias")


@register("gptq")
def claim(infos: dict[str, TensorInfo], config: dict) -> Claims:
    """Every ``qweight``: skipped, naming the format; ``qzeros``/``scales``/``g_idx`` hidden."""
    method = str(config.get("quant_method", "gptq")).upper()
    bits = config.get("bits") or config.get("w_bit")
    what = f"{method} {bits}-bit" if bits else method
    claims = Claims()
    for name in infos:
        if not name.endswith(".qweight"):
            continue
        module = name.removesuffix("qweight")
        claims.unhandled[name] = f"{what} weight: this tool has no {method} dequantiser (not read raw)"
        claims.hidden.update(module + part for part in _PARTS[:3] if module + part in infos)
    return claims

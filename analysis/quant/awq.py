"""AWQ checkpoints (``quant_method: awq``, AutoAWQ's GEMM layout).

A linear weight ``[out, in]`` is stored as ``qweight`` (``int32`` ``[in, out/8]``: eight
4-bit codes a word, in AutoAWQ's interleaved order), ``qzeros`` (``[in/group, out/8]``,
packed the same way) and ``scales`` (``[in/group, out]``): ``W = (q - z) * s``. AutoAWQ
itself needs CUDA; its maintained CPU reader is compressed-tensors'
``AutoAWQConverter`` (``compressed_tensors.entrypoints.convert.converters``), which
unpacks the codes into compressed-tensors' ``pack-quantized`` form; that library's own
compressor then dequantises them, through :func:`analysis.quant.compressed.decompress`,
which also unpacks the one-word zero-point rows of matrices with at most 8 outputs (a
router over 8 experts). Other AWQ versions (GEMV, Marlin) and bit widths are listed as
skipped, naming them. Tested element for element against AutoAWQ's own ``dequantize_gemm``
on checkpoints auto-round wrote (tests/data/awq, scripts/make_awq_fixtures.py).
"""

from __future__ import annotations

import torch

from analysis.quant import compressed, gptq
from analysis.quant.base import Claims, QuantTensor, misfit, register, require
from analysis.readers import TensorInfo


def _library():
    try:
        from compressed_tensors.compressors import BaseCompressor
        from compressed_tensors.entrypoints.convert.converters.autoawq import AutoAWQConverter
        from compressed_tensors.quantization import QuantizationScheme
    except ImportError:
        return None
    return BaseCompressor, AutoAWQConverter, QuantizationScheme


def _dequantise(parts: dict[str, torch.Tensor], index: int | None, converter, compressor, scheme) -> torch.Tensor:
    converted = converter.process({f"module.{role}": tensor for role, tensor in parts.items()})
    state = {name.removeprefix("module."): tensor for name, tensor in converted.items()}
    return compressed.decompress(state, compressor, scheme)


def _scheme(scheme_class, bits: int, group: int, zero_point: bool):
    """compressed-tensors' ``pack-quantized`` scheme of AWQ codes: groups of ``group`` inputs, or per channel."""
    weights = {"num_bits": bits, "type": "int", "symmetric": not zero_point}
    weights |= {"group_size": group, "strategy": "group"} if group > 0 else {"strategy": "channel"}
    return scheme_class(targets=["Linear"], weights=weights, format="pack-quantized")


@register("awq")
def claim(infos: dict[str, TensorInfo], config: dict) -> Claims:
    """Every ``qweight`` of an AutoAWQ GEMM checkpoint.

    ``group_size: -1`` is one scale per output (AutoAWQ's ``WQLinear_GEMM`` takes the
    whole input as the group): read with compressed-tensors' ``channel`` strategy.
    """
    library = _library()
    bits, group = int(config.get("bits") or config.get("w_bit") or 4), int(config.get("group_size") or 128)
    version = str(config.get("version") or "gemm").lower()
    if library is None or version != "gemm" or bits != 4:
        why = "install compressed-tensors to read it" if library is None else f"AWQ {version} {bits}-bit is not read"
        return gptq.unread(infos, f"AWQ {bits}-bit weight: {why} (not read raw)")
    base_compressor, converter_class, scheme_class = library
    zero_point = bool(config.get("zero_point", True))
    converter = converter_class.from_autoawq_config(config)
    scheme = _scheme(scheme_class, bits, group, zero_point)
    compressor = base_compressor.get_value_from_registry("pack-quantized")
    spread = f"groups of {group}" if group > 0 else "per channel"
    label = f"int{bits} {spread}{'' if zero_point else ', symmetric'} (AWQ)"
    claims = Claims()
    for name, info in infos.items():
        if not name.endswith(".qweight"):
            continue
        module = name.removesuffix(".qweight")
        parts = {"qweight": name, "scales": module + ".scales"}
        if zero_point or module + ".qzeros" in infos:  # (symmetric: AutoAWQ's layout still stores them, all 8)
            parts["qzeros"] = module + ".qzeros"
        for role, part in parts.items():
            require(infos, part, name, role)
        inputs, outputs = info.shape[0], info.shape[1] * 32 // bits
        groups = -(-inputs // group) if group > 0 else 1
        if infos[parts["scales"]].shape != (groups, outputs):
            raise misfit(
                infos, name, f"its scales have shape {infos[parts['scales']].shape}, not ({groups}, {outputs})"
            )
        claims.tensors.append(
            QuantTensor(
                module + ".weight",
                (outputs, inputs),
                parts,
                label,
                lambda p, i, c=converter, k=compressor, s=scheme: _dequantise(p, i, c, k, s),
                method="awq-gemm-1",
            )
        )
    return claims

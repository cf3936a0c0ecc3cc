"""compressed-tensors checkpoints (``quant_method: compressed-tensors``).

``pack-quantized`` (W4A16, W8A16 as int32 words), ``int-quantized``, ``float-quantized``
(FP8 W8A8) and ``naive-quantized``, with group, channel, block and tensor strategies,
symmetric or not, and ``ignore`` lists, as llm-compressor writes them (Kimi-K2-Thinking,
most W4A16/W8A8/FP8 releases). The packing has changed between versions, so every
weight is dequantised by the ``compressed-tensors`` library itself (imported only when a
checkpoint needs it): the same ``match_quantizable_tensors`` and per-scheme
``BaseCompressor.decompress`` that its own model-free dequantiser
(``compressed_tensors.entrypoints.convert.converters.CompressedTensorsDequantizer``) runs.
"""

from __future__ import annotations

import torch

from analysis.errors import InputError
from analysis.quant.base import Claims, QuantTensor, read_small, register
from analysis.readers import TensorInfo

PACKAGE = "compressed-tensors"


def _library():
    try:
        from compressed_tensors.compressors import BaseCompressor
        from compressed_tensors.compressors.format import infer_module_format
        from compressed_tensors.config import CompressionFormat
        from compressed_tensors.quantization import QuantizationConfig
        from compressed_tensors.utils.match import match_quantizable_tensors
    except ImportError:
        return None
    return BaseCompressor, infer_module_format, CompressionFormat, QuantizationConfig, match_quantizable_tensors


def _label(scheme, fmt: str) -> str:
    args = scheme.weights
    kind = "fp" if str(args.type).endswith("float") else "int"
    strategy = str(getattr(args.strategy, "value", args.strategy))
    if strategy == "group":
        strategy = f"groups of {args.group_size}"
    elif strategy == "block":
        strategy = "x".join(str(b) for b in (args.block_structure or [])) + " blocks"
    sym = "" if args.symmetric else ", asymmetric"
    return f"{kind}{args.num_bits} {strategy}{sym} ({fmt})"


def decompress(parts: dict[str, torch.Tensor], compressor, scheme) -> torch.Tensor:
    """One module's compressed parameters decompressed by ``compressor`` as float32.

    Used for compressed-tensors checkpoints and for AWQ ones (:mod:`analysis.quant.awq`
    converts those to ``pack-quantized`` first), so that both get :func:`_one_word_row`.
    """
    parts = dict(parts)
    zero_point = parts.get("weight_zero_point")
    if zero_point is not None and zero_point.dim() == 2 and zero_point.shape[0] == 1:
        parts["weight_zero_point"] = _one_word_row(zero_point)
    return compressor.decompress(parts, scheme)["weight"].to(torch.float32)


def _one_word_row(packed: torch.Tensor) -> torch.Tensor:
    """The same ``[1, n]`` packed zero points, strided so that compressed-tensors can unpack them.

    A matrix with at most ``32 / bits`` rows (an MoE router over 4 or 8 experts; in AWQ's
    GEMM layout, which packs 8 outputs a word, a router over 8) packs its zero points into
    one int32 row. compressed-tensors 0.20's ``unpack_from_int32(...,
    packed_dim=0)`` transposes that row to ``[n, 1]`` with strides ``(1, n)``, which
    ``.contiguous()`` leaves as it is (a size-1 dimension's stride does not count) and
    ``.view(torch.uint8)`` then refuses ("self.stride(-1) must be 1 to view Int as
    Byte"). Giving the size-1 dimension stride 1 changes no element; the library's own
    code then unpacks and dequantises it.
    """
    return packed.as_strided(packed.shape, (1, packed.stride(1)), packed.storage_offset())


def _unhandled(infos: dict[str, TensorInfo], reason: str) -> Claims:
    """Without the library: every compressed weight listed as skipped, its parts hidden."""
    claims = Claims()
    for name in infos:
        module, _, param = name.rpartition(".")
        if param in ("weight_packed",) or (param == "weight" and module + ".weight_scale" in infos):
            claims.unhandled[name] = reason
        elif param.startswith(("weight_", "input_", "output_")) and param != "weight":
            claims.hidden.add(name)
    return claims


@register("compressed-tensors")
def claim(infos: dict[str, TensorInfo], config: dict) -> Claims:
    """Every weight a config group of the checkpoint's ``quantization_config`` targets."""
    library = _library()
    if library is None:
        return _unhandled(infos, f"compressed-tensors weight: install {PACKAGE} to read it (not read raw)")
    base_compressor, infer_format, formats, quant_config, match = library
    try:
        parsed = quant_config.model_validate(config)
    except Exception as error:  # pydantic's ValidationError
        problem = f"has a compressed-tensors quantization_config that cannot be read: {error}"
        raise InputError("config.json", problem) from error
    claims = Claims()
    claimed: set[str] = set()
    for scheme in parsed.config_groups.values():
        if scheme.weights is None:
            continue
        fmt = scheme.format or parsed.format
        if fmt in (None, "mixed-precision", formats.mixed_precision.value):
            fmt = infer_format(torch.nn.Linear, scheme).value
        fmt = getattr(fmt, "value", fmt)
        compressor = base_compressor.get_value_from_registry(fmt)
        params = compressor.compression_param_names(scheme)
        available = {n: None for n in infos if n not in claimed}
        found: list[tuple[str, dict]] = []
        for module, stored in match(available, ignore=parsed.ignore, targets=scheme.targets, param_targets=[params[0]]):
            if params[0] == "weight" and f"{module}.weight_scale" not in infos:
                continue  # a module left in full precision (an embedding, a head) that a class target names
            parts = {}
            for param in params:
                part = f"{module}.{param}"
                if part not in infos:
                    raise InputError(
                        infos[stored].file, f"quantised weight {stored!r} has no {param} (expected tensor {part!r})"
                    )
                parts[param] = part
            claimed.update(parts.values())
            found.append((module, parts))
        shapes = _shapes(infos, found)
        for module, parts in found:
            claims.tensors.append(
                QuantTensor(
                    f"{module}.weight",
                    shapes[module],
                    parts,
                    _label(scheme, fmt),
                    lambda p, i, c=compressor, s=scheme: decompress(p, c, s),
                    method=f"compressed-tensors-{fmt}-1",
                )
            )
    modules = {t.name.removesuffix(".weight") for t in claims.tensors}
    claims.hidden.update(n for n in infos if _qparam(n) and n.rpartition(".")[0] in modules and n not in claimed)
    return claims


def _qparam(name: str) -> bool:
    """A quantisation parameter next to a weight (``weight_g_idx``, ``input_scale``, ...)."""
    param = name.rpartition(".")[2]
    return param != "weight" and param.startswith(("weight_", "input_", "output_"))


def _shapes(infos: dict[str, TensorInfo], found: list[tuple[str, dict]]) -> dict[str, tuple[int, ...]]:
    """Each module's dequantised shape: its ``weight``'s own, or what ``weight_shape`` holds.

    The ``weight_shape`` tensors (two numbers each) are read together, one open per file.
    """
    stored = read_small(infos, [parts["weight_shape"] for _, parts in found if "weight" not in parts])
    return {
        module: infos[parts["weight"]].shape
        if "weight" in parts
        else tuple(int(d) for d in stored[parts["weight_shape"]].tolist())
        for module, parts in found
    }

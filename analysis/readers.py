"""File-format readers: safetensors headers and tensors, weights-only ``pytorch_model.bin``, JSON configs.

Shared by :mod:`analysis.sources` (checkpoints) and :mod:`analysis.adapters` (adapter
files), which therefore do not import each other.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from analysis.errors import InputError

SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_BIN = "pytorch_model.bin"
PYTORCH_BIN_INDEX = "pytorch_model.bin.index.json"
ADAPTER_CONFIG = "adapter_config.json"
HUB_PATTERNS = ["*.safetensors", "*.json"]

# safetensors dtype strings (the header's "dtype" field) -> torch dtypes.
_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,  # ue8m0 block scales (DeepSeek-V3.1-style FP8)
}
_MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on the JSON header


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it looks like, known without reading it."""

    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype


def read_safetensors_header(
    path: Path, *, display_name: str | None = None, exact_end: bool = False
) -> dict[str, TensorInfo]:
    """Read and validate a ``.safetensors`` header; the tensors are not read.

    The format (https://github.com/huggingface/safetensors) is an 8-byte little-endian
    header length ``n``, ``n`` bytes of JSON mapping each name to ``dtype``, ``shape``
    and ``data_offsets`` into the data that follows. Checking the header against the
    file size here lets a corrupt or truncated file be reported precisely instead of as
    a failure halfway through an analysis.

    ``display_name`` names the file in errors (an upload's own name rather than the
    server path it was stored under); ``exact_end`` also refuses bytes after the last
    tensor, which a complete upload never has.

    Raises
    ------
    InputError
        The file is unreadable, not safetensors, truncated, or holds no tensors.
    """
    label: Path | str = display_name or path
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise InputError(label, f"is not a safetensors file: it is only {size} bytes long")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > _MAX_HEADER_BYTES or header_len > size - 8:
                if header_len <= _MAX_HEADER_BYTES:
                    raise InputError(
                        label,
                        f"is truncated: its header says {header_len} bytes of metadata follow but the file "
                        f"has only {size - 8}",
                    )
                raise InputError(label, "is not a safetensors file (corrupt header: the header length is nonsense)")
            raw = handle.read(header_len)
    except OSError as error:
        raise InputError(label, f"cannot be read ({error.strerror or error})") from error
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as error:
        raise InputError(label, "is not a safetensors file (corrupt header: not valid JSON metadata)") from error
    data_len = size - 8 - header_len
    tensors: dict[str, TensorInfo] = {}
    data_end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype_name, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            shape = tuple(int(d) for d in shape)
            if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end):
                raise ValueError("bad data offsets")
        except (KeyError, TypeError, ValueError) as error:
            raise InputError(label, f"is not a valid safetensors file (corrupt entry for tensor {name!r})") from error
        if end > data_len:
            raise InputError(
                label,
                f"is truncated: tensor {name!r} needs bytes up to {end} of the data section but the file holds "
                f"only {data_len}",
            )
        if dtype_name not in _SAFETENSORS_DTYPES:
            raise InputError(label, f"tensor {name!r} has dtype {dtype_name}, which this tool cannot read")
        tensors[name] = TensorInfo(path, shape, _SAFETENSORS_DTYPES[dtype_name])
        data_end = max(data_end, end)
    if not tensors:
        raise InputError(label, "holds no tensors")
    if exact_end and data_len > data_end:
        raise InputError(
            label, f"is not a valid safetensors file ({data_len - data_end} unexpected bytes after the last tensor)"
        )
    return tensors


def load_safetensors_tensor(path: Path, name: str) -> torch.Tensor:
    """One tensor from a ``.safetensors`` file, memory-mapped (the rest stays on disk)."""
    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            return handle.get_tensor(name)
    except SafetensorError as error:
        raise InputError(path, f"cannot read tensor {name!r}: {error}") from error
    except OSError as error:
        raise InputError(path, f"cannot be read ({error.strerror or error})") from error


def load_safetensors_slice(path: Path, name: str, index: int) -> torch.Tensor:
    """``tensor[index]`` of a stored tensor (one expert of a fused ``[E, ...]`` tensor).

    Read through safetensors' ``get_slice``, so the other experts stay on disk.
    """
    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            return handle.get_slice(name)[index]
    except SafetensorError as error:
        raise InputError(path, f"cannot read tensor {name!r}: {error}") from error
    except OSError as error:
        raise InputError(path, f"cannot be read ({error.strerror or error})") from error


def load_torch_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A ``pytorch_model.bin`` state dict, loaded with ``weights_only=True``.

    ``weights_only`` refuses arbitrary pickled objects (only tensors and plain
    containers), and ``mmap`` leaves the tensor data on disk until used. Files from
    torch < 1.6 (not zip archives) cannot be memory-mapped and are read without it.
    """
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as error:
        raise InputError(path, f"cannot be read ({error.strerror or error})") from error
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(
            path, f"is not a PyTorch checkpoint that can be loaded safely (weights only): {first_line}"
        ) from error
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise InputError(path, "is not a flat state dict of named tensors")
    if not state:
        raise InputError(path, "holds no tensors")
    return state


def read_json(path: Path) -> dict:
    """The JSON object in ``path``; an :class:`InputError` when unreadable, not JSON or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise InputError(path, f"cannot be read ({error.strerror or error})") from error
    except (UnicodeDecodeError, ValueError) as error:
        raise InputError(path, f"is not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise InputError(path, "is not a JSON object")
    return data

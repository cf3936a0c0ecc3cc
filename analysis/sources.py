"""Where weights come from: a hub id, a local folder or file, or a LoRA adapter.

:func:`open_source` turns what a user typed into something that hands out one tensor at
a time. Resolution order:

1. An existing local path (only when ``allow_local_paths``; hosted instances turn it off
   so visitors cannot name server paths):

   - a folder holding ``adapter_config.json``: a PEFT adapter
     (:class:`analysis.adapters.LoraAdapter`);
   - a folder holding ``model.safetensors``, a sharded checkpoint
     (``model.safetensors.index.json`` and its shards) or other ``*.safetensors`` files;
   - a folder holding only ``pytorch_model.bin`` (or its sharded index): read with
     ``torch.load(weights_only=True, mmap=True)``, never plain unpickling, and only for
     local folders, never for hub downloads;
   - a single ``.safetensors`` file: a kohya LoRA if its keys are ``lora_down``/``lora_up``
     pairs, else a checkpoint.

2. Otherwise a Hugging Face hub model id (``org/name``, optionally ``org/name@revision``),
   fetched with ``huggingface_hub.snapshot_download`` restricted to ``*.safetensors`` and
   ``*.json`` (narrowed to the one set of weights that will be read when the repo's file
   list is available, see :func:`hub_allow_patterns`); ``HF_HUB_OFFLINE`` and the local
   hub cache are honoured.

Like the safetensors API this module follows, nothing is read eagerly: a
:class:`WeightSource` knows every tensor's name, shape and dtype from the file headers
and memory-maps one tensor when asked. Every problem a user can cause is an
:class:`~analysis.errors.InputError` naming the file and the problem.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open

from analysis.errors import InputError

if TYPE_CHECKING:
    from analysis.adapters import LoraAdapter

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


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise InputError(path, f"cannot be read ({error.strerror or error})") from error
    except (UnicodeDecodeError, ValueError) as error:
        raise InputError(path, f"is not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise InputError(path, "is not a JSON object")
    return data


class WeightSource:
    """The tensors of one checkpoint, read lazily one at a time.

    Build it with :func:`open_source`. ``label`` is the spec as the user gave it (a hub
    id or a path); ``root`` the folder or file it resolved to; ``config`` the parsed
    ``config.json`` next to the weights, or ``{}``. Tensors are returned in the dtype
    they are stored in; :mod:`analysis.pairing` upcasts to float32.
    """

    def __init__(
        self,
        label: str,
        root: Path,
        tensors: dict[str, TensorInfo],
        config: dict | None = None,
        loader: Callable[[TensorInfo, str], torch.Tensor] | None = None,
    ) -> None:
        self.label = label
        self.root = root
        self.config = config or {}
        self._tensors = tensors
        self._loader = loader or (lambda info, name: load_safetensors_tensor(info.file, name))

    def __repr__(self) -> str:
        return f"WeightSource({self.label!r}, {len(self._tensors)} tensors)"

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def names(self) -> list[str]:
        """Every tensor name, sorted."""
        return sorted(self._tensors)

    def _info(self, name: str) -> TensorInfo:
        try:
            return self._tensors[name]
        except KeyError:
            raise KeyError(f"{self.label} has no tensor {name!r}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self._info(name).dtype

    def file(self, name: str) -> Path:
        """The file the tensor is stored in (a shard for sharded checkpoints)."""
        return self._info(name).file

    def load(self, name: str) -> torch.Tensor:
        """The tensor ``name`` as stored (dtype and orientation unchanged)."""
        info = self._info(name)
        tensor = self._loader(info, name)
        if tuple(tensor.shape) != info.shape:
            problem = f"tensor {name!r} has shape {tuple(tensor.shape)}, its header says {info.shape}"
            raise InputError(info.file, problem)
        return tensor

    def content_digest(self, name: str) -> str:
        """sha256 of the tensor's dtype, shape and bytes: equal digests, equal tensors."""
        tensor = self.load(name).contiguous()
        digest = hashlib.sha256(f"{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
        return digest.hexdigest()


def _is_kohya_lora(names: list[str]) -> bool:
    return any(n.endswith((".lora_down.weight", ".lora_up.weight")) for n in names)


def _is_peft_weights(names: list[str]) -> bool:
    return any(".lora_A." in n or ".lora_B." in n or n.endswith((".lora_A.weight", ".lora_B.weight")) for n in names)


def _config_near(folder: Path) -> dict:
    config = folder / "config.json"
    return _read_json(config) if config.is_file() else {}


def _source_from_index(label: str, folder: Path, index_path: Path, *, pickle_shards: bool) -> WeightSource:
    """A sharded checkpoint: ``weight_map`` in the index names the shard of each tensor."""
    index = _read_json(index_path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise InputError(index_path, "has no 'weight_map' (is it a sharded checkpoint index?)")
    shard_names = sorted(set(weight_map.values()))
    tensors: dict[str, TensorInfo] = {}
    for shard_name in shard_names:
        relative = Path(shard_name)
        if relative.is_absolute() or ".." in relative.parts or "\\" in shard_name:
            # Checked on the name: hub caches link shards to blobs elsewhere, which is fine.
            raise InputError(index_path, f"names shard {shard_name!r}, which lies outside its folder")
        shard = folder / relative
        if not shard.is_file():
            raise InputError(index_path, f"points to shard {shard_name!r}, which is missing from {folder}")
        if pickle_shards:
            state = load_torch_state_dict(shard)
            shard_tensors = {n: TensorInfo(shard, tuple(t.shape), t.dtype) for n, t in state.items()}
        else:
            shard_tensors = read_safetensors_header(shard)
        for name, info in shard_tensors.items():
            if weight_map.get(name) == shard_name:
                tensors[name] = info
    missing = sorted(n for n, s in weight_map.items() if n not in tensors)
    if missing:
        raise InputError(
            index_path,
            f"lists {len(missing)} tensor(s) that are not in their shard, "
            f"e.g. {missing[0]!r} in {weight_map[missing[0]]!r}",
        )
    if pickle_shards:
        return _bin_source(label, folder, tensors)
    return WeightSource(label, folder, tensors, _config_near(folder))


def _bin_source(label: str, folder: Path, tensors: dict[str, TensorInfo]) -> WeightSource:
    states: dict[Path, dict[str, torch.Tensor]] = {}

    def load(info: TensorInfo, name: str) -> torch.Tensor:
        if info.file not in states:
            states[info.file] = load_torch_state_dict(info.file)
        return states[info.file][name]

    return WeightSource(label, folder, tensors, _config_near(folder), loader=load)


def _source_from_files(label: str, folder: Path, files: list[Path]) -> WeightSource:
    tensors: dict[str, TensorInfo] = {}
    for path in files:
        for name, info in read_safetensors_header(path).items():
            if name in tensors:
                raise InputError(
                    folder, f"tensor {name!r} is stored twice, in {tensors[name].file.name} and {path.name}"
                )
            tensors[name] = info
    return WeightSource(label, folder, tensors, _config_near(folder))


def open_folder(label: str, folder: Path, *, allow_pickle: bool) -> WeightSource | LoraAdapter:
    """A checkpoint or adapter folder (see the module docstring for the order tried)."""
    if (folder / ADAPTER_CONFIG).is_file():
        from analysis.adapters import LoraAdapter

        return LoraAdapter.from_peft_folder(folder, label=label, allow_pickle=allow_pickle)
    if (folder / "model.safetensors").is_file():
        return _source_from_files(label, folder, [folder / "model.safetensors"])
    if (folder / SAFETENSORS_INDEX).is_file():
        return _source_from_index(label, folder, folder / SAFETENSORS_INDEX, pickle_shards=False)
    safetensors_files = sorted(folder.glob("*.safetensors"))
    if len(safetensors_files) == 1 and _is_kohya_lora(list(read_safetensors_header(safetensors_files[0]))):
        from analysis.adapters import LoraAdapter

        return LoraAdapter.from_kohya_file(safetensors_files[0], label=label)
    if safetensors_files:
        return _source_from_files(label, folder, safetensors_files)
    if allow_pickle and (folder / PYTORCH_BIN).is_file():
        path = folder / PYTORCH_BIN
        state = load_torch_state_dict(path)
        tensors = {n: TensorInfo(path, tuple(t.shape), t.dtype) for n, t in state.items()}
        return WeightSource(label, folder, tensors, _config_near(folder), loader=lambda info, name: state[name])
    if allow_pickle and (folder / PYTORCH_BIN_INDEX).is_file():
        return _source_from_index(label, folder, folder / PYTORCH_BIN_INDEX, pickle_shards=True)
    if not any(folder.iterdir()):
        raise InputError(folder, "is an empty folder")
    if (folder / PYTORCH_BIN).is_file() or (folder / PYTORCH_BIN_INDEX).is_file():
        raise InputError(
            label, "has only pytorch_model.bin weights, which are read only from local folders, never from the hub"
        )
    raise InputError(folder, "holds no model weights (no *.safetensors files, no pytorch_model.bin)")


def open_file(label: str, path: Path) -> WeightSource | LoraAdapter:
    """A single ``.safetensors`` file: a kohya LoRA if its keys say so, else a checkpoint."""
    if path.suffix != ".safetensors":
        raise InputError(
            path, "is not a model: expected a .safetensors file, a model or adapter folder, or a hub model id"
        )
    tensors = read_safetensors_header(path)
    names = list(tensors)
    if _is_kohya_lora(names):
        from analysis.adapters import LoraAdapter

        return LoraAdapter.from_kohya_file(path, label=label)
    if _is_peft_weights(names):
        raise InputError(
            path, "holds PEFT LoRA factors; give the adapter folder that also holds adapter_config.json instead"
        )
    return WeightSource(label, path, tensors, _config_near(path.parent))


# A hub id: "name" or "org/name", optionally "@revision" (huggingface_hub validates the rest).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?(@[\w.\-/]+)?$")


def _looks_like_path(spec: str) -> bool:
    return (
        spec.startswith(("/", "~", "./", "../", "\\"))
        or spec in (".", "..")
        or "\\" in spec
        or bool(re.match(r"^[A-Za-z]:", spec))
        or spec.endswith((".safetensors", ".bin", ".json", ".pt", ".pth"))
        or spec.count("/") > 1
    )


def _hub_error(spec: str, error: Exception) -> InputError:
    """Translate a huggingface_hub failure into one sentence a user can act on."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if type(error).__name__ == "IncompleteSnapshotError":
        return InputError(spec, "is only partly in the local hub cache and the hub cannot be reached to complete it")
    if isinstance(error, GatedRepoError):
        return InputError(
            spec, "is a gated model on the Hugging Face hub: accept its terms there and log in (HF_TOKEN)"
        )
    if isinstance(error, RepositoryNotFoundError):
        return InputError(spec, "no such model on the Hugging Face hub (or it is private and no token was given)")
    if isinstance(error, RevisionNotFoundError):
        return InputError(spec, "the model exists on the Hugging Face hub but that revision does not")
    if isinstance(error, HFValidationError):
        return InputError(spec, "is neither an existing local path nor a valid hub model id")
    if isinstance(error, LocalEntryNotFoundError):
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return InputError(spec, "is not in the local hub cache and the hub is offline (HF_HUB_OFFLINE=1)")
        return InputError(spec, "could not be downloaded: the hub is unreachable and the model is not cached")
    return InputError(spec, f"could not be fetched from the Hugging Face hub ({type(error).__name__}: {error})")


def hub_allow_patterns(repo_files: list[str] | None) -> list[str]:
    """What to download from a hub repo: its JSON files and the one set of weights used.

    Many repos hold the same weights twice (``model.safetensors`` and a
    ``consolidated.safetensors``, or per-format subfolders); when the file list is known,
    only the files :func:`open_folder` will read are fetched. Without it (offline),
    :data:`HUB_PATTERNS`.
    """
    files = set(repo_files or ())
    if ADAPTER_CONFIG in files and "adapter_model.safetensors" in files:
        return ["*.json", "adapter_model.safetensors"]
    if "model.safetensors" in files:
        return ["*.json", "model.safetensors"]
    if SAFETENSORS_INDEX in files:
        return ["*.json", "model-*.safetensors"]
    return list(HUB_PATTERNS)


def _list_hub_files(repo_id: str, revision: str | None) -> list[str] | None:
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        return None
    try:
        return HfApi().list_repo_files(repo_id, revision=revision)
    except Exception:  # any failure is reported by snapshot_download below, with its own error
        return None


def _download_hub(spec: str) -> Path:
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    repo_id, _, revision = spec.partition("@")
    patterns = hub_allow_patterns(_list_hub_files(repo_id, revision or None))
    try:
        folder = huggingface_hub.snapshot_download(repo_id, revision=revision or None, allow_patterns=patterns)
    except (HfHubHTTPError, HFValidationError, LocalEntryNotFoundError, OSError, ValueError) as error:
        raise _hub_error(spec, error) from error
    return Path(folder)


def open_source(spec: str | os.PathLike, *, allow_local_paths: bool = True) -> WeightSource | LoraAdapter:
    """Open a base model, a fine-tune or an adapter for analysis.

    Parameters
    ----------
    spec:
        A local folder or ``.safetensors`` file, or a hub model id (``org/name`` or
        ``org/name@revision``). See the module docstring for the resolution order.
    allow_local_paths:
        ``False`` on hosted instances: any path-like spec is refused, and a spec that
        could be both (``org/name``) is always taken as a hub id.

    Returns
    -------
    WeightSource or LoraAdapter
        A :class:`LoraAdapter` for a PEFT adapter folder or a kohya LoRA file.

    Raises
    ------
    InputError
        Anything wrong with the spec or its files, named in the message.
    """
    label = os.fspath(spec)
    text = label.strip()
    if not text:
        raise InputError("(empty)", "no model given: expected a hub model id, a folder or a .safetensors file")
    if text.startswith("demo:"):  # the offline demo's models, named as in the dashboard
        from analysis.specs import SpecResolver

        return SpecResolver(allow_local_paths=True).open(text)
    if allow_local_paths:
        path = Path(text).expanduser()
        if path.is_dir():
            return open_folder(label, path, allow_pickle=True)
        if path.is_file():
            return open_file(label, path)
        if _looks_like_path(text):
            raise InputError(label, "no such file or folder")
    elif _looks_like_path(text):
        raise InputError(label, "local paths are disabled on this server; give a Hugging Face hub model id instead")
    if not _HUB_ID.match(text):
        raise InputError(label, "is neither an existing local path nor a valid hub model id")
    folder = _download_hub(text)
    if not any(folder.glob("*.safetensors")) and not (folder / ADAPTER_CONFIG).is_file():
        raise InputError(
            label, "has no .safetensors weights on the hub (pytorch_model.bin is not loaded from the hub, for safety)"
        )
    return open_folder(label, folder, allow_pickle=False)

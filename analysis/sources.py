"""Where weights come from: a hub id, a local folder or file, or a LoRA adapter.

:func:`open_location` turns a hub id or a local path into something that hands out one
tensor at a time (:class:`analysis.specs.SpecResolver`, the one door from any model name
to weights, calls it for names that are not ``demo:``, ``upload:`` or ``series:``).
Resolution order:

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

import os
import re
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from analysis.adapters import LoraAdapter, open_adapter_file, open_adapter_folder
from analysis.cache import derived_digest, tensor_digest
from analysis.errors import InputError
from analysis.quant import QuantTensor, dequantise_device, index_checkpoint
from analysis.readers import (
    ADAPTER_CONFIG,
    HUB_PATTERNS,
    PYTORCH_BIN,
    PYTORCH_BIN_INDEX,
    SAFETENSORS_INDEX,
    TensorInfo,
    load_safetensors_slice,
    load_safetensors_tensor,
    load_torch_state_dict,
    read_json,
    read_safetensors_header,
)


class WeightSource:
    """The tensors of one checkpoint, read lazily one at a time.

    Build it with :func:`open_location`. ``label`` is the spec as the user gave it (a hub
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
        self._stored = tensors
        self._sliced = loader is None  # safetensors files: one expert can be read alone
        self._loader = loader or (lambda info, name: load_safetensors_tensor(info.file, name))
        #: The quantised weights (:mod:`analysis.quant`): each listed under the name and
        #: shape a full-precision checkpoint uses, its stored parts hidden.
        self.quant = index_checkpoint(self.config, tensors)
        self._tensors = {n: info for n, info in tensors.items() if n not in self.quant.stored}
        for name, quantised in self.quant.tensors.items():
            first = tensors[next(iter(quantised.parts.values()))]
            self._tensors[name] = TensorInfo(first.file, quantised.shape, torch.float32)

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
        """The stored shape of tensor ``name``, from the file header."""
        return self._info(name).shape

    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype of tensor ``name``, from the file header."""
        return self._info(name).dtype

    def tensor_dtypes(self) -> dict[str, torch.dtype]:
        """Every stored tensor's dtype, by name, from the file headers (nothing is read).

        Quantised weights are counted by their stored parts (``fp8 e4m3`` codes, ``uint8``
        blocks and scales), as the files hold them.
        """
        return {name: info.dtype for name, info in self._stored.items()}

    def storage(self, name: str) -> str:
        """How tensor ``name`` is stored: ``bf16``, ``fp8 e4m3, 128x128 blocks``, ``mxfp4``, ``nf4``..."""
        return self.quant.label(name, self._info(name).dtype)

    def quantised_skips(self) -> list[dict]:
        """``{"name", "reason"}`` for each quantised weight no dequantiser here reads."""
        return list(self.quant.skipped)

    def stored_digest(self, name: str, stored: Callable[[Path, str, Callable[[], torch.Tensor]], str]) -> str:
        """The digest of tensor ``name`` from its stored bytes (a quantised weight: codes and scales).

        ``stored`` is an :data:`analysis.plan.StoredDigest`.
        """
        quantised = self.quant.tensors.get(name)
        if quantised is None:
            return stored(self.file(name), name, partial(self.load, name))
        parts = [
            f"{role}={stored(self._stored[part].file, part, partial(self.load_stored, part))}"
            for role, part in sorted(quantised.parts.items())
        ]
        return derived_digest("dequantised", quantised.method, quantised.label, *parts)

    def load_stored(self, name: str) -> torch.Tensor:
        """A stored tensor as the file holds it (a quantised weight's codes or scales too)."""
        return self._loader(self._stored[name], name)

    def file(self, name: str) -> Path:
        """The file the tensor is stored in (a shard for sharded checkpoints)."""
        return self._info(name).file

    def load(self, name: str) -> torch.Tensor:
        """The tensor ``name`` as stored (dtype and orientation unchanged)."""
        info = self._info(name)
        quantised = self.quant.tensors.get(name)
        if quantised is not None:
            tensor = self._dequantise(quantised, None)
        else:
            tensor = self._loader(info, name)
        if tuple(tensor.shape) != info.shape:
            problem = f"tensor {name!r} has shape {tuple(tensor.shape)}, its header says {info.shape}"
            raise InputError(info.file, problem)
        return tensor

    def load_slice(self, name: str, index: int) -> torch.Tensor:
        """``tensor[index]`` (one expert of a fused ``[E, ...]`` tensor), as stored.

        From a safetensors file only that slice is read.
        """
        info = self._info(name)
        if not 0 <= index < info.shape[0]:
            raise IndexError(f"{name!r} has {info.shape[0]} slices, not {index + 1}")
        quantised = self.quant.tensors.get(name)
        if quantised is not None:
            tensor = self._dequantise(quantised, index)
        elif self._sliced:
            tensor = load_safetensors_slice(info.file, name, index)
        else:
            tensor = self._loader(info, name)[index]
        if tuple(tensor.shape) != info.shape[1:]:
            problem = (
                f"slice {index} of tensor {name!r} has shape {tuple(tensor.shape)}, its header says {info.shape[1:]}"
            )
            raise InputError(info.file, problem)
        return tensor

    def _dequantise(self, quantised: QuantTensor, index: int | None) -> torch.Tensor:
        """One quantised weight (or expert ``index`` of it) as float32 on the CPU, from its stored parts.

        Dequantised on a CUDA GPU where there is one (:func:`analysis.quant.dequantise_device`).

        Where the weight has no expert dimension (``sliced`` is empty), an expert is cut from
        the whole dequantised tensor.
        """
        parts = {}
        for role, part in quantised.parts.items():
            if index is not None and role in quantised.sliced:
                parts[role] = (
                    load_safetensors_slice(self._stored[part].file, part, index)
                    if self._sliced
                    else self.load_stored(part)[index]
                )
            else:
                parts[role] = self.load_stored(part)
        device = dequantise_device(quantised)
        if device.type != "cpu":
            parts = {role: tensor.to(device) for role, tensor in parts.items()}
        try:
            tensor = quantised.dequantise(parts, index if quantised.sliced else None)
        except (RuntimeError, ValueError, KeyError, AssertionError) as error:
            problem = f"quantised weight {quantised.name!r} ({quantised.label}) cannot be dequantised: {error}"
            raise InputError(self._info(quantised.name).file, problem) from error
        if index is not None and not quantised.sliced:
            tensor = tensor[index]
        return tensor.to(device="cpu", dtype=torch.float32)

    def content_digest(self, name: str) -> str:
        """:func:`analysis.cache.tensor_digest` of the stored tensor: equal digests, equal tensors.

        The digest is BLAKE3 of its dtype, shape and bytes.
        """
        return tensor_digest(self.load(name))


def _config_near(folder: Path) -> dict:
    config = folder / "config.json"
    return read_json(config) if config.is_file() else {}


def _source_from_index(label: str, folder: Path, index_path: Path, *, pickle_shards: bool) -> WeightSource:
    """A sharded checkpoint: ``weight_map`` in the index names the shard of each tensor."""
    index = read_json(index_path)
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
    adapter = open_adapter_folder(label, folder, allow_pickle)
    if adapter is not None:
        return adapter
    if (folder / "model.safetensors").is_file():
        return _source_from_files(label, folder, [folder / "model.safetensors"])
    if (folder / SAFETENSORS_INDEX).is_file():
        return _source_from_index(label, folder, folder / SAFETENSORS_INDEX, pickle_shards=False)
    safetensors_files = sorted(folder.glob("*.safetensors"))
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

    adapter = open_adapter_file(label, path, names)
    if adapter is not None:
        return adapter
    return WeightSource(label, path, tensors, _config_near(path.parent))


def local_path(spec: str, allow_local_paths: bool) -> Path | None:
    """The existing file or folder ``spec`` names on this server, or ``None``.

    Nothing touches the file system when local paths are off (no ``~user`` expansion,
    no existence check); a spec no file system call can take (``~nosuchuser``, a name
    over 255 characters, a NUL byte) names nothing.
    """
    if not allow_local_paths:
        return None
    try:
        path = Path(spec).expanduser()
        return path if path.exists() else None
    except (OSError, RuntimeError, ValueError):  # no such user, name too long, NUL byte
        return None


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
    if revision and any(part in ("", ".", "..") for part in revision.split("/")):
        raise InputError(spec, f"{revision!r} is not a revision (a branch, tag or commit hash)")
    patterns = hub_allow_patterns(_list_hub_files(repo_id, revision or None))
    try:
        folder = huggingface_hub.snapshot_download(repo_id, revision=revision or None, allow_patterns=patterns)
    except (HfHubHTTPError, HFValidationError, LocalEntryNotFoundError, OSError, ValueError) as error:
        raise _hub_error(spec, error) from error
    return Path(folder)


def open_location(spec: str | os.PathLike, *, allow_local_paths: bool = True) -> WeightSource | LoraAdapter:
    """Open a hub model or a local folder or file (base, fine-tune or adapter) for analysis.

    Parameters
    ----------
    spec : str or os.PathLike
        A local folder or ``.safetensors`` file, or a hub model id (``org/name`` or
        ``org/name@revision``), already checked by :func:`analysis.specs.check_spec`.
        See the module docstring for the resolution order.
    allow_local_paths : bool, default True
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
    if allow_local_paths:
        path = local_path(text, allow_local_paths)
        if path is not None and path.is_dir():
            return open_folder(label, path, allow_pickle=True)
        if path is not None:
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

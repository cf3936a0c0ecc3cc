"""PEFT LoRA adapters.

``adapter_config.json`` + ``adapter_model.safetensors`` (or a weights-only
``adapter_model.bin``), keys ``base_model.model.<module>.lora_A.weight`` ... (see
:mod:`analysis.adapters.base` for the merge rules).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from analysis.adapters.base import AdapterModule, LoraAdapter, LoraSettings, lora_scale
from analysis.errors import InputError
from analysis.readers import ADAPTER_CONFIG, TensorInfo, load_torch_state_dict, read_safetensors_header

PEFT_PREFIX = "base_model.model."

_PEFT_FACTOR = re.compile(
    r"^(?P<module>.+?)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"(?:\.[A-Za-z_][\w-]*)?(?:\.weight)?$"
)


def open_peft_folder(folder: Path, *, label: str | None = None, allow_pickle: bool = True) -> LoraAdapter:
    """A PEFT adapter folder: ``adapter_config.json`` + ``adapter_model.safetensors`` (or ``.bin``)."""
    label = label or str(folder)
    settings = LoraSettings.from_adapter_config(folder / ADAPTER_CONFIG)
    weights = folder / "adapter_model.safetensors"
    state = None
    if weights.is_file():
        tensors = read_safetensors_header(weights)
    elif (folder / "adapter_model.bin").is_file():
        if not allow_pickle:
            raise InputError(
                label, "has only adapter_model.bin, which is read only from local folders, never from the hub"
            )
        weights = folder / "adapter_model.bin"
        state = load_torch_state_dict(weights)
        tensors = {k: TensorInfo(weights, tuple(t.shape), t.dtype) for k, t in state.items()}
    else:
        raise InputError(folder, "has adapter_config.json but no adapter_model.safetensors (or adapter_model.bin)")
    modules, ignored = _peft_modules(weights, settings, tensors)
    return LoraAdapter(label, folder, settings, modules, tensors, format="peft", state=state, ignored=ignored)


def _peft_modules(
    weights: Path, settings: LoraSettings, tensors: Mapping[str, TensorInfo]
) -> tuple[dict[str, AdapterModule], list[str]]:
    """Group a PEFT state dict's keys by module and attach each module's rank and scale."""
    parts: dict[str, dict[str, str]] = {}
    replacements: dict[str, str] = {}
    ignored: list[str] = []
    for key in tensors:
        name = key.removeprefix(PEFT_PREFIX)
        match = _PEFT_FACTOR.match(name)
        if match and not name.endswith(".bias"):
            parts.setdefault(match["module"], {})[match["kind"]] = key
        elif name.endswith(".bias"):
            ignored.append(key)
        elif name.endswith(".weight"):
            module = name.removesuffix(".weight")
            module = module.replace(".modules_to_save.default", "").removesuffix(".base_layer")
            module = re.sub(r"\.modules_to_save\.[\w-]+$", "", module)
            replacements[module] = key
        else:
            ignored.append(key)
    modules: dict[str, AdapterModule] = {}
    for module, kinds in sorted(parts.items()):
        embedding = "lora_embedding_A" in kinds or "lora_embedding_B" in kinds
        a_key = kinds.get("lora_embedding_A" if embedding else "lora_A")
        b_key = kinds.get("lora_embedding_B" if embedding else "lora_B")
        if a_key is None or b_key is None:
            missing = ("lora_embedding_" if embedding else "lora_") + ("A" if a_key is None else "B")
            raise InputError(weights, f"module {module!r} has no {missing} weight")
        a_shape, b_shape = tensors[a_key].shape, tensors[b_key].shape
        if len(a_shape) != 2 or len(b_shape) != 2:
            raise InputError(
                weights,
                f"module {module!r} has {len(a_shape)}-D factors (a convolution LoRA); only Linear and Embedding "
                "layers are supported",
            )
        rank = a_shape[0]
        if b_shape[1] != rank:
            raise InputError(weights, f"module {module!r}: lora_B is {b_shape} but lora_A is {a_shape}, ranks differ")
        r, alpha = settings.rank_and_alpha(module)
        if settings.target_parameters and (module.endswith(".base_layer") or r != rank):
            # A ParamWrapper: which parameter, how many experts and its r are known only
            # with the base model (pairing.resolve_param_wrapper); PEFT nests one wrapper
            # per parameter of a module, the first registered parameter innermost.
            modules[module] = AdapterModule(module, A=a_key, B=b_key, rank=rank, param_wrapper=True)
            continue
        if r != rank:
            raise InputError(
                weights,
                f"module {module!r} has rank {rank} factors but adapter_config.json gives it r={r}; "
                "the config does not belong to these weights",
            )
        magnitude = kinds.get("lora_magnitude_vector")
        if settings.use_dora and magnitude is None:
            raise InputError(weights, f"use_dora is set but module {module!r} has no lora_magnitude_vector")
        modules[module] = AdapterModule(
            module,
            layer_type="embedding" if embedding else "linear",
            A=a_key,
            B=b_key,
            rank=rank,
            scale=lora_scale(alpha, r, settings.use_rslora),
            magnitude=magnitude,
            replacement=replacements.pop(module, None),
        )
    for module, key in sorted(replacements.items()):
        modules[module] = AdapterModule(module, replacement=key)
    if not modules:
        raise InputError(weights, "holds no LoRA factors (no lora_A/lora_B weights)")
    return modules, ignored


def open_folder(label: str, folder: Path, allow_pickle: bool) -> LoraAdapter | None:
    """A PEFT adapter folder: it holds ``adapter_config.json``."""
    if not (folder / ADAPTER_CONFIG).is_file():
        return None
    return open_peft_folder(folder, label=label, allow_pickle=allow_pickle)


def open_file(label: str, path: Path, names: list[str]) -> LoraAdapter | None:
    """PEFT factors alone cannot be applied: the config beside them is needed."""
    if any(".lora_A." in n or ".lora_B." in n or n.endswith((".lora_A.weight", ".lora_B.weight")) for n in names):
        raise InputError(
            path, "holds PEFT LoRA factors; give the adapter folder that also holds adapter_config.json instead"
        )
    return None

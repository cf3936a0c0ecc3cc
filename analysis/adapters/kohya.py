"""kohya/sd-scripts LoRA files (``networks/lora.py``).

Per module: ``<name>.lora_down.weight``, ``<name>.lora_up.weight`` and an optional scalar
``<name>.alpha``; ``W' = W + alpha / r * up @ down``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

from analysis.adapters.base import AdapterModule, LoraAdapter, LoraSettings, lora_scale
from analysis.errors import InputError
from analysis.readers import load_safetensors_tensor, read_safetensors_header

KOHYA_PREFIXES = ("lora_te1_", "lora_te2_", "lora_te3_", "lora_te_", "lora_unet_", "lora_transformer_", "lora_")


def open_kohya_file(path: Path, *, label: str | None = None) -> LoraAdapter:
    """A kohya/sd-scripts LoRA ``.safetensors``, opened as a :class:`LoraAdapter`.

    Per module: ``<name>.lora_down.weight``, ``<name>.lora_up.weight`` and an optional
    scalar ``<name>.alpha``.
    """
    label = label or str(path)
    tensors = read_safetensors_header(path)
    modules: dict[str, AdapterModule] = {}
    alphas: dict[str, float] = {}
    groups: dict[str, dict[str, str]] = {}
    ignored: list[str] = []
    for key in tensors:
        for suffix, part in ((".lora_down.weight", "down"), (".lora_up.weight", "up"), (".alpha", "alpha")):
            if key.endswith(suffix):
                groups.setdefault(key.removesuffix(suffix), {})[part] = key
                break
        else:
            ignored.append(key)
    for name, parts in sorted(groups.items()):
        if "down" not in parts or "up" not in parts:
            missing = "lora_up" if "up" not in parts else "lora_down"
            raise InputError(path, f"module {name!r} has no {missing} weight")
        down, up = tensors[parts["down"]].shape, tensors[parts["up"]].shape
        if len(down) != 2 or len(up) != 2:
            raise InputError(
                path,
                f"module {name!r} has {len(down)}-D factors (a convolution LoRA); only Linear layers are supported",
            )
        rank = down[0]
        if up[1] != rank:
            raise InputError(path, f"module {name!r}: lora_up is {up} but lora_down is {down}, their ranks differ")
        alpha = _kohya_alpha(path, name, parts["alpha"]) if "alpha" in parts else rank
        module = _strip_kohya_prefix(name)
        alphas[module] = alpha
        modules[module] = AdapterModule(
            module, A=parts["down"], B=parts["up"], rank=rank, scale=lora_scale(alpha, rank, use_rslora=False)
        )
    if not modules:
        raise InputError(path, "holds no lora_down/lora_up pairs")
    ranks = sorted({m.rank for m in modules.values() if m.rank})
    settings = LoraSettings(
        peft_type="LORA (kohya)",
        r=ranks[0],
        lora_alpha=alphas[min(alphas)],
        target_modules=sorted({m.rsplit("_", 1)[-1] for m in modules}),
        rank_pattern={m.module: m.rank for m in modules.values() if m.rank != ranks[0]},
        alpha_pattern={m: a for m, a in alphas.items() if a != alphas[min(alphas)]},
    )
    return LoraAdapter(label, path, settings, modules, tensors, format="kohya", ignored=ignored, naming=match_kohya)


def _strip_kohya_prefix(name: str) -> str:
    for prefix in KOHYA_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def is_kohya_lora(names: list[str]) -> bool:
    """Whether tensor ``names`` (a file's header) hold kohya ``lora_down``/``lora_up`` weights."""
    return any(n.endswith((".lora_down.weight", ".lora_up.weight")) for n in names)


def open_folder(label: str, folder: Path, allow_pickle: bool) -> LoraAdapter | None:
    """A folder whose only ``.safetensors`` file is a kohya LoRA (and no checkpoint)."""
    if (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file():
        return None
    files = sorted(folder.glob("*.safetensors"))
    if len(files) == 1 and is_kohya_lora(list(read_safetensors_header(files[0]))):
        return open_kohya_file(files[0], label=label)
    return None


def open_file(label: str, path: Path, names: list[str]) -> LoraAdapter | None:
    """A ``.safetensors`` file whose tensor ``names`` are a kohya LoRA, else ``None``."""
    return open_kohya_file(path, label=label) if is_kohya_lora(names) else None


def match_kohya(base_names: list[str], kohya_modules: Iterable[str]) -> dict[str, str]:
    """Map base tensor names to kohya module names (``.`` -> ``_``, suffix match)."""
    by_underscored: dict[str, list[str]] = {}
    for name in base_names:
        by_underscored.setdefault(name.removesuffix(".weight").replace(".", "_"), []).append(name)
    matches: dict[str, str] = {}
    for module in kohya_modules:
        found = by_underscored.get(module) or [
            name
            for key, names in by_underscored.items()
            for name in names
            if key.endswith("_" + module) or module.endswith("_" + key)
        ]
        if len(found) == 1 and found[0].endswith(".weight"):
            matches[found[0]] = module
    return matches


def _kohya_alpha(path: Path, module: str, key: str) -> float:
    """A kohya module's ``.alpha``: one finite number, else an :class:`InputError`."""
    tensor = load_safetensors_tensor(path, key)
    if tensor.numel() != 1:
        raise InputError(path, f"module {module!r} has an alpha of {tensor.numel()} values; kohya stores one number")
    value = float(tensor.float().item())
    if not math.isfinite(value):
        raise InputError(path, f"module {module!r} has an alpha of {value}")
    return value

"""kohya/sd-scripts LoRA files (``networks/lora.py``): ``<name>.lora_down.weight``,
``<name>.lora_up.weight`` and an optional scalar ``<name>.alpha`` per module;
``W' = W + alpha / r * up @ down``."""

from __future__ import annotations

from pathlib import Path

from analysis.adapters.base import AdapterModule, LoraAdapter, LoraSettings, lora_scale
from analysis.errors import InputError
from analysis.readers import load_safetensors_tensor, read_safetensors_header

KOHYA_PREFIXES = ("lora_te1_", "lora_te2_", "lora_te3_", "lora_te_", "lora_unet_", "lora_transformer_", "lora_")


def open_kohya_file(path: Path, *, label: str | None = None) -> LoraAdapter:
    """A kohya/sd-scripts LoRA ``.safetensors``: ``<name>.lora_down.weight``,
    ``<name>.lora_up.weight`` and optional scalar ``<name>.alpha`` per module."""
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
        alpha = float(load_safetensors_tensor(path, parts["alpha"]).float().item()) if "alpha" in parts else rank
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
    return LoraAdapter(label, path, settings, modules, tensors, format="kohya", ignored=ignored)


def _strip_kohya_prefix(name: str) -> str:
    for prefix in KOHYA_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name

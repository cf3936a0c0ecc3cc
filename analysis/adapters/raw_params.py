"""LoRA on raw parameters (PEFT's ``target_parameters``, ``ParamWrapper``).

Fused MoE expert tensors and other bare ``nn.Parameter`` weights.
"""

from __future__ import annotations

from collections.abc import Iterable

from analysis.adapters.base import AdapterModule, LoraAdapter, lora_scale
from analysis.errors import InputError
from analysis.layouts import ModelLayout


def _strip_base_layer(module: str) -> tuple[str, int]:
    depth = 0
    while module.endswith(".base_layer"):
        module, depth = module.removesuffix(".base_layer"), depth + 1
    return module, depth


def _targeted(key: str, targets: Iterable[str]) -> bool:
    """PEFT's rule for ``target_parameters`` (``BaseTuner._inject_parameters``)."""
    return any(key == t or key.endswith(f".{t}") for t in targets)


def resolve_param_wrapper(
    adapter: LoraAdapter, module: AdapterModule, layout: ModelLayout
) -> tuple[str, int, float] | None:
    """Which raw parameter a PEFT ``ParamWrapper`` adapts: ``(memory name, experts, scale)``.

    PEFT wraps the targeted parameters of one module in nested wrappers, the first
    registered parameter innermost (``...experts.base_layer`` adapts ``gate_up_proj``,
    ``...experts`` ``down_proj``); the factor shapes must fit: ``lora_A`` is
    ``(r * E) x in`` and ``lora_B`` ``out x (r * E)``. ``None``: no parameter fits.
    """
    path, depth = _strip_base_layer(module.module)
    targets = adapter.settings.target_parameters or []
    params = [p for p in layout.memory_params(path) if _targeted(p, targets)]
    (b_out, b_rank), (a_rank, a_in) = adapter.factor_shapes(module)
    order = [params[len(params) - 1 - depth]] if depth < len(params) else []
    for param in order + [p for p in params if p not in order]:
        shape = layout.memory_shape(param) or ()
        if len(shape) == 3:
            experts = shape[0]
            out_dim, in_dim = (shape[2], shape[1]) if layout.experts_transposed(param) else (shape[1], shape[2])
        elif len(shape) == 2:
            experts, (out_dim, in_dim) = 1, shape
        else:
            continue
        if (out_dim, in_dim) != (b_out, a_in) or a_rank != b_rank or a_rank % experts:
            continue
        r, alpha = adapter.settings.rank_and_alpha(param)
        if r * experts != a_rank:
            raise InputError(
                adapter.label,
                f"{module.module} adapts {param} with rank {a_rank // experts} per expert but adapter_config.json "
                f"gives it r={r}; the config does not belong to these weights",
            )
        return param, experts, lora_scale(alpha, r, adapter.settings.use_rslora)
    return None

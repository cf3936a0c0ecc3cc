"""LoRA on raw parameters (PEFT's ``target_parameters``, ``ParamWrapper``): fused MoE
expert tensors and other bare ``nn.Parameter`` weights."""

from __future__ import annotations

import torch

from analysis.adapters.base import merge_lora
from analysis.plan import TunedMatrix


def merge_param_lora(
    base: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float,
    expert: int,
    experts: int,
    rows: tuple[int, int] | None = None,
) -> TunedMatrix:
    """One expert of a LoRA on a raw parameter merged as PEFT's ``merge_and_unload()`` does.

    PEFT 0.21's ``ParamWrapper`` (``peft/tuners/lora/layer.py``: ``update_layer``,
    ``get_delta_weight``) keeps one ``lora_A`` of ``(r * E) x in`` and one ``lora_B`` of
    ``out x (r * E)`` for a parameter of ``E`` experts; expert ``e``'s update is
    ``scale * B_e @ A_e`` in the ``out x in`` orientation of the forward pass, with
    ``A_e = A.reshape(E, r, in)[e]`` (rows ``e*r .. e*r+r-1``) and
    ``B_e = B.reshape(out, r, E)[:, :, e]`` (columns ``e, e+E, e+2E, ...``); PEFT's
    einsum writes it to ``[E, out, in]`` or, for ``is_transposed`` experts, ``[E, in, out]``.
    A 2-D parameter is ``E = 1``: plain LoRA. ``rows`` selects the rows of the update
    that belong to ``base`` when the base stores the expert split (Mixtral's ``w1``/``w3``
    concatenated into ``gate_up_proj`` by transformers' conversion mapping).

    ``base`` is the float32 ``out x in`` weight (or its ``rows``).
    """
    rank = A.shape[0] // experts
    A_e = A.reshape(experts, rank, A.shape[-1])[expert]
    B_e = B.reshape(B.shape[0], rank, experts)[:, :, expert]
    if rows is not None:
        B_e = B_e[rows[0] : rows[1]]
    return merge_lora(base, B_e.contiguous(), A_e.contiguous(), scale)

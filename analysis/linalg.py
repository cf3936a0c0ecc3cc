"""Linear algebra on the best available device.

Thin SVDs (``full_matrices=False``), singular values in descending order, computed in
float32 or better (DESIGN.md). Callers pass float32 ``out x in`` CPU tensors; results
come back on the device they were computed on so follow-up products stay there.
"""

from __future__ import annotations

import torch

from analysis.errors import InputError
from analysis.plan import LowRankDelta


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> CUDA when present, else CPU. Asking for CUDA without one is an error."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device", f"{device!r} was requested but CUDA is not available on this machine")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise InputError("--device", f"unknown device {device!r}; use auto, cpu or cuda")
    return torch.device(device)


def thin_svd(weight: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``U, S, V`` with ``weight = U diag(S) V^T`` (thin, descending, float32 or better).

    ``V`` is returned un-transposed (``in x r``) so that ``U`` and ``V`` read alike.
    """
    w = weight.to(device=device)
    if w.dtype not in (torch.float32, torch.float64):
        w = w.float()
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    return U, S, Vh.transpose(0, 1)


def low_rank_svd(delta: LowRankDelta, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact thin SVD of ``dW = scale * B @ A`` from its factors, no dense product.

    With ``B = Q_b R_b`` and ``A^T = Q_a R_a`` (reduced QR),
    ``dW = Q_b (scale R_b R_a^T) Q_a^T``; the SVD ``U_m S V_m^T`` of the small
    ``r x r`` core gives ``dW = (Q_b U_m) S (Q_a V_m)^T``. Cost ``O((out + in) r^2)``
    instead of ``O(out * in * min(out, in))``.
    """
    B = delta.B.to(device=device, dtype=torch.float32)
    A = delta.A.to(device=device, dtype=torch.float32)
    Qb, Rb = torch.linalg.qr(B, mode="reduced")
    Qa, Ra = torch.linalg.qr(A.transpose(0, 1), mode="reduced")
    Um, S, Vmh = torch.linalg.svd(delta.scale * (Rb @ Ra.transpose(0, 1)), full_matrices=False)
    return Qb @ Um, S, Qa @ Vmh.transpose(0, 1)

"""Test matrices with a trained-like spectrum and their float64 reference decomposition,
shared by the CPU (``tests/test_eig_path.py``) and CUDA (``tests/test_cuda.py``) checks."""

from __future__ import annotations

import numpy as np
import torch


def trained_like(m: int, n: int, seed: int) -> torch.Tensor:
    """Power-law spikes plus a Gaussian bulk (as in benchmarks/workloads.py), float32."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n) // 4
    s = 30 * torch.arange(1, k + 1, dtype=torch.float64) ** -0.6
    left = torch.randn(m, k, generator=g, dtype=torch.float64) * s / m**0.5
    right = torch.randn(n, k, generator=g, dtype=torch.float64) / n**0.5
    bulk = torch.randn(m, n, generator=g, dtype=torch.float64) * 2 / (m**0.5 + n**0.5)
    return (left @ right.T + bulk).float()


def reference(w: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(U, S, V)`` of ``w`` by NumPy's float64 SVD (on the host, whatever ``w``'s device)."""
    u, s, vt = np.linalg.svd(w.double().cpu().numpy(), full_matrices=False)
    return u, s, vt.T


def trained_pair(m: int, n: int, adapter: bool, seed: int = 3):
    """``(base, tuned, adapter rank)``: a trained-like base and either a rank-4 adapter as
    large as the base's top singular value or a small full-rank update (a full fine-tune).
    Other seeds give other pairs of the same shape."""
    from analysis.plan import LowRankDelta, TunedMatrix

    base = trained_like(m, n, seed=seed)
    if not adapter:
        return base, TunedMatrix(base + 0.05 * trained_like(m, n, seed=seed + 2)), None
    g = torch.Generator().manual_seed(seed + 1)
    s1 = float(torch.linalg.matrix_norm(base.double(), ord=2))
    delta = LowRankDelta(torch.randn(m, 4, generator=g) * s1 / m**0.5, torch.randn(4, n, generator=g) / n**0.5, 1.0)
    return base, TunedMatrix(base + delta.dense(), delta), 4

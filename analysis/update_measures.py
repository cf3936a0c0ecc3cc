"""The RL-versus-SFT measures of one matrix pair, computed while its weights are loaded.

:mod:`analysis.measures` holds the formulas. This module computes, per pair, what needs
the weights or vectors the pair's cache entry does not keep -- both unchanged counts, the
principal-mask overlap, the principal angles of the top-k left and right singular
subspaces -- and stores it as its own cache entry (kind ``measures``), keyed by both
weights' digests, the measure settings and :data:`MEASURES_VERSION`. The pair entry and
the base's cached spectrum are untouched, so a cache from before these measures keeps
every entry hit; only the new entry is computed. The base's top-k vectors (float64, both
sides) are an entry of their own (kind ``base-top``), shared by every fine-tune of that base.

The spectral measures (spectral shift, numerical rank, intruder energy share) follow from
stored singular values and are derived when a result is read
(:class:`analysis.measures.RlMeasures`).
"""

from __future__ import annotations

import numpy as np
import torch

from analysis import measures
from analysis.cache import Entry, SpectrumCache
from analysis.linalg import Spectrum, decompose

#: Version of what the ``measures`` and ``base-top`` entries hold (part of their keys).
MEASURES_VERSION = "1"


def measures_key(base_digest: str, tuned_digest: str, signature: str) -> str:
    """The ``measures`` entry of a pair."""
    return SpectrumCache.key("measures", MEASURES_VERSION, base_digest, tuned_digest, signature)


def base_top_key(base_digest: str, k: int, side: str) -> str:
    """The ``base-top`` entry of a base matrix (its top-k singular triplets, float64)."""
    return SpectrumCache.key("base-top", MEASURES_VERSION, base_digest, f"k={k}", f"side={side}")


def top_triplets(weight: torch.Tensor, spectrum: Spectrum, k: int) -> dict[str, torch.Tensor]:
    """``U_k``, ``s_k``, ``V_k`` in float64, re-orthonormalised.

    The spectrum's own side (:attr:`~analysis.linalg.Spectrum.native_side`) as computed;
    the other side from it in float64 (``V_k = W^T U_k / s_k`` or ``U_k = W V_k / s_k``),
    not the spectrum's float32 derivation: the angles of an RL update are below a degree.
    """
    k = min(k, spectrum.rank_bound)
    values = spectrum.values[:k].to("cpu", torch.float64)
    w = weight.detach().to("cpu", torch.float64)
    safe = torch.where(values > 0, values, torch.ones_like(values))
    if spectrum.native_side == "left":
        left = _orthonormal(spectrum.left(k).to("cpu", torch.float64))
        right = _orthonormal((w.transpose(0, 1) @ left) / safe)
    else:
        right = _orthonormal(spectrum.right(k).to("cpu", torch.float64))
        left = _orthonormal((w @ right) / safe)
    return {"U": left.contiguous(), "S": values.contiguous(), "V": right.contiguous()}


def _orthonormal(columns: torch.Tensor) -> torch.Tensor:
    """``columns`` made exactly orthonormal by QR, each keeping its sign (``diag(R) > 0``).

    The signs matter: ``U_k S_k V_k^T`` (the principal mask) pairs each left vector with its
    right one.
    """
    q, r = torch.linalg.qr(columns)
    return q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(q.dtype)


def base_triplets(
    base: torch.Tensor, k: int, device: torch.device, cache: SpectrumCache | None, key: str | None
) -> dict[str, torch.Tensor]:
    """The base's top-k triplets: the cached ``base-top`` entry, or computed (top vectors only) and stored."""
    if cache is not None and key is not None:
        entry = cache.lookup("base-top", key)
        if entry is not None:
            return entry[0]
    found = top_triplets(base, decompose(base, device, top=k), k)
    if cache is not None and key is not None:
        cache.store("base-top", key, found)
    return found


def compute(
    base: torch.Tensor,
    tuned: torch.Tensor,
    tuned_spectrum: Spectrum | None,
    settings,
    device: torch.device,
    cache: SpectrumCache | None,
    base_key: str | None,
) -> Entry:
    """The ``measures`` entry of one pair from its loaded weights (``settings``: an ``AnalysisSettings``).

    ``tuned_spectrum``: the tuned weight's spectrum if already computed (its top vectors are
    reused), else the top ``k`` are computed here. ``base`` and ``tuned`` are oriented as the
    pair's analysis is (``settings.side == "right"`` transposes both, swapping the sides back).
    """
    k = min(settings.principal_k, min(base.shape))
    b = base_triplets(base, k, device, cache, base_key)
    spectrum = tuned_spectrum if tuned_spectrum is not None else decompose(tuned, device, top=k)
    t = top_triplets(tuned, spectrum, k)
    left = measures.principal_angles(b["U"], t["U"])
    right = measures.principal_angles(b["V"], t["V"])
    if settings.side == "right":
        left, right = right, left
    mask = measures.principal_mask(b["U"], b["S"], b["V"], settings.mask_alpha)
    counts = measures.elementwise_counts(base.cpu(), tuned.cpu(), mask, settings.sparsity_eta, settings.sparsity_atol)
    tensors = {
        "counts": torch.tensor(
            [counts.total, counts.unchanged_relative, counts.unchanged_absolute, counts.mask_size, counts.mask_changed],
            dtype=torch.int64,
        ),
        "angles_left": torch.from_numpy(np.ascontiguousarray(left)),
        "angles_right": torch.from_numpy(np.ascontiguousarray(right)),
    }
    info = {"k": k, "alpha": settings.mask_alpha, "eta": settings.sparsity_eta, "atol": settings.sparsity_atol}
    return tensors, info


def from_entry(tensors: dict[str, torch.Tensor], info: dict) -> measures.RlMeasures:
    """An entry read back as :class:`RlMeasures`."""
    total, relative, absolute, mask_size, mask_changed = (int(x) for x in tensors["counts"].tolist())
    return measures.RlMeasures(
        counts=measures.ElementCounts(total, relative, absolute, mask_size, mask_changed),
        angles_left=tensors["angles_left"].numpy().astype(np.float64),
        angles_right=tensors["angles_right"].numpy().astype(np.float64),
        k=int(info["k"]),
        alpha=float(info["alpha"]),
        eta=float(info["eta"]),
        atol=float(info["atol"]),
    )

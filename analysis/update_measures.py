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

from dataclasses import dataclass

import numpy as np
import torch

from analysis import measures
from analysis.cache import Entry, SpectrumCache
from analysis.linalg import Spectrum, decompose

#: Version of what the ``measures`` entries hold (part of their keys). 2: the absolute rule
#: compares in bf16, as Mukherjee et al.'s code does (:func:`analysis.measures.unchanged_absolute`).
MEASURES_VERSION = "2"
#: Version of what the ``base-top`` entries hold (part of their keys; unchanged by version 2 of the measures).
BASE_TOP_VERSION = "1"


def measures_key(base_digest: str, tuned_digest: str, signature: str) -> str:
    """The ``measures`` entry of a pair."""
    return SpectrumCache.key("measures", MEASURES_VERSION, base_digest, tuned_digest, signature)


def base_top_key(base_digest: str, k: int, side: str) -> str:
    """The ``base-top`` entry of a base matrix (its top-k singular triplets, float64)."""
    return SpectrumCache.key("base-top", BASE_TOP_VERSION, base_digest, f"k={k}", f"side={side}")


def top_triplets(weight: torch.Tensor, spectrum: Spectrum, k: int) -> dict[str, torch.Tensor]:
    """``U_k``, ``s_k``, ``V_k`` in float64, re-orthonormalised.

    The spectrum's own side (:attr:`~analysis.linalg.Spectrum.native_side`) as computed;
    the other side from it in float64 (``V_k = W^T U_k / s_k`` or ``U_k = W V_k / s_k``),
    not the spectrum's float32 derivation: the angles of an RL update are below a degree.
    Computed where ``weight`` is (a GPU's 7B-sized weight is not copied to the host and
    multiplied there in float64), returned on the CPU.
    """
    k = min(k, spectrum.rank_bound)
    device = weight.device
    values = spectrum.values[:k].to(device, torch.float64)
    w = weight.detach().to(torch.float64)
    safe = torch.where(values > 0, values, torch.ones_like(values))
    if spectrum.native_side == "left":
        left = _orthonormal(spectrum.left(k).to(device, torch.float64))
        right = _orthonormal((w.transpose(0, 1) @ left) / safe)
    else:
        right = _orthonormal(spectrum.right(k).to(device, torch.float64))
        left = _orthonormal((w @ right) / safe)
    return {name: t.to("cpu").contiguous() for name, t in (("U", left), ("S", values), ("V", right))}


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
    tuned = tuned.to(base.device)
    b = base_triplets(base, k, device, cache, base_key)
    spectrum = tuned_spectrum if tuned_spectrum is not None else decompose(tuned, device, top=k)
    t = top_triplets(tuned, spectrum, k)
    left = measures.principal_angles(b["U"], t["U"])
    right = measures.principal_angles(b["V"], t["V"])
    if settings.side == "right":
        left, right = right, left
    # The elementwise measures run where the weights are: copied to the host, a 7B-sized
    # pair's cost 3-5 s there on one thread (measured on the 2-core CPU), several times
    # what a GPU's decompositions of it are meant to take (benchmarks/run.py's targets).
    on = [b[name].to(base.device) for name in ("U", "S", "V")]
    mask = measures.principal_mask(*on, settings.mask_alpha)
    del on
    counts = measures.elementwise_counts(base, tuned, mask, settings.sparsity_eta, settings.sparsity_atol)
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


def to_entry(rl: measures.RlMeasures) -> Entry:
    """:class:`RlMeasures` as its ``measures`` entry (the inverse of :func:`from_entry`, byte for byte)."""
    c = rl.counts
    counts = [c.total, c.unchanged_relative, c.unchanged_absolute, c.mask_size, c.mask_changed]
    tensors = {
        "counts": torch.tensor(counts, dtype=torch.int64),
        "angles_left": torch.from_numpy(np.ascontiguousarray(rl.angles_left, dtype=np.float64)),
        "angles_right": torch.from_numpy(np.ascontiguousarray(rl.angles_right, dtype=np.float64)),
    }
    return tensors, {"k": rl.k, "alpha": rl.alpha, "eta": rl.eta, "atol": rl.atol}


# -- one entry for a whole plan's measures ---------------------------------------------------------
#
# A fully cached run reads each pair's entry anyway; reading each pair's ``measures`` entry
# beside it doubled the files opened (each read costs the same ~0.3 ms, however small the entry:
# opening, checksum, bookkeeping), which made the cached report 1.5x slower with the measures
# than without. A plan's measures are therefore also kept together, as one ``measures-set``
# entry keyed by every pair's ``measures`` key in plan order, written when a plan finishes
# and read before it starts. The per-pair entries stay (a plan that changes in one matrix
# reuses the others').


class _Unknown(Exception):
    """A stored tensor whose digest the fingerprint index does not hold yet."""


@dataclass(frozen=True)
class KnownMeasures:
    """What :func:`read_set` found of a plan before it runs, per matrix in plan order."""

    #: Each matrix's ``(base, tuned)`` digests (the pipeline takes them instead of asking again).
    digests: list[tuple[str, str]]
    #: Each matrix's ``measures`` key.
    keys: list[str]
    #: The ``measures`` entries by key, from the plan's ``measures-set`` entry; ``None``: not stored.
    entries: dict[str, Entry] | None

    def at(self, index: int) -> tuple[tuple[str, str], Entry | None]:
        """Matrix ``index``'s digests and its ``measures`` entry (``None``: to be looked up alone)."""
        return self.digests[index], None if self.entries is None else self.entries[self.keys[index]]


def _plan_digests(plan, cache: SpectrumCache) -> list[tuple[str, str]] | None:
    """Every matrix's digests, if the fingerprint index knows them all (no weight is read); else ``None``."""
    if any(m.digests is None for m in plan.matrices):
        return None

    reader = cache.fingerprints.known_reader()

    def known(file, name, load):
        found = reader(file, name)
        if found is None:
            raise _Unknown(name)
        return found

    try:
        return [m.digests(known) for m in plan.matrices]
    except _Unknown:
        return None


def set_key(keys: list[str]) -> str:
    """The ``measures-set`` entry of a plan whose pairs' ``measures`` keys are ``keys``."""
    return SpectrumCache.key("measures-set", MEASURES_VERSION, *keys)


def read_set(plan, settings, cache: SpectrumCache | None) -> KnownMeasures | None:
    """The plan's digests, ``measures`` keys and (when stored) entries, known before it runs; ``None`` if not known.

    ``None`` when the measures are off, there is no cache, or a digest is not in the
    fingerprint index yet (a first run: the pipeline hashes as it goes).
    """
    digests = None if cache is None or not settings.measures else _plan_digests(plan, cache)
    if not digests:
        return None
    signature = settings.measure_signature()
    keys = [measures_key(base, tuned, signature) for base, tuned in digests]
    entry = cache.lookup("measures-set", set_key(keys))
    return KnownMeasures(digests, keys, None if entry is None else _split(keys, *entry))


def _split(keys: list[str], tensors: dict[str, torch.Tensor], info: dict) -> dict[str, Entry]:
    """A ``measures-set`` entry as the ``measures`` entries it holds (views, read as :func:`from_entry` reads)."""
    counts, ks = tensors["counts"], tensors["k"].tolist()
    ends = {side: [0, *tensors[f"ends_{side}"].tolist()] for side in ("left", "right")}
    return {
        key: (
            {
                "counts": counts[i],
                **{f"angles_{side}": tensors[f"angles_{side}"][ends[side][i] : ends[side][i + 1]] for side in ends},
            },
            {"k": ks[i], **info},
        )
        for i, key in enumerate(keys)
    }


def store_set(plan, settings, cache: SpectrumCache | None, results, known: KnownMeasures | None) -> None:
    """Keep a finished plan's measures (``results``, in plan order) as its ``measures-set`` entry.

    Nothing when ``known`` says it is stored already, the cache is read-only, or a matrix has no measures.
    """
    if cache is None or cache.read_only or not settings.measures or (known is not None and known.entries):
        return
    keys = known.keys if known is not None else (read_set(plan, settings, cache) or KnownMeasures([], [], None)).keys
    if not keys or len(results) != len(keys) or any(r.rl is None for r in results):
        return
    entries = [to_entry(r.rl) for r in results]
    shared = [{n: v for n, v in info.items() if n != "k"} for _, info in entries]
    if any(one != shared[0] for one in shared):
        return  # one setting per plan, or nothing kept together
    tensors = {
        "counts": torch.stack([t["counts"] for t, _ in entries]),
        "k": torch.tensor([info["k"] for _, info in entries], dtype=torch.int64),
    }
    for side in ("left", "right"):
        parts = [t[f"angles_{side}"] for t, _ in entries]
        tensors[f"angles_{side}"] = torch.cat(parts)
        tensors[f"ends_{side}"] = torch.tensor([len(p) for p in parts], dtype=torch.int64).cumsum(0)
    cache.put("measures-set", set_key(keys), tensors, shared[0])

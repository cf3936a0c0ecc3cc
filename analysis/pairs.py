"""A matrix pair on its way through the pipeline (:mod:`analysis.pipeline`).

Its cache keys from the digests of both weights, what the cache already holds for it, and
the weights themselves only when something is left to compute.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from analysis import update_measures
from analysis.cache import Entry, SpectrumCache, tensor_digest
from analysis.errors import InputError
from analysis.linalg import Spectrum
from analysis.pair_metrics import AnalysisSettings, matrix_result
from analysis.plan import LowRankDelta, MatrixPlan, TunedMatrix
from analysis.results import MatrixResult


@dataclass
class Pair:
    """One matrix pair on its way through the pipeline: keys first, weights if needed."""

    plan: MatrixPlan
    pair_key: str
    base_key: str
    result: MatrixResult | None = None  # found in the pair cache: nothing to load or compute
    base: torch.Tensor | None = None  # oriented for ``settings.side``
    tuned: TunedMatrix | None = None
    base_spectrum: Spectrum | None = None  # found in the base cache
    # The RL-versus-SFT measures' entry (analysis.update_measures): its key (None: not
    # wanted), the base's top-k entry, and the entry once found or computed.
    measures_key: str | None = None
    base_top_key: str | None = None
    measures: Entry | None = None
    # Runs a cache write: at once, or later on a writer thread (:class:`BackgroundWriter`).
    write: Callable[[Callable[[], None]], None] | None = None


def stored_base_spectrum(spectrum: Spectrum) -> Spectrum:
    """A base spectrum as it is cached: all left singular vectors and values, nothing else.

    The vectors are kept in float16 (2 bytes per element; an intruder score moves by at
    most ``2^-11``, inside the 1e-3 that counts are checked at), the values in float32.
    A freshly computed base spectrum is rounded the same way before use, so a result does
    not depend on whether its base came from the cache.
    """
    return Spectrum(spectrum.values.float(), left=spectrum.left().to(torch.float16))


def base_entry(spectrum: Spectrum) -> dict[str, torch.Tensor]:
    """A stored base spectrum (:func:`stored_base_spectrum`) as the tensors of its cache entry."""
    return {"U": spectrum.left(), "S": spectrum.values}


def base_from_entry(tensors: dict[str, torch.Tensor], device: torch.device) -> Spectrum:
    """The base spectrum a cache entry (:func:`base_entry`) holds, on ``device``."""
    return Spectrum(tensors["S"].to(device), left=tensors["U"].to(device))


def prepare(
    plan: MatrixPlan,
    settings: AnalysisSettings,
    cache: SpectrumCache | None,
    source: str | None = None,
    base_source: str | None = None,
    *,
    pin: bool = False,
    cached_only: bool = False,
    known: tuple[tuple[str, str], Entry | None] | None = None,
) -> Pair:
    """Keys of a pair, then the cached result, or else the weights and cached base spectrum.

    ``source`` (the fine-tune as the user gave it) is named in errors about the weights'
    values, beside the matrix; without it the matrix alone is named. ``pin``: copy the
    weights into page-locked host memory (for CUDA: the copy to the device then runs at
    full speed, issue 13 measured 7x a pageable copy), here on the reader thread.
    ``cached_only``: read nothing but the cache (:func:`cached_results`): a digest not in the
    fingerprint index raises :class:`NotCached`, and the pair comes back without weights.
    ``known``: its digests and ``measures`` entry found before the plan ran (:func:`update_measures.read_set`).
    """
    base = tuned = None
    digest = cache.fingerprints.digest if cache is not None else None
    if cached_only:
        digest = partial(known_digest, cache)
    digests = known[0] if known else plan.digests(digest) if plan.digests is not None and digest is not None else None
    if digests is None:
        base, tuned = plan.load_base(), plan.load_tuned()
        digests = (tensor_digest(base), tensor_digest(tuned.weight))
    base_digest, tuned_digest = digests
    pair = Pair(
        plan,
        pair_key=SpectrumCache.key(
            "pair", base_digest, tuned_digest, settings.signature(), f"adapter_rank={plan.adapter_rank}"
        ),
        base_key=SpectrumCache.key("base-left", base_digest, f"side={settings.side}"),
    )
    if settings.measures:
        pair.measures_key = update_measures.measures_key(base_digest, tuned_digest, settings.measure_signature())
        pair.base_top_key = update_measures.base_top_key(base_digest, settings.principal_k, settings.side)
    if cache is not None:
        entry = cache.lookup("pair", pair.pair_key)
        if pair.measures_key is not None:
            pair.measures = (known and known[1]) or cache.lookup("measures", pair.measures_key)
        if entry is not None:
            pair.result = matrix_result(plan, *entry)
            if pair.measures_key is None or pair.measures is not None:
                pair.result.rl = None if pair.measures is None else update_measures.from_entry(*pair.measures)
                return pair
            # The pair is cached but not its measures: load the weights for them alone.
    if cached_only:
        return pair
    if base is None or tuned is None:
        base, tuned = plan.load_base(), plan.load_tuned()
    for which, weight, owner in (("base", base, base_source), ("fine-tuned", tuned.weight, source)):
        if not all_finite(weight):
            # Blamed on the model that holds it: a NaN in the base is the base's problem.
            problem = f"the {which} weight holds NaN or infinite values (diverged training or a corrupt file?)"
            raise InputError(plan.name, problem) if owner is None else InputError(owner, f"{plan.name}: {problem}")
    if settings.side == "right":
        base, tuned = base.transpose(0, 1), transposed(tuned)
    if pin:
        base, tuned = base.pin_memory(), TunedMatrix(tuned.weight.pin_memory(), tuned.low_rank)
    pair.base, pair.tuned = base, tuned
    if cache is not None:
        entry = cache.lookup("base", pair.base_key)
        if entry is not None:
            pair.base_spectrum = base_from_entry(entry[0], torch.device("cpu"))
    return pair


class NotCached(Exception):
    """:func:`cached_results` met something the cache does not hold."""


def known_digest(cache: SpectrumCache, file, name: str, load) -> str:
    """The fingerprint index's digest of a stored tensor; :class:`NotCached` if it has none."""
    found = cache.fingerprints.known(file, name)
    if found is None:
        raise NotCached(name)
    return found


def all_finite(weight: torch.Tensor) -> bool:
    """No NaN or infinity in ``weight``.

    NumPy's check on a CPU float tensor: 0.05 ms for 384 x 1536, where
    ``torch.isfinite(w).all()`` takes 1.2 ms (it builds temporaries).
    """
    if weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.float64):
        return bool(np.isfinite(weight.detach().numpy()).all())
    return bool(torch.isfinite(weight).all())


def transposed(tuned: TunedMatrix) -> TunedMatrix:
    """The tuned matrix (and its low-rank update, if any) transposed, for ``side="right"``."""
    lr = tuned.low_rank
    flipped = None if lr is None else LowRankDelta(lr.A.transpose(0, 1), lr.B.transpose(0, 1), lr.scale)
    return TunedMatrix(tuned.weight.transpose(0, 1), flipped)

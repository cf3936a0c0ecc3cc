"""Run a whole comparison: plan, per-matrix spectra (cached), metrics, progress.

The maths of each matrix pair reads like the paper (:func:`analyse_matrix`): SVD the base
and the tuned weight, score the top tuned left singular vectors against every base one,
take the spectrum of the update. Speed wraps it without hiding it: the base SVD is
cached by content (so every fine-tune of the same base reuses it), a whole pair's result
is cached by the digests of both weights, and a LoRA update's spectrum comes from its
factors.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch

from analysis import metrics
from analysis.cache import Entry, SpectrumCache, tensor_digest
from analysis.errors import AnalysisCancelled, InputError
from analysis.linalg import low_rank_svd, resolve_device, thin_svd
from analysis.plan import ComparisonPlan, LowRankDelta, MatrixPlan, TunedMatrix
from analysis.results import (
    DEFAULT_EPSILONS,
    DEFAULT_TOP_K,
    ComparisonResult,
    MatrixResult,
    ModelResult,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AnalysisSettings:
    """What is kept per matrix; part of every pair's cache key.

    ``max_top_k`` tuned vectors are scored for intruders (any ``k`` up to it can then be
    shown without recomputation); ``similarity_size`` is N of the ``N x N`` similarity
    block; ``delta_vectors`` left singular vectors of the update are kept for subspace
    similarity; ``side`` picks left (default, DESIGN.md) or right singular vectors.
    """

    max_top_k: int = 100
    similarity_size: int = 64
    delta_vectors: int = 64
    side: Literal["left", "right"] = "left"

    def signature(self) -> str:
        return ",".join(f"{k}={v}" for k, v in sorted(asdict(self).items()))


@dataclass(frozen=True)
class ProgressEvent:
    """Sent after each matrix: ``done`` of ``total`` matrices of ``model`` finished."""

    model: str
    done: int
    total: int
    matrix: str
    elapsed_s: float

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the average pace so far (``None`` before the first matrix)."""
        if self.done == 0:
            return None
        return self.elapsed_s / self.done * (self.total - self.done)


ProgressCallback = Callable[[ProgressEvent], None]
_DEFAULT_CACHE = object()


def _cached(cache: SpectrumCache | None, kind: str, key: str, compute: Callable[[], Entry]) -> Entry:
    return compute() if cache is None else cache.get_or_compute(kind, key, compute)


def base_left_spectrum(
    weight: torch.Tensor, device: torch.device, cache: SpectrumCache | None, digest: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """All left singular vectors and values of a base weight, cached by content."""

    def compute() -> Entry:
        U, S, _ = thin_svd(weight, device)
        return {"U": U, "S": S}, {}

    key = SpectrumCache.key("base-left", digest or tensor_digest(weight))
    tensors, _ = _cached(cache, "base", key, compute)
    return tensors["U"].to(device), tensors["S"].to(device)


def analyse_matrix(
    plan: MatrixPlan,
    *,
    settings: AnalysisSettings = AnalysisSettings(),
    device: torch.device | str = "auto",
    cache: SpectrumCache | None = None,
) -> MatrixResult:
    """Every metric of DESIGN.md for one base/tuned matrix pair."""
    device = resolve_device(device)
    base = plan.load_base()
    tuned = plan.load_tuned()
    if settings.side == "right":
        base, tuned = base.transpose(0, 1), _transposed(tuned)
    base_digest = tensor_digest(base)
    tuned_digest = tensor_digest(tuned.weight)
    pair_key = SpectrumCache.key(
        "pair", base_digest, tuned_digest, settings.signature(), f"adapter_rank={plan.adapter_rank}"
    )

    def compute() -> Entry:
        return _pair_metrics(base, tuned, base_digest, plan.adapter_rank, settings, device, cache)

    tensors, info = _cached(cache, "pair", pair_key, compute)
    arrays = {name: t.numpy() for name, t in tensors.items()}
    return MatrixResult(
        name=plan.name,
        layer=plan.layer,
        module=plan.module,
        shape=plan.shape,
        base_singular_values=arrays["base_s"],
        tuned_singular_values=arrays["tuned_s"],
        delta_singular_values=arrays["delta_s"],
        intruder_scores=arrays["scores"].astype(np.float64),
        best_match=arrays["best_match"],
        similarity=arrays["similarity"],
        delta_left_vectors=arrays["delta_u"],
        adapter_rank=plan.adapter_rank,
        **info,
    )


def _transposed(tuned: TunedMatrix) -> TunedMatrix:
    lr = tuned.low_rank
    flipped = None if lr is None else LowRankDelta(lr.A.transpose(0, 1), lr.B.transpose(0, 1), lr.scale)
    return TunedMatrix(tuned.weight.transpose(0, 1), flipped)


def _pair_metrics(
    base: torch.Tensor,
    tuned: TunedMatrix,
    base_digest: str,
    adapter_rank: int | None,
    settings: AnalysisSettings,
    device: torch.device,
    cache: SpectrumCache | None,
) -> Entry:
    U0, S0 = base_left_spectrum(base, device, cache, base_digest)
    Ut, St, _ = thin_svd(tuned.weight, device)
    k = min(settings.max_top_k, Ut.shape[1])
    scores, best_match = metrics.intruder_scores(Ut[:, :k], U0)
    similarity = metrics.similarity_matrix(Ut, U0, settings.similarity_size)

    if tuned.low_rank is not None:
        Ud, Sd, Vd = low_rank_svd(tuned.low_rank, device)
    else:
        Ud, Sd, Vd = thin_svd(tuned.weight.to(device) - base.to(device), device)
    delta_fro = metrics.frobenius_norm(Sd)
    rank90 = metrics.rank90(Sd)
    # Hu et al. 7.3 take r = the adapter's rank; a full fine-tune has none, so use the
    # rank that explains 90% of its update (Biderman et al.).
    amp_rank = min(adapter_rank or rank90, int(torch.count_nonzero(Sd)))
    amplification = metrics.amplification_factor(delta_fro, Ud[:, :amp_rank], Vd[:, :amp_rank], base.to(device))

    tensors = {
        "base_s": S0,
        "tuned_s": St,
        "delta_s": Sd,
        "scores": torch.from_numpy(scores.astype(np.float32)),
        "best_match": torch.from_numpy(best_match),
        "similarity": torch.from_numpy(similarity),
        "delta_u": Ud[:, : settings.delta_vectors].to(torch.float16),
    }
    info = {
        "effective_rank": metrics.effective_rank(Sd),
        "rank90": rank90,
        "stable_rank": metrics.stable_rank(Sd),
        "delta_fro": delta_fro,
        "amplification_factor": amplification,
        "amplification_rank": amp_rank,
    }
    return {n: t.detach().to("cpu").contiguous() for n, t in tensors.items()}, info


def analyse_plan(
    plan: ComparisonPlan,
    *,
    settings: AnalysisSettings = AnalysisSettings(),
    device: torch.device | str = "auto",
    cache: SpectrumCache | None = None,
    progress: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Iterator[MatrixResult]:
    """Analyse a plan's matrices one at a time, yielding each result when it is ready.

    Only one matrix pair is held in memory at a time. ``progress`` is called after each
    matrix; ``should_stop`` is polled before each one and raises
    :class:`~analysis.errors.AnalysisCancelled` when it returns true.
    """
    device = resolve_device(device)
    start = time.perf_counter()
    total = len(plan.matrices)
    for done, matrix in enumerate(plan.matrices, start=1):
        if should_stop is not None and should_stop():
            raise AnalysisCancelled(f"cancelled after {done - 1} of {total} matrices")
        result = analyse_matrix(matrix, settings=settings, device=device, cache=cache)
        if progress is not None:
            progress(ProgressEvent(plan.tuned_label, done, total, matrix.name, time.perf_counter() - start))
        yield result


def model_result(plan: ComparisonPlan, matrices: list[MatrixResult]) -> ModelResult:
    """Bundle a plan's analysed matrices with what could not be paired."""
    return ModelResult(
        source=plan.tuned_label,
        kind=plan.kind,
        matrices=matrices,
        unmatched=list(plan.unmatched),
        shape_mismatches=[
            {"name": m.name, "base_shape": list(m.base_shape), "tuned_shape": list(m.tuned_shape)}
            for m in plan.shape_mismatches
        ],
        summary=dict(plan.summary),
    )


def plan_models(
    base: str, tuned: Sequence[str], *, allow_local_paths: bool = True, include_non_block: bool = False
) -> list[ComparisonPlan]:
    """Open every source and pair it with the base, before any heavy work runs.

    Bad input anywhere (a missing file, a wrong base, an unsupported adapter) raises
    :class:`InputError` here, so a long run never fails half way for a typo.
    """
    from analysis.adapters import LoraAdapter
    from analysis.pairing import plan_comparison
    from analysis.sources import open_source

    base_source = open_source(base, allow_local_paths=allow_local_paths)
    if isinstance(base_source, LoraAdapter):
        raise InputError(base, "is a LoRA adapter; the base must be a full model (apply adapters as TUNED)")
    return [
        plan_comparison(
            base_source, open_source(spec, allow_local_paths=allow_local_paths), include_non_block=include_non_block
        )
        for spec in tuned
    ]


def compare(
    base: str,
    tuned: Sequence[str],
    *,
    top_k: int = DEFAULT_TOP_K,
    epsilons: Sequence[float] = DEFAULT_EPSILONS,
    device: torch.device | str = "auto",
    cache: SpectrumCache | None | object = _DEFAULT_CACHE,
    progress: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    allow_local_paths: bool = True,
    include_non_block: bool = False,
    settings: AnalysisSettings | None = None,
) -> ComparisonResult:
    """Compare a base model with one or more fine-tunes: every metric, every matrix.

    Parameters
    ----------
    base, tuned:
        Hub ids, local folders, ``.safetensors`` files; a ``tuned`` that is a PEFT or
        kohya LoRA adapter is applied to ``base``.
    top_k, epsilons:
        Intruder counts are reported among the top ``top_k`` tuned vectors at each eps.
    device:
        ``auto`` (CUDA when present), ``cpu`` or ``cuda``.
    cache:
        A :class:`SpectrumCache`; the default is the one under ``$WSE_CACHE_DIR`` (or
        ``cache/``); ``None`` computes everything afresh and stores nothing.
    progress, should_stop:
        See :func:`analyse_plan`.
    """
    settings = settings or AnalysisSettings(max_top_k=max(top_k, AnalysisSettings.max_top_k))
    if not 1 <= top_k <= settings.max_top_k:
        raise InputError("--top-k", f"must be between 1 and {settings.max_top_k}, got {top_k}")
    if any(not 0 < eps <= 1 for eps in epsilons):
        raise InputError("--epsilons", f"every eps must lie in (0, 1], got {list(epsilons)}")
    store = SpectrumCache() if cache is _DEFAULT_CACHE else cache
    device = resolve_device(device)
    plans = plan_models(base, tuned, allow_local_paths=allow_local_paths, include_non_block=include_non_block)
    result = ComparisonResult(base=base, top_k=top_k, epsilons=[float(e) for e in epsilons])
    for plan in plans:
        matrices = list(
            analyse_plan(
                plan, settings=settings, device=device, cache=store, progress=progress, should_stop=should_stop
            )
        )
        result.models.append(model_result(plan, matrices))
    return result

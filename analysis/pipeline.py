"""Run a whole comparison: plan, per-matrix spectra (cached), metrics, progress.

The maths of each matrix pair reads like the paper (:func:`analyse_matrix`, with the
metrics of :mod:`analysis.pair_metrics`): SVD the base and the tuned weight, score the top
tuned left singular vectors against every base one, take the spectrum of the update.
Speed wraps it without hiding it: the base SVD is cached by content (so every fine-tune
of the same base reuses it), a whole pair's result is cached by the digests of both
weights, and a LoRA update's spectrum comes from its factors.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from analysis import update_measures
from analysis.cache import Entry, SpectrumCache
from analysis.errors import AnalysisCancelled
from analysis.grouping import group_matrices
from analysis.linalg import (
    Spectrum,
    decompose_many,
    default_method,
    full_float32,
    low_rank_spectrum,
    resolve_device,
)
from analysis.pair_metrics import AnalysisSettings, matrix_result, pair_metrics
from analysis.pairs import NotCached, Pair, base_entry, base_from_entry, prepare, stored_base_spectrum
from analysis.plan import ComparisonPlan, MatrixPlan, TunedMatrix
from analysis.results import MatrixResult, ModelResult
from analysis.scheduler import (
    DEFAULT_MEMORY_BUDGET,
    BackgroundWriter,
    blas_threads,
    compute_threads,
    cpu_parallelism,
    default_workers,
    in_order,
    matrix_threads,
    run_now,
    use_threads,
    working_bytes,
)

log = logging.getLogger(__name__)


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


def _base_spectrum(pair: Pair, fresh: Spectrum | None, device: torch.device, cache: SpectrumCache | None) -> Spectrum:
    """The pair's base spectrum as stored: the cached one, or ``fresh`` rounded and cached."""
    if fresh is None:
        assert pair.base_spectrum is not None
        return base_from_entry(base_entry(pair.base_spectrum), device)
    stored = stored_base_spectrum(fresh)
    if cache is not None:
        entry = base_entry(stored)
        (pair.write or run_now)(lambda: cache.store("base", pair.base_key, entry))
    return stored


def cached_results(plan: ComparisonPlan, settings: AnalysisSettings, cache: SpectrumCache) -> list[MatrixResult] | None:
    """Every matrix result of ``plan`` read from ``cache`` alone, or ``None``.

    ``None`` as soon as one matrix's digests, result or measures are not stored: nothing
    is loaded, hashed or computed, so a caller may try it where work must not run (the
    dashboard's web process, before handing a comparison to a worker). The results are
    those :func:`analyse_plan` yields from the same cache, in plan order.
    """
    if any(matrix.digests is None for matrix in plan.matrices):
        return None
    results = []
    known = update_measures.read_set(plan, settings, cache)  # the measures: one entry, as analyse_plan reads them
    try:
        for i, matrix in enumerate(plan.matrices):
            pair = prepare(matrix, settings, cache, plan.tuned_label, plan.base_label, cached_only=True,
                           known=known and known.at(i))  # fmt: skip
            if pair.result is None or (pair.measures_key is not None and pair.result.rl is None):
                return None
            results.append(pair.result)
    except NotCached:
        return None
    return results


def _compute_on(
    pair: Pair,
    settings: AnalysisSettings,
    device: torch.device,
    method: str,
    cache: SpectrumCache | None,
    budget: int = DEFAULT_MEMORY_BUDGET,
) -> MatrixResult:
    """One pair's result: :func:`_compute_group` of that pair alone."""
    return _compute_group([pair], settings, device, method, cache, budget)[0]


def _compute_group(
    pairs: Sequence[Pair],
    settings: AnalysisSettings,
    device: torch.device,
    method: str,
    cache: SpectrumCache | None,
    budget: int = DEFAULT_MEMORY_BUDGET,
) -> list[MatrixResult]:
    """The results of same-shaped pairs, from the cache or computed together.

    One pair but for the ``eig`` method, see :func:`~analysis.grouping.group_matrices`.
    Those :func:`~analysis.pairs.prepare` found in the cache are read, the others computed together
    (:func:`_group_metrics`), on the threads their shape asks for on the CPU
    (:func:`matrix_threads`), whatever else runs in the process; one BLAS thread elsewhere.

    Each pair is looked up again and stored under its own entry's lock (one lock held at a
    time); the group is computed once, when the first pair still missing under its lock
    asks for it, so a group another process finished meanwhile is read, not computed again.
    """
    with full_float32(device):
        return _group_results(pairs, settings, device, method, cache, budget)


def _group_results(
    pairs: Sequence[Pair],
    settings: AnalysisSettings,
    device: torch.device,
    method: str,
    cache: SpectrumCache | None,
    budget: int,
) -> list[MatrixResult]:
    """:func:`_compute_group`'s work, in full float32 on a GPU."""
    todo = [pair for pair in pairs if pair.result is None]
    threads, blas = (1, 1) if device.type != "cpu" else matrix_threads(pairs[0].plan.shape, method, budget)
    if todo:
        if device.type == "cpu":
            use_threads(threads)
        computed: list[Entry] = []

        def entry(index: int) -> Entry:
            if not computed:
                with blas_threads(blas):  # this thread's count, whatever runs beside it
                    computed.extend(_group_metrics(todo, settings, device, method, cache))
            return computed[index]

        for index, pair in enumerate(todo):
            assert pair.base is not None and pair.tuned is not None
            # prepare looked the pair up and missed: read again only under the entry's lock.
            compute = lambda index=index: entry(index)  # noqa: E731
            found = compute() if cache is None else cache.get_or_compute("pair", pair.pair_key, compute, missed=True)
            pair.result = matrix_result(pair.plan, *found)
    for pair in pairs:
        if pair.measures_key is not None and pair.result.rl is None:
            use_threads(threads) if device.type == "cpu" and pair.measures is None else None
            with blas_threads(blas) if pair.measures is None else nullcontext():  # as the pair's own work runs
                _attach_measures(pair, settings, device, method, cache)
        pair.base = pair.tuned = None  # the weights are not needed any more
    return [pair.result for pair in pairs]


def _attach_measures(
    pair: Pair, settings: AnalysisSettings, device: torch.device, method: str, cache: SpectrumCache | None
) -> None:
    """The pair's RL-versus-SFT measures (issue 23): found, computed beside its spectra, or alone.

    Alone, the tuned weight is decomposed as :func:`_group_spectra` does it (same top, same seeds), so the bytes match.
    """
    if pair.measures is None:
        assert pair.base is not None and pair.tuned is not None

        def compute() -> Entry:
            base, tuned = _on_device(pair, device)
            wanted = max(settings.max_top_k, settings.similarity_size)
            seeds = None if pair.base_spectrum is None else [_seeds(pair.base_spectrum, tuned, wanted, device)]
            spectrum = decompose_many([tuned.weight.to(device)], device, method, top=wanted, seeds=seeds)[0]
            return update_measures.compute(base, tuned.weight.to(device), spectrum, settings, device, cache,
                                           pair.base_top_key)  # fmt: skip

        key = pair.measures_key
        pair.measures = compute() if cache is None else cache.get_or_compute("measures", key, compute, missed=True)
    pair.result.rl = update_measures.from_entry(*pair.measures)


def _group_metrics(
    pairs: Sequence[Pair], settings: AnalysisSettings, device: torch.device, method: str, cache: SpectrumCache | None
) -> list[Entry]:
    """Every metric of each pair: its spectra, then :func:`pair_metrics`.

    The spectra come from :func:`_group_spectra` for the ``gram`` and ``eig`` methods,
    :func:`_pair_spectra` pair by pair for the SVD drivers.
    """
    if method in ("gram", "eig"):
        spectra = _group_spectra(pairs, settings, device, method, cache)
    else:
        spectra = [_pair_spectra(pair, device, method, cache) for pair in pairs]
    entries = []
    for pair, (base_spectrum, tuned_spectrum, delta, base) in zip(pairs, spectra, strict=True):
        entries.append(pair_metrics(base, base_spectrum, tuned_spectrum, delta, settings, pair.plan.adapter_rank))
        if pair.measures_key is not None and pair.measures is None:  # the tuned top vectors are at hand
            tuned = pair.tuned.weight.to(base.device)
            found = update_measures.compute(base, tuned, tuned_spectrum, settings, device, cache, pair.base_top_key)
            if cache is not None:
                (pair.write or run_now)(lambda key=pair.measures_key, found=found: cache.store("measures", key, *found))
            pair.measures = found
    return entries


def _on_device(pair: Pair, device: torch.device) -> tuple[torch.Tensor, TunedMatrix]:
    """The pair's base and tuned weight on ``device`` (copies from pinned memory overlap)."""
    base, tuned = pair.base.to(device, non_blocking=True), pair.tuned
    if device.type == "cuda":
        tuned = TunedMatrix(tuned.weight.to(device, non_blocking=True), tuned.low_rank)
    return base, tuned


def _seeds(
    base_spectrum: Spectrum, tuned: TunedMatrix, wanted: int, device: torch.device
) -> Callable[[], torch.Tensor]:
    """Starting vectors for the tuned weight's top ``wanted``.

    A fine-tune's top singular vectors lie near the base's (and, for an adapter, in the
    span of ``B``). A function, as only the subspace iteration of large matrices uses them.
    """

    def seeds() -> torch.Tensor:
        # On ``device``: a base spectrum read from the cache alone (a pair whose measures are
        # computed on their own, :func:`_attach_measures`) is on the CPU.
        start = base_spectrum.left(min(2 * wanted, base_spectrum.rank_bound)).to(device, torch.float64)
        if tuned.low_rank is None:
            return start
        return torch.cat([tuned.low_rank.B.to(device, torch.float64), start], dim=1)

    return seeds


def _group_spectra(
    pairs: Sequence[Pair], settings: AnalysisSettings, device: torch.device, method: str, cache: SpectrumCache | None
) -> list[tuple[Spectrum, Spectrum, Spectrum, torch.Tensor]]:
    """The spectra of each pair's base, tuned weight and update by the ``gram`` (CPU) and ``eig`` (CUDA) methods.

    The base's is cached or computed and cached; each spectrum has just the vectors the
    metrics use; the base weight is returned too, on ``device``.

    The bases that are not cached, the tuned weights and the dense updates each go through
    one :func:`~analysis.linalg.decompose_many` call, which with ``eig`` diagonalises
    same-shaped small matrices in batches (a group of a mixture-of-experts layer's experts,
    :func:`~analysis.grouping.group_matrices`, issue 13); ``gram`` groups hold one pair.
    """
    wanted = max(settings.max_top_k, settings.similarity_size)  # tuned vectors the metrics use
    weights = [_on_device(pair, device) for pair in pairs]
    missing = [i for i, pair in enumerate(pairs) if pair.base_spectrum is None]
    fresh = dict(zip(missing, decompose_many([weights[i][0] for i in missing], device, method), strict=True))
    base_spectra = [_base_spectrum(pair, fresh.pop(i, None), device, cache) for i, pair in enumerate(pairs)]
    del fresh  # their float64 vectors: only the float16 copies are used (peak memory, issue 13)
    tuned_spectra = decompose_many(
        [tuned.weight for _, tuned in weights],
        device,
        method,
        top=wanted,
        seeds=[_seeds(b, tuned, wanted, device) for b, (_, tuned) in zip(base_spectra, weights, strict=True)],
    )
    dense = [i for i, (_, tuned) in enumerate(weights) if tuned.low_rank is None]
    # A float64 difference (exact for float32 and bf16 weights) for float64 values; the
    # update's vectors only feed spans (amplification, similarity): float32.
    differences = [_float64_difference(weights[i][1].weight, weights[i][0], device) for i in dense]
    updates = dict(zip(dense, decompose_many(differences, device, method, vectors=torch.float32), strict=True))
    del differences
    return [
        (
            base_spectra[i],
            tuned_spectra[i],
            updates[i] if i in updates else low_rank_spectrum(tuned.low_rank, device),
            base,
        )
        for i, (base, tuned) in enumerate(weights)
    ]


def _pair_spectra(
    pair: Pair, device: torch.device, method: str, cache: SpectrumCache | None
) -> tuple[Spectrum, Spectrum, Spectrum, torch.Tensor]:
    """:func:`_group_spectra` of one pair for the SVD drivers (``gesvda``, ``svd``).

    The matrices that need an SVD (the base unless cached, the tuned weight, the update
    unless low-rank) share a shape and go as one call (one batch with ``gesvda`` on CUDA).
    """
    base, tuned = _on_device(pair, device)
    todo = {} if pair.base_spectrum is not None else {"base": base}
    todo["tuned"] = tuned.weight.to(device)
    if tuned.low_rank is None:
        todo["delta"] = tuned.weight.to(device) - base
    spectra = dict(zip(todo, decompose_many(list(todo.values()), device, method), strict=True))
    del todo
    base_spectrum = _base_spectrum(pair, spectra.get("base"), device, cache)
    delta = spectra["delta"] if tuned.low_rank is None else low_rank_spectrum(tuned.low_rank, device)
    return base_spectrum, spectra["tuned"], delta, base


def _float64_difference(tuned: torch.Tensor, base: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tuned - base`` in float64 (exact for float32 and bf16 weights).

    On the CPU by NumPy, which casts inside its loop: 0.5 ms for 384 x 1536 where torch's
    promoting subtraction takes 0.9 ms.
    """
    if device.type == "cpu" and tuned.device.type == base.device.type == "cpu":
        if tuned.dtype in (torch.float32, torch.float64) and base.dtype in (torch.float32, torch.float64):
            return torch.from_numpy(np.subtract(tuned.numpy(), base.numpy(), dtype=np.float64))
    return tuned.to(device, torch.float64) - base.to(device, torch.float64)


def analyse_matrix(
    plan: MatrixPlan,
    *,
    settings: AnalysisSettings = AnalysisSettings(),
    device: torch.device | str = "auto",
    cache: SpectrumCache | None = None,
) -> MatrixResult:
    """Every metric of docs/metrics.md for one base/tuned matrix pair.

    The base weight ``W0 = U0 S0 V0^T`` and the tuned weight ``Wt = Ut St Vt^T`` are
    decomposed; the top ``max_top_k`` columns of ``Ut`` are scored against every column
    of ``U0`` (Shuttleworth et al. 2024, Def. 3.1); the update ``dW = Wt - W0`` gives the
    effective rank, rank90, stable rank, norm and amplification factor. The base
    spectrum and the whole result are cached by content.
    """
    device = resolve_device(device)
    method = default_method(device)
    with compute_threads():
        try:
            torch.set_num_threads(1)  # merging an adapter: as analyse_plan does
            pair = prepare(plan, settings, cache)
        finally:
            if cache is not None:
                cache.fingerprints.flush()
        return _compute_on(pair, settings, device, method, cache)


def analyse_plan(
    plan: ComparisonPlan,
    *,
    settings: AnalysisSettings = AnalysisSettings(),
    device: torch.device | str = "auto",
    cache: SpectrumCache | None = None,
    progress: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    workers: int | None = None,
    memory_budget: int | None = None,
) -> Iterator[MatrixResult]:
    """Analyse a plan's matrices, yielding each result in plan order as soon as it is ready.

    Each worker thread takes a whole matrix -- digests, cache lookups, loading, SVDs,
    metrics -- so independent SVDs use separate cores; with ``workers=1`` a reader thread
    prepares the next matrix (digests, cache lookups, loading) while the calling thread
    computes this one. A matrix starts only while the estimated working memory of those
    running fits ``memory_budget``, so host memory stays bounded however large the model.

    Parameters
    ----------
    plan : ComparisonPlan
        The paired matrices of one base and one fine-tune.
    settings : AnalysisSettings, optional
        What is kept per matrix (part of every cache key).
    device : {"auto", "cpu", "cuda"} or torch.device, default "auto"
        Where the decompositions run (``auto``: CUDA when present).
    cache : SpectrumCache or None, optional
        Where base spectra and results are looked up and stored; ``None`` stores nothing.
    progress : callable, optional
        Called with a :class:`ProgressEvent` after each matrix.
    should_stop : callable, optional
        Polled before each matrix starts; when it returns true,
        :class:`~analysis.errors.AnalysisCancelled` is raised.
    workers : int, optional
        Worker threads (default on CPU :func:`cpu_parallelism`, on a GPU
        :func:`default_workers`).
    memory_budget : int, optional
        Bytes the estimated working memory of the running matrices must fit (default
        :data:`DEFAULT_MEMORY_BUDGET`; one matrix always may run).

    Yields
    ------
    MatrixResult
        One per matrix of ``plan``, in plan order.
    """
    device = resolve_device(device)
    method = default_method(device)
    budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else memory_budget
    start = time.perf_counter()
    total = len(plan.matrices)
    workers = _plan_workers(plan, device, method, budget, workers)

    def prepare_group(group: tuple[int, ...]) -> list[Pair]:
        # Preparing runs on one torch thread whatever the worker: loading may merge an
        # adapter (a matrix product), whose bits must not depend on the thread.
        torch.set_num_threads(1)
        pin = device.type == "cuda"
        pairs = [prepare(plan.matrices[i], settings, cache, plan.tuned_label, plan.base_label, pin=pin,
                          known=known and known.at(i)) for i in group]  # fmt: skip
        for pair in pairs:
            pair.write = writer
        return pairs

    def finish(pairs: list[Pair]) -> list[MatrixResult]:
        return _compute_group(pairs, settings, device, method, cache, budget)

    done = 0

    def stop(_groups_done: int) -> None:
        if should_stop is not None and should_stop():
            raise AnalysisCancelled(f"cancelled after {done} of {total} matrices")

    def cost(group: tuple[int, ...]) -> int:
        return sum(working_bytes(plan.matrices[i].shape, method, device.type) for i in group)

    writer = BackgroundWriter() if cache is not None else None
    known = update_measures.read_set(plan, settings, cache)  # a plan's measures: one entry, not one per pair
    finished: list[MatrixResult] = []
    with compute_threads():
        groups = group_matrices(plan.matrices, method, budget // 2, device.type)
        results = in_order(groups, prepare_group, finish, workers, budget, cost, before_each=stop)
        try:
            for result in _in_plan_order(results):
                done += 1
                if progress is not None:
                    elapsed = time.perf_counter() - start
                    progress(ProgressEvent(plan.tuned_label, done, total, result.name, elapsed))
                finished.append(result)
                yield result
            update_measures.store_set(plan, settings, cache, finished, known)
        finally:
            results.close()  # waits for the workers, so no digest comes after the flush
            if writer is not None:
                writer.close()
            if cache is not None:
                cache.fingerprints.flush()


def _plan_workers(plan: ComparisonPlan, device: torch.device, method: str, budget: int, workers: int | None) -> int:
    """How many matrices :func:`analyse_plan` analyses at once (``workers`` as asked, if any)."""
    if device.type != "cpu":
        return default_workers() if workers is None else max(1, workers)
    largest = max((working_bytes(m.shape, method) for m in plan.matrices), default=1)
    alone = any(matrix_threads(m.shape, method, budget)[0] > 1 for m in plan.matrices)
    # A matrix that gets every core runs alone; the others of its plan then follow one
    # by one too (each on its own thread count, so that results do not depend on it).
    return 1 if alone else cpu_parallelism(largest, budget, len(plan.matrices), workers)[0]


def _in_plan_order(results: Iterable[tuple[tuple[int, ...], list[MatrixResult]]]) -> Iterator[MatrixResult]:
    """The results of groups (their matrices' indices, their results) in plan order.

    Yielded as the groups finish: results of groups that finished ahead of plan order are
    held back.
    """
    ready: dict[int, MatrixResult] = {}
    following = 0
    for group, group_results in results:
        ready.update(zip(group, group_results, strict=True))
        while following in ready:
            yield ready.pop(following)
            following += 1


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
        skipped=list(plan.skipped),
    )


def analyse_pair(
    plan: MatrixPlan,
    *,
    settings: AnalysisSettings,
    device: torch.device,
    cache: SpectrumCache | None,
    source: str | None = None,
) -> tuple[MatrixResult, dict[str, str]]:
    """One pair exactly as :func:`analyse_plan` analyses it, and its cache keys by kind.

    Digests, cache lookups (the whole pair, then the base spectrum), loading, SVDs and
    metrics, storing into ``cache``. The seam for runners that schedule pairs elsewhere
    (:mod:`analysis.distributed` runs it inside Ray tasks and may copy the pair's entry,
    found under the returned keys -- ``pair`` and, unless ``settings.measures`` is off,
    ``measures`` -- into the driver's cache).
    """
    method = default_method(device)
    with compute_threads():
        try:
            torch.set_num_threads(1)  # merging an adapter: as analyse_plan does (determinism)
            pair = prepare(plan, settings, cache, source=source)
            result = _compute_on(pair, settings, device, method, cache)
        finally:
            if cache is not None:
                cache.fingerprints.flush()
    return result, {"pair": pair.pair_key, **({"measures": pair.measures_key} if pair.measures_key else {})}

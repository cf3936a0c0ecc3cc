"""Intruder-dimension mitigation: scale a fine-tune's intruders down, see what it does, export it.

Shuttleworth et al. 2024 ("LoRA vs Full Fine-tuning: An Illusion of Equivalence",
arXiv 2410.21228, section 6 and Fig. 8) show that scaling the intruder dimensions of a
trained adapter down recovers much of what the model forgot at little cost to its task.
PEFT ships the procedure as ``peft.tuners.lora.intruders.reduce_intruder_dimension``
(0.21); :func:`mitigate_matrix` follows it step by step for one weight matrix:

1. full float32 SVDs ``W = U0 S0 V0^T`` and ``W + dW = U S V^T`` (``torch.linalg.svd``);
2. ``cos_j = max_i |<U[:, j], U0[:, i]>|``; the intruders are the ``j < top_k`` with
   ``cos_j < eps`` (Def. 3.1 of the paper);
3. ``W_mit = W + dW + (lambda - 1) * sum_{j intruder} s_j u_j v_j^T``;
4. for an adapter, ``dW_mit = W_mit - W`` is divided by the adapter's scaling and
   re-factored by SVD as ``B = U_r sqrt(S_r)``, ``A = sqrt(S_r) V_r^T`` truncated to the
   adapter's rank ``r`` (PEFT's rule: the new adapter keeps the old config). ``dW_mit``
   has rank up to ``r + n`` (``n`` intruders), so the truncation makes an error that is
   reported; ``exact=True`` keeps rank ``r + n`` instead (no error; the exported
   ``adapter_config.json`` then carries a ``rank_pattern``/``alpha_pattern`` that keeps
   each module's scaling).

Two rules pick the intruders: ``peft`` (every intruder among the top ``k``, PEFT's) and
``top1`` (the paper's experiments: only the top intruder of each matrix).

For a full fine-tune step 4 is skipped: the mitigated weight is ``W_mit`` itself.
Differences from PEFT, all deliberate: every matrix is handled ``out x in`` (for GPT-2's
``Conv1D`` PEFT decomposes the stored ``in x out`` weight, and for embeddings it would
write factors of the wrong shape); DoRA adapters are refused (their update is not
``scale * B @ A``).

The mitigated weights are analysed by the ordinary cached pipeline
(:func:`mitigated_plan` turns the mitigation into a :class:`~analysis.plan.ComparisonPlan`),
so before and after are measured the same way as every other comparison.
"""

from __future__ import annotations

import io
import json
import math
import re
import shutil
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from analysis.errors import AnalysisCancelled, InputError
from analysis.plan import ComparisonPlan, LowRankDelta, MatrixPlan, TunedMatrix
from analysis.results import DEFAULT_EPSILONS, ModelResult

Rule = Literal["peft", "top1"]
RULES: tuple[str, ...] = ("peft", "top1")
#: The lambda grid of the trade-off curve (Fig. 8 of the paper scans the same range).
LAMBDA_GRID: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class MitigationSettings:
    """``lam`` scales the intruder components (1 keeps them, 0 removes them); intruders
    are sought among the top ``top_k`` singular vectors of ``W + dW`` at threshold ``eps``;
    ``rule`` picks all of them (``peft``) or the top one (``top1``); ``exact`` keeps rank
    ``r + n`` instead of truncating an adapter back to ``r``. PEFT's defaults."""

    lam: float = 0.75
    top_k: int = 10
    eps: float = 0.5
    rule: Rule = "peft"
    exact: bool = False

    def check(self) -> MitigationSettings:
        """These settings, or an :class:`InputError` naming the bad one."""
        if not (isinstance(self.lam, (int, float)) and math.isfinite(self.lam) and 0.0 <= self.lam <= 1.0):
            raise InputError("--lam", f"must lie in [0, 1] (1 keeps the intruders as they are), got {self.lam}")
        if not 1 <= int(self.top_k) <= 1000:
            raise InputError("--top-k", f"must be between 1 and 1000, got {self.top_k}")
        if not (math.isfinite(self.eps) and 0.0 < self.eps <= 1.0):
            raise InputError("--eps", f"must lie in (0, 1], got {self.eps}")
        if self.rule not in RULES:
            raise InputError("--rule", f"must be one of {', '.join(RULES)}, got {self.rule!r}")
        return self

    def signature(self) -> str:
        return f"lam={self.lam:g},k={self.top_k},eps={self.eps:g},rule={self.rule},exact={self.exact}"


@dataclass
class MatrixMitigation:
    """What the mitigation did to one matrix (plain numbers, cheap to keep and show).

    ``intruders`` are indices into the singular vectors of ``W + dW`` (0 = largest),
    ``scores`` the top-``k`` ``cos_j`` they were found from, ``intruder_values`` their
    singular values. ``delta_fro_before``/``delta_fro_after`` are ``||dW||_F`` of the
    fine-tune and of the exported mitigated update; ``refactor_error`` is
    ``||dW_exported - dW_mit||_F`` (zero for full fine-tunes and ``exact``).
    ``rank``/``new_rank`` are the adapter's rank before and after (``None`` for a full
    fine-tune); ``mitigated`` is ``False`` for a matrix the procedure cannot touch (a DoRA
    or ``modules_to_save`` weight), which is then exported unchanged.
    """

    name: str
    layer: int | None
    module: str
    shape: tuple[int, int]
    intruders: list[int]
    scores: np.ndarray
    intruder_values: np.ndarray
    delta_fro_before: float
    delta_fro_exact: float
    delta_fro_after: float
    refactor_error: float
    rank: int | None = None
    new_rank: int | None = None
    mitigated: bool = True
    #: Where the matrix lives beside ``layer`` and ``module`` (:class:`MatrixPlan`).
    stack: str | None = None
    expert: int | None = None

    @property
    def key(self) -> str:
        """The matrix's key (:func:`analysis.tables.matrix_key`): the tensor name, plus
        ``#<expert>`` for one expert of a fused 3-D tensor, whose name is shared by all."""
        return _key(self)

    @property
    def refactor_rel_error(self) -> float:
        """``refactor_error / ||dW_mit||_F`` (0 when the update vanished)."""
        return self.refactor_error / self.delta_fro_exact if self.delta_fro_exact > 0 else 0.0

    @property
    def delta_change(self) -> float:
        """Relative change of ``||dW||_F``: ``after / before - 1``."""
        return self.delta_fro_after / self.delta_fro_before - 1.0 if self.delta_fro_before > 0 else 0.0


@dataclass
class _Mitigated:
    """The tensors behind one :class:`MatrixMitigation` (kept for analysis and export).

    ``components`` are the intruder parts ``(U_I, S_I, V_I^T)`` of ``W + dW``; ``low_rank``
    the exported factors (adapters), ``None`` for a full fine-tune whose mitigated
    weight is recomputed from the tuned weight and ``components`` on demand.
    """

    plan: MatrixPlan
    components: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    low_rank: LowRankDelta | None
    original: LowRankDelta | None


@dataclass
class Mitigation:
    """The mitigation of one fine-tune: per-matrix summaries, the tensors, the plan."""

    settings: MitigationSettings
    plan: ComparisonPlan
    matrices: list[MatrixMitigation]
    _tensors: dict[str, _Mitigated] = field(default_factory=dict, repr=False)
    seconds: float = 0.0

    @property
    def kind(self) -> str:
        return self.plan.kind

    def totals(self) -> dict[str, float]:
        """Totals over the matrices: intruders scaled, ``||dW||_F`` before/after (root of
        the sum of squares), and the re-factorisation error likewise."""
        sq = lambda values: math.sqrt(sum(v * v for v in values))  # noqa: E731
        return {
            "matrices": len(self.matrices),
            "matrices_with_intruders": sum(1 for m in self.matrices if m.intruders),
            "intruders_scaled": sum(len(m.intruders) for m in self.matrices),
            "delta_fro_before": sq(m.delta_fro_before for m in self.matrices),
            "delta_fro_exact": sq(m.delta_fro_exact for m in self.matrices),
            "delta_fro_after": sq(m.delta_fro_after for m in self.matrices),
            "refactor_error": sq(m.refactor_error for m in self.matrices),
        }

    def tuned(self, key: str) -> TunedMatrix:
        """The mitigated tuned weight of the matrix with this key (:attr:`MatrixMitigation.key`),
        as the plan orients it."""
        item = self._tensors[key]
        return _mitigated_tuned(item, self.settings.lam)

    def tuned_at(self, key: str, lam: float) -> torch.Tensor:
        """The mitigated tuned weight of matrix ``key`` at ``lam`` (for the trade-off).

        One code path whatever ``settings.lam`` is (the export's own factors at
        ``settings.lam`` come from PEFT's expressions, which differ in the last bits), so a
        point of the curve depends on the fine-tune, k, eps, the rule, exact and ``lam``
        only, and is cached under those (:func:`analysis.mitigate_eval.evaluate_tradeoff`).
        """
        item = self._tensors[key]
        if item.original is not None:
            if item.components[1].numel() == 0:  # no intruder: the factors as trained
                return item.plan.load_base() + item.original.dense()
            return item.plan.load_base() + _refactor_at(item, lam, self.settings.exact).dense()
        return _mitigated_tuned(item, lam).weight

    def update(self, key: str, lam: float | None = None) -> LowRankDelta | None:
        """The exported update of adapter matrix ``key`` at ``lam`` (default the settings')."""
        item = self._tensors[key]
        if lam is None or lam == self.settings.lam:
            return item.low_rank
        if item.original is None:
            return None
        return _refactor_at(item, lam, self.settings.exact)


# --------------------------------------------------------------------------- the procedure


def find_intruders(
    base: torch.Tensor, merged: torch.Tensor, top_k: int, eps: float, rule: Rule = "peft"
) -> tuple[list[int], torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Steps 1-2 of :func:`reduce_intruder_dimension` on float32 ``out x in`` matrices.

    Returns the intruder indices (``top1``: at most the first), the scores
    ``max_i |<U[:, j], U0[:, i]>|`` of the top ``top_k`` vectors, and the full SVD
    ``(U, S, V^T)`` of ``merged``.
    """
    U_base, _S_base, _V_base = torch.linalg.svd(base, full_matrices=False)
    U_merged, S_merged, V_merged = torch.linalg.svd(merged, full_matrices=False)
    cos_sim = (U_merged.T @ U_base).abs().max(dim=1).values
    intruders = torch.where(cos_sim[:top_k] < eps)[0].tolist()
    if rule == "top1":
        intruders = intruders[:1]
    return intruders, cos_sim[:top_k], (U_merged, S_merged, V_merged)


def refactor(update: torch.Tensor, scale: float, rank: int) -> LowRankDelta:
    """Step 4: ``update / scale`` as rank-``rank`` factors ``B = U sqrt(S)``,
    ``A = sqrt(S) V^T`` (PEFT shares the singular values equally), scale kept."""
    U_dW, S_dW, V_dW = torch.linalg.svd(update / scale, full_matrices=False)
    B = U_dW[:, :rank] @ torch.diag(S_dW[:rank]).sqrt()
    A = torch.diag(S_dW[:rank]).sqrt() @ V_dW[:rank]
    return LowRankDelta(B.contiguous(), A.contiguous(), float(scale))


def _intruder_part(components: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    U, S, Vh = components
    return (U * S) @ Vh


def _refactor_at(item: _Mitigated, lam: float, exact: bool) -> LowRankDelta:
    original = item.original
    assert original is not None
    base = item.plan.load_base()
    merged = base + original.dense()
    mitigated = merged + (lam - 1.0) * _intruder_part(item.components)
    rank = original.rank + (len(item.components[1]) if exact else 0)
    return refactor(mitigated - base, original.scale, min(rank, min(base.shape)))


def _mitigated_tuned(item: _Mitigated, lam: float) -> TunedMatrix:
    base = item.plan.load_base()
    if item.low_rank is not None:
        return TunedMatrix(base + item.low_rank.dense(), item.low_rank)
    tuned = item.plan.load_tuned().weight
    if item.components[1].numel() == 0:
        return TunedMatrix(tuned, None)
    return TunedMatrix(tuned + (lam - 1.0) * _intruder_part(item.components), None)


def mitigate_matrix(
    plan: MatrixPlan, settings: MitigationSettings, kind: str = "adapter"
) -> tuple[MatrixMitigation, _Mitigated]:
    """The whole procedure for one matrix of a plan of ``kind`` (see the module docstring)."""
    base = plan.load_base()
    tuned = plan.load_tuned()
    low_rank = tuned.low_rank
    merged = tuned.weight
    delta_before = float(torch.linalg.norm(merged.double() - base.double()))
    rank = low_rank.rank if low_rank is not None else None
    adapter_without_factors = kind == "adapter" and low_rank is None
    intruders, scores, (U, S, Vh) = find_intruders(base, merged, settings.top_k, settings.eps, settings.rule)
    components = (U[:, intruders].contiguous(), S[intruders].contiguous(), Vh[intruders].contiguous())
    summary = MatrixMitigation(
        name=plan.name,
        layer=plan.layer,
        module=plan.module,
        shape=tuple(plan.shape),
        intruders=list(intruders),
        scores=scores.numpy().astype(np.float64),
        intruder_values=components[1].numpy().astype(np.float64),
        delta_fro_before=delta_before,
        delta_fro_exact=delta_before,
        delta_fro_after=delta_before,
        refactor_error=0.0,
        rank=rank,
        new_rank=rank,
        stack=plan.stack,
        expert=plan.expert,
    )
    if adapter_without_factors:
        # DoRA or a modules_to_save replacement: not a LoRA layer, left as it is.
        empty = (U[:, :0], S[:0], Vh[:0])
        summary.intruders, summary.intruder_values, summary.mitigated = [], np.zeros(0), False
        return summary, _Mitigated(plan, empty, None, None)
    if low_rank is None:  # a full fine-tune: W_mit = W_t + (lam - 1) * intruder part
        mitigated = merged + (settings.lam - 1.0) * _intruder_part(components) if intruders else merged
        summary.delta_fro_exact = summary.delta_fro_after = float(torch.linalg.norm(mitigated.double() - base.double()))
        return summary, _Mitigated(plan, components, None, None)
    if not intruders:
        # PEFT copies the factors unchanged when a layer has no intruder.
        return summary, _Mitigated(plan, components, low_rank, low_rank)
    # PEFT's own expressions: B_I @ A_I = U_I S_I V_I^T with sqrt(S) on each side.
    B_intruder = U[:, intruders] @ torch.diag(S)[intruders, :].sqrt()
    A_intruder = (torch.diag(S)[:, intruders]).sqrt() @ Vh[intruders, :]
    W_mitigated = merged + (settings.lam - 1) * (B_intruder @ A_intruder)
    dW_mitigated = W_mitigated - base
    new_rank = min(low_rank.rank + (len(intruders) if settings.exact else 0), min(base.shape))
    factors = refactor(dW_mitigated, low_rank.scale, new_rank)
    exported = factors.dense()
    summary.new_rank = new_rank
    summary.delta_fro_exact = float(torch.linalg.norm(dW_mitigated.double()))
    summary.delta_fro_after = float(torch.linalg.norm(exported.double()))
    summary.refactor_error = float(torch.linalg.norm(exported.double() - dW_mitigated.double()))
    return summary, _Mitigated(plan, components, factors, low_rank)


def mitigate_plan(
    plan: ComparisonPlan,
    settings: MitigationSettings,
    *,
    progress: Callable[[int, int, str], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Mitigation:
    """Mitigate every matrix of ``plan`` (see :func:`mitigate_matrix`)."""
    settings.check()
    if plan.kind == "adapter" and plan.summary.get("adapter", {}).get("use_dora"):
        raise InputError(
            plan.tuned_label,
            "is a DoRA adapter; intruder mitigation needs a plain LoRA update scale * B @ A (as PEFT's does)",
        )
    start = time.perf_counter()
    result = Mitigation(settings, plan, [])
    total = len(plan.matrices)
    for done, matrix in enumerate(plan.matrices):
        if should_stop is not None and should_stop():
            raise AnalysisCancelled(f"mitigation cancelled after {done} of {total} matrices")
        summary, tensors = mitigate_matrix(matrix, settings, plan.kind)
        result.matrices.append(summary)
        result._tensors[_key(matrix)] = tensors
        if progress is not None:
            progress(done + 1, total, _key(matrix))
    result.seconds = time.perf_counter() - start
    return result


def mitigated_plan(mitigation: Mitigation) -> ComparisonPlan:
    """A plan whose tuned matrices are the mitigated ones, for the ordinary pipeline.

    No digests are given, so the pipeline hashes the weights it loads: the cache stays
    content-addressed and a mitigated matrix equal to the fine-tune's is found there.
    """
    plan = mitigation.plan
    matrices = [replace(m, load_tuned=partial(mitigation.tuned, _key(m)), digests=None) for m in plan.matrices]
    label = f"{plan.tuned_label} (mitigated {mitigation.settings.signature()})"
    summary = {**plan.summary, "label": f"{plan.summary.get('label', plan.tuned_label)} · mitigated"}
    summary["mitigation"] = {"settings": mitigation.settings.signature(), **mitigation.totals()}
    return replace(plan, tuned_label=label, matrices=matrices, summary=summary)


# --------------------------------------------------------------------------- before / after


def intruder_table(
    before: ModelResult, after: ModelResult, k: int, epsilons: Sequence[float] = DEFAULT_EPSILONS
) -> dict[str, list[int]]:
    """Total intruders among the top ``k`` at each eps, before and after (from the
    pipeline's results of the fine-tune and of the mitigated fine-tune)."""
    return {
        "eps": [float(e) for e in epsilons],
        "before": [sum(m.intruder_counts(k, [e])[0] for m in before.matrices) for e in epsilons],
        "after": [sum(m.intruder_counts(k, [e])[0] for m in after.matrices) for e in epsilons],
    }


@dataclass
class MitigationResult:
    """A mitigation and the pipeline's analysis of the fine-tune before and after it."""

    mitigation: Mitigation
    before: ModelResult
    after: ModelResult
    tradeoff: Tradeoff | None = None

    def counts(self, epsilons: Sequence[float] = DEFAULT_EPSILONS, k: int | None = None) -> dict[str, list[int]]:
        return intruder_table(self.before, self.after, k or self.mitigation.settings.top_k, epsilons)

    def to_json(self) -> dict:
        """Per matrix and in total, JSON-able (the CLI writes it as ``mitigation.json``)."""
        s = self.mitigation.settings
        after = {_key(m): m for m in self.after.matrices}
        before = {_key(m): m for m in self.before.matrices}
        eps = list(DEFAULT_EPSILONS)
        rows = []
        for m in self.mitigation.matrices:
            rows.append(
                {
                    "matrix": m.key,
                    "name": m.name,
                    "stack": m.stack,
                    "layer": m.layer,
                    "module": m.module,
                    "expert": m.expert,
                    "shape": list(m.shape),
                    "mitigated": m.mitigated,
                    "intruders_scaled": m.intruders,
                    "intruder_singular_values": [float(v) for v in m.intruder_values],
                    "rank": m.rank,
                    "new_rank": m.new_rank,
                    "delta_fro_before": m.delta_fro_before,
                    "delta_fro_exact": m.delta_fro_exact,
                    "delta_fro_after": m.delta_fro_after,
                    "refactor_error": m.refactor_error,
                    "refactor_rel_error": m.refactor_rel_error,
                    "intruders_before": before[m.key].intruder_counts(s.top_k, eps) if m.key in before else None,
                    "intruders_after": after[m.key].intruder_counts(s.top_k, eps) if m.key in after else None,
                }
            )
        data = {
            "settings": {"lam": s.lam, "top_k": s.top_k, "eps": s.eps, "rule": s.rule, "exact": s.exact},
            "kind": self.mitigation.kind,
            "base": self.mitigation.plan.base_label,
            "tuned": self.mitigation.plan.tuned_label,
            "totals": self.mitigation.totals(),
            "intruders": self.counts(eps),
            "matrices": rows,
        }
        if self.tradeoff is not None:
            data["tradeoff"] = self.tradeoff.to_json()
        return data


def analyse(
    mitigation: Mitigation,
    *,
    analysis_settings=None,
    device: str = "auto",
    cache=None,
    progress: Callable[[int, int, str], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> MitigationResult:
    """Run the cached pipeline on the fine-tune and on its mitigation."""
    from analysis.pipeline import AnalysisSettings, analyse_plan, model_result

    settings = analysis_settings or AnalysisSettings(max_top_k=max(mitigation.settings.top_k, 100))
    results = []
    total = 2 * len(mitigation.plan.matrices)
    done = 0
    for plan in (mitigation.plan, mitigated_plan(mitigation)):
        matrices = []
        for matrix in analyse_plan(plan, settings=settings, device=device, cache=cache, should_stop=should_stop):
            matrices.append(matrix)
            done += 1
            if progress is not None:
                progress(done, total, matrix.name)
        results.append(model_result(plan, matrices))
    return MitigationResult(mitigation, results[0], results[1])


def plan_for(resolver, base: str, tuned: str) -> ComparisonPlan:
    """The plan mitigation works on: every LoRA layer of an adapter (as PEFT's procedure
    does, including those outside the numbered blocks), the block matrices of a full
    fine-tune."""
    from analysis.adapters import LoraAdapter

    include_non_block = isinstance(resolver.open(tuned), LoraAdapter)
    return resolver.plan(base, tuned, include_non_block=include_non_block)


def run(
    resolver,
    base: str,
    tuned: str,
    settings: MitigationSettings,
    *,
    device: str = "auto",
    cache=None,
    tradeoff: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> MitigationResult:
    """Plan, mitigate, analyse before/after and (``tradeoff``) evaluate the lambda grid.

    ``progress(done, total, step)`` counts matrices mitigated, then matrices analysed,
    then models evaluated.
    """
    settings.check()
    plan = plan_for(resolver, base, tuned)
    n = len(plan.matrices)
    grid = tradeoff_grid(settings.lam) if tradeoff else ()
    total = 3 * n + (len(grid) + 2 if tradeoff else 0)

    def step(offset: int) -> Callable[[int, int, str], None]:
        return lambda done, _total, what: progress(offset + done, total, what) if progress else None

    # One torch thread for the small SVDs and forward passes here: an OpenMP team waiting
    # for busy cores spins at its barriers and runs many times slower (see
    # analysis.pipeline.cpu_parallelism); the pipeline sets its own threads.
    from analysis.scheduler import torch_threads

    with torch_threads(1):
        mitigation = mitigate_plan(plan, settings, progress=step(0), should_stop=should_stop)
    result = analyse(mitigation, device=device, cache=cache, progress=step(n), should_stop=should_stop)
    if tradeoff:
        from analysis.mitigate_eval import evaluate_tradeoff

        with torch_threads(1):
            curve = step(3 * n)
            result.tradeoff = evaluate_tradeoff(
                resolver,
                base,
                tuned,
                mitigation,
                grid,
                progress=lambda done, total, what: curve(done, total, f"{TRADEOFF_STEP}: {what}"),
                should_stop=should_stop,
                cache=cache,
            )
    return result


#: How progress names the trade-off curve's steps (model evaluations, seconds each where
#: a matrix takes milliseconds: a page does not extrapolate its time left from them).
TRADEOFF_STEP = "trade-off curve"


def tradeoff_grid(lam: float) -> tuple[float, ...]:
    """:data:`LAMBDA_GRID` with the chosen ``lam``."""
    return tuple(sorted({*LAMBDA_GRID, round(float(lam), 4)}))


@dataclass
class Tradeoff:
    """Paper Fig. 8: held-out loss (forgetting) and task metric along the lambda grid.

    ``points`` are ``{"label", "lam", "loss", "task"}`` for the base (``lam`` None), the
    fine-tune (``lam`` 1) and the mitigated fine-tune at each ``lam`` of the grid; ``task``
    is ``None`` where the fine-tune's metric is not known. ``note`` says what was measured
    (or why nothing could be).
    """

    loss_name: str
    task_name: str | None
    points: list[dict]
    note: str
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {
            "loss": self.loss_name,
            "task": self.task_name,
            "points": self.points,
            "note": self.note,
            "seconds": self.seconds,
        }


# --------------------------------------------------------------------------- export


def _side_files(folder: Path, skip: Callable[[Path], bool]) -> list[Path]:
    """Small non-weight files of a model folder (config, tokenizer), to copy beside an export."""
    if not folder.is_dir():
        return []
    out = []
    for path in sorted(folder.iterdir()):
        if not path.is_file() or skip(path) or path.stat().st_size > 64 * 2**20:
            continue
        if path.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx"):
            continue
        if path.name.endswith(".index.json"):
            continue
        out.append(path)
    return out


def _key(matrix) -> str:
    """A plan's or a result's matrix key: :func:`analysis.tables.matrix_key`."""
    from analysis.tables import matrix_key

    return matrix_key(matrix)


def _fused(plan: ComparisonPlan) -> bool:
    """Whether some tensor of ``plan`` holds several matrices (the experts of a fused tensor)."""
    return len({m.name for m in plan.matrices}) < len(plan.matrices)


def _orient_like(stored: torch.Tensor, reference: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (plan orientation) in the orientation ``stored`` has, found from the data:
    ``reference`` is what the plan hands out for ``stored``."""
    if tuple(stored.shape) == tuple(reference.shape) and torch.equal(stored.to(torch.float32), reference):
        return weight
    if tuple(stored.shape) == tuple(reference.T.shape) and torch.equal(stored.to(torch.float32).T, reference):
        return weight.T
    raise InputError("export", f"cannot tell how a {tuple(stored.shape)} tensor was oriented in the analysis")


def export_merged(mitigation: Mitigation, resolver, base: str, tuned: str, out: Path) -> Path:
    """Write the mitigated model as a plain checkpoint: ``out/model.safetensors`` plus the
    config and tokenizer files of the model folder (loads with ``from_pretrained``).

    Every tensor of the model is written: for a full fine-tune the fine-tune's with the
    mitigated matrices replaced; for an adapter the base's with every adapted matrix
    replaced by ``W + dW_mit`` (unmitigated updates such as ``modules_to_save`` merged as
    they are). Dtypes are kept.
    """
    from safetensors.torch import save_file

    from analysis.adapters import LoraAdapter
    from analysis.pairing import match_names

    base_source = resolver.open(base)
    source = base_source if isinstance(resolver.open(tuned), LoraAdapter) else resolver.open(tuned)
    names = source.names()
    by_plan = match_names([m.name for m in mitigation.plan.matrices], names)
    replaced: dict[str, torch.Tensor] = {}
    for matrix in mitigation.plan.matrices:
        target = by_plan.get(matrix.name)
        if target is None:
            if matrix.expert is not None:  # paired across expert layouts (pairing._to_base_layout)
                raise InputError(
                    tuned,
                    f"stores its experts in another layout than the base (per expert against fused), so "
                    f"{matrix.name} cannot be written back into it; export from a fine-tune saved in the "
                    "base's layout",
                )
            raise InputError(tuned, f"the merged model has no tensor for {matrix.name}")
        stored = replaced[target] if target in replaced else source.load(target)
        reference = matrix.load_base() if source is base_source else matrix.load_tuned().weight
        weight = mitigation.tuned(_key(matrix)).weight
        if stored.dim() == 3 and matrix.expert is not None:  # one expert's slice of a fused tensor
            stored = stored.clone() if target not in replaced else stored
            stored[matrix.expert] = _orient_like(stored[matrix.expert], reference, weight).to(stored.dtype)
            replaced[target] = stored.contiguous()
        else:
            replaced[target] = _orient_like(stored, reference, weight).to(stored.dtype).contiguous()
    tensors = {name: replaced.get(name, None) for name in names}
    for name in names:
        if tensors[name] is None:
            tensors[name] = source.load(name).contiguous()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    folder = source.root if source.root.is_dir() else source.root.parent
    for path in _side_files(folder, lambda p: p.name == "model.safetensors"):
        shutil.copy2(path, out / path.name)
    _write_note(out, mitigation, "merged")
    return out


def export_adapter(mitigation: Mitigation, resolver, tuned: str, out: Path) -> Path:
    """Write the mitigated adapter as a PEFT folder (``adapter_config.json`` +
    ``adapter_model.safetensors``) that ``PeftModel.from_pretrained`` loads.

    The original adapter's tensors are copied, ``lora_A``/``lora_B`` (or the embedding
    factors) of each mitigated module replaced by the new factors in the stored dtype.
    With ``exact`` the ranks change per module; the config then gets a ``rank_pattern``
    and an ``alpha_pattern`` (anchored, escaped module names) that keep every module's
    scaling, so ``scale * B @ A`` is the mitigated update.
    """
    from safetensors.torch import load_file, save_file

    from analysis.adapters import LoraAdapter
    from analysis.pairing import match_names

    adapter = resolver.open(tuned)
    if not isinstance(adapter, LoraAdapter) or mitigation.kind != "adapter":
        raise InputError(tuned, "is a full fine-tune; export the merged model instead")
    if adapter.format != "peft":
        raise InputError(tuned, "is a kohya LoRA file; export the merged model instead (PEFT folders only)")
    weights = adapter.root / "adapter_model.safetensors"
    if not weights.is_file():
        raise InputError(tuned, "has no adapter_model.safetensors (only .bin); export the merged model instead")
    tensors = load_file(str(weights))
    config = json.loads((adapter.root / "adapter_config.json").read_text(encoding="utf-8"))
    module_weights = {f"{m}.weight": m for m in adapter.modules}
    pairs = match_names([m.name for m in mitigation.plan.matrices], list(module_weights))
    rank_pattern = dict(config.get("rank_pattern") or {})
    alpha_pattern = dict(config.get("alpha_pattern") or {})
    if _fused(mitigation.plan):
        raise InputError(tuned, "adapts fused expert tensors; export the merged model instead")
    for summary in mitigation.matrices:
        factors = mitigation.update(summary.key)
        weight_name = pairs.get(summary.name)
        if factors is None or weight_name is None or not summary.mitigated:
            continue
        module = adapter.modules[module_weights[weight_name]]
        B, A = factors.B, factors.A
        if module.layer_type == "embedding":
            # The plan orients an embedding vocab x dim; PEFT stores A r x vocab, B dim x r.
            B, A = factors.A.T, factors.B.T
        tensors[module.A] = A.to(tensors[module.A].dtype).contiguous()
        tensors[module.B] = B.to(tensors[module.B].dtype).contiguous()
        if summary.new_rank != summary.rank:
            key = re.escape(module.module)
            r = int(summary.new_rank)
            rank_pattern[key] = r
            alpha = module.scale * (math.sqrt(r) if config.get("use_rslora") else r)
            alpha_pattern[key] = alpha
    config["rank_pattern"], config["alpha_pattern"] = rank_pattern, alpha_pattern
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    _write_note(out, mitigation, "adapter")
    return out


def _write_note(out: Path, mitigation: Mitigation, what: str) -> None:
    s = mitigation.settings
    totals = mitigation.totals()
    text = (
        f"# Intruder-mitigated {what}\n\n"
        f"Made by the weight-spectrum explorer from {mitigation.plan.tuned_label} on {mitigation.plan.base_label}: "
        f"intruder dimensions (Shuttleworth et al. 2024, arXiv 2410.21228) among the top {s.top_k} singular "
        f"vectors at eps = {s.eps:g} scaled by lambda = {s.lam:g} (rule {s.rule}, "
        f"{'exact rank r + n' if s.exact else 'truncated to rank r'}); "
        f"{totals['intruders_scaled']} intruders in {totals['matrices_with_intruders']} of "
        f"{totals['matrices']} matrices.\n"
    )
    (out / "MITIGATION.md").write_text(text, encoding="utf-8")


def zip_folder(folder: Path) -> bytes:
    """The files of ``folder`` as a zip (for a download button)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(folder).as_posix())
    return buffer.getvalue()


# --------------------------------------------------------------------------- dashboard job


def job_key(base: str, tuned: str, settings: MitigationSettings, tradeoff: bool, device: str) -> tuple:
    """The background job of one mitigation (what makes two requests the same)."""
    return ("mitigate", base, tuned, settings.signature(), bool(tradeoff), device)


def mitigation_job(
    resolver, base: str, tuned: str, settings: MitigationSettings, *, tradeoff: bool, device="auto", cache=None
):
    """A :mod:`analysis.jobs` job function running :func:`run` with progress and cancel."""
    from analysis.jobs import Progress

    def job_fn(job):
        start = time.perf_counter()

        def progress(done: int, total: int, what: str) -> None:
            job.report(Progress(done, total, what, time.perf_counter() - start))

        return run(
            resolver,
            base,
            tuned,
            settings,
            device=device,
            cache=cache,
            tradeoff=tradeoff,
            progress=progress,
            should_stop=job.should_stop,
        )

    return job_fn

"""The mitigation procedure: scale a fine-tune's intruder dimensions down, matrix by matrix.

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
so before and after are measured the same way as every other comparison
(:mod:`analysis.mitigation.run`); :mod:`analysis.mitigation.export` writes the result as a
PEFT adapter or a model folder, :mod:`analysis.mitigation.tradeoff` measures paper Fig. 8.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Literal

import numpy as np
import torch

from analysis.errors import AnalysisCancelled, InputError
from analysis.identity import IdentifiedMatrix, MatrixId
from analysis.plan import ComparisonPlan, LowRankDelta, MatrixPlan, TunedMatrix

Rule = Literal["peft", "top1"]
RULES: tuple[str, ...] = ("peft", "top1")


@dataclass(frozen=True)
class MitigationSettings:
    """How intruders are found and scaled; the defaults are PEFT's.

    ``lam`` scales the intruder components (1 keeps them, 0 removes them); intruders are
    sought among the top ``top_k`` singular vectors of ``W + dW`` at threshold ``eps``;
    ``rule`` picks all of them (``peft``) or the top one (``top1``); ``exact`` keeps rank
    ``r + n`` instead of truncating an adapter back to ``r``.
    """

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
        """The settings as one line, ``lam=...,k=...,eps=...,rule=...,exact=...`` (labels, job keys)."""
        return f"lam={self.lam:g},k={self.top_k},eps={self.eps:g},rule={self.rule},exact={self.exact}"


@dataclass
class MatrixMitigation(IdentifiedMatrix):
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

    id: MatrixId
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

    def detached(self) -> Mitigation:
        """The mitigation without its plan's loaders, to send to another process.

        The loaders and a full fine-tune's opened sources are closures over open files;
        :meth:`attached` puts them back there.
        """
        tensors = {key: replace(item, plan=None) for key, item in self._tensors.items()}
        return replace(self, plan=replace(self.plan, matrices=[], sources=None), _tensors=tensors)

    def attached(self, plan: ComparisonPlan) -> Mitigation:
        """A :meth:`detached` mitigation with the loaders of ``plan`` (the same pair planned again)."""
        matrices = {m.key: m for m in plan.matrices}
        missing = [key for key in self._tensors if key not in matrices]
        if missing:
            raise InputError(plan.tuned_label, f"changed since it was mitigated ({missing[0]} is gone): run it again")
        tensors = {key: replace(item, plan=matrices[key]) for key, item in self._tensors.items()}
        return replace(self, plan=plan, _tensors=tensors)

    @property
    def kind(self) -> str:
        """The plan's kind: ``full`` (a fine-tuned checkpoint) or ``adapter``."""
        return self.plan.kind

    def totals(self) -> dict[str, float]:
        """Totals over the matrices.

        Intruders scaled, ``||dW||_F`` before/after (root of the sum of squares), and the
        re-factorisation error likewise.
        """
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
        """The mitigated tuned weight of the matrix with this key, as the plan orients it.

        ``key`` is :attr:`MatrixMitigation.key`.
        """
        item = self._tensors[key]
        return _mitigated_tuned(item, self.settings.lam)

    def tuned_at(self, key: str, lam: float) -> torch.Tensor:
        """The mitigated tuned weight of matrix ``key`` at ``lam`` (for the trade-off).

        One code path whatever ``settings.lam`` is (the export's own factors at
        ``settings.lam`` come from PEFT's expressions, which differ in the last bits), so a
        point of the curve depends on the fine-tune, k, eps, the rule, exact and ``lam``
        only, and is cached under those (:func:`analysis.mitigation.tradeoff.evaluate_tradeoff`).
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
    """Step 4: ``update / scale`` as rank-``rank`` factors, scale kept.

    ``B = U sqrt(S)``, ``A = sqrt(S) V^T`` (PEFT shares the singular values equally).
    """
    U_dW, S_dW, V_dW = torch.linalg.svd(update / scale, full_matrices=False)
    B = U_dW[:, :rank] @ torch.diag(S_dW[:rank]).sqrt()
    A = torch.diag(S_dW[:rank]).sqrt() @ V_dW[:rank]
    return LowRankDelta(B.contiguous(), A.contiguous(), float(scale))


def scale_intruders(
    weight: torch.Tensor, components: tuple[torch.Tensor, torch.Tensor, torch.Tensor], lam: float
) -> torch.Tensor:
    """Step 3: ``W_t + (lam - 1) * sum_{j intruder} s_j u_j v_j^T`` (paper section 6).

    Parameters
    ----------
    weight : torch.Tensor of shape (out, in)
        The fine-tuned weight ``W + dW``.
    components : tuple of torch.Tensor
        ``(U_I, S_I, Vh_I)``: the intruders' singular vectors and values of ``weight``.
    lam : float
        1 keeps the intruders, 0 removes them.

    Returns
    -------
    torch.Tensor
        The mitigated weight (``weight`` itself when there is no intruder).
    """
    U, S, Vh = components
    if S.numel() == 0:
        return weight
    return weight + (lam - 1.0) * ((U * S) @ Vh)


def _refactor_at(item: _Mitigated, lam: float, exact: bool) -> LowRankDelta:
    original = item.original
    assert original is not None
    base = item.plan.load_base()
    merged = base + original.dense()
    mitigated = scale_intruders(merged, item.components, lam)
    rank = original.rank + (len(item.components[1]) if exact else 0)
    return refactor(mitigated - base, original.scale, min(rank, min(base.shape)))


def _mitigated_tuned(item: _Mitigated, lam: float) -> TunedMatrix:
    base = item.plan.load_base()
    if item.low_rank is not None:
        return TunedMatrix(base + item.low_rank.dense(), item.low_rank)
    tuned = item.plan.load_tuned().weight
    return TunedMatrix(scale_intruders(tuned, item.components, lam), None)


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
        id=plan.id,
        intruders=list(intruders),
        scores=scores.numpy().astype(np.float64),
        intruder_values=components[1].numpy().astype(np.float64),
        delta_fro_before=delta_before,
        delta_fro_exact=delta_before,
        delta_fro_after=delta_before,
        refactor_error=0.0,
        rank=rank,
        new_rank=rank,
    )
    if adapter_without_factors:
        # DoRA or a modules_to_save replacement: not a LoRA layer, left as it is.
        empty = (U[:, :0], S[:0], Vh[:0])
        summary.intruders, summary.intruder_values, summary.mitigated = [], np.zeros(0), False
        return summary, _Mitigated(plan, empty, None, None)
    if low_rank is None:  # a full fine-tune: W_mit = W_t + (lam - 1) * intruder part
        mitigated = scale_intruders(merged, components, settings.lam)
        summary.delta_fro_exact = summary.delta_fro_after = float(torch.linalg.norm(mitigated.double() - base.double()))
        return summary, _Mitigated(plan, components, None, None)
    if not intruders:
        # PEFT copies the factors unchanged when a layer has no intruder.
        return summary, _Mitigated(plan, components, low_rank, low_rank)
    W_mitigated = scale_intruders(merged, components, settings.lam)
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
        result._tensors[matrix.key] = tensors
        if progress is not None:
            progress(done + 1, total, matrix.key)
    result.seconds = time.perf_counter() - start
    return result


def mitigated_plan(mitigation: Mitigation) -> ComparisonPlan:
    """A plan whose tuned matrices are the mitigated ones, for the ordinary pipeline.

    No digests are given, so the pipeline hashes the weights it loads: the cache stays
    content-addressed and a mitigated matrix equal to the fine-tune's is found there.
    """
    plan = mitigation.plan
    matrices = [replace(m, load_tuned=partial(mitigation.tuned, m.key), digests=None) for m in plan.matrices]
    label = f"{plan.tuned_label} (mitigated {mitigation.settings.signature()})"
    summary = {**plan.summary, "label": f"{plan.summary.get('label', plan.tuned_label)} · mitigated"}
    summary["mitigation"] = {"settings": mitigation.settings.signature(), **mitigation.totals()}
    return replace(plan, tuned_label=label, matrices=matrices, summary=summary)

"""Mitigate a fine-tune and measure it before and after with the cached pipeline.

:func:`run` is what the command line (``python -m analysis mitigate``) and the dashboard's
Mitigate page call: plan the pair, mitigate every matrix (:mod:`analysis.mitigation.procedure`),
analyse the fine-tune and its mitigation the same way every comparison is analysed, and
(optionally) evaluate the trade-off curve (:mod:`analysis.mitigation.tradeoff`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from analysis.adapters import LoraAdapter
from analysis.mitigation.clock import StepClock, mitigation_phases
from analysis.mitigation.procedure import Mitigation, MitigationSettings, mitigate_plan, mitigated_plan
from analysis.mitigation.tradeoff import TRADEOFF_STEP, Tradeoff, evaluate_tradeoff, tradeoff_grid
from analysis.pair_metrics import AnalysisSettings
from analysis.pipeline import analyse_plan, model_result
from analysis.plan import ComparisonPlan
from analysis.results import DEFAULT_EPSILONS, ModelResult
from analysis.scheduler import torch_threads


def intruder_table(
    before: ModelResult, after: ModelResult, k: int, epsilons: Sequence[float] = DEFAULT_EPSILONS
) -> dict[str, list[int]]:
    """Total intruders among the top ``k`` at each eps, before and after.

    From the pipeline's results of the fine-tune and of the mitigated fine-tune.
    """
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
        """:func:`intruder_table` of this mitigation (``k`` defaults to the settings' ``top_k``)."""
        return intruder_table(self.before, self.after, k or self.mitigation.settings.top_k, epsilons)

    def to_json(self) -> dict:
        """Per matrix and in total, JSON-able (the CLI writes it as ``mitigation.json``)."""
        s = self.mitigation.settings
        after = {m.key: m for m in self.after.matrices}
        before = {m.key: m for m in self.before.matrices}
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
    """The plan mitigation works on.

    Every LoRA layer of an adapter (as PEFT's procedure does, including those outside the
    numbered blocks), the block matrices of a full fine-tune.
    """
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
    clock: StepClock | None = None,
) -> MitigationResult:
    """Plan, mitigate, analyse before/after and (``tradeoff``) evaluate the lambda grid.

    ``progress(done, total, step)`` counts matrices mitigated, then matrices analysed,
    then models evaluated; ``step`` names the phase and what just finished. A ``clock``
    (:class:`~analysis.mitigation.clock.StepClock`) is started on the run's phases once the
    pair is planned and marked at every step, before ``progress`` is called.
    """
    settings.check()
    plan = plan_for(resolver, base, tuned)
    n = len(plan.matrices)
    grid = tradeoff_grid(settings.lam) if tradeoff else ()
    curve_steps = len(grid) + 2 if tradeoff else 0
    total = 3 * n + curve_steps
    if clock is not None:  # every point but lambda = 1 (the fine-tune's) runs the model
        clock.start(mitigation_phases(plan, curve_steps, 2 + sum(1 for lam in grid if lam != 1.0)))
    if progress is not None:
        progress(0, total, "reading the models")

    def step(offset: int, phase: str) -> Callable[[int, int, str], None]:
        def report(done: int, _total: int, what: str) -> None:
            if clock is not None:
                clock.mark(offset + done)
            if progress is not None:
                progress(offset + done, total, f"{phase}: {what}")

        return report

    # One torch thread for the small SVDs and forward passes here: an OpenMP team waiting
    # for busy cores spins at its barriers and runs many times slower (see
    # analysis.pipeline.cpu_parallelism); the pipeline sets its own threads.
    with torch_threads(1):
        mitigation = mitigate_plan(plan, settings, progress=step(0, "scaling intruders"), should_stop=should_stop)
    result = analyse(
        mitigation, device=device, cache=cache, progress=step(n, "analysing before and after"), should_stop=should_stop
    )
    if tradeoff:
        with torch_threads(1):
            result.tradeoff = evaluate_tradeoff(
                resolver,
                base,
                tuned,
                mitigation,
                grid,
                progress=step(3 * n, TRADEOFF_STEP),
                work=clock.credit if clock is not None else None,
                should_stop=should_stop,
                cache=cache,
            )
    return result

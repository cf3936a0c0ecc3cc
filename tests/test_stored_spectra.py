"""The cache keeps decompositions; metrics of the update are derived when an entry is read.

A new or changed metric must not invalidate cached decompositions (issue 13): the pair
entry holds the update's singular values (float64), and effective rank, rank90, stable
rank and the update's norm come from them through :data:`analysis.metrics.UPDATE_METRICS`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from analysis import metrics
from analysis.cache import SpectrumCache
from analysis.identity import MatrixId
from analysis.pipeline import analyse_plan
from analysis.plan import ComparisonPlan, LowRankDelta, MatrixPlan, TunedMatrix


def _plans() -> list[MatrixPlan]:
    plans = []
    for i in range(3):
        g = torch.Generator().manual_seed(40 + i)
        base = torch.randn(96, 64, generator=g) / 8
        if i == 2:  # an adapter beside two full fine-tunes
            delta = LowRankDelta(torch.randn(96, 4, generator=g) * 0.1, torch.randn(4, 64, generator=g) * 0.1, 1.0)
            tuned, rank = TunedMatrix(base + delta.dense(), delta), 4
        else:
            tuned, rank = TunedMatrix(base + 0.05 * torch.randn(96, 64, generator=g)), None
        plans.append(
            MatrixPlan(
                MatrixId(f"m{i}", i, "q", (96, 64)), lambda b=base: b.clone(), lambda t=tuned: t, adapter_rank=rank
            )
        )
    return plans


def test_a_changed_metric_reuses_every_cached_decomposition(tmp_path, monkeypatch):
    plan = ComparisonPlan("b", "t", "full", _plans())
    first = SpectrumCache(tmp_path)
    before = list(analyse_plan(plan, device="cpu", cache=first))
    assert first.stats.computed == {"base": 3, "pair": 3, "base-top": 3, "measures": 3}

    # A metric redefined (here: the effective rank with a base-2 entropy).
    def effective_rank_bits(s: np.ndarray) -> float:
        p = s[s > 0] / s[s > 0].sum()
        return float(2 ** (-np.sum(p * np.log2(p))))

    monkeypatch.setitem(metrics.UPDATE_METRICS, "effective_rank", effective_rank_bits)
    monkeypatch.setitem(metrics.UPDATE_METRICS, "rank90", lambda s: metrics.rank_at_variance(s, 0.5))
    again = SpectrumCache(tmp_path)
    after = list(analyse_plan(plan, device="cpu", cache=again))
    assert again.stats.computed == {}  # nothing decomposed again
    assert again.stats.hits == 6  # each pair and its measures
    for old, new in zip(before, after, strict=True):
        s = new.delta_singular_values
        assert s.dtype == np.float64
        assert new.effective_rank == pytest.approx(effective_rank_bits(s), rel=1e-12)
        assert new.rank90 == metrics.rank_at_variance(s, 0.5) <= old.rank90
        assert new.stable_rank == old.stable_rank and new.delta_fro == old.delta_fro
        np.testing.assert_array_equal(new.intruder_scores, old.intruder_scores)


def test_derived_metrics_equal_those_of_a_float64_reference():
    (result,) = list(analyse_plan(ComparisonPlan("b", "t", "full", _plans()[:1]), device="cpu"))
    plan = _plans()[0]
    delta = plan.load_tuned().weight.double() - plan.load_base().double()
    s = np.linalg.svd(delta.numpy(), compute_uv=False)
    assert result.effective_rank == pytest.approx(metrics.effective_rank(s), rel=1e-9)
    assert result.rank90 == metrics.rank90(s)
    assert result.stable_rank == pytest.approx(metrics.stable_rank(s), rel=1e-9)
    assert result.delta_fro == pytest.approx(float(torch.linalg.matrix_norm(delta)), rel=1e-12)

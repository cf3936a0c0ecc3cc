"""The pipeline on in-memory plans: every field against float64 references, caching counted."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from analysis import metrics
from analysis.cache import SpectrumCache
from analysis.errors import AnalysisCancelled, InputError
from analysis.identity import MatrixId
from analysis.pair_metrics import AnalysisSettings
from analysis.pipeline import ProgressEvent, analyse_matrix, analyse_plan, model_result
from analysis.plan import ComparisonPlan, LowRankDelta, MatrixPlan, TunedMatrix
from analysis.report import to_report
from analysis.results import ComparisonResult

CPU = torch.device("cpu")


def make_plan(name: str, base: torch.Tensor, tuned: TunedMatrix, adapter_rank=None, layer=0) -> MatrixPlan:
    return MatrixPlan(
        MatrixId(name, layer, name.rsplit(".", 1)[-1], tuple(base.shape)),
        load_base=lambda: base.clone(),
        load_tuned=lambda: tuned,
        adapter_rank=adapter_rank,
    )


def random_pair(seed: int, m=48, n=32, rank=None):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(m, n, generator=g)
    if rank is None:
        return base, TunedMatrix(base + 0.2 * torch.randn(m, n, generator=g))
    delta = LowRankDelta(torch.randn(m, rank, generator=g), torch.randn(rank, n, generator=g), scale=0.5)
    return base, TunedMatrix(base + delta.dense(), delta)


def reference(base: torch.Tensor, tuned: torch.Tensor, k: int):
    """Float64 numpy, as the definitions read."""
    b, t = base.double().numpy(), tuned.double().numpy()
    U0, s0, _ = np.linalg.svd(b, full_matrices=False)
    Ut, st, _ = np.linalg.svd(t, full_matrices=False)
    Ud, sd, Vdt = np.linalg.svd(t - b, full_matrices=False)
    scores = np.abs(Ut[:, :k].T @ U0).max(axis=1)
    return {"s0": s0, "st": st, "sd": sd, "scores": scores, "Ud": Ud, "Vd": Vdt.T, "b": b}


@pytest.mark.parametrize("rank", [None, 3])
def test_matrix_result_matches_float64_reference(rank):
    base, tuned = random_pair(0, rank=rank)
    result = analyse_matrix(make_plan("blocks.0.q", base, tuned, adapter_rank=rank), device="cpu")
    ref = reference(base, tuned.weight, k=32)

    np.testing.assert_allclose(result.base_singular_values, ref["s0"], rtol=1e-4)
    np.testing.assert_allclose(result.tuned_singular_values, ref["st"], rtol=1e-4)
    n = len(result.delta_singular_values)
    np.testing.assert_allclose(result.delta_singular_values, ref["sd"][:n], rtol=1e-3, atol=1e-5 * ref["sd"][0])
    np.testing.assert_allclose(result.intruder_scores, ref["scores"], atol=1e-3)
    assert result.effective_rank == pytest.approx(metrics.effective_rank(ref["sd"][: rank or None]), rel=1e-4)
    assert result.rank90 == metrics.rank90(ref["sd"])
    assert result.stable_rank == pytest.approx(metrics.stable_rank(ref["sd"]), rel=1e-4)
    assert result.delta_fro == pytest.approx(np.linalg.norm(tuned.weight.double().numpy() - ref["b"]), rel=1e-4)
    r = result.amplification_rank
    assert r == (rank or metrics.rank90(ref["sd"]))
    proj = ref["Ud"][:, :r].T @ ref["b"] @ ref["Vd"][:, :r]
    assert result.amplification_factor == pytest.approx(np.linalg.norm(ref["sd"]) / np.linalg.norm(proj), rel=1e-3)
    assert result.similarity.shape == (32, 32)
    assert result.delta_left_vectors.shape == (48, min(n, 64))


def test_low_rank_path_equals_dense_path():
    base, tuned = random_pair(1, rank=4)
    fast = analyse_matrix(make_plan("a.q", base, tuned, adapter_rank=4), device="cpu")
    dense = analyse_matrix(make_plan("a.q", base, TunedMatrix(tuned.weight), adapter_rank=4), device="cpu")
    np.testing.assert_allclose(fast.delta_singular_values, dense.delta_singular_values[:4], rtol=1e-3)
    assert fast.rank90 == dense.rank90
    assert fast.effective_rank == pytest.approx(dense.effective_rank, rel=1e-3)
    assert fast.amplification_factor == pytest.approx(dense.amplification_factor, rel=1e-3)
    phi = metrics.subspace_similarity(
        torch.from_numpy(fast.delta_left_vectors[:, :4]).double(),
        torch.from_numpy(dense.delta_left_vectors[:, :4]).double(),
    )
    assert phi[3, 3] == pytest.approx(1.0, abs=1e-3)


def test_zero_update_gives_zero_metrics():
    base, _ = random_pair(2)
    result = analyse_matrix(make_plan("a.q", base, TunedMatrix(base.clone())), device="cpu")
    assert result.delta_fro == 0.0
    assert result.effective_rank == 0.0
    assert result.rank90 == 0
    assert result.intruder_counts(10, [0.5]) == [0]


def test_right_singular_vectors_option():
    base, tuned = random_pair(3)
    right = analyse_matrix(make_plan("a.q", base, tuned), device="cpu", settings=AnalysisSettings(side="right"))
    _, _, Vt = np.linalg.svd(tuned.weight.double().numpy(), full_matrices=False)
    _, _, V0 = np.linalg.svd(base.double().numpy(), full_matrices=False)
    expected = np.abs(Vt[:10] @ V0.T).max(axis=1)
    np.testing.assert_allclose(right.intruder_scores[:10], expected, atol=1e-3)


def test_base_spectra_are_computed_once_per_base(tmp_path):
    cache = SpectrumCache(tmp_path)
    base, tuned_a = random_pair(4)
    _, tuned_b = random_pair(5)
    tuned_b = TunedMatrix(base + (tuned_b.weight - random_pair(5)[0]))
    plans = [
        ComparisonPlan("base", label, "full", [make_plan("a.q", base, tuned)])
        for label, tuned in (("ft-a", tuned_a), ("ft-b", tuned_b))
    ]
    first = [list(analyse_plan(p, cache=cache, device="cpu"))[0] for p in plans]
    assert cache.stats.computed == {"pair": 2, "base": 1, "base-top": 1, "measures": 2}

    again = SpectrumCache(tmp_path)
    second = [list(analyse_plan(p, cache=again, device="cpu"))[0] for p in plans]
    assert again.stats.computed == {}  # everything came from disk
    assert again.stats.hits == 4  # each pair and its measures
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a.intruder_scores, b.intruder_scores)
        assert a.effective_rank == b.effective_rank


def test_progress_and_cancel():
    base, tuned = random_pair(6)
    plan = ComparisonPlan("b", "t", "full", [make_plan(f"l.{i}.q", base, tuned, layer=i) for i in range(4)])
    events: list[ProgressEvent] = []
    results = list(analyse_plan(plan, device="cpu", progress=events.append))
    assert [e.done for e in events] == [1, 2, 3, 4]
    assert all(e.total == 4 for e in events) and events[-1].eta_s == 0
    assert len(results) == 4

    stop_after = iter([False, False, True])
    with pytest.raises(AnalysisCancelled):
        list(analyse_plan(plan, device="cpu", should_stop=lambda: next(stop_after)))


def test_report_contract_fields():
    base, tuned = random_pair(7, rank=2)
    plan = ComparisonPlan("b", "t", "adapter", [make_plan("l.0.q", base, tuned, adapter_rank=2)], unmatched=["x.w"])
    model = model_result(plan, list(analyse_plan(plan, device="cpu")))
    report = to_report(ComparisonResult(base="b", top_k=10, epsilons=[0.1, 0.5, 0.9], models=[model]))
    assert report["base"] == "b" and report["top_k"] == 10 and report["epsilons"] == [0.1, 0.5, 0.9]
    (entry,) = report["models"]
    assert entry["source"] == "t" and entry["kind"] == "adapter" and entry["unmatched"] == ["x.w"]
    (m,) = entry["matrices"]
    assert set(m) >= {
        "name",
        "layer",
        "module",
        "shape",
        "intruders",
        "effective_rank",
        "rank90",
        "stable_rank",
        "delta_fro",
    }
    assert m["shape"] == [48, 32] and m["layer"] == 0 and len(m["intruders"]) == 3
    assert m["intruders"] == sorted(m["intruders"])  # counts grow with eps
    assert m["rank90"] <= 2 and 1 <= m["effective_rank"] <= 2 and math.isfinite(m["delta_fro"])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_a_clear_error(bad):
    base = torch.randn(12, 8, generator=torch.Generator().manual_seed(0))
    tuned = base.clone()
    tuned[2, 3] = bad
    with pytest.raises(InputError, match="the fine-tuned weight holds NaN or infinite values"):
        analyse_matrix(make_plan("layer.0.q.weight", base, TunedMatrix(tuned)), device="cpu")
    with pytest.raises(InputError, match="the base weight holds NaN"):
        analyse_matrix(make_plan("layer.0.q.weight", tuned, TunedMatrix(base)), device="cpu")

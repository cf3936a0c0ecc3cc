"""Figure builders and the tables behind them, on results from real small SVDs.

Every ``MatrixResult`` here is computed in the test from actual matrices with
``analysis.metrics`` (no hand-written numbers), with a known structure: a LoRA-like
update that adds a few strong new directions orthogonal to the base's top ones
(intruder dimensions, Shuttleworth et al. 2024) and a small dense full-rank
perturbation (full fine-tuning: none).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from analysis import figures, metrics, tables
from analysis.results import DEFAULT_EPSILONS, MatrixResult, ModelResult

OUT, IN = 48, 40


def matrix_result(
    name: str, layer: int, module: str, base: torch.Tensor, tuned: torch.Tensor, adapter_rank: int | None = None
) -> MatrixResult:
    """Every metric of one pair, straight from fp64 SVDs and ``analysis.metrics``."""
    U0, S0, _ = torch.linalg.svd(base, full_matrices=False)
    Ut, St, _ = torch.linalg.svd(tuned, full_matrices=False)
    Ud, Sd, Vdh = torch.linalg.svd(tuned - base, full_matrices=False)
    scores, best = metrics.intruder_scores(Ut[:, :20], U0)
    r90 = metrics.rank90(Sd)
    r = adapter_rank or r90
    fro = metrics.frobenius_norm(Sd)
    return MatrixResult(
        name=name,
        layer=layer,
        module=module,
        shape=tuple(base.shape),
        base_singular_values=S0.numpy(),
        tuned_singular_values=St.numpy(),
        delta_singular_values=Sd.numpy(),
        intruder_scores=scores,
        best_match=best,
        similarity=metrics.similarity_matrix(Ut, U0, 16),
        delta_left_vectors=Ud[:, :32].numpy().astype(np.float16),
        effective_rank=metrics.effective_rank(Sd),
        rank90=r90,
        stable_rank=metrics.stable_rank(Sd),
        delta_fro=fro,
        amplification_factor=metrics.amplification_factor(fro, Ud[:, :r], Vdh[:r].T, base),
        amplification_rank=r,
        adapter_rank=adapter_rank,
    )


def base_weight(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(OUT, IN, generator=g, dtype=torch.float64) / np.sqrt(IN)


def intruding_update(base: torch.Tensor, n_new: int, seed: int) -> torch.Tensor:
    """``n_new`` strong rank-1 directions orthogonal to the base's top 12 left vectors."""
    g = torch.Generator().manual_seed(seed)
    U0 = torch.linalg.svd(base, full_matrices=False)[0][:, :12]
    u = torch.randn(OUT, n_new, generator=g, dtype=torch.float64)
    u = torch.linalg.qr(u - U0 @ (U0.T @ u))[0]
    v = torch.linalg.qr(torch.randn(IN, n_new, generator=g, dtype=torch.float64))[0]
    return 5.0 * u @ v.T


def dense_update(seed: int, scale: float = 1e-3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(OUT, IN, generator=g, dtype=torch.float64)


MODULES = ("query", "value")


@pytest.fixture(scope="module")
def lora_model() -> ModelResult:
    """Layer 0 query gets 2 intruders, layer 1 value gets 1, the rest none (tiny updates)."""
    planted = {(0, "query"): 2, (1, "value"): 1}
    matrices = []
    for layer in range(2):
        for j, module in enumerate(MODULES):
            base = base_weight(10 * layer + j)
            n = planted.get((layer, module), 0)
            update = intruding_update(base, n, seed=layer + 7 * j) if n else dense_update(layer + j, 1e-4)
            name = f"encoder.layer.{layer}.attention.self.{module}.weight"
            matrices.append(matrix_result(name, layer, module, base, base + update, adapter_rank=4))
    summary = {"label": "LoRA run", "adapter": {"r": 4, "lora_alpha": 8}}
    return ModelResult(source="upload:abc", kind="adapter", matrices=matrices, summary=summary)


@pytest.fixture(scope="module")
def full_model() -> ModelResult:
    matrices = []
    for layer in range(2):
        for j, module in enumerate(MODULES):
            base = base_weight(10 * layer + j)
            name = f"encoder.layer.{layer}.attention.self.{module}.weight"
            matrices.append(matrix_result(name, layer, module, base, base + dense_update(100 + layer + j)))
    return ModelResult(source="/models/full", kind="full", matrices=matrices, summary={"label": "Full FT"})


def heatmaps(fig) -> list:
    return [t for t in fig.data if t.type == "heatmap"]


def test_planted_intruders_are_found_by_the_metrics(lora_model: ModelResult, full_model: ModelResult) -> None:
    assert [m.intruder_counts(10, [0.5])[0] for m in lora_model.matrices] == [2, 0, 0, 1]
    assert full_model.total_intruders(10, 0.5) == 0
    assert lora_model.total_intruders(10, 0.5) == 3


def test_overview_grid_shows_counts_per_layer_and_module(lora_model: ModelResult, full_model: ModelResult) -> None:
    fig = figures.overview_heatmaps([lora_model, full_model], "intruders", k=10, eps=0.5)
    lora, full = heatmaps(fig)
    assert list(lora.x) == ["query", "value"] and list(lora.y) == ["0", "1"]
    assert np.array_equal(np.asarray(lora.z), [[2, 0], [0, 1]])
    assert np.array_equal(np.asarray(full.z), [[0, 0], [0, 0]])
    # Each cell has a selectable point saying which fine-tune and matrix it is.
    lora_cells, full_cells = [t for t in fig.data if t.type == "scatter"]
    assert list(zip(lora_cells.x, lora_cells.y, strict=True))[3] == ("value", "1")
    assert list(lora_cells.customdata[3]) == [0, "encoder.layer.1.attention.self.value.weight"]
    assert list(full_cells.customdata[0]) == [1, "encoder.layer.0.attention.self.query.weight"]
    assert list(lora_cells.text) == ["2", "0", "0", "1"]
    titles = [a.text for a in fig.layout.annotations]
    assert titles == ["LoRA run<br><sup>LoRA r=4</sup>", "Full FT<br><sup>full FT</sup>"]
    assert fig.layout.coloraxis.cmax == 2


def test_overview_effective_rank_grid(lora_model: ModelResult) -> None:
    fig = figures.overview_heatmaps([lora_model], "effective_rank", k=10, eps=0.5)
    (grid,) = heatmaps(fig)
    # A 2-direction update of equal strength has effective rank 2.
    assert grid.z[0][0] == pytest.approx(2.0, abs=1e-6)
    assert grid.z[1][1] == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="metric must be one of"):
        figures.overview_heatmaps([lora_model], "nonsense", 10, 0.5)


def test_totals_figure(lora_model: ModelResult, full_model: ModelResult) -> None:
    fig = figures.totals_figure([lora_model, full_model], k=10, eps=0.5)
    assert [list(t.y) for t in fig.data] == [[3], [0]]
    assert fig.data[0].marker.pattern.shape == "/" and fig.data[1].marker.pattern.shape == ""


def test_similarity_figure_marks_intruder_rows(lora_model: ModelResult) -> None:
    matrix = lora_model.matrices[0]
    fig = figures.similarity_figure(matrix, k=10, eps=0.5, label="LoRA run")
    (sim,) = heatmaps(fig)
    # The heatmap follows k (at least 10 ranks), up to the N the engine keeps (16 here).
    assert np.asarray(sim.z).shape == (10, 10)
    np.testing.assert_allclose(np.asarray(sim.z), matrix.similarity[:10, :10], atol=1e-6)
    for k, side in ((3, 10), (12, 12), (16, 16), (100, 16)):
        (sim,) = heatmaps(figures.similarity_figure(matrix, k=k, eps=0.5))
        assert np.asarray(sim.z).shape == (side, side), k
    markers = [t for t in fig.data if t.type == "scatter"][0]
    assert list(markers.y) == [1, 2]  # the two planted directions are the top-2 tuned vectors
    bars = [t for t in fig.data if t.type == "bar"][0]
    assert len(bars.x) == 10 and max(bars.x[:2]) < 0.5 and min(bars.x[2:]) > 0.5
    assert bars.marker.color[:3] == (figures.INTRUDER_COLOR, figures.INTRUDER_COLOR, "#4c78a8")
    assert "2 intruders in the top 10 at ε = 0.5" in fig.layout.title.text
    assert any(s.x0 == 0.5 and s.x1 == 0.5 for s in fig.layout.shapes)  # the eps line


def test_reduce_heatmap_keeps_block_maxima() -> None:
    z = np.zeros((300, 250))
    z[137, 5] = 0.9
    reduced, block = figures.reduce_heatmap(z, max_side=100)
    assert block == 3 and reduced.shape == (100, 84)
    assert reduced[137 // 3, 5 // 3] == 0.9 and reduced.sum() == pytest.approx(0.9)
    same, block = figures.reduce_heatmap(np.eye(5), max_side=100)
    assert block == 1 and np.array_equal(same, np.eye(5))


def test_large_similarity_heatmap_is_reduced_before_the_browser(lora_model: ModelResult) -> None:
    big = lora_model.matrices[0]
    big = MatrixResult(**{**big.__dict__, "similarity": np.random.default_rng(0).random((512, 512))})
    (sim,) = heatmaps(figures.similarity_figure(big, k=512, eps=0.5))
    assert np.asarray(sim.z).shape == (128, 128) and sim.dx == 4


def test_sweep_figure_sums_over_matrices(lora_model: ModelResult, full_model: ModelResult) -> None:
    fig = figures.sweep_figure([lora_model, full_model], k=10, epsilons=DEFAULT_EPSILONS, eps=0.5)
    lora, full = fig.data
    assert list(lora.x) == list(DEFAULT_EPSILONS)
    assert lora.y[DEFAULT_EPSILONS.index(0.5)] == 3
    assert list(full.y[:8]) == [0] * 8  # no intruders for full FT at small eps
    assert list(lora.y) == sorted(lora.y)  # counts never fall as eps grows
    # Curves on zero must not hide each other: own dash, marker and size, room below zero.
    assert lora.line.dash != full.line.dash and lora.marker.symbol != full.marker.symbol
    assert full.marker.size < lora.marker.size
    assert fig.layout.yaxis.range[0] < 0
    only_first = figures.sweep_figure([lora_model], 10, [0.5], matrices={lora_model.matrices[0].name})
    assert list(only_first.data[0].y) == [2]


def test_breakdown_by_layer_and_module(lora_model: ModelResult) -> None:
    by_layer = figures.breakdown_figure([lora_model], k=10, eps=0.5, by="layer")
    assert list(by_layer.data[0].x) == ["0", "1"] and list(by_layer.data[0].y) == [2, 1]
    by_module = figures.breakdown_figure([lora_model], k=10, eps=0.5, by="module")
    assert list(by_module.data[0].x) == ["query", "value"] and list(by_module.data[0].y) == [2, 1]
    with pytest.raises(ValueError):
        tables.breakdown_table([lora_model], 10, 0.5, by="head")


def test_effective_rank_figure_tells_full_ft_and_lora_apart(lora_model: ModelResult, full_model: ModelResult) -> None:
    fig = figures.effective_rank_figure([lora_model, full_model], "rank90")
    lines = [t for t in fig.data if t.type == "scatter"]
    assert len(lines) == 4  # 2 fine-tunes x 2 module panels
    lora_query, lora_value, full_query, _ = lines
    assert lora_query.name == "LoRA run (LoRA r=4)" and lora_query.line.dash != full_query.line.dash
    assert lora_query.marker.symbol != full_query.marker.symbol
    assert fig.layout.yaxis.type == "log"  # the default: rank 1 and rank 300 both readable
    assert figures.effective_rank_figure([lora_model, full_model], "rank90", log_y=False).layout.yaxis.type != "log"
    assert lora_query.y[0] == 2 and lora_value.y[1] == 1  # the planted 2- and 1-direction updates
    assert full_query.y[0] > 10  # a dense update needs many directions for 90% of its energy
    assert [s.y0 for s in fig.layout.shapes] == [4, 4]  # LoRA rank line in both panels


def test_spectrum_figure_marks_intruders_where_they_rank(lora_model: ModelResult) -> None:
    matrix = lora_model.matrices[0]
    fig = figures.spectrum_figure(matrix, k=10, eps=0.5)
    tuned, base, update, intr = fig.data
    assert fig.layout.yaxis.type == "log"
    # The base is drawn over the tuned spectrum, dashed and in another colour.
    assert base.line.dash == "dash" and tuned.line.dash == "solid" and base.line.color != tuned.line.color
    assert all("µ" not in t and "m" not in t for t in fig.layout.yaxis.ticktext)
    np.testing.assert_allclose(tuned.y, matrix.tuned_singular_values)
    assert list(intr.x) == [1, 2]
    np.testing.assert_allclose(intr.y, matrix.tuned_singular_values[:2])
    assert list(intr.text) == ["#1", "#2"]


def test_long_spectra_are_thinned_but_keep_intruders() -> None:
    idx = figures._log_sample(100_000, keep=[5000], max_points=500)
    assert len(idx) <= 501 and 5000 in idx and idx[0] == 0 and idx[-1] == 99_999


def test_subspace_similarity_of_an_update_with_itself_and_with_another(
    lora_model: ModelResult, full_model: ModelResult
) -> None:
    a = lora_model.matrices[0]
    phi = tables.subspace_similarity(a, a)
    assert phi.shape == (2, 2)  # only the update's 2 real directions are compared
    np.testing.assert_allclose(np.diag(phi), 1.0, atol=1e-3)
    cross = tables.subspace_similarity(a, full_model.matrices[0])
    assert cross.shape == (2, 32)
    # The planted directions are random with respect to a dense update: phi(1, 1) is small,
    # and phi(i, 32) is the share of P_i inside a 32 of 48 dims subspace.
    assert cross[0, 0] < 0.3 and 0.4 < cross[1, 31] < 0.95
    fig = figures.subspace_figure(cross, "LoRA run", "Full FT", a.name)
    assert "left singular vectors of ΔW" in fig.layout.title.text
    np.testing.assert_allclose(np.asarray(fig.data[0].z), cross)


def test_amplification_table_and_figure(lora_model: ModelResult) -> None:
    table = tables.amplification_table([lora_model])
    assert list(table["r"]) == [4, 4, 4, 4]
    # Planted directions are orthogonal to W's top directions: strongly amplified.
    assert table["amplification_factor"].iloc[0] > 5
    fig = figures.amplification_figure([lora_model])
    # One facet per module, layers along x, matrices named by their short label.
    query, value = fig.data
    np.testing.assert_allclose(query.y, table.loc[table["module"] == "query", "amplification_factor"])
    assert list(query.customdata) == ["L0 query", "L1 query"] and list(value.x) == ["0", "1"]
    assert fig.layout.yaxis.type == "log"


def test_matrix_table_is_what_the_csv_holds(lora_model: ModelResult) -> None:
    table = tables.matrix_table([lora_model], k=10, eps=0.5)
    assert list(table["intruders"]) == [2, 0, 0, 1]
    assert set(table["method"]) == {"LoRA r=4"} and list(table["layer"]) == ["0", "0", "1", "1"]
    csv = table.to_csv(index=False)
    assert csv.splitlines()[0].startswith("model,method,matrix,layer,module,shape,intruders,effective_rank")


def test_labels_and_methods() -> None:
    merged = ModelResult(source="demo:lora-r8", kind="full", summary={"label": "LoRA r=8", "lora_rank": 8})
    rs = ModelResult(source="x", kind="adapter", summary={"adapter": {"r": 16, "use_rslora": True}})
    assert tables.training_method(merged) == "LoRA r=8, merged"
    assert tables.training_method(rs) == "rsLoRA r=16"
    assert tables.model_labels([rs, rs]) == ["x", "x (2)"]
    assert tables.module_order(["down", "zeta", "query", "up", "alpha"]) == ["query", "up", "down", "alpha", "zeta"]


def test_chart_config_names_the_png() -> None:
    config = figures.chart_config("overview-intruders")
    assert config["toImageButtonOptions"] == {"format": "png", "filename": "overview-intruders", "scale": 2}


def test_empty_results_give_a_message_not_an_error() -> None:
    empty = ModelResult(source="x", kind="full")
    fig = figures.overview_heatmaps([empty], "intruders", 10, 0.5)
    assert fig.layout.annotations[0].text == "No matrices analysed yet"
    assert figures.sweep_figure([], 10, [0.5]).layout.annotations[0].text == "No fine-tunes analysed yet"


def test_a_one_point_series_is_a_marker(lora_model: ModelResult) -> None:
    """A rank-1 update has one singular value: a line through one point is invisible."""
    m = lora_model.matrices[0]
    rank1 = MatrixResult(**{**m.__dict__, "delta_singular_values": np.array([3.0] + [0.0] * 39)})
    update = figures.spectrum_figure(rank1, k=10, eps=0.5).data[2]
    assert update.mode == "markers" and list(update.y) == [3.0]


def test_log_ticks_are_clean_numbers() -> None:
    values, text = figures.log_ticks(3e-5, 40.0)
    assert text == ["1e-4", "0.001", "0.01", "0.1", "1", "10"] and values[0] == pytest.approx(1e-4)
    values, text = figures.log_ticks(1.5, 60.0)  # under two decades: 2 and 5 added, still labelled
    assert text == ["2", "5", "10", "20", "50"]
    _, text = figures.log_ticks(1e-12, 1e6)  # many decades: at most about 8 labels
    assert len(text) <= 8 and all("µ" not in t for t in text)


def test_many_fine_tunes_and_layers_stay_apart(lora_model: ModelResult, full_model: ModelResult) -> None:
    """Eight fine-tunes: eight colours, dashes and markers; six modules wrap into rows."""
    models = [ModelResult(**{**m.__dict__, "source": f"m{i}"}) for i, m in enumerate([lora_model, full_model] * 4)]
    fig = figures.sweep_figure(models, 10, DEFAULT_EPSILONS)
    styles = {(t.line.color, t.line.dash, t.marker.symbol) for t in fig.data}
    assert len(fig.data) == 8 and len(styles) == 8 and len({t.name for t in fig.data}) == 8
    six = [
        MatrixResult(**{**m.__dict__, "name": f"{mod}.{m.layer}", "module": mod})
        for m in lora_model.matrices
        for mod in ("query", "key", "value", "attn_out", "mlp_in", "mlp_out")
    ]
    grid = figures.effective_rank_figure([ModelResult(**{**lora_model.__dict__, "matrices": six})])
    assert {t.xaxis for t in grid.data} == {"x", "x2", "x3", "x4", "x5", "x6"}
    assert grid.layout.xaxis4.domain == grid.layout.xaxis.domain  # the fourth panel starts a second row


def test_subspace_opens_on_two_adapters_of_different_rank() -> None:
    def model(name: str, r: int | None) -> ModelResult:
        return ModelResult(source=name, kind="adapter" if r else "full", summary={"adapter": {"r": r}} if r else {})

    demo = [model("full", None), model("r1", 1), model("r8", 8), model("r64", 64)]
    assert tables.subspace_default_pair(demo) == (2, 3)  # r=8 against r=64, as in Hu et al.
    assert tables.subspace_default_pair(demo[:3]) == (1, 2)
    assert tables.subspace_default_pair(demo[:2]) == (0, 1)
    assert tables.subspace_default_pair(demo[:1]) is None

"""Figure builders and the tables behind them, on results from real small SVDs.

Every ``MatrixResult`` here is computed in the test from actual matrices with
``analysis.metrics`` (no hand-written numbers), with a known structure: a LoRA-like
update that adds a few strong new directions orthogonal to the base's top ones
(intruder dimensions, Shuttleworth et al. 2024) and a small dense full-rank
perturbation (full fine-tuning: none).
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from analysis import metrics
from analysis.identity import MatrixId
from analysis.results import DEFAULT_EPSILONS, MatrixResult, ModelResult
from charts import comparison, matrix_tables, overview, rl_measures, series, series_tables, spectra, style, tables

OUT, IN = 48, 40


def matrix_result(
    name: str,
    layer: int | None,
    module: str,
    base: torch.Tensor,
    tuned: torch.Tensor,
    adapter_rank: int | None = None,
    *,
    stack: str | None = None,
    expert: int | None = None,
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
        MatrixId(name, layer, module, tuple(base.shape), stack=stack, expert=expert),
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


def panel_cells(fig) -> list[dict]:
    """Every cell of an overview panel as the browser gets it: the selectable point's
    customdata, the row and column labels its position shows, and the heatmap value there."""
    heat, points = fig.data[0], fig.data[-1]  # between them, the words on the cells (if any)
    z = np.asarray(heat.z, dtype=float)
    rows = dict(zip(fig.layout.yaxis.tickvals, fig.layout.yaxis.ticktext, strict=True))
    columns = dict(zip(fig.layout.xaxis.tickvals, fig.layout.xaxis.ticktext, strict=True))
    return [
        {
            "model": c[0],
            "key": c[1],
            "name": c[2],
            "label": c[3],
            "text": c[4],
            "row": rows.get(y),
            "column": columns.get(x),
            "z": z[y, x],
        }  # fmt: skip
        for x, y, c in zip(points.x, points.y, points.customdata, strict=True)
    ]


def test_overview_grid_shows_counts_per_layer_and_module(lora_model: ModelResult, full_model: ModelResult) -> None:
    (section,) = overview.overview_sections([lora_model, full_model], "intruders", k=10, eps=0.5)
    assert section.model_indices == [0, 1] and section.columns == 2
    lora, full = section.panels
    assert list(lora.layout.xaxis.ticktext) == ["query", "value"] and list(lora.layout.yaxis.ticktext) == ["0", "1"]
    assert np.array_equal(np.asarray(lora.data[0].z), [[2, 0], [0, 1]])
    assert np.array_equal(np.asarray(full.data[0].z), [[0, 0], [0, 0]])
    # Each cell has a selectable point saying which fine-tune and matrix it is.
    cells = panel_cells(lora)
    assert cells[3] == {
        "model": 0,
        "key": "encoder.layer.1.attention.self.value.weight",
        "name": "encoder.layer.1.attention.self.value.weight",
        "label": "L1 value",
        "text": "1",
        "row": "1",
        "column": "value",
        "z": 1.0,
    }
    assert panel_cells(full)[0]["model"] == 1 and panel_cells(full)[0]["key"].endswith(
        "layer.0.attention.self.query.weight"
    )
    assert [c["text"] for c in cells] == ["2", "0", "0", "1"]
    # How each was trained, below its name, only where the name does not say it already.
    assert [p.layout.title.text for p in section.panels] == ["LoRA run<br><sup>LoRA r=4</sup>", "Full FT"]
    assert lora.layout.coloraxis.cmax == full.layout.coloraxis.cmax == 2
    assert overview.overview_title("intruders", 10, 0.5) == "Intruder dimensions (top 10, ε = 0.5)"


def test_every_overview_panel_puts_layer_zero_on_top(lora_model: ModelResult, full_model: ModelResult) -> None:
    """The upside-down bug (only the first panel's layer axis was reversed): every panel
    sets the same explicit range, so the row labelled 0 is the top row everywhere."""
    models = [lora_model, full_model, lora_model, full_model]
    (section,) = overview.overview_sections(models, "intruders", k=10, eps=0.5)
    assert len(section.panels) == 4 and section.columns == 2  # two rows of two, none alone
    for panel in section.panels:
        assert list(panel.layout.yaxis.range) == [1.5, -0.5] and panel.layout.yaxis.autorange is False
        assert all(c["row"] == c["key"].split(".")[2] for c in panel_cells(panel))  # encoder.layer.<L>...
    assert len({p.layout.height for p in section.panels}) == 1


def test_overview_effective_rank_grid(lora_model: ModelResult) -> None:
    (section,) = overview.overview_sections([lora_model], "effective_rank", k=10, eps=0.5)
    grid = section.panels[0].data[0]
    # A 2-direction update of equal strength has effective rank 2.
    assert grid.z[0][0] == pytest.approx(2.0, abs=1e-6)
    assert grid.z[1][1] == pytest.approx(1.0, abs=1e-6)
    words = next(t for t in section.panels[0].data if t.meta and t.meta["role"] == "cell-text")
    z = np.asarray(grid.z, dtype=float)
    assert list(words.text) == [
        overview.cell_label(z[y, x], "effective_rank") for x, y in zip(words.x, words.y, strict=True)
    ]
    assert words.text[0] == "2.0" and max(len(t) for t in words.text) <= 4  # 34.x is written "34"
    with pytest.raises(ValueError, match="metric must be one of"):
        overview.overview_sections([lora_model], "nonsense", 10, 0.5)


@pytest.fixture(scope="module")
def proto(lora_model: ModelResult) -> MatrixResult:
    return lora_model.matrices[0]


def _family(proto: MatrixResult, identities: list[tuple], seed: int, name) -> ModelResult:
    """A fine-tune with one matrix per identity: real metrics of one pair, each matrix
    with its own best-match scores (so the counts differ from cell to cell)."""
    rng = np.random.default_rng(seed)
    matrices = [
        replace(
            proto,
            id=MatrixId(name(stack, layer, module, expert), layer, module, proto.shape, stack=stack, expert=expert),
            intruder_scores=rng.random(20),
        )
        for stack, layer, module, expert in identities
    ]
    return ModelResult(source=f"family-{seed}", kind="full", matrices=matrices, summary={"label": f"run {seed}"})


ATTENTION = ("query", "key", "value", "attn_out")
T5_ENCODER = ("query", "key", "value", "self_attn_out", "mlp_in", "mlp_out")
T5_DECODER = (*T5_ENCODER[:4], "cross_query", "cross_key", "cross_value", "cross_attn_out", "mlp_in", "mlp_out")
#: Matrix identities (stack, layer, module, expert) of the families the engine reads.
FAMILIES: dict[str, list[tuple]] = {
    "dense decoder": [(None, n, m, None) for n in range(6) for m in (*ATTENTION, "gate", "up", "down")],
    "encoder": [(None, n, m, None) for n in range(6) for m in (*ATTENTION, "mlp_in", "mlp_out")],
    "t5": [("encoder", n, m, None) for n in range(2) for m in T5_ENCODER]
    + [("decoder", n, m, None) for n in range(2) for m in T5_DECODER],
    "moe": [(None, n, m, None) for n in range(2) for m in (*ATTENTION, "router", "shared_up", "shared_down")]
    + [(None, n, m, e) for n in range(2) for m in ("gate", "up", "down") for e in range(8)],
    "vlm": [("vision", n, m, None) for n in range(3) for m in ("qkv", "attn_out", "mlp_in", "mlp_out")]
    + [("language", n, m, None) for n in range(2) for m in (*ATTENTION, "gate", "up", "down")],
}
#: Grids the overview draws for each family.
FAMILY_SECTIONS = {
    "dense decoder": ["layer × module"],
    "encoder": ["layer × module"],
    "t5": ["encoder: layer × module", "decoder: layer × module"],
    "moe": ["layer × module", *(f"experts of {m}: layer × expert" for m in ("gate", "up", "down"))],
    "vlm": ["vision: layer × module", "language: layer × module"],
}


def _tensor_name(stack, layer, module, expert) -> str:
    """A fused expert tensor holds every expert under one name (``experts.down_proj``)."""
    where = f"{stack or 'model'}.layers.{layer}."
    return where + (f"mlp.experts.{module}_proj" if expert is not None else f"{module}.weight")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_overview_cells_count_every_matrix_once(family: str, proto: MatrixResult) -> None:
    """No cell holds two matrices and no matrix is missing, for every family's shape:
    one cell per matrix of every fine-tune, at the row and column its identity names."""
    full = _family(proto, FAMILIES[family], 1, _tensor_name)
    # A second fine-tune that changed only the attention and the first layer's rest.
    partial = _family(proto, [i for i in FAMILIES[family] if i[1] == 0 or "att" in i[2]], 500, _tensor_name)
    models = [full, partial]
    sections = overview.overview_sections(models, "intruders", k=10, eps=0.5)
    assert [s.title for s in sections] == FAMILY_SECTIONS[family]
    cells = [cell for s in sections for panel in s.panels for cell in panel_cells(panel)]
    drawn = [(c["model"], c["key"]) for c in cells]
    expected = [(i, m.key) for i, model in enumerate(models) for m in model.matrices]
    assert len(drawn) == len(set(drawn)) == len(expected) and set(drawn) == set(expected)
    for s in sections:  # one heatmap value per selectable point, none elsewhere
        for panel in s.panels:
            assert np.count_nonzero(~np.isnan(np.asarray(panel.data[0].z, dtype=float))) == len(panel.data[-1].x)
    by_key = {(i, m.key): m for i, model in enumerate(models) for m in model.matrices}
    for cell in cells:
        m = by_key[(cell["model"], cell["key"])]
        assert cell["row"] == str(m.layer) and cell["label"] == m.short_label and cell["name"] == m.name
        assert cell["column"] == (m.module if m.expert is None else str(m.expert))
        assert cell["z"] == m.intruder_counts(10, [0.5])[0]


def test_moe_keys_tell_experts_of_one_fused_tensor_apart(proto: MatrixResult) -> None:
    model = _family(proto, FAMILIES["moe"], 3, _tensor_name)
    experts = [m for m in model.matrices if m.expert is not None and m.layer == 0 and m.module == "down"]
    assert len({m.name for m in experts}) == 1 and len({m.key for m in experts}) == 8
    assert experts[5].key == "model.layers.0.mlp.experts.down_proj#5"
    assert tables.describe_matrix(experts[5]) == "layer 0 · down · expert 5"
    assert tables.matrix_title(experts[5]) == "model.layers.0.mlp.experts.down_proj · expert 5"
    t5 = _family(proto, FAMILIES["t5"], 4, _tensor_name)
    cross = next(m for m in t5.matrices if m.module == "cross_attn_out")
    assert tables.describe_matrix(cross) == "decoder · layer 0 · cross_attn_out"
    # Picker order: stack, layer, module order, expert.
    ordered = tables.identity_order(t5.matrices)
    assert [m.stack for m in ordered[:6]] == ["encoder"] * 6 and ordered[-1].identity == ("decoder", 1, "mlp_out", None)


def test_overview_stays_readable_with_eight_fine_tunes_and_a_hundred_layers(proto: MatrixResult) -> None:
    identities = [(None, n, m, None) for n in range(100) for m in (*ATTENTION, "gate", "up", "down")]
    models = [_family(proto, identities, f, _tensor_name) for f in range(8)]
    (section,) = overview.overview_sections(models, "intruders", k=10, eps=0.5)
    assert len(section.panels) == 8 and section.columns == 3
    one = overview.overview_sections(models[:1], "intruders", k=10, eps=0.5)[0].panels[0]
    panel = section.panels[0]
    assert panel.layout.height == one.layout.height < 1000  # the height depends on layers, not on fine-tunes
    assert list(panel.layout.xaxis.ticktext) == [*ATTENTION, "gate", "up", "down"]  # every module named
    assert len(panel.layout.yaxis.tickvals) <= overview.OVERVIEW_MAX_TICKS
    assert len(panel.data) == 2  # no unreadable cell text in 7-pixel rows: grid and points only
    assert len(panel_cells(panel)) == 700
    six = overview.overview_sections([models[0]], "intruders", 10, 0.5)
    small = _family(proto, FAMILIES["dense decoder"], 2, _tensor_name)
    assert overview.overview_sections([small], "intruders", 10, 0.5)[0].panels[0].data[1].meta["role"] == "cell-text"
    assert six[0].columns == 1


def test_overview_figure_json_names_each_cell(lora_model: ModelResult) -> None:
    (section,) = overview.overview_sections([lora_model], "intruders", k=10, eps=0.5)
    points = json.loads(section.panels[0].to_json())["data"][-1]  # what the browser gets
    assert points["customdata"][0] == [0, lora_model.matrices[0].name, lora_model.matrices[0].name, "L0 query", "2"]
    assert "%{customdata[2]}" in points["hovertemplate"] and "%{customdata[3]}" in points["hovertemplate"]


def test_totals_figure(lora_model: ModelResult, full_model: ModelResult) -> None:
    fig = overview.totals_figure([lora_model, full_model], k=10, eps=0.5)
    assert [list(t.y) for t in fig.data] == [[3], [0]]
    assert fig.data[0].marker.pattern.shape == "/" and fig.data[1].marker.pattern.shape == ""
    first, below = fig.layout.title.text.split("<br>")  # short first line: a phone cut the long one
    assert first == "Intruder dimensions per fine-tune" and "top 10, ε = 0.5" in below


def test_similarity_figure_marks_intruder_rows(lora_model: ModelResult) -> None:
    matrix = lora_model.matrices[0]
    fig = spectra.similarity_figure(matrix, k=10, eps=0.5, label="LoRA run")
    (sim,) = heatmaps(fig)
    # The heatmap follows k (at least 10 ranks), up to the N the engine keeps (16 here).
    assert np.asarray(sim.z).shape == (10, 10)
    np.testing.assert_allclose(np.asarray(sim.z), matrix.similarity[:10, :10], atol=1e-6)
    for k, side in ((3, 10), (12, 12), (16, 16), (100, 16)):
        (sim,) = heatmaps(spectra.similarity_figure(matrix, k=k, eps=0.5))
        assert np.asarray(sim.z).shape == (side, side), k
    markers = [t for t in fig.data if t.type == "scatter"][0]
    assert list(markers.y) == [1, 2]  # the two planted directions are the top-2 tuned vectors
    bars = [t for t in fig.data if t.type == "bar"][0]
    assert len(bars.x) == 10 and max(bars.x[:2]) < 0.5 and min(bars.x[2:]) > 0.5
    assert bars.marker.color[:3] == (style.INTRUDER_COLOR, style.INTRUDER_COLOR, "#4c78a8")
    assert "2 intruders in the top 10 at ε = 0.5" in fig.layout.title.text
    assert any(s.x0 == 0.5 and s.x1 == 0.5 for s in fig.layout.shapes)  # the eps line


def test_similarity_figure_keeps_its_labels_apart(lora_model: ModelResult) -> None:
    """Seen in the browser: the colour bar sat on the heatmap's x-axis title, and the ε
    label of the dashed line hid under the bottom bar. The colour bar is placed in the
    figure's own coordinates inside a bottom margin that holds both; ε is in the axis title;
    the count comes before the long tensor name, which has lines of its own (a phone cuts
    the end of a line)."""
    matrix = lora_model.matrices[0]
    fig = spectra.similarity_figure(matrix, k=10, eps=0.35, label="LoRA run")
    (sim,) = heatmaps(fig)
    bar = sim.colorbar
    assert bar.orientation == "h" and bar.yref == "container" and bar.yanchor == "bottom" and bar.y < 0.1
    assert fig.layout.margin.b >= 100
    assert not fig.layout.annotations or all("ε" not in (a.text or "") for a in fig.layout.annotations)
    assert "ε = 0.35" in fig.layout.xaxis2.title.text
    subtitle, *name = fig.layout.title.text.split("<sup>")[1:]
    assert subtitle.startswith("0 intruders in the top 10 at ε = 0.35</sup>")
    assert "".join(n.replace("</sup>", "").replace("<br>", "") for n in name) == matrix.name


def test_mitigation_spectra_have_clean_log_ticks_and_a_short_title(lora_model: ModelResult) -> None:
    """Seen in the browser: Plotly's own log ticks printed "5, 2, 1, 5, 2 ..." on both
    axes, and the title was the whole tensor name (cut on a phone)."""
    from charts import mitigation as figures_mitigate

    matrix = lora_model.matrices[0]
    unscaled = figures_mitigate.spectra_figure(matrix, matrix, [], label="LoRA run")  # every rank, log axes
    for axis in (unscaled.layout.xaxis, unscaled.layout.yaxis):
        assert axis.type == "log" and axis.tickvals
        mantissas = {round(v / 10 ** math.floor(math.log10(v)), 6) for v in map(float, axis.ticktext)}
        assert mantissas <= {1.0, 2.0, 5.0}, axis.ticktext  # 1-2-5 steps only
    fig = figures_mitigate.spectra_figure(matrix, matrix, [0, 1], label="LoRA run")
    assert fig.layout.title.text.startswith(f"LoRA run: {matrix.short_label}<br>")
    # Scaled components: linear axes from 0 over the top ranks around them, whole ranks from 1.
    assert list(fig.layout.xaxis.range) == [0.5, 24.5] and fig.layout.xaxis.tickvals[0] == 1
    assert fig.layout.yaxis.range[0] == 0
    base, tuned, mitigated, scaled = fig.data
    assert base.line.width > tuned.line.width  # the base stays visible under the others
    assert list(scaled.x) == [1, 2]


def test_reduce_heatmap_keeps_block_maxima() -> None:
    z = np.zeros((300, 250))
    z[137, 5] = 0.9
    reduced, block = style.reduce_heatmap(z, max_side=100)
    assert block == 3 and reduced.shape == (100, 84)
    assert reduced[137 // 3, 5 // 3] == 0.9 and reduced.sum() == pytest.approx(0.9)
    same, block = style.reduce_heatmap(np.eye(5), max_side=100)
    assert block == 1 and np.array_equal(same, np.eye(5))


def test_large_similarity_heatmap_is_reduced_before_the_browser(lora_model: ModelResult) -> None:
    big = lora_model.matrices[0]
    big = replace(big, similarity=np.random.default_rng(0).random((512, 512)))
    (sim,) = heatmaps(spectra.similarity_figure(big, k=512, eps=0.5))
    assert np.asarray(sim.z).shape == (128, 128) and sim.dx == 4


def test_sweep_figure_sums_over_matrices(lora_model: ModelResult, full_model: ModelResult) -> None:
    fig = comparison.sweep_figure([lora_model, full_model], k=10, epsilons=DEFAULT_EPSILONS, eps=0.5)
    lora, full = fig.data
    assert list(lora.x) == list(DEFAULT_EPSILONS)
    assert lora.y[DEFAULT_EPSILONS.index(0.5)] == 3
    assert list(full.y[:8]) == [0] * 8  # no intruders for full FT at small eps
    assert list(lora.y) == sorted(lora.y)  # counts never fall as eps grows
    # Curves on zero must not hide each other: own dash, marker and size, room below zero.
    assert lora.line.dash != full.line.dash and lora.marker.symbol != full.marker.symbol
    assert full.marker.size < lora.marker.size
    assert fig.layout.yaxis.range[0] < 0
    only_first = comparison.sweep_figure([lora_model], 10, [0.5], matrices={lora_model.matrices[0].name})
    assert list(only_first.data[0].y) == [2]


def test_breakdown_by_layer_and_module(lora_model: ModelResult) -> None:
    by_layer = comparison.breakdown_figure([lora_model], k=10, eps=0.5, by="layer")
    assert list(by_layer.data[0].x) == ["0", "1"] and list(by_layer.data[0].y) == [2, 1]
    by_module = comparison.breakdown_figure([lora_model], k=10, eps=0.5, by="module")
    assert list(by_module.data[0].x) == ["query", "value"] and list(by_module.data[0].y) == [2, 1]
    with pytest.raises(ValueError):
        tables.breakdown_table([lora_model], 10, 0.5, by="head")


def test_effective_rank_figure_tells_full_ft_and_lora_apart(lora_model: ModelResult, full_model: ModelResult) -> None:
    fig = comparison.effective_rank_figure([lora_model, full_model], "rank90")
    lines = [t for t in fig.data if t.type == "scatter"]
    assert len(lines) == 4  # 2 fine-tunes x 2 module panels
    lora_query, lora_value, full_query, _ = lines
    assert lora_query.name == "LoRA run (LoRA r=4)" and lora_query.line.dash != full_query.line.dash
    assert lora_query.marker.symbol != full_query.marker.symbol
    assert fig.layout.yaxis.type == "log"  # the default: rank 1 and rank 300 both readable
    assert comparison.effective_rank_figure([lora_model, full_model], "rank90", log_y=False).layout.yaxis.type != "log"
    assert lora_query.y[0] == 2 and lora_value.y[1] == 1  # the planted 2- and 1-direction updates
    assert full_query.y[0] > 10  # a dense update needs many directions for 90% of its energy
    assert [s.y0 for s in fig.layout.shapes] == [4, 4]  # LoRA rank line in both panels


def test_spectrum_figure_marks_intruders_where_they_rank(lora_model: ModelResult) -> None:
    matrix = lora_model.matrices[0]
    fig = spectra.spectrum_figure(matrix, k=10, eps=0.5)
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
    idx = style.log_sample(100_000, keep=[5000], max_points=500)
    assert len(idx) <= 501 and 5000 in idx and idx[0] == 0 and idx[-1] == 99_999


def test_subspace_similarity_of_an_update_with_itself_and_with_another(
    lora_model: ModelResult, full_model: ModelResult
) -> None:
    a = lora_model.matrices[0]
    phi = matrix_tables.subspace_similarity(a, a)
    assert phi.shape == (2, 2)  # only the update's 2 real directions are compared
    np.testing.assert_allclose(np.diag(phi), 1.0, atol=1e-3)
    cross = matrix_tables.subspace_similarity(a, full_model.matrices[0])
    assert cross.shape == (2, 32)
    # The planted directions are random with respect to a dense update: phi(1, 1) is small,
    # and phi(i, 32) is the share of P_i inside a 32 of 48 dims subspace.
    assert cross[0, 0] < 0.3 and 0.4 < cross[1, 31] < 0.95
    fig = spectra.subspace_figure(cross, "LoRA run", "Full FT", a.name)
    assert "left singular vectors of ΔW" in fig.layout.title.text
    # The first line stays short (a phone cut the tensor name off it); the name is below.
    first, *below = fig.layout.title.text.split("<br>")
    assert first == "Subspace similarity φ(i, j) of ΔW" and a.name in "".join(below).replace("<sup>", "").replace(
        "</sup>", ""
    )
    np.testing.assert_allclose(np.asarray(fig.data[0].z), cross)


def test_amplification_table_and_figure(lora_model: ModelResult) -> None:
    table = tables.amplification_table([lora_model])
    assert list(table["r"]) == [4, 4, 4, 4]
    # Planted directions are orthogonal to W's top directions: strongly amplified.
    assert table["amplification_factor"].iloc[0] > 5
    fig = comparison.amplification_figure([lora_model])
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
    assert csv.splitlines()[0].startswith(
        "model,method,matrix,stack,layer,module,expert,label,shape,intruders,effective_rank"
    )


def test_labels_and_methods() -> None:
    merged = ModelResult(source="demo:lora-r8", kind="full", summary={"label": "LoRA r=8", "lora_rank": 8})
    rs = ModelResult(source="x", kind="adapter", summary={"adapter": {"r": 16, "use_rslora": True}})
    assert tables.training_method(merged) == "LoRA r=8, merged"
    assert tables.training_method(rs) == "rsLoRA r=16"
    assert tables.model_labels([rs, rs]) == ["x", "x (2)"]
    assert tables.module_order(["down", "zeta", "query", "up", "alpha"]) == ["query", "up", "down", "alpha", "zeta"]


def test_chart_config_names_the_png() -> None:
    config = style.chart_config("overview-intruders")
    assert config["toImageButtonOptions"] == {"format": "png", "filename": "overview-intruders", "scale": 2}


def test_empty_results_give_a_message_not_an_error() -> None:
    empty = ModelResult(source="x", kind="full")
    assert overview.overview_sections([empty], "intruders", 10, 0.5) == []
    assert comparison.sweep_figure([], 10, [0.5]).layout.annotations[0].text == "No fine-tunes analysed yet"


def test_breakdown_keeps_each_stack_apart(proto: MatrixResult) -> None:
    t5 = _family(proto, FAMILIES["t5"], 4, _tensor_name)
    by_layer = tables.breakdown_table([t5], 10, 0.5, by="layer")
    assert list(by_layer["layer"]) == ["encoder 0", "encoder 1", "decoder 0", "decoder 1"]
    expected = sum(m.intruder_counts(10, [0.5])[0] for m in t5.matrices if m.stack == "decoder" and m.layer == 0)
    assert by_layer.set_index("layer").loc["decoder 0", "intruders"] == expected


def test_identity_columns_in_every_per_matrix_csv(proto: MatrixResult) -> None:
    moe = _family(proto, FAMILIES["moe"], 5, _tensor_name)
    for table in (tables.matrix_table([moe], 10, 0.5), tables.amplification_table([moe])):
        assert {"stack", "layer", "module", "expert", "label"} <= set(table.columns)
        assert table["matrix"].is_unique  # one row per matrix, experts of a fused tensor included
        row = table[table["matrix"] == "model.layers.1.mlp.experts.up_proj#7"].iloc[0]
        assert (row["layer"], row["module"], row["expert"], row["label"]) == ("1", "up", 7, "L1 E7 up")


def test_zero_update_amplification_stays_undefined(proto: MatrixResult) -> None:
    zero = ModelResult(source="z", kind="full", matrices=[replace(proto, amplification_factor=None)])
    table = tables.amplification_table([zero])
    assert table["amplification_factor"].isna().all()
    assert table.to_csv(index=False).splitlines()[1].endswith(",")  # empty in the CSV, a dash on screen


def test_skipped_tensors_counted_by_reason() -> None:
    from analysis.plan import ComparisonPlan, ShapeMismatch

    plan = ComparisonPlan(
        "base",
        "tuned",
        "adapter",
        [],
        unmatched=["a.weight", "b.weight"],
        shape_mismatches=[ShapeMismatch("c.weight", (4, 4), (4, 2))],
        summary={"non_block_adapted": ["embeddings.word_embeddings.weight"]},
    )
    table = tables.skipped_table(tables.plan_skipped(plan))
    assert table.to_dict("records") == [
        {"reason": tables.UNMATCHED_REASON, "tensors": 2, "examples": "a.weight, b.weight"},
        {"reason": tables.NON_BLOCK_REASON, "tensors": 1, "examples": "embeddings.word_embeddings.weight"},
        {"reason": tables.SHAPE_MISMATCH_REASON, "tensors": 1, "examples": "c.weight"},
    ]
    # A result (or plan) that lists its own skipped tensors is taken as it is.
    listed = ModelResult(
        source="x",
        kind="full",
        unmatched=["ignored"],
        skipped=[{"name": f"layers.{i}.norm.weight", "reason": "1-D"} for i in range(5)]
        + [{"name": "embed.weight", "reason": "embedding"}],
    )
    counted = tables.skipped_table(tables.plan_skipped(listed), examples=2)
    assert counted.to_dict("records") == [
        {"reason": "1-D", "tensors": 5, "examples": "layers.0.norm.weight, layers.1.norm.weight"},
        {"reason": "embedding", "tensors": 1, "examples": "embed.weight"},
    ]


def test_a_one_point_series_is_a_marker(lora_model: ModelResult) -> None:
    """A rank-1 update has one singular value: a line through one point is invisible."""
    m = lora_model.matrices[0]
    rank1 = replace(m, delta_singular_values=np.array([3.0] + [0.0] * 39))
    update = spectra.spectrum_figure(rank1, k=10, eps=0.5).data[2]
    assert update.mode == "markers" and list(update.y) == [3.0]


def test_log_ticks_are_clean_numbers() -> None:
    values, text = style.log_ticks(3e-5, 40.0)
    # One notation per axis: never "0.001" beside "1e-4".
    assert text == ["1e-4", "1e-3", "1e-2", "1e-1", "1e0", "1e1"] and values[0] == pytest.approx(1e-4)
    assert style.log_ticks(2e-3, 40.0)[1] == ["0.01", "0.1", "1", "10"]  # all plain where all can be
    values, text = style.log_ticks(1.5, 60.0)  # under two decades: 2 and 5 added, still labelled
    assert text == ["2", "5", "10", "20", "50"]
    _, text = style.log_ticks(1e-12, 1e6)  # many decades: at most about 8 labels
    assert len(text) <= 8 and all("µ" not in t for t in text)


def test_many_fine_tunes_and_layers_stay_apart(lora_model: ModelResult, full_model: ModelResult) -> None:
    """Eight fine-tunes: eight colours, dashes and markers; six modules wrap into rows."""
    models = [ModelResult(**{**m.__dict__, "source": f"m{i}"}) for i, m in enumerate([lora_model, full_model] * 4)]
    fig = comparison.sweep_figure(models, 10, DEFAULT_EPSILONS)
    styles = {(t.line.color, t.line.dash, t.marker.symbol) for t in fig.data}
    assert len(fig.data) == 8 and len(styles) == 8 and len({t.name for t in fig.data}) == 8
    six = [
        replace(m, id=replace(m.id, name=f"{mod}.{m.layer}", module=mod))
        for m in lora_model.matrices
        for mod in ("query", "key", "value", "attn_out", "mlp_in", "mlp_out")
    ]
    grid = comparison.effective_rank_figure([ModelResult(**{**lora_model.__dict__, "matrices": six})])
    assert {t.xaxis for t in grid.data} == {"x", "x2", "x3", "x4", "x5", "x6"}
    assert grid.layout.xaxis4.domain == grid.layout.xaxis.domain  # the fourth panel starts a second row


def test_subspace_opens_on_two_adapters_of_different_rank() -> None:
    def model(name: str, r: int | None) -> ModelResult:
        return ModelResult(source=name, kind="adapter" if r else "full", summary={"adapter": {"r": r}} if r else {})

    demo = [model("full", None), model("r1", 1), model("r8", 8), model("r64", 64)]
    assert matrix_tables.subspace_default_pair(demo) == (2, 3)  # r=8 against r=64, as in Hu et al.
    assert matrix_tables.subspace_default_pair(demo[:3]) == (1, 2)
    assert matrix_tables.subspace_default_pair(demo[:2]) == (0, 1)
    assert matrix_tables.subspace_default_pair(demo[:1]) is None


@pytest.mark.parametrize("family", ["t5", "moe", "vlm"])
@pytest.mark.parametrize("which", ["effective_rank", "rank90", "amplification"])
def test_rank_and_amplification_draw_every_matrix_as_its_own_point(
    family: str, which: str, proto: MatrixResult
) -> None:
    """An encoder's and a decoder's layer 0 (T5), or eight experts of one module in a layer
    (MoE), never share a point: one point per matrix and fine-tune, each named by its label,
    and no two points of one series at one (facet, layer) outside the expert facets."""
    full = _family(proto, FAMILIES[family], 1, _tensor_name)
    partial = _family(proto, [i for i in FAMILIES[family] if i[1] == 0], 7, _tensor_name)
    models = [full, partial]
    if which == "amplification":
        fig = comparison.amplification_figure(models, log_y=False)
    else:
        fig = comparison.effective_rank_figure(models, which, log_y=False)
    points = [(t.legendgroup, t.xaxis, x, label) for t in fig.data for x, label in zip(t.x, t.customdata, strict=True)]
    labels = tables.model_labels(models)
    expected = {(labels[i], m.short_label) for i, model in enumerate(models) for m in model.matrices}
    assert len(points) == len(expected) == sum(len(m.matrices) for m in models)
    assert {(p[0], p[3]) for p in points} == expected
    for t in fig.data:  # a line joins one point per layer only
        if t.mode != "markers":
            assert len(set(t.x)) == len(t.x)
    titles = [a.text for a in fig.layout.annotations]
    if family == "t5":
        assert "encoder · query" in titles and "decoder · cross_attn_out" in titles
    if family == "moe":
        assert "experts of down" in titles and "down" not in titles
        down = [t for t in fig.data if titles[_axis_index(t.xaxis)] == "experts of down"]
        assert all(t.mode == "markers" for t in down) and sum(len(t.x) for t in down) == 16 + 8


def _axis_index(xaxis: str) -> int:
    return int(xaxis[1:] or 1) - 1


def _series(proto: MatrixResult, family: str) -> list[ModelResult]:
    """Three checkpoints of one fine-tune of ``family`` (steps 10, 20, 30)."""
    return [replace(_family(proto, FAMILIES[family], s, _tensor_name), step=s) for s in (10, 20, 30)]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_series_grid_puts_every_matrix_in_its_own_cell(family: str, proto: MatrixResult) -> None:
    """The series grid follows the overview: one grid per stack and per expert module, one
    cell per matrix at every step (an encoder's and a decoder's layer 0, or eight experts of
    one fused tensor, never merge), each cell's value that matrix's."""
    models = _series(proto, family)
    table = series_tables.series_grid_table(models, "intruders", 10, 0.5)
    assert len(table) == sum(len(m.matrices) for m in models)
    assert not table.duplicated(["step", "section", "row", "column"]).any()
    assert list(dict.fromkeys(table["section"])) == FAMILY_SECTIONS[family]
    fig = series.series_grid_figure(table, "intruders")
    # One heatmap per grid (each with its values written on it where they fit: traces of text).
    assert [t.type for t in fig.data].count("heatmap") == len(FAMILY_SECTIONS[family])
    assert {t.type for t in fig.data} <= {"heatmap", "scatter"}
    assert not fig.frames and not fig.layout.sliders  # the page's step control is the only one
    for model in models:
        cells = {}
        at_step = series.series_grid_figure(table, "intruders", step=model.step)
        for trace in [t for t in at_step.data if t.type == "heatmap"]:
            z, names = np.asarray(trace.z, dtype=float), np.asarray(trace.customdata, dtype=object)
            for i, j in zip(*np.nonzero(~np.isnan(z)), strict=True):
                cells[names[i, j]] = z[i, j]
        assert len(cells) == len(model.matrices)  # every matrix its own cell, none elsewhere
        assert cells == {m.short_label: m.intruder_counts(10, [0.5])[0] for m in model.matrices}


def test_series_similarity_picks_one_expert_of_a_fused_tensor(proto: MatrixResult) -> None:
    models = _series(proto, "moe")
    expert = next(m for m in models[0].matrices if m.expert == 5 and m.module == "down" and m.layer == 1)
    key = expert.key
    table = series_tables.series_similarity_table(models, key, 10, 0.5)
    assert sorted(table["step"].unique()) == [10, 20, 30] and len(table) == 3 * 10
    picked = [next(m for m in model.matrices if m.key == key) for model in models]
    assert table["best_match_score"].tolist() == pytest.approx(
        [float(s) for m in picked for s in m.intruder_scores[:10]]
    )
    fig = series.series_similarity_figure(models, key)
    assert "L1 E5 down" in fig.layout.title.text and "at step 30" in fig.layout.title.text  # the last by default
    for model, at in zip(models, picked, strict=True):
        shown = series.series_similarity_figure(models, key, step=model.step)
        np.testing.assert_allclose(np.asarray(shown.data[0].z, dtype=float), at.similarity, atol=1e-6)
        assert f"at step {model.step}" in shown.layout.title.text


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_series_trend_groups_keep_stacks_apart_and_count_every_matrix_once(family: str, proto: MatrixResult) -> None:
    """Per layer and per module, a group holds one stack's matrices (an encoder's and a
    decoder's layer 0 or query are two lines); per matrix, each matrix (each expert) is its
    own line; every grouping counts every matrix exactly once per step."""
    models = _series(proto, family)
    for by in series_tables.SERIES_GROUPINGS:
        table = series_tables.series_table(models, 10, 0.5, by)
        for model in models:
            rows = table[table["step"] == model.step]
            assert rows["matrices"].sum() == len(model.matrices)
            assert rows["intruders"].sum() == model.total_intruders(10, 0.5)
        if by in ("layer", "module"):
            m = models[0].matrices
            stacks = {x.stack for x in m}
            expected = {(x.stack, x.layer if by == "layer" else x.module) for x in m}
            assert table["group"].nunique() == len(expected)
            if len(stacks) > 1:
                assert all(g.split(" ")[0] in stacks for g in table["group"])
        if by == "matrix":
            assert table["group"].nunique() == len(models[0].matrices)


def test_tradeoff_labels_points_that_coincide_once():
    """Nothing scaled (every λ gives the fine-tune): one label for the pile, not five on top
    of each other; distinct points keep their own; hover still names each λ."""
    from types import SimpleNamespace

    from charts.mitigation import tradeoff_figure

    def figure(points):
        points = [{"label": "base", "lam": None, "loss": 2.2, "task": 0.4}] + points
        tradeoff = SimpleNamespace(points=points, task_name="MRR", loss_name="held-out loss", note="")
        return tradeoff_figure(SimpleNamespace(tradeoff=tradeoff))

    lams = [0.0, 0.25, 0.5, 0.75, 1.0]
    same = [{"label": f"λ = {lam:g}", "lam": lam, "loss": 2.0754, "task": 0.572} for lam in lams]
    fine_tune = {"label": "fine-tune", "lam": 1.0, "loss": 2.0754, "task": 0.572}
    mitigated = figure([fine_tune, *same]).data[0]
    assert [t for t in mitigated.text if t] == ["λ=0–1"]
    assert list(mitigated.customdata) == lams
    apart = [{"label": f"λ = {lam:g}", "lam": lam, "loss": 2.0 + lam / 10, "task": 0.5 + lam / 10} for lam in lams]
    assert list(figure([fine_tune, *apart]).data[0].text) == [f"λ={lam:g}" for lam in lams]
    two = [{**same[0]}, {**same[1]}, {**apart[4]}]
    assert list(figure([fine_tune, *two]).data[0].text) == ["λ=0, 0.25", "", "λ=1"]
    # A point beside a pile: the pile's one label is above, so this one goes below (the
    # unlabelled points of the pile claim no position).
    beside = [{**same[0]}, {**same[1]}, {**same[2], "lam": 0.5, "loss": 2.0755}, {**apart[4]}]
    shown = figure([fine_tune, *beside]).data[0]
    assert list(shown.text) == ["λ=0, 0.25", "", "λ=0.5", "λ=1"]
    assert list(shown.textposition)[:3:2] == ["top center", "bottom center"]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_series_trend_lines_are_told_apart_by_colour_and_dash(family: str, proto: MatrixResult) -> None:
    """Per matrix, ~36 lines in 10 colours could not be told apart: now no two lines share
    colour, dash and marker (in the trends and in the RL measures), and the colour says the
    module kind (of its stack), the dash the layer: every query line one colour, every
    layer-0 line one dash. The other groupings keep every line distinct too."""
    models = _series(proto, family)
    for by in series_tables.SERIES_GROUPINGS:
        table = series_tables.series_table(models, 10, 0.5, by)
        for fig in (series.series_trend_figure(table, by), rl_measures.series_rl_figure(table, by, "run")):
            shown = [t for t in fig.data if t.showlegend]
            assert sorted(t.name for t in shown) == sorted(style.chart_text(g) for g in table["group"].unique())
            looks = [(t.line.color, t.line.dash or "solid", t.marker.symbol or "circle") for t in shown]
            assert len(set(looks)) == len(looks), f"{by}: two lines look alike"
            for t in fig.data:  # every panel draws a group as its legend entry does
                assert (t.line.color, t.line.dash, t.marker.symbol) == next(
                    (s.line.color, s.line.dash, s.marker.symbol) for s in shown if s.legendgroup == t.legendgroup
                )
        if by == "matrix":
            rows = {style.chart_text(r.group): r for r in table.drop_duplicates("group").itertuples()}
            trend = [t for t in series.series_trend_figure(table, by).data if t.showlegend]
            kinds: dict[str, set] = {}  # colour -> the module kinds drawn in it
            for t in trend:
                kinds.setdefault(t.line.color, set()).add((rows[t.name].stack, rows[t.name].module))
            every_kind = {(r.stack, r.module) for r in rows.values()}
            assert len(kinds) == min(len(every_kind), len(style.PALETTE)), "one colour per module kind"
            if len(every_kind) <= len(style.PALETTE):
                assert all(len(k) == 1 for k in kinds.values())
                zero = [t for t in trend if rows[t.name].layer == tables.layer_label(0)]
                whole = [t for t in zero if pd.isna(rows[t.name].expert)]  # not one expert of many
                first = whole or [t for t in zero if rows[t.name].expert == 0]
                assert first and {t.line.dash for t in first} == {"solid"}, "layer 0 is solid in every colour"

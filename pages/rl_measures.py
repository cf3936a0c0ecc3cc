"""RL vs SFT: update sparsity, principal-subspace rotation and mask overlap per fine-tune (issue 23)."""

from __future__ import annotations

import streamlit as st

from charts import overview, rl_measures, rl_tables, tables
from ui import runtime, state, views

st.title("RL vs SFT measures")
selection, models = views.results()
k, eps = views.k_eps_controls(models)
views.report_download(selection, models)

st.caption(
    "Where did the fine-tune change the weights, and did it turn the principal directions? "
    "**Update sparsity**: the share of parameters left unchanged, by Zhu et al. 2025 Eq. 1 "
    "(|w₁ − w₀| ≤ η·max(|w₀|, |w₁|), η = 1e-3: bitwise equality for bf16 weights) and by Mukherjee et al. 2025 "
    "(|ΔW| ≤ 1e-5 in bf16). **Rotation**: principal angles between the top-k singular subspaces of W₀ and W₁ "
    "(Zhu et al. Sec. 4.1). **Mask overlap**: the share of changed entries inside the top-α principal mask of W₀ "
    "(Sec. 4.2; α by chance). **Intruder energy share** is this tool's measure: the share of the top-k "
    "energy of W₁ on intruder directions. Definitions: docs/metrics.md."
)

base_label = runtime.resolver().label(selection.base) if selection.base else "base"
st.subheader("Per fine-tune (the shape of Zhu et al. Table 1)")
views.chart(rl_measures.sparsity_figure(models, base_label, k, eps), "rl-sparsity")
views.table(rl_tables.sparsity_table(models, base_label, k, eps), "rl-measures")
st.caption("**Parameters counted.** " + " ".join(rl_tables.counted_notes(models)))

st.subheader("Per matrix")
metric = state.widget(
    st.selectbox,
    "Measure",
    "rl",
    default="update_sparsity",
    options=list(rl_tables.RL_METRICS),
    format_func=rl_tables.RL_METRICS.get,
)
metric = metric or "update_sparsity"
specs = [m.source for m in models]


def open_matrix(index: int, matrix: str) -> None:
    """A click on a grid cell shows that matrix's rotation below."""
    state.set("model", specs[index])
    state.set("matrix", matrix)


st.markdown(f"**{overview.overview_title(metric, k, eps)}**")
views.overview_grids(models, metric, k, eps, on_open=open_matrix)
views.chart(rl_measures.measure_lines(models, metric, k, eps), f"rl-{metric}-by-layer")

st.subheader("Rotation of one matrix")
model = views.model_control(models)
key = views.matrix_control(models)
matrix = views.find_matrix(model, key)
label = tables.model_labels(models)[models.index(model)]
if matrix is None:
    st.info("This matrix was not analysed for this fine-tune.")
else:
    views.chart(rl_measures.rotation_figure(matrix, label), "rl-rotation")
    views.table(rl_tables.angles_table(matrix), "rl-angles")
    st.caption(
        "Angles are computed in float64 from the weights (small ones from their sines), so they are resolved "
        "to about 1e-12° plus the storage precision of the weights (float32 weights: about 1e-6°); angles "
        "below 1e-9° are drawn at 1e-9°."
    )

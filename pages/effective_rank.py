"""Effective rank and rank90 of every update, by layer and module, all fine-tunes side by side."""

from __future__ import annotations

import streamlit as st

from charts import comparison, overview_tables, tables
from ui import state, views
from ui.text import escape_markdown

st.title("Effective rank of the updates")
selection, models = views.results()
views.report_download(selection, models)

st.caption(
    "How many directions each update ΔW = W_tuned − W_base uses. **Effective rank** (Roy & Vetterli 2007): "
    "exp of the entropy of the normalised singular values. **rank90** (Biderman et al. 2024): the fewest "
    "singular directions holding 90% of ΔW's energy. Full fine-tuning learns updates of far higher rank than "
    "LoRA, whose update can never exceed its rank r (dotted line). Each fine-tune has its own colour, dash and "
    "marker; the log scale keeps rank 1 and rank 300 readable side by side."
)
totals_slot = st.container()  # over the controls, filled once the measure is chosen

metric = state.widget(
    st.radio,
    "Measure",
    "measure",
    default="effective_rank",
    options=["effective_rank", "rank90"],
    horizontal=True,
    format_func=overview_tables.OVERVIEW_METRICS.get,
)
measure = overview_tables.OVERVIEW_METRICS[metric]
totals = tables.totals_table(models, selection.k, selection.eps)
with totals_slot:
    for col, row in zip(st.columns(len(models)), totals.itertuples(), strict=True):
        mean = row.mean_effective_rank if metric == "effective_rank" else row.mean_rank90
        col.metric(
            escape_markdown(row.model),
            f"{mean:.1f}",
            help=f"{escape_markdown(row.method)}, over {row.matrices} matrices: mean effective rank "
            f"{row.mean_effective_rank:.1f}, mean rank90 {row.mean_rank90:.1f}",
        )
        method = "" if tables.names_method(row.model, row.method) else f"{escape_markdown(row.method)}, "
        col.caption(f"{measure[0].lower()}{measure[1:]}, {method}mean of {row.matrices} matrices")
log_y = state.widget(
    st.toggle,
    "Log scale",
    "logrank",
    default=True,
    help="A full fine-tune's update has hundreds of directions, a LoRA r=1 update one: a linear axis flattens "
    "the adapters to zero.",
)
views.chart(comparison.effective_rank_figure(models, metric, log_y=log_y), f"{metric}-by-layer")
frame = tables.matrix_table(models)[
    [
        "model",
        "method",
        "matrix",
        *tables.IDENTITY_COLUMNS,
        "shape",
        "effective_rank",
        "rank90",
        "stable_rank",
        "delta_fro",
        "adapter_rank",
    ]
]
views.table(frame, "update-ranks")

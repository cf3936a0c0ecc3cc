"""Intruders vs eps: one curve per fine-tune, summed over the chosen matrices."""

from __future__ import annotations

import streamlit as st

from analysis.results import DEFAULT_EPSILONS
from charts import comparison, rl_measures, tables
from ui import runtime, state, views

st.title("Intruder dimensions vs ε")
selection, models = views.results()
k, eps = views.k_eps_controls(models)
views.report_download(selection, models)

st.caption(
    f"Number of the top {k} tuned singular vectors whose best |cosine| with every base singular vector is below "
    "ε, summed over the chosen matrices (Shuttleworth et al. 2024, Fig. 4). LoRA typically has intruders at "
    "small ε where full fine-tuning has none. Each fine-tune has its own colour, dash and marker, so curves "
    "that coincide (all at zero) still show."
)

modules = tables.module_order(m.module for model in models for m in model.matrices)
layers = sorted(
    {tables.layer_label(m.layer) for model in models for m in model.matrices},
    key=lambda s: (s == "other", int(s) if s.isdigit() else 0),
)
stacks = list(dict.fromkeys(m.stack for model in models for m in model.matrices))
# Pills wrap onto as many lines as they need: every module stays visible at 390 px, where a
# multiselect's chips were cut ("mlp_o...") and hid the rest.
chosen_modules = (
    state.widget(
        st.pills, "Modules", "modules", options=modules, selection_mode="multi", help="The matrices counted, by module."
    )
    or []
)
c1, c2 = st.columns(2)
with c1:
    chosen_layers = state.widget(st.multiselect, "Layers", "layers", options=layers)
chosen_stacks = stacks
if len(stacks) > 1:  # encoder/decoder, vision/language: layer 0 of each is its own matrix
    with c2:
        chosen_stacks = state.widget(st.multiselect, "Stacks", "stacks", options=stacks)
names = {
    m.key
    for model in models
    for m in model.matrices
    if m.module in chosen_modules and tables.layer_label(m.layer) in chosen_layers and m.stack in chosen_stacks
}
epsilons = sorted({*DEFAULT_EPSILONS, round(eps, 2)})
sweep = comparison.sweep_figure(models, k, epsilons, eps=eps, matrices=names)
views.chart(rl_measures.add_chance_band(sweep, models, runtime.spectrum_cache()), "intruders-vs-eps")
st.caption(
    "Grey band: the chance level of an intruder score, the best |cos| a random direction reaches against the "
    "base's singular vectors (5-95% of a seeded simulation per matrix shape; dashed: median). At an ε in or "
    "below the band, a count no longer tells a fine-tune's new directions from random ones."
)

# The breakdown's control sits with its chart, above the tables.
by = state.widget(
    st.radio, "Break down by", "by", default="none", options=["none", "layer", "module"], horizontal=True,
    help=f"Intruders at ε = {eps:g} per layer or per module, one bar per fine-tune.",
)  # fmt: skip
if by != "none":
    views.chart(comparison.breakdown_figure(models, k, eps, by, names), f"intruders-by-{by}")
st.subheader("The numbers")
views.table(tables.sweep_table(models, k, epsilons, names), "intruders-vs-eps")
if by != "none":
    views.table(
        tables.breakdown_table(models, k, eps, by, names), f"intruders-by-{by}", label=f"Download CSV (by {by})"
    )

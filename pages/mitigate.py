"""Mitigate: scale a fine-tune's intruder dimensions down, see what it does, export it.

Shuttleworth et al. 2024 (section 6, Fig. 8); PEFT's ``reduce_intruder_dimension``. The
engine is :mod:`analysis.mitigation`; this page selects, starts the job, shows.
"""

from __future__ import annotations

import json

import streamlit as st

from analysis.mitigation import MitigationSettings
from charts import mitigation as fm
from charts import tables
from charts.table_words import MEASURES
from hosting.jobs import JobState
from ui import mitigation, runtime, state, views
from ui.text import escape_markdown

state.ensure_app_navigation()
selection = state.current()
st.title("Intruder mitigation")
st.caption(
    "Scale each matrix's intruder dimensions (top-k singular vectors of W + ΔW whose best |cosine| with every "
    "base singular vector is below ε) by λ, as PEFT's reduce_intruder_dimension does after training "
    "(Shuttleworth et al. 2024, §6: forgetting drops at little cost to the task). An adapter is re-factored to "
    "its rank r. The mitigated weights are analysed like any fine-tune; nothing is changed until you download."
)
if not selection.complete:
    st.info("Choose a base model and at least one fine-tune first.")
    st.page_link(views.MODELS_PAGE, label="Choose models", icon=":material/folder_open:")
    st.stop()

resolver = runtime.resolver()
opening = mitigation.default_fine_tune(selection.base, selection.tuned, int(state.get("k")), float(state.get("eps")))
if state.get("model") is None and opening is not None:
    state.set("model", opening)  # the link names the fine-tune shown (it named the first one), and opens on it
with st.sidebar:
    tuned = state.widget(
        st.selectbox, "Fine-tune", "model", default=opening, options=list(selection.tuned), format_func=resolver.label
    )
    k = state.widget(st.slider, "k: top singular vectors checked", "k", min_value=1, max_value=state.MAX_K)
    eps = state.widget(
        st.slider, "ε: similarity threshold", "eps", min_value=state.EPS_STEP, max_value=0.95, step=state.EPS_STEP,
        format="%.2f",
    )  # fmt: skip
lam, rule, exact, curve = mitigation.controls()
settings = MitigationSettings(lam=lam, top_k=int(k), eps=float(eps), rule=rule, exact=exact)

job = mitigation.track(selection.base, tuned, settings, curve)
if job is None:
    st.stop()
if job.state in (JobState.FAILED, JobState.CANCELLED):
    mitigation.failed(job)
    st.stop()
if job.state is not JobState.DONE:
    mitigation.progress(job)
    st.stop()

result = job.result
label = resolver.label(tuned)
totals = result.mitigation.totals()
counts = result.counts([eps], int(k))
scaled_n, before_n, after_n = totals["intruders_scaled"], counts["before"][0], counts["after"][0]
c1, c2, c3, c4 = st.columns(4)
c1.metric("Intruders scaled", scaled_n, help=f"in {totals['matrices_with_intruders']} of "
          f"{totals['matrices']} matrices")  # fmt: skip
c2.metric(f"Intruders at ε = {eps:g}", after_n, delta=(after_n - before_n) or None,
          delta_color="inverse", help=f"before: {before_n} (top {k} of every matrix, summed)")  # fmt: skip
change = totals["delta_fro_after"] / totals["delta_fro_before"] - 1 if totals["delta_fro_before"] else 0.0
fro = MEASURES["delta_fro"].text
c3.metric("‖ΔW‖_F", fro(totals["delta_fro_after"]), delta=fm.change_text(change), delta_color="off",
          help=f"before: {fro(totals['delta_fro_before'])} (root of the sum of squares over matrices)")  # fmt: skip
c4.metric("Re-factorisation error", fm.refactor_text(totals),
          help="‖exported ΔW − exact mitigated ΔW‖_F / ‖exact mitigated ΔW‖_F (rank-r truncation)")  # fmt: skip

if scaled_n == 0:
    st.info(
        f"No intruder dimension among the top {k} singular vectors of any matrix at ε = {eps:g}: nothing was "
        "scaled, so the mitigated model is the fine-tune and its curves lie on the fine-tune's. A larger ε or k "
        "finds more candidates.",
        icon=":material/info:",
    )
else:
    st.caption(escape_markdown(fm.why_intruders_stay(result, int(k), float(eps))))
views.chart(fm.sweep_figure(result, int(k), float(eps)), "mitigation-intruders-vs-eps")
st.subheader("Per matrix")
views.table(fm.matrices_table(result, int(k), float(eps)), "mitigation-matrices")

st.subheader("Spectra before and after")
mitigated = {m.key: m for m in result.mitigation.matrices}
names = list(mitigated)
scaled = {key: m.intruders for key, m in mitigated.items()}
default = max(names, key=lambda n: len(scaled[n])) if names else None
# A matrix the view names elsewhere that was not mitigated here: show the most scaled one,
# and keep the view's own (shown, not written back).
shown = default if state.get("matrix") is not None and state.get("matrix") not in mitigated else None
choice = state.widget(
    st.selectbox, "Matrix", "matrix", default=default, shown=shown, options=names,
    format_func=lambda key: tables.describe_matrix(mitigated[key]) if key in mitigated else key,
)  # fmt: skip
before = views.find_matrix(result.before, choice)
after = views.find_matrix(result.after, choice)
if before is not None and after is not None:
    views.chart(fm.spectra_figure(before, after, scaled[choice], label), f"mitigation-spectrum-{choice}")

st.subheader("Trade-off")
if result.tradeoff is None:
    st.caption(
        "Trade-off curve: held-out loss (forgetting) and the task's score of the base, the fine-tune and the "
        "mitigated fine-tune across a λ grid. It runs the model once per point (about a minute for the demo on "
        "two cores), so it starts only when asked."
    )
    st.button(
        "Run the trade-off curve", key="mit_run_curve", on_click=mitigation.run_curve, icon=":material/play_arrow:"
    )
else:
    views.chart(fm.tradeoff_figure(result), "mitigation-tradeoff")
    st.caption(f"{escape_markdown(result.tradeoff.note)} ({result.tradeoff.seconds:.1f} s)")
    if result.tradeoff.points:
        views.table(fm.tradeoff_table(result), "mitigation-tradeoff")

st.subheader("Download")
d1, d2, d3 = st.columns(3)
if result.mitigation.kind == "adapter":
    d1.download_button(
        "Mitigated adapter (PEFT folder, zip)",
        lambda: mitigation.export_zip(result, selection.base, tuned, merged=False),
        file_name="mitigated-adapter.zip", mime="application/zip", key="mit_dl_adapter", on_click="ignore",
    )  # fmt: skip
d2.download_button(
    "Merged model (safetensors, zip)",
    lambda: mitigation.export_zip(result, selection.base, tuned, merged=True),
    file_name="mitigated-model.zip", mime="application/zip", key="mit_dl_merged", on_click="ignore",
)  # fmt: skip
d3.download_button(
    "mitigation.json", lambda: json.dumps(result.to_json(), indent=2, allow_nan=False),
    file_name="mitigation.json", mime="application/json", key="mit_dl_json", on_click="ignore",
)  # fmt: skip
st.caption(f"The same from the shell: `{mitigation.shell_command(selection.base, tuned, settings)}`.")

"""Models: choose a base and fine-tunes, see what was understood, then run the analysis."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from analysis.errors import InputError
from analysis.jobs import JobState
from analysis.specs import DEMO_PREFIX
from ui import runtime, state, views

state.ensure_app_navigation()
resolver = runtime.resolver()
selection = state.current()

st.title("Models")
st.caption(
    "Compare a pre-trained **base** with one or more **fine-tunes**: full fine-tunes, merged LoRA checkpoints, "
    "PEFT LoRA adapters or kohya LoRA files. Nothing heavy runs until you press **Analyse**; first check below "
    "what was understood."
)


# -- the offline demo -------------------------------------------------------------------------
def use_demo() -> None:
    base, tuned = runtime.demo_defaults()
    state.set("base", base)
    state.set("tuned", tuned)
    state.set("model", tuned[0] if tuned else None)


manifest, demo_error = runtime.demo_state()
with st.container(border=True):
    st.subheader("Offline demo")
    views.demo_build_status()
    if demo_error:
        st.error(runtime.friendly(demo_error))
    if manifest is not None:
        st.write(
            f"all-MiniLM-L6-v2 fine-tuned on: {manifest.task.get('description', '')} ({manifest.steps} steps each)."
        )
        rows = [
            {
                "model": m.label,
                "spec": DEMO_PREFIX + m.name,
                "kind": "PEFT adapter" if m.kind == "adapter" else "full weights",
                "r": m.r,
                "lora_alpha": m.lora_alpha,
                "rsLoRA": m.use_rslora,
                "lr": m.lr,
                "recall@1": m.metrics.get("recall@1"),
                "MRR": m.metrics.get("mrr"),
                "checkpoints": len(m.checkpoints),
            }
            for m in manifest.models
        ]
        st.dataframe(pd.DataFrame(rows), hide_index=True)
        st.button("Use the demo", on_click=use_demo, key="use_demo")
    job = runtime.demo_job()
    building = job is not None and not job.state.finished
    if job is not None and job.state is JobState.FAILED:
        st.error(f"Building the demo failed: {runtime.friendly(job.error or '')}")
    if not building and (manifest is None or not manifest.complete):
        st.info(
            "The offline demo is not complete: "
            + (f"{len(manifest.fine_tunes)} of 4 fine-tunes are built. " if manifest is not None else "")
            + "It builds here on CPU, with no network (a few minutes; the fine-tunes appear one by one), "
            "or from a terminal with `python -m analysis demo`."
        )
        st.button(
            "Resume building the demo" if manifest is not None else "Build the demo",
            on_click=runtime.start_demo_build,
            key="build_demo",
        )


# -- choosing models --------------------------------------------------------------------------
local = resolver.allow_local_paths
where = "a Hugging Face hub id (in the server's hub cache)" + (" or a folder or file on this server" if local else "")
st.subheader("Base model")
state.widget(
    st.text_input,
    "Base model",
    "base",
    placeholder="demo:base, org/name" + (", /path/to/model" if local else ""),
    help=f"{where}; demo:base for the demo's base.",
)

st.subheader("Fine-tunes")
uploads = st.session_state.setdefault("wse_uploads", [])
demo_specs = [DEMO_PREFIX + m.name for m in manifest.fine_tunes] if manifest else []
options = list(dict.fromkeys([*selection.tuned, *demo_specs, *uploads]))
state.widget(
    st.multiselect, "Fine-tunes to compare with the base", "tuned", options=options, format_func=resolver.label
)


def add_spec() -> None:
    spec = st.session_state.get("add_spec", "").strip()
    if spec and spec not in state.get("tuned"):
        state.set("tuned", [*state.get("tuned"), spec])
    st.session_state.add_spec = ""


c1, c2 = st.columns([4, 1], vertical_alignment="bottom")
c1.text_input(
    "Add a fine-tune by name",
    key="add_spec",
    placeholder="org/name" + (" or /path/to/adapter" if local else ""),
    help=f"{where}. A folder with adapter_config.json is a PEFT adapter.",
)
c2.button("Add", on_click=add_spec, key="add_spec_button")

uploader_key = f"uploader_{st.session_state.get('wse_uploader_n', 0)}"


def add_upload() -> None:
    files = st.session_state.get(uploader_key) or []
    st.session_state.pop("wse_upload_error", None)
    if not files:
        st.session_state.wse_upload_error = "Choose the files to upload first."
        return
    try:
        stored = resolver.uploads.add([(f.name, f) for f in files])
    except InputError as exc:
        st.session_state.wse_upload_error = runtime.friendly(str(exc))
        return
    if stored.spec not in uploads:
        uploads.append(stored.spec)
    if stored.spec not in state.get("tuned"):
        state.set("tuned", [*state.get("tuned"), stored.spec])
    st.session_state.wse_upload_ok = f"Added {resolver.label(stored.spec)} as a fine-tune."
    st.session_state.wse_uploader_n = st.session_state.get("wse_uploader_n", 0) + 1


with st.container(border=True):
    st.file_uploader(
        "Upload a fine-tune: a PEFT adapter (adapter_config.json + adapter_model.safetensors, or a .zip of its "
        "folder), a kohya LoRA .safetensors, or a full model .safetensors (optionally with its config.json)",
        accept_multiple_files=True,
        key=uploader_key,
        help="Pickle-based files (.bin, .pt) are refused: uploads are never unpickled.",
    )
    st.button("Add the upload as a fine-tune", on_click=add_upload, key="add_upload")
    if "wse_upload_error" in st.session_state:
        st.error(f"Upload refused: {st.session_state.wse_upload_error}")
    if ok := st.session_state.pop("wse_upload_ok", None):
        st.success(ok)


# -- what was understood ----------------------------------------------------------------------
@st.cache_data(ttl=300, max_entries=256, show_spinner=False)
def plan_preview(base: str, tuned: str, uploads_root: str) -> dict:
    """What pairing ``tuned`` with ``base`` found (light: headers and configs only)."""
    plan = resolver.plan(base, tuned)
    return {
        "kind": plan.kind,
        "summary": plan.summary,
        "matrices": pd.DataFrame(
            [
                {
                    "matrix": m.name,
                    "layer": m.layer,
                    "module": m.module,
                    "shape": f"{m.shape[0]}x{m.shape[1]}",
                    "adapter rank": m.adapter_rank,
                }
                for m in plan.matrices
            ]
        ),
        "unmatched": list(plan.unmatched),
        "shape_mismatches": [f"{m.name}: base {m.base_shape}, tuned {m.tuned_shape}" for m in plan.shape_mismatches],
    }


def describe(preview: dict) -> str:
    summary = preview["summary"]
    parts = [f"{summary.get('architecture') or 'unknown architecture'} ({summary.get('model_type') or '?'})"]
    adapter = summary.get("adapter")
    if adapter:
        name = "DoRA" if adapter.get("use_dora") else ("rsLoRA" if adapter.get("use_rslora") else "LoRA")
        fmt = "kohya" if adapter.get("format") == "kohya" else "PEFT"
        parts.append(f"{fmt} {name} adapter, r = {adapter.get('r')}, α = {adapter.get('lora_alpha')}")
    else:
        merged = f" (LoRA r = {summary['lora_rank']}, merged)" if summary.get("lora_rank") else ""
        parts.append("full weights" + merged)
    parts.append(f"{len(preview['matrices'])} matrices matched")
    parts.append(f"{len(preview['unmatched'])} unmatched")
    parts.append(f"{len(preview['shape_mismatches'])} shape mismatches")
    return " · ".join(parts)


selection = state.current()
st.subheader("What was understood")
problems = 0
if not selection.complete:
    st.info("Choose a base model and at least one fine-tune.")
for spec in selection.tuned:
    label = resolver.label(spec)
    try:
        preview = plan_preview(selection.base, spec, str(resolver.uploads.root))
    except InputError as exc:
        problems += 1
        st.error(f"**{label}**: {runtime.friendly(str(exc))}")
        continue
    with st.expander(f"**{label}** — {describe(preview)}"):
        adapter = preview["summary"].get("adapter")
        if adapter:
            shown = ("peft_type", "r", "lora_alpha", "use_rslora", "use_dora", "target_modules", "rank_pattern")
            st.write({k: adapter.get(k) for k in shown if k in adapter})
        st.dataframe(preview["matrices"], hide_index=True)
        if preview["unmatched"]:
            st.write("Present on one side only (not analysed):", ", ".join(preview["unmatched"]))
        if preview["shape_mismatches"]:
            st.write("Shapes differ (not analysed):", "; ".join(preview["shape_mismatches"]))


# -- run --------------------------------------------------------------------------------------
def analyse() -> None:
    chosen = state.current()
    runtime.track(chosen.base, chosen.tuned, start=True, restart=True)


st.button("Analyse", type="primary", on_click=analyse, disabled=not selection.complete or problems > 0, key="analyse")
tracked = runtime.track(selection.base, selection.tuned, start=False) if selection.complete else []
views.progress(selection.base, tracked)
for t in tracked:
    if t.state is JobState.DONE:
        st.success(f"{resolver.label(t.spec)}: {len(t.job.result.matrices)} matrices analysed.")
    elif t.state is JobState.FAILED:
        st.error(f"{resolver.label(t.spec)}: {runtime.friendly(t.job.error or '')}")
    elif t.state is JobState.CANCELLED:
        st.warning(f"{resolver.label(t.spec)}: cancelled.")
if any(t.state is JobState.DONE for t in tracked):
    st.page_link("pages/overview.py", label="See the results", icon=":material/grid_view:")

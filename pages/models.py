"""Models: choose a base and fine-tunes, see what was understood, then run the analysis."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from analysis.errors import InputError
from analysis.specs import DEMO_PREFIX, is_upload_spec
from analysis.specs.series import (
    SERIES_PREFIX,
    checkpoint_folders,
    demo_checkpoint_root,
    is_series_folder,
    is_series_spec,
)
from charts import tables
from charts.table_words import table_format
from hosting.jobs import JobState
from ui import demo_build, runtime, state, upload_memory, views
from ui.text import escape_markdown

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


def has_checkpoints(model) -> bool:
    """Whether the demo saved checkpoints while training ``model`` (a series to watch)."""
    try:
        return bool(checkpoint_folders(demo_checkpoint_root(model)))
    except (OSError, InputError):
        return False


def demo_table(manifest) -> dict:
    """The demo's models as ``st.dataframe`` arguments: one row each, columns in words with their meaning."""
    rows = [
        {
            "model": m.label,
            "spec": DEMO_PREFIX + m.name,
            "kind": "PEFT adapter" if m.kind == "adapter" else "full weights",
            "r": m.r,
            "lora_alpha": m.lora_alpha,
            "rslora": m.use_rslora,
            "lr": m.lr,
            "recall@1": m.metrics.get("recall@1"),
            "MRR": m.metrics.get("mrr"),
            "checkpoints": len(m.checkpoints),
        }
        for m in manifest.models
    ]
    frame = pd.DataFrame(rows)
    if not frame["rslora"].any():  # no model uses it: a column of "False" says nothing
        frame = frame.drop(columns="rslora")
    column = st.column_config.Column
    config = {
        "model": column("model"),
        "spec": column("name to type", help="What the base and fine-tune boxes below accept for it."),
        "r": column("LoRA rank r", help="Rank of the adapter's update B·A."),
        "lora_alpha": column("LoRA α", help="The update is scaled by α / r."),
        "rslora": column("rsLoRA", help="Rank-stabilised LoRA: the update is scaled by α / √r instead of α / r."),
        "lr": st.column_config.NumberColumn(
            "learning rate",
            format="%.2e",  # "%g" wrote every digit of the float: 0.005303300858899106
            help="AdamW's peak learning rate (linear warm-up, then linear decay).",
        ),
        "recall@1": st.column_config.NumberColumn(
            "recall@1",
            format=table_format("task"),
            help="Share of held-out queries whose own docstring is retrieved first.",
        ),
        "MRR": st.column_config.NumberColumn(
            "MRR", format=table_format("task"), help="Mean reciprocal rank on the held-out split."
        ),
        "checkpoints": column("checkpoints", help="Saved while training: a series to watch on the Series page."),
    }
    return {"data": frame, "column_config": config}


manifest, demo_error = demo_build.demo_state()
with st.container(border=True):
    st.subheader("Offline demo")
    views.demo_build_status()
    if demo_error:
        st.error(escape_markdown(runtime.friendly(demo_error)))
    if manifest is not None:
        st.write(
            f"all-MiniLM-L6-v2 fine-tuned on: {manifest.task.get('description', '')} ({manifest.steps} steps each)."
        )
        st.dataframe(**demo_table(manifest), hide_index=True, placeholder="—")
        st.button("Use the demo", on_click=use_demo, key="use_demo")
    job = demo_build.demo_job()
    building = job is not None and not job.state.finished
    if job is not None and job.state is JobState.FAILED:
        st.error(f"Building the demo failed: {escape_markdown(runtime.friendly(job.error or ''))}")
    if not building and (manifest is None or not manifest.complete):
        st.info(
            "The offline demo is not complete: "
            + (f"{len(manifest.fine_tunes)} of 4 fine-tunes are built. " if manifest is not None else "")
            + "It builds here on CPU, with no network (a few minutes; the fine-tunes appear one by one), "
            "or from a terminal with `python -m analysis demo`."
        )
        st.button(
            "Resume building the demo" if manifest is not None else "Build the demo",
            on_click=demo_build.start_demo_build,
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
if manifest:
    demo_specs += [SERIES_PREFIX + DEMO_PREFIX + m.name for m in manifest.fine_tunes if has_checkpoints(m)]
options = list(dict.fromkeys([*selection.tuned, *demo_specs, *uploads]))
state.widget(
    st.multiselect, "Fine-tunes to compare with the base", "tuned", options=options, format_func=resolver.label
)


def add_spec() -> None:
    spec = st.session_state.get("add_spec", "").strip()
    if local and is_series_folder(spec):  # a training output_dir: its checkpoint-N folders
        spec = SERIES_PREFIX + spec
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


def add_series() -> None:
    text = st.session_state.get("add_series", "").strip()
    spec = text if text.startswith(SERIES_PREFIX) else SERIES_PREFIX + text
    st.session_state.pop("wse_series_error", None)
    try:
        resolver.resolve(spec)
    except InputError as exc:
        st.session_state.wse_series_error = runtime.friendly(str(exc))
        return
    if spec not in state.get("tuned"):
        state.set("tuned", [*state.get("tuned"), spec])
    state.set("series", spec)
    st.session_state.add_series = ""


def uploads_as_series() -> None:
    """The uploads chosen as fine-tunes, in the order they were added, become one series."""
    chosen = [t for t in state.get("tuned") if is_upload_spec(t)]
    spec = SERIES_PREFIX + ",".join(chosen)
    state.set("tuned", [*(t for t in state.get("tuned") if t not in chosen), spec])
    state.set("series", spec)


with st.expander("Add a checkpoint series (one fine-tune at several training steps)"):
    c1, c2 = st.columns([4, 1], vertical_alignment="bottom")
    c1.text_input(
        "Series",
        key="add_series",
        placeholder="org/name@rev1,rev2,rev3" + (" or /path/to/output_dir" if local else ""),
        help="Hub revisions of one repo (org/name@rev1,rev2), "
        + ("a training output folder holding checkpoint-N folders, " if local else "")
        + "or any specs separated by commas, in training order. The step of each checkpoint comes from its "
        "trainer_state.json or its name (checkpoint-N, stepN), else its position.",
    )
    c2.button("Add series", on_click=add_series, key="add_series_button")
    if "wse_series_error" in st.session_state:
        st.error(f"Series refused: {escape_markdown(st.session_state.wse_series_error)}")
    if sum(is_upload_spec(t) for t in selection.tuned) >= 2:
        st.button(
            "Make one series of the uploaded fine-tunes (in the order they were added)",
            on_click=uploads_as_series,
            key="uploads_as_series",
        )


def note_dropped() -> bool:
    """Whether this tab was disconnected long enough for the server to let go of its chosen
    files (upload_memory.drop_abandoned_uploads): the uploader is renewed and says so once."""
    if not upload_memory.uploads_dropped():
        return False
    st.session_state.wse_uploader_n = st.session_state.get("wse_uploader_n", 0) + 1
    st.session_state.wse_upload_dropped = True
    return True


note_dropped()
uploader_key = f"uploader_{st.session_state.get('wse_uploader_n', 0)}"


def add_upload() -> None:
    if note_dropped():
        return
    files = upload_memory.chosen_files(st.session_state.get(uploader_key))
    if not files:  # files refused as they were chosen (check_pending) keep saying why
        st.session_state.setdefault("wse_upload_error", "Choose the files to upload first.")
        return
    st.session_state.pop("wse_upload_error", None)
    size = sum(f.size for f in files)
    try:
        runtime.upload_quota(size)
        stored = resolver.uploads.add([(f.name, f) for f in files])
    except InputError as exc:
        st.session_state.wse_upload_error = runtime.friendly(str(exc))
        # A refused upload leaves the uploader (and server memory): the next try starts clean.
        st.session_state.wse_uploader_n = st.session_state.get("wse_uploader_n", 0) + 1
        return
    finally:  # stored on disk or refused: the server's copies in memory go now
        upload_memory.release_uploads(files)
    runtime.upload_quota(size, count=True)
    if stored.spec not in uploads:
        uploads.append(stored.spec)
    if stored.spec not in state.get("tuned"):
        state.set("tuned", [*state.get("tuned"), stored.spec])
    st.session_state.wse_upload_ok = f"Added {escape_markdown(resolver.label(stored.spec))} as a fine-tune."
    st.session_state.wse_uploader_n = st.session_state.get("wse_uploader_n", 0) + 1


def check_pending() -> None:
    """Files wait in server memory until "Add": more than this visitor may still upload
    are dropped at once (the uploader is cleared), not held."""
    # Noted here, where this run first reads them: a tab closed now gets this run stopped at
    # its next step (Streamlit's request_script_stop), before the body's hold_uploads, and
    # unnoted the values read would keep the bytes after the reaper let go of the records.
    upload_memory.hold_uploads(st.session_state.get(uploader_key))
    files = upload_memory.chosen_files(st.session_state.get(uploader_key))
    try:
        if len(files) > resolver.uploads.max_files:
            raise InputError("your files", f"{len(files)} at once; at most {resolver.uploads.max_files} are accepted")
        runtime.upload_quota(sum(f.size for f in files), pending=upload_memory.pending_elsewhere())
    except InputError as exc:
        st.session_state.wse_upload_error = runtime.friendly(str(exc))
        st.session_state.wse_uploader_n = st.session_state.get("wse_uploader_n", 0) + 1
        upload_memory.release_uploads(files)
    else:
        st.session_state.pop("wse_upload_error", None)


with st.container(border=True):
    st.file_uploader(
        "Upload a fine-tune: a PEFT adapter (adapter_config.json + adapter_model.safetensors, or a .zip of its "
        "folder), a kohya LoRA .safetensors, or a full model .safetensors (optionally with its config.json)",
        accept_multiple_files=True,
        key=uploader_key,
        on_change=check_pending,
        help="Pickle-based files (.bin, .pt) are refused: uploads are never unpickled.",
    )
    # Let go of if this tab closes without adding them. The values in session state, not the
    # widget's return value: Streamlit returns a deep copy of them (a private copy of every
    # file's bytes, freed as soon as it is dropped; kept, it would hold each file twice).
    upload_memory.hold_uploads(st.session_state.get(uploader_key))
    st.button("Add the upload as a fine-tune", on_click=add_upload, key="add_upload")
    if "wse_upload_error" in st.session_state:
        st.error(f"Upload refused: {escape_markdown(st.session_state.wse_upload_error)}")
    if st.session_state.pop("wse_upload_dropped", False):
        st.warning("This tab was disconnected and the server let go of the files chosen in it: choose them again.")
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
                    "matrix": m.key,  # one expert of a fused tensor: name#expert
                    # stack and expert: filled by engines that know them (one-stack, dense: empty)
                    "stack": getattr(m, "stack", None),
                    "layer": m.layer,
                    "module": m.module,
                    "expert": getattr(m, "expert", None),
                    "shape": f"{m.shape[0]}x{m.shape[1]}",
                    "adapter rank": m.adapter_rank,
                    # how each side is stored (bf16, fp8 e4m3 128x128 blocks, mxfp4, nf4; analysis.quant)
                    "storage": getattr(getattr(m, "id", None), "storage", None),
                    "tuned storage": getattr(getattr(m, "id", None), "tuned_storage", None),
                }
                for m in plan.matrices
            ]
        ),
        "skipped": tables.skipped_table(tables.plan_skipped(plan)),
        # Whether the plan lists every base tensor it leaves out (else only what it could not pair).
        "skipped_listed": getattr(plan, "skipped", None) is not None,
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
    skipped = preview["skipped"]
    if len(skipped):  # the reasons are listed inside, once each with its count
        n = int(skipped["tensors"].sum())
        parts.append(f"{n} tensor{'s' if n != 1 else ''} skipped")
    elif preview["skipped_listed"]:
        parts.append("no tensor skipped")
    storage = tables.storage_summary(summary)
    if storage:
        parts.append(f"stored as {storage}")
    return " · ".join(parts)


selection = state.current()
st.subheader("What was understood")
problems = 0
if not selection.complete:
    st.info("Choose a base model and at least one fine-tune.")
for index, spec in enumerate(selection.tuned):
    label = resolver.label(spec)
    try:
        found = runtime.series(spec) if is_series_spec(spec) else None
        if found is not None:  # a series is checked through its final checkpoint
            label = f"{label}, steps {', '.join(str(s) for s in found.steps)}; final checkpoint"
        checked = found.final.spec if found is not None else spec
        preview = plan_preview(selection.base, checked, str(resolver.uploads.root))
    except InputError as exc:
        problems += 1
        st.error(f"**{escape_markdown(label)}**: {escape_markdown(runtime.friendly(str(exc), label, spec=spec))}")
        continue
    except Exception as exc:  # a bug, not the visitor's input: say so without a traceback
        problems += 1
        error = f"internal error ({type(exc).__name__}: {runtime.friendly(str(exc))})"
        st.error(f"**{escape_markdown(label)}**: {escape_markdown(error)}")
        continue
    with st.expander(f"**{escape_markdown(label)}** — {escape_markdown(describe(preview))}"):
        adapter = preview["summary"].get("adapter")
        if adapter:
            shown = ("peft_type", "r", "lora_alpha", "use_rslora", "use_dora", "target_modules", "rank_pattern")
            st.write({k: adapter.get(k) for k in shown if k in adapter})
        st.dataframe(preview["matrices"], hide_index=True, placeholder="—")
        if len(preview["skipped"]):
            st.write("Not analysed, by reason:")
            views.table(preview["skipped"], f"skipped-{index}", label="Download CSV (skipped tensors)")
        if preview["unmatched"]:
            st.write("Present on one side only (not analysed):", escape_markdown(", ".join(preview["unmatched"])))
        if preview["shape_mismatches"]:
            st.write("Shapes differ (not analysed):", escape_markdown("; ".join(preview["shape_mismatches"])))


def skipped_by_reason(results) -> pd.DataFrame:
    """Skipped tensors of every ``(label, result)`` grouped by reason: each reason once, with
    its count and the fine-tunes it applies to (a reason shared by eight fine-tunes is one row)."""
    rows: dict[str, dict] = {}
    for label, result in results:
        for row in tables.skipped_table(tables.plan_skipped(result)).itertuples():
            entry = rows.setdefault(row.reason, {"reason": row.reason, "tensors": 0, "fine-tunes": [], "examples": ""})
            entry["tensors"] += int(row.tensors)
            entry["fine-tunes"].append(label)
            entry["examples"] = entry["examples"] or row.examples
    frame = pd.DataFrame(list(rows.values()), columns=["reason", "tensors", "fine-tunes", "examples"])
    frame["fine-tunes"] = [", ".join(labels) for labels in frame["fine-tunes"]]
    return frame.sort_values("tensors", ascending=False, kind="stable")


# -- run --------------------------------------------------------------------------------------
def analyse() -> None:
    chosen = state.current()
    runtime.track(chosen.base, chosen.tuned, start=True, restart=True)
    for spec in chosen.tuned:  # every checkpoint of a series, not only the final one
        if is_series_spec(spec):
            try:
                runtime.track_series(chosen.base, runtime.series(spec), start=True, restart=True)
            except InputError:
                pass  # shown above, and by the final checkpoint's failed job


st.button("Analyse", type="primary", on_click=analyse, disabled=not selection.complete or problems > 0, key="analyse")
tracked = runtime.track(selection.base, selection.tuned, start=False) if selection.complete else []
views.progress(selection.base, tracked)
done = [t for t in tracked if t.state is JobState.DONE]
if done:
    analysed = "; ".join(f"{resolver.label(t.spec)}: {len(t.job.result.matrices)} matrices" for t in done)
    st.success(escape_markdown(f"Analysed: {analysed}."))
    skipped = skipped_by_reason([(resolver.label(t.spec), t.job.result) for t in done])
    if len(skipped):
        with st.expander(f"Tensors not analysed: {int(skipped['tensors'].sum())}, for {len(skipped)} reason(s)"):
            st.dataframe(skipped, hide_index=True, placeholder="—")
for t in tracked:
    if t.state is JobState.FAILED:
        st.error(f"{escape_markdown(resolver.label(t.spec))}: {escape_markdown(views.error_text(t))}")
    elif t.state is JobState.CANCELLED:
        st.warning(f"{escape_markdown(resolver.label(t.spec))}: cancelled.")
if any(t.state is JobState.DONE for t in tracked):
    st.page_link("pages/overview.py", label="See the results", icon=":material/grid_view:")

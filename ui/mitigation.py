"""The Mitigate page's controls (kept in the URL) and its background job.

The view's own parameters (lambda, rule, exact rank, trade-off curve) live under
``mit_<name>`` session keys and in the query string (:data:`ui.state.PAGE_PARAMS`); k,
eps and the fine-tune are the shared selection's. The mitigation runs as a job of the
server's :class:`~analysis.jobs.JobManager` like every other analysis; a Cancel button
withdraws this session's interest.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import streamlit as st

from analysis.cache import default_cache_dir
from analysis.jobs import Job, JobState
from analysis.mitigate import MitigationSettings, job_key, mitigation_job
from ui import runtime

LAMBDA_STEP = 0.05
RULES = {"peft": "PEFT: every intruder in the top k", "top1": "paper: the top intruder of each matrix"}
POLL_SECONDS = 1.0


def _parse_lam(text: str | None) -> float:
    try:
        value = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0.75
    if not math.isfinite(value):
        return 0.75
    return round(min(1.0, max(0.0, round(value / LAMBDA_STEP) * LAMBDA_STEP)), 2)


def _flag(text: str | None, default: bool) -> bool:
    if text is None:
        return default
    return text.strip().lower() in ("1", "true", "yes", "on")


def load_params() -> None:
    """Fill the view's parameters once per session from the URL (a shared link)."""
    if st.session_state.get("mit_loaded"):
        return
    params = st.query_params
    st.session_state.mit_lam = _parse_lam(params.get("lam"))
    rule = params.get("rule")
    st.session_state.mit_rule = rule if rule in RULES else "peft"
    st.session_state.mit_exact = _flag(params.get("exact"), False)
    st.session_state.mit_curve = _flag(params.get("curve"), True)
    st.session_state.mit_loaded = True


def write_params() -> None:
    """Mirror the view's parameters in the URL (after the widgets ran)."""
    wanted = {
        "lam": f"{st.session_state.mit_lam:g}",
        "rule": st.session_state.mit_rule,
        "exact": "1" if st.session_state.mit_exact else "0",
        "curve": "1" if st.session_state.mit_curve else "0",
    }
    for key, value in wanted.items():
        if st.query_params.get(key) != value:
            st.query_params[key] = value


def controls() -> tuple[float, str, bool, bool]:
    """Sidebar widgets for lambda, the rule, exact rank and the trade-off curve."""
    with st.sidebar:
        lam = st.slider(
            "λ: scale of the intruders",
            min_value=0.0,
            max_value=1.0,
            step=LAMBDA_STEP,
            format="%.2f",
            key="mit_lam",
            help="Each intruder component of W + ΔW is multiplied by λ: 1 keeps it, 0 removes it.",
        )
        rule = st.radio("Rule", list(RULES), format_func=RULES.get, key="mit_rule")
        exact = st.checkbox(
            "Exact rank r + n (no truncation error)",
            key="mit_exact",
            help="PEFT truncates the mitigated update back to the adapter's rank r; keep rank r + n instead.",
        )
        curve = st.checkbox(
            "Trade-off curve (runs the model)",
            key="mit_curve",
            help="Held-out loss and task metric of base, fine-tune and mitigated fine-tune across a λ grid.",
        )
    return float(lam), str(rule), bool(exact), bool(curve)


def track(base: str, tuned: str, settings: MitigationSettings, curve: bool, *, start: bool = True) -> Job | None:
    """The job of this mitigation, started (or joined) when ``start``."""
    resolver = runtime.resolver()
    versions = (resolver.version(base), resolver.version(tuned))
    key = (*job_key(base, tuned, settings, curve, runtime.device()), str(default_cache_dir()), versions)
    jobs = runtime.manager()
    job = jobs.get(key)
    stale = job is not None and job.state in (JobState.FAILED, JobState.CANCELLED)
    if start and (job is None or (stale and st.session_state.get("mit_retry"))):
        fn = mitigation_job(
            resolver, base, tuned, settings, tradeoff=curve, device=runtime.device(), cache=runtime.spectrum_cache()
        )
        job = jobs.submit(key, fn, label=f"mitigate {resolver.label(tuned)}", watcher=runtime.session_id())
        st.session_state.mit_retry = False
    elif start and job is not None and not job.should_stop():
        job.watch(runtime.session_id())
    return job


def _cancel() -> None:
    runtime.manager().unwatch_all(runtime.session_id())


def _retry() -> None:
    st.session_state.mit_retry = True


def progress(job: Job) -> None:
    """Progress bar and Cancel while the job runs; the page reruns when it finishes."""

    @st.fragment(run_every=POLL_SECONDS)
    def poll() -> None:
        p = job.progress
        if job.state.finished:
            st.rerun()
        if job.state is JobState.QUEUED or p is None:
            st.progress(0.0, text="Mitigation: waiting for a free worker…")
        else:
            eta = f", about {p.eta_s:.0f} s left" if p.eta_s is not None and p.done < p.total else ""
            st.progress(p.fraction, text=f"Mitigation: step {p.done} of {p.total} ({p.step}){eta}")
        st.button("Cancel", key="cancel_mitigation", on_click=_cancel, help="Stop the mitigation this page started")

    poll()


def failed(job: Job) -> None:
    if job.state is JobState.FAILED:
        st.error(f"The mitigation failed: {runtime.friendly(job.error or '')}")
    else:
        st.warning("The mitigation was cancelled.")
    st.button("Run again", key="mit_run_again", on_click=_retry)


def export_zip(result, base: str, tuned: str, merged: bool) -> bytes:
    """The mitigated adapter (PEFT folder) or merged model, zipped (built on click)."""
    from analysis.mitigate import export_adapter, export_merged, zip_folder

    resolver = runtime.resolver()
    with tempfile.TemporaryDirectory(prefix="wse-mitigate-") as tmp:
        out = Path(tmp) / "export"
        if merged:
            export_merged(result.mitigation, resolver, base, tuned, out)
        else:
            export_adapter(result.mitigation, resolver, tuned, out)
        return zip_folder(out)

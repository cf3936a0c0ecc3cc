"""The Mitigate page's controls (kept in the URL) and its background job.

The view's own parameters (lambda, rule, exact rank, trade-off curve) are controls of the
one view (:data:`ui.state.CONTROLS`, drawn with :func:`ui.state.widget`), in the URL like
every other; k, eps, the fine-tune and the matrix are the shared selection's. The mitigation runs as a job of the
server's :class:`~hosting.jobs.JobManager` like every other analysis; a Cancel button
withdraws this session's interest.
"""

from __future__ import annotations

import io
import shlex
import tempfile
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path

import streamlit as st

from analysis.adapters import LoraAdapter
from analysis.cache import default_cache_dir
from analysis.errors import InputError
from analysis.mitigation import MitigationSettings, export_adapter, export_merged
from analysis.specs import is_upload_spec
from analysis.specs.series import is_series_spec
from hosting.jobs import Job, JobState
from hosting.mitigation_jobs import mitigation_key, mitigation_work
from ui import runtime, state
from ui.text import escape_markdown

LAMBDA_STEP = state.LAMBDA_STEP
RULES = {"peft": "PEFT: every intruder in the top k", "top1": "paper: the top intruder of each matrix"}
POLL_SECONDS = 2.0


def controls() -> tuple[float, str, bool, bool]:
    """Sidebar widgets for lambda, the rule, exact rank and the trade-off curve, bound to
    the view (:func:`ui.state.widget`), so the URL holds them like every other control."""
    with st.sidebar:
        lam = state.widget(
            st.slider,
            "λ: scale of the intruders",
            "lam",
            default=0.75,
            min_value=0.0,
            max_value=1.0,
            step=LAMBDA_STEP,
            format="%.2f",
            help="Each intruder component of W + ΔW is multiplied by λ: 1 keeps it, 0 removes it.",
        )
        rule = state.widget(st.radio, "Rule", "rule", default="peft", options=list(RULES), format_func=RULES.get)
        exact = state.widget(
            st.checkbox,
            "Exact rank r + n (no truncation error)",
            "exact",
            default=False,
            help="PEFT truncates the mitigated update back to the adapter's rank r; keep rank r + n instead.",
        )
        curve = state.widget(
            st.checkbox,
            "Trade-off curve (runs the model)",
            "curve",
            default=False,
            help="Held-out loss and task metric of base, fine-tune and mitigated fine-tune across a λ grid: "
            "one evaluation of the model per point (about a minute for the demo on two cores).",
        )
    return float(lam), str(rule), bool(exact), bool(curve)


def default_fine_tune(base: str, tuned: Sequence[str], k: int, eps: float) -> str | None:
    """The fine-tune the page opens on when the view names none: one worth mitigating.

    The one with the most intruders at (``k``, ``eps``) among the analyses finished on this
    server, else the first LoRA (adapter, or a merged LoRA the demo knows as one: LoRA is what
    makes intruders, Shuttleworth et al. 2024), else the first.
    """
    if not tuned:
        return None
    counts = {}
    for t in runtime.track(base, tuple(tuned), start=False):
        if t.state is JobState.DONE and t.job.result is not None:
            counts[t.spec] = t.job.result.total_intruders(k, eps)
    if any(counts.values()):
        return max(tuned, key=lambda spec: counts.get(spec, -1))
    resolver = runtime.resolver()
    for spec in tuned:
        try:
            if "lora_rank" in resolver.resolve(spec).summary or isinstance(resolver.open(spec), LoraAdapter):
                return spec
        except InputError:
            continue
    return tuned[0]


def run_curve() -> None:
    """Tick the trade-off curve (a button's callback)."""
    state.set("curve", True)


def track(base: str, tuned: str, settings: MitigationSettings, curve: bool, *, start: bool = True) -> Job | None:
    """The job of this mitigation, started (or joined) when ``start``."""
    resolver = runtime.resolver()
    versions = (resolver.version(base), resolver.version(tuned))
    key = (*mitigation_key(base, tuned, settings, curve, runtime.device()), str(default_cache_dir()), versions)
    jobs = runtime.manager()
    job = jobs.get(key)
    stale = job is not None and job.state in (JobState.FAILED, JobState.CANCELLED)
    if start and (job is None or (stale and st.session_state.get("mit_retry"))):
        fn = mitigation_work(
            str(default_cache_dir()), resolver.allow_local_paths, base, tuned, settings, tradeoff=curve,
            device=runtime.device(),
        )  # fmt: skip
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
            now = time.time()
            # Never back: a new estimate may be longer than the countdown of the last one.
            shown = max(p.fraction_at(now), st.session_state.get("mit_shown", {}).get(job.key, 0.0))
            st.session_state.mit_shown = {job.key: shown}
            st.progress(min(shown, 1.0), text=f"Mitigation: {escape_markdown(p.step)} · {time_left(p, now)}")
        st.button("Cancel", key="cancel_mitigation", on_click=_cancel, help="Stop the mitigation this page started")

    poll()


def time_left(p, now: float) -> str:
    """Words for the time a job has left (:meth:`hosting.jobs.Progress.eta_at`)."""
    left = p.eta_at(now) if p.remaining_s is not None else None
    if left is None:
        return f"step {p.done} of {p.total}, estimating the time left…"
    if left < 1:  # the estimate is used up and the step still runs: say so, never "0 s"
        return "taking longer than estimated…"
    if left < 5:
        return "a few seconds left"
    return f"about {left:.0f} s left" if left < 90 else f"about {left / 60:.0f} min left"


def failed(job: Job) -> None:
    if job.state is JobState.FAILED:
        st.error(f"The mitigation failed: {escape_markdown(runtime.friendly(job.error or ''))}")
    else:
        st.warning("The mitigation was cancelled.")
    st.button("Run again", key="mit_run_again", on_click=_retry)


def export_zip(result, base: str, tuned: str, merged: bool) -> bytes:
    """The mitigated adapter (PEFT folder) or merged model, zipped (built on click)."""

    resolver = runtime.resolver()
    with tempfile.TemporaryDirectory(prefix="wse-mitigate-") as tmp:
        out = Path(tmp) / "export"
        if merged:
            export_merged(result.mitigation, resolver, base, tuned, out)
        else:
            export_adapter(result.mitigation, resolver, tuned, out)
        return zip_folder(out)


def zip_folder(folder: Path) -> bytes:
    """The files of ``folder`` as a zip (for a download button)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(folder).as_posix())
    return buffer.getvalue()


def shell_command(base: str, tuned: str, settings: MitigationSettings) -> str:
    """The command line that makes the same mitigation, with the page's models named in it.

    A model the shell cannot name (an upload to this server, a checkpoint series) keeps
    the placeholder ``BASE`` or ``TUNED``.
    """

    def named(spec: str, word: str) -> str:
        return word if is_upload_spec(spec) or is_series_spec(spec) else shlex.quote(spec)

    return (
        f"python -m analysis mitigate {named(base, 'BASE')} {named(tuned, 'TUNED')} --lam {settings.lam:g} "
        f"--top-k {settings.top_k} --eps {settings.eps:g} --rule {settings.rule}"
        f"{' --exact' if settings.exact else ''} --out DIR"
    )

"""Figures and tables of the Mitigate page (pure: results in, figure/frame out).

Intruder mitigation: Shuttleworth et al. 2024 (arXiv:2410.21228), section 6 and Fig. 8;
the procedure is :mod:`analysis.mitigation`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from analysis.mitigation import MitigationResult
from analysis.results import DEFAULT_EPSILONS, MatrixResult
from charts import tables
from charts.colors import count_ticks
from charts.style import (
    INTRUDER_COLOR,
    MAX_SPECTRUM_POINTS,
    chart_text,
    integer_ticks,
    log_axis,
    log_sample,
    name_lines,
    rank_axis,
    title_margin,
    top_title,
)
from charts.table_words import COLUMN_MEASURES, MEASURES

#: A trade-off point's digits in a hover, as its table gives them (:data:`charts.table_words.MEASURES`).
LAM, LOSS, TASK = (MEASURES[m].digits for m in ("lambda", "loss", "task"))
BEFORE_COLOR = "#1f77b4"
AFTER_COLOR = "#2ca02c"
BASE_COLOR = "#7f7f7f"


def matrices_table(result: MitigationResult, k: int, eps: float) -> pd.DataFrame:
    """What the mitigation did, per matrix.

    Intruders scaled, intruders before/after at ``eps`` among the top ``k`` (the pipeline's
    counts), ``||dW||_F`` before/after and the re-factorisation error.

    Parameters
    ----------
    result : MitigationResult
        A mitigation with the analysis before and after it.
    k : int
        How many top tuned singular vectors are searched for intruders.
    eps : float
        The threshold on the best match below which a tuned vector is an intruder.

    Returns
    -------
    pandas.DataFrame
        One row per matrix the mitigation looked at.
    """
    before = {m.key: m for m in result.before.matrices}
    after = {m.key: m for m in result.after.matrices}
    rows = []
    for m in result.mitigation.matrices:
        b, a = before.get(m.key), after.get(m.key)
        rows.append(
            {
                "stack": m.stack,
                "layer": tables.layer_label(m.layer),
                "module": m.module,
                "expert": m.expert,
                "scaled": len(m.intruders),
                f"intruders before (ε={eps:g})": b.intruder_counts(k, [eps])[0] if b else None,
                f"after (ε={eps:g})": a.intruder_counts(k, [eps])[0] if a else None,
                "‖ΔW‖ before": m.delta_fro_before,
                "‖ΔW‖ after": m.delta_fro_after,
                "‖ΔW‖ change %": 100 * m.delta_change,
                "rank": f"{m.rank} → {m.new_rank}" if m.rank is not None else "full",
                REFACTOR_COLUMN: 100 * m.refactor_rel_error,
                "mitigated": m.mitigated,
                "matrix": m.key,
            }
        )
    return pd.DataFrame(rows)


def counts_table(result: MitigationResult, k: int) -> pd.DataFrame:
    """Total intruders among the top ``k`` at each eps, before and after the mitigation.

    Parameters
    ----------
    result : MitigationResult
        A mitigation with the analysis before and after it.
    k : int
        How many top tuned singular vectors are searched for intruders.

    Returns
    -------
    pandas.DataFrame
        Columns ``eps``, ``before``, ``after`` at :data:`analysis.results.DEFAULT_EPSILONS`.
    """
    counts = result.counts(DEFAULT_EPSILONS, k)
    return pd.DataFrame({"eps": counts["eps"], "before": counts["before"], "after": counts["after"]})


def sweep_figure(result: MitigationResult, k: int, eps: float) -> go.Figure:
    """Total intruders among the top ``k`` vs eps, before and after the mitigation.

    Parameters
    ----------
    result : MitigationResult
        A mitigation with the analysis before and after it.
    k : int
        How many top tuned singular vectors are searched for intruders.
    eps : float
        The current threshold, marked by a dotted line.

    Returns
    -------
    plotly.graph_objects.Figure
    """
    frame = counts_table(result, k)
    fig = go.Figure()
    for column, name, color, dash in (
        ("before", "fine-tune", BEFORE_COLOR, "dash"),
        ("after", "mitigated", AFTER_COLOR, "solid"),
    ):
        fig.add_trace(
            go.Scatter(
                x=frame["eps"],
                y=frame[column],
                mode="lines+markers",
                name=name,
                line={"color": color, "dash": dash},
                hovertemplate=f"{name}<br>ε = %{{x:.2f}}: %{{y}} intruders<extra></extra>",
            )
        )
    fig.add_vline(x=eps, line={"color": "#999", "dash": "dot"})
    lam = result.mitigation.settings.lam
    top = float(max(5, frame["before"].max(), frame["after"].max()))
    fig.update_layout(
        # Short lines: a phone's width cuts a long title.
        title=f"Intruders vs ε, before and after<br><sup>top {k}, summed over {len(result.mitigation.matrices)} "
        f"matrices, scaled by λ = {lam:g}</sup>",
        xaxis={"title": "ε"},
        # Whole counts from 0 (ticks of 0.2 when nothing intrudes); a little room below 0 so
        # a curve lying on zero is not cut by the axis.
        yaxis={"title": "intruders", "range": [-0.04 * top, 1.08 * top], **count_ticks(top, most=8)},
        height=380,
        legend={"orientation": "h", "y": -0.25},
        margin={"l": 50, "r": 10, "t": 50},
    )
    return fig


def why_intruders_stay(result: MitigationResult, k: int, eps: float) -> str:
    """One sentence on why scaled intruders can still count as intruders after the mitigation.

    Scaling a component by ``lambda`` shrinks its singular value but keeps its direction
    (``u_j``, ``v_j``), and an intruder is a direction (Shuttleworth et al. Def. 3.1): it
    stops being counted only when ``lambda * s_j`` drops out of the top ``k`` (or, at
    ``lambda = 0``, when it is removed).

    Parameters
    ----------
    result : MitigationResult
        A mitigation with the analysis before and after it.
    k : int
        How many top tuned singular vectors are searched for intruders.
    eps : float
        The threshold on the best match below which a tuned vector is an intruder.

    Returns
    -------
    str
        Plain text (no Markdown), naming the counts of this result.
    """
    lam = result.mitigation.settings.lam
    scaled = int(result.mitigation.totals()["intruders_scaled"])
    counts = result.counts([eps], int(k))
    before, after = int(counts["before"][0]), int(counts["after"][0])
    if scaled == 0:
        return f"Nothing was scaled: no intruder among the top {k} at ε = {eps:g}."
    if lam == 0:
        return f"λ = 0 removes the {scaled} scaled components: {before} intruders before, {after} after."
    return (
        f"Scaling by λ = {lam:g} shrinks each of the {scaled} scaled components but keeps its direction, and an "
        f"intruder is a direction: it is counted until its shrunk singular value falls out of the top {k}. "
        f"{before} intruders before, {after} after; a smaller λ pushes more out."
    )


def change_text(fraction: float) -> str | None:
    """A relative change as a metric's delta (``-12.3 %``); ``None`` when it rounds to no change.

    ``up +0.0 %`` once stood beside an unchanged ``‖ΔW‖_F``.

    Parameters
    ----------
    fraction : float
        The change, ``after / before - 1``.

    Returns
    -------
    str or None
        One decimal with its sign, or ``None`` (no delta shown) below 0.05 %.
    """
    if not np.isfinite(fraction) or abs(100 * fraction) < 0.05:
        return None
    return f"{100 * fraction:+.1f} %"


#: The per-matrix table's column of the re-factorisation error, in % (its digits:
#: :data:`charts.table_words.COLUMN_MEASURES`).
REFACTOR_COLUMN = "re-factorisation error %"


def refactor_text(totals: dict) -> str:
    """The model's re-factorisation error as its card writes it: ``0.12 %``.

    ``‖exported ΔW − exact mitigated ΔW‖_F / ‖exact mitigated ΔW‖_F`` over every matrix
    (``totals`` is :meth:`analysis.mitigation.MitigationResult.totals`; 0 where the exact
    update is 0), in % with the digits of the per-matrix table's column (the card wrote
    ``%.3g``, "0.123 %", beside "0.12" in the table).
    """
    share = totals["refactor_error"] / totals["delta_fro_exact"] if totals["delta_fro_exact"] else 0.0
    return MEASURES[COLUMN_MEASURES[REFACTOR_COLUMN]].text(100 * share)


#: The spectra chart opens on the top ranks around the scaled components, at least this many.
SPECTRA_WINDOW = 24


def spectra_window(n: int, intruders: list[int]) -> int:
    """How many top ranks the spectra chart opens on: around the scaled components.

    Three spectra over hundreds of ranks on log axes hid the change (a scaled intruder was
    a few pixels): the chart opens on ranks 1 to twice the deepest scaled rank (at least
    :data:`SPECTRA_WINDOW`), on linear axes from 0, so a component scaled by λ = 0.75 is a
    quarter lower; a double click shows every rank. With nothing scaled, every rank.

    Parameters
    ----------
    n : int
        How many ranks the spectra have.
    intruders : list of int
        0-based tuned ranks of the scaled components.

    Returns
    -------
    int
        The last rank shown, at most ``n``.
    """
    if not intruders:
        return max(1, n)
    deepest = max(intruders) + 1
    return max(1, min(n, max(SPECTRA_WINDOW, 2 * deepest)))


def spectra_figure(before: MatrixResult, after: MatrixResult, intruders: list[int], label: str = "") -> go.Figure:
    """Singular values of the base, the tuned and the mitigated weight.

    Around the scaled components (:func:`spectra_window`) on linear axes from 0; with
    nothing scaled, every rank on log scales, ticks at 1-2-5 only. The components that
    were scaled are marked at their rank in the tuned spectrum. The base is a thick pale
    line under the others, so it shows where the mitigated spectrum lies on it.

    Parameters
    ----------
    before : MatrixResult
        The matrix in the fine-tune's analysis.
    after : MatrixResult
        The same matrix after the mitigation.
    intruders : list of int
        0-based tuned ranks of the components that were scaled.
    label : str
        The fine-tune's label, put before the matrix in the title.

    Returns
    -------
    plotly.graph_objects.Figure
    """
    fig = go.Figure()
    shown: list[float] = []
    lengths = (before.base_singular_values, before.tuned_singular_values, after.tuned_singular_values)
    n_max = max(1, *(len(v) for v in lengths))
    window = spectra_window(n_max, intruders)
    for values, name, color, dash, width in (
        (before.base_singular_values, "W₀ (base)", BASE_COLOR, "solid", 6.0),
        (before.tuned_singular_values, "Wₜ (fine-tune)", BEFORE_COLOR, "dash", 2.0),
        (after.tuned_singular_values, "mitigated", AFTER_COLOR, "solid", 2.0),
    ):
        values = np.asarray(values, dtype=float)
        idx = log_sample(len(values), intruders, MAX_SPECTRUM_POINTS)
        keep = values[idx] > 0
        shown.extend(v for i, v in zip(idx[keep], values[idx][keep], strict=True) if i < window)
        fig.add_trace(
            go.Scatter(
                x=idx[keep] + 1,
                y=values[idx][keep],
                mode="lines+markers" if window <= 60 else "lines",
                marker={"size": 5, "color": color},
                name=name,
                line={"color": color, "dash": dash, "width": width},
                opacity=0.45 if name.startswith("W₀") else 1.0,
                hovertemplate=f"{name}<br>rank %{{x}}: σ = %{{y:.4g}}<extra></extra>",
            )
        )
    if intruders:
        tuned = np.asarray(before.tuned_singular_values, dtype=float)
        ranks = [i for i in intruders if i < len(tuned)]
        fig.add_trace(
            go.Scatter(
                x=[i + 1 for i in ranks],
                y=tuned[ranks],
                mode="markers",
                name="scaled intruder",
                marker={"symbol": "x", "size": 12, "color": INTRUDER_COLOR, "line": {"width": 2}},
                hovertemplate="scaled intruder at rank %{x}<br>σ = %{y:.4g}<extra></extra>",
            )
        )
    # Short first line (narrow screens), what is shown below it, the tensor name last.
    part = f"ranks 1–{window} of {n_max}" if window < n_max else f"all {n_max} ranks"  # double-click: all
    title = (
        f"{chart_text(label) + ': ' if label else ''}{chart_text(before.short_label)}<br><sup>{len(intruders)} "
        f"component{'s' if len(intruders) != 1 else ''} scaled · {part}</sup>{name_lines(before.name)}"
    )
    fig.update_layout(
        title=top_title(title),
        xaxis=rank_axis(n_max)
        if window == n_max and not intruders
        else {"title": "rank", "range": [0.5, window + 0.5], "tickvals": integer_ticks(window, 8)},
        yaxis=log_axis(shown, title="singular value")
        if window == n_max and not intruders
        else {"title": "singular value", "range": [0, 1.08 * max(shown, default=1.0)]},
        height=420 + max(0, title_margin(title) - 60),
        legend={"orientation": "h", "y": -0.25},
        margin={"l": 50, "r": 10, "t": title_margin(title)},
    )
    return fig


def tradeoff_table(result: MitigationResult) -> pd.DataFrame:
    """The trade-off points of :func:`tradeoff_figure`: held-out loss and task metric per lambda.

    Parameters
    ----------
    result : MitigationResult
        A mitigation with the analysis before and after it.

    Returns
    -------
    pandas.DataFrame
        Columns ``model``, ``lambda``, ``held-out loss``, ``task`` (empty when not computed).
    """
    tradeoff = result.tradeoff
    if tradeoff is None:
        return pd.DataFrame(columns=["model", "lambda", "held-out loss", "task"])
    return pd.DataFrame(
        {
            "model": [p["label"] for p in tradeoff.points],
            "lambda": [p["lam"] for p in tradeoff.points],
            "held-out loss": [p["loss"] for p in tradeoff.points],
            "task": [p["task"] for p in tradeoff.points],
        }
    )


def _label_positions(xy: list[tuple[float, float]], labels: list[str]) -> list[str]:
    """Text positions for labelled points.

    Above each, unless that lands on the label of a point close by (within 6% of the
    spread on both axes), then below, right or left. A point without a label (it shares
    one, :func:`_lambda_labels`) takes no position.
    """
    xs, ys = [x for x, _ in xy], [y for _, y in xy]
    span_x, span_y = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    positions: list[str] = []
    for i, (x, y) in enumerate(xy):
        near = {
            positions[j]
            for j in range(i)
            if labels[j] and abs(xy[j][0] - x) < 0.06 * span_x and abs(xy[j][1] - y) < 0.06 * span_y
        }
        choices = ("top center", "bottom center", "middle right", "middle left")
        positions.append(next((c for c in choices if c not in near), "top center"))
    return positions


def _lambda_labels(points: list[dict]) -> list[str]:
    """``λ=...`` for each point, once per position.

    Points that land on the same spot (nothing scaled at these settings, so every λ gives
    the fine-tune) share one label, ``λ=0–1`` for three or more, instead of labels piled on
    each other.
    """
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(points):
        groups.setdefault((round(p["loss"], 9), p["task"] if p["task"] is None else round(p["task"], 9)), []).append(i)
    labels = [""] * len(points)
    for members in groups.values():
        lams = sorted(points[i]["lam"] for i in members)
        shown = f"{lams[0]:g}–{lams[-1]:g}" if len(lams) > 2 else ", ".join(f"{lam:g}" for lam in lams)
        labels[members[0]] = f"λ={shown}"
    return labels


#: An axis of the trade-off spans at least this fraction of its largest value.
MIN_RELATIVE_SPAN = 0.2


def honest_range(values: list[float], pad: float = 0.08, least: float = MIN_RELATIVE_SPAN) -> list[float]:
    """An axis range over ``values`` that does not blow a small difference up to the full width.

    The trade-off's loss axis once spanned 2.075-2.14 (3 % of the loss) and put the base
    and the fine-tune at opposite edges. The range spans at least ``least`` times the
    largest absolute value, centred on the values, plus ``pad`` of that span at each end
    (room for the points' labels).

    Parameters
    ----------
    values : list of float
        The values on the axis (at least one).
    pad : float
        Extra room at each end, as a fraction of the span.
    least : float
        The least span, as a fraction of the largest absolute value.

    Returns
    -------
    list of float
        ``[low, high]``.
    """
    low, high = min(values), max(values)
    span = max(high - low, least * max(abs(low), abs(high)), 1e-12)
    mid = (low + high) / 2
    return [mid - span / 2 - pad * span, mid + span / 2 + pad * span]


def tradeoff_figure(result: MitigationResult) -> go.Figure:
    """Paper Fig. 8: forgetting (held-out loss, lower is better) against the task metric.

    For the base, the fine-tune and the mitigated fine-tune at each lambda; without a task
    metric, the held-out loss against lambda.

    Parameters
    ----------
    result : MitigationResult
        A mitigation with the analysis before and after it.

    Returns
    -------
    plotly.graph_objects.Figure
        A message instead when the trade-off was not computed.
    """
    tradeoff = result.tradeoff
    fig = go.Figure()
    if tradeoff is None or not tradeoff.points:
        fig.add_annotation(
            text=chart_text(tradeoff.note if tradeoff else "not computed"), showarrow=False, xref="paper", yref="paper"
        )
        fig.update_layout(height=200, xaxis={"visible": False}, yaxis={"visible": False})
        return fig
    points = tradeoff.points
    mitigated = [p for p in points if p["lam"] is not None and p["label"] != "fine-tune"]
    fixed = [p for p in points if p["label"] in ("base", "fine-tune")]
    if tradeoff.task_name:
        labels = _lambda_labels(mitigated)
        fig.add_trace(
            go.Scatter(
                x=[p["loss"] for p in mitigated],
                y=[p["task"] for p in mitigated],
                mode="lines+markers+text",
                text=labels,
                textposition=_label_positions([(p["loss"], p["task"]) for p in mitigated], labels),
                customdata=[p["lam"] for p in mitigated],
                name="mitigated",
                line={"color": AFTER_COLOR},
                hovertemplate=f"λ=%{{customdata:{LAM}}}<br>loss %{{x:{LOSS}}}<br>task %{{y:{TASK}}}<extra></extra>",
                cliponaxis=False,  # a label at the axis end may reach into the margin (phones)
            )
        )
        for p, color in zip(fixed, (BASE_COLOR, BEFORE_COLOR), strict=False):
            fig.add_trace(
                go.Scatter(
                    x=[p["loss"]],
                    y=[p["task"]],
                    mode="markers+text",
                    text=[p["label"]],
                    textposition="bottom center",
                    name=p["label"],
                    marker={"size": 12, "color": color, "symbol": "diamond"},
                    hovertemplate=f"{p['label']}<br>loss %{{x:{LOSS}}}<br>task %{{y:{TASK}}}<extra></extra>",
                    cliponaxis=False,
                )
            )
        losses = [p["loss"] for p in points]
        fig.update_layout(
            xaxis={
                "title": tradeoff.loss_name + "<br>(forgetting: lower is better)",
                "range": honest_range(losses, pad=0.08),
            }
        )
        tasks = [p["task"] for p in points if p["task"] is not None]
        fig.update_layout(yaxis={"title": tradeoff.task_name, "range": honest_range(tasks, pad=0.12)})
    else:
        fig.add_trace(
            go.Scatter(
                x=[p["lam"] for p in mitigated],
                y=[p["loss"] for p in mitigated],
                mode="lines+markers",
                name="mitigated",
                line={"color": AFTER_COLOR},
            )
        )
        for p, color in zip(fixed, (BASE_COLOR, BEFORE_COLOR), strict=False):
            fig.add_hline(y=p["loss"], line={"color": color, "dash": "dash"}, annotation_text=p["label"])
        fig.update_layout(xaxis={"title": "λ"}, yaxis={"title": tradeoff.loss_name})
    fig.update_layout(
        title="Forgetting vs task across λ<br><sup>Shuttleworth et al. 2024, Fig. 8</sup>",
        height=420,
        legend={"orientation": "h", "y": -0.25},
        margin={"l": 50, "r": 10, "t": 50},
    )
    return fig

"""Tidy tables of comparison results: the numbers behind every chart.

Each dashboard chart is drawn from one of these tables (:mod:`charts.figures`), and the
same table is what its "Download CSV" button writes, so a downloaded file always holds
exactly the numbers on screen. Pure functions: results in, :class:`pandas.DataFrame`
out; nothing here loads weights or imports Streamlit.

The metrics themselves live in :mod:`analysis.metrics` and :class:`MatrixResult`
(intruder counts, Shuttleworth et al. 2024 Def. 3.1; effective rank, Roy & Vetterli
2007; rank90, Biderman et al. 2024; subspace similarity and amplification factor, Hu et
al. 2021 sec. 7); the functions here only gather them.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from analysis import metrics
from analysis.plan import matrix_key
from analysis.results import MatrixResult, ModelResult

#: The order modules are shown in: attention first, then MLP, as they run in a block.
MODULE_ORDER: tuple[str, ...] = (
    "query",
    "key",
    "value",
    "qkv",
    "attn_out",
    "self_attn_out",
    "cross_query",
    "cross_key",
    "cross_value",
    "cross_attn_out",
    "router",
    "gate",
    "up",
    "gate_up",
    "down",
    "mlp_in",
    "mlp_out",
)


def module_order(modules: Iterable[str]) -> list[str]:
    """Distinct module kinds in block order (:data:`MODULE_ORDER`), unknown ones last."""
    known = {m: i for i, m in enumerate(MODULE_ORDER)}
    return sorted(set(modules), key=lambda m: (known.get(m, len(known)), m))


def layer_label(layer: int | None) -> str:
    """How a layer is named on an axis: its block index, or ``other`` outside blocks."""
    return "other" if layer is None else str(layer)


def matrix_title(matrix: MatrixResult) -> str:
    """A matrix in a chart title: its tensor name, and the expert for an expert slice."""
    return matrix.name if matrix.expert is None else f"{matrix.name} · expert {matrix.expert}"


def identity_order(matrices: Iterable[MatrixResult]) -> list[MatrixResult]:
    """Matrices by stack (as first met), layer, module (:data:`MODULE_ORDER`), expert."""
    matrices = list(matrices)
    stacks = list(dict.fromkeys(m.stack for m in matrices))
    modules = module_order(m.module for m in matrices)
    return sorted(
        matrices,
        key=lambda m: (
            stacks.index(m.stack),
            m.layer is None,
            m.layer or 0,
            modules.index(m.module),
            -1 if m.expert is None else m.expert,
        ),
    )


def describe_matrix(matrix: MatrixResult) -> str:
    """A picker's words for a matrix: ``layer 3 · value``, ``decoder · layer 1 · cross_attn_out``,
    ``layer 0 · down · expert 5``."""
    parts = [matrix.stack] if matrix.stack else []
    parts += [f"layer {layer_label(matrix.layer)}", matrix.module]
    if matrix.expert is not None:
        parts.append(f"expert {matrix.expert}")
    return " · ".join(parts)


def model_labels(models: Sequence[ModelResult]) -> list[str]:
    """One distinct display label per fine-tune (a numeric suffix breaks ties)."""
    labels: list[str] = []
    for model in models:
        label = model.label
        n = 2
        while label in labels:
            label = f"{model.label} ({n})"
            n += 1
        labels.append(label)
    return labels


def adapter_rank(model: ModelResult) -> int | None:
    """The LoRA rank of a fine-tune, if it is known to be LoRA (else ``None``).

    From the adapter config for PEFT adapters, from the per-matrix ranks otherwise
    (largest wins when ``rank_pattern`` varies it), or from ``summary["lora_rank"]``
    for merged LoRA checkpoints whose origin the caller knows (the offline demo).
    """
    adapter = model.summary.get("adapter") or {}
    if adapter.get("r"):
        return int(adapter["r"])
    ranks = [m.adapter_rank for m in model.matrices if m.adapter_rank]
    if ranks:
        return max(ranks)
    if model.summary.get("lora_rank"):
        return int(model.summary["lora_rank"])
    return None


def is_lora(model: ModelResult) -> bool:
    """Whether the fine-tune is a LoRA (adapter, or a merged LoRA known to be one)."""
    return model.kind == "adapter" or adapter_rank(model) is not None


def training_method(model: ModelResult) -> str:
    """Short words for how the fine-tune was trained, e.g. ``LoRA r=8`` or ``full FT``."""
    adapter = model.summary.get("adapter") or {}
    rank = adapter_rank(model)
    if rank is not None:
        name = "DoRA" if adapter.get("use_dora") else "LoRA"
        if adapter.get("use_rslora"):
            name = "rsLoRA"
        merged = "" if model.kind == "adapter" else ", merged"
        return f"{name} r={rank}{merged}"
    return "full FT"


def names_method(label: str, method: str) -> bool:
    """Whether a fine-tune's ``label`` already says its :func:`training_method` (the demo's
    "LoRA r=8", "Full fine-tuning"), so views print the method only where it adds something."""
    label, method = label.lower(), method.lower()
    return method in label or (method == "full ft" and ("full" in label and ("ft" in label or "fine-tun" in label)))


#: The columns that say where a matrix lives, in every per-matrix table (and its CSV).
IDENTITY_COLUMNS: tuple[str, ...] = ("stack", "layer", "module", "expert", "label")


def matrix_table(models: Sequence[ModelResult], k: int | None = None, eps: float | None = None) -> pd.DataFrame:
    """One row per fine-tune and matrix: every scalar metric, and intruders at (k, eps).

    The ``intruders`` column is left empty when ``k`` or ``eps`` is not given.
    """
    rows = []
    for label, model in zip(model_labels(models), models, strict=True):
        method = training_method(model)
        for m in model.matrices:
            rows.append(
                {
                    "model": label,
                    "method": method,
                    "matrix": matrix_key(m),
                    "stack": m.stack,
                    "layer": layer_label(m.layer),
                    "module": m.module,
                    "expert": m.expert,
                    "label": m.short_label,
                    "shape": f"{m.shape[0]}x{m.shape[1]}",
                    "intruders": m.intruder_counts(k, [eps])[0] if k is not None and eps is not None else None,
                    "effective_rank": m.effective_rank,
                    "rank90": m.rank90,
                    "stable_rank": m.stable_rank,
                    "delta_fro": m.delta_fro,
                    "amplification_factor": m.amplification_factor,
                    "adapter_rank": m.adapter_rank,
                }
            )
    columns = [
        "model",
        "method",
        "matrix",
        *IDENTITY_COLUMNS,
        "shape",
        "intruders",
        "effective_rank",
        "rank90",
        "stable_rank",
        "delta_fro",
        "amplification_factor",
        "adapter_rank",
    ]
    return pd.DataFrame(rows, columns=columns)


def totals_table(models: Sequence[ModelResult], k: int, eps: float) -> pd.DataFrame:
    """Per-model totals (docs/metrics.md: sums over the analysed matrices) at (k, eps)."""
    rows = [
        {
            "model": label,
            "method": training_method(model),
            "matrices": len(model.matrices),
            "intruders": model.total_intruders(k, eps),
            "mean_effective_rank": float(np.mean([m.effective_rank for m in model.matrices]))
            if model.matrices
            else float("nan"),
            "mean_rank90": float(np.mean([m.rank90 for m in model.matrices])) if model.matrices else float("nan"),
        }
        for label, model in zip(model_labels(models), models, strict=True)
    ]
    return pd.DataFrame(
        rows, columns=["model", "method", "matrices", "intruders", "mean_effective_rank", "mean_rank90"]
    )


def sweep_table(
    models: Sequence[ModelResult],
    k: int,
    epsilons: Sequence[float],
    matrices: Collection[str] | None = None,
) -> pd.DataFrame:
    """Intruder counts summed over the chosen matrices, one row per (model, eps).

    ``matrices`` restricts the sum to those matrices (:func:`matrix_key`; ``None``: all analysed).
    """
    rows = []
    for label, model in zip(model_labels(models), models, strict=True):
        chosen = [m for m in model.matrices if matrices is None or matrix_key(m) in matrices]
        totals = np.zeros(len(epsilons), dtype=np.int64)
        for m in chosen:
            totals += np.asarray(m.intruder_counts(k, list(epsilons)), dtype=np.int64)
        for eps, count in zip(epsilons, totals, strict=True):
            rows.append(
                {
                    "model": label,
                    "method": training_method(model),
                    "epsilon": float(eps),
                    "intruders": int(count),
                    "matrices": len(chosen),
                }
            )
    return pd.DataFrame(rows, columns=["model", "method", "epsilon", "intruders", "matrices"])


def breakdown_table(
    models: Sequence[ModelResult],
    k: int,
    eps: float,
    by: str,
    matrices: Collection[str] | None = None,
) -> pd.DataFrame:
    """Intruder counts at (k, eps) summed per ``by`` (``"layer"`` or ``"module"``).

    In a model with several stacks each stack keeps its own bars (``encoder 0``,
    ``decoder 0``); mixture-of-experts slices add up into their layer or module.
    """
    if by not in ("layer", "module"):
        raise ValueError(f"by must be 'layer' or 'module', got {by!r}")
    table = matrix_table(models, k, eps)
    if matrices is not None:
        table = table[table["matrix"].isin(list(matrices))]
    if table["stack"].notna().any():  # encoder layer 0 and decoder layer 0 are two bars, not one
        table = table.assign(**{by: table["stack"].fillna("").str.cat(table[by], sep=" ").str.strip()})
    grouped = table.groupby(["model", by], sort=False, as_index=False)["intruders"].sum()
    return grouped[["model", by, "intruders"]]


def spectrum_table(matrix: MatrixResult) -> pd.DataFrame:
    """Singular values of base, tuned and update by rank (1-based; blank past the end)."""
    n = max(len(matrix.base_singular_values), len(matrix.tuned_singular_values), len(matrix.delta_singular_values))

    def padded(values: np.ndarray) -> np.ndarray:
        out = np.full(n, np.nan)
        out[: len(values)] = values
        return out

    return pd.DataFrame(
        {
            "rank": np.arange(1, n + 1),
            "base": padded(matrix.base_singular_values),
            "tuned": padded(matrix.tuned_singular_values),
            "update": padded(matrix.delta_singular_values),
        }
    )


def intruder_table(matrix: MatrixResult, k: int, eps: float) -> pd.DataFrame:
    """The top-``k`` tuned singular vectors: best-match score, base match, intruder flag.

    Shuttleworth et al. 2024, Def. 3.1: ``score_j = max_i |<Ut[:, j], U0[:, i]>|`` over
    all base vectors; ``Ut[:, j]`` is an intruder iff ``score_j < eps``.
    """
    k = min(k, len(matrix.intruder_scores))
    scores = np.asarray(matrix.intruder_scores[:k], dtype=np.float64)
    return pd.DataFrame(
        {
            "tuned_rank": np.arange(1, k + 1),
            "singular_value": np.asarray(matrix.tuned_singular_values[:k], dtype=np.float64),
            "best_match_score": scores,
            "best_match_base_rank": np.asarray(matrix.best_match[:k], dtype=np.int64) + 1,
            "intruder": scores < eps,
        }
    )


def similarity_table(matrix: MatrixResult) -> pd.DataFrame:
    """``|Ut^T U0|`` as a table: rows tuned rank, columns base rank (both 1-based)."""
    sim = np.asarray(matrix.similarity)
    return pd.DataFrame(
        sim,
        index=pd.Index(np.arange(1, sim.shape[0] + 1), name="tuned_rank"),
        columns=[f"base_{j}" for j in range(1, sim.shape[1] + 1)],
    )


def update_rank(matrix: MatrixResult, rtol: float = 1e-5) -> int:
    """Numerical rank of ``dW``: singular values above ``rtol * s_1``.

    Singular vectors past it span no part of the update (for a rank-``r`` LoRA they are
    an arbitrary basis of the rest of the space), so subspace similarity stops there.
    """
    s = np.asarray(matrix.delta_singular_values, dtype=np.float64)
    if s.size == 0 or s[0] <= 0:
        return 0
    return int(np.count_nonzero(s > rtol * s[0]))


def subspace_similarity(a: MatrixResult, b: MatrixResult, max_dim: int = 64) -> np.ndarray:
    """``phi(i, j)`` (Hu et al. 2021, eq. 4) between two updates of the same matrix.

    Uses the left singular vectors of each ``dW`` (``delta_left_vectors``), the natural
    choice for any two updates, full or LoRA (docs/metrics.md), up to each update's numerical
    rank (:func:`update_rank`) and at most ``max_dim``. Returns an ``(i_max, j_max)``
    array with ``phi[i-1, j-1] = phi(i, j)``.
    """
    if a.shape != b.shape:
        raise ValueError(f"{a.name} has shape {a.shape} in one result and {b.shape} in the other")
    ia = min(max_dim, a.delta_left_vectors.shape[1], update_rank(a))
    jb = min(max_dim, b.delta_left_vectors.shape[1], update_rank(b))
    if ia == 0 or jb == 0:
        return np.zeros((ia, jb))
    P = torch.from_numpy(np.asarray(a.delta_left_vectors[:, :ia], dtype=np.float32))
    Q = torch.from_numpy(np.asarray(b.delta_left_vectors[:, :jb], dtype=np.float32))
    return metrics.subspace_similarity(P, Q)


def phi_table(phi: np.ndarray) -> pd.DataFrame:
    """``phi(i, j)`` as a table: rows ``i`` (first update), columns ``j`` (second)."""
    return pd.DataFrame(
        phi,
        index=pd.Index(np.arange(1, phi.shape[0] + 1), name="i"),
        columns=[f"j_{j}" for j in range(1, phi.shape[1] + 1)],
    )


def amplification_table(models: Sequence[ModelResult], matrices: Collection[str] | None = None) -> pd.DataFrame:
    """Amplification factor of each update (Hu et al. 2021, sec. 7.3), with its rank.

    ``||dW||_F / ||U^T W_base V||_F`` with ``U``, ``V`` the top-``r`` singular vectors
    of ``dW`` (``r`` = ``amplification_rank``); ``None`` (undefined) for a zero update.
    """
    rows = []
    for label, model in zip(model_labels(models), models, strict=True):
        for m in model.matrices:
            if matrices is not None and matrix_key(m) not in matrices:
                continue
            rows.append(
                {
                    "model": label,
                    "method": training_method(model),
                    "matrix": matrix_key(m),
                    "stack": m.stack,
                    "layer": layer_label(m.layer),
                    "module": m.module,
                    "expert": m.expert,
                    "label": m.short_label,
                    "r": m.amplification_rank,
                    "delta_fro": m.delta_fro,
                    "amplification_factor": m.amplification_factor,
                }
            )
    return pd.DataFrame(
        rows,
        columns=["model", "method", "matrix", *IDENTITY_COLUMNS, "r", "delta_fro", "amplification_factor"],
    )


#: Columns of :func:`overview_table`.
OVERVIEW_COLUMNS: tuple[str, ...] = (
    "section",
    "model_index",
    "model",
    "method",
    "row",
    "column",
    "matrix",
    "name",
    *IDENTITY_COLUMNS,
    "value",
)


def overview_section(matrix: MatrixResult) -> tuple[str | None, str | None]:
    """Which overview grid a matrix is drawn in: ``(stack, None)`` for its stack's
    layer x module grid, ``(stack, module)`` for the layer x expert grid of an expert module.
    """
    return (matrix.stack, None if matrix.expert is None else matrix.module)


def section_title(section: tuple[str | None, str | None]) -> str:
    """Words for an overview grid: ``decoder: layer × module``, ``experts of down: layer × expert``."""
    stack, expert_module = section
    where = f"{stack}: " if stack else ""
    if expert_module is None:
        return f"{where}layer × module"
    return f"{where}experts of {expert_module}: layer × expert"


def grid_cell(matrix: MatrixResult) -> dict:
    """Where a matrix sits in an overview-style grid (:func:`overview_section` as text, row,
    column) and its identity: the columns the overview and the series grid share."""
    return {
        "section": section_title(overview_section(matrix)),
        "row": layer_label(matrix.layer),
        "column": matrix.module if matrix.expert is None else str(matrix.expert),
        "matrix": matrix_key(matrix),
        "name": matrix.name,
        "stack": matrix.stack,
        "layer": layer_label(matrix.layer),
        "module": matrix.module,
        "expert": matrix.expert,
        "label": matrix.short_label,
    }


def overview_table(models: Sequence[ModelResult], metric: str, k: int, eps: float) -> pd.DataFrame:
    """One row per fine-tune and matrix, placed in its overview grid cell.

    ``section`` (:func:`overview_section`, as text by :func:`section_title`) names the
    grid: one per stack with a row per layer and a column per module, and one per
    mixture-of-experts module with a column per expert. ``row`` and ``column`` are the
    cell's labels; (``model``, ``section``, ``row``, ``column``) is unique because a
    matrix's identity (stack, layer, module, expert) is. ``value`` is ``metric``:
    ``intruders`` (count among the top ``k`` tuned vectors at ``eps``, Shuttleworth et al.
    2024 Def. 3.1), ``effective_rank`` (Roy & Vetterli 2007) or ``rank90`` (Biderman et
    al. 2024) of the update.
    """
    if metric not in ("intruders", "effective_rank", "rank90"):
        raise ValueError(f"metric must be one of ['effective_rank', 'intruders', 'rank90'], got {metric!r}")
    rows = []
    for index, (label, model) in enumerate(zip(model_labels(models), models, strict=True)):
        method = training_method(model)
        for m in identity_order(model.matrices):
            if metric == "intruders":
                value = float(m.intruder_counts(k, [eps])[0])
            else:
                value = float(getattr(m, metric))
            rows.append({"model_index": index, "model": label, "method": method, **grid_cell(m), "value": value})
    return pd.DataFrame(rows, columns=list(OVERVIEW_COLUMNS))


#: Reasons for tensors a plan leaves out, when the plan lists no ``skipped`` of its own.
UNMATCHED_REASON = "present on one side only"
SHAPE_MISMATCH_REASON = "shapes differ"
NON_BLOCK_REASON = "adapted outside the blocks"
IGNORED_ADAPTER_REASON = "adapter tensor not understood"


def plan_skipped(plan) -> list[dict]:
    """Every tensor a comparison plan will not analyse, as ``{"name", "reason"}`` dicts.

    A plan (or result) that carries its own ``skipped`` list (``ModelResult.skipped``)
    is taken as it is; otherwise the list is gathered from what the plan says it leaves
    out: ``unmatched`` names, ``shape_mismatches``, and the adapter's non-block and
    ignored tensors in its ``summary``.
    """
    own = getattr(plan, "skipped", None)
    if own:
        return [{"name": str(s["name"]), "reason": str(s["reason"])} for s in own]
    summary = getattr(plan, "summary", {}) or {}
    found = [{"name": n, "reason": UNMATCHED_REASON} for n in getattr(plan, "unmatched", [])]
    found += [
        {"name": m["name"] if isinstance(m, dict) else m.name, "reason": SHAPE_MISMATCH_REASON}
        for m in getattr(plan, "shape_mismatches", [])
    ]
    found += [{"name": n, "reason": NON_BLOCK_REASON} for n in summary.get("non_block_adapted", [])]
    found += [{"name": n, "reason": IGNORED_ADAPTER_REASON} for n in summary.get("ignored_adapter_tensors", [])]
    return found


def skipped_table(skipped: Iterable[dict], examples: int = 3) -> pd.DataFrame:
    """Skipped tensors counted by reason (most first), with a few example names each."""
    by_reason: dict[str, list[str]] = {}
    for entry in skipped:
        by_reason.setdefault(str(entry["reason"]), []).append(str(entry["name"]))
    rows = [
        {"reason": reason, "tensors": len(names), "examples": ", ".join(names[:examples])}
        for reason, names in sorted(by_reason.items(), key=lambda item: (-len(item[1]), item[0]))
    ]
    return pd.DataFrame(rows, columns=["reason", "tensors", "examples"])


# -- checkpoint series (analysis.specs.series) ------------------------------------------------------
#: How the series trends are grouped: one line for the whole model, per layer, per module kind
#: or per matrix.
SERIES_GROUPINGS: tuple[str, ...] = ("model", "layer", "module", "matrix")
SERIES_METRICS: dict[str, str] = {
    "intruders": "Intruder dimensions",
    "effective_rank": "Effective rank of ΔW",
    "rank90": "rank90 of ΔW",
    "delta_fro": "Frobenius norm ‖ΔW‖",
}


def by_step(models: Sequence[ModelResult]) -> list[ModelResult]:
    """The checkpoints of a series in step order (a model without a step goes last)."""
    return sorted(models, key=lambda m: (m.step is None, m.step or 0))


def _series_group(matrix: MatrixResult, by: str) -> str:
    if by == "model":
        return "whole model"
    if by == "layer":
        stack = f"{matrix.stack} " if matrix.stack else ""
        return f"{stack}L{layer_label(matrix.layer)}"
    if by == "module":  # an encoder's and a decoder's query are two lines, as in breakdown_table
        return f"{matrix.stack} {matrix.module}" if matrix.stack else matrix.module
    if by == "matrix":
        return matrix.short_label
    raise ValueError(f"unknown grouping {by!r}; one of {SERIES_GROUPINGS}")


def series_table(models: Sequence[ModelResult], k: int, eps: float, by: str = "model") -> pd.DataFrame:
    """Metrics of each checkpoint of a series against its step, grouped ``by`` one of
    :data:`SERIES_GROUPINGS`: the whole model; a layer or a module kind of one stack
    (``encoder L0``, ``decoder query``: stacks never share a group), with every expert of the
    layer or module in it; or one matrix (its short label, so each expert its own line).

    Per group and step: ``intruders`` is the sum of intruder counts among the top ``k``
    at ``eps`` (Shuttleworth et al. 2024, Def. 3.1; the per-model total of DESIGN.md);
    ``effective_rank`` and ``rank90`` the mean over the group's matrices (Roy & Vetterli
    2007; Biderman et al. 2024); ``delta_fro`` the Frobenius norm of the group's updates
    taken together, ``sqrt(sum ||dW||_F^2)``.
    """
    rows = []
    for model in by_step(models):
        groups: dict[str, list[MatrixResult]] = {}
        for m in model.matrices:
            groups.setdefault(_series_group(m, by), []).append(m)
        for group, matrices in groups.items():
            rows.append(
                {
                    "step": model.step,
                    "checkpoint": model.label,
                    "group": group,
                    "matrices": len(matrices),
                    "intruders": sum(m.intruder_counts(k, [eps])[0] for m in matrices),
                    "effective_rank": float(np.mean([m.effective_rank for m in matrices])),
                    "rank90": float(np.mean([m.rank90 for m in matrices])),
                    "delta_fro": float(np.sqrt(sum(float(m.delta_fro) ** 2 for m in matrices))),
                }
            )
    columns = ["step", "checkpoint", "group", "matrices", "intruders", "effective_rank", "rank90", "delta_fro"]
    return pd.DataFrame(rows, columns=columns)


#: Columns of :func:`series_grid_table` (and its CSV), before the metric's own.
SERIES_GRID_COLUMNS: tuple[str, ...] = ("step", "section", "row", "column", "matrix", "name", *IDENTITY_COLUMNS)


def series_grid_table(models: Sequence[ModelResult], metric: str, k: int, eps: float) -> pd.DataFrame:
    """One row per checkpoint and matrix, placed in its grid cell as the overview places it
    (:func:`overview_table`): ``section`` names the grid (one layer x module grid per stack,
    one layer x expert grid per mixture-of-experts module), ``row`` and ``column`` the cell,
    so (``step``, ``section``, ``row``, ``column``) is unique. ``matrix`` is the
    :func:`matrix_key`; the last column is ``metric`` (one of :data:`SERIES_METRICS`)."""
    if metric not in SERIES_METRICS:
        raise ValueError(f"unknown metric {metric!r}; one of {list(SERIES_METRICS)}")
    rows = []
    for model in by_step(models):
        for m in identity_order(model.matrices):
            value = m.intruder_counts(k, [eps])[0] if metric == "intruders" else float(getattr(m, metric))
            rows.append({"step": model.step, **grid_cell(m), metric: value})
    return pd.DataFrame(rows, columns=[*SERIES_GRID_COLUMNS, metric])


def series_similarity_table(models: Sequence[ModelResult], matrix: str, k: int, eps: float) -> pd.DataFrame:
    """Each checkpoint's top ``k`` tuned vectors of one matrix (its :func:`matrix_key`): best
    match with the base and whether it is an intruder at ``eps`` (:func:`intruder_table` per
    step)."""
    frames = [
        intruder_table(m, k, eps).assign(step=model.step)
        for model in by_step(models)
        for m in model.matrices
        if matrix_key(m) == matrix
    ]
    if not frames:
        return pd.DataFrame(columns=["step"])
    table = pd.concat(frames, ignore_index=True)
    return table[["step", *[c for c in table.columns if c != "step"]]]


def subspace_default_pair(models: Sequence[ModelResult]) -> tuple[int, int] | None:
    """Indices of the two fine-tunes subspace similarity opens on, or ``None`` (fewer than two).

    As in Hu et al. 2021 (sec. 7.1, ``A_{r=8}`` against ``A_{r=64}``): two LoRA
    adapters of different rank, the two highest ranks when there are more; else two
    LoRA fine-tunes; else the first two fine-tunes.
    """
    if len(models) < 2:
        return None
    ranked: dict[int, int] = {}
    for index, model in enumerate(models):
        rank = adapter_rank(model)
        if rank is not None:
            ranked.setdefault(rank, index)
    if len(ranked) >= 2:
        high, second = sorted(ranked, reverse=True)[:2]
        return ranked[second], ranked[high]
    lora = [i for i, m in enumerate(models) if is_lora(m)]
    if len(lora) >= 2:
        return lora[0], lora[1]
    return 0, 1

"""Tidy tables of comparison results.

The numbers behind every chart, and how fine-tunes and matrices are named and ordered
in them.

Each dashboard chart is drawn from a table: the per-fine-tune and per-matrix tables here
(drawn by :mod:`charts.overview` and :mod:`charts.comparison`), a single matrix's in
:mod:`charts.matrix_tables`, the overview grid's in :mod:`charts.overview_tables` and a
checkpoint series' in :mod:`charts.series_tables`. The same table is what its "Download
CSV" button writes, so a downloaded file always holds exactly the numbers on screen. Pure
functions: results in, :class:`pandas.DataFrame` out; nothing here loads weights or
imports Streamlit.

The metrics themselves live in :mod:`analysis.metrics` and :class:`MatrixResult`
(intruder counts, Shuttleworth et al. 2024 Def. 3.1; effective rank, Roy & Vetterli
2007; rank90, Biderman et al. 2024; subspace similarity and amplification factor, Hu et
al. 2021 sec. 7); the functions here only gather them.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from pathlib import PurePath

import numpy as np
import pandas as pd

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
    """Distinct module kinds in block order (:data:`MODULE_ORDER`), unknown ones last.

    Parameters
    ----------
    modules : iterable of str
        Module kinds, repeats allowed.

    Returns
    -------
    list of str
        Each kind once, in block order.
    """
    known = {m: i for i, m in enumerate(MODULE_ORDER)}
    return sorted(set(modules), key=lambda m: (known.get(m, len(known)), m))


def layer_label(layer: int | None) -> str:
    """How a layer is named on an axis: its block index, or ``other`` outside blocks.

    Parameters
    ----------
    layer : int or None
        The block index (``None`` outside the blocks).

    Returns
    -------
    str
    """
    return "other" if layer is None else str(layer)


def matrix_title(matrix: MatrixResult) -> str:
    """A matrix in a chart title: its tensor name, and the expert for an expert slice.

    Parameters
    ----------
    matrix : MatrixResult
        One analysed matrix.

    Returns
    -------
    str
    """
    return matrix.name if matrix.expert is None else f"{matrix.name} · expert {matrix.expert}"


def identity_order(matrices: Iterable[MatrixResult]) -> list[MatrixResult]:
    """Matrices by stack (as first met), layer, module (:data:`MODULE_ORDER`), expert.

    Parameters
    ----------
    matrices : iterable of MatrixResult
        The matrices to order.

    Returns
    -------
    list of MatrixResult
    """
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
    """A picker's words for a matrix.

    ``layer 3 · value``, ``decoder · layer 1 · cross_attn_out``, ``layer 0 · down · expert 5``.

    Parameters
    ----------
    matrix : MatrixResult
        One analysed matrix.

    Returns
    -------
    str
    """
    parts = [matrix.stack] if matrix.stack else []
    parts += [f"layer {layer_label(matrix.layer)}", matrix.module]
    if matrix.expert is not None:
        parts.append(f"expert {matrix.expert}")
    return " · ".join(parts)


def model_labels(models: Sequence[ModelResult]) -> list[str]:
    """One distinct display label per fine-tune.

    Two fine-tunes with the same label (two runs' ``full`` folders) are told apart by the
    folder above their own (``full (run-a)``, ``full (run-b)``) where their names are paths
    that differ there, else by a number.

    Parameters
    ----------
    models : sequence of ModelResult
        The fine-tunes, in the order they are drawn.

    Returns
    -------
    list of str
        One label per fine-tune, in the same order.
    """
    labels: list[str] = []
    for model in models:
        label = model.label
        twins = [m for m in models if m.label == label]
        if len(twins) > 1:
            parents = [_parent(m.source) for m in twins]
            if all(parents) and len(set(parents)) == len(parents):
                label = f"{label} ({_parent(model.source)})"
        n = 2
        while label in labels:
            label = f"{model.label} ({n})"
            n += 1
        labels.append(label)
    return labels


def _parent(source: str) -> str:
    """The name of the folder above a path's last one (``""`` for a hub id or a prefixed spec)."""
    text = str(source).rstrip("/")
    if ":" in text.split("/", 1)[0] or not text.startswith(("/", ".", "~")):
        return ""
    return PurePath(text).parent.name


def adapter_rank(model: ModelResult) -> int | None:
    """The LoRA rank of a fine-tune, if it is known to be LoRA (else ``None``).

    From the adapter config for PEFT adapters, from the per-matrix ranks otherwise
    (largest wins when ``rank_pattern`` varies it), or from ``summary["lora_rank"]``
    for merged LoRA checkpoints whose origin the caller knows (the offline demo).

    Parameters
    ----------
    model : ModelResult
        One fine-tune.

    Returns
    -------
    int or None
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
    """Whether the fine-tune is a LoRA (adapter, or a merged LoRA known to be one).

    Parameters
    ----------
    model : ModelResult
        One fine-tune.

    Returns
    -------
    bool
    """
    return model.kind == "adapter" or adapter_rank(model) is not None


def training_method(model: ModelResult) -> str:
    """Short words for how the fine-tune was trained, e.g. ``LoRA r=8`` or ``full FT``.

    Parameters
    ----------
    model : ModelResult
        One fine-tune.

    Returns
    -------
    str
    """
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
    """Whether a fine-tune's ``label`` already says its :func:`training_method`.

    As the demo's "LoRA r=8", "Full fine-tuning" do; views print the method only where it
    adds something.

    Parameters
    ----------
    label : str
        The fine-tune's display label.
    method : str
        Its :func:`training_method`.

    Returns
    -------
    bool
    """
    label, method = label.lower(), method.lower()
    return method in label or (method == "full ft" and ("full" in label and ("ft" in label or "fine-tun" in label)))


#: The columns that say where a matrix lives, in every per-matrix table (and its CSV).
IDENTITY_COLUMNS: tuple[str, ...] = ("stack", "layer", "module", "expert", "label")


def matrix_table(models: Sequence[ModelResult], k: int | None = None, eps: float | None = None) -> pd.DataFrame:
    """One row per fine-tune and matrix: every scalar metric, and intruders at (k, eps).

    The ``intruders`` column is left empty when ``k`` or ``eps`` is not given.

    Parameters
    ----------
    models : sequence of ModelResult
        The fine-tunes, in the order they are drawn.
    k : int or None
        How many top tuned singular vectors are searched for intruders.
    eps : float or None
        The threshold on the best match.

    Returns
    -------
    pandas.DataFrame
        Columns ``model``, ``method``, ``matrix``, :data:`IDENTITY_COLUMNS`, ``shape``, the metrics,
        and how the base's and the fine-tune's matrix are stored (``storage``, ``tuned_storage``:
        ``bf16``, ``fp8 e4m3, 128x128 blocks``, ``nf4``...; empty for an adapter's tuned side).
    """
    rows = []
    for label, model in zip(model_labels(models), models, strict=True):
        method = training_method(model)
        for m in model.matrices:
            rows.append(
                {
                    "model": label,
                    "method": method,
                    "matrix": m.key,
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
                    "storage": m.id.storage,
                    "tuned_storage": m.id.tuned_storage,
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
        "storage",
        "tuned_storage",
    ]
    return pd.DataFrame(rows, columns=columns)


def totals_table(models: Sequence[ModelResult], k: int, eps: float) -> pd.DataFrame:
    """Per-model totals (docs/metrics.md: sums over the analysed matrices) at (k, eps).

    Parameters
    ----------
    models : sequence of ModelResult
        The fine-tunes, in the order they are drawn.
    k : int
        How many top tuned singular vectors are searched for intruders.
    eps : float
        The threshold on the best match below which a tuned vector is an intruder.

    Returns
    -------
    pandas.DataFrame
        One row per fine-tune.
    """
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

    ``matrices`` restricts the sum to those matrices (:attr:`~analysis.identity.MatrixId.key`; ``None``: all analysed).

    Parameters
    ----------
    models : sequence of ModelResult
        The fine-tunes, in the order they are drawn.
    k : int
        How many top tuned singular vectors are searched for intruders.
    epsilons : sequence of float
        The thresholds to count at.
    matrices : collection of str or None
        Matrix keys (:attr:`~analysis.identity.MatrixId.key`) to keep; ``None`` keeps every analysed matrix.

    Returns
    -------
    pandas.DataFrame
        Columns ``model``, ``method``, ``epsilon``, ``intruders``, ``matrices``.
    """
    rows = []
    for label, model in zip(model_labels(models), models, strict=True):
        chosen = [m for m in model.matrices if matrices is None or m.key in matrices]
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

    Parameters
    ----------
    models : sequence of ModelResult
        The fine-tunes, in the order they are drawn.
    k : int
        How many top tuned singular vectors are searched for intruders.
    eps : float
        The threshold on the best match below which a tuned vector is an intruder.
    by : str
        ``"layer"`` or ``"module"``.
    matrices : collection of str or None
        Matrix keys (:attr:`~analysis.identity.MatrixId.key`) to keep; ``None`` keeps every analysed matrix.

    Returns
    -------
    pandas.DataFrame
        Columns ``model``, ``by`` and ``intruders``.
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


def amplification_table(models: Sequence[ModelResult], matrices: Collection[str] | None = None) -> pd.DataFrame:
    """Amplification factor of each update (Hu et al. 2021, sec. 7.3), with its rank.

    ``||dW||_F / ||U^T W_base V||_F`` with ``U``, ``V`` the top-``r`` singular vectors
    of ``dW`` (``r`` = ``amplification_rank``); ``None`` (undefined) for a zero update.

    Parameters
    ----------
    models : sequence of ModelResult
        The fine-tunes, in the order they are drawn.
    matrices : collection of str or None
        Matrix keys (:attr:`~analysis.identity.MatrixId.key`) to keep; ``None`` keeps every analysed matrix.

    Returns
    -------
    pandas.DataFrame
        One row per fine-tune and matrix: identity, ``r``, ``delta_fro`` and ``amplification_factor``.
    """
    rows = []
    for label, model in zip(model_labels(models), models, strict=True):
        for m in model.matrices:
            if matrices is not None and m.key not in matrices:
                continue
            rows.append(
                {
                    "model": label,
                    "method": training_method(model),
                    "matrix": m.key,
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


#: Reasons for tensors a plan leaves out, when the plan lists no ``skipped`` of its own.
UNMATCHED_REASON = "present on one side only"
SHAPE_MISMATCH_REASON = "shapes differ"
NON_BLOCK_REASON = "adapted outside the blocks"
IGNORED_ADAPTER_REASON = "adapter tensor not understood"


def storage_summary(summary: dict) -> str | None:
    """How the analysed matrices are stored, from a plan summary's ``storage`` counts.

    ``"base fp8 e4m3, 128x128 blocks (120), bf16 (2); fine-tune bf16 (122)"``; ``None`` when
    the summary has no counts.
    """
    storage = summary.get("storage") or {}
    parts = []
    for side, name in (("base", "base"), ("tuned", "fine-tune")):
        counts = storage.get(side) or {}
        if counts:
            listed = ", ".join(f"{label} ({n})" for label, n in sorted(counts.items(), key=lambda c: (-c[1], c[0])))
            parts.append(f"{name} {listed}")
    return "; ".join(parts) or None


def plan_skipped(plan) -> list[dict]:
    """Every tensor a comparison plan will not analyse, as ``{"name", "reason"}`` dicts.

    A plan (or result) that carries its own ``skipped`` list (``ModelResult.skipped``)
    is taken as it is; otherwise the list is gathered from what the plan says it leaves
    out: ``unmatched`` names, ``shape_mismatches``, and the adapter's non-block and
    ignored tensors in its ``summary``.

    Parameters
    ----------
    plan : object
        A comparison plan or a :class:`ModelResult`.

    Returns
    -------
    list of dict
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
    """Skipped tensors counted by reason (most first), with a few example names each.

    Parameters
    ----------
    skipped : iterable of dict
        ``{"name", "reason"}`` entries (:func:`plan_skipped`).
    examples : int
        How many names to show per reason.

    Returns
    -------
    pandas.DataFrame
        Columns ``reason``, ``tensors``, ``examples``.
    """
    by_reason: dict[str, list[str]] = {}
    for entry in skipped:
        by_reason.setdefault(str(entry["reason"]), []).append(str(entry["name"]))
    rows = [
        {"reason": reason, "tensors": len(names), "examples": ", ".join(names[:examples])}
        for reason, names in sorted(by_reason.items(), key=lambda item: (-len(item[1]), item[0]))
    ]
    return pd.DataFrame(rows, columns=["reason", "tensors", "examples"])

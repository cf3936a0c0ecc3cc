"""Table columns in words, as the dashboard shows them.

Every table of :mod:`charts.tables`, :mod:`charts.matrix_tables`, :mod:`charts.overview_tables`,
:mod:`charts.series_tables` and :mod:`charts.mitigation` names its columns briefly
(``mean_effective_rank``): those names are the CSV download's format and stay. On screen a
column is called by its words here, with the unit where there is one, and its help.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Measure:
    """How one measure is shown wherever a user sees it: its unit, scale and digits.

    The engine and the downloads (JSON, CSV) keep the measure as computed (a share as a
    fraction 0-1); grids, lines, hovers and tables on screen show ``scale`` times it, in
    ``unit``, so one measure reads in one unit everywhere (update sparsity in %, as Zhu et
    al. 2025 Table 1 gives it and the RL vs SFT page's table has it).

    Attributes
    ----------
    words : str
        Short name: a colour bar's or a small panel's title (with :meth:`title`'s unit).
    unit : str
        Written after each value (``%``, ``°``); empty for a count or a ratio.
    scale : float
        Shown value = stored value x ``scale`` (100 for a share shown in %).
    digits : str
        Format of a shown value in a hover and a table: fixed decimals (``.2f``), or for a
        measure that spans decades, scientific (``.2e``). These two read alike in a Python
        format spec, Plotly's d3-format and a Streamlit column's printf format; a ``g``
        format drops trailing zeros in the browser (0.5 beside 0.4873 in one column), so no
        measure has one (:func:`table_format`).
    kind : str
        What a value without a unit is (``count``, ``share, 0-1``), for the title.
    """

    words: str
    unit: str = ""
    scale: float = 1.0
    digits: str = ".4f"
    kind: str = ""

    def title(self, kind: bool = True) -> str:
        """The measure and its unit, as a colour bar or an axis is titled: ``Sparsity, Zhu Eq. 1 (%)``.

        ``kind``: also what a value without a unit is (``Mask overlap (share, 0–1)``); a small
        panel's title leaves it out.
        """
        unit = self.unit or (self.kind if kind else "")
        return f"{self.words} ({unit})" if unit else self.words

    @property
    def suffix(self) -> str:
        """What follows a shown value: `` %`` (spaced), ``°`` (not), nothing for a count or a ratio."""
        return f" {self.unit}" if self.unit == "%" else self.unit

    def shown(self, value: float) -> float:
        """``value`` (as stored) in the unit it is shown in."""
        return value * self.scale

    def text(self, value: float) -> str:
        """``value`` (as stored) written as a hover writes it, with its unit: ``20.31 %``, ``0.21°``."""
        if value is None or not math.isfinite(value):
            return "–"
        return f"{self.shown(value):{self.digits}}{self.suffix}"


#: Every measure a grid, a line or a table shows, by its column name, in the one unit it is
#: shown in (:class:`Measure`), with the digits every table and hover gives it. The
#: RL-versus-SFT measures' rules: docs/metrics.md.
MEASURES: dict[str, Measure] = {
    "intruders": Measure("Intruder dimensions", digits=".0f", kind="count"),
    "effective_rank": Measure("Effective rank of ΔW", digits=".1f"),
    "rank90": Measure("rank90 of ΔW", digits=".1f"),
    "stable_rank": Measure("Stable rank of ΔW", digits=".2f"),
    "delta_fro": Measure("‖ΔW‖_F", digits=".4f"),
    "amplification_factor": Measure("Amplification", digits=".4f", kind="ratio"),
    "update_sparsity": Measure("Sparsity, Zhu Eq. 1", unit="%", scale=100.0, digits=".2f"),
    "update_sparsity_absolute": Measure("Sparsity, |ΔW| ≤ atol", unit="%", scale=100.0, digits=".2f"),
    "principal_angle_max": Measure("Largest angle", unit="°", digits=".3f"),
    "spectral_shift": Measure("Spectral shift", digits=".2e", kind="ratio"),
    "mask_overlap": Measure("Mask overlap", digits=".3f", kind="share, 0–1"),
    "update_rank_fraction": Measure("Rank of ΔW / min(m,n)", digits=".4f"),
    "intruder_energy_share": Measure("Intruder energy share", digits=".3f", kind="share, 0–1"),
    # Measures only tables show (their columns: COLUMN_MEASURES).
    "singular_value": Measure("Singular value σ"),
    "cosine": Measure("|cos|", digits=".4f", kind="0–1"),
    "phi": Measure("φ", digits=".3f", kind="0–1"),
    "principal_angle": Measure("Principal angle", unit="°", digits=".3f"),
    "epsilon": Measure("ε", digits=".2f"),
    "lambda": Measure("λ", digits=".2f"),
    "loss": Measure("Held-out loss", digits=".4f"),
    "task": Measure("Task score", digits=".3f"),
    "percent": Measure("Change", unit="%", digits=".2f"),
}

#: Table columns that hold a measure of :data:`MEASURES` under another name, already in the
#: unit it is shown in (a sparsity in %, an angle in degrees): they take its digits, not its
#: scale. (A column named as the measure itself holds it as computed, a share 0-1, and is
#: scaled on screen.) The Mitigate page's columns are named in words (their CSV's format).
COLUMN_MEASURES: dict[str, str] = {
    "mean_effective_rank": "effective_rank",
    "mean_rank90": "rank90",
    "sparsity_pct": "update_sparsity",
    "sparsity_abs_pct": "update_sparsity_absolute",
    "median_spectral_shift": "spectral_shift",
    "max_principal_angle_deg": "principal_angle_max",
    "mean_mask_overlap": "mask_overlap",
    "mask_alpha": "mask_overlap",
    "median_update_rank_fraction": "update_rank_fraction",
    "singular_value": "singular_value",
    "base": "singular_value",
    "tuned": "singular_value",
    "update": "singular_value",
    "best_match_score": "cosine",
    "median": "cosine",
    "p5": "cosine",
    "p95": "cosine",
    "left_deg": "principal_angle",
    "right_deg": "principal_angle",
    "epsilon": "epsilon",
    "eps": "epsilon",
    "lambda": "lambda",
    "held-out loss": "loss",
    "task": "task",
    "‖ΔW‖ before": "delta_fro",
    "‖ΔW‖ after": "delta_fro",
    "‖ΔW‖ change %": "percent",
    "re-factorisation error %": "percent",
}

#: Columns numbered by a rank (``base_1 … base_n`` of a similarity matrix, ``j_1 … j_n`` of
#: φ), by the prefix of their name.
PREFIX_MEASURES: dict[str, str] = {"base_": "cosine", "j_": "phi"}


def column_measure(column: object) -> Measure | None:
    """The measure a table's ``column`` holds, or ``None`` for a column that is no measure (a name, a count).

    By its name: :data:`MEASURES`, :data:`COLUMN_MEASURES`, :data:`PREFIX_MEASURES`.
    """
    name = str(column)
    key = name if name in MEASURES else COLUMN_MEASURES.get(name)
    if key is None:
        key = next((m for prefix, m in PREFIX_MEASURES.items() if name.startswith(prefix)), None)
    return MEASURES.get(key) if key is not None else None


def table_format(column: object) -> str | None:
    """The printf format (a Streamlit ``NumberColumn``'s) of a table column of float numbers.

    Its measure's digits (``%.4f``), the same for every row and every page; ``None`` for a
    column that is no measure.
    """
    measure = column_measure(column)
    return None if measure is None else f"%{measure.digits}"


#: What a table's column is called on screen, and its help: words, with the unit where there
#: is one. The CSV keeps the short names (they are the download's stable format).
COLUMN_WORDS: dict[str, tuple[str, str]] = {
    "method": ("trained as", "How the fine-tune was trained, where its name does not say it."),
    "matrix": ("matrix", "The tensor's name (and #expert for one expert of a fused tensor)."),
    "label": ("short name", ""),
    "shape": ("shape (out × in)", "Rows × columns of the weight matrix."),
    "matrices": ("matrices", "How many weight matrices were analysed."),
    "intruders": (
        "intruder dimensions",
        "Top-k tuned singular vectors whose best |cos| with every base one is below ε.",
    ),
    "effective_rank": (
        "effective rank of ΔW",
        "exp of the entropy of ΔW's normalised singular values (Roy & Vetterli).",
    ),
    "rank90": ("rank90 of ΔW", "Fewest singular directions holding 90 % of ‖ΔW‖²_F (Biderman et al. 2024)."),
    "stable_rank": ("stable rank of ΔW", "‖ΔW‖²_F / σ₁², a smooth count of the directions ΔW uses."),
    "delta_fro": ("‖ΔW‖_F", "Frobenius norm of the update W_tuned − W_base."),
    "amplification_factor": ("amplification (×)", "‖ΔW‖_F / ‖Uᵀ W_base V‖_F (Hu et al. 2021, sec. 7.3)."),
    "adapter_rank": ("LoRA rank r", "The adapter's rank for this matrix."),
    "mean_effective_rank": ("mean effective rank of ΔW", "Mean over the analysed matrices."),
    "mean_rank90": ("mean rank90 of ΔW", "Mean over the analysed matrices."),
    "epsilon": ("ε", "Threshold on the best |cos| below which a tuned vector is an intruder."),
    "r": ("rank r used", "Top-r singular vectors of ΔW: the LoRA rank, or rank90 for a full fine-tune."),
    "tuned_rank": ("tuned vector (rank)", "Position of the tuned singular vector, 1 = largest singular value."),
    "singular_value": ("singular value σ", ""),
    "best_match_score": ("best |cos| with the base", "Largest |cosine| with any base singular vector."),
    "best_match_base_rank": ("best base match (rank)", "Which base singular vector it matches best, 1 = largest."),
    "intruder": ("intruder?", "Best |cos| below ε."),
    "base": ("σ of W_base", ""),
    "tuned": ("σ of W_tuned", ""),
    "update": ("σ of ΔW", ""),
    "step": ("training step", ""),
    "checkpoint": ("checkpoint", ""),
    "group": ("group", ""),
    "lambda": ("λ", "Scale of the intruder components (1 keeps them, 0 removes them)."),
    "task": ("task score", "The fine-tune's own metric (the demo: MRR on its held-out retrieval split)."),
    "scaled": ("intruders scaled", ""),
    "mitigated": ("changed", "Whether the mitigation changed this matrix."),
    "reason": ("reason", ""),
    "tensors": ("tensors", ""),
    "examples": ("for example", ""),
    "storage": (
        "base stored as",
        "How the base checkpoint stores this matrix (dequantised to float32 before analysis).",
    ),
    "tuned_storage": (
        "fine-tune stored as",
        "How the fine-tune stores this matrix (dequantised to float32 before analysis).",
    ),
    # The RL-versus-SFT measures (charts.rl_tables; definitions in docs/metrics.md).
    "fine_tune": ("fine-tune", ""),
    "sparsity_pct": ("update sparsity (%)", "Share of parameters left unchanged, Zhu et al. 2025 Eq. 1 (η = 1e-3)."),
    "sparsity_abs_pct": ("update sparsity, |ΔW| ≤ atol (%)", "Mukherjee et al. 2025: |ΔW| ≤ 1e-5, computed in bf16."),
    "counts": ("parameters counted", "Which parameters the sparsity counts."),
    "median_spectral_shift": ("median spectral shift", "‖s(W₁) − s(W₀)‖₂ / ‖s(W₀)‖₂, median over matrices."),
    "max_principal_angle_deg": ("largest principal angle (°)", "Between the top-k singular subspaces of W₀ and W₁."),
    "mean_mask_overlap": ("principal-mask overlap", "Share of changed entries inside the top-α principal mask of W₀."),
    "mask_alpha": ("α (chance overlap)", "Fraction of entries in the principal mask: the overlap by chance."),
    "median_update_rank_fraction": ("numerical rank of ΔW / min(m, n)", "Median over matrices."),
    "intruder_energy_share": ("intruder energy share", "Share of the top-k Σσ² of W₁ on intruder directions."),
    # The same measures of a group of matrices (charts.rl_tables.group_value): the Series page's trends.
    # A sparsity is shown in % (MEASURES); the CSV keeps the share, 0-1, as the engine computes it.
    "update_sparsity": (
        "update sparsity, Zhu Eq. 1 (%)",
        "Share of the entries left unchanged, |w₁ − w₀| ≤ η·max(|w₀|, |w₁|), η = 1e-3; the group's matrices "
        "taken together. In % here; the CSV holds the share, 0-1.",
    ),
    "update_sparsity_absolute": (
        "update sparsity, |ΔW| ≤ atol in bf16 (%)",
        "Share of the entries with |ΔW| ≤ 1e-5 in bf16 (Mukherjee et al. 2025); the group's matrices together. "
        "In % here; the CSV holds the share, 0-1.",
    ),
    "principal_angle_max": (
        "largest principal angle (°)",
        "Largest angle between the top-k singular subspaces of W₀ and W₁, over the group's matrices.",
    ),
    "spectral_shift": ("mean spectral shift ‖Δs‖/‖s₀‖", "‖s(W₁) − s(W₀)‖₂ / ‖s(W₀)‖₂, mean over the group's matrices."),
    "mask_overlap": (
        "principal-mask overlap",
        "Share (0-1) of the changed entries inside the top-α principal mask of W₀; the group's matrices together.",
    ),
    "update_rank_fraction": (
        "mean numerical rank of ΔW / min(m, n)",
        "torch.linalg.matrix_rank of ΔW over min(m, n), mean over the group's matrices.",
    ),
    "i": ("i", "Principal angle index, ascending."),
    "left_deg": ("angle, left subspaces (°)", ""),
    "right_deg": ("angle, right subspaces (°)", ""),
    "rows": ("rows", ""),
    "base_vectors": ("base singular vectors", ""),
    "median": ("median", ""),
    "p5": ("5th percentile", ""),
    "p95": ("95th percentile", ""),
}

#: A table whose rows are groups of matrices (a series' trends: the whole model, a layer, a
#: module kind) aggregates the per-matrix measures: these words replace :data:`COLUMN_WORDS`'
#: there, saying how (a sum, a mean, the matrices taken together).
GROUP_COLUMN_WORDS: dict[str, tuple[str, str]] = {
    "matrices": ("matrices", "How many weight matrices the group holds."),
    "intruders": (
        "intruder dimensions (sum)",
        "Top-k tuned singular vectors whose best |cos| with every base one is below ε, summed over the group's "
        "matrices.",
    ),
    "effective_rank": (
        "mean effective rank of ΔW",
        "exp of the entropy of ΔW's normalised singular values (Roy & Vetterli), mean over the group's matrices.",
    ),
    "rank90": (
        "mean rank90 of ΔW",
        "Fewest singular directions holding 90 % of ‖ΔW‖²_F (Biderman et al. 2024), mean over the group's matrices.",
    ),
    "delta_fro": (
        "‖ΔW‖_F of the group",
        "Frobenius norm of the group's updates taken together, √(Σ ‖ΔW‖²_F) over its matrices.",
    ),
    "intruder_energy_share": (
        "intruder energy share",
        "Share (0-1) of the top-k Σσ² of W₁ on intruder directions; the group's matrices taken together.",
    ),
}

"""Whole-model update sparsity: every parameter, 1-D ones included (issue 23).

Both papers report a model's sparsity over all of its parameters (Zhu et al. Table 1,
Mukherjee et al. Table 1). The per-matrix counts come with each analysed matrix
(:mod:`analysis.update_measures`); this adds every other tensor of the base that the
fine-tune holds under the same name with the same shape (norms, biases, embeddings,
heads), compared elementwise here, and says exactly what it counted. Tensors on one side
only, or of another shape, cannot be compared and are named as left out.

Only for full fine-tunes: an adapter's model is the base plus the adapter's modules, so
its tensors outside them are unchanged by construction (and PEFT's ``modules_to_save``
would need the adapter's own copies), which this does not claim to know.
"""

from __future__ import annotations

import torch

from analysis import measures
from analysis.pairing import match_names
from analysis.plan import ComparisonPlan
from analysis.results import ModelResult
from analysis.sources import WeightSource
from analysis.update_measures import measures_key


def whole_model_sparsity(
    base: WeightSource,
    tuned: WeightSource,
    model: ModelResult,
    eta: float,
    atol: float,
    cache=None,
    *,
    cached_only: bool = False,
) -> dict | None:
    """The sparsity of every comparable parameter of a full fine-tune, and what was counted.

    ``model``'s matrices (with their measures) supply the analysed weights' counts; every
    base tensor in ``model.skipped`` that ``tuned`` holds with the same shape is compared
    here by both rules. With a ``cache`` (:class:`~analysis.cache.SpectrumCache`) their counts
    are one ``measures`` entry keyed by the content of every tensor that decides them (the
    base's skipped tensors and all of the fine-tune's, names and digests, from the
    fingerprint index), so a run whose counts are cached reads no weights and pairs no
    names. Returns a JSON-ready dict; with ``cached_only``, ``None`` when the counts are not
    stored (nothing is read or hashed then).
    """
    analysed = [m for m in model.matrices if m.rl is not None]
    skipped = [entry["name"] for entry in model.skipped]
    stored = _other_counts(base, tuned, skipped, eta, atol, cache, cached_only)
    if stored is None:
        return None
    found, others = stored
    left_out = len(skipped) - others
    counted = [(m.rl.counts.total, m.rl.counts.unchanged_relative, m.rl.counts.unchanged_absolute) for m in analysed]
    analysed_parameters = sum(row[0] for row in counted)
    other_parameters = int(found[:, 0].sum())
    total = analysed_parameters + other_parameters
    relative = sum(row[1] for row in counted) + int(found[:, 1].sum())
    absolute = sum(row[2] for row in counted) + int(found[:, 2].sum())
    return {
        "parameters": total,
        "unchanged_relative": relative,
        "unchanged_absolute": absolute,
        "sparsity_relative": measures.update_sparsity(relative, total),
        "sparsity_absolute": measures.update_sparsity(absolute, total),
        "counts": (
            f"every parameter of the base that the fine-tune holds with the same name and shape: "
            f"{len(analysed)} analysed matrices ({analysed_parameters} parameters) and {others} other "
            f"tensors ({other_parameters} parameters: 1-D norms and biases, embeddings, heads); "
            f"{left_out} tensor{'' if left_out == 1 else 's'} left out (on one side only or of another shape)"
        ),
        "other_tensors": others,
        "left_out_tensors": left_out,
    }


def _comparable(base: WeightSource, tuned: WeightSource, skipped: list[str]) -> list[tuple[str, str]]:
    """``(base name, tuned name)`` of each skipped base tensor the fine-tune holds with the same shape."""
    pairs = match_names(base.names(), tuned.names())
    return [
        (name, pairs[name])
        for name in skipped
        if name in pairs and tuple(base.shape(name)) == tuple(tuned.shape(pairs[name]))
    ]


def _other_counts(
    base: WeightSource, tuned: WeightSource, skipped: list[str], eta: float, atol: float, cache, cached_only: bool
) -> tuple[torch.Tensor, int] | None:
    """``(total, unchanged by Eq. 1, unchanged by the absolute rule)`` per comparable tensor pair, and their number.

    With a cache: one ``measures`` entry for them all (:func:`_key`); ``cached_only``: that
    entry or ``None``.
    """

    def compute() -> tuple[torch.Tensor, int]:
        rows = []
        comparable = _comparable(base, tuned, skipped)
        for name, tuned_name in comparable:
            w0, w1 = base.load(name).reshape(1, -1), tuned.load(tuned_name).reshape(1, -1)
            counts = measures.elementwise_counts(w0, w1, None, eta, atol)
            rows.append([counts.total, counts.unchanged_relative, counts.unchanged_absolute])
        return torch.tensor(rows, dtype=torch.int64).reshape(-1, 3), len(comparable)

    if cache is None:
        return None if cached_only else compute()
    key = _key(base, tuned, skipped, f"elementwise,eta={eta!r},atol={atol!r}", cache, cached_only)
    entry = None if key is None else cache.lookup("measures", key)
    if entry is not None:
        return entry[0]["counts"], int(entry[1]["other_tensors"])
    if cached_only:
        return None
    found, others = compute()
    cache.store("measures", key, {"counts": found}, {"other_tensors": others})
    return found, others


def _key(
    base: WeightSource, tuned: WeightSource, skipped: list[str], signature: str, cache, cached_only: bool
) -> str | None:
    """The whole-model ``measures`` entry's key: names and digests of the tensors that decide the counts.

    Those of the base's skipped tensors and of every tensor of the fine-tune (which of them
    pair, with which shapes, follows from those), and the rule. Digests come from the
    fingerprint index, each file looked at once (:meth:`FingerprintIndex.digests`); with
    ``cached_only``, ``None`` when one is not held there (nothing is read).
    """
    sides = []
    for source, names in ((base, skipped), (tuned, sorted(tuned.names()))):
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(str(source.file(name)), []).append(name)
        digests = {}
        for file, group in by_file.items():
            found = cache.fingerprints.digests(file, group, None if cached_only else source.load)
            if None in found:
                return None
            digests.update(zip(group, found, strict=True))
        sides.append(";".join(f"{name}={digests[name]}" for name in names))
    return measures_key("whole-model", "\x1f".join(sides), signature)


def add_whole_model_sparsity(
    model: ModelResult, plan: ComparisonPlan, settings, cache, *, cached_only: bool = False
) -> bool:
    """``model.summary["whole_model_sparsity"]`` (:func:`whole_model_sparsity`) for the full fine-tune ``plan`` planned.

    Uses the models the plan opened (:attr:`~analysis.plan.ComparisonPlan.sources`: headers
    read once; tensors only when their counts are not cached). ``settings`` is the
    comparison's ``AnalysisSettings``; nothing happens when its measures are off or the
    fine-tune is an adapter. ``cached_only``: from the cache alone (nothing read or hashed);
    returns false when the counts are not stored there (true otherwise).
    """
    if not settings.measures or model.kind != "full" or plan.sources is None:
        return True
    base_source, tuned_source = plan.sources
    if not (isinstance(base_source, WeightSource) and isinstance(tuned_source, WeightSource)):
        return True
    whole = whole_model_sparsity(
        base_source, tuned_source, model, settings.sparsity_eta, settings.sparsity_atol, cache, cached_only=cached_only
    )
    if whole is None:
        return False
    model.summary["whole_model_sparsity"] = whole
    if cache is not None and not cached_only:
        cache.fingerprints.flush()
    return True

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

from dataclasses import astuple

import torch

from analysis import measures
from analysis.pairing import match_names
from analysis.results import ModelResult
from analysis.sources import WeightSource
from analysis.update_measures import measures_key


def whole_model_sparsity(
    base: WeightSource, tuned: WeightSource, model: ModelResult, eta: float, atol: float, cache=None
) -> dict:
    """The sparsity of every comparable parameter of a full fine-tune, and what was counted.

    ``model``'s matrices (with their measures) supply the analysed weights' counts; every
    base tensor in ``model.skipped`` that ``tuned`` holds with the same shape is compared
    here by both rules. With a ``cache`` (:class:`~analysis.cache.SpectrumCache`) each such
    tensor pair's counts are a ``measures`` entry keyed by both stored tensors' digests (from
    the fingerprint index: a run whose counts are all cached reads no weights). Returns a
    JSON-ready dict.
    """
    analysed = [m for m in model.matrices if m.rl is not None]
    total = sum(m.rl.counts.total for m in analysed)
    relative = sum(m.rl.counts.unchanged_relative for m in analysed)
    absolute = sum(m.rl.counts.unchanged_absolute for m in analysed)
    skipped = [entry["name"] for entry in model.skipped]
    pairs = match_names(base.names(), tuned.names())
    others = left_out = 0
    other_parameters = 0
    for name in skipped:
        tuned_name = pairs.get(name)
        if tuned_name is None or tuple(base.shape(name)) != tuple(tuned.shape(tuned_name)):
            left_out += 1
            continue
        counts = _tensor_counts(base, name, tuned, tuned_name, eta, atol, cache)
        total += counts.total
        other_parameters += counts.total
        relative += counts.unchanged_relative
        absolute += counts.unchanged_absolute
        others += 1
    return {
        "parameters": total,
        "unchanged_relative": relative,
        "unchanged_absolute": absolute,
        "sparsity_relative": measures.update_sparsity(relative, total),
        "sparsity_absolute": measures.update_sparsity(absolute, total),
        "counts": (
            f"every parameter of the base that the fine-tune holds with the same name and shape: "
            f"{len(analysed)} analysed matrices ({total - other_parameters} parameters) and {others} other "
            f"tensors ({other_parameters} parameters: 1-D norms and biases, embeddings, heads); "
            f"{left_out} tensors left out (on one side only or of another shape)"
        ),
        "other_tensors": others,
        "left_out_tensors": left_out,
    }


def _tensor_counts(
    base: WeightSource, name: str, tuned: WeightSource, tuned_name: str, eta: float, atol: float, cache
) -> measures.ElementCounts:
    """Both unchanged counts of one stored tensor pair, from the cache when it holds them."""

    def compute() -> measures.ElementCounts:
        w0, w1 = base.load(name).reshape(1, -1), tuned.load(tuned_name).reshape(1, -1)
        return measures.elementwise_counts(w0, w1, None, eta, atol)

    if cache is None:
        return compute()
    digests = (
        cache.fingerprints.digest(base.file(name), name, lambda: base.load(name)),
        cache.fingerprints.digest(tuned.file(tuned_name), tuned_name, lambda: tuned.load(tuned_name)),
    )
    key = measures_key(*digests, f"elementwise,eta={eta!r},atol={atol!r}")
    entry = cache.lookup("measures", key)
    if entry is not None:
        return measures.ElementCounts(*(int(x) for x in entry[0]["counts"].tolist()))
    counts = compute()
    cache.store("measures", key, {"counts": torch.tensor(list(astuple(counts)), dtype=torch.int64)})
    return counts

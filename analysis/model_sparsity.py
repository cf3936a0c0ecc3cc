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
from analysis.results import ModelResult
from analysis.sources import WeightSource
from analysis.specs import SpecResolver
from analysis.update_measures import measures_key


def whole_model_sparsity(
    base: WeightSource, tuned: WeightSource, model: ModelResult, eta: float, atol: float, cache=None
) -> dict:
    """The sparsity of every comparable parameter of a full fine-tune, and what was counted.

    ``model``'s matrices (with their measures) supply the analysed weights' counts; every
    base tensor in ``model.skipped`` that ``tuned`` holds with the same shape is compared
    here by both rules. With a ``cache`` (:class:`~analysis.cache.SpectrumCache`) their counts
    are one ``measures`` entry keyed by the stored tensors' digests (from the fingerprint
    index: a run whose counts are cached reads no weights). Returns a JSON-ready dict.
    """
    analysed = [m for m in model.matrices if m.rl is not None]
    total = sum(m.rl.counts.total for m in analysed)
    relative = sum(m.rl.counts.unchanged_relative for m in analysed)
    absolute = sum(m.rl.counts.unchanged_absolute for m in analysed)
    skipped = [entry["name"] for entry in model.skipped]
    pairs = match_names(base.names(), tuned.names())
    comparable = [
        (name, pairs[name])
        for name in skipped
        if name in pairs and tuple(base.shape(name)) == tuple(tuned.shape(pairs[name]))
    ]
    left_out, others = len(skipped) - len(comparable), len(comparable)
    found = _other_counts(base, tuned, comparable, eta, atol, cache)
    other_parameters = int(found[:, 0].sum())
    total += other_parameters
    relative += int(found[:, 1].sum())
    absolute += int(found[:, 2].sum())
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


def _other_counts(
    base: WeightSource, tuned: WeightSource, comparable: list[tuple[str, str]], eta: float, atol: float, cache
) -> torch.Tensor:
    """``(total, unchanged by Eq. 1, unchanged by the absolute rule)`` per tensor pair, one row each.

    With a cache: one ``measures`` entry for them all, keyed by every pair's stored digests
    (from the fingerprint index, so a cached run reads no weights) and the settings.
    """

    def compute() -> torch.Tensor:
        rows = []
        for name, tuned_name in comparable:
            w0, w1 = base.load(name).reshape(1, -1), tuned.load(tuned_name).reshape(1, -1)
            counts = measures.elementwise_counts(w0, w1, None, eta, atol)
            rows.append([counts.total, counts.unchanged_relative, counts.unchanged_absolute])
        return torch.tensor(rows, dtype=torch.int64).reshape(-1, 3)

    if cache is None:
        return compute()
    digests = [
        cache.fingerprints.digest(base.file(name), name, lambda name=name: base.load(name))
        + cache.fingerprints.digest(tuned.file(other), other, lambda other=other: tuned.load(other))
        for name, other in comparable
    ]
    key = measures_key("whole-model", ",".join(digests), f"elementwise,eta={eta!r},atol={atol!r}")
    entry = cache.lookup("measures", key)
    if entry is not None:
        return entry[0]["counts"]
    found = compute()
    cache.store("measures", key, {"counts": found})
    return found


def add_whole_model_sparsity(
    model: ModelResult, base: str, spec: str, settings, allow_local_paths: bool, cache
) -> None:
    """``model.summary["whole_model_sparsity"]`` (:func:`whole_model_sparsity`) for a full fine-tune named ``spec``.

    Opens both models again by name (headers only; tensors only when their counts are not
    cached). ``settings`` is the comparison's ``AnalysisSettings``; nothing happens when
    its measures are off or the fine-tune is an adapter.
    """
    if not settings.measures or model.kind != "full":
        return
    resolver = SpecResolver(allow_local_paths=allow_local_paths)
    base_source, tuned_source = resolver.open(base), resolver.open(spec)
    if isinstance(base_source, WeightSource) and isinstance(tuned_source, WeightSource):
        model.summary["whole_model_sparsity"] = whole_model_sparsity(
            base_source, tuned_source, model, settings.sparsity_eta, settings.sparsity_atol, cache
        )
        if cache is not None:
            cache.fingerprints.flush()

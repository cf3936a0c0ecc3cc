"""Pair the matrices of a base model with those of a fine-tune or adapter.

:func:`plan_comparison` reads only names, shapes and dtypes (file headers); every tensor
is loaded later, one at a time, by the ``load_base``/``load_tuned`` closures of each
:class:`~analysis.plan.MatrixPlan`.

Which matrices (docs/metrics.md "Which matrices", following Shuttleworth et al. 2024): by
default every 2-D floating-point ``*.weight`` inside a numbered transformer block
(``layer.N``/``layers.N``/``h.N``/``blocks.N``/``block.N``), i.e. the attention and MLP
projections, fused or not. Embeddings, LM heads, poolers and classifiers (2-D weights
outside the blocks) are added with ``include_non_block=True``; LayerNorms and biases
(1-D) never are.

Names are matched across layouts and prefixes: the base and the fine-tune may each carry
a leading ``bert.``, ``roberta.``, ``model.``, ``transformer.`` ... (a task head class
adds one, a bare model class has none); PEFT's ``base_model.model.`` is removed by the
adapter reader; kohya module names (``lora_te_model_layers_0_self_attn_q_proj``) are
matched against the base names with ``.`` replaced by ``_``.

Orientation: GPT-2 style ``Conv1D`` weights (stored ``in x out``) are transposed so every
matrix is ``out x in``; embeddings are kept as stored (``vocab x dim``).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial

from analysis.adapters import AdapterModule, LoraAdapter, is_adapter
from analysis.adapters.raw_params import resolve_param_wrapper
from analysis.errors import InputError
from analysis.identity import MatrixId
from analysis.layouts import CONV1D_MODEL_TYPES, ModelLayout, block_index
from analysis.layouts import module_label as module_kind
from analysis.plan import ComparisonPlan, MatrixPlan, ShapeMismatch, StoredDigest, TunedMatrix
from analysis.slots import Slot, catalogue, load_slot, slot_digest, to_base_layout
from analysis.sources import WeightSource

__all__ = ["CONV1D_MODEL_TYPES", "block_index", "match_names", "module_kind", "plan_comparison"]


def _candidate_prefixes(names: Iterable[str]) -> list[str]:
    """Leading name parts (one or two components, no digits) shared by many names."""
    names = list(names)
    counts: Counter[str] = Counter()
    for name in names:
        parts = name.split(".")
        for depth in (1, 2):
            if len(parts) > depth + 1 and not any(p.isdigit() for p in parts[:depth]):
                counts[".".join(parts[:depth]) + "."] += 1
    shared = [prefix for prefix, count in counts.items() if count >= max(1, len(names) // 4)]
    return [""] + sorted(shared, key=len)


def _strip(name: str, prefix: str) -> str:
    return name[len(prefix) :] if prefix and name.startswith(prefix) else name


def match_names(base_names: list[str], tuned_names: list[str]) -> dict[str, str]:
    """Map base tensor names to tuned tensor names that are the same tensor.

    The two sides may carry different leading prefixes (``bert.`` on one side only,
    ``model.`` vs none, ...): the pair of prefixes that matches the most names is used,
    preferring no prefix on a tie. Returns ``{base_name: tuned_name}``.
    """
    tuned_set = set(tuned_names)
    best: dict[str, str] = {b: b for b in base_names if b in tuned_set}
    if len(best) == len(base_names):  # every name found as it is: no prefix can do better
        return best
    for base_prefix in _candidate_prefixes(base_names):
        for tuned_prefix in _candidate_prefixes(tuned_names):
            if not base_prefix and not tuned_prefix:
                continue
            tuned_by_key = {_strip(t, tuned_prefix): t for t in tuned_names}
            pairs = {
                b: tuned_by_key[_strip(b, base_prefix)] for b in base_names if _strip(b, base_prefix) in tuned_by_key
            }
            if len(pairs) > len(best):
                best = pairs
    return best


def _load_tuned_full(source: WeightSource, slot: Slot) -> TunedMatrix:
    return TunedMatrix(load_slot(source, slot), None)


def _load_tuned_adapter(adapter: LoraAdapter, module: AdapterModule, base: WeightSource, slot: Slot) -> TunedMatrix:
    return adapter.tuned(module, load_slot(base, slot), stored_transposed=slot.transpose)


def _load_tuned_param(adapter: LoraAdapter, module: AdapterModule, base: WeightSource, slot: Slot, rule: dict):
    return adapter.tuned_param(module, load_slot(base, slot), **rule)


def _full_digests(base: WeightSource, slot: Slot, tuned: WeightSource, tuned_slot: Slot, stored: StoredDigest):
    return slot_digest(base, slot, stored), slot_digest(tuned, tuned_slot, stored)


def _adapter_digests(adapter: LoraAdapter, module: AdapterModule, base: WeightSource, slot: Slot, stored):
    base_digest = slot_digest(base, slot, stored)
    return base_digest, adapter.tuned_digest(module, base_digest, stored, stored_transposed=slot.transpose)


def _param_digests(adapter: LoraAdapter, module: AdapterModule, base: WeightSource, slot: Slot, rule: dict, stored):
    base_digest = slot_digest(base, slot, stored)
    return base_digest, adapter.param_digest(module, base_digest, stored, repr(sorted(rule.items())))


def _base_summary(base: WeightSource) -> dict:
    return {
        "architecture": (base.config.get("architectures") or [None])[0],
        "model_type": base.config.get("model_type"),
    }


def plan_comparison(
    base: WeightSource, tuned: WeightSource | LoraAdapter, *, include_non_block: bool = False
) -> ComparisonPlan:
    """Pair the base model's matrices with the fine-tune's.

    Parameters
    ----------
    base : WeightSource
        The pre-trained model.
    tuned : WeightSource or LoraAdapter
        A full fine-tune or merged checkpoint (:class:`WeightSource`), or a LoRA adapter
        to apply to ``base`` (:class:`LoraAdapter`).
    include_non_block : bool, default False
        Also analyse 2-D weights outside the numbered blocks (embeddings, LM head,
        pooler, classifier).

    Returns
    -------
    ComparisonPlan
        ``matrices`` in block order, each with its identity (stack, layer, module,
        expert); names found on one side only in ``unmatched``; pairs whose shapes
        disagree in ``shape_mismatches``; every base tensor not analysed in ``skipped``
        with its reason; ``summary`` with the architecture, the number of matched
        matrices and, for adapters, the settings.

    Raises
    ------
    InputError
        An adapter that matches no base matrix, whose block modules do not exist in the
        base, or whose factor shapes disagree with the base (the wrong base model); a
        fine-tune that shares no matrix with the base.
    """
    if is_adapter(tuned):
        return _plan_adapter(base, tuned, include_non_block)
    return _plan_full(base, tuned, include_non_block)


def _sort_key(plan: MatrixPlan) -> tuple:
    return (
        plan.layer is None,
        plan.stack or "",
        plan.layer if plan.layer is not None else 0,
        plan.name,
        -1 if plan.expert is None else plan.expert,
    )


def _matrix(slot: Slot, tuned_storage: str | None = None, **kwargs) -> MatrixPlan:
    matrix = MatrixId(
        slot.name,
        slot.layer,
        slot.module,
        tuple(slot.shape),
        stack=slot.stack,
        expert=slot.expert,
        storage=slot.storage,
        tuned_storage=tuned_storage,
    )
    return MatrixPlan(matrix, **kwargs)


def storage_counts(matrices: list[MatrixPlan]) -> dict[str, dict[str, int]]:
    """How many analysed matrices each storage holds: ``{"base": {"fp8 e4m3, ...": n}, "tuned": {...}}``."""
    counts: dict[str, dict[str, int]] = {"base": {}, "tuned": {}}
    for matrix in matrices:
        for side, label in (("base", matrix.id.storage), ("tuned", matrix.id.tuned_storage)):
            if label is not None:
                counts[side][label] = counts[side].get(label, 0) + 1
    return counts


def _skipped_slots(skipped: list[dict], slots: Iterable[Slot], reason: str, analysed: set[str]) -> None:
    """Add the stored tensors of ``slots`` none of whose matrices is analysed."""
    names = sorted({s.name for s in slots} - analysed)
    skipped.extend({"name": n, "reason": reason} for n in names)


def _plan_full(base: WeightSource, tuned: WeightSource, include_non_block: bool) -> ComparisonPlan:
    base_slots, skipped = catalogue(base, include_non_block)
    tuned_slots, _ = catalogue(tuned, include_non_block)
    tuned_slots = to_base_layout(tuned_slots, base_slots)
    base_by_key = {s.key: s for s in base_slots}
    tuned_by_key = {s.key: s for s in tuned_slots}
    pairs = match_names(list(base_by_key), list(tuned_by_key))
    matrices: list[MatrixPlan] = []
    mismatches: list[ShapeMismatch] = []
    mismatched: set[str] = set()
    for key, tuned_key in pairs.items():
        slot, tuned_slot = base_by_key[key], tuned_by_key[tuned_key]
        if slot.shape != tuned_slot.shape:
            if slot.name not in mismatched:
                mismatches.append(ShapeMismatch(slot.name, base.shape(slot.name), tuned.shape(tuned_slot.name)))
                mismatched.add(slot.name)
            continue
        matrices.append(
            _matrix(
                slot,
                tuned_slot.storage,
                load_base=partial(load_slot, base, slot),
                load_tuned=partial(_load_tuned_full, tuned, tuned_slot),
                digests=partial(_full_digests, base, slot, tuned, tuned_slot),
            )
        )
    matched_tuned = {p.name for k in pairs.values() for p in (tuned_by_key[k].pieces or (tuned_by_key[k],))}
    analysed = {m.name for m in matrices}
    base_unmatched = sorted({s.name for s in base_slots if s.key not in pairs} - analysed)
    unmatched = base_unmatched + sorted({p.name for s in tuned_slots for p in (s.pieces or (s,))} - matched_tuned)
    if not matrices and not mismatches:
        raise InputError(
            tuned.label,
            f"shares no weight matrix with the base model {base.label} (different architecture or naming?)",
        )
    _skipped_slots(
        skipped, [s for s in base_slots if s.name in mismatched], "its shape differs in the fine-tune", analysed
    )
    skipped.extend({"name": n, "reason": "not in the fine-tune"} for n in base_unmatched if n not in mismatched)
    matrices.sort(key=_sort_key)
    summary = _base_summary(base) | {
        "tuned_architecture": (tuned.config.get("architectures") or [None])[0],
        "matched_matrices": len(matrices),
        "unmatched": len(unmatched),
        "shape_mismatches": len(mismatches),
        "skipped": len(skipped),
        "storage": storage_counts(matrices),
    }
    plan = ComparisonPlan(base.label, tuned.label, "full", matrices, unmatched, mismatches, summary)
    plan.skipped, plan.sources = skipped, (base, tuned)
    return plan


def _plan_adapter(base: WeightSource, adapter: LoraAdapter, include_non_block: bool) -> ComparisonPlan:
    layout = ModelLayout(base.config)
    slots, skipped = catalogue(base, include_non_block=True, layout=layout)
    pairs, by_name = _adapter_pairs(adapter, [s for s in slots if s.index is None])
    found = _module_matrices(base, adapter, pairs, by_name, include_non_block)
    found.matrices.extend(_param_matrices(base, adapter, layout, slots, found.matched))
    _check_adapter_fits(base, adapter, found, len(pairs))
    matrices = sorted(found.matrices, key=_sort_key)
    _adapter_skipped(skipped, slots, {m.name for m in matrices}, {m.name for m in found.mismatches}, include_non_block)
    unmatched = [adapter.unmatched_name(m) for m in _missing_modules(adapter, found.matched)]
    summary = _base_summary(base) | {
        "matched_matrices": len(matrices),
        "unmatched": len(unmatched),
        "shape_mismatches": len(found.mismatches),
        "skipped": len(skipped),
        "adapter": _adapter_summary(adapter),
        # Adapted outside the blocks (embeddings, heads): shown with include_non_block=True.
        "non_block_adapted": sorted(found.non_block),
        "ignored_adapter_tensors": list(adapter.ignored),
        "storage": storage_counts(matrices),
    }
    plan = ComparisonPlan(base.label, adapter.label, "adapter", matrices, unmatched, found.mismatches, summary)
    plan.skipped = skipped
    return plan


def _adapter_pairs(adapter: LoraAdapter, whole: list[Slot]) -> tuple[dict[str, str], dict[str, Slot]]:
    """``{base name: adapter module}`` for the adapter's ordinary modules, and the slots.

    The slots are keyed by the base names used (stored names, or for PEFT possibly names
    in memory).
    """
    regular = {m: mod for m, mod in adapter.modules.items() if not mod.param_wrapper}
    if adapter.naming is not None:  # the format's own module naming (kohya)
        by_name = {s.name: s for s in whole}
        return adapter.naming(list(by_name), regular), by_name
    # PEFT names modules as they are in memory; adapters saved before a layout change
    # (transformers 4's per-expert Mixtral modules) as stored: the naming that
    # explains more of the adapter wins.
    module_weights = {f"{m}.weight": m for m in regular}
    stored = {s.name: s for s in whole}
    memory = {s.memory: s for s in whole if s.parts == 1 and s.memory.endswith(".weight")}
    pairs, by_name = {}, stored
    for names in (memory, stored):
        found = match_names(list(names), list(module_weights))
        if len(found) > len(pairs):
            pairs, by_name = found, names
    return {b: module_weights[t] for b, t in pairs.items()}, by_name


@dataclass
class _AdapterMatches:
    """What pairing an adapter's modules with the base found (:func:`_module_matrices`)."""

    matrices: list[MatrixPlan] = field(default_factory=list)
    mismatches: list[ShapeMismatch] = field(default_factory=list)
    matched: set[str] = field(default_factory=set)  # adapter modules that found their matrix
    non_block: list[str] = field(default_factory=list)  # adapted, outside the blocks, left out


def _module_matrices(
    base: WeightSource, adapter: LoraAdapter, pairs: dict[str, str], by_name: dict[str, Slot], include_non_block: bool
) -> _AdapterMatches:
    """The matrices of the adapter's ordinary modules (:func:`_adapter_pairs`).

    Their shapes are checked against the base's.
    """
    found = _AdapterMatches()
    for name, module_name in pairs.items():
        slot = by_name[name]
        module = adapter.modules[module_name]
        found.matched.add(module_name)
        expected = adapter.delta_shape(module)
        replacement = adapter.replacement_shape(module)
        stored = base.shape(slot.name)
        if (expected is not None and expected != slot.shape) or (replacement is not None and replacement != stored):
            found.mismatches.append(ShapeMismatch(slot.name, slot.shape, expected or replacement))
            continue
        if slot.layer is None and not include_non_block:
            found.non_block.append(slot.name)
            continue
        found.matrices.append(
            _matrix(
                slot,
                load_base=partial(load_slot, base, slot),
                load_tuned=partial(_load_tuned_adapter, adapter, module, base, slot),
                adapter_rank=module.rank,
                digests=partial(_adapter_digests, adapter, module, base, slot),
            )
        )
    return found


def _param_matrices(
    base: WeightSource, adapter: LoraAdapter, layout: ModelLayout, slots: list[Slot], matched: set[str]
) -> list[MatrixPlan]:
    """The matrices of the adapter's parameter wrappers, adding the modules placed to ``matched``.

    Parameter wrappers are PEFT's ``target_parameters``: fused experts and other raw
    parameters.
    """
    by_memory: dict[str, list[Slot]] = defaultdict(list)
    for slot in slots:
        by_memory[slot.memory].append(slot)
    matrices: list[MatrixPlan] = []
    for module_name, module in adapter.modules.items():
        if module_name in matched or not (module.param_wrapper or adapter.settings.target_parameters):
            continue
        if not module.has_factors:
            continue
        resolved = resolve_param_wrapper(adapter, module, layout) if layout.available else None
        if resolved is None:
            continue
        param, experts, scale = resolved
        matched.add(module_name)
        (out_dim, _), (a_rank, _) = adapter.factor_shapes(module)
        for slot in by_memory.get(param, []):
            rows = None
            if slot.parts > 1:
                if slot.shape[0] * slot.parts != out_dim:
                    raise InputError(adapter.label, f"{param} does not split into the base's {slot.name}")
                rows = (slot.part * slot.shape[0], (slot.part + 1) * slot.shape[0])
            expert = slot.expert if experts > 1 else 0
            rule = {"scale": scale, "expert": expert or 0, "experts": experts, "rows": rows}
            matrices.append(
                _matrix(
                    slot,
                    load_base=partial(load_slot, base, slot),
                    load_tuned=partial(_load_tuned_param, adapter, module, base, slot, rule),
                    adapter_rank=a_rank // experts,
                    digests=partial(_param_digests, adapter, module, base, slot, rule),
                )
            )
    return matrices


def _missing_modules(adapter: LoraAdapter, matched: set[str]) -> list[str]:
    return sorted(m for m in adapter.modules if m not in matched)


def _check_adapter_fits(base: WeightSource, adapter: LoraAdapter, found: _AdapterMatches, paired: int) -> None:
    """Refuse an adapter made for another base.

    The signs: none of its modules found, block modules missing, or most of the ``paired``
    matrices of other shapes.
    """
    missing = _missing_modules(adapter, found.matched)
    trained_on = adapter.settings.base_model_name_or_path
    hint = f" (it was trained on {trained_on})" if trained_on else ""
    if not found.matched:
        example = missing[0] if missing else "?"
        raise InputError(
            adapter.label,
            f"none of the adapter's {len(adapter.modules)} modules (e.g. {example!r}) exists in the base model "
            f"{base.label}: wrong base model{hint}?",
        )
    missing_in_blocks = [m for m in missing if block_index(m + ".") is not None and adapter.modules[m].has_factors]
    if missing_in_blocks:
        raise InputError(
            adapter.label,
            f"{len(missing_in_blocks)} adapted module(s) do not exist in the base model {base.label}, "
            f"e.g. {missing_in_blocks[0]!r}: wrong base model{hint}?",
        )
    mismatches = found.mismatches
    if mismatches and len(mismatches) * 2 >= paired:
        first = mismatches[0]
        raise InputError(
            adapter.label,
            f"does not fit the base model {base.label}: {len(mismatches)} of {paired} adapted matrices have "
            f"other shapes, e.g. {first.name} is {first.base_shape} in the base but {first.tuned_shape} in the "
            f"adapter{hint}",
        )


def _adapter_skipped(
    skipped: list[dict], slots: list[Slot], analysed: set[str], mismatched: set[str], include_non_block: bool
) -> None:
    """Add the base tensors an adapter plan does not analyse, each with its reason."""
    outside = [s for s in slots if s.layer is None and not include_non_block]
    _skipped_slots(
        skipped, outside, "outside the numbered transformer blocks (embedding, head, pooler, projector)", analysed
    )
    _skipped_slots(skipped, [s for s in slots if s.name in mismatched], "its shape differs in the adapter", analysed)
    _skipped_slots(
        skipped,
        [s for s in slots if s.layer is not None and s.name not in mismatched],
        "not adapted (the adapter leaves it unchanged)",
        analysed,
    )


def _adapter_summary(adapter: LoraAdapter) -> dict:
    s = adapter.settings
    target = s.target_modules
    return {
        "format": adapter.format,
        "peft_type": s.peft_type,
        "r": s.r,
        "lora_alpha": s.lora_alpha,
        "use_rslora": s.use_rslora,
        "use_dora": s.use_dora,
        "fan_in_fan_out": s.fan_in_fan_out,
        "target_modules": sorted(target) if isinstance(target, (list, set, tuple)) else target,
        "rank_pattern": dict(s.rank_pattern),
        "alpha_pattern": dict(s.alpha_pattern),
        "modules_to_save": s.modules_to_save,
        "target_parameters": sorted(s.target_parameters) if s.target_parameters else None,
        "modules": len(adapter.modules),
        "base_model_name_or_path": s.base_model_name_or_path,
    }

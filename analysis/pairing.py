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

import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, replace
from functools import partial

import torch

from analysis.adapters import AdapterModule, LoraAdapter, is_adapter
from analysis.adapters.raw_params import resolve_param_wrapper
from analysis.cache import derived_digest
from analysis.errors import InputError
from analysis.layouts import CONV1D_MODEL_TYPES, ModelLayout, block_index, expert_index, skip_reason, stack_label
from analysis.layouts import module_label as module_kind
from analysis.plan import ComparisonPlan, MatrixPlan, ShapeMismatch, StoredDigest, TunedMatrix
from analysis.sources import WeightSource

__all__ = ["CONV1D_MODEL_TYPES", "block_index", "match_names", "module_kind", "plan_comparison"]


@dataclass
class Slot:
    """One matrix of a checkpoint: a stored 2-D tensor, or one expert of a fused 3-D one.

    ``name`` is the stored tensor, ``memory`` its parameter name in memory (transformers'
    conversion mapping), ``index`` the expert slice of a 3-D tensor (``None``: the whole
    2-D tensor), ``transpose`` whether the stored matrix is ``in x out`` (GPT-2 ``Conv1D``,
    ``is_transposed`` experts), ``shape`` the ``out x in`` shape. ``part``/``parts``: a
    per-expert tensor that transformers concatenates with others into ``memory``.
    """

    name: str
    memory: str
    layer: int | None
    module: str
    shape: tuple[int, int]
    transpose: bool
    index: int | None = None
    expert: int | None = None
    part: int = 0
    parts: int = 1
    stack: str | None = None
    #: A fused expert slice cut into ``parts`` row blocks, this one block ``part``: the
    #: matrix a per-expert checkpoint stores on its own (:func:`_to_base_layout`).
    split: bool = False
    #: Per-expert matrices joined (rows, in order) into the fused slice a base stores
    #: (:func:`_to_base_layout`); ``name`` is then the first of them.
    pieces: tuple[Slot, ...] = ()

    @property
    def key(self) -> str:
        """Names the same matrix across checkpoints of the same architecture and layout (and,
        once :func:`_to_base_layout` re-cut a fine-tune's experts, of either layout)."""
        where = "fused" if self.index is not None and not self.split else f"{self.part}/{self.parts}"
        return f"{self.memory}#{self.expert}#{where}"

    @property
    def identity(self) -> tuple:
        return (self.stack, self.layer, self.module, self.expert)


def catalogue(
    source: WeightSource, include_non_block: bool = False, layout: ModelLayout | None = None
) -> tuple[list[Slot], list[dict]]:
    """Every matrix of ``source`` (:class:`Slot`), and every other tensor with its reason.

    A fused ``[E, out, in]`` (or ``is_transposed`` ``[E, in, out]``) expert tensor gives one
    slot per expert. Stacks are named only when the blocks lie in more than one stack;
    identities that would still collide fall back to the module path inside the block.
    """
    layout = layout or ModelLayout(source.config)
    slots: list[Slot] = []
    skipped: list[dict] = []
    for name in source.names():
        shape = source.shape(name)
        placement = layout.placement(name)
        kind = layout.module_kind(placement.memory)
        layer = block_index(name)
        reason = skip_reason(
            name, shape, source.dtype(name).is_floating_point, kind, layer is not None, include_non_block
        )
        if reason is not None:
            skipped.append({"name": name, "reason": reason})
            continue
        module = module_kind(name)
        stack = stack_label(placement.memory) if layer is not None else None
        if len(shape) == 3:
            transposed = layout.experts_transposed(placement.memory)
            oriented = (shape[2], shape[1]) if transposed else (shape[1], shape[2])
            slots.extend(
                Slot(name, placement.memory, layer, module, oriented, transposed, index=e, expert=e, stack=stack)
                for e in range(shape[0])
            )
            continue
        conv = (
            layout.is_conv1d(placement.memory)
            if layout.available
            else (source.config.get("model_type") in CONV1D_MODEL_TYPES and layer is not None)
        )
        expert = placement.expert if placement.expert is not None else expert_index(name)
        slots.append(
            Slot(
                name,
                placement.memory,
                layer,
                module,
                (shape[1], shape[0]) if conv else (shape[0], shape[1]),
                conv,
                expert=expert,
                part=placement.part,
                parts=placement.parts,
                stack=stack,
            )
        )
    stacks = {s.stack for s in slots if s.layer is not None}
    if len(stacks) <= 1:
        for slot in slots:
            slot.stack = None
    counts = Counter(s.identity for s in slots)
    if any(c > 1 for c in counts.values()):
        slots = [replace(s, module=_module_path(s.name)) if counts[s.identity] > 1 else s for s in slots]
    layout.persist()  # the next process plans this architecture without importing transformers
    return slots, skipped


def _module_path(name: str) -> str:
    """The module path inside its block (``attention.self.query``), to tell matrices apart."""
    match = re.search(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.\d+\.(.*)$", name)
    path = match.group(1) if match else name
    return re.sub(r"(^|\.)experts\.\d+\.", r"\1experts.", path).removesuffix(".weight")


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


def _load_slot(source: WeightSource, slot: Slot) -> torch.Tensor:
    """The slot's matrix as float32 ``out x in`` (one expert read alone from a fused tensor,
    and of a split slice only its rows)."""
    if slot.pieces:
        return torch.cat([_load_slot(source, piece) for piece in slot.pieces])
    tensor = source.load(slot.name) if slot.index is None else source.load_slice(slot.name, slot.index)
    tensor = tensor.to(torch.float32)
    tensor = tensor.T if slot.transpose else tensor
    if slot.split:
        rows = slot.shape[0]
        tensor = tensor[slot.part * rows : (slot.part + 1) * rows]
    return tensor.contiguous()


def _load_tuned_full(source: WeightSource, slot: Slot) -> TunedMatrix:
    return TunedMatrix(_load_slot(source, slot), None)


def _load_tuned_adapter(adapter: LoraAdapter, module: AdapterModule, base: WeightSource, slot: Slot) -> TunedMatrix:
    return adapter.tuned(module, _load_slot(base, slot), stored_transposed=slot.transpose)


def _load_tuned_param(adapter: LoraAdapter, module: AdapterModule, base: WeightSource, slot: Slot, rule: dict):
    return adapter.tuned_param(module, _load_slot(base, slot), **rule)


def _slot_digest(source: WeightSource, slot: Slot, stored: StoredDigest) -> str:
    """A digest of what :func:`_load_slot` returns, from the stored tensor's digest."""
    if slot.pieces:
        return derived_digest("row-concat", *(_slot_digest(source, piece, stored) for piece in slot.pieces))
    digest = stored(source.file(slot.name), slot.name, partial(source.load, slot.name))
    if slot.index is not None:
        digest = derived_digest("expert-slice", f"index={slot.index}", digest)
    digest = derived_digest("oriented-float32", f"transpose={slot.transpose}", digest)
    if slot.split:
        digest = derived_digest("row-block", f"part={slot.part}/{slot.parts}", digest)
    return digest


def _full_digests(base: WeightSource, slot: Slot, tuned: WeightSource, tuned_slot: Slot, stored: StoredDigest):
    return _slot_digest(base, slot, stored), _slot_digest(tuned, tuned_slot, stored)


def _adapter_digests(adapter: LoraAdapter, module: AdapterModule, base: WeightSource, slot: Slot, stored):
    base_digest = _slot_digest(base, slot, stored)
    return base_digest, adapter.tuned_digest(module, base_digest, stored, stored_transposed=slot.transpose)


def _param_digests(adapter: LoraAdapter, module: AdapterModule, base: WeightSource, slot: Slot, rule: dict, stored):
    base_digest = _slot_digest(base, slot, stored)
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
    base:
        The pre-trained model.
    tuned:
        A full fine-tune or merged checkpoint (:class:`WeightSource`), or a LoRA adapter
        to apply to ``base`` (:class:`LoraAdapter`).
    include_non_block:
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


def _matrix(slot: Slot, **kwargs) -> MatrixPlan:
    return MatrixPlan(
        name=slot.name,
        layer=slot.layer,
        module=slot.module,
        shape=slot.shape,
        stack=slot.stack,
        expert=slot.expert,
        **kwargs,
    )


def _skipped_slots(skipped: list[dict], slots: Iterable[Slot], reason: str, analysed: set[str]) -> None:
    """Add the stored tensors of ``slots`` none of whose matrices is analysed."""
    names = sorted({s.name for s in slots} - analysed)
    skipped.extend({"name": n, "reason": reason} for n in names)


def _to_base_layout(tuned: list[Slot], base: list[Slot]) -> list[Slot]:
    """The fine-tune's expert matrices cut as the base stores them, where the two checkpoints
    use different expert layouts (the hub's per-expert Qwen3-MoE or Mixtral against a
    transformers 5 state dict with fused ``gate_up_proj`` / ``down_proj``).

    A fused slice of the fine-tune becomes the per-expert matrices the base stores (its row
    blocks, in the order transformers concatenates them: ``gate_proj`` then ``up_proj``);
    per-expert matrices of the fine-tune are joined into the fused slice the base stores.
    Matrices are always the base's, so every name in a plan remains a base tensor. Where the
    shapes do not tile, nothing changes (and the matrices are listed as unmatched).
    """

    def per_expert(slots: list[Slot]) -> dict[tuple[str, int], list[Slot]]:
        fused = {s.memory for s in slots if s.index is not None}
        found: dict[tuple[str, int], list[Slot]] = defaultdict(list)
        for s in slots:
            if s.index is None and s.expert is not None and s.memory not in fused:
                found[(s.memory, s.expert)].append(s)
        return {k: sorted(v, key=lambda p: p.part) for k, v in found.items()}

    def tiles(parts: list[Slot], shape: tuple[int, int]) -> bool:
        return (
            [p.part for p in parts] == list(range(len(parts)))
            and all(p.parts == len(parts) and p.shape == (shape[0] // p.parts, shape[1]) for p in parts)
            and shape[0] % len(parts) == 0
        )

    base_parts, tuned_parts = per_expert(base), per_expert(tuned)
    base_fused = {(s.memory, s.expert): s for s in base if s.index is not None}
    out: list[Slot] = []
    for slot in tuned:
        parts = base_parts.get((slot.memory, slot.expert)) if slot.index is not None else None
        if parts and tiles(parts, slot.shape):  # split this fused slice as the base stores it
            out.extend(
                replace(slot, module=p.module, shape=p.shape, part=p.part, parts=p.parts, split=True) for p in parts
            )
            continue
        target = base_fused.get((slot.memory, slot.expert)) if slot.index is None else None
        pieces = tuned_parts.get((slot.memory, slot.expert)) if target is not None else None
        if pieces and tiles(pieces, target.shape):  # join the per-expert parts into the base's slice
            if slot.part == 0:
                out.append(replace(target, name=slot.name, transpose=False, pieces=tuple(pieces)))
            continue
        out.append(slot)
    return out


def _plan_full(base: WeightSource, tuned: WeightSource, include_non_block: bool) -> ComparisonPlan:
    base_slots, skipped = catalogue(base, include_non_block)
    tuned_slots, _ = catalogue(tuned, include_non_block)
    tuned_slots = _to_base_layout(tuned_slots, base_slots)
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
                load_base=partial(_load_slot, base, slot),
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
    }
    plan = ComparisonPlan(base.label, tuned.label, "full", matrices, unmatched, mismatches, summary)
    plan.skipped = skipped
    return plan


def _plan_adapter(base: WeightSource, adapter: LoraAdapter, include_non_block: bool) -> ComparisonPlan:
    layout = ModelLayout(base.config)
    slots, skipped = catalogue(base, include_non_block=True, layout=layout)
    whole = [s for s in slots if s.index is None]
    regular = {m: mod for m, mod in adapter.modules.items() if not mod.param_wrapper}
    if adapter.naming is not None:  # the format's own module naming (kohya)
        by_name = {s.name: s for s in whole}
        pairs = adapter.naming(list(by_name), regular)
    else:
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
        pairs = {b: module_weights[t] for b, t in pairs.items()}
    matrices: list[MatrixPlan] = []
    mismatches: list[ShapeMismatch] = []
    matched: set[str] = set()
    non_block: list[str] = []
    for name, module_name in pairs.items():
        slot = by_name[name]
        module = adapter.modules[module_name]
        matched.add(module_name)
        expected = adapter.delta_shape(module)
        replacement = adapter.replacement_shape(module)
        stored = base.shape(slot.name)
        if (expected is not None and expected != slot.shape) or (replacement is not None and replacement != stored):
            mismatches.append(ShapeMismatch(slot.name, slot.shape, expected or replacement))
            continue
        if slot.layer is None and not include_non_block:
            non_block.append(slot.name)
            continue
        matrices.append(
            _matrix(
                slot,
                load_base=partial(_load_slot, base, slot),
                load_tuned=partial(_load_tuned_adapter, adapter, module, base, slot),
                adapter_rank=module.rank,
                digests=partial(_adapter_digests, adapter, module, base, slot),
            )
        )
    by_memory: dict[str, list[Slot]] = defaultdict(list)
    for slot in slots:
        by_memory[slot.memory].append(slot)
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
                    load_base=partial(_load_slot, base, slot),
                    load_tuned=partial(_load_tuned_param, adapter, module, base, slot, rule),
                    adapter_rank=a_rank // experts,
                    digests=partial(_param_digests, adapter, module, base, slot, rule),
                )
            )
    missing = sorted(m for m in adapter.modules if m not in matched)
    trained_on = adapter.settings.base_model_name_or_path
    hint = f" (it was trained on {trained_on})" if trained_on else ""
    if not matched:
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
    if mismatches and len(mismatches) * 2 >= len(pairs):
        first = mismatches[0]
        raise InputError(
            adapter.label,
            f"does not fit the base model {base.label}: {len(mismatches)} of {len(pairs)} adapted matrices have "
            f"other shapes, e.g. {first.name} is {first.base_shape} in the base but {first.tuned_shape} in the "
            f"adapter{hint}",
        )
    matrices.sort(key=_sort_key)
    analysed = {m.name for m in matrices}
    mismatched = {m.name for m in mismatches}
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
    unmatched = [adapter.unmatched_name(m) for m in missing]
    summary = _base_summary(base) | {
        "matched_matrices": len(matrices),
        "unmatched": len(unmatched),
        "shape_mismatches": len(mismatches),
        "skipped": len(skipped),
        "adapter": _adapter_summary(adapter),
        # Adapted outside the blocks (embeddings, heads): shown with include_non_block=True.
        "non_block_adapted": sorted(non_block),
        "ignored_adapter_tensors": list(adapter.ignored),
    }
    plan = ComparisonPlan(base.label, adapter.label, "adapter", matrices, unmatched, mismatches, summary)
    plan.skipped = skipped
    return plan


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

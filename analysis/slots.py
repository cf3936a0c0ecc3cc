"""The matrices of a checkpoint (:class:`Slot`).

What :func:`catalogue` finds in its file headers, how one is loaded (:func:`load_slot`)
and digested (:func:`slot_digest`), and a fine-tune's expert matrices re-cut as its base
stores them (:func:`to_base_layout`).

A slot is a stored 2-D tensor or one expert of a fused 3-D one, oriented ``out x in``
(GPT-2 ``Conv1D`` weights and ``is_transposed`` experts are transposed when loaded).
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass, replace

import torch

from analysis.cache import derived_digest
from analysis.layouts import CONV1D_MODEL_TYPES, ModelLayout, block_index, expert_index, skip_reason, stack_label
from analysis.layouts import module_label as module_kind
from analysis.plan import StoredDigest
from analysis.sources import WeightSource


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
    #: matrix a per-expert checkpoint stores on its own (:func:`to_base_layout`).
    split: bool = False
    #: Per-expert matrices joined (rows, in order) into the fused slice a base stores
    #: (:func:`to_base_layout`); ``name`` is then the first of them.
    pieces: tuple[Slot, ...] = ()
    #: How the stored tensor is stored (:meth:`analysis.sources.WeightSource.storage`).
    storage: str | None = None

    @property
    def key(self) -> str:
        """Names the same matrix across checkpoints of the same architecture and layout.

        Once :func:`to_base_layout` re-cut a fine-tune's experts, across either layout too.
        """
        where = "fused" if self.index is not None and not self.split else f"{self.part}/{self.parts}"
        return f"{self.memory}#{self.expert}#{where}"

    @property
    def identity(self) -> tuple:
        """Where the matrix sits in the model: ``(stack, layer, module, expert)``."""
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
    skipped: list[dict] = source.quantised_skips()
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
                Slot(
                    name,
                    placement.memory,
                    layer,
                    module,
                    oriented,
                    transposed,
                    index=e,
                    expert=e,
                    stack=stack,
                    storage=source.storage(name),
                )
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
                storage=source.storage(name),
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


def load_slot(source: WeightSource, slot: Slot) -> torch.Tensor:
    """The slot's matrix as float32 ``out x in``.

    One expert is read alone from a fused tensor, and of a split slice only its rows.
    """
    if slot.pieces:
        return torch.cat([load_slot(source, piece) for piece in slot.pieces])
    tensor = source.load(slot.name) if slot.index is None else source.load_slice(slot.name, slot.index)
    tensor = tensor.to(torch.float32)
    tensor = tensor.T if slot.transpose else tensor
    if slot.split:
        rows = slot.shape[0]
        tensor = tensor[slot.part * rows : (slot.part + 1) * rows]
    return tensor.contiguous()


def slot_digest(source: WeightSource, slot: Slot, stored: StoredDigest) -> str:
    """A digest of what :func:`load_slot` returns, from the stored tensor's digest."""
    if slot.pieces:
        return derived_digest("row-concat", *(slot_digest(source, piece, stored) for piece in slot.pieces))
    digest = source.stored_digest(slot.name, stored)
    if slot.index is not None:
        digest = derived_digest("expert-slice", f"index={slot.index}", digest)
    digest = derived_digest("oriented-float32", f"transpose={slot.transpose}", digest)
    if slot.split:
        digest = derived_digest("row-block", f"part={slot.part}/{slot.parts}", digest)
    return digest


def to_base_layout(tuned: list[Slot], base: list[Slot]) -> list[Slot]:
    """The fine-tune's expert matrices cut as the base stores them.

    Needed where the two checkpoints use different expert layouts (the hub's per-expert
    Qwen3-MoE or Mixtral against a transformers 5 state dict with fused ``gate_up_proj`` /
    ``down_proj``).

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
            if slot.part == 0:  # stored as the fine-tune's pieces are, not as the base's slice
                storage = " + ".join(dict.fromkeys(p.storage for p in pieces if p.storage)) or None
                out.append(replace(target, name=slot.name, transpose=False, pieces=tuple(pieces), storage=storage))
            continue
        out.append(slot)
    return out

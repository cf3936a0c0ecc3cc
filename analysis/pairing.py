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
from collections import Counter
from collections.abc import Iterable
from functools import partial

import torch

from analysis.adapters import AdapterModule, LoraAdapter
from analysis.cache import derived_digest
from analysis.errors import InputError
from analysis.plan import ComparisonPlan, MatrixPlan, ShapeMismatch, StoredDigest, TunedMatrix
from analysis.sources import WeightSource

_BLOCK = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")
# model_type values whose block weights are transformers' ``Conv1D`` (stored in x out).
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})

# (pattern on the module path, module kind); first match wins. The module path is the
# tensor name without ".weight".
_MODULE_KINDS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(p), kind)
    for p, kind in [
        (r"(^|\.)(query|q_proj|q|wq|q_lin)$", "query"),
        (r"(^|\.)(key|k_proj|k|wk|k_lin)$", "key"),
        (r"(^|\.)(value|v_proj|v|wv|v_lin)$", "value"),
        (r"(^|\.)(c_attn|qkv_proj|query_key_value|Wqkv|qkv|in_proj)$", "qkv"),
        (r"(^|\.)attention\.output\.dense$", "attn_out"),
        (r"(^|\.)(attn|attention|self_attn|self_attention)\.(c_proj|o_proj|out_proj|dense|wo|out_lin|o)$", "attn_out"),
        (r"(^|\.)o_proj$", "attn_out"),
        (r"(^|\.)gate_up_proj$", "gate_up"),
        (r"(^|\.)(gate_proj|w1)$", "gate"),
        (r"(^|\.)(up_proj|w3)$", "up"),
        (r"(^|\.)(down_proj|w2)$", "down"),
        (r"(^|\.)(intermediate\.dense|c_fc|fc1|fc_in|dense_h_to_4h|lin1|wi)$", "mlp_in"),
        (r"(^|\.)(output\.dense|mlp\.c_proj|fc2|fc_out|dense_4h_to_h|lin2|wo)$", "mlp_out"),
    ]
]


def block_index(name: str) -> int | None:
    """The transformer block number in a tensor name (``encoder.layer.3.`` -> 3), or ``None``."""
    match = _BLOCK.search(name)
    return int(match.group(1)) if match else None


def module_kind(name: str) -> str:
    """What a block weight does: ``query``, ``key``, ``value``, ``qkv``, ``attn_out``,
    ``gate``, ``up``, ``gate_up``, ``down``, ``mlp_in``, ``mlp_out``, or the last name
    component (without ``.weight``) when the layout is unknown."""
    module = name.removesuffix(".weight")
    for pattern, kind in _MODULE_KINDS:
        if pattern.search(module):
            return kind
    return module.rsplit(".", 1)[-1]


def _is_analysable(source: WeightSource, name: str, include_non_block: bool) -> bool:
    if not name.endswith(".weight") or len(source.shape(name)) != 2 or not source.dtype(name).is_floating_point:
        return False
    return include_non_block or block_index(name) is not None


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


def _match_kohya(base_names: list[str], kohya_modules: Iterable[str]) -> dict[str, str]:
    """Map base tensor names to kohya module names (``.`` -> ``_``, suffix match)."""
    by_underscored: dict[str, list[str]] = {}
    for name in base_names:
        by_underscored.setdefault(name.removesuffix(".weight").replace(".", "_"), []).append(name)
    matches: dict[str, str] = {}
    for module in kohya_modules:
        found = by_underscored.get(module) or [
            name
            for key, names in by_underscored.items()
            for name in names
            if key.endswith("_" + module) or module.endswith("_" + key)
        ]
        if len(found) == 1 and found[0].endswith(".weight"):
            matches[found[0]] = module
    return matches


def _load_oriented(source: WeightSource, name: str, transpose: bool) -> torch.Tensor:
    tensor = source.load(name).to(torch.float32)
    return (tensor.T if transpose else tensor).contiguous()


def _load_tuned_full(source: WeightSource, name: str, transpose: bool) -> TunedMatrix:
    return TunedMatrix(_load_oriented(source, name, transpose), None)


def _load_tuned_adapter(
    adapter: LoraAdapter, module: AdapterModule, base: WeightSource, name: str, transpose: bool
) -> TunedMatrix:
    return adapter.tuned(module, _load_oriented(base, name, transpose), stored_transposed=transpose)


def _oriented_digest(source: WeightSource, name: str, transpose: bool, stored: StoredDigest) -> str:
    """A digest of what :func:`_load_oriented` returns, from the stored tensor's digest."""
    digest = stored(source.file(name), name, partial(source.load, name))
    return derived_digest("oriented-float32", f"transpose={transpose}", digest)


def _full_digests(
    base: WeightSource, name: str, tuned: WeightSource, tuned_name: str, transpose: bool, stored: StoredDigest
) -> tuple[str, str]:
    return _oriented_digest(base, name, transpose, stored), _oriented_digest(tuned, tuned_name, transpose, stored)


def _adapter_digests(
    adapter: LoraAdapter, module: AdapterModule, base: WeightSource, name: str, transpose: bool, stored: StoredDigest
) -> tuple[str, str]:
    base_digest = _oriented_digest(base, name, transpose, stored)
    return base_digest, adapter.tuned_digest(module, base_digest, stored, stored_transposed=transpose)


def _is_conv1d(source: WeightSource, names: list[str]) -> bool:
    model_type = source.config.get("model_type")
    if model_type is not None:
        return model_type in CONV1D_MODEL_TYPES
    return any(re.search(r"(^|\.)h\.\d+\.attn\.c_attn\.weight$", n) for n in names)


def _oriented_shape(shape: tuple[int, ...], transpose: bool) -> tuple[int, int]:
    return (shape[1], shape[0]) if transpose else (shape[0], shape[1])


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
        ``matrices`` in block order; names found on one side only in ``unmatched``;
        pairs whose shapes disagree in ``shape_mismatches``; ``summary`` with the
        architecture, the number of matched matrices and, for adapters, the settings.

    Raises
    ------
    InputError
        An adapter that matches no base matrix, whose block modules do not exist in the
        base, or whose factor shapes disagree with the base (the wrong base model); a
        fine-tune that shares no matrix with the base.
    """
    if isinstance(tuned, LoraAdapter):
        return _plan_adapter(base, tuned, include_non_block)
    return _plan_full(base, tuned, include_non_block)


def _sort_key(plan: MatrixPlan) -> tuple:
    return (plan.layer is None, plan.layer if plan.layer is not None else 0, plan.name)


def _plan_full(base: WeightSource, tuned: WeightSource, include_non_block: bool) -> ComparisonPlan:
    base_names = [n for n in base.names() if _is_analysable(base, n, include_non_block)]
    tuned_names = [n for n in tuned.names() if _is_analysable(tuned, n, include_non_block)]
    pairs = match_names(base_names, tuned_names)
    transpose = _is_conv1d(base, base.names())
    matrices: list[MatrixPlan] = []
    mismatches: list[ShapeMismatch] = []
    for name, tuned_name in pairs.items():
        base_shape, tuned_shape = base.shape(name), tuned.shape(tuned_name)
        if base_shape != tuned_shape:
            mismatches.append(ShapeMismatch(name, base_shape, tuned_shape))
            continue
        conv = transpose and block_index(name) is not None
        matrices.append(
            MatrixPlan(
                name=name,
                layer=block_index(name),
                module=module_kind(name),
                shape=_oriented_shape(base_shape, conv),
                load_base=partial(_load_oriented, base, name, conv),
                load_tuned=partial(_load_tuned_full, tuned, tuned_name, conv),
                digests=partial(_full_digests, base, name, tuned, tuned_name, conv),
            )
        )
    matched_tuned = set(pairs.values())
    unmatched = sorted(set(base_names) - set(pairs)) + sorted(set(tuned_names) - matched_tuned)
    if not matrices and not mismatches:
        raise InputError(
            tuned.label,
            f"shares no weight matrix with the base model {base.label} (different architecture or naming?)",
        )
    matrices.sort(key=_sort_key)
    summary = _base_summary(base) | {
        "tuned_architecture": (tuned.config.get("architectures") or [None])[0],
        "matched_matrices": len(matrices),
        "unmatched": len(unmatched),
        "shape_mismatches": len(mismatches),
    }
    return ComparisonPlan(base.label, tuned.label, "full", matrices, unmatched, mismatches, summary)


def _plan_adapter(base: WeightSource, adapter: LoraAdapter, include_non_block: bool) -> ComparisonPlan:
    candidates = [n for n in base.names() if _is_analysable(base, n, include_non_block=True)]
    if adapter.format == "kohya":
        pairs = _match_kohya(candidates, adapter.modules)
    else:
        module_weights = {f"{m}.weight": m for m in adapter.modules}
        pairs = {b: module_weights[t] for b, t in match_names(candidates, list(module_weights)).items()}
    transpose = _is_conv1d(base, base.names())
    matrices: list[MatrixPlan] = []
    mismatches: list[ShapeMismatch] = []
    for name, module_name in pairs.items():
        module = adapter.modules[module_name]
        layer = block_index(name)
        conv = transpose and layer is not None
        stored = base.shape(name)
        shape = _oriented_shape(stored, conv)
        expected = adapter.delta_shape(module)
        replacement = adapter.replacement_shape(module)
        if (expected is not None and expected != shape) or (replacement is not None and replacement != stored):
            mismatches.append(ShapeMismatch(name, shape, expected or replacement))
            continue
        if layer is None and not include_non_block:
            continue
        matrices.append(
            MatrixPlan(
                name=name,
                layer=layer,
                module=module_kind(name),
                shape=shape,
                load_base=partial(_load_oriented, base, name, conv),
                load_tuned=partial(_load_tuned_adapter, adapter, module, base, name, conv),
                adapter_rank=module.rank,
                digests=partial(_adapter_digests, adapter, module, base, name, conv),
            )
        )
    matched = set(pairs.values())
    missing = sorted(m for m in adapter.modules if m not in matched)
    skipped_non_block = sorted(n for n, m in pairs.items() if block_index(n) is None and not include_non_block)
    trained_on = adapter.settings.base_model_name_or_path
    hint = f" (it was trained on {trained_on})" if trained_on else ""
    if not pairs:
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
    unmatched = [m if adapter.format == "kohya" else f"{m}.weight" for m in missing]
    summary = _base_summary(base) | {
        "matched_matrices": len(matrices),
        "unmatched": len(unmatched),
        "shape_mismatches": len(mismatches),
        "adapter": _adapter_summary(adapter),
        # Adapted outside the blocks (embeddings, heads): shown with include_non_block=True.
        "non_block_adapted": skipped_non_block,
        "ignored_adapter_tensors": list(adapter.ignored),
    }
    return ComparisonPlan(base.label, adapter.label, "adapter", matrices, unmatched, mismatches, summary)


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
        "modules": len(adapter.modules),
        "base_model_name_or_path": s.base_model_name_or_path,
    }

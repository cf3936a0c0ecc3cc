"""Where each stored tensor lives in the model: identity, layout, and why a tensor is skipped.

Family knowledge lives here, so a new model family touches this one file:

- **Names across layouts.** A checkpoint written by ``save_pretrained`` and the model in
  memory (which PEFT adapters name) may differ: transformers 5 converts LLaVA's
  ``language_model.model.layers...`` into ``model.language_model.layers...`` and stacks
  Mixtral's per-expert ``block_sparse_moe.experts.3.w1.weight`` into the fused
  ``mlp.experts.gate_up_proj`` ``[E, 2I, H]``. Rather than guessing prefixes, the layout
  asks transformers itself: the model class of ``config.json``'s ``architectures`` is
  built on the ``meta`` device (no memory, no weights) and every stored name is renamed
  with the conversion mapping its model classes declare
  (``transformers.conversion_mapping.get_model_conversion_mapping`` and
  ``transformers.core_model_loading.rename_source_key``, the code ``from_pretrained``
  runs). The meta model also says which modules are ``nn.Embedding``, GPT-2 ``Conv1D``
  (stored ``in x out``), or fused experts stored ``[E, in, out]`` (``is_transposed``).
  Without a config transformers knows, names are used as stored. One expert's projections
  go by two names: ``w1``/``w3``/``w2`` (Mixtral's checkpoints, and the mapping
  transformers declares for them) and ``gate_proj``/``up_proj``/``down_proj`` (what
  GPTQModel and auto-round write for every family, having split the fused experts into one
  linear module per expert to quantise them); a stored name the mapping does not convert
  is tried under its other name (:data:`EXPERT_PROJECTION_NAMES`).
- **Identity.** ``(stack, layer, module, expert)``: the stack (``encoder``/``decoder`` of
  T5, ``vision``/``language`` of a VLM; ``None`` when a model has one), the block number,
  a canonical module label (:func:`module_label`) and the MoE expert index (``None``
  outside experts).
- **Skipped tensors.** Every stored tensor that is not analysed gets a reason
  (:func:`skip_reason`).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from functools import lru_cache

from analysis.cache import content_hasher, default_cache_dir
from analysis.files import atomic_write_text

log = logging.getLogger(__name__)

_BLOCK = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")
_SENTINEL = "987654321"  # stands for a block number while a name is renamed
_EXPERT = re.compile(r"(?:^|\.)experts\.(\d+)\.")
# model_type values whose block weights are transformers' ``Conv1D`` (stored in x out);
# used only when the meta model cannot be built.
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})
# model_type values whose fused experts are stored [E, in, out] (``is_transposed``);
# used only when the meta model cannot be built.
TRANSPOSED_EXPERT_MODEL_TYPES = frozenset({"gpt_oss"})

_CROSS = r"(^|\.)(EncDecAttention|encoder_attn|crossattention|cross_attn)"
_ATTN = r"(^|\.)(attn|attention|self_attn|self_attention)"
# (pattern on the module path, label); first match wins. The module path is the tensor
# name without ``.weight``.
_MODULE_LABELS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(p), label)
    for p, label in [
        # Cross-attention (T5's EncDecAttention, BART's encoder_attn, BERT's crossattention).
        (
            r"(^|\.)(EncDecAttention|encoder_attn|crossattention|cross_attn)\.(q|q_proj|query|self\.query)$",
            "cross_query",
        ),
        (r"(^|\.)(EncDecAttention|encoder_attn|crossattention|cross_attn)\.(k|k_proj|key|self\.key)$", "cross_key"),
        (
            r"(^|\.)(EncDecAttention|encoder_attn|crossattention|cross_attn)\.(v|v_proj|value|self\.value)$",
            "cross_value",
        ),
        (
            r"(^|\.)(EncDecAttention|encoder_attn|crossattention|cross_attn)\.(o|out_proj|output\.dense)$",
            "cross_attn_out",
        ),
        (r"(^|\.)SelfAttention\.o$", "self_attn_out"),
        # Mixture-of-experts routers and shared experts.
        (r"(^|\.)(mlp|block_sparse_moe|moe|feed_forward)\.(gate|router)$", "router"),
        (r"(^|\.)router(\.(layer|linear|classifier|proj))?$", "router"),
        (r"(^|\.)shared_experts?_gate$", "shared_router"),
        (r"(^|\.)shared_experts?\.(gate_proj|w1)$", "shared_gate"),
        (r"(^|\.)shared_experts?\.(up_proj|w3)$", "shared_up"),
        (r"(^|\.)shared_experts?\.(down_proj|w2)$", "shared_down"),
        (r"(^|\.)shared_experts?\.gate_up_proj$", "shared_gate_up"),
        (r"(^|\.)(query|q_proj|q|wq|q_lin|query_proj)$", "query"),
        (r"(^|\.)(key|k_proj|k|wk|k_lin|key_proj)$", "key"),
        (r"(^|\.)(value|v_proj|v|wv|v_lin|value_proj)$", "value"),
        (r"(^|\.)(c_attn|qkv_proj|query_key_value|Wqkv|qkv|in_proj)$", "qkv"),
        (r"(^|\.)attention\.output\.dense$", "attn_out"),
        (
            r"(^|\.)(attn|attention|self_attn|self_attention)\.(c_proj|o_proj|out_proj|dense|wo|out_lin|o|proj)$",
            "attn_out",
        ),
        (r"(^|\.)o_proj$", "attn_out"),
        (r"(^|\.)gate_up_proj$", "gate_up"),
        (r"(^|\.)(gate_proj|w1|wi_0)$", "gate"),
        (r"(^|\.)(up_proj|w3|wi_1)$", "up"),
        (r"(^|\.)(down_proj|w2)$", "down"),
        (r"(^|\.)(intermediate\.dense|c_fc|fc1|fc_in|dense_h_to_4h|lin1|wi)$", "mlp_in"),
        (r"(^|\.)(output\.dense|mlp\.c_proj|fc2|fc_out|dense_4h_to_h|lin2|wo)$", "mlp_out"),
    ]
]

# Stack labels, first match on the part of the name before the block number.
_STACKS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(p), label)
    for p, label in [
        (r"(^|\.)(vision_tower|vision_model|visual|vision|image_encoder|vit)(\.|$)", "vision"),
        (r"(^|\.)(audio_tower|audio_model|audio|speech)(\.|$)", "audio"),
        (r"(^|\.)(language_model|text_model|llm)(\.|$)", "language"),
        (r"(^|\.)decoder(\.|$)", "decoder"),
        (r"(^|\.)encoder(\.|$)", "encoder"),
    ]
]


def block_index(name: str) -> int | None:
    """The transformer block number in a tensor name (``encoder.layer.3.`` -> 3), or ``None``."""
    match = _BLOCK.search(name)
    return int(match.group(1)) if match else None


def expert_index(name: str) -> int | None:
    """The expert number of a per-expert tensor (``mlp.experts.17.w1.weight`` -> 17), or ``None``."""
    match = _EXPERT.search(name)
    return int(match.group(1)) if match else None


#: The two names of each projection of one MoE expert (see the module docstring).
EXPERT_PROJECTION_NAMES = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
_OTHER_NAME = EXPERT_PROJECTION_NAMES | {b: a for a, b in EXPERT_PROJECTION_NAMES.items()}
_EXPERT_PROJECTION = re.compile(r"(\.experts\.\d+\.)(" + "|".join(_OTHER_NAME) + r")(?=\.)")


def expert_projection_alias(name: str) -> str | None:
    """``name`` with its expert projection under its other name (``experts.3.gate_proj.`` <-> ``experts.3.w1.``)."""
    match = _EXPERT_PROJECTION.search(name)
    if match is None:
        return None
    return name[: match.start(2)] + _OTHER_NAME[match.group(2)] + name[match.end(2) :]


_NUMBERS = re.compile(r"(?<=\.)\d+(?=\.)")


def _template(name: str) -> str:
    """The name with every block and expert number replaced by 0.

    Labels, stacks and skip rules do not depend on them, so they are computed once per
    template (an 18,000-matrix MoE model has a few dozen templates).
    """
    return _NUMBERS.sub("0", name)


def module_label(name: str) -> str:
    """What a block weight does, as a short label.

    ``query``, ``key``, ``value``, ``qkv``, ``attn_out``, ``self_attn_out``/``cross_attn_out``
    (T5), ``cross_query``..., ``gate``, ``up``, ``gate_up``, ``down``, ``mlp_in``, ``mlp_out``,
    ``router``, ``shared_*``, or the last name component (without ``.weight``) when the
    layout is unknown. Expert weights get the label of their projection (the expert index
    is a separate part of the identity).
    """
    return _module_label(_template(name))


@lru_cache(maxsize=4096)
def _module_label(name: str) -> str:
    module = name.removesuffix(".weight")
    for pattern, label in _MODULE_LABELS:
        if pattern.search(module):
            return label
    return module.rsplit(".", 1)[-1]


def stack_label(name: str) -> str | None:
    """The stack a block tensor belongs to, from the name before its block number."""
    return _stack_label(_template(name))


@lru_cache(maxsize=4096)
def _stack_label(name: str) -> str | None:
    match = _BLOCK.search(name)
    head = name[: match.start()] if match else name
    for pattern, label in _STACKS:
        if pattern.search(head):
            return label
    head = head.strip(".")
    return head.rsplit(".", 1)[-1] if head else None


def is_expert_param(name: str) -> bool:
    """A fused expert tensor (``...experts.gate_up_proj``, ``...experts.down_proj``)."""
    return bool(re.search(r"(^|\.)experts\.[A-Za-z_]\w*$", name)) and not name.endswith("bias")


@dataclass(frozen=True)
class Placement:
    """Where a stored tensor lives in the model in memory.

    ``memory`` is the parameter name in memory (after transformers' conversion mapping);
    for a per-expert tensor stacked into a fused one, ``expert`` is its index, and
    ``part``/``parts`` say which of the concatenated sources it is (Mixtral's ``w1`` is
    part 0 of 2 of ``gate_up_proj``, ``w3`` part 1).
    """

    memory: str
    expert: int | None = None
    part: int = 0
    parts: int = 1


class ModelLayout:
    """What transformers knows about a checkpoint's architecture (see the module docstring)."""

    def __init__(self, config: dict) -> None:
        self.config = config
        self.model_type = config.get("model_type")
        self._config_json = json.dumps(config, sort_keys=True, default=str) if config else None
        self._cache: dict[str, Placement] = {}
        self._dirty = False
        self._renamings: list | None = None  # transformers' objects, built only when needed
        self._converters: list = []
        stored = _read_stored(self._config_json) if self._config_json else None
        if stored is not None:
            self.available, self._prefix, self._meta, self._kinds, self._transposed, self._cache = stored
            return
        self._load_info()
        self._dirty = self._config_json is not None

    def _load_info(self) -> None:
        info = _meta_info(self._config_json) if self._config_json else None
        self.available = info is not None
        self._renamings, self._converters, self._prefix, self._meta, self._kinds, self._transposed = info or (
            [],
            [],
            None,
            {},
            {},
            {},
        )

    def persist(self) -> None:
        """Store what this layout found for later processes.

        What is stored (module kinds, shapes, every placement asked for) lets them plan
        without importing transformers (1-2 s a process; see :func:`_stored_path`). Nothing
        is lost if the cache cannot be written.
        """
        if not self._dirty or self._config_json is None:
            return
        path = _stored_path(self._config_json)
        if path is None:
            return
        data = {
            "available": self.available,
            "prefix": self._prefix,
            "meta": {name: list(shape) for name, shape in self._meta.items()},
            "kinds": self._kinds,
            "transposed": self._transposed,
            "placements": {name: [p.memory, p.expert, p.part, p.parts] for name, p in self._cache.items()},
        }
        try:
            atomic_write_text(path, json.dumps(data, sort_keys=True))
            self._dirty = False
        except OSError as exc:  # a read-only or full cache: later processes build it again
            log.info("cannot store the layout %s: %s", path, exc)

    def placement(self, name: str) -> Placement:
        """Where the stored tensor ``name`` lives in memory.

        Renaming does not depend on the block number: it is done once per name with the
        block number replaced by a sentinel, which is put back afterwards.
        """
        found = self._cache.get(name)
        if found is not None:
            return found
        match = _BLOCK.search(name)
        if match is not None and self.available:
            start, end = match.span(1)
            template = self._placement(name[:start] + _SENTINEL + name[end:])
            if _SENTINEL in template.memory:
                memory = template.memory.replace(_SENTINEL, match.group(1), 1)
                found = Placement(memory, template.expert, template.part, template.parts)
                self._cache[name] = found
                return found
        found = self._placement(name)
        self._cache[name] = found
        return found

    def _placement(self, name: str) -> Placement:
        found = self._cache.get(name)
        if found is not None:
            return found
        placement = Placement(name)
        if self.available and self._renamings is None:  # read from the store: build it now
            self._load_info()
        self._dirty = True
        if self.available:
            renamed, pattern = self._rename(name)
            alias = expert_projection_alias(name) if pattern is None else None
            if alias is not None:  # an expert projection the mapping converts under its other name
                converted = self._rename(alias)
                if converted[1] is not None:
                    renamed, pattern = converted
            if pattern is None:
                placement = Placement(renamed)
            else:
                converter = next(c for c in self._converters if pattern in c.source_patterns)
                expert = expert_index(name)
                placement = Placement(
                    renamed, expert, converter.source_patterns.index(pattern), len(converter.source_patterns)
                )
        self._cache[name] = placement
        return placement

    def _rename(self, name: str) -> tuple[str, str | None]:
        """The renaming transformers does to a stored name: ``(memory name, the converter source pattern or None)``."""
        try:
            from transformers.core_model_loading import rename_source_key

            return rename_source_key(name, self._renamings, self._converters, self._prefix, self._meta)
        except Exception:  # a mapping that cannot handle the name: keep it as stored
            return name, None

    def module_kind(self, memory: str) -> str | None:
        """The kind of module a parameter in memory belongs to.

        ``embedding``, ``conv1d``, ``linear``, ``experts`` or ``None`` (unknown).
        """
        if not self.available:
            return None
        module = memory.rsplit(".", 1)[0]
        return self._kinds.get(module)

    def is_conv1d(self, memory: str) -> bool:
        """Whether a parameter in memory is a transformers ``Conv1D`` weight (stored ``in x out``).

        Without the module kind, decided by :data:`CONV1D_MODEL_TYPES` for block weights.
        """
        kind = self.module_kind(memory)
        if kind is not None:
            return kind == "conv1d"
        return self.model_type in CONV1D_MODEL_TYPES and block_index(memory) is not None

    def experts_transposed(self, memory: str) -> bool:
        """Fused experts stored ``[E, in, out]`` (the forward pass computes ``x @ W[e]``)."""
        module = memory.rsplit(".", 1)[0]
        if module in self._transposed:
            return self._transposed[module]
        return self.model_type in TRANSPOSED_EXPERT_MODEL_TYPES

    def memory_params(self, module: str) -> list[str]:
        """The parameter names directly under ``module`` in memory, in registration order."""
        head = module + "."
        return [n for n in self._meta if n.startswith(head) and "." not in n[len(head) :]]

    def memory_shape(self, memory: str) -> tuple[int, ...] | None:
        """The shape of a parameter in memory as the meta model has it, or ``None`` when unknown."""
        shape = self._meta.get(memory)
        return None if shape is None else tuple(shape)


#: Part of a stored layout's key: change it when what a layout stores changes.
LAYOUT_VERSION = "2"  # 2: expert projections under their other name


def _stored_path(config_json: str):
    """Where the layout of ``config_json`` is stored; ``None`` without transformers.

    In the cache folder, keyed by BLAKE3 of the config, transformers' version and
    :data:`LAYOUT_VERSION` (what transformers says about an architecture is a function of
    these alone).
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        transformers_version = version("transformers")
    except PackageNotFoundError:
        return None
    key = content_hasher(f"layout\x1f{LAYOUT_VERSION}\x1f{transformers_version}\x1f{config_json}".encode())
    digest = key.hexdigest()
    return default_cache_dir() / "layouts" / digest[:2] / f"{digest}.json"


def _read_stored(config_json: str):
    """``(available, prefix, meta, kinds, transposed, placements)`` stored by :meth:`ModelLayout.persist`.

    ``None`` when not stored, unreadable or malformed.
    """
    path = _stored_path(config_json)
    if path is None:
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        placements = {
            name: Placement(str(memory), None if expert is None else int(expert), int(part), int(parts))
            for name, (memory, expert, part, parts) in data["placements"].items()
        }
        meta = {str(name): tuple(int(d) for d in shape) for name, shape in data["meta"].items()}
        kinds = {str(k): str(v) for k, v in data["kinds"].items()}
        transposed = {str(k): bool(v) for k, v in data["transposed"].items()}
        prefix = data["prefix"]
        return bool(data["available"]), None if prefix is None else str(prefix), meta, kinds, transposed, placements
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.info("ignoring the stored layout %s: %s", path, exc)
        return None


@lru_cache(maxsize=16)
def _meta_info(config_json: str):
    """Build the architecture on the meta device; its conversion mapping and module kinds."""
    config = json.loads(config_json)
    architectures = config.get("architectures") or []
    model_type = config.get("model_type")
    if not architectures or not model_type:
        return None
    try:
        import torch
        import transformers
        from transformers import CONFIG_MAPPING
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
        from transformers.pytorch_utils import Conv1D

        cls = getattr(transformers, architectures[0], None)
        if cls is None or model_type not in CONFIG_MAPPING:
            return None
        cfg = CONFIG_MAPPING[model_type].from_dict(config)
        previous = logging.getLogger("transformers").level
        logging.getLogger("transformers").setLevel(logging.ERROR)
        try:
            from transformers.initialization import no_init_weights  # no init on meta: 40x faster

            with torch.device("meta"), no_init_weights():
                model = cls._from_config(cfg)
        finally:
            logging.getLogger("transformers").setLevel(previous)
        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        meta = {name: tuple(p.shape) for name, p in model.state_dict().items()}
        kinds: dict[str, str] = {}
        transposed: dict[str, bool] = {}
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Embedding):
                kinds[name] = "embedding"
            elif isinstance(module, Conv1D):
                kinds[name] = "conv1d"
            elif isinstance(module, torch.nn.Linear):
                kinds[name] = "linear"
            elif any(p.dim() == 3 for p in module.parameters(recurse=False)):
                kinds[name] = "experts"
                transposed[name] = bool(getattr(module, "is_transposed", False))
        return renamings, converters, model.base_model_prefix, meta, kinds, transposed
    except Exception as error:  # an unknown or custom architecture: names are used as stored
        log.info("no transformers layout for %s: %s", architectures[0], error)
        return None


@lru_cache(maxsize=4096)
def _embedding_name(name: str) -> bool:
    return re.search(r"(embed|relative_attention_bias|position_bias|rel_embeddings)", name) is not None


def skip_reason(
    name: str, shape: tuple[int, ...], floating: bool, kind: str | None, in_block: bool, include_non_block: bool
) -> str | None:
    """Why a stored tensor is not analysed, or ``None`` when it is a matrix to analyse.

    ``kind`` is the module kind from :meth:`ModelLayout.module_kind`; ``in_block`` says the
    tensor lies inside a numbered block. Embeddings inside the blocks (T5's
    ``relative_attention_bias``) are lookup tables and never analysed; outside the blocks
    (word embeddings, heads) 2-D weights are analysed only with ``include_non_block``.
    """
    if not floating:
        return "integer or boolean dtype (quantised or a buffer)"
    if len(shape) <= 1:
        return "1-D (norm, bias or scale)"
    if len(shape) > 3:
        return f"{len(shape)}-D tensor (a convolution kernel)"
    if len(shape) == 3 and not is_expert_param(name):
        return "3-D tensor whose layout is not understood (not fused MoE experts)"
    if not name.endswith(".weight") and not (len(shape) == 3 and is_expert_param(name)):
        return "not a weight (a buffer or a bias)"
    if not in_block:
        if include_non_block and len(shape) == 2:
            return None
        return "outside the numbered transformer blocks (embedding, head, pooler, projector)"
    if kind == "embedding" or _embedding_name(_template(name)):
        return "embedding inside a block (a lookup table, not a linear map)"
    return None

"""LoRA adapters: read PEFT and kohya files, and apply them to base weights.

A :class:`LoraAdapter` is what :func:`analysis.sources.open_source` returns for a PEFT
adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``, or
``adapter_model.bin`` read with ``weights_only``) or a kohya/sd-scripts LoRA
``.safetensors`` file. It knows, per adapted module, its factors and how they combine
with the base weight; :mod:`analysis.pairing` decides which base tensor each module
belongs to and asks :meth:`LoraAdapter.tuned` for the fine-tuned weight.

The update rule lives in one function, :func:`merge_lora`, written to reproduce PEFT
0.21's ``merge_and_unload()`` (``peft/tuners/lora/layer.py``: ``update_layer``,
``get_delta_weight``; ``peft/tuners/lora/variants.py``: ``DoraLinearVariant.merge_unsafe``)
to float32 round-off:

- LoRA (Hu et al. 2021, eq. 3): ``W' = W + scale * B @ A`` with ``scale = lora_alpha / r``,
  or ``lora_alpha / sqrt(r)`` with ``use_rslora`` (Kalajdzievski 2023, rsLoRA);
  ``rank_pattern``/``alpha_pattern`` override ``r``/``lora_alpha`` per module
  (:func:`pattern_key`).
- DoRA (Liu et al. 2024, arXiv 2402.09353, eq. 5): ``W' = m / ||W + dW||_row * (W + dW)``
  where the norm of each output row is taken over the input dimension, exactly as
  PEFT's ``DoraLinearLayer.get_weight_norm`` does; the magnitude ``m`` is the saved
  ``lora_magnitude_vector``.
- ``fan_in_fan_out`` (GPT-2 ``Conv1D``): PEFT transposes the delta to the stored
  ``in x out`` layout. Here every matrix is handled ``out x in`` (the plan's orientation),
  where ``dW = scale * B @ A`` for Linear and Conv1D alike, so the flag changes nothing
  in the maths; :mod:`analysis.pairing` transposes Conv1D base weights.
- Embeddings (``lora_embedding_A`` ``r x vocab``, ``lora_embedding_B`` ``dim x r``): PEFT
  merges ``(B @ A).T * scale`` into the ``vocab x dim`` weight, i.e. it treats the
  embedding as a ``dim x vocab`` (``out x in``) layer stored transposed.
- ``modules_to_save``: PEFT 0.21 saves the trained copy under the module's own name
  (``base_model.model.<module>.weight``, the ``modules_to_save.default`` part removed);
  it replaces the base weight outright.
- kohya (sd-scripts ``networks/lora.py``): ``W' = W + alpha / r * up @ down`` with
  ``r = down.shape[0]`` and ``alpha = r`` when the file stores none.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal

import torch

from analysis.cache import derived_digest
from analysis.errors import InputError
from analysis.plan import LowRankDelta, StoredDigest, TunedMatrix
from analysis.sources import (
    ADAPTER_CONFIG,
    TensorInfo,
    _read_json,
    load_safetensors_tensor,
    load_torch_state_dict,
    read_safetensors_header,
)

PEFT_PREFIX = "base_model.model."
KOHYA_PREFIXES = ("lora_te1_", "lora_te2_", "lora_te3_", "lora_te_", "lora_unet_", "lora_transformer_", "lora_")

# LoraConfig switches that turn on a LoRA variant whose merge is not plain LoRA or DoRA.
_UNSUPPORTED_VARIANTS = {
    "alora_invocation_tokens": "activated LoRA (aLoRA) cannot be merged into the weights",
    "use_bdlora": "block-diagonal LoRA (BD-LoRA)",
    "use_qalora": "QA-LoRA (quantisation-aware pooled inputs)",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "arrow_config": "Arrow routing between several LoRA experts",
    "kasa_config": "KaSA",
    "layer_replication": "layer replication (the adapted model has more layers than the base)",
    "target_parameters": "LoRA on raw parameters (target_parameters, e.g. MoE experts)",
}


@dataclass(frozen=True)
class LoraSettings:
    """How an adapter's factors combine with the base weights: PEFT's ``LoraConfig``
    fields that matter for the merged weight, as read from ``adapter_config.json``."""

    peft_type: str = field(
        default="LORA", metadata={"help": "PEFT method; only LORA (incl. rsLoRA, DoRA) is supported."}
    )
    r: int = field(default=8, metadata={"help": "LoRA rank: columns of B, rows of A (before rank_pattern)."})
    lora_alpha: float = field(default=8, metadata={"help": "Scaling numerator: scale = lora_alpha / r."})
    use_rslora: bool = field(
        default=False, metadata={"help": "Rank-stabilised LoRA: scale = lora_alpha / sqrt(r) (Kalajdzievski 2023)."}
    )
    use_dora: bool = field(
        default=False,
        metadata={"help": "DoRA: rows of W + dW are rescaled to the learned lora_magnitude_vector (Liu et al. 2024)."},
    )
    fan_in_fan_out: bool = field(
        default=False, metadata={"help": "The base layer stores its weight in x out (GPT-2 Conv1D)."}
    )
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names (suffixes) or a regex the adapter was attached to."}
    )
    rank_pattern: dict[str, int] = field(
        default_factory=dict, metadata={"help": "Per-module rank overrides, keyed by a regex on the module name."}
    )
    alpha_pattern: dict[str, float] = field(
        default_factory=dict, metadata={"help": "Per-module lora_alpha overrides, keyed by a regex on the module name."}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained in full and saved as replacement weights."}
    )
    lora_bias: bool = field(
        default=False, metadata={"help": "lora_B has a bias; it changes biases only, which are not analysed."}
    )
    init_lora_weights: bool | str = field(
        default=True, metadata={"help": "Initialisation; pissa/olora/corda/loftq change the base weights too."}
    )
    base_model_name_or_path: str | None = field(
        default=None, metadata={"help": "The base model the adapter was trained on, as PEFT recorded it."}
    )
    task_type: str | None = field(default=None, metadata={"help": "PEFT task type (CAUSAL_LM, SEQ_CLS, ...)."})

    @classmethod
    def from_adapter_config(cls, path: Path) -> LoraSettings:
        """Read and check ``adapter_config.json``; refuse anything that is not mergeable LoRA."""
        config = _read_json(path)
        peft_type = str(config.get("peft_type") or "").upper()
        if peft_type != "LORA":
            shown = peft_type or "missing"
            raise InputError(
                path,
                f"peft_type is {shown}: only LoRA adapters (peft_type LORA, including rsLoRA and DoRA) can be analysed",
            )
        for key, what in _UNSUPPORTED_VARIANTS.items():
            if config.get(key):
                raise InputError(path, f"uses {what} ({key}); only plain LoRA, rsLoRA and DoRA can be analysed")
        if config.get("init_lora_weights") == "mica":
            raise InputError(path, "uses the MiCA LoRA variant (init_lora_weights='mica'), which cannot be analysed")
        check_lora_values(path, config)
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in config.items() if k in known}
        values["peft_type"] = peft_type
        values["rank_pattern"] = dict(config.get("rank_pattern") or {})
        values["alpha_pattern"] = dict(config.get("alpha_pattern") or {})
        try:
            settings = cls(**values)
            if int(settings.r) <= 0:
                raise ValueError("r must be positive")
        except (TypeError, ValueError) as error:
            raise InputError(path, f"is not a valid LoRA configuration ({error})") from error
        return settings

    def rank_and_alpha(self, module: str) -> tuple[int, float]:
        """``(r, lora_alpha)`` for one module, after ``rank_pattern``/``alpha_pattern``."""
        r_key = pattern_key(list(self.rank_pattern), module)
        alpha_key = pattern_key(list(self.alpha_pattern), module)
        return int(self.rank_pattern.get(r_key, self.r)), float(self.alpha_pattern.get(alpha_key, self.lora_alpha))

    def summary(self) -> dict:
        """The settings as plain JSON-able data, for the plan summary."""
        data = asdict(self)
        if isinstance(data["target_modules"], (set, tuple)):
            data["target_modules"] = sorted(data["target_modules"])
        return data


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_lora_values(path: object, config: dict) -> None:
    """Refuse, as one :class:`InputError` naming the field, an ``adapter_config.json``
    whose ``r``/``lora_alpha`` are not numbers or whose ``rank_pattern``/``alpha_pattern``
    have keys that are not regular expressions or values that are not numbers (each is
    used as PEFT uses it: :func:`pattern_key`, :func:`lora_scale`)."""
    r = config.get("r", 8)
    if not (_is_number(r) and int(r) == r and r > 0):
        raise InputError(path, f"r must be a positive whole number, got {r!r}")
    alpha = config.get("lora_alpha", 8)
    if not _is_number(alpha):
        raise InputError(path, f"lora_alpha must be a number, got {alpha!r}")
    for field_name, whole in (("rank_pattern", True), ("alpha_pattern", False)):
        pattern = config.get(field_name) or {}
        if not isinstance(pattern, dict):
            raise InputError(path, f"{field_name} must be an object of module patterns, got {type(pattern).__name__}")
        for key, value in pattern.items():
            try:
                re.compile(rf"(.*\.)?({key})$")
            except re.error as error:
                raise InputError(path, f"{field_name} key {key!r} is not a regular expression ({error})") from None
            ok = _is_number(value) and value > 0 and (not whole or int(value) == value)
            if not ok:
                kind = "a positive whole number" if whole else "a positive number"
                raise InputError(path, f"{field_name}[{key!r}] must be {kind}, got {value!r}")


def pattern_key(pattern_keys: Sequence[str], module: str) -> str:
    """PEFT's ``get_pattern_key`` (``peft/utils/other.py``, 0.21): the first key ``k``
    for which ``re.match(rf"(.*\\.)?({k})$", module)`` matches, else ``module`` itself."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return module


def lora_scale(lora_alpha: float, r: int, use_rslora: bool) -> float:
    """PEFT's ``LoraLayer.update_layer`` scaling: ``alpha / r``, or ``alpha / sqrt(r)`` (rsLoRA)."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


@dataclass(frozen=True)
class AdapterModule:
    """What an adapter does to one base module.

    ``module`` is the module path as the adapter names it (PEFT: without
    ``base_model.model.``; kohya: the sd-scripts name without its ``lora_te_``-like
    prefix). ``A``/``B`` are the factor tensor keys (``r x in`` and ``out x r`` in the
    ``out x in`` orientation of the layer; for embeddings ``out`` is the embedding
    dimension and ``in`` the vocabulary). ``magnitude`` is the DoRA magnitude key,
    ``replacement`` the key of a full replacement weight (``modules_to_save``, or a
    saved embedding ``base_layer``).
    """

    module: str
    layer_type: Literal["linear", "embedding"] = "linear"
    A: str | None = None
    B: str | None = None
    rank: int | None = None
    scale: float | None = None
    magnitude: str | None = None
    replacement: str | None = None

    @property
    def has_factors(self) -> bool:
        return self.A is not None


def merge_lora(
    base: torch.Tensor, B: torch.Tensor, A: torch.Tensor, scale: float, magnitude: torch.Tensor | None = None
) -> TunedMatrix:
    """The LoRA/DoRA-merged weight, exactly as PEFT's ``merge_and_unload`` computes it.

    Parameters
    ----------
    base:
        ``W``, float32, ``out x in`` (rows are outputs, as ``torch.nn.Linear`` stores it).
    B, A:
        ``out x r`` and ``r x in`` float32 factors.
    scale:
        From :func:`lora_scale` (or kohya's ``alpha / r``).
    magnitude:
        DoRA's ``lora_magnitude_vector`` (length ``out``), or ``None`` for plain LoRA.

    Returns
    -------
    TunedMatrix
        ``W + scale * B @ A`` with its exact low-rank factors for LoRA; for DoRA
        ``(m / ||W + dW||_row)[:, None] * (W + dW)``, the per-row L2 norm over the input
        dimension (``DoraLinearLayer.get_weight_norm``), with no low-rank form.
    """
    delta = LowRankDelta(B, A, float(scale))
    updated = base + delta.dense()
    if magnitude is None:
        return TunedMatrix(updated, delta)
    weight_norm = torch.linalg.norm(updated, dim=1).detach()
    dora_factor = (magnitude / weight_norm).view(-1, 1)
    return TunedMatrix(dora_factor * updated, None)


_PEFT_FACTOR = re.compile(
    r"^(?P<module>.+?)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"(?:\.[A-Za-z_][\w-]*)?(?:\.weight)?$"
)


class LoraAdapter:
    """A LoRA adapter read from disk; apply it with :meth:`tuned`.

    ``label`` is the spec as the user gave it, ``root`` the folder or file, ``settings``
    the :class:`LoraSettings` (kohya files get equivalent settings with ``peft_type``
    ``"LORA (kohya)"``), ``modules`` the :class:`AdapterModule` per adapted module, and
    ``ignored`` the tensor keys that change nothing the analysis looks at (LoRA biases).
    """

    def __init__(
        self,
        label: str,
        root: Path,
        settings: LoraSettings,
        modules: dict[str, AdapterModule],
        tensors: Mapping[str, TensorInfo],
        *,
        format: Literal["peft", "kohya"],
        state: dict[str, torch.Tensor] | None = None,
        ignored: list[str] | None = None,
    ) -> None:
        self.label = label
        self.root = root
        self.settings = settings
        self.modules = modules
        self.format = format
        self.ignored = ignored or []
        self._tensors = dict(tensors)
        self._state = state
        self._check_not_zero()

    def __repr__(self) -> str:
        return f"LoraAdapter({self.label!r}, {self.format}, {len(self.modules)} modules)"

    @property
    def config(self) -> dict:
        return self.settings.summary()

    def load(self, key: str) -> torch.Tensor:
        """One adapter tensor, as float32."""
        info = self._tensors[key]
        tensor = self._state[key] if self._state is not None else load_safetensors_tensor(info.file, key)
        return tensor.to(torch.float32)

    def tuned_digest(
        self, module: AdapterModule, base_digest: str, stored: StoredDigest, *, stored_transposed: bool = False
    ) -> str:
        """A digest of what :meth:`tuned` returns, from stored digests alone (no merge).

        ``base_digest`` names the base weight as handed to :meth:`tuned`; the factors,
        magnitude and replacement are named by the digests of their stored tensors
        (``stored``: the pipeline's fingerprint index), the rule by its settings.
        """
        tensors = [
            "-" if key is None else stored(self._tensors[key].file, key, lambda key=key: self.load(key))
            for key in (module.A, module.B, module.magnitude, module.replacement)
        ]
        rule = f"{module.layer_type}|scale={module.scale!r}|stored_transposed={stored_transposed}"
        return derived_digest("lora-merged", rule, base_digest, *tensors)

    def factor_shapes(self, module: AdapterModule) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of ``(B, A)`` as stored (``out x r``, ``r x in``)."""
        assert module.A is not None and module.B is not None
        return self._tensors[module.B].shape, self._tensors[module.A].shape

    def delta_shape(self, module: AdapterModule) -> tuple[int, int] | None:
        """The ``out x in`` shape of this module's update in the plan's orientation
        (for embeddings the stored ``vocab x dim``), or ``None`` for a pure replacement."""
        if not module.has_factors:
            return None
        (out_dim, _), (_, in_dim) = self.factor_shapes(module)
        return (in_dim, out_dim) if module.layer_type == "embedding" else (out_dim, in_dim)

    def replacement_shape(self, module: AdapterModule) -> tuple[int, ...] | None:
        return None if module.replacement is None else self._tensors[module.replacement].shape

    def tuned(self, module: AdapterModule, base: torch.Tensor, *, stored_transposed: bool = False) -> TunedMatrix:
        """The fine-tuned weight of one module, in the orientation of ``base``.

        ``base`` is the float32 base weight as the plan hands it out: ``out x in`` for
        Linear and Conv1D layers (``stored_transposed`` says the file stores it ``in x out``,
        which matters only for a replacement weight), and as stored (``vocab x dim``) for
        embeddings.
        """
        if module.replacement is not None:
            replacement = self.load(module.replacement)
            base = replacement.T if stored_transposed else replacement
            if not module.has_factors:
                return TunedMatrix(base.contiguous(), None)
        assert module.A is not None and module.B is not None and module.scale is not None
        A, B = self.load(module.A), self.load(module.B)
        magnitude = self.load(module.magnitude) if module.magnitude is not None else None
        if module.layer_type == "embedding":
            # PEFT's Embedding: a dim x vocab layer stored transposed (see module docstring).
            merged = merge_lora(base.T, B, A, module.scale, magnitude)
            low_rank = merged.low_rank
            if low_rank is not None:
                low_rank = LowRankDelta(low_rank.A.T.contiguous(), low_rank.B.T.contiguous(), low_rank.scale)
            tuned = TunedMatrix(merged.weight.T.contiguous(), low_rank)
        else:
            tuned = merge_lora(base, B, A, module.scale, magnitude)
        if module.replacement is not None:
            # Factors on top of a replaced weight: the update relative to the base is no longer low-rank.
            return TunedMatrix(tuned.weight, None)
        return tuned

    def _check_not_zero(self) -> None:
        """Refuse an adapter whose every update is exactly zero (saved before training)."""
        factored = [m for m in self.modules.values() if m.has_factors]
        if not factored or any(m.magnitude or m.replacement for m in self.modules.values()):
            return
        zero_name = "lora_up" if self.format == "kohya" else "lora_B"
        for module in factored:
            B, A = self.load(module.B), self.load(module.A)
            if torch.count_nonzero(B) and torch.count_nonzero(A):
                return
            if not torch.count_nonzero(A):
                zero_name = "lora_down" if self.format == "kohya" else "lora_A"
        raise InputError(
            self.root,
            f"the adapter's update is zero: {zero_name} is all zeros in every module, was it saved before training?",
        )

    # -- construction --------------------------------------------------------------------

    @classmethod
    def from_peft_folder(cls, folder: Path, *, label: str | None = None, allow_pickle: bool = True) -> LoraAdapter:
        """A PEFT adapter folder: ``adapter_config.json`` + ``adapter_model.safetensors`` (or ``.bin``)."""
        label = label or str(folder)
        settings = LoraSettings.from_adapter_config(folder / ADAPTER_CONFIG)
        weights = folder / "adapter_model.safetensors"
        state = None
        if weights.is_file():
            tensors = read_safetensors_header(weights)
        elif (folder / "adapter_model.bin").is_file():
            if not allow_pickle:
                raise InputError(
                    label, "has only adapter_model.bin, which is read only from local folders, never from the hub"
                )
            weights = folder / "adapter_model.bin"
            state = load_torch_state_dict(weights)
            tensors = {k: TensorInfo(weights, tuple(t.shape), t.dtype) for k, t in state.items()}
        else:
            raise InputError(folder, "has adapter_config.json but no adapter_model.safetensors (or adapter_model.bin)")
        modules, ignored = _peft_modules(weights, settings, tensors)
        return cls(label, folder, settings, modules, tensors, format="peft", state=state, ignored=ignored)

    @classmethod
    def from_kohya_file(cls, path: Path, *, label: str | None = None) -> LoraAdapter:
        """A kohya/sd-scripts LoRA ``.safetensors``: ``<name>.lora_down.weight``,
        ``<name>.lora_up.weight`` and optional scalar ``<name>.alpha`` per module."""
        label = label or str(path)
        tensors = read_safetensors_header(path)
        modules: dict[str, AdapterModule] = {}
        alphas: dict[str, float] = {}
        groups: dict[str, dict[str, str]] = {}
        ignored: list[str] = []
        for key in tensors:
            for suffix, part in ((".lora_down.weight", "down"), (".lora_up.weight", "up"), (".alpha", "alpha")):
                if key.endswith(suffix):
                    groups.setdefault(key.removesuffix(suffix), {})[part] = key
                    break
            else:
                ignored.append(key)
        for name, parts in sorted(groups.items()):
            if "down" not in parts or "up" not in parts:
                missing = "lora_up" if "up" not in parts else "lora_down"
                raise InputError(path, f"module {name!r} has no {missing} weight")
            down, up = tensors[parts["down"]].shape, tensors[parts["up"]].shape
            if len(down) != 2 or len(up) != 2:
                raise InputError(
                    path,
                    f"module {name!r} has {len(down)}-D factors (a convolution LoRA); only Linear layers are supported",
                )
            rank = down[0]
            if up[1] != rank:
                raise InputError(path, f"module {name!r}: lora_up is {up} but lora_down is {down}, their ranks differ")
            alpha = _kohya_alpha(path, name, parts["alpha"]) if "alpha" in parts else rank
            module = _strip_kohya_prefix(name)
            alphas[module] = alpha
            modules[module] = AdapterModule(
                module, A=parts["down"], B=parts["up"], rank=rank, scale=lora_scale(alpha, rank, use_rslora=False)
            )
        if not modules:
            raise InputError(path, "holds no lora_down/lora_up pairs")
        ranks = sorted({m.rank for m in modules.values() if m.rank})
        settings = LoraSettings(
            peft_type="LORA (kohya)",
            r=ranks[0],
            lora_alpha=alphas[min(alphas)],
            target_modules=sorted({m.rsplit("_", 1)[-1] for m in modules}),
            rank_pattern={m.module: m.rank for m in modules.values() if m.rank != ranks[0]},
            alpha_pattern={m: a for m, a in alphas.items() if a != alphas[min(alphas)]},
        )
        return cls(label, path, settings, modules, tensors, format="kohya", ignored=ignored)


def _strip_kohya_prefix(name: str) -> str:
    for prefix in KOHYA_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def _peft_modules(
    weights: Path, settings: LoraSettings, tensors: Mapping[str, TensorInfo]
) -> tuple[dict[str, AdapterModule], list[str]]:
    """Group a PEFT state dict's keys by module and attach each module's rank and scale."""
    parts: dict[str, dict[str, str]] = {}
    replacements: dict[str, str] = {}
    ignored: list[str] = []
    for key in tensors:
        name = key.removeprefix(PEFT_PREFIX)
        match = _PEFT_FACTOR.match(name)
        if match and not name.endswith(".bias"):
            parts.setdefault(match["module"], {})[match["kind"]] = key
        elif name.endswith(".bias"):
            ignored.append(key)
        elif name.endswith(".weight"):
            module = name.removesuffix(".weight")
            module = module.replace(".modules_to_save.default", "").removesuffix(".base_layer")
            module = re.sub(r"\.modules_to_save\.[\w-]+$", "", module)
            replacements[module] = key
        else:
            ignored.append(key)
    modules: dict[str, AdapterModule] = {}
    for module, kinds in sorted(parts.items()):
        embedding = "lora_embedding_A" in kinds or "lora_embedding_B" in kinds
        a_key = kinds.get("lora_embedding_A" if embedding else "lora_A")
        b_key = kinds.get("lora_embedding_B" if embedding else "lora_B")
        if a_key is None or b_key is None:
            missing = ("lora_embedding_" if embedding else "lora_") + ("A" if a_key is None else "B")
            raise InputError(weights, f"module {module!r} has no {missing} weight")
        a_shape, b_shape = tensors[a_key].shape, tensors[b_key].shape
        if len(a_shape) != 2 or len(b_shape) != 2:
            raise InputError(
                weights,
                f"module {module!r} has {len(a_shape)}-D factors (a convolution LoRA); only Linear and Embedding "
                "layers are supported",
            )
        rank = a_shape[0]
        if b_shape[1] != rank:
            raise InputError(weights, f"module {module!r}: lora_B is {b_shape} but lora_A is {a_shape}, ranks differ")
        r, alpha = settings.rank_and_alpha(module)
        if r != rank:
            raise InputError(
                weights,
                f"module {module!r} has rank {rank} factors but adapter_config.json gives it r={r}; "
                "the config does not belong to these weights",
            )
        magnitude = kinds.get("lora_magnitude_vector")
        if settings.use_dora and magnitude is None:
            raise InputError(weights, f"use_dora is set but module {module!r} has no lora_magnitude_vector")
        modules[module] = AdapterModule(
            module,
            layer_type="embedding" if embedding else "linear",
            A=a_key,
            B=b_key,
            rank=rank,
            scale=lora_scale(alpha, r, settings.use_rslora),
            magnitude=magnitude,
            replacement=replacements.pop(module, None),
        )
    for module, key in sorted(replacements.items()):
        modules[module] = AdapterModule(module, replacement=key)
    if not modules:
        raise InputError(weights, "holds no LoRA factors (no lora_A/lora_B weights)")
    return modules, ignored


def _kohya_alpha(path: Path, module: str, key: str) -> float:
    """A kohya module's ``.alpha``: one finite number, else an :class:`InputError`."""
    tensor = load_safetensors_tensor(path, key)
    if tensor.numel() != 1:
        raise InputError(path, f"module {module!r} has an alpha of {tensor.numel()} values; kohya stores one number")
    value = float(tensor.float().item())
    if not math.isfinite(value):
        raise InputError(path, f"module {module!r} has an alpha of {value}")
    return value

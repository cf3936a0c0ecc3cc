"""LoRA adapters: read PEFT and kohya files, and apply them to base weights.

A :class:`LoraAdapter` is what :func:`analysis.sources.open_location` returns for a PEFT
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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal

import torch

from analysis.cache import derived_digest
from analysis.errors import InputError
from analysis.plan import LowRankDelta, StoredDigest, TunedMatrix
from analysis.readers import (
    TensorInfo,
    load_safetensors_tensor,
    read_json,
)

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
}


@dataclass(frozen=True)
class LoraSettings:
    """How an adapter's factors combine with the base weights.

    The fields of PEFT's ``LoraConfig`` that matter for the merged weight, as read from
    ``adapter_config.json``.
    """

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
    target_parameters: list[str] | None = field(
        default=None,
        metadata={"help": "Raw parameters (e.g. fused MoE experts) adapted by PEFT's ParamWrapper."},
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
        config = read_json(path)
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
    """Refuse an ``adapter_config.json`` with values PEFT could not use.

    The refusal is one :class:`InputError` naming the field: ``r``/``lora_alpha`` that
    are not numbers, or ``rank_pattern``/``alpha_pattern`` with keys that are not regular
    expressions or values that are not numbers (each is used as PEFT uses it:
    :func:`pattern_key`, :func:`lora_scale`).
    """
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
    r"""PEFT's ``get_pattern_key`` (``peft/utils/other.py``, 0.21).

    The first key ``k`` for which ``re.match(rf"(.*\.)?({k})$", module)`` matches, else
    ``module`` itself.
    """
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
    #: LoRA on a raw parameter (PEFT's ``ParamWrapper``, ``target_parameters``) whose
    #: factors stack one rank-``r`` pair per expert; resolved against the base by pairing.
    param_wrapper: bool = False

    @property
    def has_factors(self) -> bool:
        """Whether the module has LoRA factors ``A``/``B`` (``False``: a pure replacement)."""
        return self.A is not None


def merge_lora(
    base: torch.Tensor, B: torch.Tensor, A: torch.Tensor, scale: float, magnitude: torch.Tensor | None = None
) -> TunedMatrix:
    """The LoRA/DoRA-merged weight, exactly as PEFT's ``merge_and_unload`` computes it.

    Hu et al. 2021 (LoRA, eq. 3: ``W + (alpha / r) B A``); Liu et al. 2024 (DoRA, eq. 5).
    PEFT 0.21: ``LoraLayer.get_delta_weight`` and ``DoraLinearLayer.get_weight_norm``.

    Parameters
    ----------
    base : torch.Tensor of shape (out, in), float32
        ``W``, rows are outputs, as ``torch.nn.Linear`` stores it.
    B, A : torch.Tensor of shape (out, r) and (r, in), float32
        The adapter's factors.
    scale : float
        From :func:`lora_scale` (or kohya's ``alpha / r``).
    magnitude : torch.Tensor of shape (out,), optional
        DoRA's ``lora_magnitude_vector``; ``None`` for plain LoRA.

    Returns
    -------
    TunedMatrix
        ``W + scale * B @ A`` with its exact low-rank factors for LoRA; for DoRA
        ``(m / ||W + dW||_row)[:, None] * (W + dW)``, the per-row L2 norm over the input
        dimension (``DoraLinearLayer.get_weight_norm``), with no low-rank form.

    Examples
    --------
    >>> import torch
    >>> W = torch.zeros(2, 3)
    >>> B, A = torch.tensor([[1.0], [2.0]]), torch.tensor([[1.0, 0.0, -1.0]])
    >>> merged = merge_lora(W, B, A, scale=lora_scale(lora_alpha=16, r=8, use_rslora=False))
    >>> merged.weight.tolist()
    [[2.0, 0.0, -2.0], [4.0, 0.0, -4.0]]
    >>> merged.low_rank.rank
    1
    >>> dora = merge_lora(W + 1, B, A, scale=2.0, magnitude=torch.tensor([1.0, 1.0]))
    >>> torch.linalg.norm(dora.weight, dim=1).round(decimals=4).tolist()  # DoRA: row norms = magnitude
    [1.0, 1.0]
    """
    delta = LowRankDelta(B, A, float(scale))
    updated = base + delta.dense()
    if magnitude is None:
        return TunedMatrix(updated, delta)
    weight_norm = torch.linalg.norm(updated, dim=1).detach()
    dora_factor = (magnitude / weight_norm).view(-1, 1)
    return TunedMatrix(dora_factor * updated, None)


def merge_param_lora(
    base: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float,
    expert: int,
    experts: int,
    rows: tuple[int, int] | None = None,
) -> TunedMatrix:
    """One expert of a LoRA on a raw parameter merged as PEFT's ``merge_and_unload()`` does.

    PEFT 0.21's ``ParamWrapper`` (``peft/tuners/lora/layer.py``: ``update_layer``,
    ``get_delta_weight``) keeps one ``lora_A`` of ``(r * E) x in`` and one ``lora_B`` of
    ``out x (r * E)`` for a parameter of ``E`` experts; expert ``e``'s update is
    ``scale * B_e @ A_e`` in the ``out x in`` orientation of the forward pass, with
    ``A_e = A.reshape(E, r, in)[e]`` (rows ``e*r .. e*r+r-1``) and
    ``B_e = B.reshape(out, r, E)[:, :, e]`` (columns ``e, e+E, e+2E, ...``); PEFT's
    einsum writes it to ``[E, out, in]`` or, for ``is_transposed`` experts, ``[E, in, out]``.
    A 2-D parameter is ``E = 1``: plain LoRA. ``rows`` selects the rows of the update
    that belong to ``base`` when the base stores the expert split (Mixtral's ``w1``/``w3``
    concatenated into ``gate_up_proj`` by transformers' conversion mapping).

    ``base`` is the float32 ``out x in`` weight (or its ``rows``).
    """
    rank = A.shape[0] // experts
    A_e = A.reshape(experts, rank, A.shape[-1])[expert]
    B_e = B.reshape(B.shape[0], rank, experts)[:, :, expert]
    if rows is not None:
        B_e = B_e[rows[0] : rows[1]]
    return merge_lora(base, B_e.contiguous(), A_e.contiguous(), scale)


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
        naming: Callable[[list[str], Iterable[str]], dict[str, str]] | None = None,
    ) -> None:
        self.label = label
        self.root = root
        self.settings = settings
        self.modules = modules
        self.format = format
        #: ``naming(base_names, module_names) -> {base_name: module}`` for a format whose module
        #: names are not module paths (kohya); ``None``: module paths, matched by pairing.
        self.naming = naming
        self.ignored = ignored or []
        self._tensors = dict(tensors)
        self._state = state
        self._check_not_zero()

    def __repr__(self) -> str:
        return f"LoraAdapter({self.label!r}, {self.format}, {len(self.modules)} modules)"

    @property
    def config(self) -> dict:
        """The adapter's settings as plain JSON-able data (:meth:`LoraSettings.summary`)."""
        return self.settings.summary()

    def tensor_dtypes(self) -> dict[str, torch.dtype]:
        """Every adapter tensor's stored dtype, by key, from the file header (nothing is read)."""
        return {key: info.dtype for key, info in self._tensors.items()}

    def load(self, key: str) -> torch.Tensor:
        """One adapter tensor, as float32."""
        info = self._tensors[key]
        tensor = self._state[key] if self._state is not None else load_safetensors_tensor(info.file, key)
        return tensor.to(torch.float32)

    def unmatched_name(self, module: str) -> str:
        """How a module that matches no base tensor is listed in ``unmatched``."""
        return module if self.naming is not None else f"{module}.weight"

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
        """The ``out x in`` shape of this module's update in the plan's orientation.

        For embeddings the stored ``vocab x dim``; ``None`` for a pure replacement.
        """
        if not module.has_factors:
            return None
        (out_dim, _), (_, in_dim) = self.factor_shapes(module)
        return (in_dim, out_dim) if module.layer_type == "embedding" else (out_dim, in_dim)

    def replacement_shape(self, module: AdapterModule) -> tuple[int, ...] | None:
        """The stored shape of this module's replacement weight, or ``None`` when it has none."""
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

    def tuned_param(
        self,
        module: AdapterModule,
        base: torch.Tensor,
        *,
        scale: float,
        expert: int,
        experts: int,
        rows: tuple[int, int] | None = None,
    ) -> TunedMatrix:
        """One expert slice of a raw-parameter LoRA (:func:`merge_param_lora`) applied to ``base``."""
        assert module.A is not None and module.B is not None
        return merge_param_lora(base, self.load(module.A), self.load(module.B), scale, expert, experts, rows)

    def param_digest(self, module: AdapterModule, base_digest: str, stored: StoredDigest, rule: str) -> str:
        """A digest of what :meth:`tuned_param` returns (``rule`` names scale, expert, rows)."""
        tensors = [stored(self._tensors[key].file, key, lambda key=key: self.load(key)) for key in (module.A, module.B)]
        return derived_digest("lora-param-merged", rule, base_digest, *tensors)

    def _check_not_zero(self) -> None:
        """Refuse an adapter whose every update is exactly zero (saved before training)."""
        factored = [m for m in self.modules.values() if m.has_factors]
        if not factored or any(m.magnitude or m.replacement for m in self.modules.values()):
            return
        down_name, up_name = ("lora_down", "lora_up") if self.format == "kohya" else ("lora_A", "lora_B")
        zero_name = up_name
        for module in factored:
            B, A = self.load(module.B), self.load(module.A)
            if torch.count_nonzero(B) and torch.count_nonzero(A):
                return
            if not torch.count_nonzero(A):
                zero_name = down_name
        raise InputError(
            self.root,
            f"the adapter's update is zero: {zero_name} is all zeros in every module, was it saved before training?",
        )

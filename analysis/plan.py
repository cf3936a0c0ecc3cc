"""What will be compared: the contract between loading and the maths.

Loading (``sources``, ``adapters``, ``pairing``) turns "a base and a fine-tune" into a
:class:`ComparisonPlan`: the list of matrices to analyse, each able to produce its
base and tuned weight as float32 ``out x in`` tensors on demand, plus everything that
could *not* be paired. The pipeline only ever iterates ``plan.matrices``; it never
needs to know about file formats, adapters or architectures.

Orientation: every tensor handed out here is ``out x in`` the way ``torch.nn.Linear``
stores it; GPT-2 ``Conv1D`` weights are transposed by the loader, never by callers.
Dtype: float32 (bf16/fp16 are upcast by the loader).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from analysis.errors import InputError
from analysis.identity import IdentifiedMatrix, MatrixId


@dataclass(frozen=True)
class LowRankDelta:
    """A rank-``r`` update ``dW = scale * B @ A`` in ``out x in`` orientation.

    ``B`` is ``out x r`` and ``A`` is ``r x in`` (float32). PEFT's
    ``LoraLayer.get_delta_weight`` is the reference for this rule.
    """

    B: torch.Tensor
    A: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        """``r``: the number of rows of ``A`` (columns of ``B``)."""
        return int(self.A.shape[0])

    def dense(self) -> torch.Tensor:
        """The ``out x in`` update as a dense matrix (for tests and small matrices)."""
        return self.scale * (self.B @ self.A)


@dataclass(frozen=True)
class TunedMatrix:
    """The fine-tuned weight of one matrix.

    ``weight`` is the tuned ``out x in`` float32 weight. ``low_rank`` is set when the
    update ``weight - W_base`` is known exactly in factored form (a plain or rsLoRA
    adapter, not DoRA or a full replacement), so its spectrum can be computed from the
    factors without the dense product.
    """

    weight: torch.Tensor
    low_rank: LowRankDelta | None = None


#: ``stored_digest(file, tensor_name, load) -> str``: the content digest
#: (:func:`analysis.cache.tensor_digest`) of a tensor as stored in ``file``, looked up in
#: the pipeline's fingerprint index; ``load()`` reads the stored tensor when it is unknown.
StoredDigest = Callable[[Path, str, Callable[[], torch.Tensor]], str]


@dataclass(frozen=True)
class MatrixPlan(IdentifiedMatrix):
    """One base/tuned matrix pair to analyse: its :class:`MatrixId` and how to load it.

    ``digests`` (optional) names the content of the pair without loading it: called with
    a :data:`StoredDigest`, it returns digests of the base and the tuned matrix *as
    ``load_base``/``load_tuned`` hand them out* (equal digests must mean equal matrices),
    built from the digests of the stored tensors they are made of (for an adapter: the
    base's plus the factors'). The pipeline then finds a cached result without reading a
    single weight. ``None``: the pipeline loads both matrices and hashes them.
    """

    id: MatrixId
    load_base: Callable[[], torch.Tensor]
    load_tuned: Callable[[], TunedMatrix]
    adapter_rank: int | None = None
    digests: Callable[[StoredDigest], tuple[str, str]] | None = None


@dataclass(frozen=True)
class ShapeMismatch:
    """A tensor both checkpoints hold with different shapes (listed, never analysed)."""

    name: str
    base_shape: tuple[int, ...]
    tuned_shape: tuple[int, ...]


@dataclass
class ComparisonPlan:
    """Everything the loader understood about one base/fine-tune pair.

    ``summary`` is shown to the user *before* any heavy work runs: for example
    ``{"architecture": "BertModel", "model_type": "bert", "adapter": {"peft_type":
    "LORA", "r": 8, "lora_alpha": 16, "use_rslora": False, "use_dora": False,
    "target_modules": [...]}}``. ``unmatched`` lists tensor names present in only one
    of the two (prefixed neither way: the name as it appears where it exists), and
    ``shape_mismatches`` the names whose shapes disagree. Neither is ever analysed.
    """

    base_label: str
    tuned_label: str
    kind: Literal["full", "adapter"]
    matrices: list[MatrixPlan]
    unmatched: list[str] = field(default_factory=list)
    shape_mismatches: list[ShapeMismatch] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    #: Every base tensor that is not analysed, as ``{"name": ..., "reason": ...}``.
    skipped: list[dict] = field(default_factory=list)
    #: The opened base and fine-tune (``WeightSource`` each) of a full fine-tune, for what is
    #: counted beyond the analysed matrices (:mod:`analysis.model_sparsity`); ``None`` otherwise.
    sources: tuple | None = field(default=None, repr=False, compare=False)


def require_matrices(plan: ComparisonPlan) -> ComparisonPlan:
    """Return ``plan``, or refuse a pair that shares no analysable matrix.

    An :class:`~analysis.errors.InputError` when base and fine-tune have no matrix (no shape)
    in common: an empty report would look like a result.
    """
    if not plan.matrices:
        raise InputError(
            plan.tuned_label,
            f"has no weight matrix in common with the base {plan.base_label} "
            f"({len(plan.shape_mismatches)} of the same name with other shapes, {len(plan.unmatched)} on one side "
            "only): is it a fine-tune of another model?",
        )
    return plan

"""Which matrix of a model: one :class:`MatrixId` value, carried by plan, result and mitigation.

Plain data (no torch), so results that carry it stay cheap to keep in a session.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MatrixId:
    """Which matrix of a model: where it lives and what it is called.

    Built once when a checkpoint is paired (:mod:`analysis.pairing`) and carried unchanged by
    the plan, the result and the mitigation of the matrix.

    Parameters
    ----------
    name : str
        The tensor name in the *base* checkpoint (shared by every expert of a fused 3-D
        expert tensor).
    layer : int or None
        The block index; ``None`` for matrices outside numbered blocks (present only when
        non-block matrices were requested).
    module : str
        The kind: ``query``, ``key``, ``value``, ``qkv`` (fused), ``attn_out``, ``gate``,
        ``up``, ``gate_up`` (fused), ``down``, ``mlp_in``, ``mlp_out``, ``router``, or the
        last name component when unknown.
    shape : tuple of int
        ``(out, in)`` after any transposition.
    stack : str or None, default None
        ``encoder``, ``decoder``, ``vision``, ``language``, ...; ``None`` for a one-stack model.
    expert : int or None, default None
        The mixture-of-experts expert index; ``None`` outside expert weights.
    storage, tuned_storage : str or None, default None
        How the base's and the fine-tune's matrix are stored (``bf16``, ``fp8 e4m3, 128x128
        blocks``, ``mxfp4``, ``nf4``; :mod:`analysis.quant`); ``tuned_storage`` is ``None``
        for an adapter. Quantised weights are analysed dequantised to float32, so an update
        between different storages includes the dequantisation error.

    Examples
    --------
    >>> MatrixId("model.layers.3.mlp.experts.down_proj", 3, "down", (64, 128), expert=5).key
    'model.layers.3.mlp.experts.down_proj#5'
    """

    name: str
    layer: int | None
    module: str
    shape: tuple[int, int]
    stack: str | None = None
    expert: int | None = None
    storage: str | None = None
    tuned_storage: str | None = None

    @property
    def key(self) -> str:
        """The string that picks this matrix of a model (pickers, the URL, clicks, CSV, exports).

        The tensor name, plus ``#<expert>`` for a mixture-of-experts slice: a fused 3-D expert
        tensor holds every expert under one name, so the name alone is not unique.
        """
        return self.name if self.expert is None else f"{self.name}#{self.expert}"

    @property
    def identity(self) -> tuple[str | None, int | None, str, int | None]:
        """``(stack, layer, module, expert)``: where the matrix lives, unique within a model."""
        return (self.stack, self.layer, self.module, self.expert)


class IdentifiedMatrix:
    """The fields of a :class:`MatrixId`, read through the ``id`` an object carries."""

    id: MatrixId

    @property
    def name(self) -> str:
        """:attr:`MatrixId.name`."""
        return self.id.name

    @property
    def layer(self) -> int | None:
        """:attr:`MatrixId.layer`."""
        return self.id.layer

    @property
    def module(self) -> str:
        """:attr:`MatrixId.module`."""
        return self.id.module

    @property
    def shape(self) -> tuple[int, int]:
        """:attr:`MatrixId.shape`."""
        return self.id.shape

    @property
    def stack(self) -> str | None:
        """:attr:`MatrixId.stack`."""
        return self.id.stack

    @property
    def expert(self) -> int | None:
        """:attr:`MatrixId.expert`."""
        return self.id.expert

    @property
    def key(self) -> str:
        """:attr:`MatrixId.key`."""
        return self.id.key

    @property
    def identity(self) -> tuple[str | None, int | None, str, int | None]:
        """:attr:`MatrixId.identity`."""
        return self.id.identity

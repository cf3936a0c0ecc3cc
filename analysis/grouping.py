"""Which matrices of a plan are analysed together (:func:`group_matrices`).

The ``eig`` method decomposes same-shaped small matrices in batches; a mixture-of-experts
layer's experts are such matrices. Grouping never changes a pair's bytes.
"""

from __future__ import annotations

from collections.abc import Sequence

from analysis.linalg import BATCH_MAX_ORDER
from analysis.plan import MatrixPlan
from analysis.scheduler import working_bytes

#: Pairs the ``eig`` method analyses together at most (see :func:`group_matrices`).
MAX_GROUP = 16


def group_matrices(
    matrices: Sequence[MatrixPlan], method: str, max_bytes: int, device_type: str = "cpu"
) -> list[tuple[int, ...]]:
    """The plan's matrices (their indices) in the groups they are analysed in.

    Each group is in plan order and the groups in the order of their first matrix.
    For the ``eig`` method (the CUDA default), same-shaped matrices of one layer of one
    stack and of order up to :data:`~analysis.linalg.BATCH_MAX_ORDER` (a mixture-of-experts
    layer's experts, which a per-expert checkpoint lists as expert 0's down, gate and up,
    then expert 1's ...) form groups of up to :data:`MAX_GROUP` pairs whose working memory
    (:func:`working_bytes`) fits ``max_bytes``; their decompositions then run in batched
    calls (``_group_spectra`` in :mod:`analysis.pipeline`). Every other matrix, and every
    matrix of the other methods, is a group of its own. Which pairs share a group does not
    change any pair's bytes (:func:`analysis.linalg._batched_gram_spectra`), and results
    are still yielded in plan order (:func:`~analysis.pipeline.analyse_plan` holds at most
    one layer's results back).
    """
    groups: list[list[int]] = []
    filling: dict[tuple, tuple[list[int], int]] = {}  # (stack, layer, shape) -> (group, bytes)
    for index, matrix in enumerate(matrices):
        if method != "eig" or min(matrix.shape) > BATCH_MAX_ORDER:
            groups.append([index])
            continue
        key = (matrix.stack, matrix.layer, matrix.shape)
        size = working_bytes(matrix.shape, method, device_type)
        group, held = filling.get(key, (None, 0))
        if group is None or len(group) >= MAX_GROUP or held + size > max_bytes:
            group, held = [], 0
            groups.append(group)
        group.append(index)
        filling[key] = (group, held + size)
    return [tuple(group) for group in groups]

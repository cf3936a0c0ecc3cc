"""Linear algebra on the best available device.

Every decomposition here is a thin SVD (``full_matrices=False``) with singular values in
descending order, computed in float32 or better (docs/metrics.md). Callers pass ``out x in``
tensors; results stay on the device they were computed on, so follow-up products stay
there too.

A :class:`Spectrum` holds *all* singular values and hands out singular vectors on
demand, because the metrics need different amounts of each: the base weight needs every
left vector (intruder scores maximise over all of them), the tuned weight only its top
``max_top_k``, the update only its top few (subspace similarity, amplification).
:func:`decompose` computes one by one of these methods (:data:`METHODS`):

``gram`` (the CPU default)
    The eigendecomposition of the smaller Gram matrix (``W W^T`` when ``m <= n``, else
    ``W^T W``), formed and diagonalised in float64. Its eigenvalues are ``s_i^2`` and its
    eigenvectors the singular vectors of that side; the other side's top ``k`` vectors
    are ``W^T U_k / s_k`` (or ``W V_k / s_k``), derived only for the ``k`` asked for.
    Squaring costs nothing that matters in float64: singular values are resolved down to
    about ``1e-8 s_1`` (a float32 SVD: about ``6e-8 s_1``) and vectors to
    ``eps64 s_1^2 / gap(s^2)`` (a float32 SVD: ``eps32 s_1 / gap(s)``), i.e. better than
    the float32 SVD the papers use. On the benchmark CPU it costs what ``gesdd`` costs for
    a square matrix and 1.4-3.7x less for a rectangular one (``benchmarks/README.md``).
    Options trade what is not needed. On the CPU, when only the top vectors will be asked
    for (the tuned weight's top 100 at any size; the update's top few below
    :data:`SUBSPACE_MIN_SIZE`), every value and just those vectors come from LAPACK's
    tridiagonal routines (:mod:`analysis.lapack`, float64, vectors computed when first
    asked for). Otherwise: float32 vectors for the update (its values stay float64), and,
    where the tridiagonal routines are unavailable or their checks fail, the top vectors of
    a large tuned weight from a values-only solve plus seeded subspace iteration
    (:func:`top_eigenvectors`).
``eig`` (the CUDA default)
    The ``gram`` method in torch alone, so the same code runs on any device (and is
    tested on the CPU against float64 references): the Gram matrix by ``torch.mm`` in
    float64, every singular value from ``eigvalsh``, the tuned weight's top vectors by
    subspace iteration seeded from the cached base (and an adapter's ``B``), checked by
    residual with a full ``eigh`` as fallback, and a full set of vectors (``eigh``) only
    for a base that is not cached. On an H200 a float64 ``eigh`` of a 4096 Gram matrix
    takes about what one ``gesvda`` does (108 vs 114 ms, issue 13), but the engine no
    longer computes full ``U`` and ``V`` of the base, the tuned weight and the update.
    Same-shaped matrices of order up to :data:`BATCH_MAX_ORDER` passed together (the
    experts of a mixture-of-experts layer) are diagonalised in batched calls
    (:func:`_batched_gram_spectra`), each getting the bits it gets alone.
``gesvda``
    cuSOLVER's ``gesvdaStridedBatched`` through ``torch.linalg.svd(driver="gesvda")``,
    in float32, batched over same-shaped matrices; wide matrices are transposed first
    (the routine wants ``m >= n``). ``tests/test_cuda.py`` holds it to a float64
    reference.
``svd``
    ``torch.linalg.svd`` with the default driver, in float32: what the papers' released
    code calls; the reference the benchmark compares against.

``WSE_SVD_METHOD`` overrides the default (for benchmarks and for debugging a device).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch

from analysis import lapack
from analysis.config import env_choice
from analysis.errors import InputError
from analysis.plan import LowRankDelta

METHODS = ("gram", "eig", "gesvda", "svd")

#: Singular values below ``s_1`` times this are round-off for the ``gram`` method (it
#: resolves about ``1e-8 s_1``); their derived singular vectors would be noise divided by
#: noise, so they are completed to an orthonormal set instead (see :meth:`Spectrum.left`).
NULL_SPACE_RELATIVE = 1e-6


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> CUDA when present, else CPU. Asking for CUDA without one is an error."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device", f"{device!r} was requested but CUDA is not available on this machine")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise InputError("--device", f"unknown device {device!r}; use auto, cpu or cuda")
    return torch.device(device)


@contextmanager
def full_float32(device: torch.device) -> Iterator[None]:
    """float32 matrix products in full float32 on ``device`` while the block runs.

    A process may have let CUDA multiply float32 in TF32 (``torch.set_float32_matmul_precision
    ("high")``, as Hugging Face's ``Trainer`` does with ``tf32=True``, where the training
    callback runs): 10 mantissa bits, cosines off by about 1e-3, enough to move a tuned
    singular vector across ``eps``. The engine's float32 products mean float32
    (docs/metrics.md); the process's setting is restored afterwards (it is process-wide:
    products of other threads meanwhile are full float32 too). Nothing changes on the CPU,
    which has no TF32.
    """
    if device.type != "cuda":
        yield
        return
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def default_method(device: torch.device) -> str:
    """``$WSE_SVD_METHOD`` if set, else ``eig`` on CUDA and ``gram`` elsewhere."""
    method = env_choice("WSE_SVD_METHOD", "", METHODS)
    return method or ("eig" if device.type == "cuda" else "gram")


class Spectrum:
    """A thin SVD ``W = U diag(S) V^T``: every singular value, vectors on demand.

    ``values`` are all ``min(m, n)`` singular values, descending. :meth:`left` and
    :meth:`right` return the top ``k`` singular vectors of either side as columns. A side
    not given is derived from ``weight`` for only the columns asked for (so a spectrum
    stored without its weight, like a cached base spectrum, offers only the side it has).
    Build one with :func:`decompose`, :func:`low_rank_spectrum` or from stored parts.
    """

    def __init__(
        self,
        values: torch.Tensor,
        *,
        left: torch.Tensor | None = None,
        right: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
        ascending: bool = False,
        provider: tuple[str, Callable[[int], torch.Tensor]] | None = None,
    ) -> None:
        if left is None and right is None and provider is None:
            raise ValueError("a Spectrum needs the singular vectors of at least one side")
        self.values = values
        self._left = left
        self._right = right
        self._weight = weight
        # (side, top_k(k)): that side's top k vectors computed when first asked for (see
        # _tridiagonal_spectrum), so a caller that needs 64 of 384 never pays for 384.
        self._provider = provider
        # eigh returns eigenvectors in ascending order; they are reversed only for the
        # columns asked for (the top 100 of 4096, say), not copied whole.
        self._ascending = ascending
        self._derived: dict[str, torch.Tensor] = {}

    @property
    def rank_bound(self) -> int:
        """``min(m, n)``: how many singular values and vectors there are."""
        return int(self.values.shape[0])

    @property
    def native_side(self) -> str:
        """The side whose vectors this spectrum holds or provides itself (``left`` or ``right``).

        The other side's are derived from the weight, in float32 for the top vectors.
        """
        if self._left is not None:
            return "left"
        return "right" if self._right is not None else self._provider[0]

    def left(self, k: int | None = None) -> torch.Tensor:
        """The top ``k`` left singular vectors (``m x k``; every one for ``None``)."""
        return self._side("left", k)

    def right(self, k: int | None = None) -> torch.Tensor:
        """The top ``k`` right singular vectors (``n x k``; every one for ``None``)."""
        return self._side("right", k)

    def _side(self, side: str, k: int | None) -> torch.Tensor:
        k = self.rank_bound if k is None else min(k, self.rank_bound)
        known = self._left if side == "left" else self._right
        if known is None and self._provider is not None and self._provider[0] == side:
            provided = self._derived.get(side)
            if provided is None or provided.shape[1] < k:
                provided = self._provider[1](k)
                self._derived[side] = provided
            return provided[:, :k]
        if known is not None:
            if known.shape[1] < k:
                raise ValueError(f"only the top {known.shape[1]} {side} singular vectors were computed, not {k}")
            return known[:, known.shape[1] - k :].flip(1) if self._ascending else known[:, :k]
        derived = self._derived.get(side)
        if derived is None or derived.shape[1] < k:
            derived = self._derive(side, k)
            self._derived[side] = derived
        return derived[:, :k]

    def _derive(self, side: str, k: int) -> torch.Tensor:
        """``W V_k / s_k`` (left) or ``W^T U_k / s_k`` (right), unit columns.

        In float32 for the top vectors (the error grows like ``eps s_1 / s_i``, harmless
        while ``s_i`` is large), in float64 when *every* vector is asked for, as for the
        base spectrum, whose smallest ones count too. Columns whose singular value is
        round-off (below ``s_1`` times :data:`NULL_SPACE_RELATIVE`) have no direction of
        their own: they are completed to an orthonormal set by a QR factorisation, as any
        SVD fills a null space.
        """
        if self._weight is None:
            raise ValueError(f"this spectrum keeps no weight, so its {side} singular vectors cannot be derived")
        dtype = torch.float64 if k == self.rank_bound else torch.float32
        w = self._weight.to(dtype)
        other = self._side("right" if side == "left" else "left", k).to(dtype)
        product = (w @ other) if side == "left" else (w.transpose(0, 1) @ other)
        values = self.values[:k].to(product.dtype)
        floor = float(self.values[0]) * NULL_SPACE_RELATIVE if self.rank_bound else 0.0
        resolved = values > floor
        vectors = product / torch.where(resolved, values, torch.ones_like(values))
        if not bool(resolved.all()):
            q, r = torch.linalg.qr(product)
            q = q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(q.dtype)
            vectors[:, ~resolved] = q[:, ~resolved]
        return vectors


#: Starting vectors for subspace iteration, or a function that makes them when needed.
Seeds = torch.Tensor | Callable[[], torch.Tensor]


def decompose(
    weight: torch.Tensor,
    device: torch.device,
    method: str | None = None,
    *,
    vectors: torch.dtype = torch.float64,
    top: int | None = None,
    seeds: Seeds | None = None,
) -> Spectrum:
    """The thin SVD of one ``out x in`` matrix as a :class:`Spectrum` (see the module docs).

    ``vectors=torch.float32`` says float32 precision is enough for the vectors (only the
    span of the top vectors matters: the update's amplification factor and subspace
    similarity, not intruder scores), and that typically only the top few will be asked
    for. On the CPU below :data:`SUBSPACE_MIN_SIZE` the ``gram`` method then computes every
    value and, when asked, just the top vectors (float64, tridiagonal path); otherwise the
    vectors come from a float32 eigendecomposition of the (float64) Gram matrix while the
    values still come from a float64 one: half the cost for large matrices, vectors good
    to ``eps32 s_1^2 / gap(s^2)``.

    ``top=k`` promises that only the top ``k`` vectors will be asked for. On the CPU (and
    ``k`` at most half the spectrum) they come from the tridiagonal path at once.
    Otherwise, when ``k`` is a small part of a spectrum of :data:`SUBSPACE_MIN_SIZE` or
    more, the ``gram`` method computes every value with a values-only float64 eigensolver
    and just those vectors by subspace iteration (:func:`top_eigenvectors`), started from
    ``seeds`` (left-side vectors expected to lie near the wanted ones, e.g. the base
    weight's top singular vectors for a fine-tune; a function returning them is called
    only if they are used), and checked against the exact values; it falls back to the
    full decomposition when the check fails.
    """
    return decompose_many([weight], device, method, vectors=vectors, top=top, seeds=[seeds])[0]


def decompose_many(
    weights: Sequence[torch.Tensor],
    device: torch.device,
    method: str | None = None,
    *,
    vectors: torch.dtype = torch.float64,
    top: int | None = None,
    seeds: Sequence[Seeds | None] | None = None,
) -> list[Spectrum]:
    """:func:`decompose` for several matrices (``seeds``: one entry per matrix, or ``None``).

    ``gesvda`` runs same-shaped matrices as one batch; ``eig`` diagonalises the Gram
    matrices of same-shaped matrices of order up to :data:`BATCH_MAX_ORDER` in batched
    calls (:func:`_batched_gram_spectra`), one chunk per :data:`BATCH_MAX_BYTES`.
    """
    method = method or default_method(device)
    if seeds is not None and len(seeds) != len(weights):
        raise ValueError(f"{len(seeds)} seeds for {len(weights)} matrices")
    if method in ("gram", "eig"):
        spectra: list[Spectrum | None] = [None] * len(weights)
        if method == "eig":
            for chunk in _batches([tuple(w.shape) for w in weights], top):
                found = _batched_gram_spectra([weights[i].to(device) for i in chunk], vectors)
                for i, spectrum in zip(chunk, found, strict=True):
                    spectra[i] = spectrum
        native = method == "gram"  # NumPy's syrk and SciPy's tridiagonal routines on the CPU
        return [
            s
            if s is not None
            else _gram_spectrum(w.to(device), vectors, top, None if seeds is None else seeds[i], native=native)
            for i, (w, s) in enumerate(zip(weights, spectra, strict=True))
        ]
    if method == "svd":
        return [_svd_spectrum(w.to(device)) for w in weights]
    if method == "gesvda":
        if device.type != "cuda":
            raise ValueError("the gesvda SVD driver exists only on CUDA devices")
        shapes = {tuple(w.shape) for w in weights}
        if len(shapes) != 1:
            return [s for w in weights for s in decompose_many([w], device, method)]
        return _gesvda_spectra(weights, device)
    raise ValueError(f"unknown SVD method {method!r}; use one of {METHODS}")


#: The ``eig`` method diagonalises the Gram matrices of same-shaped matrices whose smaller
#: side is at most this in batched calls (a mixture-of-experts layer: 128 experts of
#: 768 x 2048 each; issue 13). Larger ones go one by one: their top vectors may come from
#: seeded subspace iteration (:data:`SUBSPACE_MIN_SIZE`), and one of them keeps a GPU busy.
BATCH_MAX_ORDER = 2048
#: The Gram matrices of one batched call hold at most this many bytes (float64); a larger
#: group is split into chunks of as many matrices as fit.
BATCH_MAX_BYTES = 512 * 1024**2


def _batches(shapes: Sequence[tuple[int, int]], top: int | None) -> list[list[int]]:
    """Indices of the matrices the ``eig`` method decomposes together.

    Same-shaped ones of order up to :data:`BATCH_MAX_ORDER` whose ``top`` vectors do not
    come from subspace iteration, in chunks that fit :data:`BATCH_MAX_BYTES`, in the order
    given. A matrix of its own shape forms a batch of one (padded, see
    :func:`_batched_gram_spectra`).
    """
    groups: dict[tuple[int, int], list[int]] = {}
    for i, shape in enumerate(shapes):
        if min(shape) <= BATCH_MAX_ORDER and not _by_subspace_iteration(min(shape), top):
            groups.setdefault(shape, []).append(i)
    chunks = []
    for shape, indices in groups.items():
        per_chunk = max(1, BATCH_MAX_BYTES // (8 * min(shape) ** 2))
        chunks += [indices[start : start + per_chunk] for start in range(0, len(indices), per_chunk)]
    return chunks


def _torch_gram(w: torch.Tensor) -> torch.Tensor:
    """The smaller Gram matrix by ``torch.mm`` (the ``eig`` method, any device)."""
    return w @ w.transpose(0, 1) if w.shape[0] <= w.shape[1] else w.transpose(0, 1) @ w


def _batched_gram_spectra(weights: Sequence[torch.Tensor], vectors: torch.dtype) -> list[Spectrum]:
    """The ``eig`` method's full decomposition of same-shaped matrices, diagonalised together.

    What :func:`_gram_spectrum` computes for a matrix of this size (every value from a
    float64 eigensolver; every vector of the Gram side in ``vectors`` precision), with one
    ``eigh`` call for the whole batch instead of one per matrix. Each Gram matrix is formed
    on its own (``torch.mm``, as for a single matrix) and the batch always holds at least
    two (a lone matrix is joined by a zero one), so a matrix is diagonalised by the same
    batched routine whatever else is in its batch (torch chooses cuSOLVER's routine by the
    batch count and the order). A batched routine that decomposes each matrix of its batch
    on its own then gives a matrix the same bits in any batch, so a pair's bytes do not
    depend on which pairs it was analysed with: ``tests/test_eig_path.py`` checks this bit
    for bit on the CPU, ``tests/test_cuda.py`` on cuSOLVER.
    """
    w64 = [w.to(torch.float64) for w in weights]
    grams = [_torch_gram(w) for w in w64]
    del w64
    if len(grams) == 1:
        grams.append(torch.zeros_like(grams[0]))
    stacked = torch.stack(grams)
    del grams
    eigenvalues, eigenvectors = _eigh(stacked, vectors)
    del stacked
    values = eigenvalues.flip(-1).clamp_min(0).sqrt()
    side = "left" if weights[0].shape[0] <= weights[0].shape[1] else "right"
    return [
        # Values are cloned: a view would keep (and a cache entry would store) the batch's.
        Spectrum(values[i].clone(), **{side: eigenvectors[i]}, weight=w, ascending=True)
        for i, w in enumerate(weights)
    ]


#: ``top`` vectors are found by subspace iteration only when the spectrum has at least
#: this many values and ``top`` is at most this fraction of them. Measured on the 2-core
#: CPU for the top 100 of a fine-tune seeded from its base: 1.5x slower than a full
#: float64 eigendecomposition at 2048, 2x faster at 4096 (benchmarks/README.md).
SUBSPACE_MIN_SIZE = 3072
SUBSPACE_MAX_FRACTION = 0.125


def _eigh(gram: torch.Tensor, vectors: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Ascending eigenvalues (float64) and eigenvectors (``vectors`` precision) of float64 Gram matrices.

    One Gram matrix or a batch of them: a float32 solve for the vectors, where float32 is
    enough, beside a float64 values-only one.
    """
    if vectors == torch.float64:
        return torch.linalg.eigh(gram)
    return torch.linalg.eigvalsh(gram), torch.linalg.eigh(gram.to(vectors)).eigenvectors


def _by_subspace_iteration(size: int, top: int | None) -> bool:
    """Whether a Gram matrix of this size gets its top vectors by subspace iteration (:func:`top_eigenvectors`).

    Otherwise they come from a full eigendecomposition.
    """
    return top is not None and size >= SUBSPACE_MIN_SIZE and top <= SUBSPACE_MAX_FRACTION * size


def _gram_spectrum(
    weight: torch.Tensor,
    vectors: torch.dtype,
    top: int | None = None,
    seeds: Seeds | None = None,
    *,
    native: bool = True,
) -> Spectrum:
    """``native=False``: torch calls only (the ``eig`` method), whatever the device."""
    w = weight.to(torch.float64)
    m, n = w.shape
    wide = m <= n
    gram = gram_matrix(w) if native else _torch_gram(w)
    size = gram.shape[0]
    # The update's vectors (vectors=float32, how many unknown: rank90 of a dense update may
    # be most of a large spectrum) go this way only below SUBSPACE_MIN_SIZE; above, the
    # float32 eigendecomposition below is cheaper (measured on the 7B slice).
    if (
        native
        and gram.device.type == "cpu"
        and (
            (top is not None and top <= TRIDIAGONAL_MAX_FRACTION * size)
            or (vectors != torch.float64 and size < SUBSPACE_MIN_SIZE)
        )
    ):
        spectrum = _tridiagonal_spectrum(gram, weight, "left" if wide else "right", top)
        if spectrum is not None:
            return spectrum
    if _by_subspace_iteration(size, top):
        eigenvalues = torch.linalg.eigvalsh(gram).flip(0)
        start = None
        if seeds is not None:
            start = (seeds() if callable(seeds) else seeds).to(gram.device, torch.float64)
            start = start if wide else w.transpose(0, 1) @ start
        found = top_eigenvectors(gram, eigenvalues, top, start)
        if found is not None:
            values = eigenvalues.clamp_min(0).sqrt()
            side = {"left" if wide else "right": found}
            return Spectrum(values, **side, weight=weight)
    del w
    eigenvalues, eigenvectors = _eigh(gram, vectors)
    del gram
    values = eigenvalues.flip(0).clamp_min(0).sqrt()
    side = {"left" if wide else "right": eigenvectors}
    return Spectrum(values, **side, weight=weight, ascending=True)


def gram_matrix(w: torch.Tensor) -> torch.Tensor:
    """The smaller Gram matrix of ``w``: ``w w^T`` when ``m <= n``, else ``w^T w``.

    On the CPU through NumPy, whose ``a @ a.T`` is BLAS ``syrk`` (one triangle, half the
    flops of the ``gemm`` that ``torch.mm`` runs): in float64 on the benchmark machine
    0.5-0.6x torch's time at every size measured, 384 x 384 to 4096 x 11008, on one
    thread or two (benchmarks/README.md). Elsewhere ``torch.mm``.
    """
    wide = w.shape[0] <= w.shape[1]
    if w.device.type == "cpu" and w.dtype in (torch.float32, torch.float64):
        a = w.numpy()
        return torch.from_numpy(a @ a.T if wide else a.T @ a)
    return w @ w.transpose(0, 1) if wide else w.transpose(0, 1) @ w


#: On the CPU, a Gram matrix of which at most this fraction of the vectors is wanted goes
#: through :class:`analysis.lapack.Tridiagonal` (every value, only the top vectors): for
#: the top 100, 1.5x faster than ``eigh`` at 384, 2.9x at 1024, 3.2x at 2048, and at 4096
#: 2.5x faster than values plus seeded subspace iteration (benchmarks/README.md), which
#: remains for CUDA tensors and when LAPACK's checks fail.
TRIDIAGONAL_MAX_FRACTION = 0.5


def _tridiagonal_spectrum(gram: torch.Tensor, weight: torch.Tensor, side: str, top: int | None) -> Spectrum | None:
    """Every singular value now, the Gram side's top vectors when asked for (float64).

    ``top`` vectors are computed at once (``None`` is returned if LAPACK's checks fail, and
    the caller decomposes fully); more asked for later also come from the tridiagonal
    form, or from a full ``eigh`` should its checks fail then.
    """
    if not lapack.available():
        return None
    try:
        reduced = lapack.Tridiagonal(gram.numpy())
    except np.linalg.LinAlgError:
        return None
    if top is not None and reduced.top(top) is None:
        return None

    def provide(k: int) -> torch.Tensor:
        # Inverse iteration for most of a large spectrum (the update of a dense fine-tune,
        # whose rank90 may be most of it) costs more than a full eigendecomposition.
        found = reduced.top(k) if k <= TRIDIAGONAL_MAX_FRACTION * reduced.n else None
        if found is None:  # or a request that fails LAPACK's checks: decompose fully
            return torch.linalg.eigh(gram).eigenvectors.flip(1)[:, :k]
        return torch.from_numpy(found)

    values = torch.from_numpy(reduced.values).clamp_min(0).sqrt()
    return Spectrum(values, weight=weight, provider=(side, provide))


def top_eigenvectors(
    gram: torch.Tensor,
    eigenvalues: torch.Tensor,
    k: int,
    start: torch.Tensor | None = None,
    *,
    tolerance: float = 1e-6,
    max_iterations: int = 200,
) -> torch.Tensor | None:
    """The top ``k`` eigenvectors of a symmetric PSD matrix by subspace iteration, or ``None``.

    Block power iteration on ``p = 2k`` vectors (``start``, completed with random ones),
    with a Rayleigh-Ritz step every few iterations. ``eigenvalues`` are the exact ones
    (descending, from a values-only solver); a Ritz pair ``(theta_j, x_j)`` is accepted
    when the a-posteriori bound ``sin angle(x_j, true x_j) <= ||G x_j - theta_j x_j|| /
    gap_j`` (Davis-Kahan; ``gap_j`` the distance from ``theta_j`` to the nearest *other*
    exact eigenvalue) is below ``tolerance`` for every ``j <= k``. Vector ``j`` converges
    like ``(lambda_{p+1} / lambda_j)^iterations``. ``None`` when that has not happened in
    ``max_iterations`` (near-equal eigenvalues among the top ``k``, say): the caller then
    uses a full eigendecomposition.
    """
    size = gram.shape[0]
    p = min(size, 2 * k)
    generator = torch.Generator(device=gram.device).manual_seed(0)
    fill = torch.randn(size, p, generator=generator, dtype=gram.dtype, device=gram.device)
    if start is not None and start.shape[1]:
        used = min(p - k // 2, start.shape[1])  # keep k/2 random columns for what seeds miss
        fill[:, :used] = start[:, :used]
    x = torch.linalg.qr(fill).Q
    scale = float(eigenvalues[0]) if float(eigenvalues[0]) > 0 else 1.0
    others = eigenvalues[: min(size, k + 1)]
    for iteration in range(1, max_iterations + 1):
        x = torch.linalg.qr(gram @ x).Q
        if iteration % 4 and iteration != max_iterations:
            continue
        gx = gram @ x
        theta, z = torch.linalg.eigh(x.transpose(0, 1) @ gx)
        theta, z = theta.flip(0)[:k], z.flip(1)[:, :k]
        ritz = x @ z
        residual = torch.linalg.vector_norm(gx @ z - ritz * theta, dim=0)
        distance = (theta[:, None] - others[None, :]).abs()
        distance[torch.arange(k), torch.arange(k)] = float("inf")  # the eigenvalue it approximates
        gap = distance.min(dim=1).values.clamp_min(1e-300)
        if bool((residual / gap <= tolerance).all()) and bool(((theta - eigenvalues[:k]).abs() <= 1e-9 * scale).all()):
            return ritz
    return None


def _svd_spectrum(weight: torch.Tensor) -> Spectrum:
    w = weight if weight.dtype in (torch.float32, torch.float64) else weight.float()
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    return Spectrum(S, left=U, right=Vh.transpose(-2, -1))


def _gesvda_spectra(weights: Sequence[torch.Tensor], device: torch.device) -> list[Spectrum]:
    batch = torch.stack([w.to(device=device, dtype=torch.float32) for w in weights])
    m, n = batch.shape[-2:]
    wide = m < n
    U, S, Vh = torch.linalg.svd(batch.transpose(-2, -1) if wide else batch, full_matrices=False, driver="gesvda")
    del batch
    V = Vh.transpose(-2, -1)
    if wide:  # svd(W^T) = V S U^T
        U, V = V, U
    return [Spectrum(S[i], left=U[i], right=V[i]) for i in range(len(weights))]


def thin_svd(weight: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``U, S, V`` with ``weight = U diag(S) V^T`` from ``torch.linalg.svd`` (default driver).

    The papers' call, kept as the plain reference; the pipeline uses :func:`decompose`.
    ``V`` is returned un-transposed (``in x r``) so that ``U`` and ``V`` read alike.
    """
    spectrum = _svd_spectrum(weight.to(device=device))
    return spectrum.left(), spectrum.values, spectrum.right()


def low_rank_svd(delta: LowRankDelta, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact thin SVD of ``dW = scale * B @ A`` from its factors, no dense product.

    With ``B = Q_b R_b`` and ``A^T = Q_a R_a`` (reduced QR),
    ``dW = Q_b (scale R_b R_a^T) Q_a^T``; the SVD ``U_m S V_m^T`` of the small
    ``r x r`` core gives ``dW = (Q_b U_m) S (Q_a V_m)^T``. Cost ``O((out + in) r^2)``
    instead of ``O(out * in * min(out, in))``.
    """
    B = delta.B.to(device=device, dtype=torch.float32)
    A = delta.A.to(device=device, dtype=torch.float32)
    Qb, Rb = torch.linalg.qr(B, mode="reduced")
    Qa, Ra = torch.linalg.qr(A.transpose(0, 1), mode="reduced")
    Um, S, Vmh = torch.linalg.svd(delta.scale * (Rb @ Ra.transpose(0, 1)), full_matrices=False)
    return Qb @ Um, S, Qa @ Vmh.transpose(0, 1)


def low_rank_spectrum(delta: LowRankDelta, device: torch.device) -> Spectrum:
    """:func:`low_rank_svd` as a :class:`Spectrum` (``r`` singular values and vectors)."""
    U, S, V = low_rank_svd(delta, device)
    return Spectrum(S, left=U, right=V)

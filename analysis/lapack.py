"""All eigenvalues and only the top eigenvectors of a symmetric matrix, without the GIL.

``torch.linalg.eigh`` (LAPACK ``syevd``) returns every eigenvector; the metrics need every
eigenvalue of a Gram matrix but only its top ``k`` eigenvectors (the tuned weight's top
100, the update's top 64). LAPACK can do exactly that: reduce to tridiagonal form once
(``dsytrd``), take all eigenvalues of the tridiagonal matrix (``dsterf``, ``O(n^2)``), the
top ``k`` eigenvectors by inverse iteration (``dstein``, ``O(nk)``), and transform them back
(``dormtr``'s work, done by MKL's ``dormqr`` through ``torch.ormqr``, 3x faster here). For
the top 100 of a 384 x 384 Gram matrix that is 8.7 ms against 13.4 ms for ``eigh``, of a
2048 x 2048 one 0.47 s against 1.5 s (one thread, benchmarks/README.md): the saving grows
with ``n / k``.

No Python binding offers that combination without holding the GIL (SciPy's ``lapack``
wrappers hold it, which would serialise the pipeline's worker threads), so the routines
are called here through ``ctypes``, which releases the GIL, at the addresses SciPy
publishes for compiled code in ``scipy.linalg.cython_lapack`` (its documented Cython
API, the same pointers Numba calls). Every result is checked (LAPACK's ``info``, a split
tridiagonal matrix, the residuals ``||T z - lambda z||`` and the orthonormality of the
vectors, checked on the tridiagonal matrix ``T`` where they cost ``O(nk)`` and ``O(nk^2)``:
the reduction and the back-transformation are orthogonal, backward-stable Householder
products, so they carry over to the Gram matrix); when a check fails the caller gets
``None`` and uses ``eigh`` instead.
"""

from __future__ import annotations

import ctypes
import functools

import numpy as np
import torch

_INT = ctypes.POINTER(ctypes.c_int)  # a scalar argument, passed by reference
_ARRAY = ctypes.c_void_p  # an array's address (``ndarray.ctypes.data``: cheaper than ``data_as``)
_CHAR = ctypes.c_char_p

#: LAPACK signatures, as in ``scipy/linalg/cython_lapack_signatures.txt``.
_SIGNATURES = {
    "dsytrd": (_CHAR, _INT, _ARRAY, _INT, _ARRAY, _ARRAY, _ARRAY, _ARRAY, _INT, _INT),
    "dsterf": (_INT, _ARRAY, _ARRAY, _INT),
    "dstein": (_INT, _ARRAY, _ARRAY, _INT, _ARRAY, _ARRAY, _ARRAY, _ARRAY, _INT, _ARRAY, _ARRAY, _ARRAY, _INT),
}

#: A residual ``max_j ||T z_j - lambda_j z_j|| / lambda_max`` above this rejects the result
#: (inverse iteration on exact eigenvalues gives ~1e-15).
RESIDUAL_TOLERANCE = 1e-10

#: A departure from orthonormality ``max |Z^T Z - I|`` above this rejects the result
#: (dstein re-orthogonalises eigenvalues closer than 1e-3 ||T||; others are ~1e-13 apart).
ORTHOGONALITY_TOLERANCE = 1e-8

#: Gram matrices of a smaller order run these routines on one thread, whatever the caller
#: allows. Below it the second OpenBLAS thread costs more than it gives: its workers spin
#: between calls while torch's OpenMP team wants the same cores. Measured on the 2-core
#: benchmark machine, top 100 vectors, torch on 2 threads, one BLAS thread against two:
#: 12 vs 62 ms at 384, 108 vs 164 ms at 1024, 751 vs 655 ms at 2048, 7.4 vs 5.0 s at 4096.
THREADED_MIN_ORDER = 2048


def threads_for(order: int, threads: int) -> int:
    """BLAS threads for these routines on an ``order x order`` Gram matrix, at most ``threads``."""
    return threads if order >= THREADED_MIN_ORDER else 1


try:  # imported with the engine (0.2 s), not in the middle of an analysis
    from scipy.linalg import cython_lapack
except ImportError:  # pragma: no cover - scipy is in requirements.txt; eigh is used instead
    cython_lapack = None


@functools.cache
def _routine(name: str):
    """The LAPACK routine ``name`` as a ctypes function (which releases the GIL), or ``None``."""
    if cython_lapack is None:
        return None
    capsule = cython_lapack.__pyx_capi__.get(name)
    if capsule is None:
        return None
    get_name = ctypes.pythonapi.PyCapsule_GetName
    get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
    get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
    get_pointer.restype, get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    address = get_pointer(capsule, get_name(capsule))
    return ctypes.CFUNCTYPE(None, *_SIGNATURES[name])(address)


def available() -> bool:
    """Whether the routines can be called (SciPy is installed)."""
    return all(_routine(name) is not None for name in _SIGNATURES)


def _i(value: int) -> ctypes.c_int:
    return ctypes.c_int(value)


def _p(array: np.ndarray) -> int:
    """The address of ``array``'s data (float64 or int32, contiguous; the caller keeps it alive)."""
    return array.ctypes.data


class Tridiagonal:
    """A symmetric matrix reduced to tridiagonal form: all eigenvalues now, top vectors on demand.

    ``values`` are every eigenvalue in descending order. :meth:`top` returns the top ``k``
    eigenvectors (columns, descending), or ``None`` when LAPACK reports a failure or the
    residual check fails. The reduction is kept, so asking for more vectors later costs
    only the new inverse iterations and back-transformation.
    """

    def __init__(self, gram: np.ndarray) -> None:
        n = gram.shape[0]
        self.n = n
        # A symmetric matrix is its own transpose: the C-ordered buffer is a valid
        # Fortran-ordered one, and the reflectors dsytrd leaves in it are read back by
        # ormqr (see top) from the same buffer.
        self._a = np.array(gram, dtype=np.float64, order="C", copy=True)
        self._d = np.empty(n)
        self._e = np.empty(max(n - 1, 1))
        self._tau = np.empty(max(n - 1, 1))
        info = ctypes.c_int(0)
        query = np.empty(1)
        args = (b"L", _i(n), _p(self._a), _i(max(n, 1)), _p(self._d), _p(self._e), _p(self._tau))
        _routine("dsytrd")(*args, _p(query), _i(-1), ctypes.byref(info))
        work = np.empty(max(int(query[0]), 1))
        _routine("dsytrd")(*args, _p(work), _i(work.size), ctypes.byref(info))
        if info.value != 0:
            raise np.linalg.LinAlgError(f"dsytrd failed (info={info.value})")
        values = self._d.copy()
        offdiagonal = self._e[: n - 1].copy()
        _routine("dsterf")(_i(n), _p(values), _p(offdiagonal), ctypes.byref(info))
        if info.value != 0:
            raise np.linalg.LinAlgError(f"dsterf did not converge (info={info.value})")
        self._ascending = values
        self.values = values[::-1].copy()
        self._vectors: np.ndarray | None = None  # top columns found so far, descending

    @functools.cached_property
    def _scale(self) -> float:
        return max(float(np.abs(self._ascending).max(initial=0.0)), np.finfo(np.float64).tiny)

    @functools.cached_property
    def splits(self) -> bool:
        """Whether the tridiagonal matrix falls apart into blocks.

        Inverse iteration as one block would then be wrong.
        """
        return bool(np.any(np.abs(self._e[: self.n - 1]) <= np.finfo(np.float64).eps * self._scale))

    def top(self, k: int) -> np.ndarray | None:
        """The top ``k`` eigenvectors as columns ``n x k``, descending, or ``None``."""
        n = self.n
        k = min(k, n)
        if self._vectors is not None and self._vectors.shape[1] >= k:
            return self._vectors[:, :k]
        if k == 0:
            return np.empty((n, 0))
        if n < 2 or self.splits:
            return None
        wanted = np.ascontiguousarray(self._ascending[n - k :])  # dstein wants them ascending
        blocks = np.ones(n, dtype=np.intc)
        split_ends = np.zeros(n, dtype=np.intc)
        split_ends[0] = n
        z = np.zeros((k, n))  # C-ordered k x n is Fortran-ordered n x k
        work, iwork = np.empty(5 * n), np.empty(n, dtype=np.intc)
        failed = np.empty(k, dtype=np.intc)
        info = ctypes.c_int(0)
        _routine("dstein")(
            _i(n), _p(self._d), _p(self._e), _i(k), _p(wanted), _p(blocks), _p(split_ends),
            _p(z), _i(n), _p(work), _p(iwork), _p(failed), ctypes.byref(info),
        )  # fmt: skip
        if info.value != 0 or not self._accurate(z, wanted):
            return None
        # Back to the Gram matrix's basis: dsytrd("L") left Q = H(1) ... H(n-1) with the
        # reflectors below the subdiagonal, so Q z (LAPACK's dormtr) is dormqr on rows 2..n.
        # MKL's dormqr, through torch, takes 1.5 ms for 100 vectors at 384 where SciPy's
        # OpenBLAS dormtr takes 4.7 ms; torch releases the GIL too.
        z = torch.from_numpy(z).T  # n x k, column-major
        reflectors = torch.from_numpy(self._a).T[1:, : n - 1]
        z[1:] = torch.ormqr(reflectors, torch.from_numpy(self._tau[: n - 1]), z[1:])
        # A fresh copy, never np.ascontiguousarray: for k = 1 the reversed view already
        # counts as contiguous, so that would hand back its negative stride, which
        # torch.from_numpy refuses (issue 23: the rank-2 update of a rotation).
        self._vectors = z.numpy()[:, ::-1].copy(order="C")  # n x k, descending
        return self._vectors

    def _accurate(self, z: np.ndarray, values: np.ndarray) -> bool:
        """Whether the rows of ``z`` (``k x n``) are orthonormal eigenvectors of ``T`` for ``values``."""
        d, e = self._d, self._e[: self.n - 1]
        tz = z * d  # T z, row by row: d_i z_i + e_(i-1) z_(i-1) + e_i z_(i+1)
        tz[:, 1:] += z[:, :-1] * e
        tz[:, :-1] += z[:, 1:] * e
        tz -= values[:, None] * z
        residual = float(np.sqrt(np.max(np.einsum("ij,ij->i", tz, tz), initial=0.0)))
        overlap = z @ z.T
        overlap[np.diag_indices_from(overlap)] -= 1.0
        departure = float(np.abs(overlap).max(initial=0.0))
        return residual <= RESIDUAL_TOLERANCE * self._scale and departure <= ORTHOGONALITY_TOLERANCE

"""Scheduling and thread control of an analysis.

Which matrices run at once, on how many threads, within what memory, and what runs
beside them (reading ahead, cache writes).

The maths is in :mod:`analysis.pipeline`; this module decides only where and when it
runs, never what it computes: every matrix gets thread counts that depend on its own
shape (:func:`matrix_threads`), so results do not depend on the schedule.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import torch

from analysis import lapack

T = TypeVar("T")
P = TypeVar("P")
R = TypeVar("R")


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a container's share)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_workers() -> int:
    """Matrices analysed at once on a GPU (CPU: see :func:`cpu_parallelism`).

    One, its weights read ahead by a reader thread; two when torch uses only part of the
    cores.
    """
    return max(1, min(2, available_cores() // max(1, torch.get_num_threads())))


def cpu_parallelism(largest_cost: int, budget: int, matrices: int, workers: int | None = None) -> tuple[int, int]:
    """``(workers, threads)`` for a CPU analysis: matrices at once, BLAS threads each.

    LAPACK's eigensolvers scale poorly across threads for the matrices of one layer (a
    384 x 384 Gram matrix runs 1.4x faster on 2 threads, two of them side by side 2x), so
    matrices are spread over the cores, one thread each, as many at once as the memory
    budget allows; the threads left over go to each matrix (a 7B-sized matrix that only
    fits alone gets every core). ``workers x threads`` never exceeds the cores: an
    oversubscribed OpenMP team spins at its barriers while its threads wait for a core,
    and LAPACK then runs up to 100x slower (measured on the 2-core benchmark machine).
    Threads are also capped by ``torch.get_num_threads()``, so a caller's lower setting
    holds.
    """
    cores = available_cores()
    if workers is None:
        workers = min(cores, max(1, budget // max(1, largest_cost)), max(1, matrices))
    workers = max(1, workers)
    threads = max(1, min(cores // workers, torch.get_num_threads()))
    return workers, threads


#: Estimated working memory (:func:`working_bytes`) that matrices analysed at once may
#: use together; a matrix larger than this still runs, alone.
DEFAULT_MEMORY_BUDGET = 2 * 1024**3


_threads_lock = threading.Lock()
_threads_users = 0
_threads_saved = 0
_blas_local: list | None = None  # the BLAS libraries' thread-count setters, found once
_blas_global_lock = threading.Lock()


def _blas_libraries() -> list:
    """``openblas_set_num_threads_local`` of every OpenBLAS outside torch, or ``[]``.

    ``[]`` when one of the BLAS libraries loaded has no such setter (then
    :func:`blas_threads` limits them through threadpoolctl, one matrix at a time).

    SciPy's OpenBLAS (the tridiagonal routines of :mod:`analysis.lapack`) and NumPy's (the
    Gram products of :func:`analysis.linalg.gram_matrix`) are the ones that matter:
    importing :mod:`analysis.linalg` loaded both. Despite its name the setter sets the
    count of the whole process in the pthreads builds NumPy and SciPy ship (it calls
    ``openblas_set_num_threads``; only OpenMP builds keep a count per thread); it returns
    the count it replaced. It is called directly, as threadpoolctl's own setter quietly does
    nothing from any thread but the first one that used it while that one lives. Found
    once (1.5 ms); a call costs microseconds, so it is set per matrix.
    """
    global _blas_local
    if _blas_local is None:
        import ctypes

        from threadpoolctl import ThreadpoolController

        setters = []
        for library in ThreadpoolController().select(user_api="blas").lib_controllers:
            setter = getattr(ctypes.CDLL(library.filepath), "openblas_set_num_threads_local", None)
            if library.internal_api != "openblas" or setter is None:  # OpenBLAS >= 0.3.27
                setters = []
                break
            setter.restype, setter.argtypes = ctypes.c_int, [ctypes.c_int]
            setters.append(setter)
        _blas_local = setters
    return _blas_local


def _limit_blas(threads: int):
    """Limit the BLAS libraries outside torch to ``threads`` for the whole process.

    The fallback of :func:`blas_threads`; returns a handle that restores them.
    """
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=threads, user_api="blas")


class _BlasGate:
    """The thread count of the BLAS libraries outside torch, held for the matrices computing.

    That count is one for the whole process: OpenBLAS's ``openblas_set_num_threads_local``
    sets the global count in the pthreads builds NumPy and SciPy ship (it calls
    ``openblas_set_num_threads``). So matrices on one thread share the gate, and the count
    is set to one when the first of them comes in and put back (the caller's) when the last
    one leaves, never while one computes: a matrix that put back the count it found when it
    was done used to change the count under the one still computing beside it (two threads
    for the rest of its reduction, other last bits: three runs of the demo's full fine-tune
    wrote three reports). A matrix on several threads holds the gate alone, as OpenBLAS also
    runs a multi-threaded call on fewer threads when another thread of the process is inside
    OpenBLAS (measured: a two-thread ``dsytrd`` beside two threads doing one-thread calls
    gave the one-thread bits in 1 of 30 runs). A waiting multi-threaded matrix goes before
    newly arriving one-thread ones, so a stream of small matrices (another visitor's job)
    cannot starve it. Taken inside a pair's cache-entry lock and before any base-entry lock,
    never while waiting for another thread's entry, so it cannot deadlock.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._sharing = 0
        self._alone = False
        self._waiting_alone = 0
        self._saved: list[int] = []  # the counts found when the gate was last idle

    def _enter(self, threads: int) -> None:
        """Wait for this matrix's turn and set the count (the gate's lock is held)."""
        if threads == 1:
            self._cond.wait_for(lambda: not self._alone and not self._waiting_alone)
        else:
            self._waiting_alone += 1
            try:
                self._cond.wait_for(lambda: not self._alone and not self._sharing)
            finally:
                self._waiting_alone -= 1
        # Set from this thread too when others compute (to the one they have): in the
        # OpenMP builds a thread's own count is what counts.
        found = [setter(threads) for setter in _blas_libraries()]
        if not self._sharing:  # idle until now: the caller's counts, put back when idle again
            self._saved = found
        if threads == 1:
            self._sharing += 1
        else:
            self._alone = True

    def _leave(self, threads: int) -> None:
        if threads == 1:
            self._sharing -= 1
        else:
            self._alone = False
        if not self._sharing and not self._alone:  # idle: the caller's counts again
            for setter, count in zip(_blas_libraries(), self._saved, strict=True):
                setter(count)
        self._cond.notify_all()

    @contextmanager
    def hold(self, threads: int) -> Iterator[None]:
        """Compute the body with ``threads`` BLAS threads (one: beside others; more: alone)."""
        threads = max(1, threads)
        with self._cond:
            self._enter(threads)
        try:
            yield
        finally:
            with self._cond:
                self._leave(threads)


_blas_gate = _BlasGate()


@contextmanager
def blas_threads(threads: int) -> Iterator[None]:
    """Run the body (one matrix's decompositions) with ``threads`` threads in the BLAS libraries outside torch.

    LAPACK's results depend on its thread count in the last bits (``dsytrd`` on one thread
    differs from two, from order 224 on), and that count is one for the whole process,
    shared by every analysis running in it (two visitors' jobs). Matrices on one thread run
    side by side at a count of one; a matrix on more runs while no other matrix computes
    (:class:`_BlasGate`). The caller's count is back once no matrix computes. Where a BLAS
    library has no setter of its own (:func:`_blas_libraries`), the limit is set through
    threadpoolctl, one matrix at a time.
    """
    if not _blas_libraries():
        with _blas_global_lock, _limit_blas(threads):
            yield
        return
    with _blas_gate.hold(threads):
        yield


def _caller_threads() -> int:
    """Torch threads the caller had before any analysis changed them."""
    with _threads_lock:
        return _threads_saved if _threads_users else torch.get_num_threads()


def matrix_threads(shape: tuple[int, int], method: str, budget: int = DEFAULT_MEMORY_BUDGET) -> tuple[int, int]:
    """``(torch threads, outside BLAS threads)`` a matrix pair is computed with on the CPU.

    A function of the matrix's shape, the method, the memory budget and the machine (its
    cores, the caller's torch thread count) only, never of how many matrices are in the
    plan or how many run at once: LAPACK's results depend on its thread count in the last
    bits (a QR on one thread differs from one on two by up to 2e-7), so a pair computed
    alone must be computed with the same threads as in a full run to give the same bytes
    (issue 11, item 5). A matrix of order :data:`analysis.lapack.THREADED_MIN_ORDER` or
    more, or one whose working memory fills more than half the budget, runs alone on every
    core; any other runs on one thread, beside others (:func:`cpu_parallelism`).
    """
    order = min(shape)
    if order < lapack.THREADED_MIN_ORDER and 2 * working_bytes(shape, method) <= budget:
        return 1, 1
    threads = max(1, min(available_cores(), _caller_threads()))
    return threads, lapack.threads_for(order, threads)


def use_threads(threads: int) -> None:
    """Compute in this thread with ``threads`` torch threads.

    OpenMP and MKL settings are per thread: a fresh worker thread would run its first
    LAPACK call on as many threads as cores. Inside :func:`compute_threads` only, which
    restores the caller's count. (The BLAS libraries outside torch: :func:`blas_threads`.)
    """
    torch.set_num_threads(threads)


@contextmanager
def compute_threads() -> Iterator[None]:
    """Keep the caller's torch thread count while matrices set their own; restore it afterwards.

    Matrices set theirs with :func:`use_threads`.

    Overlapping analyses (two dashboard jobs) share the setting; the last to finish
    restores what was there before.
    """
    global _threads_users, _threads_saved
    with _threads_lock:
        if _threads_users == 0:
            _threads_saved = torch.get_num_threads()
        _threads_users += 1
    try:
        yield
    finally:
        with _threads_lock:
            _threads_users -= 1
            if _threads_users == 0:
                torch.set_num_threads(_threads_saved)


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the body (torch code only) with ``threads`` torch threads in this thread.

    The caller's setting comes back afterwards (shared with overlapping analyses as
    :func:`compute_threads`).
    """
    with compute_threads():
        use_threads(threads)
        yield


def run_now(task: Callable[[], None]) -> None:
    """Run ``task`` at once in this thread (a cache write where no :class:`BackgroundWriter` is used)."""
    task()


class BackgroundWriter:
    """Runs cache writes (and the device-to-host copies inside them) on one thread, off the critical path.

    A base entry of a 7B-sized matrix is 32 MiB of float16 vectors to copy, checksum and
    write while the next matrix decomposes. :meth:`close` waits for every write and raises
    the first write's error, if any.
    """

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wse-writer")
        self._futures: list[Future] = []
        self._lock = threading.Lock()

    def __call__(self, task: Callable[[], None]) -> None:
        """Queue ``task`` (a cache write) on the writer thread."""
        with self._lock:
            self._futures = [f for f in self._futures if not f.done() or f.exception() is not None]
            self._futures.append(self._executor.submit(task))

    def close(self) -> None:
        """Wait for every write; raise the first write's error, if any."""
        self._executor.shutdown(wait=True)
        for future in self._futures:
            future.result()


def working_bytes(shape: tuple[int, int], method: str, device_type: str = "cpu") -> int:
    """Host memory one matrix pair needs while it is analysed (an estimate, for scheduling).

    On the CPU: base and tuned weight in float32, the update and a float64 copy of
    whichever matrix is being decomposed, its Gram matrix and eigenvectors, derived
    vectors. When the decompositions run on a GPU, the host holds the weights only.
    """
    m, n = shape
    if device_type != "cpu" or method not in ("gram", "eig"):
        return 12 * m * n
    return 32 * m * n + 24 * min(m, n) ** 2


#: Items queued per worker thread (see :func:`in_order`); it took an adapter's analysis
#: on the demo from 0.52 s to 0.48 s on 2 cores.
QUEUE_PER_WORKER = 4


def in_order(
    items: Sequence[T],
    prepare: Callable[[T], P],
    finish: Callable[[P], R],
    workers: int,
    budget: int,
    cost: Callable[[T], int],
    before_each: Callable[[int], None],
) -> Generator[tuple[T, R], None, None]:
    """``(item, finish(prepare(item)))`` in the order of ``items``.

    With ``workers >= 2`` that many threads each do both steps for an item, fed from a
    queue of up to :data:`QUEUE_PER_WORKER` items per thread, so a thread whose item is
    done early takes the next one instead of waiting for a slower item ahead of it to be
    yielded (a 384 x 1536 matrix takes 4x a 384 x 384 one); with one, a reader thread runs
    ``prepare`` one item ahead while the calling thread runs ``finish``.
    ``before_each(number_yielded)`` is called before an item is submitted (it may raise,
    to stop). An item is submitted only while the ``cost`` of the items holding memory
    (queued, running, or prepared and waiting) plus its own fits ``budget``, or when
    nothing else holds any. An exception is raised when its item's turn comes; leaving
    early cancels what has not started and waits for what has.
    """
    combined = workers > 1
    executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="wse-matrix" if combined else "wse-reader")
    pending: deque[tuple[T, Future, int]] = deque()
    upcoming = iter(items)
    following = next(upcoming, _END)
    done = 0

    def fill(finishing: int) -> None:
        nonlocal following
        while following is not _END and len(pending) < (QUEUE_PER_WORKER * workers if combined else workers):
            held = finishing + sum(c for _, f, c in pending if not combined or not f.done())
            if (pending or finishing) and held + cost(following) > budget:
                return
            before_each(done)
            task = (lambda item: finish(prepare(item))) if combined else prepare
            pending.append((following, executor.submit(task, following), cost(following)))
            following = next(upcoming, _END)

    try:
        while pending or following is not _END:
            fill(0)
            item, future, item_cost = pending.popleft()
            value = future.result()
            fill(0 if combined else item_cost)  # start the next item before finishing this one
            result = value if combined else finish(value)
            del value
            done += 1
            yield item, result
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


_END = object()

"""Scheduling and thread control of an analysis: which matrices run at once, on how many
threads, within what memory, and what runs beside them (reading ahead, cache writes).

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
    """Matrices analysed at once on a GPU: one, its weights read ahead by a reader thread;
    two when torch uses only part of the cores. (CPU: see :func:`cpu_parallelism`.)"""
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
_blas_limits = None  # the first limit set in this analysis: it restores the caller's
_blas_current: int | None = None
_blas_controller = None


def _limit_blas(threads: int):
    """Limit the BLAS libraries outside torch to ``threads``; a handle that restores them.

    SciPy's OpenBLAS (the tridiagonal routines of :mod:`analysis.lapack`) and NumPy's (the
    Gram products of :func:`analysis.linalg.gram_matrix`) are among them: importing
    :mod:`analysis.linalg` loaded both. One controller, found once (finding the libraries
    takes 1.5 ms, a limit through it 0.01 ms: it is set per matrix).
    """
    global _blas_controller
    if _blas_controller is None:
        from threadpoolctl import ThreadpoolController

        _blas_controller = ThreadpoolController()
    return _blas_controller.limit(limits=threads, user_api="blas")


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


def _use_threads(threads: int, blas_threads: int | None) -> None:
    """Compute in this thread with ``threads`` torch threads (OpenMP and MKL settings are
    per thread: a fresh worker thread would run its first LAPACK call on as many threads
    as cores) and ``blas_threads`` for the BLAS libraries outside torch (one setting for
    the process; matrices that run side by side all use one; ``None`` leaves it).

    Inside :func:`_compute_threads` only, which restores the caller's settings. The BLAS
    setting only from the thread that entered it: OpenBLAS ignored a limit set from a new
    thread after one set and restored from different threads (measured: the second
    analysis of a process then ran 5x the CPU time, its BLAS threads spinning).
    """
    global _blas_limits, _blas_current
    torch.set_num_threads(threads)
    if blas_threads is None:
        return
    with _threads_lock:
        if _blas_current != blas_threads:
            limits = _limit_blas(blas_threads)
            if _blas_limits is None:
                _blas_limits = limits
            _blas_current = blas_threads


@contextmanager
def _compute_threads() -> Iterator[None]:
    """Keep the caller's thread settings while matrices set their own (:func:`_use_threads`);
    restore them afterwards.

    Overlapping analyses (two dashboard jobs) share the settings; the last to finish
    restores what was there before.
    """
    global _threads_users, _threads_saved, _blas_limits, _blas_current
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
                # BLAS first, torch second: an OpenMP build of OpenBLAS sets the OpenMP
                # thread count that torch reads too.
                if _blas_limits is not None:
                    _blas_limits.restore_original_limits()
                _blas_limits = _blas_current = None
                torch.set_num_threads(_threads_saved)


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the body with ``threads`` torch threads in this thread; the caller's settings
    come back afterwards (shared with overlapping analyses as :func:`_compute_threads`)."""
    with _compute_threads():
        _use_threads(threads, None)
        yield


def _now(task: Callable[[], None]) -> None:
    task()


class BackgroundWriter:
    """Runs cache writes (and the device-to-host copies inside them) on one thread, off
    the critical path: a base entry of a 7B-sized matrix is 32 MiB of float16 vectors to
    copy, checksum and write while the next matrix decomposes. :meth:`close` waits for
    every write and raises the first write's error, if any."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wse-writer")
        self._futures: list[Future] = []
        self._lock = threading.Lock()

    def __call__(self, task: Callable[[], None]) -> None:
        with self._lock:
            self._futures = [f for f in self._futures if not f.done() or f.exception() is not None]
            self._futures.append(self._executor.submit(task))

    def close(self) -> None:
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


#: Items queued per worker thread (see :func:`_in_order`); it took an adapter's analysis
#: on the demo from 0.52 s to 0.48 s on 2 cores.
QUEUE_PER_WORKER = 4


def _in_order(
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

"""Background jobs: heavy analyses run outside the page script, shared between visitors.

The dashboard never runs an SVD inside a Streamlit script run, nor in the web server's
process. It asks a process-wide :class:`JobManager` for a job keyed by what is being
computed (for a comparison: base, fine-tune and settings); every session asking for the
same key joins the same job instead of starting another. With ``processes=True`` (the
dashboard) a job given as :class:`Work` runs in a worker process
(:mod:`hosting.workers`), and one thread of the manager per running job (its poller)
reads the worker's progress and results into the :class:`Job`; other job functions run
on that thread itself. Pages read :class:`Job` for progress and for results that arrive
one by one, never the worker.

Cancelling is shared-safe: each session *watches* the jobs it asked for, and a Cancel
button only withdraws that session's interest; the job stops when nobody watches it any
more (another visitor's run of the same comparison is never cut short).

Nothing here imports Streamlit; the dashboard keeps one manager per server process
(``st.cache_resource``).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from analysis import distributed
from analysis.cache import SpectrumCache
from analysis.errors import AnalysisCancelled, InputError
from analysis.model_sparsity import add_whole_model_sparsity
from analysis.pipeline import analyse_plan, cached_results, model_result
from analysis.results import ModelResult
from analysis.specs import SpecResolver
from hosting.uploads import UploadStore
from hosting.workers import WARM, WorkerPool

log = logging.getLogger(__name__)


class JobState(StrEnum):
    """Where a job is: queued, running, or finished as done, failed or cancelled."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        """Whether the job has ended (done, failed or cancelled)."""
        return self in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


@dataclass(frozen=True)
class Progress:
    """How far a job is: ``done`` of ``total`` steps, the last one's name, time so far.

    A job whose steps cost very different amounts (a mitigation: matrices, then model
    evaluations) also reports its own clock's reading (:class:`analysis.mitigation.StepClock`):
    ``remaining_s`` (of which ``step_s`` for the phase under way, counted down until the next
    report) and ``work``, the fraction of the work done weighted by step cost, at wall time ``at``.
    """

    done: int
    total: int
    step: str = ""
    elapsed_s: float = 0.0
    remaining_s: float | None = None
    step_s: float = 0.0
    work: float | None = None
    at: float = 0.0

    @property
    def fraction(self) -> float:
        """The work done: ``work`` where the job weighs its steps, else ``done / total`` (0 while unknown)."""
        if self.work is not None:
            return self.work
        return self.done / self.total if self.total else 0.0

    @property
    def eta_s(self) -> float | None:
        """Seconds left: the job's own estimate, else the average pace so far (``None`` before the first step)."""
        if self.remaining_s is not None:
            return self.remaining_s
        if self.done == 0 or self.total == 0:
            return None
        return self.elapsed_s / self.done * (self.total - self.done)

    def eta_at(self, now: float) -> float | None:
        """:attr:`eta_s` at wall time ``now``, the step under way counted down since the report."""
        if self.remaining_s is None:
            return self.eta_s
        return self.remaining_s - min(max(now - self.at, 0.0), self.step_s)

    def fraction_at(self, now: float) -> float:
        """:attr:`fraction` at wall time ``now`` (elapsed over elapsed plus :meth:`eta_at`)."""
        left = self.eta_at(now)
        if self.remaining_s is None or left is None:
            return self.fraction
        elapsed = self.elapsed_s + max(now - self.at, 0.0)
        return max(self.fraction, elapsed / (elapsed + left) if elapsed + left > 0 else 1.0)


class Job:
    """One unit of background work and everything a page needs to show about it.

    Read ``state``, ``progress``, ``items()`` (results published so far), ``result``
    and ``error`` from any thread; only the worker writes them.
    """

    def __init__(self, key: Hashable, label: str = "") -> None:
        self.key = key
        self.label = label
        self.state = JobState.QUEUED
        self.progress: Progress | None = None
        self.result: Any = None
        #: The user-facing problem (an ``InputError``'s text) or an internal error's summary.
        self.error: str | None = None
        self.created_at = time.time()
        self.finished_at: float | None = None
        #: Whatever the job function wants pages to see while it runs (e.g. its plan).
        self.plan: Any = None
        self._items: list[Any] = []
        self._watchers: set[str] = set()
        #: The watcher that started the job (per-visitor quotas count it against them).
        self.owner: str | None = None
        #: Stopped because no watcher was left (a page asking again restarts it).
        self.abandoned = False
        #: The worker process that runs the job (``None``: a thread of this process).
        self.worker_pid: int | None = None
        self._stop = threading.Event()
        self._done = threading.Event()
        self._lock = threading.Lock()

    # -- reading (any thread) -------------------------------------------------------------
    def items(self) -> list[Any]:
        """A copy of the results published so far, in order."""
        with self._lock:
            return list(self._items)

    @property
    def watchers(self) -> frozenset[str]:
        """The watchers (sessions) waiting for the job now."""
        with self._lock:
            return frozenset(self._watchers)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job has finished (for tests and scripts); ``False`` on timeout."""
        return self._done.wait(timeout)

    def should_stop(self) -> bool:
        """Whether the job was asked to stop (no watcher left, or cancelled); the worker polls it."""
        return self._stop.is_set()

    # -- interest and cancelling ----------------------------------------------------------
    def watch(self, watcher: str) -> None:
        """Register ``watcher``'s interest in the job."""
        with self._lock:
            self._watchers.add(watcher)

    def unwatch(self, watcher: str) -> bool:
        """Withdraw ``watcher``'s interest; stop the job if nobody else watches it.

        Returns ``True`` when this stopped the job.
        """
        with self._lock:
            self._watchers.discard(watcher)
            stop = not self._watchers and not self.state.finished
        if stop:
            self._stop.set()
        return stop

    def cancel(self) -> None:
        """Stop the job whoever watches it (for shutdown and tests)."""
        self._stop.set()

    # -- writing (the worker) -------------------------------------------------------------
    def report(self, progress: Progress) -> None:
        """Set the job's progress (the worker only)."""
        self.progress = progress

    def publish(self, item: Any) -> None:
        """Add ``item`` to the results published so far, :meth:`items` (the worker only)."""
        with self._lock:
            self._items.append(item)

    def _finish(self, state: JobState, result: Any = None, error: str | None = None) -> None:
        self.result, self.error = result, error
        self.finished_at = time.time()
        self.state = state
        self._done.set()


JobFunction = Callable[[Job], Any]


class JobManager:
    """Runs jobs on a small thread pool; one job per key, joined by everyone asking.

    Parameters
    ----------
    max_workers : int, default 1
        Jobs running at once; the rest wait in order. SVDs already use every core, so
        more than one or two only helps with a GPU.
    keep_finished : int, default 32
        Finished jobs kept (so a revisit or a second visitor gets the result at once);
        older ones are forgotten, their spectra stay in the persistent cache.
    processes : bool, default False
        Run each :class:`Work` job in one of ``max_workers`` worker processes
        (:class:`hosting.workers.WorkerPool`, spawned on the first such job) instead of
        on a thread of this process.
    """

    def __init__(self, max_workers: int = 1, keep_finished: int = 32, *, processes: bool = False) -> None:
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="wse-job")
        self.workers = WorkerPool(max_workers, warm=WARM) if processes else None
        self._jobs: dict[Hashable, Job] = {}
        self._lock = threading.Lock()
        self.keep_finished = keep_finished

    def submit(self, key: Hashable, fn: JobFunction, *, label: str = "", watcher: str | None = None) -> Job:
        """The job for ``key``: the existing one if queued, running or done, else a new one.

        ``fn(job)`` does the work: it calls ``job.report(...)`` and ``job.publish(...)``
        as it goes, polls ``job.should_stop()``, and returns the result. A failed or
        cancelled job is replaced by a fresh run.
        """
        return self._join(key, label, watcher, lambda job: self._pool.submit(self._run, job, fn))

    def finished(self, key: Hashable, result: Any, *, label: str = "", watcher: str | None = None) -> Job:
        """A job for ``key`` that is already done with ``result`` (read, not computed: nothing runs).

        Joined like any other: a later :meth:`submit` of ``key`` returns it.
        """
        return self._join(key, label, watcher, lambda job: job._finish(JobState.DONE, result=result))

    def _join(self, key: Hashable, label: str, watcher: str | None, begin: Callable[[Job], Any]) -> Job:
        """The job of ``key``, or a new one (replacing a failed, cancelled or stopping one) that ``begin`` starts."""
        with self._lock:
            job = self._jobs.get(key)
            if job is None or job.state in (JobState.FAILED, JobState.CANCELLED) or job.should_stop():
                job = Job(key, label)
                job.owner = watcher
                self._jobs[key] = job
                if watcher is not None:
                    job.watch(watcher)
                begin(job)
            elif watcher is not None:
                job.watch(watcher)
            self._prune()
        return job

    def get(self, key: Hashable) -> Job | None:
        """The job of ``key``, running or kept after finishing, or ``None``."""
        with self._lock:
            return self._jobs.get(key)

    def jobs(self) -> list[Job]:
        """Every job the manager knows: running, queued and the finished ones kept."""
        with self._lock:
            return list(self._jobs.values())

    def unwatch_all(self, watcher: str) -> None:
        """A session went away or cancelled everything: withdraw it from every job."""
        for job in self.jobs():
            job.unwatch(watcher)

    def active_for(self, watcher: str) -> int:
        """Unfinished jobs ``watcher`` started (for a per-visitor quota)."""
        return sum(1 for job in self.jobs() if job.owner == watcher and not job.state.finished)

    def reap(self, alive: Callable[[str], bool]) -> list[Job]:
        """Withdraw every watcher for which ``alive(watcher)`` is false (a closed tab).

        Each unfinished job nobody is left waiting for is stopped. Returns the jobs stopped.
        """
        stopped = []
        for job in self.jobs():
            if job.state.finished:
                continue
            gone = [w for w in job.watchers if not alive(w)]
            for watcher in gone:
                if job.unwatch(watcher):
                    job.abandoned = True
                    stopped.append(job)
        return stopped

    def reap_every(self, alive: Callable[[str], bool], seconds: float = 5.0) -> threading.Thread:
        """Run :meth:`reap` every ``seconds`` on a daemon thread (started once per manager)."""
        with self._lock:
            if getattr(self, "_reaper", None) is not None:
                return self._reaper

            def loop() -> None:
                while True:
                    time.sleep(seconds)
                    try:
                        self.reap(alive)
                    except Exception:  # pragma: no cover - never let the reaper die
                        log.exception("reaping abandoned jobs failed")

            self._reaper = threading.Thread(target=loop, name="wse-job-reaper", daemon=True)
            self._reaper.start()
            return self._reaper

    def shutdown(self) -> None:
        """Cancel every job and wait for the running ones to end."""
        for job in self.jobs():
            job.cancel()
        self._pool.shutdown(wait=True, cancel_futures=False)
        if self.workers is not None:
            self.workers.shutdown()

    def _run(self, job: Job, fn: JobFunction) -> None:
        if job.should_stop():
            job._finish(JobState.CANCELLED, error="cancelled before it started")
            return
        job.state = JobState.RUNNING
        if self.workers is not None and isinstance(fn, Work):
            self._run_in_worker(job, fn)
            return
        try:
            result = fn(job)
        except AnalysisCancelled as exc:
            job._finish(JobState.CANCELLED, error=str(exc) or "cancelled")
        except InputError as exc:
            job._finish(JobState.FAILED, error=str(exc))
        except Exception as exc:  # a bug, not the user's fault: keep serving, say so, log it
            log.exception("job %s failed", job.label or job.key)
            job._finish(JobState.FAILED, error=f"internal error ({type(exc).__name__}: {exc})")
        else:
            job._finish(JobState.DONE, result=result)
        finally:
            log.info("job %s: %s in %.1f s", job.label or job.key, job.state.value, time.time() - job.created_at)

    def _run_in_worker(self, job: Job, fn: Work) -> None:
        """Run ``fn`` in a worker process; this thread is the job's poller meanwhile."""
        try:
            outcome = self.workers.run(fn, job)
        except Exception as exc:  # no worker could be started (e.g. out of memory)
            log.exception("job %s: no worker process", job.label or job.key)
            job._finish(JobState.FAILED, error=f"internal error (no worker process: {type(exc).__name__}: {exc})")
            return
        if outcome.state == "done" and fn.restore is not None:
            try:
                outcome.value = fn.restore(outcome.value, **fn.kwargs)
            except InputError as exc:
                outcome.state, outcome.text = "failed", str(exc)
        if outcome.state == "done":
            job._finish(JobState.DONE, result=outcome.value)
        elif outcome.state == "cancelled":
            job._finish(JobState.CANCELLED, error=outcome.text)
        elif outcome.state == "failed":
            job._finish(JobState.FAILED, error=outcome.text)
        else:  # a bug in the job, or its worker died (killed for memory?): keep serving, say so
            log.error("job %s failed in worker %s: %s", job.label or job.key, outcome.pid, outcome.text)
            job._finish(JobState.FAILED, error=f"internal error ({outcome.text})")
        log.info("job %s: %s in %.1f s (worker %s)", job.label or job.key, job.state.value,
                 time.time() - job.created_at, outcome.pid)  # fmt: skip

    def _prune(self) -> None:
        finished = sorted(
            (j for j in self._jobs.values() if j.state.finished), key=lambda j: j.finished_at or j.created_at
        )
        for job in finished[: max(0, len(finished) - self.keep_finished)]:
            del self._jobs[job.key]


@dataclass(frozen=True)
class Work:
    """A job function that can run in a worker process.

    A module-level ``function`` and picklable keyword arguments; calling it with a job
    calls ``function(job, **kwargs)``.
    """

    function: Callable[..., Any]
    kwargs: dict = field(default_factory=dict)
    #: ``restore(value, **kwargs)``: run in the web process on the value a worker sent back
    #: (e.g. to reopen what does not cross processes); ``None``: the value as it came.
    restore: Callable[..., Any] | None = None

    def __call__(self, job) -> Any:
        """Do the work, reporting to ``job`` (a :class:`Job`, or a worker's stand-in)."""
        return self.function(job, **self.kwargs)


@functools.cache
def server_resolver(cache_dir: str, allow_local_paths: bool) -> SpecResolver:
    """The dashboard's spec resolver for ``cache_dir`` (its uploads live in ``uploads/``).

    One per process: the web server's and each worker's see the same models.
    """
    return SpecResolver(uploads=UploadStore(os.path.join(cache_dir, "uploads")), allow_local_paths=allow_local_paths)


@functools.cache
def server_cache(cache_dir: str) -> SpectrumCache:
    """The dashboard's spectrum cache in ``cache_dir`` (``spectra/``), one per process."""
    return SpectrumCache(os.path.join(cache_dir, "spectra"))


def comparison_work(
    cache_dir: str, allow_local_paths: bool, base: str, tuned: str, *, settings, device: str = "auto", workers=None
) -> Work:
    """:func:`comparison_job` as :class:`Work`, for a worker process.

    The resolver and cache are the server's for ``cache_dir`` (:func:`server_resolver`,
    :func:`server_cache`), opened where it runs.
    """
    where = {"cache_dir": cache_dir, "allow_local_paths": allow_local_paths}
    return Work(_compare, {**where, "base": base, "tuned": tuned, "settings": settings, "device": device,
                           "workers": workers})  # fmt: skip


def _compare(job, *, cache_dir: str, allow_local_paths: bool, base: str, tuned: str, settings, device, workers):
    resolver = server_resolver(cache_dir, allow_local_paths)
    fn = comparison_job(resolver, base, tuned, settings=settings, device=device, cache=server_cache(cache_dir),
                        workers=workers)  # fmt: skip
    return fn(job)


def cached_comparison(resolver: SpecResolver, base: str, tuned: str, *, settings, cache) -> ModelResult | None:
    """The comparison :func:`comparison_job` would return, when ``cache`` already holds all of it.

    Read here, in the calling process (the dashboard's web process), with nothing loaded,
    hashed or computed (:func:`~analysis.pipeline.cached_results`): a page opened on
    analyses done before shows at once, without waiting for a worker. ``None`` when
    anything is missing, when a model is not on this machine (a hub id is resolved by
    its job), when none of a model's files was ever hashed (nothing of it can be cached:
    the comparison is not even planned here), or when the specs are bad (the job then
    says why).
    """
    paths = [resolver.local(spec) for spec in (base, tuned)]
    if cache is None or None in paths or not all(_hashed_before(path, cache) for path in paths):
        return None
    try:
        plan = resolver.plan(base, tuned)
        matrices = cached_results(plan, settings, cache)
        model = None if matrices is None else model_result(plan, matrices)
        # and a full fine-tune's whole-model sparsity, as its job adds it: if stored (else the job counts it)
        return model if model and add_whole_model_sparsity(model, plan, settings, cache, cached_only=True) else None
    except (InputError, OSError):
        return None


def _hashed_before(path: Path, cache) -> bool:
    """Whether ``cache``'s fingerprint index has seen a weight file at ``path``.

    Results are stored only for tensors hashed before, so a model none of whose
    ``.safetensors`` files the index knows has nothing cached: its comparison goes to a
    worker without being planned here (planning a model type this process has not seen
    imports its transformers classes and builds it on the meta device: seconds, which
    every page's first run would wait for). A folder without such files is not judged here.
    """
    try:
        files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
        return not files or any(cache.fingerprints.seen(file) for file in files)
    except OSError:
        return False


def comparison_key(base: str, tuned: str, settings, device: str) -> tuple:
    """The job key of one base/fine-tune comparison (what makes two requests the same)."""
    return ("compare", base, tuned, settings.signature(), device)


def comparison_job(
    resolver,
    base: str,
    tuned: str,
    *,
    settings,
    device: str = "auto",
    cache=None,
    workers: int | None = None,
    ray_address: str | None = None,
) -> JobFunction:
    """A job function comparing ``tuned`` with ``base`` (specs of :mod:`analysis.specs`).

    It plans the pair, publishes each :class:`~analysis.results.MatrixResult` as soon as
    :func:`~analysis.pipeline.analyse_plan` yields it, reports per-matrix progress, stops
    when asked, and returns the :class:`~analysis.results.ModelResult`. The plan is kept
    in ``job.plan`` so a page can show partial results as a ``ModelResult`` too.
    ``workers`` is passed to ``analyse_plan`` (a share of the cores when several jobs run).
    With ``ray_address`` (``WSE_RAY_ADDRESS``) the pairs run as tasks on that Ray cluster
    instead (:mod:`analysis.distributed`): results are published as tasks finish, and a
    stop cancels the outstanding tasks.
    A full fine-tune also gets its whole-model sparsity (as the CLI report), which reads more tensors:
    in a worker process only, so not with ``ray_address`` (then the page counts the analysed matrices).
    """

    def run(job: Job):
        plan = resolver.plan(base, tuned)
        job.plan = plan
        job.report(Progress(0, len(plan.matrices), "", 0.0))
        if ray_address:
            return _on_ray(job, plan)
        matrices = []
        for result in analyse_plan(
            plan,
            settings=settings,
            device=device,
            cache=cache,
            progress=lambda e: job.report(Progress(e.done, e.total, e.matrix, e.elapsed_s)),
            should_stop=job.should_stop,
            workers=workers,
        ):
            matrices.append(result)
            job.publish(result)
        model = model_result(plan, matrices)
        if not job.should_stop():  # the tensors beyond the analysed matrices: read here, in the worker, once
            add_whole_model_sparsity(model, plan, settings, cache)
        return model

    def _on_ray(job: Job, plan):
        distributed.connect(ray_address)
        (matrices,) = distributed.analyse_plans(
            [plan],
            [distributed.dashboard_request(resolver, base, tuned)],
            settings=settings,
            device=device,
            cache=cache,
            progress=lambda e: job.report(Progress(e.done, e.total, e.matrix, e.elapsed_s)),
            should_stop=job.should_stop,
            on_result=lambda _, result: job.publish(result),
        )
        return model_result(plan, matrices)  # no whole-model count: this runs in the web process

    return run

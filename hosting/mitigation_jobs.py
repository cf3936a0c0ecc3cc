"""The Mitigate page's background job: :func:`analysis.mitigation.run` with progress and cancel.

As a comparison's, the job runs in a worker process (:class:`~hosting.jobs.Work`) and its
progress is paced by a step clock (:class:`analysis.mitigation.StepClock`) read every second,
so a long model evaluation shows as time passing, not as a stalled bar.
"""

from __future__ import annotations

import threading
import time

from analysis import mitigation
from analysis.mitigation import MitigationSettings
from hosting.jobs import Progress, Work, server_cache, server_resolver
from hosting.workers import WorkerJob


def mitigation_key(base: str, tuned: str, settings: MitigationSettings, tradeoff: bool, device: str) -> tuple:
    """The background job of one mitigation (what makes two requests the same)."""
    return ("mitigate", base, tuned, settings.signature(), bool(tradeoff), device)


def mitigation_job(
    resolver, base: str, tuned: str, settings: MitigationSettings, *, tradeoff: bool, device="auto", cache=None
):
    """A job function running :func:`analysis.mitigation.run` with progress and cancel."""

    def job_fn(job):
        start = time.perf_counter()
        clock = mitigation.StepClock()
        last: list[tuple[int, int, str]] = []
        lock = threading.Lock()  # the ticker never reports an older step after a newer one

        def report(done: int, total: int, what: str) -> None:  # with the lock held
            now = clock.estimate()
            timed = {"remaining_s": now.remaining_s, "step_s": now.step_s, "work": now.fraction} if now else {}
            job.report(Progress(done, total, what, time.perf_counter() - start, at=time.time(), **timed))

        def progress(done: int, total: int, what: str) -> None:
            with lock:
                last[:] = [(done, total, what)]
                report(done, total, what)

        # Between steps (a model evaluation takes many seconds) the clock is read again every
        # second, so a step that overruns its estimate shows at once.
        finished = threading.Event()

        def tick() -> None:
            while not finished.wait(1.0):
                with lock:
                    if last:
                        report(*last[0])

        ticker = threading.Thread(target=tick, name="wse-mitigation-clock", daemon=True)
        ticker.start()
        try:
            return mitigation.run(
                resolver,
                base,
                tuned,
                settings,
                device=device,
                cache=cache,
                tradeoff=tradeoff,
                progress=progress,
                should_stop=job.should_stop,
                clock=clock,
            )
        finally:
            finished.set()

    return job_fn


def mitigation_work(
    cache_dir: str, allow_local_paths: bool, base: str, tuned: str, settings: MitigationSettings, *, tradeoff: bool,
    device: str = "auto",
) -> Work:  # fmt: skip
    """:func:`mitigation_job` as :class:`Work` (resolver and cache as in :func:`comparison_work`)."""
    kwargs = {"cache_dir": cache_dir, "allow_local_paths": allow_local_paths, "base": base, "tuned": tuned,
              "settings": settings, "tradeoff": tradeoff, "device": device}  # fmt: skip
    return Work(_mitigate, kwargs, restore=_reattach)


def _mitigate(job, *, cache_dir: str, allow_local_paths: bool, base, tuned, settings, tradeoff, device):
    resolver = server_resolver(cache_dir, allow_local_paths)
    cache = server_cache(cache_dir)
    fn = mitigation_job(resolver, base, tuned, settings, tradeoff=tradeoff, device=device, cache=cache)
    result = fn(job)
    if isinstance(job, WorkerJob):  # the loaders stay here; the web process plans the pair again
        result.mitigation = result.mitigation.detached()
    return result


def _reattach(result, *, cache_dir: str, allow_local_paths: bool, base, tuned, **_):
    """A mitigation sent by a worker, with its plan's loaders opened in this process.

    The downloads read the weights through them.
    """
    plan = mitigation.plan_for(server_resolver(cache_dir, allow_local_paths), base, tuned)
    result.mitigation = result.mitigation.attached(plan)
    return result

"""The background job manager: shared jobs, progress, results as they come, safe cancelling."""

from __future__ import annotations

import threading
import time

import pytest

from analysis.errors import AnalysisCancelled, InputError
from hosting.jobs import Job, JobManager, JobState, Progress


@pytest.fixture
def manager():
    m = JobManager(max_workers=2)
    yield m
    m.shutdown()


def _stepper(steps: int, gate: threading.Event | None = None, delay: float = 0.0):
    """A job that publishes ``steps`` numbers, waiting on ``gate`` before each."""
    calls = {"n": 0}

    def run(job: Job) -> int:
        calls["n"] += 1
        start = time.perf_counter()
        for i in range(steps):
            if gate is not None:
                gate.wait(5)
            if job.should_stop():
                raise AnalysisCancelled(f"cancelled after {i} of {steps}")
            time.sleep(delay)
            job.publish(i * i)
            job.report(Progress(i + 1, steps, f"step {i}", time.perf_counter() - start))
        return sum(i * i for i in range(steps))

    return run, calls


def test_job_runs_in_background_and_publishes_results_as_it_goes(manager: JobManager) -> None:
    gate = threading.Event()
    run, _ = _stepper(4, gate)
    job = manager.submit(("base", "tuned", 10), run, watcher="alice")
    time.sleep(0.05)
    assert job.state is JobState.RUNNING and job.items() == []  # submit returned at once
    gate.set()
    assert job.wait(5)
    assert job.state is JobState.DONE
    assert job.items() == [0, 1, 4, 9]
    assert job.result == 14
    assert job.progress == Progress(4, 4, "step 3", job.progress.elapsed_s)
    assert job.progress.fraction == 1.0 and job.progress.eta_s == 0.0


def test_second_visitor_joins_the_running_job(manager: JobManager) -> None:
    gate = threading.Event()
    run, calls = _stepper(3, gate)
    first = manager.submit("key", run, watcher="alice")
    second = manager.submit("key", run, watcher="bob")
    assert second is first
    assert first.watchers == {"alice", "bob"}
    gate.set()
    first.wait(5)
    # A later visitor gets the finished job, not a recomputation.
    assert manager.submit("key", run, watcher="carol") is first
    assert calls["n"] == 1


def test_cancel_by_one_watcher_does_not_stop_the_others(manager: JobManager) -> None:
    gate = threading.Event()
    run, _ = _stepper(3, gate)
    job = manager.submit("key", run, watcher="alice")
    manager.submit("key", run, watcher="bob")
    assert job.unwatch("alice") is False
    gate.set()
    job.wait(5)
    assert job.state is JobState.DONE


def test_job_stops_when_its_last_watcher_cancels(manager: JobManager) -> None:
    gate = threading.Event()
    run, calls = _stepper(100, gate, delay=0.01)
    job = manager.submit("key", run, watcher="alice")
    gate.set()
    time.sleep(0.1)
    assert job.unwatch("alice") is True
    assert job.wait(5)
    assert job.state is JobState.CANCELLED
    assert "cancelled after" in job.error
    assert 0 < len(job.items()) < 100
    # Asking again starts a fresh run.
    again = manager.submit("key", run, watcher="alice")
    assert again is not job
    again.wait(10)
    assert again.state is JobState.DONE and calls["n"] == 2


def test_input_errors_are_reported_and_the_manager_keeps_working(manager: JobManager) -> None:
    def bad(job: Job) -> None:
        raise InputError("adapter.safetensors", "is truncated")

    def buggy(job: Job) -> None:
        raise ZeroDivisionError("oops")

    failed = manager.submit("bad", bad)
    failed.wait(5)
    assert failed.state is JobState.FAILED
    assert failed.error == "adapter.safetensors: is truncated"
    crashed = manager.submit("buggy", buggy)
    crashed.wait(5)
    assert crashed.state is JobState.FAILED and "internal error (ZeroDivisionError: oops)" == crashed.error
    run, _ = _stepper(2)
    ok = manager.submit("ok", run)
    ok.wait(5)
    assert ok.state is JobState.DONE


def test_queued_jobs_wait_for_a_free_worker_and_can_be_cancelled_before_starting() -> None:
    manager = JobManager(max_workers=1)
    gate = threading.Event()
    run, _ = _stepper(1, gate)
    first = manager.submit("a", run, watcher="s")
    second = manager.submit("b", run, watcher="s")
    time.sleep(0.05)
    assert first.state is JobState.RUNNING and second.state is JobState.QUEUED
    manager.unwatch_all("s")
    gate.set()
    first.wait(5), second.wait(5)
    assert second.state is JobState.CANCELLED and second.error == "cancelled before it started"
    manager.shutdown()


def test_old_finished_jobs_are_forgotten() -> None:
    manager = JobManager(max_workers=1, keep_finished=2)
    run, _ = _stepper(1)
    jobs = []
    for i in range(4):
        jobs.append(manager.submit(i, run))
        jobs[-1].wait(5)
    manager.submit("last", run).wait(5)
    kept = {job.key for job in manager.jobs()}
    assert len(kept) <= 3 and 0 not in kept and "last" in kept
    manager.shutdown()


def test_concurrent_dashboard_jobs_share_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    from ui import runtime

    monkeypatch.setattr(runtime, "available_cores", lambda: 8)
    monkeypatch.delenv("WSE_MAX_JOBS", raising=False)
    assert runtime._job_workers() is None  # one job at a time: the engine decides
    monkeypatch.setenv("WSE_MAX_JOBS", "2")
    assert runtime._job_workers() == 4
    monkeypatch.setenv("WSE_MAX_JOBS", "16")
    assert runtime._job_workers() == 1

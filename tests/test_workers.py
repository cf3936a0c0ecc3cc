"""Analyses in worker processes: the work runs in another PID, results and progress come
back to the job, a stop ends the worker's job within seconds, and no worker outlives the
process that started it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from analysis.errors import AnalysisCancelled, InputError
from analysis.pair_metrics import AnalysisSettings
from hosting import workers
from hosting.jobs import JobManager, JobState, Progress, Work, comparison_job, comparison_work
from tests.servers import REPO


def _slow(job, *, steps: int, heed_stop: bool = True) -> int:
    """Work that takes ``steps`` tenths of a second, reporting each."""
    for i in range(steps):
        if heed_stop and job.should_stop():
            raise AnalysisCancelled(f"stopped after {i} steps")
        time.sleep(0.1)
        job.report(Progress(i + 1, steps, f"step {i}", 0.1 * (i + 1)))
        job.publish(i)
    return os.getpid()


def _bad_input(job) -> None:
    raise InputError("my-model", "has no weights")


def _bug(job) -> None:
    raise ZeroDivisionError("division by zero")


@pytest.fixture(scope="module")
def manager():
    m = JobManager(max_workers=1, processes=True)
    yield m
    m.shutdown()


def test_an_analysis_runs_in_a_worker_process_with_the_same_results(
    manager: JobManager, tiny_bert: Path, tiny_bert_lora: Path, tmp_path: Path
) -> None:
    from analysis.specs import SpecResolver

    assert manager.workers.pids() == []  # started lazily: nothing before the first job
    settings = AnalysisSettings()
    work = comparison_work(str(tmp_path / "a"), True, str(tiny_bert), str(tiny_bert_lora), settings=settings)
    job = manager.submit("compare", work, label="lora", watcher="tab")
    assert job.wait(240), job.state
    assert job.state is JobState.DONE, job.error
    assert job.worker_pid is not None and job.worker_pid != os.getpid()
    assert manager.workers.pids() == [job.worker_pid]
    assert len(job.items()) == len(job.result.matrices) > 0  # published one by one
    assert job.plan is not None and job.plan.matrices == []  # the plan without its loaders
    assert job.progress.done == job.progress.total == len(job.result.matrices)

    local = JobManager(max_workers=1)  # the same work on a thread of this process
    try:
        resolver = SpecResolver(allow_local_paths=True)
        there = local.submit("x", comparison_job(resolver, str(tiny_bert), str(tiny_bert_lora), settings=settings))
        assert there.wait(240) and there.state is JobState.DONE
    finally:
        local.shutdown()
    assert there.worker_pid is None
    for a, b in zip(job.result.matrices, there.result.matrices, strict=True):
        assert a.id == b.id
        for field in ("tuned_singular_values", "intruder_scores", "similarity", "delta_singular_values"):
            assert getattr(a, field).tobytes() == getattr(b, field).tobytes(), (a.id, field)


def test_workers_yield_the_cores_to_the_pages(manager: JobManager) -> None:
    """A busy machine serves the web process (pages, health checks) before the analyses."""
    job = manager.submit("niceness", Work(_slow, {"steps": 1}), watcher="tab")
    assert job.wait(120) and job.state is JobState.DONE, job.error
    (pid,) = manager.workers.pids()
    assert psutil.Process(pid).nice() == psutil.Process().nice() + workers.WORKER_NICENESS


def test_progress_results_errors_and_a_stop_reach_the_job(manager: JobManager) -> None:
    job = manager.submit("slow", Work(_slow, {"steps": 5}))
    assert job.wait(120) and job.state is JobState.DONE
    assert job.result == job.worker_pid != os.getpid()
    assert job.items() == [0, 1, 2, 3, 4] and job.progress.done == 5

    bad = manager.submit("bad", Work(_bad_input))
    assert bad.wait(60) and bad.state is JobState.FAILED
    assert bad.error == "my-model: has no weights"
    bug = manager.submit("bug", Work(_bug))
    assert bug.wait(60) and bug.state is JobState.FAILED
    assert bug.error == "internal error (ZeroDivisionError: division by zero)"

    long = manager.submit("long", Work(_slow, {"steps": 600}), watcher="tab")
    while not long.items():
        time.sleep(0.05)
    pid = long.worker_pid
    asked = time.monotonic()
    assert long.unwatch("tab")  # the last watcher left
    assert long.wait(10)
    assert long.state is JobState.CANCELLED and time.monotonic() - asked < 3
    again = manager.submit("after", Work(_slow, {"steps": 1}))
    assert again.wait(60) and again.result == pid  # the worker was kept and reused


def test_a_worker_that_does_not_stop_is_killed_and_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workers, "STOP_GRACE_S", 3.0)
    manager = JobManager(max_workers=1, processes=True)
    try:
        job = manager.submit("stubborn", Work(_slow, {"steps": 600, "heed_stop": False}), watcher="tab")
        while not job.items():
            time.sleep(0.05)
        pid = job.worker_pid
        asked = time.monotonic()
        job.unwatch("tab")
        assert job.wait(workers.STOP_GRACE_S + 10)
        assert job.state is JobState.CANCELLED
        assert time.monotonic() - asked < workers.STOP_GRACE_S + 3
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        after = manager.submit("after", Work(_slow, {"steps": 1}))
        assert after.wait(120) and after.state is JobState.DONE and after.result != pid
    finally:
        manager.shutdown()
    assert manager.workers.pids() == []


def test_no_worker_outlives_its_server() -> None:
    """Workers end with a normal exit (atexit) and when their parent is killed outright."""
    script = textwrap.dedent(
        """
        import os, signal, sys, time
        from hosting.jobs import JobManager, Work
        from tests.test_workers import _slow
        manager = JobManager(max_workers=2, processes=True)
        manager.workers.start()
        job = manager.submit("k", Work(_slow, {"steps": 3000}))
        while not job.items():
            time.sleep(0.05)
        print(" ".join(map(str, manager.workers.pids())), flush=True)
        if sys.argv[1] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        """  # "exit": the job still runs; exit must not wait for it
    )
    for how in ("exit", "kill"):
        started = time.monotonic()
        run = subprocess.run([sys.executable, "-c", script, how], cwd=REPO, capture_output=True, text=True, timeout=180)
        pids = [int(p) for p in run.stdout.split()]
        assert len(pids) == 2, run.stderr[-2000:]
        assert time.monotonic() - started < 120, "exit waited for the running job (3000 steps: 300 s)"
        deadline = time.monotonic() + 10
        while any(_running(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_running(p) for p in pids), (how, pids)


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _mitigated_here(tmp_path: Path, base: str, tuned: str, settings):
    """The same mitigation made in this process (the reference for a worker's): its resolver and job."""
    from hosting.jobs import server_resolver
    from hosting.mitigation_jobs import mitigation_job

    resolver = server_resolver(str(tmp_path / "here"), True)
    local = JobManager()
    try:
        here = local.submit("m", mitigation_job(resolver, base, tuned, settings, tradeoff=False))
        assert here.wait(240) and here.state is JobState.DONE, here.error
    finally:
        local.shutdown()
    return resolver, here


def test_a_mitigation_from_a_worker_exports_as_one_made_here(
    manager: JobManager, tiny_bert: Path, tiny_bert_lora: Path, tmp_path: Path
) -> None:
    from analysis.mitigation import MitigationSettings, export_adapter
    from hosting.mitigation_jobs import mitigation_work

    settings = MitigationSettings(eps=0.9)
    base, tuned = str(tiny_bert), str(tiny_bert_lora)
    work = mitigation_work(str(tmp_path / "w"), True, base, tuned, settings, tradeoff=False)
    job = manager.submit("mitigate", work)
    assert job.wait(240) and job.state is JobState.DONE, job.error
    assert job.worker_pid != os.getpid()
    resolver, here = _mitigated_here(tmp_path, base, tuned, settings)
    assert job.result.mitigation.totals() == here.result.mitigation.totals()
    assert job.result.mitigation.totals()["intruders_scaled"] > 0
    for name, result in (("worker", job.result), ("here", here.result)):
        export_adapter(result.mitigation, resolver, tuned, tmp_path / name)
    files = sorted(p.name for p in (tmp_path / "here").iterdir())
    for file in files:
        assert (tmp_path / "worker" / file).read_bytes() == (tmp_path / "here" / file).read_bytes(), file


def test_a_full_fine_tune_mitigation_comes_back_from_a_worker(
    manager: JobManager, tiny_bert: Path, tiny_bert_full_ft: Path, tmp_path: Path
) -> None:
    """A full fine-tune's plan holds its opened sources (closures over open files): the
    mitigation sent back from the worker must leave them behind, as it leaves the loaders
    (it failed with "Can't pickle local object 'WeightSource.__init__.<locals>.<lambda>'"
    on the Mitigate page for every full fine-tune). The merged export equals one made here."""
    from analysis.mitigation import MitigationSettings, export_merged
    from hosting.mitigation_jobs import mitigation_work

    settings = MitigationSettings(eps=0.9)
    base, tuned = str(tiny_bert), str(tiny_bert_full_ft)
    work = mitigation_work(str(tmp_path / "w"), True, base, tuned, settings, tradeoff=False)
    job = manager.submit("mitigate-full", work)  # not the adapter test's job
    assert job.wait(240) and job.state is JobState.DONE, job.error
    resolver, here = _mitigated_here(tmp_path, base, tuned, settings)
    assert job.result.mitigation.kind == "full"
    assert job.result.mitigation.totals() == here.result.mitigation.totals()
    assert job.result.mitigation.totals()["intruders_scaled"] > 0
    for name, result in (("worker", job.result), ("here", here.result)):
        export_merged(result.mitigation, resolver, base, tuned, tmp_path / name)
    files = sorted(p.name for p in (tmp_path / "here").iterdir())
    assert "model.safetensors" in files
    for file in files:
        assert (tmp_path / "worker" / file).read_bytes() == (tmp_path / "here" / file).read_bytes(), file

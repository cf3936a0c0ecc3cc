"""Worker processes: where a job's work runs, outside the web server's process.

A :class:`WorkerPool` keeps up to ``size`` Python processes (started lazily, on
the first job; each then stays up and keeps its imports and open caches for the next
job). :meth:`WorkerPool.run` hands one picklable job function to an idle worker and,
on the calling thread, reads what the worker sends back until the job ends: that
thread is the job's one poller, whoever watches the job.

The channel between the two is a socket pair wrapped as a
:class:`multiprocessing.connection.Connection`, carrying small pickled messages:

- worker to web: ``("pid", pid)``, ``("progress", p)``, ``("plan", plan)``,
  ``("item", result)``, and one end message ``("done", value)``, ``("failed", text)``,
  ``("internal", text)`` or ``("cancelled", text)``;
- web to worker: ``("run", fn, environment)`` (the job and the web process's settings,
  :data:`SHARED_ENVIRONMENT`), ``("stop",)`` and ``None`` (shut down).

Heavy data stays on disk: every spectrum a worker computes is stored in the
content-addressed cache (:mod:`analysis.cache`) by the pipeline itself; what crosses the
pipe are the per-matrix results (scores and thinned spectra, a few kB each) and progress.

A stop (nobody watches the job any more) is a message the worker's listener thread turns
into ``should_stop()``; the pipeline checks it between steps. A worker that has not ended
its job :data:`STOP_GRACE_S` seconds after being asked is killed and replaced, so a stop
never waits long on one huge SVD. A worker whose web process has gone (the pipe closes: the
server stopped, even by ``SIGKILL``) exits at once; on a normal exit the pool is shut
down by :mod:`atexit` as well, so no worker outlives the server.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import pickle
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from analysis.errors import AnalysisCancelled, InputError

log = logging.getLogger(__name__)

#: The repository root, where a worker process starts (so it imports this checkout).
ROOT = Path(__file__).resolve().parent.parent

#: Seconds a worker asked to stop may take to end its job before it is killed. The pipeline
#: stops between matrices and keeps (caches) the ones it finished; one large matrix on a
#: busy machine can take longer than a few seconds, and killing it loses that work.
STOP_GRACE_S = 20.0
#: Seconds between two looks at a job's stop flag while its worker is silent.
POLL_S = 0.2


def put(conn: Connection, message: Any) -> None:
    """Send ``message`` pickled by value.

    Plain :mod:`pickle`: :meth:`Connection.send` would hand torch tensors over as shared
    memory, which needs a :mod:`multiprocessing` parent.
    """
    conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def get(conn: Connection) -> Any:
    """The next message :func:`put` sent (``EOFError`` once the other side has gone)."""
    return pickle.loads(conn.recv_bytes())


class WorkerJob:
    """What a job function sees inside a worker: the job's writing side, over the pipe.

    The same interface as :class:`hosting.jobs.Job` offers a function running on a
    thread: ``report``, ``publish``, ``plan`` and ``should_stop``. Safe to call from any
    thread of the worker (the pipeline reports progress from its own threads).
    """

    def __init__(self, conn: Connection, lock: threading.Lock, stop: threading.Event) -> None:
        self._conn, self._lock, self._stop = conn, lock, stop
        self._plan: Any = None

    def send(self, message: tuple) -> None:
        """Send one message to the web process."""
        with self._lock:
            put(self._conn, message)

    def report(self, progress: Any) -> None:
        """Send the job's progress."""
        self.send(("progress", progress))

    def publish(self, item: Any) -> None:
        """Send one result as soon as it is there."""
        self.send(("item", item))

    @property
    def plan(self) -> Any:
        """The plan the job function set (kept here as set, sent without its loaders)."""
        return self._plan

    @plan.setter
    def plan(self, plan: Any) -> None:
        self._plan = plan
        self.send(("plan", portable_plan(plan)))

    def should_stop(self) -> bool:
        """Whether the web process asked the job to stop."""
        return self._stop.is_set()


def portable_plan(plan: Any) -> Any:
    """``plan`` as the web process needs it.

    A comparison plan without its matrices' loaders and its opened models (closures over
    open files, which neither pickle nor belong in the web process).
    """
    if dataclasses.is_dataclass(plan) and hasattr(plan, "matrices"):
        return dataclasses.replace(plan, matrices=[], **({"sources": None} if hasattr(plan, "sources") else {}))
    return plan


#: What the job manager's workers import before their first job: the engine
#: (``hosting.jobs``) and transformers' modelling core, which planning a model type not seen
#: before needs (:mod:`analysis.layouts` builds it on the meta device): about 2 s a process
#: that the first job's visitors would otherwise wait for.
WARM = ("hosting.jobs", "transformers.modeling_utils", "transformers.conversion_mapping")


def _worker_main(conn: Connection, warm: tuple[str, ...]) -> None:  # pragma: no cover - in the worker
    """A worker's life: import ``warm``, then run the jobs sent, one at a time, until told to stop."""
    import importlib

    for module in warm:
        try:
            importlib.import_module(module)
        except ImportError:  # the job that needs it says so
            pass
    lock = threading.Lock()
    tasks: queue.Queue = queue.Queue()
    current: list[threading.Event] = [threading.Event()]

    def listen() -> None:
        while True:
            try:
                message = get(conn)
            except (EOFError, OSError):  # the web process is gone: end now, whatever runs
                os._exit(0)
            if message is None:
                tasks.put(None)
                return
            if message[0] == "stop":
                current[0].set()
            else:
                tasks.put(message)

    threading.Thread(target=listen, name="wse-worker-listen", daemon=True).start()
    with lock:
        put(conn, ("pid", os.getpid()))
    while (message := tasks.get()) is not None:
        _, fn, environment = message
        _adopt(environment)
        stop = threading.Event()
        current[0] = stop
        job = WorkerJob(conn, lock, stop)
        outcome = _outcome(fn, job)
        try:
            job.send(outcome)
        except Exception as exc:  # a value that does not pickle: a bug, said as one
            job.send(("internal", f"its result could not be sent from the worker ({type(exc).__name__}: {exc})"))
    conn.close()


#: The environment variables a job runs under as the web process had them when it asked
#: (the dashboard's settings; tests change them between jobs).
SHARED_ENVIRONMENT = ("WSE_", "HF_", "TRANSFORMERS_")


def _environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(SHARED_ENVIRONMENT)}


def _adopt(environment: dict[str, str]) -> None:  # pragma: no cover - in the worker
    """Take the web process's settings (:data:`SHARED_ENVIRONMENT`) for the next job."""
    for key in [k for k in os.environ if k.startswith(SHARED_ENVIRONMENT) and k not in environment]:
        del os.environ[key]
    os.environ.update(environment)
    import sys

    hub = sys.modules.get("huggingface_hub.constants")  # read once, at import
    if hub is not None:
        hub.HF_HUB_CACHE = environment.get("HF_HUB_CACHE", hub.HF_HUB_CACHE)
        hub.HF_HUB_OFFLINE = environment.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _outcome(fn: Callable[[WorkerJob], Any], job: WorkerJob) -> tuple[str, Any]:  # pragma: no cover - in the worker
    try:
        return ("done", fn(job))
    except AnalysisCancelled as exc:
        return ("cancelled", str(exc) or "cancelled")
    except InputError as exc:
        return ("failed", str(exc))
    except Exception as exc:  # a bug, not the user's fault: the web process says so and logs it
        log.exception("job failed in worker %d", os.getpid())
        return ("internal", f"{type(exc).__name__}: {exc}")


class Worker:
    """One worker process and the web side of its channel.

    Started as ``python -c "from hosting.workers import serve; serve()"`` with one end of a
    socket pair, not through :mod:`multiprocessing`'s spawn: that re-runs the parent's
    ``__main__``, which under ``streamlit run`` is ``app.py`` itself.
    """

    def __init__(self, warm: tuple[str, ...] = ()) -> None:
        ours, theirs = socket.socketpair()
        root = str(ROOT)
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-c", "from hosting.workers import serve; serve()", str(theirs.fileno()), *warm],
                pass_fds=(theirs.fileno(),), cwd=root, env={**os.environ, "PYTHONPATH": path},
                stdin=subprocess.DEVNULL,
            )  # fmt: skip
        finally:
            theirs.close()
        self.conn = Connection(ours.detach())
        self.pid = self.process.pid
        self.warm = tuple(warm)

    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.process.poll() is None

    @property
    def exitcode(self) -> int | None:
        """The process's exit status once it has ended."""
        return self.process.poll()

    def kill(self) -> None:
        """End the process now (a stop it did not heed, or shutdown)."""
        try:
            self.process.kill()
            self.process.wait(5)
        except (OSError, subprocess.TimeoutExpired):  # pragma: no cover
            pass
        finally:
            self.conn.close()

    def close(self, timeout: float = 5.0) -> None:
        """Ask the process to end after its job, wait ``timeout`` seconds, then kill it."""
        try:
            put(self.conn, None)
            self.process.wait(timeout)
        except (OSError, ValueError, subprocess.TimeoutExpired):
            self.kill()
        else:
            self.conn.close()


#: How much lower than the web process's a worker's CPU priority is (``nice``): when the
#: cores are busy the pages' process is served first, so pages, health checks and polls stay
#: quick while analyses run; an analysis on an otherwise idle machine runs as fast as before.
WORKER_NICENESS = 5


def serve() -> None:  # pragma: no cover - the worker process's entry point
    """A worker process: ``argv[1]`` is its end of the channel, the rest modules to import."""
    logging.basicConfig(level=logging.WARNING)
    try:
        os.nice(WORKER_NICENESS)
    except (AttributeError, OSError):  # no nice on this platform: same priority as the pages
        pass
    _worker_main(Connection(int(sys.argv[1])), tuple(sys.argv[2:]))


#: Workers started by :func:`prestart`, waiting for the pool that adopts them.
_early: list[Worker] = []
_early_lock = threading.Lock()


def prestart(size: int, warm: tuple[str, ...]) -> None:
    """Start ``size`` workers importing ``warm`` now, for the :class:`WorkerPool` made later.

    The dashboard calls it first thing on a server's first page run, so the workers import
    torch while the web process imports the rest of itself (on a cold server both take
    seconds). Once per process; a pool with the same ``warm`` adopts them.
    """
    with _early_lock:
        if getattr(prestart, "done", False):
            return
        prestart.done = True  # type: ignore[attr-defined]
        _early.extend(Worker(warm) for _ in range(max(1, size)))
        try:
            threading._register_atexit(_close_early)
        except (AttributeError, RuntimeError):  # pragma: no cover
            atexit.register(_close_early)


def _close_early() -> None:
    with _early_lock:
        workers = list(_early)
        _early.clear()
    for worker in workers:
        worker.close(2.0)


def _early_worker(warm: tuple[str, ...]) -> Worker | None:
    with _early_lock:
        for worker in _early:
            if worker.warm == warm:
                _early.remove(worker)
                return worker
    return None


@dataclasses.dataclass
class Outcome:
    """How a job ended in its worker.

    ``state`` (done, failed, internal, cancelled, lost), the returned ``value`` or the
    error ``text``, and the worker's ``pid``.
    """

    state: str
    value: Any = None
    text: str = ""
    pid: int | None = None


class WorkerPool:
    """Up to ``size`` worker processes, spawned when first needed.

    Parameters
    ----------
    size : int
        Processes at most (the dashboard: ``WSE_MAX_JOBS``, one job per process).
    warm : tuple of str
        Modules each worker imports before it says it is ready (the job functions' own),
        so a job's time is not spent importing torch.
    """

    def __init__(self, size: int, warm: tuple[str, ...] = ()) -> None:
        self.size = max(1, int(size))
        self.warm = tuple(warm)
        self._idle: list[Worker] = []
        self._all: list[Worker] = []
        self._lock = threading.Lock()
        self._slots = threading.Semaphore(self.size)
        self._closed = False
        # Before the interpreter joins its threads at exit: a job's poller (a thread of the
        # job manager's executor, which exit waits for) ends when its worker is gone.
        try:
            threading._register_atexit(self.shutdown)
        except (AttributeError, RuntimeError):  # pragma: no cover - another Python, or exiting
            atexit.register(self.shutdown)

    def pids(self) -> list[int]:
        """The process ids of the workers running now."""
        with self._lock:
            return [w.pid for w in self._all if w.alive()]

    def start(self) -> None:
        """Spawn every worker now (the server warms the pool so the first job waits less)."""
        workers = [self._acquire() for _ in range(self.size)]
        for worker in workers:
            self._release(worker)

    def run(self, fn: Callable, sink: Any) -> Outcome:
        """Run ``fn`` in a worker; pass its messages to ``sink`` until it ends.

        ``sink`` is the job as the web process keeps it (``report``, ``publish``, a
        ``plan`` attribute, ``should_stop()``); this thread polls its stop flag and passes
        a stop on to the worker, killing it after :data:`STOP_GRACE_S` if it does not end.
        """
        worker = self._acquire()
        keep = False
        if hasattr(sink, "worker_pid"):
            sink.worker_pid = worker.pid
        try:
            put(worker.conn, ("run", fn, _environment()))
            outcome, keep = self._pump(worker, sink)
            outcome.pid = worker.pid
            return outcome
        except (OSError, ValueError, EOFError) as exc:  # the worker died under us
            return Outcome("lost", text=f"the worker process ended ({type(exc).__name__})", pid=worker.pid)
        finally:
            if keep:
                self._release(worker)
            else:
                self._discard(worker)

    def _pump(self, worker: Worker, sink: Any) -> tuple[Outcome, bool]:
        stopped_at: float | None = None
        while True:
            if worker.conn.poll(POLL_S):
                try:
                    kind, *payload = get(worker.conn)
                except (EOFError, OSError):
                    code = worker.exitcode
                    return Outcome("lost", text=f"the worker process ended (exit code {code})"), False
                if kind == "progress":
                    sink.report(payload[0])
                elif kind == "item":
                    sink.publish(payload[0])
                elif kind == "plan":
                    sink.plan = payload[0]
                elif kind == "done":
                    return Outcome("done", value=payload[0]), True
                elif kind in ("failed", "internal", "cancelled"):
                    return Outcome(kind, text=payload[0]), True
            elif not worker.alive():
                return Outcome("lost", text=f"the worker process ended (exit code {worker.exitcode})"), False
            if sink.should_stop():
                if stopped_at is None:
                    stopped_at = time.monotonic()
                    put(worker.conn, ("stop",))
                elif time.monotonic() - stopped_at > STOP_GRACE_S:
                    log.warning("worker %d did not stop within %.0f s: killed", worker.pid, STOP_GRACE_S)
                    return Outcome("cancelled", text="cancelled (its worker was stopped)"), False

    def _acquire(self) -> Worker:
        self._slots.acquire()
        with self._lock:
            if self._closed:
                self._slots.release()
                raise RuntimeError("the worker pool is shut down")
            while self._idle:
                worker = self._idle.pop()
                if worker.alive():
                    return worker
                self._all.remove(worker)
        try:
            worker = _early_worker(self.warm) or Worker(self.warm)
            kind, pid = get(worker.conn)  # ready: its imports are done
        except BaseException:
            self._slots.release()
            raise
        log.info("worker process %d started", pid)
        with self._lock:
            self._all.append(worker)
        return worker

    def _release(self, worker: Worker) -> None:
        with self._lock:
            if self._closed:
                worker.close()
            else:
                self._idle.append(worker)
        self._slots.release()

    def _discard(self, worker: Worker) -> None:
        worker.kill()
        with self._lock:
            if worker in self._all:
                self._all.remove(worker)
        self._slots.release()

    def shutdown(self, timeout: float = 5.0) -> None:
        """End every worker.

        Idle ones are asked to (``timeout`` seconds, then killed), busy ones are killed at
        once (their jobs end as failed, their pollers return).
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            workers, idle, self._all, self._idle = list(self._all), list(self._idle), [], []
        for worker in workers:
            if worker in idle:
                worker.close(timeout)
            else:
                worker.kill()

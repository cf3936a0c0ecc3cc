"""Scale-out on a Ray cluster: the same analysis, its matrix pairs spread over many workers.

The driver (the command line with ``--ray``, or the dashboard's job manager with
``WSE_RAY_ADDRESS``) plans every comparison as a local run does -- so bad input is the
same one-line :class:`~analysis.errors.InputError` before any work starts -- and splits
the plans into Ray tasks. Nothing heavy travels through the driver:

- A task is *names*, not tensors: the source specs (:class:`PlanRequest`: hub ids, or
  paths every node can read) and, per pair, its index in the plan with the matrix's key
  (tensor name, plus ``#<expert>`` for one expert of a fused 3-D tensor: many matrices
  share such a name) and shape. The worker plans the comparison again from the specs
  (headers only; once per run and worker process, see :func:`_worker_plan`), takes the
  matrix at that index, checks it is the same one, and reads its weights itself.
- A task is one base matrix with its pair in every fine-tune that has it (the large
  ones), or several consecutive small base matrices with theirs, so a base's
  decomposition is computed once for every fine-tune: the first pair stores it in the
  cache the task uses, the others read it there (cache keys are content digests,
  :func:`analysis.pipeline.analyse_pair`). A task asks Ray for one GPU where the
  cluster has GPUs, else for ``cpus_per_task`` CPUs.
- Each pair runs :func:`analysis.pipeline.analyse_pair`, the very function a local run
  uses, so results equal the local engine's field by field; only results come back.

Where results are cached (docs/ray.md):

- ``shared``: the workers use the driver's cache folder directly (digests, base
  spectra, pair results, file locks against computing one entry twice). Automatic on a
  one-machine Ray; on a cluster set ``WSE_RAY_SHARED_CACHE=1`` when ``WSE_CACHE_DIR``
  (or ``--cache-dir``) is on storage every node mounts at the same path.
- ``driver`` (otherwise): each node keeps digests and base spectra in a node-local cache
  (``WSE_RAY_NODE_CACHE``, default ``<tmp>/wse-ray-cache``), and the driver writes every
  pair's result into its own cache as the task returns it.
- ``none``: ``--no-cache``; nothing is stored anywhere.

Behaviour matches a local run: progress and partial results as tasks finish
(``ray.wait``); ``should_stop`` cancels every outstanding task (``ray.cancel``) and
keeps what finished; a task whose worker dies is retried (``max_retries``).

Ray is imported only here and only when a run asks for it; ``./run.sh`` never needs it.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from analysis.cache import SpectrumCache
from analysis.config import env_folder, env_switch
from analysis.errors import AnalysisCancelled, InputError
from analysis.model_sparsity import add_whole_model_sparsity
from analysis.pair_metrics import checked_settings
from analysis.pipeline import (
    AnalysisSettings,
    ProgressCallback,
    ProgressEvent,
    analyse_pair,
    model_result,
)
from analysis.plan import ComparisonPlan, MatrixPlan
from analysis.results import DEFAULT_EPSILONS, DEFAULT_TOP_K, ComparisonResult, MatrixResult
from analysis.specs import SpecResolver, default_demo_root

#: The least work a task gets, as the cost ``m * n * min(m, n)`` of its pairs (the flops of
#: their decompositions up to a constant): a 512 x 512 pair, some 0.1 s on one CPU core,
#: against a task's overhead of a few milliseconds (``python -m benchmarks.run --workload
#: ray``). A base matrix whose pairs cost more gets a task of its own; smaller ones are
#: grouped.
MIN_TASK_COST = 512**3
#: Tasks per slot (GPU or CPU task at once) the small matrices are grouped into, so the
#: slots stay busy to the end and progress moves often.
TASKS_PER_SLOT = 8
#: Retries of a task whose worker process or node died (Ray's ``max_retries``).
MAX_RETRIES = 3
#: How often (seconds) the driver polls ``should_stop`` while it waits for tasks.
POLL_S = 0.1


@dataclass(frozen=True)
class PlanRequest:
    """What a worker needs to plan one comparison again: specs, never tensors.

    ``resolver`` (a :class:`~analysis.specs.SpecResolver`) is set for the dashboard's
    ``demo:`` and ``upload:`` specs; its folders must be readable on every node. Without
    it the specs are opened as the command line does (:meth:`analysis.specs.SpecResolver.plan_models`).
    """

    base: str
    tuned: str
    include_non_block: bool = False
    allow_local_paths: bool = True
    resolver: Any = field(default=None, compare=False, hash=False)

    def key(self) -> tuple:
        """What identifies the plan on a worker (the resolver by its folders)."""
        r = self.resolver
        where = None if r is None else (str(r.uploads.root), str(r.demo_root), r.allow_local_paths)
        return (self.base, self.tuned, self.include_non_block, self.allow_local_paths, where)

    def plan(self) -> ComparisonPlan:
        """Plan the comparison from the specs, with ``resolver`` or as the command line does."""
        if self.resolver is not None:
            return self.resolver.plan(self.base, self.tuned, include_non_block=self.include_non_block)
        (plan,) = SpecResolver(allow_local_paths=self.allow_local_paths).plan_models(
            self.base, [self.tuned], include_non_block=self.include_non_block
        )
        return plan


def dashboard_request(resolver, base: str, tuned: str) -> PlanRequest:
    """A :class:`PlanRequest` for the dashboard's specs, its demo folder fixed at the driver.

    A worker's own ``WSE_CACHE_DIR`` must not decide what ``demo:base`` names.
    """
    pinned = replace(resolver, demo_root=resolver.demo_root or default_demo_root())
    return PlanRequest(base, tuned, allow_local_paths=pinned.allow_local_paths, resolver=pinned)


# -- connecting ----------------------------------------------------------------------------


def connect(address: str | None) -> None:
    """Join (or start) the Ray cluster ``address`` names, once per process.

    ``local`` starts a Ray instance on this machine (no dashboard); ``auto`` joins the
    cluster that ``RAY_ADDRESS`` names (or one running here); anything else is a Ray
    address (``ray://host:10001``, ``host:6379``). ``None``: Ray must be running in this
    process already (tests). An unreachable cluster is an :class:`InputError`.
    """
    ray_settings()  # a typo is one line before any cluster is joined or started
    try:
        import ray
    except ImportError:
        raise InputError("--ray", "Ray is not installed here: pip install ray==2.60.0") from None
    with _connect_lock:  # two dashboard jobs may start at once
        if not ray.is_initialized():
            _init(ray, address)


_connect_lock = threading.Lock()


def _init(ray, address: str | None) -> None:
    if address is None:
        raise InputError("--ray", "no Ray address given and Ray is not running in this process")
    target = os.environ.get("RAY_ADDRESS", "") if address == "auto" else address
    if address != "local" and target and target != "auto":
        _check_reachable(address, target)
    try:
        if address == "local":
            ray.init(include_dashboard=False, logging_level="warning", log_to_driver=False)
        else:
            ray.init(address=address, logging_level="warning", log_to_driver=False)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"--ray {address}", f"cannot join the Ray cluster: {first}") from None


#: Seconds to wait for a cluster's port to answer before calling it unreachable (Ray
#: itself keeps retrying for minutes).
CONNECT_TIMEOUT_S = 10.0


def _check_reachable(given: str, target: str) -> None:
    """Fail fast, as bad input, when nothing listens at ``target`` (``[ray://]host:port``)."""
    import socket

    hostport = target.removeprefix("ray://").rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise InputError(f"--ray {given}", f"expected local, auto or an address like ray://host:10001, got {target!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        problem = f"cannot reach the Ray cluster at {hostport}: {exc.strerror or exc}"
        raise InputError(f"--ray {given}", problem) from None


def _single_local_node() -> bool:
    """The cluster is this machine alone (so a cache folder here is shared by every worker)."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return len(nodes) == 1 and nodes[0].get("NodeManagerAddress") == ray.util.get_node_ip_address()


def ray_settings() -> tuple[bool | None, str | None]:
    """``WSE_RAY_SHARED_CACHE`` and ``WSE_RAY_NODE_CACHE``, checked.

    The first is a yes/no switch (``None``: unset or ``auto``, decided by
    :func:`cache_mode`), the second an absolute folder, the same path on every node
    (``None``: unset). A bad value of either raises :class:`InputError` naming it.
    """
    node_cache = env_folder("WSE_RAY_NODE_CACHE", absolute=True)
    return env_switch("WSE_RAY_SHARED_CACHE"), None if node_cache is None else str(node_cache)


def cache_mode(cache: SpectrumCache | None) -> str:
    """``none``, ``shared`` or ``driver`` (module docstring)."""
    if cache is None:
        return "none"
    shared = ray_settings()[0]
    if shared is None:
        shared = _single_local_node()
    return "shared" if shared else "driver"


def node_cache_dir(chosen: str | None = None) -> Path:
    """Where a worker keeps digests and base spectra in ``driver`` mode.

    ``chosen`` (the driver's ``WSE_RAY_NODE_CACHE``, the same path on every node), else
    ``<tmp>/wse-ray-cache``.
    """
    return Path(chosen).expanduser() if chosen else Path(tempfile.gettempdir()) / "wse-ray-cache"


# -- the tasks ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """One Ray task: ``pairs`` are ``(model index, matrix index)`` in the driver's plans."""

    pairs: tuple[tuple[int, int], ...]
    cost: int


def _cost(matrix: MatrixPlan) -> int:
    m, n = matrix.shape
    return m * n * min(m, n)


def split(plans: Sequence[ComparisonPlan], slots: int) -> list[Task]:
    """Ray tasks for ``plans``: each base matrix with its pairs in every fine-tune.

    Base matrices whose pairs together reach a target -- a slot's share of the work
    (:data:`TASKS_PER_SLOT` tasks per slot), but at least :data:`MIN_TASK_COST` -- get a
    task of their own; smaller ones are grouped in plan order until a group reaches it.
    Tasks come largest first, so the long ones start early and the small ones fill the
    gaps at the end.
    """
    by_name: dict[str, list[tuple[int, int]]] = {}
    for m, plan in enumerate(plans):
        for i, matrix in enumerate(plan.matrices):
            by_name.setdefault(_identity(matrix), []).append((m, i))
    costs = {name: sum(_cost(plans[m].matrices[i]) for m, i in pairs) for name, pairs in by_name.items()}
    total = sum(costs.values())
    target = max(MIN_TASK_COST, total // max(1, TASKS_PER_SLOT * slots))
    tasks: list[Task] = []
    group: list[tuple[int, int]] = []
    group_cost = 0
    for name, pairs in by_name.items():
        if costs[name] >= target:
            tasks.append(Task(tuple(pairs), costs[name]))
            continue
        group.extend(pairs)
        group_cost += costs[name]
        if group_cost >= target:
            tasks.append(Task(tuple(group), group_cost))
            group, group_cost = [], 0
    if group:
        tasks.append(Task(tuple(group), group_cost))
    return sorted(tasks, key=lambda t: -t.cost)


def _identity(matrix: MatrixPlan) -> str:
    """What names a matrix across plans of the same base.

    Its base tensor name (and, where pairing sets one, the expert of a fused expert tensor).
    """
    expert = getattr(matrix, "expert", None)
    return matrix.name if expert is None else f"{matrix.name}#{expert}"


_plans_lock = threading.Lock()
_plans: dict[tuple, ComparisonPlan] = {}
_PLANS_KEPT = 16


def _worker_plan(run: str, request: PlanRequest) -> ComparisonPlan:
    """``request.plan()`` once per run and worker process.

    A worker runs many tasks of a run; a later run plans again, so files rewritten in
    between are seen.
    """
    key = (run, request.key())
    with _plans_lock:
        plan = _plans.get(key)
    if plan is None:
        plan = request.plan()
        with _plans_lock:
            while len(_plans) >= _PLANS_KEPT:
                _plans.pop(next(iter(_plans)))
            _plans[key] = plan
    return plan


def _worker_cache(task: TaskInput) -> SpectrumCache | None:
    if task.cache_mode == "none":
        return None
    if task.cache_mode == "shared":
        return SpectrumCache(task.cache_root, budget_bytes=task.cache_budget)
    return SpectrumCache(node_cache_dir(task.node_cache) / "spectra")


@dataclass(frozen=True)
class TaskInput:
    """Everything a task gets (small: strings and settings)."""

    run: str
    requests: tuple[PlanRequest, ...]
    #: ``(model index, matrix index, matrix key, shape)`` per pair: the index into the
    #: worker's plan, the key (:func:`_identity`) and shape checked against it there.
    pairs: tuple[tuple[int, int, str, tuple[int, int]], ...]
    settings: AnalysisSettings
    device: str
    threads: int
    cache_mode: str
    cache_root: str | None
    cache_budget: int | None
    node_cache: str | None = None


def run_task(task: TaskInput) -> list[tuple]:
    """A task's body (runs on a worker): analyse its pairs, return results only.

    Returns one ``("ok", model index, matrix index, MatrixResult, entries)`` per pair, where
    ``entries`` are the pair's cache entries, ``(kind, key, tensors, info)``, for the driver
    to store (``driver`` mode; else none); or a single ``("error", source, problem)`` for bad input (an exception with
    its own constructor does not survive pickling intact, so it travels as data).
    """
    threads = max(1, task.threads)
    if task.device == "cpu":
        torch.set_num_threads(threads)
    device = torch.device(task.device)
    cache = _worker_cache(task)
    out: list[tuple] = []
    # Each matrix sets its own thread counts (torch's and the BLAS libraries' outside it,
    # held for the matrix: analysis.scheduler.blas_threads) from its shape, as in a local run.
    try:
        for model, index, name, shape in task.pairs:
            request = task.requests[model]
            plan = _worker_plan(task.run, request)
            matrix = _pick(plan, index, name, shape, request)
            result, keys = analyse_pair(
                matrix, settings=task.settings, device=device, cache=cache, source=plan.tuned_label
            )
            entries = []  # the pair's entry and its measures' (issue 23)
            if task.cache_mode == "driver" and cache is not None:
                found = [(kind, key, cache.get(kind, key)) for kind, key in keys.items()]
                entries = [(kind, key, *entry) for kind, key, entry in found if entry is not None]
            out.append(("ok", model, index, result, entries))
    except InputError as exc:
        return [("error", exc.source, exc.problem)]
    return out


def _pick(plan: ComparisonPlan, index: int, name: str, shape: tuple[int, int], request: PlanRequest) -> MatrixPlan:
    """The worker's matrix ``index``, if it is the driver's (same key and shape).

    Plans of the same files list the same matrices in the same order.
    """
    if 0 <= index < len(plan.matrices):
        matrix = plan.matrices[index]
        if _identity(matrix) == name and tuple(matrix.shape) == tuple(shape):
            return matrix
    raise InputError(
        request.tuned, f"{name}: the files changed between planning and analysis on a Ray worker; run it again"
    )


# -- the driver ----------------------------------------------------------------------------


@dataclass
class RayRunStats:
    """What a run did (for tests and the benchmark): tasks submitted, finished, cancelled."""

    tasks: int = 0
    finished: int = 0
    cancelled: int = 0
    cache_mode: str = ""
    gpus: bool = False


def analyse_plans(
    plans: Sequence[ComparisonPlan],
    requests: Sequence[PlanRequest],
    *,
    settings: AnalysisSettings = AnalysisSettings(),
    device: torch.device | str = "auto",
    cache: SpectrumCache | None = None,
    progress: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_result: Callable[[int, MatrixResult], None] | None = None,
    cpus_per_task: int = 1,
    stats: RayRunStats | None = None,
) -> list[list[MatrixResult]]:
    """Analyse ``plans`` (planned by the driver from ``requests``) on the connected Ray cluster.

    Returns each plan's results in plan order. ``on_result(model index, result)`` and
    ``progress`` (per model, like :func:`analysis.pipeline.analyse_plan`) are called as
    tasks finish. When ``should_stop()`` turns true, outstanding tasks are cancelled and
    :class:`AnalysisCancelled` is raised; results that arrived were already handed to
    ``on_result``. Bad input found on a worker cancels the rest and is raised as the same
    :class:`InputError` a local run gives.
    """
    import ray

    stats = stats if stats is not None else RayRunStats()
    device = str(device)
    gpus = device != "cpu" and ray.cluster_resources().get("GPU", 0) >= 1
    if device == "cuda" and not gpus:
        raise InputError("--device cuda", "the Ray cluster has no GPU")
    slots = int(ray.cluster_resources().get("GPU" if gpus else "CPU", 1)) // (1 if gpus else max(1, cpus_per_task))
    mode = cache_mode(cache)
    stats.cache_mode, stats.gpus = mode, gpus
    run = os.urandom(8).hex()
    tasks = split(plans, max(1, slots))
    remote = ray.remote(max_retries=MAX_RETRIES, retry_exceptions=False)(run_task)
    options = {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": max(1, cpus_per_task)}
    common = dict(
        run=run,
        requests=tuple(requests),
        settings=settings,
        device="cuda" if gpus else "cpu",
        threads=max(1, cpus_per_task),
        cache_mode=mode,
        cache_root=None if cache is None else str(cache.root),
        cache_budget=None if cache is None else cache.budget_bytes,
        node_cache=ray_settings()[1],
    )
    pending = {}
    for task in tasks:
        pairs = tuple((m, i, _identity(plans[m].matrices[i]), tuple(plans[m].matrices[i].shape)) for m, i in task.pairs)
        pending[remote.options(**options).remote(TaskInput(pairs=pairs, **common))] = task
    stats.tasks = len(pending)
    results: list[list[MatrixResult | None]] = [[None] * len(plan.matrices) for plan in plans]
    done = [0] * len(plans)
    start = time.perf_counter()
    try:
        while pending:
            if should_stop is not None and should_stop():
                raise AnalysisCancelled(
                    f"cancelled after {sum(done)} of {sum(len(p.matrices) for p in plans)} matrices"
                )
            ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=POLL_S, fetch_local=True)
            for ref in ready:
                pending.pop(ref)
                outcomes = ray.get(ref)
                stats.finished += 1
                for outcome in outcomes:
                    if outcome[0] == "error":
                        raise InputError(outcome[1], outcome[2])
                    _, m, i, result, entries = outcome
                    for kind, key, tensors, info in entries if cache is not None else ():
                        cache.put(kind, key, tensors, info)
                    results[m][i] = result
                    done[m] += 1
                    if on_result is not None:
                        on_result(m, result)
                    if progress is not None:
                        plan = plans[m]
                        elapsed = time.perf_counter() - start
                        progress(ProgressEvent(plan.tuned_label, done[m], len(plan.matrices), result.name, elapsed))
    finally:
        for ref in pending:  # cancelled or failed: stop what is still queued or running
            ray.cancel(ref)
        stats.cancelled = len(pending)
    return [[r for r in model if r is not None] for model in results]


def compare(
    base: str,
    tuned: Sequence[str],
    *,
    address: str | None,
    top_k: int = DEFAULT_TOP_K,
    epsilons: Sequence[float] = DEFAULT_EPSILONS,
    device: torch.device | str = "auto",
    cache: SpectrumCache | None = None,
    progress: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    allow_local_paths: bool = True,
    include_non_block: bool = False,
    settings: AnalysisSettings | None = None,
    cpus_per_task: int = 1,
    stats: RayRunStats | None = None,
) -> ComparisonResult:
    """:func:`analysis.compare.compare` on the Ray cluster at ``address`` (:func:`connect`).

    Every fine-tune is planned here first (bad input fails before any task starts), then
    all of them are analysed together (:func:`analyse_plans`). ``cache`` is the driver's
    cache (``None``: nothing cached anywhere).
    """
    settings = checked_settings(top_k, epsilons, settings)
    plans = SpecResolver(allow_local_paths=allow_local_paths).plan_models(
        base, tuned, include_non_block=include_non_block
    )
    requests = [PlanRequest(base, t, include_non_block, allow_local_paths) for t in tuned]
    connect(address)
    matrices = analyse_plans(
        plans,
        requests,
        settings=settings,
        device=device,
        cache=cache,
        progress=progress,
        should_stop=should_stop,
        cpus_per_task=cpus_per_task,
        stats=stats,
    )
    result = ComparisonResult(base=base, top_k=top_k, epsilons=[float(e) for e in epsilons])
    result.models = [model_result(plan, found) for plan, found in zip(plans, matrices, strict=True)]
    for model, plan in zip(result.models, plans, strict=True):  # as analysis.compare.compare does
        add_whole_model_sparsity(model, plan, settings, cache)
    return result

"""The forgetting / task trade-off of intruder mitigation (Shuttleworth et al. 2024, Fig. 8).

For a model that ``transformers`` loads, :func:`evaluate_tradeoff` measures the base, the
fine-tune and the mitigated fine-tune at each lambda of a grid on two things:

- a held-out text's loss, standing for the pre-training distribution (what the model
  forgets). The text is Python's own documentation topics, ``pydoc_data.topics`` (English
  prose shipped with every CPython; the demo's task is built from function docstrings and
  leaves ``pydoc_data`` out). For a causal language model the loss is the mean next-token
  cross-entropy; for a sentence-embedding model (a sentence-transformers folder, like the
  demo's all-MiniLM-L6-v2) it is the contrastive loss the base was trained with
  (:func:`demo.contrastive_loss`, in-batch negatives) on pairs made of the two
  halves of each paragraph;
- the fine-tune's own metric where it is known: for the offline demo the held-out
  retrieval task's MRR and recall@1, computed by the demo's own evaluation.

Each point is cached by content (:data:`TRADEOFF_VERSION`, the digests of the model
folders' files, the mitigation's settings and its lambda): the base's and the fine-tune's
points serve every setting, and a revisit evaluates nothing.

Weights are swapped into a loaded model in place, so each point costs one evaluation. The
points are independent: they run side by side on the cores (:func:`evaluation_workers`),
each on its own copy of the model and one torch thread, so a point's numbers do not depend
on how many run at once (and a busy machine only slows them down: a two-thread OpenMP team
waiting for a busy core spins at its barriers, measured 1.8x slower than one thread).
"""

from __future__ import annotations

import copy
import json
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from analysis.cache import content_hasher, derived_digest
from analysis.errors import AnalysisCancelled
from analysis.layouts import ModelLayout
from analysis.mitigation.clock import EvaluationWork
from analysis.mitigation.heldout import (
    HELD_OUT_PARAGRAPHS,
    HELD_OUT_SOURCE,
    HeldOut,
    RetrievalTask,
    evaluation_workers,
    held_out_paragraphs,
    load_model,
    model_family,
)
from analysis.mitigation.procedure import Mitigation
from analysis.pairing import match_names
from analysis.plan import MatrixPlan
from analysis.specs.demo import held_out_task_path

#: The lambda grid of the trade-off curve (Fig. 8 of the paper scans the same range).
LAMBDA_GRID: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
#: How progress names the trade-off curve's steps (model evaluations, seconds each where
#: a matrix takes milliseconds: a page does not extrapolate its time left from them).
TRADEOFF_STEP = "trade-off curve"


def tradeoff_grid(lam: float) -> tuple[float, ...]:
    """:data:`LAMBDA_GRID` with the chosen ``lam``."""
    return tuple(sorted({*LAMBDA_GRID, round(float(lam), 4)}))


@dataclass
class Tradeoff:
    """Paper Fig. 8: held-out loss (forgetting) and task metric along the lambda grid.

    ``points`` are ``{"label", "lam", "loss", "task"}`` for the base (``lam`` None), the
    fine-tune (``lam`` 1) and the mitigated fine-tune at each ``lam`` of the grid; ``task``
    is ``None`` where the fine-tune's metric is not known. ``note`` says what was measured
    (or why nothing could be).
    """

    loss_name: str
    task_name: str | None
    points: list[dict]
    note: str
    seconds: float = 0.0

    def to_json(self) -> dict:
        """The curve as JSON-able data: ``loss``, ``task``, ``points``, ``note``, ``seconds``."""
        return {
            "loss": self.loss_name,
            "task": self.task_name,
            "points": self.points,
            "note": self.note,
            "seconds": self.seconds,
        }


#: Part of every cached point's key: change it when what a point measures changes.
#: 2: every matrix is placed in the loaded model or no curve is drawn (version 1 swapped
#: only the matrices whose stored name was a parameter: per-expert MoE points lacked experts).
TRADEOFF_VERSION = "2"


_digests: dict[tuple, str] = {}
_digests_lock = threading.Lock()


def folder_digest(folder: Path) -> str:
    """BLAKE3 of the names and bytes of the files directly in ``folder``.

    Those are the config, weights and tokenizer: what loading it reads. The digest is
    remembered per file version in this process.
    """
    files = sorted(p for p in folder.iterdir() if p.is_file())
    versions = []
    for path in files:
        st = path.stat()
        versions.append((path.name, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    version = (str(folder), *versions)
    with _digests_lock:
        known = _digests.get(version)
    if known is not None:
        return known
    hasher = content_hasher(b"folder\x1f", sum(v[3] for v in versions))
    for path in files:
        hasher.update(f"{path.name}\x1f{path.stat().st_size}\x1f".encode())
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 24):
                hasher.update(chunk)
    digest = hasher.hexdigest()
    with _digests_lock:
        _digests[version] = digest
    return digest


@dataclass(frozen=True)
class _Place:
    """Where a plan's matrix lives among a loaded model's parameters.

    ``param``, and in it the expert ``expert`` of a fused ``[E, ., .]`` tensor, rows (or,
    transposed, columns) block ``part`` of ``parts`` (a per-expert ``gate_proj`` inside the
    fused ``gate_up_proj``), stored transposed or not.
    """

    param: str
    expert: int | None
    part: int
    parts: int
    transposed: bool

    def view(self, tensor: torch.Tensor) -> torch.Tensor:
        """The matrix's elements inside ``tensor`` (a view: writing it writes the model)."""
        if self.expert is not None and tensor.dim() == 3:
            tensor = tensor[self.expert]
        if self.parts > 1:
            side = 1 if self.transposed else 0
            size = tensor.shape[side] // self.parts
            tensor = tensor.narrow(side, self.part * size, size)
        return tensor


def _places(plans: dict[str, MatrixPlan], params: dict, folder: Path, adapter: bool) -> dict[str, _Place]:
    """Each plan matrix's place in the loaded model (:class:`_Place`), by plan key.

    Stored names are mapped to parameters by transformers' own conversion mapping
    (:class:`~analysis.layouts.ModelLayout`, which knows that the hub's per-expert
    ``experts.3.gate_proj.weight`` is part 0 of expert 3 of the fused ``experts.gate_up_proj``),
    then matched to the parameter names; every place is checked against the plan's own
    weight (the fine-tune's, or for an adapter the base's), element for element, in either
    orientation. A matrix without a place that passes the check is left out.
    """
    layout = ModelLayout(json.loads((folder / "config.json").read_text()))
    placements = {key: layout.placement(m.name) for key, m in plans.items()}
    memory = match_names(sorted({p.memory for p in placements.values()}), list(params))
    found: dict[str, _Place] = {}
    for key, m in plans.items():
        placement = placements[key]
        param = memory.get(placement.memory)
        if param is None:
            continue
        expert = m.expert if placement.expert is None else placement.expert
        reference = m.load_base() if adapter else m.load_tuned().weight
        for transposed in (False, True):
            place = _Place(param, expert, placement.part, placement.parts, transposed)
            candidate = place.view(params[param].data)
            candidate = candidate.T if transposed else candidate
            if tuple(candidate.shape) == tuple(reference.shape) and torch.equal(candidate.float(), reference):
                found[key] = place
                break
    return found


class _NoCurve(Exception):
    """Why no trade-off curve can be measured for these models (found once they are loaded)."""


class _Steps:
    """Counts the curve's finished points for ``progress(done, total, label)``.

    The fine-tune's point also counts for the grid's lambda = 1 points, which repeat it.
    """

    def __init__(self, labels: list[str], grid: Sequence[float], progress: Callable[[int, int, str], None] | None):
        self.labels = labels
        self.total = len(labels)
        self.repeats = sum(1 for lam in grid if lam == 1.0)
        self.progress = progress
        self.done = 0
        self._lock = threading.Lock()

    def finished(self, index: int) -> None:
        with self._lock:
            self.done += 1 + (self.repeats if index == 1 else 0)
            now = self.done
        if self.progress is not None:
            self.progress(now, self.total, self.labels[index])


@dataclass
class _Bench:
    """What evaluating the points needs, loaded once (:func:`_load_bench`).

    The held-out loss, the task (or ``None``), the base model (where a point needs it), the
    model whose copies get the mitigated weights, the plan's matrices by key and their
    places in it.
    """

    held_out: HeldOut
    task: RetrievalTask | None
    base_model: torch.nn.Module | None
    template: torch.nn.Module
    plans: dict[str, MatrixPlan]
    places: dict[str, _Place]


def _load_bench(
    todo: list[int], folders: tuple[Path, Path], family: str, mitigation: Mitigation, task_file: Path | None, texts
) -> _Bench:
    """Tokenizer, held-out text, task and models for the points ``todo``.

    Raises :class:`_NoCurve` where the base has no tokenizer or a matrix has no place in the
    model.
    """
    from transformers import AutoTokenizer

    base_folder, tuned_folder = folders
    adapter = mitigation.kind == "adapter"
    tokenizer = AutoTokenizer.from_pretrained(base_folder)
    if not tokenizer("held-out text")["input_ids"]:  # transformers builds an empty one where none is stored
        raise _NoCurve(
            "No trade-off curve: the base model's folder has no tokenizer (tokenizing text gives no tokens), "
            "so its held-out loss cannot be measured."
        )
    held_out = HeldOut(tokenizer, family, texts)
    task = RetrievalTask.from_file(tokenizer, task_file) if task_file is not None else None
    base_model = load_model(base_folder, family) if 0 in todo or adapter else None
    template = base_model if adapter else load_model(tuned_folder, family)
    params = dict(template.named_parameters())
    plans = {m.key: m for m in mitigation.plan.matrices}
    places = _places(plans, params, (base_folder if adapter else tuned_folder), adapter)
    missing = [key for key in plans if key not in places]
    if missing:  # swapping only the others would show a curve for a different mitigation
        raise _NoCurve(
            f"No trade-off curve: {len(missing)} of the {len(plans)} mitigated matrices (such as {missing[0]}) were "
            "not found in the model as transformers loads it, so the curve cannot put them in."
        )
    return _Bench(held_out, task, base_model, template, plans, places)


class _Copies:
    """One model per worker thread.

    The loaded fine-tune for the first (not for an adapter, whose template is the base
    model the base's point uses), copies of it for the others.
    """

    def __init__(self, template: torch.nn.Module, adapter: bool) -> None:
        self.template = template
        self.spares = [template] if not adapter else []
        self.models = threading.local()
        self.lock = threading.Lock()

    def model(self) -> torch.nn.Module:
        if getattr(self.models, "model", None) is None:
            with self.lock:
                spare = self.spares.pop() if self.spares else None
            self.models.model = spare if spare is not None else copy.deepcopy(self.template)
        return self.models.model


def _swap_in(model: torch.nn.Module, places: dict[str, _Place], weights: Callable[[str], torch.Tensor]) -> None:
    """Write each matrix's weight (by plan key) into its place in ``model``."""
    named = dict(model.named_parameters())
    with torch.no_grad():
        for key, place in places.items():
            target = place.view(named[place.param].data)
            weight = weights(key)
            target.copy_((weight.T if place.transposed else weight).to(target.dtype))


def _evaluate_points(
    todo: list[int],
    lams: list[float | None],
    folders: tuple[Path, Path],
    family: str,
    mitigation: Mitigation,
    *,
    task_file: Path | None,
    texts: list[str],
    evaluated: dict[int, dict],
    steps: _Steps,
    should_stop: Callable[[], bool] | None,
    meta: dict[str, int],
    work: EvaluationWork | None = None,
) -> None:
    """Evaluate the points ``todo`` into ``evaluated``, side by side.

    ``todo`` are indices into ``lams``: 0 the base, 1 the fine-tune, others a lambda.
    ``meta["swapped"]`` is how many matrices of the mitigation each point puts into the
    model.
    """
    bench = _load_bench(todo, folders, family, mitigation, task_file, texts)
    meta["swapped"] = len(bench.places)
    if work is not None:  # copies made later carry the hook: deepcopy keeps a plain function as it is
        hook = lambda module, args, kwargs, output: work.hook(module, args, kwargs, output)  # noqa: E731
        for model in {id(m): m for m in (bench.template, bench.base_model) if m is not None}.values():
            model.register_forward_hook(hook, with_kwargs=True)

    def weights_at(index: int) -> Callable[[str], torch.Tensor]:
        if index == 1:
            return lambda key: bench.plans[key].load_tuned().weight
        return lambda key, lam=lams[index]: mitigation.tuned_at(key, lam)

    copies = _Copies(bench.template, mitigation.kind == "adapter")
    lock = threading.Lock()

    def evaluate(index: int) -> None:
        if should_stop is not None and should_stop():
            raise AnalysisCancelled(f"trade-off cancelled after {steps.done} of {steps.total} evaluations")
        torch.set_num_threads(1)  # per thread: see the module docstring
        if work is not None:
            work.begin(index)
        if index == 0:
            model = bench.base_model
        else:
            model = copies.model()
            _swap_in(model, bench.places, weights_at(index))
        point = {
            "label": steps.labels[index],
            "lam": lams[index],
            "loss": bench.held_out(model),
            "task": bench.task(model) if bench.task else None,
        }
        with lock:
            evaluated[index] = point
        steps.finished(index)  # marked first, so the share reported next counts for the steps after it
        if work is not None:
            work.end(index)

    model_bytes = sum(p.numel() * p.element_size() for p in bench.template.parameters())
    _side_by_side(evaluate, todo, evaluation_workers(len(todo), model_bytes))


def _side_by_side(evaluate: Callable[[int], None], todo: list[int], workers: int) -> None:
    """``evaluate`` each of ``todo`` on ``workers`` threads; the first error cancels the rest."""
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="wse-tradeoff") as pool:
        futures = [pool.submit(evaluate, index) for index in todo]
        try:
            for future in futures:
                future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def _demo_task_file(resolver, tuned: str) -> Path | None:
    """The demo's held-out retrieval task (:mod:`analysis.specs.demo`) when ``tuned`` is a demo model."""
    if "demo" not in resolver.resolve(tuned).summary:
        return None
    manifest = resolver.demo()
    return held_out_task_path(manifest) if manifest is not None else None


def _folder(source) -> Path | None:
    root = Path(source.root)
    return root if root.is_dir() else None


@dataclass(frozen=True)
class _PointKeys:
    """The cache key of each point.

    What it measures (the evaluation, the base folder, and for the others the fine-tune's
    folder, an adapter's or the full model's) and, for a lambda point, the mitigation's
    settings at that lambda.
    """

    common: tuple[str, ...]
    base_id: str
    tuned_id: str
    mitigation: Mitigation
    lams: list[float | None]

    def __call__(self, index: int) -> str:
        if index == 0:
            return derived_digest("tradeoff", *self.common, self.base_id)
        if index == 1:
            return derived_digest("tradeoff", *self.common, self.base_id, self.tuned_id)
        s = self.mitigation.settings
        setting = f"k={s.top_k},eps={s.eps:g},rule={s.rule},exact={s.exact},lam={self.lams[index]:g}"
        return derived_digest("tradeoff", *self.common, self.base_id, self.tuned_id, setting)


def _cached_points(cache, todo: list[int], key: _PointKeys, evaluated: dict[int, dict], steps: _Steps) -> int:
    """Read the points of ``todo`` found in ``cache`` into ``evaluated``.

    Returns how many matrices their fine-tune points swapped (0 if none).
    """
    swapped = 0
    if cache is None:
        return swapped
    for index in todo:
        entry = cache.lookup("tradeoff", key(index))
        if entry is not None:
            point = dict(entry[1]["point"])
            count = point.pop("swapped")
            swapped = count if index else swapped  # the base's entry serves every fine-tune
            evaluated[index] = {"label": steps.labels[index], "lam": key.lams[index], **point}
            steps.finished(index)
    return swapped


def _store_points(cache, indices: list[int], key: _PointKeys, evaluated: dict[int, dict], swapped: int) -> None:
    """Store the points of ``indices`` that were evaluated in ``cache`` (if any)."""
    if cache is None:
        return
    for index in indices:
        if index in evaluated:
            point = {"loss": evaluated[index]["loss"], "task": evaluated[index]["task"]}
            cache.store("tradeoff", key(index), {}, {"point": {**point, "swapped": swapped}})


def _note(loss_name: str, texts: list[str], with_task: bool, swapped: int) -> str:
    task_note = "no task metric known for this model"
    if with_task:
        task_note = "task: MRR on the demo's held-out retrieval split"
    return (
        f"{loss_name} on {len(texts)} paragraphs of Python's documentation topics ({HELD_OUT_SOURCE}), "
        "standing for the pre-training distribution"
        + f"; {task_note}"
        + (f"; {swapped} matrices swapped per point" if swapped else "")
        + "."
    )


def evaluate_tradeoff(
    resolver,
    base: str,
    tuned: str,
    mitigation: Mitigation,
    grid: Sequence[float],
    *,
    progress: Callable[[int, int, str], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    paragraphs: int = HELD_OUT_PARAGRAPHS,
    cache=None,
    work: Callable[[float], None] | None = None,
) -> Tradeoff:
    """Held-out loss and task metric of base, fine-tune and mitigated fine-tune per lambda.

    Parameters
    ----------
    resolver : SpecResolver
        Opens ``base`` and ``tuned`` (:class:`~analysis.specs.SpecResolver`).
    base, tuned : str
        The model names the mitigation was computed for.
    mitigation : Mitigation
        The mitigation whose matrices are put into the model at each lambda.
    grid : sequence of float
        The lambdas of the curve (:func:`tradeoff_grid`).
    progress : callable, optional
        Called as ``progress(done, total, label)`` as points finish.
    should_stop : callable, optional
        Asked before each point; true cancels the evaluation
        (:class:`~analysis.errors.AnalysisCancelled`), the points already evaluated kept in
        ``cache``.
    paragraphs : int, default HELD_OUT_PARAGRAPHS
        How many paragraphs of the held-out text the loss is measured on.
    cache : SpectrumCache, optional
        Points are read from and stored in it (a :class:`~analysis.cache.SpectrumCache`)
        when one is given.
    work : callable, optional
        Called as ``work(share)`` with the share of the evaluations done, counting the
        points under way by the tokens they have read (for a clock, between points).

    Returns
    -------
    Tradeoff
        The points, or none and a note saying why no curve can be measured.
    """
    start = time.perf_counter()
    base_folder = _folder(resolver.open(base))
    adapter = mitigation.kind == "adapter"
    tuned_folder = base_folder if adapter else _folder(resolver.open(tuned))
    family = model_family(base_folder) if base_folder is not None else None
    if base_folder is None or tuned_folder is None or family is None:
        return Tradeoff(
            "held-out loss",
            None,
            [],
            "No trade-off curve: it needs model folders that transformers loads as a causal language model or a "
            "sentence-transformers embedding model.",
        )
    task_file = _demo_task_file(resolver, tuned) if family == "embedding" else None
    with_task = task_file is not None
    loss_name = "held-out contrastive loss" if family == "embedding" else "held-out LM loss (nats/token)"
    # Every point but lambda = 1, which changes nothing (the rank-r re-factorisation of dW
    # is dW itself): it repeats the fine-tune's numbers.
    lams: list[float | None] = [None, 1.0, *grid]
    steps = _Steps(["base", "fine-tune"] + [f"λ = {lam:g}" for lam in grid], grid, progress)
    todo = [i for i, lam in enumerate(lams) if not (i >= 2 and lam == 1.0)]
    texts = held_out_paragraphs(paragraphs)
    base_id = folder_digest(base_folder)
    tuned_id = folder_digest(Path(resolver.open(tuned).root)) if adapter else folder_digest(tuned_folder)
    key = _PointKeys((TRADEOFF_VERSION, family, str(len(texts)), str(with_task)), base_id, tuned_id, mitigation, lams)
    evaluated: dict[int, dict] = {}
    swapped = _cached_points(cache, todo, key, evaluated, steps)  # none for the base alone
    missing = [i for i in todo if i not in evaluated]
    tracker = EvaluationWork(len(todo), work)
    for _ in range(len(todo) - len(missing)):
        tracker.end()
    if missing:
        meta: dict[str, int] = {}
        try:
            _evaluate_points(
                missing,
                lams,
                (base_folder, tuned_folder),
                family,
                mitigation,
                task_file=task_file,
                texts=texts,
                evaluated=evaluated,
                steps=steps,
                should_stop=should_stop,
                meta=meta,
                work=tracker,
            )
        except _NoCurve as reason:
            return Tradeoff(loss_name, None, [], str(reason), time.perf_counter() - start)
        finally:  # what was evaluated is kept, even when cancelled
            swapped = meta.get("swapped", swapped)
            _store_points(cache, missing, key, evaluated, swapped)
    # lambda = 1: the fine-tune's numbers
    points = [
        evaluated[i] if i in evaluated else {**evaluated[1], "label": label} for i, label in enumerate(steps.labels)
    ]
    note = _note(loss_name, texts, with_task, swapped)
    return Tradeoff(loss_name, "MRR (demo retrieval)" if with_task else None, points, note, time.perf_counter() - start)

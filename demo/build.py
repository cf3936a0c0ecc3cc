"""Building the demo: train every recipe, publish each fine-tune as it is finished.

See :mod:`demo` for the layout written; the manifest's format is
:mod:`analysis.specs.demo`'s, which the engine reads.
"""

from __future__ import annotations

import json
import platform
import shutil
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from tqdm import tqdm

from analysis.errors import AnalysisCancelled, InputError
from analysis.files import atomic_write_text
from analysis.mitigation.heldout import SIMILARITY_SCALE, RetrievalTask, TokenizedTexts, evaluate_retrieval
from analysis.specs.demo import (
    HELD_OUT_TASK_NAME,
    MANIFEST_NAME,
    DemoManifest,
    DemoModel,
    base_model_path,
    default_demo_root,
    demo_manifest,
)
from demo.task import DOC_MAX_TOKENS, QUERY_MAX_TOKENS, DocPair, harvest_stdlib_pairs, split_pairs
from demo.training import (
    BATCH_SIZE,
    CHECKPOINT_EVERY,
    CHECKPOINTS_DIR,
    DEFAULT_STEPS,
    FINE_TUNES,
    SEED,
    FineTuneRecipe,
    batch_order,
    checkpoint_steps,
    fine_tune,
    training_environment,
)

#: ``on_step(done, total, what)`` after each training step of a demo build.
StepCallback = Callable[[int, int, str], None]


def build_demo(
    root: Path | None = None,
    *,
    steps: int | None = None,
    progress: bool = True,
    force: bool = False,
    on_step: StepCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> DemoManifest:
    """Build the offline demo into ``root`` (default ``<cache dir>/demo``), once.

    A complete build made with the same number of ``steps`` is found and returned at
    once (unless ``force``). Otherwise the corpus is harvested, the base evaluated and
    every recipe of :data:`FINE_TUNES` trained for ``steps`` steps (default
    :data:`DEFAULT_STEPS`). With no complete build in ``root``, each fine-tune is
    published into ``root`` as soon as it is trained (a partial build left by a stopped
    one is resumed); over a complete build, everything is built in a temporary folder
    beside ``root`` that replaces it only when finished. ``progress`` shows tqdm bars on
    stderr; ``on_step(done, total, what)`` is called after every training step (the
    dashboard's progress bar), and ``should_stop()`` before each: when it returns true
    the build raises :class:`~analysis.errors.AnalysisCancelled`, keeping only the
    fine-tunes that were finished.
    """
    root = Path(root) if root is not None else default_demo_root()
    steps = DEFAULT_STEPS if steps is None else int(steps)
    if steps < 1:
        raise InputError("--steps", f"must be at least 1, got {steps}")
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root.parent / f".{root.name}.lock")):
        existing = _finished_build(root)
        if existing is not None and existing.complete and existing.steps == steps and not force:
            if not (root / HELD_OUT_TASK_NAME).is_file():  # a build from before the task file was written
                write_held_out_task(root)
            return existing
        if root.exists() and not (root / MANIFEST_NAME).is_file() and (not root.is_dir() or any(root.iterdir())):
            raise InputError(root, "exists and is not a demo build; choose a new or empty folder for the demo")
        # Left behind by a build that was killed outright; nobody else builds while we hold the lock.
        for stale in (*root.parent.glob(f".{root.name}.building-*"), *root.parent.glob(f".{root.name}.old-*")):
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.building-", dir=root.parent))
        try:
            if existing is not None and existing.complete:
                _build(staging, steps=steps, progress=progress, on_step=on_step, should_stop=should_stop)
                _replace_dir(staging, root)
            else:
                partial = existing if existing is not None and existing.steps == steps and not force else None
                if partial is None and root.exists():
                    shutil.rmtree(root)
                _build(
                    root,
                    steps=steps,
                    progress=progress,
                    on_step=on_step,
                    should_stop=should_stop,
                    scratch=staging,
                    resume=partial,
                )
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        built = demo_manifest(root)
    assert built is not None and built.complete, f"{root} was just built"
    return built


def write_held_out_task(root: Path, held_out=None) -> None:
    """Write the held-out split as a :class:`~analysis.mitigation.heldout.RetrievalTask` file.

    The engine's trade-off curve evaluates the demo's fine-tunes on it.
    """
    if held_out is None:
        _train, held_out = split_pairs(harvest_stdlib_pairs())
    root.mkdir(parents=True, exist_ok=True)
    RetrievalTask.write(
        root / HELD_OUT_TASK_NAME,
        [p.query for p in held_out],
        [p.document for p in held_out],
        QUERY_MAX_TOKENS,
        DOC_MAX_TOKENS,
    )


def _finished_build(root: Path) -> DemoManifest | None:
    """:func:`demo_manifest`, treating an unreadable manifest as no build (it is rebuilt)."""
    try:
        return demo_manifest(root)
    except InputError:
        return None


def _write_manifest(manifest: DemoManifest, folder: Path) -> None:
    """Write ``manifest.json`` into ``folder`` atomically (readers never see half a file).

    The held-out task file goes beside it the first time (nothing is written before a
    fine-tune is finished, so a stopped first build leaves no folder).
    """
    if not (folder / HELD_OUT_TASK_NAME).is_file():
        write_held_out_task(folder)
    atomic_write_text(folder / MANIFEST_NAME, json.dumps(manifest.to_json(), indent=2) + "\n", private=False)


def _replace_dir(new: Path, target: Path) -> None:
    """Move ``new`` to ``target``, replacing what was there, never leaving a mix."""
    if target.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        target.rename(trash / target.name)
        new.rename(target)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        new.rename(target)


def _build(
    target: Path,
    *,
    steps: int,
    progress: bool,
    recipes: Sequence[FineTuneRecipe] | None = None,
    on_step: StepCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    scratch: Path | None = None,
    resume: DemoManifest | None = None,
) -> DemoManifest:
    """Harvest the task, evaluate the base, train and save every recipe into ``target``.

    With ``scratch``, each fine-tune (and its checkpoints) is trained there and moved
    into ``target`` when complete, and ``manifest.json`` is rewritten after each one
    (``complete`` false until the last); fine-tunes of ``resume`` (a partial build of
    the same steps) are kept, not trained again. Without it everything is written
    straight into ``target`` (a staging folder) and the manifest once, at the end.
    """
    recipes = FINE_TUNES if recipes is None else recipes
    kept = {m.name: m for m in resume.fine_tunes} if resume is not None else {}
    todo = [recipe for recipe in recipes if recipe.name not in kept]
    start = time.perf_counter() - (resume.build_seconds if resume is not None else 0.0)
    data = _task_data(steps)
    task = _task_summary(data)

    def manifest(base: DemoModel, finished: dict[str, DemoModel], threads: int) -> DemoManifest:
        return DemoManifest(
            root=target,
            base=base,
            fine_tunes=tuple(finished[r.name] for r in recipes if r.name in finished),
            steps=steps,
            build_seconds=round(time.perf_counter() - start, 2),
            task=task,
            environment=_environment(threads),
            complete=len(finished) == len(recipes),
        )

    finished = dict(kept)
    with (
        training_environment(),
        tqdm(total=steps * len(todo), desc="demo", unit="step", disable=not progress, file=sys.stderr) as bar,
    ):
        counter = _StepCounter(bar, steps * len(todo), on_step, should_stop)
        threads = torch.get_num_threads()
        base = resume.base if resume is not None else _evaluate_base(data)
        for recipe in todo:
            finished[recipe.name] = _train_recipe(recipe, data, target, scratch, steps, counter)
            if scratch is not None:
                _write_manifest(manifest(base, finished, threads), target)
    built = manifest(base, finished, threads)
    _write_manifest(built, target)
    return built


@dataclass
class _TaskData:
    """The demo task, tokenized for the base model (:func:`_task_data`)."""

    base_path: Path
    tokenizer: Any
    train: list[DocPair]
    held_out: list[DocPair]
    train_q: TokenizedTexts
    train_d: TokenizedTexts
    eval_q: TokenizedTexts
    eval_d: TokenizedTexts
    batches: list[list[int]]


def _task_data(steps: int) -> _TaskData:
    """Harvest and split the task, tokenize it and draw the batches of ``steps`` training steps."""
    from transformers import AutoTokenizer

    base_path = base_model_path()
    train, held_out = split_pairs(harvest_stdlib_pairs())
    if not train or not held_out:
        raise InputError(sysconfig.get_paths()["stdlib"], "yields no documented functions to build the demo task from")
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    return _TaskData(
        base_path,
        tokenizer,
        train,
        held_out,
        train_q=TokenizedTexts(tokenizer, [p.query for p in train], QUERY_MAX_TOKENS),
        train_d=TokenizedTexts(tokenizer, [p.document for p in train], DOC_MAX_TOKENS),
        eval_q=TokenizedTexts(tokenizer, [p.query for p in held_out], QUERY_MAX_TOKENS),
        eval_d=TokenizedTexts(tokenizer, [p.document for p in held_out], DOC_MAX_TOKENS),
        batches=batch_order(len(train), steps),
    )


def _task_summary(data: _TaskData) -> dict:
    """The manifest's description of the task."""
    return {
        "description": "retrieve a Python standard-library function's docstring from its qualified name and "
        "signature (held-out packages, in-batch negatives)",
        "train_pairs": len(data.train),
        "eval_pairs": len(data.held_out),
        "eval_packages": sorted({p.package for p in data.held_out}),
        "query_max_tokens": QUERY_MAX_TOKENS,
        "doc_max_tokens": DOC_MAX_TOKENS,
        "similarity_scale": SIMILARITY_SCALE,
        "seed": SEED,
        "checkpoint_every": CHECKPOINT_EVERY,
    }


def _environment(threads: int) -> dict[str, str]:
    """The manifest's Python and library versions."""
    import peft
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        # Float sums, hence the last digits of the results, depend on the thread count.
        "torch_threads": str(threads),
    }


class _StepCounter:
    """Counts the build's training steps on its tqdm ``bar`` and for ``on_step``.

    It asks ``should_stop`` before each step.
    """

    def __init__(self, bar, total: int, on_step: StepCallback | None, should_stop: Callable[[], bool] | None):
        self.bar, self.total, self.on_step, self.should_stop = bar, total, on_step, should_stop
        self.done = 0

    def step_done(self, what: str) -> None:
        self.done += 1
        self.bar.set_postfix_str(what, refresh=False)
        self.bar.update()
        if self.on_step is not None:
            self.on_step(self.done, self.total, what)

    def stop_here(self) -> None:
        if self.should_stop is not None and self.should_stop():
            raise AnalysisCancelled(f"the demo build was stopped after {self.done} of {self.total} training steps")


def _evaluate_base(data: _TaskData) -> DemoModel:
    from transformers import AutoModel

    base_scores = evaluate_retrieval(AutoModel.from_pretrained(data.base_path), data.eval_q, data.eval_d)
    return DemoModel("base", "all-MiniLM-L6-v2 (base)", data.base_path, "full", base_scores)


def _train_recipe(
    recipe: FineTuneRecipe, data: _TaskData, target: Path, scratch: Path | None, steps: int, counter: _StepCounter
) -> DemoModel:
    """Train ``recipe``, evaluate and save it.

    Saved in ``scratch``, then moved into ``target``, or straight into ``target``.
    """
    t0 = time.perf_counter()
    work = scratch if scratch is not None else target
    checkpoint_dir = work / CHECKPOINTS_DIR / recipe.name
    model = fine_tune(
        recipe,
        data.base_path,
        data.train_q,
        data.train_d,
        data.batches,
        counter.step_done,
        counter.stop_here,
        checkpoint_dir=checkpoint_dir,
    )
    scores = evaluate_retrieval(model, data.eval_q, data.eval_d)
    model.save_pretrained(work / recipe.name)
    if recipe.kind == "full":
        data.tokenizer.save_pretrained(work / recipe.name)
    if scratch is not None:
        _publish(scratch, target, recipe.name)
    final = target / CHECKPOINTS_DIR / recipe.name
    return DemoModel(
        recipe.name,
        recipe.label,
        target / recipe.name,
        recipe.kind,
        scores,
        r=recipe.r,
        lora_alpha=recipe.lora_alpha,
        use_rslora=recipe.use_rslora,
        lr=recipe.lr,
        steps=steps,
        batch_size=BATCH_SIZE,
        train_seconds=round(time.perf_counter() - t0, 2),
        checkpoints=tuple((step, final / f"checkpoint-{step}") for step in checkpoint_steps(steps)),
    )


def _publish(scratch: Path, target: Path, name: str) -> None:
    """Move a finished fine-tune and its checkpoints from ``scratch`` into place in ``target``."""
    for relative in (Path(name), Path(CHECKPOINTS_DIR) / name):
        destination = target / relative
        if destination.exists():  # left by a build killed while moving
            shutil.rmtree(destination)
        destination.parent.mkdir(parents=True, exist_ok=True)
        (scratch / relative).rename(destination)

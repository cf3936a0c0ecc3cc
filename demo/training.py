"""How the demo's fine-tunes are trained: recipes, batches, schedule, checkpoints.

The loss is sentence-transformers' ``MultipleNegativesRankingLoss``
(:func:`analysis.mitigation.heldout.contrastive_loss`), AdamW with linear warm-up then
linear decay, the same batches in the same order for every fine-tune, fixed seeds and
deterministic algorithms.
"""

from __future__ import annotations

import contextlib
import json
import math
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from analysis.mitigation.heldout import TokenizedTexts, contrastive_loss, embed

#: Default optimisation steps per fine-tune (batch :data:`BATCH_SIZE`). The whole build
#: (base evaluation and four fine-tunes) takes about three minutes on two CPU cores.
DEFAULT_STEPS = 60
BATCH_SIZE = 32
#: Training steps between two checkpoints (Trainer's ``save_steps``); the last step is
#: always saved too. Checkpoints of every fine-tune go to ``checkpoints/<name>/checkpoint-<step>``.
CHECKPOINT_EVERY = 10
CHECKPOINTS_DIR = "checkpoints"
WARMUP_FRACTION = 0.1
SEED = 20241028
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


@contextlib.contextmanager
def training_environment() -> Iterator[None]:
    """Deterministic, quiet training; all restored afterwards.

    Deterministic algorithms on torch's threads (at most 8), and no library chatter on
    stderr beside the demo's own progress bar.
    """
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


def batch_order(n_pairs: int, steps: int) -> list[list[int]]:
    """The same shuffled batches for every fine-tune: epochs of a seeded permutation."""
    generator = torch.Generator().manual_seed(SEED)
    order: list[int] = []
    while len(order) < steps * BATCH_SIZE:
        order.extend(torch.randperm(n_pairs, generator=generator).tolist())
    return [order[i * BATCH_SIZE : (i + 1) * BATCH_SIZE] for i in range(steps)]


def lr_factor(step: int, steps: int) -> float:
    """Linear warm-up over the first :data:`WARMUP_FRACTION` of steps, then linear decay."""
    warmup = max(1, math.ceil(WARMUP_FRACTION * steps))
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (steps - step) / max(1, steps - warmup))


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


def checkpoint_steps(steps: int) -> list[int]:
    """The steps after which a checkpoint is saved: every :data:`CHECKPOINT_EVERY` and the last."""
    return sorted({*range(CHECKPOINT_EVERY, steps + 1, CHECKPOINT_EVERY), steps})


def _save_checkpoint(model: torch.nn.Module, folder: Path, step: int, steps: int, history: list[dict]) -> None:
    """``folder`` as the transformers Trainer writes ``checkpoint-<step>``.

    The weights (a PEFT adapter or a safetensors model, by ``save_pretrained``) and
    ``trainer_state.json`` with ``global_step`` and the loss history so far.
    """
    model.save_pretrained(folder)
    state = {"global_step": step, "max_steps": steps, "train_batch_size": BATCH_SIZE, "log_history": history}
    (folder / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")


def fine_tune(
    recipe: FineTuneRecipe,
    base_path: Path,
    queries: TokenizedTexts,
    documents: TokenizedTexts,
    batches: list[list[int]],
    step_done: Callable[[str], None],
    stop_here: Callable[[], None],
    checkpoint_dir: Path | None = None,
) -> torch.nn.Module:
    """Train ``recipe`` on ``batches``.

    With ``checkpoint_dir``, save ``checkpoint_dir/checkpoint-<step>`` at each of
    :func:`checkpoint_steps`.
    """
    torch.manual_seed(SEED + zlib.crc32(recipe.name.encode()))
    model = _trainable_model(recipe, base_path)
    # Dropout off: the runs are short and deterministic comparisons matter more here.
    model.eval()
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=recipe.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, len(batches)))
    save_at = set(checkpoint_steps(len(batches))) if checkpoint_dir is not None else set()
    history: list[dict] = []
    for step, batch in enumerate(batches, start=1):
        stop_here()
        loss = contrastive_loss(embed(model, queries.batch(batch)), embed(model, documents.batch(batch)))
        loss.backward()
        history.append({"step": step, "loss": round(loss.item(), 6), "learning_rate": schedule.get_last_lr()[0]})
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step in save_at:
            _save_checkpoint(model, checkpoint_dir / f"checkpoint-{step}", step, len(batches), list(history))
        step_done(f"{recipe.name} loss {loss.item():.3f}")
    return model

"""SpectrumCallback (analysis/training.py) inside a real transformers Trainer run.

A tiny Llama (tests/factories.py: hidden size 32, two blocks) is trained for six steps on
random tokens with a checkpoint every two, once in full and once as a PEFT LoRA, with the
``tensorboard`` integration on. The scalars TensorBoard received at each checkpoint's step
must be what :func:`analysis.compare.compare` (the command line's ``report``) computes for
that checkpoint from scratch (no cache), against the starting weights saved by the test
itself: intruder totals exactly, means and norms to float32 precision.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import TrainerCallback

from analysis.cache import SpectrumCache
from analysis.compare import compare
from analysis.report import to_report
from analysis.results import DEFAULT_EPSILONS
from analysis.specs.series import resolve_series
from analysis.training import SPECTRUM_BASE_FOLDER, SpectrumCallback, save_starting_weights
from tests import factories

STEPS, SAVE_EVERY = 6, 2
CHECKPOINT_STEPS = [2, 4, 6]
TOP_K, EPSILON = 10, 0.5


class _Tokens(torch.utils.data.Dataset):
    """Random token sequences; the labels are the inputs (causal LM loss)."""

    def __init__(self, n: int = 64, length: int = 16) -> None:
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, factories.VOCAB, (n, length), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class _StepsAsLongAsAnalyses(TrainerCallback):
    """Each training step lasts until the running analysis is done (a tiny model's steps are
    shorter than its analyses; a real model's are not), so that every checkpoint is analysed.

    ``waited_s``: the time this adds to training, not part of the callback's overhead.
    """

    def __init__(self, spectrum: SpectrumCallback) -> None:
        self.spectrum = spectrum
        self.waited_s = 0.0

    def on_step_begin(self, args, state, control, **kwargs) -> None:
        start = time.perf_counter()
        while self.spectrum.busy and time.perf_counter() - start < 60:
            time.sleep(0.005)
        self.waited_s += time.perf_counter() - start


def _train(model, output_dir: Path, callback: SpectrumCallback, *, wait: bool = True) -> float:
    """Train; returns the seconds training took (less the waits of :class:`_StepsAsLongAsAnalyses`)."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=STEPS,
        save_steps=SAVE_EVERY,
        per_device_train_batch_size=8,
        learning_rate=5e-2,
        logging_steps=1,
        report_to=["tensorboard"],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    waiter = _StepsAsLongAsAnalyses(callback)
    trainer = Trainer(model=model, args=args, train_dataset=_Tokens(), callbacks=[callback] + [waiter] * wait)
    callback.attach(trainer)
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start - waiter.waited_s


def _scalars(logdir: Path, tag: str) -> dict[int, float]:
    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    events.Reload()
    return {event.step: event.value for event in events.Scalars(tag)}


def _expected(base: Path, checkpoint: Path) -> dict[str, float]:
    """The checkpoint's totals as the command line's report computes them, from scratch."""
    result = compare(str(base), [str(checkpoint)], top_k=TOP_K, cache=None, device="cpu")
    (entry,) = to_report(result)["models"]
    (model,) = result.models
    matrices = model.matrices
    return {
        "intruders": entry["totals"]["intruders"][list(DEFAULT_EPSILONS).index(EPSILON)],
        "effective_rank_mean": entry["totals"]["mean_effective_rank"],
        "rank90_mean": sum(m["rank90"] for m in entry["matrices"]) / len(matrices),
        "delta_fro": math.sqrt(sum(m["delta_fro"] ** 2 for m in entry["matrices"])),
        "matrices": len(matrices),
    }


def _check_run(output_dir: Path, logdir: Path, base: Path, callback: SpectrumCallback, analysed: list[int]) -> None:
    for step in analysed:
        expected = _expected(base, output_dir / f"checkpoint-{step}")
        assert expected["matrices"] > 0
        assert callback.totals[step]["intruders"] == expected["intruders"]
        for key, value in expected.items():
            logged = _scalars(logdir, f"train/spectrum/{key}")
            assert step in logged, (key, step, logged)
            if key in ("intruders", "matrices"):
                assert logged[step] == value, (key, step)
            else:
                assert logged[step] == pytest.approx(value, rel=1e-6, abs=1e-6), (key, step)
                assert callback.totals[step][key] == pytest.approx(value, rel=1e-9, abs=1e-9), (key, step)
        assert callback.results[step].step == step
    # The run is a series for the dashboard: its checkpoint-N folders in step order.
    series = resolve_series(f"series:{output_dir}")
    assert series.steps == CHECKPOINT_STEPS
    # The Trainer's own history holds the entries at the checkpoints' steps, as Trainer.log writes them.
    history = [e["step"] for e in callback.trainer.state.log_history if "spectrum/intruders" in e]
    assert sorted(history) == analysed


@pytest.fixture
def tensorboard_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where transformers' TensorBoardCallback writes (it reads ``TENSORBOARD_LOGGING_DIR``)."""
    logdir = tmp_path / "tb"
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(logdir))
    return logdir


def _report(name: str, callback: SpectrumCallback, train_s: float) -> None:
    hooks = ", ".join(f"{hook} {seconds * 1000:.1f} ms" for hook, seconds in sorted(callback.overhead_by_hook.items()))
    analyses = ", ".join(f"step {step}: {t['analysis_s']:.2f} s" for step, t in sorted(callback.totals.items()))
    print(
        f"\n{name}: training {train_s:.2f} s, inside the callback's hooks {callback.overhead_s * 1000:.1f} ms "
        f"({100 * callback.overhead_s / train_s:.1f}%: {hooks}); analyses beside training: {analyses}"
    )


def test_full_fine_tune_logs_each_checkpoint_at_its_step(tmp_path: Path, tensorboard_dir: Path) -> None:
    model = factories.build_model("llama").train()
    start = tmp_path / "start"
    model.save_pretrained(start)  # the test's own copy of the starting weights
    callback = SpectrumCallback(base=None, top_k=TOP_K, epsilon=EPSILON, cache=SpectrumCache(tmp_path / "cache"))
    train_s = _train(model, tmp_path / "run", callback)
    _report("full fine-tune", callback, train_s)

    assert callback.errors == {} and callback.skipped == []
    assert sorted(callback.totals) == CHECKPOINT_STEPS
    saved = load_file(tmp_path / "run" / SPECTRUM_BASE_FOLDER / "model.safetensors")
    original = load_file(start / "model.safetensors")
    assert saved.keys() == original.keys() and all(torch.equal(saved[k], original[k]) for k in saved)
    _check_run(tmp_path / "run", tensorboard_dir, start, callback, CHECKPOINT_STEPS)
    assert callback.overhead_s > 0
    assert _scalars(tensorboard_dir, "train/spectrum/overhead_s")[STEPS] > 0


def test_lora_adapter_checkpoints_are_analysed_against_the_base_model(tmp_path: Path, tensorboard_dir: Path) -> None:
    from peft import LoraConfig, get_peft_model

    base_model = factories.build_model("llama")
    start = tmp_path / "start"
    base_model.save_pretrained(start)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(base_model, config).train()
    callback = SpectrumCallback(base=None, top_k=TOP_K, epsilon=EPSILON, cache=SpectrumCache(tmp_path / "cache"))
    train_s = _train(model, tmp_path / "run", callback)
    _report("LoRA", callback, train_s)

    assert callback.errors == {} and callback.skipped == []
    assert (tmp_path / "run" / "checkpoint-2" / "adapter_config.json").is_file()
    # The saved base is the base model's own weights, under its own names (no base_layer, no lora_).
    saved = load_file(tmp_path / "run" / SPECTRUM_BASE_FOLDER / "model.safetensors")
    original = load_file(start / "model.safetensors")
    assert saved.keys() == original.keys() and all(torch.equal(saved[k], original[k]) for k in saved)
    _check_run(tmp_path / "run", tensorboard_dir, start, callback, CHECKPOINT_STEPS)
    assert callback.totals[2]["matrices"] == 3 * factories.LAYERS  # the adapted matrices only
    assert callback.overhead_s > 0


class _SlowFirstAnalysis(SpectrumCallback):
    """The first checkpoint's analysis lasts until a later save has been skipped."""

    def _analyse(self, folder: Path, step: int):
        deadline = time.monotonic() + 60
        while step == SAVE_EVERY and not self.skipped and time.monotonic() < deadline:
            time.sleep(0.01)
        return super()._analyse(folder, step)


def test_a_save_during_a_running_analysis_is_skipped_not_queued(tmp_path: Path, tensorboard_dir: Path) -> None:
    model = factories.build_model("llama").train()
    start = tmp_path / "start"
    model.save_pretrained(start)
    callback = _SlowFirstAnalysis(base=str(start), top_k=TOP_K, epsilon=EPSILON, cache=None)
    _train(model, tmp_path / "run", callback, wait=False)

    assert 4 in callback.skipped and 2 in callback.totals
    assert set(callback.totals) | set(callback.skipped) == set(CHECKPOINT_STEPS)
    assert not (tmp_path / "run" / SPECTRUM_BASE_FOLDER).exists()  # a named base is not copied
    assert _scalars(tensorboard_dir, "train/spectrum/skipped") == {step: 1.0 for step in callback.skipped}
    assert _scalars(tensorboard_dir, "train/spectrum/skipped_saves")[STEPS] == len(callback.skipped)
    _check_run(tmp_path / "run", tensorboard_dir, start, callback, sorted(callback.totals))


def test_starting_weights_of_a_model_with_transformers_adapters_are_its_base_weights(tmp_path: Path) -> None:
    """``model.add_adapter`` (transformers' PEFT integration) makes save_pretrained save the
    adapter alone; the callback's base is still the base weights, under their own names."""
    from peft import LoraConfig

    model = factories.build_model("llama")
    model.save_pretrained(tmp_path / "start")
    model.add_adapter(LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    save_starting_weights(model, tmp_path / "base")
    saved = load_file(tmp_path / "base" / "model.safetensors")
    original = load_file(tmp_path / "start" / "model.safetensors")
    assert saved.keys() == original.keys() and all(torch.equal(saved[k], original[k]) for k in saved)
    assert (tmp_path / "base" / "config.json").is_file()

"""Watch a fine-tune's spectrum while it trains: a transformers ``TrainerCallback``.

:class:`SpectrumCallback` analyses every checkpoint the ``Trainer`` saves against the base,
beside training, and logs per-model totals through the Trainer's own logging, so every
``report_to`` integration (TensorBoard, Weights & Biases, MLflow, ...) receives them at the
checkpoint's step. Intruder dimensions appear during training and grow with it
(Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of Equivalence",
section 5); watching them at every save shows when they appear. The output folder is then a
checkpoint series (:mod:`analysis.specs.series`) for the dashboard's series page, and every
checkpoint's analysis is already in the content-addressed cache (:mod:`analysis.cache`).

How it stays off the training loop (docs/training.md):

- each save hands the checkpoint to one background thread, which analyses it with
  :func:`analysis.pipeline.analyse_plan` on ``threads`` torch threads (default one) and one
  matrix at a time;
- at most one analysis runs: a save that comes while the previous one still runs is
  skipped (logged as ``spectrum/skipped``), never queued;
- the result is delivered in the main thread at the next step end, save or train end,
  through ``trainer.callback_handler.on_log`` with a copy of the state whose
  ``global_step`` is the checkpoint's step (integrations take the step from the state);
- the time spent inside the callback's hooks is summed in :attr:`SpectrumCallback.overhead_s`.
"""

from __future__ import annotations

import copy
import logging
import math
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from analysis.cache import SpectrumCache
from analysis.compare import DEFAULT_CACHE
from analysis.errors import InputError
from analysis.linalg import resolve_device
from analysis.pair_metrics import settings_for
from analysis.pipeline import analyse_plan, model_result
from analysis.results import DEFAULT_EPSILON, DEFAULT_TOP_K, ModelResult
from analysis.specs import SpecResolver
from analysis.specs.names import check_spec

log = logging.getLogger(__name__)

#: The folder of ``output_dir`` the starting weights are saved to when no base is named.
SPECTRUM_BASE_FOLDER = "spectrum-base"
#: Prefix of every logged key (TensorBoard shows them as ``train/spectrum/...``).
LOG_PREFIX = "spectrum/"


def model_totals(model: ModelResult, top_k: int = DEFAULT_TOP_K, epsilon: float = DEFAULT_EPSILON) -> dict[str, float]:
    """Per-model totals of one fine-tune (docs/metrics.md), as the callback logs them.

    Parameters
    ----------
    model : ModelResult
        One fine-tune (or checkpoint) compared with its base.
    top_k, epsilon : int, float
        Intruders are counted among the top ``top_k`` tuned singular vectors at threshold
        ``epsilon`` (Shuttleworth et al. 2024, Def. 3.1).

    Returns
    -------
    dict
        ``intruders``: the count summed over the analysed matrices
        (:meth:`ModelResult.total_intruders <analysis.results.ModelResult.total_intruders>`);
        ``effective_rank_mean`` and ``rank90_mean``: the means over matrices of the update's
        effective rank (Roy & Vetterli 2007) and of the number of singular values holding 90%
        of its energy; ``delta_fro``: ``sqrt(sum ||dW_i||_F^2)``, the Frobenius norm of the
        whole update over the analysed matrices; ``matrices``: how many were analysed.
        Means are 0 for a model without matrices.

    Examples
    --------
    >>> from analysis.results import ModelResult
    >>> model_totals(ModelResult(source="empty", kind="full"))
    {'intruders': 0, 'effective_rank_mean': 0.0, 'rank90_mean': 0.0, 'delta_fro': 0.0, 'matrices': 0}
    """
    matrices = model.matrices
    count = len(matrices)
    return {
        "intruders": model.total_intruders(top_k, epsilon),
        "effective_rank_mean": sum(float(m.effective_rank) for m in matrices) / count if count else 0.0,
        "rank90_mean": sum(int(m.rank90) for m in matrices) / count if count else 0.0,
        "delta_fro": math.sqrt(sum(float(m.delta_fro) ** 2 for m in matrices)),
        "matrices": count,
    }


def base_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The base weights of a model that PEFT wrapped, under the base model's own names.

    ``peft.get_peft_model`` replaces each target module by a tuner layer holding the
    original as ``base_layer`` (and ``modules_to_save`` by a wrapper holding it as
    ``original_module``). Their tensors are renamed back (``q_proj.base_layer.weight`` ->
    ``q_proj.weight``) and the adapter's own (``lora_A``, ``lora_B``, DoRA magnitudes,
    trainable copies) are left out: what ``save_pretrained`` of the untouched base wrote.
    A model without PEFT layers gives its ``state_dict()``.

    Parameters
    ----------
    model : torch.nn.Module
        The base model inside a ``PeftModel`` (``peft_model.get_base_model()``) or any module.

    Returns
    -------
    dict of str to torch.Tensor
        The tensors, not copied.
    """
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils import AuxiliaryTrainingWrapper
    except ImportError:
        return model.state_dict()
    moves: list[tuple[str, str]] = []  # (wrapper's path, path of the module it wraps)
    for name, module in model.named_modules():
        if any(name.startswith(outer + ".") for outer, _ in moves):
            continue
        if isinstance(module, BaseTunerLayer):
            inner = module.get_base_layer()
        elif isinstance(module, AuxiliaryTrainingWrapper):
            inner = module.original_module
        else:
            continue
        relative = next((path for path, sub in module.named_modules() if sub is inner and path), None)
        if relative is not None:
            moves.append((name, f"{name}.{relative}" if name else relative))
    state = {}
    for key, tensor in model.state_dict().items():
        for outer, inner_path in moves:
            if key.startswith(outer + "."):
                key = outer + key[len(inner_path) :] if key.startswith(inner_path + ".") else None
                break
        if key is not None:
            state[key] = tensor
    return state


def save_starting_weights(model: torch.nn.Module, folder: Path | str) -> Path:
    """Save the weights a fine-tune starts from, as a folder the resolver opens as a base.

    A full model is saved with its ``save_pretrained``; for a PEFT model, the base model's
    weights (:func:`base_state_dict`) with the base model's ``save_pretrained``; a model
    with adapters added by transformers' PEFT integration (``add_adapter``), or any other
    module, as one ``model.safetensors`` (and its config). Written beside ``folder`` and
    moved into place, so an interrupted save leaves no half base.

    Parameters
    ----------
    model : torch.nn.Module
        The model being trained, before its first step.
    folder : path
        Where to save; replaced if it exists.

    Returns
    -------
    pathlib.Path
        ``folder``.
    """
    folder = Path(folder)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    peft_model = callable(getattr(model, "get_base_model", None)) and hasattr(model, "peft_config")
    target = model.get_base_model() if peft_model else model
    state = base_state_dict(target)
    injected = state.keys() != target.state_dict().keys()
    # Adapters that transformers' own PEFT integration added (``model.add_adapter``) make
    # its save_pretrained save the adapter alone: those models are saved as plain tensors.
    if isinstance(target, PreTrainedModel) and (peft_model or not injected):
        target.save_pretrained(partial, state_dict=state if injected else None)
    else:
        _save_tensors(target, state, partial)
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return folder


def _save_tensors(model: torch.nn.Module, state: dict[str, torch.Tensor], folder: Path) -> None:
    """``state`` as one ``model.safetensors`` (a tensor tied to an earlier one is left out), and the config."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    config = getattr(model, "config", None)
    if callable(getattr(config, "save_pretrained", None)):
        config.save_pretrained(folder)
    tensors, seen = {}, set()
    for name, tensor in state.items():
        storage = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if storage not in seen:
            seen.add(storage)
            tensors[name] = tensor.detach().to("cpu").contiguous()
    save_file(tensors, folder / "model.safetensors")


@dataclass
class _Pending:
    """The one analysis running beside training: its checkpoint's step and epoch."""

    step: int
    epoch: float | None
    future: Future


class SpectrumCallback(TrainerCallback):
    """Analyse every checkpoint the Trainer saves against the base, beside training.

    On each save (``on_save``: ``<output_dir>/checkpoint-<global_step>``, full weights or a
    PEFT adapter) the checkpoint is compared with the base exactly as
    :func:`analysis.compare.compare` does (same settings, so the same cache entries), in a
    background thread, and the per-model totals of :func:`model_totals` are logged through
    the Trainer's logging at the checkpoint's step, keyed ``spectrum/intruders``,
    ``spectrum/effective_rank_mean``, ``spectrum/rank90_mean``, ``spectrum/delta_fro``,
    ``spectrum/matrices`` and ``spectrum/analysis_s`` (the analysis's wall time). Only world
    process zero analyses.

    Parameters
    ----------
    base : str, optional
        The base, any name the resolver understands (:class:`analysis.specs.SpecResolver`:
        hub id, folder, ``.safetensors`` file). ``None``: the weights the model starts
        from, saved once at ``on_train_begin`` to ``<output_dir>/spectrum-base`` (for a PEFT
        model, the base model's weights); a resumed run (``global_step > 0``) reuses it.
    top_k : int, default 10
        Intruders are counted among the top ``top_k`` tuned singular vectors.
    epsilon : float, default 0.5
        The intruder threshold (Shuttleworth et al. 2024, Def. 3.1).
    cache : SpectrumCache or None, optional
        Default: the persistent cache under ``$WSE_CACHE_DIR`` (or ``cache/``), shared with
        the command line and the dashboard; ``None`` stores nothing.
    device : str, default "cpu"
        Where the decompositions run; the CPU leaves the accelerator to training.
    threads : int, default 1
        Torch threads the analysis computes on.
    timeout_s : float, default 600
        How long ``on_train_end`` waits for a running analysis; after that it is cancelled.
    include_non_block : bool, default False
        Also analyse matrices outside the numbered blocks (embeddings, heads).

    Attributes
    ----------
    overhead_s : float
        Seconds the training loop spent inside this callback's hooks (saving the base,
        starting and delivering analyses, the final wait), per hook in ``overhead_by_hook``.
    totals : dict of int to dict
        The logged totals per checkpoint step; ``results`` holds the ``ModelResult``.
    skipped : list of int
        Steps whose save came while the previous analysis still ran.
    errors : dict of int to str
        Steps whose analysis failed or did not finish in time, and why.

    Examples
    --------
    >>> from transformers import Trainer  # doctest: +SKIP
    >>> callback = SpectrumCallback(base=None, top_k=10, epsilon=0.5)  # doctest: +SKIP
    >>> trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])  # doctest: +SKIP
    >>> callback.attach(trainer).train()  # doctest: +SKIP
    """

    def __init__(
        self,
        base: str | None = None,
        *,
        top_k: int = DEFAULT_TOP_K,
        epsilon: float = DEFAULT_EPSILON,
        cache: SpectrumCache | None | object = DEFAULT_CACHE,
        device: str = "cpu",
        threads: int = 1,
        timeout_s: float = 600.0,
        include_non_block: bool = False,
    ) -> None:
        self.settings = settings_for(top_k)
        if not 1 <= top_k <= self.settings.max_top_k or not 0 < epsilon <= 1:
            raise InputError("SpectrumCallback", f"top_k must be >= 1 and epsilon in (0, 1], got {top_k}, {epsilon}")
        self.base = None if base is None else check_spec(str(base))
        self.top_k, self.epsilon = top_k, epsilon
        self.cache = SpectrumCache() if cache is DEFAULT_CACHE else cache
        self.device = resolve_device(device)
        self.threads = max(1, int(threads))
        self.timeout_s = timeout_s
        self.include_non_block = include_non_block
        self.trainer = None
        self.base_spec: str | None = self.base
        self.overhead_s = 0.0
        self.overhead_by_hook: dict[str, float] = {}
        self.totals: dict[int, dict[str, float]] = {}
        self.results: dict[int, ModelResult] = {}
        self.skipped: list[int] = []
        self.errors: dict[int, str] = {}
        self._pending: _Pending | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._stop = threading.Event()

    def attach(self, trainer):
        """Give the callback its Trainer, whose callbacks receive the logs; returns ``trainer``.

        The callback is (re)placed first in ``trainer.callback_handler.callbacks``, so its
        ``on_train_end`` delivers the last analysis before the reporting integrations close
        (TensorBoard's closes its writer there).
        """
        self.trainer = trainer
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
        callbacks.insert(0, self)
        return trainer

    @property
    def busy(self) -> bool:
        """Whether an analysis is running (a save now would be skipped)."""
        return self._pending is not None and not self._pending.future.done()

    @contextmanager
    def _timed(self, hook: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            spent = time.perf_counter() - start
            self.overhead_s += spent
            self.overhead_by_hook[hook] = self.overhead_by_hook.get(hook, 0.0) + spent

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        """Save the starting weights when no base is named; start the analysis thread."""
        with self._timed("on_train_begin"):
            if not state.is_world_process_zero:
                return
            if self.trainer is None:
                raise RuntimeError("SpectrumCallback needs its Trainer to log: call callback.attach(trainer)")
            if self.base is None:
                folder = Path(args.output_dir) / SPECTRUM_BASE_FOLDER
                if state.global_step == 0 or not folder.is_dir():
                    if state.global_step > 0:
                        log.warning("no %s to resume from: the resumed weights become the base", folder)
                    save_starting_weights(model, folder)
                self.base_spec = str(folder)
            self._stop.clear()
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wse-spectrum")

    def on_step_end(self, args, state, control, **kwargs):
        """Deliver a finished analysis (a check of one future otherwise)."""
        with self._timed("on_step_end"):
            self._deliver_if_done(args, state, control)

    def on_save(self, args, state, control, **kwargs):
        """Start analysing the checkpoint just saved, or skip it while the previous one runs."""
        with self._timed("on_save"):
            if not state.is_world_process_zero or self._executor is None:
                return
            self._deliver_if_done(args, state, control)
            step = state.global_step
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{step}"
            if step in self.totals or step in self.errors or (self._pending and self._pending.step == step):
                return
            if not folder.is_dir():
                log.warning("spectrum: no checkpoint folder %s after a save; not analysed", folder)
                return
            if self._pending is not None:
                log.warning(
                    "spectrum: checkpoint %d skipped, the one of step %d is still analysed", step, self._pending.step
                )
                self.skipped.append(step)
                self._emit(args, state, control, step, state.epoch, {"skipped": 1})
                return
            self._pending = _Pending(step, state.epoch, self._executor.submit(self._analyse, folder, step))

    def on_train_end(self, args, state, control, **kwargs):
        """Wait (at most ``timeout_s``) for the running analysis, deliver it, log the overhead."""
        with self._timed("on_train_end"):
            if not state.is_world_process_zero or self._executor is None:
                return
            pending = self._pending
            if pending is not None and not wait_for([pending.future], timeout=self.timeout_s).done:
                self._stop.set()  # the analysis stops before its next matrix
                self._pending = None
                self.errors[pending.step] = f"not finished within timeout_s={self.timeout_s}"
                log.warning("spectrum: checkpoint %d not analysed within %s s; cancelled", pending.step, self.timeout_s)
            self._deliver_if_done(args, state, control)
            self._executor.shutdown(wait=False)
            self._executor = None
        final = {"overhead_s": self.overhead_s, "skipped_saves": len(self.skipped)}
        with self._timed("on_train_end"):
            self._emit(args, state, control, state.global_step, state.epoch, final)

    def _deliver_if_done(self, args, state, control) -> None:
        pending = self._pending
        if pending is None or not pending.future.done():
            return
        self._pending = None
        try:
            model, seconds = pending.future.result()
        except Exception as exc:  # an analysis must never stop training
            self.errors[pending.step] = f"{type(exc).__name__}: {exc}"
            log.warning("spectrum: checkpoint %d not analysed: %s", pending.step, self.errors[pending.step])
            return
        totals = {**model_totals(model, self.top_k, self.epsilon), "analysis_s": seconds}
        self.results[pending.step] = model
        self.totals[pending.step] = totals
        self._emit(args, state, control, pending.step, pending.epoch, totals)

    def _emit(self, args, state, control, step: int, epoch: float | None, values: dict) -> None:
        """Log ``values`` through every callback of the Trainer as if at ``step``.

        ``Trainer.log`` would stamp them with the current ``global_step`` and reset
        ``control.should_log`` mid-step; so the entry is appended to ``state.log_history``
        as ``Trainer.log`` does, and the handlers get a copy of the state whose
        ``global_step`` (and ``epoch``) is the checkpoint's, and a copy of ``control``.
        """
        logs = {LOG_PREFIX + key: value for key, value in values.items()}
        if epoch is not None:
            logs["epoch"] = epoch
        state.log_history.append({**logs, "step": step})
        shown = copy.copy(state)
        shown.global_step, shown.epoch = step, epoch
        self.trainer.callback_handler.on_log(args, shown, copy.copy(control), logs)

    def _analyse(self, folder: Path, step: int) -> tuple[ModelResult, float]:
        """One checkpoint against the base, on this (background) thread: ``(result, seconds)``.

        Torch's thread count is per thread (a new thread starts with the process's last
        setting), so it is set here and put back afterwards; the analysis's own thread
        choices (:func:`analysis.scheduler.matrix_threads`) are capped by it.
        """
        start = time.perf_counter()
        previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            resolver = SpecResolver(allow_local_paths=True)
            (plan,) = resolver.plan_models(self.base_spec, [str(folder)], include_non_block=self.include_non_block)
            matrices = list(
                analyse_plan(
                    plan,
                    settings=self.settings,
                    device=self.device,
                    cache=self.cache,
                    workers=1,
                    should_stop=self._stop.is_set,
                )
            )
        finally:
            torch.set_num_threads(previous)
        model = model_result(plan, matrices)
        model.step = step
        return model, time.perf_counter() - start

"""The papers' procedure, faithfully: the baseline every engine number is compared with.

Shuttleworth et al. 2024 release ``find_intruder_dimensions.py``; for every matrix it
loads the base and the tuned weight, runs ``torch.linalg.svd(W.float(),
full_matrices=False)`` (default driver) on both, takes ``|Ut^T U0|`` for *all* tuned
vectors (an ``einsum``), the max over base vectors, and counts the top-``k`` scores below
``eps``. No cache, no batching. For an adapter, PEFT's
``peft.tuners.lora.intruders.reduce_intruder_dimension`` does the same per adapted layer
on ``W + get_delta_weight()``, i.e. the merged weight built densely first.

Deviations, all in the baseline's favour: tensors are read one at a time with
``safetensors`` instead of loading whole models through ``transformers``, and the scores
are computed once per matrix and counted at every eps of the grid (the released script
recomputes the SVDs for each threshold it is called with).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open

from analysis.adapters import lora_scale


def _tensor_files(folder: Path) -> dict[str, Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / shard for name, shard in weight_map.items()}
    files: dict[str, Path] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            files.update(dict.fromkeys(handle.keys(), path))
    return files


def _load(files: dict[str, Path], name: str) -> torch.Tensor:
    with safe_open(str(files[name]), framework="pt") as handle:
        return handle.get_tensor(name)


def intruder_scores(W0: torch.Tensor, Wt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The released script's lines, verbatim in substance: scores of every tuned vector."""
    U_base, S_base, VT_base = torch.linalg.svd(W0.float(), full_matrices=False)
    U_tuned, S_tuned, VT_tuned = torch.linalg.svd(Wt.float(), full_matrices=False)
    U_dot_products = torch.abs(torch.einsum("ji,jk->ik", U_tuned, U_base))
    U_tuned_max, _ = U_dot_products.max(dim=1)
    return U_tuned_max, S_tuned


def run_full(base: Path, tuned: Path, names: Sequence[str], device: torch.device) -> dict:
    """Base vs a full fine-tune (or merged checkpoint): per-matrix scores and time."""
    base_files, tuned_files = _tensor_files(base), _tensor_files(tuned)
    start = time.perf_counter()
    out = {}
    for name in names:
        W0 = _load(base_files, name).to(device)
        Wt = _load(tuned_files, name).to(device)
        scores, values = intruder_scores(W0, Wt)
        out[name] = _summary(scores, values)
        del W0, Wt
    _sync(device)
    return {"seconds": time.perf_counter() - start, "matrices": out}


def run_adapter(base: Path, adapter: Path, names: Sequence[str], device: torch.device) -> dict:
    """Base vs a PEFT LoRA adapter, as PEFT's intruder code does it: merge densely, then SVD both."""
    base_files = _tensor_files(base)
    start = time.perf_counter()
    config = json.loads((adapter / "adapter_config.json").read_text())
    scale = lora_scale(config["lora_alpha"], config["r"], bool(config.get("use_rslora")))
    factors = adapter / "adapter_model.safetensors"
    out = {}
    with safe_open(str(factors), framework="pt") as handle:
        keys = set(handle.keys())
        for name in names:
            module = name.removesuffix(".weight")
            prefix = f"base_model.model.{module}"  # PEFT's key naming
            if f"{prefix}.lora_A.weight" not in keys:
                raise KeyError(f"{factors} has no LoRA factors for {name}")
            W = _load(base_files, name).to(device)
            A = handle.get_tensor(f"{prefix}.lora_A.weight").to(device)
            B = handle.get_tensor(f"{prefix}.lora_B.weight").to(device)
            dW = (B.float() @ A.float()) * scale  # LoraLayer.get_delta_weight
            W_merged = W.float() + dW
            scores, values = intruder_scores(W, W_merged)
            out[name] = _summary(scores, values)
            del W, A, B, dW, W_merged
    _sync(device)
    return {"seconds": time.perf_counter() - start, "matrices": out}


def _summary(scores: torch.Tensor, values: torch.Tensor, keep: int = 100) -> dict:
    return {"scores": scores[:keep].cpu().tolist(), "tuned_s": values[:keep].cpu().tolist()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)

"""The benchmark's inputs: real files on local disk, built once and reused.

Two workloads:

- ``demo``: the offline demo (the ``demo`` package): all-MiniLM-L6-v2, its full fine-tune
  and PEFT LoRA adapters at r = 1, 8, 64. When the demo has not been built
  (``demo_manifest()`` is ``None``) a stand-in with the same files and shapes is made:
  a deterministic dense perturbation of the base as the "full fine-tune" and seeded PEFT
  adapters saved by PEFT itself. The report says which one ran.
- ``llama7b-shape``: a synthetic pair with the matrix shapes of a 7B Llama-style model
  (per layer q, k, v, o 4096 x 4096; gate, up 11008 x 4096; down 4096 x 11008; 32
  layers), stored like a hub checkpoint (sharded bf16 safetensors + index + config),
  plus a rank-16 PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``
  in PEFT's key naming). Embeddings and the LM head are left out: the analysis never
  reads them. ``layers`` < 32 builds a slice (the first ``layers`` blocks).

Synthetic weights have a realistic decaying spectrum at low cost: a power-law spike part
``G_out diag(s) G_in^T`` (Gaussian factors of rank 256, ``s_i = 30 i^-0.6``, about 90 of
them above the bulk) plus a Marchenko-Pastur bulk (dense Gaussian noise): the
spikes-plus-bulk shape of trained LLM weights. The "full fine-tune" adds a small dense
update (1.5% of the weight's norm, itself spikes plus bulk); the adapter's ``scale B A``
has singular values from the weight's 5th down (as ``1/j``), so it plants a few intruder
dimensions as in Shuttleworth et al.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from analysis.cache import REPO_ROOT

DEFAULT_DATA_DIR = REPO_ROOT / "cache" / "benchmarks"
LLAMA7B_LAYERS = 32
LLAMA7B_HIDDEN = 4096
LLAMA7B_INTERMEDIATE = 11008
LLAMA7B_MODULES = {  # module -> (out, in)
    "self_attn.q_proj": (LLAMA7B_HIDDEN, LLAMA7B_HIDDEN),
    "self_attn.k_proj": (LLAMA7B_HIDDEN, LLAMA7B_HIDDEN),
    "self_attn.v_proj": (LLAMA7B_HIDDEN, LLAMA7B_HIDDEN),
    "self_attn.o_proj": (LLAMA7B_HIDDEN, LLAMA7B_HIDDEN),
    "mlp.gate_proj": (LLAMA7B_INTERMEDIATE, LLAMA7B_HIDDEN),
    "mlp.up_proj": (LLAMA7B_INTERMEDIATE, LLAMA7B_HIDDEN),
    "mlp.down_proj": (LLAMA7B_HIDDEN, LLAMA7B_INTERMEDIATE),
}
ADAPTER_RANK = 16
_FORMAT_VERSION = 2  # bump to rebuild synthetic files when the recipe changes


@dataclass(frozen=True)
class Tuned:
    """One fine-tune of a workload: a model folder (``full``) or a PEFT adapter folder."""

    name: str
    path: Path
    kind: str  # "full" or "adapter"


@dataclass(frozen=True)
class Workload:
    name: str
    base: Path
    tuned: list[Tuned]
    description: str
    notes: list[str] = field(default_factory=list)

    def fine_tune(self, name: str) -> Tuned:
        for tuned in self.tuned:
            if tuned.name == name:
                return tuned
        raise KeyError(f"workload {self.name} has no fine-tune {name!r}: {[t.name for t in self.tuned]}")


# -- demo ---------------------------------------------------------------------------------


def demo_workload(data_dir: Path = DEFAULT_DATA_DIR) -> Workload:
    """The real demo if it is built, else the stand-in (built on first use)."""
    from demo import base_model_path, demo_manifest

    manifest = demo_manifest()
    if manifest is not None:
        wanted = ["full-ft", "lora-r1", "lora-r8", "lora-r64"]
        tuned = [Tuned(m.name, Path(m.path), m.kind) for m in manifest.fine_tunes if m.name in wanted]
        return Workload(
            "demo",
            Path(manifest.base.path),
            tuned,
            f"the offline demo built in {manifest.root} ({manifest.steps} steps per fine-tune)",
        )
    base = base_model_path()
    root = data_dir / f"demo-standin-v{_FORMAT_VERSION}"
    tuned = [Tuned("full-ft", _standin_full_finetune(base, root / "full-ft"), "full")]
    for r in (1, 8, 64):
        tuned.append(Tuned(f"lora-r{r}", _standin_lora(base, root / f"lora-r{r}", r), "adapter"))
    return Workload(
        "demo",
        base,
        tuned,
        "stand-in for the offline demo (not built here): all-MiniLM-L6-v2, a seeded dense perturbation as "
        "the full fine-tune, seeded PEFT LoRA adapters r=1/8/64 on every block linear layer",
        notes=["the demo had not been built (demo_manifest() is None); run `python -m analysis demo` first"],
    )


def _standin_full_finetune(base: Path, out: Path) -> Path:
    if (out / "model.safetensors").is_file():
        return out
    from safetensors.torch import load_file

    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(20241028)
    tensors = load_file(str(base / "model.safetensors"))
    tuned = {}
    for name, tensor in sorted(tensors.items()):
        noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
        dense = tensor.ndim == 2 and tensor.is_floating_point()
        tuned[name] = (tensor + 0.02 * tensor.std() * noise).contiguous() if dense else tensor.clone()
    _atomic_save(tuned, out / "model.safetensors")
    (out / "config.json").write_text((base / "config.json").read_text())
    return out


def _standin_lora(base: Path, out: Path, r: int) -> Path:
    if (out / "adapter_model.safetensors").is_file():
        return out
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModel

    from demo import LORA_TARGET_MODULES

    model = AutoModel.from_pretrained(str(base))
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(LORA_TARGET_MODULES), lora_dropout=0.0)
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(1000 + r)
    with torch.no_grad():
        for module in peft_model.modules():
            if not isinstance(module, LoraLayer):
                continue
            weight = module.get_base_layer().weight
            A, B = module.lora_A["default"].weight, module.lora_B["default"].weight
            # scale * B @ A with singular values from the weight's 5th down (as 1/j): a few new
            # high-ranking directions, as trained adapters show (Shuttleworth et al.).
            target = float(torch.linalg.svdvals(weight)[4]) / module.scaling["default"]
            decay = 1.0 / torch.arange(1, B.shape[1] + 1, dtype=torch.float32)
            A.copy_(torch.randn(A.shape, generator=generator) / math.sqrt(A.shape[1]))
            B.copy_(torch.randn(B.shape, generator=generator) * decay * target / math.sqrt(B.shape[0]))
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out))
    return out


# -- 7B-shaped ----------------------------------------------------------------------------


def llama7b_workload(data_dir: Path = DEFAULT_DATA_DIR, layers: int = LLAMA7B_LAYERS, device: str = "cpu") -> Workload:
    """The synthetic 7B-shaped pair and adapter (first ``layers`` blocks), built on first use."""
    if not 1 <= layers <= LLAMA7B_LAYERS:
        raise ValueError(f"layers must be 1..{LLAMA7B_LAYERS}, got {layers}")
    root = data_dir / f"llama7b-shape-v{_FORMAT_VERSION}-{layers}layers"
    base, full, adapter = root / "base", root / "full-ft", root / f"lora-r{ADAPTER_RANK}"
    gen_device = torch.device(device)
    if not (base / "model.safetensors.index.json").is_file() or not (full / "model.safetensors.index.json").is_file():
        _write_llama_pair(base, full, layers, gen_device)
    if not (adapter / "adapter_model.safetensors").is_file():
        _write_llama_adapter(adapter, base, layers, gen_device)
    what = "the full 32-layer model" if layers == LLAMA7B_LAYERS else f"a {layers}-layer slice of the 32 layers"
    return Workload(
        "llama7b-shape",
        base,
        [Tuned("full-ft", full, "full"), Tuned(f"lora-r{ADAPTER_RANK}", adapter, "adapter")],
        f"synthetic Llama-7B-shaped bf16 checkpoints, {what} ({7 * layers} matrices), sharded safetensors; "
        f"rank-{ADAPTER_RANK} PEFT adapter on q,k,v,o,gate,up,down",
    )


def synthetic_weight(out_dim: int, in_dim: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """A weight with a power-law spike part plus a Marchenko-Pastur bulk (see module docs).

    Column-scaled like a trained layer: entries about ``1 / sqrt(in_dim)``.
    """
    s = spike_values(in_dim, device)
    left = torch.randn(out_dim, len(s), generator=generator, device=device) / math.sqrt(out_dim)
    right = torch.randn(in_dim, len(s), generator=generator, device=device) / math.sqrt(in_dim)
    bulk = torch.randn(out_dim, in_dim, generator=generator, device=device)
    bulk *= _BULK_EDGE / (math.sqrt(out_dim) + math.sqrt(in_dim)) * _scale(in_dim)
    return torch.addmm(bulk, left * s, right.T)


_SPIKES = 256
_SPIKE_TOP = 30.0  # top spike over the bulk's edge: about 90 spikes stand out of the bulk
_BULK_EDGE = 2.0


def _scale(in_dim: int) -> float:
    return 8.0 / math.sqrt(in_dim)


def spike_values(in_dim: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``s_i = 30 i^-0.6`` (times the layer's scale), the spike part's singular values."""
    i = torch.arange(1, _SPIKES + 1, dtype=torch.float32, device=device)
    return _SPIKE_TOP * i**-0.6 * _scale(in_dim)


def _write_llama_pair(base: Path, full: Path, layers: int, device: torch.device) -> None:
    generator = torch.Generator(device=device).manual_seed(7)
    layers_per_shard = 2
    shards = math.ceil(layers / layers_per_shard)
    index_base: dict[str, str] = {}
    for folder in (base, full):
        folder.mkdir(parents=True, exist_ok=True)
    for shard in range(shards):
        shard_name = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        base_tensors: dict[str, torch.Tensor] = {}
        tuned_tensors: dict[str, torch.Tensor] = {}
        for layer in range(shard * layers_per_shard, min(layers, (shard + 1) * layers_per_shard)):
            prefix = f"model.layers.{layer}."
            for module, (out_dim, in_dim) in LLAMA7B_MODULES.items():
                w = synthetic_weight(out_dim, in_dim, generator, device)
                update = synthetic_weight(out_dim, in_dim, generator, device)
                update *= 0.015 * w.norm() / update.norm()
                name = f"{prefix}{module}.weight"
                base_tensors[name] = w.to(torch.bfloat16).cpu()
                tuned_tensors[name] = (w + update).to(torch.bfloat16).cpu()
                del w, update
            for norm in ("input_layernorm", "post_attention_layernorm"):
                name = f"{prefix}{norm}.weight"
                base_tensors[name] = torch.ones(LLAMA7B_HIDDEN, dtype=torch.bfloat16)
                tuned_tensors[name] = torch.ones(LLAMA7B_HIDDEN, dtype=torch.bfloat16)
        _atomic_save(base_tensors, base / shard_name)
        _atomic_save(tuned_tensors, full / shard_name)
        index_base.update({name: shard_name for name in base_tensors})
        del base_tensors, tuned_tensors
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": LLAMA7B_HIDDEN,
        "intermediate_size": LLAMA7B_INTERMEDIATE,
        "num_hidden_layers": layers,
        "num_attention_heads": 32,
        "torch_dtype": "bfloat16",
        "note": "synthetic weights for benchmarks/run.py; embeddings and LM head omitted",
    }
    for folder in (base, full):
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        index = {"metadata": {"total_size": 0}, "weight_map": index_base}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _write_llama_adapter(out: Path, base: Path, layers: int, device: torch.device) -> None:
    """A rank-16 PEFT LoRA adapter in PEFT's file layout and key naming, for ``base``."""
    generator = torch.Generator(device=device).manual_seed(16)
    alpha = 2 * ADAPTER_RANK
    scale = alpha / ADAPTER_RANK
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(layers):
        for module, (out_dim, in_dim) in LLAMA7B_MODULES.items():
            # scale * B @ A with singular values from the weight's 5th down (as 1/j).
            target = float(spike_values(in_dim)[4]) / scale
            decay = 1.0 / torch.arange(1, ADAPTER_RANK + 1, dtype=torch.float32, device=device)
            A = torch.randn(ADAPTER_RANK, in_dim, generator=generator, device=device) / math.sqrt(in_dim)
            B = torch.randn(out_dim, ADAPTER_RANK, generator=generator, device=device) * decay * target
            B /= math.sqrt(out_dim)
            key = f"base_model.model.model.layers.{layer}.{module}"
            tensors[f"{key}.lora_A.weight"] = A.to(torch.bfloat16).cpu()
            tensors[f"{key}.lora_B.weight"] = B.to(torch.bfloat16).cpu()
    out.mkdir(parents=True, exist_ok=True)
    _atomic_save(tensors, out / "adapter_model.safetensors")
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": ADAPTER_RANK,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "bias": "none",
        "modules_to_save": None,
        "base_model_name_or_path": str(base),
        "inference_mode": True,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(path)

"""Tiny, real, deterministic models and adapters for the tests.

Everything here is built with the real libraries (``transformers`` for the models,
``peft`` for the adapters) and saved with their own ``save_pretrained``, so the files
on disk are exactly what a user would hand the engine, only small: hidden size 32,
two blocks. The whole set builds in a few seconds on a laptop CPU. Every function
takes an output folder, seeds its own random numbers, and returns the path it wrote.

Models (``make_model(kind, out)`` or the named shortcuts):

- ``bert``: ``BertModel`` (no ``bert.`` prefix in its tensor names), separate
  ``query``/``key``/``value``, ``intermediate.dense``/``output.dense``.
- ``bert_cls``: ``BertForSequenceClassification`` built from the same weights as
  ``bert`` (tensor names carry a ``bert.`` prefix, plus a ``classifier``).
- ``gpt2``: ``GPT2LMHeadModel`` (``transformer.h.N.attn.c_attn`` is the fused,
  ``Conv1D`` ``in x out`` qkv projection).
- ``llama``: ``LlamaForCausalLM`` (``q/k/v/o_proj``, ``gate/up/down_proj``, grouped
  query attention so ``k_proj``/``v_proj`` are ``16 x 32``).

Fine-tunes of a model folder:

- :func:`make_full_finetune`: every parameter of the base plus a deterministic,
  full-rank, small perturbation (what full fine-tuning looks like spectrally: no
  new dominant directions).
- :func:`make_merged_lora`: a PEFT LoRA adapter merged with ``merge_and_unload`` and
  saved as a plain checkpoint (what people upload as a "merged LoRA").
- :func:`make_sharded` (``model.safetensors.index.json`` + shards),
  :func:`make_bf16`, :func:`make_pytorch_bin`.

Adapters, :func:`make_lora_adapter` with ``variant`` one of :data:`ADAPTER_VARIANTS`,
each created with ``peft.get_peft_model`` and saved with ``save_pretrained``. PEFT
initialises ``lora_B`` (and ``lora_embedding_A``) to zero, so every LoRA factor is
overwritten with seeded random values before saving; ``modules_to_save`` copies and
DoRA magnitudes are perturbed too, so that every part of the merge rule is exercised.
Non-LoRA PEFT adapters (``ia3``, ``loha``) exist to test that the engine rejects them.

Kohya-style files (:func:`make_kohya_lora`) follow sd-scripts' ``networks/lora.py``
naming: the module path is prefixed with ``lora_te`` (sd-scripts' text-encoder prefix;
a language model is treated as a text encoder), joined with ``.`` and then every ``.``
is replaced by ``_``; each module has ``<name>.lora_down.weight`` (``r x in``),
``<name>.lora_up.weight`` (``out x r``) and a scalar ``<name>.alpha``, and the update is
``alpha / r * up @ down``. For example the Llama tensor
``model.layers.0.self_attn.q_proj.weight`` is updated by
``lora_te_model_layers_0_self_attn_q_proj.lora_{down,up}.weight``. The mapping back to
base names is done by applying the same rule to every base tensor name and looking
the result up (underscores in module names make the reverse parse ambiguous).

:func:`make_hub_cache` lays out a Hugging Face hub cache folder
(``models--org--name/{blobs,snapshots/<commit>,refs/main}``, blobs named by their
sha256 and linked from the snapshot, like ``huggingface_hub`` does) so a hub id
resolves offline.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

HIDDEN = 32
LAYERS = 2
HEADS = 4
VOCAB = 100
POSITIONS = 64

MODEL_KINDS = ("bert", "bert_cls", "gpt2", "llama")

ADAPTER_VARIANTS = (
    "lora",  # plain LoRA on the attention projections
    "rslora",  # use_rslora=True (scale alpha / sqrt(r))
    "patterns",  # rank_pattern + alpha_pattern overrides
    "dora",  # use_dora=True
    "fan_in_fan_out",  # GPT-2 Conv1D targets with fan_in_fan_out=True
    "embedding",  # the token embedding is a target (lora_embedding_A/B)
    "modules_to_save",  # a full replacement copy of one module per block
    "mlp",  # LoRA on every attention and MLP projection, higher rank
    "ia3",  # not LoRA: must be rejected
    "loha",  # not LoRA: must be rejected
)

# Target modules per model kind (PEFT suffix matching).
_ATTENTION_TARGETS = {
    "bert": ["query", "value"],
    "bert_cls": ["query", "value"],
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
}
_ALL_TARGETS = {
    "bert": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "bert_cls": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
_EMBEDDING_TARGET = {"bert": "word_embeddings", "bert_cls": "word_embeddings", "gpt2": "wte", "llama": "embed_tokens"}
_MODULES_TO_SAVE = {
    "bert": ["intermediate.dense"],
    "bert_cls": ["intermediate.dense"],
    "gpt2": ["mlp.c_fc"],
    "llama": ["up_proj"],
}


def _quiet() -> None:
    """Silence the progress bars and config warnings of save_pretrained in test logs."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("peft").setLevel(logging.ERROR)


def _config(kind: str, **overrides):
    from transformers import BertConfig, GPT2Config, LlamaConfig

    config = _default_config(kind, BertConfig, GPT2Config, LlamaConfig)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def _default_config(kind: str, BertConfig, GPT2Config, LlamaConfig):  # noqa: N803 (classes passed in)
    if kind in ("bert", "bert_cls"):
        return BertConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            intermediate_size=4 * HIDDEN,
            max_position_embeddings=POSITIONS,
            num_labels=3,
        )
    if kind == "gpt2":
        return GPT2Config(
            vocab_size=VOCAB,
            n_embd=HIDDEN,
            n_layer=LAYERS,
            n_head=HEADS,
            n_positions=POSITIONS,
            bos_token_id=0,
            eos_token_id=0,
        )
    if kind == "llama":
        return LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            num_key_value_heads=HEADS // 2,
            intermediate_size=2 * HIDDEN,
            max_position_embeddings=POSITIONS,
            bos_token_id=0,
            eos_token_id=0,
        )
    raise ValueError(f"unknown model kind {kind!r}; expected one of {MODEL_KINDS}")


def build_model(kind: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A freshly initialised tiny model of ``kind`` (deterministic for a given seed);
    ``overrides`` change config fields (e.g. ``intermediate_size=48``)."""
    from transformers import BertForSequenceClassification, BertModel, GPT2LMHeadModel, LlamaForCausalLM

    _quiet()
    torch.manual_seed(seed)
    config = _config(kind, **overrides)
    if kind == "bert":
        model = BertModel(config)
    elif kind == "bert_cls":
        # Same encoder weights as ``bert`` (same seed), with a ``bert.`` prefix and a head.
        model = BertForSequenceClassification(config)
        model.bert.load_state_dict(build_model("bert", seed, **overrides).state_dict())
    elif kind == "gpt2":
        model = GPT2LMHeadModel(config)
    else:
        model = LlamaForCausalLM(config)
    return model.eval()


def load_model(model_dir: str | os.PathLike) -> torch.nn.Module:
    """Load a folder written by :func:`make_model` with transformers (float32)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    _quiet()
    config = AutoConfig.from_pretrained(model_dir)
    arch = (config.architectures or [""])[0]
    if arch.endswith("ForCausalLM") or arch.endswith("LMHeadModel"):
        cls = AutoModelForCausalLM
    elif arch.endswith("ForSequenceClassification"):
        cls = AutoModelForSequenceClassification
    else:
        cls = AutoModel
    return cls.from_pretrained(model_dir, dtype=torch.float32).eval()


def model_kind(model_dir: str | os.PathLike) -> str:
    """The factory kind of a saved model folder (from its ``config.json``)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    arch = (config.get("architectures") or [""])[0]
    if config["model_type"] == "bert":
        return "bert_cls" if arch == "BertForSequenceClassification" else "bert"
    return config["model_type"]


def make_model(kind: str, out: str | os.PathLike, seed: int = 0, **overrides) -> Path:
    """Save a tiny ``kind`` model (``safetensors``) into ``out`` and return ``out``."""
    out = Path(out)
    build_model(kind, seed, **overrides).save_pretrained(out)
    return out


def make_bert(out: str | os.PathLike, seed: int = 0, **overrides) -> Path:
    return make_model("bert", out, seed, **overrides)


def make_bert_cls(out: str | os.PathLike, seed: int = 0, **overrides) -> Path:
    return make_model("bert_cls", out, seed, **overrides)


def make_gpt2(out: str | os.PathLike, seed: int = 0, **overrides) -> Path:
    return make_model("gpt2", out, seed, **overrides)


def make_llama(out: str | os.PathLike, seed: int = 0, **overrides) -> Path:
    return make_model("llama", out, seed, **overrides)


def _copy_side_files(src: Path, out: Path) -> None:
    for name in ("config.json", "generation_config.json"):
        if (src / name).exists():
            shutil.copy2(src / name, out / name)


def make_full_finetune(
    base_dir: str | os.PathLike, out: str | os.PathLike, seed: int = 1, relative_noise: float = 0.05
) -> Path:
    """A "full fine-tune" of ``base_dir``: every tensor plus seeded Gaussian noise.

    The noise of each tensor has standard deviation ``relative_noise`` times that
    tensor's own standard deviation: a full-rank, small update with no dominant new
    direction, like full fine-tuning (Shuttleworth et al. 2024, section 4). Same
    architecture, same tensor names, same ``config.json``.
    """
    base_dir, out = Path(base_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = load_file(base_dir / "model.safetensors")
    generator = torch.Generator().manual_seed(seed)
    tuned = {}
    for name in sorted(tensors):
        w = tensors[name]
        noise = torch.randn(w.shape, generator=generator, dtype=torch.float32)
        scale = float(w.float().std()) if w.numel() > 1 else 0.0
        tuned[name] = (w.float() + relative_noise * (scale or 1e-3) * noise).to(w.dtype).contiguous()
    save_file(tuned, out / "model.safetensors", metadata={"format": "pt"})
    _copy_side_files(base_dir, out)
    return out


def make_sharded(base_dir: str | os.PathLike, out: str | os.PathLike, max_shard_size: str = "20KB") -> Path:
    """``base_dir`` re-saved by transformers in several shards with an index file."""
    out = Path(out)
    load_model(base_dir).save_pretrained(out, max_shard_size=max_shard_size)
    if not (out / "model.safetensors.index.json").exists():
        raise RuntimeError(f"transformers did not shard {base_dir} at {max_shard_size}")
    return out


def make_bf16(base_dir: str | os.PathLike, out: str | os.PathLike) -> Path:
    """``base_dir`` converted to bfloat16 and saved by transformers."""
    out = Path(out)
    load_model(base_dir).to(torch.bfloat16).save_pretrained(out)
    return out


def make_pytorch_bin(base_dir: str | os.PathLike, out: str | os.PathLike) -> Path:
    """``base_dir`` as a legacy ``pytorch_model.bin`` (torch.save of the state dict)."""
    base_dir, out = Path(base_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(load_file(base_dir / "model.safetensors"), out / "pytorch_model.bin")
    _copy_side_files(base_dir, out)
    return out


def _peft_config(kind: str, variant: str, r: int):
    from peft import IA3Config, LoHaConfig, LoraConfig

    attention = _ATTENTION_TARGETS[kind]
    if variant == "ia3":
        ffn = {"bert": ["output.dense"], "bert_cls": ["output.dense"], "gpt2": ["c_proj"], "llama": ["down_proj"]}[kind]
        return IA3Config(target_modules=attention + ffn, feedforward_modules=ffn)
    if variant == "loha":
        return LoHaConfig(r=r, alpha=2 * r, target_modules=attention)
    common = {"r": r, "lora_alpha": 2 * r, "lora_dropout": 0.0}
    if variant == "lora":
        return LoraConfig(target_modules=attention, **common)
    if variant == "rslora":
        return LoraConfig(target_modules=attention, use_rslora=True, **common)
    if variant == "mlp":
        return LoraConfig(target_modules=_ALL_TARGETS[kind], r=2 * r, lora_alpha=2 * r, lora_dropout=0.0)
    if variant == "patterns":
        # Layer 1's first target gets its own rank and alpha; the second target kind a
        # different alpha everywhere (PEFT's get_pattern_key: regex "(.*\.)?(key)$").
        first, second = attention[0], attention[-1]
        layer_key = {"bert": "layer", "bert_cls": "layer", "gpt2": "h", "llama": "layers"}[kind]
        return LoraConfig(
            target_modules=_ALL_TARGETS[kind],
            rank_pattern={f"{layer_key}.1.*{first}": 2 * r},
            alpha_pattern={second: 3 * r, f"{layer_key}.1.*{first}": 5 * r},
            **common,
        )
    if variant == "dora":
        return LoraConfig(target_modules=attention, use_dora=True, **common)
    if variant == "fan_in_fan_out":
        if kind != "gpt2":
            raise ValueError("fan_in_fan_out is the GPT-2 (Conv1D) variant; use kind gpt2")
        return LoraConfig(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True, **common)
    if variant == "embedding":
        return LoraConfig(target_modules=attention + [_EMBEDDING_TARGET[kind]], **common)
    if variant == "modules_to_save":
        return LoraConfig(target_modules=attention, modules_to_save=_MODULES_TO_SAVE[kind], **common)
    raise ValueError(f"unknown adapter variant {variant!r}; expected one of {ADAPTER_VARIANTS}")


def _randomise_adapter(model: torch.nn.Module, seed: int, factor_std: float) -> None:
    """Give every trainable adapter tensor deterministic non-trivial values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if not param.requires_grad:
                continue
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if "lora_magnitude_vector" in name:
                # DoRA magnitude starts at ||W||_row; move it so m != ||W + dW||.
                param.mul_(1.0 + 0.1 * noise.abs())
            elif "modules_to_save" in name:
                param.add_(0.05 * float(param.std() if param.numel() > 1 else 1.0) * noise)
            elif "lora_" in name or "hada_" in name:
                param.copy_(factor_std * noise)
            elif "ia3_" in name:
                param.copy_(1.0 + 0.1 * noise)


def make_lora_adapter(
    base_dir: str | os.PathLike,
    out: str | os.PathLike,
    variant: str = "lora",
    *,
    r: int = 4,
    seed: int = 2,
    factor_std: float = 0.1,
    untrained: bool = False,
    safe_serialization: bool = True,
) -> Path:
    """A PEFT adapter for the model in ``base_dir``, saved with ``save_pretrained``.

    ``variant`` is one of :data:`ADAPTER_VARIANTS`. ``r`` is the LoRA rank
    (``lora_alpha = 2 r``); ``factor_std`` the standard deviation of the random
    factor entries; ``untrained`` saves PEFT's initial values (``lora_B = 0``).
    The adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors``
    (``adapter_model.bin`` with ``safe_serialization=False``); its
    ``base_model_name_or_path`` is ``base_dir``.
    """
    from peft import get_peft_model

    _quiet()
    out = Path(out)
    kind = model_kind(base_dir)
    with warnings.catch_warnings():
        # PEFT's notes about Conv1D fan_in_fan_out and saving embedding layers.
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(load_model(base_dir), _peft_config(kind, variant, r))
        if not untrained:
            _randomise_adapter(peft_model, seed, factor_std)
        peft_model.save_pretrained(out, safe_serialization=safe_serialization)
    return out


def make_merged_lora(base_dir: str | os.PathLike, out: str | os.PathLike, variant: str = "lora", **kwargs) -> Path:
    """A LoRA adapter (see :func:`make_lora_adapter`) merged into the base with PEFT's
    ``merge_and_unload`` and saved as an ordinary checkpoint."""
    from peft import get_peft_model

    _quiet()
    out = Path(out)
    kind = model_kind(base_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(load_model(base_dir), _peft_config(kind, variant, kwargs.get("r", 4)))
        _randomise_adapter(peft_model, kwargs.get("seed", 2), kwargs.get("factor_std", 0.1))
        peft_model.merge_and_unload().save_pretrained(out)
    return out


def kohya_module_name(base_tensor_name: str, prefix: str = "lora_te") -> str:
    """sd-scripts' LoRA module name for a base weight: ``prefix`` + module path, ``.`` -> ``_``."""
    module = base_tensor_name.removesuffix(".weight")
    return f"{prefix}.{module}".replace(".", "_")


def make_kohya_lora(
    base_dir: str | os.PathLike,
    out_file: str | os.PathLike,
    *,
    r: int = 4,
    alpha: float | None = 8.0,
    seed: int = 3,
    factor_std: float = 0.1,
    modules: tuple[str, ...] = ("q_proj", "v_proj", "query", "value", "c_proj"),
) -> Path:
    """A kohya/sd-scripts style LoRA ``.safetensors`` file for the model in ``base_dir``.

    Every 2-D block weight whose module name ends with one of ``modules`` gets
    ``lora_down`` (``r x in``) and ``lora_up`` (``out x r``) factors and, unless
    ``alpha`` is None, an ``alpha`` scalar. The module naming is described in this
    file's docstring. GPT-2's ``Conv1D`` weights are ``in x out`` on disk; the factors
    are still ``out x in`` (``up @ down``), as sd-scripts stores every Linear.
    """
    base_dir, out_file = Path(base_dir), Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    conv1d = model_kind(base_dir) == "gpt2"
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    base = load_file(base_dir / "model.safetensors")
    for name in sorted(base):
        module = name.removesuffix(".weight")
        if not name.endswith(".weight") or base[name].ndim != 2 or not module.endswith(modules):
            continue
        if ".h." not in name and ".layers." not in name and ".layer." not in name:
            continue
        rows, cols = base[name].shape
        out_dim, in_dim = (cols, rows) if conv1d else (rows, cols)
        key = kohya_module_name(name)
        tensors[f"{key}.lora_down.weight"] = factor_std * torch.randn(r, in_dim, generator=generator)
        tensors[f"{key}.lora_up.weight"] = factor_std * torch.randn(out_dim, r, generator=generator)
        if alpha is not None:
            tensors[f"{key}.alpha"] = torch.tensor(float(alpha))
    save_file(tensors, out_file, metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(r)})
    return out_file


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_hub_cache(cache_dir: str | os.PathLike, repo_id: str, model_dir: str | os.PathLike) -> Path:
    """Place ``model_dir`` in a hub cache under ``cache_dir`` as if downloaded from ``repo_id``.

    Lays out ``models--{org}--{name}/blobs/<sha256>``, ``snapshots/<commit>/<file>``
    (relative symlinks to the blobs) and ``refs/main`` (the commit), the layout
    ``huggingface_hub`` writes. Point ``HF_HUB_CACHE`` at ``cache_dir`` and set
    ``HF_HUB_OFFLINE=1`` to resolve ``repo_id`` from it. Returns the snapshot folder.
    """
    cache_dir, model_dir = Path(cache_dir), Path(model_dir)
    repo = cache_dir / ("models--" + repo_id.replace("/", "--"))
    files = sorted(p for p in model_dir.rglob("*") if p.is_file())
    commit = hashlib.sha1(repo_id.encode() + b"".join(_sha256(p).encode() for p in files)).hexdigest()
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    for path in files:
        relative = path.relative_to(model_dir)
        blob = repo / "blobs" / _sha256(path)
        if not blob.exists():
            shutil.copy2(path, blob)
        link = snapshot / relative
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.exists() or link.is_symlink():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def peft_merged_state_dict(base_dir: str | os.PathLike, adapter_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The reference: PEFT's own ``merge_and_unload()`` of ``adapter_dir`` into ``base_dir``
    (loaded with transformers), as a float32 state dict in stored orientation."""
    from peft import PeftModel

    _quiet()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        merged = PeftModel.from_pretrained(load_model(base_dir), adapter_dir).merge_and_unload()
    return {k: v.detach().float().clone() for k, v in merged.state_dict().items()}

"""Tiny models of today's families, their full fine-tunes and PEFT adapters (issue 10).

Every model is built with transformers' ``from_config`` (hidden size 32, 2 blocks, a few
experts) and written the way users get them: ``save_pretrained`` (which, in transformers
5, writes Mixtral's and Qwen3-MoE's experts per expert and LLaVA's towers in the
checkpoint naming), or, for ``qwen3_moe_fused``, the in-memory state dict as it is
(fused ``experts.gate_up_proj`` ``[E, 2I, H]`` and ``experts.down_proj`` ``[E, H, I]``, the
layout some hub checkpoints ship); ``gpt_oss`` stores its fused experts ``[E, in, out]``.
Adapters are made by PEFT and saved by PEFT, with
their factors overwritten by seeded noise (PEFT initialises ``lora_B`` to zero); the
same model, merged by PEFT's ``merge_and_unload()``, is kept as the reference
(in-memory naming) for the counts.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

H = 32
FAMILIES = (
    "llama",
    "qwen3",
    "gemma3",
    "phi3",
    "gpt_neox",
    "gpt2",
    "bert",
    "deberta_v2",
    "t5",
    "mixtral",
    "qwen3_moe",
    "qwen3_moe_fused",
    "gpt_oss",
    "llava",
)
MOE = ("mixtral", "qwen3_moe", "qwen3_moe_fused", "gpt_oss")


def quiet() -> None:
    """Silence save_pretrained's progress bars and config warnings."""
    import logging
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("peft").setLevel(logging.ERROR)


def build(family: str, **overrides):
    """A seeded tiny model of ``family`` (hidden 32, 2 blocks); ``overrides`` replace values of
    its config (``num_local_experts=8``)."""
    model_class, config = _config(family)
    config.update(overrides)
    torch.manual_seed(0)
    return model_class(config)


def _config(family: str):
    """``(model class, config)`` of :func:`build`'s tiny ``family``."""
    import transformers as tf

    common = {"num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 128}
    decoder = common | {"hidden_size": H, "intermediate_size": 64, "num_key_value_heads": 2}
    if family == "llama":
        return tf.LlamaForCausalLM, tf.LlamaConfig(**decoder)
    if family == "qwen3":
        return tf.Qwen3ForCausalLM, tf.Qwen3Config(**decoder, head_dim=8)
    if family == "gemma3":
        return tf.Gemma3ForCausalLM, tf.Gemma3TextConfig(**decoder, head_dim=8)
    if family == "phi3":
        return tf.Phi3ForCausalLM, tf.Phi3Config(**decoder, pad_token_id=0)
    if family == "gpt_neox":
        return tf.GPTNeoXForCausalLM, tf.GPTNeoXConfig(**common, hidden_size=H, intermediate_size=64)
    if family == "gpt2":
        return tf.GPT2LMHeadModel, tf.GPT2Config(n_embd=H, n_layer=2, n_head=4, vocab_size=128, n_positions=64)
    if family == "bert":
        return tf.BertModel, tf.BertConfig(**common, hidden_size=H, intermediate_size=64)
    if family == "deberta_v2":
        return tf.DebertaV2Model, tf.DebertaV2Config(**common, hidden_size=H, intermediate_size=64)
    if family == "t5":
        return tf.T5ForConditionalGeneration, tf.T5Config(
            d_model=H, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=128
        )
    if family == "mixtral":
        return tf.MixtralForCausalLM, tf.MixtralConfig(**decoder, num_local_experts=4, num_experts_per_tok=2)
    if family in ("qwen3_moe", "qwen3_moe_fused"):
        config = tf.Qwen3MoeConfig(
            **decoder, head_dim=8, moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1
        )
        return tf.Qwen3MoeForCausalLM, config
    if family == "gpt_oss":  # fused experts stored [E, in, out] (is_transposed)
        config = tf.GptOssConfig(
            **decoder | {"intermediate_size": 16}, head_dim=8, num_local_experts=4, num_experts_per_tok=2
        )
        return tf.GptOssForCausalLM, config
    if family == "llava":
        text = tf.LlamaConfig(**decoder)
        vision = tf.CLIPVisionConfig(
            hidden_size=H, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16, patch_size=8
        )
        return tf.LlavaForConditionalGeneration, tf.LlavaConfig(text_config=text, vision_config=vision)
    raise ValueError(family)


def save(model, family: str, out: Path) -> Path:
    """Write ``model`` as users get it (see the module docstring)."""
    out.mkdir(parents=True, exist_ok=True)
    model.config.architectures = [type(model).__name__]
    if family == "qwen3_moe_fused":
        from safetensors.torch import save_file

        state = {n: t.detach().clone().contiguous() for n, t in model.state_dict().items() if n != "lm_head.weight"}
        save_file(state, out / "model.safetensors")
        (out / "config.json").write_text(model.config.to_json_string())
    else:
        model.save_pretrained(out)
    return out


def perturb(model, seed: int = 1, scale: float = 0.02) -> None:
    """A full fine-tune: a small full-rank change of every floating parameter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.is_floating_point():
                param.add_(scale * torch.randn(param.shape, generator=g) * (param.std() if param.numel() > 1 else 1))


def lora_config(family: str, targets: str):
    """PEFT's ``LoraConfig``: PEFT's default targets for the family, or ``all-linear``
    (which, on MoE models, adds ``target_parameters`` for the experts)."""
    from peft import LoraConfig

    default = {"phi3": ["qkv_proj"], "deberta_v2": ["query_proj", "value_proj"]}
    default |= dict.fromkeys((*MOE, "llava"), ["q_proj", "v_proj"])
    if targets == "all" and family == "gpt_oss":  # PEFT adds no target_parameters for it by itself
        experts = ["router.weight", "experts.gate_up_proj", "experts.down_proj"]
        return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", target_parameters=experts)
    if targets == "all":
        return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    return LoraConfig(r=4, lora_alpha=8, target_modules=default.get(family))


def make_adapter(base_model, family: str, targets: str, out: Path, seed: int = 3):
    """A PEFT adapter with random factors, saved by PEFT; returns (folder, merged state dict)."""
    import copy

    from peft import get_peft_model

    model = copy.deepcopy(base_model)
    peft_model = get_peft_model(model, lora_config(family, targets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(0.2 * torch.randn(param.shape, generator=g))
    peft_model.save_pretrained(out)
    merged = peft_model.merge_and_unload()
    state = {n: t.detach().clone() for n, t in merged.state_dict().items()}
    config = json.loads((out / "adapter_config.json").read_text())
    return out, state, config

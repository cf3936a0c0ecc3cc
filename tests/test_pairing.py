"""Pairing base and tuned matrices across BERT, GPT-2 and Llama layouts."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from analysis.errors import InputError
from analysis.pairing import block_index, match_names, module_kind, plan_comparison
from analysis.specs import open_model
from tests import factories


def _modules(plan) -> dict[str, tuple[int | None, str, tuple[int, int]]]:
    return {m.name: (m.layer, m.module, m.shape) for m in plan.matrices}


def test_bert_full_finetune_pairs_every_block_matrix(tiny_bert, tiny_bert_full_ft):
    plan = plan_comparison(open_model(tiny_bert), open_model(tiny_bert_full_ft))
    assert plan.kind == "full" and plan.base_label == str(tiny_bert)
    modules = _modules(plan)
    assert len(modules) == 12  # 2 blocks x (q, k, v, attn out, mlp in, mlp out)
    assert modules["encoder.layer.0.attention.self.query.weight"] == (0, "query", (32, 32))
    assert modules["encoder.layer.1.attention.output.dense.weight"] == (1, "attn_out", (32, 32))
    assert modules["encoder.layer.1.intermediate.dense.weight"] == (1, "mlp_in", (128, 32))
    assert modules["encoder.layer.0.output.dense.weight"] == (0, "mlp_out", (32, 128))
    assert [m.layer for m in plan.matrices] == [0] * 6 + [1] * 6
    assert plan.unmatched == [] and plan.shape_mismatches == []
    assert plan.summary["model_type"] == "bert" and plan.summary["architecture"] == "BertModel"
    assert plan.summary["matched_matrices"] == 12
    full_ft = load_file(tiny_bert_full_ft / "model.safetensors")
    matrix = plan.matrices[0]
    tuned = matrix.load_tuned()
    assert tuned.low_rank is None
    assert torch.equal(tuned.weight, full_ft[matrix.name])


def test_non_block_weights_only_on_request(tiny_bert, tiny_bert_full_ft):
    plan = plan_comparison(open_model(tiny_bert), open_model(tiny_bert_full_ft), include_non_block=True)
    extra = {m.name: (m.layer, m.module, m.shape) for m in plan.matrices if m.layer is None}
    assert extra == {
        "embeddings.word_embeddings.weight": (None, "word_embeddings", (100, 32)),
        "embeddings.position_embeddings.weight": (None, "position_embeddings", (64, 32)),
        "embeddings.token_type_embeddings.weight": (None, "token_type_embeddings", (2, 32)),
        "pooler.dense.weight": (None, "dense", (32, 32)),
    }
    assert [m.layer for m in plan.matrices][-4:] == [None] * 4  # blocks first


def test_gpt2_conv1d_is_transposed_to_out_by_in(tiny_gpt2, tiny_gpt2_full_ft):
    plan = plan_comparison(open_model(tiny_gpt2), open_model(tiny_gpt2_full_ft))
    modules = _modules(plan)
    assert modules == {
        f"transformer.h.{i}.{name}.weight": (i, kind, shape)
        for i in (0, 1)
        for name, kind, shape in [
            ("attn.c_attn", "qkv", (96, 32)),
            ("attn.c_proj", "attn_out", (32, 32)),
            ("mlp.c_fc", "mlp_in", (128, 32)),
            ("mlp.c_proj", "mlp_out", (32, 128)),
        ]
    }
    stored = load_file(tiny_gpt2 / "model.safetensors")
    matrix = next(m for m in plan.matrices if m.name == "transformer.h.0.attn.c_attn.weight")
    assert torch.equal(matrix.load_base(), stored[matrix.name].T)
    assert matrix.load_tuned().weight.shape == (96, 32)


def test_llama_layout(tiny_llama, tiny_llama_full_ft):
    plan = plan_comparison(open_model(tiny_llama), open_model(tiny_llama_full_ft), include_non_block=True)
    modules = _modules(plan)
    assert modules["model.layers.0.self_attn.q_proj.weight"] == (0, "query", (32, 32))
    assert modules["model.layers.0.self_attn.k_proj.weight"] == (0, "key", (16, 32))
    assert modules["model.layers.1.self_attn.v_proj.weight"] == (1, "value", (16, 32))
    assert modules["model.layers.1.self_attn.o_proj.weight"] == (1, "attn_out", (32, 32))
    assert modules["model.layers.1.mlp.gate_proj.weight"] == (1, "gate", (64, 32))
    assert modules["model.layers.1.mlp.up_proj.weight"] == (1, "up", (64, 32))
    assert modules["model.layers.1.mlp.down_proj.weight"] == (1, "down", (32, 64))
    assert modules["lm_head.weight"] == (None, "lm_head", (100, 32))
    assert len(modules) == 2 * 7 + 2  # + embed_tokens and lm_head


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("model.layers.3.self_attn.qkv_proj.weight", "qkv"),
        ("model.layers.3.mlp.gate_up_proj.weight", "gate_up"),
        ("gpt_neox.layers.0.attention.query_key_value.weight", "qkv"),
        ("gpt_neox.layers.0.attention.dense.weight", "attn_out"),
        ("gpt_neox.layers.0.mlp.dense_h_to_4h.weight", "mlp_in"),
        ("roberta.encoder.layer.5.output.dense.weight", "mlp_out"),
        ("model.decoder.layers.2.self_attn.out_proj.weight", "attn_out"),
        ("model.decoder.layers.2.fc1.weight", "mlp_in"),
        ("model.layers.0.block_sparse_moe.experts.3.w1.weight", "gate"),
        ("model.layers.0.block_sparse_moe.experts.3.w2.weight", "down"),
        ("model.layers.0.mystery.frobnicator.weight", "frobnicator"),
        ("model.layers.0.block_sparse_moe.gate.weight", "router"),
        ("model.layers.0.mlp.gate.weight", "router"),
        ("model.layers.0.mlp.router.weight", "router"),
        ("model.layers.0.mlp.experts.gate_up_proj", "gate_up"),
        ("model.layers.0.mlp.experts.down_proj", "down"),
        ("model.layers.0.mlp.shared_expert.gate_proj.weight", "shared_gate"),
        ("model.layers.0.mlp.shared_expert_gate.weight", "shared_router"),
        ("encoder.block.1.layer.0.SelfAttention.o.weight", "self_attn_out"),
        ("decoder.block.1.layer.1.EncDecAttention.o.weight", "cross_attn_out"),
        ("decoder.block.1.layer.1.EncDecAttention.q.weight", "cross_query"),
        ("decoder.block.1.layer.2.DenseReluDense.wi_0.weight", "gate"),
        ("encoder.layer.0.attention.self.query_proj.weight", "query"),
        ("encoder.layer.0.attention.self.value_proj.weight", "value"),
        ("visual.blocks.0.attn.proj.weight", "attn_out"),
        ("model.decoder.layers.2.encoder_attn.out_proj.weight", "cross_attn_out"),
    ],
)
def test_module_kinds_of_other_layouts(name, kind):
    assert module_kind(name) == kind
    assert block_index(name) is not None


@pytest.mark.parametrize(
    ("name", "stack"),
    [
        ("encoder.block.0.layer.0.SelfAttention.q.weight", "encoder"),
        ("decoder.block.0.layer.0.SelfAttention.q.weight", "decoder"),
        ("model.language_model.layers.0.self_attn.q_proj.weight", "language"),
        ("model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight", "vision"),
        ("model.visual.blocks.0.attn.qkv.weight", "vision"),
    ],
)
def test_stack_labels(name, stack):
    from analysis.layouts import stack_label

    assert stack_label(name) == stack


def test_block_index():
    assert block_index("encoder.layer.11.attention.self.query.weight") == 11
    assert block_index("transformer.h.3.attn.c_attn.weight") == 3
    assert block_index("layers.7.mlp.up_proj.weight") == 7
    assert block_index("model.embed_tokens.weight") is None
    assert block_index("pooler.dense.weight") is None


def test_prefix_in_tuned_only_still_pairs(tiny_bert, tiny_bert_cls):
    """``BertModel`` names have no prefix; ``BertForSequenceClassification`` adds ``bert.``."""
    plan = plan_comparison(open_model(tiny_bert), open_model(tiny_bert_cls), include_non_block=True)
    assert len([m for m in plan.matrices if m.layer is not None]) == 12
    assert "pooler.dense.weight" in _modules(plan)
    assert plan.unmatched == ["classifier.weight"]
    # Same seed, same encoder: the "fine-tune" is identical to the base.
    matrix = plan.matrices[0]
    assert torch.equal(matrix.load_base(), matrix.load_tuned().weight)

    reverse = plan_comparison(open_model(tiny_bert_cls), open_model(tiny_bert))
    assert [m.name for m in reverse.matrices][0] == "bert.encoder.layer.0.attention.output.dense.weight"
    assert len(reverse.matrices) == 12


def test_match_names_with_model_prefix_on_one_side():
    base = ["model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight", "lm_head.weight"]
    tuned = ["layers.0.mlp.up_proj.weight", "layers.1.mlp.up_proj.weight"]
    assert match_names(base, tuned) == {b: t for b, t in zip(base[:2], tuned, strict=True)}


def test_adapter_trained_on_a_prefixed_model_pairs_with_a_bare_base(tiny_bert_cls, tiny_bert, peft_adapter):
    adapter = open_model(peft_adapter("bert_cls", "lora"))
    assert next(iter(adapter.modules)).startswith("bert.")
    plan = plan_comparison(open_model(tiny_bert), adapter)
    assert sorted(m.name for m in plan.matrices) == [
        f"encoder.layer.{i}.attention.self.{p}.weight" for i in (0, 1) for p in ("query", "value")
    ]


def test_unmatched_and_shape_mismatches_are_listed_never_analysed(tiny_llama, tiny_llama_full_ft, tmp_path):
    tensors = load_file(tiny_llama_full_ft / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"][:48].contiguous()
    del tensors["model.layers.0.self_attn.o_proj.weight"]
    tensors["model.layers.0.self_attn.extra_proj.weight"] = torch.zeros(8, 32)
    folder = tmp_path / "edited"
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors")
    shutil.copy(tiny_llama_full_ft / "config.json", folder)

    plan = plan_comparison(open_model(tiny_llama), open_model(folder))
    names = {m.name for m in plan.matrices}
    assert len(names) == 12
    assert "model.layers.1.mlp.up_proj.weight" not in names
    assert "model.layers.0.self_attn.o_proj.weight" not in names
    assert plan.unmatched == ["model.layers.0.self_attn.o_proj.weight", "model.layers.0.self_attn.extra_proj.weight"]
    (mismatch,) = plan.shape_mismatches
    assert (mismatch.name, mismatch.base_shape, mismatch.tuned_shape) == (
        "model.layers.1.mlp.up_proj.weight",
        (64, 32),
        (48, 32),
    )
    assert plan.summary["shape_mismatches"] == 1 and plan.summary["unmatched"] == 2


def test_sharded_and_bf16_pair_like_the_original(tiny_llama, tiny_llama_sharded, tiny_llama_bf16):
    base = open_model(tiny_llama)
    sharded = plan_comparison(base, open_model(tiny_llama_sharded))
    bf16 = plan_comparison(open_model(tiny_llama_bf16), open_model(tiny_llama))
    assert [m.name for m in sharded.matrices] == [m.name for m in bf16.matrices]
    assert len(sharded.matrices) == 14
    for matrix in sharded.matrices:
        assert torch.equal(matrix.load_base(), matrix.load_tuned().weight)
    matrix = bf16.matrices[0]
    upcast = matrix.load_base()
    assert upcast.dtype == torch.float32
    assert torch.equal(upcast, matrix.load_tuned().weight.to(torch.bfloat16).float())
    assert not torch.equal(upcast, matrix.load_tuned().weight)  # bf16 really lost precision


def test_adapter_plan_summary_shows_settings_before_any_work(tiny_llama, peft_adapter):
    plan = plan_comparison(open_model(tiny_llama), open_model(peft_adapter("llama", "patterns")))
    summary = plan.summary
    assert summary["architecture"] == "LlamaForCausalLM" and summary["model_type"] == "llama"
    assert summary["matched_matrices"] == 14
    adapter = summary["adapter"]
    assert adapter["peft_type"] == "LORA" and adapter["r"] == 4 and adapter["lora_alpha"] == 8
    assert adapter["use_rslora"] is False and adapter["use_dora"] is False
    assert adapter["rank_pattern"] == {"layers.1.*q_proj": 8}
    assert adapter["alpha_pattern"] == {"v_proj": 12, "layers.1.*q_proj": 20}
    assert adapter["target_modules"] == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    json.dumps(summary)  # shown in the page and CLI: plain data
    ranks = {m.name: m.adapter_rank for m in plan.matrices}
    assert ranks["model.layers.1.self_attn.q_proj.weight"] == 8
    assert ranks["model.layers.0.self_attn.q_proj.weight"] == 4


def test_dora_and_modules_to_save_are_full_replacements(tiny_bert, peft_adapter):
    plan = plan_comparison(open_model(tiny_bert), open_model(peft_adapter("bert", "modules_to_save")))
    replaced = next(m for m in plan.matrices if m.name == "encoder.layer.0.intermediate.dense.weight")
    assert replaced.adapter_rank is None and replaced.shape == (128, 32)
    tuned = replaced.load_tuned()
    assert tuned.low_rank is None and not torch.equal(tuned.weight, replaced.load_base())
    assert plan.summary["adapter"]["modules_to_save"] == ["intermediate.dense"]


def test_merged_lora_checkpoint_is_a_full_comparison(tiny_llama, tiny_llama_merged_lora):
    plan = plan_comparison(open_model(tiny_llama), open_model(tiny_llama_merged_lora))
    changed = [m.name for m in plan.matrices if not torch.equal(m.load_base(), m.load_tuned().weight)]
    assert plan.kind == "full"
    assert sorted(changed) == [f"model.layers.{i}.self_attn.{p}_proj.weight" for i in (0, 1) for p in ("q", "v")]


# -- adapters that do not fit their base ----------------------------------------------------


def test_adapter_for_another_architecture(tiny_bert, tiny_llama_lora):
    with pytest.raises(InputError, match=r"none of the adapter's 4 modules .* exists in the base model") as info:
        plan_comparison(open_model(tiny_bert), open_model(tiny_llama_lora))
    assert info.value.source == str(tiny_llama_lora)
    assert "it was trained on" in str(info.value)


def test_adapter_for_a_same_family_model_of_another_size(tiny_llama, tmp_path, peft_adapter):
    wider = factories.make_llama(tmp_path / "wider", hidden_size=48, num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(InputError, match=r"does not fit the base model .*: 4 of 4 adapted matrices have other shapes"):
        plan_comparison(open_model(wider), open_model(peft_adapter("llama", "lora")))


def test_adapter_modules_missing_from_the_base_blocks(tiny_llama, tmp_path, peft_adapter):
    shallow = factories.make_llama(tmp_path / "shallow", num_hidden_layers=1)
    with pytest.raises(InputError, match=r"2 adapted module\(s\) do not exist in the base model .*model.layers.1"):
        plan_comparison(open_model(shallow), open_model(peft_adapter("llama", "lora")))


def test_full_finetune_of_another_model_shares_nothing(tiny_bert, tiny_gpt2):
    with pytest.raises(InputError, match="shares no weight matrix with the base model"):
        plan_comparison(open_model(tiny_bert), open_model(tiny_gpt2))


def test_adapted_embeddings_are_reported_but_analysed_only_on_request(tiny_llama, peft_adapter):
    adapter = open_model(peft_adapter("llama", "embedding"))
    blocks = plan_comparison(open_model(tiny_llama), adapter)
    assert [m.layer for m in blocks.matrices] == [0, 0, 1, 1]
    assert blocks.summary["non_block_adapted"] == ["model.embed_tokens.weight"]
    everything = plan_comparison(open_model(tiny_llama), adapter, include_non_block=True)
    embedding = next(m for m in everything.matrices if m.name == "model.embed_tokens.weight")
    assert embedding.shape == (100, 32) and embedding.module == "embed_tokens"
    assert everything.summary["non_block_adapted"] == []


@pytest.mark.parametrize("family", ["gpt2", "mixtral", "gpt_oss", "llava"])
def test_a_stored_layout_plans_exactly_as_transformers_does(family, tmp_path, monkeypatch):
    """What transformers says about an architecture (renamed names, stacked Mixtral experts,
    gpt-oss's transposed experts, GPT-2's Conv1D) is stored in the cache, so a later
    process plans without importing transformers (1-2 s); the plan is the same, and a
    damaged stored layout is built again."""
    from analysis import layouts
    from analysis.slots import catalogue
    from tests import families

    families.quiet()
    folder = families.save(families.build(family), family, tmp_path / "model")
    monkeypatch.setenv("WSE_CACHE_DIR", str(tmp_path / "cache"))
    layouts._meta_info.cache_clear()
    built = catalogue(open_model(str(folder)), include_non_block=True)
    stored = list((tmp_path / "cache" / "layouts").rglob("*.json"))
    assert len(stored) == 1

    def no_transformers(_config_json):
        raise AssertionError("a stored layout built the model again")

    monkeypatch.setattr(layouts, "_meta_info", no_transformers)
    assert catalogue(open_model(str(folder)), include_non_block=True) == built
    stored[0].write_text('{"available": true, "placements": {"x": [1]}}')
    monkeypatch.undo()
    monkeypatch.setenv("WSE_CACHE_DIR", str(tmp_path / "cache"))
    assert catalogue(open_model(str(folder)), include_non_block=True) == built
    assert json.loads(stored[0].read_text())["placements"]  # written again, whole


def test_planning_in_a_new_process_needs_no_transformers_once_its_layout_is_stored(tiny_llama, tmp_path):
    import os
    import subprocess
    import sys

    code = (
        "import sys; from analysis.compare import plan_models; "
        f"plan_models({str(tiny_llama)!r}, [{str(tiny_llama)!r}]); print('transformers' in sys.modules)"
    )
    env = {**os.environ, "WSE_CACHE_DIR": str(tmp_path / "cache")}
    runs = [
        subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True) for _ in "12"
    ]
    assert [r.stdout.split()[-1] for r in runs] == ["True", "False"]

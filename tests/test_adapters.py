"""LoRA adapters: PEFT parity of the merge rule for every variant, kohya files, rejections."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from analysis.adapters import LoraAdapter, lora_scale, merge_lora, pattern_key
from analysis.errors import InputError
from analysis.pairing import plan_comparison
from analysis.specs import open_model
from tests import factories

# (model kind, adapter variant) pairs PEFT itself creates and merges.
PEFT_CASES = [
    (kind, variant)
    for kind in ("bert", "gpt2", "llama")
    for variant in ("lora", "rslora", "patterns", "dora", "embedding", "modules_to_save", "mlp")
] + [("gpt2", "fan_in_fan_out")]

# Variants whose update is exactly low-rank, so the plan must hand out its factors.
LOW_RANK_VARIANTS = {"lora", "rslora", "patterns", "fan_in_fan_out", "mlp", "embedding"}


def _stored(matrix, weight: torch.Tensor, kind: str) -> torch.Tensor:
    """A reference weight in the plan's orientation (GPT-2 block weights are Conv1D)."""
    return weight.T if kind == "gpt2" and matrix.layer is not None else weight


@pytest.mark.parametrize(("kind", "variant"), PEFT_CASES, ids=[f"{k}-{v}" for k, v in PEFT_CASES])
def test_merged_weight_equals_peft_merge_and_unload(kind, variant, peft_adapter, request):
    base_dir = request.getfixturevalue(f"tiny_{kind}")
    adapter_dir = peft_adapter(kind, variant)
    reference = factories.peft_merged_state_dict(base_dir, adapter_dir)
    base = open_model(base_dir)
    plan = plan_comparison(base, open_model(adapter_dir), include_non_block=True)
    assert plan.kind == "adapter" and not plan.shape_mismatches

    changed = {
        name
        for name in base.names()
        if len(base.shape(name)) == 2 and not torch.equal(base.load(name).float(), reference[name])
    }
    assert changed, "the adapter must change something"
    assert {m.name for m in plan.matrices} >= changed, "every weight PEFT changes is in the plan"

    for matrix in plan.matrices:
        expected = _stored(matrix, reference[matrix.name], kind)
        base_weight = matrix.load_base()
        tuned = matrix.load_tuned()
        assert tuned.weight.dtype == torch.float32 and tuned.weight.shape == matrix.shape
        scale = float(expected.abs().max())
        torch.testing.assert_close(tuned.weight, expected, rtol=0, atol=1e-6 * scale, msg=matrix.name)
        if matrix.name not in changed:
            continue
        if variant in LOW_RANK_VARIANTS and tuned.low_rank is not None:
            torch.testing.assert_close(
                tuned.low_rank.dense(), expected - base_weight, rtol=0, atol=1e-6 * scale, msg=matrix.name
            )
            assert tuned.low_rank.rank == matrix.adapter_rank
    if variant in LOW_RANK_VARIANTS - {"embedding"}:
        assert all(m.load_tuned().low_rank is not None for m in plan.matrices if m.name in changed)


def test_dora_rows_have_the_learned_magnitude(tiny_llama, peft_adapter):
    """DoRA (Liu et al. 2024, eq. 5): each output row of the merged weight has norm m."""
    adapter_dir = peft_adapter("llama", "dora")
    saved = load_file(adapter_dir / "adapter_model.safetensors")
    plan = plan_comparison(open_model(tiny_llama), open_model(adapter_dir))
    assert len(plan.matrices) == 4
    for matrix in plan.matrices:
        tuned = matrix.load_tuned()
        assert tuned.low_rank is None, "DoRA's update is not low-rank"
        magnitude = saved[f"base_model.model.{matrix.name.removesuffix('.weight')}.lora_magnitude_vector"]
        torch.testing.assert_close(torch.linalg.norm(tuned.weight, dim=1), magnitude, rtol=1e-5, atol=0)


def test_scales_follow_rslora_and_patterns(peft_adapter):
    plain = open_model(peft_adapter("llama", "lora"))
    rslora = open_model(peft_adapter("llama", "rslora"))
    patterns = open_model(peft_adapter("llama", "patterns"))
    assert plain.modules["model.layers.0.self_attn.q_proj"].scale == 2.0  # alpha 8 / r 4
    assert rslora.modules["model.layers.0.self_attn.q_proj"].scale == 4.0  # alpha 8 / sqrt(4)
    # rank_pattern {"layers.1.*q_proj": 8}, alpha_pattern {"v_proj": 12, "layers.1.*q_proj": 20}
    assert patterns.modules["model.layers.1.self_attn.q_proj"].rank == 8
    assert patterns.modules["model.layers.1.self_attn.q_proj"].scale == 2.5
    assert patterns.modules["model.layers.0.self_attn.q_proj"].scale == 2.0
    assert patterns.modules["model.layers.0.self_attn.v_proj"].scale == 3.0
    assert patterns.modules["model.layers.0.mlp.down_proj"].scale == 2.0


def test_lora_scale_formula():
    assert lora_scale(16, 8, use_rslora=False) == 2.0
    assert lora_scale(16, 64, use_rslora=True) == 2.0
    assert math.isclose(lora_scale(8, 3, use_rslora=True), 8 / math.sqrt(3))


@pytest.mark.parametrize(
    ("keys", "module"),
    [
        (["q_proj"], "model.layers.0.self_attn.q_proj"),
        (["layers.1.*q_proj", "v_proj"], "model.layers.1.self_attn.q_proj"),
        (["layers.1.*q_proj"], "model.layers.11.self_attn.q_proj"),
        (["proj"], "model.layers.0.self_attn.q_proj"),
        (["self_attn.q_proj"], "model.layers.0.self_attn.q_proj"),
        (["^model.layers.0.self_attn.q_proj"], "model.layers.0.self_attn.q_proj"),
        (["mlp"], "model.layers.0.mlp.up_proj"),
    ],
)
def test_pattern_key_matches_peft(keys, module):
    from peft.utils.other import get_pattern_key

    assert pattern_key(keys, module) == get_pattern_key(keys, module)


def test_merge_lora_against_a_float64_reference():
    g = torch.Generator().manual_seed(0)
    W, B, A = torch.randn(6, 5, generator=g), torch.randn(6, 2, generator=g), torch.randn(2, 5, generator=g)
    m = torch.rand(6, generator=g) + 0.5
    lora = merge_lora(W, B, A, 1.5)
    torch.testing.assert_close(lora.weight.double(), W.double() + 1.5 * B.double() @ A.double(), rtol=1e-6, atol=1e-6)
    dora = merge_lora(W, B, A, 1.5, magnitude=m)
    updated = W.double() + 1.5 * B.double() @ A.double()
    reference = m.double()[:, None] * updated / updated.norm(dim=1, keepdim=True)
    torch.testing.assert_close(dora.weight.double(), reference, rtol=1e-6, atol=1e-6)


def test_bin_adapter_equals_safetensors_adapter(tiny_llama, tmp_path):
    safe = factories.make_lora_adapter(tiny_llama, tmp_path / "safe")
    binary = factories.make_lora_adapter(tiny_llama, tmp_path / "bin", safe_serialization=False)
    assert (binary / "adapter_model.bin").exists() and not (binary / "adapter_model.safetensors").exists()
    base = open_model(tiny_llama)
    a, b = plan_comparison(base, open_model(safe)), plan_comparison(base, open_model(binary))
    assert [m.name for m in a.matrices] == [m.name for m in b.matrices]
    for x, y in zip(a.matrices, b.matrices, strict=True):
        assert torch.equal(x.load_tuned().weight, y.load_tuned().weight)


def test_settings_are_documented_data(peft_adapter):
    from dataclasses import fields

    from analysis.adapters import LoraSettings

    assert all(f.metadata.get("help") for f in fields(LoraSettings))
    settings = open_model(peft_adapter("bert", "modules_to_save")).settings
    assert settings.modules_to_save == ["intermediate.dense"]
    assert sorted(settings.target_modules) == ["query", "value"]


# -- kohya --------------------------------------------------------------------------------


def test_kohya_update_is_alpha_over_rank_up_down(tiny_llama, tiny_llama_kohya):
    adapter = open_model(tiny_llama_kohya)
    assert isinstance(adapter, LoraAdapter) and adapter.format == "kohya"
    plan = plan_comparison(open_model(tiny_llama), adapter)
    assert sorted(m.name for m in plan.matrices) == [
        f"model.layers.{i}.self_attn.{p}_proj.weight" for i in (0, 1) for p in ("q", "v")
    ]
    factors = load_file(tiny_llama_kohya)
    base = load_file(tiny_llama / "model.safetensors")
    for matrix in plan.matrices:
        key = factories.kohya_module_name(matrix.name)
        up, down = factors[f"{key}.lora_up.weight"], factors[f"{key}.lora_down.weight"]
        assert float(factors[f"{key}.alpha"]) == 8.0
        expected = base[matrix.name] + 8.0 / 4 * up @ down
        tuned = matrix.load_tuned()
        torch.testing.assert_close(tuned.weight, expected, rtol=0, atol=1e-6)
        assert tuned.low_rank is not None and tuned.low_rank.scale == 2.0


def test_kohya_without_alpha_uses_alpha_equal_rank(tiny_gpt2, tmp_path):
    path = factories.make_kohya_lora(tiny_gpt2, tmp_path / "gpt2.safetensors", alpha=None, r=3)
    plan = plan_comparison(open_model(tiny_gpt2), open_model(path))
    names = sorted(m.name for m in plan.matrices)
    assert names == ["transformer.h.0.attn.c_proj.weight", "transformer.h.0.mlp.c_proj.weight"] + [
        "transformer.h.1.attn.c_proj.weight",
        "transformer.h.1.mlp.c_proj.weight",
    ]
    factors = load_file(path)
    base = load_file(tiny_gpt2 / "model.safetensors")
    matrix = next(m for m in plan.matrices if m.name == "transformer.h.1.mlp.c_proj.weight")
    assert matrix.shape == (32, 128)  # Conv1D stored 128 x 32, handed out out x in
    key = factories.kohya_module_name(matrix.name)
    expected = base[matrix.name].T + factors[f"{key}.lora_up.weight"] @ factors[f"{key}.lora_down.weight"]
    torch.testing.assert_close(matrix.load_tuned().weight, expected, rtol=0, atol=1e-6)


# -- rejections ---------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "variant", "peft_type"), [("llama", "ia3", "IA3"), ("bert", "loha", "LOHA")])
def test_non_lora_peft_adapters_are_rejected(kind, variant, peft_type, peft_adapter):
    folder = peft_adapter(kind, variant)
    with pytest.raises(InputError, match=f"peft_type is {peft_type}: only LoRA adapters") as info:
        open_model(folder)
    assert info.value.source.endswith("adapter_config.json")


def test_untrained_adapter_is_rejected(tiny_bert, tmp_path):
    folder = factories.make_lora_adapter(tiny_bert, tmp_path / "untrained", untrained=True)
    with pytest.raises(InputError, match="the adapter's update is zero: lora_B is all zeros") as info:
        open_model(folder)
    assert info.value.source == str(folder)


def test_kohya_with_zero_up_is_rejected(tiny_llama, tmp_path):
    path = factories.make_kohya_lora(tiny_llama, tmp_path / "k.safetensors")
    tensors = {k: torch.zeros_like(v) if "lora_up" in k else v for k, v in load_file(path).items()}
    save_file(tensors, path)
    with pytest.raises(InputError, match="lora_up is all zeros"):
        open_model(path)


def _edited_adapter(source, tmp_path, **changes):
    folder = tmp_path / "edited"
    shutil.copytree(source, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"use_bdlora": {"nblocks": 2}}, "block-diagonal LoRA"),
        ({"alora_invocation_tokens": [1, 2]}, "activated LoRA"),
        ({"layer_replication": [[0, 2], [1, 2]]}, "layer replication"),
        ({"r": 16}, "has rank 4 factors but adapter_config.json gives it r=16"),
        ({"peft_type": None}, "peft_type is missing"),
    ],
)
def test_unsupported_or_inconsistent_configs_are_rejected(tiny_bert_lora, tmp_path, change, message):
    with pytest.raises(InputError, match=message):
        open_model(_edited_adapter(tiny_bert_lora, tmp_path, **change))


def test_adapter_folder_without_weights(tiny_bert_lora, tmp_path):
    folder = tmp_path / "noweights"
    folder.mkdir()
    shutil.copy(tiny_bert_lora / "adapter_config.json", folder)
    with pytest.raises(InputError, match="no adapter_model.safetensors"):
        open_model(folder)


def test_factor_with_missing_partner(tiny_bert_lora, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(tiny_bert_lora, folder)
    tensors = load_file(folder / "adapter_model.safetensors")
    del tensors["base_model.model.encoder.layer.1.attention.self.value.lora_B.weight"]
    save_file(tensors, folder / "adapter_model.safetensors")
    with pytest.raises(InputError, match="'encoder.layer.1.attention.self.value' has no lora_B weight"):
        open_model(folder)

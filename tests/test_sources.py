"""Opening checkpoints: folders, files, shards, bf16, pytorch_model.bin, and bad input."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from analysis.adapters import LoraAdapter
from analysis.errors import InputError
from analysis.sources import WeightSource
from analysis.specs import open_model


def test_folder_opens_lazily_with_names_shapes_dtypes_and_config(tiny_llama):
    source = open_model(tiny_llama)
    assert isinstance(source, WeightSource)
    assert source.label == str(tiny_llama)
    on_disk = load_file(tiny_llama / "model.safetensors")
    assert source.names() == sorted(on_disk)
    assert source.shape("model.layers.0.self_attn.k_proj.weight") == (16, 32)
    assert source.dtype("model.layers.1.mlp.up_proj.weight") == torch.float32
    torch.testing.assert_close(
        source.load("model.layers.1.mlp.up_proj.weight"), on_disk["model.layers.1.mlp.up_proj.weight"]
    )
    assert source.config["model_type"] == "llama"
    assert source.config["architectures"] == ["LlamaForCausalLM"]


def test_sharded_checkpoint_has_the_same_tensors_as_the_unsharded_one(tiny_llama, tiny_llama_sharded):
    shards = sorted(p.name for p in tiny_llama_sharded.glob("model-*.safetensors"))
    assert len(shards) > 2, "the fixture must really be sharded"
    whole, sharded = open_model(tiny_llama), open_model(tiny_llama_sharded)
    assert sharded.names() == whole.names()
    files = {sharded.file(n).name for n in sharded.names()}
    assert files == set(shards)
    for name in whole.names():
        assert torch.equal(sharded.load(name), whole.load(name)), name
        assert sharded.content_digest(name) == whole.content_digest(name)


def test_bf16_checkpoint_reports_bf16_and_loads_it(tiny_llama, tiny_llama_bf16):
    source = open_model(tiny_llama_bf16)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert source.dtype(name) == torch.bfloat16
    expected = open_model(tiny_llama).load(name).to(torch.bfloat16)
    assert torch.equal(source.load(name), expected)


def test_pytorch_bin_folder_loads_with_weights_only(tiny_bert, tiny_bert_bin):
    assert not (tiny_bert_bin / "model.safetensors").exists()
    source = open_model(tiny_bert_bin)
    reference = open_model(tiny_bert)
    assert source.names() == reference.names()
    name = "encoder.layer.1.intermediate.dense.weight"
    assert source.shape(name) == (128, 32)
    assert torch.equal(source.load(name), reference.load(name))


class _Exploit:
    def __reduce__(self):
        return (Path.touch, (Path(_Exploit.target),))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickle_with_code_is_refused_and_never_executed(tmp_path):
    folder = tmp_path / "evil"
    folder.mkdir()
    _Exploit.target = str(tmp_path / "pwned")
    with open(folder / "pytorch_model.bin", "wb") as handle:
        pickle.dump({"w": _Exploit()}, handle)
    with pytest.raises(InputError, match="pytorch_model.bin.*weights only"):
        open_model(folder)
    assert not (tmp_path / "pwned").exists()


def test_single_safetensors_file(tiny_gpt2):
    source = open_model(tiny_gpt2 / "model.safetensors")
    assert isinstance(source, WeightSource)
    assert source.shape("transformer.h.0.attn.c_attn.weight") == (32, 96)
    assert source.config["model_type"] == "gpt2"  # config.json next to the file


def test_content_digest_tells_tensors_apart(tiny_bert, tiny_bert_full_ft):
    base, tuned = open_model(tiny_bert), open_model(tiny_bert_full_ft)
    name = "encoder.layer.0.attention.self.query.weight"
    assert base.content_digest(name) == base.content_digest(name)
    assert base.content_digest(name) != tuned.content_digest(name)


def test_kohya_file_opens_as_adapter(tiny_llama_kohya):
    assert isinstance(open_model(tiny_llama_kohya), LoraAdapter)


def test_peft_folder_opens_as_adapter(tiny_bert_lora):
    adapter = open_model(tiny_bert_lora)
    assert isinstance(adapter, LoraAdapter)
    assert adapter.settings.r == 4


# -- bad input: every one an InputError naming the file and the problem -------------------


def test_garbage_bytes_are_a_corrupt_safetensors_file(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(InputError, match="not a safetensors file") as info:
        open_model(path)
    assert info.value.source == str(path)


def test_json_garbage_in_header_is_reported(tmp_path):
    path = tmp_path / "weights.safetensors"
    header = b"{not json at all}"
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(InputError, match="corrupt header"):
        open_model(path)


def test_truncated_safetensors_names_the_tensor_and_sizes(tiny_bert, tmp_path):
    folder = tmp_path / "truncated"
    shutil.copytree(tiny_bert, folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"is truncated: tensor '.*' needs bytes up to \d+") as info:
        open_model(folder)
    assert info.value.source.endswith("model.safetensors")


def test_truncated_header_is_reported(tiny_bert, tmp_path):
    path = tmp_path / "cut.safetensors"
    path.write_bytes((tiny_bert / "model.safetensors").read_bytes()[:100])
    with pytest.raises(InputError, match="is truncated: its header says"):
        open_model(path)


def test_index_pointing_to_a_missing_shard(tiny_llama_sharded, tmp_path):
    folder = tmp_path / "sharded"
    shutil.copytree(tiny_llama_sharded, folder)
    (folder / "model-00003-of-00007.safetensors").unlink()
    with pytest.raises(
        InputError, match="points to shard 'model-00003-of-00007.safetensors', which is missing"
    ) as info:
        open_model(folder)
    assert info.value.source.endswith("model.safetensors.index.json")


def test_index_listing_a_tensor_its_shard_lacks(tiny_llama_sharded, tmp_path):
    folder = tmp_path / "sharded"
    shutil.copytree(tiny_llama_sharded, folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = "model-00001-of-00007.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(InputError, match="model.layers.9.mlp.up_proj.weight"):
        open_model(folder)


def test_index_escaping_its_folder_is_refused(tiny_llama_sharded, tmp_path):
    folder = tmp_path / "sharded"
    shutil.copytree(tiny_llama_sharded, folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../../etc/passwd"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(InputError, match="outside its folder"):
        open_model(folder)


def test_empty_folder(tmp_path):
    with pytest.raises(InputError, match="is an empty folder") as info:
        open_model(tmp_path)
    assert info.value.source == str(tmp_path)


def test_folder_without_weights(tmp_path):
    (tmp_path / "README.md").write_text("hello")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(InputError, match="holds no model weights"):
        open_model(tmp_path)


def test_file_that_is_not_a_model(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not a model")
    with pytest.raises(InputError, match="is not a model") as info:
        open_model(path)
    assert info.value.source == str(path)


def test_broken_config_json_is_named(tiny_bert, tmp_path):
    folder = tmp_path / "bert"
    shutil.copytree(tiny_bert, folder)
    (folder / "config.json").write_text("{broken")
    with pytest.raises(InputError, match="is not valid JSON") as info:
        open_model(folder)
    assert info.value.source.endswith("config.json")


def test_safetensors_with_no_tensors(tmp_path):
    path = tmp_path / "empty.safetensors"
    save_file({}, path)
    with pytest.raises(InputError, match="holds no tensors"):
        open_model(path)


def test_missing_local_path(tmp_path):
    with pytest.raises(InputError, match="no such file or folder"):
        open_model(tmp_path / "nope")
    with pytest.raises(InputError, match="no such file or folder"):
        open_model("./does/not/exist")


def test_peft_weights_file_without_its_config(tiny_bert_lora):
    with pytest.raises(InputError, match="adapter_config.json"):
        open_model(tiny_bert_lora / "adapter_model.safetensors")


@pytest.mark.parametrize("spec_kind", ["folder", "file", "relative", "home"])
def test_local_paths_disabled(tiny_bert, spec_kind, monkeypatch):
    monkeypatch.chdir(tiny_bert.parent)
    spec = {
        "folder": str(tiny_bert),
        "file": str(tiny_bert / "model.safetensors"),
        "relative": f"./{tiny_bert.name}",
        "home": "~/models/bert",
    }[spec_kind]
    with pytest.raises(InputError, match="local paths are disabled on this server") as info:
        open_model(spec, allow_local_paths=False)
    assert info.value.source == spec


def test_empty_spec():
    with pytest.raises(InputError, match="no model given"):
        open_model("  ")

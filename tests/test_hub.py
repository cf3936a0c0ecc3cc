"""Hub model ids resolved offline against a local hub cache laid out like huggingface_hub's."""

from __future__ import annotations

import httpx2
import pytest
import torch

from analysis import sources
from analysis.adapters import LoraAdapter
from analysis.errors import InputError
from analysis.pairing import plan_comparison
from analysis.sources import WeightSource
from analysis.specs import open_model


def test_hub_id_resolves_from_the_cache_offline(offline_hub, tiny_bert):
    source = open_model("tiny-org/bert")
    assert isinstance(source, WeightSource)
    assert source.label == "tiny-org/bert"
    assert offline_hub in source.root.parents and "snapshots" in source.root.parts
    local = open_model(tiny_bert)
    assert source.names() == local.names()
    name = "encoder.layer.1.attention.self.key.weight"
    assert torch.equal(source.load(name), local.load(name))
    assert source.config["model_type"] == "bert"


def test_hub_ids_work_with_local_paths_disabled(offline_hub):
    plan = plan_comparison(
        open_model("tiny-org/bert", allow_local_paths=False), open_model("tiny-org/bert-ft", allow_local_paths=False)
    )
    assert plan.base_label == "tiny-org/bert" and plan.tuned_label == "tiny-org/bert-ft"
    assert len(plan.matrices) == 12


def test_sharded_hub_repo(offline_hub, tiny_llama):
    source = open_model("tiny-org/llama-sharded")
    assert len({source.file(n) for n in source.names()}) > 2
    assert source.names() == open_model(tiny_llama).names()


def test_hub_adapter_is_applied_to_a_hub_base(offline_hub):
    adapter = open_model("tiny-org/llama-lora")
    assert isinstance(adapter, LoraAdapter) and adapter.label == "tiny-org/llama-lora"
    plan = plan_comparison(open_model("tiny-org/llama"), adapter)
    assert plan.kind == "adapter" and len(plan.matrices) == 4


def test_unknown_id_offline_is_a_clear_error(offline_hub):
    with pytest.raises(InputError, match="not in the local hub cache and the hub is offline") as info:
        open_model("tiny-org/does-not-exist")
    assert info.value.source == "tiny-org/does-not-exist"


def test_unknown_revision_offline(offline_hub):
    with pytest.raises(InputError, match="not in the local hub cache"):
        open_model("tiny-org/bert@v9")


def test_pickle_only_hub_repo_is_not_loaded(offline_hub):
    with pytest.raises(InputError, match=r"has no \.safetensors weights on the hub .*pytorch_model\.bin"):
        open_model("tiny-org/bert-bin-only")


def test_a_local_folder_named_like_a_hub_id_is_ignored_when_paths_are_disabled(
    offline_hub, tiny_llama, tmp_path, monkeypatch
):
    """On a hosted server "tiny-org/bert" must mean the hub repo, never a server folder."""
    impostor = tmp_path / "tiny-org" / "bert"
    impostor.parent.mkdir()
    import shutil

    shutil.copytree(tiny_llama, impostor)
    monkeypatch.chdir(tmp_path)
    assert open_model("tiny-org/bert", allow_local_paths=False).config["model_type"] == "bert"
    assert open_model("tiny-org/bert").config["model_type"] == "llama"  # local paths first when allowed


@pytest.mark.parametrize("spec", ["not a model id!", "org/name/extra/parts", "-leading-dash"])
def test_invalid_ids(offline_hub, spec):
    with pytest.raises(InputError, match="no such file or folder|neither an existing local path nor a valid hub"):
        open_model(spec)


def _http_error(cls, status: int):
    response = httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/api/models/org/name"))
    return cls("hub says no", response=response)


@pytest.mark.parametrize(
    ("error", "message"),
    [
        ("gated", "is a gated model on the Hugging Face hub"),
        ("missing", "no such model on the Hugging Face hub"),
        ("revision", "that revision does not"),
        ("incomplete", "only partly in the local hub cache"),
    ],
)
def test_hub_errors_are_translated(monkeypatch, error, message):
    from huggingface_hub import errors

    raised = {
        "gated": lambda: _http_error(errors.GatedRepoError, 403),
        "missing": lambda: _http_error(errors.RepositoryNotFoundError, 404),
        "revision": lambda: _http_error(errors.RevisionNotFoundError, 404),
        "incomplete": lambda: errors.IncompleteSnapshotError("3 files missing", snapshot_path="/x"),
    }[error]()

    def fake_snapshot_download(*args, **kwargs):
        assert kwargs["allow_patterns"] == ["*.safetensors", "*.json"]
        raise raised

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no file listing: no network
    with pytest.raises(InputError, match=message) as info:
        sources.open_location("org/name")
    assert info.value.source == "org/name"


@pytest.mark.parametrize(
    ("files", "patterns"),
    [
        (["config.json", "model.safetensors", "consolidated.safetensors"], ["*.json", "model.safetensors"]),
        (
            [
                "config.json",
                "model.safetensors.index.json",
                "model-00001-of-00002.safetensors",
                "consolidated.safetensors",
            ],
            ["*.json", "model-*.safetensors"],
        ),
        (["adapter_config.json", "adapter_model.safetensors", "README.md"], ["*.json", "adapter_model.safetensors"]),
        (["config.json", "weights.safetensors"], ["*.safetensors", "*.json"]),
        (None, ["*.safetensors", "*.json"]),
    ],
)
def test_hub_downloads_only_the_weights_that_will_be_read(files, patterns):
    assert sources.hub_allow_patterns(files) == patterns

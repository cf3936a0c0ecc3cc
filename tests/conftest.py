"""Shared pytest fixtures: tiny real models, fine-tunes, adapters and a local hub cache.

Everything is built once per test session into a temporary folder by
:mod:`tests.factories` (real ``transformers``/``peft`` ``save_pretrained`` output, fixed
seeds), so tests never download anything. Fixture names:

- models: ``tiny_bert``, ``tiny_bert_cls`` (same encoder, ``bert.`` prefix + classifier),
  ``tiny_gpt2``, ``tiny_llama``;
- full fine-tunes: ``tiny_bert_full_ft``, ``tiny_gpt2_full_ft``, ``tiny_llama_full_ft``;
  merged LoRA checkpoints: ``tiny_bert_merged_lora``, ``tiny_llama_merged_lora``;
- other layouts: ``tiny_llama_sharded`` (index + shards), ``tiny_llama_bf16``,
  ``tiny_bert_bin`` (``pytorch_model.bin``);
- PEFT adapters: ``tiny_bert_lora``, ``tiny_gpt2_lora``, ``tiny_llama_lora`` and
  ``peft_adapter(kind, variant)`` for any (model kind, variant) of
  ``factories.ADAPTER_VARIANTS`` (built on first use, then reused);
- ``tiny_llama_kohya``: a kohya/sd-scripts style LoRA ``.safetensors`` for ``tiny_llama``;
- ``tiny_hub``: a hub cache folder holding ``tiny-org/bert``, ``tiny-org/bert-ft``,
  ``tiny-org/llama``, ``tiny-org/llama-sharded``, ``tiny-org/llama-lora`` (a PEFT adapter)
  and ``tiny-org/bert-bin-only`` (only ``pytorch_model.bin``), and ``offline_hub`` (function scope),
  which points ``HF_HUB_CACHE`` at it and turns on ``HF_HUB_OFFLINE`` (environment and
  ``huggingface_hub.constants``) and returns the cache folder.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests import factories

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# A dashboard opened on an empty cache folder would start training the real demo.
os.environ.setdefault("WSE_DEMO_AUTOBUILD", "0")


@pytest.fixture(scope="session")
def model_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session folder every tiny model is written to."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_bert(model_root: Path) -> Path:
    return factories.make_bert(model_root / "bert")


@pytest.fixture(scope="session")
def tiny_bert_cls(model_root: Path) -> Path:
    return factories.make_bert_cls(model_root / "bert_cls")


@pytest.fixture(scope="session")
def tiny_gpt2(model_root: Path) -> Path:
    return factories.make_gpt2(model_root / "gpt2")


@pytest.fixture(scope="session")
def tiny_llama(model_root: Path) -> Path:
    return factories.make_llama(model_root / "llama")


@pytest.fixture(scope="session")
def tiny_bert_full_ft(tiny_bert: Path, model_root: Path) -> Path:
    return factories.make_full_finetune(tiny_bert, model_root / "bert_full_ft")


@pytest.fixture(scope="session")
def tiny_gpt2_full_ft(tiny_gpt2: Path, model_root: Path) -> Path:
    return factories.make_full_finetune(tiny_gpt2, model_root / "gpt2_full_ft")


@pytest.fixture(scope="session")
def tiny_llama_full_ft(tiny_llama: Path, model_root: Path) -> Path:
    return factories.make_full_finetune(tiny_llama, model_root / "llama_full_ft")


@pytest.fixture(scope="session")
def tiny_bert_merged_lora(tiny_bert: Path, model_root: Path) -> Path:
    return factories.make_merged_lora(tiny_bert, model_root / "bert_merged_lora")


@pytest.fixture(scope="session")
def tiny_llama_merged_lora(tiny_llama: Path, model_root: Path) -> Path:
    return factories.make_merged_lora(tiny_llama, model_root / "llama_merged_lora")


@pytest.fixture(scope="session")
def tiny_llama_sharded(tiny_llama: Path, model_root: Path) -> Path:
    return factories.make_sharded(tiny_llama, model_root / "llama_sharded")


@pytest.fixture(scope="session")
def tiny_llama_bf16(tiny_llama: Path, model_root: Path) -> Path:
    return factories.make_bf16(tiny_llama, model_root / "llama_bf16")


@pytest.fixture(scope="session")
def tiny_bert_bin(tiny_bert: Path, model_root: Path) -> Path:
    return factories.make_pytorch_bin(tiny_bert, model_root / "bert_bin")


@pytest.fixture(scope="session")
def peft_adapter(model_root: Path, request: pytest.FixtureRequest) -> Callable[[str, str], Path]:
    """``peft_adapter(kind, variant) -> Path``: a PEFT adapter folder for the tiny ``kind``
    model (``bert``, ``bert_cls``, ``gpt2``, ``llama``), built once per session."""
    built: dict[tuple[str, str], Path] = {}

    def get(kind: str, variant: str = "lora") -> Path:
        if (kind, variant) not in built:
            base = request.getfixturevalue(f"tiny_{kind}")
            built[kind, variant] = factories.make_lora_adapter(base, model_root / f"{kind}_adapter_{variant}", variant)
        return built[kind, variant]

    return get


@pytest.fixture(scope="session")
def tiny_bert_lora(peft_adapter: Callable[[str, str], Path]) -> Path:
    return peft_adapter("bert", "lora")


@pytest.fixture(scope="session")
def tiny_gpt2_lora(peft_adapter: Callable[[str, str], Path]) -> Path:
    return peft_adapter("gpt2", "lora")


@pytest.fixture(scope="session")
def tiny_llama_lora(peft_adapter: Callable[[str, str], Path]) -> Path:
    return peft_adapter("llama", "lora")


@pytest.fixture(scope="session")
def tiny_llama_kohya(tiny_llama: Path, model_root: Path) -> Path:
    return factories.make_kohya_lora(tiny_llama, model_root / "llama_kohya" / "llama_lora.safetensors")


HUB_REPOS = {
    "tiny-org/bert": "tiny_bert",
    "tiny-org/bert-ft": "tiny_bert_full_ft",
    "tiny-org/llama": "tiny_llama",
    "tiny-org/llama-sharded": "tiny_llama_sharded",
    "tiny-org/llama-lora": "tiny_llama_lora",
    "tiny-org/bert-bin-only": "tiny_bert_bin",
}


@pytest.fixture(scope="session")
def tiny_hub(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    """A hub cache folder holding the repos of :data:`HUB_REPOS`."""
    cache = tmp_path_factory.mktemp("hub") / "hub"
    for repo_id, fixture in HUB_REPOS.items():
        factories.make_hub_cache(cache, repo_id, request.getfixturevalue(fixture))
    return cache


@pytest.fixture
def offline_hub(tiny_hub: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Resolve hub ids from ``tiny_hub`` only, offline. Returns the cache folder."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_CACHE", str(tiny_hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tiny_hub))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    return tiny_hub

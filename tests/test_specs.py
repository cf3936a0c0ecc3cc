"""Spec versions: a local folder rewritten in place is a new job, an upload never changes."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import save

from analysis.specs import SpecResolver
from hosting.uploads import UploadStore


def test_a_rewritten_local_folder_gets_a_new_version(tmp_path: Path, tiny_bert_full_ft: Path) -> None:
    folder = tmp_path / "ft"
    shutil.copytree(tiny_bert_full_ft, folder)
    resolver = SpecResolver(uploads=UploadStore(tmp_path / "uploads"), allow_local_paths=True)
    first = resolver.version(str(folder))
    assert first and resolver.version(str(folder)) == first  # stable while nothing changes
    time.sleep(0.01)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes())  # same bytes, rewritten: a new file version
    assert resolver.version(str(folder)) != first


def test_uploads_hub_ids_and_hidden_paths_have_no_version(tmp_path: Path, tiny_bert_full_ft: Path) -> None:
    store = UploadStore(tmp_path / "uploads")
    upload = store.add([("m.safetensors", save({"w": torch.zeros(3)}))])
    resolver = SpecResolver(uploads=store, allow_local_paths=False)
    assert resolver.version(upload.spec) == ""
    assert resolver.version("org/some-model") == ""
    assert resolver.version(str(tiny_bert_full_ft)) == ""  # local paths off: nothing is looked at

"""Uploads are stored by content, atomically, and never unpickled or unpacked unsafely."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save, save_file

from analysis.errors import InputError
from hosting.uploads import UploadStore, check_safetensors, safe_name


def _tensors_bytes() -> bytes:
    return save({"w": torch.arange(12, dtype=torch.float32).reshape(3, 4)})


def _adapter_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _zip(members: dict[str, bytes], symlinks: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, target)
    return buffer.getvalue()


@pytest.fixture
def store(tmp_path: Path) -> UploadStore:
    return UploadStore(tmp_path / "uploads")


def test_single_safetensors_is_named_by_its_sha256(store: UploadStore) -> None:
    data = _tensors_bytes()
    stored = store.add([("my model.safetensors", io.BytesIO(data))])
    assert stored.digest == hashlib.sha256(data).hexdigest()
    assert stored.spec == f"upload:{stored.digest}"
    assert stored.path.is_file() and stored.path.read_bytes() == data
    assert stored.path.name == "my_model.safetensors"
    assert store.get(stored.spec) == stored
    assert not stored.is_adapter


def test_adapter_zip_and_loose_files_get_the_same_id(store: UploadStore, tiny_bert_lora: Path) -> None:
    files = _adapter_files(tiny_bert_lora)
    loose = store.add([(n, d) for n, d in files.items() if n.endswith((".json", ".safetensors"))])
    zipped = store.add([("adapter.zip", _zip({f"my_adapter/{n}": d for n, d in files.items()}))])
    assert loose.digest == zipped.digest
    assert zipped.is_adapter and zipped.path.is_dir()
    assert sorted(p.name for p in zipped.path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    # Only one copy on disk and no staging folders left behind.
    assert sorted(p.name for p in store.root.iterdir() if p.name != ".store.lock") == [loose.digest]


def test_stored_adapter_opens_as_a_lora_adapter(store: UploadStore, tiny_bert_lora: Path) -> None:
    from analysis.adapters import LoraAdapter
    from analysis.specs import open_model

    files = _adapter_files(tiny_bert_lora)
    stored = store.add([("adapter.zip", _zip(files))])
    assert isinstance(open_model(stored.path), LoraAdapter)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "adapter_model.bin", "model.pt", "weights.pkl", "x.ckpt"])
def test_pickle_checkpoints_are_refused_with_advice(store: UploadStore, name: str) -> None:
    with pytest.raises(InputError, match="never unpickled.*safetensors"):
        store.add([(name, b"\x80\x04 pickle bytes")])
    assert not any(store.root.iterdir())


def test_zip_holding_only_pickles_is_refused(store: UploadStore) -> None:
    archive = _zip({"adapter/adapter_config.json": b"{}", "adapter/adapter_model.bin": b"\x80\x04"})
    with pytest.raises(InputError, match="never unpickled"):
        store.add([("adapter.zip", archive)])


def test_zip_path_traversal_is_refused(store: UploadStore, tmp_path: Path) -> None:
    archive = _zip({"../../evil.safetensors": _tensors_bytes()})
    with pytest.raises(InputError, match="leaving the archive"):
        store.add([("evil.zip", archive)])
    assert not (tmp_path / "evil.safetensors").exists()
    with pytest.raises(InputError, match="absolute path"):
        store.add([("abs.zip", _zip({"/etc/evil.safetensors": _tensors_bytes()}))])


def test_zip_symlinks_are_refused(store: UploadStore) -> None:
    archive = _zip({"a/adapter_config.json": b"{}"}, symlinks={"a/adapter_model.safetensors": "/etc/passwd"})
    with pytest.raises(InputError, match="symbolic link"):
        store.add([("links.zip", archive)])


def test_zip_caps_on_files_and_unpacked_bytes(tmp_path: Path) -> None:
    small = UploadStore(tmp_path / "u", max_files=3, max_bytes=10_000)
    many = _zip({f"f{i}.json": b"{}" for i in range(4)})
    with pytest.raises(InputError, match="holds 4 files; at most 3"):
        small.add([("many.zip", many)])
    # A zip bomb: tiny compressed, large unpacked; stopped by counting bytes as read.
    bomb = _zip({"big.safetensors": b"\0" * 1_000_000})
    assert len(bomb) < 10_000
    with pytest.raises(InputError, match="larger than"):
        small.add([("bomb.zip", bomb)])


def test_zip_nested_folders_and_junk_members(store: UploadStore) -> None:
    with pytest.raises(InputError, match="nested folders"):
        store.add([("n.zip", _zip({"a/b/model.safetensors": _tensors_bytes(), "a/c.json": b"{}"}))])
    # OS clutter and READMEs are skipped, not refused.
    stored = store.add(
        [("ok.zip", _zip({"m/model.safetensors": _tensors_bytes(), "m/README.md": b"hi", "__MACOSX/m/._x": b""}))]
    )
    assert stored.files == ("model.safetensors",)


def test_not_a_zip(store: UploadStore) -> None:
    with pytest.raises(InputError, match="not a valid zip"):
        store.add([("broken.zip", b"PK\x03\x04 this is not a zip")])


def test_truncated_and_corrupt_safetensors_are_refused(store: UploadStore, tmp_path: Path) -> None:
    data = _tensors_bytes()
    truncated = r"cut.safetensors.*is truncated: tensor 'w' needs bytes up to 48 of the data section but .* only 43"
    with pytest.raises(InputError, match=truncated):
        store.add([("cut.safetensors", data[:-5])])
    with pytest.raises(InputError, match="not a safetensors file"):
        store.add([("junk.safetensors", b"this is some text, not tensors at all")])
    with pytest.raises(InputError, match="only 3 bytes"):
        store.add([("tiny.safetensors", b"abc")])
    with pytest.raises(InputError, match=r"long.safetensors.*7 unexpected bytes after the last tensor"):
        store.add([("long.safetensors", data + b"garbage")])
    assert not any(store.root.iterdir())


def test_check_safetensors_accepts_real_files(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.zeros(2, 3), "b": torch.ones(5)}, path)
    check_safetensors(path, "m.safetensors")


def test_adapter_config_without_weights_and_bad_json(store: UploadStore) -> None:
    with pytest.raises(InputError, match="without adapter_model.safetensors"):
        store.add([("adapter_config.json", b'{"peft_type": "LORA"}')])
    with pytest.raises(InputError, match="no .safetensors file was uploaded"):
        store.add([("config.json", b'{"model_type": "bert"}')])
    with pytest.raises(InputError, match="without adapter_model.safetensors"):
        store.add([("adapter_config.json", b'{"peft_type": "LORA"}'), ("other.safetensors", _tensors_bytes())])
    with pytest.raises(InputError, match="not valid JSON"):
        store.add([("config.json", b"{nope"), ("model.safetensors", _tensors_bytes())])


def test_other_file_types_and_two_zips(store: UploadStore) -> None:
    with pytest.raises(InputError, match="no .safetensors file was uploaded"):
        store.add([("notes.txt", b"hello")])
    # Extra files picked along with an adapter folder are skipped, not refused.
    stored = store.add([("README.md", b"# my adapter"), ("model.safetensors", _tensors_bytes())])
    assert stored.files == ("model.safetensors",)
    with pytest.raises(InputError, match="either one zip"):
        store.add([("a.zip", b""), ("b.json", b"{}")])


def test_unknown_and_malformed_ids(store: UploadStore) -> None:
    with pytest.raises(InputError, match="not stored on this server"):
        store.get("upload:" + "0" * 64)
    with pytest.raises(InputError, match="not a valid upload id"):
        store.get("upload:../../etc")


def test_safe_name_strips_folders_and_odd_characters() -> None:
    assert safe_name("../../etc/passwd") == "passwd"
    assert safe_name("C:\\Users\\me\\adapter model (1).safetensors") == "adapter_model__1_.safetensors"
    assert safe_name(".hidden.json") == "hidden.json"


def test_concurrent_identical_uploads_store_one_copy(store: UploadStore) -> None:
    data = _tensors_bytes()
    results: list[str] = []
    errors: list[BaseException] = []

    def upload() -> None:
        try:
            results.append(store.add([("m.safetensors", data)]).digest)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=upload) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert set(results) == {hashlib.sha256(data).hexdigest()}
    assert [p.name for p in store.root.iterdir() if p.name != ".store.lock"] == [results[0]]


def _age(store: UploadStore, digest: str, seconds: float) -> None:
    """Pretend upload ``digest`` was last used ``seconds`` ago."""
    meta = store.root / digest / "upload.json"
    then = time.time() - seconds
    os.utime(meta, (then, then))


def test_store_budget_evicts_the_least_recently_used_and_never_a_recent_one(tmp_path: Path) -> None:
    one = len(save({"w": torch.zeros(64)}))
    store = UploadStore(tmp_path / "u", budget_bytes=int(2.5 * one))
    first = store.add([("a.safetensors", save({"w": torch.zeros(64)}))])
    second = store.add([("b.safetensors", save({"w": torch.ones(64)}))])
    _age(store, first.digest, 7200)
    _age(store, second.digest, 7300)
    store.get(second.digest)  # opened again (a shared link): used just now
    third = store.add([("c.safetensors", save({"w": torch.full((64,), 2.0)}))])
    assert sorted(p.name for p in store.root.iterdir() if not p.name.startswith(".")) == sorted(
        [second.digest, third.digest]
    )
    with pytest.raises(InputError, match="not stored on this server"):
        store.get(first.digest)
    assert store.stored_bytes() == 2 * one

    # Everything left was used within the hour: a new upload is refused, nothing removed.
    with pytest.raises(InputError, match="keeps at most .* GB of uploads and the rest were used within the last hour"):
        store.add([("d.safetensors", save({"w": torch.full((64,), 3.0)}))])
    assert store.stored_bytes() == 2 * one and not list(store.root.glob(".staging-*"))
    assert store.get(second.digest) and store.get(third.digest)
    # The same content again needs no room.
    assert store.add([("c-again.safetensors", save({"w": torch.full((64,), 2.0)}))]).digest == third.digest


def test_an_upload_larger_than_the_whole_budget_is_refused(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WSE_UPLOAD_BUDGET_GB", str(100 / 1024**3))
    store = UploadStore(tmp_path / "u")
    assert store.budget_bytes == 100
    with pytest.raises(InputError, match="larger than the .* GB this server keeps for all uploads together"):
        store.add([("a.safetensors", _tensors_bytes())])
    assert store.stored_bytes() == 0
    monkeypatch.setenv("WSE_UPLOAD_BUDGET_GB", "lots")
    with pytest.raises(InputError, match="WSE_UPLOAD_BUDGET_GB"):
        UploadStore(tmp_path / "u")

"""A hosted instance: visitor-safe errors, malformed input, limits, and a cache that is
read-only, full or tampered with. Every case here is one a visitor (or an operator's
typo) can cause; each must end in one plain sentence, never a traceback or a server path.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import sysconfig
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from analysis import cache as cache_module
from analysis.cache import SpectrumCache
from analysis.config import env_flag, env_number, env_switch, env_text
from analysis.errors import InputError, say_once
from analysis.files import atomic_write_text
from analysis.specs import SpecResolver
from cli import main
from hosting.jobs import JobManager, JobState
from hosting.public import public_message, server_places
from hosting.uploads import MAX_UNPACKED_BYTES, UploadStore
from tests import factories

REPO = Path(__file__).resolve().parent.parent


def _resolver(tmp_path: Path, *, local: bool) -> SpecResolver:
    return SpecResolver(uploads=UploadStore(tmp_path / "uploads"), allow_local_paths=local)


def _copy_adapter(adapter: Path, out: Path, **config_changes) -> Path:
    shutil.copytree(adapter, out)
    config = json.loads((out / "adapter_config.json").read_text())
    config.update(config_changes)
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def _cli(capsys, *args: str) -> tuple[int, str]:
    code = main(["report", *args, "--quiet"])
    err = capsys.readouterr().err.strip()
    return code, err


def _one_line_error(err: str) -> None:
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err


# -- one message per error, no server folder in it ----------------------------------------
def test_public_message_hides_every_server_folder(tmp_path: Path) -> None:
    from huggingface_hub import constants

    places = server_places(tmp_path / "cache")
    uploads = tmp_path / "cache" / "uploads"
    digest = "ab" * 32
    packages = sysconfig.get_paths()["purelib"]
    text = (
        f"{uploads}/{digest}/files/adapter_model.safetensors: truncated; "
        f"{tmp_path}/cache/spectra/v3/pair/ab/{digest}.safetensors: [Errno 28] No space left; "
        f"{packages}/analysis_demo/base/config.json; {constants.HF_HUB_CACHE}/models--org--x/snapshots"
    )
    shown = public_message(text, places, uploads)
    for secret in (str(tmp_path), packages, str(constants.HF_HUB_CACHE), digest):
        assert secret not in shown, (secret, shown)
    assert shown.startswith("upload abababab/adapter_model.safetensors: truncated")
    assert "<cache>/spectra/v3/pair/ab/abababab.safetensors" in shown
    assert "<python packages>/analysis_demo" in shown and "<hub cache>/models--org--x" in shown
    # A report keeps full specs (``upload:<sha256>`` reproduces the upload) but not paths.
    assert digest in public_message(f"upload:{digest} in {packages}", places, uploads, short_hashes=False)


def test_each_thing_is_said_once() -> None:
    assert str(InputError("nobody/x", "nobody/x: no such model")) == "nobody/x: no such model"
    assert say_once("nobody/x", "nobody/x: nobody/x: gone") == "gone"
    assert say_once("a", "ab: c") == "ab: c"


# -- specs a visitor can type or link -----------------------------------------------------
@pytest.mark.parametrize("local", [False, True])
@pytest.mark.parametrize("spec", ["~nosuchuser", "~nosuchuser/x", "a" * 300, "org/" + "b" * 300, "x\x00y"])
def test_unusable_specs_are_input_errors(tmp_path: Path, spec: str, local: bool) -> None:
    resolver = _resolver(tmp_path, local=local)
    assert resolver.label(spec)  # never raises: the sidebar and pickers show it as given
    assert resolver.version(spec) == ""
    with pytest.raises(InputError) as caught:
        resolver.plan(spec, spec)
    assert "Traceback" not in str(caught.value)


def test_no_path_expansion_when_local_paths_are_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Path, "expanduser", lambda self: pytest.fail("expanded a visitor's spec"))
    with pytest.raises(InputError, match="local paths are disabled"):
        _resolver(tmp_path, local=False).plan("~root/model", "org/name")


@pytest.mark.parametrize("revision", ["..", ".", "main/..", "a//b"])
def test_dot_revisions_are_refused_without_the_hub_cache(offline_hub: Path, tmp_path: Path, revision: str) -> None:
    with pytest.raises(InputError) as caught:
        _resolver(tmp_path, local=False).plan(f"org/name@{revision}", "org/name")
    assert str(offline_hub) not in str(caught.value)
    if "/" not in revision:  # more slashes make it path-like: refused as a local path first
        assert "is not a revision" in str(caught.value)


# -- malformed adapters, through the engine and the command line ---------------------------
def _kohya_two_alphas(tiny_llama: Path, out: Path) -> Path:
    file = factories.make_kohya_lora(tiny_llama, out / "kohya.safetensors", r=4)
    tensors = load_file(file)
    key = next(k for k in tensors if k.endswith(".alpha"))
    tensors[key] = torch.tensor([4.0, 8.0])
    save_file(tensors, file)
    return file


@pytest.mark.parametrize(
    "change, words",
    [
        ({"lora_alpha": "abc"}, "lora_alpha must be a number"),
        ({"lora_alpha": None}, "lora_alpha must be a number"),
        ({"r": "8"}, "r must be a positive whole number"),
        ({"rank_pattern": {"q(uery": 4}}, "is not a regular expression"),
        ({"rank_pattern": {"query": "x"}}, "must be a positive whole number"),
        ({"alpha_pattern": {"value": [1, 2]}}, "must be a positive number"),
        ({"rank_pattern": ["query"]}, "must be an object"),
    ],
)
def test_malformed_adapter_configs(tmp_path, capsys, tiny_bert, tiny_bert_lora, change, words) -> None:
    bad = _copy_adapter(tiny_bert_lora, tmp_path / "bad", **change)
    with pytest.raises(InputError, match=words):
        _resolver(tmp_path, local=True).plan(str(tiny_bert), str(bad))
    code, err = _cli(capsys, str(tiny_bert), str(bad), "--out", str(tmp_path / "r.json"), "--no-cache")
    assert code == 2 and words.split()[0] in err
    _one_line_error(err)


def test_kohya_alpha_of_two_values(tmp_path, capsys, tiny_llama) -> None:
    file = _kohya_two_alphas(tiny_llama, tmp_path)
    with pytest.raises(InputError, match="alpha of 2 values"):
        _resolver(tmp_path, local=True).plan(str(tiny_llama), str(file))
    code, err = _cli(capsys, str(tiny_llama), str(file), "--out", str(tmp_path / "r.json"), "--no-cache")
    assert code == 2
    _one_line_error(err)


def test_no_shape_in_common_is_an_error(tmp_path, capsys, tiny_bert) -> None:
    wider = factories.make_bert(tmp_path / "wider", hidden_size=48, intermediate_size=96, num_attention_heads=4)
    code, err = _cli(capsys, str(tiny_bert), str(wider), "--out", str(tmp_path / "r.json"), "--no-cache")
    assert code == 2 and "no weight matrix in common" in err
    _one_line_error(err)
    assert not (tmp_path / "r.json").exists()


def test_nan_in_the_base_is_blamed_on_the_base(tmp_path, capsys, tiny_bert, tiny_bert_full_ft) -> None:
    broken = tmp_path / "broken-base"
    shutil.copytree(tiny_bert, broken)
    tensors = load_file(broken / "model.safetensors")
    name = next(n for n in tensors if n.endswith("attention.self.query.weight"))
    tensors[name][0, 0] = float("nan")
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    code, err = _cli(capsys, str(broken), str(tiny_bert_full_ft), "--out", str(tmp_path / "r.json"), "--no-cache")
    assert code == 2
    assert err.startswith(f"error: {broken}: ") and "the base weight holds NaN" in err, err


# -- configuration -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, value",
    [("WSE_CACHE_BUDGET_GB", "abc"), ("WSE_CACHE_BUDGET_GB", "-1"), ("WSE_CACHE_BUDGET_GB", "nan"),
     ("WSE_SVD_METHOD", "magic")],
)  # fmt: skip
def test_bad_configuration_is_one_line(tmp_path, capsys, monkeypatch, tiny_bert, tiny_bert_lora, name, value) -> None:
    monkeypatch.setenv(name, value)
    code, err = _cli(capsys, str(tiny_bert), str(tiny_bert_lora), "--out", str(tmp_path / "r.json"))
    assert code == 2 and name in err, err
    _one_line_error(err)


def test_server_configuration_is_checked_where_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from analysis.specs import local_paths_allowed

    monkeypatch.setenv("WSE_UPLOAD_BUDGET_GB", "x")
    with pytest.raises(InputError, match="WSE_UPLOAD_BUDGET_GB"):
        UploadStore(tmp_path)
    monkeypatch.setenv("WSE_ALLOW_LOCAL_PATHS", "maybe")
    with pytest.raises(InputError, match="WSE_ALLOW_LOCAL_PATHS"):
        local_paths_allowed()


def test_configuration_readers() -> None:
    os.environ.pop("WSE_TEST_VALUE", None)
    assert env_number("WSE_TEST_VALUE", 3) == 3 and env_flag("WSE_TEST_VALUE", True) is True
    os.environ["WSE_TEST_VALUE"] = "2"
    try:
        assert env_number("WSE_TEST_VALUE", 3, integer=True) == 2
        with pytest.raises(InputError, match="at least 5"):
            env_number("WSE_TEST_VALUE", 3, minimum=5)
        with pytest.raises(InputError, match="WSE_TEST_VALUE"):
            env_flag("WSE_TEST_VALUE", True)
        with pytest.raises(InputError, match="WSE_TEST_VALUE"):  # neither yes, no nor auto
            env_switch("WSE_TEST_VALUE")
        os.environ["WSE_TEST_VALUE"] = " Off "
        assert env_switch("WSE_TEST_VALUE") is False and env_flag("WSE_TEST_VALUE", True) is False
        assert env_text("WSE_TEST_VALUE") == " Off " and env_text("WSE_TEST_VALUE", strip=True) == "Off"
        with pytest.raises(InputError, match="WSE_TEST_VALUE: must be on or auto, got .Off."):
            env_text("WSE_TEST_VALUE", strip=True, pattern="on|auto", expected="on or auto")
        os.environ["WSE_TEST_VALUE"] = ""
        assert env_text("WSE_TEST_VALUE") is None and env_text("WSE_TEST_VALUE", "auto") == "auto"
    finally:
        del os.environ["WSE_TEST_VALUE"]
    assert env_switch("WSE_TEST_VALUE") is None and env_text("WSE_TEST_VALUE", "x") == "x"


def test_atomic_write_text_leaves_no_temporary_file(tmp_path) -> None:
    target = tmp_path / "new" / "file.json"
    atomic_write_text(target, "first")
    atomic_write_text(target, "second", private=False)
    assert target.read_text() == "second" and [p.name for p in target.parent.iterdir()] == ["file.json"]
    assert target.stat().st_mode & 0o777 == 0o666 & ~_umask()
    atomic_write_text(target, "third")
    assert target.stat().st_mode & 0o777 == 0o600
    with pytest.raises(UnicodeEncodeError):
        atomic_write_text(target, "\ud800")  # a lone surrogate: nothing written, nothing left
    assert target.read_text() == "third" and [p.name for p in target.parent.iterdir()] == ["file.json"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -- the cache: read-only, full, tampered with -------------------------------------------
def _entry() -> dict[str, torch.Tensor]:
    return {"s": torch.arange(5, dtype=torch.float32)}


def test_read_only_cache_computes_without_storing(tmp_path, monkeypatch) -> None:
    cache = SpectrumCache(tmp_path / "spectra")

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EROFS, "Read-only file system", str(tmp_path))

    monkeypatch.setattr(cache_module.tempfile, "mkstemp", refuse)
    monkeypatch.setattr(cache_module, "FileLock", lambda *a, **k: refuse())
    key = SpectrumCache.key("x")
    tensors, info = cache.get_or_compute("pair", key, lambda: (_entry(), {"n": 1}))
    assert torch.equal(tensors["s"], _entry()["s"]) and info == {"n": 1}
    assert cache.read_only and cache.get("pair", key) is None


def test_full_disk_is_one_line(tmp_path, capsys, monkeypatch, tiny_bert, tiny_bert_lora) -> None:
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache_module, "save_file", full)
    with pytest.raises(InputError, match="no space left"):
        SpectrumCache(tmp_path / "c").put("pair", SpectrumCache.key("y"), _entry())
    code, err = _cli(capsys, str(tiny_bert), str(tiny_bert_lora), "--out", str(tmp_path / "r.json"),
                     "--cache-dir", str(tmp_path / "cache"))  # fmt: skip
    assert code == 2 and "no space left" in err
    _one_line_error(err)


def test_a_folder_where_an_entry_should_be(tmp_path, capsys, tiny_bert, tiny_bert_lora) -> None:
    cache = SpectrumCache(tmp_path / "spectra")
    key = SpectrumCache.key("z")
    cache.path_for("pair", key).mkdir(parents=True)
    tensors, _ = cache.get_or_compute("pair", key, lambda: (_entry(), {}))
    assert torch.equal(tensors["s"], _entry()["s"])
    assert cache.size_bytes() >= 0 and cache.evict() == 0
    # The same through the command line, with every entry's place taken by a folder.
    first = tmp_path / "cache"
    assert _cli(capsys, str(tiny_bert), str(tiny_bert_lora), "--out", str(tmp_path / "a.json"),
                "--cache-dir", str(first))[0] == 0  # fmt: skip
    for entry in (first / "spectra").rglob("*.safetensors"):
        entry.unlink()
        entry.mkdir()
    code, err = _cli(capsys, str(tiny_bert), str(tiny_bert_lora), "--out", str(tmp_path / "b.json"),
                     "--cache-dir", str(first))  # fmt: skip
    assert code == 0, err
    before, after = (json.loads((tmp_path / n).read_text())["models"] for n in ("a.json", "b.json"))
    assert before == after


def test_an_entry_copied_over_another_key_is_refused(tmp_path) -> None:
    cache = SpectrumCache(tmp_path / "spectra")
    a, b = SpectrumCache.key("a"), SpectrumCache.key("b")
    cache.put("pair", a, _entry(), {"for": "a"})
    cache.put("pair", b, {"s": torch.zeros(5)}, {"for": "b"})
    shutil.copyfile(cache.path_for("pair", a), cache.path_for("pair", b))
    assert cache.get("pair", b) is None and cache.stats.corrupt == 1
    tensors, info = cache.get_or_compute("pair", b, lambda: ({"s": torch.zeros(5)}, {"for": "b"}))
    assert info == {"for": "b"} and cache.get("pair", a)[1] == {"for": "a"}


def test_lock_and_fingerprint_files_count_in_the_budget(tmp_path) -> None:
    cache = SpectrumCache(tmp_path / "spectra", budget_bytes=10**9)
    cache.get_or_compute("pair", SpectrumCache.key("l"), lambda: (_entry(), {}))
    (cache.fingerprints.root / "ab").mkdir(parents=True)
    (cache.fingerprints.root / "ab" / "x.json").write_text("{}" + " " * 50_000)
    entries = sum(p.stat().st_size for p in cache.entries())
    assert list(cache.root.rglob("*.lock"))
    assert cache.size_bytes() >= entries + 50_000 + 4096  # the index and the lock file
    cache.budget_bytes = 50_000
    cache.evict()
    assert not cache.entries()  # the entry went to make room for what else the cache keeps


# -- uploads: what they unpack to ----------------------------------------------------------
def test_unpacked_cap_is_the_upload_cap() -> None:
    config = (REPO / ".streamlit" / "config.toml").read_text()
    assert "maxUploadSize = 500" in config and MAX_UNPACKED_BYTES == 500 * 1024**2


def test_zip_unpacking_past_the_cap_is_refused(tmp_path: Path) -> None:
    store = UploadStore(tmp_path / "uploads", max_bytes=2 * 1024**2)
    header = json.dumps({"w": {"dtype": "F32", "shape": [1024, 1024], "data_offsets": [0, 4 * 1024**2]}}).encode()
    header += b" " * (-len(header) % 8)
    payload = len(header).to_bytes(8, "little") + header + bytes(4 * 1024**2)  # a valid 4 MiB file of zeros
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("adapter_model.safetensors", payload)
        archive.writestr("adapter_config.json", "{}")
    data = buffer.getvalue()
    assert len(data) < 64 * 1024  # small on the wire
    with pytest.raises(InputError, match="larger than the 2 MB"):
        store.add([("adapter.zip", data)])
    assert store.stored_bytes() == 0


# -- jobs nobody waits for -----------------------------------------------------------------
def test_jobs_stop_when_no_visitor_is_left() -> None:
    manager = JobManager(max_workers=1)
    alive = {"a": True, "b": True}

    def slow(job):
        while not job.should_stop():
            job.wait(0.01)
        from analysis.errors import AnalysisCancelled

        raise AnalysisCancelled("stopped")

    job = manager.submit("k", slow, watcher="a")
    manager.submit("k", slow, watcher="b")
    assert manager.active_for("a") == 1 and manager.active_for("b") == 0
    alive["a"] = False
    assert manager.reap(alive.get) == [] and not job.should_stop()  # b still waits
    alive["b"] = False
    assert manager.reap(alive.get) == [job]
    assert job.wait(10) and job.state is JobState.CANCELLED and job.abandoned
    manager.shutdown()


def test_legend_names_the_method_once() -> None:
    from analysis.results import ModelResult
    from charts.style import legend_name

    def model(label: str) -> ModelResult:
        summary = {"label": label, "adapter": {"r": 1, "lora_alpha": 2}, "lora_rank": 1}
        return ModelResult(source="demo:x", kind="adapter", matrices=[], summary=summary)

    assert legend_name("LoRA r=1", model("LoRA r=1")) == "LoRA r=1"
    assert legend_name("my-adapter", model("my-adapter")) == "my-adapter (LoRA r=1)"

"""``python -m analysis report``: the docs/metrics.md contract, caching, and exit 2 on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from analysis.cache import SpectrumCache
from analysis.compare import compare
from cli import main

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "analysis", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )


def test_report_end_to_end_in_a_real_process(tmp_path, tiny_bert, tiny_bert_full_ft, tiny_bert_lora):
    out = tmp_path / "report.json"
    proc = run_cli(
        "report", str(tiny_bert), str(tiny_bert_full_ft), str(tiny_bert_lora),
        "--out", str(out), "--epsilons", "0.1,0.5,0.9", "--cache-dir", str(tmp_path / "cache"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "matrix" in proc.stderr  # the progress bar went to stderr
    report = json.loads(out.read_text())
    assert report["base"] == str(tiny_bert)
    assert report["top_k"] == 10 and report["epsilons"] == [0.1, 0.5, 0.9]
    full, adapter = report["models"]
    assert (full["source"], full["kind"]) == (str(tiny_bert_full_ft), "full")
    assert (adapter["source"], adapter["kind"]) == (str(tiny_bert_lora), "adapter")
    layers = {m["layer"] for m in full["matrices"]}
    assert layers == {0, 1}
    modules = {m["module"] for m in full["matrices"]}
    assert {"query", "key", "value"} <= modules
    for m in full["matrices"] + adapter["matrices"]:
        assert len(m["intruders"]) == 3 and m["intruders"] == sorted(m["intruders"])
        assert len(m["shape"]) == 2 and m["rank90"] >= 0 and m["delta_fro"] >= 0
        assert m["name"] in {x["name"] for x in full["matrices"]}
    # the adapter only touches the modules it targets: its other matrices are absent or zero updates
    adapted = [m for m in adapter["matrices"] if m["delta_fro"] > 0]
    assert adapted and all(m["rank90"] <= m["adapter_rank"] for m in adapted)


def test_second_run_and_second_fine_tune_reuse_cached_spectra(
    tmp_path, tiny_llama, tiny_llama_full_ft, tiny_llama_lora
):
    cache = SpectrumCache(tmp_path)
    first = compare(str(tiny_llama), [str(tiny_llama_full_ft)], cache=cache, device="cpu")
    n = len(first.models[0].matrices)
    others = first.models[0].summary["whole_model_sparsity"]["other_tensors"]  # whole-model sparsity's tensors
    assert others > 0 and cache.stats.computed == {"pair": n, "base": n, "base-top": n, "measures": n + 1}

    other = SpectrumCache(tmp_path)
    compare(str(tiny_llama), [str(tiny_llama_lora)], cache=other, device="cpu")
    assert other.stats.computed.get("base", 0) == 0  # the base SVDs came from the cache

    again = SpectrumCache(tmp_path)
    second = compare(str(tiny_llama), [str(tiny_llama_full_ft)], cache=again, device="cpu")
    assert again.stats.computed == {}
    assert [m.intruder_scores.tolist() for m in second.models[0].matrices] == [
        m.intruder_scores.tolist() for m in first.models[0].matrices
    ]


def test_no_cache_switch_writes_nothing(tmp_path, tiny_bert, tiny_bert_full_ft, capsys):
    cache_dir = tmp_path / "cache"
    code = main(
        ["report", str(tiny_bert), str(tiny_bert_full_ft), "--out", str(tmp_path / "r.json"),
         "--no-cache", "--cache-dir", str(cache_dir), "--quiet"]
    )  # fmt: skip
    assert code == 0
    assert not cache_dir.exists() or not any(cache_dir.rglob("*.safetensors"))


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["report", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for option in ("--out", "--top-k", "--epsilons", "--device", "--no-cache", "--cache-dir", "--side"):
        assert option in text


def _bad_inputs(tmp_path: Path, tiny_bert: Path, tiny_llama_lora: Path) -> list[tuple[list[str], str]]:
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json" + os.urandom(64))
    truncated = tmp_path / "truncated" / "model.safetensors"
    truncated.parent.mkdir()
    data = (tiny_bert / "model.safetensors").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    not_a_model = tmp_path / "notes.txt"
    not_a_model.write_text("hello")
    diverged = tmp_path / "diverged.safetensors"  # a fine-tune whose training blew up
    weights = load_file(tiny_bert / "model.safetensors")
    name = next(n for n in sorted(weights) if n.endswith("attention.self.query.weight"))
    weights[name] = weights[name].clone()
    weights[name][0, 0] = float("nan")
    save_file(weights, diverged)
    return [
        ([str(diverged)], "diverged.safetensors: encoder.layer.0.attention.self.query.weight: the fine-tuned weight"),
        ([str(tmp_path / "missing-model")], "missing-model"),
        ([str(corrupt)], "corrupt.safetensors"),
        ([str(truncated.parent)], "model.safetensors"),
        ([str(not_a_model)], "notes.txt"),
        ([str(tiny_llama_lora)], str(tiny_llama_lora.name)),  # an adapter for another base
    ]


def test_bad_input_exits_2_with_one_plain_line(tmp_path, tiny_bert, tiny_llama_lora, capsys):
    for tuned, named in _bad_inputs(tmp_path, tiny_bert, tiny_llama_lora):
        code = main(["report", str(tiny_bert), *tuned, "--out", str(tmp_path / "r.json"), "--quiet", "--no-cache"])
        err = capsys.readouterr().err.strip()
        assert code == 2, (tuned, err)
        assert len(err.splitlines()) == 1, err
        assert named in err and "Traceback" not in err
    assert not (tmp_path / "r.json").exists()


def test_bad_options_exit_2(tmp_path, tiny_bert, tiny_bert_full_ft, capsys):
    base, tuned, out = str(tiny_bert), str(tiny_bert_full_ft), str(tmp_path / "r.json")
    for extra in (["--top-k", "0"], ["--epsilons", "0.5,abc"], ["--epsilons", "1.5"], ["--device", "tpu"]):
        with pytest.raises(SystemExit) as exc:
            main(["report", base, tuned, "--out", out, *extra])
        assert exc.value.code == 2
    if not __import__("torch").cuda.is_available():
        assert main(["report", base, tuned, "--out", out, "--device", "cuda", "--no-cache"]) == 2
        assert "CUDA" in capsys.readouterr().err


def test_bad_input_in_a_real_process_has_no_traceback(tmp_path, tiny_bert):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(os.urandom(100))
    proc = run_cli("report", str(tiny_bert), str(bad), "--out", str(tmp_path / "r.json"))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "bad.safetensors" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_demo_specs_work_as_in_the_dashboard(tmp_path, monkeypatch, capsys):
    """``report demo:base demo:lora-r1`` names the demo's models as the dashboard does."""
    from tests.app_fixtures import make_standin_demo

    cache = tmp_path / "cache"
    monkeypatch.setenv("WSE_CACHE_DIR", str(cache))
    assert main(["report", "demo:base", "demo:lora-r1", "--out", str(tmp_path / "r.json"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "demo:base" in err and "not built" in err
    make_standin_demo(cache / "demo")
    assert main(["report", "demo:base", "demo:lora-r2", "--out", str(tmp_path / "r.json"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "demo:lora-r2" in err and "lora-r1" in err
    out = tmp_path / "report.json"
    proc = run_cli(
        "report", "demo:base", "demo:lora-r1", "--out", str(out), "--quiet", env_extra={"WSE_CACHE_DIR": str(cache)}
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["base"] == "demo:base"
    (model,) = report["models"]
    # The stand-in adapter targets query and value of the 6 layers.
    assert (model["source"], model["kind"]) == ("demo:lora-r1", "adapter") and len(model["matrices"]) == 12

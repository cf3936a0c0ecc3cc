"""The RL-versus-SFT measures through the pipeline and the cache (issue 23), on tiny built models."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from analysis.cache import SpectrumCache
from analysis.compare import compare
from analysis.pair_metrics import AnalysisSettings
from analysis.report import to_report


def _save(base: Path, out: Path, tensors: dict[str, torch.Tensor]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    save_file({n: t.contiguous() for n, t in tensors.items()}, out / "model.safetensors", metadata={"format": "pt"})
    shutil.copy2(base / "config.json", out / "config.json")
    return out


def _block(name: str, w: torch.Tensor) -> bool:
    return w.ndim == 2 and ".layers." in name


def test_a_masked_update_gives_the_sparsity_it_was_built_with(tiny_llama, tmp_path):
    tensors = load_file(tiny_llama / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    built = {}
    for name, w in tensors.items():
        if _block(name, w):
            changed = torch.rand(w.shape, generator=g) < 0.3
            tensors[name] = torch.where(changed, w + 0.05, w)
            built[name] = 1 - int((tensors[name] != w).sum()) / w.numel()
    tuned = _save(tiny_llama, tmp_path / "masked", tensors)
    result = compare(str(tiny_llama), [str(tuned)], cache=None, device="cpu")
    matrices = result.models[0].matrices
    assert {m.name for m in matrices} == set(built)
    for m in matrices:
        assert m.rl.sparsity("relative") == built[m.name]
        assert m.rl.sparsity("absolute") == built[m.name]  # moves far above 1e-5


def _principal_mask(w0: torch.Tensor, k: int, alpha: float) -> torch.Tensor:
    u, s, vt = np.linalg.svd(w0.double().numpy(), full_matrices=False)
    magnitude = np.abs((u[:, :k] * s[:k]) @ vt[:k])
    keep = math.ceil(alpha * magnitude.size)
    mask = np.zeros(magnitude.size, dtype=bool)
    mask[np.argsort(-magnitude, axis=None, kind="stable")[:keep]] = True
    return torch.from_numpy(mask.reshape(magnitude.shape))


@pytest.mark.parametrize("where", ["inside", "outside"])
def test_an_update_inside_or_outside_the_principal_mask(tiny_llama, tmp_path, where):
    settings = AnalysisSettings(principal_k=4, mask_alpha=0.1)
    tensors = load_file(tiny_llama / "model.safetensors")
    for name, w in tensors.items():
        if _block(name, w):
            mask = _principal_mask(w, 4, 0.1)
            tensors[name] = torch.where(mask if where == "inside" else ~mask, w + 0.05, w)
    tuned = _save(tiny_llama, tmp_path / where, tensors)
    result = compare(str(tiny_llama), [str(tuned)], cache=None, device="cpu", settings=settings)
    overlaps = [m.rl.mask_overlap for m in result.models[0].matrices]
    assert overlaps == pytest.approx([1.0 if where == "inside" else 0.0] * len(overlaps))


def test_a_cache_from_before_the_measures_keeps_every_entry_hit(tiny_llama, tiny_llama_full_ft, tmp_path):
    assert AnalysisSettings().signature() == "delta_vectors=64,max_top_k=100,side=left,similarity_size=100"
    old = SpectrumCache(tmp_path)  # what an analysis wrote before the measures existed
    first = compare(str(tiny_llama), [str(tiny_llama_full_ft)], cache=old, device="cpu",
                    settings=AnalysisSettings(measures=False))  # fmt: skip
    n = len(first.models[0].matrices)
    assert old.stats.computed == {"pair": n, "base": n}

    new = SpectrumCache(tmp_path)
    second = compare(str(tiny_llama), [str(tiny_llama_full_ft)], cache=new, device="cpu")
    others = second.models[0].summary["whole_model_sparsity"]["other_tensors"]  # 1-D tensors, embeddings
    # one measures entry per pair and one for the whole model's other tensors; no base or pair entry again
    assert others > 0 and new.stats.computed == {"measures": n + 1, "base-top": n}
    assert all(m.rl is not None for m in second.models[0].matrices)

    again = SpectrumCache(tmp_path)
    third = compare(str(tiny_llama), [str(tiny_llama_full_ft)], cache=again, device="cpu")
    assert again.stats.computed == {}
    for a, b in zip(second.models[0].matrices, third.models[0].matrices, strict=True):
        assert a.rl.counts == b.rl.counts and np.array_equal(a.rl.angles_left, b.rl.angles_left)


def test_measures_computed_beside_the_spectra_equal_those_computed_alone(tiny_llama, tiny_llama_full_ft, tmp_path):
    fresh = compare(str(tiny_llama), [str(tiny_llama_full_ft)], cache=None, device="cpu")
    cache = SpectrumCache(tmp_path)
    compare(str(tiny_llama), [str(tiny_llama_full_ft)], cache=cache, device="cpu",
            settings=AnalysisSettings(measures=False))  # fmt: skip
    alone = compare(str(tiny_llama), [str(tiny_llama_full_ft)], cache=SpectrumCache(tmp_path), device="cpu")
    for a, b in zip(fresh.models[0].matrices, alone.models[0].matrices, strict=True):
        assert a.rl.counts == b.rl.counts
        assert np.array_equal(a.rl.angles_left, b.rl.angles_left)  # the same bytes either way
        assert np.array_equal(a.rl.angles_right, b.rl.angles_right)


def _report_bytes(result) -> bytes:
    return json.dumps(to_report(result), indent=2, allow_nan=False, default=str).encode()


def test_a_fully_cached_run_reads_a_plans_measures_as_one_entry(tiny_llama, tiny_llama_full_ft, tmp_path, monkeypatch):
    """Reading each pair's measures entry beside its pair entry doubled the files a cached run opens (the
    cached report was 1.5x slower with the measures): a plan's measures are also one ``measures-set`` entry."""
    fresh = compare(str(tiny_llama), [str(tiny_llama_full_ft)], cache=None, device="cpu")
    first = SpectrumCache(tmp_path)
    compare(str(tiny_llama), [str(tiny_llama_full_ft)], cache=first, device="cpu")
    n = len(fresh.models[0].matrices)
    assert first.stats.computed == {"pair": n, "base": n, "base-top": n, "measures": n + 1}
    assert len([p for p in first.entries() if p.parent.parent.name == "measures-set"]) == 1

    read: list[str] = []
    get = SpectrumCache.get
    monkeypatch.setattr(SpectrumCache, "get", lambda self, kind, key: read.append(kind) or get(self, kind, key))
    again = SpectrumCache(tmp_path)
    cached = compare(str(tiny_llama), [str(tiny_llama_full_ft)], cache=again, device="cpu")
    assert again.stats.computed == {}
    # n pair entries, the plan's measures in one, and the whole model's other tensors (a `measures` entry)
    assert sorted(read) == sorted(["pair"] * n + ["measures-set", "measures"])
    assert _report_bytes(cached) == _report_bytes(fresh)  # the same report, byte for byte

    # Without the set (evicted, or a cache from before it), each pair's entry is read: the same bytes again.
    for path in again.entries():
        if path.parent.parent.name == "measures-set":
            path.unlink()
    read.clear()
    alone = compare(str(tiny_llama), [str(tiny_llama_full_ft)], cache=SpectrumCache(tmp_path), device="cpu")
    assert read.count("measures") == n + 1 and read.count("measures-set") == 1  # looked for, missed, written again
    assert _report_bytes(alone) == _report_bytes(fresh)
    assert len([p for p in again.entries() if p.parent.parent.name == "measures-set"]) == 1


def test_the_set_follows_every_matrix_and_setting(tiny_llama, tiny_llama_full_ft, tmp_path):
    cache = SpectrumCache(tmp_path)
    compare(str(tiny_llama), [str(tiny_llama_full_ft)], cache=cache, device="cpu")
    other = AnalysisSettings(principal_k=4)
    second = SpectrumCache(tmp_path)
    result = compare(str(tiny_llama), [str(tiny_llama_full_ft)], cache=second, device="cpu", settings=other)
    assert all(m.rl.k == 4 for m in result.models[0].matrices)  # another setting: not the stored set
    assert len([p for p in second.entries() if p.parent.parent.name == "measures-set"]) == 2

"""The persistent cache: hits are counted, writes are atomic, corruption heals, LRU evicts."""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from analysis.cache import SpectrumCache, tensor_digest


def entry(seed: int, n: int = 64):
    g = torch.Generator().manual_seed(seed)
    return {"U": torch.randn(n, n, generator=g), "S": torch.rand(n, generator=g)}, {"seed": seed}


def test_digest_is_content_addressed():
    a = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    assert tensor_digest(a) == tensor_digest(a.clone())
    assert tensor_digest(a) != tensor_digest(a.reshape(4, 3))
    assert tensor_digest(a) != tensor_digest(a.to(torch.bfloat16))
    b = a.clone()
    b[1, 2] += 1e-6
    assert tensor_digest(a) != tensor_digest(b)
    assert tensor_digest(a.T) == tensor_digest(a.T.contiguous())


def test_hit_skips_recomputation(tmp_path):
    cache = SpectrumCache(tmp_path)
    calls = []

    def compute():
        calls.append(1)
        return entry(1)

    first, info = cache.get_or_compute("base", "ab" * 32, compute)
    second, info2 = SpectrumCache(tmp_path).get_or_compute("base", "ab" * 32, compute)
    assert len(calls) == 1
    torch.testing.assert_close(first["U"], second["U"])
    assert info == info2 == {"seed": 1}
    assert cache.stats.misses == 1


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage", "empty"])
def test_corrupt_entry_is_detected_and_recomputed(tmp_path, damage):
    cache = SpectrumCache(tmp_path)
    key = "cd" * 32
    cache.put("base", key, *entry(2))
    path = cache.path_for("base", key)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-10] ^= 0xFF  # inside the tensor payload: only the checksum can catch this
    elif damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = bytearray(os.urandom(len(data)))
    else:
        data = bytearray()
    path.write_bytes(bytes(data))

    assert cache.get("base", key) is None
    assert not path.exists()
    assert cache.stats.corrupt == 1
    tensors, _ = cache.get_or_compute("base", key, lambda: entry(2))
    torch.testing.assert_close(tensors["U"], entry(2)[0]["U"])
    assert cache.get("base", key) is not None


def test_lru_eviction_keeps_recently_used(tmp_path):
    cache = SpectrumCache(tmp_path, budget_bytes=10**9)
    keys = [f"{i:02x}" * 32 for i in range(4)]
    for i, key in enumerate(keys):
        cache.put("base", key, *entry(i))
        past = time.time() - 100 + i
        os.utime(cache.path_for("base", key), (past, past))
    size = cache.path_for("base", keys[0]).stat().st_size
    assert cache.get("base", keys[0]) is not None  # touch: now the most recent
    cache.budget_bytes = int(size * 2.5)
    assert cache.evict() == 2
    assert cache.path_for("base", keys[0]).exists()
    assert cache.path_for("base", keys[3]).exists()
    assert not cache.path_for("base", keys[1]).exists()
    assert not cache.path_for("base", keys[2]).exists()
    assert cache.size_bytes() <= cache.budget_bytes


def _worker(root: str, key: str, seed: int, out: mp.Queue) -> None:
    cache = SpectrumCache(root)

    def compute():
        time.sleep(0.5)  # long enough that both processes overlap
        return entry(seed, n=256)

    tensors, info = cache.get_or_compute("pair", key, compute)
    out.put((float(tensors["U"].sum()), info["seed"], cache.stats.misses))


def test_concurrent_processes_get_correct_results(tmp_path, monkeypatch):
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    key = "ef" * 32
    procs = [ctx.Process(target=_worker, args=(str(tmp_path), key, 7, out)) for _ in range(2)]
    # A spawned child re-runs the parent's __main__; after an AppTest in this worker that is
    # app.py, whose page links need a Streamlit session: start the children from a bare one.
    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    expected = float(entry(7, n=256)[0]["U"].sum())
    assert all(r[0] == pytest.approx(expected) and r[1] == 7 for r in results)
    assert sum(r[2] for r in results) == 1  # the others waited and read the first one's entry
    assert SpectrumCache(tmp_path).get("pair", key) is not None
    assert not list(Path(tmp_path).rglob(".tmp-*"))


def test_keys_are_validated(tmp_path):
    cache = SpectrumCache(tmp_path)
    with pytest.raises(ValueError):
        cache.path_for("base", "../../etc/passwd")
    with pytest.raises(ValueError):
        cache.path_for("../x", "ab")


def test_many_digests_of_one_file_look_at_it_once(tmp_path, monkeypatch):
    """``digests`` and ``known_reader`` (a plan's digests before it runs, a model's other tensors) give what
    ``digest`` and ``known`` give, with one ``stat`` of the file instead of one per tensor."""
    from analysis import cache as cache_module

    weights = tmp_path / "w.bin"
    weights.write_bytes(b"x")
    tensors = {f"t{i}": torch.full((3,), float(i)) for i in range(5)}
    index = SpectrumCache(tmp_path / "c").fingerprints
    stats = []
    stat = cache_module.os.stat
    monkeypatch.setattr(cache_module.os, "stat", lambda path, *a, **k: stats.append(path) or stat(path, *a, **k))
    assert index.digests(weights, ["t0", "t1"], None) == [None, None]  # nothing read without a loader
    found = index.digests(weights, list(tensors), tensors.__getitem__)
    assert found == [tensor_digest(t) for t in tensors.values()] and len(stats) == 2
    read = index.known_reader()
    assert [read(weights, name) for name in [*tensors, "other"]] == [*found, None] and len(stats) == 3
    assert [index.known(weights, name) for name in tensors] == found and len(stats) == 8

"""The chance level of an intruder score in the persistent cache (analysis.chance, issue 23).

Simulated once per cache, not once per process: a second process reads the stored levels
(no simulation), byte for byte the same; a cache that cannot be written computes and goes on.
"""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import torch

from analysis import cache as cache_module
from analysis import chance, measures
from analysis.cache import SpectrumCache

REPO = Path(__file__).resolve().parent.parent

_CHILD = """
import json, sys
from analysis import chance, measures
from analysis.cache import SpectrumCache

def refuse(*args, **kwargs):
    raise AssertionError("simulated again")

measures.chance_level = refuse  # the simulation must not run here: the levels come from the disk
cache = SpectrumCache(sys.argv[1])
levels = chance.chance_level(96, 40, cache=cache)
print(json.dumps({"levels": [x.hex() for x in levels], "hits": cache.stats.hits, "misses": cache.stats.misses}))
"""


def test_a_second_process_reads_the_levels_from_disk(tmp_path):
    chance.forget()
    cache = SpectrumCache(tmp_path / "spectra")
    levels = chance.chance_level(96, 40, cache=cache)
    assert cache.stats.computed == {"chance": 1}
    assert levels == measures.chance_level(96, 40)  # the formula's values, unchanged by the storing
    assert cache.path_for("chance", chance.chance_key(96, 40, measures.CHANCE_SAMPLES, 0)).is_file()
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tmp_path / "spectra")], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    child = json.loads(done.stdout.strip().splitlines()[-1])
    assert child["hits"] == 1 and child["misses"] == 0
    assert child["levels"] == [x.hex() for x in levels]  # byte-identical float64


def test_the_key_names_shape_draws_seed_and_version(monkeypatch):
    keys = {
        chance.chance_key(96, 40, 2000, 0),
        chance.chance_key(96, 41, 2000, 0),
        chance.chance_key(97, 40, 2000, 0),
        chance.chance_key(96, 40, 1000, 0),
        chance.chance_key(96, 40, 2000, 1),
    }
    monkeypatch.setattr(chance, "CHANCE_VERSION", "2")
    keys.add(chance.chance_key(96, 40, 2000, 0))
    assert len(keys) == 6


def test_a_read_only_cache_computes_and_goes_on(tmp_path, monkeypatch):
    chance.forget()

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EROFS, "Read-only file system", str(tmp_path))

    monkeypatch.setattr(cache_module.tempfile, "mkstemp", refuse)
    monkeypatch.setattr(cache_module, "FileLock", lambda *a, **k: refuse())
    cache = SpectrumCache(tmp_path / "spectra")
    assert chance.chance_level(80, 30, cache=cache) == measures.chance_level(80, 30)
    assert cache.read_only and not cache.entries()


def test_a_stored_entry_is_read_from_a_read_only_cache(tmp_path, monkeypatch):
    chance.forget()
    writable = SpectrumCache(tmp_path / "spectra")
    levels = chance.chance_level(72, 24, cache=writable)
    chance.forget()
    monkeypatch.setattr(cache_module.os, "utime", lambda *a, **k: (_ for _ in ()).throw(PermissionError(errno.EROFS)))
    monkeypatch.setattr(measures, "chance_level", lambda *a: (_ for _ in ()).throw(AssertionError("simulated")))
    read_only = SpectrumCache(tmp_path / "spectra")
    assert chance.chance_level(72, 24, cache=read_only) == levels
    assert read_only.stats.hits == 1


def test_the_entry_holds_float64_levels(tmp_path):
    chance.forget()
    cache = SpectrumCache(tmp_path / "spectra")
    chance.chance_level(64, 32, cache=cache)
    tensors, _ = cache.get("chance", chance.chance_key(64, 32, measures.CHANCE_SAMPLES, 0))
    assert tensors["levels"].dtype == torch.float64
    assert tensors["levels"].tolist() == list(measures.chance_level(64, 32))

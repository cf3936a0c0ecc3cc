"""A full or read-only disk is one plain line, never a redacted exception (issue 26, E).

Storing an upload (its folder, its files) and storing an analysis's spectra each meet the
disk; a full one (``ENOSPC``) or a read-only one (``EROFS``) is said in the project's words.
safetensors reports its own write errors as ``SafetensorError("... I/O error: No space left
on device (os error 28) ...")``, not ``OSError``: a full disk during an analysis used to read
"internal error (SafetensorError: ...)".
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from streamlit.testing.v1 import AppTest

from analysis import cache as cache_module
from analysis.cache import SpectrumCache
from analysis.errors import InputError
from analysis.identity import MatrixId
from analysis.pipeline import analyse_plan
from analysis.plan import ComparisonPlan, MatrixPlan, TunedMatrix
from hosting.jobs import JobManager, JobState
from hosting.uploads import UploadStore
from tests.app_fixtures import shown

APP = str(Path(__file__).resolve().parent.parent / "app.py")
DISKS = {
    errno.ENOSPC: ("No space left on device", "no space left"),
    errno.EROFS: ("Read-only file system", "read-only"),
}


def _failing(code: int):
    def fail(*args, **kwargs):
        raise OSError(code, DISKS[code][0])

    return fail


@pytest.mark.parametrize("code", list(DISKS))
@pytest.mark.parametrize("where", ["mkdir", "open"])
def test_storing_an_upload_on_a_bad_disk_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_bert_lora: Path, code: int, where: str
) -> None:
    import builtins

    store = UploadStore(tmp_path / "uploads")
    files = [(p.name, p.read_bytes()) for p in sorted(tiny_bert_lora.iterdir())]
    if where == "mkdir":
        monkeypatch.setattr(Path, "mkdir", _failing(code))
    else:
        real = builtins.open

        def open_(file, mode="r", *args, **kwargs):
            if "x" in mode or "w" in mode:
                raise OSError(code, DISKS[code][0])
            return real(file, mode, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", open_)
    with pytest.raises(InputError) as refused:
        store.add(files)
    text = str(refused.value)
    assert text.startswith("upload: could not be stored") and DISKS[code][1] in text and "\n" not in text, text
    assert str(tmp_path) not in text  # the server's folders are not the visitor's business


def test_a_bad_disk_during_an_upload_is_one_line_in_the_dashboard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_bert_lora: Path
) -> None:
    monkeypatch.setenv("WSE_CACHE_DIR", str(tmp_path / "cache"))
    good = [(p.name, p.read_bytes(), "") for p in sorted(tiny_bert_lora.iterdir())]
    at = AppTest.from_file(APP, default_timeout=60)
    at.switch_page("pages/models.py").run()
    at.file_uploader[0].set_value(good)
    at.run()
    monkeypatch.setattr(UploadStore, "_write_files", _failing(errno.ENOSPC))
    at.button(key="add_upload").click().run()
    assert not at.exception, [e.value for e in at.exception]
    errors = [shown(e.value) for e in at.error]
    assert any(e.startswith("Upload refused: upload: could not be stored") and "no space left" in e for e in errors)


def _plan() -> ComparisonPlan:
    g = torch.Generator().manual_seed(3)
    base = torch.randn(24, 16, generator=g)
    tuned = TunedMatrix(base + 0.1 * torch.randn(24, 16, generator=g))
    matrix = MatrixPlan(MatrixId("m0", 0, "q", (24, 16)), lambda: base.clone(), lambda: tuned)
    return ComparisonPlan("b", "t", "full", [matrix])


def _safetensors_fails(code: int):
    def save_file(*args, **kwargs):
        raise SafetensorError(
            f'Error while serializing: I/O error: {DISKS[code][0]} (os error {code}) at path "/x/.tmp-1"'
        )

    return save_file


def test_a_full_disk_during_an_analysis_is_the_cache_s_one_line(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(cache_module, "save_file", _safetensors_fails(errno.ENOSPC))
    cache = SpectrumCache(tmp_path / "spectra")
    with pytest.raises(InputError, match="no space left on the disk of the cache folder"):
        list(analyse_plan(_plan(), device="cpu", cache=cache, workers=1))
    # Again, as the dashboard's one cache would be asked by the next job: the entry's file lock
    # was taken twice and released once (held until garbage-collected), so this waited.
    jobs = JobManager(max_workers=1)
    job = jobs.submit(("x",), lambda job: list(analyse_plan(_plan(), device="cpu", cache=cache, workers=1)))
    assert job.wait(60) and job.state is JobState.FAILED
    assert "internal error" not in job.error and "no space left on the disk of the cache folder" in job.error
    jobs.shutdown()


def test_a_read_only_disk_during_an_analysis_computes_without_storing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(cache_module, "save_file", _safetensors_fails(errno.EROFS))
    cache = SpectrumCache(tmp_path / "spectra")
    (result,) = analyse_plan(_plan(), device="cpu", cache=cache, workers=1)
    assert result.name == "m0" and cache.read_only


def test_other_safetensors_errors_are_not_taken_for_the_disk(tmp_path: Path, monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise SafetensorError("Error while serializing: something else")

    monkeypatch.setattr(cache_module, "save_file", broken)
    with pytest.raises(SafetensorError):
        SpectrumCache(tmp_path / "spectra").put("pair", SpectrumCache.key("k"), {"s": torch.zeros(2)})

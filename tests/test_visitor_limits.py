"""Limits a hosted instance holds each visitor to (issue 26, D).

The 1,024-character cap on a model name holds for ``series:`` names from a link too; an
upload whose files together pass the cap says so (not that the file where the running total
crossed it is too large); per-visitor quotas count per browser, not per tab.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from analysis.errors import InputError
from analysis.specs.series import resolve_series
from hosting.uploads import UploadStore
from tests.app_fixtures import shown
from tests.test_app import wait_for_jobs

APP = str(Path(__file__).resolve().parent.parent / "app.py")
LONG_SERIES = "series:" + ",".join(f"org/name@rev{i:04d}" for i in range(118))  # 2,012 characters


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("WSE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("WSE_ALLOW_LOCAL_PATHS", raising=False)
    return tmp_path / "cache"


# -- the length of a series' name ------------------------------------------------------------------
def test_a_series_name_has_at_most_1024_characters() -> None:
    assert len(LONG_SERIES) > 2000
    with pytest.raises(InputError, match="is 2012 characters long; a model name has at most 1024"):
        resolve_series(LONG_SERIES)


@pytest.mark.parametrize("page", ["pages/models.py", "pages/series.py", "pages/overview.py", "pages/spectrum.py"])
def test_a_too_long_series_in_a_link_is_refused_on_the_page(cache_dir: Path, page: str) -> None:
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params["base"] = "org/base"
    at.query_params["tuned"] = [LONG_SERIES]
    at.switch_page(page).run()
    wait_for_jobs()  # a page that started the analysis shows its failure on the next run
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    shown_text = [shown(e.value) for e in (*at.error, *at.warning, *at.sidebar.markdown, *at.markdown)]
    assert any("is 2012 characters long; a model name has at most 1024" in t for t in shown_text), shown_text
    # The refusal names the series by its start, not by all 2,012 characters again.
    assert not any(LONG_SERIES[:200] in t for t in shown_text), [t[:100] for t in shown_text if len(t) > 300]


# -- the size of an upload -------------------------------------------------------------------------
def test_files_that_pass_the_cap_together_are_said_to_do_so(tmp_path: Path) -> None:
    import io
    import zipfile

    store = UploadStore(tmp_path / "uploads", max_bytes=2 * 1024**2)
    part = b"\0" * (1200 * 1024)  # each well under the cap, together over it
    with pytest.raises(InputError) as together:
        store.add([("a.safetensors", part), ("b.safetensors", io.BytesIO(part))])
    assert str(together.value) == "upload: the upload's files together are larger than the 2 MB an upload may hold"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("adapter/a.safetensors", part)
        archive.writestr("adapter/b.safetensors", part)
    with pytest.raises(InputError, match="^adapter.zip: the upload's files together are larger than the 2 MB"):
        store.add([("adapter.zip", buffer.getvalue())])
    with pytest.raises(InputError, match="^big.safetensors: is larger than the 2 MB an upload may hold$"):
        store.add([("big.safetensors", b"\0" * (3 * 1024**2))])


# -- quotas per browser ----------------------------------------------------------------------------
def _cookie(token: bytes, mask: bytes) -> str:
    """Tornado's version-2 XSRF cookie, as Streamlit sets it: the token masked afresh per page load."""
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(token))
    return f"2|{mask.hex()}|{masked.hex()}|1796615901"


def test_every_tab_of_one_browser_is_one_visitor() -> None:
    from ui import runtime

    token = bytes(range(16))
    first, second = _cookie(token, b"\x01\x02\x03\x04"), _cookie(token, b"\xa0\xb1\xc2\xd3")
    assert first != second  # each page load sends another cookie value ...
    assert runtime.xsrf_token(first) == runtime.xsrf_token(second) == token.hex()  # ... of one token
    assert runtime.xsrf_token(_cookie(bytes(16), b"\x01\x02\x03\x04")) != token.hex()
    assert runtime.xsrf_token(None) is None and runtime.xsrf_token("2|zz|zz|1") is None


def _tab(page: str | None = None, **params) -> AppTest:
    """A new tab (of the browser :func:`ui.runtime.browser_token` names in the test)."""
    at = AppTest.from_file(APP, default_timeout=60)
    for key, value in params.items():
        at.query_params[key] = value
    if page is not None:
        at.switch_page(page)
    return at


def test_the_upload_quota_holds_across_tabs(
    cache_dir: Path, tiny_bert_lora: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ui import runtime

    token = os.urandom(16).hex()  # a browser of this test's own: the server's counts outlive a test
    monkeypatch.setattr(runtime, "browser_token", lambda: token, raising=False)
    monkeypatch.setenv("WSE_UPLOADS_PER_VISITOR", "1")
    good = [(p.name, p.read_bytes(), "") for p in sorted(tiny_bert_lora.iterdir())]
    first = _tab("pages/models.py").run()
    first.file_uploader[0].set_value(good)
    first.run()
    first.button(key="add_upload").click().run()
    assert any("Added upload" in shown(s.value) for s in first.success)
    second = _tab("pages/models.py").run()  # a new tab of the same browser
    second.file_uploader[0].set_value(good)
    second.run()
    assert any("one visitor may add at most 1" in shown(e.value) for e in second.error), [
        shown(e.value) for e in second.error
    ]
    # The refused files left the uploader; the visitor's next click, Add, keeps saying why
    # (it said "Choose the files to upload first.", and the reason was gone).
    second.button(key="add_upload").click().run()
    errors = [shown(e.value) for e in second.error]
    assert any("one visitor may add at most 1" in e for e in errors), errors
    assert not any("Choose the files to upload first" in e for e in errors), errors


def test_the_running_analyses_quota_holds_across_tabs(
    cache_dir: Path, tiny_bert: Path, tiny_bert_lora: Path, tiny_bert_full_ft: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ui import runtime

    release = threading.Event()

    def blocked(*args, **kwargs):
        def run(job):
            release.wait(30)

        return run

    token = os.urandom(16).hex()  # a browser of this test's own: the server's counts outlive a test
    monkeypatch.setattr(runtime, "browser_token", lambda: token, raising=False)
    monkeypatch.setattr(runtime, "_comparison", blocked)
    tab = {"id": "first tab"}  # AppTest gives every session one id; a browser's tabs have their own
    monkeypatch.setattr(runtime, "session_id", lambda: tab["id"])
    monkeypatch.setenv("WSE_MAX_JOBS_PER_VISITOR", "1")
    try:
        _tab(base=str(tiny_bert), tuned=str(tiny_bert_lora)).run()
        tab["id"] = "second tab"
        second = _tab(base=str(tiny_bert), tuned=str(tiny_bert_full_ft)).run()
        warnings = [shown(w.value) for w in second.warning]
        assert any("one visitor may run 1 analyses at once" in w for w in warnings), warnings
    finally:
        release.set()
        for job in runtime.manager().jobs():
            job.wait(30)

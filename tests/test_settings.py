"""Bad ``WSE_*`` settings are one plain line naming the variable and the value (issue 26, B).

In the dashboard (a visible error, not Streamlit's redacted "This app has encountered an
error") on whatever page is opened, and from the command line (exit 2, one ``error:``
line) for the settings it reads.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from analysis.config import env_flag, env_folder, env_number, env_switch
from analysis.errors import InputError
from cli.main import EXIT_BAD_INPUT, main
from tests.app_fixtures import shown

APP = str(Path(__file__).resolve().parent.parent / "app.py")

#: (variable, value) the dashboard must refuse in one line.
DASHBOARD_CASES = [
    ("WSE_ALLOW_LOCAL_PATHS", "maybe"),
    ("WSE_CACHE_BUDGET_GB", "abc"),
    ("WSE_CACHE_BUDGET_GB", "-5"),
    ("WSE_UPLOAD_BUDGET_GB", "nan"),
    ("WSE_MAX_JOBS", "0"),
    ("WSE_MAX_JOBS", "two"),
    ("WSE_MAX_JOBS_PER_VISITOR", "1.5"),
    ("WSE_UPLOADS_PER_VISITOR", "-1"),
    ("WSE_UPLOAD_MB_PER_VISITOR", "inf"),
    ("WSE_DEVICE", "gpu"),
    ("WSE_SVD_METHOD", "magic"),
    ("WSE_DEMO_AUTOBUILD", "maybe"),
]


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("WSE_CACHE_DIR", str(tmp_path / "cache"))
    for name in ("WSE_ALLOW_LOCAL_PATHS", "WSE_RAY_SHARED_CACHE", "WSE_RAY_NODE_CACHE", "WSE_DEVICE"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "cache"


def _one_line(at: AppTest, name: str, value: str) -> str:
    assert not at.exception, [e.value for e in at.exception]  # not Streamlit's redacted error
    errors = [shown(e.value) for e in at.error]
    assert len(errors) == 1, errors
    (line,) = errors
    assert line.startswith(f"{name}: ") and repr(value) in line and "\n" not in line, line
    return line


@pytest.mark.parametrize(("name", "value"), DASHBOARD_CASES)
@pytest.mark.parametrize("page", [None, "pages/models.py"])
def test_a_bad_setting_is_one_line_in_the_dashboard(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch, name: str, value: str, page: str | None
) -> None:
    monkeypatch.setenv(name, value)
    at = AppTest.from_file(APP, default_timeout=60)
    if page is not None:
        at.switch_page(page)
    at.run()
    _one_line(at, name, value)


def test_a_cache_folder_that_is_a_file_is_one_line(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    cache_dir.write_text("not a folder")
    for page in (None, "pages/models.py"):
        at = AppTest.from_file(APP, default_timeout=60)
        if page is not None:
            at.switch_page(page)
        at.run()
        assert "which is a file" in _one_line(at, "WSE_CACHE_DIR", str(cache_dir))
    monkeypatch.setenv("WSE_CACHE_DIR", str(cache_dir / "inside"))
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert "lies inside the file" in _one_line(at, "WSE_CACHE_DIR", str(cache_dir / "inside"))


@pytest.mark.parametrize(("name", "value"), [("WSE_RAY_SHARED_CACHE", "maybe"), ("WSE_RAY_NODE_CACHE", "rel/cache")])
def test_ray_settings_are_checked_where_the_dashboard_uses_ray(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    from ui import runtime

    monkeypatch.setattr(runtime, "RAY_ADDRESS", "ray://nowhere:10001")  # read when the server starts
    monkeypatch.setenv(name, value)
    _one_line(AppTest.from_file(APP, default_timeout=60).run(), name, value)


@pytest.mark.parametrize("value", ["0", "false", "no", "off", "False", " OFF "])
def test_every_off_word_turns_the_demo_build_off(cache_dir: Path, monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    import demo
    from ui import demo_build

    built: list[int] = []
    monkeypatch.setattr(demo, "build_demo", lambda **kwargs: built.append(1))  # never train here
    monkeypatch.setenv("WSE_DEMO_AUTOBUILD", value)
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception and not at.error
    assert demo_build.demo_job() is None and not built


def test_the_demo_builds_by_default(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import demo
    from ui import demo_build

    monkeypatch.setattr(demo, "build_demo", lambda **kwargs: None)  # never train here
    monkeypatch.setenv("WSE_DEMO_AUTOBUILD", "yes")
    AppTest.from_file(APP, default_timeout=60).run()
    job = demo_build.demo_job()
    assert job is not None and job.wait(30)


# -- the readers --------------------------------------------------------------------------------
def test_every_switch_knows_every_off_word_and_refuses_others(monkeypatch: pytest.MonkeyPatch) -> None:
    for word in ("0", "false", "no", "off", "Off"):
        monkeypatch.setenv("WSE_TEST_SWITCH", word)
        assert env_flag("WSE_TEST_SWITCH", True) is False and env_switch("WSE_TEST_SWITCH") is False
    for word in ("", "auto", "AUTO"):
        monkeypatch.setenv("WSE_TEST_SWITCH", word)
        assert env_switch("WSE_TEST_SWITCH") is None
    monkeypatch.setenv("WSE_TEST_SWITCH", "maybe")
    with pytest.raises(InputError, match=r"^WSE_TEST_SWITCH: must be one of .* or auto, got 'maybe'$"):
        env_switch("WSE_TEST_SWITCH")
    for bad in ("nan", "inf", "-inf", "NaN"):
        monkeypatch.setenv("WSE_TEST_NUMBER", bad)
        with pytest.raises(InputError, match=f"WSE_TEST_NUMBER: .*got '{bad}'"):
            env_number("WSE_TEST_NUMBER", 1.0)


def test_a_folder_setting_refuses_a_file_and_a_relative_path_where_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    monkeypatch.setenv("WSE_TEST_FOLDER", str(tmp_path / "new" / "cache"))
    assert env_folder("WSE_TEST_FOLDER") == tmp_path / "new" / "cache"  # created when first written
    monkeypatch.setenv("WSE_TEST_FOLDER", str(afile))
    with pytest.raises(InputError, match="which is a file"):
        env_folder("WSE_TEST_FOLDER")
    monkeypatch.setenv("WSE_TEST_FOLDER", "relative/cache")
    assert env_folder("WSE_TEST_FOLDER") == Path("relative/cache")
    with pytest.raises(InputError, match="must be an absolute path"):
        env_folder("WSE_TEST_FOLDER", absolute=True)
    monkeypatch.delenv("WSE_TEST_FOLDER")
    assert env_folder("WSE_TEST_FOLDER") is None


# -- the command line ---------------------------------------------------------------------------
CLI_CASES = [
    ("WSE_CACHE_BUDGET_GB", "abc"),
    ("WSE_CACHE_BUDGET_GB", "-5"),
    ("WSE_CACHE_BUDGET_GB", "nan"),
    ("WSE_SVD_METHOD", "magic"),
]


def _cli_line(capsys: pytest.CaptureFixture, argv: list[str], name: str, value: str) -> str:
    assert main(argv) == EXIT_BAD_INPUT
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    (line,) = lines
    assert line.startswith(f"error: {name}: ") and repr(value) in line, line
    return line


@pytest.mark.parametrize(("name", "value"), CLI_CASES)
def test_a_bad_setting_is_one_line_from_the_command_line(
    tmp_path: Path, capsys, monkeypatch, tiny_bert: Path, tiny_bert_lora: Path, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    argv = ["report", str(tiny_bert), str(tiny_bert_lora), "--out", str(tmp_path / "r.json"), "--quiet"]
    _cli_line(capsys, argv, name, value)


def test_a_cache_folder_that_is_a_file_is_one_line_from_the_command_line(
    tmp_path: Path, capsys, monkeypatch, tiny_bert: Path, tiny_bert_lora: Path
) -> None:
    afile = tmp_path / "cache"
    afile.write_text("x")
    monkeypatch.setenv("WSE_CACHE_DIR", str(afile))
    argv = ["report", str(tiny_bert), str(tiny_bert_lora), "--out", str(tmp_path / "r.json"), "--quiet"]
    assert "which is a file" in _cli_line(capsys, argv, "WSE_CACHE_DIR", str(afile))


@pytest.mark.parametrize(("name", "value"), [("WSE_RAY_SHARED_CACHE", "maybe"), ("WSE_RAY_NODE_CACHE", "rel/cache")])
def test_ray_settings_are_one_line_before_ray_starts(
    tmp_path: Path, capsys, monkeypatch, tiny_bert: Path, tiny_bert_lora: Path, name: str, value: str
) -> None:
    import sys

    monkeypatch.setenv(name, value)
    started = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    argv = ["report", str(tiny_bert), str(tiny_bert_lora), "--out", str(tmp_path / "r.json"), "--quiet"]
    _cli_line(capsys, [*argv, "--ray", "local"], name, value)
    assert not started and not ("ray" in sys.modules and sys.modules["ray"].is_initialized())

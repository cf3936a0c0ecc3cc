"""The layout's rules, checked on the code (docs/architecture.md).

import-linter holds the layers and the forbidden imports (``pyproject.toml``,
``[tool.importlinter]``); these tests hold what it cannot: no private name crosses a
module, no function or module grows past the sizes a reader can hold, and the contracts
themselves fail when they are broken.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("analysis", "charts", "hosting", "ui", "cli", "pages", "demo")
OURS = PACKAGES
#: Functions over this many lines (the body, docstring not counted) are split, except
#: declarative ones: argument parsers and tables of constants.
MAX_FUNCTION_LINES = 80
DECLARATIVE = {("cli/main.py", "build_parser")}
MAX_MODULE_LINES = 600


def _sources() -> list[Path]:
    files = [ROOT / "app.py"]
    for package in PACKAGES:
        files += sorted((ROOT / package).rglob("*.py"))
    return files


def _relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    lines = node.end_lineno - node.lineno + 1
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        lines -= first.end_lineno - first.lineno + 1
    return lines


def test_no_private_name_is_imported_from_another_module() -> None:
    crossing = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in OURS:
                crossing += [f"{_relative(path)}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert crossing == []


def test_no_function_is_longer_than_a_reader_can_hold() -> None:
    long = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and _body_lines(node) > MAX_FUNCTION_LINES:
                if (_relative(path), node.name) not in DECLARATIVE:
                    long.append(f"{_relative(path)}:{node.lineno} {node.name} ({_body_lines(node)} lines)")
    assert long == []


def test_no_module_is_longer_than_a_reader_can_hold() -> None:
    long = [f"{_relative(p)} ({n} lines)" for p in _sources() if (n := p.read_text().count("\n")) > MAX_MODULE_LINES]
    assert long == []


def _lint_imports(tree: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("lint-imports")
    return subprocess.run(
        [str(exe), "--config", str(tree / "pyproject.toml"), "--no-cache"],
        cwd=tree,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
        timeout=300,
    )


@pytest.fixture(scope="module")
def tree_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The packages and pyproject.toml, copied, so a test can break a contract there."""
    tree = tmp_path_factory.mktemp("tree")
    shutil.copy(ROOT / "pyproject.toml", tree)
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tree / package, ignore=shutil.ignore_patterns("__pycache__"))
    return tree


def test_the_contracts_hold() -> None:
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        ("analysis/metrics.py", "import streamlit", "The engine imports no Streamlit, Plotly or pandas"),
        ("analysis/metrics.py", "import pandas", "The engine imports no Streamlit, Plotly or pandas"),
        ("analysis/results.py", "import charts.tables", "Layers"),
        ("analysis/cache.py", "import demo", "Layers"),
        ("charts/tables.py", "import hosting.jobs", "Layers"),
        ("hosting/jobs.py", "import streamlit", "Charts, hosting, the command line and the demo import no Streamlit"),
        ("analysis/report.py", "import cli", "Layers"),
        ("cli/main.py", "import ui.state", "Layers"),
        ("analysis/errors.py", "import analysis.cache", "No import cycles"),
    ],
)
def test_a_broken_contract_fails(tree_copy: Path, module: str, line: str, broken: str) -> None:
    path = tree_copy / module
    original = path.read_text(encoding="utf-8")
    path.write_text(original + f"\n{line}  # a deliberate violation\n", encoding="utf-8")
    try:
        result = _lint_imports(tree_copy)
    finally:
        path.write_text(original, encoding="utf-8")
    assert result.returncode != 0
    report = result.stdout
    assert any(broken in line and "BROKEN" in line for line in report.replace("\n", " ").split(" KEPT")), report

"""The demo's task: retrieve a standard-library function's docstring from its name.

For every public, documented function and method of the Python standard library sources
(parsed with :mod:`ast`, never imported), the *query* is its qualified name and signature
and the *document* the first paragraph of its docstring; whole top-level packages are held
out for evaluation (:func:`split_pairs`).
"""

from __future__ import annotations

import ast
import functools
import sysconfig
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

#: Token budgets: queries (names and signatures) and documents (docstring summaries).
#: Short, because training time on a CPU grows with the number of tokens per batch.
QUERY_MAX_TOKENS = 16
DOC_MAX_TOKENS = 24
#: One top-level package in this many is held out for evaluation (chosen by CRC-32).
EVAL_ONE_IN = 5


@dataclass(frozen=True)
class DocPair:
    """One query/document pair: a function's name and signature, and its docstring."""

    module: str
    qualname: str
    query: str
    document: str

    @property
    def package(self) -> str:
        """The top-level package of :attr:`module` (what the held-out split is chosen by)."""
        return self.module.split(".")[0]


#: Parts of the standard library left out of the corpus: tests, demos, GUI toolkits,
#: vendored or generated code.
_SKIPPED_PARTS = frozenset(
    {
        "test",
        "tests",
        "idlelib",
        "lib2to3",
        "site-packages",
        "turtledemo",
        "tkinter",
        "pydoc_data",
        "encodings",
        "ensurepip",
    }
)


def _stdlib_sources() -> list[tuple[str, Path]]:
    """``(module name, file)`` of every public pure-Python standard-library module, sorted."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for path in lib.rglob("*.py"):
        parts = path.relative_to(lib).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if not parts or any(p in _SKIPPED_PARTS or p.startswith("_") for p in parts):
            continue
        found.append((".".join(parts), path))
    return sorted(found)


def _summary(docstring: str) -> str:
    """The first paragraph of a docstring on one line."""
    return " ".join(docstring.strip().split("\n\n")[0].split())


def _signature(args: ast.arguments) -> str:
    params = ast.unparse(args)
    for bound in ("self, ", "cls, ", "self", "cls"):
        if params.startswith(bound):
            return params[len(bound) :]
    return params


@functools.cache
def harvest_stdlib_pairs() -> tuple[DocPair, ...]:
    """Every public, documented function and method of the standard library sources.

    Deterministic for a given Python version: files are parsed with :mod:`ast` (never
    imported) in sorted order. Pairs whose docstring summary is shorter than 12
    characters or shared with another function are dropped, so every query has exactly
    one right answer. Parsing takes a few seconds, so the result is kept per process.
    """
    pairs: list[DocPair] = []

    def visit(body: list[ast.stmt], module: str, prefix: str) -> None:
        for node in body:
            public = not getattr(node, "name", "_").startswith("_")
            if isinstance(node, ast.ClassDef) and public:
                visit(node.body, module, f"{prefix}{node.name}.")
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and public:
                docstring = ast.get_docstring(node)
                if docstring:
                    qualname = prefix + node.name
                    query = f"{module}.{qualname}({_signature(node.args)})"
                    pairs.append(DocPair(module, qualname, query, _summary(docstring)))

    for module, path in _stdlib_sources():
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, OSError):
            continue
        visit(tree.body, module, "")
    counts: dict[str, int] = {}
    for pair in pairs:
        counts[pair.document] = counts.get(pair.document, 0) + 1
    return tuple(p for p in pairs if len(p.document) >= 12 and counts[p.document] == 1)


def split_pairs(pairs: Sequence[DocPair]) -> tuple[list[DocPair], list[DocPair]]:
    """``(train, eval)``: whole top-level packages, one in :data:`EVAL_ONE_IN`, held out."""
    held_out = [p for p in pairs if zlib.crc32(p.package.encode()) % EVAL_ONE_IN == 0]
    train = [p for p in pairs if zlib.crc32(p.package.encode()) % EVAL_ONE_IN != 0]
    return train, held_out

"""How a model on this server's disk is named on screen: its folder and what it says about itself.

A folder's name often says nothing ("base", "full", "model"). Such a generic name is shown
with its parent folder (``t5-run/full``), so two runs' "full" folders read apart, and with
what the files say about the model: the base an adapter was trained on
(``adapter_config.json``'s ``base_model_name_or_path``), the hub name a model was saved from
(``config.json``'s ``_name_or_path``), else its architecture. A name that says something
(``llama-lora-r8``) is kept as it is, short enough for a legend on a phone. Only small JSON
files are read, once per file version.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

#: Folder names that say nothing about the model in them: shown with their parent.
GENERIC_NAMES = frozenset(
    {"base", "full", "model", "models", "lora", "adapter", "final", "output", "outputs", "merged", "tuned", "ft"}
)


def short_name(name_or_path: str) -> str:
    """A hub id as it is (``org/name``); a path by its last folder, with the parent if that is generic."""
    text = str(name_or_path).strip().rstrip("/")
    if not text.startswith(("/", ".", "~")) and "\\" not in text and text.count("/") <= 1:
        return text  # a hub id
    parts = Path(text).parts
    if len(parts) >= 2 and parts[-1].lower() in GENERIC_NAMES:
        return "/".join(parts[-2:])
    return parts[-1] if parts else text


def local_label(path: Path) -> str:
    """The label of a local model folder or file (:mod:`analysis.specs.labels`)."""
    path = Path(path)
    name = path.name or str(path)
    generic = Path(name).stem.lower() in GENERIC_NAMES
    if generic and path.parent.name:
        name = f"{path.parent.name}/{name}"
    if not generic or not path.is_dir():  # a single file: the configs beside it may be another model's
        return name
    said = _said(str(path), *_versions(path)) or _architecture(str(path), *_versions(path))
    if not said or said.lower() in name.lower():
        return name
    return f"{name} · {said}"


def _versions(folder: Path) -> tuple[int, int]:
    stamps = []
    for file in ("config.json", "adapter_config.json"):
        try:
            stamps.append((folder / file).stat().st_mtime_ns)
        except OSError:
            stamps.append(0)
    return stamps[0], stamps[1]


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@lru_cache(maxsize=512)
def _said(folder: str, config_version: int, adapter_version: int) -> str | None:
    """What the folder's configs say the model is: an adapter's base, or the name it was saved from."""
    if adapter_version:
        base = _read(Path(folder) / "adapter_config.json").get("base_model_name_or_path")
        if isinstance(base, str) and base.strip():
            return f"on {short_name(base)}"
    if config_version:
        origin = _read(Path(folder) / "config.json").get("_name_or_path")
        if isinstance(origin, str) and origin.strip():
            return f"from {short_name(origin)}"
    return None


@lru_cache(maxsize=512)
def _architecture(folder: str, config_version: int, adapter_version: int) -> str | None:
    if not config_version:
        return None
    architectures = _read(Path(folder) / "config.json").get("architectures")
    if isinstance(architectures, list) and architectures and isinstance(architectures[0], str):
        return architectures[0]
    return None

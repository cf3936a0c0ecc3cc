"""Configuration from the environment, each value checked where it is read.

Every ``WSE_*`` variable the server or the command line reads goes through these
functions, so a typo (``WSE_CACHE_BUDGET_GB=abc``) is one plain
:class:`~analysis.errors.InputError` naming the variable, never a traceback.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

from analysis.errors import InputError

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def env_number(name: str, default: float, *, minimum: float = 0.0, integer: bool = False) -> float:
    """``$name`` as a finite number ``>= minimum`` (an integer when ``integer``), else ``default`` when unset."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    kind = "a whole number" if integer else "a number"
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        raise InputError(name, f"must be {kind} (at least {minimum:g}), got {raw!r}") from None
    if not math.isfinite(value) or value < minimum:
        raise InputError(name, f"must be {kind} of at least {minimum:g}, got {raw!r}")
    return value


def env_flag(name: str, default: bool) -> bool:
    """``$name`` as a yes/no switch (``1/true/yes/on`` or ``0/false/no/off``)."""
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    value = _switch(raw)
    if value is None:
        raise InputError(name, f"must be one of {'/'.join(_TRUE)} or {'/'.join(_FALSE)}, got {raw!r}")
    return value


def env_switch(name: str) -> bool | None:
    """``$name`` as a yes/no switch that may also be left to the caller.

    ``True`` for ``1/true/yes/on``, ``False`` for ``0/false/no/off``, ``None`` when unset,
    empty or ``auto``; anything else (``maybe``) is refused, naming the variable.
    """
    raw = os.environ.get(name, "").strip().lower()
    if not raw or raw == "auto":
        return None
    value = _switch(raw)
    if value is None:
        raise InputError(name, f"must be one of {'/'.join(_TRUE)}, {'/'.join(_FALSE)} or auto, got {raw!r}")
    return value


def _switch(raw: str) -> bool | None:
    return True if raw in _TRUE else False if raw in _FALSE else None


def env_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    """``$name`` as one of ``choices`` (``default`` when unset)."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if raw not in choices:
        raise InputError(name, f"must be one of {', '.join(choices)}, got {raw!r}")
    return raw


def env_text(
    name: str, default: str | None = None, *, strip: bool = False, pattern: str | None = None, expected: str = ""
) -> str | None:
    """``$name`` as it is (without surrounding blanks with ``strip``), ``default`` when unset or empty.

    With ``pattern``, a value that does not match it whole is refused (the error says it
    ``must be {expected}``).
    """
    raw = os.environ.get(name, "")
    raw = raw.strip() if strip else raw
    if not raw:
        return default
    if pattern is not None and not re.fullmatch(pattern, raw):
        raise InputError(name, f"must be {expected}, got {raw!r}")
    return raw


def env_folder(name: str, *, absolute: bool = False) -> Path | None:
    """``$name`` as a folder (``~`` expanded), ``None`` when unset or empty.

    Refused, naming the variable and the value: a path that is a file, or lies inside one
    (it could never be created), and with ``absolute`` a relative path (a path every
    machine must read the same way). A folder that does not exist yet is fine: it is
    created when first written.
    """
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    path = Path(raw).expanduser()
    if absolute and not path.is_absolute():
        raise InputError(name, f"must be an absolute path (the same on every machine), got {raw!r}")
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        where = "is a file" if existing == path else f"lies inside the file {str(existing)!r}"
        raise InputError(name, f"must be a folder, got {raw!r}, which {where}")
    return path

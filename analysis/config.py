"""Configuration from the environment, each value checked where it is read.

Every ``WSE_*`` variable the server or the command line reads goes through these
functions, so a typo (``WSE_CACHE_BUDGET_GB=abc``) is one plain
:class:`~analysis.errors.InputError` naming the variable, never a traceback.
"""

from __future__ import annotations

import math
import os
import re

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
    """``$name`` as a yes/no switch where any other value (or none) leaves the choice to the caller.

    ``True`` for ``1/true/yes/on``, ``False`` for ``0/false/no/off``, else ``None``.
    """
    return _switch(os.environ.get(name, "").strip().lower())


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

"""The grammar of a model name ("spec"): its prefixes and the checks every name passes.

A spec is the string that names a model on the command line, in the dashboard's selection
and in shared URLs:

- ``demo:<name>``: a model of the offline demo (:mod:`analysis.specs.demo`), e.g.
  ``demo:base``, ``demo:lora-r8``;
- ``upload:<sha256>``: files uploaded in the page (:mod:`analysis.specs.uploads`);
- ``series:...``: the checkpoints of one training run (:mod:`analysis.specs.series`);
- anything else: a hub id, or a local folder or file when local paths are allowed.
"""

from __future__ import annotations

from analysis.config import env_flag
from analysis.errors import InputError

DEMO_PREFIX = "demo:"
#: The longest spec taken: longer ones are refused before any file system call.
MAX_SPEC_LENGTH = 1024
#: How much of a refused, over-long name a message repeats.
SHOWN_OF_A_LONG_NAME = 40


def shortened(text: str) -> str:
    """``text`` as a message names it: a refused, over-long name by its start.

    Whole up to :data:`MAX_SPEC_LENGTH` characters; longer, its first
    :data:`SHOWN_OF_A_LONG_NAME` and an ellipsis.

    Examples
    --------
    >>> shortened("demo:lora-r8")
    'demo:lora-r8'
    >>> len(shortened("x" * 2000))
    41
    """
    return text if len(text) <= MAX_SPEC_LENGTH else text[:SHOWN_OF_A_LONG_NAME] + "…"


def check_spec(spec: str) -> str:
    """``spec`` stripped, or an :class:`InputError` for one no source could have.

    Examples
    --------
    >>> check_spec("  demo:lora-r8 ")
    'demo:lora-r8'
    >>> check_spec("x" * 2000)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    analysis.errors.InputError: xx...x…: is 2000 characters long; a model name has at most 1024
    """
    text = spec.strip()
    if len(text) > MAX_SPEC_LENGTH:
        raise InputError(shortened(text), f"is {len(text)} characters long; a model name has at most {MAX_SPEC_LENGTH}")
    if "\x00" in text:
        raise InputError(text.replace("\x00", "?"), "contains a NUL character")
    return text


def local_paths_allowed() -> bool:
    """``WSE_ALLOW_LOCAL_PATHS`` is not ``0``/``false``/``no`` (hosted instances set ``0``)."""
    return env_flag("WSE_ALLOW_LOCAL_PATHS", True)

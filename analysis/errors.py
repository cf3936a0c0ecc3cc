"""Errors the engine raises for bad input.

Every problem a user can cause (a missing file, a corrupt safetensors header, an
adapter that does not fit its base, an unsupported ``peft_type`` ...) is raised as
:class:`InputError`, which names the offending file or source and says what is
wrong in one plain sentence. The command line prints ``str(error)`` and exits 2;
the dashboard shows it in the page. Anything else is a bug.
"""

from __future__ import annotations

import os
import re
from pathlib import Path


class InputError(Exception):
    """A problem with user-supplied input.

    Parameters
    ----------
    source:
        The file, folder or hub id the problem is in, as the user would recognise it.
    problem:
        One plain sentence saying what is wrong (no traceback, no repr soup).
    """

    def __init__(self, source: object, problem: str) -> None:
        self.source = str(source)
        problem = say_once(self.source, problem)
        self.problem = problem
        super().__init__(f"{self.source}: {problem}")


class AnalysisCancelled(Exception):
    """Raised inside the pipeline when the caller asked it to stop."""


def say_once(subject: str, message: str) -> str:
    """``message`` without leading repeats of ``subject`` ("x: x: no such file" -> "no such file").

    Errors name their source (``InputError``: "source: problem"); a caller that names
    the subject itself shows the rest, so each thing is said once.
    """
    subject = subject.strip()
    while subject and message.startswith(subject + ": "):
        message = message[len(subject) + 2 :]
    return message


def server_places(cache_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """Folders on the server a visitor must not see, each with the neutral name shown instead.

    The cache folder (with its uploads, spectra and demo), the Python packages folders
    (where the demo's base model lives), the Hugging Face hub cache, the Python
    installation, the project folder and the home folder.
    """
    import site
    import sys
    import sysconfig

    places: dict[str, str] = {}
    if cache_dir is not None:
        places[os.fspath(cache_dir)] = "<cache>"
    packages = {sysconfig.get_paths().get(k, "") for k in ("purelib", "platlib")}
    try:
        packages.update(site.getsitepackages())
    except AttributeError:  # pragma: no cover - virtualenv's old site module
        pass
    for folder in packages:
        if folder:
            places[folder] = "<python packages>"
    try:
        from huggingface_hub import constants

        places[os.fspath(constants.HF_HUB_CACHE)] = "<hub cache>"
        places[os.fspath(constants.HF_HOME)] = "<hub cache>"
    except ImportError:  # pragma: no cover - huggingface_hub is a requirement
        pass
    places[sys.prefix] = "<python>"
    places[sys.base_prefix] = "<python>"
    places[os.fspath(Path(__file__).resolve().parent.parent)] = "<app>"
    places[os.path.expanduser("~")] = "~"
    # Both the path as configured and as resolved (symlinks), longest first.
    resolved: dict[str, str] = {}
    for folder, name in places.items():
        if not folder or folder in ("/", "~"):
            continue
        for variant in {folder.rstrip("/\\"), os.path.realpath(folder)}:
            if len(variant) > 1:
                resolved.setdefault(variant, name)
    return dict(sorted(resolved.items(), key=lambda item: -len(item[0])))


_UPLOAD_FILES = re.compile(r"[/\\]([0-9a-f]{64})(?:[/\\]files)?(?=[/\\]|\b)[/\\]?")


def public_message(
    text: str, places: dict[str, str], uploads: str | os.PathLike | None = None, *, short_hashes: bool = True
) -> str:
    """``text`` (an error, a report) with every server folder replaced by its neutral name.

    The one place errors become safe to show a visitor: an upload's folder becomes
    ``upload <hash8>``, the folders of :func:`server_places` their names
    (``<cache>/spectra/...``, ``<python packages>/...``, ``<hub cache>/...``), and a
    64-digit content hash its first 8 digits.
    """
    if uploads is not None:
        for root in {os.fspath(uploads).rstrip("/\\"), os.path.realpath(uploads)}:
            text = re.sub(re.escape(root) + _UPLOAD_FILES.pattern, lambda m: f"upload {m.group(1)[:8]}/", text)
            text = text.replace(root, "<uploads>")
    for folder, name in places.items():
        text = text.replace(folder, name)
    text = re.sub(r"upload ([0-9a-f]{8})/(?=[\s:,.'\")]|$)", r"upload \1", text)
    if not short_hashes:
        return text
    return re.sub(r"\b([0-9a-f]{8})[0-9a-f]{56}\b", r"\1", text)

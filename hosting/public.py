"""What a visitor may read: messages and reports with no server path in them.

Every message a visitor can cause, and the JSON report when local paths are off, goes
through :func:`public_message`, the one place server folders are replaced by neutral names.
"""

from __future__ import annotations

import os
import re
from pathlib import Path


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

"""Stored uploads as the engine reads them: ``upload:<sha256>`` names a stored folder or file.

The dashboard's hosting layer (:mod:`hosting.uploads`) checks and *stores* what a visitor
uploads; this module is the layout it writes, so the resolver (and a Ray worker) can open
an upload by its name without the code that receives files::

    <cache dir>/uploads/<sha256>/
      upload.json       {"digest", "files", "size_bytes", "uploaded_as"}
      files/            the stored .json and .safetensors files
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from analysis.cache import default_cache_dir
from analysis.errors import InputError

UPLOAD_PREFIX = "upload:"
#: An upload's id: the SHA-256 of its content (64 lowercase hex digits).
DIGEST_PATTERN = re.compile(r"^[0-9a-f]{64}$")
#: The metadata file of a stored upload and the folder holding its files.
META_NAME = "upload.json"
FILES_DIR = "files"


def is_upload_spec(spec: str) -> bool:
    """Whether ``spec`` names a stored upload (``upload:<sha256>``)."""
    return spec.startswith(UPLOAD_PREFIX)


@dataclass(frozen=True)
class StoredUpload:
    """One stored upload.

    ``path`` is what the resolver opens: the folder for a set of files, the file itself for
    a single ``.safetensors``.
    """

    digest: str
    path: Path
    files: tuple[str, ...]
    size_bytes: int
    uploaded_as: tuple[str, ...] = ()

    @property
    def spec(self) -> str:
        """How the upload is named in the dashboard and in shared URLs."""
        return UPLOAD_PREFIX + self.digest

    @property
    def is_adapter(self) -> bool:
        """Whether the upload is a PEFT adapter (it holds ``adapter_config.json``)."""
        return "adapter_config.json" in self.files

    @property
    def label(self) -> str:
        """A short human name: what was uploaded, plus the start of the content hash."""
        names = self.uploaded_as or self.files
        if len(names) == 1:
            shown = names[0]
        else:
            shown = "PEFT adapter" if self.is_adapter else "model files"
        return f"{shown} [{self.digest[:8]}]"


class UploadFolder:
    """The stored uploads under ``root`` (default ``<cache dir>/uploads``), read-only.

    Parameters
    ----------
    root : path, optional
        The folder holding one sub-folder per upload.
    """

    def __init__(self, root: Path | str | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache_dir() / "uploads"

    def get(self, spec_or_digest: str) -> StoredUpload:
        """The stored upload named ``upload:<sha256>`` (or just the digest)."""
        digest = spec_or_digest.removeprefix(UPLOAD_PREFIX)
        if not DIGEST_PATTERN.match(digest):
            raise InputError(spec_or_digest, "is not a valid upload id (expected upload:<64 hex digits>)")
        folder = self.root / digest
        try:
            meta = json.loads((folder / META_NAME).read_text())
        except (OSError, json.JSONDecodeError):
            raise InputError(
                spec_or_digest, "is not stored on this server (uploads are kept per server; upload the files again)"
            ) from None
        with contextlib.suppress(OSError):  # "last used", for eviction; a read-only store still works
            os.utime(folder / META_NAME)
        names = tuple(meta["files"])
        files = folder / FILES_DIR
        single = len(names) == 1 and names[0].endswith(".safetensors")
        return StoredUpload(
            digest,
            files / names[0] if single else files,
            names,
            int(meta["size_bytes"]),
            tuple(meta.get("uploaded_as", ())),
        )

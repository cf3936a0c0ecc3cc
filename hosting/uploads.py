"""Files uploaded in the dashboard, stored safely and named by their content.

A visitor can upload a PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``,
as the two files or a zip of the folder), a kohya-style LoRA ``.safetensors``, or a
full model as ``.safetensors`` (optionally with its ``config.json``). Uploads are
hostile input on a hosted instance, so:

- **Never unpickled.** Only ``.json`` and ``.safetensors`` are kept (a ``README.md``
  picked along with an adapter folder is skipped); ``.bin``, ``.pt`` and other
  pickle-based checkpoints are refused with a message saying how to convert.
- **Zips are unpacked by hand,** member by member: no absolute paths, no ``..``, no
  symbolic links, no nested folders, at most :data:`MAXFILES_DIR` files and
  :data:`MAX_UNPACKED_BYTES` bytes (counted as they are read, not trusted from the
  archive's header, so a zip bomb stops at the cap).
- **Checked before stored:** every ``.safetensors`` header must parse and describe
  exactly the bytes the file holds (a truncated download is caught here with a plain
  message), every ``.json`` must be a JSON object.
- **Content-addressed and atomic:** an upload lives in ``<cache dir>/uploads/<sha256>/``
  and is referred to as ``upload:<sha256>`` (in URLs too, so a shared link works for
  anyone on the same server). A single file's id is the ``sha256sum`` of its bytes; a
  set of files' id is the hash of their names and hashes, so the same adapter gets the
  same id whether zipped or not. Files are written into a staging folder and renamed
  into place, so readers never see half an upload.

Every problem is an :class:`~analysis.errors.InputError` naming the file. The layout of
the store is :mod:`analysis.specs.uploads`'s, which the engine reads.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import time
import zipfile
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from filelock import FileLock

from analysis.config import env_number
from analysis.errors import InputError
from analysis.readers import read_safetensors_header
from analysis.specs.uploads import (
    DIGEST_PATTERN,
    FILES_DIR,
    META_NAME,
    StoredUpload,
    UploadFolder,
)

#: Most files one upload (or one zip) may hold.
MAXFILES_DIR = 32
#: Most bytes one upload may hold once unpacked: the same 500 MB as the upload itself
#: (``.streamlit/config.toml``'s ``maxUploadSize``), so a small zip that unpacks to more
#: is refused at the cap, counted as it is written.
MAX_UNPACKED_BYTES = 500 * 1024**2
#: Largest ``.json`` file accepted (configs are a few kB).
MAX_JSON_BYTES = 4 * 1024**2
#: Bytes all stored uploads may take together (``$WSE_UPLOAD_BUDGET_GB``, default 20).
DEFAULT_STORE_BUDGET_GB = 20.0
#: An upload used (stored or opened) this recently is never evicted: a visitor's page or a
#: running analysis may be reading it.
RECENT_USE_S = 3600.0

KEPT_SUFFIXES = (".json", ".safetensors")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_CHUNK = 1024 * 1024


def safe_name(name: str) -> str:
    """The last path component of ``name`` with anything unusual replaced by ``_``."""
    base = re.split(r"[\\/]", name)[-1].strip()
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", base).lstrip(".")
    return cleaned or "upload"


def check_safetensors(path: Path, display_name: str) -> None:
    """Raise :class:`InputError`, naming ``display_name``, unless ``path`` is a complete safetensors file.

    Complete and well-formed by :func:`analysis.sources.read_safetensors_header`, which
    also checks dtypes and that the file ends exactly where its last tensor does.
    """
    read_safetensors_header(path, display_name=display_name, exact_end=True)


def _budget_from_env() -> int:
    return int(env_number("WSE_UPLOAD_BUDGET_GB", DEFAULT_STORE_BUDGET_GB) * 1024**3)


def disk_error(exc: OSError) -> InputError:
    """The one line for an upload the server's disk could not take (``exc`` from writing it).

    A full disk and a read-only one in plain words; another error by its description. The
    server's folders are not named.

    Parameters
    ----------
    exc : OSError
        What writing the upload raised.

    Returns
    -------
    InputError
        ``upload: could not be stored: ...``.
    """
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        why = "no space left on the server's disk; try again later"
    elif exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        why = "the server's upload folder is read-only"
    else:
        why = exc.strerror or type(exc).__name__
    return InputError("upload", f"could not be stored: {why}")


def _check_json(path: Path, display_name: str) -> None:
    if path.stat().st_size > MAX_JSON_BYTES:
        raise InputError(display_name, f"is larger than {MAX_JSON_BYTES // 1024**2} MB; configs are a few kB")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(display_name, f"is not valid JSON ({exc.__class__.__name__})") from None
    if not isinstance(value, dict):
        raise InputError(display_name, "is not a JSON object")


def _refuse_suffix(name: str) -> None:
    """Refuse pickle-based checkpoints loudly (other unknown files are merely skipped)."""
    suffix = PurePosixPath(name.lower()).suffix
    if suffix in PICKLE_SUFFIXES:
        raise InputError(
            name,
            f"is a pickle-based checkpoint ({suffix}); uploads are never unpickled. Save it as .safetensors "
            "(safetensors.torch.save_file, or save_pretrained(..., safe_serialization=True)) and upload that",
        )


class UploadStore(UploadFolder):
    """Uploaded files checked and kept by content hash under ``root`` (default ``<cache dir>/uploads``).

    :class:`~analysis.specs.uploads.UploadFolder` reads them.

    Parameters
    ----------
    root : pathlib.Path or str, optional
        The folder holding one sub-folder per upload.
    max_files, max_bytes : int, optional
        Caps on one upload (files, and bytes once unpacked); default :data:`MAXFILES_DIR`
        and :data:`MAX_UNPACKED_BYTES`.
    budget_bytes : int, optional
        Cap on all stored uploads together (default ``$WSE_UPLOAD_BUDGET_GB``, 20 GB).
        Storing one past it first removes the least recently used uploads, never one used
        in the last :data:`RECENT_USE_S` seconds; when that cannot make room the upload is
        refused (a hosted instance's disk never fills up with uploads).
    """

    def __init__(
        self,
        root: Path | str | None = None,
        *,
        max_files: int = MAXFILES_DIR,
        max_bytes: int = MAX_UNPACKED_BYTES,
        budget_bytes: int | None = None,
    ) -> None:
        super().__init__(root)
        self.max_files = max_files
        self.max_bytes = max_bytes
        self.budget_bytes = budget_bytes if budget_bytes is not None else _budget_from_env()

    # -- storing ------------------------------------------------------------------------
    def add(self, files: Iterable[tuple[str, bytes | BinaryIO]]) -> StoredUpload:
        """Check and store one upload: a single zip, or one or more plain files.

        ``files`` are ``(name as uploaded, bytes or binary file object)`` pairs.
        Returns the stored upload (an existing one if the same content was stored
        before). Raises :class:`InputError` for anything that is not a safe, well-formed
        adapter or model upload; nothing is stored then.
        """
        files = list(files)
        if not files:
            raise InputError("upload", "no files were uploaded")
        if len(files) > self.max_files:
            raise InputError("upload", f"{len(files)} files uploaded; at most {self.max_files} are accepted")
        try:
            return self._store(files)
        except OSError as exc:  # the server's disk, not the visitor's files: said plainly
            raise disk_error(exc) from None

    def _store(self, files: list[tuple[str, bytes | BinaryIO]]) -> StoredUpload:
        """:meth:`add` past the checks of the list itself."""
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=self.root, prefix=".staging-"))
        try:
            target = staging / FILES_DIR
            target.mkdir()
            zips = [name for name, _ in files if name.lower().endswith(".zip")]
            if zips:
                if len(files) > 1:
                    raise InputError(zips[0], "upload either one zip of the adapter folder or the files themselves")
                name, data = files[0]
                written = self._unzip(name, data, target)
            else:
                written = self._write_files(files, target)
            digest = self._check_and_digest(written)
            meta = {
                "digest": digest,
                "files": sorted(written),
                "size_bytes": sum(p.stat().st_size for p in written.values()),
                "uploaded_as": [safe_name(name) for name, _ in files],
            }
            (staging / META_NAME).write_text(json.dumps(meta, indent=1))
            final = self.root / digest
            with FileLock(str(self.root / ".store.lock")):
                if not (final / META_NAME).exists():
                    self._make_room(meta["size_bytes"], keep=digest)
                try:
                    os.rename(staging, final)
                except OSError:
                    if not (final / META_NAME).exists():
                        raise
                    # Same content stored before (or concurrently): keep the existing copy.
                    shutil.rmtree(staging, ignore_errors=True)
            return self.get(digest)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def _write_files(self, files: list[tuple[str, bytes | BinaryIO]], target: Path) -> dict[str, Path]:
        written: dict[str, Path] = {}
        total = 0
        for name, data in files:
            _refuse_suffix(name)
            if PurePosixPath(name.lower()).suffix not in KEPT_SUFFIXES:
                continue  # README.md and the like, picked with the rest of a folder: not needed
            clean = safe_name(name)
            if clean in written:
                raise InputError(name, "was uploaded twice")
            total += self._copy(name, data, target / clean, total, "upload")
            written[clean] = target / clean
        return written

    def _too_large(self, name: str, size: int, upload: str) -> InputError:
        """The error for a file of ``size`` bytes (so far) that took the upload past the cap.

        The file itself when it alone is larger; else the upload (``upload``: its name),
        whose files together are.
        """
        cap = f"the {self.max_bytes // 1024**2} MB an upload may hold"
        if size > self.max_bytes:
            return InputError(name, f"is larger than {cap}")
        return InputError(upload, f"the upload's files together are larger than {cap}")

    def _copy(self, name: str, data: bytes | BinaryIO, dest: Path, before: int, upload: str) -> int:
        """Stream ``data`` to ``dest``, stopping with an error once ``before`` bytes and it pass the cap."""
        size = 0
        with open(dest, "xb") as out:
            if isinstance(data, bytes | bytearray | memoryview):
                data_bytes = bytes(data)
                if before + len(data_bytes) > self.max_bytes:
                    raise self._too_large(name, len(data_bytes), upload)
                out.write(data_bytes)
                return len(data_bytes)
            if hasattr(data, "seek"):
                data.seek(0)
            while chunk := data.read(_CHUNK):
                size += len(chunk)
                if before + size > self.max_bytes:
                    raise self._too_large(name, size, upload)
                out.write(chunk)
        return size

    def _unzip(self, zip_name: str, data: bytes | BinaryIO, target: Path) -> dict[str, Path]:
        """Extract the ``.json``/``.safetensors`` members of a zip, refusing anything unsafe."""
        import io

        source = io.BytesIO(data) if isinstance(data, bytes | bytearray | memoryview) else data
        if hasattr(source, "seek"):
            source.seek(0)
        try:
            archive = zipfile.ZipFile(source)
        except (zipfile.BadZipFile, OSError, ValueError):
            raise InputError(zip_name, "is not a valid zip archive (corrupt or truncated)") from None
        with archive:
            members = [m for m in archive.infolist() if not m.is_dir()]
            if len(members) > self.max_files:
                raise InputError(zip_name, f"holds {len(members)} files; at most {self.max_files} are accepted")
            paths = {}
            for member in members:
                parts = _member_parts(zip_name, member)
                if parts is not None:
                    paths[member.filename] = parts
            prefix = _common_folder(list(paths.values()))
            written: dict[str, Path] = {}
            skipped_pickles: list[str] = []
            total = 0
            for member in members:
                parts = paths.get(member.filename)
                if parts is None:
                    continue
                inner = parts[len(prefix) :]
                if len(inner) != 1:
                    raise InputError(
                        zip_name, f"holds nested folders ({member.filename}); zip the adapter folder itself"
                    )
                name = inner[0]
                suffix = PurePosixPath(name.lower()).suffix
                if suffix in PICKLE_SUFFIXES:
                    skipped_pickles.append(name)
                    continue
                if suffix not in KEPT_SUFFIXES:
                    continue  # README.md and the like: harmless, not needed, not kept
                clean = safe_name(name)
                if clean in written:
                    raise InputError(zip_name, f"holds {name} twice")
                try:
                    with archive.open(member) as stream:
                        total += self._copy(f"{zip_name}:{name}", stream, target / clean, total, zip_name)
                except (zipfile.BadZipFile, RuntimeError, OSError, EOFError) as exc:
                    raise InputError(zip_name, f"could not be unpacked ({name}: {exc})") from None
                written[clean] = target / clean
        if not any(n.endswith(".safetensors") for n in written):
            if skipped_pickles:
                _refuse_suffix(skipped_pickles[0])
            raise InputError(zip_name, "holds no .safetensors file")
        return written

    def _check_and_digest(self, written: dict[str, Path]) -> str:
        hashes = {}
        for name, path in written.items():
            if name.endswith(".safetensors"):
                check_safetensors(path, name)
            else:
                _check_json(path, name)
            hashes[name] = _sha256(path)
        if "adapter_config.json" in written and not any(n.startswith("adapter_model") for n in written):
            raise InputError("adapter_config.json", "was uploaded without adapter_model.safetensors")
        if not any(n.endswith(".safetensors") for n in written):
            raise InputError(", ".join(sorted(written)) or "upload", "no .safetensors file was uploaded")
        if len(hashes) == 1:
            return next(iter(hashes.values()))
        listing = "".join(f"{name}\0{hashes[name]}\n" for name in sorted(hashes))
        return hashlib.sha256(listing.encode()).hexdigest()

    def stored_bytes(self) -> int:
        """Bytes all stored uploads take (as recorded when each was stored)."""
        return sum(size for _, size, _ in self._stored())

    def _stored(self) -> list[tuple[float, int, Path]]:
        """``(last used, bytes, folder)`` of every stored upload, least recently used first."""
        entries = []
        for folder in self.root.iterdir() if self.root.is_dir() else ():
            if not DIGEST_PATTERN.match(folder.name):
                continue
            try:
                last_used = (folder / META_NAME).stat().st_mtime
                size = int(json.loads((folder / META_NAME).read_text())["size_bytes"])
            except (OSError, ValueError, KeyError, TypeError):
                continue  # half removed, or not ours: neither counted nor touched
            entries.append((last_used, size, folder))
        return sorted(entries, key=lambda entry: entry[0])

    def _make_room(self, incoming: int, *, keep: str) -> None:
        """Remove least recently used uploads until ``incoming`` more bytes fit the budget."""
        gb = self.budget_bytes / 1024**3
        if incoming > self.budget_bytes:
            raise InputError("upload", f"is larger than the {gb:.3g} GB this server keeps for all uploads together")
        now = time.time()
        for leftover in (*self.root.glob(".staging-*"), *self.root.glob(".evicted-*")):
            with contextlib.suppress(OSError):  # from a process killed mid-way, an hour ago or more
                if now - leftover.stat().st_mtime > RECENT_USE_S:
                    shutil.rmtree(leftover, ignore_errors=True)
        entries = self._stored()
        total = sum(size for _, size, _ in entries) + incoming
        for last_used, size, folder in entries:
            if total <= self.budget_bytes:
                break
            if folder.name == keep or now - last_used < RECENT_USE_S:
                continue
            # Renamed away first, so a reader sees the upload whole or not at all.
            doomed = folder.with_name(f".evicted-{folder.name}-{os.getpid()}")
            try:
                os.rename(folder, doomed)
            except OSError:
                continue
            shutil.rmtree(doomed, ignore_errors=True)
            total -= size
        if total > self.budget_bytes:
            raise InputError(
                "upload",
                f"does not fit: this server keeps at most {gb:.3g} GB of uploads and the rest were used within the "
                "last hour; try again later or run the dashboard locally",
            )


def _member_parts(zip_name: str, member: zipfile.ZipInfo) -> tuple[str, ...] | None:
    """The path components of a zip member, or ``None`` for OS clutter; unsafe ones raise."""
    raw = member.filename.replace("\\", "/")
    mode = member.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise InputError(zip_name, f"holds a symbolic link ({member.filename}); links are not accepted")
    if raw.startswith("/") or re.match(r"^[A-Za-z]:", raw):
        raise InputError(zip_name, f"holds an absolute path ({member.filename})")
    parts = tuple(p for p in raw.split("/") if p not in ("", "."))
    if ".." in parts:
        raise InputError(zip_name, f"holds a path leaving the archive ({member.filename})")
    if not parts or parts[0] == "__MACOSX" or parts[-1].startswith("."):
        return None
    return parts


def _common_folder(paths: list[tuple[str, ...]]) -> tuple[str, ...]:
    """The single top folder every member sits in (a zipped folder), else nothing."""
    if paths and all(len(p) > 1 for p in paths) and len({p[0] for p in paths}) == 1:
        return paths[0][:1]
    return ()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()

"""Persistent, content-addressed cache of spectra and per-matrix results.

Design (docs/metrics.md, "Architecture"):

- **Content-addressed.** Keys are hashes of tensor bytes (:func:`tensor_digest`) plus
  :data:`analysis.ALGORITHM_VERSION`, so a base model's SVDs are computed once and then
  reused by every fine-tune, session, process and user, whatever the file is called.
- **No pickle.** Entries are safetensors files: tensors plus a JSON string in the
  safetensors metadata. A payload checksum in the metadata catches bit rot and
  truncation that the safetensors header alone would not.
- **Atomic and concurrent.** An entry is written to a temporary file in the same folder
  and moved into place with ``os.replace``; readers see either nothing or a whole entry.
  A per-key file lock makes a second process wait for, then reuse, the first one's
  result instead of computing it again; if the lock cannot be had in time it computes
  anyway (both results are identical, the last rename wins).
- **Self-healing.** A truncated or corrupt entry is deleted and recomputed, never
  returned. This is also what makes crashes safe, so writes are not fsync'ed.
- **Bounded.** A size budget with least-recently-used eviction (a hit touches the
  entry's mtime).
- **No re-hashing.** A :class:`FingerprintIndex` remembers the content digest of every
  stored tensor per file version, so a run whose results are all cached reads no weights.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from blake3 import blake3
from filelock import FileLock, Timeout
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from analysis import ALGORITHM_VERSION
from analysis.config import env_folder, env_number
from analysis.errors import InputError
from analysis.files import atomic_write_text

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BUDGET_BYTES = 20 * 1024**3
_CHECKSUM_KEY = "wse_checksum"
_META_KEY = "wse_meta"
#: The ``kind/key`` an entry was written for: a valid entry copied over another key's
#: file is refused (and recomputed), not served for the wrong matrix.
_ENTRY_KEY = "wse_key"
#: Write errors that mean "no room": reported as one line, never silently ignored.
_FULL = (errno.ENOSPC, errno.EDQUOT)

Entry = tuple[dict[str, torch.Tensor], dict]


def default_cache_dir() -> Path:
    """``$WSE_CACHE_DIR`` if set (a folder: a file there is refused), else ``cache/`` in the repository."""
    return env_folder("WSE_CACHE_DIR") or REPO_ROOT / "cache"


def default_budget_bytes() -> int:
    """``$WSE_CACHE_BUDGET_GB`` (a float, in GiB) if set, else 20 GiB."""
    gb = env_number("WSE_CACHE_BUDGET_GB", -1.0)
    return int(gb * 1024**3) if gb >= 0 else DEFAULT_BUDGET_BYTES


def io_error(error: Exception) -> OSError | None:
    """The ``OSError`` inside a ``SafetensorError`` of a failed write, or ``None``.

    safetensors reports the disk's errors as its own, ``"... I/O error: No space left on
    device (os error 28) ..."``, not as ``OSError``.

    Parameters
    ----------
    error : Exception
        What ``safetensors`` raised.

    Returns
    -------
    OSError or None
        An ``OSError`` with the same ``errno``, or ``None`` when the message names none.
    """
    found = re.search(r"I/O error: (.*?) \(os error (\d+)\)", str(error))
    return OSError(int(found.group(2)), found.group(1)) if found else None


def tensor_digest(tensor: torch.Tensor) -> str:
    """BLAKE3 of a tensor's dtype, shape and raw bytes (hex, 256 bits).

    Two tensors get the same digest iff they hold bit-identical values of the same
    dtype and shape, which is what makes the cache content-addressed. See
    :func:`content_hasher` for the choice of hash.
    """
    t = tensor.detach().to("cpu").contiguous()
    data = t.reshape(-1).view(torch.uint8).numpy().data
    h = content_hasher(f"{t.dtype}|{tuple(t.shape)}|".encode(), size=len(data))
    h.update(data)
    return h.hexdigest()


#: Inputs from this many bytes on are hashed by several threads (BLAKE3's tree mode); below
#: it the threads cost more than they save.
PARALLEL_HASH_MIN_BYTES = 1 << 20


def content_hasher(prefix: bytes = b"", size: int = 0):
    """A BLAKE3 hasher (cryptographic, 256-bit) fed ``prefix``.

    Multi-threaded for ``size`` bytes from :data:`PARALLEL_HASH_MIN_BYTES` on.

    Cache keys must be collision-resistant against crafted files (a hosted cache is shared
    by visitors who upload weights), so never a non-cryptographic hash; BLAKE3 reads at
    several GB/s per core where SHA-256 managed 1.5-1.8 GB/s (benchmarks/README.md).
    Digests from before the switch (SHA-256, algorithm version 1) are not reused.
    """
    threads = blake3.AUTO if size >= PARALLEL_HASH_MIN_BYTES else 1
    return blake3(prefix, max_threads=threads)


def derived_digest(kind: str, *parts: str) -> str:
    """A digest for a matrix made from stored tensors by a fixed rule (``kind``).

    ``parts`` are the digests of those tensors and every setting of the rule, so equal
    derived digests mean equal matrices (see :attr:`analysis.plan.MatrixPlan.digests`).
    """
    return content_hasher("\x1f".join((kind, *parts)).encode()).hexdigest()


class FingerprintIndex:
    """Content digests of stored tensors, remembered per version of each weight file.

    Content-addressing needs a digest of every matrix, and hashing a 7B checkpoint reads
    all of its ~14 GB. This index maps a file *version* -- its device and inode (through
    symlinks), size, mtime and ctime -- to ``{tensor name: tensor_digest}``, so a later
    run only ``stat``s the file. Any write to a file changes its ctime, which user tools
    cannot set back, so a changed file never meets an old digest; at worst (a lost or
    unreadable index file) digests are computed again. One small JSON file per file
    version, replaced atomically and merged with what other processes wrote meanwhile.

    New digests are written at most every :attr:`WRITE_INTERVAL_S` seconds and by
    :meth:`flush` (the pipeline flushes when an analysis ends): writing the index after
    each of an adapter's hundreds of small tensors made a first run quadratic in them. A
    process killed in between loses only digests, which are computed again.
    """

    WRITE_INTERVAL_S = 2.0

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self._known: dict[str, dict[str, str]] = {}
        self._dirty: set[str] = set()  # versions with digests not yet written
        self._last_write = -float("inf")
        self._lock = threading.Lock()
        self.hashed = 0  # digests computed (not found in the index) by this object

    def digest(self, file: Path | str, name: str, load: Callable[[], torch.Tensor]) -> str:
        """:func:`tensor_digest` of tensor ``name`` of ``file``; ``load()`` reads it if unknown."""
        return self._digest(self._version(Path(file)), name, load)

    def digests(
        self, file: Path | str, names: list[str], load: Callable[[str], torch.Tensor] | None
    ) -> list[str | None]:
        """:meth:`digest` of each of ``names`` of one ``file`` (``load(name)`` reads one), the file looked at once.

        For many tensors of a file at once: one ``stat`` where :meth:`digest` makes one per
        tensor. ``load=None``: what :meth:`known` says of each (``None`` for one not held), nothing read.
        """
        version = self._version(Path(file))
        if load is None:
            with self._lock:
                known = self._known.get(version)
                if known is None or any(name not in known for name in names):
                    known = self._known[version] = self._read(version) | (known or {})
                return [known.get(name) for name in names]
        return [self._digest(version, name, lambda name=name: load(name)) for name in names]

    def _digest(self, version: str, name: str, load: Callable[[], torch.Tensor]) -> str:
        with self._lock:
            known = self._known.get(version)
            if known is None:
                known = self._known[version] = self._read(version)
            if name in known:
                return known[name]
        value = tensor_digest(load())
        with self._lock:
            self.hashed += 1
            self._known[version][name] = value
            self._dirty.add(version)
            due = time.monotonic() - self._last_write >= self.WRITE_INTERVAL_S
        if due:
            self.flush()
        return value

    def known(self, file: Path | str, name: str) -> str | None:
        """The digest of tensor ``name`` of ``file`` if the index holds it, else ``None``.

        Never reads the tensor. A name this process has not seen is looked up on disk again
        (another process, a worker, may have hashed it since).
        """
        return self._known_at(self._version(Path(file)), name)

    def seen(self, file: Path | str) -> bool:
        """Whether the index holds any digest of the current version of ``file``.

        Nothing is read but the index: a model none of whose files were ever hashed has
        nothing cached.
        """
        version = self._version(Path(file))
        with self._lock:
            return bool(self._known.get(version)) or bool(self._read(version))

    def known_reader(self) -> Callable[[Path | str, str], str | None]:
        """:meth:`known` for many tensors at one moment: each file looked at once, then remembered by the reader.

        For a whole plan's digests before it runs (one ``stat`` per file, not per tensor); a
        reader is for one such look, not to be kept.
        """
        versions: dict[str, str] = {}

        def read(file: Path | str, name: str) -> str | None:
            version = versions.get(str(file))
            if version is None:
                version = versions[str(file)] = self._version(Path(file))
            return self._known_at(version, name)

        return read

    def _known_at(self, version: str, name: str) -> str | None:
        with self._lock:
            known = self._known.get(version)
            if known is None or name not in known:
                known = self._known[version] = self._read(version) | (known or {})
            return known.get(name)

    def flush(self) -> None:
        """Write the digests found since the last write (merged with the files on disk)."""
        with self._lock:
            for version in sorted(self._dirty):
                merged = self._read(version) | self._known[version]
                self._known[version] = merged
                try:
                    atomic_write_text(self._path(version), json.dumps(merged, sort_keys=True))
                except OSError as exc:  # a read-only cache still works, it just re-hashes
                    log.warning("cannot write the fingerprint index %s: %s", self._path(version), exc)
            self._dirty.clear()
            self._last_write = time.monotonic()

    def path_for(self, file: Path | str) -> Path:
        """The index file that holds the digests of the current version of ``file``."""
        return self._path(self._version(Path(file)))

    @staticmethod
    def _version(file: Path) -> str:
        # The file itself (device and inode, through symlinks), not its path: os.stat is one
        # system call where os.path.realpath walks every component in Python.
        st = os.stat(file)
        return hashlib.sha256(
            f"{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}".encode()
        ).hexdigest()

    def _path(self, version: str) -> Path:
        return self.root / version[:2] / f"{version}.json"

    def _read(self, version: str) -> dict[str, str]:
        try:
            data = json.loads(self._path(version).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable fingerprint index %s: %s", self._path(version), exc)
            return {}
        if not isinstance(data, dict):
            return {}
        return {
            k: v
            for k, v in data.items()
            if isinstance(k, str) and isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)
        }


def _payload_checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = content_hasher()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensor_digest(tensors[name]).encode())
    return h.hexdigest()


@dataclass
class CacheStats:
    """Counters a test or benchmark can read (counted, not timed)."""

    hits: int = 0
    misses: int = 0
    corrupt: int = 0
    evicted: int = 0
    computed: dict[str, int] = field(default_factory=dict)


class SpectrumCache:
    """A folder of content-addressed safetensors entries.

    Parameters
    ----------
    root : pathlib.Path or str, optional
        Folder to keep entries in (created on first write). Default:
        :func:`default_cache_dir` ``/ "spectra"``.
    budget_bytes : int, optional
        Total size above which least-recently-used entries are evicted after a write.
        Default: :func:`default_budget_bytes`.
    lock_timeout_s : float, default 600.0
        How long to wait for another process computing the same entry before
        computing it here too.
    """

    def __init__(
        self, root: Path | str | None = None, budget_bytes: int | None = None, lock_timeout_s: float = 600.0
    ) -> None:
        self.root = Path(root) if root is not None else default_cache_dir() / "spectra"
        self.budget_bytes = budget_bytes if budget_bytes is not None else default_budget_bytes()
        self.lock_timeout_s = lock_timeout_s
        self.stats = CacheStats()
        self._stats_lock = threading.Lock()
        self.fingerprints = FingerprintIndex(self.root / f"v{ALGORITHM_VERSION}" / "fingerprints")
        # Bytes in the cache at the last scan plus what this process wrote since: a put
        # scans the folder for eviction only when that may exceed the budget, or every
        # _RESCAN_EVERY puts (other processes write too), not after every single put.
        self._estimated_bytes: int | None = None
        self._puts_since_scan = 0
        #: Set when a write failed for lack of permission: entries are computed, not stored.
        self.read_only = False

    # -- paths -------------------------------------------------------------------------
    def path_for(self, kind: str, key: str) -> Path:
        """Where the entry ``kind/key`` lives. ``key`` must be a hex digest."""
        if not key or any(c not in "0123456789abcdef" for c in key):
            raise ValueError(f"cache keys are hex digests, got {key!r}")
        if not kind.replace("-", "").isalnum():
            raise ValueError(f"cache kinds are alphanumeric, got {kind!r}")
        return self.root / f"v{ALGORITHM_VERSION}" / kind / key[:2] / f"{key}.safetensors"

    @staticmethod
    def key(*parts: str) -> str:
        """Combine digests and parameters into one entry key."""
        return content_hasher("|".join(parts).encode()).hexdigest()

    # -- reading and writing -------------------------------------------------------------
    def get(self, kind: str, key: str) -> Entry | None:
        """The entry's tensors and metadata, or ``None`` if absent or corrupt."""
        path = self.path_for(kind, key)
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
            if meta.get(_CHECKSUM_KEY) != _payload_checksum(tensors):
                raise ValueError("checksum mismatch")
            if meta.get(_ENTRY_KEY) != f"{kind}/{key}":
                raise ValueError(f"written for {meta.get(_ENTRY_KEY) or 'an unknown key'}, not {kind}/{key}")
            info = json.loads(meta.get(_META_KEY, "{}"))
        except FileNotFoundError:
            return None
        except (SafetensorError, ValueError, OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            log.warning("discarding corrupt cache entry %s: %s", path, exc)
            self._count("corrupt")
            try:
                path.unlink(missing_ok=True)
            except OSError:  # a folder where the file should be, or a read-only cache
                pass
            return None
        try:
            os.utime(path)  # least-recently-used bookkeeping
        except OSError:
            pass
        return tensors, info

    def put(self, kind: str, key: str, tensors: dict[str, torch.Tensor], info: dict | None = None) -> None:
        """Write an entry atomically, then evict old entries beyond the budget.

        A cache that cannot be written (read-only, or something else where the entry's
        file should be) is used read-only: the entry is computed but not stored. A full
        disk is an :class:`~analysis.errors.InputError` (one line, naming the folder).
        """
        path = self.path_for(kind, key)
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
        metadata = {
            _CHECKSUM_KEY: _payload_checksum(tensors),
            _META_KEY: json.dumps(info or {}),
            _ENTRY_KEY: f"{kind}/{key}",
        }
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".safetensors")
            os.close(fd)
            # No fsync: other processes see the whole entry after the rename either way, and
            # an entry a power cut leaves half-written fails its checksum and is recomputed
            # (Self-healing). Skipping it saves ~10 ms per entry, a third of a small SVD.
            save_file(tensors, tmp, metadata=metadata)
            os.replace(tmp, path)
        except (OSError, SafetensorError) as exc:
            self._forget(tmp)
            error = exc if isinstance(exc, OSError) else io_error(exc)
            if error is None:  # safetensors' own problem, not the disk's
                raise
            if error.errno in _FULL:
                raise self.full_error() from None
            self._read_only(error)
            return
        except BaseException:
            self._forget(tmp)
            raise
        with self._stats_lock:
            self._puts_since_scan += 1
            if self._estimated_bytes is not None:
                self._estimated_bytes += _size(path)
            scan = (
                self._estimated_bytes is None
                or self._estimated_bytes > self.budget_bytes
                or self._puts_since_scan >= _RESCAN_EVERY
            )
        if scan:
            self.evict()

    def full_error(self) -> InputError:
        """The one-line error for a cache folder whose disk is full."""
        return InputError(
            self.root, "no space left on the disk of the cache folder; free some space or lower WSE_CACHE_BUDGET_GB"
        )

    def _read_only(self, exc: OSError) -> None:
        if not self.read_only:
            log.warning("cannot write the cache %s (%s): computing without storing", self.root, exc.strerror or exc)
        self.read_only = True

    @staticmethod
    def _forget(tmp: str | None) -> None:
        if tmp is not None:
            try:
                Path(tmp).unlink(missing_ok=True)
            except OSError:
                pass

    def lookup(self, kind: str, key: str) -> Entry | None:
        """:meth:`get`, counted as a hit when found (a miss is counted when computed)."""
        entry = self.get(kind, key)
        if entry is not None:
            self._count("hits")
        return entry

    def store(self, kind: str, key: str, tensors: dict[str, torch.Tensor], info: dict | None = None) -> None:
        """:meth:`put` an entry computed after a :meth:`lookup` missed, counting the miss."""
        self._count("misses")
        with self._stats_lock:
            self.stats.computed[kind] = self.stats.computed.get(kind, 0) + 1
        self.put(kind, key, tensors, info)

    def get_or_compute(self, kind: str, key: str, compute: Callable[[], Entry], *, missed: bool = False) -> Entry:
        """Return the cached entry, or compute, store and return it.

        While one process computes an entry, others asking for the same key wait on a
        file lock and then read its result (counted as a hit). ``missed``: the caller has
        just looked the entry up and not found it, so it is read again only under the lock.
        """
        entry = None if missed else self.get(kind, key)
        if entry is not None:
            self._count("hits")
            return entry
        lock_path = self.path_for(kind, key).with_suffix(".lock")
        try:
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            lock = FileLock(str(lock_path), timeout=self.lock_timeout_s)
            lock.acquire()
        except Timeout:
            log.warning("timed out waiting for %s/%s; computing it here as well", kind, key)
            return self._compute_and_store(kind, key, compute)
        except OSError as exc:  # no lock without a writable cache: compute, don't store
            if exc.errno in _FULL:
                raise self.full_error() from None
            self._read_only(exc)
            return self._compute_and_store(kind, key, compute)
        try:  # acquired once above, released once here: a `with lock` on top would hold it twice
            entry = self.get(kind, key)
            if entry is not None:
                self._count("hits")
                return entry
            return self._compute_and_store(kind, key, compute)
        finally:
            lock.release()

    def _compute_and_store(self, kind: str, key: str, compute: Callable[[], Entry]) -> Entry:
        tensors, info = compute()
        self.store(kind, key, tensors, info)
        return {n: t.detach().to("cpu") for n, t in tensors.items()}, info

    # -- housekeeping -------------------------------------------------------------------
    def entries(self) -> list[Path]:
        """The stored entry files (``.safetensors``; half-written ``.tmp-`` files left out)."""
        if not self.root.exists():
            return []
        return [p for p in self.root.rglob("*.safetensors") if not p.name.startswith(".tmp-") and p.is_file()]

    def size_bytes(self) -> int:
        """Every file the cache keeps: entries, their lock files and the fingerprint index."""
        return sum(_disk_bytes(p) for p in self._all_files())

    def _all_files(self) -> list[Path]:
        if not self.root.exists():
            return []
        return [p for p in self.root.rglob("*") if p.is_file()]

    def evict(self) -> int:
        """Delete least-recently-used entries until the cache fits its budget.

        The size counts every file the cache keeps, lock files and fingerprints included;
        lock files of entries no longer stored go too. Returns how many entries were removed.
        """
        entries = set(self.entries())
        for lock in self.root.rglob("*.lock") if self.root.exists() else []:
            if lock.with_suffix(".safetensors") not in entries and time.time() - (_mtime(lock) or 0) > 60:
                try:
                    lock.unlink(missing_ok=True)
                except OSError:
                    pass
        files = [(p, st) for p in entries if (st := _stat(p)) is not None]
        total = sum(_disk_bytes(p) for p in self._all_files())
        removed = 0
        if total > self.budget_bytes:
            for path, st in sorted(files, key=lambda item: item[1].st_mtime_ns):
                if total <= self.budget_bytes:
                    break
                try:
                    path.unlink(missing_ok=True)
                except OSError:
                    continue
                total -= _disk_bytes(path, st)
                removed += 1
            self._count("evicted", removed)
        with self._stats_lock:
            self._estimated_bytes = total
            self._puts_since_scan = 0
        return removed

    def clear(self) -> None:
        """Delete every stored entry."""
        for path in self.entries():
            path.unlink(missing_ok=True)
        with self._stats_lock:
            self._estimated_bytes = None

    def _count(self, name: str, n: int = 1) -> None:
        with self._stats_lock:
            setattr(self.stats, name, getattr(self.stats, name) + n)


_RESCAN_EVERY = 64


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except FileNotFoundError:
        return None


#: What a file costs on disk at least (one block), so empty lock files count too.
_BLOCK = 4096


def _disk_bytes(path: Path, st: os.stat_result | None = None) -> int:
    st = st or _stat(path)
    return 0 if st is None else max(st.st_size, _BLOCK)


def _mtime(path: Path) -> float | None:
    st = _stat(path)
    return None if st is None else st.st_mtime


def _size(path: Path) -> int:
    st = _stat(path)
    return 0 if st is None else st.st_size

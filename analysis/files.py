"""Writing a file so that readers never see half of it."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def atomic_write_text(path: Path | str, text: str, *, private: bool = True) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically.

    The text goes into a new file beside it, moved into place with ``os.replace``, so
    readers see the old file or the whole new one (never half of it, nor two writers'
    bytes mixed). The folder is created if missing. A failed write leaves no temporary
    file behind.

    Parameters
    ----------
    path : pathlib.Path or str
        The file written.
    text : str
        Its new content.
    private : bool, default True
        The file is readable by its owner only (``0600``, what :func:`tempfile.mkstemp`
        makes); otherwise it gets the mode a plain ``open(path, "w")`` gives (``0666``
        less the umask).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_beside(path, 0o600 if private else 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _create_beside(path: Path, mode: int) -> tuple[int, Path]:
    """A new, uniquely named file in ``path``'s folder, open for writing (as ``mkstemp``)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    while True:
        tmp = path.with_name(f".tmp-{secrets.token_hex(6)}{path.suffix}")
        try:
            return os.open(tmp, flags, mode), tmp
        except FileExistsError:
            continue

"""Durable file writes and checksums (no faiss, no numpy): the one copy of each for index/."""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write", "fsync_dir", "fsync_file", "sha256_file"]


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in blocks."""
    with Path(path).open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def fsync_file(path: Path) -> None:
    """Flush a file that someone else wrote (e.g. faiss, a memory map) to disk."""
    with Path(path).open("rb") as fh:
        os.fsync(fh.fileno())


def fsync_dir(path: Path) -> None:
    """Make the entries created or renamed in a directory durable."""
    # Not all platforms allow a directory fsync.
    fd = os.open(path, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(
    path: Path, data: bytes | Callable[[BinaryIO], None], *, replace: bool = True
) -> None:
    """Replace ``path`` with ``data`` (bytes, or a function that writes into the open
    binary file) all at once: a temporary file in the same directory is written, fsynced
    and renamed over ``path``, then the directory is fsynced. Readers see the old file or
    the new one, never a part; a failed write leaves ``path`` as it was and no temporary
    file. The file gets the default permissions (the umask's). ``replace=False`` publishes
    an immutable file: FileExistsError if ``path`` exists (a hard link, never a rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with tmp.open("xb") as fh:
            if callable(data):
                data(fh)
            else:
                fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if path exists: published files are immutable
            tmp.unlink()
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)

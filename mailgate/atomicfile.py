"""Durable file replacement: write a temporary file, fsync, rename, fsync the directory.

A reader (or a restart after a crash) sees the old file or the new one, never
half of one.  Used for the accounts file, certificates, captured requests and
the development state.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomically(path: Path, data: bytes, mode: int = 0o600, durable: bool = True) -> None:
    """Replace ``path`` with ``data``; keeps the previous owner when run as root.

    ``durable=False`` skips the fsyncs for files whose loss on power failure is
    harmless (captured requests in development).  Raises OSError.
    """
    directory = path.parent
    try:
        previous: os.stat_result | None = os.stat(path)
    except FileNotFoundError:
        previous = None
    descriptor, temporary = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            if previous is not None:
                try:
                    os.fchown(handle.fileno(), previous.st_uid, previous.st_gid)
                except PermissionError:
                    pass  # Not root: the file stays ours, as it already was.
            handle.write(data)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
    if durable:
        fsync_directory(directory)


def fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (POSIX requires fsync of the directory)."""
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)

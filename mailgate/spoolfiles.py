"""The spool's durable file operations, in two phases: prepare, then publish.

A message reaches the spool in two steps (ARCHITECTURE.md §4, "what 250 means"):

1. :func:`prepare_file`: write ``tmp/<id>`` and fsync it.  This may start as
   soon as the final dot is read, while the message is still being parsed and
   checked: nothing in ``tmp/`` is ever delivered (start-up recovery deletes it).
2. :func:`publish_batch`: rename ``tmp/<id>`` to ``messages/<id>`` and fsync the
   ``messages`` directory, once for a whole batch (group commit).  Only then is
   the rename durable (POSIX leaves a rename's durability to an fsync of the
   directory), and only then may the client hear 250.

These functions use nothing but the standard library: the spool writer process
(:mod:`mailgate.spoolchild`) runs them, as do the in-process spool writer and
:class:`mailgate.spool.Spool`.  Every one raises (or returns) OSError and leaves
nothing half done behind.
"""

from __future__ import annotations

import os

from mailgate.atomicfile import fsync_directory


def prepare_file(tmp: str | os.PathLike[str], name: str, data: bytes) -> None:
    """Write ``data`` to ``tmp/name`` and fsync it.  On error the file is removed.

    ``O_TRUNC``, not ``O_EXCL``: a writer process restarted in the middle of a
    batch is asked to prepare the same file again.
    """
    path = os.path.join(tmp, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        discard_file(tmp, name)
        raise


def publish_batch(tmp: str | os.PathLike[str], messages: str | os.PathLike[str], names: list[str]) -> list[OSError | None]:
    """Rename each prepared ``tmp/name`` into ``messages/`` and make the renames
    durable with one fsync of ``messages``: per name None (durable, the client
    may hear 250) or the OSError that kept it out.

    A name whose prepared file is gone but whose message is in place counts as
    published: a restarted writer process is asked again for what its
    predecessor may have done.  If the directory fsync fails, every file
    renamed here is taken back: it was never acknowledged, so it must not be
    delivered after a restart either.
    """
    errors: list[OSError | None] = []
    for name in names:
        target = os.path.join(messages, name)
        try:
            os.rename(os.path.join(tmp, name), target)
            errors.append(None)
        except FileNotFoundError as e:
            errors.append(None if os.path.exists(target) else e)
        except OSError as e:
            discard_file(tmp, name)
            errors.append(e)
    if any(error is None for error in errors):
        try:
            fsync_directory(messages)
        except OSError as e:
            for index, name in enumerate(names):
                if errors[index] is None:
                    _unlink(os.path.join(messages, name))
                    errors[index] = e
    return errors


def remove_message(messages: str | os.PathLike[str], name: str) -> None:
    """Remove a delivered message's file (one with no state or journal file).

    Not fsynced: should the removal be lost in a crash, the message is delivered
    again after the restart, with the same idempotency key (at least once)."""
    try:
        os.unlink(os.path.join(messages, name))
    except FileNotFoundError:
        pass


def discard_file(tmp: str | os.PathLike[str], name: str) -> None:
    """Remove a prepared file that will not be published (the message was refused)."""
    _unlink(os.path.join(tmp, name))


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass  # Gone already; or start-up recovery removes it.

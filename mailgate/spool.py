"""The durable queue on disk: what ``250 2.0.0 Ok: queued as <id>`` promises.

ARCHITECTURE.md §3: in queue mode the message, its envelope and its account
are written to a temporary name, fsynced, renamed into place and the directory
fsynced before the 250 goes out, so that neither a crash (``kill -9``) nor a
power failure after the reply loses the message.

Layout under ``<state_dir>/queue`` (directories 0700, files 0600)::

    lock            held (flock) by the running server and its spool writer process;
                    the queue CLI checks it
    control.sock    the running server's control socket (mailgate.queuecontrol)
    tmp/            files being written (mailgate.spoolfiles: prepared while the
                    message is parsed, renamed into messages/ once accepted);
                    leftovers are removed at start-up
    messages/ID     one message: envelope and content, checksummed, never changed
    messages/ID.state    retry state (attempts, next attempt, last error), replaced atomically
    messages/ID.journal  requests the API already accepted (one JSON line each, fsynced)
    corrupt/        entries that failed their integrity check, kept for inspection

A message file is::

    MAILGATE-SPOOL/1 LF
    envelope as one line of JSON LF
    the message as received (CRLF line endings)
    "sha256:" + hex digest of everything above + LF

The envelope is JSON, never pickle: reading a spool file must not be able to
run code.  It holds the sender, recipients, arrival time, the message's
control-header values (``null``: the message is stored as received, control
headers included, and parsing it again gives them; written parsed, with the
control headers taken out, by earlier versions and for DSNs) and a snapshot of
the account that accepted it,
including the account's provider settings.  For ``passthrough`` accounts those
settings are the client's API credentials (the SMTP login): the server needs
them after a restart and has no other place to get them from.  That is why
every file here is mode 0600 inside 0700 directories, like the message
content itself, which is just as private.

The journal is what makes retries safe for adapters that send one request per
recipient: a request the API accepted is recorded (and fsynced) before the
next one is sent, and a later attempt, after a restart too, skips it.  A
journal line is::

    {"key": "...", "provider": "main", "id": "<API message id>", "recipients": ["bob@example.org"]}

``recipients`` (the envelope recipients the request delivered to) is what
lets a DSN after a partial delivery name only those who did not get the
message; a line without it (written by an earlier version) is still read,
and counts as delivering to nobody known (:class:`JournalRecord`).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import math
import os
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from twisted.logger import Logger

from mailgate import spoolfiles
from mailgate.accounts.account import Account
from mailgate.atomicfile import fsync_directory, write_atomically
from mailgate.model import Controls

__all__ = [
    "CorruptEntry",
    "EntryState",
    "Envelope",
    "Spool",
    "SpoolLocked",
    "is_queue_id",
]

log = Logger()

MAGIC = b"MAILGATE-SPOOL/1\n"
_TRAILER_PREFIX = b"sha256:"
_TRAILER_LENGTH = len(_TRAILER_PREFIX) + 64 + 1
_QUEUE_ID = re.compile(r"[A-Z2-7]{22}")
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def is_queue_id(text: str) -> bool:
    """True for a well-formed queue id (:func:`mailgate.ids.new_queue_id`); also keeps paths safe."""
    return bool(_QUEUE_ID.fullmatch(text))


def is_disk_full(error: OSError) -> bool:
    return error.errno in _DISK_FULL


class CorruptEntry(Exception):
    """A spool file that fails its integrity check (truncated, altered, unreadable)."""


class SpoolLocked(Exception):
    """Another process (a running server) holds the queue lock."""


@dataclass(frozen=True)
class Envelope:
    """Everything besides the content that delivery needs, stored as JSON."""

    queue_id: str
    arrival: float
    sender: str
    recipients: tuple[str, ...]
    account: Account
    # None: the stored message is as received, and parsing it gives the control
    # values (mailgate.queue.QueueDeliverer); else the stored message is parsed
    # already, control headers taken out, and these are its control values.
    controls: Controls | None = field(default_factory=Controls)

    def to_json(self) -> bytes:
        account = self.account
        document = {
            "queue_id": self.queue_id,
            "arrival": self.arrival,
            "sender": self.sender,
            "recipients": list(self.recipients),
            "account": {
                "name": account.name,
                "route": list(account.route),
                "provider_settings": {k: dict(v) for k, v in account.provider_settings.items()},
                "allowed_senders": list(account.allowed_senders),
                "max_recipients": account.max_recipients,
                "max_message_size": account.max_message_size,
                "defaults": dict(account.defaults),
                "delivery_mode": account.delivery_mode,
            },
            "controls": None if self.controls is None else asdict(self.controls),
        }
        return json.dumps(document, ensure_ascii=True, separators=(",", ":")).encode("ascii")

    @classmethod
    def from_json(cls, data: bytes) -> Envelope:
        """Raises CorruptEntry for anything that is not a valid envelope."""
        try:
            document = json.loads(data)
            account = document["account"]
            controls = document["controls"]
            return cls(
                queue_id=_text(document["queue_id"]),
                arrival=_finite(document["arrival"]),
                sender=_text(document["sender"]),
                recipients=tuple(_text(r) for r in document["recipients"]),
                account=Account(
                    name=_text(account["name"]),
                    route=tuple(_text(r) for r in account["route"]),
                    provider_settings=MappingProxyType(
                        {
                            _text(name): MappingProxyType({_text(k): v for k, v in settings.items()})
                            for name, settings in account["provider_settings"].items()
                        }
                    ),
                    allowed_senders=tuple(_text(s) for s in account["allowed_senders"]),
                    max_recipients=account["max_recipients"],
                    max_message_size=account["max_message_size"],
                    defaults=MappingProxyType({_text(k): _text(v) for k, v in account["defaults"].items()}),
                    delivery_mode=account["delivery_mode"],
                ),
                controls=None
                if controls is None
                else Controls(
                    tags=tuple(_text(t) for t in controls["tags"]),
                    metadata=tuple((_text(k), _text(v)) for k, v in controls["metadata"]),
                    stream=controls["stream"],
                    track_opens=controls["track_opens"],
                    track_clicks=controls["track_clicks"],
                    transactional=controls["transactional"],
                    layout=controls["layout"],
                    inline_css=controls["inline_css"],
                    keep_message_id=controls["keep_message_id"],
                    smtpapi=controls.get("smtpapi"),
                ),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CorruptEntry(f"invalid envelope ({type(e).__name__}: {e})") from None


def _finite(value: Any) -> float:
    """A time: Python's JSON reads NaN and Infinity, which would make the lifetime
    arithmetic never give up (NaN arrival) or never retry (infinite next attempt)."""
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"not a finite number: {value!r}")
    return number


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class EntryState:
    """What the queue knows about a message's delivery so far (``ID.state``).

    ``next_attempt`` None means "as soon as possible".  Written only after a failed attempt, so the
    common path (delivered at the first attempt) never writes one.
    """

    attempts: int = 0
    next_attempt: float | None = None
    last_error: str | None = None
    last_attempt: float | None = None

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode("ascii")

    @classmethod
    def from_json(cls, data: bytes) -> EntryState:
        try:
            document = json.loads(data)
            return cls(
                attempts=int(document["attempts"]),
                next_attempt=None if document["next_attempt"] is None else _finite(document["next_attempt"]),
                last_error=document["last_error"],
                last_attempt=None if document["last_attempt"] is None else _finite(document["last_attempt"]),
            )
        except (ValueError, KeyError, TypeError) as e:
            raise CorruptEntry(f"invalid state file ({type(e).__name__})") from None


@dataclass(frozen=True)
class JournalRecord:
    """One request the API accepted: its key (see dispatch.request_key), provider and id,
    and the envelope recipients it delivered to.

    ``recipients`` None means unknown: a line written before journals named
    them, or a request whose adapter did not say (dispatch.carried_recipients).
    Such a record still keeps its request from being sent again, but proves
    nobody's delivery, so a DSN still names everyone it could concern.
    """

    key: str
    provider: str
    message_id: str
    recipients: tuple[str, ...] | None = None

    def to_json(self) -> str:
        document: dict[str, Any] = {"key": self.key, "provider": self.provider, "id": self.message_id}
        if self.recipients is not None:
            document["recipients"] = list(self.recipients)
        return json.dumps(document)

    @classmethod
    def from_json(cls, line: bytes) -> JournalRecord:
        """Raises ValueError, KeyError or TypeError for a line that is not a record.
        A malformed ``recipients`` is read as unknown: the request was accepted
        all the same, and must not be sent again."""
        document = json.loads(line)
        recipients = document.get("recipients")
        if not (isinstance(recipients, list) and all(isinstance(r, str) for r in recipients)):
            recipients = None
        return cls(
            _text(document["key"]),
            _text(document["provider"]),
            _text(document["id"]),
            None if recipients is None else tuple(recipients),
        )


@dataclass
class Recovered:
    """What :meth:`Spool.recover` found: entries to deliver and what it cleaned up."""

    entries: list[tuple[Envelope, EntryState]] = field(default_factory=list)
    quarantined: list[str] = field(default_factory=list)
    temporaries_removed: int = 0


def encode_entry(envelope: Envelope, raw: bytes) -> bytes:
    body = b"".join((MAGIC, envelope.to_json(), b"\n", raw))
    return body + _TRAILER_PREFIX + hashlib.sha256(body).hexdigest().encode("ascii") + b"\n"


def decode_entry(data: bytes) -> tuple[Envelope, bytes]:
    """Check the checksum and split a message file; raises CorruptEntry."""
    if len(data) < len(MAGIC) + _TRAILER_LENGTH or not data.startswith(MAGIC):
        raise CorruptEntry("not a spool file (bad header or truncated)")
    body, trailer = data[:-_TRAILER_LENGTH], data[-_TRAILER_LENGTH:]
    expected = _TRAILER_PREFIX + hashlib.sha256(body).hexdigest().encode("ascii") + b"\n"
    if trailer != expected:
        raise CorruptEntry("checksum mismatch (truncated or altered)")
    header_end = body.find(b"\n", len(MAGIC))
    if header_end < 0:
        raise CorruptEntry("no envelope line")
    envelope = Envelope.from_json(body[len(MAGIC) : header_end])
    return envelope, body[header_end + 1 :]


class Spool:
    """The queue directory.  All methods do blocking file I/O and raise OSError;
    the queue calls the slow ones (write, load) from a thread."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.messages = self.directory / "messages"
        self.tmp = self.directory / "tmp"
        self.corrupt = self.directory / "corrupt"
        self.lock_path = self.directory / "lock"
        self.control_path = self.directory / "control.sock"
        self._lock_fd: int | None = None

    # -- set-up and lock -----------------------------------------------------------

    def create(self) -> None:
        """Create the queue's directories inside an existing state directory (which
        mailgate never creates: its owner and mode are the operator's, or systemd's
        ``StateDirectory=``).  Raises FileNotFoundError when it is missing."""
        for directory in (self.directory, self.messages, self.tmp, self.corrupt):
            directory.mkdir(mode=0o700, exist_ok=True)
            os.chmod(directory, 0o700)

    def lock(self, wait: float = 0.0) -> None:
        """Take the queue lock for this process (released when it exits, even by kill -9).

        Raises SpoolLocked when another process holds it: two servers on one
        queue would deliver every message twice.  The server's spool writer
        process holds it too (:mod:`mailgate.spoolwriter`), so that a restarted
        server cannot recover the spool while the writer of the one that died
        still finishes its last batch; ``wait`` (seconds, blocking) gives it
        that time.
        """
        self.create()
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + wait
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise SpoolLocked(f"{self.directory} is in use by another mailgate process") from None
                    time.sleep(0.05)
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        self._lock_fd = fd

    @property
    def locked(self) -> bool:
        """This process holds the lock."""
        return self._lock_fd is not None

    @property
    def lock_descriptor(self) -> int | None:
        """The descriptor holding the lock, for a child process to hold it too."""
        return self._lock_fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def locked_by_other(self) -> bool:
        """True when another process holds the lock (a server is running)."""
        try:
            fd = os.open(self.lock_path, os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    # -- paths -------------------------------------------------------------------

    def message_path(self, queue_id: str) -> Path:
        if not is_queue_id(queue_id):
            raise ValueError(f"not a queue id: {queue_id!r}")
        return self.messages / queue_id

    def _state_path(self, queue_id: str) -> Path:
        return self.messages / f"{queue_id}.state"

    def _journal_path(self, queue_id: str) -> Path:
        return self.messages / f"{queue_id}.journal"

    # -- messages ----------------------------------------------------------------

    def write(self, envelope: Envelope, raw: bytes) -> None:
        """Store one message durably: temporary file, fsync, rename, fsync the directory.

        Only when this returns may the client hear 250.  On any error nothing is
        left behind and OSError is raised.  The server writes its messages in two
        phases instead (:mod:`mailgate.spoolwriter`); this is for the DSNs it
        queues and for tests.
        """
        (error,) = self.write_batch([(envelope, raw)])
        if error is not None:
            raise error

    def write_batch(self, items: list[tuple[Envelope, bytes]]) -> list[OSError | None]:
        """Store several messages with one directory fsync: per item None (durable)
        or the OSError that kept it out (:func:`mailgate.spoolfiles.publish_batch`)."""
        errors: list[OSError | None] = []
        for envelope, raw in items:
            try:
                spoolfiles.prepare_file(self.tmp, self.message_path(envelope.queue_id).name, encode_entry(envelope, raw))
                errors.append(None)
            except OSError as e:
                errors.append(e)
        prepared = [envelope.queue_id for (envelope, _), error in zip(items, errors, strict=True) if error is None]
        published = iter(spoolfiles.publish_batch(self.tmp, self.messages, prepared))
        return [next(published) if error is None else error for error in errors]

    def load(self, queue_id: str) -> tuple[Envelope, bytes]:
        """Read and verify one message; raises CorruptEntry or OSError (FileNotFoundError)."""
        data = self.message_path(queue_id).read_bytes()
        envelope, raw = decode_entry(data)
        if envelope.queue_id != queue_id:
            raise CorruptEntry(f"file holds message {envelope.queue_id}")
        return envelope, raw

    def exists(self, queue_id: str) -> bool:
        return self.message_path(queue_id).exists()

    def remove(self, queue_id: str, *, message_only: bool = False) -> None:
        """Forget a message (delivered, given up or deleted).

        The message file goes first: once it is gone the entry no longer exists,
        whatever happens to its state and journal.  The directory is not fsynced:
        if a crash undoes the unlink, the message is delivered again with the
        same idempotency key (at least once), which is the documented guarantee.
        ``message_only``: the caller knows there is no state or journal file.
        """
        paths = [self.message_path(queue_id)]
        if not message_only:
            paths += [self._state_path(queue_id), self._journal_path(queue_id)]
        for path in paths:
            try:
                path.unlink()
            except FileNotFoundError:
                pass

    def remove_many(self, queue_ids: list[str]) -> None:
        """:meth:`remove` for messages known to have no state or journal file;
        errors are ignored (such a message is delivered again after a restart)."""
        for queue_id in queue_ids:
            try:
                spoolfiles.remove_message(self.messages, self.message_path(queue_id).name)
            except OSError:
                pass

    def quarantine(self, queue_id: str) -> None:
        """Move a corrupt entry (and its state files) aside, out of the queue."""
        for path in (self.message_path(queue_id), self._state_path(queue_id), self._journal_path(queue_id)):
            try:
                os.replace(path, self.corrupt / path.name)
            except FileNotFoundError:
                pass
        fsync_directory(self.corrupt)

    def ids(self) -> list[str]:
        """Queue ids of the stored messages, oldest first (ids sort by arrival)."""
        return sorted(name for name in os.listdir(self.messages) if is_queue_id(name))

    # -- state and journal -------------------------------------------------------

    def read_state(self, queue_id: str) -> EntryState:
        """The stored state; a fresh one when there is none or it is unreadable
        (a state file is advisory: losing it only means an earlier retry)."""
        try:
            return EntryState.from_json(self._state_path(queue_id).read_bytes())
        except FileNotFoundError:
            return EntryState()
        except CorruptEntry:
            log.warn("queue entry {queue_id}: unreadable state file, starting afresh", queue_id=queue_id)
            return EntryState()

    def write_state(self, queue_id: str, state: EntryState) -> None:
        write_atomically(self._state_path(queue_id), state.to_json(), mode=0o600)

    def read_journal(self, queue_id: str) -> dict[str, JournalRecord]:
        """Accepted requests by key.  A torn last line (crash while appending) is ignored:
        that request was not yet acknowledged as recorded, so it is sent again."""
        try:
            data = self._journal_path(queue_id).read_bytes()
        except FileNotFoundError:
            return {}
        records: dict[str, JournalRecord] = {}
        for line in data.split(b"\n"):
            try:
                record = JournalRecord.from_json(line)
            except (ValueError, KeyError, TypeError, AttributeError):
                continue
            records[record.key] = record
        return records

    def append_journal(self, queue_id: str, record: JournalRecord) -> None:
        """Record an accepted request durably before the next request is sent."""
        line = record.to_json()
        path = self._journal_path(queue_id)
        new = not path.exists()
        # A leading newline ends a torn line a crash may have left behind.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, b"\n" + line.encode("ascii") + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        if new:
            fsync_directory(self.messages)

    # -- start-up ----------------------------------------------------------------

    def recover(self) -> Recovered:
        """Start-up: remove temporaries, quarantine corrupt entries, list the rest.

        A temporary file was never acknowledged (the rename comes before the
        250), so removing it loses nothing a client was promised.  State and
        journal files whose message is gone are leftovers of a removal
        interrupted by a crash.
        """
        self.create()
        found = Recovered()
        for name in os.listdir(self.tmp):
            try:
                (self.tmp / name).unlink(missing_ok=True)
            except OSError as e:
                log.warn("queue: cannot remove {path}: {error}", path=str(self.tmp / name), error=str(e))
                continue
            found.temporaries_removed += 1
        names = set(os.listdir(self.messages))
        for name in sorted(names):
            if is_queue_id(name):
                try:
                    envelope, _ = self.load(name)
                except CorruptEntry as e:
                    log.error(
                        "queue entry {queue_id} failed its integrity check ({reason}): moved to {folder}",
                        queue_id=name,
                        reason=str(e),
                        folder=str(self.corrupt),
                    )
                    self.quarantine(name)
                    found.quarantined.append(name)
                    continue
                except OSError as e:
                    # One unreadable file (permissions, I/O error) must not keep the
                    # whole queue closed: it stays where it is for the operator.
                    log.error(
                        "queue entry {queue_id} cannot be read ({error}): left in place, not delivered",
                        queue_id=name,
                        error=str(e),
                    )
                    continue
                found.entries.append((envelope, self.read_state(name)))
            elif name.startswith("."):
                (self.messages / name).unlink(missing_ok=True)  # a state file's interrupted replacement
            else:
                base, _, suffix = name.partition(".")
                if suffix in ("state", "journal") and is_queue_id(base):
                    if base not in names:
                        (self.messages / name).unlink(missing_ok=True)
                else:
                    log.warn("queue: ignoring unexpected file {name} in {folder}", name=name, folder=str(self.messages))
        return found

    def entries(self) -> Iterator[tuple[Envelope, EntryState]]:
        """Every readable entry (for listing); corrupt ones are skipped."""
        for queue_id in self.ids():
            try:
                envelope, _ = self.load(queue_id)
            except (CorruptEntry, OSError):
                continue  # damaged, gone meanwhile, or unreadable: the others are still listed
            yield envelope, self.read_state(queue_id)


def headers_of(raw: bytes) -> bytes:
    """The header block of a message (for a DSN's "original headers" part)."""
    end = raw.find(b"\r\n\r\n")
    return raw if end < 0 else raw[: end + 2]


def account_summary(account: Account) -> Mapping[str, Any]:
    """The account's non-secret fields, for the queue CLI."""
    return {"name": account.name, "route": list(account.route)}

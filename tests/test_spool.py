"""The spool: durable writes, JSON envelopes, integrity checks, recovery, journal, lock."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path
from types import MappingProxyType

import pytest

from mailgate import spoolfiles
from mailgate.accounts.account import Account
from mailgate.ids import new_queue_id
from mailgate.model import Controls
from mailgate.spool import (
    CorruptEntry,
    EntryState,
    Envelope,
    JournalRecord,
    Spool,
    SpoolLocked,
    decode_entry,
    encode_entry,
    headers_of,
)

RAW = b"Received: from x\r\nFrom: a@example.com\r\nSubject: hi\r\n\r\nbody\r\n.dot\r\n"
ACCOUNT = Account(
    name="passthrough-0123456789ab",
    route=("main", "backup"),
    provider_settings=MappingProxyType({"main": MappingProxyType({"token": "test-token-not-a-secret"})}),
    allowed_senders=("@example.com",),
    max_recipients=5,
    defaults=MappingProxyType({"X-Mailgate-Tag": "welcome"}),
    delivery_mode="queue",
)


def envelope(queue_id: str | None = None, sender: str = "a@example.com") -> Envelope:
    return Envelope(
        queue_id=queue_id or new_queue_id(),
        arrival=1_700_000_000.25,
        sender=sender,
        recipients=("b@example.org", "c@example.net"),
        account=ACCOUNT,
        controls=Controls(tags=("t1",), metadata=(("k", "v"),), track_opens=True, stream="outbound"),
    )


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    spool = Spool(tmp_path / "queue")
    spool.create()
    return spool


def test_envelope_round_trips_through_json() -> None:
    """Everything delivery needs, passthrough credentials included, survives the JSON envelope."""
    original = envelope()
    data = original.to_json()
    json.loads(data)  # JSON, not pickle
    assert Envelope.from_json(data) == original
    restored = Envelope.from_json(data)
    assert restored.account.provider_settings["main"]["token"] == "test-token-not-a-secret"
    assert restored.controls == original.controls


def test_write_then_load_returns_the_same_message(spool: Spool) -> None:
    """A written entry reads back byte for byte, in its own 0600 file in a 0700 directory."""
    entry = envelope()
    spool.write(entry, RAW)
    assert spool.load(entry.queue_id) == (entry, RAW)
    mode = stat.S_IMODE(os.stat(spool.message_path(entry.queue_id)).st_mode)
    assert mode == 0o600
    assert stat.S_IMODE(os.stat(spool.directory).st_mode) == 0o700
    assert os.listdir(spool.tmp) == []


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[:-1],  # truncated
        lambda data: data[: len(data) // 2],  # torn in the middle
        lambda data: data.replace(b"body", b"BODY"),  # altered content
        lambda data: data.replace(b"b@example.org", b"x@example.org"),  # altered envelope
        lambda data: b"",  # empty
        lambda data: b"GARBAGE" + data,  # foreign file
    ],
)
def test_damaged_entries_fail_the_integrity_check(damage: object) -> None:
    """Any truncation or change is caught by the checksum."""
    data = encode_entry(envelope(), RAW)
    with pytest.raises(CorruptEntry):
        decode_entry(damage(data))  # type: ignore[operator]


def test_failed_write_leaves_nothing_behind(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC while writing raises, and neither a temporary nor an entry remains."""
    real_write = os.write

    def full(fd: int, data: bytes) -> int:
        if len(data) > 100:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full)
    entry = envelope()
    with pytest.raises(OSError) as raised:
        spool.write(entry, RAW * 10)
    assert raised.value.errno == errno.ENOSPC
    assert os.listdir(spool.tmp) == []
    assert spool.ids() == []


def test_failed_directory_fsync_keeps_nothing(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """If the rename cannot be made durable the message is not acknowledged, and it
    does not stay in the queue either (a restart must not deliver what got no 250)."""
    def failing(directory: Path) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(spoolfiles, "fsync_directory", failing)
    with pytest.raises(OSError):
        spool.write(envelope(), RAW)
    assert spool.ids() == [] and os.listdir(spool.tmp) == []


def test_batch_with_a_failed_directory_fsync_keeps_nothing(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch whose renames cannot be made durable is taken back whole, each item
    getting the error."""
    def failing(directory: Path) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(spoolfiles, "fsync_directory", failing)
    errors = spool.write_batch([(envelope(), RAW), (envelope(), RAW)])
    assert [e.errno for e in errors if e is not None] == [errno.EIO, errno.EIO]
    assert spool.ids() == [] and os.listdir(spool.tmp) == []


def test_recovery_requeues_quarantines_and_cleans_up(spool: Spool, logged_errors: object) -> None:
    """Start-up keeps complete entries with their state, moves corrupt ones to
    corrupt/ (logged), deletes temporaries and orphaned state files."""
    good, bad = envelope(), envelope()
    spool.write(good, RAW)
    spool.write_state(good.queue_id, EntryState(attempts=2, next_attempt=123.0, last_error="4.3.0 down"))
    spool.write(bad, RAW)
    path = spool.message_path(bad.queue_id)
    path.write_bytes(path.read_bytes()[:-10])
    (spool.tmp / new_queue_id()).write_bytes(b"half a message")
    orphan = new_queue_id()
    (spool.messages / f"{orphan}.state").write_bytes(b"{}")
    found = spool.recover()
    assert found.entries == [(good, EntryState(attempts=2, next_attempt=123.0, last_error="4.3.0 down"))]
    assert found.quarantined == [bad.queue_id]
    assert found.temporaries_removed == 1
    assert (spool.corrupt / bad.queue_id).exists()
    assert sorted(os.listdir(spool.messages)) == sorted([good.queue_id, f"{good.queue_id}.state"])
    assert os.listdir(spool.tmp) == []
    [event] = logged_errors.take()  # type: ignore[attr-defined]
    assert bad.queue_id in event["queue_id"]


def test_an_unreadable_entry_does_not_keep_the_queue_closed(spool: Spool, logged_errors: object) -> None:
    """An entry that cannot be read (here a directory where a message file should be;
    in life permissions or an I/O error) is logged and left alone; the rest is recovered."""
    good, stuck = envelope(), new_queue_id()
    spool.write(good, RAW)
    spool.message_path(stuck).mkdir()
    (spool.tmp / "leftover-directory").mkdir()
    found = spool.recover()
    assert [e.queue_id for e, _ in found.entries] == [good.queue_id]
    assert spool.message_path(stuck).is_dir()
    [event] = logged_errors.take()  # type: ignore[attr-defined]
    assert event["queue_id"] == stuck


def test_journal_records_accepted_requests_and_survives_a_torn_line(spool: Spool) -> None:
    """Appended records read back; a half-written last line (crash) is ignored, and
    the next append still produces a readable record."""
    entry = envelope()
    spool.write(entry, RAW)
    spool.append_journal(entry.queue_id, JournalRecord("k1", "main", "id-1"))
    with open(spool.messages / f"{entry.queue_id}.journal", "ab") as f:
        f.write(b'{"key": "k2", "prov')
    assert spool.read_journal(entry.queue_id) == {"k1": JournalRecord("k1", "main", "id-1")}
    spool.append_journal(entry.queue_id, JournalRecord("k3", "main", "id-3"))
    assert set(spool.read_journal(entry.queue_id)) == {"k1", "k3"}


def test_journal_records_whom_each_request_reached_and_reads_older_lines(spool: Spool) -> None:
    """A record keeps the envelope recipients its request delivered to.  A line
    written before records had them, or with a garbled list, is still read (its
    request is not sent again) with the recipients unknown (None), never empty:
    an empty list would mean "reached nobody" only by accident of format."""
    entry = envelope()
    spool.write(entry, RAW)
    spool.append_journal(entry.queue_id, JournalRecord("k1", "main", "id-1", ("Bob@Example.org", "c@example.org")))
    with open(spool.messages / f"{entry.queue_id}.journal", "ab") as f:
        f.write(b'\n{"key": "k2", "provider": "main", "id": "id-2"}\n')  # an earlier version's line
        f.write(b'\n{"key": "k3", "provider": "main", "id": "id-3", "recipients": "c@example.org"}\n')
        f.write(b'\n["not", "a", "record"]\n')
    spool.append_journal(entry.queue_id, JournalRecord("k4", "main", "id-4", ()))
    assert spool.read_journal(entry.queue_id) == {
        "k1": JournalRecord("k1", "main", "id-1", ("Bob@Example.org", "c@example.org")),
        "k2": JournalRecord("k2", "main", "id-2", None),
        "k3": JournalRecord("k3", "main", "id-3", None),
        "k4": JournalRecord("k4", "main", "id-4", ()),
    }
    lines = (spool.messages / f"{entry.queue_id}.journal").read_bytes().split(b"\n")
    assert b'{"key": "k1", "provider": "main", "id": "id-1", "recipients": ["Bob@Example.org", "c@example.org"]}' in lines


def test_remove_deletes_message_state_and_journal(spool: Spool) -> None:
    """A removed entry leaves no file behind."""
    entry = envelope()
    spool.write(entry, RAW)
    spool.write_state(entry.queue_id, EntryState(attempts=1))
    spool.append_journal(entry.queue_id, JournalRecord("k", "main", "id"))
    spool.remove(entry.queue_id)
    assert os.listdir(spool.messages) == []


def test_unreadable_state_means_a_fresh_start(spool: Spool) -> None:
    """A garbled state file costs only the retry time, never the message."""
    entry = envelope()
    spool.write(entry, RAW)
    (spool.messages / f"{entry.queue_id}.state").write_bytes(b"not json")
    assert spool.read_state(entry.queue_id) == EntryState()


def test_non_finite_times_are_rejected(spool: Spool) -> None:
    """NaN or Infinity (which Python's JSON reads) as a time would retry a message
    forever or never: the envelope is corrupt, the state file starts afresh."""
    document = json.loads(envelope().to_json())
    document["arrival"] = float("nan")
    with pytest.raises(CorruptEntry):
        Envelope.from_json(json.dumps(document).encode())
    queue_id = new_queue_id()
    (spool.messages / f"{queue_id}.state").write_text(
        '{"attempts":1,"next_attempt":Infinity,"last_error":null,"last_attempt":null}'
    )
    assert spool.read_state(queue_id) == EntryState()


def test_lock_excludes_a_second_process(spool: Spool, tmp_path: Path) -> None:
    """Two servers on one queue would send everything twice: the second is refused."""
    spool.lock()
    try:
        other = Spool(spool.directory)
        with pytest.raises(SpoolLocked):
            other.lock()
        assert other.locked_by_other()
    finally:
        spool.unlock()
    assert not Spool(spool.directory).locked_by_other()


def test_queue_ids_are_checked_before_use_as_paths(spool: Spool) -> None:
    """A path-like id never reaches the file system."""
    with pytest.raises(ValueError):
        spool.message_path("../../etc/passwd")


def test_headers_of_stops_at_the_blank_line() -> None:
    """The DSN's original-headers part is the header block only."""
    assert headers_of(RAW) == b"Received: from x\r\nFrom: a@example.com\r\nSubject: hi\r\n"

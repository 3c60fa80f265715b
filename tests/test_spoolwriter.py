"""The spool's two write phases: the file operations, the writer process's
protocol, and the process itself (real child processes on the real reactor)."""

from __future__ import annotations

import errno
import os
import signal
import stat
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from mailgate import spoolchild, spoolfiles
from mailgate.spool import Spool
from mailgate.spoolchild import DISCARD, PREPARE, PUBLISH
from mailgate.spoolwriter import ProcessSpoolWriter
from tests.spool_helpers import stand_in_python

NAME, OTHER = "A" * 22, "B" * 22


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    spool = Spool(tmp_path / "queue")
    spool.create()
    return spool


# -- the file operations ---------------------------------------------------------


def test_prepare_then_publish(spool: Spool) -> None:
    """A prepared file is private and not in the queue; published, it is, and the
    prepared name is gone."""
    spoolfiles.prepare_file(spool.tmp, NAME, b"entry")
    assert stat.S_IMODE(os.stat(spool.tmp / NAME).st_mode) == 0o600
    assert spool.ids() == []
    assert spoolfiles.publish_batch(spool.tmp, spool.messages, [NAME]) == [None]
    assert (spool.messages / NAME).read_bytes() == b"entry"
    assert list(spool.tmp.iterdir()) == []


def test_publishing_again_what_a_lost_process_published_succeeds(spool: Spool) -> None:
    """A replay (the process died before answering) finds the file published: done.
    A name never prepared is an error, and publishes nothing."""
    spoolfiles.prepare_file(spool.tmp, NAME, b"entry")
    spoolfiles.publish_batch(spool.tmp, spool.messages, [NAME])
    results = spoolfiles.publish_batch(spool.tmp, spool.messages, [NAME, OTHER])
    assert results[0] is None
    assert isinstance(results[1], FileNotFoundError)
    assert spool.ids() == [NAME]


def test_preparing_again_replaces_a_partial_file(spool: Spool) -> None:
    """A replayed prepare overwrites what a dead process left half written."""
    (spool.tmp / NAME).write_bytes(b"half a mess")
    spoolfiles.prepare_file(spool.tmp, NAME, b"entry")
    assert (spool.tmp / NAME).read_bytes() == b"entry"


def test_discard_removes_the_prepared_file(spool: Spool) -> None:
    spoolfiles.prepare_file(spool.tmp, NAME, b"entry")
    spoolfiles.discard_file(spool.tmp, NAME)
    spoolfiles.discard_file(spool.tmp, NAME)  # again: nothing to do, no error
    assert list(spool.tmp.iterdir()) == []


# -- the protocol ----------------------------------------------------------------


def test_requests_are_decoded_only_when_complete() -> None:
    """Frames split anywhere come out whole, in order, once complete."""
    stream = spoolchild.encode_request(PREPARE, NAME, b"\x00data\xff" * 100) + spoolchild.encode_request(PUBLISH, NAME)
    for cut in range(len(stream) + 1):
        buffer = bytearray(stream[:cut])
        decoded = spoolchild.decode_requests(buffer)
        buffer += stream[cut:]
        decoded += spoolchild.decode_requests(buffer)
        assert decoded == [(PREPARE, NAME, b"\x00data\xff" * 100), (PUBLISH, NAME, b"")]
        assert buffer == bytearray()


def test_replies_round_trip() -> None:
    buffer = bytearray(spoolchild.encode_reply(PUBLISH, NAME, 0) + spoolchild.encode_reply(PREPARE, OTHER, errno.ENOSPC))
    assert spoolchild.decode_replies(buffer) == [(PUBLISH, NAME, 0), (PREPARE, OTHER, errno.ENOSPC)]


def test_one_batch_one_directory_fsync(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every publish read in one batch shares one directory fsync; each request is answered."""
    syncs: list[Any] = []
    real = spoolfiles.fsync_directory
    monkeypatch.setattr(spoolfiles, "fsync_directory", lambda d: (syncs.append(d), real(d)))
    replies: list[bytes] = []
    requests = [(PREPARE, NAME, b"one"), (PREPARE, OTHER, b"two")]
    spoolchild.handle(str(spool.tmp), str(spool.messages), requests, replies.append)
    spoolchild.handle(str(spool.tmp), str(spool.messages), [(PUBLISH, NAME, b""), (PUBLISH, OTHER, b"")], replies.append)
    answered = spoolchild.decode_replies(bytearray(b"".join(replies)))
    assert answered == [(PREPARE, NAME, 0), (PREPARE, OTHER, 0), (PUBLISH, NAME, 0), (PUBLISH, OTHER, 0)]
    assert len(syncs) == 1
    assert sorted(spool.ids()) == [NAME, OTHER]


@pytest.mark.parametrize("name", ["../escape", "a/b", "", "x" * 65])
def test_a_name_that_is_not_a_queue_id_is_refused(spool: Spool, name: str) -> None:
    """The process writes only plain names inside its two directories."""
    replies: list[bytes] = []
    spoolchild.handle(str(spool.tmp), str(spool.messages), [(PREPARE, name, b"x")], replies.append)
    [(_, _, error)] = spoolchild.decode_replies(bytearray(b"".join(replies)))
    assert error == errno.EINVAL
    assert list(spool.tmp.iterdir()) == [] and not (spool.directory / "escape").exists()


def test_errors_are_answered_with_their_errno(spool: Spool) -> None:
    replies: list[bytes] = []
    spoolchild.handle(str(spool.tmp), str(spool.messages), [(PUBLISH, NAME, b""), (DISCARD, NAME, b"")], replies.append)
    answered = spoolchild.decode_replies(bytearray(b"".join(replies)))
    assert sorted(answered) == sorted([(DISCARD, NAME, 0), (PUBLISH, NAME, errno.ENOENT)])


# -- the process -----------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


async def _wait_until(condition: Any, seconds: float = 10.0) -> None:
    for _ in range(int(seconds / 0.01)):
        if condition():
            return
        await _sleep(0.01)
    raise AssertionError("timed out")


def _sleep(seconds: float) -> defer.Deferred[None]:
    d: defer.Deferred[None] = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


@pytest.fixture
def writer(spool: Spool) -> Any:
    writer = ProcessSpoolWriter(spool, reactor)
    writer.startService()
    yield writer
    if writer.running:
        pytest_twisted.blockon(writer.stopService())


@pytest_twisted.ensureDeferred
async def test_process_prepares_and_publishes(writer: ProcessSpoolWriter, spool: Spool) -> None:
    """Both phases through a real writer process; the file is in the queue when the
    commit fires, and stopping ends the process."""
    pid = writer._child.transport.pid
    await writer.prepare(NAME, b"entry" * 1000)
    assert spool.ids() == [] and (spool.tmp / NAME).exists()
    await writer.commit(NAME)
    assert (spool.messages / NAME).read_bytes() == b"entry" * 1000
    await writer.stopService()
    await _wait_until(lambda: not _alive(pid))


@pytest_twisted.ensureDeferred
async def test_process_removes_a_delivered_message(writer: ProcessSpoolWriter, spool: Spool) -> None:
    """remove() takes a delivered message out of the queue; one already gone is no error."""
    await writer.prepare(NAME, b"entry")
    await writer.commit(NAME)
    writer.remove(NAME)
    writer.remove(OTHER)  # never there
    await writer.prepare(OTHER, b"other")  # answered after both removals: the process works in order
    assert spool.ids() == []


@pytest_twisted.ensureDeferred
async def test_a_large_message_goes_through_the_pipe(writer: ProcessSpoolWriter, spool: Spool) -> None:
    """More than a pipe holds (64 KiB): the rest is written as the process reads."""
    data = os.urandom(3 * 1024 * 1024)
    await writer.prepare(NAME, data)
    await writer.commit(NAME)
    assert (spool.messages / NAME).read_bytes() == data


@pytest_twisted.ensureDeferred
async def test_errors_come_back_as_oserror(writer: ProcessSpoolWriter, spool: Spool) -> None:
    """A commit of a message never prepared fails with the process's errno."""
    with pytest.raises(OSError) as raised:
        await writer.commit(NAME)
    assert raised.value.errno == errno.ENOENT


@pytest_twisted.ensureDeferred
async def test_a_killed_process_is_replaced_and_nothing_is_lost(
    writer: ProcessSpoolWriter, spool: Spool, logged_errors: Any
) -> None:
    """kill -9 of the writer process between the phases: the commit is answered
    by a new process, and later messages are written as usual."""
    await writer.prepare(NAME, b"entry")
    first = writer._child.transport.pid
    os.kill(first, signal.SIGKILL)
    await writer.commit(NAME)  # sent to the dead process (not noticed yet), then again to its successor
    assert spool.ids() == [NAME] and writer.replayed == 1
    await writer.prepare(OTHER, b"other")
    await writer.commit(OTHER)
    assert sorted(spool.ids()) == [NAME, OTHER]
    assert writer._child.transport.pid != first and writer.restarts == 1
    assert len(logged_errors.take()) == 1


@pytest_twisted.ensureDeferred
async def test_a_process_that_cannot_work_fails_the_request(spool: Spool, logged_errors: Any) -> None:
    """A writer process that dies at once (here: not Python at all) shows at start-up
    (logged, ``usable`` False for /readyz); each request is tried with two
    processes, then fails with EIO, so its client hears 451."""
    writer = ProcessSpoolWriter(spool, reactor, python="/bin/false")
    writer.startService()
    try:
        await _wait_until(lambda: not writer.usable)
        assert any("cannot run" in str(event.get("log_format")) for event in logged_errors.take())
        with pytest.raises(OSError) as raised:
            await writer.prepare(NAME, b"entry")
        assert raised.value.errno == errno.EIO
        assert list(spool.tmp.iterdir()) == []
    finally:
        await writer.stopService()
    assert logged_errors.take()


def dying_python(directory: Path, dies: str) -> str:
    """The spool writer program, but the process dies (exit 9) just before or just
    after each publish: a crash, or the OOM killer."""
    fault = (
        "publish = spoolfiles.publish_batch\n"
        "def dying(*args):\n"
        f"    if {dies == 'after'!r}:\n"
        "        publish(*args)\n"
        "    os._exit(9)\n"
        "spoolfiles.publish_batch = dying"
    )
    return stand_in_python(directory, f"python-dying-{dies}-publish", fault)


@pytest.mark.parametrize("dies", ["before", "after"])
@pytest_twisted.ensureDeferred
async def test_a_publish_no_process_answered_is_settled_truthfully(
    spool: Spool, tmp_path: Path, logged_errors: Any, dies: str
) -> None:
    """Two writer processes in a row die during the same publish, before or after
    doing it.  Nobody answered, yet the client must not hear 451 for a message a
    restart would deliver: the publish is settled in the thread pool with the same
    idempotent call, and the message is in the queue either way."""
    writer = ProcessSpoolWriter(spool, reactor, python=dying_python(tmp_path, dies))
    writer.startService()
    try:
        await writer.prepare(NAME, b"entry")
        await writer.commit(NAME)
        assert spool.ids() == [NAME] and (spool.messages / NAME).read_bytes() == b"entry"
        assert writer.restarts == 2 and writer.replayed == 1
    finally:
        await writer.stopService()
    assert len(logged_errors.take()) == 2


@pytest_twisted.ensureDeferred
async def test_stop_signals_leave_the_process_working(writer: ProcessSpoolWriter, spool: Spool) -> None:
    """SIGTERM, SIGINT and SIGHUP to the whole group (systemd's stop, Ctrl-C) must not
    end the writer before the server has finished: it stops when its input closes."""
    await writer.prepare(NAME, b"entry")
    pid = writer._child.transport.pid
    for stop in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        os.kill(pid, stop)
    await _sleep(0.2)
    await writer.commit(NAME)
    assert spool.ids() == [NAME]
    assert writer._child.transport.pid == pid and writer.restarts == 0


@pytest_twisted.ensureDeferred
async def test_a_process_started_before_the_spool_was_locked_hands_over(writer: ProcessSpoolWriter, spool: Spool) -> None:
    """The state directory appeared after start-up: the writer process began without
    the spool lock.  Once the server holds it, the next request goes to a new
    process that holds it too."""
    await writer.prepare(NAME, b"entry")
    first = writer._child.transport.pid
    spool.lock()
    await writer.commit(NAME)
    assert writer._child.transport.pid != first
    spool.unlock()
    assert Spool(spool.directory).locked_by_other()
    await writer.stopService()
    await _wait_until(lambda: not Spool(spool.directory).locked_by_other())
    assert spool.ids() == [NAME]


@pytest_twisted.ensureDeferred
async def test_stopping_lets_the_process_finish_what_it_read(writer: ProcessSpoolWriter, spool: Spool) -> None:
    """At shutdown the process answers the requests already sent, then exits."""
    prepared = writer.prepare(NAME, b"entry")
    await writer.stopService()
    await prepared
    assert (spool.tmp / NAME).read_bytes() == b"entry"
    # Stopped: no new process.  A publish is still settled truthfully (in the
    # thread pool); anything else fails.
    await writer.commit(NAME)
    assert spool.ids() == [NAME]
    with pytest.raises(OSError) as raised:
        await writer.commit(OTHER)
    assert raised.value.errno == errno.ENOENT
    with pytest.raises(OSError) as raised:
        await writer.prepare(OTHER, b"other")
    assert raised.value.errno == errno.ESHUTDOWN


@pytest_twisted.ensureDeferred
async def test_the_process_exits_when_the_server_dies(spool: Spool, tmp_path: Path) -> None:
    """The server killed with -9 closes the pipe: the writer process sees the end of
    its input and exits, instead of lingering next to the restarted server."""
    import subprocess
    import textwrap

    script = tmp_path / "server.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys
            sys.path.insert(0, {str(Path(spoolfiles.__file__).resolve().parent.parent)!r})
            from twisted.internet import reactor
            from mailgate.spool import Spool
            from mailgate.spoolwriter import ProcessSpoolWriter
            writer = ProcessSpoolWriter(Spool({str(spool.directory)!r}), reactor)
            def started():
                writer.startService()
                print(writer._child.transport.pid, flush=True)
            reactor.callWhenRunning(started)
            reactor.run()
            """
        )
    )
    server = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        child = int(server.stdout.readline())
        assert _alive(child)
        server.kill()
        server.wait(10)
        await _wait_until(lambda: not _alive(child))
    finally:
        server.kill()
        server.wait(10)
        server.stdout.close()


@pytest_twisted.ensureDeferred
async def test_the_process_holds_the_spool_lock_while_it_lives(spool: Spool) -> None:
    """A server restarted after a crash must not recover the spool while the old
    writer process may still publish: the process holds the lock until it exits."""
    spool.lock()
    writer = ProcessSpoolWriter(spool, reactor)
    writer.startService()
    await writer.prepare(NAME, b"entry")  # answered: the process runs its program (fork and exec are over)
    spool.unlock()  # the server is gone; its writer is not
    try:
        assert Spool(spool.directory).locked_by_other()
    finally:
        await writer.stopService()
    await _wait_until(lambda: not Spool(spool.directory).locked_by_other())

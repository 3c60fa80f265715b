"""Tests for `mailgate queue` (mailgate.cli): on the files when no server runs, and
through the control socket of a running queue (real UNIX socket, real reactor)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, threads

from mailgate import cli
from mailgate.accounts.account import Account
from mailgate.dispatch import Dispatcher, Route
from mailgate.providers.webhook import WebhookProvider
from mailgate.queue import QueueRunner
from mailgate.queuecontrol import ControlService
from mailgate.retry import RetryPolicy
from mailgate.spool import EntryState, Envelope, Spool

from .test_queue import ScriptedTransport, status

RAW = b"Received: from x\r\nFrom: a@example.com\r\nSubject: queued one\r\n\r\nbody\r\n"
IDS = ("AAAAAAAAAAAAAAAAAAAAAA", "BBBBBBBBBBBBBBBBBBBBBB")
SECRET = "test-token-not-a-secret"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def make_queue(state_dir: Path, arrival: float) -> Path:
    """A queue with one fresh and one deferred message."""
    state_dir.mkdir(exist_ok=True)
    spool = Spool(state_dir / "queue")
    spool.create()
    account = Account(name="alice", route=("main",), provider_settings={"main": {"token": SECRET}})
    for queue_id in IDS:
        spool.write(Envelope(queue_id, arrival, "a@example.com", ("b@example.org",), account), RAW)
    spool.write_state(IDS[1], EntryState(attempts=3, next_attempt=arrival + 600, last_error="4.3.0 API unavailable (HTTP 503) (main)"))
    return state_dir


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    """A queue with one fresh and one deferred message, no server running."""
    return make_queue(tmp_path / "state", 1_700_000_000.0)


def test_list_shows_state_attempts_next_attempt_and_last_error(state_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Without a server, list reads the files: one line per message, the last error under it."""
    code, out, err = run(capsys, "queue", "list", "--state-dir", str(state_dir))
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:5] == ["ID", "STATE", "ARRIVED", "(UTC)", "TRIES"]
    assert lines[1].split()[:2] == [IDS[0], "queued"]
    assert lines[2].split()[:2] == [IDS[1], "deferred"] and "2023-11-14 22:23:20" in lines[2]
    assert lines[3].strip() == "last error: 4.3.0 API unavailable (HTTP 503) (main)"
    assert lines[-1] == "2 messages"
    assert SECRET not in out


def test_list_skips_an_unreadable_entry(state_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """One unreadable file (here a directory named like a message) does not hide the rest."""
    (state_dir / "queue" / "messages" / ("Q" * 22)).mkdir()
    code, out, err = run(capsys, "queue", "list", "--state-dir", str(state_dir))
    assert code == 0, err
    assert out.splitlines()[-1] == "2 messages"


def test_list_json_and_config_lookup(state_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--config finds the queue through [server] state_dir (relative to the file); --json is machine-readable."""
    config = tmp_path / "mailgate.toml"
    config.write_text('[server]\nstate_dir = "state"\n')
    code, out, _ = run(capsys, "queue", "list", "--config", str(config), "--json")
    assert code == 0
    assert [entry["id"] for entry in json.loads(out)] == list(IDS)
    assert SECRET not in out


def test_show_prints_envelope_state_and_headers(state_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """show prints the delivery state and the message's headers, never the account's credentials."""
    code, out, _ = run(capsys, "queue", "show", IDS[1], "--state-dir", str(state_dir))
    assert code == 0
    assert "attempts:     3" in out and "Subject: queued one" in out and "body" not in out
    assert SECRET not in out


def test_retry_delete_offline(state_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """retry clears the saved retry time; delete removes the message's files."""
    spool = Spool(state_dir / "queue")
    code, out, _ = run(capsys, "queue", "retry", IDS[1], "--state-dir", str(state_dir))
    assert code == 0 and "tried as soon as mailgate starts" in out
    assert spool.read_state(IDS[1]).next_attempt is None
    assert run(capsys, "queue", "delete", IDS[0], "--state-dir", str(state_dir))[0] == 0
    assert spool.ids() == [IDS[1]]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("show", "../../etc"), "is not a queue id"),
        (("delete", "CCCCCCCCCCCCCCCCCCCCCC"), "no message CCCCCCCCCCCCCCCCCCCCCC in the queue"),
        (("flush",), "mailgate is not running"),
        (("retry",), "one of the arguments"),
    ],
)
def test_errors_are_one_line(state_dir: Path, capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], message: str) -> None:
    """Bad ids, unknown messages and impossible requests are one clear line, exit 2."""
    code, out, err = run(capsys, "queue", *argv, "--state-dir", str(state_dir))
    assert (code, out) == (2, "")
    assert err.startswith("mailgate: error: ") and message in err and len(err.splitlines()) == 1


@pytest_twisted.ensureDeferred
async def test_commands_go_through_the_running_server(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """While a server holds the queue, the CLI asks it: list shows the live state,
    retry and flush make it deliver now, delete removes through it; the files are
    never edited behind its back."""
    state_dir = make_queue(tmp_path / "state", time.time())
    transport = ScriptedTransport(status(503), status(503))
    spool = Spool(state_dir / "queue")
    spool.lock()
    dispatcher = Dispatcher({"main": Route(WebhookProvider("main", {"url": "https://api.example/v1"}), transport)}, ("main",), reactor)
    runner = QueueRunner(spool, dispatcher, reactor, RetryPolicy(), hostname="mx.example.net")
    runner.startService()  # the fresh message is attempted: 503, deferred
    control = ControlService(runner, spool.control_path, reactor)
    control.startService()
    try:
        assert os.stat(spool.control_path).st_mode & 0o777 == 0o600

        async def cli_run(*argv: str) -> tuple[int, str, str]:
            return await threads.deferToThread(run, capsys, "queue", *argv, "--state-dir", str(state_dir))

        code, out, err = await cli_run("list", "--json")
        assert code == 0, err
        listed = {entry["id"]: entry for entry in json.loads(out)}
        assert listed[IDS[0]]["state"] == "deferred" and listed[IDS[0]]["attempts"] == 1
        assert listed[IDS[1]]["state"] == "deferred" and listed[IDS[1]]["attempts"] == 3
        code, out, _ = await cli_run("retry", IDS[0])
        assert out.strip() == f"{IDS[0]}: scheduled for immediate delivery"
        assert runner.describe(IDS[0])[0]["attempts"] == 2  # tried again at once (503 again)
        code, _, _ = await cli_run("delete", IDS[0])
        assert code == 0 and spool.ids() == [IDS[1]]
        code, out, _ = await cli_run("flush")
        assert (code, out.strip()) == (0, "flushed: 1 delivered")
        assert spool.ids() == []
        assert len(transport.sent) == 3  # the first attempt, the retry, the flush
    finally:
        await control.stopService()
        runner.stopService()


def test_control_protocol_refuses_bad_requests() -> None:
    """Malformed lines, bad or unknown ids and unknown commands get a one-line JSON error."""
    from twisted.internet.protocol import Factory
    from twisted.internet.testing import StringTransport

    from mailgate.queuecontrol import ControlProtocol

    class NoEntries:
        def __contains__(self, queue_id: str) -> bool:
            return queue_id == IDS[0]

    answers = []
    for line in (b"not json", b'{"command": "show", "id": "../x"}', b'{"command": "show", "id": "%s"}' % IDS[1].encode(),
                 b'{"command": "hold", "id": "%s"}' % IDS[0].encode()):
        factory = Factory.forProtocol(ControlProtocol)
        factory.runner = NoEntries()  # type: ignore[attr-defined]
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(line + b"\n")
        answers.append(json.loads(transport.value()))
        assert transport.disconnecting
    assert [a["error"] for a in answers] == [
        "malformed request",
        "not a queue id",
        f"no message {IDS[1]} in the queue",
        "unknown command 'hold'",
    ]


def test_control_socket_that_cannot_be_bound_is_logged_not_fatal(tmp_path: Path, logged_errors: Any) -> None:
    """A state directory too deep for a UNIX socket path costs the CLI its access to
    the running server, not the server its start."""
    from twisted.internet.error import CannotListenError
    from twisted.internet.testing import MemoryReactor

    class Refusing(MemoryReactor):
        def listenUNIX(self, *args: Any, **kwargs: Any) -> Any:
            raise CannotListenError(None, "x" * 120, OSError("AF_UNIX path too long"))

    class Open:
        def when_open(self, callback: Any) -> None:
            callback()

    control = ControlService(Open(), tmp_path / "control.sock", Refusing())
    control.startService()
    [event] = logged_errors.take()
    assert "AF_UNIX path too long" in event["error"]
    assert control.stopService() is None

"""Operating a real ``twistd``/``twist`` process: JSON logs, and SIGHUP reloading the
certificate, the accounts and the providers while a session stays open; a broken
configuration on SIGHUP is refused and the running one kept."""

from __future__ import annotations

import json
import signal
import smtplib
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.logger import eventFromJSON, formatEvent

from .conftest import PASSWORDS
from .test_reload import BOB_PASSWORD, add_account, open_session, reissue
from .test_twistd import TWISTD, run_env

TWIST = [sys.executable, "-c", "from twisted.application.twist._twist import Twist; Twist.main()"]
WAIT = 90.0  # seconds; generous, the machine may be loaded.


class ProcessLog:
    """Reads a gateway's JSON log records as they come, from a thread."""

    def __init__(self, process: subprocess.Popen[str]):
        self.process = process
        self.events: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def close(self) -> None:
        """After the process ended: read the rest, release the pipe."""
        self._reader.join(timeout=WAIT)
        assert self.process.stdout is not None
        self.process.stdout.close()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._changed:
                self.raw.append(line)
                text = line.lstrip("\x1e").strip()
                if text.startswith("{"):
                    self.events.append(eventFromJSON(text))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], what: str, after: int = 0) -> dict[str, Any]:
        """The first event from index ``after`` on that satisfies ``predicate``."""
        deadline = time.monotonic() + WAIT
        with self._changed:
            while True:
                for event in self.events[after:]:
                    if predicate(event):
                        return event
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.process.poll() is not None:
                    raise AssertionError(f"no log event: {what}\n" + "".join(self.raw[-30:]))
                self._changed.wait(remaining)

    def text(self) -> str:
        with self._changed:
            return "".join(self.raw)


def starts(prefix: str) -> Callable[[dict[str, Any]], bool]:
    return lambda event: formatEvent(event).startswith(prefix)


def write_config(directory: Path, captured: str = "captured", certificate: str = "fullchain.pem") -> Path:
    path = directory / "mailgate.toml"
    path.write_text(
        f"""
[server]
hostname = "localhost"
state_dir = "state"

[tls]
certificate = "{certificate}"
private_key = "privkey.pem"

[[listeners]]
endpoint = "tcp:0:interface=127.0.0.1"
role = "submission"

[accounts]
store = "file"
path = "accounts.toml"

[providers.capture]
type = "capture"
folder = "{captured}"
"""
    )
    return path


# The certificate each test directory started with, and a context trusting it.
FIRST_CERTIFICATE: dict[Path, tuple[bytes, ssl.SSLContext]] = {}


@pytest.fixture
def gateway_dir(tmp_path: Path) -> Iterator[Path]:
    FIRST_CERTIFICATE[tmp_path] = reissue(tmp_path)
    write_config(tmp_path)
    add_account(tmp_path, "alice", PASSWORDS["alice"])
    yield tmp_path
    del FIRST_CERTIFICATE[tmp_path]


def start(command: list[str], directory: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*command, "mailgate", "--config", str(directory / "mailgate.toml")],
        cwd=directory,
        env=run_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.fixture
def twistd_json(gateway_dir: Path) -> Iterator[tuple[subprocess.Popen[str], ProcessLog]]:
    process = start([*TWISTD, "--logger", "mailgate.logging.json_observer", "-n", "--pidfile="], gateway_dir)
    log = ProcessLog(process)
    try:
        yield process, log
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.close()


def port_of(log: ProcessLog, listener: str) -> int:
    event = log.wait_for(lambda e: e.get("listener") == listener and "address" in e, f"listener {listener}")
    return int(event["address"].rsplit(":", 1)[1])


def serving(port: int) -> None:
    """Wait until the reactor runs (a greeting comes back): only then are signals handled."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example", timeout=WAIT) as client:
        client.noop()


def captured(directory: Path, folder: str) -> list[Path]:
    return sorted((directory / folder).glob("*.json"))


def test_sighup_reloads_certificate_accounts_and_providers(
    gateway_dir: Path, twistd_json: tuple[subprocess.Popen[str], ProcessLog]
) -> None:
    """SIGHUP: new connections get the new certificate and the new account logs in, a
    session opened before it still sends, and messages follow the new provider settings;
    then a configuration naming a missing certificate is refused and the running one kept."""
    process, log = twistd_json
    port = port_of(log, "submission")
    old_leaf, old_context = FIRST_CERTIFICATE[gateway_dir]
    open_before, shown = open_session(port, old_context, "alice", PASSWORDS["alice"])
    try:
        assert shown == old_leaf
        new_leaf, new_context = reissue(gateway_dir)
        add_account(gateway_dir, "bob", BOB_PASSWORD)
        write_config(gateway_dir, captured="captured-after-reload")
        mark = len(log.events)
        process.send_signal(signal.SIGHUP)
        log.wait_for(starts("configuration reloaded"), "the reload", after=mark)

        new_session, shown = open_session(port, new_context, "bob", BOB_PASSWORD)
        assert shown == new_leaf != old_leaf
        assert new_session.sendmail("a@example.com", ["b@example.org"], b"Subject: new\r\n\r\nx\r\n") == {}
        new_session.quit()
        assert open_before.sendmail("a@example.com", ["b@example.org"], b"Subject: old\r\n\r\nx\r\n") == {}
    finally:
        open_before.close()
    documents = [json.loads(path.read_text())["body"] for path in captured(gateway_dir, "captured-after-reload")]
    assert sorted((d["account"], d["subject"]) for d in documents) == [("alice", "old"), ("bob", "new")]
    assert captured(gateway_dir, "captured") == []

    write_config(gateway_dir, certificate="missing.pem")
    mark = len(log.events)
    process.send_signal(signal.SIGHUP)
    refused = log.wait_for(starts("reload refused"), "the refused reload", after=mark)
    assert formatEvent(refused) == (
        "reload refused, the running configuration stays in use: "
        f"TLS certificate {gateway_dir}/missing.pem: cannot read: No such file or directory"
    )
    again, shown = open_session(port, new_context, "bob", BOB_PASSWORD)
    assert shown == new_leaf
    again.quit()

    process.send_signal(signal.SIGTERM)
    process.wait(timeout=30)
    output = log.text()
    assert "Traceback" not in output
    for secret in (PASSWORDS["alice"], BOB_PASSWORD):
        assert secret not in output


def test_twistd_json_log_is_one_record_per_line(twistd_json: tuple[subprocess.Popen[str], ProcessLog]) -> None:
    """With --logger mailgate.logging.json_observer every line twistd writes is one JSON
    record (no RFC 7464 separator), readable by twisted.logger."""
    process, log = twistd_json
    serving(port_of(log, "submission"))
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=30)
    log.close()
    lines = log.text().split("\n")[:-1]
    assert lines and all(line.startswith("{") and json.loads(line) for line in lines)
    assert "Server Shut Down." in [formatEvent(eventFromJSON(line)) for line in lines]


def test_twist_log_format_json(gateway_dir: Path) -> None:
    """``twist --log-format json mailgate`` writes Twisted's JSON records, each after an
    ASCII RS (RFC 7464), with mailgate's structured fields."""
    process = start([*TWIST, "--log-format", "json"], gateway_dir)
    try:
        log = ProcessLog(process)
        event = log.wait_for(lambda e: e.get("listener") == "submission", "the listener line")
        assert event["address"].startswith("127.0.0.1:")
        serving(port_of(log, "submission"))
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        log.close()
    records = log.text().split("\n")[:-1]
    assert records and all(line.startswith("\x1e{") for line in records)

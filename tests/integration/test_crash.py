"""Durability with a real process: ``kill -9`` at random moments while a real client
streams messages, and SIGTERM with sessions in progress.

The promise under test (ARCHITECTURE.md §3): every message that got a 250 reaches
the API, at least once, and any duplicate carries the same idempotency key.  A
message that did not get a 250 may or may not arrive (the client still has it).
"""

from __future__ import annotations

import itertools
import os
import random
import re
import signal
import smtplib
import socket
import subprocess
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import reactor, task, threads

from mailgate.testing import FakeEmailAPI

from .test_twistd import TWISTD, run_env

ROUNDS = 20
PORT_LINE = re.compile(r"listener \S+ on 127\.0\.0\.1:(\d+)")
SUBJECT = re.compile(r"crash-(\d+)")


def write_config(directory: Path, api_url: str) -> Path:
    (directory / "accounts.toml").write_text("")
    (directory / "state").mkdir(exist_ok=True)
    config = directory / "mailgate.toml"
    config.write_text(
        f"""
[server]
hostname = "localhost"
state_dir = "{directory / 'state'}"
shutdown_grace = 10

[[listeners]]
endpoint = "tcp:0:interface=127.0.0.1"
role = "relay"
trusted_networks = ["127.0.0.1/32"]

[delivery]
mode = "queue"
api_timeout = 5

[queue]
first_retry = "0.5s"
max_retry_interval = "1s"

[accounts]
store = "file"
path = "accounts.toml"

[providers.api]
type = "webhook"
url = "{api_url}/v1/emails"
"""
    )
    return config


class Server:
    """``twistd -n mailgate`` in its own process; its SMTP port is read from its log."""

    def __init__(self, config: Path, log: Path):
        self.log = log
        self.handle = open(log, "wb")
        self.process = subprocess.Popen(
            [*TWISTD, "-n", "--pidfile=", "mailgate", "--config", str(config)],
            stdout=self.handle,
            stderr=subprocess.STDOUT,
            env=run_env(),
        )
        self.port = 0

    def wait_for_port(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = PORT_LINE.search(self.log.read_text(errors="replace"))
            if match:
                self.port = int(match.group(1))
                return self.port
            if self.process.poll() is not None:
                raise AssertionError(f"mailgate exited:\n{self.log.read_text()}")
            time.sleep(0.05)
        raise AssertionError(f"mailgate did not start within {timeout} s:\n{self.log.read_text()}")

    def stop(self, sig: int) -> int:
        self.process.send_signal(sig)
        code = self.process.wait(timeout=60)
        self.handle.close()
        return code


def message(number: int) -> bytes:
    return (
        f"From: app@example.com\r\nTo: user@example.org\r\nSubject: crash-{number}\r\n"
        f"Message-ID: <crash-{number}@example.com>\r\n\r\nmessage number {number}\r\n"
    ).encode()


def stream(port: int, numbers: Any, acknowledged: set[int], stop: threading.Event) -> None:
    """Send messages one after another on one connection until the server goes away."""
    try:
        with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example", timeout=30) as client:
            while not stop.is_set():
                number = next(numbers)
                client.sendmail("app@example.com", ["user@example.org"], message(number))
                acknowledged.add(number)  # sendmail returned: the reply was 250
    except (smtplib.SMTPException, OSError):
        return


def sleep(seconds: float) -> Any:
    return task.deferLater(reactor, seconds, lambda: None)


@pytest_twisted.ensureDeferred
async def test_kill_9_never_loses_an_acknowledged_message(tmp_path: Path) -> None:
    """20 rounds: start mailgate, stream messages from two clients, kill -9 at a
    random moment; finally restart once more and let the queue drain.  Every 250
    reached the API; duplicates share their idempotency key; nothing was corrupt."""
    api = FakeEmailAPI()
    await api.start(reactor)
    config = write_config(tmp_path, api.url)
    numbers = itertools.count()
    acknowledged: set[int] = set()
    chance = random.Random()
    try:
        for round_number in range(ROUNDS):
            server = Server(config, tmp_path / f"round-{round_number}.log")
            port = await threads.deferToThread(server.wait_for_port)
            if round_number == 0:  # the server runs its spool writer process (see the end)
                deadline = time.monotonic() + 10
                while not writer_processes(tmp_path) and time.monotonic() < deadline:
                    await sleep(0.05)
                assert len(writer_processes(tmp_path)) == 1
            stop = threading.Event()
            clients = [threads.deferToThread(stream, port, numbers, acknowledged, stop) for _ in range(2)]
            await sleep(chance.uniform(0.05, 0.8))
            assert server.stop(signal.SIGKILL) == -signal.SIGKILL
            stop.set()
            for client in clients:
                await client
        assert len(acknowledged) >= ROUNDS  # the clients did get messages through

        server = Server(config, tmp_path / "final.log")
        await threads.deferToThread(server.wait_for_port)
        deadline = time.monotonic() + 120
        while not acknowledged <= delivered_numbers(api) and time.monotonic() < deadline:
            await sleep(0.1)
        assert server.stop(signal.SIGTERM) == -signal.SIGTERM
        # No spool writer process outlived its server (each saw its pipe close).
        deadline = time.monotonic() + 10
        while writer_processes(tmp_path) and time.monotonic() < deadline:
            await sleep(0.1)
        assert writer_processes(tmp_path) == []
    finally:
        await api.stop()

    missing = acknowledged - delivered_numbers(api)
    assert not missing, f"acknowledged but never delivered: {sorted(missing)}"
    keys: dict[int, set[str]] = defaultdict(set)
    for request in api.requests:
        keys[subject_number(request)].add(request.headers["idempotency-key"])
    assert all(len(k) == 1 for k in keys.values()), {n: k for n, k in keys.items() if len(k) > 1}
    assert os.listdir(tmp_path / "state" / "queue" / "corrupt") == []
    assert "Traceback" not in (tmp_path / "final.log").read_text()


def writer_processes(directory: Path) -> list[int]:
    """Live (not zombie) spool writer processes working on ``directory``'s spool."""
    marker = str(directory / "state" / "queue" / "tmp").encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue  # gone meanwhile
        if b"mailgate.spoolchild" in command and marker in command and state != "Z":
            found.append(int(entry.name))
    return found


def delivered_numbers(api: FakeEmailAPI) -> set[int]:
    return {subject_number(request) for request in api.requests}


def subject_number(request: Any) -> int:
    match = SUBJECT.search(request.json()["subject"])
    assert match, request.json()["subject"]
    return int(match.group(1))


def read_reply(sock: socket.socket) -> list[str]:
    """Read one complete (possibly multi-line) reply."""
    data = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            return data.decode().splitlines()
        data += chunk
        lines = data.decode().splitlines()
        if data.endswith(b"\r\n") and lines and lines[-1][3:4] == " ":
            return lines


def expect(sock: socket.socket, command: bytes, code: str) -> list[str]:
    sock.sendall(command)
    lines = read_reply(sock)
    assert lines and lines[-1].startswith(code), (command, lines)
    return lines


def rest_of_stream(sock: socket.socket) -> str:
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data.decode()


@pytest_twisted.ensureDeferred
async def test_sigterm_finishes_data_and_refuses_the_rest(tmp_path: Path) -> None:
    """SIGTERM with one session in DATA and one idle: the idle one hears 421 4.3.2,
    the one in DATA finishes and gets its 250 (then 421), the process exits
    cleanly, and the message is delivered after the next start."""
    api = FakeEmailAPI()
    await api.start(reactor)
    config = write_config(tmp_path, api.url)
    try:
        server = Server(config, tmp_path / "first.log")
        port = await threads.deferToThread(server.wait_for_port)

        def scenario() -> tuple[str, str, int]:
            busy = socket.create_connection(("127.0.0.1", port), timeout=30)
            idle = socket.create_connection(("127.0.0.1", port), timeout=30)
            with busy, idle:
                read_reply(busy)
                read_reply(idle)
                expect(busy, b"EHLO client.example\r\n", "250")
                expect(idle, b"EHLO client.example\r\n", "250")
                expect(busy, b"MAIL FROM:<app@example.com>\r\n", "250")
                expect(busy, b"RCPT TO:<user@example.org>\r\n", "250")
                expect(busy, b"DATA\r\n", "354")
                busy.sendall(b"From: app@example.com\r\nSubject: crash-1\r\n")
                # Let the server read the partial message before it is told to stop.
                time.sleep(0.5)
                server.process.send_signal(signal.SIGTERM)
                idle_said = rest_of_stream(idle)
                busy.sendall(b"\r\nlast words\r\n.\r\n")
                busy_said = rest_of_stream(busy)
            return idle_said, busy_said, server.process.wait(timeout=60)

        idle_said, busy_said, code = await threads.deferToThread(scenario)
        server.handle.close()
        assert idle_said == "421 4.3.2 Service shutting down, try again later\r\n"
        assert re.fullmatch(
            r"250 2\.0\.0 Ok: queued as [A-Z2-7]{22}\r\n421 4\.3\.2 Service shutting down, try again later\r\n",
            busy_said,
        ), busy_said
        assert code == -signal.SIGTERM
        first_log = (tmp_path / "first.log").read_text()
        assert "Traceback" not in first_log and "Server Shut Down." in first_log

        server = Server(config, tmp_path / "second.log")
        await threads.deferToThread(server.wait_for_port)
        while delivered_numbers(api) != {1}:
            await api.next_request()
        assert server.stop(signal.SIGTERM) == -signal.SIGTERM
        # No spool writer process outlived its server (each saw its pipe close).
        deadline = time.monotonic() + 10
        while writer_processes(tmp_path) and time.monotonic() < deadline:
            await sleep(0.1)
        assert writer_processes(tmp_path) == []
    finally:
        await api.stop()

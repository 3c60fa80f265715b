"""Session limits over a real loopback socket: a client that never reads its replies.

Without back-pressure a client can send pipelined commands forever while never
reading the answers: the replies pile up in the server's send buffer (and the
close that would end the session waits forever to flush them).  The session is
a streaming producer on its transport: once the send buffer is full it stops
answering and stops reading, so the client's own sends block instead.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, task, threads

from mailgate import smtp

from .conftest import Gateway, file_store_gateway

FLOOD_BYTES = 20 * 1024 * 1024
CHUNK = b"NOOP\r\n" * (64 * 1024 // 6)
BOUND = 4 * 1024 * 1024  # Far above what back-pressure lets through, far below the flood.


def _read_reply(sock: socket.socket) -> bytes:
    """Read until a final reply line ("ddd " ... CRLF)."""
    data = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"closed after {data!r}")
        data += chunk
        lines = data.split(b"\r\n")
        if len(lines) > 1 and lines[-2][3:4] == b" ":
            return data


def _flood(port: int) -> tuple[socket.socket, int]:
    """EHLO, then pipelined NOOPs without ever reading; returns (socket, bytes sent)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    assert _read_reply(sock).startswith(b"220 ")
    sock.sendall(b"EHLO client.example\r\n")  # EHLO must end a pipelined group.
    assert b"PIPELINING" in _read_reply(sock)
    sock.settimeout(3)  # Blocked this long means the server has stopped reading.
    sent = 0
    try:
        while sent < FLOOD_BYTES:
            sock.sendall(CHUNK)
            sent += len(CHUNK)
    except TimeoutError:
        pass
    return sock, sent


@pytest_twisted.async_yield_fixture
async def flood_gateway(tmp_path: Path, tls_files: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A gateway whose junk-command limit (which would end a NOOP flood early) is out of the way."""
    async for running in file_store_gateway(tmp_path, tls_files, monkeypatch, limits="max_junk_commands = 100000000"):
        yield running


def _greeting(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        return _read_reply(sock)


def _send_buffer(transport: Any) -> int:
    """Bytes a tcp.Connection still holds for its peer (twisted.internet.abstract.FileDescriptor)."""
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


@pytest_twisted.ensureDeferred
async def test_client_that_never_reads_is_throttled(flood_gateway: Gateway, monkeypatch: Any) -> None:
    """~20 MB of pipelined NOOPs from a client that reads nothing: the server stops
    reading once its send buffer is full, so neither its send buffer nor its input
    buffer grows with the flood, and other clients are still served."""
    sessions: list[smtp.SMTPSession] = []
    original = smtp.SMTPSession.connectionMade

    def recording(self: smtp.SMTPSession) -> None:
        sessions.append(self)
        original(self)

    monkeypatch.setattr(smtp.SMTPSession, "connectionMade", recording)
    port = flood_gateway.ports["relay"]
    sock, sent = await threads.deferToThread(_flood, port)
    try:
        await task.deferLater(reactor, 0.2, lambda: None)
        session = sessions[0]
        assert not session._closing
        assert sent < FLOOD_BYTES, "the server kept reading from a client that reads nothing"
        assert _send_buffer(session.transport) < BOUND
        assert len(session._buffer) < BOUND
        assert session._producer_paused
        greeting = await threads.deferToThread(_greeting, port)
        assert greeting.startswith(b"220 localhost ESMTP mailgate")
    finally:
        sock.close()
    # The flooding client leaves without reading: the server notices and cleans up.
    for _ in range(100):
        if session._connection_lost:
            break
        await task.deferLater(reactor, 0.05, lambda: None)
    assert session._connection_lost

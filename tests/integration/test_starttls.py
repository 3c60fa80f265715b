"""STARTTLS command injection (CVE-2011-0411 class) over a real socket and real TLS."""

from __future__ import annotations

import socket
import ssl

import pytest_twisted
from twisted.internet import threads

from .conftest import Gateway


def inject_after_starttls(port: int, context: ssl.SSLContext) -> tuple[bytes, bytes]:
    """Pipeline RSET in the STARTTLS packet; return the reply to STARTTLS and the first
    bytes the server sends inside TLS after the client's EHLO."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        reader = raw.makefile("rb")
        reader.readline()  # 220 greeting
        raw.sendall(b"EHLO client.example\r\n")
        while not reader.readline().startswith(b"250 "):
            pass
        raw.sendall(b"STARTTLS\r\nRSET\r\nMAIL FROM:<a@example.com>\r\n")
        ready = reader.readline()
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"EHLO client.example\r\n")
            first = tls.recv(4096)
            tls.sendall(b"QUIT\r\n")
        return ready, first


@pytest_twisted.ensureDeferred
async def test_commands_pipelined_after_starttls_are_discarded(gateway: Gateway) -> None:
    """Commands sent in the STARTTLS packet are never answered inside TLS: the first
    encrypted reply is the new EHLO's, and AUTH is now on offer (state was reset)."""
    ready, first = await threads.deferToThread(inject_after_starttls, gateway.ports["submission"], gateway.ssl_context())
    assert ready == b"220 2.0.0 Ready to start TLS\r\n"
    assert first.startswith(b"250-localhost greets client.example")
    assert b"Reset state" not in first and b"Sender ok" not in first
    assert b"AUTH PLAIN LOGIN CRAM-MD5" in first

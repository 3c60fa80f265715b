"""STARTTLS and TLS (SECURITY.md): injection, forgotten state, protocol and cipher policy.

TLS clients with unusual settings (old protocol versions, CBC suites, rare
curves, renegotiation) are pyOpenSSL connections over a plain blocking socket,
so the client offers exactly what the test says even where Python's ssl
module would refuse to.
"""

from __future__ import annotations

import select
import socket
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
from cryptography.hazmat.bindings.openssl.binding import Binding
from OpenSSL import SSL

from .invariants import Closed, Invariants, RawClient

STARTTLS_ROLES = ["submission", "relay"]


def _tls_ready_socket(inv: Invariants, role: str) -> tuple[RawClient, socket.socket]:
    """A TCP socket at the point where the client starts its TLS handshake."""
    if role == "submissions":
        client = inv.client(role, handshake=False)
        return client, client.sock
    client = inv.client(role)
    client.ehlo()
    assert client.cmd("STARTTLS") == "220 2.0.0 Ready to start TLS"
    return client, client.sock


def _blocking(connection: SSL.Connection, method: Callable[..., Any], *args: Any) -> Any:
    """Call a pyOpenSSL method on a socket with a timeout, waiting while it would block."""
    sock = connection.fileno()
    while True:
        try:
            return method(*args)
        except SSL.WantReadError:
            readable, _, _ = select.select([sock], [], [], 30)
            assert readable, "no answer from the server within 30 s"
        except SSL.WantWriteError:
            select.select([], [sock], [], 30)


def _handshake(sock: socket.socket, configure: Callable[[SSL.Context], None]) -> SSL.Connection:
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    configure(context)
    connection = SSL.Connection(context, sock)
    connection.set_connect_state()
    connection.set_tlsext_host_name(b"localhost")
    _blocking(connection, connection.do_handshake)
    return connection


def _smtp_over(connection: SSL.Connection, role: str) -> bytes:
    """Greeting (implicit TLS) or nothing, then the EHLO reply, read over ``connection``."""
    data = b""
    if role == "submissions":
        while not data.endswith(b"\r\n"):
            data += _blocking(connection, connection.recv, 4096)
    _blocking(connection, connection.sendall, b"EHLO client.example\r\n")
    while not data.endswith(b"\r\n") or b"250 " not in data:
        data += _blocking(connection, connection.recv, 4096)
    return data


def _tls12(context: SSL.Context) -> None:
    context.set_max_proto_version(SSL.TLS1_2_VERSION)


def _tls13(context: SSL.Context) -> None:
    context.set_min_proto_version(SSL.TLS1_3_VERSION)


def _tls11(context: SSL.Context) -> None:
    context.set_min_proto_version(SSL.TLS1_VERSION)
    context.set_max_proto_version(SSL.TLS1_1_VERSION)
    context.set_cipher_list(b"DEFAULT:@SECLEVEL=0")


def _cbc_only(context: SSL.Context) -> None:
    context.set_max_proto_version(SSL.TLS1_2_VERSION)
    context.set_cipher_list(
        b"ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES256-SHA384:"
        b"ECDHE-RSA-AES128-SHA:AES128-SHA:AES256-SHA256"
    )


def _rsa_key_exchange_only(context: SSL.Context) -> None:
    context.set_max_proto_version(SSL.TLS1_2_VERSION)
    context.set_cipher_list(b"AES128-GCM-SHA256:AES256-GCM-SHA384")


def _groups(names: bytes) -> Callable[[SSL.Context], None]:
    def configure(context: SSL.Context) -> None:
        assert Binding.lib.SSL_CTX_set1_curves_list(context._context, names) == 1

    return configure


@pytest.mark.parametrize("role", STARTTLS_ROLES)
@pytest_twisted.ensureDeferred
async def test_commands_pipelined_with_starttls_are_discarded(inv: Invariants, role: str) -> None:
    """RSET and MAIL sent in the STARTTLS packet are never answered inside TLS (CVE-2011-0411)."""

    def attack() -> tuple[str, list[str]]:
        client = inv.client(role)
        client.ehlo()
        client.send(b"STARTTLS\r\nRSET\r\nMAIL FROM:<mallory@example.com>\r\n")
        ready = client.reply()[-1]
        client._pending = b""  # What a careless client would have buffered: nothing, here.
        client.sock = inv.gateway.ssl_context().wrap_socket(client.sock, server_hostname="localhost")
        return ready, client.ehlo()

    ready, ehlo = await inv.attack(attack)
    assert ready == "220 2.0.0 Ready to start TLS"
    assert ehlo[0].startswith("250-localhost greets client.example")
    assert "250 AUTH PLAIN LOGIN CRAM-MD5" in ehlo
    await inv.check(delivered=0, role=role)


@pytest.mark.parametrize("role", STARTTLS_ROLES)
@pytest_twisted.ensureDeferred
async def test_state_before_starttls_is_forgotten(inv: Invariants, role: str) -> None:
    """EHLO (and, on the relay, an accepted MAIL) from before STARTTLS do not survive it."""

    def attack() -> list[str]:
        client = inv.client(role)
        client.ehlo()
        if role == "relay":
            assert client.cmd("MAIL FROM:<alice@example.com>").startswith("250 ")
        client.starttls()
        return [
            client.cmd("RCPT TO:<bob@example.org>"),
            client.cmd("MAIL FROM:<alice@example.com>"),
            client.cmd(b"AUTH PLAIN AGFsaWNlAHg="),
        ]

    assert await inv.attack(attack) == [
        "503 5.5.1 Need MAIL before RCPT",
        "503 5.5.1 Send EHLO/HELO first",
        "503 5.5.1 Send EHLO/HELO first",
    ]
    await inv.check(delivered=0, role=role)


@pytest.mark.parametrize(
    ("role", "reply"),
    [
        ("submission", "503 5.5.1 TLS already active"),
        ("relay", "503 5.5.1 TLS already active"),
        ("submissions", "503 5.5.1 TLS already active"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_starttls_inside_tls(inv: Invariants, role: str, reply: str) -> None:
    """STARTTLS twice, or on the implicit-TLS port, is refused; the session goes on."""

    def attack() -> tuple[str, str]:
        client = inv.client(role)
        client.ehlo()
        if role != "submissions":
            client.starttls()
            client.ehlo()
        return client.cmd("STARTTLS"), client.cmd("NOOP")

    assert await inv.attack(attack) == (reply, "250 2.0.0 Ok")
    await inv.check(delivered=0, role=role)


@pytest.mark.parametrize("role", STARTTLS_ROLES)
@pytest_twisted.ensureDeferred
async def test_starttls_with_argument(inv: Invariants, role: str) -> None:
    """STARTTLS takes no argument (RFC 3207 §4): 501 5.5.4, and the session stays plaintext."""

    def attack() -> tuple[str, str]:
        client = inv.client(role)
        client.ehlo()
        return client.cmd("STARTTLS now"), client.cmd("NOOP")

    assert await inv.attack(attack) == ("501 5.5.4 Syntax error in parameters or arguments", "250 2.0.0 Ok")
    await inv.check(delivered=0, role=role)


@pytest_twisted.ensureDeferred
async def test_submission_without_tls_refuses_mail(inv: Invariants) -> None:
    """On the submission port, MAIL before STARTTLS is 530 5.7.0 (RFC 3207 §4, RFC 6409)."""

    def attack() -> str:
        client = inv.client("submission")
        client.ehlo()
        return client.cmd("MAIL FROM:<alice@example.com>")

    assert await inv.attack(attack) == "530 5.7.0 Must issue a STARTTLS command first"
    await inv.check(delivered=0, role="submission")


@pytest.mark.parametrize("role", STARTTLS_ROLES)
@pytest_twisted.ensureDeferred
async def test_plaintext_instead_of_handshake(inv: Invariants, role: str) -> None:
    """A client that answers 220 Ready with plaintext commands gets no SMTP reply, only
    a failed handshake and a closed connection."""

    def attack() -> bytes:
        client, sock = _tls_ready_socket(inv, role)
        sock.sendall(b"EHLO client.example\r\nMAIL FROM:<mallory@example.com>\r\n")
        received = b""
        while True:
            try:
                data = sock.recv(4096)
            except OSError:
                break
            if not data:
                break
            received += data
        return received

    received = await inv.attack(attack)
    assert b"250" not in received
    await inv.check(delivered=0, role=role)


@pytest.mark.parametrize(
    "junk",
    [b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", b"\x16\x03\x01\x00\x05hello", b"\x00" * 4096, bytes(range(256)) * 8],
    ids=["http", "bad-record", "zeros", "all-octets"],
)
@pytest_twisted.ensureDeferred
async def test_junk_instead_of_client_hello(inv: Invariants, junk: bytes) -> None:
    """Non-TLS bytes on the implicit-TLS port: the connection is closed, nothing logged."""

    def attack() -> bytes:
        client = inv.client("submissions", handshake=False)
        client.sock.sendall(junk)
        received = b""
        while True:
            try:
                data = client.sock.recv(4096)
            except OSError:
                break
            if not data:
                break
            received += data
        return received

    assert b"220" not in await inv.attack(attack)
    await inv.check(delivered=0, role="submissions")


@pytest.mark.parametrize(
    "configure",
    [_tls12, _tls13],
    ids=["tls1.2", "tls1.3"],
)
@pytest_twisted.ensureDeferred
async def test_modern_clients_connect(inv: Invariants, role: str, configure: Any) -> None:
    """Control for the refusals below: the same client code succeeds with TLS 1.2 and 1.3."""

    def attack() -> bytes:
        _, sock = _tls_ready_socket(inv, role)
        connection = _handshake(sock, configure)
        try:
            return _smtp_over(connection, role)
        finally:
            sock.close()

    assert b"250-localhost greets client.example" in await inv.attack(attack)
    await inv.check(delivered=0, role=role)


@pytest.mark.parametrize(
    "configure",
    [_tls11, _cbc_only, _rsa_key_exchange_only, _groups(b"X448:secp521r1")],
    ids=["tls1.1", "cbc-suites", "rsa-key-exchange", "x448-p521-groups"],
)
@pytest_twisted.ensureDeferred
async def test_weak_tls_is_refused(inv: Invariants, role: str, configure: Any) -> None:
    """Mozilla intermediate: no TLS < 1.2, no CBC suites, no RSA key exchange, only the
    X25519/P-256/P-384 groups; such handshakes fail and nothing is logged."""

    def attack() -> None:
        _, sock = _tls_ready_socket(inv, role)
        try:
            with pytest.raises(SSL.Error):
                _handshake(sock, configure)
        finally:
            sock.close()

    await inv.attack(attack)
    await inv.check(delivered=0, role=role)


@pytest_twisted.ensureDeferred
async def test_client_renegotiation_is_refused(inv: Invariants, role: str) -> None:
    """A TLS 1.2 client asking to renegotiate mid-session (a CPU-exhaustion lever) is refused."""

    def attack() -> None:
        _, sock = _tls_ready_socket(inv, role)
        connection = _handshake(sock, _tls12)
        try:
            _smtp_over(connection, role)
            assert connection.renegotiate()
            with pytest.raises(SSL.Error, match="no renegotiation"):
                _blocking(connection, connection.do_handshake)
        finally:
            sock.close()

    await inv.attack(attack)
    await inv.check(delivered=0, role=role)


@pytest_twisted.ensureDeferred
async def test_client_leaves_mid_handshake(inv: Invariants, role: str) -> None:
    """The first half of a ClientHello, then a reset: nothing logged, nothing left behind."""

    def attack() -> None:
        _, sock = _tls_ready_socket(inv, role)
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        connection = SSL.Connection(context, None)
        connection.set_connect_state()
        try:
            connection.do_handshake()
        except SSL.WantReadError:
            pass
        hello = connection.bio_read(65536)
        sock.sendall(hello[: len(hello) // 2])
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()  # RST

    await inv.attack(attack)
    await inv.check(delivered=0, role=role)


@pytest_twisted.ensureDeferred
async def test_tls_truncated_mid_data(inv: Invariants, role: str) -> None:
    """The TCP connection dropped under TLS (no close_notify) in the middle of DATA: nothing delivered."""

    def attack() -> None:
        client = inv.client(role)
        client.prepare()
        client.transaction()
        client.send(b"Subject: cut\r\n\r\nhalf a message\r\n")
        client.close()  # SSLSocket.close sends no close_notify: a truncation.

    await inv.attack(attack)
    await inv.check(delivered=0, role=role)


@pytest.mark.parametrize("role", STARTTLS_ROLES)
@pytest_twisted.ensureDeferred
async def test_auth_after_starttls_needs_a_new_ehlo(inv: Invariants, role: str) -> None:
    """After STARTTLS the client must greet again before AUTH (RFC 3207 §4.2)."""

    def attack() -> str:
        client = inv.client(role)
        client.ehlo()
        client.starttls()
        try:
            return client.login()
        except Closed:
            return "closed"

    assert await inv.attack(attack) == "503 5.5.1 Send EHLO/HELO first"
    await inv.check(delivered=0, role=role)

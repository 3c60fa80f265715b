"""Connections and timing (SECURITY.md): per-client limits, load shedding, timeouts, lifetimes.

127.0.0.1, 127.0.0.2 and 127.0.0.3 play different client hosts.  Timing cases
run on a gateway with timeouts of a second or two; every wait in the test
itself is for an event (a reply, a close) with a generous socket timeout.
"""

from __future__ import annotations

import select
import socket
import time

import pytest
import pytest_twisted
from OpenSSL import SSL

from mailgate.testing import ScriptedResponse

from .invariants import Closed, Invariants, RawClient

LIMITS = "exempt_networks = []\nmax_connections_per_ip = 3\nmax_sessions = 4\n"
TIMING = LIMITS + "command_timeout = 1.5\ndata_timeout = 1.5\ntls_handshake_timeout = 1.5\nsession_lifetime = 3\n"


@pytest.fixture
def gateway_limits() -> str:
    return LIMITS


def _refused(client: RawClient) -> list[str]:
    return client.greeting + client.read_until_closed()


@pytest_twisted.ensureDeferred
async def test_too_many_connections_from_one_client(inv: Invariants, role: str) -> None:
    """The 4th concurrent connection from one address gets 421 4.7.0 and is closed; another
    address still connects; once one closes, the first address may connect again."""

    def attack() -> tuple[list[str], list[str], list[str]]:
        held = [inv.client(role) for _ in range(3)]
        assert all(c.greeting == ["220 localhost ESMTP mailgate"] for c in held)
        refused = _refused(inv.client(role))
        other = inv.client(role, source="127.0.0.2").greeting
        held[0].quit()
        for _ in range(100):  # The server notices the close; wait for it, then retry.
            again = inv.client(role)
            if again.greeting[0].startswith("220 "):
                break
            time.sleep(0.05)
        return refused, other, again.greeting

    refused, other, again = await inv.attack(attack)
    assert refused == ["421 4.7.0 Too many connections from your address, try again later"]
    assert other == ["220 localhost ESMTP mailgate"]
    assert again == ["220 localhost ESMTP mailgate"]
    await inv.check(delivered=0, role=role)


@pytest.mark.parametrize("gateway_limits", [LIMITS + "max_connection_rate_per_ip = 5"])
@pytest_twisted.ensureDeferred
async def test_connection_rate_per_client(inv: Invariants, role: str) -> None:
    """Five connections a minute from one address are served; the sixth gets 421 4.7.0;
    another address is not affected."""

    def attack() -> tuple[list[list[str]], list[str]]:
        greetings = []
        for _ in range(6):
            client = inv.client(role)
            greetings.append(client.greeting)
            client.quit()
        return greetings, inv.client(role, source="127.0.0.2").greeting

    greetings, other = await inv.attack(attack)
    assert greetings == [["220 localhost ESMTP mailgate"]] * 5 + [
        ["421 4.7.0 Connection rate limit exceeded for your address, try again later"]
    ]
    assert other == ["220 localhost ESMTP mailgate"]
    await inv.check(delivered=0, role=role, alive_source="127.0.0.2")


@pytest_twisted.ensureDeferred
async def test_load_shed_at_connect_when_sessions_are_full(inv: Invariants, role: str) -> None:
    """With max_sessions (4) sessions open, a new client gets 421 4.7.0 at once, while
    the open sessions carry on and deliver."""

    def attack() -> tuple[list[str], list[str]]:
        held = [inv.client(role, source=source) for source in ("127.0.0.1", "127.0.0.1", "127.0.0.2", "127.0.0.2")]
        refused = _refused(inv.client(role, source="127.0.0.3"))
        held[0].prepare()
        verdict = held[0].message()
        for client in held:
            client.quit()
        return refused, [verdict]

    refused, verdicts = await inv.attack(attack)
    assert refused == ["421 4.7.0 Server busy, try again later"]
    assert verdicts[0].startswith("250 ")
    await inv.check(delivered=1, role=role)


@pytest.mark.parametrize("gateway_limits", [LIMITS + "max_deliveries_in_flight = 1"])
@pytest_twisted.ensureDeferred
async def test_load_shed_at_connect_while_deliveries_wait(inv: Invariants, role: str) -> None:
    """While max_deliveries_in_flight messages wait for the API, new connections get 421
    4.7.0, and the waiting transaction is not disturbed (it gets its own 451)."""
    inv.gateway.api.respond(ScriptedResponse(hang=True))

    def attack() -> tuple[list[str], str]:
        waiting = inv.client(role)
        waiting.prepare()
        waiting.transaction()
        waiting.send(b"Subject: slow\r\n\r\nhi\r\n.\r\n")
        for _ in range(600):
            if inv.gateway.api.requests:
                break
            time.sleep(0.01)
        refused = _refused(inv.client(role, source="127.0.0.2"))
        return refused, waiting.reply()[-1]

    refused, verdict = await inv.attack(attack)
    assert refused == ["421 4.7.0 Server busy, try again later"]
    assert verdict.startswith("451 4.4.1 ")
    await inv.check(delivered=1, role=role)  # The API saw the request once; the client retries.


@pytest.mark.parametrize("gateway_limits", [TIMING])
@pytest_twisted.ensureDeferred
async def test_silent_client_times_out(inv: Invariants, role: str) -> None:
    """A client that says nothing after the greeting (or after EHLO) gets 421 4.4.2 and is closed."""

    def attack() -> list[str]:
        client = inv.client(role)
        client.ehlo()
        return client.read_until_closed()

    assert await inv.attack(attack) == ["421 4.4.2 Timeout exceeded, closing connection"]
    await inv.check(delivered=0, role=role)


def _silent_before_handshake(inv: Invariants, role: str, send: bytes) -> bytes:
    if role == "submissions":
        client = inv.client(role, handshake=False)
    else:
        client = inv.client(role)
        client.ehlo()
        assert client.cmd("STARTTLS") == "220 2.0.0 Ready to start TLS"
    client.sock.sendall(send)
    received = b""
    while True:
        try:
            data = client.sock.recv(4096)  # Socket timeout (30 s) fails the test if never closed.
        except ConnectionResetError:
            return received  # Aborted: the server does not wait for a lingering close.
        if not data:
            return received
        received += data


@pytest.mark.parametrize("gateway_limits", [TIMING])
@pytest_twisted.ensureDeferred
async def test_silent_client_before_tls_handshake(inv: Invariants, role: str) -> None:
    """Connect (or STARTTLS) and never start the handshake: closed after tls_handshake_timeout."""
    assert await inv.attack(_silent_before_handshake, inv, role, b"") == b""
    await inv.check(delivered=0, role=role)


@pytest.mark.parametrize("gateway_limits", [TIMING])
@pytest_twisted.ensureDeferred
async def test_partial_client_hello(inv: Invariants, role: str) -> None:
    """Half a ClientHello and then silence: closed after tls_handshake_timeout."""
    connection = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), None)
    connection.set_connect_state()
    try:
        connection.do_handshake()
    except SSL.WantReadError:
        pass
    hello = connection.bio_read(65536)
    await inv.attack(_silent_before_handshake, inv, role, hello[: len(hello) // 2])
    await inv.check(delivered=0, role=role)


@pytest.mark.parametrize("gateway_limits", [TIMING])
@pytest_twisted.ensureDeferred
async def test_noop_just_under_the_timeout_forever(inv: Invariants, role: str) -> None:
    """A NOOP every second (under the 1.5 s idle timeout) cannot hold a session open:
    the session lifetime (3 s) ends it with 421 4.4.2."""

    def attack() -> list[str]:
        client = inv.client(role)
        client.ehlo()
        replies = []
        try:
            for _ in range(60):
                client.send(b"NOOP\r\n")
                replies.extend(client.reply())
                time.sleep(0.5)
        except (Closed, OSError):
            pass
        return replies

    replies = await inv.attack(attack)
    assert set(replies[:-1]) == {"250 2.0.0 Ok"}
    assert replies[-1] == "421 4.4.2 Session lifetime exceeded, closing connection"
    await inv.check(delivered=0, role=role)


@pytest.mark.parametrize("gateway_limits", [TIMING])
@pytest_twisted.ensureDeferred
async def test_slowloris_data(inv: Invariants, role: str) -> None:
    """Message data trickled one octet at a time, each under the data timeout, is cut off
    by the session lifetime; nothing is delivered."""

    def attack() -> list[str]:
        client = inv.client(role)
        client.prepare()
        client.transaction()
        try:
            for octet in b"Subject: slow\r\n\r\n" + b"x" * 100:
                client.send(bytes([octet]))
                readable, _, _ = select.select([client.sock], [], [], 0.1)
                if readable:
                    break  # The server has spoken (and closed).
        except OSError:
            pass
        return client.read_until_closed()

    assert await inv.attack(attack) == ["421 4.4.2 Session lifetime exceeded, closing connection"]
    await inv.check(delivered=0, role=role)


@pytest.mark.parametrize("how", ["close", "reset", "half-close"])
@pytest_twisted.ensureDeferred
async def test_client_leaves_mid_data(inv: Invariants, role: str, how: str) -> None:
    """A client that closes, resets or half-closes its connection in the middle of 600 KB
    of DATA: nothing is delivered and the spooled data is discarded."""

    def attack() -> None:
        client = inv.client(role)
        client.prepare()
        client.transaction()
        client.send(b"Subject: unfinished\r\n\r\n" + (b"z" * 998 + b"\r\n") * 600)
        if how == "reset":
            raw = client.sock
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        elif how == "half-close":
            client.sock.shutdown(socket.SHUT_WR)
            client.read_until_closed()
        client.close()

    await inv.attack(attack)
    await inv.check(delivered=0, role=role)

"""The session's side of admission control and of the adversarial-hardening limits.

Sessions share one :class:`mailgate.admission.Admission` (as build.py wires
them) over StringTransport and a Clock.
"""

from __future__ import annotations

import dataclasses

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import address, defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransportWithDisconnection

from mailgate.admission import Admission
from mailgate.config import LimitsConfig
from mailgate.message import MessageParseError, MessageTooLarge
from mailgate.outcome import Delivered
from mailgate.smtp import SMTPSessionFactory
from tests.smtp_helpers import MESSAGE, FakeDeliverer, authed_client, connect, make_policy, plain, stuff, tls_client

OK = "250 2.0.0 Ok: prov-1"


def shared(**limits: object) -> Admission:
    return Admission(dataclasses.replace(LimitsConfig(exempt_networks=()), **limits), Clock())


def test_refused_at_connect_with_421_and_closed() -> None:
    """A client over its concurrent-session limit gets one 421 line and is closed; the
    refused session is not counted, so closing it frees nothing twice."""
    gate = shared(max_connections_per_ip=1)
    first = connect(admission=gate, peer="203.0.113.5")
    refused = connect(
        admission=gate,
        peer="203.0.113.5",
        greeting="421 4.7.0 Too many connections from your address, try again later",
    )
    assert refused.closed  # The transport has already reported connectionLost.
    assert gate.sessions == 1 and gate.connections_from("203.0.113.5") == 1
    other = connect(admission=gate, peer="203.0.113.6")  # the session keys on transport.getPeer()
    assert other.code("NOOP") == "250 2.0.0 Ok"
    first.session.connectionLost(None)
    other.session.connectionLost(None)
    assert gate.sessions == 0 and gate.connections_from("203.0.113.5") == 0


def test_refused_implicit_tls_session_leaves_no_timers() -> None:
    """On the implicit-TLS port too a refused session is closed at once and leaves no timers."""
    gate = shared(max_sessions=1)
    connect("submissions", admission=gate)
    refused = connect("submissions", admission=gate, peer="198.51.100.1", greeting="421 4.7.0 Server busy, try again later")
    assert refused.closed
    assert refused.clock.getDelayedCalls() == []
    assert gate.sessions == 1


def test_auth_throttled_across_sessions() -> None:
    """Failures in earlier sessions block AUTH from that client (slowly, then 421 and
    close, without checking the password); another client still logs in."""
    gate = shared(max_auth_failures_per_ip=2)
    for _ in range(2):
        client = tls_client(admission=gate, auth_failure_delay=1.0)
        client.ehlo()
        client.send(b"AUTH PLAIN " + plain("alice", "wrong") + b"\r\n")
        client.clock.advance(1)
        assert client.replies() == ["535 5.7.8 Authentication credentials invalid"]
    blocked = tls_client(admission=gate, auth_failure_delay=1.0)
    blocked.ehlo()
    assert blocked.send(b"AUTH PLAIN " + plain("alice", "s3cret") + b"\r\n") == []
    blocked.clock.advance(3.0)  # auth_failure_delay x max_auth_failures
    assert blocked.replies() == ["421 4.7.0 Too many authentication failures from your address, try again later"]
    assert blocked.closed
    elsewhere = tls_client(admission=gate, peer="192.0.2.99")
    elsewhere.ehlo()
    elsewhere.login()


def test_junk_commands_limited_between_messages() -> None:
    """100 commands that move no mail are fine; the 101st ends the session; an accepted
    message starts the count again."""
    client = authed_client()  # EHLO counted once
    for _ in range(98):
        assert client.code("NOOP") == "250 2.0.0 Ok"
    assert client.message() == [OK]
    for _ in range(100):
        assert client.code("RSET") == "250 2.0.0 Reset state"
    assert client.cmd("VRFY x") == ["421 4.7.0 Too many commands without a message, closing connection"]
    assert client.closed


def test_duplicate_recipients_are_junk() -> None:
    """Repeating one recipient is accepted (RFC 5321 §3.3) but counts toward the junk limit."""
    client = authed_client(max_junk_commands=5)
    client.cmd("MAIL FROM:<alice@example.com>")
    replies = [client.code("RCPT TO:<bob@example.net>") for _ in range(6)]
    assert replies[:5] == ["250 2.1.5 Recipient ok"] * 5
    assert replies[5] == "421 4.7.0 Too many commands without a message, closing connection"


def test_bdat_closes_the_session() -> None:
    """BDAT (CHUNKING is not offered) ends the session: its data would be read as commands."""
    client = authed_client()
    assert client.send(b"BDAT 12 LAST\r\nMAIL FROM:<\r\n") == [
        "554 5.5.1 CHUNKING is not offered: BDAT data would be read as commands, closing connection"
    ]
    assert client.closed


def test_deliveries_in_flight_are_counted() -> None:
    """A message counts as in flight from the final dot to its verdict, whatever the verdict."""
    gate = shared()
    client = authed_client(admission=gate, deliverer=FakeDeliverer(outcome=None))
    client.transaction()
    client.send(stuff(MESSAGE) + b".\r\n")
    assert gate.deliveries == 1
    client.deliverer.calls[0].deferred.callback(Delivered("p", "x"))
    assert client.replies() == ["250 2.0.0 Ok: x"] and gate.deliveries == 0
    client.transaction()
    client.send(stuff(MESSAGE) + b".\r\n")
    client.transport.loseConnection()
    client.session.connectionLost(None)
    client.deliverer.calls[1].deferred.callback(Delivered("p", "y"))
    assert gate.deliveries == 0 and gate.sessions == 0


def test_parser_refusals_are_counted_out_and_answered_precisely() -> None:
    """A size refusal from the parser is 552 5.3.4, a structure refusal 554 5.6.0, each
    with its reason; neither leaves a delivery counted in flight."""
    gate = shared()
    errors = iter([MessageTooLarge("header field larger than 65536 octets"), MessageParseError("too deep")])

    def parse(*args: object) -> defer.Deferred[object]:
        return defer.fail(next(errors))

    client = authed_client(admission=gate, parse=parse)
    assert client.message() == [
        "552 5.3.4 Message size exceeds fixed maximum message size: header field larger than 65536 octets"
    ]
    assert client.message() == ["554 5.6.0 Message could not be parsed: too deep"]
    assert gate.deliveries == 0


def test_stopping_server_answers_4_3_2_even_when_busy() -> None:
    """During shutdown a new connection hears 421 4.3.2 (not the load-shedding 4.7.0),
    is not counted as a session and takes none of its client's connection-rate budget."""
    gate = shared(max_sessions=1, max_connection_rate_per_ip=1)
    busy = connect(admission=gate, peer="198.51.100.9")
    factory = SMTPSessionFactory(make_policy("submission"), None, FakeDeliverer(), Clock(), None, admission=gate)
    factory.shutting_down = True
    session = factory.buildProtocol(None)
    transport = StringTransportWithDisconnection(peerAddress=address.IPv4Address("TCP", "203.0.113.7", 4000))
    transport.protocol = session
    session.makeConnection(transport)
    assert transport.value() == b"421 4.3.2 Service shutting down, try again later\r\n"
    assert gate.sessions == 1 and gate.connections_from("203.0.113.7") == 0
    busy.session.connectionLost(None)
    assert gate.open_session("203.0.113.7") is None  # Its one token per minute is intact.


class SlowPortal:
    """An account store that answers only when the test says so."""

    def __init__(self) -> None:
        self.pending: list[defer.Deferred[object]] = []

    def login(self, credentials: object, mind: object, *interfaces: object) -> defer.Deferred[object]:
        self.pending.append(defer.Deferred())
        return self.pending[-1]


def test_parallel_sessions_share_the_auth_failure_budget() -> None:
    """A guesser's parallel sessions, all sending AUTH while the account store is slow,
    get max_auth_failures_per_ip password checks in all, not one per session."""
    gate = shared(max_auth_failures_per_ip=2)
    portal = SlowPortal()
    clients = [tls_client(admission=gate, auth_failure_delay=1.0) for _ in range(5)]
    for client in clients:
        client.session.portal = portal
        client.ehlo()
        client.send(b"AUTH PLAIN " + plain("alice", "guess") + b"\r\n")
    assert len(portal.pending) == 2
    for pending in portal.pending:
        pending.errback(UnauthorizedLogin())
    for client in clients:
        client.clock.advance(3.0)
    assert [client.replies() for client in clients] == [
        ["535 5.7.8 Authentication credentials invalid"]
    ] * 2 + [["421 4.7.0 Too many authentication failures from your address, try again later"]] * 3

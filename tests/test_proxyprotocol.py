"""PROXY protocol v1/v2: the header parser (tables and properties) and the wrapper that
connects the SMTP session only once the header names the real client (StringTransport,
Clock)."""

from __future__ import annotations

import struct
from ipaddress import ip_network
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.cred.portal import Portal
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransportWithDisconnection
from twisted.logger import LogLevel, globalLogPublisher

from mailgate.accounts.memory import MemoryAccountStore
from mailgate.auth import AccountRealm, AccountStoreChecker
from mailgate.endpoints import listener_endpoint
from mailgate.message import parse_message
from mailgate.proxyprotocol import (
    HEADER_TIMEOUT,
    V2_SIGNATURE,
    InvalidProxyHeader,
    ProxyHeader,
    ProxyProtocolEndpoint,
    ProxyProtocolFactory,
    parse_header,
)
from mailgate.smtp import SMTPSessionFactory
from tests.smtp_helpers import (
    ACCOUNTS,
    HOSTNAME,
    TRUSTED,
    Client,
    FakeDeliverer,
    TLSStringTransport,
    make_policy,
)

BALANCER = IPv4Address("TCP", "127.0.0.1", 51000)
V4 = (IPv4Address("TCP", "198.51.100.7", 40123), IPv4Address("TCP", "203.0.113.1", 25))
V6 = (IPv6Address("TCP", "2001:db8::7", 40123), IPv6Address("TCP", "2001:db8::1", 465))


def v2(command: int = 1, family: int = 0x11, addresses: bytes = b"", tlvs: bytes = b"", version: int = 2) -> bytes:
    body = addresses + tlvs
    return V2_SIGNATURE + bytes([version << 4 | command, family]) + struct.pack("!H", len(body)) + body


V2_TCP4 = v2(addresses=bytes([198, 51, 100, 7, 203, 0, 113, 1]) + struct.pack("!HH", 40123, 25))
V2_TCP6 = v2(
    family=0x21,
    addresses=bytes.fromhex("20010db8000000000000000000000007" "20010db8000000000000000000000001")
    + struct.pack("!HH", 40123, 465),
    tlvs=b"\x01\x00\x02h2",  # An ALPN TLV, to be skipped.
)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (b"PROXY TCP4 198.51.100.7 203.0.113.1 40123 25\r\n", ProxyHeader(*V4)),
        (b"PROXY TCP6 2001:db8::7 2001:db8::1 40123 465\r\n", ProxyHeader(*V6)),
        (b"PROXY TCP6 2001:0db8:0::7 2001:db8::1 40123 465\r\n", ProxyHeader(*V6)),
        (b"PROXY UNKNOWN\r\n", ProxyHeader(None, None)),
        (b"PROXY UNKNOWN ffff:f::1 ffff:f::2 1 2\r\n", ProxyHeader(None, None)),
        (V2_TCP4, ProxyHeader(*V4)),
        (V2_TCP6, ProxyHeader(*V6)),
        (v2(command=0, family=0x11, addresses=b"\0" * 12), ProxyHeader(None, None)),  # LOCAL: health check
        (v2(family=0x00), ProxyHeader(None, None)),  # UNSPEC
    ],
)
def test_valid_headers(header: bytes, expected: ProxyHeader) -> None:
    """Both versions yield the client and the address it connected to; LOCAL, UNKNOWN
    and UNSPEC mean "use the real connection" (the spec's rule)."""
    assert parse_header(header + b"EHLO x\r\n") == (expected, len(header))


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"EHLO client.example\r\n", "no PROXY protocol header"),
        (b"GET / HTTP/1.1\r\n", "no PROXY protocol header"),
        (b"PROXY TCP4 198.51.100.7 203.0.113.1 40123\r\n", "not PROXY TCP4"),
        (b"PROXY TCP5 198.51.100.7 203.0.113.1 40123 25\r\n", "not PROXY TCP4"),
        (b"PROXY  TCP4 198.51.100.7 203.0.113.1 40123 25\r\n", "not PROXY TCP4"),
        (b"PROXY TCP4 2001:db8::7 203.0.113.1 40123 25\r\n", "v1 header"),
        (b"PROXY TCP6 198.51.100.7 2001:db8::1 40123 25\r\n", "v1 header"),
        (b"PROXY TCP4 198.51.100.700 203.0.113.1 40123 25\r\n", "v1 header"),
        (b"PROXY TCP4 198.51.100.7 203.0.113.1 65536 25\r\n", "bad port"),
        (b"PROXY TCP4 198.51.100.7 203.0.113.1 -1 25\r\n", "bad port"),
        (b"PROXY TCP4 198.51.100.7 203.0.113.1 4x 25\r\n", "bad port"),
        (b"PROXY TCP4 198.51.100.\xff 203.0.113.1 1 25\r\n", "v1 header"),
        (b"PROXY TCP4 198.51.100.7\n203.0.113.1 1 25\r\n", "v1 header"),
        (b"PROXY " + b"A" * 120, "longer than 107"),
        (v2(version=1), "version 1"),
        (v2(command=2), "command 2"),
        (v2(family=0x12, addresses=b"\0" * 12), "non-TCP"),  # UDP
        (v2(family=0x31, addresses=b"\0" * 216), "non-TCP"),  # UNIX stream
        (v2(family=0x11, addresses=b"\0" * 11), "too short"),
        (v2(family=0x21, addresses=b"\0" * 12), "too short"),
    ],
)
def test_invalid_headers(data: bytes, reason: str) -> None:
    """Anything but a well-formed header is refused with a reason (never another error)."""
    with pytest.raises(InvalidProxyHeader, match=reason):
        parse_header(data)


@pytest.mark.parametrize("header", [b"PROXY TCP4 198.51.100.7 203.0.113.1 40123 25\r\n", V2_TCP4, V2_TCP6])
def test_every_prefix_asks_for_more(header: bytes) -> None:
    """A header split anywhere is a valid beginning: the parser waits for the rest."""
    for end in range(1, len(header)):
        assert parse_header(header[:end]) is None, end


@given(st.binary(min_size=1, max_size=300))
def test_arbitrary_bytes_never_escape(data: bytes) -> None:
    """Whatever arrives, the parser answers, waits, or refuses: no other exception."""
    try:
        result = parse_header(data)
    except InvalidProxyHeader:
        return
    if result is not None:
        _, length = result
        assert 0 < length <= len(data)


@given(st.binary(max_size=40), st.binary(max_size=40))
def test_v2_with_any_tlvs_and_trailing_bytes(tlvs: bytes, rest: bytes) -> None:
    """TLVs are skipped by length and the bytes after the header are left for SMTP."""
    header = v2(addresses=bytes([198, 51, 100, 7, 203, 0, 113, 1]) + struct.pack("!HH", 40123, 25), tlvs=tlvs)
    assert parse_header(header + rest) == (ProxyHeader(*V4), len(header))


# -- the wrapper ------------------------------------------------------------------------


class Recorder(Protocol):
    def __init__(self, addr: Any) -> None:
        self.addr = addr
        self.made_with_peer: Any = None
        self.received = b""
        self.lost = False

    def connectionMade(self) -> None:
        self.made_with_peer = self.transport.getPeer()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True


class RecordingFactory(Factory):
    def __init__(self, refuse: bool = False) -> None:
        self.built: list[Recorder] = []
        self.refuse = refuse

    def buildProtocol(self, addr: Any) -> Recorder | None:
        if self.refuse:
            return None
        protocol = Recorder(addr)
        self.built.append(protocol)
        return protocol


def wrap(factory: Any, clock: Clock | None = None) -> tuple[Any, StringTransportWithDisconnection, Clock]:
    clock = clock or Clock()
    wrapper = ProxyProtocolFactory(factory, clock).buildProtocol(BALANCER)
    transport = StringTransportWithDisconnection(peerAddress=BALANCER, hostAddress=IPv4Address("TCP", "10.0.0.5", 25))
    transport.protocol = wrapper
    wrapper.makeConnection(transport)
    return wrapper, transport, clock


@pytest.fixture
def info_lines() -> Any:
    from twisted.logger import formatEvent

    seen: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_level") == LogLevel.info and event.get("log_namespace") == "mailgate.proxyprotocol":
            seen.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)


def test_protocol_is_built_for_the_client_after_the_header() -> None:
    """Nothing is connected until the header is complete; then the protocol is built for
    and sees the client's address, and the bytes after the header reach it."""
    factory = RecordingFactory()
    wrapper, transport, _ = wrap(factory)
    wrapper.dataReceived(b"PROXY TCP4 198.51.100.7 203.0")
    assert factory.built == []
    wrapper.dataReceived(b".113.1 40123 25\r\nEHLO client.example\r\n")
    [protocol] = factory.built
    assert protocol.addr == V4[0]
    assert protocol.made_with_peer == V4[0]
    assert wrapper.getHost() == V4[1]
    assert protocol.received == b"EHLO client.example\r\n"
    wrapper.dataReceived(b"QUIT\r\n")
    assert protocol.received.endswith(b"QUIT\r\n")
    transport.loseConnection()
    assert protocol.lost


def test_local_command_uses_the_balancer_address() -> None:
    """A v2 LOCAL header (the balancer's own health check) keeps the real addresses."""
    factory = RecordingFactory()
    wrapper, _, _ = wrap(factory)
    wrapper.dataReceived(v2(command=0))
    assert factory.built[0].made_with_peer == BALANCER


def test_malformed_header_closes_without_a_protocol(info_lines: list[str]) -> None:
    """A client that skips the header is closed with one log line; nothing was built."""
    factory = RecordingFactory()
    wrapper, transport, clock = wrap(factory)
    wrapper.dataReceived(b"EHLO client.example\r\n")
    assert not transport.connected
    assert transport.value() == b""
    assert factory.built == []
    assert clock.getDelayedCalls() == []
    wrapper.dataReceived(b"MAIL FROM:<a@example.com>\r\n")  # Ignored while closing.
    assert factory.built == []
    assert info_lines == [
        "closing connection from 127.0.0.1: no PROXY protocol header (listener expects the PROXY protocol)"
    ]


def test_silent_connection_is_aborted_after_the_timeout(info_lines: list[str]) -> None:
    """No header within HEADER_TIMEOUT: the connection is aborted."""
    factory = RecordingFactory()
    wrapper, transport, clock = wrap(factory)
    wrapper.dataReceived(b"PROXY TCP4")
    clock.advance(HEADER_TIMEOUT - 0.1)
    assert not transport.disconnecting
    clock.advance(0.2)
    assert transport.disconnected
    assert factory.built == []
    assert "no PROXY protocol header within 30 s" in info_lines[0]


def test_close_before_the_header_cancels_the_timer() -> None:
    """A connection that goes away early leaves no timer and no protocol behind."""
    factory = RecordingFactory()
    _, transport, clock = wrap(factory)
    transport.loseConnection()
    assert clock.getDelayedCalls() == []
    assert factory.built == []


def test_refused_by_the_wrapped_factory() -> None:
    """A factory that refuses the client (None) gets the connection closed."""
    wrapper, transport, _ = wrap(RecordingFactory(refuse=True))
    wrapper.dataReceived(V2_TCP4)
    assert not transport.connected


def relay_session_behind_proxy(header: bytes) -> tuple[Client, Any, Any]:
    """A relay listener trusting 198.51.100.0/24 and the balancer's 127.0.0.0/8, behind PROXY."""
    clock, deliverer = Clock(), FakeDeliverer()
    portal = Portal(AccountRealm(), [AccountStoreChecker(MemoryAccountStore(ACCOUNTS))])
    policy = make_policy("relay", trusted_networks=(ip_network("198.51.100.0/24"), ip_network("127.0.0.0/8")))
    smtp_factory = SMTPSessionFactory(policy, portal, deliverer, clock, parse_message, trusted_account=TRUSTED)
    wrapper = ProxyProtocolFactory(smtp_factory, clock).buildProtocol(BALANCER)
    transport = TLSStringTransport(peerAddress=BALANCER)
    transport.protocol = wrapper
    wrapper.makeConnection(transport)
    assert transport.value() == b""  # No greeting before the header.
    wrapper.dataReceived(header)
    client = Client(wrapper.wrappedProtocol, transport, clock, deliverer)
    assert client.replies() == [f"220 {HOSTNAME} ESMTP mailgate"]
    return client, wrapper, deliverer


def test_session_sees_the_proxied_client() -> None:
    """Trust, the EHLO greeting and the Received header follow the proxied address."""
    client, _, deliverer = relay_session_behind_proxy(b"PROXY TCP4 198.51.100.7 203.0.113.1 40123 25\r\n")
    assert client.ehlo()[0] == f"250-{HOSTNAME} greets client.test [198.51.100.7]"
    assert client.message()[-1].startswith("250 2.0.0")
    raw = deliverer.calls[0].email.raw
    assert raw.startswith(b"Received: from client.test ([198.51.100.7])\r\n")
    assert deliverer.calls[0].account == TRUSTED


def test_untrusted_proxied_client_needs_auth_even_from_a_trusted_balancer() -> None:
    """The balancer's own (trusted) address does not lend trust to the client it proxies."""
    client, _, deliverer = relay_session_behind_proxy(b"PROXY TCP4 203.0.113.9 203.0.113.1 40123 25\r\n")
    client.ehlo()
    assert client.code("MAIL FROM:<alice@example.com>").startswith("530 5.7.0")
    assert deliverer.calls == []


def test_endpoint_string_builds_the_proxy_endpoint() -> None:
    """``haproxy:`` selects mailgate's wrapper around the endpoint it names."""
    endpoint = listener_endpoint(Clock(), "haproxy:tcp:2525:interface=127.0.0.1")
    assert isinstance(endpoint, ProxyProtocolEndpoint)
    assert endpoint.wrapped._port == 2525 and endpoint.wrapped._interface == "127.0.0.1"
    with pytest.raises(ValueError, match="haproxy: wraps another endpoint"):
        listener_endpoint(Clock(), "haproxy:")


def test_systemd_endpoint_without_a_socket_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Asking for a socket systemd did not pass says what to do, not IndexError."""
    monkeypatch.delenv("LISTEN_FDS", raising=False)
    with pytest.raises(ValueError, match=r"systemd passed no such socket \(0 passed\); start mailgate through"):
        listener_endpoint(Clock(), "systemd:domain=INET6:index=0")
    with pytest.raises(ValueError, match="systemd passed no such socket"):
        listener_endpoint(Clock(), "systemd:domain=INET6:name=smtp")

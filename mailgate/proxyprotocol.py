"""The PROXY protocol (v1 and v2) in front of a listener: ``haproxy:<endpoint>``.

A load balancer that forwards TCP (HAProxy ``send-proxy``/``send-proxy-v2``,
AWS NLB, Google's and most cloud TCP balancers) connects to mailgate from its
own address and prefixes the stream with a header naming the real client.
Trusted networks, the Received header, the logs and per-client limits must see
that client, so the header is read before anything else: before the SMTP
greeting and, on a ``submissions`` listener, before the TLS handshake (the
balancer passes TLS through untouched, after its header).

Twisted ships a ``haproxy:`` endpoint wrapper, but it connects the wrapped
protocol as soon as the TCP connection opens: the session asks for its peer in
``connectionMade``, before the header has arrived, and sees the balancer.  Its
parsers also drop a header split across two reads and let a malformed port
number escape as a traceback.  This module replaces it for mailgate's
listeners (:mod:`mailgate.endpoints` maps ``haproxy:`` here): nothing is
connected until a complete, valid header has been read; the connection is
closed, with one log line, on an invalid header or when none arrives in time.

Format: https://www.haproxy.org/download/2.6/doc/proxy-protocol.txt
(sections 2.1, human-readable v1, and 2.2, binary v2).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from zope.interface import directlyProvides, implementer, providedBy

log = Logger()

# A balancer sends its header at once; a client that connected to the proxied
# port directly, or a scanner, is closed after this many seconds.
HEADER_TIMEOUT = 30.0

V1_PREFIX = b"PROXY "
V1_MAX_LENGTH = 107  # Including CRLF (section 2.1).
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED_LENGTH = 16
_V2_LOCAL, _V2_PROXY = 0x0, 0x1
_V2_UNSPEC, _V2_INET, _V2_INET6 = 0x0, 0x1, 0x2
_V2_STREAM = 0x1


class InvalidProxyHeader(ValueError):
    """The stream does not start with a PROXY protocol header we accept."""


@dataclass(frozen=True)
class ProxyHeader:
    """The connection's real endpoints, or None for both (``LOCAL``, ``UNKNOWN``,
    ``UNSPEC``: the balancer's own connection, such as a health check; the spec
    says to use the real connection's endpoints then)."""

    source: IPv4Address | IPv6Address | None
    destination: IPv4Address | IPv6Address | None


def parse_header(data: bytes) -> tuple[ProxyHeader, int] | None:
    """Parse the header at the start of ``data``.

    Returns the header and its length in bytes, or None when ``data`` is a valid
    beginning that needs more bytes.  Raises :class:`InvalidProxyHeader` as soon
    as ``data`` cannot be the start of a header.
    """
    if data[:12] == V2_SIGNATURE[: len(data)]:
        return _parse_v2(data)
    if data[:6] == V1_PREFIX[: len(data)]:
        return _parse_v1(data)
    raise InvalidProxyHeader("no PROXY protocol header")


def _parse_v1(data: bytes) -> tuple[ProxyHeader, int] | None:
    end = data.find(b"\r\n", 0, V1_MAX_LENGTH)
    if end < 0:
        if len(data) >= V1_MAX_LENGTH:
            raise InvalidProxyHeader("v1 header longer than 107 bytes")
        return None
    fields = data[:end].split(b" ")
    if len(fields) >= 2 and fields[1] == b"UNKNOWN":
        return ProxyHeader(None, None), end + 2  # Section 2.1: ignore the rest of the line.
    if len(fields) != 6 or fields[1] not in (b"TCP4", b"TCP6"):
        raise InvalidProxyHeader("v1 header is not PROXY TCP4|TCP6 <src> <dst> <sport> <dport>")
    kind = IPv4Address if fields[1] == b"TCP4" else IPv6Address
    try:
        source = _v1_address(kind, fields[2], fields[4])
        destination = _v1_address(kind, fields[3], fields[5])
    except ValueError as e:
        raise InvalidProxyHeader(f"v1 header: {e}") from None
    return ProxyHeader(source, destination), end + 2


def _v1_address(kind: type[IPv4Address | IPv6Address], host: bytes, port: bytes) -> Any:
    text = host.decode("ascii")  # UnicodeDecodeError is a ValueError.
    address = ipaddress.IPv4Address(text) if kind is IPv4Address else ipaddress.IPv6Address(text)
    if not (port.isdigit() and len(port) <= 5 and int(port) <= 65535):
        raise ValueError(f"bad port {port[:8]!r}")
    return kind("TCP", str(address), int(port))


def _parse_v2(data: bytes) -> tuple[ProxyHeader, int] | None:
    if len(data) < V2_FIXED_LENGTH:
        return None
    version, command = data[12] >> 4, data[12] & 0x0F
    if version != 2:
        raise InvalidProxyHeader(f"v2 header with version {version}")
    if command not in (_V2_LOCAL, _V2_PROXY):
        raise InvalidProxyHeader(f"v2 header with command {command}")
    family, transport = data[13] >> 4, data[13] & 0x0F
    total = V2_FIXED_LENGTH + int.from_bytes(data[14:16], "big")
    if len(data) < total:
        return None
    if command == _V2_LOCAL or family == _V2_UNSPEC:
        return ProxyHeader(None, None), total  # TLVs, if any, are skipped.
    if family not in (_V2_INET, _V2_INET6) or transport != _V2_STREAM:
        raise InvalidProxyHeader(f"v2 header for a non-TCP connection (family {family}, transport {transport})")
    size, kind = (4, IPv4Address) if family == _V2_INET else (16, IPv6Address)
    block = data[V2_FIXED_LENGTH:total]
    if len(block) < 2 * size + 4:
        raise InvalidProxyHeader("v2 header too short for its addresses")
    hosts = [str(ipaddress.ip_address(block[i * size : (i + 1) * size])) for i in (0, 1)]
    ports = [int.from_bytes(block[2 * size + 2 * i : 2 * size + 2 * i + 2], "big") for i in (0, 1)]
    return ProxyHeader(kind("TCP", hosts[0], ports[0]), kind("TCP", hosts[1], ports[1])), total


class ProxyProtocolWrapper(ProtocolWrapper):
    """Reads the PROXY header, then builds and connects the real protocol.

    ``getPeer``/``getHost`` answer with the header's addresses, so everything
    above (TLS, the SMTP session) sees the client, not the balancer.
    """

    def __init__(self, factory: ProxyProtocolFactory):
        super().__init__(factory, None)  # type: ignore[arg-type]
        self._buffer = b""
        self._header: ProxyHeader | None = None
        self._timer: Any = None
        self._refused = False

    def makeConnection(self, transport: Any) -> None:
        # As ProtocolWrapper does, minus connecting the wrapped protocol: that
        # waits for the header.
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)

    def connectionMade(self) -> None:
        self._timer = self.factory.clock.callLater(self.factory.header_timeout, self._timed_out)

    def dataReceived(self, data: bytes) -> None:
        if self.wrappedProtocol is not None:
            self.wrappedProtocol.dataReceived(data)
            return
        if self._refused:
            return
        self._buffer += data
        try:
            parsed = parse_header(self._buffer)
        except InvalidProxyHeader as e:
            self._refuse(str(e))
            return
        if parsed is None:
            return
        self._header, length = parsed
        remaining, self._buffer = self._buffer[length:], b""
        self._cancel_timer()
        protocol = self.factory.wrappedFactory.buildProtocol(self.getPeer())
        if protocol is None:
            self._refused = True
            self.transport.loseConnection()
            return
        self.wrappedProtocol = protocol
        protocol.makeConnection(self)
        if remaining:
            protocol.dataReceived(remaining)

    def getPeer(self) -> Any:
        if self._header is not None and self._header.source is not None:
            return self._header.source
        return self.transport.getPeer()

    def getHost(self) -> Any:
        if self._header is not None and self._header.destination is not None:
            return self._header.destination
        return self.transport.getHost()

    def connectionLost(self, reason: Any) -> None:
        self._cancel_timer()
        self.factory.unregisterProtocol(self)
        if self.wrappedProtocol is not None:
            self.wrappedProtocol.connectionLost(reason)
            self.wrappedProtocol = None

    def _refuse(self, reason: str) -> None:
        self._refused = True
        self._cancel_timer()
        log.info(
            "closing connection from {peer}: {reason} (listener expects the PROXY protocol)",
            peer=_host(self.transport.getPeer()),
            reason=reason,
        )
        self.transport.loseConnection()

    def _timed_out(self) -> None:
        self._timer = None
        self._refused = True
        log.info(
            "closing connection from {peer}: no PROXY protocol header within {timeout:g} s",
            peer=_host(self.transport.getPeer()),
            timeout=self.factory.header_timeout,
        )
        self.transport.abortConnection()

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


def _host(address: Any) -> str:
    return str(getattr(address, "host", address))


class ProxyProtocolFactory(WrappingFactory):
    """Wraps a listener's factory; its protocol is built once the header is read,
    with the client's address."""

    protocol = ProxyProtocolWrapper  # type: ignore[assignment]

    def __init__(self, wrappedFactory: Any, clock: Any, header_timeout: float = HEADER_TIMEOUT):
        super().__init__(wrappedFactory)
        self.clock = clock
        self.header_timeout = header_timeout

    def buildProtocol(self, addr: Any) -> ProxyProtocolWrapper:
        return self.protocol(self)

    def logPrefix(self) -> str:
        wrapped = getattr(self.wrappedFactory, "logPrefix", None)
        name = wrapped() if wrapped is not None else type(self.wrappedFactory).__name__
        return f"{name} (PROXY)"


@implementer(IStreamServerEndpoint)
class ProxyProtocolEndpoint:
    """An endpoint whose connections start with a PROXY protocol header."""

    def __init__(self, wrapped: Any, clock: Any, header_timeout: float = HEADER_TIMEOUT):
        self.wrapped = wrapped
        self.clock = clock
        self.header_timeout = header_timeout

    def listen(self, protocolFactory: Any) -> Any:
        return self.wrapped.listen(ProxyProtocolFactory(protocolFactory, self.clock, self.header_timeout))

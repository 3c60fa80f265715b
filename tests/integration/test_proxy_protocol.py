"""Listeners behind a load balancer: ``haproxy:`` endpoints on real loopback sockets.

Clients send a PROXY v1 or v2 header, then SMTP (or, on a ``submissions``
listener, the TLS handshake): mailgate must judge trust by the proxied client,
name it in its replies, and close a connection whose header is malformed,
without a traceback.  A real HAProxy in front does the same with its own
``send-proxy`` and ``send-proxy-v2``.
"""

from __future__ import annotations

import shutil
import smtplib
import socket
import ssl
import struct
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, threads

from mailgate.cli import main as cli_main
from mailgate.proxyprotocol import V2_SIGNATURE
from mailgate.testing import FakeEmailAPI
from tests.integration.conftest import PASSWORDS, Gateway, running_gateway, write_config

PROXIED_LISTENERS = """
[[listeners]]
endpoint = "haproxy:tcp:0:interface=127.0.0.1"
role = "relay"
trusted_networks = ["198.51.100.0/24", "127.0.0.2/32"]

[[listeners]]
endpoint = "haproxy:tcp:0:interface=127.0.0.1"
role = "submission"

[[listeners]]
endpoint = "haproxy:tcp:0:interface=127.0.0.1"
role = "submissions"
"""
MESSAGE = b"From: App <app@example.com>\r\nTo: <customer@example.org>\r\nSubject: proxied\r\n\r\nHello.\r\n"


class ProxiedGateway:
    def __init__(self, gateway: Gateway, ports: dict[str, int]):
        self.gateway = gateway
        self.api = gateway.api
        self.ports = ports  # role -> port of the haproxy: listener


@pytest_twisted.async_yield_fixture
async def proxied(tmp_path: Path, tls_files: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch) -> Any:
    from tests.integration.conftest import TEST_API_TOKEN

    monkeypatch.setenv("MAILGATE_TEST_API_TOKEN", TEST_API_TOKEN)
    api = FakeEmailAPI()
    await api.start(reactor)
    config_path = write_config(tmp_path, tls_files, api.url, extra=PROXIED_LISTENERS)
    args = ["account", "add", "--config", str(config_path), "alice", "--password", PASSWORDS["alice"]]
    assert cli_main(args) == 0
    async for gateway in running_gateway(config_path, api, tls_files[2]):
        services = list(gateway.service)
        ports = {}
        for role, service in zip(("relay", "submission", "submissions"), services[3:6], strict=True):
            port = await service._waitingForPort
            ports[role] = port.getHost().port
        yield ProxiedGateway(gateway, ports)


def v1(source: str, port: int = 40000) -> bytes:
    return f"PROXY TCP4 {source} 127.0.0.1 {port} 25\r\n".encode()


def v2(source: str, destination: str = "127.0.0.1", port: int = 40000) -> bytes:
    family, packed = (0x21, socket.AF_INET6) if ":" in source else (0x11, socket.AF_INET)
    if family == 0x21 and ":" not in destination:
        destination = "::ffff:" + destination
    body = socket.inet_pton(packed, source) + socket.inet_pton(packed, destination) + struct.pack("!HH", port, 465)
    return V2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(body)) + body


class ProxiedSMTP(smtplib.SMTP):
    """smtplib that writes a PROXY header first, as a load balancer would."""

    def __init__(self, header: bytes, port: int, **kwargs: Any):
        self.header = header
        super().__init__("127.0.0.1", port, local_hostname="client.example", timeout=30, **kwargs)

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        sock = socket.create_connection((host, port), timeout, self.source_address)
        sock.sendall(self.header)
        return sock


class ProxiedSMTPS(ProxiedSMTP, smtplib.SMTP_SSL):
    """Implicit TLS after the PROXY header (the header is never encrypted)."""

    def __init__(self, header: bytes, port: int, context: ssl.SSLContext):
        self.header = header
        smtplib.SMTP_SSL.__init__(
            self, "127.0.0.1", port, local_hostname="client.example", timeout=30, context=context
        )

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        return self.context.wrap_socket(super()._get_socket(host, port, timeout), server_hostname="localhost")


def greeting_peer(client: smtplib.SMTP) -> str:
    code, text = client.ehlo()
    assert code == 250
    first = text.decode().splitlines()[0]
    return first[first.index("[") + 1 : first.index("]")]


def relay_without_auth(client: smtplib.SMTP) -> tuple[int, str]:
    """MAIL/RCPT/DATA without AUTH; the first refusal, or the reply to the final dot."""
    code, text = client.mail("app@example.com")
    if code != 250:
        return code, text.decode()
    assert client.rcpt("customer@example.org")[0] == 250
    code, text = client.data(MESSAGE)
    return code, text.decode()


def send_authenticated(client: smtplib.SMTP) -> tuple[int, str]:
    client.login("alice", PASSWORDS["alice"])
    return relay_without_auth(client)


@pytest.mark.parametrize("header", [v1("198.51.100.7"), v2("198.51.100.7")], ids=["v1", "v2"])
@pytest_twisted.ensureDeferred
async def test_trusted_proxied_client_relays_without_auth(proxied: ProxiedGateway, header: bytes) -> None:
    """A proxied client in trusted_networks relays without AUTH, although the
    connection itself comes from 127.0.0.1, which is not trusted there."""

    def talk() -> tuple[str, tuple[int, str]]:
        with ProxiedSMTP(header, proxied.ports["relay"]) as client:
            return greeting_peer(client), relay_without_auth(client)

    peer, (code, text) = await threads.deferToThread(talk)
    assert peer == "198.51.100.7"
    assert (code, text) == (250, "2.0.0 Ok: fake-1")
    assert proxied.api.requests[0].json()["account"] == "trusted-networks"


@pytest.mark.parametrize("header", [v1("127.0.0.1"), v2("203.0.113.9"), v2("2001:db8::9")], ids=["v1", "v2", "v2-ipv6"])
@pytest_twisted.ensureDeferred
async def test_untrusted_proxied_client_must_authenticate(proxied: ProxiedGateway, header: bytes) -> None:
    """A proxied client outside trusted_networks gets 530 for MAIL without AUTH."""

    def talk() -> tuple[int, str]:
        with ProxiedSMTP(header, proxied.ports["relay"]) as client:
            client.ehlo()
            return relay_without_auth(client)

    code, text = await threads.deferToThread(talk)
    assert code == 530 and text.startswith("5.7.0")
    assert proxied.api.requests == []


@pytest_twisted.ensureDeferred
async def test_implicit_tls_after_the_header(proxied: ProxiedGateway) -> None:
    """On submissions the PROXY header precedes the TLS handshake; the session inside
    TLS sees the proxied (IPv6) client and delivers with AUTH."""
    context = proxied.gateway.ssl_context()

    def talk() -> tuple[str, tuple[int, str]]:
        with ProxiedSMTPS(v2("2001:db8::7"), proxied.ports["submissions"], context) as client:
            return greeting_peer(client), send_authenticated(client)

    peer, (code, text) = await threads.deferToThread(talk)
    assert peer == "2001:db8::7"
    assert (code, text) == (250, "2.0.0 Ok: fake-1")
    assert proxied.api.requests[0].json()["account"] == "alice"


@pytest_twisted.ensureDeferred
async def test_starttls_behind_the_proxy(proxied: ProxiedGateway) -> None:
    """STARTTLS works through the PROXY wrapper and the client address survives it."""
    context = proxied.gateway.ssl_context()

    def talk() -> tuple[str, tuple[int, str]]:
        with ProxiedSMTP(v1("198.51.100.8"), proxied.ports["submission"]) as client:
            client.ehlo()
            client.starttls(context=context)
            return greeting_peer(client), send_authenticated(client)

    peer, (code, text) = await threads.deferToThread(talk)
    assert peer == "198.51.100.8"
    assert (code, text) == (250, "2.0.0 Ok: fake-1")


@pytest.mark.parametrize(
    "preface",
    [
        b"EHLO client.example\r\n",
        b"PROXY TCP4 198.51.100.7 127.0.0.1 99999 25\r\n",
        b"PROXY TCP4 not-an-address 127.0.0.1 1 25\r\n",
        V2_SIGNATURE + b"\x21\x31\x00\x10" + b"\0" * 16,
    ],
    ids=["smtp-without-header", "v1-bad-port", "v1-bad-address", "v2-unix-family"],
)
@pytest_twisted.ensureDeferred
async def test_malformed_header_closes_the_connection(proxied: ProxiedGateway, preface: bytes) -> None:
    """A connection without a valid header is closed before any greeting, without an
    error logged; the listener keeps serving proxied clients."""

    def talk() -> bytes:
        with socket.create_connection(("127.0.0.1", proxied.ports["relay"]), timeout=30) as sock:
            sock.sendall(preface)
            received = b""
            while chunk := sock.recv(1024):
                received += chunk
            return received

    assert await threads.deferToThread(talk) == b""

    def fresh() -> str:
        with ProxiedSMTP(v1("198.51.100.7"), proxied.ports["relay"]) as client:
            return greeting_peer(client)

    assert await threads.deferToThread(fresh) == "198.51.100.7"


# -- a real HAProxy in front ------------------------------------------------------------------


def haproxy_path() -> str:
    path = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin")
    if path is None:
        pytest.fail("haproxy is required (apt-get install haproxy)")
    return path


@pytest.fixture
def haproxy(proxied: ProxiedGateway, tmp_path: Path) -> Iterator[Callable[[str], int]]:
    """HAProxy in TCP mode: the "relay" frontend sends PROXY v1 to the relay listener,
    the "submissions" frontend PROXY v2 to the submissions listener (TLS passes
    through).  Its listening sockets are bound here (port 0) and passed as fd@N."""
    frontends = {}
    for name in ("relay", "submissions"):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        frontends[name] = sock
    config = tmp_path / "haproxy.cfg"
    config.write_text(
        f"""
global
    log stderr format raw local0 info
defaults
    mode tcp
    log global
    timeout connect 10s
    timeout client 60s
    timeout server 60s
frontend relay
    bind fd@{frontends['relay'].fileno()}
    default_backend relay
backend relay
    server mailgate 127.0.0.1:{proxied.ports['relay']} send-proxy
frontend submissions
    bind fd@{frontends['submissions'].fileno()}
    default_backend submissions
backend submissions
    server mailgate 127.0.0.1:{proxied.ports['submissions']} send-proxy-v2
"""
    )
    with open(tmp_path / "haproxy.log", "w") as log:
        process = subprocess.Popen(
            [haproxy_path(), "-db", "-f", str(config)],
            pass_fds=[sock.fileno() for sock in frontends.values()],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    ports = {name: sock.getsockname()[1] for name, sock in frontends.items()}
    for sock in frontends.values():
        sock.close()
    try:
        yield ports.__getitem__
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


@pytest_twisted.ensureDeferred
async def test_real_haproxy_in_front(proxied: ProxiedGateway, haproxy: Callable[[str], int]) -> None:
    """Through HAProxy (send-proxy, send-proxy-v2) mailgate sees each real client: the
    one in trusted_networks relays without AUTH, the other is refused, and implicit
    TLS passes through with the client's address intact."""

    def through(name: str, source: str) -> smtplib.SMTP:
        return smtplib.SMTP(
            "127.0.0.1", haproxy(name), local_hostname="client.example", timeout=30, source_address=(source, 0)
        )

    def talk() -> list[Any]:
        results = []
        with through("relay", "127.0.0.2") as client:
            results.append((greeting_peer(client), relay_without_auth(client)))
        with through("relay", "127.0.0.3") as client:
            results.append((greeting_peer(client), relay_without_auth(client)))
        context = proxied.gateway.ssl_context()
        with smtplib.SMTP_SSL(
            "127.0.0.1",
            haproxy("submissions"),
            local_hostname="client.example",
            timeout=30,
            source_address=("127.0.0.3", 0),
            context=context,
        ) as client:
            results.append((greeting_peer(client), send_authenticated(client)))
        return results

    trusted, untrusted, implicit_tls = await threads.deferToThread(talk)
    assert trusted == ("127.0.0.2", (250, "2.0.0 Ok: fake-1"))
    assert untrusted[0] == "127.0.0.3" and untrusted[1][0] == 530
    assert implicit_tls == ("127.0.0.3", (250, "2.0.0 Ok: fake-2"))
    assert [request.json()["account"] for request in proxied.api.requests] == ["trusted-networks", "alice"]

"""TLS configuration: real loopback handshakes against Twisted, reload, STARTTLS."""

from __future__ import annotations

import socket
import ssl
import warnings
from datetime import UTC, datetime, timedelta
from ipaddress import ip_address
from pathlib import Path

import pytest
import pytest_twisted
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from twisted.internet import protocol, reactor
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.protocols.basic import LineReceiver
from zope.interface.verify import verifyObject

from mailgate.tls import (
    ReloadableContextFactory,
    TLSConfigError,
    certificate_expiry,
    ensure_dev_certificate,
    server_context_factory,
)

HOSTNAME = "mx.example.test"
TIMEOUT = 10


# -- certificates -------------------------------------------------------------


def write_chain(ca: trustme.CA, directory: Path) -> tuple[Path, Path, bytes]:
    """Write an RSA leaf issued by an intermediate of ``ca`` as fullchain + key."""
    intermediate = ca.create_child_ca()
    leaf = intermediate.issue_cert(HOSTNAME, "localhost", key_type=trustme.KeyType.RSA)
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "fullchain.pem", directory / "privkey.pem"
    cert_path.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key_path.write_bytes(leaf.private_key_pem.bytes())
    leaf_der = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).public_bytes(
        serialization.Encoding.DER
    )
    return cert_path, key_path, leaf_der


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def chain(ca: trustme.CA, tmp_path: Path) -> tuple[Path, Path, bytes]:
    return write_chain(ca, tmp_path / "live")


# -- servers ------------------------------------------------------------------


class Echo(protocol.Protocol):
    def connectionMade(self) -> None:
        self.factory.connections.add(self)

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)

    def connectionLost(self, reason: object = None) -> None:
        self.factory.connections.discard(self)


class StartTLSLines(LineReceiver):
    """Plain text until ``STARTTLS``; then echoes each line back over TLS."""

    def connectionMade(self) -> None:
        self.factory.connections.add(self)

    def lineReceived(self, line: bytes) -> None:
        if line == b"STARTTLS":
            self.sendLine(b"GO")
            self.transport.startTLS(self.factory.tls)
        else:
            self.sendLine(b"echo " + line)

    def connectionLost(self, reason: object = None) -> None:
        self.factory.connections.discard(self)


class Servers:
    """Starts loopback servers and tears them, and their connections, down."""

    def __init__(self) -> None:
        self.ports: list = []
        self.factories: list = []

    def _factory(self, protocol_class: type) -> protocol.Factory:
        factory = protocol.Factory.forProtocol(protocol_class)
        factory.connections = set()
        self.factories.append(factory)
        return factory

    def tls(self, tls_factory: object) -> int:
        """Serve echo over implicit TLS; return the port number."""
        port = reactor.listenSSL(0, self._factory(Echo), tls_factory, interface="127.0.0.1")
        self.ports.append(port)
        return port.getHost().port

    def starttls(self, tls_factory: object) -> int:
        """Serve the STARTTLS line protocol; return the port number."""
        factory = self._factory(StartTLSLines)
        factory.tls = tls_factory
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.ports.append(port)
        return port.getHost().port

    async def close(self) -> None:
        for port in self.ports:
            await port.stopListening()
        for factory in self.factories:
            for connection in list(factory.connections):
                connection.transport.abortConnection()
        for _ in range(100):  # let aborted connections finish closing
            if not any(factory.connections for factory in self.factories):
                break
            await deferLater(reactor, 0.01, lambda: None)


@pytest_twisted.async_yield_fixture
async def servers():
    running = Servers()
    yield running
    await running.close()


# -- stdlib clients (run in a thread) -------------------------------------------


def client_context(ca: trustme.CA | None = None, cafile: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=cafile)
    if ca is not None:
        ca.configure_trust(context)
    return context


def handshake(port: int, context: ssl.SSLContext, server_hostname: str = HOSTNAME) -> dict:
    """Handshake, echo one message, and describe the session."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw:
        with context.wrap_socket(raw, server_hostname=server_hostname) as tls:
            tls.sendall(b"ping")
            echoed = tls.recv(4)
            return {
                "version": tls.version(),
                "cipher": tls.cipher()[0],
                "peer_der": tls.getpeercert(binary_form=True),
                "echoed": echoed,
            }


def starttls_handshake(port: int, context: ssl.SSLContext) -> dict:
    """Upgrade a plain connection with STARTTLS, then echo one line over TLS."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw:
        raw.sendall(b"STARTTLS\r\n")
        assert raw.recv(4) == b"GO\r\n"
        with context.wrap_socket(raw, server_hostname=HOSTNAME) as tls:
            tls.sendall(b"ping\r\n")
            echoed = b""
            while not echoed.endswith(b"\r\n"):
                echoed += tls.recv(100)
            return {
                "version": tls.version(),
                "peer_der": tls.getpeercert(binary_form=True),
                "echoed": echoed,
            }


def tls12_only(context: ssl.SSLContext, ciphers: str) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(ciphers)
    return context


# -- handshakes -----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_tls12_ecdhe_gcm_verifies_with_intermediate(servers, ca, chain):
    """A TLS 1.2 ECDHE-GCM client trusting only the root verifies the served chain."""
    port = servers.tls(server_context_factory(*chain[:2]))
    context = tls12_only(client_context(ca), "ECDHE-RSA-AES128-GCM-SHA256")
    session = await deferToThread(handshake, port, context)
    assert session["version"] == "TLSv1.2"
    assert session["cipher"] == "ECDHE-RSA-AES128-GCM-SHA256"
    assert session["peer_der"] == chain[2]
    assert session["echoed"] == b"ping"


@pytest.mark.parametrize(
    "ciphers",
    [
        "ECDHE-RSA-AES128-SHA:ECDHE-RSA-AES256-SHA:ECDHE-RSA-AES128-SHA256",
        "AES128-GCM-SHA256:AES256-GCM-SHA384",
        "AES128-SHA",
    ],
    ids=["ecdhe-cbc", "rsa-kex-gcm", "rsa-kex-cbc"],
)
@pytest_twisted.ensureDeferred
async def test_tls12_rejects_cbc_and_non_forward_secret_suites(servers, ca, chain, ciphers):
    """A TLS 1.2 client offering only CBC or RSA-key-exchange suites is refused."""
    port = servers.tls(server_context_factory(*chain[:2]))
    context = tls12_only(client_context(ca), ciphers)
    with pytest.raises(ssl.SSLError, match="ALERT_HANDSHAKE_FAILURE"):  # the server's alert
        await deferToThread(handshake, port, context)


@pytest_twisted.ensureDeferred
async def test_tls11_is_refused(servers, ca, chain):
    """A TLS 1.1 client is refused by the server (the client itself would allow it)."""
    port = servers.tls(server_context_factory(*chain[:2]))
    context = client_context(ca)
    context.set_ciphers("ALL:@SECLEVEL=0")
    with warnings.catch_warnings():  # the stdlib deprecates TLS 1.1, as do we
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.TLSv1_1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises(ssl.SSLError, match="ALERT_PROTOCOL_VERSION"):  # the server's alert
        await deferToThread(handshake, port, context)


@pytest_twisted.ensureDeferred
async def test_tls13_succeeds(servers, ca, chain):
    """A TLS 1.3 client completes a verified handshake."""
    port = servers.tls(server_context_factory(*chain[:2]))
    context = client_context(ca)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    session = await deferToThread(handshake, port, context)
    assert session["version"] == "TLSv1.3"
    assert session["echoed"] == b"ping"


# -- reload ---------------------------------------------------------------------


def test_reloadable_factory_provides_server_connection_creator(chain):
    """ReloadableContextFactory declares IOpenSSLServerConnectionCreator, so Twisted uses it."""
    assert verifyObject(IOpenSSLServerConnectionCreator, ReloadableContextFactory(*chain[:2]))


@pytest_twisted.ensureDeferred
async def test_reload_serves_new_certificate_keeps_open_sessions(servers, ca, chain, tmp_path):
    """After reload new handshakes get the new certificate; open sessions carry on."""
    cert_path, key_path, old_leaf = chain
    tls = ReloadableContextFactory(cert_path, key_path)
    port = servers.tls(tls)

    raw = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    old_session = client_context(ca).wrap_socket(
        raw, server_hostname=HOSTNAME, do_handshake_on_connect=False
    )
    try:
        await deferToThread(old_session.do_handshake)
        new_ca = trustme.CA()
        staged_cert, staged_key, new_leaf = write_chain(new_ca, tmp_path / "staged")
        cert_path.write_bytes(staged_cert.read_bytes())
        key_path.write_bytes(staged_key.read_bytes())
        tls.reload()

        session = await deferToThread(handshake, port, client_context(new_ca))
        assert session["peer_der"] == new_leaf
        await deferToThread(old_session.sendall, b"pong")
        assert await deferToThread(old_session.recv, 4) == b"pong"
        assert old_session.getpeercert(binary_form=True) == old_leaf
    finally:
        old_session.close()


@pytest_twisted.ensureDeferred
async def test_failed_reload_keeps_serving_old_certificate(servers, ca, chain):
    """A reload of broken files raises TLSConfigError and the old certificate stays."""
    cert_path, key_path, leaf = chain
    tls = ReloadableContextFactory(cert_path, key_path)
    port = servers.tls(tls)
    cert_path.write_bytes(b"-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")
    with pytest.raises(TLSConfigError, match="fullchain.pem"):
        tls.reload()
    session = await deferToThread(handshake, port, client_context(ca))
    assert session["peer_der"] == leaf


# -- STARTTLS -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_starttls_with_reloadable_factory(servers, ca, chain):
    """transport.startTLS accepts ReloadableContextFactory and the client verifies it."""
    port = servers.starttls(ReloadableContextFactory(*chain[:2]))
    session = await deferToThread(starttls_handshake, port, client_context(ca))
    assert session["peer_der"] == chain[2]
    assert session["version"] in {"TLSv1.2", "TLSv1.3"}
    assert session["echoed"] == b"echo ping\r\n"


@pytest_twisted.ensureDeferred
async def test_starttls_uses_reloaded_certificate(servers, chain, tmp_path):
    """A STARTTLS upgrade after reload presents the new certificate."""
    cert_path, key_path, _ = chain
    tls = ReloadableContextFactory(cert_path, key_path)
    port = servers.starttls(tls)
    new_ca = trustme.CA()
    staged_cert, staged_key, new_leaf = write_chain(new_ca, tmp_path / "staged")
    cert_path.write_bytes(staged_cert.read_bytes())
    key_path.write_bytes(staged_key.read_bytes())
    tls.reload()
    session = await deferToThread(starttls_handshake, port, client_context(new_ca))
    assert session["peer_der"] == new_leaf


# -- configuration errors -------------------------------------------------------


def test_missing_certificate_file(chain, tmp_path):
    """A missing certificate file is a TLSConfigError naming it."""
    missing = tmp_path / "nope.pem"
    with pytest.raises(TLSConfigError, match="nope.pem"):
        server_context_factory(missing, chain[1])


def test_missing_key_file(chain, tmp_path):
    """A missing key file is a TLSConfigError naming it."""
    with pytest.raises(TLSConfigError, match="nokey.pem"):
        server_context_factory(chain[0], tmp_path / "nokey.pem")


def test_garbage_certificate(chain, tmp_path):
    """A certificate file without a valid PEM certificate is a TLSConfigError naming it."""
    garbage = tmp_path / "garbage-cert.pem"
    garbage.write_bytes(b"this is not a certificate\n")
    with pytest.raises(TLSConfigError, match="garbage-cert.pem"):
        server_context_factory(garbage, chain[1])


def test_garbage_key(chain, tmp_path):
    """A key file without a valid PEM key is a TLSConfigError naming it."""
    garbage = tmp_path / "garbage-key.pem"
    garbage.write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(TLSConfigError, match="garbage-key.pem"):
        server_context_factory(chain[0], garbage)


def test_key_not_matching_certificate(chain, tmp_path):
    """A key that does not belong to the leaf certificate is a TLSConfigError naming it."""
    _, other_key, _ = write_chain(trustme.CA(), tmp_path / "other")
    with pytest.raises(TLSConfigError, match="other/privkey.pem.*does not match"):
        server_context_factory(chain[0], other_key)


def test_errors_are_one_line(tmp_path):
    """TLSConfigError messages fit on one line for a clean start-up error."""
    with pytest.raises(TLSConfigError) as raised:
        ReloadableContextFactory(tmp_path / "a.pem", tmp_path / "b.pem")
    assert "\n" not in str(raised.value)


def test_certificate_expiry_reads_leaf(ca, tmp_path):
    """certificate_expiry reports the leaf's notAfter in UTC."""
    not_after = datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC)
    leaf = ca.create_child_ca().issue_cert(HOSTNAME, not_after=not_after)
    path = tmp_path / "fullchain.pem"
    path.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    assert certificate_expiry(path) == not_after


# -- development certificate ------------------------------------------------------


def test_dev_certificate_created_with_private_key_mode(tmp_path):
    """The dev pair is created under state/tls with a 0600 key in a 0700 directory."""
    cert_path, key_path = ensure_dev_certificate(tmp_path / "state", HOSTNAME)
    assert cert_path == tmp_path / "state" / "tls" / "dev-cert.pem"
    assert key_path == tmp_path / "state" / "tls" / "dev-key.pem"
    assert key_path.stat().st_mode & 0o777 == 0o600
    assert cert_path.parent.stat().st_mode & 0o777 == 0o700
    assert [p.name for p in cert_path.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_dev_certificate_reused(tmp_path):
    """A second call returns the same, untouched files."""
    cert_path, key_path = ensure_dev_certificate(tmp_path, HOSTNAME)
    before = cert_path.read_bytes(), key_path.read_bytes()
    assert ensure_dev_certificate(tmp_path, HOSTNAME) == (cert_path, key_path)
    assert (cert_path.read_bytes(), key_path.read_bytes()) == before


def test_dev_certificate_regenerated_near_expiry(tmp_path):
    """A dev certificate expiring within 30 days is replaced by a fresh one."""
    cert_path, key_path = ensure_dev_certificate(tmp_path, HOSTNAME)
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    current = x509.load_pem_x509_certificate(cert_path.read_bytes())
    now = datetime.now(UTC)
    expiring = (
        x509.CertificateBuilder()
        .subject_name(current.subject)
        .issuer_name(current.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=355))
        .not_valid_after(now + timedelta(days=10))
        .add_extension(
            current.extensions.get_extension_for_class(x509.SubjectAlternativeName).value,
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path.write_bytes(expiring.public_bytes(serialization.Encoding.PEM))

    ensure_dev_certificate(tmp_path, HOSTNAME)
    assert certificate_expiry(cert_path) > now + timedelta(days=360)
    server_context_factory(cert_path, key_path)  # the new pair matches


def test_dev_certificate_names(tmp_path):
    """The dev certificate covers the hostname, localhost, 127.0.0.1 and ::1 and is no CA."""
    cert_path, _ = ensure_dev_certificate(tmp_path, HOSTNAME)
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(names.get_values_for_type(x509.DNSName)) == {HOSTNAME, "localhost"}
    assert set(names.get_values_for_type(x509.IPAddress)) == {
        ip_address("127.0.0.1"),
        ip_address("::1"),
    }
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False


@pytest_twisted.ensureDeferred
async def test_dev_certificate_handshake(servers, tmp_path):
    """A stdlib client trusting the dev certificate completes a verified handshake."""
    cert_path, key_path = ensure_dev_certificate(tmp_path, HOSTNAME)
    port = servers.tls(server_context_factory(cert_path, key_path))
    session = await deferToThread(
        handshake, port, client_context(cafile=cert_path), server_hostname="localhost"
    )
    assert session["echoed"] == b"ping"

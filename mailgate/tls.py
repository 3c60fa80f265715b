"""TLS server configuration for the SMTP listeners.

Submission on 465 uses implicit TLS (RFC 8314, which prefers it over
STARTTLS); 25 and 587 upgrade in-band with STARTTLS (RFC 3207).  Both paths
share one configuration, modelled on Mozilla's "intermediate" server profile
(https://wiki.mozilla.org/Security/Server_Side_TLS): TLS 1.2 or newer, and on
TLS 1.2 only forward-secret (ECDHE) AEAD suites -- no CBC, no RSA key
exchange, no SHA-1 MACs.  TLS 1.3 suites are OpenSSL's defaults, all of which
meet that bar.  The DHE suites of the Mozilla list are left out so no DH
parameter file is needed; every client that lacks ECDHE also lacks TLS 1.2.
Key exchange groups are Mozilla's list too (X25519, P-256, P-384); OpenSSL
would otherwise also offer X448 and P-521, which the profile excludes.

Cipher order: Mozilla says the server may leave the choice to the client.
Twisted always sets OP_CIPHER_SERVER_PREFERENCE; we keep it, since every suite
offered is one we are content with and the list is in Mozilla's order.

Certificates are reloadable (``ReloadableContextFactory.reload``) so renewed
certificates take effect without a restart.

The client side (:func:`trust_root_from_file`, :func:`client_tls_options`)
serves mailgate's own outgoing connections: the ``smtp`` provider and the
``http`` account store verify the server with service-identity against the
configured host, optionally trusting a private CA instead of the system's.
"""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.bindings.openssl.binding import Binding
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from twisted.internet.ssl import (
    AcceptableCiphers,
    Certificate,
    CertificateOptions,
    TLSVersion,
    optionsForClientTLS,
    trustRootFromCertificates,
)
from zope.interface import implementer

from mailgate.atomicfile import write_atomically

MOZILLA_INTERMEDIATE_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    ]
)

MOZILLA_INTERMEDIATE_GROUPS = b"X25519:prime256v1:secp384r1"

DEV_CERT_NAME = "dev-cert.pem"
DEV_KEY_NAME = "dev-key.pem"
DEV_CERT_LIFETIME = timedelta(days=365)
DEV_CERT_RENEW_BEFORE = timedelta(days=30)


class TLSConfigError(Exception):
    """The TLS certificate or key cannot be used; the message names the file."""


def server_context_factory(certificate: Path, private_key: Path) -> CertificateOptions:
    """Server TLS options from a PEM chain (leaf first) and its PEM private key."""
    chain = _load_certificate_chain(certificate)
    key = _load_private_key(private_key)
    _check_key_matches(chain[0], key, certificate, private_key)
    try:
        options = CertificateOptions(
            certificate=chain[0],
            privateKey=key,
            extraCertChain=chain[1:],
            acceptableCiphers=AcceptableCiphers.fromOpenSSLCipherString(
                MOZILLA_INTERMEDIATE_CIPHERS
            ),
            raiseMinimumTo=TLSVersion.TLSv1_2,
        )
        # Build now, so OpenSSL objections surface at start-up; the options keep
        # this context for every connection.
        _restrict_groups(options.getContext())
    except (SSL.Error, ValueError) as error:
        message = f"TLS certificate {certificate}: rejected by OpenSSL: {error}"
        raise TLSConfigError(message) from error
    return options


def _restrict_groups(context: SSL.Context) -> None:
    """Limit (EC)DHE groups to Mozilla's intermediate list.

    pyOpenSSL has no API for the group list; OpenSSL's SSL_CTX_set1_curves_list
    (an alias of SSL_CTX_set1_groups_list) is reached through cryptography's
    bindings, as Twisted does for its ECDH setup (twisted.internet._sslverify).
    """
    lib = Binding.lib
    if lib.SSL_CTX_set1_curves_list(context._context, MOZILLA_INTERMEDIATE_GROUPS) != 1:
        raise SSL.Error("cannot restrict the TLS key exchange groups")


def certificate_expiry(certificate: Path) -> datetime:
    """When the leaf (first) certificate in ``certificate`` expires, in UTC."""
    return leaf_certificate(certificate).not_valid_after_utc


def leaf_certificate(certificate: Path) -> x509.Certificate:
    """The leaf (first) certificate of a PEM chain file; TLSConfigError naming the file."""
    return _load_certificate_chain(certificate)[0]


def trust_root_from_file(path: Path) -> Any:
    """Trust exactly the CA certificates in the PEM file ``path`` (a private CA).

    Raises :class:`TLSConfigError` naming the file when it cannot be used.
    """
    chain = _load_certificate_chain(path)
    return trustRootFromCertificates(
        [Certificate.loadPEM(cert.public_bytes(serialization.Encoding.PEM)) for cert in chain]
    )


def client_tls_options(
    hostname: str, trust_root: Any = None
) -> IOpenSSLClientConnectionCreator:
    """Client TLS options that verify the server's certificate for ``hostname``.

    Twisted's ``optionsForClientTLS`` checks the chain against ``trust_root``
    (the system's CAs when None) and the name with service-identity (RFC 6125;
    an IP address is matched against the certificate's IP addresses).  TLS 1.2
    is the minimum, as on mailgate's own listeners.
    """
    return optionsForClientTLS(
        hostname,
        trustRoot=trust_root,
        extraCertificateOptions={"raiseMinimumTo": TLSVersion.TLSv1_2},
    )


# The interface declaration is what makes TLSMemoryBIOFactory (behind both
# listenSSL and startTLS) call serverConnectionForTLS; undeclared objects fall
# back to the legacy getContext() path with a LegacyContextFactoryWarning.
@implementer(IOpenSSLServerConnectionCreator)
class ReloadableContextFactory:
    """Server TLS options whose certificate and key can be re-read while running.

    Usable with ``listenSSL`` / TLS endpoints and with ``transport.startTLS``:
    both wrap it in ``TLSMemoryBIOFactory``, which calls ``serverConnectionForTLS``
    once per connection, so a reload affects new handshakes only.
    """

    def __init__(self, certificate: Path, private_key: Path) -> None:
        self.certificate = certificate
        self.private_key = private_key
        self.options = server_context_factory(certificate, private_key)

    def reload(self) -> None:
        """Re-read the files; on TLSConfigError the current options stay in use."""
        self.options = server_context_factory(self.certificate, self.private_key)

    def adopt(self, other: ReloadableContextFactory) -> None:
        """Serve ``other``'s certificate from now on (its files may differ from ours)."""
        self.certificate, self.private_key, self.options = other.certificate, other.private_key, other.options

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        return self.options.serverConnectionForTLS(tlsProtocol)


def ensure_dev_certificate(state_dir: Path, hostname: str) -> tuple[Path, Path]:
    """A usable self-signed (certificate, key) pair under ``state_dir/tls``.

    Reuses the existing pair unless it is unusable, lacks ``hostname``, or
    expires within 30 days; otherwise generates a fresh one.
    """
    tls_dir = state_dir / "tls"
    cert_path, key_path = tls_dir / DEV_CERT_NAME, tls_dir / DEV_KEY_NAME
    if _dev_certificate_usable(cert_path, key_path, hostname):
        return cert_path, key_path

    tls_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    cert_pem = _self_signed_certificate(key, hostname).public_bytes(serialization.Encoding.PEM)
    # Key first: should we die in between, the old certificate no longer
    # matches the key and the next call regenerates both.
    write_atomically(key_path, key_pem, 0o600)
    write_atomically(cert_path, cert_pem, 0o644)
    return cert_path, key_path


def _load_certificate_chain(path: Path) -> list[x509.Certificate]:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise TLSConfigError(f"TLS certificate {path}: cannot read: {error.strerror}") from error
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TLSConfigError(f"TLS certificate {path}: no valid PEM certificate found") from None


def _load_private_key(path: Path) -> PrivateKeyTypes:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise TLSConfigError(f"TLS private key {path}: cannot read: {error.strerror}") from error
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise TLSConfigError(f"TLS private key {path}: encrypted keys are not supported") from None
    except (ValueError, UnsupportedAlgorithm):
        raise TLSConfigError(f"TLS private key {path}: no valid PEM private key found") from None


def _check_key_matches(
    leaf: x509.Certificate, key: object, certificate: Path, private_key: Path
) -> None:
    def spki(public_key: object) -> bytes:
        return public_key.public_bytes(  # type: ignore[attr-defined]
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    if spki(leaf.public_key()) != spki(key.public_key()):  # type: ignore[attr-defined]
        raise TLSConfigError(
            f"TLS private key {private_key} does not match the first certificate in "
            f"{certificate} (the leaf certificate must come first)"
        )


def _dev_certificate_usable(cert_path: Path, key_path: Path, hostname: str) -> bool:
    try:
        server_context_factory(cert_path, key_path)
        leaf = _load_certificate_chain(cert_path)[0]
        names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (TLSConfigError, x509.ExtensionNotFound):
        return False
    fresh = leaf.not_valid_after_utc - datetime.now(UTC) > DEV_CERT_RENEW_BEFORE
    return fresh and hostname in names.get_values_for_type(x509.DNSName)


def _self_signed_certificate(key: ec.EllipticCurvePrivateKey, hostname: str) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.now(UTC)
    alt_names = [
        *(x509.DNSName(dns) for dns in dict.fromkeys([hostname, "localhost"])),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + DEV_CERT_LIFETIME)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )

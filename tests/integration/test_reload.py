"""Reload of a running gateway (what SIGHUP calls), in process: new certificate,
accounts and provider settings for new connections while an open session goes on;
a broken configuration changes nothing."""

from __future__ import annotations

import smtplib
import ssl
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from twisted.internet import threads
from twisted.logger import formatEvent, globalLogPublisher

from mailgate.cli import main as cli_main

from .conftest import PASSWORDS, TEST_API_TOKEN, Gateway

NEW_API_TOKEN = "test-api-token-after-reload"
BOB_PASSWORD = "bob-test-password"
MESSAGE = b"From: a@example.com\r\nSubject: reload\r\n\r\nx\r\n"


def reissue(directory: Path) -> tuple[bytes, ssl.SSLContext]:
    """Replace fullchain.pem and privkey.pem in ``directory`` with ones from a new CA;
    return the new leaf (DER) and a context trusting only the new CA."""
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.private_key_pem.write_to_path(str(directory / "privkey.pem"))
    (directory / "fullchain.pem").write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    context = ssl.create_default_context()
    ca.configure_trust(context)
    leaf = x509.load_pem_x509_certificate(cert.cert_chain_pems[0].bytes())
    return leaf.public_bytes(encoding=Encoding.DER), context


def open_session(port: int, context: ssl.SSLContext, user: str, password: str) -> tuple[smtplib.SMTP, bytes]:
    """A logged-in STARTTLS session, left open; and the certificate the server showed."""
    client = smtplib.SMTP("127.0.0.1", port, local_hostname="client.example", timeout=20)
    try:
        client.starttls(context=context)
        client.login(user, password)
    except Exception:
        client.close()
        raise
    return client, client.sock.getpeercert(binary_form=True)


def send_and_quit(client: smtplib.SMTP) -> dict[str, Any]:
    try:
        return client.sendmail("a@example.com", ["b@example.org"], MESSAGE)
    finally:
        client.quit()


def add_account(directory: Path, user: str, password: str) -> None:
    args = ["account", "add", "--config", str(directory / "mailgate.toml"), user, "--password", password]
    assert cli_main(args) == 0


def current_leaf(directory: Path) -> bytes:
    pem = (directory / "fullchain.pem").read_bytes()
    return x509.load_pem_x509_certificates(pem)[0].public_bytes(Encoding.DER)


@pytest_twisted.ensureDeferred
async def test_reload_swaps_certificate_accounts_and_provider(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a reload a new connection gets the new certificate, a new account logs in
    and the API sees the new token, while a session opened before it sends normally."""
    port = gateway.ports["submission"]
    old_leaf = current_leaf(gateway.tmp)
    old_session, shown = await threads.deferToThread(
        open_session, port, gateway.ssl_context(), "alice", PASSWORDS["alice"]
    )
    assert shown == old_leaf
    new_leaf, new_context = reissue(gateway.tmp)
    add_account(gateway.tmp, "bob", BOB_PASSWORD)
    monkeypatch.setenv("MAILGATE_TEST_API_TOKEN", NEW_API_TOKEN)
    assert gateway.service.reloader.reload()

    new_session, shown = await threads.deferToThread(open_session, port, new_context, "bob", BOB_PASSWORD)
    assert shown == new_leaf != old_leaf
    assert await threads.deferToThread(send_and_quit, new_session) == {}
    assert await threads.deferToThread(send_and_quit, old_session) == {}
    assert [r.headers["authorization"] for r in gateway.api.requests] == [f"Bearer {NEW_API_TOKEN}"] * 2
    assert {r.json()["account"] for r in gateway.api.requests} == {"alice", "bob"}


def refused_reload(gateway: Gateway, logged_errors: Any) -> str:
    assert not gateway.service.reloader.reload()
    [event] = logged_errors.take()
    return formatEvent(event)


@pytest_twisted.ensureDeferred
async def test_invalid_configuration_keeps_everything(gateway: Gateway, logged_errors: Any) -> None:
    """A configuration error is logged naming the key, and nothing of the new
    configuration is used: not its certificate, not its accounts, not its providers."""
    config = gateway.tmp / "mailgate.toml"
    old_leaf = current_leaf(gateway.tmp)
    reissue(gateway.tmp)
    add_account(gateway.tmp, "bob", BOB_PASSWORD)
    config.write_text(config.read_text().replace('url = "http://', 'url = "ftp://'))
    assert refused_reload(gateway, logged_errors) == (
        "reload refused, the running configuration stays in use: "
        "providers.api.url: required: the http(s) URL of the API"
    )
    client, shown = await threads.deferToThread(
        open_session, gateway.ports["submission"], gateway.ssl_context(), "alice", PASSWORDS["alice"]
    )
    assert shown == old_leaf
    assert await threads.deferToThread(send_and_quit, client) == {}
    assert gateway.api.requests[0].headers["authorization"] == f"Bearer {TEST_API_TOKEN}"
    with pytest.raises(smtplib.SMTPAuthenticationError):
        await threads.deferToThread(open_session, gateway.ports["submission"], gateway.ssl_context(), "bob", BOB_PASSWORD)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda tmp: (tmp / "privkey.pem").unlink(), "TLS private key {tmp}/privkey.pem: cannot read"),
        (lambda tmp: (tmp / "fullchain.pem").write_text("garbage"), "TLS certificate {tmp}/fullchain.pem: no valid PEM"),
        (lambda tmp: (tmp / "accounts.toml").write_text("[accounts.x]\npassword = 'clear'\n"), "accounts.x.password: must be a scrypt$"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_unusable_files_keep_the_running_ones(
    gateway: Gateway, logged_errors: Any, damage: Any, message: str
) -> None:
    """A missing key, a broken certificate or a broken accounts file is refused, naming the
    file or key; the running certificate and accounts stay in use."""
    old_leaf = current_leaf(gateway.tmp)
    damage(gateway.tmp)
    assert message.format(tmp=gateway.tmp) in refused_reload(gateway, logged_errors)
    client, shown = await threads.deferToThread(
        open_session, gateway.ports["submission"], gateway.ssl_context(), "alice", PASSWORDS["alice"]
    )
    assert shown == old_leaf
    await threads.deferToThread(client.quit)


def reload_logging(gateway: Gateway) -> list[str]:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        assert gateway.service.reloader.reload()
    finally:
        globalLogPublisher.removeObserver(events.append)
    return [formatEvent(e) for e in events]


@pytest_twisted.ensureDeferred
async def test_listener_changes_need_a_restart(gateway: Gateway) -> None:
    """Changed listeners, and which client a connection counts for, are not applied
    by a reload, and the log says so; the rest of [limits] is."""
    config = gateway.tmp / "mailgate.toml"
    text = config.read_text().replace('"127.0.0.1/32"', '"127.0.0.0/8"')
    config.write_text(text.replace("[limits]\n", "[limits]\nipv6_client_prefix = 48\n"))
    lines = reload_logging(gateway)
    assert (
        "reload: changes to [[listeners]], limits.ipv6_client_prefix are not applied until a restart" in lines
    )
    assert gateway.service.reloader.running.limits.ipv6_client_prefix == 64
    assert gateway.service.admission.limits.ipv6_client_prefix == 64
    reloaded = [line for line in lines if line.startswith("configuration reloaded")]
    assert reloaded == [f"configuration reloaded: certificate {gateway.tmp}/fullchain.pem, accounts file, providers api"]


def recipients_accepted(client: smtplib.SMTP, count: int) -> list[int]:
    """MAIL, then ``count`` RCPTs: their reply codes (the transaction is reset after)."""
    client.mail("a@example.com")
    codes = [client.rcpt(f"r{n}@example.org")[0] for n in range(count)]
    client.rset()
    return codes


@pytest_twisted.ensureDeferred
async def test_reloaded_limits_apply_to_new_sessions(gateway: Gateway) -> None:
    """[limits] changed and reloaded: a new session gets the new recipient limit and
    advertises the new SIZE; a session opened before the reload keeps its own."""
    port, context = gateway.ports["submission"], gateway.ssl_context()
    old_session, _ = await threads.deferToThread(open_session, port, context, "alice", PASSWORDS["alice"])
    config = gateway.tmp / "mailgate.toml"
    config.write_text(
        config.read_text().replace("max_recipients = 50", "max_recipients = 2").replace('"1MiB"', '"2MiB"')
    )
    lines = reload_logging(gateway)
    assert not [line for line in lines if "not applied" in line]
    assert gateway.service.reloader.running.limits.max_recipients == 2
    new_session, _ = await threads.deferToThread(open_session, port, context, "alice", PASSWORDS["alice"])
    try:
        assert new_session.esmtp_features["size"] == str(2 * 1024 * 1024)
        assert await threads.deferToThread(recipients_accepted, new_session, 3) == [250, 250, 452]
        assert old_session.esmtp_features["size"] == str(1024 * 1024)
        assert await threads.deferToThread(recipients_accepted, old_session, 3) == [250, 250, 250]
    finally:
        for client in (old_session, new_session):
            await threads.deferToThread(client.quit)


@pytest_twisted.ensureDeferred
async def test_accounts_file_that_is_not_utf8_is_refused(gateway: Gateway, logged_errors: Any) -> None:
    """An accounts file saved in Latin-1 is refused in one logged line naming the file,
    counted, and the old accounts stay."""
    (gateway.tmp / "accounts.toml").write_bytes('[accounts.zoë]\npassword = "x"\n'.encode("latin-1"))
    assert refused_reload(gateway, logged_errors) == (
        "reload refused, the running configuration stays in use: "
        f"{gateway.tmp / 'accounts.toml'}: not valid TOML: the file is not UTF-8"
    )
    assert gateway.service.reloader.metrics.reloads.labels("failure")._value.get() == 1
    client, _ = await threads.deferToThread(
        open_session, gateway.ports["submission"], gateway.ssl_context(), "alice", PASSWORDS["alice"]
    )
    await threads.deferToThread(client.quit)

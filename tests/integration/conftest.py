"""A real mailgate on loopback: real sockets, real TLS (trustme), a real account
file written by ``mailgate account add``, and a real twisted.web API standing in
for the provider (:class:`mailgate.testing.FakeEmailAPI`)."""

from __future__ import annotations

import shutil
import smtplib
import ssl
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import trustme
from twisted.internet import reactor, threads

from mailgate.build import build_service
from mailgate.cli import main as cli_main
from mailgate.config import load_config
from mailgate.testing import FakeEmailAPI
from mailgate.transports import make_http_client

# Throwaway test fixtures, not secrets.
TEST_API_TOKEN = "test-api-token-not-a-secret"
TEST_SIGNING_SECRET = "test-signing-secret-not-a-secret"
PASSWORDS = {"alice": "alice-test-password", "restricted": "restricted-test-password"}


@dataclass
class Gateway:
    ports: dict[str, int]
    api: FakeEmailAPI
    ca_path: Path
    tmp: Path
    service: Any = field(repr=False)

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_path))


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    return make_tls_files(tmp_path)


def make_tls_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A trustme CA and a localhost certificate: (chain, key, CA) PEM paths."""
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    chain, key, ca_path = tmp_path / "fullchain.pem", tmp_path / "privkey.pem", tmp_path / "ca.pem"
    cert.private_key_pem.write_to_path(str(key))
    chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    ca.cert_pem.write_to_path(str(ca_path))
    return chain, key, ca_path


def webhook_provider(api_url: str) -> str:
    """The default ``[providers.api]`` table: the webhook schema, signed, to the fake API."""
    return f"""
[providers.api]
type = "webhook"
url = "{api_url}/v1/emails"
token = "env:MAILGATE_TEST_API_TOKEN"
signing_secret = "{TEST_SIGNING_SECRET}"
"""


def write_config(
    tmp: Path,
    tls_files: tuple[Path, Path, Path],
    api_url: str,
    extra: str = "",
    provider: str | None = None,
    limits: str = "",
) -> Path:
    """A complete configuration; ``provider`` replaces the default ``[providers.api]`` table,
    ``limits`` adds lines to ``[limits]``."""
    chain, key, _ = tls_files
    config = tmp / "mailgate.toml"
    config.write_text(
        f"""
[server]
hostname = "localhost"
state_dir = "{tmp / 'state'}"

[tls]
certificate = "{chain}"
private_key = "{key}"

[[listeners]]
endpoint = "tcp:0:interface=127.0.0.1"
role = "submission"

[[listeners]]
endpoint = "tcp:0:interface=127.0.0.1"
role = "submissions"

[[listeners]]
endpoint = "tcp:0:interface=127.0.0.1"
role = "relay"
trusted_networks = ["127.0.0.1/32"]

[delivery]
mode = "sync"
api_timeout = 2

[limits]
max_message_size = "1MiB"
{"" if "max_recipients" in limits else "max_recipients = 50"}
auth_failure_delay = 0.05
{limits}

[accounts]
store = "file"
path = "accounts.toml"
{provider if provider is not None else webhook_provider(api_url)}
{extra}
""",
        encoding="utf-8",
    )
    return config


@pytest_twisted.async_yield_fixture
async def gateway(tmp_path: Path, tls_files: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch) -> Any:
    async for gateway in file_store_gateway(tmp_path, tls_files, monkeypatch):
        yield gateway


async def file_store_gateway(
    tmp_path: Path,
    tls_files: tuple[Path, Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    extra: str = "",
    limits: str = "",
) -> Any:
    """The ``gateway`` fixture's gateway; ``extra`` is appended to its configuration,
    ``limits`` to its ``[limits]`` table."""
    monkeypatch.setenv("MAILGATE_TEST_API_TOKEN", TEST_API_TOKEN)
    async for gateway in gateway_with_accounts(tmp_path, tls_files, extra=extra, limits=limits):
        yield gateway


async def gateway_with_accounts(
    tmp_path: Path,
    tls_files: tuple[Path, Path, Path],
    provider: Callable[[str], str] | None = None,
    extra: str = "",
    limits: str = "",
) -> Any:
    """A running gateway with the accounts of :data:`PASSWORDS`, made by ``mailgate account add``.

    ``provider(api_url)`` gives the ``[providers.api]`` table (default: the webhook);
    ``extra`` is appended to the configuration, ``limits`` to its ``[limits]`` table.
    """
    api = FakeEmailAPI()
    await api.start(reactor)
    config_path = write_config(tmp_path, tls_files, api.url, extra, provider=provider(api.url) if provider else None, limits=limits)
    for user, password in PASSWORDS.items():
        args = ["account", "add", "--config", str(config_path), user, "--password", password, "--cram-md5"]
        if user == "restricted":
            args += ["--allow-sender", "owner@example.com"]
        assert cli_main(args) == 0
    async for gateway in running_gateway(config_path, api, tls_files[2]):
        yield gateway


@pytest_twisted.async_yield_fixture
async def passthrough_gateway(tmp_path: Path, tls_files: tuple[Path, Path, Path]) -> Any:
    """A gateway whose SMTP login is the webhook's bearer token (no accounts file)."""
    api = FakeEmailAPI()
    await api.start(reactor)
    config_path = write_passthrough_config(tmp_path, tls_files, api.url)
    async for gateway in running_gateway(config_path, api, tls_files[2]):
        yield gateway


def write_passthrough_config(tmp: Path, tls_files: tuple[Path, Path, Path], api_url: str) -> Path:
    """:func:`write_config` with the passthrough store: the login's password is the webhook token."""
    config_path = write_config(tmp, tls_files, api_url)
    text = config_path.read_text()
    text = text.replace('store = "file"\npath = "accounts.toml"', 'store = "passthrough"\nprovider = "api"\npassword_settings = ["token"]')
    text = text.replace('token = "env:MAILGATE_TEST_API_TOKEN"\n', "")
    config_path.write_text(text)
    return config_path


async def running_gateway(config_path: Path, api: FakeEmailAPI, ca_path: Path) -> Any:
    """Start mailgate from ``config_path`` on the global reactor; yield it; stop everything."""
    config = load_config(config_path)
    client, pool = make_http_client(reactor)
    service = build_service(config, reactor, client)
    service.startService()
    ports = {}
    for listener, child in zip(config.listeners, service, strict=False):
        port = await child._waitingForPort
        ports[listener.role] = port.getHost().port
    try:
        yield Gateway(ports=ports, api=api, ca_path=ca_path, tmp=config_path.parent, service=service)
    finally:
        await service.stopService()
        await pool.closeCachedConnections()
        await api.stop()


@dataclass
class SMTPResult:
    code: int
    text: str
    transcript: list[str] = field(default_factory=list)


def smtplib_send(
    port: int,
    implicit_tls: bool,
    mechanism: str | None,
    user: str,
    password: str,
    context: ssl.SSLContext,
    sender: str,
    recipients: Sequence[str],
    message: bytes,
    source: str = "127.0.0.1",
) -> SMTPResult:
    """Send one message with Python's smtplib and return the reply to the final dot.

    ``source`` is the client's loopback address (any of 127.0.0.0/8), so tests can
    play a second client host."""
    bind = (source, 0)
    if implicit_tls:
        client: smtplib.SMTP = smtplib.SMTP_SSL(
            "127.0.0.1", port, context=context, timeout=10, source_address=bind
        )
    else:
        client = smtplib.SMTP("127.0.0.1", port, timeout=10, source_address=bind)
    try:
        client.ehlo("client.example")
        if not implicit_tls:
            client.starttls(context=context)
            client.ehlo("client.example")
        if mechanism is not None:
            client.user, client.password = user, password
            authobject = {
                "PLAIN": client.auth_plain,
                "LOGIN": client.auth_login,
                "CRAM-MD5": client.auth_cram_md5,
            }[mechanism]
            client.auth(mechanism, authobject, initial_response_ok=mechanism != "LOGIN")
        code, text = client.mail(sender)
        if code != 250:
            return SMTPResult(code, text.decode())
        for recipient in recipients:
            code, text = client.rcpt(recipient)
            if code != 250:
                return SMTPResult(code, text.decode())
        try:
            code, text = client.data(message)
        except smtplib.SMTPDataError as e:
            return SMTPResult(e.smtp_code, e.smtp_error.decode())
        return SMTPResult(code, text.decode())
    finally:
        try:
            client.quit()
        except (smtplib.SMTPServerDisconnected, OSError):
            pass


async def send_with_smtplib(gateway: Gateway, role: str, mechanism: str | None, **kwargs: Any) -> SMTPResult:
    return await threads.deferToThread(
        smtplib_send,
        gateway.ports[role],
        role == "submissions",
        mechanism,
        kwargs.pop("user", "alice"),
        kwargs.pop("password", PASSWORDS["alice"]),
        gateway.ssl_context(),
        **kwargs,
    )


def swaks_path() -> str:
    path = shutil.which("swaks")
    if path is None:
        pytest.fail("swaks is required for the integration tests (apt-get install swaks)")
    return path


def swaks_send(
    gateway: Gateway,
    role: str,
    mechanism: str,
    sender: str,
    recipients: Sequence[str],
    message_file: Path,
    user: str = "alice",
    password: str | None = None,
) -> subprocess.CompletedProcess[str]:
    args = [
        swaks_path(),
        "--server", f"127.0.0.1:{gateway.ports[role]}",
        "--tlsc" if role == "submissions" else "--tls",
        "--tls-verify", "--tls-ca-path", str(gateway.ca_path),
        "--ehlo", "client.example",
        "--auth", mechanism,
        "--auth-user", user,
        "--auth-password", password or PASSWORDS[user],
        "--from", sender,
        "--to", ",".join(recipients),
        "--data", str(message_file),
        "--timeout", "20",
    ]  # fmt: skip
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)

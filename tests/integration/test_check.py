"""``mailgate check``: one verdict line per check, against real files, real sockets
and a real HTTP API for provider probes; and the command itself, with no traceback."""

from __future__ import annotations

import dataclasses
import socket
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import trustme
from twisted.internet import reactor

from mailgate.check import run_checks, summary
from mailgate.providers import registry, webhook
from mailgate.providers.base import HTTPRequest
from mailgate.providers.providertype import Probe
from mailgate.testing import FakeEmailAPI, ScriptedResponse
from mailgate.transports import make_http_client

from ..sigv4_check import expected_signature, parse_authorization
from .test_twistd import run_env

TEST_TOKEN = "test-probe-token-not-a-secret"


def write_files(tmp: Path, names: tuple[str, ...] = ("localhost", "127.0.0.1"), **cert: Any) -> None:
    issued = trustme.CA().issue_cert(*names, **cert)
    issued.private_key_pem.write_to_path(str(tmp / "privkey.pem"))
    (tmp / "fullchain.pem").write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    (tmp / "state").mkdir(exist_ok=True)
    (tmp / "accounts.toml").write_text("")


def write_config(tmp: Path, url: str = "https://api.example.com/v1", listener: str = "tcp:0:interface=127.0.0.1", extra: str = "") -> Path:
    path = tmp / "mailgate.toml"
    path.write_text(
        f"""
[server]
hostname = "localhost"
state_dir = "state"

[tls]
certificate = "fullchain.pem"
private_key = "privkey.pem"

[[listeners]]
endpoint = "{listener}"
role = "submission"

[delivery]
api_timeout = 1

[accounts]
path = "accounts.toml"

[providers.main]
type = "webhook"
url = "{url}"
token = "{TEST_TOKEN}"
{extra}
"""
    )
    return path


async def check(path: Path, now: datetime | None = None) -> tuple[list[str], int]:
    client, pool = make_http_client(reactor)
    try:
        verdicts = await run_checks(path, reactor, client, lambda verdict: None, now)
    finally:
        await pool.closeCachedConnections()
    return [v.line() for v in verdicts], summary(verdicts)[1]


@pytest_twisted.ensureDeferred
async def test_everything_fine(tmp_path: Path) -> None:
    """A good configuration gets one OK line per check (the webhook is not probed) and exit 0."""
    write_files(tmp_path)
    lines, status = await check(write_config(tmp_path))
    assert status == 0
    assert [line.split(":")[0] for line in lines] == [
        "OK   config", "OK   tls", "OK   state_dir", "OK   accounts", "OK   listeners[0] (submission)",
        "SKIP provider main",
    ]  # fmt: skip
    assert lines[1].startswith(f"OK   tls: {tmp_path}/fullchain.pem: valid for localhost until ")
    assert lines[4] == "OK   listeners[0] (submission): tcp:0:interface=127.0.0.1: can listen on 127.0.0.1"
    assert lines[5] == "SKIP provider main: settings valid; not probed (webhook offers no harmless API call)"


@pytest_twisted.ensureDeferred
async def test_certificate_expiry_and_name(tmp_path: Path) -> None:
    """Under 14 days to expiry is a warning, expired a failure; a certificate without
    the server's hostname is a warning."""
    write_files(tmp_path, not_after=datetime.now(UTC) + timedelta(days=30))
    path = write_config(tmp_path)
    lines, status = await check(path, now=datetime.now(UTC) + timedelta(days=20))
    assert lines[1].startswith(f"WARN tls: {tmp_path}/fullchain.pem: expires in 9 days, on ")
    assert status == 0
    lines, status = await check(path, now=datetime.now(UTC) + timedelta(days=31))
    assert lines[1].startswith(f"FAIL tls: {tmp_path}/fullchain.pem: expired on ")
    assert status == 1
    write_files(tmp_path, names=("mail.example.org",))
    lines, _ = await check(path)
    assert lines[1] == (
        f"WARN tls: {tmp_path}/fullchain.pem: not valid for server.hostname 'localhost'; "
        "clients that check the name will refuse it"
    )


@pytest_twisted.ensureDeferred
async def test_mismatched_key_fails(tmp_path: Path) -> None:
    """A key that does not belong to the certificate fails the tls check."""
    write_files(tmp_path)
    key = (tmp_path / "privkey.pem").read_bytes()
    write_files(tmp_path)
    (tmp_path / "privkey.pem").write_bytes(key)
    lines, status = await check(write_config(tmp_path))
    assert lines[1].startswith(f"FAIL tls: TLS private key {tmp_path}/privkey.pem does not match")
    assert status == 1


@pytest_twisted.ensureDeferred
async def test_listener_that_cannot_bind(tmp_path: Path) -> None:
    """A port already taken fails with the reason and a hint; a systemd socket is skipped;
    an invalid endpoint string fails."""
    write_files(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        lines, status = await check(write_config(tmp_path, listener=f"tcp:{port}:interface=127.0.0.1"))
    assert lines[4] == (
        f"FAIL listeners[0] (submission): tcp:{port}:interface=127.0.0.1: cannot listen on 127.0.0.1:{port}: "
        "Address already in use (already in use: is mailgate, or another server, running?)"
    )
    assert status == 1
    lines, _ = await check(write_config(tmp_path, listener="systemd:domain=INET:index=0"))
    assert lines[4] == "SKIP listeners[0] (submission): systemd:domain=INET:index=0: the socket comes from systemd, not bound here"
    lines, _ = await check(write_config(tmp_path, listener="tcp:many"))
    assert lines[4].startswith("FAIL listeners[0] (submission): invalid endpoint string 'tcp:many'")


@pytest_twisted.ensureDeferred
async def test_configuration_and_accounts_errors(tmp_path: Path) -> None:
    """A configuration error is the only line; an account routed to an unknown provider fails."""
    write_files(tmp_path)
    path = write_config(tmp_path, extra="[limits]\nmax_recipients = 0\n")
    assert await check(path) == (["FAIL config: limits.max_recipients: must be a finite number greater than zero"], 1)
    path = write_config(tmp_path)
    (tmp_path / "accounts.toml").write_text('[accounts.app]\npassword = "sha256$' + "0" * 64 + '"\nroute = ["nope"]\n')
    lines, status = await check(path)
    assert lines[3] == "FAIL accounts: accounts.app.route: no provider named 'nope'"
    assert status == 1


def probing_webhook(name: str, settings: Any) -> Probe:
    """A probe for the tests: GET <url>/account with the bearer token."""
    headers = (("Authorization", f"Bearer {settings['token']}"),)
    return Probe(HTTPRequest("GET", settings["url"] + "/account", headers, b"", name))


@pytest_twisted.ensureDeferred
async def test_provider_probe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A provider with a probe is asked once with its credentials: accepted is OK,
    refused or silent or unreachable is FAIL with the reason, and no secret is printed."""
    monkeypatch.setitem(registry.TYPES, "webhook", dataclasses.replace(webhook.PROVIDER, probe=probing_webhook))
    write_files(tmp_path)
    api = FakeEmailAPI()
    await api.start(reactor)
    closed_port_url = api.url  # Nothing listens there once the API has stopped.
    try:
        path = write_config(tmp_path, url=api.url)
        api.respond(
            ScriptedResponse(status=200, body={"name": "test server"}),
            ScriptedResponse(status=401, body={"message": "Invalid API token"}),
            ScriptedResponse(hang=True),
        )
        verdicts = [(await check(path))[0][-1] for _ in range(3)]
        assert [(r.method, r.path, r.headers["authorization"]) for r in api.requests] == [
            ("GET", "/account", f"Bearer {TEST_TOKEN}")
        ] * 3
        api.assert_script_consumed()
    finally:
        await api.stop()
    verdicts.append((await check(write_config(tmp_path, url=closed_port_url)))[0][-1])
    assert verdicts == [
        "OK   provider main: 127.0.0.1 accepted the credentials (HTTP 200)",
        "FAIL provider main: 127.0.0.1: the API refused the credentials (HTTP 401): Invalid API token",
        "FAIL provider main: no answer from 127.0.0.1 within 1 s",
        "FAIL provider main: cannot reach 127.0.0.1: ConnectionRefusedError",
    ]
    assert not any(TEST_TOKEN in line for line in verdicts)


@pytest_twisted.ensureDeferred
async def test_passthrough_provider_is_not_probed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With passthrough logins there is no operator credential to probe."""
    monkeypatch.setitem(registry.TYPES, "webhook", dataclasses.replace(webhook.PROVIDER, probe=probing_webhook))
    write_files(tmp_path)
    path = write_config(tmp_path)
    text = path.read_text().replace('path = "accounts.toml"', 'store = "passthrough"\nprovider = "main"\npassword_settings = ["token"]')
    path.write_text(text.replace(f'token = "{TEST_TOKEN}"\n', ""))
    lines, status = await check(path)
    assert lines[3] == "OK   accounts: passthrough: SMTP logins are main's credentials"
    assert lines[-1] == "SKIP provider main: not probed: its credentials come from each SMTP login (passthrough)"
    assert status == 0


def run_check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mailgate.cli", "check", "--config", str(path)],
        capture_output=True, text=True, env=run_env(), timeout=120, check=False,
    )  # fmt: skip


def test_command_exit_status_and_output(tmp_path: Path) -> None:
    """`mailgate check` prints the verdicts and a summary; exit 0 when nothing failed,
    1 when something did; never a traceback."""
    write_files(tmp_path)
    path = write_config(tmp_path)
    good = run_check(path)
    assert good.returncode == 0, good.stdout + good.stderr
    assert good.stdout.splitlines()[-1] == "mailgate check: 0 failed, 0 warnings, 6 checks"
    (tmp_path / "privkey.pem").unlink()
    bad = run_check(path)
    assert bad.returncode == 1
    assert f"FAIL tls: TLS private key {tmp_path}/privkey.pem: cannot read: No such file or directory" in bad.stdout
    assert bad.stdout.splitlines()[-1] == "mailgate check: 1 failed, 0 warnings, 6 checks"
    missing = run_check(tmp_path / "nothing.toml")
    assert (missing.returncode, missing.stdout.splitlines()[0]) == (1, f"FAIL config: --config: {tmp_path}/nothing.toml: no such file")
    for completed in (good, bad, missing):
        assert "Traceback" not in completed.stdout + completed.stderr
        assert TEST_TOKEN not in completed.stdout + completed.stderr


# Fixtures, not secrets (the SES pair is AWS's documented example).
POSTMARK_TOKEN = "test-postmark-probe-token"
SES_KEY_ID, SES_SECRET = "AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"


def probed_providers(url: str) -> str:
    return f"""
[providers.pm]
type = "postmark"
url = "{url}"
token = "{POSTMARK_TOKEN}"

[providers.aws]
type = "ses"
url = "{url}"
region = "eu-west-1"
access_key_id = "{SES_KEY_ID}"
secret_access_key = "{SES_SECRET}"
"""


async def run_check_command(path: Path) -> tuple[int, str]:
    """``mailgate check`` as a separate process, without blocking this reactor (the fake API runs on it)."""
    from twisted.internet.utils import getProcessOutputAndValue

    out, err, code = await getProcessOutputAndValue(
        sys.executable, ["-m", "mailgate.cli", "check", "--config", str(path)], env=run_env(), path=str(path.parent)
    )
    return code, (out + err).decode()


@pytest_twisted.ensureDeferred
async def test_postmark_and_ses_probes_against_a_fake_api(tmp_path: Path) -> None:
    """`mailgate check` asks Postmark for its server and SES for its account, authenticated
    as a send would be (SES signature checked independently); accepted credentials are OK
    and exit 0, refused ones are FAIL lines with the API's reason and exit 1; no secret printed."""
    write_files(tmp_path)
    api = FakeEmailAPI()
    await api.start(reactor)
    try:
        path = write_config(tmp_path, extra=probed_providers(api.url))
        api.respond(
            ScriptedResponse(200, {"ID": 1, "Name": "Production"}),
            ScriptedResponse(200, {"SendingEnabled": True, "ProductionAccessEnabled": True}),
        )
        good_status, good = await run_check_command(path)
        api.respond(
            ScriptedResponse(401, {"ErrorCode": 10, "Message": "Request does not contain a valid Server token."}),
            ScriptedResponse(
                403,
                {"message": "The security token included in the request is invalid."},
                (("x-amzn-ErrorType", "UnrecognizedClientException:http://internal.amazon.com/"),),
            ),
        )
        bad_status, bad = await run_check_command(path)
        api.assert_script_consumed()
    finally:
        await api.stop()
    assert good_status == 0, good
    assert good.splitlines()[-3:] == [
        "OK   provider pm: 127.0.0.1 accepted the credentials (HTTP 200)",
        "OK   provider aws: 127.0.0.1 accepted the credentials (HTTP 200)",
        "mailgate check: 0 failed, 0 warnings, 8 checks",
    ]
    assert bad_status == 1, bad
    assert bad.splitlines()[-3:] == [
        (
            "FAIL provider pm: 127.0.0.1: the API refused the credentials (HTTP 401): "
            "Request does not contain a valid Server token."
        ),
        (
            "FAIL provider aws: 127.0.0.1: the API refused the credentials (HTTP 403): "
            "UnrecognizedClientException: The security token included in the request is invalid."
        ),
        "mailgate check: 2 failed, 0 warnings, 8 checks",
    ]
    postmark, ses = api.requests[:2]
    assert [(r.method, r.path) for r in api.requests] == [("GET", "/server"), ("GET", "/v2/email/account")] * 2
    assert (postmark.method, postmark.path, postmark.headers["x-postmark-server-token"]) == ("GET", "/server", POSTMARK_TOKEN)
    assert (ses.method, ses.path, ses.body) == ("GET", "/v2/email/account", b"")
    signature = parse_authorization(ses.headers["authorization"])
    assert (signature["key"], signature["region"], signature["service"]) == (SES_KEY_ID, "eu-west-1", "ses")
    assert signature["signature"] == expected_signature("GET", "/v2/email/account", ses.headers, b"", SES_SECRET)
    for output in (good, bad):
        assert "Traceback" not in output
        assert POSTMARK_TOKEN not in output and SES_SECRET not in output


@pytest_twisted.ensureDeferred
async def test_probe_warnings_and_notes(tmp_path: Path) -> None:
    """An SES account in the sandbox is a WARN line (exit 0); Postmark unavailable is a FAIL."""
    write_files(tmp_path)
    api = FakeEmailAPI()
    await api.start(reactor)
    try:
        api.respond(
            ScriptedResponse(503, b"Service Unavailable"),
            ScriptedResponse(200, {"SendingEnabled": True, "ProductionAccessEnabled": False}),
        )
        lines, status = await check(write_config(tmp_path, extra=probed_providers(api.url)))
        api.assert_script_consumed()
    finally:
        await api.stop()
    assert lines[-2:] == [
        "FAIL provider pm: 127.0.0.1: the API is unavailable right now (HTTP 503), try again: Service Unavailable",
        (
            "WARN provider aws: 127.0.0.1: the credentials work; the account is in the SES sandbox in eu-west-1: "
            "it sends only to verified addresses"
        ),
    ]
    assert status == 1


@pytest_twisted.ensureDeferred
async def test_accounts_file_that_is_not_utf8_fails_one_line(tmp_path: Path) -> None:
    """An accounts file that is not UTF-8 is one FAIL line naming the file; the checks after it still run."""
    write_files(tmp_path)
    (tmp_path / "accounts.toml").write_bytes('[accounts.zoë]\npassword = "x"\n'.encode("latin-1"))
    lines, status = await check(write_config(tmp_path))
    assert lines[3] == f"FAIL accounts: {tmp_path}/accounts.toml: not valid TOML: the file is not UTF-8"
    assert len(lines) == 6 and status == 1

"""The ``smtp`` provider against real upstream SMTP servers on loopback.

Two upstreams: a second mailgate in capture mode (real STARTTLS and implicit
TLS with trustme certificates, AUTH against its own accounts file), and
Postfix's smtp-sink, whose options inject 4xx/5xx replies and slow answers
and whose dump shows the bytes that arrived.  The client is smtplib over TLS
into the front mailgate, so each test is client -> mailgate -> smtp provider
-> upstream.
"""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import trustme
from twisted.internet import reactor

from mailgate.cli import main as cli_main
from mailgate.testing import FakeEmailAPI

from .conftest import PASSWORDS, Gateway, running_gateway, send_with_smtplib, write_config
from .smtp_sink import Sink, smtp_sink

# Throwaway test credentials, not secrets: the front's login at the upstream.
RELAY_USER, RELAY_PASSWORD = "relay", "relay-test-password"
SENDER = "alice@example.com"
TO, CC, HIDDEN = "bob@example.org", "carol@example.net", "dave.hidden@example.com"
MESSAGE = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: Bob <bob@example.org>\r\n"
    b"Cc: carol@example.net\r\n"
    b"Bcc: dave.hidden@example.com\r\n"
    b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n"
    b"X-Mailgate-Tag: relay-test\r\n"
    b"X-Campaign:   q4   (spacing kept)\r\n"
    b"Message-ID: <relay-1@example.com>\r\n"
    b"\r\n"
    b"Hello Bob,\r\n"
    b".a line that starts with a dot\r\n"
    b".\r\n"
    b"..two dots\r\n"
    b"caf\xc3\xa9\r\n"
)
# What the upstream must receive after mailgate's Received header: the message
# minus the Bcc and control header fields, every other byte as sent.
FORWARDED = MESSAGE.replace(b"Bcc: dave.hidden@example.com\r\n", b"").replace(b"X-Mailgate-Tag: relay-test\r\n", b"")


@pytest.fixture(autouse=True)
def api_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """The front's webhook provider reads its token from the environment (conftest.write_config)."""
    monkeypatch.setenv("MAILGATE_TEST_API_TOKEN", "unused")


@pytest.fixture
def relay_ca(tmp_path: Path) -> dict[str, Path]:
    """One CA; a certificate for the loopback names and one for another name only."""
    ca = trustme.CA()
    paths = {"ca": tmp_path / "relay-ca.pem"}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    for label, names in (("good", ("localhost", "127.0.0.1")), ("wrong", ("wrong.example",))):
        cert = ca.issue_cert(*names)
        paths[f"{label}-chain"] = tmp_path / f"{label}-chain.pem"
        paths[f"{label}-key"] = tmp_path / f"{label}-key.pem"
        paths[f"{label}-chain"].write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
        cert.private_key_pem.write_to_path(str(paths[f"{label}-key"]))
    return paths


@asynccontextmanager
async def upstream_mailgate(tmp: Path, chain: Path, key: Path, ca: Path) -> AsyncIterator[Gateway]:
    """A second mailgate: submission (STARTTLS) and submissions (implicit TLS), AUTH
    required, every message captured as JSON under ``tmp/captured``."""
    tmp.mkdir()
    config = tmp / "mailgate.toml"
    config.write_text(
        f"""
[server]
hostname = "upstream.localhost"
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

[accounts]
store = "file"
path = "accounts.toml"

[providers.capture]
type = "capture"
folder = "captured"
""",
        encoding="utf-8",
    )
    assert cli_main(["account", "add", "--config", str(config), RELAY_USER, "--password", RELAY_PASSWORD]) == 0
    async with aclosing(running_gateway(config, FakeEmailAPI(), ca)) as running:
        async for gateway in running:
            yield gateway


def captured(upstream: Gateway) -> list[dict[str, Any]]:
    folder = upstream.tmp / "captured"
    files = sorted(folder.glob("*.json")) if folder.exists() else []
    return [json.loads(path.read_text())["body"] for path in files]


@asynccontextmanager
async def front_mailgate(
    tmp: Path, tls_files: tuple[Path, Path, Path], relay: str, route: str = "relay"
) -> AsyncIterator[Gateway]:
    """mailgate with ``[providers.relay]`` (type smtp, the given settings) and the webhook
    API ``api``; account alice routes to ``route``."""
    tmp.mkdir()
    api = FakeEmailAPI()
    await api.start(reactor)
    config = write_config(tmp, tls_files, api.url, extra=f'\n[providers.relay]\ntype = "smtp"\n{relay}\n')
    add = ["account", "add", "--config", str(config), "alice", "--password", PASSWORDS["alice"], "--route", route]
    assert cli_main(add) == 0
    async with aclosing(running_gateway(config, api, tls_files[2])) as running:
        async for gateway in running:
            yield gateway


def upstream_with(tmp_path: Path, relay_ca: dict[str, Path], cert: str = "good") -> Any:
    """The upstream mailgate serving the ``good`` (loopback names) or ``wrong`` certificate."""
    return upstream_mailgate(tmp_path / "up", relay_ca[f"{cert}-chain"], relay_ca[f"{cert}-key"], relay_ca["ca"])


async def relay_once(tmp_path: Path, tls_files: tuple[Path, Path, Path], relay: str, name: str = "front") -> Any:
    """Send MESSAGE once through a front mailgate whose relay provider has ``relay`` settings."""
    async with front_mailgate(tmp_path / name, tls_files, relay) as front:
        return await send(front)


def mailgate_relay(upstream: Gateway, ca: Path, role: str = "submission", **overrides: Any) -> str:
    """Settings for the upstream mailgate; an override of None leaves that setting out."""
    settings: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": upstream.ports[role],
        "tls": "starttls" if role == "submission" else "implicit",
        "ca_file": str(ca),
        "username": RELAY_USER,
        "password": RELAY_PASSWORD,
        "connect_timeout": 30,
        "command_timeout": 30,
    }
    settings.update(overrides)
    return "\n".join(f"{key} = {json.dumps(value)}" for key, value in settings.items() if value is not None)


def sink_relay(sink: Sink, **overrides: Any) -> str:
    settings: dict[str, Any] = {"host": "127.0.0.1", "port": sink.port, "tls": "none", "command_timeout": 30}
    settings.update(overrides)
    return "\n".join(f"{key} = {json.dumps(value)}" for key, value in settings.items())


async def send(front: Gateway, role: str = "submissions", message: bytes = MESSAGE) -> Any:
    return await send_with_smtplib(front, role, "PLAIN", sender=SENDER, recipients=[TO, CC, HIDDEN], message=message)


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("upstream_role", ["submission", "submissions"])
async def test_end_to_end_through_a_tls_upstream(
    tmp_path: Path, tls_files: tuple[Path, Path, Path], relay_ca: dict[str, Path], upstream_role: str
) -> None:
    """smtplib over TLS -> mailgate -> STARTTLS (or implicit TLS) + AUTH -> upstream mailgate:
    the Bcc recipient arrives, the Bcc and control headers do not, and the client's 250
    carries the upstream's message id."""
    async with upstream_with(tmp_path, relay_ca) as upstream:
        relay = mailgate_relay(upstream, relay_ca["ca"], upstream_role)
        async with front_mailgate(tmp_path / "front", tls_files, relay) as front:
            result = await send(front)
    [document] = captured(upstream)
    assert (result.code, result.text) == (250, f"2.0.0 Ok: {document['id']}")
    assert document["account"] == RELAY_USER
    assert document["envelope"] == {"mail_from": SENDER, "rcpt_to": [TO, CC, HIDDEN]}
    assert [a["address"] for a in document["bcc"]] == [HIDDEN]
    assert document["controls"]["tags"] == []  # X-Mailgate-Tag was not forwarded
    assert document["subject"] == "Grüße"
    assert {"name": "X-Campaign", "value": "q4   (spacing kept)"} in document["headers"]
    assert not any(h["name"].lower() == "bcc" for h in document["headers"])
    assert document["text"] == "Hello Bob,\n.a line that starts with a dot\n.\n..two dots\ncafé\n"
    assert front.api.requests == []


@pytest_twisted.ensureDeferred
async def test_certificate_for_another_name_is_refused(
    tmp_path: Path, tls_files: tuple[Path, Path, Path], relay_ca: dict[str, Path]
) -> None:
    """An upstream whose certificate does not name the configured host gets nothing: the
    client hears 451 4.7.5 with the reason, and no message reaches the upstream."""
    async with upstream_with(tmp_path, relay_ca, "wrong") as upstream:
        for role in ("submission", "submissions"):
            result = await relay_once(tmp_path, tls_files, mailgate_relay(upstream, relay_ca["ca"], role), role)
            stage = "STARTTLS" if role == "submission" else "greeting"
            assert (result.code, result.text) == (
                451,
                (
                    f"4.7.5 Temporary failure at relay: 127.0.0.1:{upstream.ports[role]} ({stage}): "
                    "the server's certificate is not valid for this host name"
                ),
            )
    assert captured(upstream) == []


@pytest_twisted.ensureDeferred
async def test_untrusted_ca_is_refused(
    tmp_path: Path, tls_files: tuple[Path, Path, Path], relay_ca: dict[str, Path]
) -> None:
    """Without ca_file the system CAs do not know the upstream's private CA: 451 4.7.5."""
    async with upstream_with(tmp_path, relay_ca) as upstream:
        result = await relay_once(tmp_path, tls_files, mailgate_relay(upstream, relay_ca["ca"], ca_file=None))
    assert result.code == 451
    assert result.text.startswith("4.7.5 Temporary failure at relay: ")
    assert "TLS handshake failed: certificate verify failed" in result.text
    assert captured(upstream) == []


@pytest_twisted.ensureDeferred
async def test_upstream_refuses_the_credentials(
    tmp_path: Path, tls_files: tuple[Path, Path, Path], relay_ca: dict[str, Path]
) -> None:
    """A wrong relay password is refused by the upstream with 535: the client hears 554 5.7.8."""
    async with upstream_with(tmp_path, relay_ca) as upstream:
        relay = mailgate_relay(upstream, relay_ca["ca"], password="wrong-relay-password")
        result = await relay_once(tmp_path, tls_files, relay)
    assert (result.code, result.text) == (
        554,
        (
            f"5.7.8 Rejected by relay: 127.0.0.1:{upstream.ports['submission']} refused the credentials: "
            "535 5.7.8 Authentication credentials invalid"
        ),
    )
    assert captured(upstream) == []


@pytest_twisted.ensureDeferred
async def test_passthrough_login_is_the_upstream_login(
    tmp_path: Path, tls_files: tuple[Path, Path, Path], relay_ca: dict[str, Path]
) -> None:
    """With the passthrough store the client's SMTP login is used for AUTH at the upstream."""
    async with upstream_with(tmp_path, relay_ca) as upstream:
        front_dir = tmp_path / "front"
        front_dir.mkdir()
        api = FakeEmailAPI()
        await api.start(reactor)
        relay = mailgate_relay(upstream, relay_ca["ca"], username=None, password=None)
        config = write_config(front_dir, tls_files, api.url, extra=f'\n[providers.relay]\ntype = "smtp"\n{relay}\n')
        text = config.read_text().replace(
            'store = "file"\npath = "accounts.toml"',
            'store = "passthrough"\nprovider = "relay"\nusername_setting = "username"\npassword_settings = ["password"]',
        )
        config.write_text(text.replace('[delivery]\n', '[delivery]\nroute = ["relay"]\n'))
        async for front in running_gateway(config, api, tls_files[2]):
            good = await send_with_smtplib(
                front, "submission", "LOGIN", user=RELAY_USER, password=RELAY_PASSWORD,
                sender=SENDER, recipients=[TO], message=MESSAGE,
            )  # fmt: skip
            bad = await send_with_smtplib(
                front, "submission", "PLAIN", user=RELAY_USER, password="not-the-password",
                sender=SENDER, recipients=[TO], message=MESSAGE,
            )  # fmt: skip
    assert good.code == 250
    assert bad.code == 554 and bad.text.startswith("5.7.8 Rejected by relay:")
    assert [d["envelope"]["rcpt_to"] for d in captured(upstream)] == [[TO]]


# -- smtp-sink: exact bytes, injected replies, slow answers -------------------------


def sink_message(dump: bytes) -> bytes:
    """The message as smtp-sink received it: after its X-* lines and its three-line
    Received header, LF turned back into CRLF, without the empty line it appends."""
    pos = dump.index(b"Received: from ")
    for _ in range(3):
        pos = dump.index(b"\n", pos) + 1
    message = dump[pos:]
    assert message.endswith(b"\n\n")
    return message[:-1].replace(b"\n", b"\r\n")


@pytest_twisted.ensureDeferred
async def test_body_arrives_byte_for_byte(tmp_path: Path, tls_files: tuple[Path, Path, Path]) -> None:
    """Postfix's smtp-sink receives every envelope recipient and the message with only
    mailgate's Received header added and the Bcc/control fields removed; leading dots survive."""
    with smtp_sink(tmp_path) as sink:
        async with front_mailgate(tmp_path / "front", tls_files, sink_relay(sink, helo="relay.mailgate.test")) as front:
            result = await send(front)
        [dump] = sink.dumps()
    assert (result.code, result.text[:9]) == (250, "2.0.0 Ok:")
    header = dump.split(b"Received: from ")[0]
    assert b"X-Helo-Args: relay.mailgate.test\n" in header
    assert f"X-Mail-Args: <{SENDER}> BODY=8BITMIME\n".encode() in header
    assert header.count(b"X-Rcpt-Args:") == 3 and f"X-Rcpt-Args: <{HIDDEN}>".encode() in header
    message = sink_message(dump)
    ours, _, rest = message.partition(b"\r\n\tby localhost (mailgate) with ESMTPSA id ")
    assert ours == b"Received: from client.example ([127.0.0.1])"
    assert rest.split(b"\r\n", 2)[2] == FORWARDED


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    ("options", "code", "text", "data_sent"),
    [
        (["-r", "."], 451, "4.3.0 Temporary failure at relay: {server} answered end of data with 450 4.3.0 Error: command failed", True),
        (["-r", "MAIL"], 451, "4.3.0 Temporary failure at relay: {server} answered MAIL with 450 4.3.0 Error: command failed", False),
        (["-f", "."], 554, "5.3.0 Rejected by relay: {server} answered end of data with 500 5.3.0 Error: command failed", True),
        (
            ["-f", "RCPT", "-B", "550 5.1.1 Recipient address rejected: User unknown"],
            550,
            (
                "5.1.1 Rejected by relay: {server} refused recipient bob@example.org: 550 5.1.1 Recipient "
                "address rejected: User unknown (and 2 more recipients)"
            ),
            False,
        ),
    ],
    ids=["4xx-end-of-data", "4xx-mail", "5xx-end-of-data", "5xx-rcpt"],
)
async def test_upstream_replies_reach_the_client(
    tmp_path: Path,
    tls_files: tuple[Path, Path, Path],
    options: list[str],
    code: int,
    text: str,
    data_sent: bool,
) -> None:
    """A 4xx from the upstream is 451 to the client, a 5xx is 550/554 with the upstream's
    enhanced code and text; a refused recipient means no DATA at all."""
    with smtp_sink(tmp_path, options) as sink:
        async with front_mailgate(tmp_path / "front", tls_files, sink_relay(sink)) as front:
            result = await send(front)
        dumps = sink.dumps()
    assert (result.code, result.text) == (code, text.format(server=f"127.0.0.1:{sink.port}"))
    assert any(b"Hello Bob" in dump for dump in dumps) == data_sent  # no DATA after a refusal
    assert front.api.requests == []


@pytest_twisted.ensureDeferred
async def test_unreachable_upstream_fails_over(tmp_path: Path, tls_files: tuple[Path, Path, Path]) -> None:
    """A refused connection sent nothing, so the next provider of the route delivers."""
    with socket.socket() as held:  # bound, not listening: connections to it are refused
        held.bind(("127.0.0.1", 0))
        relay = f'host = "127.0.0.1"\nport = {held.getsockname()[1]}\ntls = "none"'
        async with front_mailgate(tmp_path / "front", tls_files, relay, route="relay,api") as front:
            result = await send(front)
    assert (result.code, result.text) == (250, "2.0.0 Ok: fake-1")
    assert len(front.api.requests) == 1


@pytest_twisted.ensureDeferred
async def test_421_greeting_fails_over(tmp_path: Path, tls_files: tuple[Path, Path, Path]) -> None:
    """An upstream that answers 421 and hangs up took nothing: the next provider delivers."""
    with smtp_sink(tmp_path, ["-Q", "CONNECT"]) as sink:
        async with front_mailgate(tmp_path / "front", tls_files, sink_relay(sink), route="relay,api") as front:
            result = await send(front)
    assert (result.code, result.text) == (250, "2.0.0 Ok: fake-1")


@pytest_twisted.ensureDeferred
async def test_no_reply_after_the_final_dot_is_ambiguous(
    tmp_path: Path, tls_files: tuple[Path, Path, Path]
) -> None:
    """The upstream may have the message when it hangs up instead of answering the final
    dot: the client hears 451 and no other provider is tried (that could duplicate it)."""
    with smtp_sink(tmp_path, ["-q", "."]) as sink:
        async with front_mailgate(tmp_path / "front", tls_files, sink_relay(sink), route="relay,api") as front:
            result = await send(front)
    assert (result.code, result.text) == (
        451, f"4.4.2 Temporary failure at relay: 127.0.0.1:{sink.port} (end of data): the server closed the connection",
    )  # fmt: skip
    assert front.api.requests == []


@pytest_twisted.ensureDeferred
async def test_hang_up_before_the_final_dot_fails_over(
    tmp_path: Path, tls_files: tuple[Path, Path, Path]
) -> None:
    """An upstream that hangs up at DATA has certainly not got the message: the next provider delivers."""
    with smtp_sink(tmp_path, ["-q", "DATA"]) as sink:
        async with front_mailgate(tmp_path / "front", tls_files, sink_relay(sink), route="relay,api") as front:
            result = await send(front)
    assert (result.code, result.text) == (250, "2.0.0 Ok: fake-1")

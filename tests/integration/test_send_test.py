"""``mailgate send-test`` against the real in-process gateway: TLS as each role
requires, AUTH, the final reply with the provider's id, the dialogue with AUTH
redacted, and exit statuses."""

from __future__ import annotations

import base64
import re
import socket
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineReceiver

from mailgate.cli import main as cli_main
from mailgate.config import ListenerConfig, load_config
from mailgate.sendtest import Dialogue, SendTestError, Target, listener_target
from mailgate.testing import ScriptedResponse
from mailgate.tls import server_context_factory

from .conftest import PASSWORDS, Gateway


def password_file(gateway: Gateway, password: str = PASSWORDS["alice"]) -> Path:
    path = gateway.tmp / "password"
    path.write_text(password + "\n")
    return path


def config_with_ports(gateway: Gateway, **replace: str) -> Path:
    """The gateway's configuration with the ports it really bound (it was started on tcp:0)."""
    text = (gateway.tmp / "mailgate.toml").read_text()
    for role in ("submission", "submissions", "relay"):
        text = text.replace(
            f'endpoint = "tcp:0:interface=127.0.0.1"\nrole = "{role}"',
            f'endpoint = "tcp:{gateway.ports[role]}:interface=127.0.0.1"\nrole = "{role}"',
        )
    for old, new in replace.items():
        text = text.replace(old, new)
    path = gateway.tmp / "send-test.toml"
    path.write_text(text)
    return path


async def send_test(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = await threads.deferToThread(cli_main, ["send-test", *args])
    out, err = capsys.readouterr()
    return status, out, err


@pytest_twisted.ensureDeferred
async def test_submission_with_auth_and_dialogue(gateway: Gateway, capsys: pytest.CaptureFixture[str]) -> None:
    """STARTTLS then AUTH on the submission listener: 250 with the API's id, exit 0; the
    dialogue shows TLS and the AUTH exchange redacted, never the password."""
    gateway.api.respond(ScriptedResponse(status=200, body={"id": "api-test-1"}))
    status, out, err = await send_test(
        capsys, "--config", str(config_with_ports(gateway)), "--to", "bob@example.org", "--from", "alice@example.com",
        "--user", "alice", "--password-file", str(password_file(gateway)), "--show-dialogue",
    )  # fmt: skip
    assert (status, err) == (0, "")
    lines = out.splitlines()
    assert lines[-1] == "250 2.0.0 Ok: api-test-1"
    assert "C: STARTTLS" in lines
    assert any(re.fullmatch(r"   \(TLS TLSv1\.[23] established, certificate verified for localhost\)", line) for line in lines)
    auth = lines.index("C: AUTH PLAIN <redacted>")
    assert lines[auth + 1] == "S: 235 2.7.0 Authentication successful"
    assert any(re.fullmatch(r"C: <message, \d+ octets>", line) for line in lines)
    password = PASSWORDS["alice"]
    assert password not in out
    assert base64.b64encode(password.encode()).decode()[:12] not in out
    [request] = gateway.api.requests
    document = request.json()
    assert (document["account"], document["subject"]) == ("alice", "mailgate send-test via submission")
    assert document["envelope"] == {"mail_from": "alice@example.com", "rcpt_to": ["bob@example.org"]}


@pytest_twisted.ensureDeferred
async def test_implicit_tls_listener_and_relay(gateway: Gateway, capsys: pytest.CaptureFixture[str]) -> None:
    """The submissions listener is spoken to in TLS from the first byte; the relay listener
    accepts the trusted loopback without AUTH."""
    config = str(config_with_ports(gateway))
    status, out, _ = await send_test(
        capsys, "--config", config, "--listener", "1", "--to", "bob@example.org",
        "--user", "alice", "--password-file", str(password_file(gateway)), "--show-dialogue",
    )  # fmt: skip
    assert status == 0
    assert "C: STARTTLS" not in out and out.splitlines()[-1] == "250 2.0.0 Ok: fake-1"
    status, out, _ = await send_test(capsys, "--config", config, "--listener", "2", "--to", "bob@example.org")
    assert (status, out) == (0, "250 2.0.0 Ok: fake-2\n")
    assert [r.json()["account"] for r in gateway.api.requests] == ["alice", "trusted-networks"]


@pytest_twisted.ensureDeferred
async def test_failures_exit_1_with_the_reply(gateway: Gateway, capsys: pytest.CaptureFixture[str]) -> None:
    """A transient API failure and a wrong password print the server's reply and exit 1."""
    gateway.api.respond(ScriptedResponse(status=503))
    common = ["--config", str(gateway.tmp / "mailgate.toml"), "--server", f"127.0.0.1:{gateway.ports['submission']}", "--to", "b@example.org", "--user", "alice"]
    status, out, _ = await send_test(capsys, *common, "--password-file", str(password_file(gateway)))
    assert (status, out) == (1, "451 4.3.0 Temporary failure at api: API unavailable (HTTP 503)\n")
    status, out, _ = await send_test(capsys, *common, "--password-file", str(password_file(gateway, "wrong")))
    assert (status, out) == (1, "535 5.7.8 Authentication credentials invalid\n")
    status, out, _ = await send_test(capsys, *common[:6])
    assert (status, out) == (1, "530 5.7.0 Authentication required\n")


@pytest_twisted.ensureDeferred
async def test_cannot_connect_or_verify_is_one_line(gateway: Gateway, capsys: pytest.CaptureFixture[str]) -> None:
    """Nothing listening, or a certificate not valid for [server] hostname: one error line, exit 2."""
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        closed = unused.getsockname()[1]
    config = str(gateway.tmp / "mailgate.toml")
    status, out, err = await send_test(capsys, "--config", config, "--server", f"127.0.0.1:{closed}", "--to", "b@example.org")
    assert (status, out, err) == (2, "", f"mailgate: error: cannot connect to 127.0.0.1:{closed}: Connection refused\n")
    renamed = str(config_with_ports(gateway, **{'hostname = "localhost"': 'hostname = "mail.example.org"'}))
    status, out, err = await send_test(capsys, "--config", renamed, "--to", "b@example.org")
    assert (status, out) == (2, "")
    assert err.startswith(f"mailgate: error: TLS with 127.0.0.1:{gateway.ports['submission']} failed: ")
    assert "Hostname mismatch" in err or "CERTIFICATE_VERIFY_FAILED" in err
    status, _, err = await send_test(capsys, "--config", config, "--to", "b@example.org")
    assert (status, err) == (2, "mailgate: error: 'tcp:0:interface=127.0.0.1' has no fixed port; give --server HOST:PORT\n")
    status, _, err = await send_test(capsys, "--config", config, "--to", "b@example.org", "--user", "alice")
    assert (status, err) == (2, "mailgate: error: --user and --password-file go together\n")


@pytest.mark.parametrize(
    ("endpoint", "target"),
    [
        ("tcp:587", Target("127.0.0.1", 587)),
        ("587", Target("127.0.0.1", 587)),
        ("tcp:587:interface=0.0.0.0", Target("127.0.0.1", 587)),
        ("tcp:port=465:interface=192.0.2.7", Target("192.0.2.7", 465)),
        (r"tcp:587:interface=\:\:", Target("::1", 587)),
        (r"tcp6:587:interface=\:\:1", Target("::1", 587)),
        ("tcp6:587", Target("::1", 587)),
        ("haproxy:tcp:25", Target("127.0.0.1", 25, proxy_protocol=True)),
    ],
)
def test_listener_target(endpoint: str, target: Target) -> None:
    """A wildcard interface is reached over loopback; haproxy: listeners get a PROXY line."""
    assert listener_target(ListenerConfig(endpoint=endpoint, role="relay")) == target


@pytest.mark.parametrize("endpoint", ["systemd:domain=INET:index=0", "unix:/run/mailgate.sock", "tcp:0"])
def test_listener_target_unknown(endpoint: str) -> None:
    """Where the address cannot be read from the endpoint, --server is asked for."""
    with pytest.raises(SendTestError, match="give --server HOST:PORT"):
        listener_target(ListenerConfig(endpoint=endpoint, role="relay"))


def test_dialogue_redacts_every_auth_step() -> None:
    """Everything the client sends from AUTH to the server's verdict is redacted, over
    several challenges (LOGIN); the message is summarised; other commands are shown."""
    dialogue = Dialogue()
    dialogue.client("AUTH LOGIN\r\n")
    dialogue.server(334, b"VXNlcm5hbWU6")
    dialogue.client("YWxpY2U=\r\n")
    dialogue.server(334, b"UGFzc3dvcmQ6")
    dialogue.client("c2VjcmV0\r\n")
    dialogue.server(235, b"2.7.0 Authentication successful")
    dialogue.client("DATA\r\n")
    dialogue.server(354, b"End data with <CR><LF>.<CR><LF>")
    dialogue.client(b"Subject: x\r\n\r\nbody\r\n.\r\n")
    dialogue.server(250, b"2.0.0 Ok: id-1\nsecond line")
    assert dialogue.lines == [
        "C: AUTH LOGIN", "S: 334 VXNlcm5hbWU6", "C: <redacted>", "S: 334 UGFzc3dvcmQ6", "C: <redacted>",
        "S: 235 2.7.0 Authentication successful", "C: DATA", "S: 354 End data with <CR><LF>.<CR><LF>",
        "C: <message, 23 octets>", "S: 250-2.0.0 Ok: id-1", "S: 250 second line",
    ]  # fmt: skip


class ScriptedSMTP(LineReceiver):
    """A server that answers each command from a script (command word -> reply lines)."""

    delimiter = b"\r\n"

    def __init__(self, script: dict[str, str]):
        self.script = script
        self.in_data = False
        self.commands: list[str] = []

    def connectionMade(self) -> None:
        self.sendLine(b"220 localhost scripted ESMTP")

    def lineReceived(self, line: bytes) -> None:
        if self.in_data:
            if line == b".":
                self.in_data = False
                self.sendLine(self.script["."].encode())
            return
        verb = line.split(b" ", 1)[0].decode().upper()
        self.commands.append(verb)
        if verb == "QUIT":
            self.sendLine(b"221 bye")
            self.transport.loseConnection()
            return
        self.in_data = verb == "DATA"
        self.sendLine(self.script.get(verb, "500 5.5.2 unknown").encode())


async def scripted_server(script: dict[str, str], endpoint: Any) -> tuple[Any, list[ScriptedSMTP]]:
    sessions: list[ScriptedSMTP] = []

    def build(addr: Any) -> ScriptedSMTP:
        sessions.append(ScriptedSMTP(script))
        return sessions[-1]

    factory = Factory.forProtocol(ScriptedSMTP)
    factory.buildProtocol = build  # type: ignore[method-assign]
    port = await endpoint.listen(factory)
    return port, sessions


def listener_index(gateway: Gateway, role: str) -> str:
    roles = [listener.role for listener in load_config(gateway.tmp / "mailgate.toml").listeners]
    return str(roles.index(role))


@pytest_twisted.ensureDeferred
async def test_starttls_refused_is_the_servers_reply(gateway: Gateway, capsys: pytest.CaptureFixture[str]) -> None:
    """A server that refuses STARTTLS (454) gets that reply printed and exit 1, like any
    other refusal; not an "unexpected error"."""
    port, sessions = await scripted_server(
        {"EHLO": "250-localhost\r\n250 STARTTLS", "STARTTLS": "454 4.7.0 TLS not available due to temporary reason"},
        TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"),
    )
    try:
        status, out, err = await send_test(
            capsys, "--config", str(gateway.tmp / "mailgate.toml"), "--listener", listener_index(gateway, "submission"),
            "--server", f"127.0.0.1:{port.getHost().port}", "--to", "b@example.org",
        )  # fmt: skip
    finally:
        await port.stopListening()
    assert (status, out, err) == (1, "454 4.7.0 TLS not available due to temporary reason\n", "")
    assert sessions[0].commands[:2] == ["EHLO", "STARTTLS"]


@pytest_twisted.ensureDeferred
async def test_auth_answered_503_stops_the_test(gateway: Gateway, capsys: pytest.CaptureFixture[str]) -> None:
    """AUTH answered 503 (smtplib returns it instead of raising) did not log in: the test
    stops there with that reply and exit 1, instead of sending unauthenticated and
    reporting success."""
    chain, key = gateway.tmp / "fullchain.pem", gateway.tmp / "privkey.pem"
    port, sessions = await scripted_server(
        {
            "EHLO": "250-localhost\r\n250 AUTH PLAIN", "AUTH": "503 5.5.1 Bad sequence of commands",
            "MAIL": "250 2.1.0 Ok", "RCPT": "250 2.1.5 Ok", "DATA": "354 go ahead", ".": "250 2.0.0 Ok: queued",
        },
        SSL4ServerEndpoint(reactor, 0, server_context_factory(chain, key), interface="127.0.0.1"),
    )  # fmt: skip
    try:
        status, out, err = await send_test(
            capsys, "--config", str(gateway.tmp / "mailgate.toml"), "--listener", listener_index(gateway, "submissions"),
            "--server", f"127.0.0.1:{port.getHost().port}", "--to", "b@example.org",
            "--user", "alice", "--password-file", str(password_file(gateway)),
        )  # fmt: skip
    finally:
        await port.stopListening()
    assert (status, out, err) == (1, "503 5.5.1 Bad sequence of commands\n", "")
    assert "MAIL" not in sessions[0].commands

"""The ``smtp`` adapter: request building, reply classification and settings (pure)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import trustme
from zope.interface.verify import verifyObject

from mailgate.accounts.account import Account
from mailgate.configvalues import ConfigError
from mailgate.interfaces import IProvider, ITransport
from mailgate.message import parse_message
from mailgate.outcome import Delivered, Failed, Retry
from mailgate.providers import registry
from mailgate.providers.smtp import SMTPProvider, transport, upstream_message_id, validate
from mailgate.smtpclient import (
    AUTH,
    CONNECT,
    CONNECTION_LOST,
    DATA,
    EHLO,
    GREETING,
    INCOMPLETE_CREDENTIALS,
    MAIL,
    MESSAGE,
    NO_AUTH,
    NO_STARTTLS,
    PROTOCOL_ERROR,
    RCPT,
    STARTTLS,
    TIMEOUT,
    TLS_FAILED,
    UNREACHABLE,
    SMTPRequest,
    SMTPResponse,
    SMTPTransport,
    UpstreamReply,
)

SERVER = "smtp.example.net:587"
RAW = (
    b"From: App <app@example.com>\r\n"
    b"To: To <to@example.org>\r\n"
    b"Bcc: hidden@example.net\r\n"
    b"X-Mailgate-Tag: welcome\r\n"
    b"X-PM-Metadata-user: 42\r\n"
    b"Subject: =?utf-8?q?caf=C3=A9?=\r\n"
    b"X-Custom:  kept   as is\r\n"
    b"\r\n"
    b".a line with a dot\r\n"
    b"caf\xc3\xa9\r\n"
)


def email(recipients: tuple[str, ...] = ("to@example.org", "hidden@example.net"), sender: str = "app@example.com") -> Any:
    return parse_message(RAW, sender, recipients, {})


def provider(**settings: Any) -> SMTPProvider:
    return SMTPProvider("relay", {"host": "smtp.example.net", "port": 587, "tls": "starttls", **settings})


def request() -> SMTPRequest:
    return provider().build_requests(email(), Account(name="a"), "Q123")[0]


def outcome(stage: str, code: int | None = None, text: str = "", **fields: Any) -> Any:
    reply = UpstreamReply(code, text) if code is not None else None
    return provider().classify(request(), SMTPResponse(SERVER, stage, reply, **fields))


def test_provider_implements_the_interface() -> None:
    """The adapter provides IProvider and is registered under type "smtp"."""
    assert verifyObject(IProvider, provider())
    assert registry.TYPES["smtp"].adapter is SMTPProvider


def test_request_is_the_envelope_and_raw_mime_without_bcc_or_controls() -> None:
    """Every envelope recipient (the Bcc one too) is relayed; the body is the raw MIME
    byte for byte except the Bcc and control header fields."""
    req = provider().build_requests(email(), Account(name="a"), "Q123")[0]
    assert (req.sender, req.recipients, req.message_id) == ("app@example.com", ("to@example.org", "hidden@example.net"), "Q123")
    expected = RAW.replace(b"Bcc: hidden@example.net\r\n", b"").replace(b"X-Mailgate-Tag: welcome\r\n", b"")
    assert req.body == expected.replace(b"X-PM-Metadata-user: 42\r\n", b"")
    assert (req.username, req.password) == (None, None)


def test_account_credentials_override_the_providers() -> None:
    """An account's own username/password (file, http or passthrough store) win."""
    p = provider(username="operator", password="operator-test-password")
    own = Account(name="a", provider_settings={"relay": {"username": "alice", "password": "alice-test-password"}})
    assert (p.build_requests(email(), own, "Q")[0].username, p.build_requests(email(), own, "Q")[0].password) == ("alice", "alice-test-password")
    plain = p.build_requests(email(), Account(name="b"), "Q")[0]
    assert (plain.username, plain.password) == ("operator", "operator-test-password")


def test_check_refuses_addresses_that_cannot_go_into_a_command_line() -> None:
    """Only printable ASCII can be relayed (no SMTPUTF8): 553 5.6.7 instead of a crash."""
    assert provider().check(email(), Account(name="a")) is None
    bad = dataclasses.replace(email(), envelope_recipients=("ü@example.org",))
    assert provider().check(bad, Account(name="a")) == Failed(
        "relay", "address 'ü@example.org' cannot be relayed", 553, "5.6.7"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2.0.0 Ok: queued as 4Xyz1", "4Xyz1"),
        ("Ok: queued as <abc@host>", "abc@host"),
        ("2.0.0 Ok: 01J5ABCDEF", "01J5ABCDEF"),
        ("Ok 0100018b-ses-id-000000", "0100018b-ses-id-000000"),
        ("2.0.0 OK  1699999 abc.123 - gsmtp", "Q123"),
        ("2.0.0 Ok", "Q123"),
        ("Great success", "Q123"),
        ("", "Q123"),
        ("2.0.0 Ok: queued as id\x07bell", "Q123"),
    ],
)
def test_message_id_from_the_250_text(text: str, expected: str) -> None:
    """The upstream's id is taken from "queued as <id>" or "Ok: <id>", else our queue id."""
    assert upstream_message_id(UpstreamReply(250, text), "Q123") == expected


CLASSIFY = [
    # (stage, code, text, other fields) -> outcome
    (MESSAGE, 250, "2.0.0 Ok: queued as ABC", {}, Delivered("relay", "ABC")),
    (MESSAGE, 451, "4.7.1 Greylisted", {}, Retry("relay", f"{SERVER} answered end of data with 451 4.7.1 Greylisted", "4.7.1")),
    (MESSAGE, 452, "Insufficient storage", {}, Retry("relay", f"{SERVER} answered end of data with 452 Insufficient storage", "4.3.0")),
    (MESSAGE, 554, "5.7.1 Spam detected", {}, Failed("relay", f"{SERVER} answered end of data with 554 5.7.1 Spam detected", 554, "5.7.1")),
    (MESSAGE, 552, "5.3.4 Too big", {}, Failed("relay", f"{SERVER} answered end of data with 552 5.3.4 Too big", 552, "5.3.4")),
    (MESSAGE, 500, "5.3.0 Error: command failed", {}, Failed("relay", f"{SERVER} answered end of data with 500 5.3.0 Error: command failed", 554, "5.3.0")),
    (MAIL, 553, "5.1.8 Bad sender domain", {}, Failed("relay", f"{SERVER} answered MAIL with 553 5.1.8 Bad sender domain", 553, "5.1.8")),
    (MAIL, 530, "5.7.0 Authentication required", {}, Failed("relay", f"{SERVER} answered MAIL with 530 5.7.0 Authentication required", 554, "5.7.0")),
    (MAIL, 550, "Sender rejected", {}, Failed("relay", f"{SERVER} answered MAIL with 550 Sender rejected", 550, "5.0.0")),
    (DATA, 451, "4.3.0 Try later", {}, Retry("relay", f"{SERVER} answered DATA with 451 4.3.0 Try later", "4.3.0")),
    (AUTH, 535, "5.7.8 Bad credentials", {}, Failed("relay", f"{SERVER} refused the credentials: 535 5.7.8 Bad credentials", 554, "5.7.8")),
    (AUTH, 454, "4.7.0 Temporary auth failure", {}, Retry("relay", f"{SERVER} answered AUTH with 454 4.7.0 Temporary auth failure", "4.7.0")),
    (GREETING, 554, "5.7.1 No service", {}, Retry("relay", f"{SERVER} answered greeting with 554 5.7.1 No service", "4.4.0")),
    (GREETING, 421, "4.3.2 Busy", {}, Retry("relay", f"{SERVER} answered greeting with 421 4.3.2 Busy", "4.3.2")),
    (EHLO, 502, "5.5.1 EHLO not implemented", {}, Retry("relay", f"{SERVER} answered EHLO with 502 5.5.1 EHLO not implemented", "4.4.0")),
    (STARTTLS, 454, "4.7.0 TLS not available", {}, Retry("relay", f"{SERVER} answered STARTTLS with 454 4.7.0 TLS not available", "4.7.0")),
    (MESSAGE, 354, "go on", {"final_dot_sent": True}, Retry("relay", f"unexpected reply: {SERVER} answered end of data with 354 go on", "4.5.0", ambiguous=True)),
]


@pytest.mark.parametrize(("stage", "code", "text", "fields", "expected"), CLASSIFY)
def test_classify_replies(stage: str, code: int, text: str, fields: dict[str, Any], expected: Any) -> None:
    """2xx delivered; 4xx transient with the upstream's enhanced code; 5xx from MAIL on
    permanent with its code (550/552/553/554, else 554); credentials refused are 554;
    a refusal of the session itself (greeting, EHLO, STARTTLS) is transient."""
    assert outcome(stage, code, text, **fields) == expected


PROBLEMS = [
    (CONNECT, UNREACHABLE, "Connection refused", False, "4.4.1", False),
    (STARTTLS, TLS_FAILED, "the server's certificate is not valid for this host name", False, "4.7.5", False),
    (EHLO, NO_STARTTLS, "no STARTTLS", False, "4.7.10", False),
    (EHLO, NO_AUTH, "no PLAIN", False, "4.7.0", False),
    (MAIL, TIMEOUT, "no reply within 30 s", False, "4.4.1", False),
    (MESSAGE, TIMEOUT, "no reply within 30 s", True, "4.4.1", True),
    (DATA, CONNECTION_LOST, "the server closed the connection", False, "4.4.2", False),
    (MESSAGE, CONNECTION_LOST, "the server closed the connection", True, "4.4.2", True),
    (GREETING, PROTOCOL_ERROR, "Invalid response", False, "4.5.0", False),
    (CONNECT, INCOMPLETE_CREDENTIALS, "username and password must be set together", False, "4.3.5", False),
]


@pytest.mark.parametrize(("stage", "problem", "detail", "dot", "enhanced", "ambiguous"), PROBLEMS)
def test_classify_problems(stage: str, problem: str, detail: str, dot: bool, enhanced: str, ambiguous: bool) -> None:
    """Every problem is transient; it is ambiguous (no failover) only once the final dot was sent."""
    result = outcome(stage, problem=problem, detail=detail, final_dot_sent=dot)
    assert result == Retry("relay", f"{SERVER} ({stage}): {detail}", enhanced, ambiguous=ambiguous)
    assert result.reply().code == 451


def test_a_permanently_refused_recipient_fails_the_message() -> None:
    """One permanent RCPT refusal fails the whole message with that reply, naming the recipient."""
    refused = (
        ("busy@example.org", UpstreamReply(450, "4.2.0 Mailbox busy")),
        ("gone@example.org", UpstreamReply(550, "5.1.1 User unknown")),
    )
    result = outcome(RCPT, 550, "5.1.1 User unknown", refused=refused)
    assert result == Failed(
        "relay", f"{SERVER} refused recipient gone@example.org: 550 5.1.1 User unknown (and 1 more recipient)", 550, "5.1.1"
    )
    assert result.reply().code == 550


def test_temporarily_refused_recipients_retry_the_message() -> None:
    """Only temporary RCPT refusals: the whole message is retried later."""
    refused = (("busy@example.org", UpstreamReply(450, "4.2.0 Mailbox busy")),)
    assert outcome(RCPT, 450, "4.2.0 Mailbox busy", refused=refused) == Retry(
        "relay", f"{SERVER} refused recipient busy@example.org: 450 4.2.0 Mailbox busy", "4.2.0"
    )


def test_reasons_are_sanitised_in_the_reply() -> None:
    """An upstream reply with control characters cannot inject lines into our reply."""
    result = outcome(MESSAGE, 554, "5.7.1 bad\r\n250 fake")
    assert result.reply().lines() == [b"554 5.7.1 Rejected by relay: smtp.example.net:587 answered end of data with 554 5.7.1 bad 250 fake"]


# -- settings ------------------------------------------------------------------


def validated(**settings: Any) -> dict[str, Any]:
    values = {"host": "smtp.example.net", **settings}
    validate("relay", values)
    return values


def test_defaults() -> None:
    """STARTTLS on 587 by default; implicit TLS on 465; plain text on 25; 30 s connect timeout."""
    assert validated() == {
        "host": "smtp.example.net", "tls": "starttls", "port": 587, "allow_plaintext": False, "connect_timeout": 30.0,
    }  # fmt: skip
    assert validated(tls="implicit")["port"] == 465
    assert validated(host="127.0.0.1", tls="none")["port"] == 25


@pytest.mark.parametrize(
    ("settings", "key", "message"),
    [
        ({"host": None}, "host", "required"),
        ({"host": "bad host"}, "host", "required"),
        ({"tls": "ssl"}, "tls", "must be one of starttls, implicit, none"),
        ({"tls": "none"}, "tls", "allowed to a loopback host"),
        ({"port": 0}, "port", "TCP port"),
        ({"port": "25"}, "port", "TCP port"),
        ({"username": "u"}, "password", "set together"),
        ({"password": "p"}, "username", "set together"),
        ({"username": "", "password": "p"}, "username", "non-empty"),
        ({"helo": "bad helo"}, "helo", "domain name"),
        ({"ca_file": "/nonexistent/ca.pem"}, "ca_file", "cannot read"),
        ({"tls": "none", "host": "localhost", "ca_file": "/x"}, "ca_file", "no use"),
        ({"connect_timeout": 0}, "connect_timeout", "greater than zero"),
        ({"command_timeout": -1}, "command_timeout", "greater than zero"),
        ({"allow_plaintext": "yes"}, "allow_plaintext", "true or false"),
    ],
)
def test_invalid_settings_name_the_key(settings: dict[str, Any], key: str, message: str) -> None:
    """A wrong setting stops start-up with an error naming providers.relay.<key>."""
    values = {"host": "smtp.example.net", **settings}
    if values["host"] is None:
        del values["host"]
    with pytest.raises(ConfigError) as caught:
        validate("relay", values)
    assert caught.value.key == f"providers.relay.{key}"
    assert message in caught.value.message


def test_plaintext_needs_loopback_or_an_explicit_opt_in() -> None:
    """tls = "none" is accepted for localhost and loopback addresses, elsewhere only with allow_plaintext."""
    for host in ("localhost", "127.0.0.1", "::1"):
        validated(host=host, tls="none")
    assert validated(host="smtp.example.net", tls="none", allow_plaintext=True)["port"] == 25


def test_transport_uses_the_api_timeout_unless_set(tmp_path: Path) -> None:
    """command_timeout defaults to [delivery] api_timeout; ca_file becomes the trust root."""
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    settings = validated(ca_file=str(tmp_path / "ca.pem"), helo="mx.example.com")
    made = transport(settings, object(), None, 12.5)
    assert verifyObject(ITransport, made)
    assert isinstance(made, SMTPTransport)
    assert (made.command_timeout, made.connect_timeout, made.helo, made.server) == (12.5, 30.0, "mx.example.com", "smtp.example.net:587")
    assert transport({**settings, "command_timeout": 99}, object(), None, 12.5).command_timeout == 99


def test_example_configuration_block_is_valid(tmp_path: Path) -> None:
    """The commented [providers.relay] example in etc/mailgate.toml.example parses and validates."""
    import tomllib

    text = (Path(__file__).resolve().parents[1] / "etc" / "mailgate.toml.example").read_text()
    start = text.index("# [providers.relay]")
    block = text[start : text.index("\n\n", start)]
    table = tomllib.loads("\n".join(line.removeprefix("# ") for line in block.splitlines()))
    settings = dict(table["providers"]["relay"])
    assert settings.pop("type") == "smtp"
    assert set(settings) <= set(registry.TYPES["smtp"].settings)
    validated(**settings)


def test_relative_ca_file_is_resolved_against_the_config(tmp_path: Path) -> None:
    """ca_file = "ca.pem" means the file beside mailgate.toml, not the working directory."""
    from mailgate.config import parse_config

    config = parse_config(
        {
            "listeners": [{"endpoint": "tcp:587", "role": "submission"}],
            "accounts": {"store": "file", "path": "accounts.toml"},
            "providers": {"relay": {"type": "smtp", "host": "smtp.example.net", "ca_file": "ca.pem"}},
        },
        base_dir=tmp_path,
    )
    assert config.providers["relay"].settings["ca_file"] == str(tmp_path / "ca.pem")

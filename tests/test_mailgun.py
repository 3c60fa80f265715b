"""The Mailgun adapter: golden requests, recipients, controls, limits and the classification of answers."""

from __future__ import annotations

import base64
import dataclasses
import json
from typing import Any

import pytest
from zope.interface.verify import verifyObject

from mailgate.accounts.account import Account
from mailgate.configvalues import ConfigError
from mailgate.interfaces import IProvider
from mailgate.message import parse_message
from mailgate.model import Attachment
from mailgate.outcome import Delivered, Failed, Retry
from mailgate.providers import registry
from mailgate.providers.base import HTTPResponse
from mailgate.providers.mailgun import MailgunProvider
from mailgate.providers.multipart import FormFile
from mailgate.testing import decode_form

from .provider_messages import (
    HTML,
    MINIMAL,
    PDF,
    PNG,
    RECIPIENTS,
    SENDER,
    SUBJECT,
    TEXT,
    rich_message,
)

ACCOUNT = Account(name="alice")
KEY = "test-mailgun-key"  # a throwaway fixture, not a secret
# The form fields of the rich message (tests/provider_messages.py), in order.
RICH_FIELDS = [
    ("from", '"Ålice Exämple" <alice@example.com>'),
    ("to", '"Bob" <bob@example.org>'),
    ("cc", "carol@example.net"),
    ("bcc", "dave.hidden@example.com"),
    ("subject", SUBJECT),
    ("text", TEXT),
    ("html", HTML),
    ("h:Reply-To", '"Support Team" <support@example.com>'),
    ("h:X-Campaign", "q4"),
    ("o:tag", "reports"),
    ("o:tracking-opens", "yes"),
    ("o:tracking-clicks", "yes"),
    ("v:Customer", "42"),
    # Mailgun takes an inline file's name as its Content-ID: cid:logo@example.com.
    ("inline", FormFile("logo@example.com", "image/png", PNG)),
    ("attachment", FormFile("report.pdf", "application/pdf", PDF)),
]


def provider(**settings: Any) -> MailgunProvider:
    values = {"api_key": KEY, "domain": "mg.example.com", **settings}
    registry.lookup("mg", "mailgun").validate("mg", values)
    return MailgunProvider("mg", values, boundary=lambda: "BOUNDARY")


def fields(request: Any) -> list[tuple[str, Any]]:
    return decode_form(request.body, dict(request.headers)["Content-Type"])


def build(message: bytes, recipients: tuple[str, ...] = RECIPIENTS, **settings: Any) -> list[Any]:
    email = parse_message(message, SENDER, recipients)
    return provider(**settings).build_requests(email, ACCOUNT, "QID1")


def test_provides_interface() -> None:
    """The adapter implements IProvider completely."""
    assert verifyObject(IProvider, provider())


def test_minimal_message_golden_request() -> None:
    """A minimal message becomes exactly this request: URL, method, headers and body bytes."""
    [request] = build(MINIMAL, ("bob@example.org",))
    assert (request.method, request.url) == ("POST", "https://api.mailgun.net/v3/mg.example.com/messages")
    assert request.headers == (
        ("Content-Type", "multipart/form-data; boundary=BOUNDARY"),
        ("Accept", "application/json"),
        ("User-Agent", "mailgate/0.1"),
        ("Authorization", "Basic " + base64.b64encode(f"api:{KEY}".encode()).decode()),
    )
    assert request.body == (
        b'--BOUNDARY\r\nContent-Disposition: form-data; name="from"\r\n\r\nalice@example.com\r\n'
        b'--BOUNDARY\r\nContent-Disposition: form-data; name="to"\r\n\r\nbob@example.org\r\n'
        b'--BOUNDARY\r\nContent-Disposition: form-data; name="subject"\r\n\r\nhi\r\n'
        b'--BOUNDARY\r\nContent-Disposition: form-data; name="text"\r\n\r\nHello\n\r\n'
        b"--BOUNDARY--\r\n"
    )
    assert request.queue_id == "QID1"


def test_rich_message_golden_fields() -> None:
    """Every mapped field of the rich message, in order, read back by an independent parser."""
    [request] = build(rich_message())
    assert fields(request) == RICH_FIELDS


def test_envelope_only_recipient_is_blind_and_bcc_header_never_sent() -> None:
    """The Bcc recipient appears once, as a ``bcc`` field; no Bcc header and no control header is forwarded."""
    [request] = build(rich_message())
    assert request.body.count(b"dave.hidden@example.com") == 1
    names = [name for name, _ in fields(request)]
    assert "h:Bcc" not in names and not [n for n in names if n.lower().startswith("h:x-mailgate")]


def test_header_address_outside_the_envelope_gets_no_copy() -> None:
    """A To address nobody sent RCPT TO for is not a recipient (ARCHITECTURE.md §1)."""
    message = b"From: a@example.com\r\nTo: list@example.org, bob@example.org\r\nSubject: s\r\n\r\nx\r\n"
    [request] = build(message, ("bob@example.org",))
    assert [value for name, value in fields(request) if name in ("to", "cc", "bcc")] == ["bob@example.org"]


def test_all_blind_recipients_get_one_copy_each_in_one_request() -> None:
    """Mailgun needs a ``to``: blind recipients are batch-sent, each a copy of their own, in one request."""
    message = b"From: a@example.com\r\nTo: undisclosed-recipients:;\r\nSubject: s\r\n\r\nx\r\n"
    [request] = build(message, ("x@example.org", "y@example.net"))
    assert [(n, v) for n, v in fields(request) if n in ("to", "cc", "bcc", "recipient-variables")] == [
        ("to", "x@example.org"),
        ("to", "y@example.net"),
        ("recipient-variables", '{"x@example.org":{},"y@example.net":{}}'),
    ]


def test_empty_html_part_is_no_html() -> None:
    """An empty HTML part is not sent (it would show a blank message); the text is."""
    message = (
        b"From: a@example.com\r\nTo: bob@example.org\r\nContent-Type: multipart/alternative; boundary=b\r\n\r\n"
        b"--b\r\nContent-Type: text/plain\r\n\r\nhello\r\n--b\r\nContent-Type: text/html\r\n\r\n\r\n--b--\r\n"
    )
    [request] = build(message, ("bob@example.org",))
    assert [(n, v) for n, v in fields(request) if n in ("text", "html")] == [("text", "hello")]


def test_tags_beyond_what_mailgun_keeps_are_left_out() -> None:
    """At most three ASCII tags of at most 128 characters; the others are left out, not altered."""
    tags = "".join(f"X-Mailgate-Tag: {tag}\r\n" for tag in ("één", "a" * 129, "one", "two", "three", "four"))
    [request] = build(f"From: a@example.com\r\nTo: bob@example.org\r\n{tags}\r\nx\r\n".encode(), ("bob@example.org",))
    assert [v for n, v in fields(request) if n == "o:tag"] == ["one", "two", "three"]


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ("X-Mailgate-Track-Opens: no\r\nX-Mailgate-Track-Clicks: false\r\n", [("o:tracking", "no"), ("o:tracking-opens", "no"), ("o:tracking-clicks", "no")]),
        ("X-PM-TrackOpens: false\r\n", [("o:tracking-opens", "no")]),
        ("X-Mailgate-Track-Clicks: yes\r\n", [("o:tracking-clicks", "yes")]),
        ("", []),
    ],
)
def test_tracking_controls(headers: str, expected: list[tuple[str, str]]) -> None:
    """Tracking controls become Mailgun's per-message options; unset ones keep the domain's setting."""
    [request] = build(f"From: a@example.com\r\nTo: bob@example.org\r\n{headers}\r\nx\r\n".encode(), ("bob@example.org",))
    assert [(n, v) for n, v in fields(request) if n.startswith("o:tracking")] == expected


def test_mailgun_variables_and_keep_message_id() -> None:
    """X-Mailgun-Variables members become ``v:`` fields; X-PM-KeepID keeps the Message-ID."""
    message = (
        b"From: a@example.com\r\nTo: bob@example.org\r\nMessage-ID: <m-1@example.com>\r\n"
        b'X-Mailgun-Variables: {"order": 7, "user": "u-1"}\r\nX-PM-KeepID: true\r\n\r\nx\r\n'
    )
    [request] = build(message, ("bob@example.org",))
    got = fields(request)
    assert [(n, v) for n, v in got if n.startswith("v:")] == [("v:order", "7"), ("v:user", "u-1")]
    assert ("h:Message-ID", "<m-1@example.com>") in got
    assert not [n for n, _ in got if n.lower() == "h:x-mailgun-variables"]


def test_region_url_and_account_settings() -> None:
    """EU domains use api.eu.mailgun.net; ``url`` overrides; an account may bring its own key and domain."""
    email = parse_message(MINIMAL, SENDER, ("bob@example.org",))
    account = Account(name="b", provider_settings={"mg": {"api_key": "own-key", "domain": "mail.b.example"}})
    [eu] = provider(region="EU").build_requests(email, account, "Q")
    assert eu.url == "https://api.eu.mailgun.net/v3/mail.b.example/messages"
    assert dict(eu.headers)["Authorization"] == "Basic " + base64.b64encode(b"api:own-key").decode()
    [test_double] = provider(url="http://127.0.0.1:8080/").build_requests(email, ACCOUNT, "Q")
    assert test_double.url == "http://127.0.0.1:8080/v3/mg.example.com/messages"


def test_key_not_in_repr() -> None:
    """The request's repr shows neither the Authorization header nor the body."""
    [request] = build(MINIMAL, ("bob@example.org",))
    assert KEY not in repr(request) and base64.b64encode(f"api:{KEY}".encode()).decode() not in repr(request)


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({}, "providers.mg.domain"),
        ({"domain": "not a domain"}, "providers.mg.domain"),
        ({"domain": "mg.example.com", "region": "asia"}, "providers.mg.region"),
        ({"domain": "mg.example.com", "url": "ftp://x"}, "providers.mg.url"),
    ],
)
def test_settings_are_validated(settings: dict[str, Any], key: str) -> None:
    """A wrong setting stops start-up with an error naming it."""
    with pytest.raises(ConfigError) as error:
        registry.lookup("mg", "mailgun").validate("mg", dict(settings))
    assert error.value.key == key


def test_limits_checked_before_sending() -> None:
    """Over 1000 recipients is 452 4.5.3, over 25 MB 552 5.3.4, no sender at all 554 5.6.0."""
    email = parse_message(MINIMAL, SENDER, ("bob@example.org",))
    assert provider().check(email, ACCOUNT) is None
    crowd = dataclasses.replace(email, envelope_recipients=tuple(f"r{i}@example.org" for i in range(1001)))
    assert provider().check(crowd, ACCOUNT).reply().code == 452  # type: ignore[union-attr]
    big = dataclasses.replace(email, attachments=(Attachment("big.bin", "application/octet-stream", b"x" * 19_000_000),))
    refusal = provider().check(big, ACCOUNT)
    assert refusal is not None and (refusal.code, refusal.enhanced) == (552, "5.3.4")
    anonymous = parse_message(b"To: bob@example.org\r\n\r\nx\r\n", "", ("bob@example.org",))
    refusal = provider().check(anonymous, ACCOUNT)
    assert refusal is not None and (refusal.code, refusal.enhanced) == (554, "5.6.0")


def response(status: int, body: object = b"", headers: tuple[tuple[str, str], ...] = ()) -> HTTPResponse:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return HTTPResponse(status, headers, raw)


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (response(200, {"id": "<20261122.1@mg.example.com>", "message": "Queued. Thank you."}), Delivered("mg", "20261122.1@mg.example.com")),
        (response(200, {"message": "Queued. Thank you."}), Delivered("mg", "QID1")),
        (response(400, {"message": "'to' parameter is not a valid address. please check documentation"}),
         Failed("mg", "HTTP 400: 'to' parameter is not a valid address. please check documentation", 554, "5.6.0")),
        (response(401, b"Forbidden"), Failed("mg", "API refused the credentials (HTTP 401): Forbidden", 554, "5.7.0")),
        (response(403, {"message": "Domain mg.example.com is not allowed to send: Free accounts are for test purposes only."}),
         Failed("mg", "Mailgun refused to send (HTTP 403): Domain mg.example.com is not allowed to send: Free accounts are for test purposes only.", 554, "5.7.1")),
        (response(404, {"message": "Domain not found: mg.example.com"}),
         Retry("mg", "Mailgun does not know the domain (HTTP 404): Domain not found: mg.example.com; check its domain and region", "4.3.5")),
        (response(413, b"Request Entity Too Large"), Failed("mg", "message too large for the API: Request Entity Too Large", 552, "5.3.4")),
        (response(429, {"message": "Too many requests"}, (("Retry-After", "30"),)), Retry("mg", "rate limited by the API (HTTP 429)", "4.7.0", 30.0)),
        (response(500, b"Internal Server Error"), Retry("mg", "API unavailable (HTTP 500)", "4.3.0")),
    ],
)
def test_classification_table(answer: HTTPResponse, expected: object) -> None:
    """Mailgun's documented answers map to the error table of ARCHITECTURE.md."""
    [request] = build(MINIMAL, ("bob@example.org",))
    assert provider().classify(request, answer) == expected

"""The Bento adapter: golden requests, refusals at the end of DATA, and Bento's answers."""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from typing import Any

import pytest
from zope.interface.verify import verifyObject

from mailgate.accounts.account import Account
from mailgate.interfaces import IProvider
from mailgate.message import parse_message, text_to_html
from mailgate.outcome import Delivered, Failed, Retry
from mailgate.providers.base import HTTPResponse
from mailgate.providers.bento import PROVIDER, BentoProvider

from .provider_messages import MINIMAL, RECIPIENTS, SENDER, SUBJECT

ACCOUNT = Account(name="alice")
CREDENTIALS = {"site_uuid": "test-site-uuid", "publishable_key": "test-pub", "secret_key": "test-secret"}
HTML = "<p>Hello <b>Bob</b></p>"


def provider(**settings: object) -> BentoProvider:
    values: dict[str, Any] = {**CREDENTIALS, **settings}
    PROVIDER.validate("bento", values)
    return BentoProvider("bento", values)


def body(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def rich() -> bytes:
    return (
        "From: Ålice Exämple <alice@example.com>\r\nTo: Bob <bob@example.org>\r\nCc: carol@example.net\r\n"
        "Bcc: dave.hidden@example.com\r\nReply-To: Support Team <support@example.com>\r\n"
        f"Subject: {SUBJECT}\r\nX-Bento-Transactional: true\r\nX-Bento-Layout-Id: layout-7\r\n"
        "X-Mailgate-Tag: reports\r\nMIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary=b\r\n\r\n"
        "--b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nHello Bob\r\n"
        f"--b\r\nContent-Type: text/html; charset=utf-8\r\n\r\n{HTML}\r\n--b--\r\n"
    ).encode("utf-8")


def test_provides_interface() -> None:
    """The adapter implements IProvider completely."""
    assert verifyObject(IProvider, provider())


def test_rich_message_golden_request() -> None:
    """One email per envelope recipient, Basic auth publishable:secret, site_uuid in the query."""
    email = parse_message(rich(), SENDER, RECIPIENTS)
    assert provider().check(email, ACCOUNT) is None
    [request] = provider().build_requests(email, ACCOUNT, "QID1")
    assert (request.method, request.url) == (
        "POST",
        "https://app.bentonow.com/api/v1/batch/emails?site_uuid=test-site-uuid",
    )
    assert request.headers == (
        ("Content-Type", "application/json"),
        ("Accept", "application/json"),
        ("User-Agent", "mailgate/0.1"),
        ("Authorization", "Basic " + base64.b64encode(b"test-pub:test-secret").decode()),
    )
    common = {
        "from": "alice@example.com",
        "subject": SUBJECT,
        "html_body": HTML,
        "transactional": True,
        "reply_to": "support@example.com",
        "layout_id": "layout-7",
    }
    assert request.body == body({"emails": [{"to": rcpt, **common} for rcpt in RECIPIENTS]})


def test_minimal_text_message_golden_request() -> None:
    """A text-only message is sent as escaped HTML with its line breaks; transactional defaults to false."""
    raw = b"From: alice@example.com\r\nTo: bob@example.org\r\nSubject: hi\r\n\r\n1 < 2 & 3\r\nsecond line\r\n"
    email = parse_message(raw, SENDER, ("bob@example.org",))
    [request] = provider(url="https://bento.test.example/api/v1/").build_requests(email, ACCOUNT, "Q")
    assert request.url == "https://bento.test.example/api/v1/batch/emails?site_uuid=test-site-uuid"
    html = text_to_html("1 < 2 & 3\nsecond line\n")
    assert "1 &lt; 2 &amp; 3<br>" in html
    assert request.body == body(
        {
            "emails": [
                {
                    "to": "bob@example.org",
                    "from": "alice@example.com",
                    "subject": "hi",
                    "html_body": html,
                    "transactional": False,
                }
            ]
        }
    )


def test_text_is_sent_when_the_html_part_is_empty() -> None:
    """An empty HTML part next to a text body must not make Bento send a blank email."""
    raw = (
        b"From: alice@example.com\r\nTo: bob@example.org\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/alternative; boundary="b"\r\n\r\n--b\r\n\r\nHello text\r\n'
        b"--b\r\nContent-Type: text/html\r\n\r\n\r\n--b--\r\n"
    )
    [request] = provider().build_requests(parse_message(raw, SENDER, ("bob@example.org",)), ACCOUNT, "Q")
    assert json.loads(request.body)["emails"][0]["html_body"] == text_to_html("Hello text")


def test_canonical_transactional_header_and_account_default() -> None:
    """X-Mailgate-Transactional and an account default set ``transactional`` too."""
    email = parse_message(MINIMAL, SENDER, ("bob@example.org",), {"X-Mailgate-Transactional": "yes"})
    [request] = provider().build_requests(email, ACCOUNT, "Q")
    assert json.loads(request.body)["emails"][0]["transactional"] is True


def test_site_uuid_is_quoted_in_the_url() -> None:
    """A site UUID cannot add query parameters."""
    email = parse_message(MINIMAL, SENDER, ("bob@example.org",))
    [request] = provider(site_uuid="a&b=c").build_requests(email, ACCOUNT, "Q")
    assert request.url.endswith("/batch/emails?site_uuid=a%26b%3Dc")


def test_passthrough_credentials_from_the_login() -> None:
    """Credentials the passthrough store took from the SMTP login are the ones sent."""
    account = Account(
        name="p",
        provider_settings={"bento": {"site_uuid": "login-site", "publishable_key": "lp", "secret_key": "ls"}},
    )
    email = parse_message(MINIMAL, SENDER, ("bob@example.org",))
    [request] = BentoProvider("bento", {"url": "https://app.bentonow.com/api/v1"}).build_requests(email, account, "Q")
    assert request.url.endswith("site_uuid=login-site")
    assert dict(request.headers)["Authorization"] == "Basic " + base64.b64encode(b"lp:ls").decode()


def test_attachments_are_refused_with_a_clear_sentence() -> None:
    """Bento cannot carry attachments: 554 5.6.0 at the end of DATA, saying so."""
    raw = (
        b"From: a@example.com\r\nTo: b@example.org\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n"
        b"--b\r\nContent-Type: application/pdf\r\nContent-Disposition: attachment; filename=a.pdf\r\n\r\n%PDF\r\n--b--\r\n"
    )
    refusal = provider().check(parse_message(raw, SENDER, ("b@example.org",)), ACCOUNT)
    assert refusal is not None
    assert str(refusal.reply()) == (
        "554 5.6.0 Rejected by bento: Bento cannot send attachments or inline images, and this message "
        "has 1: send the files as links, or send this message through another provider"
    )


def test_recipient_and_size_limits() -> None:
    """51 recipients is 452 4.5.3; over 10 MB is 552 5.3.4."""
    email = parse_message(MINIMAL, SENDER, tuple(f"r{i}@example.org" for i in range(51)))
    refusal = provider().check(email, ACCOUNT)
    assert refusal is not None and (refusal.code, refusal.enhanced) == (452, "4.5.3")
    assert provider().check(parse_message(MINIMAL, SENDER, tuple(f"r{i}@example.org" for i in range(50))), ACCOUNT) is None
    big = replace(parse_message(MINIMAL, SENDER, ("b@example.org",)), text="x" * 10_000_001)
    refusal = provider().check(big, ACCOUNT)
    assert refusal is not None and (refusal.code, refusal.enhanced) == (552, "5.3.4")


def response(status: int, payload: object = None) -> HTTPResponse:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload or {}).encode()
    return HTTPResponse(status, (), raw)


CLASSIFY = [
    (response(200, {"results": 3}), Delivered("bento", "QID")),
    (response(200, {"results": 0}), Failed("bento", "Bento queued none of the 3 emails", 554, "5.0.0")),
    (response(401, b"Unauthorized"), Failed("bento", "API refused the credentials (HTTP 401): Unauthorized", 554, "5.7.0")),
    (response(500, b'{"error":"Author not authorized to send on this account"}'),
     Failed("bento", "the From address is not an author of this Bento account (Bento: Author not authorized "
            "to send on this account)", 550, "5.7.1")),
    (response(400, {"error": "html_body is required"}), Failed("bento", "HTTP 400: html_body is required", 554, "5.6.0")),
    (response(429, b"Too Many Requests"), Retry("bento", "rate limited by the API (HTTP 429)", "4.7.0")),
    (response(502, b"Bad Gateway"), Retry("bento", "API unavailable (HTTP 502)", "4.3.0")),
]


@pytest.mark.parametrize(("answer", "expected"), CLASSIFY)
def test_classification_table(answer: HTTPResponse, expected: object) -> None:
    """Bento's answers map to the error table; the 250 id is mailgate's queue id (Bento returns none)."""
    [request] = provider().build_requests(parse_message(rich(), SENDER, RECIPIENTS), ACCOUNT, "QID")
    assert provider().classify(request, answer) == expected

"""The Resend adapter: golden requests, recipients, names, tags, limits and the classification of answers."""

from __future__ import annotations

import base64
import dataclasses
import json
from typing import Any

import pytest
from zope.interface.verify import verifyObject

from mailgate.accounts.account import Account
from mailgate.interfaces import IProvider
from mailgate.message import parse_message
from mailgate.model import Attachment, EmailAddress
from mailgate.outcome import Delivered, Failed, Retry
from mailgate.providers import registry
from mailgate.providers.base import HTTPResponse
from mailgate.providers.resend import ResendProvider, mailbox, sender

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
KEY = "re_test_key"  # a throwaway fixture, not a secret
# The JSON document of the rich message (tests/provider_messages.py).
RICH_BODY = {
    "from": "Ålice Exämple <alice@example.com>",
    "to": ["Bob <bob@example.org>"],
    "cc": ["carol@example.net"],
    "bcc": ["dave.hidden@example.com"],
    "reply_to": ["Support Team <support@example.com>"],
    "subject": SUBJECT,
    "html": HTML,
    "text": TEXT,
    "headers": {"X-Campaign": "q4"},
    "attachments": [
        {"filename": "logo.png", "content": base64.b64encode(PNG).decode(), "content_type": "image/png", "content_id": "logo@example.com"},
        {"filename": "report.pdf", "content": base64.b64encode(PDF).decode(), "content_type": "application/pdf"},
    ],
    "tags": [{"name": "tag", "value": "reports"}, {"name": "Customer", "value": "42"}],
}


def provider(**settings: Any) -> ResendProvider:
    values = {"api_key": KEY, **settings}
    registry.lookup("rs", "resend").validate("rs", values)
    return ResendProvider("rs", values)


def build(message: bytes, recipients: tuple[str, ...] = RECIPIENTS, account: Account = ACCOUNT) -> list[Any]:
    return provider().build_requests(parse_message(message, SENDER, recipients), account, "QID1")


def test_provides_interface() -> None:
    """The adapter implements IProvider completely."""
    assert verifyObject(IProvider, provider())


def test_minimal_message_golden_request() -> None:
    """A minimal message becomes exactly this request: URL, method, headers and body."""
    [request] = build(MINIMAL, ("bob@example.org",))
    assert (request.method, request.url) == ("POST", "https://api.resend.com/emails")
    assert request.headers == (
        ("Content-Type", "application/json"),
        ("Accept", "application/json"),
        ("User-Agent", "mailgate/0.1"),
        ("Authorization", f"Bearer {KEY}"),
        ("Idempotency-Key", "QID1"),
    )
    assert request.body == b'{"from":"alice@example.com","to":["bob@example.org"],"subject":"hi","text":"Hello\\n"}'


def test_rich_message_golden_body() -> None:
    """Every mapped field of the rich message, exactly."""
    [request] = build(rich_message())
    assert json.loads(request.body) == RICH_BODY
    assert request.body.count(b"dave.hidden@example.com") == 1
    assert b"X-Mailgate" not in request.body and b"Bcc" not in request.body


@pytest.mark.parametrize(
    ("address", "as_recipient", "as_sender"),
    [
        (EmailAddress("a@example.com"), "a@example.com", "a@example.com"),
        (EmailAddress("a@example.com", "Ann Lee"), "Ann Lee <a@example.com>", "Ann Lee <a@example.com>"),
        (EmailAddress("a@example.com", "Lee, Ann"), "=?utf-8?q?Lee=2C_Ann?= <a@example.com>", "Lee Ann <a@example.com>"),
        (EmailAddress("a@example.com", "Zoë"), "=?utf-8?q?Zo=C3=AB?= <a@example.com>", "Zoë <a@example.com>"),
        (EmailAddress("a@example.com", 'Ann "<x@evil>"'), "=?utf-8?q?Ann_=22=3Cx=40evil=3E=22?= <a@example.com>", "Ann x evil <a@example.com>"),
        (EmailAddress("a@example.com", "=?utf-8?q?x?="), "=?utf-8?q?=3D=3Futf-8=3Fq=3Fx=3F=3D?= <a@example.com>", "utf-8?q?x?= <a@example.com>"),
    ],
)
def test_display_names_in_the_forms_resend_accepts(address: EmailAddress, as_recipient: str, as_sender: str) -> None:
    """Resend refuses quoted names everywhere and encoded words in ``from``: names needing either are rewritten."""
    assert (mailbox(address), sender(address)) == (as_recipient, as_sender)


def test_all_blind_recipients_get_one_copy_each_with_its_own_idempotency_key() -> None:
    """Resend needs a ``to``: each blind recipient gets a copy, keyed ``<queue id>-<n>``."""
    message = b"From: a@example.com\r\nTo: undisclosed-recipients:;\r\nSubject: s\r\n\r\nx\r\n"
    requests = build(message, ("x@example.org", "y@example.net"))
    assert [json.loads(r.body)["to"] for r in requests] == [["x@example.org"], ["y@example.net"]]
    assert [dict(r.headers)["Idempotency-Key"] for r in requests] == ["QID1-1", "QID1-2"]
    assert all("bcc" not in json.loads(r.body) for r in requests)
    assert [r.recipients for r in requests] == [("x@example.org",), ("y@example.net",)]


def test_one_copy_carries_every_envelope_recipient_blind_ones_too() -> None:
    """A message with a To goes in one request, which names every envelope recipient
    (Bcc included) as the envelope spells them, whatever case the header uses."""
    message = b"From: a@example.com\r\nTo: Bob@Example.org\r\nSubject: s\r\n\r\nx\r\n"
    [request] = build(message, ("bob@example.org", "hidden@example.net"))
    assert request.recipients == ("bob@example.org", "hidden@example.net")


def test_first_of_repeated_headers_and_kept_message_id() -> None:
    """``headers`` is an object: the first of two same-named headers is sent; X-Mailgate-Keep-Message-ID adds Message-ID."""
    message = (
        b"From: a@example.com\r\nTo: bob@example.org\r\nMessage-ID: <k@example.com>\r\n"
        b"X-Thing: one\r\nX-Thing: two\r\nX-Mailgate-Keep-Message-ID: yes\r\n\r\nx\r\n"
    )
    [request] = build(message, ("bob@example.org",))
    assert json.loads(request.body)["headers"] == {"X-Thing": "one", "Message-ID": "<k@example.com>"}


def test_html_only_message_lets_resend_derive_the_text() -> None:
    """Without a text part no ``text`` is sent, so Resend makes one from the HTML."""
    message = b"From: a@example.com\r\nTo: bob@example.org\r\nContent-Type: text/html\r\n\r\n<p>x</p>\r\n"
    [request] = build(message, ("bob@example.org",))
    body = json.loads(request.body)
    assert body["html"] == "<p>x</p>\n" and "text" not in body


def test_account_key_and_url() -> None:
    """An account's own key is used; ``url`` points at another base (a regional endpoint or a test double)."""
    email = parse_message(MINIMAL, SENDER, ("bob@example.org",))
    account = Account(name="b", provider_settings={"rs": {"api_key": "re_own"}})
    [request] = provider(url="http://127.0.0.1:9/").build_requests(email, account, "Q")
    assert request.url == "http://127.0.0.1:9/emails"
    assert dict(request.headers)["Authorization"] == "Bearer re_own"
    assert "re_own" not in repr(request)


def test_limits_checked_before_sending() -> None:
    """Over 50 To recipients is 452 4.5.3, over 40 MB 552 5.3.4, a Content-ID of 128+ characters 554 5.6.0."""
    email = parse_message(MINIMAL, SENDER, ("bob@example.org",))
    assert provider().check(email, ACCOUNT) is None
    many = [f"r{i}@example.org" for i in range(51)]
    crowded = parse_message(f"From: a@example.com\r\nTo: {', '.join(many)}\r\n\r\nx\r\n".encode(), SENDER, tuple(many))
    refusal = provider().check(crowded, ACCOUNT)
    assert refusal is not None and (refusal.code, refusal.enhanced) == (452, "4.5.3")
    big = dataclasses.replace(email, attachments=(Attachment("big.bin", "application/octet-stream", b"x" * 30_000_001),))
    refusal = provider().check(big, ACCOUNT)
    assert refusal is not None and (refusal.code, refusal.enhanced) == (552, "5.3.4")
    long_cid = dataclasses.replace(email, attachments=(Attachment("i.png", "image/png", PNG, "c" * 128, True),))
    refusal = provider().check(long_cid, ACCOUNT)
    assert refusal is not None and (refusal.code, refusal.enhanced) == (554, "5.6.0")


def response(status: int, body: object = b"", headers: tuple[tuple[str, str], ...] = ()) -> HTTPResponse:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return HTTPResponse(status, headers, raw)


def error(status: int, name: str, message: str, headers: tuple[tuple[str, str], ...] = ()) -> HTTPResponse:
    return response(status, {"statusCode": status, "name": name, "message": message}, headers)


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (response(200, {"id": "49a3999c-0ce1-4ea6-ab68-afcd6dc2e794"}), Delivered("rs", "49a3999c-0ce1-4ea6-ab68-afcd6dc2e794")),
        (response(200, {}), Delivered("rs", "QID1")),
        (error(422, "validation_error", "Invalid `to` field."), Failed("rs", "Resend validation_error (HTTP 422): Invalid `to` field.", 554, "5.6.0")),
        (error(403, "validation_error", "The example.com domain is not verified."),
         Failed("rs", "Resend validation_error (HTTP 403): The example.com domain is not verified.", 554, "5.7.1")),
        (error(401, "missing_api_key", "Missing API key in the authorization header."),
         Failed("rs", "Resend missing_api_key (HTTP 401): Missing API key in the authorization header.", 554, "5.7.0")),
        (error(403, "invalid_api_key", "API key is invalid."), Failed("rs", "Resend invalid_api_key (HTTP 403): API key is invalid.", 554, "5.7.0")),
        (error(451, "security_error", "The email payload contain invalid characters."),
         Failed("rs", "Resend security_error (HTTP 451): The email payload contain invalid characters.", 554, "5.7.1")),
        (error(404, "not_found", "The requested endpoint does not exist."),
         Retry("rs", "Resend not_found (HTTP 404): The requested endpoint does not exist.", "4.3.5")),
        (error(409, "concurrent_idempotent_requests", "Same idempotency key used while original request is still in progress."),
         Retry("rs", "Resend concurrent_idempotent_requests (HTTP 409): Same idempotency key used while original request is still in progress.", "4.3.0")),
        (error(409, "invalid_idempotent_request", "Same idempotency key used with a different request payload."),
         Failed("rs", "Resend invalid_idempotent_request (HTTP 409): Same idempotency key used with a different request payload.", 554, "5.6.0")),
        (error(429, "rate_limit_exceeded", "Too many requests.", (("retry-after", "2"),)),
         Retry("rs", "Resend rate_limit_exceeded (HTTP 429): Too many requests.", "4.7.0", 2.0)),
        (error(429, "daily_quota_exceeded", "You have reached your daily email sending quota."),
         Retry("rs", "Resend daily_quota_exceeded (HTTP 429): You have reached your daily email sending quota.", "4.7.0")),
        (error(500, "internal_server_error", "Unexpected error."), Retry("rs", "API unavailable (HTTP 500)", "4.3.0")),
        (response(502, b"<html>Bad Gateway</html>"), Retry("rs", "API unavailable (HTTP 502)", "4.3.0")),
        (error(418, "something_new", "Unheard of."), Failed("rs", "HTTP 418: Unheard of.", 554, "5.0.0")),
    ],
)
def test_classification_table(answer: HTTPResponse, expected: object) -> None:
    """Resend's documented error names map to the error table of ARCHITECTURE.md."""
    [request] = build(MINIMAL, ("bob@example.org",))
    assert provider().classify(request, answer) == expected

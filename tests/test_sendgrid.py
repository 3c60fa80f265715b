"""The SendGrid adapter: golden requests, X-SMTPAPI mapping and SendGrid's answers."""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from typing import Any

import pytest
from zope.interface.verify import verifyObject

from mailgate.accounts.account import Account
from mailgate.interfaces import IProvider
from mailgate.message import parse_message
from mailgate.outcome import Delivered, Failed, Retry
from mailgate.providers.base import HTTPResponse
from mailgate.providers.sendgrid import PROVIDER, SendGridProvider

from .provider_messages import HTML, MINIMAL, PDF, PNG, RECIPIENTS, SENDER, SUBJECT, TEXT, rich_message

ACCOUNT = Account(name="alice")
API_KEY = "SG.test-key-not-a-secret"


def provider(**settings: object) -> SendGridProvider:
    values: dict[str, Any] = {"api_key": API_KEY, **settings}
    PROVIDER.validate("sg", values)
    return SendGridProvider("sg", values)


def body(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def payload_of(raw: bytes, recipients: tuple[str, ...] = ("b@example.org",)) -> dict[str, Any]:
    [request] = provider().build_requests(parse_message(raw, "a@example.com", recipients), ACCOUNT, "Q")
    return json.loads(request.body)


def test_provides_interface() -> None:
    """The adapter implements IProvider completely."""
    assert verifyObject(IProvider, provider())


def test_rich_message_golden_request() -> None:
    """Bcc stays in the personalization's private bcc list; every mapped field is exact."""
    email = parse_message(rich_message(), SENDER, RECIPIENTS)
    assert provider().check(email, ACCOUNT) is None
    [request] = provider().build_requests(email, ACCOUNT, "QID1")
    assert (request.method, request.url) == ("POST", "https://api.sendgrid.com/v3/mail/send")
    assert request.headers == (
        ("Content-Type", "application/json"),
        ("Accept", "application/json"),
        ("User-Agent", "mailgate/0.1"),
        ("Authorization", f"Bearer {API_KEY}"),
    )
    assert request.body == body(
        {
            "personalizations": [
                {
                    "to": [{"email": "bob@example.org", "name": "Bob"}],
                    "cc": [{"email": "carol@example.net"}],
                    "bcc": [{"email": "dave.hidden@example.com"}],
                }
            ],
            "from": {"email": "alice@example.com", "name": "Ålice Exämple"},
            "subject": SUBJECT,
            "reply_to": {"email": "support@example.com", "name": "Support Team"},
            "content": [{"type": "text/plain", "value": TEXT}, {"type": "text/html", "value": HTML}],
            "attachments": [
                {
                    "content": base64.b64encode(PNG).decode(),
                    "type": "image/png",
                    "filename": "logo.png",
                    "disposition": "inline",
                    "content_id": "logo@example.com",
                },
                {
                    "content": base64.b64encode(PDF).decode(),
                    "type": "application/pdf",
                    "filename": "report.pdf",
                    "disposition": "attachment",
                },
            ],
            "headers": {"X-Campaign": "q4"},
            "categories": ["reports"],
            "custom_args": {"Customer": "42"},
            "tracking_settings": {
                "click_tracking": {"enable": True, "enable_text": True},
                "open_tracking": {"enable": True},
            },
        }
    )


def test_minimal_message_golden_request() -> None:
    """A minimal message: one personalization, text content only; the EU base URL is honoured."""
    email = parse_message(MINIMAL, SENDER, ("bob@example.org",))
    [request] = provider(url="https://api.eu.sendgrid.com").build_requests(email, ACCOUNT, "Q")
    assert request.url == "https://api.eu.sendgrid.com/v3/mail/send"
    assert request.body == body(
        {
            "personalizations": [{"to": [{"email": "bob@example.org"}]}],
            "from": {"email": "alice@example.com"},
            "subject": "hi",
            "content": [{"type": "text/plain", "value": "Hello\n"}],
        }
    )


def test_x_smtpapi_maps_to_v3_fields() -> None:
    """X-SMTPAPI category, unique_args, filters, asm_group_id, ip_pool and send_at map; its "to" is ignored."""
    smtpapi = json.dumps(
        {
            "to": ["someone-else@example.org"],
            "category": ["newsletter", "reports"],
            "unique_args": {"campaign": "spring", "batch": 7},
            "filters": {"clicktrack": {"settings": {"enable": 0}}, "opentrack": {"settings": {"enable": 1}}},
            "asm_group_id": 42,
            "ip_pool": "transactional",
            "send_at": 1_800_000_000,
        }
    )
    raw = (
        "From: a@example.com\r\nTo: b@example.org\r\nX-Mailgate-Tag: reports\r\n"
        f"X-Mailgate-Metadata-batch: 1\r\nX-SMTPAPI: {smtpapi}\r\n\r\nx\r\n"
    ).encode()
    payload = payload_of(raw)
    assert payload["personalizations"] == [{"to": [{"email": "b@example.org"}]}]
    assert payload["categories"] == ["reports", "newsletter"]
    assert payload["custom_args"] == {"batch": "1", "campaign": "spring"}
    assert payload["tracking_settings"] == {
        "click_tracking": {"enable": False},
        "open_tracking": {"enable": True},
    }
    assert (payload["asm"], payload["ip_pool_name"], payload["send_at"]) == ({"group_id": 42}, "transactional", 1_800_000_000)
    assert "headers" not in payload


def test_canonical_tracking_wins_over_x_smtpapi_and_html_only_links() -> None:
    """X-Mailgate-Track-* beat X-SMTPAPI filters; X-PM-TrackLinks HtmlOnly keeps text links untracked."""
    smtpapi = '{"filters": {"clicktrack": {"settings": {"enable": 0}}}}'
    raw = f"From: a@example.com\r\nTo: b@example.org\r\nX-PM-TrackLinks: HtmlOnly\r\nX-SMTPAPI: {smtpapi}\r\n\r\nx\r\n"
    assert payload_of(raw.encode())["tracking_settings"] == {"click_tracking": {"enable": True, "enable_text": False}}


def test_categories_are_bounded() -> None:
    """SendGrid takes at most 10 categories of at most 255 characters: the first valid ten are sent."""
    tags = "".join(f"X-Mailgate-Tag: t{i}\r\n" for i in range(12)) + f"X-Mailgate-Tag: {'x' * 256}\r\n"
    raw = f"From: a@example.com\r\nTo: b@example.org\r\n{tags}\r\nx\r\n".encode()
    assert payload_of(raw)["categories"] == [f"t{i}" for i in range(10)]


def test_reserved_headers_are_not_forwarded_and_keep_message_id() -> None:
    """Headers SendGrid refuses are dropped; X-Mailgate-Keep-Message-ID forwards Message-ID."""
    raw = (
        b"From: a@example.com\r\nTo: b@example.org\r\nMessage-ID: <m1@example.com>\r\nX-SG-ID: 1\r\n"
        b"DKIM-Signature: v=1\r\nX-Dup: first\r\nX-Dup: second\r\nX-Mailgate-Keep-Message-ID: true\r\n\r\nx\r\n"
    )
    assert payload_of(raw)["headers"] == {"X-Dup": "first", "Message-ID": "<m1@example.com>"}


def test_multiple_reply_to_addresses_use_reply_to_list() -> None:
    """Several Reply-To addresses go in reply_to_list (reply_to holds one)."""
    raw = b"From: a@example.com\r\nTo: b@example.org\r\nReply-To: x@example.org, Y <y@example.org>\r\n\r\nx\r\n"
    payload = payload_of(raw)
    assert "reply_to" not in payload
    assert payload["reply_to_list"] == [{"email": "x@example.org"}, {"email": "y@example.org", "name": "Y"}]


def test_all_blind_recipients_get_one_personalization_each() -> None:
    """With no visible recipient, each envelope recipient gets a personalization of their own."""
    raw = b"From: a@example.com\r\nTo: undisclosed-recipients:;\r\n\r\nx\r\n"
    payload = payload_of(raw, ("x@example.org", "y@example.org"))
    assert payload["personalizations"] == [{"to": [{"email": "x@example.org"}]}, {"to": [{"email": "y@example.org"}]}]


def test_html_only_message_has_html_content_only() -> None:
    """An HTML-only message sends only the text/html content."""
    raw = b"From: a@example.com\r\nTo: b@example.org\r\nContent-Type: text/html\r\n\r\n<p>x</p>\r\n"
    assert payload_of(raw)["content"] == [{"type": "text/html", "value": "<p>x</p>\n"}]


def test_empty_html_only_message_still_has_a_content_value() -> None:
    """SendGrid refuses an empty ``content`` list: an empty HTML part sends the one-space text."""
    raw = b"From: a@example.com\r\nTo: b@example.org\r\nContent-Type: text/html\r\n\r\n"
    assert payload_of(raw)["content"] == [{"type": "text/plain", "value": " "}]


def test_limits() -> None:
    """More than 1000 recipients is 452 4.5.3; more than 30 MB is 552 5.3.4."""
    email = parse_message(MINIMAL, SENDER, tuple(f"r{i}@example.org" for i in range(1001)))
    refusal = provider().check(email, ACCOUNT)
    assert refusal is not None and (refusal.code, refusal.enhanced) == (452, "4.5.3")
    big = replace(parse_message(MINIMAL, SENDER, ("b@example.org",)), text="x" * 30_000_001)
    refusal = provider().check(big, ACCOUNT)
    assert refusal is not None and (refusal.code, refusal.enhanced) == (552, "5.3.4")


def response(status: int, payload: object = None, headers: tuple[tuple[str, str], ...] = ()) -> HTTPResponse:
    raw = payload if isinstance(payload, bytes) else (json.dumps(payload).encode() if payload is not None else b"")
    return HTTPResponse(status, headers, raw)


def sg_errors(status: int, message: str, field: str | None = None) -> HTTPResponse:
    return response(status, {"errors": [{"message": message, "field": field, "help": None}]})


# Answers as documented at https://www.twilio.com/docs/sendgrid/api-reference/mail-send/errors
CLASSIFY = [
    (response(202, headers=(("X-Message-Id", "W4vYrDuXRyW3bJNgVDBAuA"),)), Delivered("sg", "W4vYrDuXRyW3bJNgVDBAuA")),
    (response(202), Delivered("sg", "QID")),
    (sg_errors(400, "Each unique email address in the personalizations array should only be included once.", "personalizations.0.to"),
     Failed("sg", "HTTP 400: Each unique email address in the personalizations array should only be included once.", 554, "5.6.0")),
    (sg_errors(401, "The provided authorization grant is invalid, expired, or revoked"),
     Failed("sg", "API refused the credentials (HTTP 401): The provided authorization grant is invalid, expired, or revoked", 554, "5.7.0")),
    (sg_errors(403, "The from address does not match a verified Sender Identity. Mail cannot be sent until this error is resolved."),
     Failed("sg", "the From address is not a verified SendGrid sender: The from address does not match a verified Sender "
            "Identity. Mail cannot be sent until this error is resolved.", 550, "5.7.1")),
    (sg_errors(401, "Maximum credits exceeded"), Retry("sg", "SendGrid account cannot send now: Maximum credits exceeded", "4.7.0")),
    (sg_errors(413, "Payload Too Large"), Failed("sg", "message too large for the API: Payload Too Large", 552, "5.3.4")),
    (response(429, {"errors": [{"message": "too many requests"}]}, (("Retry-After", "5"),)),
     Retry("sg", "rate limited by the API (HTTP 429)", "4.7.0", 5.0)),
    (response(500, b""), Retry("sg", "API unavailable (HTTP 500)", "4.3.0")),
]


@pytest.mark.parametrize(("answer", "expected"), CLASSIFY)
def test_classification_table(answer: HTTPResponse, expected: object) -> None:
    """SendGrid's answers map to the error table; the 250 id is X-Message-Id."""
    [request] = provider().build_requests(parse_message(MINIMAL, SENDER, ("bob@example.org",)), ACCOUNT, "QID")
    assert provider().classify(request, answer) == expected

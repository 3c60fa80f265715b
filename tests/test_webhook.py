"""The webhook adapter: golden requests and the classification of API answers."""

from __future__ import annotations

import base64
import json

import pytest
from zope.interface.verify import verifyObject

from mailgate.accounts.account import Account
from mailgate.interfaces import IProvider
from mailgate.message import parse_message
from mailgate.outcome import Delivered, Failed, Retry
from mailgate.providers.base import HTTPResponse, classify_http, parse_retry_after
from mailgate.providers.webhook import WebhookProvider, signature, verify_signature

MINIMAL = b"From: a@example.com\r\nTo: b@example.org\r\nSubject: hi\r\n\r\nbody\r\n"
ACCOUNT = Account(name="alice")


def provider(**settings: object) -> WebhookProvider:
    return WebhookProvider("hook", {"url": "https://api.example.com/v1/emails", **settings}, clock=lambda: 1_800_000_000)


def test_provides_interface() -> None:
    """The adapter implements IProvider completely."""
    assert verifyObject(IProvider, provider())


def test_minimal_message_golden_request() -> None:
    """A minimal message becomes exactly this request: URL, method, headers and body."""
    email = parse_message(MINIMAL, "a@example.com", ("b@example.org", "c@example.net"))
    [request] = provider(token="tok").build_requests(email, ACCOUNT, "QID1")
    assert (request.method, request.url) == ("POST", "https://api.example.com/v1/emails")
    assert request.headers == (
        ("Content-Type", "application/json"),
        ("Accept", "application/json"),
        ("User-Agent", "mailgate/0.1"),
        ("Idempotency-Key", "QID1"),
        ("Authorization", "Bearer tok"),
    )
    body = json.loads(request.body)
    assert body["envelope"] == {"mail_from": "a@example.com", "rcpt_to": ["b@example.org", "c@example.net"]}
    assert body["to"] == [{"name": "", "address": "b@example.org"}]
    assert body["bcc"] == [{"name": "", "address": "c@example.net"}]
    assert (body["subject"], body["text"], body["html"]) == ("hi", "body\n", None)
    assert body["attachments"] == [] and body["headers"] == []


def test_basic_auth_and_signature() -> None:
    """Username/password become HTTP Basic, and the signature verifies over the exact body."""
    email = parse_message(MINIMAL, "a@example.com", ("b@example.org",))
    [request] = provider(username="u", password="p:w", signing_secret="s3").build_requests(email, ACCOUNT, "Q")
    headers = dict(request.headers)
    assert headers["Authorization"] == "Basic " + base64.b64encode(b"u:p:w").decode()
    assert headers["X-Mailgate-Signature"] == signature("s3", request.body, 1_800_000_000)
    assert verify_signature("s3", request.body, headers["X-Mailgate-Signature"], now=1_800_000_010)
    assert not verify_signature("s3", request.body + b" ", headers["X-Mailgate-Signature"], now=1_800_000_010)
    assert not verify_signature("s3", request.body, headers["X-Mailgate-Signature"], now=1_800_001_000)
    assert not verify_signature("other", request.body, headers["X-Mailgate-Signature"], now=1_800_000_010)


def test_account_settings_override_provider_settings() -> None:
    """An account's own credentials for this provider replace the server's."""
    email = parse_message(MINIMAL, "a@example.com", ("b@example.org",))
    account = Account(name="bob", provider_settings={"hook": {"token": "bobs-token"}})
    [request] = provider(token="server-token").build_requests(email, account, "Q")
    assert dict(request.headers)["Authorization"] == "Bearer bobs-token"


def test_secrets_not_in_repr() -> None:
    """A request's repr shows neither its headers nor its body (both may hold credentials)."""
    email = parse_message(MINIMAL, "a@example.com", ("b@example.org",))
    [request] = provider(token="tok-secret").build_requests(email, ACCOUNT, "Q")
    assert "tok-secret" not in repr(request)
    assert ("Authorization", "<redacted>") in request.redacted_headers()


def response(status: int, body: object = b"", headers: tuple[tuple[str, str], ...] = ()) -> HTTPResponse:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return HTTPResponse(status, headers, raw)


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (response(200, {"id": "abc"}), Delivered("hook", "abc")),
        (response(201, {"message_id": 42}), Delivered("hook", "42")),
        (response(204), Delivered("hook", "QID")),
        (response(200, {"id": "abc\r\n250 2.0.0 forged"}), Delivered("hook", "QID")),
        (response(200, {"id": "x" * 201}), Delivered("hook", "QID")),
        (response(200, {"id": True}), Delivered("hook", "QID")),
        (response(429, headers=(("Retry-After", "120"),)), Retry("hook", "rate limited by the API (HTTP 429)", "4.7.0", 120.0)),
        (response(503), Retry("hook", "API unavailable (HTTP 503)", "4.3.0", None)),
        (response(408), Retry("hook", "API unavailable (HTTP 408)", "4.3.0", None)),
        (response(413, {"message": "too big"}), Failed("hook", "message too large for the API: too big", 552, "5.3.4")),
        (response(401, {"error": "bad key"}), Failed("hook", "API refused the credentials (HTTP 401): bad key", 554, "5.7.0")),
        (response(422, {"errors": [{"message": "bad to"}]}), Failed("hook", "HTTP 422: bad to", 554, "5.6.0")),
        (response(404, b"not here"), Failed("hook", "HTTP 404: not here", 554, "5.0.0")),
    ],
)
def test_classification_table(answer: HTTPResponse, expected: object) -> None:
    """API answers map to the error table: 2xx delivered, 408/429/5xx retry, other 4xx failed."""
    email = parse_message(MINIMAL, "a@example.com", ("b@example.org",))
    [request] = provider().build_requests(email, ACCOUNT, "QID")
    assert provider().classify(request, answer) == expected


def test_reply_text_is_sanitised_and_bounded() -> None:
    """An API's error text cannot add reply lines or exceed one line's length."""
    outcome = classify_http("hook", response(400, {"message": "bad\r\n250 ok" + "x" * 2000}), "Q")
    reply = outcome.reply()
    [line] = reply.lines()
    assert line.startswith(b"554 5.6.0 Rejected by hook: HTTP 400: bad 250 ok")
    assert len(line) <= 512


@pytest.mark.parametrize(
    ("value", "expected"),
    [("30", 30.0), (None, None), ("soon", None), ("Thu, 01 Jan 2099 00:00:00 GMT", 4070908800.0 - 1000.0)],
)
def test_retry_after(value: str | None, expected: float | None) -> None:
    """Retry-After accepts delay-seconds and HTTP dates (RFC 9110 §10.2.3)."""
    assert parse_retry_after(value, now=1000.0) == expected

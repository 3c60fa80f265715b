"""The Postmark adapter: golden requests and the classification of Postmark's answers."""

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
from mailgate.providers.postmark import PROVIDER, PostmarkProvider

from .provider_messages import HTML, MINIMAL, PDF, PNG, RECIPIENTS, SENDER, SUBJECT, TEXT, rich_message

ACCOUNT = Account(name="alice")
TOKEN = "test-postmark-token"


def provider(**settings: object) -> PostmarkProvider:
    values: dict[str, Any] = {"token": TOKEN, **settings}
    PROVIDER.validate("pm", values)
    return PostmarkProvider("pm", values)


def body(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def test_provides_interface() -> None:
    """The adapter implements IProvider completely."""
    assert verifyObject(IProvider, provider())


def test_rich_message_golden_request() -> None:
    """Every mapped field lands in Postmark's own field, and the request is exactly this."""
    email = parse_message(rich_message(), SENDER, RECIPIENTS)
    assert provider().check(email, ACCOUNT) is None
    [request] = provider().build_requests(email, ACCOUNT, "QID1")
    assert (request.method, request.url) == ("POST", "https://api.postmarkapp.com/email")
    assert request.headers == (
        ("Content-Type", "application/json"),
        ("Accept", "application/json"),
        ("User-Agent", "mailgate/0.1"),
        ("X-Postmark-Server-Token", TOKEN),
    )
    assert request.body == body(
        {
            "From": '"Ålice Exämple" <alice@example.com>',
            "To": '"Bob" <bob@example.org>',
            "Cc": "carol@example.net",
            "Bcc": "dave.hidden@example.com",
            "Subject": SUBJECT,
            "Tag": "reports",
            "HtmlBody": HTML,
            "TextBody": TEXT,
            "ReplyTo": '"Support Team" <support@example.com>',
            "Headers": [{"Name": "X-Campaign", "Value": "q4"}],
            "TrackOpens": True,
            "TrackLinks": "HtmlAndText",
            "Metadata": {"Customer": "42"},
            "Attachments": [
                {
                    "Name": "logo.png",
                    "Content": base64.b64encode(PNG).decode(),
                    "ContentType": "image/png",
                    "ContentID": "cid:logo@example.com",
                },
                {"Name": "report.pdf", "Content": base64.b64encode(PDF).decode(), "ContentType": "application/pdf"},
            ],
            "MessageStream": "broadcast",
        }
    )
    assert request.queue_id == "QID1"


def test_minimal_message_golden_request() -> None:
    """A minimal message carries only From, To, Subject and TextBody."""
    email = parse_message(MINIMAL, SENDER, ("bob@example.org",))
    [request] = provider(url="https://pm.test.example/").build_requests(email, ACCOUNT, "QID2")
    assert request.url == "https://pm.test.example/email"
    assert request.body == body(
        {"From": "alice@example.com", "To": "bob@example.org", "Subject": "hi", "TextBody": "Hello\n"}
    )


@pytest.mark.parametrize(
    ("raw", "bodies"),
    [
        (
            b"From: a@example.com\r\nTo: b@example.org\r\nMIME-Version: 1.0\r\n"
            b'Content-Type: multipart/alternative; boundary="b"\r\n\r\n--b\r\n\r\nHello text\r\n'
            b"--b\r\nContent-Type: text/html\r\n\r\n\r\n--b--\r\n",
            {"TextBody": "Hello text"},
        ),
        (b"From: a@example.com\r\nTo: b@example.org\r\nContent-Type: text/html\r\n\r\n", {"TextBody": " "}),
    ],
)
def test_empty_html_part_is_not_sent(raw: bytes, bodies: dict[str, str]) -> None:
    """An empty HTML part would show recipients a blank message (or make Postmark refuse
    one without a body, error 300): only a non-empty body is sent."""
    [request] = provider().build_requests(parse_message(raw, "a@example.com", ("b@example.org",)), ACCOUNT, "Q")
    payload = json.loads(request.body)
    assert {key: payload[key] for key in ("HtmlBody", "TextBody") if key in payload} == bodies


def test_vendor_headers_and_keep_message_id() -> None:
    """X-PM-* headers map like the canonical ones; X-PM-KeepID forwards the Message-ID."""
    raw = (
        b"From: a@example.com\r\nTo: b@example.org\r\nSubject: s\r\nMessage-ID: <keep-1@example.com>\r\n"
        b"X-PM-Tag: welcome\r\nX-PM-Metadata-order: 7\r\nX-PM-Message-Stream: outbound\r\n"
        b"X-PM-TrackLinks: HtmlOnly\r\nX-PM-TrackOpens: false\r\nX-PM-KeepID: true\r\n\r\nx\r\n"
    )
    email = parse_message(raw, "a@example.com", ("b@example.org",))
    [request] = provider().build_requests(email, ACCOUNT, "Q")
    payload = json.loads(request.body)
    assert payload["Tag"] == "welcome"
    assert payload["Metadata"] == {"order": "7"}
    assert payload["MessageStream"] == "outbound"
    assert (payload["TrackLinks"], payload["TrackOpens"]) == ("HtmlOnly", False)
    assert payload["Headers"] == [{"Name": "Message-ID", "Value": "<keep-1@example.com>"}]
    assert b"X-PM" not in request.body


def test_signatures_are_not_forwarded() -> None:
    """A client's DKIM signature would fail after Postmark rebuilds the message: it is dropped."""
    raw = b"From: a@example.com\r\nTo: b@example.org\r\nDKIM-Signature: v=1; d=example.com\r\nX-Keep: 1\r\n\r\nx\r\n"
    [request] = provider().build_requests(parse_message(raw, "a@example.com", ("b@example.org",)), ACCOUNT, "Q")
    assert json.loads(request.body)["Headers"] == [{"Name": "X-Keep", "Value": "1"}]


def test_header_recipients_outside_the_envelope_get_nothing() -> None:
    """Only envelope recipients receive the message, whatever To and Cc say."""
    raw = b"From: a@example.com\r\nTo: list@example.org, b@example.org\r\nCc: c@example.org\r\n\r\nx\r\n"
    [request] = provider().build_requests(parse_message(raw, "a@example.com", ("B@example.org",)), ACCOUNT, "Q")
    payload = json.loads(request.body)
    assert (payload["To"], "Cc" in payload, "Bcc" in payload) == ("b@example.org", False, False)
    assert request.recipients == ("B@example.org",)  # the envelope's spelling, matched case-insensitively


ALL_BLIND = b"From: a@example.com\r\nTo: undisclosed-recipients:;\r\nSubject: s\r\n\r\nx\r\n"
BLIND = ("x@example.org", "y@example.org", "z@example.org")


def blind_batch() -> Any:
    [request] = provider().build_requests(parse_message(ALL_BLIND, "a@example.com", BLIND), ACCOUNT, "QB")
    return request


def test_all_blind_recipients_get_one_copy_each_in_one_batch_call() -> None:
    """Postmark needs a To: when every recipient is blind, each gets a copy addressed to them
    alone, and the copies go in one /email/batch call, so the message gets one answer."""
    request = blind_batch()
    assert request.url == "https://api.postmarkapp.com/email/batch"
    assert [(copy["To"], "Bcc" in copy, "Cc" in copy) for copy in json.loads(request.body)] == [
        (address, False, False) for address in BLIND
    ]
    assert request.queue_id == "QB"


def test_batch_calls_stay_within_postmark_batch_limits() -> None:
    """Large copies are spread over several batch calls of at most 50 MB each."""
    email = replace(parse_message(ALL_BLIND, "a@example.com", BLIND), text="x" * 20_000_000)
    requests = provider().build_requests(email, ACCOUNT, "Q")
    assert [len(json.loads(r.body)) for r in requests] == [2, 1]
    assert all(len(r.body) <= 50_000_000 for r in requests)
    # Each call names the envelope recipients of its copies: a DSN after the first
    # call was accepted and the second refused names z alone.
    assert [r.recipients for r in requests] == [BLIND[:2], BLIND[2:]]


def test_cc_moves_to_to_when_to_is_empty() -> None:
    """A message with only Cc and Bcc recipients shows the Cc ones in To (Postmark requires one)."""
    raw = b"From: a@example.com\r\nCc: c@example.org\r\n\r\nx\r\n"
    email = parse_message(raw, "a@example.com", ("c@example.org", "hidden@example.org"))
    [request] = provider().build_requests(email, ACCOUNT, "Q")
    payload = json.loads(request.body)
    assert (payload["To"], payload["Bcc"], "Cc" in payload) == ("c@example.org", "hidden@example.org", False)
    assert request.recipients == ("c@example.org", "hidden@example.org")  # Bcc included


def test_account_token_overrides_server_token() -> None:
    """An account's own token (or a passthrough login's) replaces the server's."""
    email = parse_message(MINIMAL, SENDER, ("bob@example.org",))
    account = Account(name="b", provider_settings={"pm": {"token": "own-token"}})
    [request] = provider().build_requests(email, account, "Q")
    assert dict(request.headers)["X-Postmark-Server-Token"] == "own-token"
    assert ("X-Postmark-Server-Token", "<redacted>") in request.redacted_headers()


def test_too_many_recipients_and_too_big() -> None:
    """Over 50 recipients is 452 4.5.3 and over 10 MB is 552 5.3.4, before any request."""
    many = tuple(f"r{i}@example.org" for i in range(51))
    email = parse_message(MINIMAL, SENDER, many)
    refusal = provider().check(email, ACCOUNT)
    assert refusal is not None and refusal.reply().code == 452 and refusal.enhanced == "4.5.3"
    big = replace(parse_message(MINIMAL, SENDER, ("b@example.org",)), text="x" * 10_000_001)
    refusal = provider().check(big, ACCOUNT)
    assert refusal is not None and (refusal.code, refusal.enhanced) == (552, "5.3.4")


def response(status: int, payload: object = None, headers: tuple[tuple[str, str], ...] = ()) -> HTTPResponse:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload or {}).encode()
    return HTTPResponse(status, headers, raw)


def pm_error(status: int, code: int, message: str) -> HTTPResponse:
    return response(status, {"ErrorCode": code, "Message": message})


# Answers as documented at https://postmarkapp.com/developer/api/overview (API error codes).
CLASSIFY = [
    (response(200, {"To": "bob@example.org", "MessageID": "b7bc2f4a-e38e", "ErrorCode": 0, "Message": "OK"}),
     Delivered("pm", "b7bc2f4a-e38e")),
    (response(200, {"MessageID": "bad id\r\n250 forged", "ErrorCode": 0}), Delivered("pm", "QID")),
    (response(401, {"ErrorCode": 10, "Message": "Bad or missing API token"}),
     Failed("pm", "API refused the credentials (HTTP 401): Bad or missing API token", 554, "5.7.0")),
    (pm_error(422, 300, "Invalid 'To' address: 'x'."), Failed("pm", "Postmark error 300: Invalid 'To' address: 'x'.", 554, "5.6.0")),
    (pm_error(422, 400, "The 'From' address you supplied is not a Sender Signature."),
     Failed("pm", "Postmark error 400: The 'From' address you supplied is not a Sender Signature.", 550, "5.7.1")),
    (pm_error(422, 401, "Sender signature not confirmed"), Failed("pm", "Postmark error 401: Sender signature not confirmed", 550, "5.7.1")),
    (pm_error(422, 406, "You tried to send to recipient(s) that have been marked as inactive."),
     Failed("pm", "Postmark error 406: You tried to send to recipient(s) that have been marked as inactive.", 550, "5.7.1")),
    (pm_error(422, 411, "Forbidden attachment type"), Failed("pm", "Postmark error 411: Forbidden attachment type", 554, "5.6.0")),
    (pm_error(422, 412, "Account is pending"), Failed("pm", "Postmark error 412: Account is pending", 550, "5.7.1")),
    (pm_error(422, 405, "Not allowed to send: out of credits"), Retry("pm", "Postmark error 405: Not allowed to send: out of credits", "4.7.0")),
    (pm_error(422, 413, "Account may not send"), Retry("pm", "Postmark error 413: Account may not send", "4.7.0")),
    (response(429, {"ErrorCode": 429, "Message": "Rate limit exceeded"}, (("Retry-After", "30"),)),
     Retry("pm", "Postmark error 429: Rate limit exceeded", "4.7.0", 30.0)),
    (pm_error(422, 1101, "Template not found"), Failed("pm", "Postmark error 1101: Template not found", 554, "5.6.0")),
    (response(413, b"Request Entity Too Large"), Failed("pm", "message too large for the API: Request Entity Too Large", 552, "5.3.4")),
    (response(500, {"ErrorCode": 100, "Message": "Maintenance"}), Retry("pm", "API unavailable (HTTP 500)", "4.3.0")),
    (response(503, b"<html>down</html>"), Retry("pm", "API unavailable (HTTP 503)", "4.3.0")),
    (response(403, b"<html>403 Forbidden</html>"), Failed("pm", "API refused the credentials (HTTP 403): <html>403 Forbidden</html>", 554, "5.7.0")),
]


@pytest.mark.parametrize(("answer", "expected"), CLASSIFY)
def test_classification_table(answer: HTTPResponse, expected: object) -> None:
    """Postmark's ErrorCode decides the reply: sender 550 5.7.1, suppressed recipient 550, rate limit 451."""
    [request] = provider().build_requests(parse_message(MINIMAL, SENDER, ("bob@example.org",)), ACCOUNT, "QID")
    assert provider().classify(request, answer) == expected


def test_rejection_reply_names_postmark_reason() -> None:
    """The client sees Postmark's own explanation in the final reply."""
    [request] = provider().build_requests(parse_message(MINIMAL, SENDER, ("bob@example.org",)), ACCOUNT, "Q")
    outcome = provider().classify(request, pm_error(422, 406, "Recipient marked as inactive."))
    assert str(outcome.reply()) == "550 5.7.1 Rejected by pm: Postmark error 406: Recipient marked as inactive."


def batch_answer(*results: dict[str, Any]) -> HTTPResponse:
    return response(200, list(results))


OK_X = {"To": "x@example.org", "MessageID": "id-x", "ErrorCode": 0, "Message": "OK"}
OK_Y = {"To": "y@example.org", "MessageID": "id-y", "ErrorCode": 0, "Message": "OK"}
INACTIVE = {"ErrorCode": 406, "Message": "Found inactive addresses: z@example.org."}
BAD_ADDRESS = {"ErrorCode": 300, "Message": "Invalid 'To' address: 'z'."}


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (batch_answer(OK_X, OK_Y, OK_X), Delivered("pm", "id-x and 2 more")),
        # Inactive recipients are skipped, as in a multi-recipient single send.
        (batch_answer(OK_X, OK_Y, INACTIVE), Delivered("pm", "id-x and 1 more")),
        (batch_answer(INACTIVE, INACTIVE, INACTIVE),
         Failed("pm", "Postmark error 406: Found inactive addresses: z@example.org.", 550, "5.7.1")),
        # x's copy went out all the same: a DSN must not say it failed.
        (batch_answer(OK_X, BAD_ADDRESS, INACTIVE),
         Failed("pm", "Postmark error 300: Invalid 'To' address: 'z'.", 554, "5.6.0", reached=("x@example.org",))),
        (batch_answer(OK_X, {"ErrorCode": 429, "Message": "Rate limit exceeded"}),
         Retry("pm", "Postmark error 429: Rate limit exceeded", "4.7.0", ambiguous=True)),
        (response(401, {"ErrorCode": 10, "Message": "Bad or missing API token"}),
         Failed("pm", "API refused the credentials (HTTP 401): Bad or missing API token", 554, "5.7.0")),
        (response(503, b"down"), Retry("pm", "API unavailable (HTTP 503)", "4.3.0")),
    ],
)
def test_batch_classification(answer: HTTPResponse, expected: object) -> None:
    """One outcome for the whole batch: every copy accepted, or the first real refusal decides."""
    assert provider().classify(blind_batch(), answer) == expected


def test_refused_batch_names_the_envelope_recipients_of_its_accepted_copies() -> None:
    """Copies are matched to their results by position, and their addresses to the
    envelope case-insensitively, in the envelope's spelling."""
    email = parse_message(ALL_BLIND, "a@example.com", ("X@Example.org", "y@example.org", "z@example.org"))
    [request] = provider().build_requests(email, ACCOUNT, "QB")
    outcome = provider().classify(request, batch_answer(BAD_ADDRESS, OK_Y, OK_X))
    assert isinstance(outcome, Failed) and outcome.reached == ("y@example.org", "z@example.org")

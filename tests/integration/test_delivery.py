"""Real clients over real TLS through mailgate to a real HTTP API on loopback.

smtplib and swaks, each with PLAIN, LOGIN and CRAM-MD5, on a submission
listener (STARTTLS, RFC 3207) and a submissions listener (implicit TLS, RFC
8314), delivering to the webhook API; the JSON the API receives is asserted
whole, and so is the SMTP reply for each kind of API answer.
"""

from __future__ import annotations

import base64
import time
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import threads

from mailgate.providers.webhook import verify_signature
from mailgate.testing import ScriptedResponse

from .conftest import (
    TEST_API_TOKEN,
    TEST_SIGNING_SECRET,
    Gateway,
    send_with_smtplib,
    swaks_send,
)

PDF = b"%PDF-1.4\n% test attachment\n" + bytes(range(256))
SENDER = "alice@example.com"
RECIPIENTS = ["bob@example.org", "carol@example.net", "dave.hidden@example.com"]


def rich_message() -> bytes:
    message = EmailMessage()
    message["From"] = "Ålice Exämple <alice@example.com>"
    message["To"] = "Bob <bob@example.org>"
    message["Cc"] = "carol@example.net"
    message["Bcc"] = "dave.hidden@example.com"
    message["Reply-To"] = "Support Team <support@example.com>"
    message["Subject"] = "Grüße ✓ Quarterly report"
    message["Message-ID"] = "<report-42@example.com>"
    message["Date"] = "Sun, 22 Nov 2026 10:00:00 +0000"
    message["X-Campaign"] = "q4"
    message.set_content("Hello Bob,\nthe report is attached.\n")
    message.add_alternative("<p>Hello <b>Bob</b>,</p><p>the report is attached.</p>\n", subtype="html")
    message.add_attachment(PDF, maintype="application", subtype="pdf", filename="report.pdf")
    return message.as_bytes(policy=SMTP_POLICY)


def expected_document(queue_id: str) -> dict[str, Any]:
    return {
        "schema": "mailgate.email.v1",
        "id": queue_id,
        "idempotency_key": queue_id,
        "account": "alice",
        "envelope": {"mail_from": SENDER, "rcpt_to": RECIPIENTS},
        "from": {"name": "Ålice Exämple", "address": "alice@example.com"},
        "reply_to": [{"name": "Support Team", "address": "support@example.com"}],
        "to": [{"name": "Bob", "address": "bob@example.org"}],
        "cc": [{"name": "", "address": "carol@example.net"}],
        "bcc": [{"name": "", "address": "dave.hidden@example.com"}],
        "subject": "Grüße ✓ Quarterly report",
        "text": "Hello Bob,\nthe report is attached.\n",
        "html": "<p>Hello <b>Bob</b>,</p><p>the report is attached.</p>\n",
        "attachments": [
            {
                "filename": "report.pdf",
                "content_type": "application/pdf",
                "content_id": None,
                "inline": False,
                "size": len(PDF),
                "content_base64": base64.b64encode(PDF).decode("ascii"),
            }
        ],
        "headers": [{"name": "X-Campaign", "value": "q4"}],
        "message_id": "report-42@example.com",
        "date": "Sun, 22 Nov 2026 10:00:00 +0000",
        "controls": {
            "tags": [],
            "metadata": {},
            "stream": None,
            "track_opens": None,
            "track_clicks": None,
            "transactional": None,
            "layout": None,
            "inline_css": None,
            "keep_message_id": None,
        },
    }


def assert_api_request(gateway: Gateway, reply_text: str) -> None:
    """The API got exactly one request: authenticated, signed, and the whole document."""
    assert len(gateway.api.requests) == 1
    request = gateway.api.requests[0]
    assert request.method == "POST"
    assert request.path == "/v1/emails"
    assert request.headers["authorization"] == f"Bearer {TEST_API_TOKEN}"
    assert request.headers["content-type"] == "application/json"
    assert verify_signature(TEST_SIGNING_SECRET, request.body, request.headers["x-mailgate-signature"], time.time())
    document = request.json()
    queue_id = document["id"]
    assert request.headers["idempotency-key"] == queue_id
    assert document == expected_document(queue_id)
    assert reply_text == "2.0.0 Ok: fake-1"


CLIENT_MATRIX = [
    (role, mechanism)
    for role in ("submission", "submissions")
    for mechanism in ("PLAIN", "LOGIN", "CRAM-MD5")
]


@pytest.mark.parametrize(("role", "mechanism"), CLIENT_MATRIX)
@pytest_twisted.ensureDeferred
async def test_smtplib_delivers_whole_message(gateway: Gateway, role: str, mechanism: str) -> None:
    """smtplib over TLS with each mechanism gets 250 with the API's id, and the API
    receives the whole message with the envelope-only recipient as Bcc."""
    result = await send_with_smtplib(
        gateway, role, mechanism, sender=SENDER, recipients=RECIPIENTS, message=rich_message()
    )
    assert result.code == 250
    assert_api_request(gateway, result.text)


@pytest.mark.parametrize(("role", "mechanism"), CLIENT_MATRIX)
@pytest_twisted.ensureDeferred
async def test_swaks_delivers_whole_message(gateway: Gateway, tmp_path: Path, role: str, mechanism: str) -> None:
    """swaks over verified TLS with each mechanism gets 250, and the API receives the
    same document as with smtplib."""
    message_file = tmp_path / "message.eml"
    message_file.write_bytes(rich_message())
    completed = await threads.deferToThread(
        swaks_send, gateway, role, mechanism, SENDER, RECIPIENTS, message_file
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    final = [line for line in completed.stdout.splitlines() if line.startswith(("<-  250 2.0.0 Ok", "<~  250 2.0.0 Ok"))]
    assert final, completed.stdout
    assert_api_request(gateway, final[-1].split(" ", 3)[-1])


API_FAULTS = [
    (ScriptedResponse(status=202, body={"id": "api-77"}), 250, "2.0.0 Ok: api-77"),
    (
        ScriptedResponse(status=429, body={"message": "slow down"}, headers=(("Retry-After", "30"),)),
        451,
        "4.7.0 Temporary failure at api: rate limited by the API (HTTP 429)",
    ),
    (ScriptedResponse(status=500, body=b"oops"), 451, "4.3.0 Temporary failure at api: API unavailable (HTTP 500)"),
    (ScriptedResponse(status=503, body=b""), 451, "4.3.0 Temporary failure at api: API unavailable (HTTP 503)"),
    (
        ScriptedResponse(status=400, body={"message": "Invalid 'To' address:\r\n250 fake"}),
        554,
        "5.6.0 Rejected by api: HTTP 400: Invalid 'To' address: 250 fake",
    ),
    (
        ScriptedResponse(status=401, body={"error": "bad token"}),
        554,
        "5.7.0 Rejected by api: API refused the credentials (HTTP 401): bad token",
    ),
    (ScriptedResponse(reset=True), 451, "4.4.1 Temporary failure at api: no complete answer from the API"),
    (ScriptedResponse(hang=True), 451, "4.4.1 Temporary failure at api: no answer within 2 s"),
]


@pytest.mark.parametrize(("response", "code", "text"), API_FAULTS)
@pytest_twisted.ensureDeferred
async def test_api_answer_becomes_precise_reply(
    gateway: Gateway, response: ScriptedResponse, code: int, text: str
) -> None:
    """Each kind of API answer (2xx, 429, 5xx, 4xx, reset, silence) reaches the client as
    the reply of the error table: never a blanket 550, API text sanitised onto one line."""
    gateway.api.respond(response)
    result = await send_with_smtplib(
        gateway, "submissions", "PLAIN", sender=SENDER, recipients=RECIPIENTS, message=rich_message()
    )
    assert (result.code, result.text.startswith(text)) == (code, True), result
    assert "\n" not in result.text
    assert len(gateway.api.requests) == 1
    gateway.api.assert_script_consumed()


@pytest_twisted.ensureDeferred
async def test_relay_from_trusted_network_needs_no_auth(gateway: Gateway) -> None:
    """A relay listener accepts unauthenticated mail from its trusted networks."""
    result = await threads.deferToThread(_plain_relay, gateway.ports["relay"])
    assert result[0] == 250
    assert gateway.api.requests[0].json()["account"] == "trusted-networks"


def _plain_relay(port: int) -> tuple[int, bytes]:
    import smtplib

    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("client.example")
        client.mail(SENDER)
        client.rcpt("bob@example.org")
        return client.data(b"Subject: hi\r\n\r\nbody\r\n")


@pytest_twisted.ensureDeferred
async def test_sender_restriction_enforced_end_to_end(gateway: Gateway) -> None:
    """An account limited to one sender gets 553 5.7.1 for another envelope sender and
    550 5.7.1 for any foreign author (From:, a second From mailbox or field, Sender:);
    only the message with its own From: reaches the API."""
    common = dict(user="restricted", password="restricted-test-password", recipients=["bob@example.org"])
    refused = await send_with_smtplib(
        gateway, "submissions", "PLAIN", sender="other@example.com", message=b"Subject: x\r\n\r\nx\r\n", **common
    )
    assert (refused.code, refused.text.split(" ")[0]) == (553, "5.7.1")
    forged = await send_with_smtplib(
        gateway,
        "submissions",
        "PLAIN",
        sender="owner@example.com",
        message=b"From: ceo@example.com\r\nSubject: x\r\n\r\nx\r\n",
        **common,
    )
    assert (forged.code, forged.text.split(" ")[0]) == (550, "5.7.1")
    for smuggled in (
        b"From: owner@example.com, ceo@example.com\r\nSubject: x\r\n\r\nx\r\n",
        b"From: owner@example.com\r\nFrom: ceo@example.com\r\nSubject: x\r\n\r\nx\r\n",
        b"From: owner@example.com\r\nSender: ceo@example.com\r\nSubject: x\r\n\r\nx\r\n",
    ):
        result = await send_with_smtplib(
            gateway, "submissions", "PLAIN", sender="owner@example.com", message=smuggled, **common
        )
        assert (result.code, result.text.split(" ")[0]) == (550, "5.7.1"), smuggled
    allowed = await send_with_smtplib(
        gateway, "submissions", "PLAIN", sender="owner@example.com",
        message=b"From: Owner <owner@example.com>\r\nSubject: x\r\n\r\nx\r\n", **common,
    )  # fmt: skip
    assert allowed.code == 250
    assert len(gateway.api.requests) == 1


@pytest_twisted.ensureDeferred
async def test_wrong_password_is_535(gateway: Gateway) -> None:
    """A wrong password over TLS is answered 535 5.7.8 and no mail can be sent."""
    import smtplib

    with pytest.raises(smtplib.SMTPAuthenticationError) as caught:
        await send_with_smtplib(
            gateway, "submissions", "PLAIN", password="wrong", sender=SENDER, recipients=RECIPIENTS, message=b"x"
        )
    assert caught.value.smtp_code == 535
    assert caught.value.smtp_error.startswith(b"5.7.8")
    assert gateway.api.requests == []

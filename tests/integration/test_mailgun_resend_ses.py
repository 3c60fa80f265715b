"""Mailgun, Resend and Amazon SES end to end.

A real client (smtplib, swaks) over STARTTLS or implicit TLS logs in and sends
the rich message (UTF-8 subject, text + HTML, Cc, an envelope-only Bcc
recipient, Reply-To, an attachment, an inline image, tag, metadata,
tracking); mailgate delivers it to a loopback stand-in for the provider's API
(:class:`mailgate.testing.FakeEmailAPI`), which checks the URL, the
provider's own authentication (for SES, the SigV4 signature over what
actually arrived) and the body.
"""

from __future__ import annotations

import base64
import json
from email import policy
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import threads

from mailgate.testing import ScriptedResponse

from ..provider_messages import PDF, RECIPIENTS, SENDER, SUBJECT, rich_message
from ..sigv4_check import expected_signature, parse_authorization
from ..test_mailgun import RICH_FIELDS
from ..test_resend import RICH_BODY
from .conftest import Gateway, gateway_with_accounts, swaks_send
from .test_providers import only_request, send

# Throwaway test credentials, not secrets.
MAILGUN_KEY = "test-mailgun-key"
RESEND_KEY = "re_test_resend_key"
AWS_ACCESS_KEY = "AKIDEXAMPLE"
AWS_SECRET_KEY = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"


def mailgun_table(api_url: str) -> str:
    return f'\n[providers.api]\ntype = "mailgun"\nurl = "{api_url}"\napi_key = "{MAILGUN_KEY}"\ndomain = "mg.example.com"\n'


def resend_table(api_url: str) -> str:
    return f'\n[providers.api]\ntype = "resend"\nurl = "{api_url}"\napi_key = "{RESEND_KEY}"\n'


def ses_table(api_url: str) -> str:
    return (
        f'\n[providers.api]\ntype = "ses"\nurl = "{api_url}"\nregion = "eu-west-1"\n'
        f'access_key_id = "{AWS_ACCESS_KEY}"\nsecret_access_key = "{AWS_SECRET_KEY}"\nconfiguration_set = "mailgate-test"\n'
    )


@pytest_twisted.async_yield_fixture
async def mailgun(tmp_path: Path, tls_files: tuple[Path, Path, Path]) -> Any:
    async for gateway in gateway_with_accounts(tmp_path, tls_files, mailgun_table):
        yield gateway


@pytest_twisted.async_yield_fixture
async def resend(tmp_path: Path, tls_files: tuple[Path, Path, Path]) -> Any:
    async for gateway in gateway_with_accounts(tmp_path, tls_files, resend_table):
        yield gateway


@pytest_twisted.async_yield_fixture
async def ses(tmp_path: Path, tls_files: tuple[Path, Path, Path]) -> Any:
    async for gateway in gateway_with_accounts(tmp_path, tls_files, ses_table):
        yield gateway


# --- Mailgun ----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_mailgun_delivers_rich_message(mailgun: Gateway) -> None:
    """Mailgun gets HTTP Basic api:<key>, the domain's URL and every field as form data; its id is in the 250 reply."""
    mailgun.api.respond(ScriptedResponse(body={"id": "<20261122100000.1.ABC@mg.example.com>", "message": "Queued. Thank you."}))
    result = await send(mailgun, rich_message())
    assert (result.code, result.text) == (250, "2.0.0 Ok: 20261122100000.1.ABC@mg.example.com")
    request = only_request(mailgun)
    assert (request.method, request.path) == ("POST", "/v3/mg.example.com/messages")
    assert request.headers["authorization"] == "Basic " + base64.b64encode(f"api:{MAILGUN_KEY}".encode()).decode()
    assert request.form() == RICH_FIELDS
    assert request.body.count(b"dave.hidden@example.com") == 1


@pytest_twisted.ensureDeferred
async def test_mailgun_unknown_domain_keeps_the_message(mailgun: Gateway) -> None:
    """A 404 for the domain (often the wrong region) is 451 4.3.5: the client keeps the message."""
    mailgun.api.respond(ScriptedResponse(status=404, body={"message": "Domain not found: mg.example.com"}))
    result = await send(mailgun, rich_message(), role="submissions")
    assert (result.code, result.text) == (
        451,
        (
            "4.3.5 Temporary failure at api: Mailgun does not know the domain (HTTP 404): "
            "Domain not found: mg.example.com; check its domain and region"
        ),
    )


# --- Resend -----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_resend_delivers_rich_message(resend: Gateway) -> None:
    """Resend gets a Bearer key, the queue id as Idempotency-Key and the JSON document; its id is in the 250 reply."""
    resend.api.respond(ScriptedResponse(body={"id": "49a3999c-0ce1-4ea6-ab68-afcd6dc2e794"}))
    result = await send(resend, rich_message())
    assert (result.code, result.text) == (250, "2.0.0 Ok: 49a3999c-0ce1-4ea6-ab68-afcd6dc2e794")
    request = only_request(resend)
    assert (request.method, request.path) == ("POST", "/emails")
    assert request.headers["authorization"] == f"Bearer {RESEND_KEY}"
    assert request.headers["idempotency-key"]
    assert request.json() == RICH_BODY


@pytest_twisted.ensureDeferred
async def test_resend_unverified_domain_is_a_precise_rejection(resend: Gateway) -> None:
    """Resend's 403 validation_error reaches the client as 554 5.7.1 with Resend's words."""
    refusal = {"statusCode": 403, "name": "validation_error", "message": "The example.com domain is not verified."}
    resend.api.respond(ScriptedResponse(status=403, body=refusal))
    result = await send(resend, rich_message(), role="submissions")
    assert (result.code, result.text) == (
        554,
        "5.7.1 Rejected by api: Resend validation_error (HTTP 403): The example.com domain is not verified.",
    )


# --- Amazon SES -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_ses_delivers_rich_message_signed(ses: Gateway) -> None:
    """SES gets a SigV4-signed request (checked over the bytes and Host that arrived) with the raw MIME and the envelope."""
    ses.api.respond(ScriptedResponse(body={"MessageId": "0102018f-ses-000000"}))
    result = await send(ses, rich_message())
    assert (result.code, result.text) == (250, "2.0.0 Ok: 0102018f-ses-000000")
    request = only_request(ses)
    assert (request.method, request.path) == ("POST", "/v2/email/outbound-emails")
    authorization = parse_authorization(request.headers["authorization"])
    assert (authorization["key"], authorization["region"], authorization["service"]) == (AWS_ACCESS_KEY, "eu-west-1", "ses")
    assert request.headers["host"] == f"127.0.0.1:{ses.api.port.getHost().port}"
    assert authorization["signature"] == expected_signature(request.method, request.path, request.headers, request.body, AWS_SECRET_KEY)
    body = request.json()
    raw = base64.b64decode(body.pop("Content")["Raw"]["Data"])
    assert body == {
        "Destination": {
            "ToAddresses": ["bob@example.org"],
            "CcAddresses": ["carol@example.net"],
            "BccAddresses": ["dave.hidden@example.com"],
        },
        "ConfigurationSetName": "mailgate-test",
        "EmailTags": [{"Name": "tag", "Value": "reports"}, {"Name": "Customer", "Value": "42"}],
    }
    assert b"dave.hidden" not in raw and b"X-Mailgate-" not in raw
    parsed = BytesParser(policy=policy.default).parsebytes(raw)
    assert parsed["Received"].startswith("from client.example")  # mailgate's trace header (RFC 5321 §4.4)
    assert (str(parsed["Subject"]), str(parsed["To"]), str(parsed["Cc"])) == (SUBJECT, "Bob <bob@example.org>", "carol@example.net")
    assert [part.get_content() for part in parsed.iter_attachments()] == [PDF]


@pytest_twisted.ensureDeferred
async def test_ses_throttling_over_swaks_is_a_temporary_failure(ses: Gateway, tmp_path: Path) -> None:
    """SES throttling reaches a swaks client on implicit TLS as 451 4.7.0 with SES's words."""
    ses.api.respond(
        ScriptedResponse(
            status=429,
            body={"message": "Maximum sending rate exceeded."},
            headers=(("x-amzn-ErrorType", "TooManyRequestsException:http://internal.amazon.com/coral/com.amazonaws.sesv2/"),),
        )
    )
    message_file = tmp_path / "message.eml"
    message_file.write_bytes(rich_message())
    completed = await threads.deferToThread(swaks_send, ses, "submissions", "LOGIN", SENDER, list(RECIPIENTS), message_file)
    assert "451 4.7.0 Temporary failure at api: rate limited by Amazon SES (TooManyRequestsException): Maximum sending rate exceeded." in completed.stdout, completed.stdout
    request = only_request(ses)
    assert json.loads(request.body)["Destination"]["BccAddresses"] == ["dave.hidden@example.com"]

"""Postmark, Bento and SendGrid end to end.

A real client (smtplib) over STARTTLS or implicit TLS logs in, sends the rich
message (UTF-8 subject, text + HTML, Cc, an envelope-only Bcc recipient,
Reply-To, an attachment, an inline image, tag, metadata, stream, tracking), and
mailgate delivers it to a loopback stand-in for the provider's API
(:class:`mailgate.testing.FakeEmailAPI`), which checks the URL, the
provider's own authentication and the body.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import reactor

from mailgate.message import text_to_html
from mailgate.testing import FakeEmailAPI, ScriptedResponse

from ..provider_messages import HTML, PDF, PNG, RECIPIENTS, SENDER, SUBJECT, TEXT, rich_message
from .conftest import Gateway, gateway_with_accounts, running_gateway, send_with_smtplib, write_config

# Throwaway test credentials, not secrets.
POSTMARK_TOKEN = "test-postmark-server-token"
SENDGRID_KEY = "SG.test-sendgrid-key"
BENTO = {"site_uuid": "test-site-uuid", "publishable_key": "test-publishable", "secret_key": "test-secret"}


def postmark_table(api_url: str) -> str:
    return f'\n[providers.api]\ntype = "postmark"\nurl = "{api_url}"\ntoken = "{POSTMARK_TOKEN}"\n'


def sendgrid_table(api_url: str) -> str:
    return f'\n[providers.api]\ntype = "sendgrid"\nurl = "{api_url}"\napi_key = "{SENDGRID_KEY}"\n'


def bento_table(api_url: str) -> str:
    keys = "".join(f'{key} = "{value}"\n' for key, value in BENTO.items())
    return f'\n[providers.api]\ntype = "bento"\nurl = "{api_url}/api/v1"\n{keys}'


@pytest_twisted.async_yield_fixture
async def postmark(tmp_path: Path, tls_files: tuple[Path, Path, Path]) -> Any:
    async for gateway in gateway_with_accounts(tmp_path, tls_files, postmark_table):
        yield gateway


@pytest_twisted.async_yield_fixture
async def sendgrid(tmp_path: Path, tls_files: tuple[Path, Path, Path]) -> Any:
    async for gateway in gateway_with_accounts(tmp_path, tls_files, sendgrid_table):
        yield gateway


@pytest_twisted.async_yield_fixture
async def bento(tmp_path: Path, tls_files: tuple[Path, Path, Path]) -> Any:
    async for gateway in gateway_with_accounts(tmp_path, tls_files, bento_table):
        yield gateway


async def send(gateway: Gateway, message: bytes, role: str = "submission", **kwargs: Any) -> Any:
    kwargs.setdefault("recipients", list(RECIPIENTS))
    return await send_with_smtplib(gateway, role, "PLAIN", sender=SENDER, message=message, **kwargs)


def only_request(gateway: Gateway) -> Any:
    assert len(gateway.api.requests) == 1, gateway.api.requests
    gateway.api.assert_script_consumed()
    return gateway.api.requests[0]


# --- Postmark ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_postmark_delivers_rich_message(postmark: Gateway) -> None:
    """Postmark gets its token header and every field; its MessageID is in the 250 reply."""
    postmark.api.respond(ScriptedResponse(body={"To": "bob@example.org", "MessageID": "pm-0d1e", "ErrorCode": 0, "Message": "OK"}))
    result = await send(postmark, rich_message())
    assert (result.code, result.text) == (250, "2.0.0 Ok: pm-0d1e")
    request = only_request(postmark)
    assert (request.method, request.path) == ("POST", "/email")
    assert request.headers["x-postmark-server-token"] == POSTMARK_TOKEN
    assert request.json() == {
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
            {"Name": "logo.png", "Content": base64.b64encode(PNG).decode(), "ContentType": "image/png", "ContentID": "cid:logo@example.com"},
            {"Name": "report.pdf", "Content": base64.b64encode(PDF).decode(), "ContentType": "application/pdf"},
        ],
        "MessageStream": "broadcast",
    }


@pytest_twisted.ensureDeferred
async def test_postmark_bcc_stays_blind(postmark: Gateway) -> None:
    """The envelope-only recipient is in Postmark's Bcc field and nowhere else."""
    result = await send(postmark, rich_message(), role="submissions")
    assert result.code == 250
    request = only_request(postmark)
    assert request.json()["Bcc"] == "dave.hidden@example.com"
    assert request.body.count(b"dave.hidden@example.com") == 1


@pytest_twisted.ensureDeferred
async def test_postmark_recipient_limit_is_refused_at_rcpt(tmp_path: Path, tls_files: tuple[Path, Path, Path]) -> None:
    """With the server allowing 100 recipients, Postmark's 50 is enforced at RCPT:
    the 51st gets 452 4.5.3, so the client sends the rest in another transaction
    instead of retrying a whole message that can never pass."""
    async for gateway in gateway_with_accounts(tmp_path, tls_files, postmark_table, limits="max_recipients = 100\n"):
        recipients = [f"r{n}@example.org" for n in range(51)]
        result = await send(gateway, rich_message(), recipients=recipients)
        assert (result.code, result.text) == (452, "4.5.3 Too many recipients")
        assert gateway.api.requests == []


@pytest_twisted.ensureDeferred
async def test_postmark_inactive_recipient_is_a_precise_rejection(postmark: Gateway) -> None:
    """Postmark's ErrorCode 406 reaches the client as 550 5.7.1 with Postmark's words."""
    postmark.api.respond(
        ScriptedResponse(status=422, body={"ErrorCode": 406, "Message": "You tried to send to a recipient that has been marked as inactive."})
    )
    result = await send(postmark, rich_message())
    assert (result.code, result.text) == (
        550,
        "5.7.1 Rejected by api: Postmark error 406: You tried to send to a recipient that has been marked as inactive.",
    )


# --- SendGrid ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_sendgrid_delivers_rich_message(sendgrid: Gateway) -> None:
    """SendGrid gets a Bearer key and the v3 document; X-Message-Id is in the 250 reply."""
    sendgrid.api.respond(ScriptedResponse(status=202, body=b"", headers=(("X-Message-Id", "sg-Wv4Y"),)))
    result = await send(sendgrid, rich_message())
    assert (result.code, result.text) == (250, "2.0.0 Ok: sg-Wv4Y")
    request = only_request(sendgrid)
    assert (request.method, request.path) == ("POST", "/v3/mail/send")
    assert request.headers["authorization"] == f"Bearer {SENDGRID_KEY}"
    assert request.json() == {
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
            {"content": base64.b64encode(PNG).decode(), "type": "image/png", "filename": "logo.png", "disposition": "inline", "content_id": "logo@example.com"},
            {"content": base64.b64encode(PDF).decode(), "type": "application/pdf", "filename": "report.pdf", "disposition": "attachment"},
        ],
        "headers": {"X-Campaign": "q4"},
        "categories": ["reports"],
        "custom_args": {"Customer": "42"},
        "tracking_settings": {"click_tracking": {"enable": True, "enable_text": True}, "open_tracking": {"enable": True}},
    }


@pytest_twisted.ensureDeferred
async def test_sendgrid_bcc_stays_blind(sendgrid: Gateway) -> None:
    """The envelope-only recipient is only in the personalization's bcc list."""
    sendgrid.api.respond(ScriptedResponse(status=202, body=b""))
    result = await send(sendgrid, rich_message(), role="submissions")
    assert result.code == 250
    request = only_request(sendgrid)
    assert request.json()["personalizations"][0]["bcc"] == [{"email": "dave.hidden@example.com"}]
    assert request.body.count(b"dave.hidden@example.com") == 1


@pytest_twisted.ensureDeferred
async def test_sendgrid_x_smtpapi_from_an_existing_application(sendgrid: Gateway) -> None:
    """An application written for SendGrid's SMTP relay keeps its X-SMTPAPI categories and arguments."""
    sendgrid.api.respond(ScriptedResponse(status=202, body=b""))
    smtpapi = json.dumps({"category": "receipts", "unique_args": {"order": "1001"}})
    message = f"From: alice@example.com\r\nTo: bob@example.org\r\nSubject: r\r\nX-SMTPAPI: {smtpapi}\r\n\r\nPaid.\r\n"
    result = await send(sendgrid, message.encode(), recipients=["bob@example.org"])
    assert result.code == 250
    document = only_request(sendgrid).json()
    assert (document["categories"], document["custom_args"]) == (["receipts"], {"order": "1001"})
    assert "headers" not in document


# --- Bento ------------------------------------------------------------------


BENTO_TEXT = (
    "From: Ålice <alice@example.com>\r\nTo: Bob <bob@example.org>\r\nCc: carol@example.net\r\n"
    "Reply-To: support@example.com\r\nSubject: Grüße\r\nX-Bento-Transactional: true\r\n"
    "X-Bento-Layout-Id: layout-1\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
    "Content-Transfer-Encoding: 8bit\r\n\r\nHello <Bob>,\r\nsee you.\r\n"
).encode()


def bento_auth(publishable: str, secret: str) -> str:
    return "Basic " + base64.b64encode(f"{publishable}:{secret}".encode()).decode()


@pytest_twisted.ensureDeferred
async def test_bento_one_email_per_envelope_recipient(bento: Gateway) -> None:
    """Bento gets Basic auth, site_uuid and one email per envelope recipient, Bcc included;
    a text message arrives as escaped HTML with its line breaks."""
    bento.api.respond(ScriptedResponse(body={"results": 3}))
    result = await send(bento, BENTO_TEXT)
    assert result.code == 250
    request = only_request(bento)
    queue_id = result.text.removeprefix("2.0.0 Ok: ")
    assert request.path == "/api/v1/batch/emails?site_uuid=test-site-uuid"
    assert request.headers["authorization"] == bento_auth("test-publishable", "test-secret")
    assert request.headers["user-agent"] == "mailgate/0.1"
    common = {
        "from": "alice@example.com",
        "subject": "Grüße",
        "html_body": text_to_html("Hello <Bob>,\nsee you.\n"),
        "transactional": True,
        "reply_to": "support@example.com",
        "layout_id": "layout-1",
    }
    assert request.json() == {"emails": [{"to": rcpt, **common} for rcpt in RECIPIENTS]}
    assert "Hello &lt;Bob&gt;,<br>" in common["html_body"]
    assert len(queue_id) > 5 and " " not in queue_id


@pytest_twisted.ensureDeferred
async def test_bento_refuses_attachments_before_sending(bento: Gateway) -> None:
    """The rich message has attachments: 554 5.6.0 at the end of DATA, and Bento is never called."""
    result = await send(bento, rich_message())
    assert (result.code, result.text) == (
        554,
        "5.6.0 Rejected by api: Bento cannot send attachments or inline images, and this message has 2: "
        "send the files as links, or send this message through another provider",
    )
    assert bento.api.requests == []


@pytest_twisted.ensureDeferred
async def test_bento_passthrough_login_is_the_credentials(tmp_path: Path, tls_files: tuple[Path, Path, Path]) -> None:
    """As on Bento's own SMTP endpoint: username = site UUID, password = publishable:secret."""
    api = FakeEmailAPI()
    await api.start(reactor)
    config = write_config(tmp_path, tls_files, api.url, provider=f'\n[providers.api]\ntype = "bento"\nurl = "{api.url}/api/v1"\n')
    text = config.read_text().replace(
        'store = "file"\npath = "accounts.toml"',
        'store = "passthrough"\nprovider = "api"\nusername_setting = "site_uuid"\n'
        'password_settings = ["publishable_key", "secret_key"]',
    )
    config.write_text(text)
    api.respond(ScriptedResponse(body={"results": 1}))
    async for gateway in running_gateway(config, api, tls_files[2]):
        result = await send_with_smtplib(
            gateway, "submissions", "PLAIN", user="login-site-uuid", password="login-pub:login-secret",
            sender=SENDER, recipients=["bob@example.org"], message=b"Subject: t\r\n\r\nx\r\n",
        )  # fmt: skip
        assert result.code == 250
        request = only_request(gateway)
        assert request.path == "/api/v1/batch/emails?site_uuid=login-site-uuid"
        assert request.headers["authorization"] == bento_auth("login-pub", "login-secret")


# --- CSS inlining, for every provider ---------------------------------------


@pytest_twisted.ensureDeferred
async def test_inline_css_header_reaches_the_webhook_inlined(gateway: Gateway) -> None:
    """X-Mailgate-Inline-CSS: the API receives HTML with style attributes and no header."""
    message = (
        b"From: alice@example.com\r\nTo: bob@example.org\r\nSubject: styled\r\nX-Mailgate-Inline-CSS: true\r\n"
        b"Content-Type: text/html\r\n\r\n<html><head><style>h1{color:#c00}</style></head><body><h1>Hi</h1></body></html>\r\n"
    )
    result = await send(gateway, message, recipients=["bob@example.org"])
    assert result.code == 250
    document = only_request(gateway).json()
    assert '<h1 style="color: #c00;">Hi</h1>' in document["html"]
    assert "<style>" not in document["html"]
    assert document["controls"]["inline_css"] is True
    assert all(h["name"].lower() != "x-mailgate-inline-css" for h in document["headers"])

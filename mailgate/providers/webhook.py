"""mailgate's own webhook schema: one JSON POST per message.

For operators who run their own sending API.  The schema (``mailgate.email.v1``)
is documented in README.rst; it carries the whole neutral email, envelope
included, so the receiving API never has to parse MIME.

Authentication: ``token`` (``Authorization: Bearer``) or ``username`` and
``password`` (HTTP Basic, RFC 7617).  With ``signing_secret`` set, every
request carries ``X-Mailgate-Signature: t=<unix time>,v1=<hex>`` where the hex
is HMAC-SHA256(secret, "<t>." + body): the timestamp in the signed text lets
the receiver refuse replays.  ``Idempotency-Key`` is always the queue id, so a
retried request can be recognised.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Callable, Mapping
from typing import Any

from zope.interface import implementer

from mailgate.accounts.account import Account
from mailgate.configvalues import ConfigError
from mailgate.interfaces import IProvider
from mailgate.model import EmailAddress, OutboundEmail
from mailgate.outcome import Delivered, Outcome
from mailgate.providers.base import (
    USER_AGENT,
    HTTPRequest,
    HTTPResponse,
    classify_http,
    json_request,
    safe_message_id,
)
from mailgate.providers.providertype import ProviderType, capture_transport, no_probe

SCHEMA = "mailgate.email.v1"
# Where the capture provider pretends to send: never contacted.
CAPTURE_URL = "https://api.example.invalid/v1/emails"
SETTINGS = ("url", "token", "username", "password", "signing_secret")
# Settings that authenticate to the API: in passthrough mode they come only from
# the SMTP login, never from the server's configuration.
CREDENTIAL_SETTINGS = ("token", "username", "password")
# What an account may set for itself (its own credentials and signing secret).
ACCOUNT_SETTINGS = (*CREDENTIAL_SETTINGS, "signing_secret")


def _address(address: EmailAddress) -> dict[str, str]:
    return {"name": address.name, "address": address.address}


def email_payload(email: OutboundEmail, account: Account, message_id: str) -> dict[str, Any]:
    """The ``mailgate.email.v1`` document for one message."""
    controls = email.controls
    return {
        "schema": SCHEMA,
        "id": message_id,
        "idempotency_key": message_id,
        "account": account.name,
        "envelope": {
            "mail_from": email.envelope_sender,
            "rcpt_to": list(email.envelope_recipients),
        },
        "from": _address(email.from_) if email.from_ else None,
        "reply_to": [_address(a) for a in email.reply_to],
        "to": [_address(a) for a in email.to],
        "cc": [_address(a) for a in email.cc],
        "bcc": [_address(a) for a in email.bcc],
        "subject": email.subject,
        "text": email.text,
        "html": email.html,
        "attachments": [
            {
                "filename": part.filename,
                "content_type": part.content_type,
                "content_id": part.content_id,
                "inline": part.inline,
                "size": part.size,
                "content_base64": base64.b64encode(part.content).decode("ascii"),
            }
            for part in email.attachments
        ],
        "headers": [{"name": name, "value": value} for name, value in email.headers],
        "message_id": email.message_id,
        "date": email.date,
        "controls": {
            "tags": list(controls.tags),
            "metadata": controls.metadata_dict,
            "stream": controls.stream,
            "track_opens": controls.track_opens,
            "track_clicks": controls.track_clicks,
            "transactional": controls.transactional,
            "layout": controls.layout,
            "inline_css": controls.inline_css,
            "keep_message_id": controls.keep_message_id,
        },
    }


def signature(secret: str, body: bytes, timestamp: int) -> str:
    """The ``X-Mailgate-Signature`` value for ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret.encode("utf-8"), str(timestamp).encode("ascii") + b"." + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def verify_signature(secret: str, body: bytes, header: str, now: float, tolerance: float = 300) -> bool:
    """Receiver side of :func:`signature` (used by tests and by users' APIs in Python)."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        timestamp = int(fields["t"])
    except (KeyError, ValueError):
        return False
    if abs(now - timestamp) > tolerance:
        return False
    expected = signature(secret, body, timestamp)
    return hmac.compare_digest(expected, header)


@implementer(IProvider)
class WebhookProvider:
    """Adapter for the webhook schema; also the request format of ``capture``."""

    type = "webhook"

    def __init__(self, name: str, settings: Mapping[str, Any], clock: Callable[[], float] = time.time):
        self.name = name
        self.settings = settings
        self.clock = clock

    def _setting(self, account: Account, key: str) -> Any:
        own = account.provider_settings.get(self.name, {})
        return own.get(key, self.settings.get(key))

    def check(self, email: OutboundEmail, account: Account) -> None:
        return None  # The schema carries everything a message can hold.

    def build_requests(self, email: OutboundEmail, account: Account, message_id: str) -> list[HTTPRequest]:
        headers = [("User-Agent", USER_AGENT), ("Idempotency-Key", message_id)]
        token = self._setting(account, "token")
        username = self._setting(account, "username")
        if token:
            headers.append(("Authorization", f"Bearer {token}"))
        elif username:
            password = self._setting(account, "password") or ""
            basic = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
            headers.append(("Authorization", f"Basic {basic}"))
        request = json_request(
            self.name, "POST", self._setting(account, "url"), email_payload(email, account, message_id), headers
        )
        secret = self._setting(account, "signing_secret")
        if secret:
            sig = signature(secret, request.body, int(self.clock()))
            request = HTTPRequest(
                request.method,
                request.url,
                (*request.headers, ("X-Mailgate-Signature", sig)),
                request.body,
                request.provider,
            )
        return [request]

    def classify(self, request: HTTPRequest, response: HTTPResponse) -> Outcome:
        message_id = request_id(request)
        outcome = classify_http(self.name, response, message_id)
        if isinstance(outcome, Delivered):
            data = response.json()
            if isinstance(data, dict):
                for key in ("id", "message_id", "MessageID"):
                    if key in data:
                        return Delivered(self.name, safe_message_id(data[key], message_id))
        return outcome


def request_id(request: HTTPRequest) -> str:
    for name, value in request.headers:
        if name == "Idempotency-Key":
            return value
    return "unknown"


def _validate_capture(name: str, settings: dict[str, Any]) -> None:
    settings.setdefault("url", CAPTURE_URL)
    if not isinstance(settings.get("folder"), str):
        raise ConfigError(f"providers.{name}.folder", "required: the folder captured requests are written to")


PROVIDER = ProviderType(
    name="webhook",
    adapter=WebhookProvider,
    settings=SETTINGS,
    credential_settings=CREDENTIAL_SETTINGS,
    account_settings=ACCOUNT_SETTINGS,
    # The schema defines one call, which sends: nothing harmless to probe with.
    probe=no_probe,
)
# Development: the webhook request, written to a folder instead of being sent.
CAPTURE = ProviderType(
    name="capture",
    adapter=WebhookProvider,
    settings=(*SETTINGS, "folder"),
    credential_settings=CREDENTIAL_SETTINGS,
    account_settings=ACCOUNT_SETTINGS,
    validate=_validate_capture,
    transport=capture_transport,
)

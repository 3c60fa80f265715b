"""SendGrid: the v3 Mail Send API, ``POST {url}/v3/mail/send``.

Request format: https://www.twilio.com/docs/sendgrid/api-reference/mail-send/mail-send
(authenticated with ``Authorization: Bearer <api key>``; base URL
``https://api.sendgrid.com``, or ``https://api.eu.sendgrid.com`` for EU
regional subusers).  Recipients go in ``personalizations``
(https://www.twilio.com/docs/sendgrid/for-developers/sending-email/personalizations):
``to`` and ``cc`` are shown, ``bcc`` is not, so the envelope-only recipients
stay private.  ``content`` lists ``text/plain`` before ``text/html``;
``attachments`` carry base64 ``content``, ``type``, ``filename``,
``disposition`` and, for inline images, ``content_id``.  Tags become
``categories`` (at most 10, of at most 255 characters: later ones are left
out), metadata becomes ``custom_args`` and the tracking controls become
``tracking_settings.click_tracking`` / ``open_tracking``.  A 202 answer
carries the message id in the ``X-Message-Id`` header, which mailgate's 250
reply repeats.

Applications written for SendGrid's SMTP relay set ``X-SMTPAPI``
(https://www.twilio.com/docs/sendgrid/for-developers/sending-email/building-an-x-smtpapi-header).
Its ``category`` adds categories, ``unique_args`` adds custom_args, the
``clicktrack`` / ``opentrack`` filters set tracking (``X-Mailgate-Track-*``
headers win), ``asm_group_id`` becomes ``asm.group_id``, ``ip_pool`` becomes
``ip_pool_name`` and ``send_at`` is kept.  Its ``to`` list is ignored:
recipients come from the SMTP envelope (ARCHITECTURE.md §1); ``sub`` and
``section`` substitutions have no equivalent without a template and are
ignored too.

Errors (https://www.twilio.com/docs/sendgrid/api-reference/mail-send/errors):
400 with ``{"errors": [{"message", "field"}]}`` is a content rejection
(``554 5.6.0`` with SendGrid's message), 401/403 credentials (``554 5.7.0``),
except a From address that is not a verified Sender Identity (``550 5.7.1``)
and "Maximum credits exceeded" (``451``: the account owner can fix it, and
the next provider of the route is tried), 413 too large, 429 and 5xx
transient.  Limits checked before sending: 1000 recipients and 30 MB in total
with attachments.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from typing import Any

from zope.interface import implementer

from mailgate.accounts.account import Account
from mailgate.interfaces import IProvider
from mailgate.model import EmailAddress, OutboundEmail
from mailgate.outcome import Delivered, Failed, Outcome, Retry
from mailgate.providers.base import (
    USER_AGENT,
    HTTPRequest,
    HTTPResponse,
    classify_http,
    error_text,
    json_request,
    safe_message_id,
)
from mailgate.providers.mapping import (
    attachment_name,
    bodies,
    check_limits,
    distinct_recipients,
    encoded_size,
    forwarded_headers,
    setting,
    split_recipients,
)
from mailgate.providers.providertype import (
    Probe,
    ProviderType,
    credentials_verdict,
    has_settings,
    probe_request,
    require_url,
)

API_URL = "https://api.sendgrid.com"
MAX_RECIPIENTS = 1000
MAX_SIZE = 30 * 1000 * 1000
MAX_CATEGORIES = 10
MAX_CATEGORY_LENGTH = 255
SETTINGS = ("url", "api_key")
CREDENTIAL_SETTINGS = ("api_key",)
MAIL_SEND_SCOPE = "mail.send"
# Headers SendGrid refuses in ``headers`` (it sets them from other fields).
RESERVED_HEADERS = frozenset(
    {
        "x-sg-id",
        "x-sg-eid",
        "received",
        "dkim-signature",
        "content-type",
        "content-transfer-encoding",
        "to",
        "from",
        "subject",
        "reply-to",
        "cc",
        "bcc",
    }
)


def _address(address: EmailAddress) -> dict[str, str]:
    if address.name:
        return {"email": address.address, "name": address.name}
    return {"email": address.address}


def _smtpapi(email: OutboundEmail) -> dict[str, Any]:
    """The X-SMTPAPI object (controls.py kept only values that are JSON objects)."""
    if not email.controls.smtpapi:
        return {}
    value = json.loads(email.controls.smtpapi)
    return value if isinstance(value, dict) else {}


def _filter_enabled(smtpapi: Mapping[str, Any], name: str) -> bool | None:
    """``filters.<name>.settings.enable`` of X-SMTPAPI (0/1, or a boolean), or None."""
    filters = smtpapi.get("filters")
    entry = filters.get(name) if isinstance(filters, dict) else None
    settings = entry.get("settings") if isinstance(entry, dict) else None
    enable = settings.get("enable") if isinstance(settings, dict) else None
    if isinstance(enable, bool):
        return enable
    if enable in (0, 1, "0", "1"):
        return str(enable) == "1"
    return None


def _categories(email: OutboundEmail, smtpapi: Mapping[str, Any]) -> list[str]:
    categories = list(email.controls.tags)
    extra = smtpapi.get("category")
    if isinstance(extra, str):
        extra = [extra]
    if isinstance(extra, list):
        categories.extend(item for item in extra if isinstance(item, str))
    kept: list[str] = []
    for category in categories:
        if category and len(category) <= MAX_CATEGORY_LENGTH and category not in kept:
            kept.append(category)
    return kept[:MAX_CATEGORIES]


def _custom_args(email: OutboundEmail, smtpapi: Mapping[str, Any]) -> dict[str, str]:
    args = dict(email.controls.metadata)
    unique = smtpapi.get("unique_args")
    if isinstance(unique, dict):
        for key, value in unique.items():
            if key not in args:
                args[key] = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return args


def _tracking(email: OutboundEmail, smtpapi: Mapping[str, Any]) -> dict[str, Any]:
    controls = email.controls
    clicks = controls.track_clicks
    if clicks is None:
        clicks = _filter_enabled(smtpapi, "clicktrack")
    opens = controls.track_opens
    if opens is None:
        opens = _filter_enabled(smtpapi, "opentrack")
    tracking: dict[str, Any] = {}
    if clicks is not None:
        click: dict[str, Any] = {"enable": clicks}
        if clicks:
            click["enable_text"] = controls.track_links_mode != "HtmlOnly"
        tracking["click_tracking"] = click
    if opens is not None:
        tracking["open_tracking"] = {"enable": opens}
    return tracking


def _content(email: OutboundEmail) -> list[dict[str, str]]:
    """``text/plain`` first, then ``text/html``, as the API requires."""
    text, html = bodies(email)
    content = []
    if text is not None:
        content.append({"type": "text/plain", "value": text})
    if html is not None:
        content.append({"type": "text/html", "value": html})
    return content


def email_payload(email: OutboundEmail) -> dict[str, Any]:
    """The Mail Send JSON document for ``email``."""
    smtpapi = _smtpapi(email)
    personalizations = []
    for group in split_recipients(email):
        personalization: dict[str, Any] = {"to": [_address(a) for a in group.to]}
        if group.cc:
            personalization["cc"] = [_address(a) for a in group.cc]
        if group.bcc:
            personalization["bcc"] = [_address(a) for a in group.bcc]
        personalizations.append(personalization)
    sender = email.from_ or EmailAddress(email.envelope_sender)
    payload: dict[str, Any] = {
        "personalizations": personalizations,
        "from": _address(sender),
        "subject": email.subject,
    }
    if len(email.reply_to) == 1:
        payload["reply_to"] = _address(email.reply_to[0])
    elif email.reply_to:
        payload["reply_to_list"] = [_address(a) for a in email.reply_to]
    payload["content"] = _content(email)
    if email.attachments:
        attachments = []
        for index, part in enumerate(email.attachments):
            item = {
                "content": base64.b64encode(part.content).decode("ascii"),
                "type": part.content_type,
                "filename": attachment_name(part, index),
                "disposition": "inline" if part.inline else "attachment",
            }
            if part.inline and part.content_id:
                item["content_id"] = part.content_id
            attachments.append(item)
        payload["attachments"] = attachments
    headers: dict[str, str] = {}
    seen: set[str] = set()
    for name, value in forwarded_headers(email, RESERVED_HEADERS):
        # A JSON object holds one value per name: the first occurrence is kept.
        if name.lower() not in seen:
            seen.add(name.lower())
            headers[name] = value
    if headers:
        payload["headers"] = headers
    categories = _categories(email, smtpapi)
    if categories:
        payload["categories"] = categories
    custom_args = _custom_args(email, smtpapi)
    if custom_args:
        payload["custom_args"] = custom_args
    send_at = smtpapi.get("send_at")
    if isinstance(send_at, int) and not isinstance(send_at, bool):
        payload["send_at"] = send_at
    group_id = smtpapi.get("asm_group_id")
    if isinstance(group_id, int) and not isinstance(group_id, bool):
        payload["asm"] = {"group_id": group_id}
    ip_pool = smtpapi.get("ip_pool")
    if isinstance(ip_pool, str) and ip_pool:
        payload["ip_pool_name"] = ip_pool
    tracking = _tracking(email, smtpapi)
    if tracking:
        payload["tracking_settings"] = tracking
    return payload


@implementer(IProvider)
class SendGridProvider:
    """Adapter for SendGrid's v3 Mail Send API."""

    type = "sendgrid"
    # Also refused at RCPT beyond this (Dispatcher.recipient_limit), so the two never differ.
    max_recipients = MAX_RECIPIENTS

    def __init__(self, name: str, settings: Mapping[str, Any]):
        self.name = name
        self.settings = settings

    def check(self, email: OutboundEmail, account: Account) -> Failed | None:
        recipients = distinct_recipients(email)
        return check_limits(
            self.name, "SendGrid", recipients, encoded_size(email), self.max_recipients, MAX_SIZE
        )

    def build_requests(self, email: OutboundEmail, account: Account, message_id: str) -> list[HTTPRequest]:
        api_key = setting(self.name, self.settings, account, "api_key") or ""
        url = str(setting(self.name, self.settings, account, "url")).rstrip("/") + "/v3/mail/send"
        headers = [("User-Agent", USER_AGENT), ("Authorization", f"Bearer {api_key}")]
        return [json_request(self.name, "POST", url, email_payload(email), headers, message_id)]

    def classify(self, request: HTTPRequest, response: HTTPResponse) -> Outcome:
        if 200 <= response.status < 300:
            return Delivered(self.name, safe_message_id(response.header("X-Message-Id"), request.queue_id))
        if response.status in (401, 403):
            detail = error_text(response)
            lowered = detail.lower()
            if "sender identity" in lowered or "from address does not match" in lowered:
                reason = f"the From address is not a verified SendGrid sender: {detail}"
                return Failed(self.name, reason, 550, "5.7.1")
            if "maximum credits exceeded" in lowered:
                return Retry(self.name, f"SendGrid account cannot send now: {detail}", "4.7.0")
        return classify_http(self.name, response, request.queue_id)


def _validate(name: str, settings: dict[str, Any]) -> None:
    require_url(name, settings, API_URL)


def probe(name: str, settings: Mapping[str, Any]) -> Probe | None:
    """``GET {url}/v3/scopes``: the permissions of the key making the call, read
    only ("Retrieve a list of scopes for which this user has access",
    https://www.twilio.com/docs/sendgrid/api-reference/api-key-permissions/retrieve-a-list-of-scopes-for-which-this-user-has-access).
    Every key may call it, so it also shows whether the key may send at all."""
    if not has_settings(settings, "api_key"):
        return None
    url = str(settings["url"]).rstrip("/") + "/v3/scopes"
    headers = (("User-Agent", USER_AGENT), ("Authorization", f"Bearer {settings['api_key']}"))
    return Probe(probe_request(name, url, *headers), scopes_verdict)


def scopes_verdict(response: HTTPResponse) -> str | None:
    """Accepted keys must hold the ``mail.send`` scope (a key restricted to other
    parts of the API is valid and still cannot send a single message)."""
    problem = credentials_verdict(response)
    if problem is not None:
        return problem
    data = response.json()
    scopes = data.get("scopes") if isinstance(data, dict) else None
    if isinstance(scopes, list) and MAIL_SEND_SCOPE not in scopes:
        return f"the API key is valid but lacks the Mail Send permission ({MAIL_SEND_SCOPE}): it cannot send"
    return None


PROVIDER = ProviderType(
    name="sendgrid",
    adapter=SendGridProvider,
    settings=SETTINGS,
    credential_settings=CREDENTIAL_SETTINGS,
    account_settings=CREDENTIAL_SETTINGS,
    validate=_validate,
    probe=probe,
)

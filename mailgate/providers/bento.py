"""Bento: the Emails API, ``POST {url}/batch/emails?site_uuid=...``.

Request format: https://docs.bentonow.com/emails_api ("Create Emails") and
https://bentonow.com/docs/developer_guides/introduction (authentication):
HTTP Basic with the publishable key as user name and the secret key as
password, the site UUID as the ``site_uuid`` query parameter, a
``User-Agent`` (Bento's front end refuses requests without one), and a JSON
body ``{"emails": [...]}`` of 1 to 60 emails, each with ``to``, ``from`` (an
author of the Bento account), ``subject``, ``html_body`` and
``transactional`` (true sends even to unsubscribed people; Bento's default,
and mailgate's unless ``X-Bento-Transactional`` / ``X-Mailgate-Transactional``
or an account default says otherwise, is false).  The answer is
``{"results": <emails queued>}``, without message ids: mailgate's 250 reply
carries its own queue id.

Bento's own SMTP endpoint (https://bentonow.com/docs/smtp) shows the mapping
this adapter follows: every envelope recipient becomes one email (so Bcc
recipients stay private), ``Reply-To`` becomes ``reply_to`` and the layout of
``X-Bento-Layout-Id`` / ``X-Mailgate-Layout`` becomes ``layout_id``.  The
Emails API takes only an HTML body: a text-only message is sent as HTML made
from its text (:func:`mailgate.message.text_to_html`: escaped, line breaks
kept).

Bento cannot carry attachments, so a message with any (inline images
included) is refused at the end of DATA with ``554 5.6.0`` and a sentence
saying so, rather than delivered without them.  50 recipients and 10 MB are
checked before sending.  Tags, metadata, streams and tracking flags have no
Bento field and are not sent.

Errors: 401 for wrong keys; a sender that is not an author comes back as
HTTP 500 "Author not authorized to send on this account" (as Bento's Laravel
transport handles it), answered ``550 5.7.1``; 429 and other 5xx are
transient.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from zope.interface import implementer

from mailgate.accounts.account import Account
from mailgate.interfaces import IProvider
from mailgate.message import text_to_html
from mailgate.model import OutboundEmail
from mailgate.outcome import Delivered, Failed, Outcome
from mailgate.providers.base import (
    USER_AGENT,
    HTTPRequest,
    HTTPResponse,
    classify_http,
    json_request,
)
from mailgate.providers.mapping import (
    bodies,
    check_limits,
    distinct_recipients,
    encoded_size,
    setting,
)
from mailgate.providers.providertype import (
    Probe,
    ProviderType,
    has_settings,
    probe_request,
    require_url,
)

API_URL = "https://app.bentonow.com/api/v1"
MAX_RECIPIENTS = 50
MAX_SIZE = 10 * 1000 * 1000
SETTINGS = ("url", "site_uuid", "publishable_key", "secret_key")
CREDENTIAL_SETTINGS = ("site_uuid", "publishable_key", "secret_key")
NO_ATTACHMENTS = (
    "Bento cannot send attachments or inline images, and this message has {count}: "
    "send the files as links, or send this message through another provider"
)
_AUTHOR_REFUSED = "author not authorized"


def html_body(email: OutboundEmail) -> str:
    """The HTML Bento sends: the message's own, or its text shown as HTML."""
    text, html = bodies(email)
    if html is not None:
        return html
    return text_to_html(text or "")


def email_payload(email: OutboundEmail) -> dict[str, Any]:
    """The ``{"emails": [...]}`` document: one email per envelope recipient."""
    controls = email.controls
    common: dict[str, Any] = {
        "from": email.from_.address if email.from_ else email.envelope_sender,
        "subject": email.subject,
        "html_body": html_body(email),
        "transactional": bool(controls.transactional),
    }
    if email.reply_to:
        common["reply_to"] = email.reply_to[0].address
    if controls.layout:
        common["layout_id"] = controls.layout
    emails = []
    seen: set[str] = set()
    for recipient in email.envelope_recipients:
        if recipient.lower() not in seen:
            seen.add(recipient.lower())
            emails.append({"to": recipient, **common})
    return {"emails": emails}


@implementer(IProvider)
class BentoProvider:
    """Adapter for Bento's Emails API."""

    type = "bento"
    # Also refused at RCPT beyond this (Dispatcher.recipient_limit), so the two never differ.
    max_recipients = MAX_RECIPIENTS

    def __init__(self, name: str, settings: Mapping[str, Any]):
        self.name = name
        self.settings = settings

    def check(self, email: OutboundEmail, account: Account) -> Failed | None:
        if email.attachments:
            return Failed(self.name, NO_ATTACHMENTS.format(count=len(email.attachments)), 554, "5.6.0")
        recipients = distinct_recipients(email)
        return check_limits(
            self.name, "Bento", recipients, encoded_size(email), self.max_recipients, MAX_SIZE
        )

    def build_requests(self, email: OutboundEmail, account: Account, message_id: str) -> list[HTTPRequest]:
        def get(key: str) -> str:
            return str(setting(self.name, self.settings, account, key) or "")

        url = endpoint(get("url"), "/batch/emails", get("site_uuid"))
        headers = [("User-Agent", USER_AGENT), authorization(get("publishable_key"), get("secret_key"))]
        return [json_request(self.name, "POST", url, email_payload(email), headers, message_id)]

    def classify(self, request: HTTPRequest, response: HTTPResponse) -> Outcome:
        if 200 <= response.status < 300:
            data = response.json()
            queued = data.get("results") if isinstance(data, dict) else None
            if queued == 0:
                sent = len(json.loads(request.body)["emails"])
                return Failed(self.name, f"Bento queued none of the {sent} emails", 554, "5.0.0")
            return Delivered(self.name, request.queue_id)
        text = response.body[:2000].decode("utf-8", "replace").lower()
        if response.status >= 500 and _AUTHOR_REFUSED in text:
            return Failed(
                self.name,
                "the From address is not an author of this Bento account (Bento: "
                "Author not authorized to send on this account)",
                550,
                "5.7.1",
            )
        return classify_http(self.name, response, request.queue_id)


def _validate(name: str, settings: dict[str, Any]) -> None:
    require_url(name, settings, API_URL)


def endpoint(base: str, path: str, site_uuid: str) -> str:
    """``{base}{path}?site_uuid=...``: every Bento call names its site in the query."""
    return f"{base.rstrip('/')}{path}?site_uuid={quote(site_uuid, safe='')}"


def authorization(publishable_key: str, secret_key: str) -> tuple[str, str]:
    """HTTP Basic with the publishable key as user and the secret key as password."""
    basic = base64.b64encode(f"{publishable_key}:{secret_key}".encode()).decode("ascii")
    return ("Authorization", f"Basic {basic}")


def probe(name: str, settings: Mapping[str, Any]) -> Probe | None:
    """``GET {url}/fetch/tags?site_uuid=...``: lists the site's tags and changes
    nothing; it takes the same Basic credentials and site UUID as the Emails API
    (https://bentonow.com/docs/api/conventions, "Authentication", which uses
    this very call as its example)."""
    if not has_settings(settings, *CREDENTIAL_SETTINGS):
        return None
    url = endpoint(str(settings["url"]), "/fetch/tags", str(settings["site_uuid"]))
    headers = (("User-Agent", USER_AGENT), authorization(settings["publishable_key"], settings["secret_key"]))
    return Probe(probe_request(name, url, *headers))


PROVIDER = ProviderType(
    name="bento",
    adapter=BentoProvider,
    settings=SETTINGS,
    credential_settings=CREDENTIAL_SETTINGS,
    account_settings=CREDENTIAL_SETTINGS,
    validate=_validate,
    probe=probe,
)

"""Resend: the emails API, ``POST {url}/emails``.

Request format: https://resend.com/docs/api-reference/emails/send-email (JSON,
``Authorization: Bearer <api key>``, base URL ``https://api.resend.com``):
``from``, ``to`` (at most 50), ``cc``, ``bcc``, ``reply_to``, ``subject``,
``html``, ``text``, ``headers`` (an object), ``attachments`` (base64
``content``, ``filename``, ``content_type`` and, for an inline image
referenced as ``cid:``, ``content_id``:
https://resend.com/docs/dashboard/emails/embed-inline-images) and ``tags``
(name/value pairs: :mod:`mailgate.providers.tagpairs`).  The answer is
``{"id": ...}``, which mailgate's 250 reply carries.

* Recipients are the SMTP envelope's (:func:`~mailgate.providers.mapping.split_recipients`);
  Resend needs a ``to``, so a message whose recipients are all blind is sent
  as one copy per recipient, each addressed to that recipient alone (one
  request each: Resend's batch endpoint takes no attachments).
* ``Idempotency-Key`` is mailgate's queue id (``<id>-<n>`` for the n-th
  copy), so a retried request is not sent twice
  (https://resend.com/docs/dashboard/emails/idempotency-keys).
* Display names: Resend refuses a quoted display name, and an RFC 2047
  encoded word in ``from`` (anymail's Resend backend documents both), so a
  name that would need quoting is sent as an encoded word in ``to``, ``cc``
  and ``reply_to``, and unquoted, without RFC 5322 specials, in ``from``.
* ``headers`` is an object: of two headers with one name the first is sent.
* Resend has no per-message tracking, stream or layout switches: those
  controls have no effect here.

Errors (https://resend.com/docs/api-reference/errors): the body's ``name``
decides (:data:`ERRORS`); 429 (rate limit, daily quota) and 5xx are
transient, a wrong key is ``554 5.7.0``, an unverified domain or sender
``554 5.7.1``, a bad request ``554 5.6.0`` with Resend's message.  Limits
checked before sending: 50 ``to`` recipients, 40 MB with attachments encoded,
Content-IDs shorter than 128 characters.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from dataclasses import replace
from email.charset import QP, Charset
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
    parse_retry_after,
    safe_message_id,
)
from mailgate.providers.mapping import (
    Recipients,
    attachment_name,
    bodies,
    check_limits,
    encoded_size,
    envelope_share,
    forwarded_headers,
    setting,
    split_recipients,
)
from mailgate.providers.providertype import (
    Accepted,
    Probe,
    ProviderType,
    credentials_verdict,
    has_settings,
    probe_request,
    require_url,
)
from mailgate.providers.tagpairs import tag_pairs

API_URL = "https://api.resend.com"
MAX_TO = 50
MAX_SIZE = 40 * 1000 * 1000
MAX_CONTENT_ID = 128
SETTINGS = ("url", "api_key")
CREDENTIAL_SETTINGS = ("api_key",)

_RETRY, _FAIL = True, False
_CONTENT = (_FAIL, "5.6.0")
_CREDENTIALS = (_FAIL, "5.7.0")
_NOT_ALLOWED = (_FAIL, "5.7.1")
# Resend error name -> (transient, enhanced code); the SMTP code is 451 or 554.
ERRORS: dict[str, tuple[bool, str]] = {
    "validation_error": _CONTENT,  # 400; as a 403 it is an unverified domain (below)
    "invalid_idempotency_key": _CONTENT,
    "invalid_attachment": _CONTENT,
    "invalid_parameter": _CONTENT,
    "missing_required_field": _CONTENT,
    "invalid_idempotent_request": _CONTENT,  # the key was used for a different message
    "missing_api_key": _CREDENTIALS,
    "restricted_api_key": _CREDENTIALS,
    "invalid_api_key": _CREDENTIALS,
    "invalid_from_address": _NOT_ALLOWED,
    "invalid_to_address": _NOT_ALLOWED,
    "security_error": _NOT_ALLOWED,
    "not_found": (_RETRY, "4.3.5"),  # wrong url: the operator fixes it, nothing is lost
    "method_not_allowed": (_RETRY, "4.3.5"),
    "concurrent_idempotent_requests": (_RETRY, "4.3.0"),
    "rate_limit_exceeded": (_RETRY, "4.7.0"),
    "daily_quota_exceeded": (_RETRY, "4.7.0"),
    "application_error": (_RETRY, "4.3.0"),
    "internal_server_error": (_RETRY, "4.3.0"),
}

# A display name made of these needs no quoting (RFC 5322 §3.2.3 atext, space, dot).
_PLAIN_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~. ]+")
# RFC 5322 specials that end a display name, and the encoded-word opener.
_NAME_BREAKERS = re.compile(r'[()<>\[\]:;@\\,"]|=\?')
_UTF8_QP = Charset("utf-8")
_UTF8_QP.header_encoding = QP


def mailbox(address: EmailAddress) -> str:
    """``to``, ``cc``, ``reply_to`` form: ``Name <addr>``, quoting avoided with RFC 2047."""
    name = address.name.strip()
    if not name:
        return address.address
    if not _PLAIN_NAME.fullmatch(name) or "=?" in name:
        name = _UTF8_QP.header_encode(name)
    return f"{name} <{address.address}>"


def sender(address: EmailAddress) -> str:
    """``from`` form: ``Name <addr>`` with the name unquoted (Unicode kept, specials removed)."""
    name = " ".join(_NAME_BREAKERS.sub(" ", address.name).split())
    return f"{name} <{address.address}>" if name else address.address


def email_payload(email: OutboundEmail, recipients: Recipients) -> dict[str, Any]:
    """The ``/emails`` JSON document for one copy of ``email``."""
    payload: dict[str, Any] = {
        "from": sender(email.from_ or EmailAddress(email.envelope_sender)),
        "to": [mailbox(address) for address in recipients.to],
        "subject": email.subject,
    }
    if recipients.cc:
        payload["cc"] = [mailbox(address) for address in recipients.cc]
    if recipients.bcc:
        payload["bcc"] = [mailbox(address) for address in recipients.bcc]
    if email.reply_to:
        payload["reply_to"] = [mailbox(address) for address in email.reply_to]
    # Without a text body Resend derives one from the HTML.
    text, html = bodies(email)
    if html is not None:
        payload["html"] = html
    if text is not None:
        payload["text"] = text
    headers: dict[str, str] = {}
    for name, value in forwarded_headers(email):
        headers.setdefault(name, value)
    if headers:
        payload["headers"] = headers
    if email.attachments:
        attachments = []
        for index, part in enumerate(email.attachments):
            item = {
                "filename": attachment_name(part, index),
                "content": base64.b64encode(part.content).decode("ascii"),
                "content_type": part.content_type,
            }
            if part.inline and part.content_id:
                item["content_id"] = part.content_id
            attachments.append(item)
        payload["attachments"] = attachments
    tags = tag_pairs(email.controls)
    if tags:
        payload["tags"] = [{"name": name, "value": value} for name, value in tags]
    return payload


@implementer(IProvider)
class ResendProvider:
    """Adapter for Resend's emails API."""

    type = "resend"

    def __init__(self, name: str, settings: Mapping[str, Any]):
        self.name = name
        self.settings = settings

    def check(self, email: OutboundEmail, account: Account) -> Failed | None:
        if email.from_ is None and not email.envelope_sender:
            return Failed(
                self.name, "Resend needs a From header or an envelope sender", 554, "5.6.0"
            )
        for part in email.inline_parts:
            if part.content_id and len(part.content_id) >= MAX_CONTENT_ID:
                return Failed(
                    self.name,
                    f"Resend takes Content-IDs shorter than {MAX_CONTENT_ID} characters",
                    554,
                    "5.6.0",
                )
        most_to = max(len(copy.to) for copy in split_recipients(email))
        return check_limits(self.name, "Resend", most_to, encoded_size(email), MAX_TO, MAX_SIZE)

    def build_requests(
        self, email: OutboundEmail, account: Account, message_id: str
    ) -> list[HTTPRequest]:
        api_key = setting(self.name, self.settings, account, "api_key") or ""
        url = str(setting(self.name, self.settings, account, "url")).rstrip("/") + "/emails"
        copies = split_recipients(email)
        requests = []
        for index, recipients in enumerate(copies):
            key = message_id if len(copies) == 1 else f"{message_id}-{index + 1}"
            headers = [
                ("User-Agent", USER_AGENT),
                ("Authorization", f"Bearer {api_key}"),
                ("Idempotency-Key", key),
            ]
            request = json_request(
                self.name, "POST", url, email_payload(email, recipients), headers, message_id
            )
            requests.append(replace(request, recipients=envelope_share(email, recipients.addresses)))
        return requests

    def classify(self, request: HTTPRequest, response: HTTPResponse) -> Outcome:
        return classify_response(self.name, response, request.queue_id)


def classify_response(provider: str, response: HTTPResponse, queue_id: str) -> Outcome:
    """Resend's answer: its error ``name`` where the table has it, else the HTTP status."""
    data = response.json()
    if not isinstance(data, dict):
        data = {}
    if 200 <= response.status < 300:
        return Delivered(provider, safe_message_id(data.get("id"), queue_id))
    name = data.get("name")
    known = ERRORS.get(name) if isinstance(name, str) else None
    if known is None or response.status >= 500:
        return classify_http(provider, response, queue_id)
    transient, enhanced = known
    if name == "validation_error" and response.status == 403:
        enhanced = (
            "5.7.1"  # "domain is not verified", "only send testing emails to your own address"
        )
    detail = f"Resend {name} (HTTP {response.status}): {error_text(response)}"
    if transient:
        return Retry(provider, detail, enhanced, parse_retry_after(response.header("Retry-After")))
    return Failed(provider, detail, 554, enhanced)


def _validate(name: str, settings: dict[str, Any]) -> None:
    require_url(name, settings, API_URL)


def probe(name: str, settings: Mapping[str, Any]) -> Probe | None:
    """``GET {url}/domains``: lists the account's domains, changes nothing
    (https://resend.com/docs/api-reference/domains/list-domains).

    A key with "Sending access" only is refused there with 401
    ``restricted_api_key`` ("This API key is restricted to only send emails",
    https://resend.com/docs/api-reference/errors): Resend recognised the key,
    so the credentials are good, but what it may send is not probed."""
    if not has_settings(settings, "api_key"):
        return None
    url = str(settings["url"]).rstrip("/") + "/domains"
    headers = (("User-Agent", USER_AGENT), ("Authorization", f"Bearer {settings['api_key']}"))
    return Probe(probe_request(name, url, *headers), domains_verdict)


def domains_verdict(response: HTTPResponse) -> str | Accepted | None:
    data = response.json()
    if response.status == 401 and isinstance(data, dict) and data.get("name") == "restricted_api_key":
        return Accepted(
            "the API key is valid and restricted to sending (restricted_api_key); "
            "not probed further: Resend lets such a key call nothing but send"
        )
    return credentials_verdict(response)


PROVIDER = ProviderType(
    name="resend",
    adapter=ResendProvider,
    settings=SETTINGS,
    credential_settings=CREDENTIAL_SETTINGS,
    account_settings=CREDENTIAL_SETTINGS,
    validate=_validate,
    probe=probe,
)

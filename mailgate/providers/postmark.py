"""Postmark: the single-send Email API, ``POST {url}/email``.

Request format: https://postmarkapp.com/developer/api/email-api ("Send a
single email"): a JSON object with ``From``, ``To``, ``Cc``, ``Bcc`` (comma
separated, each with an optional display name), ``Subject``, ``HtmlBody`` /
``TextBody``, ``ReplyTo``, ``Tag``, ``Headers`` (``[{Name, Value}]``),
``TrackOpens``, ``TrackLinks`` (``None``, ``HtmlAndText``, ``HtmlOnly``,
``TextOnly``), ``Metadata``, ``Attachments`` (``Name``, ``Content`` in
base64, ``ContentType``, and ``ContentID`` as ``cid:<id>`` for an inline
image) and ``MessageStream``; authenticated by the ``X-Postmark-Server-Token``
header.  The answer is ``{"MessageID": ..., "ErrorCode": 0}``; mailgate's 250
reply carries that MessageID.

Errors: https://postmarkapp.com/developer/api/overview ("HTTP response codes"
and "API error codes"): 401 bad token, 413 request over 10 MB, 422 with an
``ErrorCode``, 429 rate limited, 500/503 Postmark's side.  The ``ErrorCode``
decides the reply (:data:`ERROR_CODES`): a sender without a confirmed Sender
Signature is ``550 5.7.1``, an inactive (suppressed) recipient ``550 5.7.1``,
a rate limit or an account that may not send right now ``451`` (the client,
or the next provider of the route, tries again), any other content error
``554 5.6.0`` with Postmark's own message.

Limits checked before sending (the same page): at most 50 recipients (To, Cc
and Bcc together), 10 MB in total with attachments.  Postmark needs a ``To``:
when every recipient is blind each gets a copy of their own
(:func:`mailgate.providers.mapping.split_recipients`), and the copies go in
one ``POST {url}/email/batch`` ("Send batch emails": up to 500 messages and
50 MB per call; more copies take more calls) rather than one request each:
one answer for the whole message, so a failure half-way cannot leave the
client retrying copies that were already sent.  The batch answer is a list
with one result per copy; recipients Postmark reports as inactive (406) are
skipped, as Postmark itself does for a multi-recipient message, and any
other failed copy decides the outcome.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import replace
from email.utils import getaddresses
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
    distinct_recipients,
    encoded_size,
    envelope_share,
    forwarded_headers,
    setting,
    share_of,
    split_recipients,
)
from mailgate.providers.providertype import (
    Probe,
    ProviderType,
    has_settings,
    probe_request,
    require_url,
)

API_URL = "https://api.postmarkapp.com"
MAX_RECIPIENTS = 50
MAX_SIZE = 10 * 1000 * 1000
BATCH_MAX_MESSAGES = 500
BATCH_MAX_SIZE = 50 * 1000 * 1000
INACTIVE_RECIPIENT = 406
SETTINGS = ("url", "token")
CREDENTIAL_SETTINGS = ("token",)

# Postmark ErrorCode -> outcome (code, enhanced code, transient).  The rest of
# the API's codes concern other endpoints (templates, servers, domains).
_SENDER = (550, "5.7.1", False)
_CONTENT = (554, "5.6.0", False)
_LATER = (451, "4.7.0", True)
ERROR_CODES: dict[int, tuple[int, str, bool]] = {
    10: (554, "5.7.0", False),  # Bad or missing API token
    100: (451, "4.3.0", True),  # Maintenance
    300: _CONTENT,  # Invalid email request
    400: _SENDER,  # Sender Signature not found
    401: _SENDER,  # Sender signature not confirmed
    402: _CONTENT,  # Invalid JSON
    403: _CONTENT,  # Incompatible JSON
    405: _LATER,  # Not allowed to send (out of credits: the account owner can fix it)
    406: (550, "5.7.1", False),  # Inactive recipient (suppressed after a bounce, complaint or unsubscribe)
    409: _CONTENT,  # JSON required
    411: _CONTENT,  # Forbidden attachment type
    412: (550, "5.7.1", False),  # Account is pending: only its own domain's recipients
    413: _LATER,  # Account may not send (suspended or locked until it is cleared)
    429: _LATER,  # Rate limit exceeded
}


def _addresses(addresses: tuple[EmailAddress, ...]) -> str:
    return ", ".join(address.formatted() for address in addresses)


def track_links(email: OutboundEmail) -> str | None:
    """Postmark's ``TrackLinks`` mode: the message's own X-PM-TrackLinks mode if on, else both bodies."""
    controls = email.controls
    if controls.track_clicks is None:
        return None
    if not controls.track_clicks:
        return "None"
    if controls.track_links_mode in ("HtmlAndText", "HtmlOnly", "TextOnly"):
        return controls.track_links_mode
    return "HtmlAndText"


def email_payload(email: OutboundEmail, recipients: Recipients) -> dict[str, Any]:
    """The ``/email`` JSON document for one copy of ``email``."""
    controls = email.controls
    sender = email.from_ or EmailAddress(email.envelope_sender)
    payload: dict[str, Any] = {"From": sender.formatted(), "To": _addresses(recipients.to)}
    if recipients.cc:
        payload["Cc"] = _addresses(recipients.cc)
    if recipients.bcc:
        payload["Bcc"] = _addresses(recipients.bcc)
    payload["Subject"] = email.subject
    if controls.tags:
        payload["Tag"] = controls.tags[0]  # Postmark has one tag per message.
    text, html = bodies(email)
    if html is not None:
        payload["HtmlBody"] = html
    if text is not None:
        payload["TextBody"] = text
    if email.reply_to:
        payload["ReplyTo"] = _addresses(email.reply_to)
    headers = forwarded_headers(email)
    if headers:
        payload["Headers"] = [{"Name": name, "Value": value} for name, value in headers]
    if controls.track_opens is not None:
        payload["TrackOpens"] = controls.track_opens
    links = track_links(email)
    if links is not None:
        payload["TrackLinks"] = links
    if controls.metadata:
        payload["Metadata"] = controls.metadata_dict
    if email.attachments:
        attachments = []
        for index, part in enumerate(email.attachments):
            item = {
                "Name": attachment_name(part, index),
                "Content": base64.b64encode(part.content).decode("ascii"),
                "ContentType": part.content_type,
            }
            if part.inline and part.content_id:
                item["ContentID"] = f"cid:{part.content_id}"
            attachments.append(item)
        payload["Attachments"] = attachments
    if controls.stream:
        payload["MessageStream"] = controls.stream
    return payload


@implementer(IProvider)
class PostmarkProvider:
    """Adapter for Postmark's Email API."""

    type = "postmark"
    # Also refused at RCPT beyond this (Dispatcher.recipient_limit), so the two never differ.
    max_recipients = MAX_RECIPIENTS

    def __init__(self, name: str, settings: Mapping[str, Any]):
        self.name = name
        self.settings = settings

    def check(self, email: OutboundEmail, account: Account) -> Failed | None:
        recipients = distinct_recipients(email)
        return check_limits(
            self.name, "Postmark", recipients, encoded_size(email), self.max_recipients, MAX_SIZE
        )

    def build_requests(self, email: OutboundEmail, account: Account, message_id: str) -> list[HTTPRequest]:
        token = setting(self.name, self.settings, account, "token") or ""
        url = str(setting(self.name, self.settings, account, "url")).rstrip("/") + "/email"
        headers = [("User-Agent", USER_AGENT), ("X-Postmark-Server-Token", token)]
        groups = split_recipients(email)
        if len(groups) == 1:
            request = json_request(self.name, "POST", url, email_payload(email, groups[0]), headers, message_id)
            return [replace(request, recipients=envelope_share(email, groups[0].addresses))]
        # Copies per call: 500 at most, and no more than fit in 50 MB.
        per_call = max(1, min(BATCH_MAX_MESSAGES, BATCH_MAX_SIZE // max(1, encoded_size(email) + 4096)))
        requests = []
        for start in range(0, len(groups), per_call):
            batch = groups[start : start + per_call]
            request = json_request(
                self.name,
                "POST",
                url + "/batch",
                [email_payload(email, recipients) for recipients in batch],
                headers,
                message_id,
            )
            share = envelope_share(email, (address for recipients in batch for address in recipients.addresses))
            requests.append(replace(request, recipients=share))
        return requests

    def classify(self, request: HTTPRequest, response: HTTPResponse) -> Outcome:
        if request.url.endswith("/email/batch"):
            outcome = classify_batch(self.name, response, request.queue_id)
            if isinstance(outcome, Failed):
                reached = accepted_recipients(request, response)
                if reached:
                    outcome = replace(outcome, reached=reached)
            return outcome
        return classify_response(self.name, response, request.queue_id)


def classify_response(provider: str, response: HTTPResponse, queue_id: str) -> Outcome:
    """Postmark's answer: its ``ErrorCode`` where it gave one, else the HTTP status."""
    data = response.json()
    if not isinstance(data, dict):
        data = {}
    code = data.get("ErrorCode")
    if not isinstance(code, int) or isinstance(code, bool):
        code = None
    status = response.status
    if 200 <= status < 300 and not code:
        return Delivered(provider, safe_message_id(data.get("MessageID"), queue_id))
    if code and (200 <= status < 300 or (400 <= status < 500 and status not in (401, 413))):
        smtp_code, enhanced, transient = ERROR_CODES.get(code, _CONTENT)
        detail = f"Postmark error {code}: {error_text(response)}"
        if transient:
            return Retry(provider, detail, enhanced, parse_retry_after(response.header("Retry-After")))
        return Failed(provider, detail, smtp_code, enhanced)
    return classify_http(provider, response, queue_id)


def classify_batch(provider: str, response: HTTPResponse, queue_id: str) -> Outcome:
    """A ``/email/batch`` answer: one result per copy, or an error for the whole call.

    Delivered when every copy was accepted, or when the only refusals are
    inactive recipients (406: Postmark skips those in a multi-recipient
    message too).  Otherwise the first other refusal decides, as a single
    send's answer would; a transient one is ambiguous once some copy was
    accepted (the client's retry may repeat those copies).
    """
    results = response.json()
    if not (200 <= response.status < 300 and isinstance(results, list) and results):
        return classify_response(provider, response, queue_id)
    accepted: list[str] = []
    refused: list[tuple[int, dict[str, Any]]] = []
    for result in results:
        result = result if isinstance(result, dict) else {}
        code = result.get("ErrorCode")
        if code == 0 or code is None:
            accepted.append(safe_message_id(result.get("MessageID"), queue_id))
        elif isinstance(code, int) and not isinstance(code, bool):
            refused.append((code, result))
        else:
            refused.append((-1, result))
    decisive = [(code, result) for code, result in refused if code != INACTIVE_RECIPIENT]
    if accepted and not decisive:
        more = f" and {len(accepted) - 1} more" if len(accepted) > 1 else ""
        return Delivered(provider, f"{accepted[0]}{more}")
    code, result = (decisive or refused)[0]
    single = HTTPResponse(422, response.headers, json.dumps(result).encode("utf-8"))
    outcome = classify_response(provider, single, queue_id)
    if accepted and isinstance(outcome, Retry):
        outcome = replace(outcome, ambiguous=True)
    return outcome


def accepted_recipients(request: HTTPRequest, response: HTTPResponse) -> tuple[str, ...]:
    """The envelope recipients (``request.recipients``) of the batch copies
    Postmark accepted: results come in the order of the copies sent."""
    try:
        copies = json.loads(request.body)
        results = response.json()
    except ValueError:
        return ()
    if not (isinstance(copies, list) and isinstance(results, list)):
        return ()
    addresses = []
    for copy, result in zip(copies, results, strict=False):
        if isinstance(result, dict) and result.get("ErrorCode") in (0, None) and isinstance(copy, dict):
            fields = [str(copy.get(name) or "") for name in ("To", "Cc", "Bcc")]
            addresses += [address for _, address in getaddresses(fields) if address]
    return share_of(request.recipients, addresses)


def _validate(name: str, settings: dict[str, Any]) -> None:
    require_url(name, settings, API_URL)


def probe(name: str, settings: Mapping[str, Any]) -> Probe | None:
    """``GET {url}/server`` with the server token: reads the server the token
    belongs to and changes nothing ("Get the server",
    https://postmarkapp.com/developer/api/server-api).  A bad token is 401 with
    ``ErrorCode`` 10."""
    if not has_settings(settings, "token"):
        return None
    url = str(settings["url"]).rstrip("/") + "/server"
    return Probe(
        probe_request(name, url, ("User-Agent", USER_AGENT), ("X-Postmark-Server-Token", settings["token"]))
    )


PROVIDER = ProviderType(
    name="postmark",
    adapter=PostmarkProvider,
    settings=SETTINGS,
    credential_settings=CREDENTIAL_SETTINGS,
    account_settings=CREDENTIAL_SETTINGS,
    validate=_validate,
    probe=probe,
)

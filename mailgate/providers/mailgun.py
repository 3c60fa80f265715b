"""Mailgun: the messages API, ``POST {url}/v3/{domain}/messages``.

Request format: https://documentation.mailgun.com/docs/mailgun/api-reference/openapi-final/tag/Messages/
(``multipart/form-data``: :mod:`mailgate.providers.multipart`), authenticated
with HTTP Basic ``api:<api key>``; base URL ``https://api.mailgun.net``, or
``https://api.eu.mailgun.net`` for a domain in the EU region
(https://documentation.mailgun.com/docs/mailgun/user-manual/sending-messages/send-http).

* ``from``, ``to``, ``cc``, ``bcc`` (one field per address), ``subject``,
  ``text``, ``html``; ``h:Reply-To`` and ``h:<name>`` for the message's other
  headers (:func:`~mailgate.providers.mapping.forwarded_headers`).
* Files: ``attachment`` for attachments and ``inline`` for images referenced
  as ``cid:``; Mailgun uses an inline file's name as its Content-ID, so the
  part's Content-ID is sent as its file name
  (https://documentation.mailgun.com/docs/mailgun/user-manual/sending-messages/send-attachments).
* Controls (https://documentation.mailgun.com/docs/mailgun/user-manual/sending-messages/pass-sending-options):
  tags become ``o:tag`` (Mailgun keeps "up to 3 tags", ASCII, at most 128
  characters: https://documentation.mailgun.com/docs/mailgun/user-manual/tracking-messages/track-tagging;
  later or unfit ones are left out), metadata (including ``X-Mailgun-Variables``)
  becomes ``v:<key>`` variables, which Mailgun also writes into the
  delivered message as ``X-Mailgun-Variables``, and the tracking controls
  become ``o:tracking-opens`` / ``o:tracking-clicks`` (``yes``/``no``), with
  ``o:tracking=no`` when both are off.
* Recipients are the SMTP envelope's (:func:`~mailgate.providers.mapping.split_recipients`).
  Mailgun requires a ``to``, so a message whose recipients are all blind is
  sent by batch sending: every recipient in ``to`` and ``recipient-variables``
  set, which makes Mailgun send "an individual [copy] to each recipient in
  the to field" (https://documentation.mailgun.com/docs/mailgun/user-manual/sending-messages/batch-sending),
  so no blind recipient sees another, in one request that succeeds or fails
  as a whole.

The answer is ``{"id": "<...>", "message": "Queued. Thank you."}``; the 250
reply carries the id without its angle brackets.  Errors
(https://documentation.mailgun.com/docs/mailgun/quickstart-guide/responses):
400 with a ``message`` is a content rejection (``554 5.6.0``), 401 a wrong
key (``554 5.7.0``), 403 a domain that may not send to this recipient, such
as a sandbox domain (``554 5.7.1``), 404 an unknown domain, which Mailgun
says "can be temporal" and is most often a domain in the other region
(``451 4.3.5``), 413 too large, 429 and 5xx transient.  Limits checked
before sending: 1000 recipients, 25 MB.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import quote

from zope.interface import implementer

from mailgate.accounts.account import Account
from mailgate.configvalues import ConfigError
from mailgate.interfaces import IProvider
from mailgate.model import EmailAddress, OutboundEmail
from mailgate.outcome import Delivered, Failed, Outcome, Retry
from mailgate.providers.base import (
    USER_AGENT,
    HTTPRequest,
    HTTPResponse,
    classify_http,
    error_text,
    safe_message_id,
)
from mailgate.providers.mapping import (
    Recipients,
    attachment_name,
    bodies,
    check_limits,
    distinct_recipients,
    encoded_size,
    forwarded_headers,
    setting,
    split_recipients,
)
from mailgate.providers.multipart import FormFile, encode_form, random_boundary
from mailgate.providers.providertype import (
    Accepted,
    Probe,
    ProviderType,
    credentials_verdict,
    has_settings,
    probe_request,
    require_url,
)

REGION_URLS = {"us": "https://api.mailgun.net", "eu": "https://api.eu.mailgun.net"}
MAX_RECIPIENTS = 1000
MAX_SIZE = 25 * 1000 * 1000
MAX_TAGS = 3
MAX_TAG_LENGTH = 128
SETTINGS = ("url", "api_key", "domain", "region")
CREDENTIAL_SETTINGS = ("api_key",)
ACCOUNT_SETTINGS = ("api_key", "domain")
_DOMAIN = re.compile(
    r"(?=.{1,253}\Z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+"
)

Field = tuple[str, str | FormFile]


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def tags(email: OutboundEmail) -> list[str]:
    """The tags Mailgun keeps: the first three that are ASCII and at most 128 characters."""
    fit = [tag for tag in email.controls.tags if tag.isascii() and len(tag) <= MAX_TAG_LENGTH]
    return fit[:MAX_TAGS]


def _addresses(field: str, addresses: Sequence[EmailAddress]) -> list[Field]:
    return [(field, address.formatted()) for address in addresses]


def form_fields(email: OutboundEmail, recipients: Recipients, batch: bool = False) -> list[Field]:
    """The form fields of ``email`` for ``recipients``, in a stable order.

    With ``batch``, each ``to`` recipient gets a copy of their own.
    """
    controls = email.controls
    fields: list[Field] = [
        ("from", (email.from_ or EmailAddress(email.envelope_sender)).formatted())
    ]
    fields += _addresses("to", recipients.to)
    fields += _addresses("cc", recipients.cc)
    fields += _addresses("bcc", recipients.bcc)
    if batch:
        variables = {address.address: {} for address in recipients.to}
        fields.append(("recipient-variables", json.dumps(variables, separators=(",", ":"))))
    fields.append(("subject", email.subject))
    text, html = bodies(email)
    if text is not None:
        fields.append(("text", text))
    if html is not None:
        fields.append(("html", html))
    if email.reply_to:
        fields.append(("h:Reply-To", ", ".join(address.formatted() for address in email.reply_to)))
    fields += [(f"h:{name}", value) for name, value in forwarded_headers(email)]
    fields += [("o:tag", tag) for tag in tags(email)]
    if controls.track_opens is False and controls.track_clicks is False:
        fields.append(("o:tracking", "no"))
    if controls.track_opens is not None:
        fields.append(("o:tracking-opens", _yes_no(controls.track_opens)))
    if controls.track_clicks is not None:
        fields.append(("o:tracking-clicks", _yes_no(controls.track_clicks)))
    fields += [(f"v:{key}", value) for key, value in controls.metadata]
    for index, part in enumerate(email.attachments):
        if part.inline and part.content_id:
            field, filename = "inline", part.content_id
        else:
            field, filename = "attachment", attachment_name(part, index)
        fields.append((field, FormFile(filename, part.content_type, part.content)))
    return fields


@implementer(IProvider)
class MailgunProvider:
    """Adapter for Mailgun's messages API."""

    type = "mailgun"
    # Also refused at RCPT beyond this (Dispatcher.recipient_limit), so the two never differ.
    max_recipients = MAX_RECIPIENTS

    def __init__(
        self, name: str, settings: Mapping[str, Any], boundary: Callable[[], str] = random_boundary
    ):
        self.name = name
        self.settings = settings
        self.boundary = boundary

    def check(self, email: OutboundEmail, account: Account) -> Failed | None:
        if email.from_ is None and not email.envelope_sender:
            return Failed(
                self.name, "Mailgun needs a From header or an envelope sender", 554, "5.6.0"
            )
        recipients = distinct_recipients(email)
        return check_limits(
            self.name, "Mailgun", recipients, encoded_size(email), self.max_recipients, MAX_SIZE
        )

    def build_requests(
        self, email: OutboundEmail, account: Account, message_id: str
    ) -> list[HTTPRequest]:
        api_key = setting(self.name, self.settings, account, "api_key") or ""
        domain = setting(self.name, self.settings, account, "domain")
        base = str(setting(self.name, self.settings, account, "url")).rstrip("/")
        url = f"{base}/v3/{quote(domain, safe='')}/messages"
        copies = split_recipients(email)
        if len(copies) == 1:
            fields = form_fields(email, copies[0])
        else:  # all blind: one copy each, by batch sending
            everyone = Recipients(tuple(copy.to[0] for copy in copies))
            fields = form_fields(email, everyone, batch=True)
        body, content_type = encode_form(fields, self.boundary)
        headers = (
            ("Content-Type", content_type),
            ("Accept", "application/json"),
            ("User-Agent", USER_AGENT),
            authorization(api_key),
        )
        return [HTTPRequest("POST", url, headers, body, self.name, message_id)]

    def classify(self, request: HTTPRequest, response: HTTPResponse) -> Outcome:
        return classify_response(self.name, response, request.queue_id)


def classify_response(provider: str, response: HTTPResponse, queue_id: str) -> Outcome:
    """Mailgun's answer by HTTP status; its ``message`` is the reason."""
    status = response.status
    if 200 <= status < 300:
        data = response.json()
        message_id = data.get("id") if isinstance(data, dict) else None
        if isinstance(message_id, str):
            message_id = message_id.strip().removeprefix("<").removesuffix(">")
        return Delivered(provider, safe_message_id(message_id, queue_id))
    if status == 403:
        return Failed(
            provider, f"Mailgun refused to send (HTTP 403): {error_text(response)}", 554, "5.7.1"
        )
    if status == 404:
        return Retry(
            provider,
            f"Mailgun does not know the domain (HTTP 404): {error_text(response)}; "
            "check its domain and region",
            "4.3.5",
        )
    return classify_http(provider, response, queue_id)


def authorization(api_key: str) -> tuple[str, str]:
    """HTTP Basic with the user ``api`` and the API key as password."""
    basic = base64.b64encode(f"api:{api_key}".encode()).decode("ascii")
    return ("Authorization", f"Basic {basic}")


def probe(name: str, settings: Mapping[str, Any]) -> Probe | None:
    """``GET {url}/v4/domains/{domain}``: reads the sending domain, changes nothing
    ("Get domain details",
    https://documentation.mailgun.com/docs/mailgun/api-reference/send/mailgun/domains/get-v4-domains--name-).
    It shows at once that the key works, that the domain exists in the
    configured region and whether Mailgun lets it send.  A domain sending key
    may only send, so it is refused here (401) even though sending works."""
    if not has_settings(settings, "api_key"):
        return None
    domain, region = str(settings["domain"]), str(settings.get("region", "us"))
    url = f"{str(settings['url']).rstrip('/')}/v4/domains/{quote(domain, safe='')}"
    request = probe_request(name, url, ("User-Agent", USER_AGENT), authorization(settings["api_key"]))

    def verdict(response: HTTPResponse) -> str | Accepted | None:
        if response.status == 404:
            return f"Mailgun has no domain {domain} in the {region} region (HTTP 404): check domain and region"
        problem = credentials_verdict(response)
        if problem is not None:
            if response.status == 401:
                problem += " (a domain sending key only sends: probe with an account API key)"
            return problem
        data = response.json()
        details = data.get("domain") if isinstance(data, dict) else None
        state = details.get("state") if isinstance(details, dict) else None
        if state == "disabled":
            return f"the API key works, but Mailgun has disabled the domain {domain}"
        if isinstance(state, str) and state != "active":
            return Accepted(f"the API key works, but the domain {domain} is {state}: verify its DNS records", True)
        return None

    return Probe(request, verdict)


def _validate(name: str, settings: dict[str, Any]) -> None:
    domain = settings.get("domain")
    if not isinstance(domain, str) or not _DOMAIN.fullmatch(domain):
        raise ConfigError(
            f"providers.{name}.domain",
            "required: the Mailgun sending domain, such as mg.example.com",
        )
    region = settings.setdefault("region", "us")
    if not isinstance(region, str) or region.lower() not in REGION_URLS:
        raise ConfigError(f"providers.{name}.region", f"must be one of {', '.join(REGION_URLS)}")
    settings["region"] = region.lower()
    require_url(name, settings, REGION_URLS[settings["region"]])


PROVIDER = ProviderType(
    name="mailgun",
    adapter=MailgunProvider,
    settings=SETTINGS,
    credential_settings=CREDENTIAL_SETTINGS,
    account_settings=ACCOUNT_SETTINGS,
    validate=_validate,
    probe=probe,
)

"""Amazon SES: the v2 SendEmail API with raw MIME, signed with AWS Signature Version 4.

Request format: https://docs.aws.amazon.com/ses/latest/APIReference-V2/API_SendEmail.html
(``POST {url}/v2/email/outbound-emails``, JSON, base URL
``https://email.{region}.amazonaws.com``).  mailgate sends ``Content.Raw``: the
message as the client wrote it, so every header, body and attachment
survives, minus what mailgate never forwards (the ``Bcc`` header and control
headers, already gone from :attr:`OutboundEmail.raw`) and encoded to 7-bit
where the client used 8-bit (:mod:`mailgate.sevenbit`; SES asks for it, see
https://docs.aws.amazon.com/ses/latest/APIReference-V2/API_RawMessage.html).

* ``Destination``: exactly the SMTP envelope recipients (ARCHITECTURE.md §1),
  as ``ToAddresses`` / ``CcAddresses`` when the To / Cc header names them and
  ``BccAddresses`` otherwise.  SES takes "no more than 50 recipients" per
  message, so more are sent as several requests with the same raw message.
* ``FromEmailAddress``: only for a message without a ``From`` header (the
  envelope sender, which SES then writes as From).  Set for a message that has
  one, SES would replace the header and drop its display name
  (https://github.com/laravel/framework/pull/37881).
* ``FeedbackForwardingEmailAddress``: the envelope sender when it differs from
  the From address, so bounces reach it as an MTA would send them; like the
  From address it must be a verified identity.
* ``ConfigurationSetName``: the ``configuration_set`` setting.
* ``EmailTags``: tags and metadata (:mod:`mailgate.providers.tagpairs`).

Signing: SigV4 by botocore's own signer (``botocore.auth.SigV4Auth``, service
``ses``), never hand-written crypto; botocore is the optional extra
``mailgate[ses]``, imported when an ``ses`` provider is configured.  The
signature uses the adapter's clock, so tests pin it.

Errors: the operation's documented exceptions (same page, "Errors") and the
common ones (https://docs.aws.amazon.com/ses/latest/APIReference-V2/CommonErrors.html),
named by the ``x-amzn-ErrorType`` header or the body's ``__type`` / ``code``
(:data:`ERRORS`).  Limits (https://docs.aws.amazon.com/ses/latest/dg/quotas.html):
40 MB per message as sent, 50 recipients per request.
"""

from __future__ import annotations

import base64
import functools
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from zope.interface import implementer

from mailgate.accounts.account import Account
from mailgate.configvalues import ConfigError
from mailgate.interfaces import IProvider
from mailgate.model import OutboundEmail
from mailgate.outcome import Delivered, Failed, Outcome, Retry
from mailgate.providers.base import (
    USER_AGENT,
    HTTPRequest,
    HTTPResponse,
    classify_http,
    json_request,
    parse_retry_after,
    safe_message_id,
)
from mailgate.providers.mapping import check_limits, envelope_share, setting, split_recipients
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
from mailgate.sevenbit import to_seven_bit

PATH = "/v2/email/outbound-emails"
ACCOUNT_PATH = "/v2/email/account"
SIGNING_SERVICE = "ses"
MAX_RECIPIENTS = 50
MAX_SIZE = 40 * 1000 * 1000
SETTINGS = (
    "url",
    "region",
    "access_key_id",
    "secret_access_key",
    "session_token",
    "configuration_set",
)
CREDENTIAL_SETTINGS = ("access_key_id", "secret_access_key", "session_token")
ACCOUNT_SETTINGS = (*CREDENTIAL_SETTINGS, "configuration_set")
# us-east-1, eu-central-1, us-gov-west-1, ap-southeast-4, cn-north-1 ...
_REGION = re.compile(r"[a-z]{2}(-[a-z]+)+-\d{1,2}")

_RETRY, _FAIL = True, False
_THROTTLED = (_RETRY, "4.7.0", "rate limited by Amazon SES")
_PAUSED = (_RETRY, "4.3.0", "sending is paused for this Amazon SES account")
_REFUSED = (_FAIL, "5.6.0", "Amazon SES refused the request")
_CREDENTIALS = (_FAIL, "5.7.0", "Amazon SES refused the credentials")
# SES error code -> (transient, enhanced code, what it means); the SMTP code is
# 451 when transient, else 554.
ERRORS: dict[str, tuple[bool, str, str]] = {
    "TooManyRequestsException": _THROTTLED,
    "ThrottlingException": _THROTTLED,
    "Throttling": _THROTTLED,
    "LimitExceededException": (_RETRY, "4.7.0", "Amazon SES sending quota reached"),
    "SendingPausedException": _PAUSED,
    "AccountSendingPausedException": _PAUSED,
    "AccountSuspendedException": (_RETRY, "4.3.0", "this Amazon SES account may not send"),
    "NotFoundException": (_RETRY, "4.3.5", "Amazon SES does not know a resource the request names"),
    "RequestExpired": (_RETRY, "4.3.0", "request time refused by Amazon SES; check the host clock"),
    "MessageRejected": (_FAIL, "5.6.0", "Amazon SES rejected the message"),
    "MailFromDomainNotVerifiedException": (_FAIL, "5.7.1", "MAIL FROM domain not verified in SES"),
    "BadRequestException": _REFUSED,
    "ValidationError": _REFUSED,
    "SerializationException": _REFUSED,
    **dict.fromkeys(
        (
            "AccessDeniedException",
            "UnrecognizedClientException",
            "InvalidClientTokenId",
            "InvalidSignatureException",
            "SignatureDoesNotMatch",
            "IncompleteSignature",
            "MissingAuthenticationToken",
            "MissingAuthenticationTokenException",
            "ExpiredToken",
            "ExpiredTokenException",
            "NotAuthorized",
            "OptInRequired",
        ),
        _CREDENTIALS,
    ),
}


def aws_error(response: HTTPResponse) -> tuple[str, str]:
    """The error code and message of an AWS rest-json error answer ("" when absent).

    The code is in the ``x-amzn-ErrorType`` header (``Code:namespace``) or in
    the body's ``__type`` (``namespace#Code``) or ``code``.
    """
    data = response.json()
    if not isinstance(data, dict):
        data = {}
    code = response.header("x-amzn-ErrorType") or data.get("__type") or data.get("code") or ""
    if not isinstance(code, str):
        code = ""
    code = code.split(":", 1)[0].rsplit("#", 1)[-1].strip()
    message = data.get("message") or data.get("Message") or ""
    if not isinstance(message, str):
        message = ""
    if code == "InvalidSignatureException" and message.startswith("Signature expired"):
        code = "RequestExpired"  # clock skew, not bad credentials
    return code, message


def classify_response(provider: str, response: HTTPResponse, queue_id: str) -> Outcome:
    """SES's answer: its error code where the table has it, else the HTTP status."""
    if 200 <= response.status < 300:
        data = response.json()
        message_id = data.get("MessageId") if isinstance(data, dict) else None
        return Delivered(provider, safe_message_id(message_id, queue_id))
    code, message = aws_error(response)
    known = ERRORS.get(code)
    if known is None or response.status >= 500:
        return classify_http(provider, response, queue_id)
    transient, enhanced, meaning = known
    detail = f"{meaning} ({code}): {message}" if message else f"{meaning} ({code})"
    if transient:
        return Retry(provider, detail, enhanced, parse_retry_after(response.header("Retry-After")))
    return Failed(provider, detail, 554, enhanced)


def destinations(email: OutboundEmail) -> list[dict[str, list[str]]]:
    """``Destination`` objects holding every envelope recipient once, at most 50 each."""
    [recipients] = split_recipients(email, require_to=False)
    labelled = [
        (field, address.address)
        for field, addresses in (
            ("ToAddresses", recipients.to),
            ("CcAddresses", recipients.cc),
            ("BccAddresses", recipients.bcc),
        )
        for address in addresses
    ]
    result: list[dict[str, list[str]]] = []
    for start in range(0, len(labelled), MAX_RECIPIENTS):
        destination: dict[str, list[str]] = {}
        for field, address in labelled[start : start + MAX_RECIPIENTS]:
            destination.setdefault(field, []).append(address)
        result.append(destination)
    return result


def _timestamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y%m%dT%H%M%SZ")


@implementer(IProvider)
class SESProvider:
    """Adapter for Amazon SES v2 SendEmail with raw MIME."""

    type = "ses"

    def __init__(
        self, name: str, settings: Mapping[str, Any], clock: Callable[[], float] = time.time
    ):
        self.name = name
        self.settings = settings
        self.clock = clock
        # check() and build_requests() see the same email: convert it once.
        self._converted: tuple[bytes, bytes] | None = None

    def raw_message(self, email: OutboundEmail) -> bytes:
        """The MIME message SES receives: ``email.raw`` in 7-bit form."""
        if self._converted is None or self._converted[0] is not email.raw:
            self._converted = (email.raw, to_seven_bit(email.raw))
        return self._converted[1]

    def check(self, email: OutboundEmail, account: Account) -> Failed | None:
        if email.from_ is None and not email.envelope_sender:
            return Failed(
                self.name, "Amazon SES needs a From header or an envelope sender", 554, "5.6.0"
            )
        return check_limits(
            self.name, "Amazon SES", 0, len(self.raw_message(email)), None, MAX_SIZE
        )

    def payload(
        self, email: OutboundEmail, account: Account, destination: dict[str, list[str]]
    ) -> dict[str, Any]:
        raw = base64.b64encode(self.raw_message(email)).decode("ascii")
        document: dict[str, Any] = {"Content": {"Raw": {"Data": raw}}, "Destination": destination}
        if email.from_ is None:
            document["FromEmailAddress"] = email.envelope_sender
        elif email.envelope_sender and email.envelope_sender.lower() != email.from_.address.lower():
            document["FeedbackForwardingEmailAddress"] = email.envelope_sender
        configuration_set = setting(self.name, self.settings, account, "configuration_set")
        if configuration_set:
            document["ConfigurationSetName"] = configuration_set
        tags = tag_pairs(email.controls)
        if tags:
            document["EmailTags"] = [{"Name": name, "Value": value} for name, value in tags]
        return document

    def build_requests(
        self, email: OutboundEmail, account: Account, message_id: str
    ) -> list[HTTPRequest]:
        url = str(setting(self.name, self.settings, account, "url")).rstrip("/") + PATH
        requests = []
        for destination in destinations(email):
            document = self.payload(email, account, destination)
            request = json_request(self.name, "POST", url, document, [], message_id)
            share = envelope_share(email, (address for addresses in destination.values() for address in addresses))
            requests.append(self.sign(replace(request, recipients=share), account))
        return requests

    def sign(self, request: HTTPRequest, account: Account) -> HTTPRequest:
        """``request`` with the SigV4 ``Authorization``, ``X-Amz-Date`` (and token) headers.

        ``Host`` is set explicitly, so the host that was signed is the host sent.
        """
        from botocore.awsrequest import AWSRequest
        from botocore.credentials import Credentials

        def value(key: str) -> str:
            return str(setting(self.name, self.settings, account, key) or "")

        credentials = Credentials(
            value("access_key_id"), value("secret_access_key"), value("session_token") or None
        )
        headers = {**dict(request.headers), "Host": _host(request.url)}
        aws_request = AWSRequest(
            method=request.method, url=request.url, data=request.body, headers=headers
        )
        signer = _signer_class()(
            credentials, SIGNING_SERVICE, value("region"), _timestamp(self.clock())
        )
        signer.add_auth(aws_request)
        signed = tuple(aws_request.headers.items())
        return replace(request, headers=(*signed, ("User-Agent", USER_AGENT)))

    def classify(self, request: HTTPRequest, response: HTTPResponse) -> Outcome:
        return classify_response(self.name, response, request.queue_id)


def _host(url: str) -> str:
    """The ``Host`` header for ``url`` (RFC 9110 §7.2): no port when it is the scheme's default."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    default = {"https": 443, "http": 80}.get(parts.scheme)
    return host if parts.port in (None, default) else f"{host}:{parts.port}"


@functools.cache
def _signer_class() -> type:
    from botocore.auth import SigV4Auth

    class ClockedSigV4Auth(SigV4Auth):  # type: ignore[misc]
        """botocore's SigV4 signer, signing at a given time instead of "now"."""

        def __init__(self, credentials: Any, service: str, region: str, timestamp: str):
            super().__init__(credentials, service, region)
            self._timestamp = timestamp

        def _modify_request_before_signing(self, request: Any) -> None:
            # add_auth stamps the wall-clock time first and reads it back from the
            # context for every later step; replace it before any of them.
            request.context["timestamp"] = self._timestamp
            super()._modify_request_before_signing(request)

    return ClockedSigV4Auth


def probe(name: str, settings: Mapping[str, Any], clock: Callable[[], float] = time.time) -> Probe | None:
    """``GET {url}/v2/email/account``, signed like a send: reads the account's
    sending status in the region, changes nothing
    (https://docs.aws.amazon.com/ses/latest/APIReference-V2/API_GetAccount.html).

    Paused sending fails the check; an account still in the sandbox (it may
    send only to verified addresses) is a warning.  ``AccessDeniedException``
    means AWS accepted the signature but the IAM policy does not grant
    ``ses:GetAccount``, as a send-only policy does not: the credentials work,
    what they may send is not probed."""
    if not has_settings(settings, "access_key_id", "secret_access_key"):
        return None
    url = str(settings["url"]).rstrip("/") + ACCOUNT_PATH
    unsigned = probe_request(name, url)
    request = SESProvider(name, settings, clock).sign(unsigned, Account(name=""))
    region = settings["region"]

    def verdict(response: HTTPResponse) -> str | Accepted | None:
        if not 200 <= response.status < 300:
            code, message = aws_error(response)
            if code == "AccessDeniedException":
                return Accepted(
                    "AWS accepted the credentials; their IAM policy does not allow "
                    "ses:GetAccount, so the account's sending status is not probed"
                )
            if code == "RequestExpired":
                return f"Amazon SES refused the request time ({code}): check this host's clock"
            return credentials_verdict(response, ": ".join(part for part in (code, message) if part))
        data = response.json()
        if not isinstance(data, dict):
            data = {}
        if data.get("SendingEnabled") is False:
            return f"the credentials work, but sending is paused for this Amazon SES account in {region}"
        if data.get("ProductionAccessEnabled") is False:
            return Accepted(
                f"the credentials work; the account is in the SES sandbox in {region}: "
                "it sends only to verified addresses",
                warning=True,
            )
        return None

    return Probe(request, verdict)


def _validate(name: str, settings: dict[str, Any]) -> None:
    try:
        _signer_class()
    except ImportError:
        raise ConfigError(
            f"providers.{name}.type",
            "the ses provider signs requests with botocore: "
            "install it with pip install 'mailgate[ses]'",
        ) from None
    region = settings.get("region")
    if not isinstance(region, str) or not _REGION.fullmatch(region):
        raise ConfigError(f"providers.{name}.region", "required: an AWS region such as eu-west-1")
    suffix = ".amazonaws.com.cn" if region.startswith("cn-") else ".amazonaws.com"
    require_url(name, settings, f"https://email.{region}{suffix}")


PROVIDER = ProviderType(
    name="ses",
    adapter=SESProvider,
    settings=SETTINGS,
    credential_settings=CREDENTIAL_SETTINGS,
    account_settings=ACCOUNT_SETTINGS,
    validate=_validate,
    probe=probe,
)

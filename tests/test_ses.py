"""The Amazon SES adapter: golden signed requests, the raw MIME it forwards, limits and error classification."""

from __future__ import annotations

import base64
import dataclasses
import json
from email import policy
from email.parser import BytesParser
from typing import Any

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from zope.interface.verify import verifyObject

from mailgate.accounts.account import Account
from mailgate.configvalues import ConfigError
from mailgate.interfaces import IProvider
from mailgate.message import parse_message
from mailgate.outcome import Delivered, Failed, Retry
from mailgate.providers import registry, ses
from mailgate.providers.base import HTTPRequest, HTTPResponse
from mailgate.providers.ses import SESProvider

from .provider_messages import MINIMAL, RECIPIENTS, SENDER, rich_message
from .sigv4_check import expected_signature, parse_authorization

ACCOUNT = Account(name="alice")
# AWS's documented example credentials: fixtures, not secrets.
ACCESS_KEY = "AKIDEXAMPLE"
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
NOW = 1_800_000_000  # 2027-01-15 08:00:00 UTC
STAMP = "20270115T080000Z"


def provider(**settings: Any) -> SESProvider:
    values = {"region": "eu-west-1", "access_key_id": ACCESS_KEY, "secret_access_key": SECRET_KEY, **settings}
    registry.lookup("ses", "ses").validate("ses", values)
    return SESProvider("ses", values, clock=lambda: NOW)


def build(message: bytes, recipients: tuple[str, ...] = RECIPIENTS, sender: str = SENDER, **settings: Any) -> list[HTTPRequest]:
    return provider(**settings).build_requests(parse_message(message, sender, recipients), ACCOUNT, "QID1")


def lower_headers(request: HTTPRequest) -> dict[str, str]:
    return {name.lower(): value for name, value in request.headers}


def raw_sent(request: HTTPRequest) -> bytes:
    return base64.b64decode(json.loads(request.body)["Content"]["Raw"]["Data"])


def botocore_signature(request: HTTPRequest, secret: str = SECRET_KEY, token: str | None = None) -> str:
    """What botocore's signer computes for the request as sent, at its X-Amz-Date."""
    headers = {name: value for name, value in request.headers if name not in ("Authorization", "User-Agent")}
    aws = AWSRequest(method=request.method, url=request.url, data=request.body, headers=headers)
    aws.context["timestamp"] = headers["X-Amz-Date"]
    signer = SigV4Auth(Credentials(ACCESS_KEY, secret, token), "ses", "eu-west-1")
    return signer.signature(signer.string_to_sign(aws, signer.canonical_request(aws)), aws)


def test_provides_interface() -> None:
    """The adapter implements IProvider completely."""
    assert verifyObject(IProvider, provider())


def test_minimal_message_golden_request() -> None:
    """A minimal message: URL, method, headers, body, and a signature made at the injected time."""
    [request] = build(MINIMAL, ("bob@example.org",))
    assert (request.method, request.url) == ("POST", "https://email.eu-west-1.amazonaws.com/v2/email/outbound-emails")
    headers = lower_headers(request)
    assert [name for name, _ in request.headers] == ["Content-Type", "Accept", "Host", "X-Amz-Date", "Authorization", "User-Agent"]
    assert (headers["content-type"], headers["host"], headers["x-amz-date"]) == ("application/json", "email.eu-west-1.amazonaws.com", STAMP)
    authorization = parse_authorization(headers["authorization"])
    assert (authorization["key"], authorization["date"], authorization["region"], authorization["service"]) == (
        ACCESS_KEY, "20270115", "eu-west-1", "ses",
    )  # fmt: skip
    assert authorization["signed"] == "accept;content-type;host;x-amz-date"
    assert authorization["signature"] == expected_signature("POST", "/v2/email/outbound-emails", headers, request.body, SECRET_KEY)
    assert authorization["signature"] == botocore_signature(request)
    assert json.loads(request.body) == {
        "Content": {"Raw": {"Data": base64.b64encode(MINIMAL).decode()}},
        "Destination": {"ToAddresses": ["bob@example.org"]},
    }


def test_signature_covers_the_body() -> None:
    """A changed body no longer matches the signature."""
    [request] = build(MINIMAL, ("bob@example.org",))
    headers = lower_headers(request)
    assert parse_authorization(headers["authorization"])["signature"] != expected_signature(
        "POST", "/v2/email/outbound-emails", headers, request.body + b" ", SECRET_KEY
    )


def test_rich_message_golden_body_and_raw_mime() -> None:
    """Destination is the envelope; the raw MIME is the client's, without Bcc and control headers."""
    message = rich_message()
    [request] = build(message, sender="bounces@example.com", configuration_set="transactional")
    body = json.loads(request.body)
    raw = raw_sent(request)
    del body["Content"]
    assert body == {
        "Destination": {
            "ToAddresses": ["bob@example.org"],
            "CcAddresses": ["carol@example.net"],
            "BccAddresses": ["dave.hidden@example.com"],
        },
        "FeedbackForwardingEmailAddress": "bounces@example.com",
        "ConfigurationSetName": "transactional",
        "EmailTags": [{"Name": "tag", "Value": "reports"}, {"Name": "Customer", "Value": "42"}],
    }
    assert b"\nBcc:" not in raw and b"dave.hidden" not in raw
    assert b"X-Mailgate-" not in raw
    # Nothing else changed: every other line is the client's, byte for byte.
    kept = [line for line in message.split(b"\r\n") if not line.startswith((b"Bcc:", b"X-Mailgate-"))]
    assert raw == b"\r\n".join(kept)
    parsed = BytesParser(policy=policy.default).parsebytes(raw)
    assert parsed["Subject"] == "Grüße ✓ Quarterly report"
    assert [part.get_filename() for part in parsed.iter_attachments()] == ["report.pdf"]
    assert botocore_signature(request) == parse_authorization(lower_headers(request)["authorization"])["signature"]


def test_eight_bit_message_is_sent_as_seven_bit() -> None:
    """SES gets 7-bit MIME even when the client used 8BITMIME and raw UTF-8 headers."""
    message = "From: Jörg <j@example.com>\r\nTo: bob@example.org\r\nSubject: Grüße\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\nÄpfel\r\n"
    [request] = build(message.encode(), ("bob@example.org",))
    raw = raw_sent(request)
    assert raw.isascii()
    parsed = BytesParser(policy=policy.default).parsebytes(raw)
    assert (str(parsed["From"]), str(parsed["Subject"]), parsed.get_content().strip()) == ("Jörg <j@example.com>", "Grüße", "Äpfel")


def test_session_token_is_sent_and_signed() -> None:
    """Temporary credentials: X-Amz-Security-Token is sent and covered by the signature."""
    [request] = build(MINIMAL, ("bob@example.org",), session_token="test-session-token")
    headers = lower_headers(request)
    assert headers["x-amz-security-token"] == "test-session-token"
    assert "x-amz-security-token" in parse_authorization(headers["authorization"])["signed"].split(";")
    assert parse_authorization(headers["authorization"])["signature"] == expected_signature(
        "POST", "/v2/email/outbound-emails", headers, request.body, SECRET_KEY
    )


def test_more_than_fifty_recipients_are_split() -> None:
    """SES takes 50 recipients per message: 120 go as 50 + 50 + 20 with the same raw message."""
    recipients = tuple(f"r{i}@example.org" for i in range(120))
    requests = build(b"From: a@example.com\r\nTo: r0@example.org\r\nSubject: s\r\n\r\nx\r\n", recipients)
    destinations = [json.loads(r.body)["Destination"] for r in requests]
    assert [sum(len(v) for v in d.values()) for d in destinations] == [50, 50, 20]
    assert destinations[0]["ToAddresses"] == ["r0@example.org"] and "ToAddresses" not in destinations[1]
    assert sorted(a for d in destinations for v in d.values() for a in v) == sorted(recipients)
    assert len({raw_sent(r) for r in requests}) == 1
    # Each signed request names its own 50: a DSN after a partial delivery names only the rest.
    assert [r.recipients for r in requests] == [recipients[:50], recipients[50:100], recipients[100:]]


def test_request_recipients_are_the_envelope_spelling() -> None:
    """A To header in another case still maps its request to the envelope recipient."""
    [request] = build(b"From: a@example.com\r\nTo: Bob@Example.ORG\r\nSubject: s\r\n\r\nx\r\n", ("bob@example.org", "c@example.org"))
    assert json.loads(request.body)["Destination"]["ToAddresses"] == ["Bob@Example.ORG"]
    assert request.recipients == ("bob@example.org", "c@example.org")


def test_sender_fields() -> None:
    """Without a From header the envelope sender is FromEmailAddress; with one SES keeps the header."""
    [no_from] = build(b"To: bob@example.org\r\nSubject: s\r\n\r\nx\r\n", ("bob@example.org",))
    assert json.loads(no_from.body)["FromEmailAddress"] == SENDER
    [same] = build(MINIMAL, ("bob@example.org",), sender="Alice@Example.com")
    assert "FromEmailAddress" not in json.loads(same.body) and "FeedbackForwardingEmailAddress" not in json.loads(same.body)


def test_account_credentials_and_configuration_set() -> None:
    """An account signs with its own keys and may name its own configuration set."""
    email = parse_message(MINIMAL, SENDER, ("bob@example.org",))
    own = {"access_key_id": "AKIDOWN", "secret_access_key": "own-secret", "configuration_set": "cs-b"}
    [request] = provider(configuration_set="cs-a").build_requests(email, Account("b", provider_settings={"ses": own}), "Q")
    headers = lower_headers(request)
    assert parse_authorization(headers["authorization"])["key"] == "AKIDOWN"
    assert parse_authorization(headers["authorization"])["signature"] == expected_signature(
        "POST", "/v2/email/outbound-emails", headers, request.body, "own-secret"
    )
    assert json.loads(request.body)["ConfigurationSetName"] == "cs-b"
    assert "own-secret" not in repr(request)


def test_url_override_signs_the_host_that_is_sent() -> None:
    """With a test double's URL, Host carries its port and is what was signed."""
    [request] = build(MINIMAL, ("bob@example.org",), url="http://127.0.0.1:8443")
    assert request.url == "http://127.0.0.1:8443/v2/email/outbound-emails"
    assert lower_headers(request)["host"] == "127.0.0.1:8443"
    assert botocore_signature(request) == parse_authorization(lower_headers(request)["authorization"])["signature"]


def test_limits_checked_before_sending() -> None:
    """Over 40 MB as sent is 552 5.3.4; no From header and a null sender is 554 5.6.0."""
    email = parse_message(MINIMAL, SENDER, ("bob@example.org",))
    assert provider().check(email, ACCOUNT) is None
    big = dataclasses.replace(email, raw=email.raw + b"x" * 40_000_000)
    refusal = provider().check(big, ACCOUNT)
    assert refusal is not None and (refusal.code, refusal.enhanced) == (552, "5.3.4")
    anonymous = parse_message(b"To: bob@example.org\r\n\r\nx\r\n", "", ("bob@example.org",))
    refusal = provider().check(anonymous, ACCOUNT)
    assert refusal is not None and (refusal.code, refusal.enhanced) == (554, "5.6.0")


@pytest.mark.parametrize(
    ("settings", "key", "message"),
    [
        ({}, "providers.ses.region", "required"),
        ({"region": "Frankfurt"}, "providers.ses.region", "required"),
        ({"region": "eu-central-1", "url": "email.eu-central-1.amazonaws.com"}, "providers.ses.url", "required"),
    ],
)
def test_settings_are_validated(settings: dict[str, Any], key: str, message: str) -> None:
    """A wrong setting stops start-up with an error naming it."""
    with pytest.raises(ConfigError) as error:
        registry.lookup("ses", "ses").validate("ses", dict(settings))
    assert error.value.key == key and message in error.value.message


@pytest.mark.parametrize(
    ("region", "url"),
    [("us-east-1", "https://email.us-east-1.amazonaws.com"), ("cn-northwest-1", "https://email.cn-northwest-1.amazonaws.com.cn")],
)
def test_default_url_follows_the_region(region: str, url: str) -> None:
    """The endpoint is the region's SES endpoint unless ``url`` says otherwise."""
    settings: dict[str, Any] = {"region": region}
    registry.lookup("ses", "ses").validate("ses", settings)
    assert settings["url"] == url


def test_missing_botocore_is_a_clear_start_up_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the ``ses`` extra, configuring an ses provider fails at start-up, naming the fix."""
    monkeypatch.setitem(__import__("sys").modules, "botocore", None)
    monkeypatch.setitem(__import__("sys").modules, "botocore.auth", None)
    ses._signer_class.cache_clear()
    try:
        with pytest.raises(ConfigError) as error:
            registry.lookup("ses", "ses").validate("ses", {"region": "eu-west-1"})
    finally:
        ses._signer_class.cache_clear()
    assert error.value.key == "providers.ses.type"
    assert "pip install 'mailgate[ses]'" in error.value.message


def response(status: int, body: object = b"", headers: tuple[tuple[str, str], ...] = ()) -> HTTPResponse:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return HTTPResponse(status, headers, raw)


def aws(status: int, code: str, message: str) -> HTTPResponse:
    return response(status, {"message": message}, (("x-amzn-ErrorType", f"{code}:http://internal.amazon.com/coral/com.amazonaws.sesv2/"),))


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (response(200, {"MessageId": "010001-abc-000000"}), Delivered("ses", "010001-abc-000000")),
        (response(200, {}), Delivered("ses", "QID1")),
        (aws(429, "TooManyRequestsException", "Maximum sending rate exceeded."),
         Retry("ses", "rate limited by Amazon SES (TooManyRequestsException): Maximum sending rate exceeded.", "4.7.0")),
        (response(400, {"__type": "com.amazon.coral.availability#ThrottlingException", "message": "Rate exceeded"}),
         Retry("ses", "rate limited by Amazon SES (ThrottlingException): Rate exceeded", "4.7.0")),
        (aws(400, "LimitExceededException", "Daily message quota exceeded."),
         Retry("ses", "Amazon SES sending quota reached (LimitExceededException): Daily message quota exceeded.", "4.7.0")),
        (aws(400, "SendingPausedException", "Sending is paused for this account."),
         Retry("ses", "sending is paused for this Amazon SES account (SendingPausedException): Sending is paused for this account.", "4.3.0")),
        (aws(400, "AccountSuspendedException", "Account is suspended."),
         Retry("ses", "this Amazon SES account may not send (AccountSuspendedException): Account is suspended.", "4.3.0")),
        (aws(404, "NotFoundException", "Configuration set <cs> does not exist."),
         Retry("ses", "Amazon SES does not know a resource the request names (NotFoundException): Configuration set <cs> does not exist.", "4.3.5")),
        (aws(400, "MessageRejected", "Email address is not verified. The following identities failed the check in region EU-WEST-1: a@example.com"),
         Failed("ses", "Amazon SES rejected the message (MessageRejected): Email address is not verified. The following identities failed the check in region EU-WEST-1: a@example.com", 554, "5.6.0")),
        (aws(400, "MailFromDomainNotVerifiedException", "MAIL FROM domain not verified."),
         Failed("ses", "MAIL FROM domain not verified in SES (MailFromDomainNotVerifiedException): MAIL FROM domain not verified.", 554, "5.7.1")),
        (aws(400, "BadRequestException", "Missing required header 'From'."),
         Failed("ses", "Amazon SES refused the request (BadRequestException): Missing required header 'From'.", 554, "5.6.0")),
        (aws(403, "UnrecognizedClientException", "The security token included in the request is invalid."),
         Failed("ses", "Amazon SES refused the credentials (UnrecognizedClientException): The security token included in the request is invalid.", 554, "5.7.0")),
        (aws(403, "InvalidSignatureException", "Signature expired: 20270115T080000Z is now earlier than 20270115T081000Z."),
         Retry("ses", "request time refused by Amazon SES; check the host clock (RequestExpired): Signature expired: 20270115T080000Z is now earlier than 20270115T081000Z.", "4.3.0")),
        (aws(500, "InternalFailure", "Internal failure."), Retry("ses", "API unavailable (HTTP 500)", "4.3.0")),
        (response(503, b""), Retry("ses", "API unavailable (HTTP 503)", "4.3.0")),
        (response(400, b"not json"), Failed("ses", "HTTP 400: not json", 554, "5.6.0")),
    ],
)
def test_classification_table(answer: HTTPResponse, expected: object) -> None:
    """SES's documented error codes map to the error table of ARCHITECTURE.md."""
    [request] = build(MINIMAL, ("bob@example.org",))
    assert provider().classify(request, answer) == expected

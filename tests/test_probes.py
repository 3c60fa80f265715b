"""The credential probes of ``mailgate check``: the read-only request each provider type
sends (URL, method, authentication, no body) and how each reads the API's answer."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from mailgate.providers import registry
from mailgate.providers.base import HTTPResponse
from mailgate.providers.providertype import Accepted, Probe

from .sigv4_check import expected_signature, parse_authorization

# Fixtures, not secrets (the SES pair is AWS's documented example).
SETTINGS: dict[str, dict[str, str]] = {
    "postmark": {"token": "test-postmark-token"},
    "bento": {"site_uuid": "test-site/uuid", "publishable_key": "test-pub", "secret_key": "test-secret"},
    "sendgrid": {"api_key": "test-sendgrid-key"},
    "mailgun": {"api_key": "test-mailgun-key", "domain": "mg.example.com"},
    "resend": {"api_key": "test-resend-key"},
    "ses": {"region": "eu-west-1", "access_key_id": "AKIDEXAMPLE", "secret_access_key": "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"},
}  # fmt: skip
REQUESTS = {
    "postmark": "https://api.postmarkapp.com/server",
    "bento": "https://app.bentonow.com/api/v1/fetch/tags?site_uuid=test-site%2Fuuid",
    "sendgrid": "https://api.sendgrid.com/v3/scopes",
    "mailgun": "https://api.mailgun.net/v4/domains/mg.example.com",
    "resend": "https://api.resend.com/domains",
    "ses": "https://email.eu-west-1.amazonaws.com/v2/email/account",
}
NOW = 1_800_000_000  # 2027-01-15 08:00:00 UTC


def make_probe(kind: str, **overrides: str) -> Probe:
    settings: dict[str, Any] = {**SETTINGS[kind], **overrides}
    provider_type = registry.lookup(kind, kind)
    provider_type.validate(kind, settings)
    if kind == "ses":
        from mailgate.providers import ses

        probe = ses.probe(kind, settings, clock=lambda: NOW)
    else:
        probe = provider_type.probe(kind, settings)
    assert probe is not None
    return probe


def headers(probe: Probe) -> dict[str, str]:
    return {name.lower(): value for name, value in probe.request.headers}


def answer(status: int, body: Any = None, *extra: tuple[str, str]) -> HTTPResponse:
    data = body if isinstance(body, bytes) else json.dumps(body if body is not None else {}).encode()
    return HTTPResponse(status, (("Content-Type", "application/json"), *extra), data)


def basic(value: str) -> str:
    scheme, _, encoded = value.partition(" ")
    assert scheme == "Basic"
    return base64.b64decode(encoded).decode()


@pytest.mark.parametrize("kind", sorted(REQUESTS))
def test_probe_is_a_bodiless_get_to_a_read_only_endpoint(kind: str) -> None:
    """Each probe is a GET with no body (it cannot send mail), to the documented
    read-only endpoint, wanting JSON, and never shows its credentials in its repr."""
    probe = make_probe(kind)
    assert (probe.request.method, probe.request.url, probe.request.body) == ("GET", REQUESTS[kind], b"")
    assert headers(probe)["accept"] == "application/json"
    assert headers(probe)["user-agent"] == "mailgate/0.1"
    for secret in SETTINGS[kind].values():
        if "key" in secret or "token" in secret or "secret" in secret or "EXAMPLE" in secret:
            assert secret not in repr(probe)


def test_authentication_headers() -> None:
    """Each probe authenticates exactly as that provider's send request does."""
    assert headers(make_probe("postmark"))["x-postmark-server-token"] == "test-postmark-token"
    assert basic(headers(make_probe("bento"))["authorization"]) == "test-pub:test-secret"
    assert headers(make_probe("sendgrid"))["authorization"] == "Bearer test-sendgrid-key"
    assert basic(headers(make_probe("mailgun"))["authorization"]) == "api:test-mailgun-key"
    assert headers(make_probe("resend"))["authorization"] == "Bearer test-resend-key"


def test_ses_probe_is_signed_with_sigv4() -> None:
    """The SES probe carries a SigV4 signature over GET /v2/email/account that an
    independent implementation of the algorithm agrees with; a session token is sent."""
    probe = make_probe("ses", session_token="test-session-token")
    sent = headers(probe)
    authorization = parse_authorization(sent["authorization"])
    assert (authorization["key"], authorization["date"], authorization["region"], authorization["service"]) == (
        "AKIDEXAMPLE", "20270115", "eu-west-1", "ses",
    )  # fmt: skip
    assert sent["x-amz-date"] == "20270115T080000Z"
    assert sent["x-amz-security-token"] == "test-session-token"
    assert sent["host"] == "email.eu-west-1.amazonaws.com"
    secret = SETTINGS["ses"]["secret_access_key"]
    assert authorization["signature"] == expected_signature("GET", "/v2/email/account", sent, b"", secret)


def test_url_setting_is_where_the_probe_goes() -> None:
    """An overridden base URL (regional endpoint, test double) is probed, not the default;
    a Mailgun EU domain is probed in the EU region."""
    assert make_probe("postmark", url="http://127.0.0.1:8025/").request.url == "http://127.0.0.1:8025/server"
    assert make_probe("mailgun", region="eu").request.url == "https://api.eu.mailgun.net/v4/domains/mg.example.com"
    ses = make_probe("ses", url="http://127.0.0.1:8025")
    assert (ses.request.url, headers(ses)["host"]) == ("http://127.0.0.1:8025/v2/email/account", "127.0.0.1:8025")


@pytest.mark.parametrize("kind", sorted(REQUESTS))
def test_without_server_credentials_there_is_nothing_to_probe(kind: str) -> None:
    """When the accounts carry the credentials, the server's settings have none to probe with."""
    settings: dict[str, Any] = dict(SETTINGS[kind])
    for key in registry.lookup(kind, kind).credential_settings:
        settings.pop(key, None)
    registry.lookup(kind, kind).validate(kind, settings)
    assert registry.lookup(kind, kind).probe(kind, settings) is None


GENERIC_ANSWERS = [
    (401, "the API refused the credentials (HTTP 401): "),
    (403, "the API refused the credentials (HTTP 403): "),
    (404, "the API has no such endpoint (HTTP 404): check the provider's url: "),
    (429, "the API is unavailable right now (HTTP 429), try again: "),
    (500, "the API is unavailable right now (HTTP 500), try again: "),
    (503, "the API is unavailable right now (HTTP 503), try again: "),
]


@pytest.mark.parametrize("kind", sorted(REQUESTS))
def test_ok_answer_means_the_credentials_work(kind: str) -> None:
    """A 2xx answer with nothing alarming in it is OK."""
    body = {
        "sendgrid": {"scopes": ["mail.send", "user.profile.read"]},
        "mailgun": {"domain": {"name": "mg.example.com", "state": "active"}},
        "ses": {"SendingEnabled": True, "ProductionAccessEnabled": True},
    }.get(kind, {})
    assert make_probe(kind).verdict(answer(200, body)) is None


@pytest.mark.parametrize(("status", "expected"), GENERIC_ANSWERS)
@pytest.mark.parametrize("kind", ["postmark", "bento", "sendgrid", "resend"])
def test_error_answers(kind: str, status: int, expected: str) -> None:
    """Refusals, unknown endpoints and outages are failures with the API's own words."""
    verdict = make_probe(kind).verdict(answer(status, {"message": "the API's explanation"}))
    assert verdict == expected + "the API's explanation"


def test_postmark_bad_token() -> None:
    """Postmark's documented answer to a bad token (401, ErrorCode 10) is a refusal."""
    body = {"ErrorCode": 10, "Message": "Request does not contain a valid Server token."}
    assert make_probe("postmark").verdict(answer(401, body)) == (
        "the API refused the credentials (HTTP 401): Request does not contain a valid Server token."
    )


def test_sendgrid_key_without_mail_send_permission_fails() -> None:
    """A SendGrid key that works but lacks mail.send cannot deliver anything: a failure."""
    verdict = make_probe("sendgrid").verdict(answer(200, {"scopes": ["user.profile.read", "stats.read"]}))
    assert verdict == "the API key is valid but lacks the Mail Send permission (mail.send): it cannot send"


def test_mailgun_answers() -> None:
    """404 names the domain and region; 401 hints at domain sending keys; a disabled
    domain fails; an unverified one is a warning."""
    probe = make_probe("mailgun", region="eu")
    assert probe.verdict(answer(404, {"message": "Domain not found"})) == (
        "Mailgun has no domain mg.example.com in the eu region (HTTP 404): check domain and region"
    )
    assert probe.verdict(answer(401, b"Forbidden")) == (
        "the API refused the credentials (HTTP 401): Forbidden "
        "(a domain sending key only sends: probe with an account API key)"
    )
    assert probe.verdict(answer(403, {"message": "Forbidden"})) == "the API refused the credentials (HTTP 403): Forbidden"
    assert probe.verdict(answer(503, b"")).startswith("the API is unavailable right now (HTTP 503)")
    assert probe.verdict(answer(200, {"domain": {"state": "disabled"}})) == (
        "the API key works, but Mailgun has disabled the domain mg.example.com"
    )
    assert probe.verdict(answer(200, {"domain": {"state": "unverified"}})) == Accepted(
        "the API key works, but the domain mg.example.com is unverified: verify its DNS records", warning=True
    )


def test_resend_sending_only_key_is_accepted_and_says_it_was_not_probed() -> None:
    """Resend refuses a sending-only key on /domains with 401 restricted_api_key: the key
    is known to Resend, so that is OK, saying so; an invalid key is a refusal."""
    probe = make_probe("resend")
    restricted = {"statusCode": 401, "name": "restricted_api_key", "message": "This API key is restricted to only send emails"}
    assert probe.verdict(answer(401, restricted)) == Accepted(
        "the API key is valid and restricted to sending (restricted_api_key); "
        "not probed further: Resend lets such a key call nothing but send"
    )
    invalid = {"statusCode": 403, "name": "invalid_api_key", "message": "API key is invalid"}
    assert probe.verdict(answer(403, invalid)) == "the API refused the credentials (HTTP 403): API key is invalid"
    missing = {"statusCode": 401, "name": "missing_api_key", "message": "Missing API key in the authorization header"}
    assert probe.verdict(answer(401, missing)) == (
        "the API refused the credentials (HTTP 401): Missing API key in the authorization header"
    )


def aws_error(status: int, code: str, message: str) -> HTTPResponse:
    return answer(status, {"message": message}, ("x-amzn-ErrorType", f"{code}:http://internal.amazon.com/"))


def test_ses_answers() -> None:
    """Paused sending fails; the sandbox is a warning; a send-only IAM policy is OK, saying
    what was not probed; bad keys and signatures fail with AWS's code; clock skew says so."""
    probe = make_probe("ses")
    assert probe.verdict(answer(200, {"SendingEnabled": False, "ProductionAccessEnabled": True})) == (
        "the credentials work, but sending is paused for this Amazon SES account in eu-west-1"
    )
    assert probe.verdict(answer(200, {"SendingEnabled": True, "ProductionAccessEnabled": False})) == Accepted(
        "the credentials work; the account is in the SES sandbox in eu-west-1: it sends only to verified addresses",
        warning=True,
    )
    denied = aws_error(403, "AccessDeniedException", "User: arn:aws:iam::123:user/x is not authorized to perform: ses:GetAccount")
    verdict = probe.verdict(denied)
    assert isinstance(verdict, Accepted) and not verdict.warning
    assert "ses:GetAccount" in verdict.detail
    assert probe.verdict(aws_error(403, "UnrecognizedClientException", "The security token included in the request is invalid.")) == (
        "the API refused the credentials (HTTP 403): UnrecognizedClientException: "
        "The security token included in the request is invalid."
    )
    assert probe.verdict(aws_error(403, "SignatureDoesNotMatch", "The request signature we calculated does not match")) == (
        "the API refused the credentials (HTTP 403): SignatureDoesNotMatch: "
        "The request signature we calculated does not match"
    )
    expired = aws_error(403, "InvalidSignatureException", "Signature expired: 20270115T070000Z is now earlier than ...")
    assert probe.verdict(expired) == "Amazon SES refused the request time (RequestExpired): check this host's clock"
    assert probe.verdict(aws_error(429, "TooManyRequestsException", "Too many requests")) == (
        "the API is unavailable right now (HTTP 429), try again: TooManyRequestsException: Too many requests"
    )
    assert probe.verdict(answer(503, b"")) == "the API is unavailable right now (HTTP 503), try again: HTTP 503"

"""Passthrough accounts end to end: the SMTP login becomes the API credential.

This is how Bento's and Postmark's SMTP endpoints work: the username and
password a client configures are the provider's own API credentials, so
mailgate needs no accounts file.
"""

from __future__ import annotations

import pytest_twisted

from mailgate.testing import ScriptedResponse

from .conftest import Gateway, send_with_smtplib


@pytest_twisted.ensureDeferred
async def test_login_is_the_api_token(passthrough_gateway: Gateway) -> None:
    """Whatever password the client logs in with is sent to the API as its bearer token,
    and an API that refuses it answers the client with 554 5.7.0."""
    gateway = passthrough_gateway
    gateway.api.respond(ScriptedResponse(status=200, body={"id": "ok-1"}), ScriptedResponse(status=401, body={"message": "Invalid token"}))
    accepted = await send_with_smtplib(
        gateway, "submissions", "PLAIN", user="server", password="customer-token-1",
        sender="a@example.com", recipients=["b@example.org"], message=b"Subject: t\r\n\r\nx\r\n",
    )  # fmt: skip
    refused = await send_with_smtplib(
        gateway, "submission", "LOGIN", user="server", password="wrong-token",
        sender="a@example.com", recipients=["b@example.org"], message=b"Subject: t\r\n\r\nx\r\n",
    )  # fmt: skip
    assert (accepted.code, accepted.text) == (250, "2.0.0 Ok: ok-1")
    assert (refused.code, refused.text) == (554, "5.7.0 Rejected by api: API refused the credentials (HTTP 401): Invalid token")
    assert [r.headers["authorization"] for r in gateway.api.requests] == ["Bearer customer-token-1", "Bearer wrong-token"]
    assert gateway.api.requests[0].json()["account"].startswith("passthrough-")

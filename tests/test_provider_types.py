"""The provider types as configured: settings, defaults, passthrough."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock

from mailgate.build import build_routes, check_passthrough
from mailgate.config import ConfigError, parse_config
from mailgate.providers.bento import BentoProvider
from mailgate.providers.mailgun import MailgunProvider
from mailgate.providers.postmark import PostmarkProvider
from mailgate.providers.resend import ResendProvider
from mailgate.providers.sendgrid import SendGridProvider
from mailgate.providers.ses import SESProvider

REPO = Path(__file__).resolve().parents[1]


def config(provider: dict[str, Any], accounts: dict[str, Any] | None = None) -> Any:
    return parse_config(
        {
            "listeners": [{"endpoint": "tcp:587", "role": "submission"}],
            "accounts": accounts or {"store": "file", "path": "accounts.toml"},
            "providers": {"p": provider},
        },
        base_dir=Path("/nonexistent"),
    )


def routes(provider: dict[str, Any]) -> Any:
    return build_routes(config(provider), Clock(), http_client=None)


@pytest.mark.parametrize(
    ("provider", "kind", "url"),
    [
        ({"type": "postmark", "token": "t"}, PostmarkProvider, "https://api.postmarkapp.com"),
        ({"type": "bento", "site_uuid": "s", "publishable_key": "p", "secret_key": "k"}, BentoProvider,
         "https://app.bentonow.com/api/v1"),
        ({"type": "sendgrid", "api_key": "k"}, SendGridProvider, "https://api.sendgrid.com"),
        ({"type": "mailgun", "api_key": "k", "domain": "mg.example.com"}, MailgunProvider,
         "https://api.mailgun.net"),
        ({"type": "mailgun", "api_key": "k", "domain": "mg.example.com", "region": "eu"}, MailgunProvider,
         "https://api.eu.mailgun.net"),
        ({"type": "resend", "api_key": "k"}, ResendProvider, "https://api.resend.com"),
        ({"type": "ses", "region": "us-east-2", "access_key_id": "a", "secret_access_key": "s"}, SESProvider,
         "https://email.us-east-2.amazonaws.com"),
    ],
)
def test_public_api_url_is_the_default(provider: dict[str, Any], kind: type, url: str) -> None:
    """Without ``url`` each provider talks to its public API."""
    adapter = routes(provider)["p"].adapter
    assert isinstance(adapter, kind)
    assert adapter.settings["url"] == url


@pytest.mark.parametrize(
    ("provider", "key"),
    [
        ({"type": "postmark", "api_key": "t"}, "providers.p.api_key"),
        ({"type": "bento", "secret": "k"}, "providers.p.secret"),
        ({"type": "sendgrid", "token": "k"}, "providers.p.token"),
        ({"type": "sendgrid", "api_key": "k", "url": "ftp://x"}, "providers.p.url"),
        ({"type": "mailgun", "token": "k", "domain": "mg.example.com"}, "providers.p.token"),
        ({"type": "mailgun", "api_key": "k"}, "providers.p.domain"),
        ({"type": "resend", "api_key": "k", "domain": "x"}, "providers.p.domain"),
        ({"type": "ses", "access_key_id": "a", "secret_access_key": "s"}, "providers.p.region"),
        ({"type": "ses", "region": "eu-west-1", "secret_key": "s"}, "providers.p.secret_key"),
    ],
)
def test_wrong_keys_are_named(provider: dict[str, Any], key: str) -> None:
    """A key of another provider, or a URL that is not http(s), stops start-up naming the key."""
    with pytest.raises(ConfigError) as error:
        routes(provider)
    assert error.value.key == key


@pytest.mark.parametrize(
    ("provider", "username", "password"),
    [
        ({"type": "postmark"}, "", ["token"]),
        ({"type": "bento"}, "site_uuid", ["publishable_key", "secret_key"]),
        ({"type": "sendgrid"}, "", ["api_key"]),
        ({"type": "mailgun", "domain": "mg.example.com"}, "", ["api_key"]),
        ({"type": "resend"}, "", ["api_key"]),
        ({"type": "ses", "region": "eu-west-1"}, "access_key_id", ["secret_access_key"]),
    ],
)
def test_passthrough_fills_the_credentials(provider: dict[str, Any], username: str, password: list[str]) -> None:
    """Each provider's credential settings can come from the SMTP login, and only from it."""
    accounts = {"store": "passthrough", "provider": "p", "username_setting": username, "password_settings": password}
    check_passthrough(config(provider, accounts))
    with pytest.raises(ConfigError) as error:
        check_passthrough(config({**provider, password[0]: "operator-secret"}, accounts))
    assert error.value.key == f"providers.p.{password[0]}"


def test_commented_examples_are_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    """The commented provider tables of etc/mailgate.toml.example load as written."""
    text = (REPO / "etc" / "mailgate.toml.example").read_text()
    for name in ("postmark", "bento", "sendgrid", "mailgun", "resend", "ses"):
        block = re.search(rf"^# \[providers\.{name}\]\n((?:# \w+ = .*\n)+)", text, re.MULTILINE)
        assert block is not None, name
        table = tomllib.loads(re.sub(r"^# ", "", block.group(1), flags=re.MULTILINE))
        for value in table.values():
            if value.startswith("env:"):
                monkeypatch.setenv(value[4:], "example-value")
        assert table["type"] == name
        routes(table)

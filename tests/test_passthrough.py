"""Tests for mailgate.accounts.passthrough: the SMTP login as provider credentials."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from zope.interface.verify import verifyObject

from mailgate.accounts.passthrough import PassthroughStore
from mailgate.interfaces import IAccountStore

SITE = "6f1c3d4e-0000-4000-8000-123456789abc"


def result_of(d: defer.Deferred[Any]) -> Any:
    """The result (or Failure) a Deferred already has."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "Deferred has not fired"
    return results[0]


def bento() -> PassthroughStore:
    return PassthroughStore("bento", "site_uuid", ["publishable_key", "secret_key"])


def test_provides_interface() -> None:
    """PassthroughStore implements IAccountStore and offers no CRAM-MD5."""
    store = bento()
    assert verifyObject(IAccountStore, store)
    assert store.supports_cram_md5 is False


def test_bento_login_becomes_provider_settings() -> None:
    """Bento's username and "publishable:secret" password fill the provider's settings."""
    account = result_of(bento().authenticate_password(SITE, "pk_live:sk_live"))
    assert account.provider_settings == {
        "bento": {"site_uuid": SITE, "publishable_key": "pk_live", "secret_key": "sk_live"}
    }
    assert account.route == ("bento",)


def test_account_name_is_a_fingerprint_of_the_username() -> None:
    """The Account name is derived from the username and contains no credential."""
    account = result_of(bento().authenticate_password(SITE, "pk_live:sk_live"))
    assert account.name == "passthrough-" + hashlib.sha256(SITE.encode()).hexdigest()[:12]
    assert "pk_live" not in repr(account) and "sk_live" not in repr(account)
    other = result_of(bento().authenticate_password(SITE + "0", "pk_live:sk_live"))
    assert other.name != account.name


def test_postmark_token_login_ignores_username() -> None:
    """With username_setting "" the username is ignored and the password is the single setting."""
    store = PassthroughStore("postmark", "", ["token"])
    account = result_of(store.authenticate_password("server-token", "server-token"))
    assert account.provider_settings == {"postmark": {"token": "server-token"}}
    colons = result_of(store.authenticate_password("anything", "a:b:c"))
    assert colons.provider_settings == {"postmark": {"token": "a:b:c"}}


@pytest.mark.parametrize(
    ("username", "password"),
    [
        (SITE, "only-one-part"),
        (SITE, "a:b:c"),
        (SITE, ":sk"),
        (SITE, "pk:"),
        (SITE, ""),
        ("", "pk:sk"),
        (SITE, "pk:s k"),
        (SITE, "pk:sk\r\nX-Injected: 1"),
        ("site\x00", "pk:sk"),
    ],
)
def test_malformed_logins_are_unauthorized(username: str, password: str) -> None:
    """Wrong part counts, empty parts and non-printable characters refuse the login."""
    failure = result_of(bento().authenticate_password(username, password))
    assert failure.check(UnauthorizedLogin)
    assert "sk" not in str(failure.value)


def test_account_options_are_carried() -> None:
    """Route, sender, limit, default and mode options reach every Account."""
    store = PassthroughStore(
        "postmark",
        "",
        ["token"],
        route=("postmark", "backup"),
        allowed_senders=("@example.com",),
        max_recipients=10,
        max_message_size=1024,
        defaults={"X-Mailgate-Stream": "outbound"},
        delivery_mode="sync",
    )
    account = result_of(store.authenticate_password("t", "t"))
    assert account.route == ("postmark", "backup")
    assert account.allowed_senders == ("@example.com",)
    assert (account.max_recipients, account.max_message_size) == (10, 1024)
    assert account.defaults == {"X-Mailgate-Stream": "outbound"}
    assert account.delivery_mode == "sync"


def test_cram_md5_is_refused() -> None:
    """CRAM-MD5 logins always fail: the store has no secret to check them against."""
    failure = result_of(bento().authenticate_cram_md5(SITE, b"<1@x>", "0" * 32))
    assert failure.check(UnauthorizedLogin)


@pytest.mark.parametrize("settings", [[], "token"])
def test_password_settings_must_be_a_list_of_names(settings: Any) -> None:
    """An empty list or a bare string of password settings is a programming error."""
    with pytest.raises(ValueError):
        PassthroughStore("postmark", "", settings)

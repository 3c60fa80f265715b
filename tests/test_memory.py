"""Tests for mailgate.accounts.memory: the in-memory fake account store."""

from __future__ import annotations

import hmac
from typing import Any

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from zope.interface.verify import verifyObject

from mailgate.accounts.account import Account
from mailgate.accounts.memory import MemoryAccountStore
from mailgate.interfaces import IAccountStore

ALICE = Account(name="alice", route=("main",))
CHALLENGE = b"<1.2@mail.example.com>"


def result_of(d: defer.Deferred[Any]) -> Any:
    """The result (or Failure) a Deferred already has."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "Deferred has not fired"
    return results[0]


def test_provides_interface() -> None:
    """MemoryAccountStore implements IAccountStore."""
    assert verifyObject(IAccountStore, MemoryAccountStore({"alice": ("pw", ALICE)}))


def test_password_logins() -> None:
    """The right password gives the Account at once; wrong or unknown users are refused."""
    store = MemoryAccountStore({"alice": ("pw", ALICE)})
    assert result_of(store.authenticate_password("alice", "pw")) is ALICE
    assert result_of(store.authenticate_password("alice", "nope")).check(UnauthorizedLogin)
    assert result_of(store.authenticate_password("bob", "pw")).check(UnauthorizedLogin)


def test_cram_md5_logins() -> None:
    """CRAM-MD5 is checked with HMAC-MD5 of the clear password."""
    store = MemoryAccountStore({"alice": ("pw", ALICE)})
    digest = hmac.new(b"pw", CHALLENGE, "md5").hexdigest()
    assert store.supports_cram_md5
    assert result_of(store.authenticate_cram_md5("alice", CHALLENGE, digest)) is ALICE
    assert result_of(store.authenticate_cram_md5("alice", CHALLENGE, "0" * 32)).check(
        UnauthorizedLogin
    )


def test_cram_md5_can_be_disabled() -> None:
    """With cram_md5=False the store says so and refuses CRAM-MD5 logins."""
    store = MemoryAccountStore({"alice": ("pw", ALICE)}, cram_md5=False)
    digest = hmac.new(b"pw", CHALLENGE, "md5").hexdigest()
    assert store.supports_cram_md5 is False
    assert result_of(store.authenticate_cram_md5("alice", CHALLENGE, digest)).check(
        UnauthorizedLogin
    )


def test_repr_hides_passwords() -> None:
    """repr shows usernames, never passwords."""
    assert "s3cret" not in repr(MemoryAccountStore({"alice": ("s3cret", ALICE)}))

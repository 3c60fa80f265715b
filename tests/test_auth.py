"""SASL mechanisms, the account-store checker and the realm (mailgate.auth)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re

import pytest
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import CramMD5Credentials, UsernamePassword
from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred
from zope.interface.verify import verifyObject

from mailgate import replies
from mailgate.accounts.account import Account
from mailgate.accounts.memory import MemoryAccountStore
from mailgate.auth import (
    AccountRealm,
    AccountStoreChecker,
    Challenge,
    CramMD5Mechanism,
    Finished,
    LoginMechanism,
    PlainMechanism,
    Refused,
    decode_response,
    mechanism_names,
    new_mechanism,
)
from mailgate.interfaces import IAccount

ALICE = Account(name="alice")
STORE = {"alice": ("s3cret", ALICE)}


def result_of(d: Deferred):
    """The synchronous result of an already-fired Deferred (a Failure is returned, not raised)."""
    results: list = []
    d.addBoth(results.append)
    assert results, "Deferred has not fired"
    return results[0]


# -- decode_response ------------------------------------------------------------------


@pytest.mark.parametrize(
    "line, expected",
    [
        (b"", b""),
        (b"YWJj", b"abc"),
        (b"AGFsaWNlAHMzY3JldA==", b"\0alice\0s3cret"),
        (b"*", Refused(replies.AUTH_CANCELLED)),
        (b"YWJj ", Refused(replies.AUTH_BAD_BASE64)),
        (b" YWJj", Refused(replies.AUTH_BAD_BASE64)),
        (b"YW Jj", Refused(replies.AUTH_BAD_BASE64)),
        (b"YWJj\t", Refused(replies.AUTH_BAD_BASE64)),
        (b"YWJjZA", Refused(replies.AUTH_BAD_BASE64)),  # padding missing
        (b"YWJj!", Refused(replies.AUTH_BAD_BASE64)),
        (b"YWJj====", Refused(replies.AUTH_BAD_BASE64)),  # excess padding
        (b"YWJk", b"abd"),
        (b"YWI=", b"ab"),
        (b"YWJ=", Refused(replies.AUTH_BAD_BASE64)),  # non-zero pad bits
        (b"\xff\xfe", Refused(replies.AUTH_BAD_BASE64)),
    ],
)
def test_decode_response_is_strict(line, expected):
    """Responses must be exact base64: no whitespace, junk or missing padding; "*" cancels."""
    assert decode_response(line) == expected


# -- PLAIN --------------------------------------------------------------------------------


def test_plain_without_initial_response_challenges_empty():
    """PLAIN without an initial response asks with an empty 334 challenge."""
    assert PlainMechanism().start(None) == Challenge(b"")


def test_plain_success():
    """A well-formed PLAIN message yields username/password credentials."""
    step = PlainMechanism().start(b"\0alice\0s3cret")
    assert isinstance(step, Finished)
    assert (step.credentials.username, step.credentials.password) == (b"alice", b"s3cret")


def test_plain_authzid_equal_to_user_accepted():
    """An authorization identity equal to the user is allowed."""
    step = PlainMechanism().respond(b"alice\0alice\0s3cret")
    assert isinstance(step, Finished) and step.credentials is not None


@pytest.mark.parametrize(
    "message",
    [b"", b"alice", b"alice\0s3cret", b"\0alice\0s3cret\0", b"\0\0\0\0", b"\0alice\0\xff"],
)
def test_plain_malformed_refused(message):
    """Two or four parts, or non-UTF-8, are a malformed PLAIN response (501 5.5.2)."""
    assert PlainMechanism().respond(message) == Refused(replies.AUTH_BAD_PLAIN)


@pytest.mark.parametrize("message", [b"\0\0s3cret", b"\0alice\0", b"mallory\0alice\0s3cret"])
def test_plain_empty_or_foreign_identity_fails_like_bad_password(message):
    """An empty user or password, or a foreign authzid, ends in a failed login (no credentials)."""
    assert PlainMechanism().respond(message) == Finished(None)


# -- LOGIN --------------------------------------------------------------------------------


def test_login_dialogue():
    """LOGIN asks Username: then Password: and yields the credentials."""
    mechanism = LoginMechanism()
    assert mechanism.start(None) == Challenge(b"Username:")
    assert mechanism.respond(b"alice") == Challenge(b"Password:")
    step = mechanism.respond(b"s3cret")
    assert isinstance(step, Finished)
    assert (step.credentials.username, step.credentials.password) == (b"alice", b"s3cret")


def test_login_initial_response_is_username():
    """An initial response to LOGIN is the username; only the password is asked for."""
    mechanism = LoginMechanism()
    assert mechanism.start(b"alice") == Challenge(b"Password:")
    assert isinstance(mechanism.respond(b"s3cret"), Finished)


@pytest.mark.parametrize("user, password", [(b"", b"x"), (b"alice", b"")])
def test_login_empty_fields_fail(user, password):
    """An empty username or password fails like a wrong password."""
    mechanism = LoginMechanism()
    mechanism.start(None)
    mechanism.respond(user)
    assert mechanism.respond(password) == Finished(None)


def test_login_non_utf8_refused():
    """A username that is not UTF-8 is refused as undecodable."""
    assert LoginMechanism().start(b"\xff") == Refused(replies.AUTH_BAD_BASE64)


# -- CRAM-MD5 ----------------------------------------------------------------------------

_CHALLENGE = re.compile(rb"<([0-9a-f]{32})\.(\d+)@mx\.test>\Z")


def test_cram_md5_challenge_format_and_randomness():
    """Challenges are <128-bit-hex.timestamp@host> (RFC 2195) and never repeat."""
    challenges = [CramMD5Mechanism("mx.test").start(None).data for _ in range(200)]
    randoms = set()
    for challenge in challenges:
        match = _CHALLENGE.match(challenge)
        assert match, challenge
        randoms.add(match.group(1))
    assert len(randoms) == len(challenges)


def test_cram_md5_refuses_initial_response():
    """CRAM-MD5 is server-first: an initial response is refused."""
    assert CramMD5Mechanism("mx.test").start(b"x") == Refused(replies.AUTH_NO_INITIAL_RESPONSE)


def test_cram_md5_response_yields_credentials():
    """A well-formed response produces CramMD5Credentials over the challenge that was sent."""
    mechanism = CramMD5Mechanism("mx.test")
    challenge = mechanism.start(None).data
    digest = hmac.new(b"s3cret", challenge, hashlib.md5).hexdigest().upper()
    step = mechanism.respond(b"alice " + digest.encode())
    assert isinstance(step, Finished)
    assert step.credentials.challenge == challenge
    assert step.credentials.username == b"alice"
    assert step.credentials.checkPassword(b"s3cret")


@pytest.mark.parametrize(
    "response, reply",
    [
        (b"alice", replies.AUTH_BAD_CRAM_MD5),
        (b"", replies.AUTH_BAD_CRAM_MD5),
        (b" " + b"0" * 32, replies.AUTH_BAD_CRAM_MD5),
        (b"alice " + b"g" * 32, replies.AUTH_BAD_CRAM_MD5),
        (b"alice " + b"0" * 31, replies.AUTH_BAD_CRAM_MD5),
        (b"alice " + b"0" * 33, replies.AUTH_BAD_CRAM_MD5),
        (b"alice " + b"0" * 32 + b" ", replies.AUTH_BAD_CRAM_MD5),
        (b"\xff " + b"0" * 32, replies.AUTH_BAD_BASE64),
    ],
)
def test_cram_md5_malformed(response, reply):
    """Malformed CRAM-MD5 responses (no space, non-hex, wrong length) are refused with 501."""
    mechanism = CramMD5Mechanism("mx.test")
    mechanism.start(None)
    assert mechanism.respond(response) == Refused(reply)


def test_mechanism_names_and_lookup():
    """PLAIN and LOGIN always exist; CRAM-MD5 only when enabled; names are case-insensitive."""
    assert mechanism_names(False) == ["PLAIN", "LOGIN"]
    assert mechanism_names(True) == ["PLAIN", "LOGIN", "CRAM-MD5"]
    assert isinstance(new_mechanism("plain", "h", False), PlainMechanism)
    assert isinstance(new_mechanism("LoGiN", "h", False), LoginMechanism)
    assert isinstance(new_mechanism("cram-md5", "h", True), CramMD5Mechanism)
    assert new_mechanism("CRAM-MD5", "h", False) is None
    assert new_mechanism("GSSAPI", "h", True) is None
    assert new_mechanism("", "h", True) is None


# -- checker and realm -------------------------------------------------------------------


def test_checker_provides_interface():
    """AccountStoreChecker is a valid ICredentialsChecker and the realm a valid IRealm."""
    checker = AccountStoreChecker(MemoryAccountStore(STORE))
    assert verifyObject(ICredentialsChecker, checker)
    assert verifyObject(IRealm, AccountRealm())


def test_checker_password_success_returns_account():
    """Right username and password give the Account itself as avatar id."""
    checker = AccountStoreChecker(MemoryAccountStore(STORE))
    assert result_of(checker.requestAvatarId(UsernamePassword(b"alice", b"s3cret"))) is ALICE


@pytest.mark.parametrize(
    "username, password",
    [
        (b"alice", b"wrong"),
        (b"nobody", b"s3cret"),
        (b"", b"s3cret"),
        (b"alice", b""),
        (b"\xff", b"s3cret"),
        (b"alice", b"\xff"),
    ],
)
def test_checker_password_failure(username, password):
    """Wrong, empty or undecodable credentials fail with UnauthorizedLogin."""
    checker = AccountStoreChecker(MemoryAccountStore(STORE))
    failure = result_of(checker.requestAvatarId(UsernamePassword(username, password)))
    assert failure.check(UnauthorizedLogin)


def _cram(
    username: bytes, password: bytes, challenge: bytes = b"<1.2@mx.test>"
) -> CramMD5Credentials:
    credentials = CramMD5Credentials(b"mx.test")
    credentials.challenge = challenge
    credentials.username = username
    credentials.response = hmac.new(password, challenge, hashlib.md5).hexdigest().encode()
    return credentials


def test_checker_cram_md5_success_and_failure():
    """CRAM-MD5 credentials are checked against the store over the exact challenge."""
    checker = AccountStoreChecker(MemoryAccountStore(STORE))
    assert result_of(checker.requestAvatarId(_cram(b"alice", b"s3cret"))) is ALICE
    assert result_of(checker.requestAvatarId(_cram(b"alice", b"nope"))).check(UnauthorizedLogin)
    assert result_of(checker.requestAvatarId(_cram(b"", b"s3cret"))).check(UnauthorizedLogin)
    tampered = _cram(b"alice", b"s3cret")
    tampered.challenge = b"<other@mx.test>"
    assert result_of(checker.requestAvatarId(tampered)).check(UnauthorizedLogin)


def test_checker_cram_md5_when_store_cannot():
    """A store without CRAM-MD5 support refuses CRAM-MD5 logins."""
    checker = AccountStoreChecker(MemoryAccountStore(STORE, cram_md5=False))
    assert result_of(checker.requestAvatarId(_cram(b"alice", b"s3cret"))).check(UnauthorizedLogin)


def test_checker_unhandled_credentials():
    """Credentials of another kind are refused as unhandled."""
    checker = AccountStoreChecker(MemoryAccountStore(STORE))
    assert result_of(checker.requestAvatarId(object())).check(UnhandledCredentials)


def test_realm_returns_account():
    """The realm hands out the Account under IAccount with a no-op logout."""
    interface, avatar, logout = AccountRealm().requestAvatar(ALICE, None, IAccount)
    assert interface is IAccount and avatar is ALICE
    assert logout() is None


def test_realm_refuses_other_interfaces():
    """Asking the realm for anything but IAccount is an error."""
    with pytest.raises(NotImplementedError):
        AccountRealm().requestAvatar(ALICE, None, IRealm)


def test_portal_login_end_to_end():
    """Portal + checker + realm turn PLAIN credentials into the Account avatar."""
    portal = Portal(AccountRealm(), [AccountStoreChecker(MemoryAccountStore(STORE))])
    step = PlainMechanism().start(base64.b64decode(base64.b64encode(b"\0alice\0s3cret")))
    interface, avatar, _ = result_of(portal.login(step.credentials, None, IAccount))
    assert (interface, avatar) == (IAccount, ALICE)

"""SMTP AUTH (RFC 4954) with PLAIN (RFC 4616), LOGIN and CRAM-MD5 (RFC 2195).

Stock Twisted's challengers accept junk around base64, ignore a foreign
authorization identity, crash on malformed responses and draw CRAM-MD5
challenges from a non-cryptographic generator (SECURITY.md items 5, 6, 13).
Each mechanism here is a small state machine that answers every input with
exactly one of: another challenge, finished credentials for the cred portal,
or a precise error reply.

PLAIN and LOGIN produce :class:`twisted.cred.credentials.UsernamePassword`
(IUsernamePassword); CRAM-MD5 produces Twisted's ``CramMD5Credentials`` with a
challenge drawn from :mod:`secrets`.  :class:`AccountStoreChecker` verifies both
against an :class:`~mailgate.interfaces.IAccountStore`, and :class:`AccountRealm`
hands out the :class:`~mailgate.accounts.account.Account` as the avatar.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
import time
from dataclasses import dataclass

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import (
    CramMD5Credentials,
    IUsernameHashedPassword,
    IUsernamePassword,
    UsernamePassword,
)
from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.cred.portal import IRealm
from twisted.internet import defer
from zope.interface import implementer

from mailgate import replies
from mailgate.accounts.account import Account
from mailgate.interfaces import IAccount, IAccountStore
from mailgate.replies import Reply

MAX_AUTH_LINE = 12288  # RFC 4954 §4: AUTH lines may exceed the 512-octet command limit.
_HEX_DIGEST = re.compile(rb"[0-9a-f]{32}\Z")


@dataclass(frozen=True)
class Challenge:
    """Send ``334 <base64 data>`` and wait for the next response line."""

    data: bytes


@dataclass(frozen=True)
class Finished:
    """The exchange produced credentials for ``portal.login``."""

    credentials: object


@dataclass(frozen=True)
class Refused:
    """The exchange failed syntactically; answer ``reply`` and end AUTH."""

    reply: Reply


Step = Challenge | Finished | Refused


def decode_response(line: bytes) -> bytes | Refused:
    """Strict base64 (RFC 4954 §4): no whitespace, no junk, padding required."""
    if line == b"*":
        return Refused(replies.AUTH_CANCELLED)
    try:
        decoded = base64.b64decode(line, validate=True)
    except (binascii.Error, ValueError):
        return Refused(replies.AUTH_BAD_BASE64)
    if base64.b64encode(decoded) != line:
        # b64decode tolerates excess "=" and non-zero pad bits; only the
        # canonical encoding (RFC 4648 §3.5) is accepted.
        return Refused(replies.AUTH_BAD_BASE64)
    return decoded


def _utf8(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


class PlainMechanism:
    """RFC 4616: one message ``[authzid] NUL authcid NUL passwd``."""

    name = "PLAIN"
    allows_initial_response = True

    def start(self, initial: bytes | None) -> Step:
        if initial is None:
            return Challenge(b"")
        return self.respond(initial)

    def respond(self, decoded: bytes) -> Step:
        parts = decoded.split(b"\x00")
        if len(parts) != 3:
            return Refused(replies.AUTH_BAD_PLAIN)
        authzid, authcid, password = (_utf8(part) for part in parts)
        if authzid is None or authcid is None or password is None:
            return Refused(replies.AUTH_BAD_PLAIN)
        if not authcid or not password:
            return Finished(None)  # Empty identity or password: fails like a wrong password.
        if authzid and authzid != authcid:
            # We do not support acting on behalf of another identity (RFC 4616 §2).
            return Finished(None)
        return Finished(UsernamePassword(authcid.encode("utf-8"), password.encode("utf-8")))


class LoginMechanism:
    """The widely deployed LOGIN mechanism (draft-murchison-sasl-login).

    Challenges are ``Username:`` and ``Password:``; an initial response, sent by
    many clients, is taken as the username.
    """

    name = "LOGIN"
    allows_initial_response = True

    def __init__(self) -> None:
        self._username: str | None = None

    def start(self, initial: bytes | None) -> Step:
        if initial is None:
            return Challenge(b"Username:")
        return self.respond(initial)

    def respond(self, decoded: bytes) -> Step:
        text = _utf8(decoded)
        if text is None:
            return Refused(replies.AUTH_BAD_BASE64)
        if self._username is None:
            self._username = text
            return Challenge(b"Password:")
        if not self._username or not text:
            return Finished(None)
        return Finished(UsernamePassword(self._username.encode("utf-8"), text.encode("utf-8")))


class CramMD5Mechanism:
    """RFC 2195: challenge ``<random.timestamp@host>``, response ``user SP hex-digest``.

    The random part is 128 bits from :mod:`secrets`, so challenges are unique and
    unpredictable (Twisted's own uses :func:`random.randrange`).
    """

    name = "CRAM-MD5"
    allows_initial_response = False

    def __init__(self, hostname: str):
        self.credentials = CramMD5Credentials(hostname.encode("ascii", "replace"))
        self.credentials.challenge = (
            f"<{secrets.token_hex(16)}.{int(time.time())}@{hostname}>".encode("ascii", "replace")
        )

    def start(self, initial: bytes | None) -> Step:
        if initial is not None:
            return Refused(replies.AUTH_NO_INITIAL_RESPONSE)
        return Challenge(self.credentials.challenge)

    def respond(self, decoded: bytes) -> Step:
        username, space, digest = decoded.rpartition(b" ")
        if not space or not username or not _HEX_DIGEST.match(digest.lower()):
            return Refused(replies.AUTH_BAD_CRAM_MD5)
        if _utf8(username) is None:
            return Refused(replies.AUTH_BAD_BASE64)
        self.credentials.username = username
        self.credentials.response = digest.lower()
        return Finished(self.credentials)


def mechanism_names(cram_md5: bool) -> list[str]:
    """Mechanisms to advertise, strongest-first is not meaningful here; clients pick."""
    names = ["PLAIN", "LOGIN"]
    if cram_md5:
        names.append("CRAM-MD5")
    return names


def new_mechanism(name: str, hostname: str, cram_md5: bool):  # type: ignore[no-untyped-def]
    """A fresh mechanism for ``AUTH name`` (case-insensitive), or None if unknown."""
    name = name.upper()
    if name == "PLAIN":
        return PlainMechanism()
    if name == "LOGIN":
        return LoginMechanism()
    if name == "CRAM-MD5" and cram_md5:
        return CramMD5Mechanism(hostname)
    return None


@implementer(ICredentialsChecker)
class AccountStoreChecker:
    """Checks SMTP credentials against an account store.

    The avatar id it returns is the :class:`Account` itself, because stores like
    ``passthrough`` derive the account from the credentials and could not rebuild
    it from a name alone.
    """

    credentialInterfaces = (IUsernamePassword, IUsernameHashedPassword)

    def __init__(self, store: IAccountStore):
        self.store = store

    def requestAvatarId(self, credentials):  # type: ignore[no-untyped-def]
        if isinstance(credentials, CramMD5Credentials):
            username = _utf8(credentials.username or b"")
            digest = (credentials.response or b"").decode("ascii", "replace")
            if not username:
                return defer.fail(UnauthorizedLogin())
            return defer.maybeDeferred(
                self.store.authenticate_cram_md5, username, credentials.challenge, digest
            )
        if IUsernamePassword.providedBy(credentials):
            username = _utf8(credentials.username)
            password = _utf8(credentials.password)
            if not username or not password:
                return defer.fail(UnauthorizedLogin())
            return defer.maybeDeferred(self.store.authenticate_password, username, password)
        return defer.fail(UnhandledCredentials())


@implementer(IRealm)
class AccountRealm:
    """Hands out the authenticated :class:`Account` as the avatar."""

    def requestAvatar(self, avatarId, mind, *interfaces):  # type: ignore[no-untyped-def]
        if IAccount not in interfaces or not isinstance(avatarId, Account):
            raise NotImplementedError("mailgate's realm only provides IAccount")
        return IAccount, avatarId, lambda: None

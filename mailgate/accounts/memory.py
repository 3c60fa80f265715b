"""An in-memory account store: a fake for tests and for embedding mailgate.

It keeps passwords **in clear** in memory; that is what makes it a convenient
fake, and why no configuration can select it.  Answers are synchronous
(already-fired Deferreds), so tests need no reactor.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from zope.interface import implementer

from mailgate.accounts.account import Account
from mailgate.interfaces import IAccountStore

__all__ = ["MemoryAccountStore"]

_UNAUTHORIZED = "invalid credentials"


@implementer(IAccountStore)
class MemoryAccountStore:
    """Accounts given as ``{username: (password, Account)}``.

    ``cram_md5`` says whether CRAM-MD5 (RFC 2195) logins are possible; they are
    checked with :mod:`hmac` directly against the clear password.
    """

    def __init__(
        self, accounts: Mapping[str, tuple[str, Account]], *, cram_md5: bool = True
    ) -> None:
        self._accounts = dict(accounts)
        self.supports_cram_md5 = cram_md5

    def __repr__(self) -> str:
        return f"<MemoryAccountStore users={sorted(self._accounts)!r}>"

    def authenticate_password(self, username: str, password: str) -> defer.Deferred[Account]:
        """See :meth:`IAccountStore.authenticate_password`."""
        known = self._accounts.get(username)
        if known is not None and hmac.compare_digest(
            known[0].encode("utf-8"), password.encode("utf-8")
        ):
            return defer.succeed(known[1])
        return defer.fail(UnauthorizedLogin(_UNAUTHORIZED))

    def authenticate_cram_md5(
        self, username: str, challenge: bytes, digest: str
    ) -> defer.Deferred[Account]:
        """See :meth:`IAccountStore.authenticate_cram_md5`."""
        known = self._accounts.get(username)
        if known is not None and self.supports_cram_md5:
            expected = hmac.new(known[0].encode("utf-8"), challenge, "md5").hexdigest()
            if hmac.compare_digest(expected.encode("ascii"), digest.lower().encode("utf-8")):
                return defer.succeed(known[1])
        return defer.fail(UnauthorizedLogin(_UNAUTHORIZED))

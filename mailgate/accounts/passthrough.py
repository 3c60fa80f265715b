"""The ``passthrough`` account store: the SMTP login *is* the provider's API credential.

This is how Bento's and Postmark's own SMTP endpoints work, so applications
configured for them can point at mailgate unchanged (ARCHITECTURE.md, "Account
stores").  mailgate keeps no account list and cannot tell a right credential
from a wrong one: any well-formed login is accepted here, and the provider's
API decides at delivery time (a rejected credential comes back as an API
error, which the SMTP layer turns into a precise reply).  A login this store
refuses is one that cannot even be split into the provider's settings.

Examples::

    # Bento: username = site UUID, password = "publishable_key:secret_key"
    PassthroughStore("bento", "site_uuid", ["publishable_key", "secret_key"])
    # Postmark: the server token is the password (and, by convention, the username)
    PassthroughStore("postmark", "", ["token"])
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from types import MappingProxyType

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from zope.interface import implementer

from mailgate.accounts.account import Account, login_fingerprint
from mailgate.interfaces import IAccountStore

__all__ = ["PassthroughStore"]

# Credentials end up in HTTP headers and JSON: printable ASCII without spaces.
_FIELD = re.compile(r"[!-~]+")
_UNAUTHORIZED = "invalid credentials"


@implementer(IAccountStore)
class PassthroughStore:
    """Turn each PLAIN/LOGIN login into an Account carrying it as provider settings.

    ``username_setting`` names the provider setting the SMTP username fills;
    ``""`` ignores the username.  The password is split on ``":"`` into
    exactly ``len(password_settings)`` parts, one per named setting (a single
    setting takes the whole password, colons included).  An empty part, a
    wrong number of parts, or a character outside printable ASCII refuses the
    login.

    The Account's name is ``passthrough-`` and the first 12 hex digits of
    SHA-256 of the username: stable per client (for logs, limits and metrics)
    without carrying the credential.  Its route defaults to ``(provider,)``.
    CRAM-MD5 is impossible (the server would need the secret in advance).
    """

    supports_cram_md5 = False

    def __init__(
        self,
        provider: str,
        username_setting: str,
        password_settings: Sequence[str],
        *,
        route: Sequence[str] = (),
        allowed_senders: Sequence[str] = (),
        max_recipients: int | None = None,
        max_message_size: int | None = None,
        defaults: Mapping[str, str] = MappingProxyType({}),
        delivery_mode: str | None = None,
    ) -> None:
        if isinstance(password_settings, str) or not password_settings:
            raise ValueError("password_settings must be a non-empty sequence of setting names")
        self.provider = provider
        self.username_setting = username_setting
        self.password_settings = tuple(password_settings)
        self._route = tuple(route) or (provider,)
        self._allowed_senders = tuple(allowed_senders)
        self._max_recipients = max_recipients
        self._max_message_size = max_message_size
        self._defaults = MappingProxyType(dict(defaults))
        self._delivery_mode = delivery_mode

    def __repr__(self) -> str:
        return (
            f"PassthroughStore({self.provider!r}, {self.username_setting!r}, "
            f"{list(self.password_settings)!r})"
        )

    def authenticate_password(self, username: str, password: str) -> defer.Deferred[Account]:
        """See :meth:`IAccountStore.authenticate_password`."""
        settings: dict[str, str] = {}
        if self.username_setting:
            settings[self.username_setting] = username
        if len(self.password_settings) == 1:
            parts = [password]
        else:
            parts = password.split(":")
        if len(parts) != len(self.password_settings):
            return defer.fail(UnauthorizedLogin(_UNAUTHORIZED))
        settings.update(zip(self.password_settings, parts))
        if not all(_FIELD.fullmatch(value) for value in settings.values()):
            return defer.fail(UnauthorizedLogin(_UNAUTHORIZED))
        return defer.succeed(
            Account(
                name="passthrough-" + login_fingerprint(username),
                route=self._route,
                provider_settings=MappingProxyType({self.provider: MappingProxyType(settings)}),
                allowed_senders=self._allowed_senders,
                max_recipients=self._max_recipients,
                max_message_size=self._max_message_size,
                defaults=self._defaults,
                delivery_mode=self._delivery_mode,
            )
        )

    def authenticate_cram_md5(
        self, username: str, challenge: bytes, digest: str
    ) -> defer.Deferred[Account]:
        """Always refused: see :meth:`IAccountStore.authenticate_cram_md5`."""
        return defer.fail(UnauthorizedLogin(_UNAUTHORIZED))

"""The Account: what an authenticated SMTP login maps to (the cred avatar).

ARCHITECTURE.md "Account": its route (ordered provider names), the provider
credentials it uses (its own, or the SMTP login itself in passthrough mode),
allowed senders, limits, and defaults for control headers.  Secrets are kept
out of ``repr()`` so that an account can be logged safely.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Account:
    """An authenticated client.

    ``route``: provider names in failover order; empty means the server's
    default route.  ``provider_settings``: per-provider setting overrides
    (credentials) for this account, e.g. ``{"main": {"token": "..."}}``; never
    shown by ``repr``.  ``allowed_senders``: addresses and ``@domain`` entries
    (case-insensitive); empty means any sender.  ``max_recipients`` /
    ``max_message_size``: None means the server's limit.  ``defaults``: control
    header defaults keyed by canonical header name (``X-Mailgate-Tag``...).
    ``delivery_mode``: overrides the listener's mode ("sync" or "queue").
    ``max_messages_per_minute`` / ``message_burst``: this account's message
    rate (0: unlimited; None: the server's ``[limits]`` default), see
    :class:`mailgate.ratelimit.AccountRateLimiter`.
    """

    name: str
    route: tuple[str, ...] = ()
    provider_settings: Mapping[str, Mapping[str, str]] = field(default_factory=dict, repr=False)
    allowed_senders: tuple[str, ...] = ()
    max_recipients: int | None = None
    max_message_size: int | None = None
    defaults: Mapping[str, str] = field(default_factory=dict)
    delivery_mode: str | None = None
    max_messages_per_minute: int | None = None
    message_burst: int | None = None

    def sender_allowed(self, address: str) -> bool:
        """True when ``address`` may be used as envelope sender or From: address.

        The null reverse-path (``""``) is only allowed when no restriction is set,
        since bounces are not something a submitting client originates.
        """
        if not self.allowed_senders:
            return True
        if not address or "@" not in address:
            return False
        address = address.lower()
        domain = "@" + address.rpartition("@")[2]
        for allowed in self.allowed_senders:
            allowed = allowed.lower()
            if allowed == address or (allowed.startswith("@") and allowed == domain):
                return True
        return False

    def __hash__(self) -> int:
        return hash(self.name)  # Mappings are not hashable; the name identifies an account.


def login_fingerprint(username: str) -> str:
    """12 hex digits of SHA-256 of ``username``: a stable account name for stores
    whose usernames may be secrets (API keys), safe in logs and metrics."""
    return hashlib.sha256(username.encode("utf-8", "surrogatepass")).hexdigest()[:12]


def provider_problem(
    account: Account, account_settings: Mapping[str, Collection[str]]
) -> tuple[str, str] | None:
    """The first provider reference of ``account`` that the configuration lacks.

    ``account_settings`` maps each configured provider name to the settings an
    account may give it.  Returns ``(key, message)`` with ``key`` relative to
    the account (``"route"``, ``"providers.main.token"``), or None when every
    route entry and provider setting names something configured: a typo must
    not defer that account's mail forever.
    """
    for name in account.route:
        if name not in account_settings:
            return "route", f"no provider named {name!r}"
    for name, settings in account.provider_settings.items():
        if name not in account_settings:
            return f"providers.{name}", "no such provider"
        for key in settings:
            if key not in account_settings[name]:
                return f"providers.{name}.{key}", "unknown key"
    return None

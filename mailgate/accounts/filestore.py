"""The ``file`` account store: accounts in a TOML file, secrets only as hashes.

The file (documented key by key in ``etc/accounts.toml.example``) is read with
:mod:`tomllib` and validated completely at load: any wrong key or value raises
:class:`~mailgate.configvalues.ConfigError` naming it, so a mistake stops
start-up (or a reload) instead of surfacing as a refused login.  A ``password``
that is not a hash made by :mod:`mailgate.passwords` is refused: clear-text
passwords are not accepted, not even "for now".  ``mailgate account`` writes the
file (:mod:`mailgate.cli`).

Logins (RFC 4954 PLAIN and LOGIN, RFC 2195 CRAM-MD5) are checked by
:class:`FileAccountStore`; scrypt runs in a thread so a login never blocks the
reactor for its hundreds of milliseconds.
"""

from __future__ import annotations

import re
import secrets
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import MappingProxyType
from typing import Any

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, threads
from zope.interface import implementer

from mailgate import passwords
from mailgate.accounts.account import Account
from mailgate.configvalues import ConfigError, parse_size, resolve_secret
from mailgate.interfaces import IAccountStore

__all__ = ["AccountEntry", "FileAccountStore", "account_from_table", "load_accounts", "parse_account"]

DELIVERY_MODES = ("sync", "queue")

# Control headers an account may give defaults for (ARCHITECTURE.md, "Semantics
# that are decided", 6), plus the X-Mailgate-Metadata-<key> family.  Names are
# matched case-insensitively and stored in this canonical spelling.
CONTROL_HEADERS = (
    "X-Mailgate-Tag",
    "X-Mailgate-Stream",
    "X-Mailgate-Track-Opens",
    "X-Mailgate-Track-Clicks",
    "X-Mailgate-Transactional",
    "X-Mailgate-Layout",
    "X-Mailgate-Inline-CSS",
    "X-Mailgate-Keep-Message-ID",
)
_CONTROL_HEADERS = {name.lower(): name for name in CONTROL_HEADERS}
_METADATA_PREFIX = "X-Mailgate-Metadata-"
# RFC 5322 section 3.6.8: a field name is printable ASCII except ":".
_FIELD_NAME_CHARS = re.compile(r"[!-9;-~]+")
# Usernames: anything printable without white space (addresses included).
_USERNAME = re.compile(r"[^\s\x00-\x1f\x7f]{1,255}")
# Provider names: as written under [providers.NAME]; no commas, so that
# `mailgate account add --route a,b` can list them.
_PROVIDER_NAME = re.compile(r"[^\s,\x00-\x1f\x7f]{1,64}")
_SENDER = re.compile(r"[^\s@<>\x00-\x1f\x7f]*@[^\s@<>\x00-\x1f\x7f]+")

# The keys that describe an account, shared with stores that get accounts as
# data (the http store's JSON); this file adds the secrets.
ACCOUNT_FIELDS = frozenset(
    {
        "route",
        "allowed_senders",
        "max_recipients",
        "max_message_size",
        "max_messages_per_minute",
        "message_burst",
        "delivery_mode",
        "defaults",
        "providers",
    }
)
_ACCOUNT_KEYS = ACCOUNT_FIELDS | {"password", "cram_md5"}
_UNAUTHORIZED = "invalid credentials"


@dataclass(frozen=True)
class AccountEntry:
    """One validated account: the avatar and the hashes a login is checked against."""

    account: Account
    password: str = field(repr=False)
    cram_md5: str | None = field(default=None, repr=False)


def load_accounts(path: Path) -> dict[str, AccountEntry]:
    """Read and validate an accounts file; raise :class:`ConfigError` on any problem.

    Provider settings written as ``env:NAME`` or ``file:PATH`` are resolved
    now (relative paths from the accounts file's directory).
    """
    source = str(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(source, f"cannot read accounts file: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(source, f"not valid TOML: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(source, "not valid TOML: the file is not UTF-8") from None
    unknown = set(data) - {"accounts"}
    if unknown:
        raise ConfigError(min(unknown), "unknown key (expected only [accounts.NAME] tables)",
                          source=source)
    accounts = data.get("accounts", {})
    if not isinstance(accounts, dict):
        raise ConfigError("accounts", "must be a table of [accounts.NAME] tables", source=source)
    return {
        name: parse_account(name, table, source=source, base_dir=path.parent)
        for name, table in accounts.items()
    }


def parse_account(
    name: str,
    table: object,
    *,
    source: str | None = None,
    base_dir: Path | None = None,
) -> AccountEntry:
    """Validate one ``[accounts.NAME]`` table and build its entry."""
    prefix = f"accounts.{_quote_key(name)}"

    def error(key: str, message: str) -> ConfigError:
        return ConfigError(f"{prefix}.{key}" if key else prefix, message, source=source)

    if not _USERNAME.fullmatch(name):
        raise error("", "account names must be 1-255 characters without spaces or controls")
    if not isinstance(table, dict):
        raise error("", "must be a table")
    unknown = sorted(set(table) - _ACCOUNT_KEYS)
    if unknown:
        raise error(unknown[0], "unknown key")

    password = table.get("password")
    if password is None:
        raise error("password", "missing; set it with `mailgate account passwd`")
    if passwords.hash_scheme(password) not in ("scrypt", "sha256"):
        raise error(
            "password",
            "must be a scrypt$ or sha256$ hash; clear-text passwords are refused "
            "(set it with `mailgate account passwd`)",
        )
    cram_md5 = table.get("cram_md5")
    if cram_md5 is not None and passwords.hash_scheme(cram_md5) != "cram-md5":
        raise error(
            "cram_md5",
            'must be "cram-md5$" and 64 hex digits (`mailgate account passwd --cram-md5`, '
            "or doveadm pw -s CRAM-MD5 output without its {CRAM-MD5} prefix)",
        )

    account = account_from_table(name, table, error, base_dir=base_dir)
    return AccountEntry(account=account, password=password, cram_md5=cram_md5)


def account_from_table(
    name: str,
    table: Mapping[str, Any],
    error: Callable[[str, str], ConfigError],
    *,
    base_dir: Path | None = None,
    remote: bool = False,
) -> Account:
    """The :class:`Account` described by the non-secret keys of ``table``.

    Shared by every store that receives accounts as data (this file, the
    ``http`` store's JSON).  ``error(key, message)`` builds the exception
    naming the key.  ``remote`` data comes from another system: provider
    settings are taken literally (never ``env:``/``file:`` references, which
    would let that system read mailgate's environment and files) and may not
    hold control characters.
    """
    route = _string_list(table.get("route", []), error, "route", _PROVIDER_NAME, "provider names")
    if len(set(route)) != len(route):
        raise error("route", "names a provider twice")
    senders = _string_list(
        table.get("allowed_senders", []),
        error,
        "allowed_senders",
        _SENDER,
        'addresses ("user@example.com") or domains ("@example.com")',
    )

    max_recipients = table.get("max_recipients")
    if max_recipients is not None and (
        isinstance(max_recipients, bool)
        or not isinstance(max_recipients, int)
        or max_recipients <= 0
    ):
        raise error("max_recipients", "must be a positive integer")
    max_messages_per_minute = table.get("max_messages_per_minute")
    if max_messages_per_minute is not None and not _is_int(max_messages_per_minute, minimum=0):
        raise error("max_messages_per_minute", "must be an integer, 0 or more (0: unlimited)")
    message_burst = table.get("message_burst")
    if message_burst is not None and not _is_int(message_burst, minimum=1):
        raise error("message_burst", "must be a positive integer")
    max_message_size = table.get("max_message_size")
    if max_message_size is not None:
        if isinstance(max_message_size, float) and max_message_size.is_integer():
            max_message_size = int(max_message_size)  # JSON numbers
        try:
            max_message_size = parse_size(max_message_size, "max_message_size")
        except ConfigError as e:
            raise error(e.key, e.message) from None
    delivery_mode = table.get("delivery_mode")
    if delivery_mode is not None and delivery_mode not in DELIVERY_MODES:
        raise error("delivery_mode", 'must be "sync" or "queue"')

    defaults = _control_defaults(table.get("defaults", {}), error)
    providers = _provider_settings(table.get("providers", {}), error, base_dir, remote)

    return Account(
        name=name,
        route=route,
        provider_settings=providers,
        allowed_senders=senders,
        max_recipients=max_recipients,
        max_message_size=max_message_size,
        defaults=defaults,
        delivery_mode=delivery_mode,
        max_messages_per_minute=max_messages_per_minute,
        message_burst=message_burst,
    )


def _is_int(value: object, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _quote_key(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else f'"{name}"'


def _string_list(
    value: object,
    error: Callable[[str, str], ConfigError],
    key: str,
    pattern: re.Pattern[str],
    what: str,
) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(
        isinstance(item, str) and pattern.fullmatch(item) for item in value
    ):
        raise error(key, f"must be a list of {what}")
    return tuple(value)


def _control_defaults(
    value: object, error: Callable[[str, str], ConfigError]
) -> Mapping[str, str]:
    if not isinstance(value, dict):
        raise error("defaults", "must be a table of control header names and values")
    defaults: dict[str, str] = {}
    for header, setting in value.items():
        key = f'defaults."{header}"'
        canonical = _CONTROL_HEADERS.get(header.lower())
        if canonical is None:
            suffix = header[len(_METADATA_PREFIX) :]
            if header.lower().startswith(_METADATA_PREFIX.lower()) and _FIELD_NAME_CHARS.fullmatch(
                suffix
            ):
                canonical = _METADATA_PREFIX + suffix
            else:
                raise error(
                    key,
                    "not a control header (one of " + ", ".join(CONTROL_HEADERS)
                    + f", or {_METADATA_PREFIX}<key>)",
                )
        if isinstance(setting, bool):
            setting = "true" if setting else "false"
        if not isinstance(setting, str) or re.search(r"[\x00-\x1f\x7f]", setting):
            raise error(key, "must be a string without control characters")
        defaults[canonical] = setting
    return MappingProxyType(defaults)


def _provider_settings(
    value: object,
    error: Callable[[str, str], ConfigError],
    base_dir: Path | None,
    remote: bool = False,
) -> Mapping[str, Mapping[str, str]]:
    if not isinstance(value, dict):
        raise error("providers", "must be a table of [providers.NAME] tables")
    providers: dict[str, Mapping[str, str]] = {}
    for provider, settings in value.items():
        if not _PROVIDER_NAME.fullmatch(provider):
            raise error(f"providers.{provider}", "not a valid provider name")
        if not isinstance(settings, dict):
            raise error(f"providers.{provider}", "must be a table of settings")
        resolved: dict[str, str] = {}
        for setting, raw in settings.items():
            key = f"providers.{provider}.{setting}"
            if not isinstance(raw, str):
                raise error(key, "must be a string")
            if remote:
                if re.search(r"[\x00-\x1f\x7f]", raw):
                    raise error(key, "must be a string without control characters")
                resolved[setting] = raw
                continue
            try:
                resolved[setting] = resolve_secret(raw, key, base_dir=base_dir)
            except ConfigError as e:
                raise error(key, e.message) from None
        providers[provider] = MappingProxyType(resolved)
    return MappingProxyType(providers)


@implementer(IAccountStore)
class FileAccountStore:
    """Accounts from a TOML file, checked without ever holding a clear secret.

    ``reactor`` is used for the default thread runner (``deferToThreadPool`` on
    its pool); ``run_in_thread(f)`` may replace it: it must call ``f()`` off
    the reactor thread and return a Deferred of its result (tests pass a
    synchronous one; ``build_service`` may pass one backed by a dedicated pool
    so that hashing never delays the reactor pool's name lookups).  At most
    ``max_concurrent_hashes`` scrypt checks run at once, which bounds memory
    (32 MiB each at the default cost) and keeps threads free for other work.

    A login for a missing account is checked against a decoy hash of the same
    cost, so response time does not tell which usernames exist.  Accounts
    with an API key (``sha256$``) answer faster than password accounts: that
    difference reveals which kind an existing account is, not the secret.
    Usernames are matched exactly (case-sensitive).
    """

    def __init__(
        self,
        path: Path,
        *,
        reactor: Any = None,
        run_in_thread: Callable[[Callable[[], bool]], defer.Deferred[bool]] | None = None,
        max_concurrent_hashes: int = 4,
    ) -> None:
        self._path = Path(path)
        self._reactor = reactor
        self._run_in_thread = run_in_thread or self._defer_to_thread
        self._hashing = defer.DeferredSemaphore(max_concurrent_hashes)
        self._entries: dict[str, AccountEntry] = {}
        self._decoy_password = ""
        self._decoy_cram_md5 = passwords.cram_md5_state(secrets.token_hex(16))
        self._install(load_accounts(self._path))

    @property
    def path(self) -> Path:
        """The accounts file."""
        return self._path

    @property
    def supports_cram_md5(self) -> bool:
        """True when at least one account has a CRAM-MD5 state."""
        return any(entry.cram_md5 for entry in self._entries.values())

    def reload(self) -> None:
        """Re-read the file.  On error the accounts loaded before stay in use and
        :class:`ConfigError` is raised for the caller to report."""
        self._install(load_accounts(self._path))

    def accounts(self) -> tuple[Account, ...]:
        """All accounts, sorted by name."""
        return tuple(self._entries[name].account for name in sorted(self._entries))

    def get(self, name: str) -> Account | None:
        """The account called ``name``, or None."""
        entry = self._entries.get(name)
        return entry.account if entry else None

    def authenticate_password(self, username: str, password: str) -> defer.Deferred[Account]:
        """See :meth:`IAccountStore.authenticate_password`."""
        entry = self._entries.get(username)
        stored = entry.password if entry else self._decoy_password
        check = partial(passwords.verify_secret, stored, password)
        if passwords.hash_scheme(stored) == "sha256":
            verified = defer.succeed(check())
        else:
            verified = self._hashing.run(self._run_in_thread, check)
        return verified.addCallback(_account_if, entry)

    def authenticate_cram_md5(
        self, username: str, challenge: bytes, digest: str
    ) -> defer.Deferred[Account]:
        """See :meth:`IAccountStore.authenticate_cram_md5`."""
        entry = self._entries.get(username)
        stored = entry.cram_md5 if entry and entry.cram_md5 else self._decoy_cram_md5
        ok = passwords.verify_cram_md5(stored, challenge, digest)
        return defer.maybeDeferred(_account_if, ok, entry if entry and entry.cram_md5 else None)

    def _install(self, entries: dict[str, AccountEntry]) -> None:
        # The decoy costs what a real check costs: scrypt if any account uses
        # it, else SHA-256 (a file of API keys only), else default scrypt.
        hashes = [entry.password for entry in entries.values()]
        like = next((h for h in hashes if passwords.hash_scheme(h) == "scrypt"), None)
        self._decoy_password = passwords.decoy_hash(like or next(iter(hashes), None))
        self._entries = entries

    def _defer_to_thread(self, f: Callable[[], bool]) -> defer.Deferred[bool]:
        reactor = self._reactor
        if reactor is None:
            from twisted.internet import reactor
        return threads.deferToThreadPool(reactor, reactor.getThreadPool(), f)


def _account_if(ok: bool, entry: AccountEntry | None) -> Account:
    if not ok or entry is None:
        raise UnauthorizedLogin(_UNAUTHORIZED)
    return entry.account

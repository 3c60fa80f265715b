"""build_service(config, reactor, http_client): the one place where objects meet.

Everything else receives what it needs through its constructor (STYLE.md
"In practice" 1), so tests can wire the same objects to a Clock, a memory
account store or a fake API.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.cred.portal import Portal
from twisted.internet import threads
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from mailgate import message
from mailgate.accounts.account import Account
from mailgate.accounts.filestore import FileAccountStore
from mailgate.accounts.passthrough import PassthroughStore
from mailgate.auth import AccountRealm, AccountStoreChecker
from mailgate.circuit import CircuitPolicy
from mailgate.config import Config, ConfigError, ListenerConfig, ProviderConfig
from mailgate.dispatch import Dispatcher, Route
from mailgate.events import make_event_sink
from mailgate.interfaces import IAccountStore, IDeliverer
from mailgate.providers import registry
from mailgate.ratelimit import AccountRateLimiter, MessageRate, RequestLimits
from mailgate.smtp import SessionPolicy, SMTPSessionFactory
from mailgate.tls import ReloadableContextFactory, ensure_dev_certificate

log = Logger()

# Messages up to this size are parsed on the reactor thread (about a millisecond for a
# typical 4 KB message, ~0.1 s for a crafted worst case of this size); larger ones in
# the thread pool, so that one big message never stalls the other sessions.
PARSE_INLINE_LIMIT = 64 * 1024


def make_parser(reactor: Any) -> Callable[..., Any]:
    """``parse(raw, sender, recipients, defaults)``: inline when small, else in a thread."""

    def parse(raw: bytes, sender: str, recipients: tuple[str, ...], defaults: Any) -> Any:
        if len(raw) <= PARSE_INLINE_LIMIT:
            return message.parse_message(raw, sender, recipients, defaults)
        return threads.deferToThreadPool(
            reactor, reactor.getThreadPool(), message.parse_message, raw, sender, recipients, defaults
        )

    return parse


def build_tls(config: Config) -> ReloadableContextFactory:
    """The listeners' TLS settings; a self-signed development certificate when none is configured."""
    certificate, key = config.tls.certificate, config.tls.private_key
    if certificate is None or key is None:
        certificate, key = ensure_dev_certificate(config.server.state_dir, config.server.hostname)
        log.warn(
            "no [tls] certificate configured: using the self-signed development certificate {path}",
            path=str(certificate),
        )
    return ReloadableContextFactory(certificate, key)


def build_account_store(config: Config) -> IAccountStore:
    accounts = config.accounts
    if accounts.store == "file":
        assert accounts.path is not None
        return FileAccountStore(accounts.path)
    assert accounts.provider is not None
    return PassthroughStore(
        accounts.provider,
        accounts.username_setting,
        accounts.password_settings,
        allowed_senders=accounts.allowed_senders,
    )


def build_routes(config: Config, reactor: Any, http_client: Any) -> dict[str, Route]:
    """One adapter + transport per configured provider, settings checked by key."""
    routes: dict[str, Route] = {}
    for name, provider in config.providers.items():
        kind = registry.lookup(name, provider.type)
        settings = dict(provider.settings)
        unknown = sorted(set(settings) - set(kind.settings))
        if unknown:
            raise ConfigError(f"providers.{name}.{unknown[0]}", "unknown key")
        kind.validate(name, settings)
        transport = kind.transport(settings, reactor, http_client, config.delivery.api_timeout)
        routes[name] = Route(kind.adapter(name, settings), transport, *provider_policies(provider))
    return routes


def provider_policies(provider: ProviderConfig) -> tuple[RequestLimits, CircuitPolicy]:
    """The dispatcher's limits and circuit breaker policy for one provider."""
    limits = RequestLimits(provider.max_concurrency, provider.rate, provider.burst)
    circuit = CircuitPolicy(provider.circuit_failures, provider.circuit_cooldown, provider.circuit_max_cooldown)
    return limits, circuit


def default_message_rate(config: Config) -> MessageRate | None:
    """``[limits] max_messages_per_minute`` (0: unlimited) and its burst."""
    per_minute = config.limits.max_messages_per_minute
    if per_minute == 0:
        return None
    return MessageRate(per_minute, config.limits.message_burst or per_minute)


def check_passthrough(config: Config) -> None:
    """In passthrough mode every credential comes from the SMTP login.

    A credential left in the provider's own settings would be used for logins
    that do not supply it, so any username and password could send with the
    operator's key; refuse such a configuration.
    """
    accounts = config.accounts
    if accounts.store != "passthrough":
        return
    assert accounts.provider is not None
    provider = config.providers[accounts.provider]
    credentials = registry.lookup(provider.name, provider.type).credential_settings
    filled = [(f"accounts.password_settings[{i}]", name) for i, name in enumerate(accounts.password_settings)]
    if accounts.username_setting:
        filled.append(("accounts.username_setting", accounts.username_setting))
    for key, name in filled:
        if name not in credentials:
            raise ConfigError(key, f"must be one of {', '.join(credentials)}")
    for name in credentials:
        if name in provider.settings:
            raise ConfigError(
                f"providers.{provider.name}.{name}",
                "must not be set: with the passthrough store the SMTP login supplies "
                f"the credentials ({', '.join(sorted(name for _, name in filled))})",
            )


def check_accounts(config: Config, store: IAccountStore) -> None:
    """Routes and per-account provider settings must name what the config defines,
    so a typo stops start-up instead of deferring that account's mail forever."""
    listing = getattr(store, "accounts", None)
    if listing is None:
        return
    for account in listing():
        for name in account.route:
            if name not in config.providers:
                raise ConfigError(f"accounts.{account.name}.route", f"no provider named {name!r}")
        for name, settings in account.provider_settings.items():
            if name not in config.providers:
                raise ConfigError(f"accounts.{account.name}.providers.{name}", "no such provider")
            provider = config.providers[name]
            allowed = registry.lookup(name, provider.type).account_settings
            for key in settings:
                if key not in allowed:
                    raise ConfigError(f"accounts.{account.name}.providers.{name}.{key}", "unknown key")


def session_policy(config: Config, listener: ListenerConfig, tls: Any, cram_md5: bool) -> SessionPolicy:
    return SessionPolicy(
        role=listener.role,
        hostname=config.server.hostname,
        tls=tls,
        trusted_networks=listener.trusted_networks,
        limits=config.limits,
        cram_md5=cram_md5,
    )


def listener_factory(
    config: Config,
    listener: ListenerConfig,
    tls: Any,
    portal: Portal,
    deliverer: IDeliverer,
    reactor: Any,
    cram_md5: bool,
    message_rate: AccountRateLimiter | None = None,
) -> Any:
    """The protocol factory for one listener; ``submissions`` is wrapped in TLS (RFC 8314)."""
    factory = SMTPSessionFactory(
        session_policy(config, listener, tls, cram_md5),
        portal,
        deliverer,
        reactor,
        make_parser(reactor),
        trusted_account=Account(name="trusted-networks", route=config.default_route)
        if listener.trusted_networks
        else None,
        message_rate=message_rate,
    )
    if listener.implicit_tls:
        return TLSMemoryBIOFactory(tls, False, factory)
    return factory


def build_service(
    config: Config,
    reactor: Any,
    http_client: Any,
    store: IAccountStore | None = None,
) -> MultiService:
    """Wire listeners, authentication and delivery into one service.

    Raises ConfigError (or TLSConfigError) for anything that makes start-up
    impossible, before a single port is bound.
    """
    check_passthrough(config)
    tls = build_tls(config)
    store = store if store is not None else build_account_store(config)
    check_accounts(config, store)
    portal = Portal(AccountRealm(), [AccountStoreChecker(store)])
    dispatcher = Dispatcher(
        build_routes(config, reactor, http_client),
        config.default_route,
        reactor,
        limit_wait=config.delivery.api_timeout,
    )
    message_rate = AccountRateLimiter(reactor, default_message_rate(config))
    cram_md5 = bool(store.supports_cram_md5)
    top = MultiService()
    for listener in config.listeners:
        try:
            endpoint = serverFromString(reactor, listener.endpoint)
        except (ValueError, TypeError, KeyError) as e:
            index = config.listeners.index(listener)
            raise ConfigError(f"listeners[{index}].endpoint", f"invalid endpoint string: {e}") from None
        factory = listener_factory(config, listener, tls, portal, dispatcher, reactor, cram_md5, message_rate)
        service = StreamServerEndpointService(endpoint, factory)
        service._raiseSynchronously = True  # A port that cannot be bound stops start-up.
        service.setServiceParent(top)
    # After the listeners (their order matches config.listeners): stopping it
    # makes a last attempt, bounded in time, for the events still held.
    events = make_event_sink(config.events, reactor, http_client)
    events.setServiceParent(top)
    top.dispatcher = dispatcher  # type: ignore[attr-defined]
    top.events = events  # type: ignore[attr-defined]
    top.message_rate = message_rate  # type: ignore[attr-defined]
    top.tls = tls  # type: ignore[attr-defined]
    top.account_store = store  # type: ignore[attr-defined]
    return top

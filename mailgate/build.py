"""build_service(config, reactor, http_client): the one place where objects meet.

Everything else receives what it needs through its constructor (STYLE.md
"In practice" 1), so tests can wire the same objects to a Clock, a memory
account store or a fake API.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import MultiService
from twisted.cred.portal import Portal
from twisted.internet import threads
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from mailgate import message
from mailgate.accounts.account import Account, provider_problem
from mailgate.accounts.filestore import FileAccountStore
from mailgate.accounts.httpstore import HTTPAccountStore
from mailgate.accounts.passthrough import PassthroughStore
from mailgate.admin import admin_site, directory_writable
from mailgate.auth import AccountRealm, AccountStoreChecker
from mailgate.circuit import CircuitPolicy
from mailgate.admission import Admission
from mailgate.config import Config, ConfigError, LimitsConfig, ListenerConfig, ProviderConfig, load_config
from mailgate.dispatch import Dispatcher, Route
from mailgate.endpoints import listener_endpoint
from mailgate.events import EventSink, NullEventSink, make_event_sink
from mailgate.interfaces import IAccountStore, IDeliverer
from mailgate.lifecycle import GatewayService
from mailgate.listeners import ListenerService, all_listening, listener_names
from mailgate.metrics import Metrics
from mailgate.modes import ModeDeliverer
from mailgate.providers import registry
from mailgate.providers.providertype import ProviderType
from mailgate.queue import QueueDeliverer, QueueRunner
from mailgate.queuecontrol import ControlService
from mailgate.ratelimit import AccountRateLimiter, MessageRate, RequestLimits
from mailgate.reload import Parts, Reloader
from mailgate.retry import RetryPolicy
from mailgate.smtp import SessionPolicy, SMTPSessionFactory
from mailgate.spool import Spool, SpoolLocked
from mailgate.spoolwriter import ProcessSpoolWriter
from mailgate.tls import (
    ReloadableContextFactory,
    TLSConfigError,
    ensure_dev_certificate,
    trust_root_from_file,
)
from mailgate.transports import TreqTransport, make_http_client

log = Logger()

# Messages up to this size are parsed on the reactor thread (about a millisecond for a
# typical 4 KB message); larger ones in the thread pool, so that one big message never
# stalls the other sessions.  The stdlib's header parsers cost up to ~25 us per octet
# for crafted headers (commented address lists, encoded words), so a crafted message
# of this size stalls the reactor for at most ~0.2 s (measured; tests/adversarial).
PARSE_INLINE_LIMIT = 8 * 1024


def mime_limits(limits: LimitsConfig) -> message.MimeLimits:
    return message.MimeLimits(
        max_depth=limits.max_mime_depth,
        max_parts=limits.max_mime_parts,
        max_header_size=limits.max_header_size,
        max_header_count=limits.max_header_count,
        max_addresses_per_header=limits.max_addresses_per_header,
    )


def make_parser(reactor: Any, limits: message.MimeLimits = message.DEFAULT_LIMITS) -> Callable[..., Any]:
    """``parse(raw, sender, recipients, defaults)``: inline when small, else in a thread."""

    def parse(raw: bytes, sender: str, recipients: tuple[str, ...], defaults: Any) -> Any:
        if len(raw) <= PARSE_INLINE_LIMIT:
            return message.parse_message(raw, sender, recipients, defaults, limits)
        return threads.deferToThreadPool(
            reactor, reactor.getThreadPool(), message.parse_message, raw, sender, recipients, defaults, limits
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


def build_account_store(config: Config, reactor: Any = None, http_client: Any = None) -> IAccountStore:
    accounts = config.accounts
    if accounts.store == "file":
        assert accounts.path is not None
        return FileAccountStore(accounts.path)
    if accounts.store == "http":
        return build_http_store(config, reactor, http_client)
    assert accounts.provider is not None
    return PassthroughStore(
        accounts.provider,
        accounts.username_setting,
        accounts.password_settings,
        allowed_senders=accounts.allowed_senders,
    )


def build_http_store(config: Config, reactor: Any, http_client: Any) -> HTTPAccountStore:
    """The ``http`` store on the shared treq client (its own client for a private CA)."""
    accounts = config.accounts
    assert accounts.url is not None
    if accounts.ca_file is not None:
        try:
            trust_root = trust_root_from_file(accounts.ca_file)
        except TLSConfigError as e:
            raise ConfigError("accounts.ca_file", str(e)) from None
        http_client, _ = make_http_client(reactor, accounts.timeout, trust_root)
    basic = (accounts.username, accounts.password) if accounts.username and accounts.password else None
    return HTTPAccountStore(
        accounts.url,
        TreqTransport(http_client, reactor, accounts.timeout),
        reactor,
        providers=provider_account_settings(config),
        token=accounts.token,
        basic_auth=basic,
        success_ttl=accounts.success_ttl,
        failure_ttl=accounts.failure_ttl,
        cache_size=accounts.cache_size,
    )


def build_routes(config: Config, reactor: Any, http_client: Any) -> dict[str, Route]:
    """One adapter + transport per configured provider, settings checked by key."""
    return {
        name: build_route(provider, reactor, http_client, config.delivery.api_timeout)
        for name, provider in config.providers.items()
    }


def provider_settings(provider: ProviderConfig) -> tuple[ProviderType, dict[str, Any]]:
    """The provider's type and its validated settings (defaults filled); ConfigError naming the key."""
    kind = registry.lookup(provider.name, provider.type)
    settings = dict(provider.settings)
    unknown = sorted(set(settings) - set(kind.settings))
    if unknown:
        raise ConfigError(f"providers.{provider.name}.{unknown[0]}", "unknown key")
    kind.validate(provider.name, settings)
    return kind, settings


def build_route(provider: ProviderConfig, reactor: Any, http_client: Any, api_timeout: float) -> Route:
    kind, settings = provider_settings(provider)
    transport = kind.transport(settings, reactor, http_client, api_timeout)
    return Route(kind.adapter(provider.name, settings), transport, *provider_policies(provider))


def provider_policies(provider: ProviderConfig) -> tuple[RequestLimits, CircuitPolicy]:
    """The dispatcher's limits and circuit breaker policy for one provider."""
    limits = RequestLimits(provider.max_concurrency, provider.rate, provider.burst)
    circuit = CircuitPolicy(provider.circuit_failures, provider.circuit_cooldown, provider.circuit_max_cooldown)
    return limits, circuit


def default_message_rate(limits: LimitsConfig) -> MessageRate | None:
    """``[limits] max_messages_per_minute`` (0: unlimited) and its burst."""
    per_minute = limits.max_messages_per_minute
    if per_minute == 0:
        return None
    return MessageRate(per_minute, limits.message_burst or per_minute)


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


def provider_account_settings(config: Config) -> dict[str, tuple[str, ...]]:
    """Each configured provider's name and the settings an account may give it."""
    return {
        name: registry.lookup(name, provider.type).account_settings
        for name, provider in config.providers.items()
    }


def check_accounts(config: Config, store: IAccountStore) -> None:
    """Routes and per-account provider settings must name what the config defines,
    so a typo stops start-up instead of deferring that account's mail forever."""
    listing = getattr(store, "accounts", None)
    if listing is None:
        return
    allowed = provider_account_settings(config)
    for account in listing():
        problem = provider_problem(account, allowed)
        if problem is not None:
            raise ConfigError(f"accounts.{account.name}.{problem[0]}", problem[1])


def session_policy(
    config: Config, listener: ListenerConfig, tls: Any, cram_md5: bool, name: str = ""
) -> SessionPolicy:
    return SessionPolicy(
        role=listener.role,
        hostname=config.server.hostname,
        tls=tls,
        trusted_networks=listener.trusted_networks,
        limits=config.limits,
        cram_md5=cram_md5,
        listener=name or listener.role,
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
    name: str = "",
    metrics: Metrics | None = None,
    admission: Admission | None = None,
    route_recipient_limit: Callable[[Account], int | None] | None = None,
) -> Any:
    """The protocol factory for one listener; ``submissions`` is wrapped in TLS (RFC 8314)."""
    factory = SMTPSessionFactory(
        session_policy(config, listener, tls, cram_md5, name),
        portal,
        deliverer,
        reactor,
        make_parser(reactor, mime_limits(config.limits)),
        trusted_account=Account(name="trusted-networks", route=config.default_route)
        if listener.trusted_networks
        else None,
        message_rate=message_rate,
        metrics=metrics,
        admission=admission,
        route_recipient_limit=route_recipient_limit,
    )
    if listener.implicit_tls:
        return TLSMemoryBIOFactory(tls, False, factory)
    return factory


def build_parts(
    config: Config, reactor: Any, http_client: Any, store: IAccountStore | None = None
) -> Parts:
    """What start-up and every reload build from a configuration, checked together."""
    check_passthrough(config)
    tls = build_tls(config)
    store = store if store is not None else build_account_store(config, reactor, http_client)
    check_accounts(config, store)
    return Parts(tls=tls, store=store, routes=build_routes(config, reactor, http_client))


def endpoint_from(reactor: Any, description: str, key: str) -> Any:
    try:
        return listener_endpoint(reactor, description)
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(key, f"invalid endpoint string: {e}") from None


def in_thread_pool(reactor: Any) -> Callable[..., Any]:
    """``run_in_thread(f, *args)`` on the reactor's thread pool (blocking spool I/O)."""

    def run(f: Callable[..., Any], *args: Any) -> Any:
        return threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

    return run


# How long start-up waits for the spool lock: the spool writer process of a
# server that was just killed may still be finishing its last batch.
SPOOL_LOCK_WAIT = 5.0


def build_queue(
    config: Config, reactor: Any, dispatcher: Dispatcher, events: EventSink | NullEventSink | None = None
) -> tuple[Spool, QueueRunner, QueueDeliverer]:
    """The spool under ``state_dir/queue``, locked for this process, its runner and
    queue mode's deliverer.  Built whatever the configured mode: a queue left by
    an earlier run in queue mode is delivered after a switch to sync mode too."""
    spool = Spool(config.server.state_dir / "queue")
    try:
        spool.lock(wait=SPOOL_LOCK_WAIT)
    except SpoolLocked as e:
        raise ConfigError("server.state_dir", str(e)) from None
    except OSError:
        pass  # No state directory yet: the queue opens it when it appears (QueueRunner).
    queue = config.queue
    run_in_thread = in_thread_pool(reactor)
    writer = ProcessSpoolWriter(spool, reactor)
    runner = QueueRunner(
        spool,
        dispatcher,
        reactor,
        RetryPolicy(first_retry=queue.first_retry, max_retry_interval=queue.max_retry_interval, lifetime=queue.lifetime),
        hostname=config.server.hostname,
        parse=make_parser(reactor, message.STORED_MESSAGE_LIMITS),
        run_in_thread=run_in_thread,
        events=events,
        max_in_flight=queue.max_in_flight,
        shutdown_grace=config.server.shutdown_grace,
        writer=writer,
    )
    deliverer = QueueDeliverer(spool, runner, reactor, refusal=dispatcher.refusal, run_in_thread=run_in_thread)
    return spool, runner, deliverer


def build_service(
    config: Config,
    reactor: Any,
    http_client: Any,
    store: IAccountStore | None = None,
    load: Callable[[], Config] | None = None,
) -> MultiService:
    """Wire listeners, authentication and delivery into one service.

    Raises ConfigError (or TLSConfigError) for anything that makes start-up
    impossible, before a single port is bound.  ``load`` reads the configuration
    again for a reload (default: the file it came from); a ``store`` given here
    is kept across reloads.
    """
    injected_store = store

    def prepare(config: Config) -> Parts:
        return build_parts(config, reactor, http_client, injected_store)

    parts = prepare(config)
    tls, store = parts.tls, parts.store
    metrics = Metrics()
    checker = AccountStoreChecker(store)
    portal = Portal(AccountRealm(), [checker])
    dispatcher = Dispatcher(
        parts.routes,
        config.default_route,
        reactor,
        limit_wait=config.delivery.api_timeout,
        metrics=metrics,
    )
    message_rate = AccountRateLimiter(reactor, default_message_rate(config.limits))
    cram_md5 = bool(store.supports_cram_md5)
    names = listener_names(config.listeners)
    metrics.declare(names, config.providers)
    admission = Admission(config.limits, reactor)  # One for all listeners: limits are per process.
    endpoints = [
        endpoint_from(reactor, listener.endpoint, f"listeners[{index}].endpoint")
        for index, listener in enumerate(config.listeners)
    ]
    # The events sink outlives the queue at shutdown (GatewayService stops it
    # last): the queue's last outcomes are reported, and its own stop makes a
    # last, bounded attempt for the events still held.
    events = make_event_sink(config.events, reactor, http_client)
    spool, runner, queue_deliverer = build_queue(config, reactor, dispatcher, events)
    top = GatewayService(reactor, config.server.shutdown_grace)
    listeners, smtp_factories = [], []
    for listener, name, endpoint in zip(config.listeners, names, endpoints, strict=True):
        deliverer = ModeDeliverer(
            listener.mode or config.delivery.mode, {"sync": dispatcher, "queue": queue_deliverer}
        )
        factory = listener_factory(
            config, listener, tls, portal, deliverer, reactor, cram_md5, message_rate, name, metrics, admission,
            route_recipient_limit=dispatcher.recipient_limit,
        )
        smtp_factories.append(getattr(factory, "wrappedFactory", factory))
        service = ListenerService(name, endpoint, factory)
        service.setServiceParent(top)
        listeners.append(service)
    top.listeners.extend(listeners)
    top.factories.extend(smtp_factories)
    runner.setServiceParent(top)
    top.early.append(runner)
    queue_deliverer.writer.setServiceParent(top)  # Stops after the sessions and the queue.
    ControlService(runner, spool.control_path, reactor).setServiceParent(top)
    events.setServiceParent(top)
    # /readyz.
    def state_dir_ready() -> Any:
        # Opening the spool (lock, recovery) and the write probe touch the disk:
        # both run in the thread pool, never on the reactor thread at every probe.
        def writable(opened: bool) -> Any:
            if not (opened and queue_deliverer.writer.usable):  # no spool writer process runs
                return False
            return runner.run_in_thread(directory_writable, spool.tmp)

        return runner.open_spool().addCallback(writable)

    readiness = {
        "listeners": lambda: all_listening(listeners),
        "state_dir": state_dir_ready,
        "routes": lambda: any(dispatcher.usable(name) for name in dispatcher.default_route),
    }
    if config.admin.endpoint is not None:
        site = admin_site(readiness, metrics.registry, config.admin.token)
        ListenerService("admin", endpoint_from(reactor, config.admin.endpoint, "admin.endpoint"), site).setServiceParent(top)
    if load is None:
        source = config.source
        load = (lambda: load_config(source)) if source is not None else (lambda: config)
    top.queue = runner  # type: ignore[attr-defined]
    top.spool_writer = queue_deliverer.writer  # type: ignore[attr-defined]
    top.dispatcher = dispatcher  # type: ignore[attr-defined]
    top.events = events  # type: ignore[attr-defined]
    top.message_rate = message_rate  # type: ignore[attr-defined]
    top.tls = tls  # type: ignore[attr-defined]
    top.account_store = store  # type: ignore[attr-defined]
    top.metrics = metrics  # type: ignore[attr-defined]
    top.readiness = readiness  # type: ignore[attr-defined]
    top.listeners_up = lambda: all_listening(listeners)  # type: ignore[attr-defined]

    def apply_limits(limits: LimitsConfig) -> None:
        """Reloaded [limits] for new sessions (the Reloader updates their policies)."""
        admission.reconfigure(limits)
        message_rate.default = default_message_rate(limits)
        parse = make_parser(reactor, mime_limits(limits))
        for factory in smtp_factories:
            factory.parse = parse

    top.reloader = Reloader(  # type: ignore[attr-defined]
        config, load, prepare, tls, checker, dispatcher, smtp_factories, metrics, apply_limits=apply_limits
    )
    top.admission = admission  # type: ignore[attr-defined]
    return top

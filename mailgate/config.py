"""mailgate.toml -> frozen, typed configuration objects.

One TOML file (stdlib :mod:`tomllib`).  Every value is validated at start-up;
an error names the offending key (``listeners[1].role: must be one of ...``)
and stops start-up without a traceback.  Unknown keys are errors too, so a
typo never silently falls back to a default.  Every key is documented in
``etc/mailgate.toml.example``.
"""

from __future__ import annotations

import ipaddress
import math
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from mailgate.configvalues import ConfigError, is_loopback_host, parse_duration, parse_size, resolve_secret
from mailgate.providers.registry import TYPE_NAMES, TYPES

__all__ = [
    "AccountsConfig",
    "AdminConfig",
    "Config",
    "ConfigError",
    "DeliveryConfig",
    "EventsConfig",
    "LimitsConfig",
    "ListenerConfig",
    "ProviderConfig",
    "QueueConfig",
    "ServerConfig",
    "TLSConfig",
    "load_config",
    "parse_config",
]

ROLES = ("relay", "submission", "submissions")
DELIVERY_MODES = ("sync", "queue")
LINE_ENDING_POLICIES = ("reject", "normalize")
ACCOUNT_STORES = ("file", "passthrough", "http")
# Keys of [accounts] that only the http store reads.
HTTP_STORE_KEYS = (
    "url", "token", "username", "password", "ca_file", "timeout", "success_ttl", "failure_ttl", "cache_size",
)  # fmt: skip

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
LOOPBACK_NETWORKS = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


@dataclass(frozen=True)
class ServerConfig:
    hostname: str
    state_dir: Path
    # Seconds a stopping server (SIGTERM) waits for sessions in DATA and for
    # deliveries in progress before it exits anyway.
    shutdown_grace: float = 30.0


@dataclass(frozen=True)
class TLSConfig:
    """Certificate chain and key; both None means "generate a development certificate"."""

    certificate: Path | None = None
    private_key: Path | None = None


@dataclass(frozen=True)
class ListenerConfig:
    endpoint: str
    role: str
    trusted_networks: tuple[Network, ...] = ()
    mode: str | None = None

    @property
    def implicit_tls(self) -> bool:
        """RFC 8314 §3.3: the submissions port speaks TLS from the first byte."""
        return self.role == "submissions"


@dataclass(frozen=True)
class DeliveryConfig:
    mode: str = "sync"
    route: tuple[str, ...] = ()
    api_timeout: float = 30.0


@dataclass(frozen=True)
class QueueConfig:
    """Queue mode: retry timing (:class:`mailgate.retry.RetryPolicy`) and concurrency."""

    first_retry: float = 60.0
    max_retry_interval: float = 3600.0
    lifetime: float = 5 * 86400.0
    max_in_flight: int = 32


@dataclass(frozen=True)
class LimitsConfig:
    """Session and message limits (RFC 5321 §4.5.3 sizes, §4.5.3.2 timeouts)."""

    max_message_size: int = 10 * 1024 * 1024
    max_recipients: int = 50
    line_endings: str = "reject"
    command_timeout: float = 300.0
    data_timeout: float = 600.0
    tls_handshake_timeout: float = 30.0
    session_lifetime: float = 3600.0
    max_errors: int = 10
    max_auth_failures: int = 3
    auth_failure_delay: float = 1.0
    # Messages per minute per account (0: unlimited) and the burst allowed
    # (None: the per-minute figure); accounts may set their own.
    max_messages_per_minute: int = 0
    message_burst: int | None = None
    max_junk_commands: int = 100
    # Admission control across sessions (mailgate.admission).
    max_sessions: int = 500
    max_deliveries_in_flight: int = 100
    max_connections_per_ip: int = 20
    max_connection_rate_per_ip: int = 120
    max_auth_failures_per_ip: int = 10
    auth_failure_window: float = 900.0
    exempt_networks: tuple[Network, ...] = LOOPBACK_NETWORKS
    # The IPv6 prefix one client is counted by (RFC 6177: a site gets a /48 to /64).
    ipv6_client_prefix: int = 64
    # MIME structure (mailgate.message.MimeLimits).
    max_mime_depth: int = 32
    max_mime_parts: int = 1000
    max_header_size: int = 256 * 1024
    max_header_count: int = 500
    max_addresses_per_header: int = 1000


@dataclass(frozen=True)
class AccountsConfig:
    store: str = "file"
    path: Path | None = None
    # passthrough store
    provider: str | None = None
    username_setting: str = ""
    password_settings: tuple[str, ...] = ()
    allowed_senders: tuple[str, ...] = ()
    # http store: the endpoint, mailgate's credentials for it, and the cache
    url: str | None = None
    token: str | None = field(default=None, repr=False)
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: Path | None = None
    timeout: float = 10.0
    success_ttl: float = 300.0
    failure_ttl: float = 60.0
    cache_size: int = 10_000


@dataclass(frozen=True)
class ProviderConfig:
    """One ``[providers.NAME]`` table: the adapter's settings, and the
    dispatcher's limits and circuit breaker for it (see :mod:`mailgate.ratelimit`
    and :mod:`mailgate.circuit`)."""

    name: str
    type: str
    settings: Mapping[str, Any] = field(repr=False, default_factory=dict)
    max_concurrency: int = 32
    rate: float | None = None
    burst: int | None = None
    circuit_failures: int = 5
    circuit_cooldown: float = 30.0
    circuit_max_cooldown: float = 600.0


@dataclass(frozen=True)
class EventsConfig:
    """The events webhook (:mod:`mailgate.events`): where delivery events are POSTed."""

    url: str
    token: str | None = field(default=None, repr=False)
    signing_secret: str | None = field(default=None, repr=False)
    timeout: float = 10.0
    buffer_size: int = 10_000
    max_attempts: int = 5


@dataclass(frozen=True)
class AdminConfig:
    """The admin HTTP listener (/healthz, /readyz, /metrics); no endpoint, no listener."""

    endpoint: str | None = None
    token: str | None = field(default=None, repr=False)  # Bearer token required when set.


# RFC 6750 §2.1 b64token: what an Authorization: Bearer header can carry.
_BEARER_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


@dataclass(frozen=True)
class Config:
    server: ServerConfig
    tls: TLSConfig
    listeners: tuple[ListenerConfig, ...]
    delivery: DeliveryConfig
    limits: LimitsConfig
    accounts: AccountsConfig
    providers: Mapping[str, ProviderConfig]
    events: EventsConfig | None = None
    source: Path | None = None
    admin: AdminConfig = AdminConfig()
    queue: QueueConfig = QueueConfig()

    @property
    def default_route(self) -> tuple[str, ...]:
        return self.delivery.route or tuple(self.providers)


def load_config(path: Path) -> Config:
    """Read and validate the TOML file at ``path``."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError("--config", f"{path}: no such file") from None
    except OSError as e:
        raise ConfigError("--config", f"{path}: {e.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError("--config", f"{path}: not valid TOML: {e}") from None
    return parse_config(data, base_dir=path.parent.resolve(), source=path)


_KIND_NAMES = {str: "a string", int: "an integer", float: "a number", list: "a list", dict: "a table"}
_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")


class _Table:
    """A TOML table being consumed: typed getters that name the key on error."""

    def __init__(self, data: Any, key: str):
        if not isinstance(data, dict):
            raise ConfigError(key, "must be a table")
        self.data = dict(data)
        self.key = key

    def _path(self, name: str) -> str:
        return f"{self.key}.{name}" if self.key else name

    def take(self, name: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
        if name not in self.data:
            return default
        value = self.data.pop(name)
        if isinstance(value, bool) and kind in (int, float, (int, float)):
            raise ConfigError(self._path(name), "must be a number")
        if not isinstance(value, kind):
            kinds = (kind,) if isinstance(kind, type) else kind
            names = " or ".join(_KIND_NAMES.get(k, k.__name__) for k in kinds)
            raise ConfigError(self._path(name), f"must be {names}")
        return value

    def string(self, name: str, default: str | None = None, choices: tuple[str, ...] = ()) -> Any:
        value = self.take(name, str, default)
        if value is not None and choices and value not in choices:
            raise ConfigError(self._path(name), f"must be one of {', '.join(choices)}")
        return value

    def positive(self, name: str, default: float | None, integer: bool = False) -> Any:
        value = self.take(name, int if integer else (int, float), default)
        if value is not None and (not math.isfinite(value) or value <= 0):
            raise ConfigError(self._path(name), "must be a finite number greater than zero")
        return value

    def count(self, name: str, default: int) -> int:
        """An integer, zero or more."""
        value: int = self.take(name, int, default)
        if value < 0:
            raise ConfigError(self._path(name), "must be zero or a positive integer")
        return value

    def strings(self, name: str) -> tuple[str, ...]:
        value = self.take(name, list, [])
        for index, item in enumerate(value):
            if not isinstance(item, str):
                raise ConfigError(f"{self._path(name)}[{index}]", "must be a string")
        return tuple(value)

    def table(self, name: str) -> _Table:
        return _Table(self.data.pop(name, {}), self._path(name))

    def path(self, name: str, base_dir: Path, default: Path | None = None) -> Path | None:
        value = self.take(name, str)
        if value is None:
            return default
        return (base_dir / Path(value).expanduser()).resolve()

    def finish(self) -> None:
        """Unknown keys are errors: a typo must not silently become a default."""
        for name in self.data:
            raise ConfigError(self._path(name), "unknown key")


def parse_config(data: Mapping[str, Any], base_dir: Path, source: Path | None = None) -> Config:
    """Validate already-parsed TOML data; relative paths are resolved against ``base_dir``."""
    top = _Table(data, "")

    server_t = top.table("server")
    hostname = server_t.string("hostname", socket.getfqdn())
    if not _HOSTNAME.fullmatch(hostname):
        # It appears in the greeting, EHLO reply and Received headers.
        raise ConfigError("server.hostname", "must be a domain name (letters, digits, dots, hyphens)")
    server = ServerConfig(
        hostname=hostname,
        state_dir=server_t.path("state_dir", base_dir, base_dir / "mailgate-state"),  # type: ignore[arg-type]
        shutdown_grace=parse_duration(server_t.take("shutdown_grace", (int, float, str), 30.0), "server.shutdown_grace"),
    )
    server_t.finish()

    tls_t = top.table("tls")
    tls = TLSConfig(
        certificate=tls_t.path("certificate", base_dir),
        private_key=tls_t.path("private_key", base_dir),
    )
    if (tls.certificate is None) != (tls.private_key is None):
        missing = "tls.private_key" if tls.private_key is None else "tls.certificate"
        raise ConfigError(missing, "certificate and private_key must be given together")
    tls_t.finish()

    listeners_data = top.take("listeners", list, [])
    if not listeners_data:
        raise ConfigError("listeners", "at least one [[listeners]] entry is required")
    listeners = tuple(_listener(item, f"listeners[{index}]") for index, item in enumerate(listeners_data))

    delivery_t = top.table("delivery")
    delivery = DeliveryConfig(
        mode=delivery_t.string("mode", "sync", DELIVERY_MODES),
        route=delivery_t.strings("route"),
        api_timeout=float(delivery_t.positive("api_timeout", 30.0)),
    )
    delivery_t.finish()

    queue_t = top.table("queue")
    queue_defaults = QueueConfig()

    def duration(name: str, default: float) -> float:
        return parse_duration(queue_t.take(name, (int, float, str), default), f"queue.{name}")

    queue = QueueConfig(
        first_retry=duration("first_retry", queue_defaults.first_retry),
        max_retry_interval=duration("max_retry_interval", queue_defaults.max_retry_interval),
        lifetime=duration("lifetime", queue_defaults.lifetime),
        max_in_flight=queue_t.positive("max_in_flight", queue_defaults.max_in_flight, integer=True),
    )
    queue_t.finish()
    if queue.max_retry_interval < queue.first_retry:
        raise ConfigError("queue.max_retry_interval", "must not be shorter than queue.first_retry")

    limits_t = top.table("limits")
    size = limits_t.take("max_message_size", (int, str), 10 * 1024 * 1024)
    defaults = LimitsConfig()
    limits = LimitsConfig(
        max_message_size=parse_size(size, "limits.max_message_size"),
        max_recipients=limits_t.positive("max_recipients", defaults.max_recipients, integer=True),
        line_endings=limits_t.string("line_endings", defaults.line_endings, LINE_ENDING_POLICIES),
        command_timeout=float(limits_t.positive("command_timeout", defaults.command_timeout)),
        data_timeout=float(limits_t.positive("data_timeout", defaults.data_timeout)),
        tls_handshake_timeout=float(
            limits_t.positive("tls_handshake_timeout", defaults.tls_handshake_timeout)
        ),
        session_lifetime=float(limits_t.positive("session_lifetime", defaults.session_lifetime)),
        max_errors=limits_t.positive("max_errors", defaults.max_errors, integer=True),
        max_auth_failures=limits_t.positive(
            "max_auth_failures", defaults.max_auth_failures, integer=True
        ),
        auth_failure_delay=float(limits_t.take("auth_failure_delay", (int, float), 1.0)),
        max_messages_per_minute=limits_t.count("max_messages_per_minute", defaults.max_messages_per_minute),
        message_burst=limits_t.positive("message_burst", None, integer=True),
        **_admission_and_mime_limits(limits_t, defaults),
    )
    if not math.isfinite(limits.auth_failure_delay) or limits.auth_failure_delay < 0:
        raise ConfigError("limits.auth_failure_delay", "must be a finite number, not negative")
    limits_t.finish()

    providers_t = top.table("providers")
    providers: dict[str, ProviderConfig] = {}
    for name in list(providers_t.data):
        providers[name] = _provider(name, providers_t.table(name), base_dir, server.hostname)
    if not providers:
        raise ConfigError("providers", "at least one [providers.NAME] table is required")
    for index, name in enumerate(delivery.route):
        if name not in providers:
            raise ConfigError(f"delivery.route[{index}]", f"no provider named {name!r}")

    accounts_t = top.table("accounts")
    store = accounts_t.string("store", "file", ACCOUNT_STORES)
    if store != "http":
        for key in HTTP_STORE_KEYS:
            if key in accounts_t.data:
                raise ConfigError(f"accounts.{key}", 'only used with store = "http"')
    accounts = AccountsConfig(
        store=store,
        path=accounts_t.path("path", base_dir),
        provider=accounts_t.string("provider"),
        username_setting=accounts_t.string("username_setting", ""),
        password_settings=accounts_t.strings("password_settings"),
        allowed_senders=accounts_t.strings("allowed_senders"),
        **(_http_store(accounts_t, base_dir) if store == "http" else {}),
    )
    accounts_t.finish()
    if accounts.store == "file" and accounts.path is None:
        raise ConfigError("accounts.path", "required when accounts.store is \"file\"")
    if accounts.store == "passthrough":
        if accounts.provider not in providers:
            raise ConfigError("accounts.provider", "must name a configured provider")
        if not accounts.password_settings:
            raise ConfigError("accounts.password_settings", "required for the passthrough store")

    events = _events(top.data.pop("events", None), base_dir)
    admin = _admin(top.table("admin"), base_dir)

    top.finish()
    return Config(
        server=server,
        tls=tls,
        listeners=listeners,
        delivery=delivery,
        limits=limits,
        accounts=accounts,
        providers=MappingProxyType(providers),
        events=events,
        source=source,
        admin=admin,
        queue=queue,
    )


def _admin(table: _Table, base_dir: Path) -> AdminConfig:
    endpoint = table.string("endpoint")
    if endpoint == "":
        raise ConfigError("admin.endpoint", 'must be a Twisted endpoint string, e.g. "tcp:9025:interface=127.0.0.1"')
    token = table.string("token")
    if token is not None:
        token = resolve_secret(token, "admin.token", base_dir=base_dir)
        if not _BEARER_TOKEN.fullmatch(token):
            raise ConfigError("admin.token", "must be letters, digits and - . _ ~ + / (an RFC 6750 bearer token)")
        if endpoint is None:
            raise ConfigError("admin.token", "needs admin.endpoint")
    table.finish()
    return AdminConfig(endpoint=endpoint, token=token)


def _http_store(table: _Table, base_dir: Path) -> dict[str, Any]:
    """The [accounts] keys of the http store (mailgate.accounts.httpstore)."""
    url = table.string("url")
    if url is None:
        raise ConfigError("accounts.url", 'required for store = "http": the HTTPS URL of the endpoint')
    host = urlsplit(url).hostname or ""
    if not url.startswith("https://") and not (url.startswith("http://") and is_loopback_host(host)):
        raise ConfigError("accounts.url", "must be an https:// URL (http:// only to a loopback address)")
    token, password = (
        resolve_secret(value, f"accounts.{key}") if value is not None else None
        for key, value in (("token", table.string("token")), ("password", table.string("password")))
    )
    username = table.string("username")
    if (username is None) != (password is None):
        raise ConfigError("accounts.password" if password is None else "accounts.username",
                          "username and password (HTTP Basic) must be set together")
    if token is not None and username is not None:
        raise ConfigError("accounts.token", "use either token or username/password, not both")
    ttls = {}
    for key, default in (("success_ttl", 300.0), ("failure_ttl", 60.0)):
        value = table.take(key, (int, float), default)
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"accounts.{key}", "must be a finite number of seconds, 0 or more")
        ttls[key] = float(value)
    return {
        "url": url,
        "token": token,
        "username": username,
        "password": password,
        "ca_file": table.path("ca_file", base_dir),
        "timeout": float(table.positive("timeout", 10.0)),
        "cache_size": table.positive("cache_size", 10_000, integer=True),
        **ttls,
    }


def _admission_and_mime_limits(table: _Table, defaults: LimitsConfig) -> dict[str, Any]:
    """The [limits] keys of the adversarial-hardening issue (README.rst "Defences and limits")."""
    counts = (
        "max_junk_commands",
        "max_sessions",
        "max_deliveries_in_flight",
        "max_connections_per_ip",
        "max_connection_rate_per_ip",
        "max_auth_failures_per_ip",
        "max_mime_depth",
        "max_mime_parts",
        "max_header_count",
        "max_addresses_per_header",
    )
    values: dict[str, Any] = {
        name: table.positive(name, getattr(defaults, name), integer=True) for name in counts
    }
    values["auth_failure_window"] = float(
        table.positive("auth_failure_window", defaults.auth_failure_window)
    )
    header_size = table.take("max_header_size", (int, str), defaults.max_header_size)
    values["max_header_size"] = parse_size(header_size, "limits.max_header_size")
    if "exempt_networks" in table.data:
        values["exempt_networks"] = _networks(table, "exempt_networks")
    prefix = table.take("ipv6_client_prefix", int, defaults.ipv6_client_prefix)
    if not 32 <= prefix <= 128:
        raise ConfigError("limits.ipv6_client_prefix", "must be a prefix length from 32 to 128")
    values["ipv6_client_prefix"] = prefix
    return values


def _networks(table: _Table, name: str) -> tuple[Network, ...]:
    networks = []
    for index, text in enumerate(table.strings(name)):
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise ConfigError(f"{table._path(name)}[{index}]", f"not a network: {text!r}") from None
    return tuple(networks)


def _listener(data: Any, key: str) -> ListenerConfig:
    table = _Table(data, key)
    endpoint = table.string("endpoint")
    if not endpoint:
        raise ConfigError(f"{key}.endpoint", "required (a Twisted endpoint string, e.g. \"tcp:587\")")
    role = table.string("role", None, ROLES)
    if role is None:
        raise ConfigError(f"{key}.role", f"required: one of {', '.join(ROLES)}")
    networks = _networks(table, "trusted_networks")
    if networks and role != "relay":
        raise ConfigError(f"{key}.trusted_networks", "only a relay listener accepts unauthenticated mail")
    listener = ListenerConfig(
        endpoint=endpoint,
        role=role,
        trusted_networks=networks,
        mode=table.string("mode", None, DELIVERY_MODES),
    )
    table.finish()
    return listener


def _provider(name: str, table: _Table, base_dir: Path, hostname: str) -> ProviderConfig:
    kind = table.string("type", None, TYPE_NAMES)
    if kind is None:
        raise ConfigError(f"providers.{name}.type", f"required: one of {', '.join(TYPE_NAMES)}")
    # The dispatcher's keys first; everything left is the adapter's.
    defaults = ProviderConfig(name, kind)
    dispatch = {
        "max_concurrency": table.positive("max_concurrency", defaults.max_concurrency, integer=True),
        "rate": table.positive("rate", None),
        "burst": table.positive("burst", None, integer=True),
        "circuit_failures": table.positive("circuit_failures", defaults.circuit_failures, integer=True),
        "circuit_cooldown": float(table.positive("circuit_cooldown", defaults.circuit_cooldown)),
        "circuit_max_cooldown": float(
            table.positive("circuit_max_cooldown", defaults.circuit_max_cooldown)
        ),
    }
    if dispatch["rate"] is not None:
        dispatch["rate"] = float(dispatch["rate"])
    elif dispatch["burst"] is not None:
        raise ConfigError(f"providers.{name}.burst", "needs rate (requests per second)")
    if dispatch["circuit_max_cooldown"] < dispatch["circuit_cooldown"]:
        raise ConfigError(f"providers.{name}.circuit_max_cooldown", "must be at least circuit_cooldown")
    settings: dict[str, Any] = {}
    for key in list(table.data):
        value = table.data.pop(key)
        full = f"providers.{name}.{key}"
        if isinstance(value, str):
            value = resolve_secret(value, full)
        elif not isinstance(value, int | float | bool | list):
            raise ConfigError(full, "must be a string, number, boolean or list")
        settings[key] = value
    for key in TYPES[kind].path_settings:
        if isinstance(settings.get(key), str):
            settings[key] = str((base_dir / Path(settings[key]).expanduser()).resolve())
    if "helo" in TYPES[kind].settings:
        settings.setdefault("helo", hostname)  # SMTP providers introduce themselves as this server
    if kind == "capture":
        folder = settings.get("folder", "captured")
        if not isinstance(folder, str):
            raise ConfigError(f"providers.{name}.folder", "must be a string")
        settings["folder"] = str((base_dir / Path(folder).expanduser()).resolve())
    return ProviderConfig(name=name, type=kind, settings=MappingProxyType(settings), **dispatch)


def _events(data: Any, base_dir: Path) -> EventsConfig | None:
    """``[events]``: absent means no events webhook."""
    if data is None:
        return None
    table = _Table(data, "events")
    url = table.string("url")
    if not url:
        raise ConfigError("events.url", "required: the URL delivery events are POSTed to")
    if not url.startswith(("https://", "http://")):
        raise ConfigError("events.url", "must be an http:// or https:// URL")
    token = table.string("token")
    if token:
        token = resolve_secret(token, "events.token", base_dir=base_dir)
        if not re.fullmatch(r"[!-~]+", token):
            # It goes into an HTTP header: printable ASCII, no spaces or line breaks.
            raise ConfigError("events.token", "must be printable ASCII without spaces")
    secret = table.string("signing_secret")
    defaults = EventsConfig(url)
    events = EventsConfig(
        url=url,
        token=token or None,
        signing_secret=resolve_secret(secret, "events.signing_secret", base_dir=base_dir) if secret else None,
        timeout=float(table.positive("timeout", defaults.timeout)),
        buffer_size=table.positive("buffer_size", defaults.buffer_size, integer=True),
        max_attempts=table.positive("max_attempts", defaults.max_attempts, integer=True),
    )
    table.finish()
    return events

"""``mailgate check``: is this configuration ready to run?  One line per check.

The checks, in order: the configuration file parses and validates; the
certificate and key load, match, are valid for ``[server] hostname`` and do not
expire within 14 days; the state directory is writable; the account store
loads and names only configured providers; every listener (and the admin
listener) can bind its address -- bound and released at once, nothing is
served; every provider's settings validate, and where the API offers a
harmless call (:class:`~mailgate.providers.providertype.Probe`), its
credentials are tried with it.

Each verdict is a line ``OK|WARN|FAIL|SKIP <subject>: <detail>``; details name
files, keys and hosts, never a secret.  Any FAIL makes the exit status 1.
Run it as the user the service runs as: permissions are part of what it checks.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from service_identity import VerificationError
from service_identity.cryptography import verify_certificate_hostname
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory, Protocol

from mailgate.admin import directory_writable
from mailgate.build import build_account_store, check_accounts, check_passthrough, provider_settings
from mailgate.config import Config, load_config
from mailgate.configvalues import ConfigError
from mailgate.providers.providertype import Accepted, no_probe
from mailgate.tls import TLSConfigError, leaf_certificate, server_context_factory
from mailgate.transports import APITimeout

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"
EXPIRY_WARNING = timedelta(days=14)
_BIND_HINTS = {
    errno.EADDRINUSE: " (already in use: is mailgate, or another server, running?)",
    errno.EACCES: " (ports below 1024 need root or CAP_NET_BIND_SERVICE)",
    errno.EADDRNOTAVAIL: " (no such address on this machine)",
}


@dataclass(frozen=True)
class Verdict:
    status: str
    subject: str
    detail: str

    def line(self) -> str:
        return f"{self.status.upper():<4} {self.subject}: {self.detail}"


def check_certificate(config: Config, now: datetime) -> Verdict:
    certificate, key = config.tls.certificate, config.tls.private_key
    if certificate is None or key is None:
        return Verdict(
            WARN, "tls", "no certificate configured: a self-signed development certificate is "
            f"generated into {config.server.state_dir}/tls (clients will not trust it)"
        )  # fmt: skip
    try:
        server_context_factory(certificate, key)
        leaf = leaf_certificate(certificate)
    except TLSConfigError as e:
        return Verdict(FAIL, "tls", str(e))
    expires = leaf.not_valid_after_utc
    left = expires - now
    when = f"{expires:%Y-%m-%d %H:%M} UTC"
    if leaf.not_valid_before_utc > now:
        return Verdict(FAIL, "tls", f"{certificate}: not valid before {leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
    if left <= timedelta(0):
        return Verdict(FAIL, "tls", f"{certificate}: expired on {when}")
    try:
        verify_certificate_hostname(leaf, config.server.hostname)
    except VerificationError:
        return Verdict(
            WARN, "tls", f"{certificate}: not valid for server.hostname {config.server.hostname!r}; "
            "clients that check the name will refuse it"
        )  # fmt: skip
    if left < EXPIRY_WARNING:
        return Verdict(WARN, "tls", f"{certificate}: expires in {left.days} days, on {when}; renew it")
    return Verdict(OK, "tls", f"{certificate}: valid for {config.server.hostname} until {when} ({left.days} days)")


def check_state_dir(config: Config) -> Verdict:
    path = config.server.state_dir
    if directory_writable(path):
        return Verdict(OK, "state_dir", f"{path} is writable")
    return Verdict(FAIL, "state_dir", f"{path} is not a writable directory (/readyz stays 503 until it is)")


def check_account_store(config: Config) -> Verdict:
    try:
        check_passthrough(config)
        store = build_account_store(config)
        check_accounts(config, store)
    except ConfigError as e:
        return Verdict(FAIL, "accounts", str(e))
    except OSError as e:
        return Verdict(FAIL, "accounts", f"{e.strerror or e}: {e.filename}")
    except Exception as e:  # noqa: BLE001 - e.g. an accounts file that is not UTF-8: one line, and the other checks still run
        return Verdict(FAIL, "accounts", f"{config.accounts.path}: {type(e).__name__}: {e}")
    if config.accounts.store == "passthrough":
        return Verdict(OK, "accounts", f"passthrough: SMTP logins are {config.accounts.provider}'s credentials")
    listing = getattr(store, "accounts", lambda: ())()
    return Verdict(OK, "accounts", f"{len(listing)} accounts in {config.accounts.path}")


async def check_bind(reactor: Any, subject: str, description: str) -> Verdict:
    """Bind the endpoint and release it at once; nothing is served."""
    if description.startswith(("systemd:", "haproxy:systemd:")):
        return Verdict(SKIP, subject, f"{description}: the socket comes from systemd, not bound here")
    try:
        endpoint = serverFromString(reactor, description)
        factory = Factory.forProtocol(Protocol)
        factory.noisy = False
        port = await endpoint.listen(factory)
    except CannotListenError as e:
        code = getattr(e.socketError, "errno", None)
        reason = getattr(e.socketError, "strerror", None) or str(e.socketError)
        where = f"{e.interface or '*'}:{e.port}"
        return Verdict(FAIL, subject, f"{description}: cannot listen on {where}: {reason}{_BIND_HINTS.get(code, '')}")
    except (ValueError, TypeError, KeyError) as e:
        return Verdict(FAIL, subject, f"invalid endpoint string {description!r}: {e}")
    except Exception as e:  # noqa: BLE001 - any endpoint's failure is one verdict line
        return Verdict(FAIL, subject, f"{description}: {type(e).__name__}: {e}")
    address = port.getHost()
    await port.stopListening()
    return Verdict(OK, subject, f"{description}: can listen on {getattr(address, 'host', address)}")


async def check_provider(reactor: Any, http_client: Any, config: Config, name: str) -> Verdict:
    subject = f"provider {name}"
    provider = config.providers[name]
    try:
        kind, settings = provider_settings(provider)
    except ConfigError as e:
        return Verdict(FAIL, subject, str(e))
    if config.accounts.store == "passthrough" and config.accounts.provider == name:
        return Verdict(SKIP, subject, "not probed: its credentials come from each SMTP login (passthrough)")
    probe = kind.probe(name, settings)
    if probe is None and kind.probe is no_probe:
        return Verdict(SKIP, subject, f"settings valid; not probed ({kind.name} offers no harmless API call)")
    if probe is None:
        return Verdict(
            SKIP, subject, f"settings valid; not probed: providers.{name} holds no credentials "
            "(each account brings its own)"
        )  # fmt: skip
    host = urlsplit(probe.request.url).hostname or probe.request.url
    transport = kind.transport(settings, reactor, http_client, config.delivery.api_timeout)
    try:
        response = await transport.send(probe.request)
    except APITimeout:
        return Verdict(FAIL, subject, f"no answer from {host} within {config.delivery.api_timeout:g} s")
    except Exception as e:  # noqa: BLE001 - connection refused, DNS, TLS...: one line
        return Verdict(FAIL, subject, f"cannot reach {host}: {type(e).__name__}")
    answer = probe.verdict(response)
    if isinstance(answer, Accepted):
        return Verdict(WARN if answer.warning else OK, subject, f"{host}: {answer.detail}")
    if answer is not None:
        return Verdict(FAIL, subject, f"{host}: {answer}")
    return Verdict(OK, subject, f"{host} accepted the credentials (HTTP {response.status})")


async def run_checks(
    path: Path, reactor: Any, http_client: Any, report: Callable[[Verdict], None], now: datetime | None = None
) -> list[Verdict]:
    """Run every check, handing each verdict to ``report`` as soon as it is known."""
    verdicts: list[Verdict] = []

    def record(verdict: Verdict) -> None:
        verdicts.append(verdict)
        report(verdict)

    try:
        config = load_config(path)
    except ConfigError as e:
        record(Verdict(FAIL, "config", str(e)))
        return verdicts
    record(Verdict(OK, "config", f"{path}"))
    record(check_certificate(config, now or datetime.now(UTC)))
    record(check_state_dir(config))
    record(check_account_store(config))
    for index, listener in enumerate(config.listeners):
        record(await check_bind(reactor, f"listeners[{index}] ({listener.role})", listener.endpoint))
    if config.admin.endpoint is not None:
        record(await check_bind(reactor, "admin", config.admin.endpoint))
    for name in config.providers:
        record(await check_provider(reactor, http_client, config, name))
    return verdicts


def summary(verdicts: list[Verdict]) -> tuple[str, int]:
    """The closing line and the exit status (1 when anything failed)."""
    failures = sum(v.status == FAIL for v in verdicts)
    warnings = sum(v.status == WARN for v in verdicts)
    text = f"{failures} failed, {warnings} warnings, {len(verdicts)} checks"
    return text, 1 if failures else 0

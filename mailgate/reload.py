"""Reload on SIGHUP: certificates, accounts and providers, without dropping a session.

:class:`Reloader` re-reads the configuration file and builds everything a
reload changes *before* touching the running objects: the TLS options from the
certificate files, the account store (the accounts file re-read), and every
provider's adapter and transport.  Only when all of it succeeded is it swapped
in, at once, between two reactor turns; any error (a wrong key, a missing or
mismatched certificate, an unreadable accounts file) is logged naming the key
or file, and the running configuration stays in use, whole.

Open sessions keep what they started with (their TLS connection, their
login, their limits); new connections, logins and deliveries use the new
objects, and ``[limits]`` applies to new sessions and to the admission
decisions from then on.  Listener endpoints, ``[server]``, ``[admin]``,
``[events]``, the delivery mode and, in ``[limits]``, ``ipv6_client_prefix``
and ``exempt_networks`` (which client an open connection counts for) are not
reloaded: changing them takes a restart, and a reload that finds them
changed says so.
"""

from __future__ import annotations

import dataclasses
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.application.service import Service
from twisted.logger import Logger

from mailgate.config import Config, LimitsConfig
from mailgate.configvalues import ConfigError
from mailgate.metrics import Metrics
from mailgate.tls import ReloadableContextFactory, TLSConfigError


@dataclass(frozen=True)
class Parts:
    """What a reload rebuilds from a configuration (see :func:`mailgate.build.build_parts`)."""

    tls: ReloadableContextFactory
    store: Any  # IAccountStore
    routes: Any  # Mapping[str, Route]


# Sections a reload leaves as they are, with how to name them in the log.
_RESTART_ONLY: tuple[tuple[str, Callable[[Config], Any]], ...] = (
    ("[server]", lambda c: c.server),
    ("[[listeners]]", lambda c: c.listeners),
    ("limits.ipv6_client_prefix", lambda c: c.limits.ipv6_client_prefix),
    ("limits.exempt_networks", lambda c: c.limits.exempt_networks),
    ("[admin]", lambda c: c.admin),
    ("[events]", lambda c: c.events),
    ("delivery.mode", lambda c: c.delivery.mode),
)


class Reloader:
    """Applies a fresh configuration to a running gateway (see the module docstring)."""

    log = Logger()

    def __init__(
        self,
        running: Config,
        load: Callable[[], Config],
        prepare: Callable[[Config], Parts],
        tls: ReloadableContextFactory,
        checker: Any,
        dispatcher: Any,
        smtp_factories: Sequence[Any],
        metrics: Metrics,
        apply_limits: Callable[[LimitsConfig], Any] = lambda limits: None,
    ):
        self.running = running
        self.load = load
        self.prepare = prepare
        self.tls = tls
        self.checker = checker
        self.dispatcher = dispatcher
        self.smtp_factories = smtp_factories
        self.metrics = metrics
        # Applies reloaded limits beyond the listeners' policies (admission,
        # message rate, parser): mailgate.build wires it.
        self.apply_limits = apply_limits

    def reload(self) -> bool:
        """Re-read and apply the configuration; False (and logged) when it was refused."""
        self.log.info("reloading the configuration")
        try:
            config = self.load()
            parts = self.prepare(config)
        except (ConfigError, TLSConfigError) as e:
            return self._refused(str(e))
        except OSError as e:
            where = f": {e.filename}" if e.filename else ""
            return self._refused(f"{e.strerror or e}{where}")
        except Exception as e:  # noqa: BLE001 - whatever went wrong, the running configuration stays
            # (an accounts file that is not UTF-8 raises UnicodeDecodeError, for one):
            # refused and counted like any other bad configuration, never an
            # unhandled error out of the signal's reactor call.
            return self._refused(f"{type(e).__name__}: {e}")
        # Nothing below can fail: the swap is all or nothing.
        self.tls.adopt(parts.tls)
        self.checker.store = parts.store
        self.dispatcher.replace_routes(parts.routes, config.default_route)
        limits = dataclasses.replace(
            config.limits,
            ipv6_client_prefix=self.running.limits.ipv6_client_prefix,
            exempt_networks=self.running.limits.exempt_networks,
        )
        self.apply_limits(limits)
        cram_md5 = bool(parts.store.supports_cram_md5)
        for factory in self.smtp_factories:
            factory.policy = dataclasses.replace(factory.policy, cram_md5=cram_md5, limits=limits)
        unapplied = [name for name, section in _RESTART_ONLY if section(config) != section(self.running)]
        if unapplied:
            self.log.warn(
                "reload: changes to {sections} are not applied until a restart",
                sections=", ".join(unapplied),
            )
        # The running configuration keeps its restart-only sections.
        self.running = dataclasses.replace(
            config,
            server=self.running.server,
            listeners=self.running.listeners,
            limits=limits,
            admin=self.running.admin,
            events=self.running.events,
            delivery=dataclasses.replace(config.delivery, mode=self.running.delivery.mode),
        )
        self.metrics.reloads.labels("success").inc()
        self.log.info(
            "configuration reloaded: certificate {certificate}, accounts {store}, providers {providers}",
            certificate=str(parts.tls.certificate),
            store=config.accounts.store,
            providers=", ".join(config.providers),
        )
        return True

    def _refused(self, reason: str) -> bool:
        self.metrics.reloads.labels("failure").inc()
        self.log.error("reload refused, the running configuration stays in use: {reason}", reason=reason)
        return False


class ReloadOnSIGHUP(Service):
    """Calls ``reloader.reload`` on SIGHUP while running; the previous handler comes back on stop.

    The handler only schedules the reload on the reactor thread, so it never runs
    in the middle of a reactor turn.
    """

    def __init__(self, reloader: Reloader, reactor: Any):
        self.reloader = reloader
        self.reactor = reactor
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()
        self._previous = signal.signal(signal.SIGHUP, self._on_signal)

    def stopService(self) -> Any:
        signal.signal(signal.SIGHUP, self._previous if self._previous is not None else signal.SIG_DFL)
        return super().stopService()

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.reloader.reload)

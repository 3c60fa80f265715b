"""``twistd mailgate`` / ``twist mailgate``: options (parse only) and makeService.

The reactor is imported inside :func:`makeService`, never at import time, so
that twistd can install the reactor it was asked for (STYLE.md, Twisted's own
plugins).  A configuration error prints one line naming the key and exits
non-zero, without a traceback.  SIGHUP reloads certificates, accounts and
providers (:mod:`mailgate.reload`); ``--logger mailgate.logging.json_observer``
makes twistd log JSON (:mod:`mailgate.logging`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from twisted.application.service import IService, Service
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python import usage

from mailgate.configvalues import ConfigError
from mailgate.devdefault import DEV_STATE_DIR

log = Logger()


class Options(usage.Options):
    synopsis = "[--config PATH]"
    longdesc = (
        "Run the mailgate SMTP gateway.  Without --config, a development default "
        "listens on 127.0.0.1 ports 2525 (relay), 2587 (submission) and 2465 "
        "(submissions) and captures API requests as JSON files."
    )
    optParameters = [
        ["config", "c", None, "Path to mailgate.toml (see etc/mailgate.toml.example)."],
        ["state-dir", None, DEV_STATE_DIR, "State directory of the development default."],
    ]


def _exit_when_a_port_cannot_be_bound(service: IService) -> None:
    """A listener that cannot bind (port in use, port below 1024 without the
    capability) stops start-up with one line and exit status 1, like a
    configuration error, instead of twistd's traceback."""
    start = service.privilegedStartService

    def privileged_start() -> None:
        try:
            start()
        except CannotListenError as e:
            where = f"{e.interface or '*'}:{e.port}"
            reason = getattr(e.socketError, "strerror", None) or e.socketError
            sys.stderr.write(f"mailgate: error: cannot listen on {where}: {reason}\n")
            raise SystemExit(1) from None

    service.privilegedStartService = privileged_start  # type: ignore[method-assign]


class _ClosePool(Service):
    """Closes the HTTP connection pool when the gateway stops."""

    def __init__(self, pool: Any):
        self.pool = pool

    def stopService(self) -> Any:
        super().stopService()
        return self.pool.closeCachedConnections()


def makeService(options: Options) -> IService:
    from twisted.internet import reactor
    from mailgate.build import build_service
    from mailgate.config import load_config
    from mailgate.devdefault import development_setup
    from mailgate.reload import ReloadOnSIGHUP
    from mailgate.sdnotify import Notifier, SystemdNotifier
    from mailgate.tls import TLSConfigError
    from mailgate.transports import make_http_client

    try:
        if options["config"]:
            config = load_config(Path(options["config"]))
        else:
            config, username, password = development_setup(Path(options["state-dir"]))
            # Issue 2 asks for the development login in the log, so a newcomer can send
            # at once.  It is a throwaway credential for listeners on 127.0.0.1 only;
            # a configured server never logs a secret (tests/integration/test_log_secrets.py).
            log.info(
                "development mode: log in as {username!r} with password {password!r} "
                "(also in {state}/dev-password); captured API requests go to {state}/captured",
                username=username,
                password=password,
                state=str(config.server.state_dir),
            )
        client, pool = make_http_client(reactor)
        service = build_service(config, reactor, client)
    except (ConfigError, TLSConfigError) as e:
        sys.stderr.write(f"mailgate: configuration error: {e}\n")
        raise SystemExit(1) from None
    except OSError as e:
        # An unwritable state directory or unreadable accounts file, say.
        where = f": {e.filename}" if e.filename else ""
        sys.stderr.write(f"mailgate: error: {e.strerror or e}{where}\n")
        raise SystemExit(1) from None
    _ClosePool(pool).setServiceParent(service)
    ReloadOnSIGHUP(service.reloader, reactor).setServiceParent(service)  # type: ignore[attr-defined]
    notifier = SystemdNotifier(Notifier.from_environment(), reactor)
    notifier.setServiceParent(service)
    service.stop_first.append(notifier)  # type: ignore[attr-defined]  # STOPPING=1 before draining
    _exit_when_a_port_cannot_be_bound(service)
    return service

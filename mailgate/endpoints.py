"""Listener endpoint strings: Twisted's syntax, with two refinements.

* ``haproxy:<endpoint>`` reads the PROXY protocol header with
  :mod:`mailgate.proxyprotocol` (Twisted's own wrapper connects the session
  before the header is read, so the session would see the load balancer).
* ``systemd:domain=...:index=N`` (or ``name=``) naming a socket systemd did
  not pass is a one-line error saying so, not an IndexError.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.endpoints import serverFromString

from mailgate.proxyprotocol import ProxyProtocolEndpoint

PROXY_PREFIX = "haproxy:"


def listener_endpoint(reactor: Any, description: str) -> Any:
    """The server endpoint for ``description``; ValueError with a readable reason."""
    if description[: len(PROXY_PREFIX)].lower() == PROXY_PREFIX:
        inner = description[len(PROXY_PREFIX) :]
        if not inner:
            raise ValueError("haproxy: wraps another endpoint, e.g. haproxy:tcp:25")
        return ProxyProtocolEndpoint(listener_endpoint(reactor, inner), reactor)
    try:
        return serverFromString(reactor, description)
    except (IndexError, KeyError) as e:
        if description.split(":", 1)[0].lower() != "systemd":
            raise ValueError(str(e)) from None
        passed = os.environ.get("LISTEN_FDS", "0") if os.environ.get("LISTEN_PID") == str(os.getpid()) else "0"
        names = os.environ.get("LISTEN_FDNAMES", "")
        raise ValueError(
            f"systemd passed no such socket ({passed} passed"
            + (f", named {names.replace(':', ', ')}" if names and passed != "0" else "")
            + "); start mailgate through its .socket unit, whose ListenStream= lines"
            " are index 0, 1, 2... in order"
        ) from None

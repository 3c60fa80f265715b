"""What :mod:`mailgate.build` needs to know about one kind of provider.

Each adapter module exports ``PROVIDER = ProviderType(...)``; the table of all
of them is :mod:`mailgate.providers.registry`.  Settings use each provider's
own words (Postmark ``token``, Bento ``site_uuid``...); ``credential_settings``
are the ones that authenticate to the API: a passthrough store fills them from
the SMTP login and they must then be absent from the server configuration.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mailgate.configvalues import ConfigError
from mailgate.interfaces import IProvider, ITransport
from mailgate.providers.base import HTTPRequest, HTTPResponse, error_text


def http_transport(settings: Mapping[str, Any], reactor: Any, http_client: Any, timeout: float) -> ITransport:
    """The default: requests go out through the shared treq client."""
    from mailgate.transports import TreqTransport

    return TreqTransport(http_client, reactor, timeout)


def capture_transport(settings: Mapping[str, Any], reactor: Any, http_client: Any, timeout: float) -> ITransport:
    """Requests are written as JSON files into ``folder`` instead of being sent."""
    from mailgate.transports import CaptureTransport

    return CaptureTransport(Path(settings["folder"]))


def require_url(name: str, settings: dict[str, Any], default: str | None = None) -> None:
    """``url`` must be an http(s) URL; ``default`` (the API's public base URL) fills it when absent."""
    if default is not None:
        settings.setdefault("url", default)
    url = settings.get("url")
    if not isinstance(url, str) or not url.startswith(("https://", "http://")):
        raise ConfigError(f"providers.{name}.url", "required: the http(s) URL of the API")


@dataclass(frozen=True)
class Accepted:
    """A probe answer that shows the credentials work, with something to add.

    ``detail`` is printed instead of the plain "accepted the credentials"; with
    ``warning`` the verdict is WARN (the account needs attention, for example
    an Amazon SES account still in the sandbox) rather than OK.
    """

    detail: str
    warning: bool = False


def credentials_verdict(response: HTTPResponse, detail: str | None = None) -> str | None:
    """The usual reading of a probe's answer: None (the credentials work) for 2xx,
    else one line saying what is wrong, with the API's own explanation
    (``detail``, by default read from the body by :func:`error_text`)."""
    status = response.status
    if 200 <= status < 300:
        return None
    detail = detail or error_text(response)
    if status in (401, 403):
        return f"the API refused the credentials (HTTP {status}): {detail}"
    if 300 <= status < 400 or status in (404, 405):
        return f"the API has no such endpoint (HTTP {status}): check the provider's url: {detail}"
    if status == 429 or status >= 500:
        return f"the API is unavailable right now (HTTP {status}), try again: {detail}"
    return f"unexpected answer (HTTP {status}): {detail}"


def probe_request(name: str, url: str, *headers: tuple[str, str]) -> HTTPRequest:
    """A probe's ``GET url``: no body, a JSON answer wanted."""
    return HTTPRequest("GET", url, (("Accept", "application/json"), *headers), b"", name)


def has_settings(settings: Mapping[str, Any], *keys: str) -> bool:
    """True when every key is set: a probe needs the server's own credentials, and
    without them (each account brings its own) there is nothing to probe with."""
    return all(settings.get(key) for key in keys)


@dataclass(frozen=True)
class Probe:
    """A harmless request that shows whether a provider's settings and credentials work.

    ``mailgate check`` sends ``request`` through the provider's own transport
    (so an SMTP or SES provider probes its own way) and reads the answer with
    ``verdict``: None when all is well, :class:`Accepted` when the credentials
    work and there is more to say, else a one-line reason that never repeats a
    secret.  The request must change nothing at the provider: read
    the account, the sending domain or the quota; never send an email.
    """

    request: HTTPRequest
    verdict: Callable[[HTTPResponse], str | Accepted | None] = credentials_verdict


def no_probe(name: str, settings: Mapping[str, Any]) -> Probe | None:
    """The default: the API offers no harmless call, so ``mailgate check`` says "not probed".

    A provider type that has a probe returns None from it only when the server
    configuration holds no credentials to probe with (accounts bring their own).
    """
    return None


@dataclass(frozen=True)
class ProviderType:
    """Everything :mod:`mailgate.build` needs to know about one adapter type."""

    name: str
    # (provider name, validated settings) -> the pure adapter.
    adapter: Callable[[str, Mapping[str, Any]], IProvider]
    # Every key allowed in ``[providers.NAME]`` besides ``type``.
    settings: tuple[str, ...]
    # Keys that authenticate to the API (filled from the login in passthrough mode).
    credential_settings: tuple[str, ...]
    # Keys an account may set for itself in the accounts store.
    account_settings: tuple[str, ...]
    # (provider name, mutable settings): fill defaults, raise ConfigError naming the key.
    validate: Callable[[str, dict[str, Any]], None] = require_url
    # (settings, reactor, http client, API timeout) -> the transport carrying the requests.
    transport: Callable[[Mapping[str, Any], Any, Any, float], ITransport] = http_transport
    # (provider name, validated settings) -> the Probe ``mailgate check`` sends, or None.
    probe: Callable[[str, Mapping[str, Any]], Probe | None] = no_probe
    # Settings that are file paths: relative ones are resolved against the config file's folder.
    path_settings: tuple[str, ...] = ()

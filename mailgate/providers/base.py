"""What adapters build and classify: plain HTTP requests and responses.

Adapters are pure (ARCHITECTURE.md "Provider adapter"); these value objects
are the whole of their contact with the outside world.  Header values and
bodies may carry credentials, so they are kept out of ``repr()``, and
:meth:`HTTPRequest.redacted_headers` is what logs and the capture folder see.
"""

from __future__ import annotations

import email.utils
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

from mailgate.outcome import Delivered, Failed, Outcome, Retry

# Sent with every API request, so providers can tell mailgate's traffic apart.
USER_AGENT = "mailgate/0.1"

SENSITIVE_HEADERS = frozenset(
    {"authorization", "x-postmark-server-token", "x-api-key", "api-key", "x-mailgate-signature"}
)


@dataclass(frozen=True)
class HTTPRequest:
    method: str
    url: str
    headers: tuple[tuple[str, str], ...] = field(repr=False)
    body: bytes = field(repr=False)
    provider: str = ""
    # mailgate's queue id for the message: the id of the 250 reply when the API
    # answers without one of its own.
    queue_id: str = ""
    # The envelope recipients this request delivers to, as the envelope spells
    # them.  Empty means "the whole envelope", which is right for the only
    # request of a message; an adapter that splits a message into several
    # requests names each one's share, so that once some are accepted and a later
    # one fails for good, the DSN (RFC 3464) names only those who did not get it.
    # A share left unnamed there counts as unknown: nobody is taken as delivered.
    recipients: tuple[str, ...] = ()

    def redacted_headers(self) -> list[tuple[str, str]]:
        return [
            (name, "<redacted>" if name.lower() in SENSITIVE_HEADERS else value)
            for name, value in self.headers
        ]


@dataclass(frozen=True)
class HTTPResponse:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes

    @property
    def concerns_message_only(self) -> bool:
        """A 429: the API is up and asks us to slow down, often for one API key
        only; the dispatcher's circuit breaker does not count it (mailgate.circuit)."""
        return self.status == 429

    def header(self, name: str) -> str | None:
        name = name.lower()
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    def json(self) -> Any:
        """The body as JSON, or None when it is not JSON."""
        try:
            return json.loads(self.body)
        except (ValueError, UnicodeDecodeError):
            return None


_SAFE_ID = re.compile(r"[\x21-\x7e]{1,200}")


def safe_message_id(value: object, fallback: str) -> str:
    """An API's message id, if it is safe in a reply line and a log line.

    The id goes into ``250 2.0.0 Ok: <id>``; an id with spaces, line breaks or
    non-ASCII could forge reply lines, so such an id is replaced by ours.
    """
    if isinstance(value, str | int) and not isinstance(value, bool):
        text = str(value)
        if _SAFE_ID.fullmatch(text):
            return text
    return fallback


def json_request(
    provider: str,
    method: str,
    url: str,
    payload: Any,
    headers: list[tuple[str, str]],
    queue_id: str = "",
) -> HTTPRequest:
    body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return HTTPRequest(
        method=method,
        url=url,
        headers=(("Content-Type", "application/json"), ("Accept", "application/json"), *headers),
        body=body,
        provider=provider,
        queue_id=queue_id,
    )


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """RFC 9110 §10.2.3: delay-seconds or an HTTP-date; None when absent or invalid."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def error_text(response: HTTPResponse) -> str:
    """The API's own explanation, from common JSON error shapes or the raw body."""
    data = response.json()
    if isinstance(data, dict):
        for key in ("message", "Message", "error", "detail", "errors"):
            value = data.get(key)
            if isinstance(value, str) and value:
                return value
            if isinstance(value, dict) and isinstance(value.get("message"), str):
                return value["message"]
            if isinstance(value, list) and value:
                first = value[0]
                if isinstance(first, dict) and isinstance(first.get("message"), str):
                    return first["message"]
                if isinstance(first, str):
                    return first
    text = response.body[:500].decode("utf-8", "replace").strip()
    return text or f"HTTP {response.status}"


def classify_http(provider: str, response: HTTPResponse, message_id: str) -> Outcome:
    """The error table of ARCHITECTURE.md applied to a generic HTTP API.

    2xx delivered; 408, 429, 5xx and 3xx (not followed) transient (451); 413 too big (552 5.3.4);
    401/403 refused authorisation (554 5.7.0); other 4xx a content rejection
    (554 5.6.0 for 400/422, 554 5.0.0 otherwise) carrying the API's message.
    """
    status = response.status
    if 200 <= status < 300:
        return Delivered(provider, message_id)
    if status == 429:
        after = parse_retry_after(response.header("Retry-After"))
        return Retry(provider, "rate limited by the API (HTTP 429)", "4.7.0", after)
    if status == 408 or status >= 500:
        after = parse_retry_after(response.header("Retry-After"))
        return Retry(provider, f"API unavailable (HTTP {status})", "4.3.0", after)
    if 300 <= status < 400:
        # Redirects are not followed (see transports); the URL needs fixing, and
        # until it is the client keeps the message.
        return Retry(provider, f"API answered with a redirect (HTTP {status}); check its url", "4.3.5")
    detail = error_text(response)
    if status == 413:
        return Failed(provider, f"message too large for the API: {detail}", 552, "5.3.4")
    if status in (401, 403):
        return Failed(provider, f"API refused the credentials (HTTP {status}): {detail}", 554, "5.7.0")
    enhanced = "5.6.0" if status in (400, 422) else "5.0.0"
    return Failed(provider, f"HTTP {status}: {detail}", 554, enhanced)

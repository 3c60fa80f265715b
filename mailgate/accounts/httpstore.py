"""The ``http`` account store: the operator's own HTTPS endpoint decides each login.

For operators who keep their users elsewhere (the way OpenSend checks an API
key against its database).  For a PLAIN or LOGIN login mailgate POSTs
``{"username": ..., "password": ...}`` as JSON to the configured URL
(README.rst, "Account store http", documents both JSON documents):

* ``200`` with an account JSON object: logged in.  The object is validated
  exactly like an ``[accounts.NAME]`` table of the file store
  (:func:`~mailgate.accounts.filestore.account_from_table`), and its route and
  provider settings against the configured providers; a bad object refuses
  the login with ``454 4.7.0`` and logs an error naming the field.
* ``401`` or ``403``: wrong credentials, ``535 5.7.8``.
* Anything else (another status, a timeout, no connection): ``454 4.7.0``,
  so the client tries again later.

Answers are cached in memory, successes and refusals each for their own TTL,
at most ``cache_size`` entries (least recently used first out); endpoint
failures are not cached, so a recovered endpoint is used at once.  The cache
key is HMAC-SHA256 of the username and password under a random key made per
process: the password is never stored, and cannot be recovered from the
cache.  Concurrent logins with the same credentials share one request.
Everything is asynchronous: a slow endpoint delays only the logins waiting
for it, never another session.  The password is never logged.

CRAM-MD5 is not offered with this store: it needs the secret in advance, and
the endpoint only ever sees a username and password.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from collections import OrderedDict
from collections.abc import Collection, Mapping
from typing import Any

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailgate.accounts.account import Account, login_fingerprint, provider_problem
from mailgate.accounts.filestore import _USERNAME, ACCOUNT_FIELDS, account_from_table
from mailgate.interfaces import AccountStoreUnavailable, IAccountStore, ITransport
from mailgate.providers.base import HTTPRequest, HTTPResponse
from mailgate.transports import APITimeout

__all__ = ["HTTPAccountStore"]

# The account object: a file-store account's keys without secrets, plus its name.
ACCOUNT_KEYS = ACCOUNT_FIELDS | {"name"}
_UNAUTHORIZED = "invalid credentials"
_REFUSED = object()  # a cached 401/403


class _BadAccount(Exception):
    """The endpoint's account object is unusable; ``key`` names the field."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(key, message)
        self.key = key
        self.message = message


@implementer(IAccountStore)
class HTTPAccountStore:
    """Logins checked by POSTing them to ``url`` through ``transport``.

    ``transport`` is an :class:`~mailgate.interfaces.ITransport` carrying
    :class:`~mailgate.providers.base.HTTPRequest` objects (the shared treq
    client, with this store's timeout); ``clock`` gives ``seconds()`` for the
    cache.  ``providers`` maps each configured provider to the settings an
    account may give it.  ``token`` is sent as ``Authorization: Bearer``,
    ``basic_auth`` (username, password) as HTTP Basic (RFC 7617).  A TTL of
    0 disables caching of that kind of answer.
    """

    supports_cram_md5 = False
    log = Logger()

    def __init__(
        self,
        url: str,
        transport: ITransport,
        clock: Any,
        *,
        providers: Mapping[str, Collection[str]],
        token: str | None = None,
        basic_auth: tuple[str, str] | None = None,
        success_ttl: float = 300.0,
        failure_ttl: float = 60.0,
        cache_size: int = 10_000,
    ) -> None:
        self.url = url
        self._transport = transport
        self._clock = clock
        self._providers = providers
        self._headers: list[tuple[str, str]] = [
            ("Content-Type", "application/json"),
            ("Accept", "application/json"),
        ]
        if token is not None:
            self._headers.append(("Authorization", f"Bearer {token}"))
        elif basic_auth is not None:
            pair = f"{basic_auth[0]}:{basic_auth[1]}".encode()
            self._headers.append(("Authorization", "Basic " + base64.b64encode(pair).decode("ascii")))
        self._success_ttl = success_ttl
        self._failure_ttl = failure_ttl
        self._cache_size = cache_size
        self._cache_key = secrets.token_bytes(32)
        # HMAC key -> (expiry time, Account or _REFUSED), least recently used first.
        self._cache: OrderedDict[bytes, tuple[float, Any]] = OrderedDict()
        # HMAC key -> the Deferreds of the logins waiting for the same request.
        self._waiting: dict[bytes, list[defer.Deferred[Account]]] = {}

    def __repr__(self) -> str:
        return f"HTTPAccountStore({self.url!r})"

    @property
    def cached(self) -> int:
        """How many answers are cached (expired ones included until looked up or evicted)."""
        return len(self._cache)

    def authenticate_password(self, username: str, password: str) -> defer.Deferred[Account]:
        """See :meth:`IAccountStore.authenticate_password`."""
        key = self._key(username, password)
        entry = self._cache.get(key)
        if entry is not None:
            expires, value = entry
            if expires > self._clock.seconds():
                self._cache.move_to_end(key)
                if value is _REFUSED:
                    return defer.fail(UnauthorizedLogin(_UNAUTHORIZED))
                return defer.succeed(value)
            del self._cache[key]
        waiter: defer.Deferred[Account] = defer.Deferred()
        waiting = self._waiting.get(key)
        if waiting is not None:
            waiting.append(waiter)  # The same login is already being asked about.
            return waiter
        self._waiting[key] = [waiter]
        asking = defer.maybeDeferred(self._transport.send, self._request(username, password))
        asking.addCallbacks(self._answered, self._unreachable, callbackArgs=(username,))
        asking.addBoth(self._settle, key)
        return waiter

    def authenticate_cram_md5(self, username: str, challenge: bytes, digest: str) -> defer.Deferred[Account]:
        """Always refused: CRAM-MD5 is not advertised with this store."""
        return defer.fail(UnauthorizedLogin(_UNAUTHORIZED))

    def _key(self, username: str, password: str) -> bytes:
        user = username.encode("utf-8", "surrogatepass")
        secret = password.encode("utf-8", "surrogatepass")
        message = len(user).to_bytes(4, "big") + user + secret  # length-prefixed: unambiguous
        return hmac.new(self._cache_key, message, hashlib.sha256).digest()

    def _request(self, username: str, password: str) -> HTTPRequest:
        body = json.dumps({"username": username, "password": password}, ensure_ascii=False).encode("utf-8")
        return HTTPRequest("POST", self.url, tuple(self._headers), body, provider="accounts")

    def _answered(self, response: HTTPResponse, username: str) -> Any:
        if response.status in (401, 403):
            return _REFUSED
        if response.status != 200:
            self.log.warn("account endpoint {url} answered HTTP {status}", url=self.url, status=response.status)
            raise AccountStoreUnavailable(f"account endpoint answered HTTP {response.status}")
        try:
            return self._account(response, username)
        except _BadAccount as e:
            self.log.error(
                "account endpoint {url} answered an unusable account: {key}: {message}",
                url=self.url,
                key=e.key,
                message=e.message,
            )
            raise AccountStoreUnavailable(f"unusable account from the endpoint: {e.key}") from None

    def _account(self, response: HTTPResponse, username: str) -> Account:
        data = response.json()
        if not isinstance(data, dict):
            raise _BadAccount("(body)", "not a JSON object")
        unknown = sorted(set(data) - ACCOUNT_KEYS)
        if unknown:
            raise _BadAccount(unknown[0], "unknown key")
        name = data.get("name")
        if name is None:
            # Stable per login without showing the username, which may be an API key.
            name = "http-" + login_fingerprint(username)
        elif not isinstance(name, str) or not _USERNAME.fullmatch(name):
            raise _BadAccount("name", "must be 1-255 characters without spaces or controls")
        account = account_from_table(name, data, _BadAccount, remote=True)
        problem = provider_problem(account, self._providers)
        if problem is not None:
            raise _BadAccount(*problem)
        return account

    def _unreachable(self, failure: Failure) -> None:
        if failure.check(APITimeout):
            why = f"no answer from the account endpoint ({failure.value})"
        else:
            why = f"cannot reach the account endpoint ({type(failure.value).__name__})"
        self.log.warn("{why}: {url}", why=why, url=self.url)
        raise AccountStoreUnavailable(why)

    def _settle(self, result: Any, key: bytes) -> None:
        waiters = self._waiting.pop(key)
        if isinstance(result, Account):
            self._remember(key, result, self._success_ttl)
        elif result is _REFUSED:
            self._remember(key, _REFUSED, self._failure_ttl)
        for waiter in waiters:
            if isinstance(result, Failure):
                if result.check(AccountStoreUnavailable):
                    waiter.errback(AccountStoreUnavailable(*result.value.args))
                else:
                    waiter.errback(result)
            elif result is _REFUSED:
                waiter.errback(UnauthorizedLogin(_UNAUTHORIZED))
            else:
                waiter.callback(result)

    def _remember(self, key: bytes, value: Any, ttl: float) -> None:
        if ttl <= 0:
            return
        self._cache[key] = (self._clock.seconds() + ttl, value)
        self._cache.move_to_end(key)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

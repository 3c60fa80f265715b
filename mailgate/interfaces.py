"""The seams between mailgate's parts, declared once with zope.interface.

Implementations are ``@implementer`` classes checked with ``verifyObject`` in
tests (fakes in :mod:`mailgate.testing` too).  Anything that does I/O returns a
Deferred; adapters (:class:`IProvider`) are pure.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class AccountStoreUnavailable(Exception):
    """A store cannot decide a login now (its endpoint is down, slow or answered
    nonsense): the client gets ``454 4.7.0`` and may try again.  The store has
    already logged why; the message is safe to log (no secrets)."""


class IAccount(Interface):
    """Marker interface under which the realm hands out :class:`Account` avatars."""


class IAccountStore(Interface):
    """Where logins are checked and accounts come from (file, passthrough, http)."""

    supports_cram_md5 = Attribute(
        "True when this store can verify CRAM-MD5 (RFC 2195) for at least some accounts."
    )

    def authenticate_password(username: str, password: str):  # type: ignore[no-untyped-def]
        """Check a PLAIN/LOGIN login.

        Returns a Deferred firing with the Account, or failing with
        ``twisted.cred.error.UnauthorizedLogin`` (bad credentials: 535 5.7.8),
        :class:`AccountStoreUnavailable` (454 4.7.0, logged by the store) or any
        other error (454 4.7.0, logged with its traceback as a bug).
        """

    def authenticate_cram_md5(username: str, challenge: bytes, digest: str):  # type: ignore[no-untyped-def]
        """Check a CRAM-MD5 response: ``digest`` is the client's lowercase hex HMAC-MD5.

        Same Deferred contract as :meth:`authenticate_password`.
        """


class HTTPRequestLike(Interface):
    """Documentation only: see :class:`mailgate.providers.base.HTTPRequest`."""


class IProvider(Interface):
    """A pure adapter for one API: email -> request, response -> outcome.

    The dispatcher owns all I/O; an adapter never touches the network.
    """

    name = Attribute("The configured provider name (the key under [providers]).")
    type = Attribute("The adapter type, e.g. 'webhook'.")

    def check(email, account):  # type: ignore[no-untyped-def]
        """Return a Failed outcome if this provider cannot carry ``email`` at all
        (e.g. attachments where the API has none), else None.  Called at the end
        of DATA so the client gets a precise permanent reply."""

    def build_requests(email, account, message_id):  # type: ignore[no-untyped-def]
        """Return a list of :class:`HTTPRequest` for this email (usually one;
        several where the API needs one request per recipient)."""

    def classify(request, response):  # type: ignore[no-untyped-def]
        """Turn an :class:`HTTPResponse` into Delivered, Retry or Failed."""


class ITransport(Interface):
    """Carries a built request somewhere: HTTPS via treq, or a capture folder."""

    def send(request):  # type: ignore[no-untyped-def]
        """Return a Deferred firing with an :class:`HTTPResponse`, or failing with
        a connection error or timeout (classified by the dispatcher as Retry)."""


class IDeliverer(Interface):
    """What the SMTP session hands a finished message to (sync or queue mode)."""

    def deliver(email, account, queue_id):  # type: ignore[no-untyped-def]
        """Return a Deferred firing with an outcome whose ``reply()`` answers the final dot.

        ``queue_id`` is mailgate's id for the message (logs, Received header,
        idempotency key)."""

    def prepare(queue_id, raw, sender, recipients, account):  # type: ignore[no-untyped-def]
        """The final dot was read: ``raw`` is the message as received, not yet
        parsed or checked.  A deliverer that stores messages may start writing it
        now, in parallel with the parse; nothing may be acknowledged or sent
        before :meth:`deliver`.  Returns nothing."""

    def release(queue_id):  # type: ignore[no-untyped-def]
        """The final dot of ``queue_id`` was answered (whatever the answer, and
        whether or not :meth:`deliver` was called): drop what :meth:`prepare`
        kept and :meth:`deliver` did not use."""


class IEventSink(Interface):
    """Where delivery events go (:mod:`mailgate.events`): the events webhook, or nowhere."""

    def emit(  # type: ignore[no-untyped-def]
        kind,
        *,
        queue_id,
        account,
        sender,
        recipients,
        provider=None,
        provider_message_id=None,
        reason=None,
        attempts=0,
    ):
        """Record that message ``queue_id`` was "delivered", "deferred" or "failed".

        Fire and forget: returns None at once, never raises and never waits
        for the network.  ``account`` is the account's name, ``recipients``
        the envelope recipients concerned, ``reason`` the last error (for
        deferred and failed), ``attempts`` the delivery attempts made so far."""

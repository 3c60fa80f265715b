"""Secrets at rest: hashing and verifying SMTP AUTH secrets, never keeping them in clear.

Stored strings name their scheme, so schemes and costs can change without a
migration (old hashes keep verifying; ``mailgate account passwd`` rewrites
them):

``scrypt$ln=15,r=8,p=3$<salt>$<hash>``
    Human passwords.  scrypt (RFC 7914) through :func:`hashlib.scrypt`;
    ``ln`` is log2 of N.  Salt (16 bytes) and hash (32 bytes) are base64
    with the standard alphabet and no padding, as in the PHC string format.
    The default cost, N=2^15, r=8, p=3 (32 MiB), is one of the equivalent
    settings of the OWASP Password Storage Cheat Sheet (N=2^17, r=8, p=1
    needs 128 MiB per concurrent login; the variants trade memory for
    passes).  The parameters are read back from each stored string, so the
    cost can be raised later.

``sha256$<64 hex>``
    API keys made by :func:`generate_api_key`: 256 random bits, so a single
    fast hash suffices (there is nothing to guess that a slow hash would
    protect) and checking one costs microseconds on the reactor thread.

``cram-md5$<64 hex>``
    What CRAM-MD5 (RFC 2195) needs without the clear secret: the HMAC-MD5
    (RFC 2104) inner and outer MD5 states after absorbing ``key XOR ipad``
    and ``key XOR opad``.  Byte order is Dovecot's (``hmac_md5_get_cram_context``
    in ``src/lib/hmac-cram-md5.c``): the *outer* state first, then the *inner*
    state, each as its four 32-bit words A, B, C, D written little-endian (the
    same order in which MD5 emits its digest).  So the output of
    ``doveadm pw -s CRAM-MD5`` minus its ``{CRAM-MD5}`` prefix is a valid
    value, and ours can be given to Dovecot.  This state is password
    equivalent for CRAM-MD5 and is an unsalted, fast function of the password:
    store it only for accounts whose clients cannot do anything better.

:func:`hashlib.md5` cannot resume from a saved state, so this module carries a
small pure-Python MD5 (RFC 1321) used only to compute those two states and to
finish the HMAC from them (a few blocks per login).

Every check compares in constant time, and :func:`verify_secret` and
:func:`verify_cram_md5` answer ``False`` for a malformed stored string
instead of raising: a damaged accounts entry must fail the login, not the
session.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import math
import re
import secrets
import struct
from typing import NamedTuple

__all__ = [
    "DEFAULT_SCRYPT_COST",
    "SCRYPT_COST",
    "ScryptCost",
    "cram_md5_state",
    "decoy_hash",
    "generate_api_key",
    "hash_api_key",
    "hash_password",
    "hash_scheme",
    "verify_cram_md5",
    "verify_secret",
]


class ScryptCost(NamedTuple):
    """scrypt cost parameters: N = 2**ln, block size r, parallelism p."""

    ln: int
    r: int
    p: int


#: The production cost (see the module docstring).
DEFAULT_SCRYPT_COST = ScryptCost(ln=15, r=8, p=3)
#: The cost :func:`hash_password` uses; production code never changes it.
#: Tests lower it (``monkeypatch.setattr(passwords, "SCRYPT_COST", ...)``, done
#: suite-wide in ``tests/conftest.py``) so that hashing many passwords stays
#: fast; the stored string records the cost, so such hashes still verify.
SCRYPT_COST = DEFAULT_SCRYPT_COST

API_KEY_PREFIX = "mg_"

_SALT_BYTES = 16
_SCRYPT_HASH_BYTES = 32
# Bounds on parameters read from a stored string: generous for future costs,
# but a damaged or hostile entry cannot ask for more than 1 GiB or hours of CPU.
_MAX_SCRYPT_MEMORY = 1 << 30
_MAX_SCRYPT_P = 16
_SCRYPT = re.compile(
    r"scrypt\$ln=([0-9]{1,2}),r=([0-9]{1,3}),p=([0-9]{1,3})\$([A-Za-z0-9+/]+)\$([A-Za-z0-9+/]+)"
)
_SHA256 = re.compile(r"sha256\$([0-9a-fA-F]{64})")
_CRAM_MD5 = re.compile(r"cram-md5\$([0-9a-fA-F]{64})")


# -- scheme detection ----------------------------------------------------------


def hash_scheme(stored: object) -> str | None:
    """Return ``"scrypt"``, ``"sha256"`` or ``"cram-md5"`` for a well-formed stored
    string, else None (which includes anything that might be a clear-text password)."""
    if not isinstance(stored, str):
        return None
    if _parse_scrypt(stored) is not None:
        return "scrypt"
    if _SHA256.fullmatch(stored):
        return "sha256"
    if _CRAM_MD5.fullmatch(stored):
        return "cram-md5"
    return None


# -- PLAIN / LOGIN secrets -----------------------------------------------------


def hash_password(secret: str, *, cost: ScryptCost | None = None) -> str:
    """Hash a human-chosen password with scrypt (``cost`` defaults to :data:`SCRYPT_COST`)."""
    cost = SCRYPT_COST if cost is None else cost
    salt = secrets.token_bytes(_SALT_BYTES)
    derived = _scrypt(secret.encode("utf-8"), salt, cost, _SCRYPT_HASH_BYTES)
    return _format_scrypt(cost, salt, derived)


def hash_api_key(secret: str) -> str:
    """Hash a generated API key with one SHA-256 (fit only for high-entropy secrets)."""
    return "sha256$" + hashlib.sha256(secret.encode("utf-8")).hexdigest()


def generate_api_key() -> str:
    """Return a new API key: ``mg_`` and 256 random bits, URL-safe base64.

    The prefix makes keys recognisable to secret scanners and to people; the
    alphabet has no ``:`` so a key can also stand in a ``user:key`` pair.
    """
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


def verify_secret(stored: str, candidate: str) -> bool:
    """True when ``candidate`` is the secret ``stored`` was made from.

    Dispatches on the scheme; an unknown scheme or a malformed string is
    False, never an exception.  scrypt hashes take their cost from the string
    (tens to hundreds of milliseconds): callers on the reactor thread must run
    this in a thread for them.
    """
    try:
        secret = candidate.encode("utf-8")
    except (AttributeError, UnicodeEncodeError):
        return False
    parsed = _parse_scrypt(stored) if isinstance(stored, str) else None
    if parsed is not None:
        cost, salt, expected = parsed
        try:
            derived = _scrypt(secret, salt, cost, len(expected))
        except (ValueError, MemoryError):
            return False
        return hmac.compare_digest(derived, expected)
    match = _SHA256.fullmatch(stored) if isinstance(stored, str) else None
    if match is not None:
        expected = bytes.fromhex(match.group(1))
        return hmac.compare_digest(hashlib.sha256(secret).digest(), expected)
    return False


def decoy_hash(like: str | None = None) -> str:
    """Return a well-formed hash that no password matches, as costly to check as ``like``.

    Stores verify unknown users against it so that a login for a missing
    account takes as long as one for an existing account, and timing does not
    reveal which usernames exist.  ``like`` defaults to a scrypt hash at
    :data:`SCRYPT_COST`.
    """
    if like is not None and _SHA256.fullmatch(like):
        return "sha256$" + secrets.token_hex(32)
    parsed = _parse_scrypt(like) if like is not None else None
    cost = parsed[0] if parsed is not None else SCRYPT_COST
    return _format_scrypt(
        cost, secrets.token_bytes(_SALT_BYTES), secrets.token_bytes(_SCRYPT_HASH_BYTES)
    )


def _scrypt(secret: bytes, salt: bytes, cost: ScryptCost, dklen: int) -> bytes:
    n = 1 << cost.ln
    # OpenSSL refuses unless maxmem covers 128*r*(N+2) for V plus 128*r*p for B;
    # its default (32 MiB) is just short of what N=2**15, r=8 needs.
    maxmem = 128 * cost.r * (n + 2 + cost.p) + (1 << 20)
    return hashlib.scrypt(
        secret, salt=salt, n=n, r=cost.r, p=cost.p, maxmem=maxmem, dklen=dklen
    )


def _format_scrypt(cost: ScryptCost, salt: bytes, derived: bytes) -> str:
    return f"scrypt$ln={cost.ln},r={cost.r},p={cost.p}${_b64(salt)}${_b64(derived)}"


def _parse_scrypt(stored: str) -> tuple[ScryptCost, bytes, bytes] | None:
    match = _SCRYPT.fullmatch(stored)
    if match is None:
        return None
    ln, r, p = (int(match.group(i)) for i in (1, 2, 3))
    if not (1 <= ln and 1 <= r and 1 <= p <= _MAX_SCRYPT_P):
        return None
    if 128 * r * (1 << ln) > _MAX_SCRYPT_MEMORY:
        return None
    try:
        salt = _unb64(match.group(4))
        derived = _unb64(match.group(5))
    except binascii.Error:
        return None
    if len(salt) < 8 or not 16 <= len(derived) <= 64:
        return None
    return ScryptCost(ln, r, p), salt, derived


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


# -- CRAM-MD5 ------------------------------------------------------------------


def cram_md5_state(secret: str) -> str:
    """Return ``cram-md5$`` and the Dovecot-ordered HMAC-MD5 states for ``secret``.

    Keys longer than the 64-byte MD5 block are first replaced by their MD5
    digest (RFC 2104 section 2), as every HMAC does.
    """
    key = secret.encode("utf-8")
    if len(key) > _BLOCK:
        key = hashlib.md5(key).digest()
    key = key.ljust(_BLOCK, b"\0")
    inner = _md5_compress(_MD5_IV, bytes(k ^ 0x36 for k in key))
    outer = _md5_compress(_MD5_IV, bytes(k ^ 0x5C for k in key))
    return "cram-md5$" + (struct.pack("<4I", *outer) + struct.pack("<4I", *inner)).hex()


def verify_cram_md5(stored: str, challenge: bytes, digest_hex: str) -> bool:
    """True when ``digest_hex`` is HMAC-MD5(secret, challenge) in hex (RFC 2195 section 2).

    ``stored`` is a :func:`cram_md5_state` string; a malformed one is False.
    Hex case is not significant.
    """
    match = _CRAM_MD5.fullmatch(stored) if isinstance(stored, str) else None
    if match is None or not isinstance(challenge, bytes):
        return False
    try:
        offered = digest_hex.lower().encode("ascii")
    except (AttributeError, UnicodeEncodeError):
        return False
    words = struct.unpack("<8I", bytes.fromhex(match.group(1)))
    outer, inner = words[:4], words[4:]
    inner_digest = _md5_finish(inner, challenge)
    expected = _md5_finish(outer, inner_digest).hex().encode("ascii")
    return hmac.compare_digest(expected, offered)


# -- MD5 (RFC 1321), resumable from a saved state -------------------------------

_BLOCK = 64
_MASK = 0xFFFFFFFF
_MD5_IV = (0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476)
_MD5_SHIFTS = (7, 12, 17, 22) * 4 + (5, 9, 14, 20) * 4 + (4, 11, 16, 23) * 4 + (6, 10, 15, 21) * 4
# RFC 1321 section 3.4: T[i] = floor(2**32 * abs(sin(i))), i = 1..64.
_MD5_T = tuple(int(abs(math.sin(i + 1)) * 2**32) & _MASK for i in range(64))
_MD5_INDEX = tuple(
    i if i < 16 else (5 * i + 1) % 16 if i < 32 else (3 * i + 5) % 16 if i < 48 else (7 * i) % 16
    for i in range(64)
)


def _md5_compress(state: tuple[int, ...], block: bytes) -> tuple[int, int, int, int]:
    """Run the MD5 compression function over one 64-byte block."""
    x = struct.unpack("<16I", block)
    a, b, c, d = state
    for i in range(64):
        if i < 16:
            f = (b & c) | (~b & d)
        elif i < 32:
            f = (d & b) | (~d & c)
        elif i < 48:
            f = b ^ c ^ d
        else:
            f = c ^ (b | ~d)
        f = (f + a + _MD5_T[i] + x[_MD5_INDEX[i]]) & _MASK
        shift = _MD5_SHIFTS[i]
        a, d, c = d, c, b
        b = (b + ((f << shift) | (f >> (32 - shift)))) & _MASK
    return (
        (state[0] + a) & _MASK,
        (state[1] + b) & _MASK,
        (state[2] + c) & _MASK,
        (state[3] + d) & _MASK,
    )


def _md5_finish(state: tuple[int, ...], data: bytes, absorbed: int = _BLOCK) -> bytes:
    """Finish an MD5 that has already absorbed ``absorbed`` bytes (a whole number
    of blocks) into ``state``, by absorbing ``data`` and the padding."""
    total = absorbed + len(data)
    padded = data + b"\x80" + b"\0" * ((55 - len(data)) % _BLOCK)
    padded += struct.pack("<Q", (total * 8) & 0xFFFFFFFFFFFFFFFF)
    for offset in range(0, len(padded), _BLOCK):
        state = _md5_compress(state, padded[offset : offset + _BLOCK])
    return struct.pack("<4I", *state)

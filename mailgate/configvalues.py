"""Small value parsers shared by every configuration file mailgate reads.

:mod:`mailgate.config` (the main TOML file) and
:mod:`mailgate.accounts.filestore` (the accounts file) both need the same three
things: an error that names the offending key, sizes written the way operators
write them (``"10MiB"``), and secrets that live inline, in a file, or in the
environment (ARCHITECTURE.md, "Configuration shape").  They live here, apart
from either file format, so neither has to import the other.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from decimal import Decimal
from pathlib import Path

__all__ = ["ConfigError", "is_loopback_host", "parse_size", "resolve_secret"]


class ConfigError(Exception):
    """A configuration value is wrong: names the key, says what is expected.

    ``key`` is a dotted path (``"accounts.alice.max_recipients"``); ``message``
    says what the value must be and never repeats a secret value.  ``source``
    (optional) names the file when the key alone would be ambiguous, e.g. the
    accounts file as opposed to the main configuration file.
    """

    def __init__(self, key: str, message: str, *, source: str | None = None) -> None:
        super().__init__(key, message)
        self.key = key
        self.message = message
        self.source = source

    def __str__(self) -> str:
        text = f"{self.key}: {self.message}"
        return f"{self.source}: {text}" if self.source else text


# Decimal units are powers of 1000, binary units powers of 1024 (IEC 80000-13),
# so "1MB" and "1MiB" mean what they say.  Unit names are case-sensitive on
# purpose: "mb" (millibits) is not a size anyone means.
_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([A-Za-z]*)")


def parse_size(value: object, key: str) -> int:
    """Return a positive size in bytes from an int or a string such as ``"10MiB"``.

    Strings are a number (decimals allowed: ``"1.5MiB"``) and an optional unit
    among B, KB, MB, GB (powers of 1000) and KiB, MiB, GiB (powers of 1024);
    fractions of a byte are rounded down.  Anything else raises
    :class:`ConfigError` naming ``key``.
    """
    expected = 'must be a positive number of bytes or a size such as "10MiB" or "512KB"'
    if isinstance(value, bool):
        raise ConfigError(key, expected)
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        match = _SIZE.fullmatch(value.strip())
        if match is None or match.group(2) not in _SIZE_UNITS:
            raise ConfigError(key, expected)
        size = int(Decimal(match.group(1)) * _SIZE_UNITS[match.group(2)])
    else:
        raise ConfigError(key, expected)
    if size <= 0:
        raise ConfigError(key, expected)
    return size


_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd]?)")


def parse_duration(value: object, key: str) -> float:
    """Return a positive number of seconds from a number or a string such as
    ``"90s"``, ``"10m"``, ``"1h"`` or ``"5d"``; anything else raises
    :class:`ConfigError` naming ``key``."""
    expected = 'must be a positive number of seconds or a duration such as "90s", "10m", "1h", "5d"'
    if isinstance(value, bool):
        raise ConfigError(key, expected)
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION.fullmatch(value.strip())
        if match is None:
            raise ConfigError(key, expected)
        seconds = float(Decimal(match.group(1)) * _DURATION_UNITS[match.group(2)])
    else:
        raise ConfigError(key, expected)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(key, expected)
    return seconds


def resolve_secret(value: object, key: str, *, base_dir: Path | None = None) -> str:
    """Return the secret a configuration value stands for.

    ``"env:NAME"`` reads the environment variable NAME; ``"file:PATH"`` reads
    the file (one trailing line ending removed; relative paths are taken from
    ``base_dir`` when given, else the working directory); anything else is the
    secret itself.  An unset variable, an unreadable file, or an empty result
    raises :class:`ConfigError`; the message names the variable or file, never
    the secret.
    """
    if not isinstance(value, str):
        raise ConfigError(key, 'must be a string (inline, "env:NAME" or "file:PATH")')
    if value.startswith("env:"):
        name = value[len("env:") :]
        if not name:
            raise ConfigError(key, '"env:" needs a variable name')
        secret = os.environ.get(name)
        if secret is None:
            raise ConfigError(key, f"environment variable {name} is not set")
        where = f"environment variable {name}"
    elif value.startswith("file:"):
        raw_path = value[len("file:") :]
        if not raw_path:
            raise ConfigError(key, '"file:" needs a path')
        path = Path(raw_path)
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        try:
            secret = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else "not UTF-8 text"
            raise ConfigError(key, f"cannot read secret file {path}: {reason}") from None
        secret = secret.removesuffix("\n").removesuffix("\r")
        where = f"secret file {path}"
    else:
        secret = value
        where = "the value"
    if not secret:
        raise ConfigError(key, f"{where} is empty")
    return secret


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and loopback addresses: the only places mailgate
    sends a password without TLS unless told otherwise."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False

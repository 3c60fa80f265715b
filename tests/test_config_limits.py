"""[limits] keys of the adversarial hardening: defaults, values, errors naming the key."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from mailgate.build import mime_limits
from mailgate.config import ConfigError, parse_config
from tests.test_config import MINIMAL, with_


def test_defaults(tmp_path: Path) -> None:
    """Omitted keys take the documented defaults; loopback is exempt from per-client limits."""
    limits = parse_config(MINIMAL, base_dir=tmp_path).limits
    assert (limits.max_sessions, limits.max_deliveries_in_flight) == (500, 100)
    assert (limits.max_connections_per_ip, limits.max_connection_rate_per_ip) == (20, 120)
    assert (limits.max_auth_failures_per_ip, limits.auth_failure_window) == (10, 900.0)
    assert limits.max_junk_commands == 100
    assert limits.exempt_networks == (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
    mime = mime_limits(limits)
    assert (mime.max_depth, mime.max_parts, mime.max_header_size) == (32, 1000, 256 * 1024)
    assert (mime.max_header_count, mime.max_addresses_per_header) == (500, 1000)


def test_values(tmp_path: Path) -> None:
    """Every key is read, sizes accept units, and an empty exempt list exempts no one."""
    data = with_(
        limits={
            "max_sessions": 50,
            "max_deliveries_in_flight": 5,
            "max_connections_per_ip": 2,
            "max_connection_rate_per_ip": 30,
            "max_auth_failures_per_ip": 4,
            "auth_failure_window": 60,
            "max_junk_commands": 20,
            "exempt_networks": [],
            "max_mime_depth": 8,
            "max_mime_parts": 100,
            "max_header_size": "64KiB",
            "max_header_count": 50,
            "max_addresses_per_header": 200,
        }
    )
    limits = parse_config(data, base_dir=tmp_path).limits
    assert limits.max_sessions == 50 and limits.auth_failure_window == 60.0
    assert limits.exempt_networks == ()
    assert mime_limits(limits).max_header_size == 65536
    assert mime_limits(limits).max_depth == 8


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        ({"max_sessions": 0}, "limits.max_sessions: must be a finite number greater than zero"),
        ({"max_connections_per_ip": 1.5}, "limits.max_connections_per_ip: must be an integer"),
        ({"max_connection_rate_per_ip": True}, "limits.max_connection_rate_per_ip: must be a number"),
        ({"auth_failure_window": float("inf")}, "limits.auth_failure_window: must be a finite number"),
        ({"exempt_networks": ["10.0.0.0/33"]}, "limits.exempt_networks[0]: not a network"),
        ({"exempt_networks": "127.0.0.1"}, "limits.exempt_networks: must be a list"),
        ({"max_header_size": "big"}, "limits.max_header_size: must be a positive number of bytes"),
        ({"max_mime_depth": -1}, "limits.max_mime_depth: must be a finite number greater than zero"),
        ({"max_connections_per_address": 3}, "limits.max_connections_per_address: unknown key"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, limits: dict[str, object], message: str) -> None:
    """A wrong value or an unknown key stops start-up with one line naming it."""
    with pytest.raises(ConfigError) as info:
        parse_config(with_(limits=limits), base_dir=tmp_path)
    assert str(info.value).startswith(message)

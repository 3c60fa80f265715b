"""mailgate.toml parsing: typed values, defaults, and errors that name the key."""

from __future__ import annotations

import ipaddress
import tomllib
from pathlib import Path

import pytest

from mailgate.config import ConfigError, load_config, parse_config

REPO = Path(__file__).resolve().parents[1]

MINIMAL = {
    "listeners": [{"endpoint": "tcp:587", "role": "submission"}],
    "accounts": {"store": "file", "path": "accounts.toml"},
    "providers": {"main": {"type": "webhook", "url": "https://api.example.com/v1", "token": "t"}},
}


def with_(**changes: object) -> dict[str, object]:
    data = {key: value for key, value in MINIMAL.items()}
    data.update(changes)
    return data


def test_queue_settings_take_durations() -> None:
    """[queue] durations accept seconds or 90s/10m/1h/5d; defaults are 1 min, 1 h, 5 days."""
    config = parse_config(with_(queue={"first_retry": "90s", "max_retry_interval": "2h", "lifetime": "4.5d"}), Path("/"))
    assert (config.queue.first_retry, config.queue.max_retry_interval, config.queue.lifetime) == (90, 7200, 388800)
    default = parse_config(MINIMAL, Path("/"))
    assert (default.queue.first_retry, default.queue.max_retry_interval, default.queue.lifetime) == (60, 3600, 432000)
    assert default.server.shutdown_grace == 30


def test_example_configuration_is_valid(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """etc/mailgate.toml.example parses (with its env/file secrets provided), so it documents real keys."""
    monkeypatch.setenv("MAILGATE_API_TOKEN", "token-from-env")
    monkeypatch.setenv("MAILGATE_EVENTS_TOKEN", "events-token-from-env")
    monkeypatch.setenv("MAILGATE_EVENTS_SIGNING_SECRET", "events-secret-from-env")
    monkeypatch.setenv("MAILGATE_ADMIN_TOKEN", "admin-token-from-env")
    data = tomllib.loads((REPO / "etc" / "mailgate.toml.example").read_text())
    secret = tmp_path / "secret"
    secret.write_text("signing\n")
    data["providers"]["main"]["signing_secret"] = f"file:{secret}"
    config = parse_config(data, base_dir=tmp_path)
    assert [listener.role for listener in config.listeners] == ["relay", "submission", "submissions"]
    assert config.listeners[0].trusted_networks == (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    assert config.providers["main"].settings["token"] == "token-from-env"
    assert config.providers["main"].settings["signing_secret"] == "signing"
    assert config.limits.max_message_size == 10 * 1024 * 1024
    assert config.default_route == ("main",)
    assert (config.providers["main"].rate, config.providers["main"].burst) == (50.0, 100)
    assert config.limits.max_messages_per_minute == 600
    assert config.events is not None and config.events.token == "events-token-from-env"
    assert (config.admin.endpoint, config.admin.token) == ("tcp:9025:interface=127.0.0.1", "admin-token-from-env")


def test_defaults_and_relative_paths(tmp_path: Path) -> None:
    """Omitted keys take documented defaults; relative paths resolve against the config's directory."""
    config = parse_config(MINIMAL, base_dir=tmp_path)
    assert config.accounts.path == tmp_path / "accounts.toml"
    assert config.server.state_dir == tmp_path / "mailgate-state"
    assert config.delivery.mode == "sync"
    assert config.delivery.api_timeout == 30.0
    assert config.limits.max_recipients == 50
    assert config.limits.line_endings == "reject"
    assert config.default_route == ("main",)


def test_provider_secrets_are_not_in_repr(tmp_path: Path) -> None:
    """A provider's settings (tokens) never appear in the config's repr, so logging it is safe."""
    config = parse_config(MINIMAL, base_dir=tmp_path)
    assert "settings" not in repr(config.providers["main"])


def provider(**keys: object) -> dict[str, object]:
    return with_(providers={"main": {"type": "webhook", "url": "https://api.example.com/v1", **keys}})


def test_dispatch_keys_are_not_adapter_settings(tmp_path: Path) -> None:
    """Limits and circuit keys become typed fields of the provider, never adapter settings."""
    config = parse_config(
        provider(max_concurrency=4, rate=2.5, burst=10, circuit_failures=3, circuit_cooldown=15, circuit_max_cooldown=120),
        base_dir=tmp_path,
    )
    main = config.providers["main"]
    assert (main.max_concurrency, main.rate, main.burst) == (4, 2.5, 10)
    assert (main.circuit_failures, main.circuit_cooldown, main.circuit_max_cooldown) == (3, 15.0, 120.0)
    assert dict(main.settings) == {"url": "https://api.example.com/v1"}


def test_dispatch_defaults(tmp_path: Path) -> None:
    """Without the keys: 32 requests at once, no rate limit, circuit opens after 5 failures for 30 s
    (up to 10 minutes); no message rate; no events webhook."""
    config = parse_config(MINIMAL, base_dir=tmp_path)
    main = config.providers["main"]
    assert (main.max_concurrency, main.rate, main.burst) == (32, None, None)
    assert (main.circuit_failures, main.circuit_cooldown, main.circuit_max_cooldown) == (5, 30.0, 600.0)
    assert (config.limits.max_messages_per_minute, config.limits.message_burst) == (0, None)
    assert config.events is None


def test_events_section(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """[events] takes a URL, secrets from env:/file: (kept out of repr), and typed options."""
    monkeypatch.setenv("MG_TEST_EVENTS_TOKEN", "events-token")
    (tmp_path / "events-secret").write_text("signing\n")
    config = parse_config(
        with_(events={
            "url": "https://hooks.example.com/mailgate",
            "token": "env:MG_TEST_EVENTS_TOKEN",
            "signing_secret": "file:events-secret",
            "timeout": 5,
            "buffer_size": 100,
            "max_attempts": 3,
        }),
        base_dir=tmp_path,
    )
    events = config.events
    assert events is not None
    assert (events.url, events.token, events.signing_secret) == ("https://hooks.example.com/mailgate", "events-token", "signing")
    assert (events.timeout, events.buffer_size, events.max_attempts) == (5.0, 100, 3)
    assert "events-token" not in repr(config) and "signing" not in repr(events)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (with_(listeners=[]), "listeners: at least one [[listeners]] entry is required"),
        (with_(listeners=[{"endpoint": "tcp:25"}]), "listeners[0].role: required"),
        (with_(listeners=[{"endpoint": "tcp:25", "role": "mx"}]), "listeners[0].role: must be one of"),
        (
            with_(listeners=[{"endpoint": "tcp:25", "role": "relay", "trusted_networks": ["10.0.0.0/33"]}]),
            "listeners[0].trusted_networks[0]: not a network",
        ),
        (
            with_(listeners=[{"endpoint": "tcp:587", "role": "submission", "trusted_networks": ["10.0.0.0/8"]}]),
            "listeners[0].trusted_networks: only a relay listener",
        ),
        (with_(listeners=[{"endpoint": "tcp:25", "role": "relay", "port": 25}]), "listeners[0].port: unknown key"),
        (with_(limits={"max_recipients": 0}), "limits.max_recipients: must be a finite number greater than zero"),
        (with_(limits={"max_recipients": True}), "limits.max_recipients: must be a number"),
        (with_(limits={"max_message_size": "ten"}), "limits.max_message_size"),
        (with_(limits={"ipv6_client_prefix": 16}), "limits.ipv6_client_prefix: must be a prefix length from 32 to 128"),
        (with_(limits={"ipv6_client_prefix": 129}), "limits.ipv6_client_prefix: must be a prefix length from 32 to 128"),
        (with_(limits={"ipv6_client_prefix": True}), "limits.ipv6_client_prefix: must be a number"),
        (with_(limits={"line_endings": "fix"}), "limits.line_endings: must be one of reject, normalize"),
        (with_(delivery={"mode": "later"}), "delivery.mode: must be one of sync, queue"),
        (with_(delivery={"route": ["nope"]}), "delivery.route[0]: no provider named 'nope'"),
        (with_(providers={}), "providers: at least one"),
        (with_(providers={"x": {"url": "https://a"}}), "providers.x.type: required"),
        (with_(accounts={"store": "file"}), "accounts.path: required"),
        (with_(accounts={"store": "passthrough", "provider": "main"}), "accounts.password_settings: required"),
        (with_(accounts={"store": "passthrough", "provider": "x", "password_settings": ["token"]}), "accounts.provider"),
        (with_(tls={"certificate": "a.pem"}), "tls.private_key: certificate and private_key must be given together"),
        (with_(admin={"endpoint": "tcp:9025", "port": 9025}), "admin.port: unknown key"),
        (with_(admin={"endpoint": ""}), "admin.endpoint: must be a Twisted endpoint string"),
        (with_(admin={"token": "abc"}), "admin.token: needs admin.endpoint"),
        (with_(admin={"endpoint": "tcp:0", "token": "two words"}), "admin.token: must be letters"),
        (with_(server={"hostname": 5}), "server.hostname: must be a string"),
        (with_(server={"hostname": "mx.example.com\n250 x"}), "server.hostname: must be a domain name"),
        (with_(server={"hostname": ""}), "server.hostname: must be a domain name"),
        (with_(limits={"command_timeout": float("nan")}), "limits.command_timeout: must be a finite number"),
        (with_(limits={"data_timeout": float("inf")}), "limits.data_timeout: must be a finite number"),
        (with_(limits={"auth_failure_delay": float("nan")}), "limits.auth_failure_delay: must be a finite number"),
        (with_(limits={"max_recipients": "50"}), "limits.max_recipients: must be an integer"),
        (with_(limits={"max_messages_per_minute": -1}), "limits.max_messages_per_minute: must be zero or a positive"),
        (with_(limits={"message_burst": 0}), "limits.message_burst: must be a finite number greater than zero"),
        (provider(max_concurrency=0), "providers.main.max_concurrency: must be a finite number greater than zero"),
        (provider(max_concurrency=1.5), "providers.main.max_concurrency: must be an integer"),
        (provider(rate=0), "providers.main.rate: must be a finite number greater than zero"),
        (provider(burst=5), "providers.main.burst: needs rate"),
        (provider(rate=5, burst=0.5), "providers.main.burst: must be an integer"),
        (provider(circuit_failures=0), "providers.main.circuit_failures: must be"),
        (provider(circuit_cooldown=-1), "providers.main.circuit_cooldown: must be"),
        (provider(circuit_cooldown=60, circuit_max_cooldown=30), "providers.main.circuit_max_cooldown: must be at least"),
        (with_(events={"token": "t"}), "events.url: required"),
        (with_(events={"url": "ftp://events.example"}), "events.url: must be an http"),
        (with_(events={"url": "https://e.example", "timeout": 0}), "events.timeout: must be"),
        (with_(events={"url": "https://e.example", "buffer_size": 0}), "events.buffer_size: must be"),
        (with_(events={"url": "https://e.example", "max_attempts": 0}), "events.max_attempts: must be"),
        (with_(events={"url": "https://e.example", "token": "a b"}), "events.token: must be printable ASCII"),
        (with_(events={"url": "https://e.example", "retries": 3}), "events.retries: unknown key"),
        (with_(queue={"lifetime": "5 weeks"}), "queue.lifetime: must be a positive number of seconds or a duration"),
        (with_(queue={"first_retry": 0}), "queue.first_retry: must be a positive number"),
        (with_(queue={"first_retry": "2h", "max_retry_interval": "1h"}), "queue.max_retry_interval: must not be shorter"),
        (with_(queue={"max_in_flight": 0}), "queue.max_in_flight: must be a finite number greater than zero"),
        (with_(queue={"retries": 3}), "queue.retries: unknown key"),
        (with_(server={"shutdown_grace": True}), "server.shutdown_grace: must be a positive number of seconds"),
        (with_(listeners=[{"endpoint": "tcp:587", "role": "submission", "mode": "later"}]), "listeners[0].mode: must be one of sync, queue"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, data: dict[str, object], message: str) -> None:
    """Every invalid value raises ConfigError whose text starts with the offending key."""
    with pytest.raises(ConfigError) as caught:
        parse_config(data, base_dir=tmp_path)
    assert message in str(caught.value)


def test_missing_and_invalid_files(tmp_path: Path) -> None:
    """A missing or non-TOML file is a ConfigError naming the file, not a traceback."""
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)

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


def test_example_configuration_is_valid(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """etc/mailgate.toml.example parses (with its env/file secrets provided), so it documents real keys."""
    monkeypatch.setenv("MAILGATE_API_TOKEN", "token-from-env")
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
        (with_(limits={"line_endings": "fix"}), "limits.line_endings: must be one of reject, normalize"),
        (with_(delivery={"mode": "queue"}), "delivery.mode: must be one of sync"),
        (with_(delivery={"route": ["nope"]}), "delivery.route[0]: no provider named 'nope'"),
        (with_(providers={}), "providers: at least one"),
        (with_(providers={"x": {"url": "https://a"}}), "providers.x.type: required"),
        (with_(accounts={"store": "file"}), "accounts.path: required"),
        (with_(accounts={"store": "passthrough", "provider": "main"}), "accounts.password_settings: required"),
        (with_(accounts={"store": "passthrough", "provider": "x", "password_settings": ["token"]}), "accounts.provider"),
        (with_(tls={"certificate": "a.pem"}), "tls.private_key: certificate and private_key must be given together"),
        (with_(admin={"endpoint": "tcp:9025"}), "admin: unknown key"),
        (with_(server={"hostname": 5}), "server.hostname: must be a string"),
        (with_(server={"hostname": "mx.example.com\n250 x"}), "server.hostname: must be a domain name"),
        (with_(server={"hostname": ""}), "server.hostname: must be a domain name"),
        (with_(limits={"command_timeout": float("nan")}), "limits.command_timeout: must be a finite number"),
        (with_(limits={"data_timeout": float("inf")}), "limits.data_timeout: must be a finite number"),
        (with_(limits={"auth_failure_delay": float("nan")}), "limits.auth_failure_delay: must be a finite number"),
        (with_(limits={"max_recipients": "50"}), "limits.max_recipients: must be an integer"),
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

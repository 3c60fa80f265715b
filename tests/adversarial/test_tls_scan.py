"""TLS scan (SECURITY.md): sslyze against Mozilla's "intermediate" profile, on 587 and 465.

sslyze pins a cryptography release that conflicts with mailgate's, so it runs
from a virtual environment of its own: ``$MAILGATE_SSLYZE_PYTHON`` if set,
else ``.venv-sslyze`` in the repository, created on first use with
``python3 -m venv`` and ``pip install`` of :data:`SSLYZE_REQUIREMENT`.

The gateway uses its generated development certificate (ECDSA P-256, 365
days, SHA-256), so the one finding expected is that the certificate is not
trusted; every other compliance check must pass, and the scan's JSON is
checked directly for protocols, suites, groups and known vulnerabilities.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import reactor, threads

from mailgate.testing import FakeEmailAPI
from tests.integration.conftest import running_gateway

REPO = Path(__file__).resolve().parents[2]
SSLYZE_REQUIREMENT = "sslyze>=6.1,<7"
ALLOWED_FINDINGS = {"certificate_path_validation"}  # The self-signed test certificate.
MOZILLA_GROUPS = {"X25519", "secp256r1", "prime256v1", "secp384r1"}


def sslyze_python() -> str:
    """The interpreter that has sslyze, creating ``.venv-sslyze`` when needed."""
    configured = os.environ.get("MAILGATE_SSLYZE_PYTHON")
    if configured:
        return configured
    venv = REPO / ".venv-sslyze"
    python = venv / "bin" / "python"
    probe = subprocess.run([str(python), "-c", "import sslyze"], capture_output=True) if python.exists() else None
    if probe is None or probe.returncode != 0:
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", "--clear", str(venv)], check=True, timeout=300)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", SSLYZE_REQUIREMENT], check=True, timeout=900
        )
    return str(python)


def scan(python: str, port: int, starttls: bool, out: Path) -> tuple[int, str]:
    args = [python, "-m", "sslyze", "--mozilla_config=intermediate", f"--json_out={out}"]
    if starttls:
        args.append("--starttls=smtp")
    completed = subprocess.run(
        [*args, f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=600, check=False
    )
    return completed.returncode, completed.stdout + completed.stderr


def compliance_findings(output: str, port: int) -> set[str]:
    """The criteria sslyze's compliance check failed for ``127.0.0.1:port``."""
    section = output.split("COMPLIANCE AGAINST TLS CONFIGURATION", 1)
    assert len(section) == 2, f"no compliance section in sslyze output:\n{output}"
    text = section[1]
    target = f"127.0.0.1:{port}: "
    verdict = next((line for line in text.splitlines() if line.strip().startswith(target)), None)
    assert verdict is not None, f"no compliance verdict for {target}:\n{text}"
    if "OK - Compliant" in verdict:
        return set()
    assert "FAILED - Not compliant" in verdict, verdict
    return set(re.findall(r"^\s+\* (\w+):", text, re.MULTILINE))


def check_scan_json(path: Path) -> None:
    """Protocols, suites, groups and vulnerabilities straight from the scan results."""
    (result,) = json.loads(path.read_text())["server_scan_results"]
    assert result["connectivity_status"] == "COMPLETED", result["connectivity_error_trace"]
    scans: dict[str, Any] = result["scan_result"]

    def accepted(name: str) -> list[str]:
        assert scans[name]["status"] == "COMPLETED", scans[name]
        return [suite["cipher_suite"]["name"] for suite in scans[name]["result"]["accepted_cipher_suites"]]

    for old in ("ssl_2_0_cipher_suites", "ssl_3_0_cipher_suites", "tls_1_0_cipher_suites", "tls_1_1_cipher_suites"):
        assert accepted(old) == [], old
    tls12 = accepted("tls_1_2_cipher_suites")
    assert tls12 and all(re.fullmatch(r"TLS_ECDHE_\w+_WITH_(AES_\d+_GCM_SHA\d+|CHACHA20_POLY1305_SHA256)", s) for s in tls12), tls12
    assert accepted("tls_1_3_cipher_suites")
    groups = {curve["name"] for curve in scans["elliptic_curves"]["result"]["supported_curves"]}
    assert groups and groups <= MOZILLA_GROUPS, groups
    assert scans["heartbleed"]["result"]["is_vulnerable_to_heartbleed"] is False
    assert scans["openssl_ccs_injection"]["result"]["is_vulnerable_to_ccs_injection"] is False
    assert scans["tls_compression"]["result"]["supports_compression"] is False
    assert scans["robot"]["result"]["robot_result"].startswith("NOT_VULNERABLE")
    renegotiation = scans["session_renegotiation"]["result"]
    assert renegotiation["is_vulnerable_to_client_renegotiation_dos"] is False
    assert renegotiation["supports_secure_renegotiation"] is True


def write_dev_certificate_config(tmp: Path, api_url: str) -> Path:
    """STARTTLS submission and implicit-TLS submissions, no [tls]: the development certificate."""
    config = tmp / "mailgate.toml"
    config.write_text(
        f"""
[server]
hostname = "localhost"
state_dir = "{tmp / 'state'}"

[[listeners]]
endpoint = "tcp:0:interface=127.0.0.1"
role = "submission"

[[listeners]]
endpoint = "tcp:0:interface=127.0.0.1"
role = "submissions"

[accounts]
store = "passthrough"
provider = "api"
password_settings = ["token"]

[providers.api]
type = "webhook"
url = "{api_url}/v1/emails"
""",
        encoding="utf-8",
    )
    return config


@pytest_twisted.ensureDeferred
async def test_sslyze_mozilla_intermediate_on_587_and_465(tmp_path: Path) -> None:
    """sslyze finds nothing but the untrusted development certificate on 587 (after
    STARTTLS) and 465, and the raw results show TLS 1.2+ with AEAD/ECDHE only."""
    python = await threads.deferToThread(sslyze_python)
    api = FakeEmailAPI()
    await api.start(reactor)
    config = write_dev_certificate_config(tmp_path, api.url)
    async for gateway in running_gateway(config, api, tmp_path / "state" / "tls" / "dev-cert.pem"):
        starttls = threads.deferToThread(scan, python, gateway.ports["submission"], True, tmp_path / "587.json")
        implicit = threads.deferToThread(scan, python, gateway.ports["submissions"], False, tmp_path / "465.json")
        (code_587, output_587), (code_465, output_465) = await starttls, await implicit
    for port_role, code, output, json_path in (
        ("submission", code_587, output_587, tmp_path / "587.json"),
        ("submissions", code_465, output_465, tmp_path / "465.json"),
    ):
        port = gateway.ports[port_role]
        findings = compliance_findings(output, port)
        assert findings <= ALLOWED_FINDINGS, f"{port_role}: {findings}\n{output}"
        assert code in (0, 1), output  # 1: "not compliant", for the certificate only.
        check_scan_json(json_path)
    assert api.requests == []

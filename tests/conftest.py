"""Shared fixtures: a fresh SoftHSMv2 token per test session, the real sandbox on loopback.

Everything runs against real components: PKCS#11 to SoftHSMv2 (in a temp dir, via
SOFTHSM2_CONF, never the machine-wide store), HTTP to the sandbox server, real
Unix sockets. Tests needing SoftHSM skip with the reason when it is not installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

PIN = "123456"
SO_PIN = "12345678"
LABEL = "tm-test"
KEY_LABEL = "tm-api-key"


@dataclass(frozen=True)
class SoftHsm:
    conf: Path
    module: str
    label: str
    pin: str
    so_pin: str
    dir: Path

    def init_token(self, label: str) -> str:
        """Initialise another token in the same store; returns its serial."""
        subprocess.run(
            ["softhsm2-util", "--init-token", "--free", "--label", label,
             "--pin", self.pin, "--so-pin", self.so_pin],
            check=True, capture_output=True, env={**os.environ, "SOFTHSM2_CONF": str(self.conf)},
        )
        out = subprocess.run(["softhsm2-util", "--show-slots"], check=True, capture_output=True,
                             text=True, env={**os.environ, "SOFTHSM2_CONF": str(self.conf)}).stdout
        block = out.split(f"Label:            {label}")[0].rsplit("Serial number:", 1)[1]
        return block.split()[0]


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsm]:
    from tm_hsm_agent.config import default_module

    module = default_module()
    if module is None or shutil.which("softhsm2-util") is None:
        pytest.skip("SoftHSMv2 is not installed (make test installs it: apt-get install softhsm2)")
    base = tmp_path_factory.mktemp("softhsm")
    conf = subprocess.run(
        [str(ROOT / "softhsm-config" / "init-token.sh"), str(base), LABEL, PIN, SO_PIN],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    old = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = conf
    yield SoftHsm(Path(conf), module, LABEL, PIN, SO_PIN, base)
    if old is None:
        os.environ.pop("SOFTHSM2_CONF", None)
    else:
        os.environ["SOFTHSM2_CONF"] = old


@pytest.fixture(scope="session")
def session_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("state")


@pytest.fixture(scope="session")
def hsm_key(softhsm: SoftHsm, session_state: Path):
    """The session's P-256 key, generated on the SoftHSM token once."""
    from tm_hsm_agent.pin import Pin
    from tm_hsm_agent.token import IdentityPins, TokenHandle

    handle = TokenHandle(
        softhsm.module, token_label=softhsm.label, key_label=KEY_LABEL,
        pin_source=lambda: Pin(PIN, "test"), identity=IdentityPins(session_state / "identity.json"),
        rw=True,
    )
    try:
        info = handle.generate_key()
    finally:
        handle.close()
    return info


@pytest.fixture
def sandbox():
    from tm_hsm_agent.sandbox import SandboxServer

    with SandboxServer("127.0.0.1", 0) as server:
        yield server


@pytest.fixture
def agent_env(softhsm: SoftHsm, hsm_key, sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Environment for the CLI/agent: the session token, a registered key, this test's state."""
    from cryptography.hazmat.primitives import serialization

    pem = hsm_key.public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    key_id = sandbox.state.register_key(pem)
    env = {
        "SOFTHSM2_CONF": str(softhsm.conf),
        "TM_PKCS11_MODULE": softhsm.module,
        "TM_TOKEN_LABEL": softhsm.label,
        "TM_KEY_LABEL": KEY_LABEL,
        "TM_PIN": PIN,
        "TM_KEY_ID": key_id,
        "TM_AUTH_URL": sandbox.url,
        "XDG_STATE_HOME": str(tmp_path / "state"),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "XDG_RUNTIME_DIR": str(tmp_path / "run"),
        "TM_AGENT_SOCKET": str(tmp_path / "run" / "agent.sock"),
    }
    for k in ("TM_ENV", "TM_PIN_FILE", "TM_TOKEN_SERIAL", "TM_HSM_AGENT_CONFIG", "TM_JWKS_URL"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env

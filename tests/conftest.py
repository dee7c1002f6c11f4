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
        why = "SoftHSMv2 is not installed (make test installs it: apt-get install softhsm2)"
        if os.environ.get("CI"):
            pytest.fail(f"{why}; in CI the real-token tests must run")
        pytest.skip(why)
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
def sandbox(request: pytest.FixtureRequest):
    """The real sandbox on loopback; parametrize indirectly with SandboxOptions fields."""
    from tm_hsm_agent.sandbox import SandboxOptions, SandboxServer

    options = SandboxOptions(**getattr(request, "param", {}))
    with SandboxServer("127.0.0.1", 0, options) as server:
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


class RunningAgent:
    """`tm-hsm-agent serve` in a subprocess, as systemd would run it."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.env = env
        self.socket = Path(env["TM_AGENT_SOCKET"])
        self.log = Path(env["XDG_STATE_HOME"]).parent / f"agent-{id(self)}.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._log_fh = self.log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tm_hsm_agent", "-v", "serve", *args],
            env={**os.environ, **env}, stdout=self._log_fh, stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 30.0) -> RunningAgent:
        from helpers import wait_for

        from tm_hsm_agent import client

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited {self.proc.returncode}: {self.output()}")
            try:
                return client.request("GET", "/healthz", self.socket, timeout=2)[0] == 200
            except Exception:
                return False

        wait_for(ready, timeout, what="agent /healthz")
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError("agent did not stop on SIGTERM") from None
        self._log_fh.close()
        return self.proc.returncode


@pytest.fixture
def start_agent(agent_env):
    agents: list[RunningAgent] = []

    def start(*args: str, env: dict[str, str] | None = None, ready: bool = True) -> RunningAgent:
        agent = RunningAgent({**agent_env, **(env or {})}, *args)
        agents.append(agent)
        return agent.wait_ready() if ready else agent

    yield start
    for agent in agents:
        if agent.proc.poll() is None:
            agent.proc.kill()
            agent.proc.wait()


P11KIT_CLIENT_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so",
    "/usr/lib/aarch64-linux-gnu/pkcs11/p11-kit-client.so",
    "/usr/lib/pkcs11/p11-kit-client.so",
)


class P11KitServer:
    """`p11-kit server` exporting the SoftHSM token over a Unix socket: a network HSM stand-in.

    Killing its process group is "the HSM dropped off the network"; SIGSTOP is "it hangs".
    """

    def __init__(self, softhsm: SoftHsm, directory: Path) -> None:
        self.softhsm = softhsm
        self.path = directory / "p11kit.sock"
        self.address = f"unix:path={self.path}"
        self.client_module = next((p for p in P11KIT_CLIENT_CANDIDATES if os.path.exists(p)), None)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> P11KitServer:
        from helpers import wait_for

        self.path.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            ["p11-kit", "server", "-f", "-n", str(self.path), "--provider", self.softhsm.module,
             f"pkcs11:token={self.softhsm.label}"],
            env={**os.environ, "SOFTHSM2_CONF": str(self.softhsm.conf)},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        wait_for(self.path.exists, 15, what="p11-kit server socket")
        return self

    def kill(self) -> None:
        import signal

        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.path.unlink(missing_ok=True)

    def pause(self) -> None:
        import signal

        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        import signal

        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGCONT)


@pytest.fixture
def p11kit(softhsm: SoftHsm, tmp_path: Path):
    if shutil.which("p11-kit") is None:
        pytest.skip("p11-kit is not installed (apt-get install p11-kit p11-kit-modules)")
    server = P11KitServer(softhsm, tmp_path)
    if server.client_module is None:
        pytest.skip("p11-kit-client.so is not installed (apt-get install p11-kit-modules)")
    server.start()
    yield server
    if server.proc is not None and server.proc.poll() is None:
        server.resume()
    server.kill()

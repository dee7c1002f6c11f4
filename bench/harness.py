"""Set-up shared by the benchmark and the soak: a throw-away SoftHSMv2 token with a key,
the sandbox, optionally a p11-kit server in front of the token, and the agent process."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tm_hsm_agent import client  # noqa: E402
from tm_hsm_agent.config import default_module  # noqa: E402
from tm_hsm_agent.pin import Pin  # noqa: E402
from tm_hsm_agent.sandbox import SandboxOptions, SandboxServer  # noqa: E402
from tm_hsm_agent.token import TokenHandle  # noqa: E402

PIN = "123456"
LABEL = "tm-bench"
P11KIT_CLIENT = "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so"


class Harness:
    def __init__(self, sandbox_options: SandboxOptions | None = None, remote: bool = False) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="tm-bench-"))
        self.module = default_module()
        if self.module is None:
            raise SystemExit("SoftHSMv2 is not installed: run `make test` or `make demo` first")
        self.conf = subprocess.run(
            [str(ROOT / "softhsm-config" / "init-token.sh"), str(self.dir / "softhsm"), LABEL, PIN],
            check=True, capture_output=True, text=True,
        ).stdout.strip()
        os.environ["SOFTHSM2_CONF"] = self.conf
        handle = TokenHandle(self.module, token_label=LABEL, key_label="tm-api-key",
                             pin_source=lambda: Pin(PIN, "bench"), rw=True)
        try:
            self.key = handle.generate_key()
        finally:
            handle.close()
        self.sandbox = SandboxServer("127.0.0.1", 0, sandbox_options).start()
        pem = self.key.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()
        self.key_id = self.sandbox.state.register_key(pem)
        self.socket = self.dir / "run" / "agent.sock"
        self.p11kit: subprocess.Popen[bytes] | None = None
        self.p11kit_socket = self.dir / "p11kit.sock"
        self.remote = remote
        if remote:
            self.start_token_server()
        self.agent: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        env = {
            **os.environ,
            "SOFTHSM2_CONF": self.conf,
            "TM_PKCS11_MODULE": self.module if not self.remote else P11KIT_CLIENT,
            "TM_TOKEN_LABEL": LABEL,
            "TM_PIN": PIN,
            "TM_KEY_ID": self.key_id,
            "TM_AUTH_URL": self.sandbox.url,
            "TM_AGENT_SOCKET": str(self.socket),
            "XDG_STATE_HOME": str(self.dir / "state"),
            "XDG_CONFIG_HOME": str(self.dir / "config"),
        }
        if self.remote:
            env["P11_KIT_SERVER_ADDRESS"] = f"unix:path={self.p11kit_socket}"
        return env

    # -- the remote token -----------------------------------------------------------------

    def start_token_server(self) -> None:
        self.p11kit_socket.unlink(missing_ok=True)
        self.p11kit = subprocess.Popen(
            ["p11-kit", "server", "-f", "-n", str(self.p11kit_socket), "--provider", str(self.module),
             f"pkcs11:token={LABEL}"],
            env={**os.environ, "SOFTHSM2_CONF": self.conf}, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True,
        )
        deadline = time.monotonic() + 15
        while not self.p11kit_socket.exists():
            if time.monotonic() > deadline:
                raise RuntimeError("p11-kit server did not start")
            time.sleep(0.05)

    def drop_token_server(self) -> None:
        if self.p11kit is not None and self.p11kit.poll() is None:
            os.killpg(self.p11kit.pid, signal.SIGKILL)
            self.p11kit.wait()
        self.p11kit_socket.unlink(missing_ok=True)

    # -- the agent ---------------------------------------------------------------------------

    def start_agent(self, *args: str, timeout: float = 30.0) -> subprocess.Popen[bytes]:
        log = (self.dir / "agent.log").open("ab")
        self.agent = subprocess.Popen(
            [sys.executable, "-m", "tm_hsm_agent", "serve", *args], env=self.env(),
            stdout=log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                if client.request("GET", "/healthz", self.socket, timeout=2)[0] == 200:
                    return self.agent
            except Exception:  # noqa: BLE001 - not up yet
                pass
            if self.agent.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"agent did not start; see {self.dir / 'agent.log'}")
            time.sleep(0.02)

    def stop_agent(self) -> int | None:
        if self.agent is None:
            return None
        if self.agent.poll() is None:
            self.agent.terminate()
            try:
                self.agent.wait(20)
            except subprocess.TimeoutExpired:
                self.agent.kill()
                self.agent.wait()
        return self.agent.returncode

    def close(self) -> None:
        self.stop_agent()
        self.drop_token_server()
        self.sandbox.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def proc_usage(pid: int) -> tuple[float, int]:
    """(RSS in MB, open file descriptors) of a process, from /proc."""
    rss_kb = 0
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                rss_kb = int(line.split()[1])
    return rss_kb / 1024, len(os.listdir(f"/proc/{pid}/fd"))

"""Small helpers shared by tests: run the CLI as a user would, poll instead of sleeping."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


def cli(*args: str, env: dict[str, str] | None = None, input: str | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run `tm-hsm-agent ARGS` in a fresh interpreter with the given environment."""
    return subprocess.run(
        [sys.executable, "-m", "tm_hsm_agent", *args],
        env={**os.environ, **(env or {})}, input=input, capture_output=True, text=True,
        timeout=timeout,
    )


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.05,
             what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class SoftSigner:
    """The signer seam with a software P-256 key (unit tests of the layers above the token).

    ``broken`` makes it return a well-formed 64-byte signature that verifies for nothing.
    """

    def __init__(self) -> None:
        from cryptography.hazmat.primitives.asymmetric import ec

        self.key = ec.generate_private_key(ec.SECP256R1())
        self.calls: list[tuple[str, int, str]] = []
        self.broken = False

    def pem(self) -> str:
        from cryptography.hazmat.primitives import serialization

        return self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()

    def sign_challenge(self, key_id: str, timestamp: int, purpose: str = "mint") -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec

        from tm_hsm_agent.jose import b64url_encode, der_to_raw

        self.calls.append((key_id, timestamp, purpose))
        if self.broken:
            return b64url_encode(bytes(range(64)))
        der = self.key.sign(f"{key_id}.{timestamp}".encode("ascii"), ec.ECDSA(hashes.SHA256()))
        return b64url_encode(der_to_raw(der))


# -- running something as an unprivileged user ---------------------------------------------
# CI runs as root, where file modes prove nothing, so permission tests run their client as
# uid 65534 (nobody). The checkout may sit below a directory nobody cannot search (a
# `mktemp -d`, /root): nobody then gets a world-readable copy of what it needs.

NOBODY = 65534
_ROOT = Path(__file__).resolve().parent.parent
_nobody_tree: Path | None = None


def nobody_tree() -> Path:
    """A 0755 copy of the package and the set-up scripts, outside any private directory."""
    global _nobody_tree
    if _nobody_tree is None:
        base = Path(tempfile.mkdtemp(prefix="tm-nobody-"))
        os.chmod(base, 0o755)
        shutil.copytree(_ROOT / "tm_hsm_agent", base / "tm_hsm_agent",
                        ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(_ROOT / "softhsm-config", base / "softhsm-config")
        for p in base.rglob("*"):
            os.chmod(p, 0o755 if p.is_dir() or os.access(p, os.X_OK) else 0o644)
        atexit.register(shutil.rmtree, base, True)
        _nobody_tree = base
    return _nobody_tree


def _setpriv() -> list[str]:
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to an unprivileged user")
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed")
    return [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


def nobody_python() -> str:
    """An interpreter uid 65534 can run (the venv's may be below a private directory)."""
    for python in (sys.executable, os.path.realpath(sys.executable), "/usr/bin/python3"):
        ok = subprocess.run([*_setpriv(), python, "-c", "print(1)"],
                            capture_output=True, text=True, timeout=30, cwd="/")
        if ok.returncode == 0:
            return python
    pytest.skip("no Python interpreter is usable by uid 65534")


def run_as_nobody(argv: list[str], env: dict[str, str] | None = None,
                  timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` as uid/gid 65534 with no supplementary groups, from /."""
    return subprocess.run([*_setpriv(), *argv], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd="/")


def python_as_nobody(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -c code args`` as uid 65534, importing tm_hsm_agent from nobody's copy.

    Only modules that need nothing beyond the standard library can be used this way
    (client, pin, paths, errors): the copy has the package, not its dependencies.
    """
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/",
           "PYTHONPATH": str(nobody_tree())}
    return run_as_nobody([nobody_python(), "-c", code, *args], env=env)

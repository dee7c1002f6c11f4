"""Small helpers shared by tests: run the CLI as a user would, poll instead of sleeping."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any


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

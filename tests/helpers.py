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

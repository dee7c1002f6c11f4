"""Locate the shared public test vectors (Wycheproof, RFC examples).

They live outside the repository, beside the checkout (``<repo>/../shared/vectors``),
so a bare clone still runs the unit tests; the vector tests then skip with a message
that says where they looked (in CI, with ``CI`` set, they fail instead).
``TM_VECTORS_DIR`` points somewhere else.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def vectors_dir() -> pathlib.Path:
    """``$TM_VECTORS_DIR`` if set, else ``<repo>/../shared/vectors``."""
    override = os.environ.get("TM_VECTORS_DIR")
    if override:
        return pathlib.Path(override)
    return REPO_ROOT.parent / "shared" / "vectors"


def load(name: str) -> dict[str, Any]:
    """Parse the JSON vector file ``name`` (relative to the vectors dir).

    Skips the calling test when the directory is absent; a missing *file* inside a
    present directory is an error, not a skip, so a renamed vector cannot go quiet.
    """
    base = vectors_dir()
    if not base.is_dir():
        why = f"public vectors not found at {base} (../shared/vectors beside the checkout)"
        if os.environ.get("CI"):
            pytest.fail(f"{why}; in CI they must run")  # a skip there would hide a lost suite
        pytest.skip(why)
    with (base / name).open(encoding="utf-8") as f:
        data: dict[str, Any] = json.load(f)
    return data

"""The 60-second soak (bench/soak.py) as part of `make test`: its verdict is the test."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT


@pytest.mark.slow
def test_soak_60s(softhsm, tmp_path):
    if shutil.which("p11-kit") is None:
        pytest.skip("p11-kit is not installed")
    out = tmp_path / "soak.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "soak.py"), "--duration", "60", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert out.exists(), result.stdout + result.stderr
    report = json.loads(out.read_text())
    print(json.dumps(report, indent=1))  # shown in full when an assertion below fails
    assert report["expired_tokens_served"] == 0, report
    assert report["failed_requests_while_valid_token"] == 0, report
    assert report["tokens_not_verifying"] == 0, report
    assert report["token_drops"] >= 4 and report["requests"] > 1000, report
    # 4 s tokens for 60 s: mostly refreshed; each cycle's revocations force a mint (one with
    # the token there, one after it comes back)
    assert report["refreshes"] >= 5 and report["refresh_revocations"] >= 8, report
    assert report["mints"] >= 5, report
    assert report["flat"], report
    assert result.returncode == 0, result.stdout + result.stderr

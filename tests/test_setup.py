"""The set-up scripts a newcomer runs first (through make demo / make test)."""

from __future__ import annotations

import os
import shutil
import subprocess

from helpers import nobody_tree, run_as_nobody


def _as_nobody(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    # nobody's copy of the script: the checkout may be below a directory it cannot search
    return run_as_nobody(["bash", str(nobody_tree() / "softhsm-config" / "ensure-deps.sh")], env=env)


def test_installed_packages_are_recognised_for_a_normal_user():
    result = _as_nobody({"PATH": os.environ["PATH"]})
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_missing_packages_print_the_exact_command():
    # A PATH with only what the script itself needs: the tools it checks for are "missing".
    # (Outside pytest's 0700 temp tree, so that nobody can reach it.)
    import tempfile

    base = tempfile.mkdtemp(prefix="tm-deps-")
    try:
        os.chmod(base, 0o755)
        bindir = os.path.join(base, "bin")
        os.mkdir(bindir)
        for tool in ("bash", "id", "python3"):
            os.symlink(shutil.which(tool), os.path.join(bindir, tool))
        result = _as_nobody({"PATH": bindir})
    finally:
        shutil.rmtree(base)
    assert result.returncode == 1
    assert "missing system packages: softhsm2 opensc gnutls-bin p11-kit" in result.stderr
    assert ("sudo apt-get update && sudo apt-get install -y softhsm2 opensc gnutls-bin p11-kit"
            in result.stderr)

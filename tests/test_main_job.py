"""The main job end to end: key on a real SoftHSMv2 token -> sandbox -> minted, verified JWT."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from conftest import KEY_LABEL
from cryptography.hazmat.primitives import serialization
from helpers import cli

from tm_hsm_agent import jose
from tm_hsm_agent.errors import EXIT_API, EXIT_CONFIG, EXIT_PIN, EXIT_TOKEN


def test_key_on_token_is_sign_only_sensitive_never_extractable(softhsm, hsm_key):
    out = subprocess.run(
        ["pkcs11-tool", "--module", softhsm.module, "--token-label", softhsm.label,
         "--login", "--pin", softhsm.pin, "--list-objects", "--type", "privkey"],
        capture_output=True, text=True, check=True,
    ).stdout
    block = out.split("Private Key Object; EC")[1]
    assert f"label:      {KEY_LABEL}" in block
    assert "Usage:      sign\n" in block  # no derive, decrypt or unwrap
    assert "sensitive" in block and "never extractable" in block
    assert hsm_key.cka_id  # both halves share it
    assert hsm_key.cka_id.hex().upper() in out.upper().replace(" ", "") or hsm_key.cka_id.hex() in out


def test_keygen_refuses_to_overwrite(agent_env):
    result = cli("keygen", env=agent_env)
    assert result.returncode == EXIT_TOKEN
    assert "refusing to overwrite" in result.stderr
    assert "Traceback" not in result.stderr


def test_pubkey_pem_and_jwk_match_the_token_key(agent_env, hsm_key):
    pem = cli("pubkey", "--format", "pem", env=agent_env)
    assert pem.returncode == 0, pem.stderr
    loaded = serialization.load_pem_public_key(pem.stdout.encode())
    assert loaded.public_numbers() == hsm_key.public_key.public_numbers()
    jwk = json.loads(cli("pubkey", "--format", "jwk", env=agent_env).stdout)
    assert jwk["thumbprint"] == jose.jwk_thumbprint(jwk["jwk"]) == hsm_key.thumbprint
    assert jwk["jwk"]["crv"] == "P-256"


def test_mint_json_returns_a_token_that_verifies(agent_env, sandbox):
    result = cli("mint", "--json", env=agent_env)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert set(answer) == {"access_token", "refresh_token", "expires_in", "token_type"}
    assert answer["token_type"] == "Bearer"
    jwt = jose.verify_jwt(answer["access_token"], sandbox.state.jwks(), now=sandbox.state.now())
    assert jwt.claims["sub"] == agent_env["TM_KEY_ID"]
    assert jwt.header["alg"] == "RS256"
    assert sandbox.state.stats()["mints"] == 1
    verified = cli("verify", answer["access_token"], env=agent_env)
    assert verified.returncode == 0, verified.stderr
    assert json.loads(verified.stdout)["claims"]["sub"] == agent_env["TM_KEY_ID"]


def test_mint_prints_just_the_access_token(agent_env, sandbox):
    result = cli("mint", env=agent_env)
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    jose.verify_jwt(token, sandbox.state.jwks(), now=sandbox.state.now())


@pytest.mark.parametrize("offset", [75.0, -75.0])
def test_server_clock_75s_off_still_yields_a_token(agent_env, sandbox, offset):
    sandbox.state.set_clock_offset(offset)
    result = cli("mint", "--json", env=agent_env)
    assert result.returncode == 0, result.stderr
    token = json.loads(result.stdout)["access_token"]
    jose.verify_jwt(token, sandbox.state.jwks(), now=sandbox.state.now())
    stats = sandbox.state.stats()
    assert stats["mints"] == 1 and stats["mint_attempts"] == 2  # one refused, one corrected


def test_unknown_key_id_is_a_clear_api_error(agent_env):
    env = {**agent_env, "TM_KEY_ID": "7d6c1a52-0b0e-4e55-9a3c-1f1f2f3f4f5f"}
    result = cli("mint", env=env)
    assert result.returncode == EXIT_API
    assert "401" in result.stderr and "Traceback" not in result.stderr


def test_wrong_pin_is_refused_with_pin_status(agent_env):
    result = cli("mint", env={**agent_env, "TM_PIN": "000000"})
    assert result.returncode == EXIT_PIN
    assert "refused the PIN" in result.stderr
    assert "000000" not in result.stderr


def test_missing_api_selection_names_both_variables(agent_env):
    env = {k: v for k, v in agent_env.items() if k != "TM_AUTH_URL"}
    result = cli("mint", env={**env, "TM_AUTH_URL": ""})
    assert result.returncode == EXIT_CONFIG
    assert "TM_ENV" in result.stderr and "TM_AUTH_URL" in result.stderr


def test_bad_env_value_names_key_and_source(agent_env):
    result = cli("mint", env={**agent_env, "TM_AUTH_URL": "", "TM_ENV": "prod"})
    assert result.returncode == EXIT_CONFIG
    assert "environment TM_ENV" in result.stderr and "production" in result.stderr


def test_missing_token_is_a_clear_error(agent_env):
    result = cli("pubkey", env={**agent_env, "TM_TOKEN_LABEL": "no-such-token"})
    assert result.returncode == EXIT_TOKEN
    assert "no such token" in result.stderr and "Traceback" not in result.stderr
    assert "tokens there: 'tm-test'" in result.stderr  # so a typo in the label shows itself


def test_keygen_refuses_a_cka_id_already_in_use(agent_env):
    # On a YubiKey a CKA_ID is a PIV slot: a second key with the same ID would replace the
    # first there, and on other tokens two keys with one ID made every lookup fail.
    first = cli("--key-label", "tm-slot-a", "keygen", "--cka-id", "0a", env=agent_env)
    assert first.returncode == 0, first.stderr
    second = cli("--key-label", "tm-slot-b", "keygen", "--cka-id", "0A", env=agent_env)
    assert second.returncode == EXIT_TOKEN
    assert "CKA_ID 0a is already used by the key labelled 'tm-slot-a'" in second.stderr
    assert "Traceback" not in second.stderr and "Exception ignored" not in second.stderr
    for label, code in (("tm-slot-a", 0), ("tm-slot-b", EXIT_TOKEN)):
        result = cli("--key-label", label, "pubkey", env=agent_env)
        assert result.returncode == code, result.stderr
    assert "no EC private key labelled 'tm-slot-b'" in result.stderr


def test_a_pin_in_the_config_file_is_refused_with_what_to_do(agent_env, tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('pin = "123456"\n')
    result = cli("--config", str(config), "pubkey", env=agent_env)
    assert result.returncode == EXIT_CONFIG
    assert "may not be stored in the config file" in result.stderr and "pin_file" in result.stderr
    assert "123456" not in result.stderr


def test_token_json_and_header_together_is_a_usage_error(agent_env):
    result = cli("token", "--json", "--header", env=agent_env)
    assert result.returncode == 2 and "choose one of --json and --header" in result.stderr


def test_sandbox_serve_logs_why_it_refused_and_stops_cleanly_on_sigterm(agent_env, tmp_path):
    import sys
    import time

    from helpers import wait_for

    port_file = tmp_path / "port"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tm_hsm_agent", "sandbox", "serve", "--port", "0",
         "--port-file", str(port_file)],
        stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_for(lambda: port_file.exists() and port_file.read_text().strip(), 30, what="port file")
        url = f"http://127.0.0.1:{port_file.read_text().strip()}/v1/auth"
        refused = cli("mint", env={**agent_env, "TM_AUTH_URL": url})  # key not registered there
        assert refused.returncode == EXIT_API and "HTTP 401: unauthorized" in refused.stderr
        started = time.monotonic()
        proc.terminate()
        assert proc.wait(timeout=30) == 0
        assert time.monotonic() - started < 10
    finally:
        if proc.poll() is None:
            proc.kill()
        err = proc.stderr.read() if proc.stderr else ""
    assert "unknown or revoked API key" in err  # the cause, in the sandbox's own log


def test_sandbox_fault_and_revoke_from_the_cli(sandbox, agent_env):
    origin = sandbox.origin
    set_fault = cli("sandbox", "fault", "--url", origin, "--mode", "status", "--status", "429",
                    "--retry-after", "2", "--count", "1", "--endpoint", "mint")
    assert set_fault.returncode == 0, set_fault.stderr
    refused = cli("mint", env=agent_env)
    assert refused.returncode != 0 and "429" in refused.stderr
    ok = cli("mint", env=agent_env)  # the fault was for one request only
    assert ok.returncode == 0, ok.stderr
    assert cli("sandbox", "fault", "--url", origin, "--count", "-1").returncode == 0
    assert cli("mint", env=agent_env).returncode != 0
    assert cli("sandbox", "fault", "--url", origin, "--clear").returncode == 0
    assert cli("mint", env=agent_env).returncode == 0
    revoked = cli("sandbox", "revoke", "--url", origin)
    assert revoked.returncode == 0 and json.loads(revoked.stdout)["revoked"] >= 1


def test_non_uuid_key_id_is_refused_before_anything_is_signed(agent_env):
    result = cli("mint", env={**agent_env, "TM_KEY_ID": "not-a-uuid"})
    assert result.returncode == EXIT_CONFIG
    assert "key_id from environment TM_KEY_ID" in result.stderr and "UUID" in result.stderr
    audit = os.path.join(agent_env["XDG_STATE_HOME"], "tm-hsm-agent", "audit.log")
    assert not os.path.exists(audit) or '"event":"sign"' not in open(audit).read()


def test_empty_pin_file_is_refused_without_a_login(agent_env, tmp_path):
    pin_file = tmp_path / "pin"
    pin_file.write_text("")
    os.chmod(pin_file, 0o600)
    env = {**agent_env, "TM_PIN": "", "TM_PIN_FILE": str(pin_file)}
    result = cli("pubkey", env=env)
    assert result.returncode == EXIT_CONFIG
    assert "is empty" in result.stderr


def test_verify_garbage_is_a_verification_error(agent_env):
    from tm_hsm_agent.errors import EXIT_VERIFY

    result = cli("verify", "not.a.jwt", env=agent_env)
    assert result.returncode == EXIT_VERIFY
    assert result.stderr.startswith("tm-hsm-agent: error: token does not verify")

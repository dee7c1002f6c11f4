"""Faults with real components: a remote token that drops or hangs (p11-kit server), wrong
PINs counted with pkcs11-spy, an Auth API outage, kill -9 mid-mint."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
from helpers import cli, wait_for

from tm_hsm_agent import client, jose
from tm_hsm_agent.errors import EXIT_PIN, EXIT_TOKEN, AgentError

SPY_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/pkcs11/pkcs11-spy.so",
    "/usr/lib/x86_64-linux-gnu/pkcs11-spy.so",
    "/usr/lib/aarch64-linux-gnu/pkcs11/pkcs11-spy.so",
)


def _valid(token: str, sandbox) -> dict:
    return jose.verify_jwt(token, sandbox.state.jwks(), now=sandbox.state.now()).claims


def _ask(agent) -> tuple[int, dict, float]:
    started = time.monotonic()
    status, body = client.request("GET", "/v1/token", agent.socket, timeout=30)
    return status, body, time.monotonic() - started


def _remote_env(p11kit) -> dict[str, str]:
    return {
        "TM_PKCS11_MODULE": p11kit.client_module,
        "P11_KIT_SERVER_ADDRESS": p11kit.address,
        "TM_TOKEN_TIMEOUT": "2",
        "TM_BACKOFF_CAP": "2",
    }


@pytest.mark.parametrize("sandbox", [{"access_ttl": 4.0}], indirect=True)
def test_remote_token_drops_refresh_continues_then_503_then_recovers(start_agent, sandbox, p11kit):
    agent = start_agent("--prefetch", env=_remote_env(p11kit))
    _valid(client.get_token(agent.socket), sandbox)

    p11kit.kill()  # the HSM drops off the network
    refreshes_before = sandbox.state.stats()["refreshes"]
    end = time.monotonic() + 6
    while time.monotonic() < end:
        status, body, took = _ask(agent)
        assert status == 200, body
        _valid(body["access_token"], sandbox)
        time.sleep(0.1)
    assert sandbox.state.stats()["refreshes"] >= refreshes_before + 1  # refresh needs no HSM
    wait_for(lambda: client.status(agent.socket)["hsm_present"] is False, 10, what="HSM absent")
    status, metrics = client.request_raw("GET", "/metrics", agent.socket)
    assert status == 200 and b"\ntm_agent_hsm_present 0\n" in metrics

    # Now a new signature is needed and the HSM is gone: 503 with a reason, never an expired
    # token, never a hang.
    sandbox.state.revoke_refresh_tokens()
    saw_503 = None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        status, body, took = _ask(agent)
        assert took < 8.0, f"a request took {took:.1f}s"
        if status == 200:
            _valid(body["access_token"], sandbox)
        else:
            assert status == 503 and body["message"]
            saw_503 = body
            break
        time.sleep(0.1)
    assert saw_503 is not None, "expected 503s once the cached token ran out"

    p11kit.start()  # it comes back: same agent process recovers within 15 s
    restarted = time.monotonic()

    def recovered() -> bool:
        status, body, _ = _ask(agent)
        return status == 200 and bool(_valid(body["access_token"], sandbox))

    wait_for(recovered, 15, interval=0.2, what="valid tokens after the HSM returned")
    assert time.monotonic() - restarted < 15
    assert agent.proc.poll() is None
    wait_for(lambda: client.status(agent.socket)["hsm_present"] is True, 10, what="HSM present")
    assert agent.stop() == 0


@pytest.mark.parametrize("sandbox", [{"access_ttl": 30.0}], indirect=True)
def test_hung_token_does_not_hang_clients(start_agent, sandbox, p11kit):
    agent = start_agent("--prefetch", env=_remote_env(p11kit))
    first = client.get_token(agent.socket)
    p11kit.pause()  # SIGSTOP: calls into the module now block
    try:
        # the cached token keeps being served at once
        for _ in range(5):
            status, body, took = _ask(agent)
            assert status == 200 and body["access_token"] == first and took < 2.0
        # a forced re-mint needs the token: the agent must answer within a few seconds
        sandbox.state.revoke_refresh_tokens()
        started = time.monotonic()
        status, body = client.request("POST", "/v1/token/refresh", agent.socket, timeout=30)
        took = time.monotonic() - started
        assert took < 8.0
        assert status == 503, body
        status, body, took = _ask(agent)
        assert took < 8.0 and status in (200, 503)
        st = client.status(agent.socket)
        assert st["hsm_present"] is False
    finally:
        p11kit.resume()

    def recovered() -> bool:
        status, body = client.request("POST", "/v1/token/refresh", agent.socket, timeout=30)
        return status == 200 and body["access_token"] != first

    wait_for(recovered, 15, interval=0.5, what="recovery after the hang")
    assert agent.stop() == 0


def _spy_env(softhsm, tmp_path: Path) -> dict[str, str]:
    spy = next((p for p in SPY_CANDIDATES if os.path.exists(p)), None)
    if spy is None:
        pytest.skip("OpenSC's pkcs11-spy.so is not installed (apt-get install opensc)")
    return {
        "TM_PKCS11_MODULE": spy,
        "PKCS11SPY": softhsm.module,
        "PKCS11SPY_OUTPUT": str(tmp_path / "spy.log"),
    }


def _logins(log: Path) -> int:
    return len(re.findall(r"C_Login\b", log.read_text(errors="replace"))) if log.exists() else 0


def test_wrong_pin_reaches_the_token_once_across_runs(agent_env, softhsm, tmp_path):
    env = {**agent_env, **_spy_env(softhsm, tmp_path), "TM_PIN": "999999"}
    log = tmp_path / "spy.log"
    first = cli("mint", env=env)
    assert first.returncode == EXIT_PIN, first.stderr
    assert _logins(log) == 1
    second = cli("mint", env=env)
    assert second.returncode == EXIT_PIN
    assert "not presented again" in second.stderr and "pin forget" in second.stderr
    assert _logins(log) == 1  # remembered: the second run never presented it
    assert "999999" not in first.stderr + second.stderr
    # a different PIN (the right one) is presented, works, and clears the record
    ok = cli("mint", env={**env, "TM_PIN": softhsm.pin})
    assert ok.returncode == 0, ok.stderr
    assert _logins(log) == 2
    rejected = Path(agent_env["XDG_STATE_HOME"]) / "tm-hsm-agent" / "rejected-pins.json"
    assert json.loads(rejected.read_text()) == {}


def test_serve_with_wrong_pin_exits_with_pin_status_after_one_attempt(start_agent, softhsm, tmp_path):
    env = {**_spy_env(softhsm, tmp_path), "TM_PIN": "999999"}
    agent = start_agent(env=env, ready=False)
    assert agent.proc.wait(30) == EXIT_PIN
    assert "tm-hsm-agent: error: token" in agent.output() and "refused the PIN" in agent.output()
    assert _logins(tmp_path / "spy.log") == 1
    again = start_agent(env=env, ready=False)  # what systemd's restart would do
    assert again.proc.wait(30) == EXIT_PIN
    assert _logins(tmp_path / "spy.log") == 1
    assert "999999" not in agent.output() + again.output()


def test_pin_forget_lets_the_pin_be_tried_again(agent_env):
    env = {**agent_env, "TM_PIN": "999999"}
    assert cli("mint", env=env).returncode == EXIT_PIN
    forgot = cli("pin", "forget", env=env)
    assert forgot.returncode == 0 and "forgot 1" in forgot.stderr
    again = cli("mint", env=env)
    assert again.returncode == EXIT_PIN and "refused the PIN" in again.stderr


def test_a_different_token_under_the_same_label_is_refused(agent_env, softhsm, tmp_path):
    assert cli("pubkey", env=agent_env).returncode == 0  # pins serial + key at first use
    # Another SoftHSM store with a token and key under the same labels: a swapped device.
    import subprocess

    from conftest import ROOT

    other = subprocess.run(
        [str(ROOT / "softhsm-config" / "init-token.sh"), str(tmp_path / "other"), softhsm.label,
         softhsm.pin, softhsm.so_pin], check=True, capture_output=True, text=True,
    ).stdout.strip()
    other_env = {**agent_env, "SOFTHSM2_CONF": other}
    state = {"XDG_STATE_HOME": str(tmp_path / "other-state")}
    assert cli("keygen", env={**other_env, **state}).returncode == 0
    result = cli("pubkey", env=other_env)
    assert result.returncode == EXIT_TOKEN
    assert "refusing a different token or key" in result.stderr
    reset = cli("identity", "reset", env=other_env)
    assert reset.returncode == 0 and "forgot pinned identity" in reset.stderr
    assert cli("pubkey", env=other_env).returncode == 0  # re-pinned to the new token


@pytest.mark.parametrize("sandbox", [{"access_ttl": 6.0}], indirect=True)
def test_api_outage_bounded_requests_and_recovery(start_agent, sandbox):
    agent = start_agent("--prefetch", env={"TM_BACKOFF_CAP": "3"})
    _valid(client.get_token(agent.socket), sandbox)
    before = sandbox.state.stats()
    sandbox.state.set_faults(mode="status", status=503, count=-1)
    end = time.monotonic() + 8
    statuses = set()
    while time.monotonic() < end:
        status, body, took = _ask(agent)
        assert took < 8.0
        statuses.add(status)
        if status == 200:
            _valid(body["access_token"], sandbox)  # never an expired token
        time.sleep(0.1)
    during = sandbox.state.stats()
    sent = (during["refresh_attempts"] + during["mint_attempts"] + during["jwks"]) - (
        before["refresh_attempts"] + before["mint_attempts"] + before["jwks"])
    # backoff 0.5, 1, 2, 3, 3 ... s with jitter: about 6 in 8 s; never a tight loop
    assert 1 <= sent <= 14, sent
    assert during["mints"] == before["mints"]  # a 503 is not a reason to re-sign
    sandbox.state.clear_faults()
    recovered_at = time.monotonic()

    def valid_again() -> bool:
        status, body, _ = _ask(agent)
        return status == 200 and bool(_valid(body["access_token"], sandbox))

    wait_for(valid_again, 10, interval=0.2, what="valid tokens after the outage")
    assert time.monotonic() - recovered_at < 10
    st = client.status(agent.socket)
    assert st["counters"].get("failure:api_transient", 0) >= 1
    assert agent.stop() == 0


def test_status_shows_last_error_and_next_retry(start_agent, sandbox):
    sandbox.state.set_faults(mode="status", status=429, retry_after=2, count=-1)
    agent = start_agent()
    status, body, _ = _ask(agent)
    assert status == 503 and "429" in body["message"]
    st = client.status(agent.socket)
    assert "429" in st["last_error"]
    assert st["last_error_kind"] == "api_transient"
    assert st["next_retry_in_s"] is None or st["next_retry_in_s"] <= 4.0
    sandbox.state.clear_faults()
    wait_for(lambda: _ask(agent)[0] == 200, 10, what="recovery")
    assert agent.stop() == 0


def test_kill9_mid_mint_then_restart_serves_and_audit_is_intact(start_agent, sandbox, agent_env):
    sandbox.state.set_faults(mode="delay", delay=20, endpoints=["mint"], count=1)
    agent = start_agent()
    log = Path(agent_env["XDG_STATE_HOME"]) / "tm-hsm-agent" / "audit.log"

    def signed() -> bool:
        return log.exists() and '"event":"sign"' in log.read_text()

    # ask in the background: the agent signs (audit line fsync'd) then waits on the API
    import threading

    threading.Thread(target=lambda: _try(agent), daemon=True).start()
    wait_for(signed, 15, what="the mint's audit line")
    agent.proc.send_signal(signal.SIGKILL)
    agent.proc.wait()
    sandbox.state.clear_faults()
    again = start_agent()
    _valid(client.get_token(again.socket), sandbox)
    assert again.stop() == 0
    lines = log.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line complete and parseable
    assert sum(r["event"] == "sign" for r in records) == 2


def _try(agent) -> None:
    try:
        client.request("GET", "/v1/token", agent.socket, timeout=30)
    except Exception:  # noqa: BLE001 - the agent is killed under this request on purpose
        pass


def test_sigterm_during_a_mint_exits_cleanly(start_agent, sandbox):
    sandbox.state.set_faults(mode="delay", delay=3, endpoints=["mint"], count=1)
    agent = start_agent()
    import threading

    threading.Thread(target=lambda: _try(agent), daemon=True).start()
    wait_for(lambda: sandbox.state.stats()["mint_attempts"] >= 1, 15, what="a mint in flight")
    started = time.monotonic()
    assert agent.stop(timeout=30) == 0
    assert time.monotonic() - started < 20
    assert not agent.socket.exists()


def test_sigterm_while_the_token_hangs_still_exits(start_agent, sandbox, p11kit):
    agent = start_agent("--prefetch", env=_remote_env(p11kit))
    client.get_token(agent.socket)
    p11kit.pause()
    try:
        sandbox.state.revoke_refresh_tokens()
        # make the agent enter the module and get stuck there (a forced re-mint)
        client.request("POST", "/v1/token/refresh", agent.socket, timeout=30)
        started = time.monotonic()
        assert agent.stop(timeout=30) == 0
        assert time.monotonic() - started < 20
        assert not agent.socket.exists()
    finally:
        p11kit.resume()


def test_sigterm_during_a_slow_forced_refresh_exits_promptly(start_agent, sandbox):
    import threading

    agent = start_agent("--prefetch", env={"TM_HTTP_TIMEOUT": "25"})
    client.get_token(agent.socket)
    sandbox.state.set_faults(mode="delay", delay=30, endpoints=["refresh"], count=1)
    threading.Thread(target=lambda: _try_refresh(agent), daemon=True).start()
    wait_for(lambda: sandbox.state.stats()["refresh_attempts"] >= 1, 15, what="forced refresh")
    started = time.monotonic()
    agent.proc.terminate()
    # The socket goes first, while the agent still gives the refresh in flight its few
    # seconds: a client arriving now learns at once that no agent is there.
    wait_for(lambda: not agent.socket.exists() or agent.proc.poll() is not None, 30,
             what="socket removed")
    assert agent.proc.poll() is None, "the socket stayed until the very end"
    with pytest.raises(AgentError, match="no agent socket"):
        client.get_token(agent.socket, timeout=5)
    assert agent.stop(timeout=60) == 0
    assert time.monotonic() - started < 15  # not the 25 s the refresh could still take


def _try_refresh(agent) -> None:
    try:
        client.request("POST", "/v1/token/refresh", agent.socket, timeout=60)
    except Exception:  # noqa: BLE001 - the agent stops under this request on purpose
        pass

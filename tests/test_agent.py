"""The agent against the real sandbox, a real SoftHSMv2 token and a real Unix socket."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest
from helpers import cli, python_as_nobody, wait_for

from tm_hsm_agent import client, jose
from tm_hsm_agent.errors import EXIT_AGENT


def _raw(sock_path, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes, read until the server closes (or timeout)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(str(sock_path))
    try:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed early (e.g. 431): read what it said
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        s.close()


def _check_valid(token: str, sandbox) -> dict:
    return jose.verify_jwt(token, sandbox.state.jwks(), now=sandbox.state.now()).claims


def test_cold_agent_200_clients_one_mint(start_agent, sandbox):
    agent = start_agent()
    results: list = [None] * 200
    barrier = threading.Barrier(200)

    def ask(i: int) -> None:
        barrier.wait()
        try:
            results[i] = client.get_token_info(agent.socket, timeout=30)
        except Exception as e:  # noqa: BLE001
            results[i] = e

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    errors = [r for r in results if not isinstance(r, dict)]
    assert not errors, errors[:3]
    tokens = {r["access_token"] for r in results}
    assert len(tokens) == 1
    _check_valid(tokens.pop(), sandbox)
    assert sandbox.state.stats()["mints"] == 1
    assert agent.stop() == 0


@pytest.mark.parametrize("sandbox", [{"access_ttl": 6.0}], indirect=True)
def test_short_tokens_only_valid_ones_served_and_refreshed_not_reminted(start_agent, sandbox):
    agent = start_agent()
    seen = set()
    end = time.monotonic() + 15
    while time.monotonic() < end:
        info = client.get_token_info(agent.socket)
        token = info["access_token"]
        if token not in seen:
            seen.add(token)
        # every token handed out verifies and has not expired on the server's clock
        claims = _check_valid(token, sandbox)
        assert claims["exp"] > sandbox.state.now()
        time.sleep(0.05)
    stats = sandbox.state.stats()
    assert stats["mints"] == 1
    assert stats["refreshes"] >= 3  # 15 s of 6 s tokens refreshed at 3 s left
    assert len(seen) >= 3
    status = client.status(agent.socket)
    assert status["counters"]["refresh_ok"] == stats["refreshes"]
    assert agent.stop() == 0


def test_revoked_refresh_token_leads_to_a_fresh_mint(start_agent, sandbox):
    agent = start_agent()
    first = client.get_token(agent.socket)
    assert sandbox.state.revoke_refresh_tokens() >= 1
    status, body = client.request("POST", "/v1/token/refresh", agent.socket)
    assert status == 200, body
    assert body["access_token"] != first
    _check_valid(body["access_token"], sandbox)
    stats = sandbox.state.stats()
    assert stats["mints"] == 2 and stats["refresh_attempts"] == 1 and stats["refreshes"] == 0
    for _ in range(5):
        _check_valid(client.get_token(agent.socket), sandbox)
    assert agent.stop() == 0


def test_token_cli_prints_exactly_what_the_socket_returns(start_agent, agent_env):
    agent = start_agent("--prefetch")
    raw = _raw(agent.socket, b"GET /v1/token HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    body = raw.split(b"\r\n\r\n", 1)[1].decode()
    as_json = cli("token", "--json", env=agent_env)
    assert as_json.returncode == 0, as_json.stderr
    assert as_json.stdout.strip() == body
    plain = cli("token", env=agent_env)
    assert plain.stdout.strip() == json.loads(body)["access_token"]
    header = cli("token", "--header", env=agent_env)
    assert header.stdout.strip() == "Authorization: Bearer " + json.loads(body)["access_token"]
    st = cli("status", env=agent_env)
    assert json.loads(st.stdout)["token"]["valid"] is True
    assert agent.stop() == 0


def test_token_cli_without_agent_is_a_clear_error(agent_env):
    result = cli("token", env=agent_env)
    assert result.returncode == EXIT_AGENT
    assert "no agent socket" in result.stderr


def test_socket_mode_and_directory(start_agent):
    agent = start_agent()
    st = agent.socket.lstat()
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) & 0o077 == 0
    assert stat.S_IMODE(agent.socket.parent.stat().st_mode) == 0o700
    assert agent.stop() == 0
    assert not agent.socket.exists()  # removed on SIGTERM


def _as_nobody(code: str) -> subprocess.CompletedProcess[str]:
    return python_as_nobody(code)


def test_other_users_cannot_reach_the_socket(start_agent):
    agent = start_agent()
    result = _as_nobody(
        "import socket,sys\n"
        "s=socket.socket(socket.AF_UNIX)\n"
        f"try:\n s.connect({str(agent.socket)!r}); print('connected')\n"
        "except PermissionError: print('denied')\n"
    )
    assert result.stdout.strip() == "denied", result.stderr
    assert agent.stop() == 0


def test_peer_allow_list_refuses_before_reading(start_agent):
    agent = start_agent()
    # Open the file modes wide: only SO_PEERCRED stands between nobody and the token now.
    os.chmod(agent.socket.parent, 0o755)
    os.chmod(agent.socket, 0o777)
    for p in list(agent.socket.parents)[:-1]:
        if p.stat().st_mode & 0o001 == 0:
            os.chmod(p, p.stat().st_mode | 0o001)
    result = _as_nobody(
        "import socket\n"
        "s=socket.socket(socket.AF_UNIX); s.settimeout(5)\n"
        f"s.connect({str(agent.socket)!r})\n"
        "try:\n s.sendall(b'GET /v1/token HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n'); data=s.recv(65536)\n"
        "except (ConnectionResetError, BrokenPipeError): data=b''\n"
        "print(repr(data))\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "b''"
    assert client.status(agent.socket)["refused_peers"] == 1
    assert agent.stop() == 0


def test_hostile_clients_do_not_delay_others(start_agent):
    agent = start_agent("--prefetch")
    client.get_token(agent.socket)
    # garbage bytes -> 400 and a closed connection
    out = _raw(agent.socket, b"\x16\x03\x01\x02\x00garbage\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400 ") and b'"error"' in out
    # a 2 MB header -> 431 and closed, without buffering it all
    big = b"GET /v1/token HTTP/1.1\r\nX-Big: " + b"a" * (2 * 1024 * 1024) + b"\r\n\r\n"
    out = _raw(agent.socket, big)
    assert out.startswith(b"HTTP/1.1 431 ")
    # 300 stalled connections (half a request line each)
    stalled = []
    for _ in range(300):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(agent.socket))
        s.sendall(b"GET /v1/tok")
        stalled.append(s)
    try:
        started = time.monotonic()
        for _ in range(20):
            assert client.get_token(agent.socket, timeout=5)
        # generous bound: 20 requests that would each wait for a stalled peer if serialised
        assert time.monotonic() - started < 5.0
        assert client.status(agent.socket)["connections_open"] >= 300
    finally:
        for s in stalled:
            s.close()
    # malformed-but-parsable: unknown route and wrong method answer JSON errors
    out = _raw(agent.socket, b"DELETE /v1/token HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 405 ") and b"Allow: GET" in out
    out = _raw(agent.socket, b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 404 ") and b'"not_found"' in out
    assert agent.stop() == 0


def test_kill9_then_restart_reclaims_the_stale_socket(start_agent, sandbox):
    agent = start_agent()
    agent.proc.send_signal(signal.SIGKILL)
    agent.proc.wait()
    assert agent.socket.exists()  # left behind by the crash
    again = start_agent()
    _check_valid(client.get_token(again.socket), sandbox)
    assert again.stop() == 0


def test_second_serve_exits_nonzero_and_first_keeps_serving(start_agent, sandbox):
    first = start_agent()
    second = start_agent(ready=False)
    assert second.proc.wait(30) == EXIT_AGENT
    assert "already serving" in second.output()
    _check_valid(client.get_token(first.socket), sandbox)
    assert first.stop() == 0


def test_regular_file_at_socket_path_is_refused(start_agent, agent_env):
    path = agent_env["TM_AGENT_SOCKET"]
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    with open(path, "w") as fh:
        fh.write("not a socket")
    agent = start_agent(ready=False)
    assert agent.proc.wait(30) == EXIT_AGENT
    assert "not a socket" in agent.output()
    with open(path) as fh:
        assert fh.read() == "not a socket"


def test_socket_path_too_long_is_a_clear_error(start_agent, tmp_path):
    long_path = tmp_path / ("x" * 120) / "agent.sock"
    agent = start_agent(env={"TM_AGENT_SOCKET": str(long_path)}, ready=False)
    assert agent.proc.wait(30) != 0
    assert "longer than AF_UNIX allows" in agent.output()


def test_systemd_socket_activation(agent_env, sandbox, tmp_path):
    path = tmp_path / "activated.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(16)
    fd = listener.fileno()
    env = {**os.environ, **agent_env, "LISTEN_FDS": "1"}
    # As systemd does it: the listening socket as fd 3, LISTEN_PID naming the agent itself.
    proc = subprocess.Popen(
        ["sh", "-c", f'LISTEN_PID=$$ exec "{sys.executable}" -m tm_hsm_agent serve'],
        env=env, preexec_fn=lambda: os.dup2(fd, 3), close_fds=False, stderr=subprocess.PIPE,
    )
    try:
        token = wait_for(lambda: _try_token(path), 30, what="socket-activated agent")
        _check_valid(token, sandbox)
    finally:
        proc.terminate()
        code = proc.wait(20)
        listener.close()
        assert code == 0, proc.stderr.read().decode(errors="replace")
    assert path.exists()  # systemd owns an inherited socket: the agent leaves it alone


def _try_token(path) -> str | None:
    try:
        return client.get_token(path, timeout=3)
    except Exception:  # noqa: BLE001
        return None


def test_audit_log_records_signatures_and_handouts(start_agent, agent_env):
    agent = start_agent()
    token = client.get_token(agent.socket)
    client.get_token(agent.socket)
    assert agent.stop() == 0
    log = os.path.join(agent_env["XDG_STATE_HOME"], "tm-hsm-agent", "audit.log")
    lines = [json.loads(line) for line in open(log)]
    signs = [rec for rec in lines if rec["event"] == "sign"]
    handouts = [rec for rec in lines if rec["event"] == "handout"]
    assert len(signs) == 1 and signs[0]["outcome"] == "ok" and signs[0]["purpose"] == "mint"
    assert signs[0]["key_id"] == agent_env["TM_KEY_ID"]
    assert len(handouts) == 1  # once per caller (uid, pid) per token
    assert handouts[0]["uid"] == os.getuid() and handouts[0]["pid"] == os.getpid()
    text = open(log).read()
    assert token not in text and token.split(".")[2] not in text


def test_shipped_unit_prevents_restart_on_pin_failure(tmp_path):
    from tm_hsm_agent.errors import EXIT_CONFIG, EXIT_PIN

    unit = cli("systemd-unit")
    assert unit.returncode == 0
    line = next(x for x in unit.stdout.splitlines() if x.startswith("RestartPreventExitStatus="))
    assert {str(EXIT_PIN), str(EXIT_CONFIG)} <= set(line.split("=", 1)[1].split())
    assert "NoNewPrivileges=yes" in unit.stdout and "LimitCORE=0" in unit.stdout
    if shutil.which("systemd-analyze"):
        path = tmp_path / "tm-hsm-agent.service"
        path.write_text(unit.stdout)
        check = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True)
        problems = [x for x in check.stderr.splitlines() if "is not executable" not in x]
        assert not problems, problems  # only the install path is missing here
    sock = cli("systemd-unit", "--socket")
    assert "SocketMode=0600" in sock.stdout and "DirectoryMode=0700" in sock.stdout


def test_group_mode_socket_lets_the_named_group_in(start_agent):
    import grp

    try:
        group = grp.getgrgid(65534).gr_name
    except KeyError:
        pytest.skip("no group with gid 65534 here")
    agent = start_agent(env={"TM_SOCKET_GROUP": group, "TM_ALLOW_GIDS": "65534"})
    st = agent.socket.lstat()
    assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == 65534
    parent = agent.socket.parent.stat()
    assert stat.S_IMODE(parent.st_mode) == 0o710 and parent.st_gid == 65534
    for p in list(agent.socket.parent.parents)[:-1]:  # let nobody traverse the test's temp dirs
        if p.stat().st_mode & 0o001 == 0:
            os.chmod(p, p.stat().st_mode | 0o001)
    result = _as_nobody(
        "from tm_hsm_agent import client\n"
        f"print(client.get_token_info({str(agent.socket)!r})['token_type'])\n"
    )
    assert result.stdout.strip() == "Bearer", result.stderr
    assert agent.stop() == 0


def test_token_cli_when_the_agent_has_no_token(start_agent, sandbox, agent_env):
    from tm_hsm_agent.errors import EXIT_NO_TOKEN

    sandbox.state.set_faults(mode="status", status=503, count=-1)
    agent = start_agent()
    result = cli("token", env=agent_env)
    assert result.returncode == EXIT_NO_TOKEN
    assert "the agent answered 503" in result.stderr and "no valid token: no valid" not in result.stderr
    assert agent.stop() == 0


def test_the_agent_runs_without_uvloop(start_agent, tmp_path):
    # uvloop is an optional extra (`pip install .` alone does not bring it): the agent must
    # serve on the stdlib loop too. A module that refuses to import stands in for its absence.
    shim = tmp_path / "no-uvloop"
    (shim / "uvloop").mkdir(parents=True)
    (shim / "uvloop" / "__init__.py").write_text("raise ImportError('uvloop is not installed')\n")
    agent = start_agent("--prefetch", env={"PYTHONPATH": str(shim)})
    first = client.get_token_info(agent.socket)
    status, body = client.request("POST", "/v1/token/refresh", agent.socket, timeout=30)
    assert status == 200 and body["access_token"] != first["access_token"]
    assert client.get_token(agent.socket) == body["access_token"]
    assert agent.stop() == 0
    assert "event loop: asyncio" in agent.output()

"""The socket server in-process with short limits and a fake cache (the seam under the
server); the real agent is covered end to end in test_agent.py."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from concurrent.futures import Future

import pytest

from tm_hsm_agent.audit import NullAudit
from tm_hsm_agent.auth import ServerClock, TokenSet
from tm_hsm_agent.cache import CachePolicy
from tm_hsm_agent.errors import NoTokenAvailable
from tm_hsm_agent.server import AgentServer, Limits, bind_socket

TOKEN = TokenSet("aaa.bbb.ccc", "rrr", "Bearer", time.time() + 300, time.time(), "kid-1", "mint")


class FakeCache:
    def __init__(self) -> None:
        self.policy = CachePolicy(wait_timeout=0.5)
        self.clock = ServerClock()
        self.counters: dict[str, int] = {"mint_ok": 1, "failure:api_transient": 2}
        self.token: TokenSet | None = TOKEN

    def current(self) -> TokenSet | None:
        return self.token

    def next_outcome(self, deadline: float) -> Future[None]:
        raise NoTokenAvailable("nothing to be had", reason="test")

    def _timeout_error(self, timeout: float) -> NoTokenAvailable:
        return NoTokenAvailable("timeout", reason="timeout")

    def status(self) -> dict:
        return {"token": None, "counters": self.counters}


@pytest.fixture
def server(tmp_path):
    cache = FakeCache()
    srv = AgentServer(cache, audit=NullAudit(),  # type: ignore[arg-type]
                      limits=Limits(request_timeout=0.5, idle_timeout=1.0, max_body_bytes=64))
    sock = bind_socket(tmp_path / "run" / "s.sock")
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(srv.start(sock))
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    ready.wait(10)
    yield srv, cache, tmp_path / "run" / "s.sock"
    asyncio.run_coroutine_threadsafe(srv.close(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    sock.close()


def _connect(path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(path))
    return s


def _read_all(s: socket.socket) -> bytes:
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def test_pipelined_requests_are_answered_in_order(server):
    _, _, path = server
    s = _connect(path)
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
              b"GET /v1/token HTTP/1.1\r\nHost: x\r\n\r\n"
              b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    out = _read_all(s)
    assert out.count(b"HTTP/1.1 ") == 3
    first, second, third = (out.index(x) for x in (b"200 OK", b'"access_token"', b"404 Not Found"))
    assert first < second < third
    body = json.loads(out.split(b"\r\n\r\n")[2].split(b"HTTP/1.1")[0])
    assert body == {"access_token": "aaa.bbb.ccc", "token_type": "Bearer",
                    "expires_at": body["expires_at"], "key_id": "kid-1"}
    assert body["expires_at"].endswith("Z")


def test_slow_request_gets_408_and_is_closed(server):
    _, _, path = server
    s = _connect(path)
    s.sendall(b"GET /v1/tok")
    started = time.monotonic()
    out = _read_all(s)
    assert out.startswith(b"HTTP/1.1 408 ")
    assert time.monotonic() - started < 5  # 0.5 s limit, swept once a second


def test_idle_keepalive_connection_is_closed(server):
    _, _, path = server
    s = _connect(path)
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    first = s.recv(65536)
    assert first.startswith(b"HTTP/1.1 200 ")
    started = time.monotonic()
    assert s.recv(65536) == b""  # closed by the server, not by our timeout
    assert time.monotonic() - started < 5


def test_body_too_large_gets_413(server):
    _, _, path = server
    s = _connect(path)
    s.sendall(b"POST /v1/token/refresh HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"x" * 100)
    assert _read_all(s).startswith(b"HTTP/1.1 413 ")


def test_http10_closes_after_the_answer(server):
    _, _, path = server
    s = _connect(path)
    s.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
    out = _read_all(s)
    assert out.startswith(b"HTTP/1.1 200 ") and b"Connection: close" in out


def test_no_token_gives_503_with_reason(server):
    _, cache, path = server
    cache.token = None
    s = _connect(path)
    s.sendall(b"GET /v1/token HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    out = _read_all(s)
    assert out.startswith(b"HTTP/1.1 503 ")
    body = json.loads(out.split(b"\r\n\r\n", 1)[1])
    assert body == {"error": "test", "message": "nothing to be had"}


def test_metrics_are_prometheus_text(server):
    srv, _, path = server
    s = _connect(path)
    s.sendall(b"GET /v1/token HTTP/1.1\r\nHost: x\r\n\r\n"
              b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    out = _read_all(s).decode()
    text = out.split("\r\n\r\n")[-1]
    assert "text/plain; version=0.0.4" in out
    assert "tm_agent_mints_total 1\n" in text
    assert 'tm_agent_failures_total{kind="api_transient"} 2\n' in text
    assert "tm_agent_tokens_served_total 1\n" in text
    assert 'tm_agent_request_seconds_bucket{le="+Inf"} 1\n' in text
    for line in text.splitlines():
        assert line.startswith("#") or len(line.split()) == 2, line


def test_a_body_in_the_same_write_counts_as_body_not_header(server):
    _, _, path = server
    s = _connect(path)
    s.sendall(b"POST /v1/token/refresh HTTP/1.1\r\nHost: x\r\nContent-Length: 20000\r\n\r\n" + b"x" * 20000)
    assert _read_all(s).startswith(b"HTTP/1.1 413 ")


def test_many_pipelined_requests_in_one_write_are_all_answered(server):
    _, _, path = server
    s = _connect(path)
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 399
              + b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    out = _read_all(s)
    assert out.count(b"HTTP/1.1 200 OK") == 400 and b" 431 " not in out


def test_a_header_streamed_in_pieces_is_cut_off(server):
    _, _, path = server
    s = _connect(path)
    s.sendall(b"GET /v1/token HTTP/1.1\r\nX-Big: ")
    try:
        for _ in range(64):  # 64 x 1 KiB: past the 16 KiB limit before any header completes
            s.sendall(b"a" * 1024)
    except (BrokenPipeError, ConnectionResetError):
        pass
    assert _read_all(s).startswith(b"HTTP/1.1 431 ")


@pytest.mark.parametrize("request_bytes", [
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    b"CONNECT agent:80 HTTP/1.1\r\nHost: agent:80\r\n\r\n",
])
def test_upgrade_and_connect_get_exactly_one_answer(server, request_bytes):
    _, _, path = server
    s = _connect(path)
    s.sendall(request_bytes)
    out = _read_all(s)
    assert out.count(b"HTTP/1.1 ") == 1, out


def test_http09_is_refused(server):
    _, _, path = server
    s = _connect(path)
    s.sendall(b"GET /v1/token\r\n\r\n")
    out = _read_all(s)
    assert out.startswith(b"HTTP/1.1 400 ") and b"aaa.bbb.ccc" not in out

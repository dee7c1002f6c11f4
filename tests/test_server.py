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
from tm_hsm_agent.server import READ_SIZE, AgentServer, Limits, bind_socket, token_request

TOKEN = TokenSet("aaa.bbb.ccc", "rrr", "Bearer", time.time() + 300, time.time(), "kid-1", "mint")


class FakeCache:
    def __init__(self) -> None:
        self.policy = CachePolicy(wait_timeout=0.5, force_timeout=10.0)
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

    def force(self) -> Future[None]:
        """A forced refresh that finishes when the test says so (``finish_forced``)."""
        self.forced = getattr(self, "forced", [])
        fut: Future[None] = Future()
        self.forced.append(fut)
        return fut

    def finish_forced(self) -> None:
        for fut in self.forced:
            fut.set_result(None)

    def force_timeout_error(self, timeout: float) -> NoTokenAvailable:
        return NoTokenAvailable("forced refresh timed out", reason="timeout")


def _loops() -> list:
    loops = [pytest.param(asyncio.new_event_loop, id="asyncio")]
    try:
        import uvloop
    except ImportError:  # an optional extra; the agent then runs on the stdlib loop
        loops.append(pytest.param(None, id="uvloop", marks=pytest.mark.skip("uvloop not installed")))
    else:
        loops.append(pytest.param(uvloop.new_event_loop, id="uvloop"))
    return loops


@pytest.fixture(params=_loops())
def event_loop_factory(request):
    """The agent runs on uvloop where installed, else on asyncio: both are tested."""
    return request.param


@pytest.fixture
def server(tmp_path, request, event_loop_factory):
    cache = FakeCache()
    limits = Limits(**{"request_timeout": 0.5, "idle_timeout": 1.0, "max_body_bytes": 64,
                       **getattr(request, "param", {})})
    srv = AgentServer(cache, audit=NullAudit(), limits=limits)  # type: ignore[arg-type]
    sock = bind_socket(tmp_path / "run" / "s.sock")
    loop = event_loop_factory()
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


# -- the accept thread: one-shot token requests answered before the event loop sees them --


@pytest.mark.parametrize(("data", "verdict"), [
    (b"GET /v1/token HTTP/1.1\r\nHost: x\r\n\r\n", True),
    (b"GET /v1/token?x=1 HTTP/1.1\r\nHost: x\r\n\r\n", True),
    (b"GET /v1/token HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", False),
    (b"GET /v1/token HTTP/1.0\r\n\r\n", False),
    (b"GET /v1/token HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", True),
    (b"GET /v1/token HTTP/1.1\r\nHost: x\r\n", None),  # headers not finished
    (b"GET /v1/token HTTP/1.1\r\nHost: x\r\n\r\nGET /v1/token HTTP/1.1\r\n\r\n", None),  # pipelined
    (b"GET /v1/token HTTP/1.1\r\nHost: x\r\n\r\nGET /v1/", None),  # a second one begun
    (b"GET /v1/token HTTP/1.1\r\nContent-Length: 2\r\n\r\nab", None),  # a body
    (b"POST /v1/token HTTP/1.1\r\nHost: x\r\n\r\n", None),  # wrong method: the loop says 405
    (b"GET /v1/token/refresh HTTP/1.1\r\nHost: x\r\n\r\n", None),
    (b"GET /v1/tokens HTTP/1.1\r\nHost: x\r\n\r\n", None),
    (b"GET /v1/token\r\n\r\n", None),  # HTTP/0.9
    (b"GET /v1/token HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n", None),
    (b"\x16\x03\x01\x02\x00garbage\r\n\r\n", None),
    (b"", None),
])
def test_token_request_verdicts(data, verdict):
    assert token_request(data) is verdict


def _one_shot(path, request: bytes) -> bytes:
    s = _connect(path)
    s.sendall(request)
    try:
        return _read_all(s)  # ends only when the server closes
    finally:
        s.close()


def test_one_shot_request_is_answered_and_closed_and_counted(server):
    srv, _, path = server
    out = _one_shot(path, b"GET /v1/token HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, body = out.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"Connection: close" in head
    assert json.loads(body)["access_token"] == "aaa.bbb.ccc"
    assert int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0]) == len(body)
    assert srv.totals.served == 1 and srv.totals.connections == 1


def test_keepalive_connection_goes_on_after_the_first_answer(server):
    srv, _, path = server
    s = _connect(path)
    for request in (b"GET /v1/token HTTP/1.1\r\nHost: x\r\n\r\n",  # answered by the accept thread
                    b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",  # then by the loop, same socket
                    b"GET /v1/token HTTP/1.1\r\nHost: x\r\n\r\n"):
        s.sendall(request)
        out = s.recv(65536)
        assert out.startswith(b"HTTP/1.1 200 OK\r\n") and b"Connection: close" not in out
    s.sendall(b"GET /v1/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    status = json.loads(_read_all(s).split(b"\r\n\r\n", 1)[1])
    assert status["served"] == 2  # both threads' counters


def test_a_request_split_across_writes_is_answered(server):
    _, _, path = server
    s = _connect(path)
    s.sendall(b"GET /v1/to")
    time.sleep(0.2)  # longer than the accept thread waits for first bytes: the loop finishes it
    s.sendall(b"ken HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    out = _read_all(s)
    assert out.startswith(b"HTTP/1.1 200 OK\r\n") and out.count(b"HTTP/1.1") == 1


@pytest.mark.parametrize("close", [True, False])
def test_an_answer_larger_than_the_socket_buffer_arrives_whole(server, close):
    # The accept thread never blocks on a slow reader: what does not fit the socket buffer
    # is written by the event loop. 4 MB is far past a Unix socket's buffer.
    _, cache, path = server
    big = "h." + "p" * (4 * 1024 * 1024) + ".s"
    cache.token = TokenSet(big, "rrr", "Bearer", time.time() + 300, time.time(), "kid-1", "mint")
    s = _connect(path)
    s.sendall(b"GET /v1/token HTTP/1.1\r\nHost: x\r\n" + (b"Connection: close\r\n" if close else b"")
              + b"\r\n")
    time.sleep(0.2)  # let the server fill the buffer while nobody reads
    if close:
        out = _read_all(s)
    else:
        out = b""
        while not out.endswith(b"}"):
            out += s.recv(1 << 20)
    head, body = out.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 OK") and json.loads(body)["access_token"] == big
    if not close:  # and the connection is still good for the next request
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert _read_all(s).startswith(b"HTTP/1.1 200 OK")


def test_silent_connections_do_not_delay_other_clients(server):
    # A client that connects and says nothing holds the accept thread only until the
    # next client connects (at most 50 ms), then waits in the event loop.
    _, _, path = server
    silent = [_connect(path) for _ in range(200)]
    try:
        started = time.monotonic()
        for _ in range(20):
            out = _one_shot(path, b"GET /v1/token HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert out.startswith(b"HTTP/1.1 200 OK")
        assert time.monotonic() - started < 5.0  # generous: 20 x 50 ms would be 1 s
    finally:
        for s in silent:
            s.close()


# -- what a hostile or odd client could do to the event loop's connections ----------------


def _until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_a_client_that_never_reads_its_answers_cannot_grow_the_agent(server):
    # 20 MB of pipelined requests, answers never read: the agent stops reading (so the
    # client's sends block) instead of buffering answers, then aborts the connection.
    srv, _, path = server
    s = _connect(path)
    s.settimeout(3)
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    sent = 0
    try:
        while sent < 20 * 1024 * 1024:
            sent += s.send(request * 1000)
    except (TimeoutError, BlockingIOError, BrokenPipeError, ConnectionResetError):
        pass
    buffered = sum(c.transport.get_write_buffer_size() for c in list(srv.conns) if c.transport)
    assert sent < 8 * 1024 * 1024, sent  # the agent stopped reading long before 20 MB
    assert buffered < 8 * 1024 * 1024, buffered
    # ... and a connection whose answers stay unread is aborted (request_timeout 0.5 s here)
    assert _until(lambda: not srv.conns), len(srv.conns)
    s.close()
    assert _one_shot(path, b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n").startswith(
        b"HTTP/1.1 200 OK")


@pytest.mark.parametrize("server", [{"max_connections": 8, "idle_timeout": 60.0}], indirect=True)
def test_at_the_connection_cap_the_longest_idle_connection_makes_room(server):
    srv, _, path = server
    held = []
    for _ in range(8):
        s = _connect(path)
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 200 OK")
        held.append(s)
    assert _until(lambda: len(srv.conns) == 8)
    newcomer = _connect(path)
    newcomer.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert newcomer.recv(65536).startswith(b"HTTP/1.1 200 OK")
    assert held[0].recv(65536) == b""  # the oldest idle one was closed for it
    assert len(srv.conns) == 8
    for s in held[1:]:  # and only that one
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 200 OK")
    for s in [*held, newcomer]:
        s.close()


@pytest.mark.parametrize("request_bytes", [
    b"POST /v1/token/refresh HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nPOST /v1/token/refresh HTTP/1.1\r\nHost: x\r\n\r\n",
])
def test_a_half_closed_client_still_gets_every_answer(server, request_bytes):
    _, cache, path = server
    s = _connect(path)
    s.sendall(request_bytes)
    s.shutdown(socket.SHUT_WR)  # "that is all I have to say"
    assert _until(lambda: getattr(cache, "forced", None))
    cache.finish_forced()
    out = _read_all(s)
    assert out.count(b"HTTP/1.1 200 OK") == request_bytes.count(b"HTTP/1.1\r\n"), out
    assert out.endswith(b"}") and b'"access_token"' in out.split(b"\r\n\r\n")[-1]


def test_a_timeout_never_answers_in_place_of_an_earlier_request(server):
    # A refresh still in progress, then half a request: the refresh is answered first, the
    # 408 for the half request after it.
    _, cache, path = server
    s = _connect(path)
    s.sendall(b"POST /v1/token/refresh HTTP/1.1\r\nHost: x\r\n\r\nGET /heal")
    time.sleep(2.5)  # past the 0.5 s request timeout and two sweeps
    cache.finish_forced()
    out = _read_all(s)
    assert out.startswith(b"HTTP/1.1 200 OK"), out
    assert out.count(b"HTTP/1.1 ") == 2 and b"HTTP/1.1 408 " in out


def test_an_endless_trailer_is_cut_off(server):
    _, _, path = server
    s = _connect(path)
    s.sendall(b"POST /v1/token/refresh HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
              b"2\r\nab\r\n0\r\nX-Trailer: ")
    started = time.monotonic()
    try:
        for _ in range(64):
            s.sendall(b"t" * 1024)
    except (BrokenPipeError, ConnectionResetError):
        pass
    out = _read_all(s)
    assert out.startswith(b"HTTP/1.1 413 "), out
    assert time.monotonic() - started < 0.5 + 1  # cut by size, not by the request timeout


def test_too_many_header_fields_get_431(server):
    _, _, path = server
    headers = b"".join(b"X-%d: 1\r\n" % i for i in range(101))
    out = _one_shot(path, b"GET /v1/status HTTP/1.1\r\n" + headers + b"\r\n")
    assert out.startswith(b"HTTP/1.1 431 ") and b"too many" in out


def test_head_gets_a_head_without_a_body(server):
    _, _, path = server
    s = _connect(path)
    s.sendall(b"HEAD /v1/token HTTP/1.1\r\nHost: x\r\n\r\n"
              b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    out = _read_all(s)
    head, rest = out.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 405 ") and b"Allow: GET" in head
    assert rest.startswith(b"HTTP/1.1 200 OK")  # no body bytes between the two answers


def test_expect_100_continue_is_answered(server):
    _, _, path = server
    s = _connect(path)
    s.sendall(b"POST /v1/status HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
              b"Expect: 100-continue\r\nConnection: close\r\n\r\n")
    assert s.recv(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"  # before we send the body
    s.sendall(b"{}")
    assert _read_all(s).startswith(b"HTTP/1.1 405 ")


@pytest.mark.parametrize("close", [b"Connection: close\r\n", b""])
def test_absolute_form_request_target(server, close):
    _, _, path = server
    s = _connect(path)
    s.sendall(b"GET http://agent/v1/token?x=1 HTTP/1.1\r\nHost: agent\r\n" + close + b"\r\n")
    out = s.recv(65536)
    assert out.startswith(b"HTTP/1.1 200 OK") and b'"access_token"' in out


def test_bytes_after_a_connection_close_request_are_not_a_bad_request(server):
    srv, _, path = server
    out = _one_shot(path, b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n"
                          b"GET /healthz HTTP/1.1\r\n\r\n")
    assert out.count(b"HTTP/1.1 ") == 1
    assert srv.totals.bad_requests == 0


def test_a_refresh_storm_costs_no_thread_per_caller(server):
    _, cache, path = server
    before = threading.active_count()
    clients = []
    for _ in range(200):
        s = _connect(path)
        s.sendall(b"POST /v1/token/refresh HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        clients.append(s)
    assert _until(lambda: len(getattr(cache, "forced", [])) == 200)
    assert threading.active_count() <= before + 2
    cache.finish_forced()
    for s in clients:
        assert _read_all(s).startswith(b"HTTP/1.1 200 OK")
        s.close()


def test_one_read_full_of_requests_does_not_buffer_all_their_answers(server):
    # 256 KiB of small pipelined requests arrive in one read; answering them all at once
    # would buffer ~12 MB for a client that reads nothing. They are parsed a slice at a time.
    srv, _, path = server
    s = _connect(path)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
    s.sendall(request * (256 * 1024 // len(request)))
    peak = backlog = 0
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        conns = [c for c in list(srv.conns) if c.transport]
        peak = max(peak, sum(c.transport.get_write_buffer_size() for c in conns))
        backlog = max([backlog, *(len(c.backlog) - c.backlog_at for c in conns)])
        time.sleep(0.01)
    assert 0 < peak < 256 * 1024, peak  # the write buffer's high-water mark and one answer
    assert 0 < backlog <= 2 * READ_SIZE, backlog  # unparsed: a read, and one more on uvloop
    s.close()


def test_a_huge_header_after_a_complete_request_in_the_same_read_gets_431(server):
    # The bytes of a read in which a request ended were not counted against the header
    # limit, so "one request + 200 KB of a header" sat in the parser until the timeout.
    _, _, path = server
    s = _connect(path)
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nX-Big: "
              + b"a" * (200 * 1024))
    started = time.monotonic()
    out = _read_all(s)
    assert out.startswith(b"HTTP/1.1 200 OK") and b"HTTP/1.1 431 " in out, out[:300]
    assert time.monotonic() - started < 0.5 + 1  # cut by size, not by the request timeout


def test_a_slow_reader_that_keeps_reading_gets_every_answer(server):
    # Flow control pauses a client that does not keep up, but one that does read (slowly)
    # is never cut off: each pause ends as soon as its answers drain.
    _, _, path = server
    s = _connect(path)
    count = 2000
    s.sendall(b"GET /v1/token HTTP/1.1\r\nHost: x\r\n\r\n" * (count - 1)
              + b"GET /v1/token HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    out = b""
    while chunk := s.recv(16 * 1024):
        out += chunk
        time.sleep(0.005)  # ~3 MB/s: slower than the agent writes, fast enough for its 0.5 s limit
    assert out.count(b"HTTP/1.1 200 OK") == count


def test_a_one_shot_request_with_too_many_header_fields_gets_431(server):
    _, _, path = server
    headers = b"".join(b"X-%d: 1\r\n" % i for i in range(101))
    out = _one_shot(path, b"GET /v1/token HTTP/1.1\r\n" + headers + b"Connection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 431 ") and b"aaa.bbb.ccc" not in out


class RecordingAudit(NullAudit):
    def __init__(self) -> None:
        self.handouts: list[tuple[int, int, str, str]] = []

    def record_handout(self, uid: int, pid: int, token_id: str, key_id: str) -> None:
        self.handouts.append((uid, pid, token_id, key_id))


def test_a_token_is_audited_as_handed_out_only_when_written(server):
    srv, cache, path = server
    srv.audit = audit = RecordingAudit()
    gone = _connect(path)
    gone.sendall(b"POST /v1/token/refresh HTTP/1.1\r\nHost: x\r\n\r\n")
    assert _until(lambda: len(getattr(cache, "forced", [])) == 1)
    gone.close()  # it leaves before the refresh is done (to the agent, a half-close for now)
    stays = _connect(path)
    stays.sendall(b"POST /v1/token/refresh HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert _until(lambda: len(cache.forced) == 2)
    cache.finish_forced()
    assert _read_all(stays).startswith(b"HTTP/1.1 200 OK")
    assert len(audit.handouts) == 1 and srv.totals.served == 1


def test_requests_from_a_client_that_has_gone_are_not_answered(server):
    # A pipeline, then the client closes: what was read is not parsed and answered for
    # nobody (that kept the loop busy for seconds per connection, and the stdlib loop logged
    # a warning for every write to the dead socket).
    srv, _, path = server
    s = _connect(path)
    sent = 6000
    s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * sent)
    s.close()
    assert _until(lambda: not srv.conns)
    assert srv.stats.requests.get("metrics", 0) < sent / 4, srv.stats.requests
    other = _connect(path)
    other.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert _read_all(other).startswith(b"HTTP/1.1 200 OK")


def test_a_reader_slower_than_the_stall_limit_is_kept_while_it_reads(server):
    # The stall limit (0.5 s here) runs while no answer bytes drain at all: a client that
    # reads slowly (40 KB/s, ~1.2 s to drain one high-water mark) is not cut off.
    _, cache, path = server
    big = "h." + "p" * 8000 + ".s"
    cache.token = TokenSet(big, "rrr", "Bearer", time.time() + 300, time.time(), "kid-1", "mint")
    s = _connect(path)
    count = 20
    s.sendall(b"GET /v1/token HTTP/1.1\r\nHost: x\r\n\r\n" * (count - 1)
              + b"GET /v1/token HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    out = b""
    while chunk := s.recv(4096):
        out += chunk
        time.sleep(0.1)
    assert out.count(b"HTTP/1.1 200 OK") == count


@pytest.mark.parametrize("server", [{"max_connections": 8}], indirect=True)
def test_connections_never_exceed_the_cap(server):
    # Connections that cannot be evicted (each holds an unfinished request) fill the cap;
    # more are refused rather than piling up.
    srv, _, path = server
    held, seen = [], []
    for _ in range(30):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(str(path))
        s.sendall(b"GET /v1/sta")
        held.append(s)
        seen.append(len(srv.conns))
    time.sleep(0.3)
    seen.append(len(srv.conns))
    assert max(seen) <= 8 and seen[-1] == 8, seen
    for s in held:
        s.close()


def test_expect_continue_with_a_body_past_the_limit_gets_413_not_100(server):
    _, _, path = server
    s = _connect(path)
    s.sendall(b"POST /v1/token/refresh HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n"
              b"Expect: 100-continue\r\n\r\n")
    out = _read_all(s)
    assert out.startswith(b"HTTP/1.1 413 ") and b"100 Continue" not in out

"""The Unix-socket API: HTTP/1.1 + JSON, parsed by llhttp (httptools).

The cached-token path is the hot path. One thread accepts every connection: it checks
the peer, waits briefly for the first bytes, and when they are one complete
``GET /v1/token`` and a token is cached it answers there and then from a ready-made
response (head and body bytes kept per token). Everything else -- other routes, keep-alive
follow-ups, incomplete, hostile or malformed requests, a client that must wait for a
mint -- is handed with the bytes read so far to the asyncio event loop. A one-shot
request thus costs no event-loop round trips (on CPython an epoll callback chain costs
more than the whole request), while slow and odd clients get the loop's timeouts.

Safety: the socket is created 0600 (umask before bind), or 0660 for a named group,
in a 0700 directory; each connection's peer credentials (SO_PEERCRED) are checked
against an allow-list before a byte is read. Header and body sizes are bounded,
malformed requests get 400 and a closed connection, idle and slow connections time
out, and every connection is independent so one slow client delays no other: the
accept thread waits for a client's first bytes only until the next client connects.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import grp
import itertools
import json
import logging
import os
import select
import socket
import stat
import struct
import threading
import time
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httptools

from tm_hsm_agent.auth import TokenSet
from tm_hsm_agent.cache import TokenCache
from tm_hsm_agent.errors import AgentError, ConfigError, NoTokenAvailable
from tm_hsm_agent.paths import private_dir

log = logging.getLogger(__name__)

SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux
_PEERCRED = struct.Struct("3i")
LINGER = 1.0  # seconds to drain a rejected client's input before closing
# How long the accept thread waits for a new client's first bytes when no other client is
# waiting to connect; after that (or as soon as one is) the connection goes to the loop.
FIRST_BYTES_WAIT_MS = 50
FEED_SLICE = 4096  # bytes parsed at a time; answers in between get a chance to drain
READ_SIZE = 16 * 1024  # the most one read takes from a client (see _Conn.get_buffer)
_NEVER = float("inf")
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0, 5.0)


@dataclass(frozen=True)
class Limits:
    max_header_bytes: int = 16 * 1024
    max_body_bytes: int = 4 * 1024
    request_timeout: float = 10.0  # from a request's first byte to its end
    idle_timeout: float = 60.0  # keep-alive connection with nothing in flight
    # At the cap the longest-idle keep-alive connection makes room. Each connection costs at
    # most about READ_SIZE + the transport's write high-water mark + a slice's queued requests
    # (~100 KB) however it misbehaves, so the cap also bounds the agent's memory.
    max_connections: int = 1024
    max_headers: int = 100
    max_pipelined: int = 64  # requests queued behind a slow one before reading pauses
    backlog: int = 4096  # the asyncio default (100) drops bursts of hundreds of clients


@dataclass
class Stats:
    served: int = 0
    requests: dict[str, int] = field(default_factory=dict)
    refused_peers: int = 0
    bad_requests: int = 0
    connections: int = 0
    latency_counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    latency_sum: float = 0.0

    def observe(self, seconds: float) -> None:
        # bisect_left: the first bucket whose bound is >= seconds (Prometheus "le")
        self.latency_counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds

    def __add__(self, other: Stats) -> Stats:
        """Counters of two threads (each thread writes only its own Stats), summed for reports."""
        requests = dict(self.requests)
        for name, count in other.requests.items():
            requests[name] = requests.get(name, 0) + count
        return Stats(
            served=self.served + other.served,
            requests=requests,
            refused_peers=self.refused_peers + other.refused_peers,
            bad_requests=self.bad_requests + other.bad_requests,
            connections=self.connections + other.connections,
            latency_counts=[a + b for a, b in zip(self.latency_counts, other.latency_counts, strict=True)],
            latency_sum=self.latency_sum + other.latency_sum,
        )


# -- the listening socket ---------------------------------------------------------------


def check_socket_path(path: Path) -> None:
    if len(os.fsencode(path)) > SUN_PATH_MAX:
        raise ConfigError(
            f"agent socket path is {len(os.fsencode(path))} bytes, longer than AF_UNIX allows "
            f"({SUN_PATH_MAX}): {path}; set TM_AGENT_SOCKET to a shorter path"
        )


def _claim_path(path: Path) -> None:
    """Refuse a live agent's socket or a non-socket file; reclaim a stale socket."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise AgentError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        log.warning("removing stale agent socket %s (no agent answers)", path)
        path.unlink(missing_ok=True)
        return
    except OSError as e:
        if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
            path.unlink(missing_ok=True)
            return
        raise AgentError(f"cannot probe existing socket {path}: {e}") from e
    finally:
        probe.close()
    raise AgentError(f"another agent is already serving on {path}; not starting a second one")


def bind_socket(path: Path, group: str | None = None, backlog: int = Limits.backlog) -> socket.socket:
    """Create the listening socket: 0600 (0660 with ``group``) from the moment it exists."""
    check_socket_path(path)
    parent = path.parent
    try:
        private_dir(parent)  # 0700, ours
    except (PermissionError, FileExistsError, NotADirectoryError) as e:
        raise AgentError(f"socket directory {parent}: {e}") from e
    gid = None
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid if not group.isdigit() else int(group)
        except KeyError:
            raise ConfigError(f"socket_group {group!r} is not a known group") from None
        os.chown(parent, -1, gid)
        os.chmod(parent, 0o710)  # noqa: S103 - group may traverse to the socket, not list the directory
    _claim_path(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o117 if gid is not None else 0o177)
    try:
        sock.bind(str(path))
    except OSError as e:
        sock.close()
        raise AgentError(f"cannot bind {path}: {e}") from e
    finally:
        os.umask(old)
    if gid is not None:
        os.chown(path, -1, gid)
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


def systemd_socket() -> socket.socket | None:
    """The socket systemd passed us (LISTEN_FDS/LISTEN_PID), if any."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    if int(os.environ.get("LISTEN_FDS", "0")) < 1:
        return None
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    sock = socket.socket(fileno=3)
    if sock.family != socket.AF_UNIX:
        raise AgentError("systemd passed a socket that is not AF_UNIX")
    sock.setblocking(False)
    return sock


# -- responses --------------------------------------------------------------------------

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            408: "Request Timeout", 413: "Content Too Large",
            431: "Request Header Fields Too Large", 500: "Internal Server Error",
            503: "Service Unavailable"}


def _response(status: int, body: bytes, keep_alive: bool, ctype: str = "application/json",
              extra: str = "") -> bytes:
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"
        f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\n"
        f"{extra}{'' if keep_alive else 'Connection: close' + chr(13) + chr(10)}\r\n"
    )
    return head.encode("latin-1") + body


def _json(status: int, obj: Any, keep_alive: bool, extra: str = "") -> bytes:
    return _response(status, json.dumps(obj, separators=(",", ":")).encode(), keep_alive, extra=extra)


def _error(status: int, error: str, message: str, keep_alive: bool, extra: str = "") -> bytes:
    return _json(status, {"error": error, "message": message}, keep_alive, extra)


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class _Prepared:
    """The ready-made 200 answers for one token (keep-alive and close variants)."""

    __slots__ = ("token", "keep", "close")

    def __init__(self, token: TokenSet) -> None:
        body = json.dumps(
            {
                "access_token": token.access_token,
                "token_type": "Bearer",
                "expires_at": rfc3339(token.expires_at),
                "key_id": token.key_id,
            },
            separators=(",", ":"),
        ).encode()
        self.token = token
        self.keep = _response(200, body, True)
        self.close = _response(200, body, False)


# -- the protocol -----------------------------------------------------------------------


class _Conn(asyncio.BufferedProtocol):
    """A connection the accept thread handed to the event loop (peer already checked).

    Answers go out in request order. Memory per connection is bounded whatever the client
    does: a read takes at most READ_SIZE bytes (a buffered protocol picks the size, where
    data_received would get whatever the loop read, 256 KiB); it is parsed a slice at a
    time; once the answers are past the write buffer's high-water mark, further requests
    are only queued (no answer is made) and reading pauses, as it does while many
    pipelined requests wait behind a slow one. A connection whose answers stop draining
    for request_timeout is aborted, not politely closed.
    """

    __slots__ = (
        "srv", "transport", "parser", "url", "header_bytes", "headers", "body", "queue", "busy",
        "closing", "peer", "deadline", "in_request", "in_head", "raw_head", "raw_msg",
        "done_in_chunk", "unsent", "close_after", "eof", "write_paused",
        "stall_deadline", "stall_buffered", "backlog", "backlog_at", "expect_continue",
        "active", "content_length",
    )

    def __init__(self, srv: AgentServer, peer: tuple[int, int, int], initial: bytes = b"",
                 unsent: bytes = b"", close_after: bool = False) -> None:
        self.srv = srv
        self.transport: Any = None
        self.parser: Any = httptools.HttpRequestParser(self)
        self.url = b""
        self.header_bytes = 0
        self.headers = 0
        self.body = b""
        self.queue: list[tuple[bytes, bytes, bool, bytes]] = []
        self.busy = False
        self.closing = False
        self.peer = peer
        self.deadline = 0.0  # loop time; checked by the server's once-a-second sweep
        self.in_request = False
        self.in_head = False
        self.raw_head = 0
        self.raw_msg = 0
        self.done_in_chunk = 0
        self.unsent = unsent  # the rest of an answer the accept thread could not write
        self.close_after = close_after  # ... to a client that asked for Connection: close
        self.eof = False  # the client half-closed: answer what it asked, then close
        self.write_paused = False
        self.stall_deadline = _NEVER  # loop time by which unread answers must have drained some
        self.stall_buffered = 0  # ... below this many bytes
        # bytes read but not parsed yet (fed in slices; see _feed_backlog), starting with
        # what the accept thread already read
        self.backlog = initial
        self.backlog_at = 0
        self.expect_continue = False
        self.content_length = 0
        self.active = 0  # when it last finished a request, in the server's activity order

    # connection lifecycle
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        srv = self.srv
        srv.conns.add(self)
        self.active = next(srv.activity)
        self.deadline = srv.loop.time() + srv.limits.idle_timeout
        unsent, self.unsent = self.unsent, b""
        if unsent:
            transport.write(unsent)
            if self.close_after:
                self.closing = True
                transport.close()  # after the buffered bytes are written
                return
        if self.backlog:
            # Parsed on the next loop turn, not here: uvloop starts reading only after
            # connection_made returns, undoing a pause_reading made inside it. Newer bytes
            # queue behind these in the backlog, so the order is kept.
            srv.loop.call_soon(self._feed_backlog)

    def connection_lost(self, exc: Exception | None) -> None:
        self.srv.conns.discard(self)
        self.closing = True
        # Break the parser <-> protocol <-> transport cycle so the connection is freed by
        # reference counting, not by the cycle collector (whose pauses showed in p99).
        self.parser = None
        self.transport = None

    # flow control
    def pause_writing(self) -> None:
        # The client is not reading its answers: stop answering, parsing and reading its
        # requests. It is aborted if no answer bytes drain for request_timeout.
        self.write_paused = True
        self._stall_clock()
        self._flow()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.stall_deadline = _NEVER
        self._answer_queued()
        self._feed_backlog()

    def _stall_clock(self) -> None:
        self.stall_buffered = self.transport.get_write_buffer_size()
        self.stall_deadline = self.srv.loop.time() + self.srv.limits.request_timeout

    def _congested(self) -> bool:
        return self.write_paused or len(self.queue) >= self.srv.limits.max_pipelined

    def _flow(self) -> None:
        """Read from the client only while it keeps up and nothing read is left unparsed."""
        transport = self.transport
        if transport is None or self.closing:
            return
        hold = self.eof or bool(self.backlog) or self._congested()
        if hold == transport.is_reading():  # the transport's own state, never a copy of it
            if hold:
                transport.pause_reading()
            else:
                transport.resume_reading()

    def _timed_out(self) -> None:
        transport = self.transport
        if transport is None:
            return
        if self.stall_deadline < self.srv.loop.time():
            if transport.get_write_buffer_size() < self.stall_buffered:
                self._stall_clock()  # a slow reader, but a reader: it drained some meanwhile
                return
            transport.abort()  # its answers stay unread: close() would wait for ever
        elif self.closing and transport.get_write_buffer_size():
            transport.abort()
        elif self.busy and not self.closing:
            # A request is still being answered (waiting for a mint or a refresh, which
            # have their own time limits): its answer goes first, any 408 after it.
            self.deadline = self.srv.loop.time() + 1.0
        elif self.in_request and not self.closing:
            self._send_and_close(_error(408, "timeout", "request not completed in time", False))
        else:
            transport.close()

    def get_buffer(self, sizehint: int) -> memoryview:
        # One buffer for every connection: the loop fills it and calls buffer_updated at
        # once, on its one thread, and buffer_updated copies out what it needs.
        return self.srv.read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(bytes(self.srv.read_buffer[:nbytes]))

    def data_received(self, data: bytes) -> None:
        if self.closing or self.eof:
            return
        if self.backlog:
            self.backlog, self.backlog_at = self.backlog[self.backlog_at:] + data, 0
        else:
            self.backlog = data
        self._feed_backlog()

    def _feed_backlog(self) -> None:
        """Parse what was read, FEED_SLICE bytes at a time, while the client keeps up.

        One read can hold thousands of small pipelined requests; answering them all at once
        would buffer megabytes of answers for a client that does not read them. So the
        parser gets a slice, and the rest waits (reading paused) until the answers drain.
        """
        while self.backlog and not self.closing and not self._congested():
            if self.transport.is_closing():  # the client went away: answering it is wasted
                self.closing = True
                break
            at = self.backlog_at
            if at == 0 and len(self.backlog) <= FEED_SLICE:
                chunk, self.backlog = self.backlog, b""
            else:
                chunk = self.backlog[at : at + FEED_SLICE]
                self.backlog_at = at + len(chunk)
                if self.backlog_at >= len(self.backlog):
                    self.backlog, self.backlog_at = b"", 0
            self._feed(chunk)
        self._flow()
        if self.eof and not (self.busy or self.queue or self.backlog or self.closing):
            self.closing = True
            self.transport.close()  # everything the half-closed client asked is answered

    def _feed(self, data: bytes) -> None:
        self.done_in_chunk = 0
        limits = self.srv.limits
        try:
            self.parser.feed_data(data)
            if self.in_request and not self.done_in_chunk:
                # Every byte of this slice belongs to an unfinished request (no message
                # ended in it). llhttp buffers a header or trailer value whole before
                # calling back, so without these raw counts megabytes could pile up. (A
                # slice in which a message ended goes uncounted: at most FEED_SLICE bytes.)
                self.raw_msg += len(data)
                if self.in_head:
                    self.raw_head += len(data)
                    if self.raw_head > limits.max_header_bytes:
                        raise _Reject(431, "request headers too large")
                if self.raw_msg > limits.max_header_bytes + 4 * limits.max_body_bytes:
                    raise _Reject(413, "request too large (body, chunk framing and trailers)")
        except httptools.HttpParserUpgrade:
            # llhttp has completed (and we answered) the request before this: say no more.
            self.closing = True
            self.transport.close()
        except httptools.HttpParserError as e:
            if self.closing:
                return  # bytes after a "Connection: close" request: answered already, ignored
            cause = e.__context__ or e.__cause__
            if isinstance(cause, _Reject):
                self._bad(cause.status, str(cause))
            else:
                self._bad(400, f"malformed HTTP request: {e}")
        except _Reject as e:
            self._bad(e.status, str(e))
        else:
            self._answer_queued()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.in_request = self.in_head = True
        self.header_bytes = self.headers = self.raw_head = self.raw_msg = self.content_length = 0
        self.expect_continue = False
        self.deadline = self.srv.loop.time() + self.srv.limits.request_timeout

    def on_url(self, url: bytes) -> None:
        self.url += url
        self._count(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        self.headers += 1
        if self.headers > self.srv.limits.max_headers:
            raise _Reject(431, "too many request header fields")
        if self.in_head:
            lowered = name.lower()
            if lowered == b"expect":
                self.expect_continue = value.strip().lower() == b"100-continue"
            elif lowered == b"content-length" and value.strip().isdigit():
                self.content_length = int(value)

    def on_headers_complete(self) -> None:
        self.in_head = False
        if self.parser.get_http_version() not in ("1.1", "1.0"):
            raise _Reject(400, "only HTTP/1.0 and HTTP/1.1 are supported")
        if self.content_length > self.srv.limits.max_body_bytes:
            raise _Reject(413, "request body too large")  # said before the body is sent
        if self.expect_continue and not self.busy and not self.queue and not self.closing:
            # The client waits for this before sending its body. Only when nothing is
            # queued before it, so an interim answer never lands ahead of a final one.
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _count(self, n: int) -> None:
        self.header_bytes += n
        if self.header_bytes > self.srv.limits.max_header_bytes:
            raise _Reject(431, "request headers too large")

    def on_body(self, body: bytes) -> None:
        self.body += body
        if len(self.body) > self.srv.limits.max_body_bytes:
            raise _Reject(413, "request body too large")

    def on_message_complete(self) -> None:
        parser = self.parser
        url, body, self.url, self.body = self.url, self.body, b"", b""
        self.in_request = False
        self.done_in_chunk += 1
        self.active = next(self.srv.activity)
        self.deadline = self.srv.loop.time() + self.srv.limits.idle_timeout
        if self.busy or self.queue or self.write_paused:
            # pipelined behind a request still being answered, or past what the client has
            # read: queued (a few hundred bytes), not answered (up to kilobytes) yet
            self.queue.append((parser.get_method(), url, parser.should_keep_alive(), body))
        elif not self.closing:
            self._answer(parser.get_method(), url, parser.should_keep_alive(), body)

    # answering, in order
    def _answer_queued(self) -> None:
        while self.queue and not (self.busy or self.closing or self.write_paused):
            self._answer(*self.queue.pop(0))

    def _answer(self, method: bytes, url: bytes, keep: bool, body: bytes) -> None:
        started = time.perf_counter()
        out, tok = self.srv.handle_fast(method, url, keep)
        if out is not None:
            if method == b"HEAD":  # the head a GET would get (here: a 405), without its body
                out = out[: out.index(b"\r\n\r\n") + 4]
            self._write(out, keep, started, tok)
            return
        self.busy = True
        task = self.srv.loop.create_task(self.srv.handle_slow(method, url, keep, body))
        task.add_done_callback(functools.partial(self._slow_done, keep=keep, started=started))

    def _slow_done(self, task: asyncio.Task[tuple[bytes, TokenSet | None]], *, keep: bool,
                   started: float) -> None:
        self.busy = False
        if self.closing:
            return  # the client went away: nothing was handed out
        try:
            out, tok = task.result()
        except Exception:  # noqa: BLE001 - one request's bug must not kill the agent
            log.exception("request handler failed")
            out, keep, tok = _error(500, "internal", "internal error", False), False, None
        self._write(out, keep, started, tok)
        self._answer_queued()
        self._feed_backlog()

    def _write(self, out: bytes, keep: bool, started: float, tok: TokenSet | None = None) -> None:
        transport = self.transport
        transport.write(out)
        if transport.is_closing():
            # The peer has gone (the write failed with EPIPE): nothing was handed out, and
            # nothing more is parsed or answered for it (the stdlib loop would also log a
            # warning for every further write).
            self.closing = True
            self.queue.clear()
            self.backlog, self.backlog_at = b"", 0
            return
        if tok is not None:  # counted and audited once written
            self.srv.handed_out(self, tok)
        self.srv.stats.observe(time.perf_counter() - started)
        if not keep:
            self.closing = True
            self.transport.close()

    def _bad(self, status: int, message: str) -> None:
        self.srv.stats.bad_requests += 1
        if self.busy or self.queue:
            # An answer is still owed for an earlier request; a 400 now would stand in
            # its place. Stop here; the connection closes once that answer is written.
            self.queue.clear()
            self.backlog, self.backlog_at = b"", 0
            self.eof = True
            self._flow()
            return
        self._send_and_close(_error(status, "bad_request", message, False))

    def _send_and_close(self, out: bytes) -> None:
        """Answer, then close after a short lingering half-close.

        Closing a Unix socket with unread input makes the peer's next read fail with
        ECONNRESET, which can hide the answer from a client still sending (a 2 MB header).
        So: send, shut our write side, discard what still arrives, close at the next sweep
        after LINGER seconds (or at the peer's EOF).
        """
        self.closing = True
        self.queue.clear()
        self.backlog, self.backlog_at = b"", 0  # nothing more is parsed: do not hold it
        self.transport.write(out)
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.deadline = self.srv.loop.time() + LINGER
        else:
            self.transport.close()

    def eof_received(self) -> bool:
        if (self.busy or self.queue or self.backlog) and not self.closing:
            # A half-close after a complete request ("I have nothing more to say") still
            # deserves the answer: keep our side open until what was asked is answered.
            self.eof = True
            return True
        return False  # close our side too


class _Reject(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _OneRequest:
    """httptools callbacks for the accept thread's look at a client's first bytes."""

    __slots__ = ("parser", "url", "begun", "complete", "body", "keep", "method", "version", "headers")

    def __init__(self) -> None:
        self.parser: Any = httptools.HttpRequestParser(self)
        self.url = b""
        self.begun = self.complete = self.headers = 0
        self.body = self.keep = False
        self.method = b""
        self.version = ""

    def on_message_begin(self) -> None:
        self.begun += 1

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers += 1

    def on_body(self, body: bytes) -> None:
        self.body = True

    def on_message_complete(self) -> None:
        # Read here, not after feed_data: llhttp resets the keep-alive flags once the
        # message is done (a "Connection: close" request would then read as keep-alive).
        parser = self.parser
        self.complete += 1
        self.keep = parser.should_keep_alive()
        self.method = parser.get_method()
        self.version = parser.get_http_version()


def token_request(data: bytes, max_headers: int = Limits.max_headers) -> bool | None:
    """Are ``data`` exactly one complete, body-less ``GET /v1/token``? Then: keep-alive or not.

    None for anything else (incomplete, pipelined, malformed, another route...): such
    bytes go to the event loop, which gives every other case its proper answer.
    """
    req = _OneRequest()
    try:
        req.parser.feed_data(data)
    except (httptools.HttpParserError, httptools.HttpParserUpgrade):
        return None
    finally:
        req.parser = None  # no parser <-> callbacks cycle left for the garbage collector
    if req.begun != 1 or req.complete != 1 or req.body or req.method != b"GET":
        return None
    if req.headers > max_headers:  # the loop answers 431, as for any other request
        return None
    if _route_path(req.url) != b"/v1/token" or req.version not in ("1.1", "1.0"):
        return None
    return bool(req.keep)


def _route_path(url: bytes) -> bytes:
    """The path of a request target: origin form (``/v1/token?x``) or absolute form."""
    if url[:1] != b"/":
        try:
            return httptools.parse_url(url).path or b"/"  # http://agent/v1/token (RFC 9112 3.2.2)
        except httptools.HttpParserInvalidURLError:
            return url
    return url if b"?" not in url else url.split(b"?", 1)[0]


class _Acceptor:
    """The accept thread: peer check, then the one-shot token request answered on the spot.

    It owns the listening socket and is the only writer of ``stats``. It blocks in
    ``accept()`` itself (one system call per client, no poll before it) and looks at
    what a client sent first without waiting if it is there already, which is the
    common case: that is what makes a one-shot request cheaper than in the event loop.
    """

    MEMO_ENTRIES = 64
    MEMO_KEY_BYTES = 1024

    def __init__(self, srv: AgentServer, sock: socket.socket) -> None:
        self.srv = srv
        self.sock = sock
        self.stats = Stats()
        # Waiting for a client's first bytes also watches the listening socket: the next
        # client connecting ends the wait, so a silent client never delays another.
        self._poll = select.poll()
        self._poll.register(sock.fileno(), select.POLLIN)
        # token_request's verdict per request, byte for byte: clients repeat the same bytes
        # (curl, requests, tm_hsm_agent.client), and a lookup costs less than a parse.
        self._verdicts: dict[bytes, bool] = {}
        self.handed = 0  # connections passed to the loop (written by this thread only)
        self._thread = threading.Thread(target=self._run, name="agent-accept", daemon=True)
        self._stopping = False

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping = True
        # Wake accept() by connecting once. Not shutdown(): with socket activation the
        # listening socket is systemd's too, and must go on listening after we exit.
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(1.0)
            s.connect(self.sock.getsockname())
        self._thread.join(timeout)  # a daemon thread: should it still wait, exit does not

    def _run(self) -> None:
        self.sock.setblocking(True)
        try:
            while not self._stopping:
                try:
                    conn, _ = self.sock.accept()
                except (InterruptedError, ConnectionAbortedError):
                    continue
                except OSError as e:
                    if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        # Out of descriptors: the pending client stays queued; do not spin.
                        log.warning("cannot accept a connection: %s; pausing 0.1 s", e.strerror)
                        time.sleep(0.1)
                        continue
                    if not self._stopping:
                        log.error("agent socket failed (%s); no longer accepting", e)
                    return
                if self._stopping:
                    conn.close()
                    return
                try:
                    self._serve(conn)
                except Exception:  # noqa: BLE001 - one connection's failure must not stop accepting
                    log.exception("connection handling failed")
                    conn.close()
        finally:
            with contextlib.suppress(OSError):
                self.sock.setblocking(False)

    def _serve(self, conn: socket.socket) -> None:
        started = time.perf_counter()
        srv, stats = self.srv, self.stats
        try:
            pid, uid, gid = _PEERCRED.unpack(
                conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
            )
        except OSError:
            pid, uid, gid = 0, -1, -1
        if uid not in srv.allow_uids and gid not in srv.allow_gids:
            stats.refused_peers += 1  # refused before a byte is read
            log.warning("refused connection from uid %d gid %d pid %d", uid, gid, pid)
            conn.close()
            return
        stats.connections += 1
        data = self._first_bytes(conn)
        if data is None:  # closed by the client before a byte
            conn.close()
            return
        keep = self._verdict(data) if 0 < len(data) <= srv.limits.max_header_bytes else None
        tok = srv.cache.current() if keep is not None else None
        if tok is None:
            self._hand_over(conn, data, (pid, uid, gid))
            return
        prepared = srv.prepared(tok)
        out = prepared.keep if keep else prepared.close
        try:
            sent = conn.send(out, socket.MSG_DONTWAIT)
        except OSError:  # the client is gone already
            conn.close()
            return
        stats.served += 1
        srv.audit.record_handout(uid, pid, tok.fingerprint, tok.key_id)
        stats.observe(time.perf_counter() - started)
        if sent < len(out):  # did not fit the socket buffer: the loop writes the rest
            self._hand_over(conn, b"", (pid, uid, gid), out[sent:], close_after=not keep)
        elif keep:  # a keep-alive client's next requests are the loop's business
            self._hand_over(conn, b"", (pid, uid, gid))
        else:
            conn.close()

    def _verdict(self, data: bytes) -> bool | None:
        if len(data) > self.MEMO_KEY_BYTES:
            return token_request(data, self.srv.limits.max_headers)
        verdict = self._verdicts.get(data)
        if verdict is None:
            verdict = token_request(data, self.srv.limits.max_headers)
            if verdict is not None:
                if len(self._verdicts) >= self.MEMO_ENTRIES:
                    self._verdicts.clear()
                self._verdicts[data] = verdict
        return verdict

    def _first_bytes(self, conn: socket.socket) -> bytes | None:
        """What the client sent first; b"" if nothing came before the next client (or 50 ms)."""
        data = _recv_now(conn)
        if data != b"":
            return data
        fd = conn.fileno()
        self._poll.register(fd, select.POLLIN)
        try:
            ready = any(f == fd for f, _ in self._poll.poll(FIRST_BYTES_WAIT_MS))
        finally:
            self._poll.unregister(fd)
        return _recv_now(conn) if ready else b""

    def _hand_over(self, conn: socket.socket, data: bytes, peer: tuple[int, int, int],
                   unsent: bytes = b"", close_after: bool = False) -> None:
        srv = self.srv
        # Hand-overs the loop has not taken yet. Each counter has one writer (this thread,
        # the loop), so their difference needs no lock. A loop a whole connection cap behind
        # gets no more: under a connection flood the descriptors stay bounded.
        if self.handed - srv.adopted >= srv.limits.max_connections:
            conn.close()
            return
        self.handed += 1
        try:
            self.srv.loop.call_soon_threadsafe(self.srv.adopt, conn, data, peer, unsent, close_after)
        except RuntimeError:  # the loop has closed: we are shutting down
            conn.close()


def _recv_now(conn: socket.socket) -> bytes | None:
    """Bytes already there (b"" if none yet), or None once the client has closed or failed."""
    try:
        return conn.recv(READ_SIZE, socket.MSG_DONTWAIT) or None
    except (BlockingIOError, InterruptedError):
        return b""
    except OSError:
        return None


# -- the server ---------------------------------------------------------------------------

ROUTES = {
    b"/v1/token": b"GET",
    b"/v1/token/refresh": b"POST",
    b"/v1/status": b"GET",
    b"/healthz": b"GET",
    b"/metrics": b"GET",
}


class AgentServer:
    def __init__(
        self,
        cache: TokenCache,
        *,
        audit: Any,
        token_present: Callable[[], bool | None] = lambda: None,
        allow_uids: tuple[int, ...] = (),
        allow_gids: tuple[int, ...] = (),
        limits: Limits | None = None,
        started_at: float | None = None,
    ) -> None:
        self.cache = cache
        self.audit = audit
        self.token_present = token_present
        self.allow_uids = frozenset({os.getuid(), 0, *allow_uids})
        self.allow_gids = frozenset(allow_gids)
        self.limits = limits or Limits()
        self.stats = Stats()  # written by the loop thread only (the acceptor has its own)
        self.conns: set[_Conn] = set()
        self.started_at = started_at or time.time()
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self._prepared: _Prepared | None = None
        self._acceptor: _Acceptor | None = None
        self._adopting: set[asyncio.Task[None]] = set()
        self.adopted = 0  # hand-overs taken by the loop (written by the loop thread only)
        self.activity = itertools.count()  # orders connections by their last request
        self.read_buffer = memoryview(bytearray(READ_SIZE))  # shared by all connections
        self._closing = False
        self._sweeper: asyncio.Task[None] | None = None

    def _count(self, name: str) -> None:
        self.stats.requests[name] = self.stats.requests.get(name, 0) + 1

    def prepared(self, tok: TokenSet) -> _Prepared:
        """The ready-made answers for ``tok`` (both threads may build it; either copy is right)."""
        prepared = self._prepared
        if prepared is None or prepared.token is not tok:
            prepared = self._prepared = _Prepared(tok)
        return prepared

    @property
    def totals(self) -> Stats:
        return self.stats + self._acceptor.stats if self._acceptor is not None else self.stats

    # a cached token needs no await (keep-alive requests and connections handed over)
    def handle_fast(self, method: bytes, url: bytes, keep: bool) -> tuple[bytes | None, TokenSet | None]:
        """The answers that need no waiting: (answer, token in it), or (None, None) for
        handle_slow."""
        path = _route_path(url)
        if path == b"/v1/token" and method == b"GET":
            tok = self.cache.current()
            if tok is None:
                return None, None
            prepared = self.prepared(tok)
            return (prepared.keep if keep else prepared.close), tok
        allowed = ROUTES.get(path)
        if allowed is None:
            self._count("not_found")
            return _error(404, "not_found", f"no such endpoint {path.decode('latin-1')[:200]}", keep), None
        if method != allowed:
            self._count("bad_method")
            return _error(405, "method_not_allowed", f"use {allowed.decode()}", keep,
                          extra=f"Allow: {allowed.decode()}\r\n"), None
        if path == b"/healthz":
            self._count("healthz")
            return _json(200, {"ok": True}, keep), None
        if path == b"/v1/status":
            self._count("status")
            return _json(200, self.status(), keep), None
        if path == b"/metrics":
            self._count("metrics")
            return _response(200, self.metrics().encode(), keep, "text/plain; version=0.0.4"), None
        return None, None

    async def handle_slow(self, method: bytes, url: bytes, keep: bool,
                          body: bytes) -> tuple[bytes, TokenSet | None]:
        """The answers that may wait (a mint, a forced refresh): (answer, token handed out)."""
        path = _route_path(url)
        try:
            if path == b"/v1/token/refresh":
                self._count("refresh")
                timeout = self.cache.policy.force_timeout
                try:  # a future, not a thread per caller: a refresh storm costs no threads
                    await asyncio.wait_for(asyncio.wrap_future(self.cache.force()), timeout)
                except TimeoutError:
                    raise self.cache.force_timeout_error(timeout) from None
                tok = await self._wait_token()
            else:
                self._count("token_wait")
                tok = await self._wait_token()
        except NoTokenAvailable as e:
            self._count("unavailable")
            return _error(503, e.reason, str(e), keep, extra="Retry-After: 1\r\n"), None
        prepared = _Prepared(tok)
        return (prepared.keep if keep else prepared.close), tok

    def handed_out(self, conn: _Conn, tok: TokenSet) -> None:
        """Count and audit a token written to a client (once it is written, not before)."""
        self.stats.served += 1
        pid, uid, _ = conn.peer
        self.audit.record_handout(uid, pid, tok.fingerprint, tok.key_id)

    async def _wait_token(self) -> TokenSet:
        timeout = self.cache.policy.wait_timeout
        deadline = time.monotonic() + timeout
        while True:
            tok = self.cache.current()
            if tok is not None:
                return tok
            fut = self.cache.next_outcome(deadline)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self.cache._timeout_error(timeout)
            try:
                await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(fut)), remaining)
            except TimeoutError:
                raise self.cache._timeout_error(timeout) from None

    def status(self) -> dict[str, Any]:
        status = self.cache.status()
        tok = status.get("token")
        if tok:
            tok["expires_at"] = rfc3339(tok["expires_at"])
        totals = self.totals
        status["hsm_present"] = self.token_present()
        status["uptime_s"] = round(time.time() - self.started_at, 1)
        status["served"] = totals.served
        status["connections_open"] = len(self.conns)
        status["refused_peers"] = totals.refused_peers
        status["bad_requests"] = totals.bad_requests
        return status

    def metrics(self) -> str:
        c = self.cache.counters
        totals = self.totals
        out = [
            "# HELP tm_agent_mints_total Successful mints (HSM-signed).",
            "# TYPE tm_agent_mints_total counter",
            f"tm_agent_mints_total {c.get('mint_ok', 0)}",
            "# HELP tm_agent_refreshes_total Successful refreshes.",
            "# TYPE tm_agent_refreshes_total counter",
            f"tm_agent_refreshes_total {c.get('refresh_ok', 0)}",
            "# HELP tm_agent_failures_total Failed mints and refreshes by kind.",
            "# TYPE tm_agent_failures_total counter",
        ]
        for key, value in sorted(c.items()):
            if key.startswith("failure:"):
                out.append(f'tm_agent_failures_total{{kind="{key[8:]}"}} {value}')
        present = self.token_present()
        out += [
            "# HELP tm_agent_tokens_served_total Access tokens handed to clients.",
            "# TYPE tm_agent_tokens_served_total counter",
            f"tm_agent_tokens_served_total {totals.served}",
            "# HELP tm_agent_token_valid Whether a valid access token is cached.",
            "# TYPE tm_agent_token_valid gauge",
            f"tm_agent_token_valid {int(self.cache.current() is not None)}",
            "# HELP tm_agent_hsm_present Whether the PKCS#11 token answered last time (-1 unknown).",
            "# TYPE tm_agent_hsm_present gauge",
            f"tm_agent_hsm_present {-1 if present is None else int(present)}",
            "# HELP tm_agent_refused_peers_total Connections refused by the peer allow-list.",
            "# TYPE tm_agent_refused_peers_total counter",
            f"tm_agent_refused_peers_total {totals.refused_peers}",
            "# HELP tm_agent_request_seconds Socket API request latency.",
            "# TYPE tm_agent_request_seconds histogram",
        ]
        cumulative = 0
        for bound, count in zip(LATENCY_BUCKETS, totals.latency_counts, strict=False):
            cumulative += count
            out.append(f'tm_agent_request_seconds_bucket{{le="{bound}"}} {cumulative}')
        cumulative += totals.latency_counts[-1]
        out.append(f'tm_agent_request_seconds_bucket{{le="+Inf"}} {cumulative}')
        out.append(f"tm_agent_request_seconds_sum {totals.latency_sum:.6f}")
        out.append(f"tm_agent_request_seconds_count {cumulative}")
        return "\n".join(out) + "\n"

    async def start(self, sock: socket.socket) -> None:
        """Serve on the listening socket ``sock`` (bound and listening, non-blocking)."""
        self.loop = asyncio.get_running_loop()
        sock.setblocking(False)
        self._acceptor = _Acceptor(self, sock)
        self._acceptor.start()
        self._sweeper = self.loop.create_task(self._sweep())

    def adopt(self, conn: socket.socket, data: bytes, peer: tuple[int, int, int],
              unsent: bytes = b"", close_after: bool = False) -> None:
        """On the loop: take over a connection from the accept thread."""
        at_cap = len(self.conns) + len(self._adopting) >= self.limits.max_connections
        if self._closing or (at_cap and not self._make_room()):
            self.adopted += 1
            conn.close()
            return
        task = self.loop.create_task(self._adopt(conn, _Conn(self, peer, data, unsent, close_after)))
        self._adopting.add(task)
        task.add_done_callback(self._adopting.discard)

    def _make_room(self) -> bool:
        """At the connection cap: close the longest-idle keep-alive connection, if there is one.

        Otherwise one client holding thousands of idle connections would lock every other
        client out (one-shot token requests are answered by the accept thread regardless).
        """
        idle = [c for c in self.conns
                if not (c.in_request or c.busy or c.queue or c.closing) and c.transport is not None]
        if not idle:
            log.warning("connection limit (%d) reached; refusing a connection", self.limits.max_connections)
            return False
        victim = min(idle, key=lambda c: c.active)  # not the deadline: loop time ticks in ms
        victim.closing = True
        victim.transport.abort()  # connection_lost (which leaves self.conns) comes at once
        self.conns.discard(victim)
        return True

    async def _adopt(self, conn: socket.socket, protocol: _Conn) -> None:
        try:
            await self.loop.connect_accepted_socket(lambda: protocol, sock=conn)
        except OSError as e:  # the client went away in between
            log.debug("connection lost while being handed over: %s", e)
            conn.close()
        finally:
            self.adopted += 1  # in self.conns now, or closed: no longer pending

    async def _sweep(self) -> None:
        """Close idle and slow connections: one pass a second instead of a timer per request."""
        while True:
            await asyncio.sleep(1.0)
            now = self.loop.time()
            for conn in [c for c in self.conns if c.deadline < now or c.stall_deadline < now]:
                conn._timed_out()

    async def close(self) -> None:
        self._closing = True
        if self._acceptor is not None:
            await self.loop.run_in_executor(None, self._acceptor.stop)
        if self._sweeper is not None:
            self._sweeper.cancel()
        for task in list(self._adopting):
            task.cancel()
        for conn in list(self.conns):
            if conn.transport is not None:
                conn.transport.close()

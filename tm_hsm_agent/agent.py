"""The long-running agent: token handle + signer + client + cache + socket server, and shutdown.

``run_agent`` returns an exit status instead of exiting, so the CLI stays the only
place that ends the process. SIGTERM/SIGINT stop it cleanly: the listener closes,
the worker stops, the PKCS#11 session is logged out and closed, the socket removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tm_hsm_agent import app
from tm_hsm_agent.audit import AuditLog
from tm_hsm_agent.auth import JwksVerifier
from tm_hsm_agent.cache import CachePolicy, TokenCache
from tm_hsm_agent.config import Config
from tm_hsm_agent.errors import TmHsmError, TokenUnavailable
from tm_hsm_agent.server import AgentServer, Limits, bind_socket, systemd_socket
from tm_hsm_agent.signer import Es256Signer
from tm_hsm_agent.token import TokenHandle

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AgentOptions:
    prefetch: bool = False
    verify_tokens: bool = True
    wait_timeout: float = 5.0


def _raise_fd_limit() -> None:
    # Hundreds of clients at once need more descriptors than the usual soft limit of 1024.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _event_loop_policy() -> None:
    try:
        import uvloop
    except ImportError:
        log.info("event loop: asyncio (install the 'fast' extra for uvloop)")
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    log.info("event loop: uvloop %s", uvloop.__version__)


def run_agent(cfg: Config, options: AgentOptions, prompt: Callable[[str], str] | None = None) -> None:
    """Serve until SIGTERM/SIGINT. A fatal error (PIN, identity, configuration) is raised
    after everything is closed, so the CLI's error funnel reports it and sets the status."""
    started = time.time()
    key_id = cfg.require("key_id", app.UUID_HELP)
    client = app.auth_client(cfg)  # fails early on a missing TM_ENV / TM_AUTH_URL

    # Claim the socket before touching the token: a second agent must not use the PIN.
    inherited = systemd_socket()
    path = cfg.socket_path
    sock = inherited or bind_socket(path, cfg.socket_group)
    owns_path = inherited is None

    token = app.open_token(cfg, prompt=prompt)
    audit = AuditLog(cfg.audit_path)
    try:
        try:
            info = token.key_info()
            log.info("using key %s (%s) on token %s", info.label, info.thumbprint, info.token_serial)
        except TokenUnavailable as e:
            log.warning("token not available at start (%s); serving 503 until it is", e)
        signer = Es256Signer(token, audit)
        fatal: list[BaseException] = []
        cache = TokenCache(
            client,
            signer,
            key_id,
            verifier=JwksVerifier(client) if options.verify_tokens else None,
            policy=CachePolicy(
                backoff_cap=cfg.backoff_cap,
                wait_timeout=options.wait_timeout,
                # a mint may take two API calls (clock-skew retry) and a token operation
                force_timeout=2 * cfg.http_timeout + cfg.token_timeout + 1,
            ),
            on_fatal=fatal.append,
        )
        server = AgentServer(
            cache,
            audit=audit,
            token_present=lambda: token.present,
            allow_uids=cfg.allow_uids,
            allow_gids=cfg.allow_gids,
            limits=Limits(),
            started_at=started,
        )
        _raise_fd_limit()
        _event_loop_policy()
        cache.start(prefetch=options.prefetch)
        try:
            asyncio.run(_serve(server, sock, fatal, token, path))
        finally:
            # Stop listening before waiting for a mint in flight: a client arriving now
            # finds no socket at once, rather than queueing on a dying agent.
            _release(sock, path if owns_path else None)
            cache.stop(timeout=5)
        if fatal:
            raise fatal[0]
    finally:
        token.close()
        audit.close()
        _release(sock, path if owns_path else None)


def _release(sock: Any, path: Path | None) -> None:
    """Close the listening socket and remove its path (ours, not systemd's), once: a second
    call must not unlink a socket a new agent may have bound there meanwhile."""
    if sock.fileno() == -1:
        return
    sock.close()
    if path is not None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


class _DaemonExecutor(ThreadPoolExecutor):
    """A thread per call, as daemon threads: for the rare slow call (the token probe, every
    2 s). asyncio.run joins its default executor's threads on the way out, and one of these
    may be waiting on a hung token; shutdown must not wait for it. A ThreadPoolExecutor only
    in name (it never starts the pool): the stdlib loop accepts no other default executor
    since Python 3.11 (uvloop does)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()

        def run() -> None:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as e:  # noqa: BLE001 - delivered through the future
                    future.set_exception(e)

        threading.Thread(target=run, name="agent-slow-call", daemon=True).start()
        return future


async def _serve(server: AgentServer, sock: object, fatal: list[BaseException],
                 token: TokenHandle, path: Path) -> None:
    loop = asyncio.get_running_loop()
    loop.set_default_executor(_DaemonExecutor())
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start(sock)  # type: ignore[arg-type]
    log.info("agent serving on %s (pid %d)", path, os.getpid())
    probe = loop.create_task(_watch(server, fatal, stop, token))
    await stop.wait()
    probe.cancel()
    await server.close()


async def _watch(server: AgentServer, fatal: list[BaseException], stop: asyncio.Event,
                 token: TokenHandle) -> None:
    """Stop on a fatal error; probe the token now and then so status shows presence.

    A probe can log in again (after the token came back): a PIN or identity failure
    found that way is as fatal as one found by a mint.
    """
    probe_every = 2.0
    last_probe = 0.0
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        if fatal:
            stop.set()
            return
        now = time.monotonic()
        if now - last_probe >= probe_every:
            last_probe = now
            try:
                await loop.run_in_executor(None, token.probe)
            except TmHsmError as e:
                if not e.retryable:
                    fatal.append(e)
        await asyncio.sleep(0.2)

"""A tiny client for the agent's Unix socket: one call gets the current access token.

    from tm_hsm_agent.client import get_token
    headers = {"Authorization": f"Bearer {get_token()}"}

Uses only the standard library (and this package's config, errors and paths modules) so
any application can import it cheaply. It finds the socket as the agent does: argument,
TM_AGENT_SOCKET, the config file's ``agent_socket``, the default path.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import stat
import struct
from typing import Any

from tm_hsm_agent.config import load_config
from tm_hsm_agent.errors import AgentError, NoTokenAvailable


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # A non-blocking connect() to a Unix socket whose listen backlog is full fails at
            # once with EAGAIN (a burst of clients); a blocking one waits for room, up to
            # SO_SNDTIMEO. So: connect blocking, bounded by the timeout, then time reads too.
            timeout = self.timeout if isinstance(self.timeout, (int, float)) else None
            if timeout is not None:
                sec = int(timeout)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                                struct.pack("ll", sec, int((timeout - sec) * 1e6)))
            sock.settimeout(None)
            try:
                sock.connect(self._path)
            except BlockingIOError:
                raise TimeoutError(f"the agent's listen queue stayed full for {timeout}s") from None
            sock.settimeout(timeout)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def socket_path(path: str | os.PathLike[str] | None = None) -> str:
    """``path``, else the agent's own setting: TM_AGENT_SOCKET, the config file's
    ``agent_socket`` (TM_HSM_AGENT_CONFIG or the default file), the default path."""
    if path:
        return str(path)
    return str(load_config().socket_path)


def request_raw(method: str, url: str, path: str | os.PathLike[str] | None = None,
                timeout: float = 10.0) -> tuple[int, bytes]:
    """One request to the agent; returns (status, body bytes)."""
    where = socket_path(path)
    conn = _UnixHTTPConnection(where, timeout)
    try:
        conn.request(method, url)
        resp = conn.getresponse()
        raw = resp.read()
    except FileNotFoundError:
        raise AgentError(f"no agent socket at {where} (is `tm-hsm-agent serve` running?)") from None
    except ConnectionRefusedError:
        if os.path.exists(where) and not stat.S_ISSOCK(os.lstat(where).st_mode):
            raise AgentError(f"{where} is not a socket; is TM_AGENT_SOCKET right?") from None
        raise AgentError(f"no agent answers at {where} (stale socket?)") from None
    except (OSError, http.client.HTTPException) as e:
        raise AgentError(f"talking to the agent at {where} failed: {e}") from e
    finally:
        conn.close()
    return resp.status, raw


def request(method: str, url: str, path: str | os.PathLike[str] | None = None,
            timeout: float = 10.0) -> tuple[int, dict[str, Any]]:
    """One request to the agent; returns (status, JSON body)."""
    where = socket_path(path)  # resolved once: it may read the config file
    status, raw = request_raw(method, url, where, timeout)
    try:
        body = json.loads(raw)
    except ValueError:
        raise AgentError(f"the agent at {where} answered something that is not JSON") from None
    return status, body


def get_token_info(path: str | os.PathLike[str] | None = None, timeout: float = 10.0) -> dict[str, Any]:
    """The agent's whole answer: access_token, token_type, expires_at, key_id."""
    status, body = request("GET", "/v1/token", path, timeout)
    if status == 503:
        raise NoTokenAvailable(f"the agent answered 503: {body.get('message')}",
                               reason=str(body.get("error")))
    if status != 200:
        raise AgentError(f"agent answered HTTP {status}: {body.get('message')}")
    return body


def get_token(path: str | os.PathLike[str] | None = None, timeout: float = 10.0) -> str:
    """The current access token (a JWT) from the running agent."""
    return str(get_token_info(path, timeout)["access_token"])


def status(path: str | os.PathLike[str] | None = None, timeout: float = 10.0) -> dict[str, Any]:
    code, body = request("GET", "/v1/status", path, timeout)
    if code != 200:
        raise AgentError(f"agent answered HTTP {code}: {body.get('message')}")
    return body

"""The tiny socket client, against real Unix sockets (no agent needed for these cases)."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from tm_hsm_agent import client
from tm_hsm_agent.errors import AgentError


def _full_backlog(path) -> tuple[socket.socket, list[socket.socket]]:
    """A listener nobody accepts on, its queue filled until connect() would fail."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(0)
    queued = []
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(str(path))
        except BlockingIOError:
            s.close()
            return listener, queued
        queued.append(s)
        assert len(queued) < 100


def test_a_full_listen_queue_is_waited_out_not_failed_at_once(tmp_path):
    # A burst of clients fills the agent's backlog; the next connect must wait for room.
    path = tmp_path / "a.sock"
    listener, queued = _full_backlog(path)

    def accept_later() -> None:
        time.sleep(0.3)
        for _ in range(len(queued) + 1):
            conn, _ = listener.accept()
            conn.close()

    helper = threading.Thread(target=accept_later)
    helper.start()
    conn = client._UnixHTTPConnection(str(path), timeout=10)
    started = time.monotonic()
    conn.connect()  # blocks until there is room, instead of EAGAIN
    assert time.monotonic() - started >= 0.2
    assert conn.sock is not None and conn.sock.gettimeout() == 10
    conn.close()
    helper.join(10)
    for s in queued:
        s.close()
    listener.close()


def test_a_listen_queue_that_stays_full_times_out_with_a_clear_error(tmp_path):
    path = tmp_path / "a.sock"
    listener, queued = _full_backlog(path)
    started = time.monotonic()
    with pytest.raises(AgentError, match="listen queue stayed full"):
        client.get_token(path, timeout=0.5)
    assert 0.4 <= time.monotonic() - started < 5
    for s in queued:
        s.close()
    listener.close()


def test_no_socket_and_nobody_listening_are_clear_errors(tmp_path):
    with pytest.raises(AgentError, match="no agent socket"):
        client.get_token(tmp_path / "absent.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(tmp_path / "dead.sock"))
    dead.close()  # the file stays, nobody listens: a crashed agent's socket
    with pytest.raises(AgentError, match="no agent answers"):
        client.get_token(tmp_path / "dead.sock")


def test_the_socket_comes_from_the_config_file_too(tmp_path, monkeypatch):
    # As for the CLI: argument, TM_AGENT_SOCKET, the config file's agent_socket, default.
    config = tmp_path / "config.toml"
    config.write_text(f'agent_socket = "{tmp_path / "cfg.sock"}"\n')
    monkeypatch.setenv("TM_HSM_AGENT_CONFIG", str(config))
    monkeypatch.delenv("TM_AGENT_SOCKET", raising=False)
    assert client.socket_path() == str(tmp_path / "cfg.sock")
    monkeypatch.setenv("TM_AGENT_SOCKET", str(tmp_path / "env.sock"))
    assert client.socket_path() == str(tmp_path / "env.sock")
    assert client.socket_path(tmp_path / "arg.sock") == str(tmp_path / "arg.sock")
    with pytest.raises(AgentError, match="cfg.sock"):
        monkeypatch.delenv("TM_AGENT_SOCKET")
        client.get_token()


def test_a_regular_file_at_the_socket_path_is_named_as_such(tmp_path):
    path = tmp_path / "not-a-socket"
    path.write_text("hello")
    with pytest.raises(AgentError, match="is not a socket"):
        client.get_token(path)

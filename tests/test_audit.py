"""The audit log: one complete, fsync'd JSON line per signature; buffered, de-duplicated
hand-outs; a torn last line set aside on open; 0600; never a token (issue 3, "Audit log";
issue 4, "Crashes and shutdown")."""

from __future__ import annotations

import json
import os
import re
import stat
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from helpers import wait_for

import tm_hsm_agent.audit as audit_mod
from tm_hsm_agent import jose
from tm_hsm_agent.audit import AuditLog
from tm_hsm_agent.auth import TokenSet
from tm_hsm_agent.errors import SignatureFormatError
from tm_hsm_agent.signer import Es256Signer
from tm_hsm_agent.token import KeyInfo

KEY_ID = "5f1c1a4e-0b1d-4c7e-9d0e-1f2a3b4c5d6e"


class OsSpy:
    """Stands in for the ``os`` module inside tm_hsm_agent.audit: records write and fsync."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def write(self, fd: int, data: bytes) -> int:
        with self._lock:
            self.calls.append(("write", fd, bytes(data)))
        return os.write(fd, data)

    def fsync(self, fd: int) -> None:
        with self._lock:
            self.calls.append(("fsync", fd))
        os.fsync(fd)


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> OsSpy:
    s = OsSpy()
    monkeypatch.setattr(audit_mod, "os", s)
    return s


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "tm-hsm-agent" / "audit.log"


@pytest.fixture
def opened() -> Iterator[list[AuditLog]]:
    logs: list[AuditLog] = []
    yield logs
    for log in logs:
        try:
            log.close()
        except OSError:
            pass


def open_log(logs: list[AuditLog], path: Path, flush_interval: float = 1.0) -> AuditLog:
    log = AuditLog(path, flush_interval=flush_interval)
    logs.append(log)
    return log


def lines(path: Path) -> list[dict[str, Any]]:
    data = path.read_bytes()
    assert data == b"" or data.endswith(b"\n"), "log does not end on a line boundary"
    return [json.loads(line) for line in data.decode().splitlines()]


# -- signatures: written and fsync'd before record_now returns -----------------------------------


def test_record_now_is_one_complete_line_on_disk_when_it_returns(
    log_path: Path, opened: list[AuditLog], spy: OsSpy
) -> None:
    log = open_log(opened, log_path, flush_interval=60)
    spy.calls.clear()
    before = time.time()
    log.record_now("sign", key_id=KEY_ID, purpose="mint", outcome="ok", ts=1_800_000_000)
    # Read back through a separate file description, right after return.
    with open(log_path, "rb") as fh:
        data = fh.read()
    assert data.endswith(b"\n") and data.count(b"\n") == 1
    rec = json.loads(data)
    assert rec["event"] == "sign" and rec["key_id"] == KEY_ID
    assert rec["purpose"] == "mint" and rec["outcome"] == "ok" and rec["ts"] == 1_800_000_000
    assert before - 1 <= rec["time"] <= time.time() + 1
    # Exactly one write of the whole line, then an fsync of the same descriptor.
    assert [c[0] for c in spy.calls] == ["write", "fsync"]
    (_, wfd, written), (_, sfd) = spy.calls
    assert written == data and wfd == sfd


def test_record_now_from_many_threads_keeps_lines_whole(log_path: Path, opened: list[AuditLog]) -> None:
    log = open_log(opened, log_path, flush_interval=60)

    def worker(n: int) -> None:
        for i in range(25):
            log.record_now("sign", key_id=KEY_ID, purpose="mint", outcome="ok", who=n, i=i, pad="x" * 300)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    recs = lines(log_path)
    assert len(recs) == 100
    assert {(r["who"], r["i"]) for r in recs} == {(n, i) for n in range(4) for i in range(25)}


# -- hand-outs: buffered, flushed within about a second, once per (uid, pid, token) ---------------


def test_handout_does_no_io_on_the_hot_path(log_path: Path, opened: list[AuditLog], spy: OsSpy) -> None:
    log = open_log(opened, log_path, flush_interval=60)  # the flusher stays asleep here
    spy.calls.clear()
    for pid in range(100, 150):
        log.record_handout(1000, pid, "tokA", KEY_ID)
    assert spy.calls == []
    assert log_path.read_bytes() == b""
    log.flush()
    assert len(lines(log_path)) == 50
    assert [c[0] for c in spy.calls].count("fsync") == 1  # one fsync for the whole batch


def test_handouts_reach_the_disk_within_about_a_second(log_path: Path, opened: list[AuditLog]) -> None:
    log = open_log(opened, log_path)  # default: flushed at least once a second
    started = time.monotonic()
    log.record_handout(1000, 4242, "tokA", KEY_ID)
    wait_for(lambda: log_path.read_bytes().endswith(b"\n"), timeout=3.0, interval=0.02,
             what="the hand-out line")
    assert time.monotonic() - started < 1.8
    (rec,) = lines(log_path)
    assert rec == {"time": rec["time"], "event": "handout", "uid": 1000, "pid": 4242,
                   "token": "tokA", "key_id": KEY_ID}


def test_handouts_once_per_caller_and_token(log_path: Path, opened: list[AuditLog]) -> None:
    log = open_log(opened, log_path, flush_interval=60)
    for _ in range(5):
        log.record_handout(1000, 11, "tokA", KEY_ID)
    log.record_handout(1000, 12, "tokA", KEY_ID)  # another process of the same user
    log.record_handout(1001, 11, "tokA", KEY_ID)  # another user (pid reused)
    log.record_handout(1000, 11, "tokA", KEY_ID)
    log.record_handout(1000, 11, "tokB", KEY_ID)  # the next token: once more per caller
    log.record_handout(1000, 11, "tokB", KEY_ID)
    log.record_handout(1000, 12, "tokB", KEY_ID)
    log.flush()
    got = [(r["uid"], r["pid"], r["token"]) for r in lines(log_path)]
    assert got == [(1000, 11, "tokA"), (1000, 12, "tokA"), (1001, 11, "tokA"),
                   (1000, 11, "tokB"), (1000, 12, "tokB")]


def test_record_now_writes_pending_handouts_first(log_path: Path, opened: list[AuditLog]) -> None:
    log = open_log(opened, log_path, flush_interval=60)
    log.record_handout(1000, 11, "tokA", KEY_ID)
    log.record_now("sign", key_id=KEY_ID, purpose="refresh", outcome="ok")
    assert [r["event"] for r in lines(log_path)] == ["handout", "sign"]


def test_close_flushes_pending_handouts(log_path: Path) -> None:
    log = AuditLog(log_path, flush_interval=60)
    log.record_handout(1000, 11, "tokA", KEY_ID)
    log.close()
    assert [r["event"] for r in lines(log_path)] == ["handout"]


# -- a torn last line is set aside on open ---------------------------------------------------------


def _prepare(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, mode=0o700, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, 0o600)


def test_torn_last_line_is_set_aside(log_path: Path, opened: list[AuditLog]) -> None:
    good = b'{"event":"sign","i":1}\n{"event":"sign","i":2}\n'
    torn = b'{"event":"sign","i":3,"outc'
    _prepare(log_path, good + torn)
    log = open_log(opened, log_path, flush_interval=60)

    assert log.torn_tail is not None
    assert re.fullmatch(re.escape(log_path.name) + r"\.torn-\d+", log.torn_tail.name)
    assert log.torn_tail.parent == log_path.parent
    assert log.torn_tail.read_bytes() == torn  # nothing lost
    assert stat.S_IMODE(log.torn_tail.stat().st_mode) == 0o600
    assert log_path.read_bytes() == good  # earlier complete lines intact

    log.record_now("sign", key_id=KEY_ID, purpose="mint", outcome="ok", i=4)
    recs = lines(log_path)  # every line parses: the log continued on a clean boundary
    assert [r["i"] for r in recs] == [1, 2, 4]


def test_log_that_is_only_a_torn_line(log_path: Path, opened: list[AuditLog]) -> None:
    _prepare(log_path, b'{"event":"si')
    log = open_log(opened, log_path, flush_interval=60)
    assert log.torn_tail is not None and log.torn_tail.read_bytes() == b'{"event":"si'
    assert log_path.read_bytes() == b""
    log.record_now("sign", key_id=KEY_ID, purpose="mint", outcome="ok")
    assert len(lines(log_path)) == 1


def test_clean_log_is_left_alone(log_path: Path, opened: list[AuditLog]) -> None:
    good = b'{"event":"sign","i":1}\n'
    _prepare(log_path, good)
    log = open_log(opened, log_path, flush_interval=60)
    assert log.torn_tail is None
    assert not list(log_path.parent.glob("*.torn-*"))
    log.record_now("sign", key_id=KEY_ID, purpose="mint", outcome="ok", i=2)
    assert log_path.read_bytes().startswith(good)
    assert [r["i"] for r in lines(log_path)] == [1, 2]


def test_two_torn_tails_in_the_same_second(
    log_path: Path, opened: list[AuditLog], monkeypatch: pytest.MonkeyPatch
) -> None:
    frozen = types.SimpleNamespace(time=lambda: 1_800_000_000.25)
    monkeypatch.setattr(audit_mod, "time", frozen)
    _prepare(log_path, b'{"i":1}\n{"i":2,')
    first = open_log(opened, log_path, flush_interval=60)
    first.close()
    opened.remove(first)
    with open(log_path, "ab") as fh:
        fh.write(b'{"i":3}\n{"i":4,')  # crashed again mid-write, same second
    second = open_log(opened, log_path, flush_interval=60)
    assert second.torn_tail is not None and second.torn_tail.read_bytes() == b'{"i":4,'
    assert first.torn_tail is not None and first.torn_tail.read_bytes() == b'{"i":2,'
    assert [r["i"] for r in lines(log_path)] == [1, 3]


# -- mode, and never a token ------------------------------------------------------------------------


def test_log_file_is_0600_in_a_0700_directory(log_path: Path, opened: list[AuditLog]) -> None:
    old = os.umask(0)
    try:
        log = open_log(opened, log_path, flush_interval=60)
        log.record_now("sign", key_id=KEY_ID, purpose="mint", outcome="ok")
    finally:
        os.umask(old)
    assert stat.S_IMODE(log_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(log_path.parent.stat().st_mode) == 0o700
    assert log_path.stat().st_uid == os.getuid()


class SoftToken:
    """The signer's seam (sign -> (signature, KeyInfo)) with a software key; DER like many HSMs."""

    def __init__(self, garbage: bool = False) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.garbage = garbage
        pub = self.key.public_key()
        self.info = KeyInfo(pub, b"\x01\x02", "tm-api-key", "SERIAL-1", "tm-test",
                            jose.jwk_thumbprint(jose.ec_jwk(pub)))

    def sign(self, message: bytes) -> tuple[bytes, KeyInfo]:
        if self.garbage:
            return b"\x30\x03\x02\x01", self.info
        return self.key.sign(message, ec.ECDSA(hashes.SHA256())), self.info

    def key_info(self) -> KeyInfo:
        return self.info


def _jwt(claims: dict[str, Any]) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    head = jose.b64url_encode(json.dumps({"alg": "ES256", "kid": "k1"}).encode())
    body = jose.b64url_encode(json.dumps(claims).encode())
    sig = jose.der_to_raw(key.sign(f"{head}.{body}".encode(), ec.ECDSA(hashes.SHA256())))
    return f"{head}.{body}.{jose.b64url_encode(sig)}"


def test_no_token_or_signature_text_in_the_log(log_path: Path, opened: list[AuditLog]) -> None:
    log = open_log(opened, log_path, flush_interval=60)
    signer = Es256Signer(SoftToken(), log)
    signature = signer.sign_challenge(KEY_ID, 1_800_000_000, purpose="mint")
    # The line is on disk by the time the signature is handed back.
    (sign_rec,) = lines(log_path)
    assert sign_rec["event"] == "sign" and sign_rec["outcome"] == "ok" and sign_rec["purpose"] == "mint"
    assert sign_rec["key_id"] == KEY_ID and sign_rec["ts"] == 1_800_000_000
    assert sign_rec["key"] == signer.token.info.thumbprint

    access = _jwt({"sub": KEY_ID, "exp": 1_800_000_300, "token_use": "access"})
    refresh = _jwt({"sub": KEY_ID, "exp": 1_800_003_600, "token_use": "refresh"})
    tokens = TokenSet(access, refresh, "Bearer", 1_800_000_300.0, 1_800_000_000.0, KEY_ID, "mint")
    log.record_handout(1000, 77, tokens.fingerprint, KEY_ID)
    log.flush()

    text = log_path.read_text()
    assert tokens.fingerprint in text
    for secret in (access, refresh, signature, *access.split("."), refresh.split(".")[2]):
        assert secret not in text
    assert "eyJ" not in text  # nothing JWT-shaped at all


def test_a_refused_signature_is_audited_too(log_path: Path, opened: list[AuditLog]) -> None:
    log = open_log(opened, log_path, flush_interval=60)
    signer = Es256Signer(SoftToken(garbage=True), log)
    with pytest.raises(SignatureFormatError):
        signer.sign_challenge(KEY_ID, 1_800_000_000, purpose="mint")
    (rec,) = lines(log_path)
    assert rec["event"] == "sign" and rec["outcome"].startswith("bad-format")

"""Append-only audit log: one JSON line per event, never a token or a PIN.

Signatures are written synchronously (write + fsync) *before* the signature is
used, so a crash cannot leave a signature without its record. Token hand-outs are
recorded once per (caller, token) and buffered, flushed at least once a second, so
the hot path only appends to a list.

Each line goes out in one ``write`` of a complete line, so a kill -9 leaves at most
one torn last line; on open that torn tail is moved aside to ``<log>.torn-<time>``
and the log continues on a clean line boundary.

(A hash chain over the lines is planned.)
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from tm_hsm_agent.paths import private_dir

log = logging.getLogger(__name__)


class AuditLog:
    MAX_CALLERS = 10_000  # distinct (uid, pid) remembered per token

    def __init__(self, path: Path, flush_interval: float = 1.0) -> None:
        self.path = path
        private_dir(path.parent)
        self.torn_tail: Path | None = self._set_aside_torn_tail()
        old = os.umask(0o077)
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        finally:
            os.umask(old)
        self._lock = threading.Lock()
        self._pending_lock = threading.Lock()  # never held across I/O
        self._pending: list[bytes] = []
        self._seen: set[tuple[int, int, str]] = set()
        self._seen_token: str | None = None
        self._stop = threading.Event()
        self._flush_interval = flush_interval
        self._flusher = threading.Thread(target=self._flush_loop, name="audit-flush", daemon=True)
        self._flusher.start()

    def _set_aside_torn_tail(self) -> Path | None:
        try:
            with self.path.open("rb+") as fh:
                data = fh.read()
                if not data or data.endswith(b"\n"):
                    return None
                cut = data.rfind(b"\n") + 1
                fd, aside = self._new_aside_file()
                try:
                    os.write(fd, data[cut:])
                    os.fsync(fd)
                finally:
                    os.close(fd)
                fh.truncate(cut)
                fh.flush()
                os.fsync(fh.fileno())
        except FileNotFoundError:
            return None
        log.warning("audit log %s ended in a torn line; moved it to %s", self.path, aside)
        return aside

    def _new_aside_file(self) -> tuple[int, Path]:
        """``<log>.torn-<time>[.N]``: never overwrites an earlier torn tail (two crashes a second)."""
        base = f"{self.path.name}.torn-{int(time.time())}"
        for n in range(1000):
            aside = self.path.with_name(base if n == 0 else f"{base}.{n}")
            try:
                return os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), aside
            except FileExistsError:
                continue
        raise FileExistsError(f"too many torn-tail files beside {self.path}")

    @staticmethod
    def _line(event: str, fields: dict[str, Any]) -> bytes:
        record = {"time": round(time.time(), 3), "event": event, **fields}
        return (json.dumps(record, separators=(",", ":"), sort_keys=True) + "\n").encode()

    def record_now(self, event: str, **fields: Any) -> None:
        """Write one line and fsync it before returning (used before a signature is used)."""
        line = self._line(event, fields)
        with self._lock:
            self._write_pending_locked()
            os.write(self._fd, line)
            os.fsync(self._fd)

    def record_handout(self, uid: int, pid: int, token_id: str, key_id: str) -> None:
        """Note the first time a caller receives a given token. Cheap: no I/O here.

        Called from the accept thread and the event loop: a caller seen before costs one
        set lookup, without the lock; the first hand-out of a token to a caller takes it.
        """
        marker = (uid, pid, token_id)
        if marker in self._seen:
            return
        line = self._line("handout", {"uid": uid, "pid": pid, "token": token_id, "key_id": key_id})
        with self._pending_lock:
            if self._seen_token != token_id:
                self._seen = set()
                self._seen_token = token_id
            elif marker in self._seen:
                return
            if len(self._seen) >= self.MAX_CALLERS:
                # Bound memory under a flood of short-lived callers: a repeated line is
                # better than a missing one or an unbounded set.
                self._seen = set()
            self._seen.add(marker)
            self._pending.append(line)

    def _write_pending_locked(self) -> None:
        with self._pending_lock:
            lines, self._pending = self._pending, []
        if not lines:
            return
        for line in lines:
            os.write(self._fd, line)
        os.fsync(self._fd)

    def flush(self) -> None:
        with self._lock:
            self._write_pending_locked()

    def _flush_loop(self) -> None:
        while not self._stop.wait(self._flush_interval):
            try:
                self.flush()
            except OSError:
                log.exception("audit log flush failed")

    def close(self) -> None:
        self._stop.set()
        self._flusher.join(timeout=5)
        self.flush()
        os.close(self._fd)


class NullAudit:
    """For one-shot commands run without an audit path (tests of lower layers)."""

    def record_now(self, event: str, **fields: Any) -> None:
        pass

    def record_handout(self, uid: int, pid: int, token_id: str, key_id: str) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

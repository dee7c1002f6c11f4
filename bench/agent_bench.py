#!/usr/bin/env python3
"""Benchmark of tm-hsm-agent's socket API, side by side with OpenSSH's ssh-agent.

Self-contained: everything lives in a fresh temp dir and is torn down at the end
(also on Ctrl-C, SIGTERM or an exception):

* a SoftHSMv2 token of its own (softhsm-config/init-token.sh) and a P-256 key made
  by ``tm-hsm-agent keygen``;
* the sandbox Auth API (``tm-hsm-agent sandbox serve``) on a free loopback port,
  with the key registered (``tm-hsm-agent sandbox register``);
* the agent (``tm-hsm-agent serve --prefetch``) on a Unix socket in the temp dir;
* OpenSSH's ssh-agent holding the key from the SAME token (``ssh-add -s``).

Figures (see docs/benchmarks.md):

1. cached-token round trip p50/p99, per connection and keep-alive, raw-socket client;
2. tokens/s at 1, 16 and 256 concurrent keep-alive clients (multiprocess client);
3. time from ``serve`` process start to the first token served (median of runs);
4. the agent's RSS after the load runs;
5. the same round trips against ssh-agent (SSH2_AGENTC_REQUEST_IDENTITIES), with the
   client and both servers pinned to one CPU, and the agent/ssh-agent p50 ratio.

Usage: ``.venv/bin/python bench/agent_bench.py [--quick] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import gc
import json
import math
import multiprocessing as mp
import os
import platform
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PIN = "123456"
SO_PIN = "12345678"
LABEL = "tm-bench"
KEY_LABEL = "tm-api-key"

HTTP_CLOSE = b"GET /v1/token HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
HTTP_KEEP = b"GET /v1/token HTTP/1.1\r\nHost: x\r\n\r\n"
SSH_REQUEST_IDENTITIES = b"\x00\x00\x00\x01\x0b"  # uint32 length 1, SSH2_AGENTC_REQUEST_IDENTITIES
SSH2_AGENT_IDENTITIES_ANSWER = 12

TARGET_RATIO = 1.0
TARGET_TPS_16 = 10_000.0
TARGET_FIRST_TOKEN_S = 0.5
TARGET_RSS_MB = 60.0


# -- framing: how the client knows a response is complete --------------------------------


def http_frame(buf: bytes) -> int:
    """Total length of the HTTP response at the start of ``buf``; 0 if incomplete, -1 if bad."""
    i = buf.find(b"\r\n\r\n")
    if i < 0:
        return 0
    j = buf.find(b"\r\nContent-Length:", 0, i)
    if j < 0:
        j = buf[:i].lower().find(b"\r\ncontent-length:")
        if j < 0:
            return -1
    k = buf.find(b"\r\n", j + 17)
    try:
        total = i + 4 + int(buf[j + 17:k])
    except ValueError:
        return -1
    return total if len(buf) >= total else 0


def http_ok(buf: bytes) -> bool:
    return buf.startswith(b"HTTP/1.1 200 ")


def ssh_frame(buf: bytes) -> int:
    if len(buf) < 4:
        return 0
    total = 4 + int.from_bytes(buf[:4], "big")
    return total if len(buf) >= total else 0


def ssh_ok(buf: bytes) -> bool:
    return len(buf) > 4 and buf[4] == SSH2_AGENT_IDENTITIES_ANSWER


@dataclass(frozen=True)
class Proto:
    name: str
    close_request: bytes  # per-connection variant
    keep_request: bytes  # keep-alive variant
    frame: Callable[[bytes], int]
    ok: Callable[[bytes], bool]


HTTP = Proto("http", HTTP_CLOSE, HTTP_KEEP, http_frame, http_ok)
SSH = Proto("ssh", SSH_REQUEST_IDENTITIES, SSH_REQUEST_IDENTITIES, ssh_frame, ssh_ok)
PROTOS = {"http": HTTP, "ssh": SSH}


# -- the raw-socket client loop (the same for both servers) -------------------------------


class BenchError(Exception):
    pass


def _read_response(s: socket.socket, frame: Callable[[bytes], int]) -> tuple[bytes, int]:
    buf = s.recv(65536)
    m = frame(buf)
    while m == 0:
        chunk = s.recv(65536)
        if not chunk:
            return buf, -1
        buf += chunk
        m = frame(buf)
    return buf, m


def roundtrips(path: str, proto: Proto, n: int, per_conn: bool) -> tuple[list[int], int]:
    """``n`` timed round trips (ns each) and the number of bad answers."""
    out = [0] * n
    errors = 0
    clock = time.perf_counter_ns
    frame, ok = proto.frame, proto.ok
    AF_UNIX, SOCK_STREAM = socket.AF_UNIX, socket.SOCK_STREAM  # noqa: N806 - local aliases
    gc_was = gc.isenabled()
    gc.disable()
    try:
        if per_conn:
            req = proto.close_request
            for i in range(n):
                t0 = clock()
                s = socket.socket(AF_UNIX, SOCK_STREAM)
                s.connect(path)
                s.sendall(req)
                buf, m = _read_response(s, frame)
                s.close()
                out[i] = clock() - t0
                if m < 0 or not ok(buf):
                    errors += 1
        else:
            req = proto.keep_request
            s = socket.socket(AF_UNIX, SOCK_STREAM)
            s.connect(path)
            try:
                for i in range(n):
                    t0 = clock()
                    s.sendall(req)
                    buf, m = _read_response(s, frame)
                    out[i] = clock() - t0
                    if m < 0 or not ok(buf):
                        errors += 1
                        s.close()
                        s = socket.socket(AF_UNIX, SOCK_STREAM)
                        s.connect(path)
            finally:
                s.close()
    finally:
        if gc_was:
            gc.enable()
    return out, errors


def percentile(sorted_ns: list[int], p: float) -> float:
    """Nearest-rank percentile, in microseconds."""
    if not sorted_ns:
        return math.nan
    k = min(len(sorted_ns) - 1, max(0, math.ceil(p / 100.0 * len(sorted_ns)) - 1))
    return sorted_ns[k] / 1000.0


def summarize(samples: list[int], errors: int) -> dict[str, Any]:
    s = sorted(samples)
    return {
        "n": len(s),
        "errors": errors,
        "p50_us": round(percentile(s, 50), 1),
        "p99_us": round(percentile(s, 99), 1),
        "min_us": round(s[0] / 1000.0, 1) if s else math.nan,
        "mean_us": round(sum(s) / len(s) / 1000.0, 1) if s else math.nan,
    }


# -- load generator: keep-alive clients in several processes ------------------------------


def _connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    return s


def _load_worker(path: str, kind: str, nconns: int, go: Any, start_at: Any, duration: float,
                 results: Any) -> None:
    """One client process: ``nconns`` keep-alive connections, one request in flight on each."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent ends us; no tracebacks on Ctrl-C
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    _child_setup()  # and if the parent is killed outright, so are we
    proto = PROTOS[kind]
    req, frame, ok = proto.keep_request, proto.frame, proto.ok
    count = errors = 0
    cpu0 = cpu1 = 0.0
    try:
        socks = [_connect(path) for _ in range(nconns)]
    except OSError as e:
        results.put(("error", os.getpid(), f"connect failed: {e}"))
        return
    results.put(("ready", os.getpid(), None))
    if not go.wait(60):
        return
    t_start = start_at.value
    t_stop = t_start + duration
    counting = False
    mono = time.monotonic
    gc.disable()
    if nconns == 1:
        s = socks[0]
        while True:
            try:
                s.sendall(req)
                buf, m = _read_response(s, frame)
            except OSError:
                buf, m = b"", -1
            now = mono()
            if now >= t_stop:
                break
            if not counting and now >= t_start:
                counting = True
                cpu0 = sum(os.times()[:2])
            if m < 0 or not ok(buf):
                errors += counting
                with contextlib.suppress(OSError):
                    s.close()
                    s = _connect(path)
            elif counting:
                count += 1
        cpu1 = sum(os.times()[:2])
        s.close()
    else:
        ep = select.epoll()
        conns: dict[int, list[Any]] = {}
        for s in socks:
            s.setblocking(False)
            ep.register(s.fileno(), select.EPOLLIN)
            conns[s.fileno()] = [s, b""]
        for s in socks:
            s.send(req)
        while True:
            events = ep.poll(0.05)
            now = mono()
            if now >= t_stop:
                break
            if not counting and now >= t_start:
                counting = True
                cpu0 = sum(os.times()[:2])
            for fd, _ev in events:
                ent = conns[fd]
                s = ent[0]
                try:
                    data = s.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:  # the server dropped us: count it, reconnect
                    errors += counting
                    ep.unregister(fd)
                    del conns[fd]
                    s.close()
                    try:
                        s = _connect(path)
                    except OSError:
                        continue
                    s.setblocking(False)
                    ep.register(s.fileno(), select.EPOLLIN)
                    conns[s.fileno()] = [s, b""]
                    s.send(req)
                    continue
                buf = ent[1] + data if ent[1] else data
                m = frame(buf)
                if m == 0:
                    ent[1] = buf
                    continue
                ent[1] = b""
                if m > 0 and ok(buf):
                    count += counting
                else:
                    errors += counting
                s.send(req)
        cpu1 = sum(os.times()[:2])
        for ent in conns.values():
            ent[0].close()
        ep.close()
    results.put(("done", os.getpid(), (count, errors, cpu1 - cpu0)))


def _proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load_level(path: str, kind: str, clients: int, procs: int, duration: float, warmup: float,
               server_pid: int) -> dict[str, Any]:
    nprocs = max(1, min(clients, procs))
    shares = [clients // nprocs + (1 if i < clients % nprocs else 0) for i in range(nprocs)]
    ctx = mp.get_context("fork")
    go = ctx.Event()
    start_at = ctx.Value("d", 0.0, lock=False)
    results = ctx.Queue()
    workers = [
        ctx.Process(target=_load_worker, args=(path, kind, n, go, start_at, duration, results),
                    daemon=True)
        for n in shares
    ]
    try:
        for w in workers:
            w.start()
        ready = 0
        problems: list[str] = []
        while ready + len(problems) < nprocs:
            try:
                what, _pid, info = results.get(timeout=60)
            except Exception as e:
                raise BenchError(f"load workers did not get ready: {e!r}") from None
            if what == "ready":
                ready += 1
            else:
                problems.append(str(info))
        if problems:
            go.set()
            raise BenchError(f"{clients} clients: {'; '.join(problems)}")
        start_at.value = time.monotonic() + warmup
        go.set()
        time.sleep(max(0.0, start_at.value - time.monotonic()))
        srv_cpu0 = _proc_cpu_seconds(server_pid)
        time.sleep(max(0.0, start_at.value + duration - time.monotonic()))
        srv_cpu1 = _proc_cpu_seconds(server_pid)
        count = errors = 0
        client_cpu = 0.0
        for _ in range(nprocs):
            try:
                what, _pid, info = results.get(timeout=30)
            except Exception as e:
                raise BenchError(f"load workers did not report: {e!r}") from None
            if what == "done":
                count += info[0]
                errors += info[1]
                client_cpu += info[2]
        for w in workers:
            w.join(10)
    finally:
        for w in workers:
            if w.is_alive():
                w.terminate()
                w.join(5)
    srv_cpu = srv_cpu1 - srv_cpu0
    return {
        "clients": clients,
        "client_procs": nprocs,
        "duration_s": duration,
        "responses": count,
        "per_s": round(count / duration, 1),
        "errors": errors,
        "server_cpu_pct": round(100.0 * srv_cpu / duration, 1),
        "server_cpu_us_per_response": round(1e6 * srv_cpu / count, 1) if count else None,
        "client_cpu_pct": round(100.0 * client_cpu / duration, 1),
    }


# -- processes we start, and their teardown -----------------------------------------------

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
PR_SET_PDEATHSIG = 1


def _child_setup() -> None:
    # If the bench dies without cleaning up (SIGKILL), its children get SIGTERM.
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class Reaper:
    """A forked watcher for the one case ``finally`` cannot cover: the bench killed outright.

    PR_SET_PDEATHSIG covers most children, but the kernel clears it when a set-group-ID
    program is executed, and Debian's ssh-agent is setgid _ssh. The reaper learns each
    started pid (its own process group) through a pipe; if the pipe closes without
    "done", the bench died: it ends those groups and removes the temp dir.
    """

    def __init__(self, tmp: Path) -> None:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the watcher
            code = 0
            try:
                os.close(w)
                for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                    signal.signal(sig, signal.SIG_IGN)
                data = b""
                while chunk := os.read(r, 4096):
                    data += chunk
                words = data.decode().split()
                if "done" not in words:
                    live: set[int] = set()
                    for word in words:
                        if word.startswith("-"):
                            live.discard(int(word[1:]))
                        else:
                            live.add(int(word))
                    for sig in (signal.SIGTERM, signal.SIGKILL):
                        for group in live:
                            with contextlib.suppress(OSError):
                                os.killpg(group, sig)
                        time.sleep(1.0)
                    shutil.rmtree(tmp, ignore_errors=True)
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        os.close(r)
        self.pid = pid
        self._w: int | None = w

    def _say(self, word: str) -> None:
        if self._w is not None:
            with contextlib.suppress(OSError):
                os.write(self._w, f"{word}\n".encode())

    def watch(self, pid: int) -> None:
        self._say(str(pid))

    def unwatch(self, pid: int) -> None:
        self._say(f"-{pid}")

    def done(self) -> None:
        self._say("done")
        if self._w is not None:
            os.close(self._w)
            self._w = None
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)


class Procs:
    """Every long-running process the bench starts; ``stop_all`` ends them (by pid)."""

    def __init__(self, reaper: Reaper | None = None) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes], Any]] = []
        self.reaper = reaper

    def start(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
        fh = log.open("ab")
        p = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                             start_new_session=True, preexec_fn=_child_setup)
        self.procs.append((name, p, fh))
        if self.reaper is not None:
            self.reaper.watch(p.pid)
        return p

    def stop(self, p: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.terminate()
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)  # its own session: only what it started
                p.wait(5)
        # Children of the process (ssh-pkcs11-helper) share its process group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGTERM)
        if self.reaper is not None:
            self.reaper.unwatch(p.pid)
        for i, (_name, q, fh) in enumerate(self.procs):
            if q is p:
                fh.close()
                del self.procs[i]
                break

    def stop_all(self) -> None:
        for _name, p, _fh in reversed(list(self.procs)):
            with contextlib.suppress(Exception):
                self.stop(p)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    # ssh-agent's own shell snippet on stdout is not news.
    text = [t for t in text if not t.startswith(("SSH_AUTH_SOCK=", "echo Agent pid"))]
    return "\n".join(text[-lines:])


@contextlib.contextmanager
def deadline(seconds: float, what: str) -> Iterator[None]:
    """Fail the phase instead of hanging if a server stops answering a blocking read."""
    def on_alarm(signum: int, frame: Any) -> None:
        raise BenchError(f"{what} took longer than {seconds:.0f} s (a server stopped answering?)")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# -- CPU pinning --------------------------------------------------------------------------


def _process_tree(pid: int) -> list[int]:
    """``pid``'s thread ids and, recursively, those of its child processes."""
    out: list[int] = []
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except FileNotFoundError:
        return out
    out += tids
    children: set[int] = set()
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as fh:
                children.update(int(c) for c in fh.read().split())
        except OSError:
            pass
    for c in children:
        out += _process_tree(c)
    return out


def set_affinity_tree(pid: int, cpus: set[int]) -> int:
    """Pin every thread of ``pid`` and of its children (``taskset -a -p``); returns the count."""
    n = 0
    for tid in _process_tree(pid):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(tid, cpus)
            n += 1
    return n


def _cpu_idle() -> dict[int, int]:
    out = {}
    with open("/proc/stat") as fh:
        for line in fh:
            if line.startswith("cpu") and line[3].isdigit():
                f = line.split()
                out[int(f[0][3:])] = int(f[4]) + int(f[5])  # idle + iowait
    return out


def least_busy_cpu(cpus: set[int], sample: float = 0.5) -> int:
    """The allowed CPU that was idle longest over ``sample`` seconds (others may be busy)."""
    a = _cpu_idle()
    time.sleep(sample)
    b = _cpu_idle()
    return max(sorted(cpus), key=lambda c: b.get(c, 0) - a.get(c, 0))


@contextlib.contextmanager
def pinned(cpu: int, pids: list[int], all_cpus: set[int]) -> Iterator[dict[str, int]]:
    tasks = {str(pid): set_affinity_tree(pid, {cpu}) for pid in pids}
    os.sched_setaffinity(0, {cpu})
    try:
        yield tasks
    finally:
        os.sched_setaffinity(0, all_cpus)
        for pid in pids:
            set_affinity_tree(pid, all_cpus)


# -- the setup ----------------------------------------------------------------------------


def _tm_argv() -> list[str]:
    script = Path(sys.executable).parent / "tm-hsm-agent"
    return [str(script)] if script.exists() else [sys.executable, "-m", "tm_hsm_agent"]


def _default_module() -> str | None:
    try:
        from tm_hsm_agent.config import default_module
    except ImportError:
        candidates = ("/usr/lib/softhsm/libsofthsm2.so",
                      "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
                      "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
                      "/usr/local/lib/softhsm/libsofthsm2.so")
        return next((p for p in candidates if os.path.exists(p)), None)
    return default_module()


def _get(path: str, request: bytes = HTTP_CLOSE, timeout: float = 10.0) -> tuple[int, bytes]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
        s.sendall(request)
        buf, m = _read_response(s, http_frame)
    finally:
        s.close()
    if m < 0:
        return 0, buf
    return int(buf[9:12]), buf[buf.find(b"\r\n\r\n") + 4:m]


def _status_kb(pid: int, field: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _loaded(pid: int, needle: str) -> bool:
    try:
        with open(f"/proc/{pid}/maps") as fh:
            return needle in fh.read()
    except OSError:
        return False


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick: bool = args.quick
        self.tmp = Path(tempfile.mkdtemp(prefix="tm-agent-bench-"))
        self.reaper = Reaper(self.tmp)
        self.procs = Procs(self.reaper)
        self.tm = _tm_argv()
        self.env: dict[str, str] = {}
        self.agent: subprocess.Popen[bytes] | None = None
        self.agent_sock = str(self.tmp / "run" / "agent.sock")
        self.ssh_agent: subprocess.Popen[bytes] | None = None
        self.ssh_sock = str(self.tmp / "ssh" / "agent.sock")
        self.ssh_reason: str | None = None
        self.module: str | None = None
        self.all_cpus = set(os.sched_getaffinity(0))
        self.results: dict[str, Any] = {}
        self.rss_idle_kb: int | None = None
        self.notes: list[str] = []

    def log(self, msg: str) -> None:
        print(f"[{time.monotonic() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    def run_cli(self, *args: str, input: str | None = None, timeout: float = 60) -> str:
        r = subprocess.run([*self.tm, *args], env=self.env, input=input, capture_output=True, text=True,
                           timeout=timeout)
        if r.returncode != 0:
            raise BenchError(f"tm-hsm-agent {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
        return r.stdout

    # setup
    def setup(self) -> None:
        self.module = _default_module()
        if self.module is None or shutil.which("softhsm2-util") is None:
            raise BenchError("SoftHSMv2 is not installed (apt-get install softhsm2)")
        for d in ("state", "config", "run", "ssh", "pycache"):
            (self.tmp / d).mkdir(mode=0o700)
        conf = subprocess.run(
            [str(ROOT / "softhsm-config" / "init-token.sh"), str(self.tmp / "softhsm"), LABEL, PIN, SO_PIN],
            check=True, capture_output=True, text=True,
        ).stdout.strip()
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("TM_", "LISTEN_", "SSH_")) and k not in ("PYTHONDONTWRITEBYTECODE",)}
        env.update({
            "SOFTHSM2_CONF": conf,
            "TM_PKCS11_MODULE": self.module,
            "TM_TOKEN_LABEL": LABEL,
            "TM_KEY_LABEL": KEY_LABEL,
            "TM_PIN": PIN,
            "XDG_STATE_HOME": str(self.tmp / "state"),
            "XDG_CONFIG_HOME": str(self.tmp / "config"),
            "XDG_RUNTIME_DIR": str(self.tmp / "run"),
            "TM_AGENT_SOCKET": self.agent_sock,
            # Byte-compiled modules as an installed package has them, without writing into
            # the checkout (this environment may set PYTHONDONTWRITEBYTECODE).
            "PYTHONPYCACHEPREFIX": str(self.tmp / "pycache"),
        })
        self.env = env
        self.log(f"temp dir {self.tmp}; SoftHSM token '{LABEL}' initialised")
        self.run_cli("keygen")
        pem = self.run_cli("pubkey", "--format", "pem")
        (self.tmp / "public.pem").write_text(pem)
        port_file = self.tmp / "sandbox.port"
        sandbox = self.procs.start(
            "sandbox", [*self.tm, "sandbox", "serve", "--host", "127.0.0.1", "--port", "0",
                        "--port-file", str(port_file)], env, self.tmp / "sandbox.log")
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            if sandbox.poll() is not None:
                raise BenchError(f"sandbox exited {sandbox.returncode}:\n{_tail(self.tmp / 'sandbox.log')}")
            if time.monotonic() > deadline:
                raise BenchError("sandbox did not start in 30 s")
            time.sleep(0.02)
        origin = f"http://127.0.0.1:{port_file.read_text().strip()}"
        key_id = self.run_cli("sandbox", "register", "--url", origin, str(self.tmp / "public.pem")).strip()
        env["TM_AUTH_URL"] = f"{origin}/v1/auth"
        env["TM_KEY_ID"] = key_id
        self.log(f"sandbox at {origin}; key registered as {key_id}")

    def start_agent(self, sock: str, log_name: str) -> tuple[subprocess.Popen[bytes], float, float]:
        """Start ``serve --prefetch`` on ``sock``; (process, s to socket up, s to first token)."""
        env = {**self.env, "TM_AGENT_SOCKET": sock}
        log = self.tmp / log_name
        p = self.procs.start("agent", [*self.tm, "serve", "--prefetch"], env, log)
        t0 = time.perf_counter()  # from the moment Popen returns (the exec has happened)
        sock_up: float | None = None
        deadline = t0 + 60
        while True:
            if p.poll() is not None:
                raise BenchError(f"agent exited {p.returncode}:\n{_tail(log)}")
            if time.perf_counter() > deadline:
                raise BenchError(f"agent served no token within 60 s:\n{_tail(log)}")
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(10)
            try:
                s.connect(sock)
            except (FileNotFoundError, ConnectionRefusedError):
                s.close()
                time.sleep(0.0005)
                continue
            if sock_up is None:
                sock_up = time.perf_counter() - t0
            try:
                s.sendall(HTTP_CLOSE)
                buf, m = _read_response(s, http_frame)
            except OSError:
                buf, m = b"", -1
            finally:
                s.close()
            if m > 0 and http_ok(buf):
                return p, sock_up, time.perf_counter() - t0
            time.sleep(0.0005)  # e.g. 503 while the first mint is still failing

    # 3. start-up
    def measure_startup(self) -> None:
        runs = 3 if self.quick else 5
        out = []
        for i in range(runs + 1):  # run 0 fills the byte-code cache and is reported apart
            sock = str(self.tmp / "run" / f"startup-{i}.sock")
            p, sock_up, first = self.start_agent(sock, f"agent-startup-{i}.log")
            self.procs.stop(p)
            out.append({"socket_up_s": round(sock_up, 4), "first_token_s": round(first, 4)})
        timed = out[1:]
        firsts = sorted(r["first_token_s"] for r in timed)
        socks = sorted(r["socket_up_s"] for r in timed)
        self.results["startup"] = {
            "runs": timed,
            "cold_run": out[0],
            "median_first_token_s": firsts[len(firsts) // 2],
            "median_socket_up_s": socks[len(socks) // 2],
        }
        self.log(f"start-up: first token median {firsts[len(firsts) // 2]:.3f} s over {runs} runs "
                 f"({', '.join(f'{x:.3f}' for x in firsts)})")

    # 5. ssh-agent
    def start_ssh_agent(self) -> None:
        missing = [t for t in ("ssh-agent", "ssh-add") if shutil.which(t) is None]
        if missing:
            self.ssh_reason = f"{', '.join(missing)} not installed"
            return
        assert self.module is not None
        real = os.path.realpath(self.module)
        # ssh-agent checks the provider's realpath against -P; allow both spellings exactly.
        allow = ",".join(sorted({self.module, real}))
        log = self.tmp / "ssh-agent.log"
        env = dict(self.env)
        env.pop("TM_PIN", None)
        self.ssh_agent = self.procs.start("ssh-agent", ["ssh-agent", "-D", "-a", self.ssh_sock, "-P", allow],
                                          env, log)
        deadline = time.monotonic() + 10
        while not os.path.exists(self.ssh_sock):
            if self.ssh_agent.poll() is not None:
                self.ssh_reason = f"ssh-agent exited {self.ssh_agent.returncode}: {_tail(log, 5)}"
                return
            if time.monotonic() > deadline:
                self.ssh_reason = "ssh-agent did not create its socket in 10 s"
                return
            time.sleep(0.01)
        askpass = self.tmp / "ssh" / "askpass"
        askpass.write_text(f"#!/bin/sh\necho '{PIN}'\n")
        askpass.chmod(0o700)
        add_env = {**env, "SSH_AUTH_SOCK": self.ssh_sock, "SSH_ASKPASS": str(askpass),
                   "SSH_ASKPASS_REQUIRE": "force", "DISPLAY": env.get("DISPLAY", ":0")}
        try:
            r = subprocess.run(["ssh-add", "-s", self.module], env=add_env, stdin=subprocess.DEVNULL,
                               capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            self.ssh_reason = "ssh-add -s timed out after 60 s"
            return
        if r.returncode != 0:
            why = (r.stderr or r.stdout).strip()
            if "refused" in why:
                why += (f" (ssh-agent -P allow-list was {allow!r}, matched against the provider's "
                        "realpath; or ssh-pkcs11-helper could not load the module, find the "
                        "token via SOFTHSM2_CONF, or log in with the askpass PIN)")
            self.ssh_reason = f"ssh-add -s {self.module} failed ({r.returncode}): {why} {_tail(log, 3)}"
            self.ssh_reason = self.ssh_reason.strip()
            return
        listed = subprocess.run(["ssh-add", "-l"], env=add_env, capture_output=True, text=True, timeout=30)
        if listed.returncode != 0 or "ECDSA" not in listed.stdout:
            self.ssh_reason = f"ssh-agent holds no ECDSA key after ssh-add -s: {listed.stdout.strip()}"
            return
        # Same framing check as the load loop: the answer must be type 12 with one key.
        s = _connect(self.ssh_sock)
        try:
            s.sendall(SSH_REQUEST_IDENTITIES)
            buf, m = _read_response(s, ssh_frame)
        finally:
            s.close()
        if m < 0 or not ssh_ok(buf) or int.from_bytes(buf[5:9], "big") != 1:
            self.ssh_reason = f"unexpected REQUEST_IDENTITIES answer {buf[:16]!r}"
            return
        self.results["ssh_agent_key"] = listed.stdout.strip()
        self.log(f"ssh-agent (pid {self.ssh_agent.pid}) holds {listed.stdout.strip()} from the same token")

    # 1 and 5. round trips
    def measure_latency(self, label: str, pin_cpu: int | None, n: int) -> dict[str, Any]:
        assert self.agent is not None
        servers = [("agent", self.agent_sock, HTTP)]
        if self.ssh_reason is None and self.ssh_agent is not None:
            servers.append(("ssh_agent", self.ssh_sock, SSH))
        # Short alternating blocks: a burst of outside load on a busy machine then lands
        # on both servers alike instead of deciding the comparison.
        per_round = 250
        rounds = max(1, n // per_round)
        warm = 200 if self.quick else 500
        samples: dict[tuple[str, str], list[int]] = {}
        errors: dict[tuple[str, str], int] = {}
        pids = [self.agent.pid] + ([self.ssh_agent.pid] if len(servers) > 1 and self.ssh_agent else [])
        ctx: contextlib.AbstractContextManager[dict[str, int]] = (
            pinned(pin_cpu, pids, self.all_cpus) if pin_cpu is not None else contextlib.nullcontext({}))
        with ctx as tasks:
            for _name, path, proto in servers:
                for per_conn in (True, False):
                    roundtrips(path, proto, warm, per_conn)
            # Alternate the servers in blocks (ABBA) so drift on a busy machine hits both alike.
            for r in range(rounds):
                order = servers if r % 2 == 0 else list(reversed(servers))
                for mode, per_conn in (("per_conn", True), ("keepalive", False)):
                    for name, path, proto in order:
                        got, errs = roundtrips(path, proto, per_round, per_conn)
                        samples.setdefault((name, mode), []).extend(got)
                        errors[(name, mode)] = errors.get((name, mode), 0) + errs
        out: dict[str, Any] = {"pinned_cpu": pin_cpu, "pinned_tasks": tasks}
        for (name, mode), got in samples.items():
            out.setdefault(name, {})[mode] = summarize(got, errors[(name, mode)])
        if "ssh_agent" in out:
            out["ratio_p50"] = {
                mode: round(out["agent"][mode]["p50_us"] / out["ssh_agent"][mode]["p50_us"], 2)
                for mode in ("per_conn", "keepalive")
            }
        self.log(f"round trips ({label}): " + "; ".join(
            f"{name} {mode} p50 {v['p50_us']} us p99 {v['p99_us']} us"
            for name in ("agent", "ssh_agent") if name in out for mode, v in out[name].items()))
        return out

    def start_servers(self) -> None:
        self.agent, _up, first = self.start_agent(self.agent_sock, "agent.log")
        self.log(f"agent pid {self.agent.pid} serving (first token after {first:.3f} s)")
        status, body = _get(self.agent_sock)
        token = json.loads(body)
        if status != 200 or set(token) != {"access_token", "token_type", "expires_at", "key_id"}:
            raise BenchError(f"unexpected /v1/token answer {status}: {body[:200]!r}")
        self.rss_idle_kb = _status_kb(self.agent.pid, "VmRSS")
        self.results["machine"]["uvloop_in_agent"] = _loaded(self.agent.pid, "uvloop")
        self.results["machine"]["httptools_in_agent"] = _loaded(self.agent.pid, "httptools")
        self.results["response_bytes"] = {
            "agent_keepalive": len(_raw(self.agent_sock, HTTP_KEEP, http_frame)),
        }
        self.start_ssh_agent()
        if self.ssh_reason is not None:
            self.log(f"ssh-agent comparison skipped: {self.ssh_reason}")
        else:
            assert self.ssh_agent is not None
            self.results["response_bytes"]["ssh_agent"] = len(
                _raw(self.ssh_sock, SSH_REQUEST_IDENTITIES, ssh_frame))
        self.results["ssh_agent"] = {"available": self.ssh_reason is None, "reason": self.ssh_reason}

    def run(self) -> None:
        a = self.args
        if a.cpu is not None and a.cpu not in self.all_cpus:
            raise BenchError(f"--cpu {a.cpu} is not in this process's CPU set {sorted(self.all_cpus)}")
        with deadline(180, "setup"):
            self.setup()
        with deadline(300, "start-up runs"):
            self.measure_startup()
        with deadline(180, "starting the agent and ssh-agent"):
            self.start_servers()

        n = a.iterations or (2000 if self.quick else 10000)
        cpu = a.cpu if a.cpu is not None else least_busy_cpu(self.all_cpus)
        with deadline(120 + n / 100, "pinned round trips"):
            self.results["latency_pinned"] = self.measure_latency(f"pinned to CPU {cpu}", cpu, n)
        if not a.no_unpinned:
            with deadline(120 + n / 100, "unpinned round trips"):
                self.results["latency_unpinned"] = self.measure_latency("unpinned", None, max(1000, n // 2))

        assert self.agent is not None
        duration = a.duration or (1.5 if self.quick else 5.0)
        warmup = 0.3 if self.quick else 1.0
        procs = a.procs or max(2, len(self.all_cpus))
        levels = []
        for clients in (1, 16, 256):
            lv = load_level(self.agent_sock, "http", clients, procs, duration, warmup, self.agent.pid)
            lv["server"] = "agent"
            levels.append(lv)
            self.log(f"agent, {clients} clients: {lv['per_s']:.0f} tokens/s, {lv['errors']} errors, "
                     f"agent CPU {lv['server_cpu_pct']}%, client CPU {lv['client_cpu_pct']}%")
        if self.ssh_reason is None and self.ssh_agent is not None and not self.quick:
            lv = load_level(self.ssh_sock, "ssh", 16, procs, duration, warmup, self.ssh_agent.pid)
            lv["server"] = "ssh_agent"
            levels.append(lv)
            self.log(f"ssh-agent, 16 clients: {lv['per_s']:.0f} answers/s, {lv['errors']} errors")
        self.results["throughput"] = levels

        # 4. memory after the load
        self.results["rss"] = {
            "agent_vmrss_kb": _status_kb(self.agent.pid, "VmRSS"),
            "agent_vmhwm_kb": _status_kb(self.agent.pid, "VmHWM"),
            "agent_vmrss_before_load_kb": self.rss_idle_kb,
            "agent_threads": len(os.listdir(f"/proc/{self.agent.pid}/task")),
        }
        if self.ssh_agent is not None and self.ssh_agent.poll() is None:
            self.results["rss"]["ssh_agent_vmrss_kb"] = _status_kb(self.ssh_agent.pid, "VmRSS")
            helpers = [t for t in _process_tree(self.ssh_agent.pid) if t != self.ssh_agent.pid]
            self.results["rss"]["ssh_pkcs11_helper_vmrss_kb"] = sum(
                _status_kb(t, "VmRSS") or 0 for t in helpers) or None
        status, body = _get(self.agent_sock,
                            b"GET /v1/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        if status == 200:
            st = json.loads(body)
            self.results["agent_status"] = {k: st.get(k) for k in ("served", "connections_open",
                                                                   "refused_peers", "bad_requests")}


def _raw(path: str, request: bytes, frame: Callable[[bytes], int]) -> bytes:
    s = _connect(path)
    try:
        s.sendall(request)
        buf, _m = _read_response(s, frame)
    finally:
        s.close()
    return buf


# -- report -------------------------------------------------------------------------------


def _fmt(v: Any, spec: str = "") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return format(v, spec)


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    lat = res.get("latency_pinned", {})
    ratios = lat.get("ratio_p50")
    for mode, label in (("per_conn", "per-conn"), ("keepalive", "keep-alive")):
        value = ratios.get(mode) if ratios else None
        out.append({
            "target": f"p50 ratio agent/ssh-agent, {label} (pinned)",
            "goal": f"<= {TARGET_RATIO:.1f}",
            "measured": value,
            "shown": _fmt(value, ".2f") if value is not None else "n/a (no ssh-agent)",
            "status": "N/A" if value is None else ("PASS" if value <= TARGET_RATIO else "MISS"),
        })
    tps = next((lv["per_s"] for lv in res.get("throughput", [])
                if lv["server"] == "agent" and lv["clients"] == 16), None)
    out.append({"target": "tokens/s at 16 clients", "goal": f">= {TARGET_TPS_16:,.0f}", "measured": tps,
                "shown": _fmt(tps, ",.0f"),
                "status": "N/A" if tps is None else ("PASS" if tps >= TARGET_TPS_16 else "MISS")})
    first = res.get("startup", {}).get("median_first_token_s")
    out.append({"target": "serve start -> first token (median)", "goal": f"< {TARGET_FIRST_TOKEN_S} s",
                "measured": first, "shown": _fmt(first, ".3f") + " s",
                "status": "N/A" if first is None else ("PASS" if first < TARGET_FIRST_TOKEN_S else "MISS")})
    rss = res.get("rss", {}).get("agent_vmrss_kb")
    mb = rss / 1024 if rss else None
    out.append({"target": "agent RSS after load", "goal": f"< {TARGET_RSS_MB:.0f} MB", "measured": mb,
                "shown": _fmt(mb, ".1f") + " MB",
                "status": "N/A" if mb is None else ("PASS" if mb < TARGET_RSS_MB else "MISS")})
    return out


def report(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [
        "",
        "tm-hsm-agent benchmark" + (" (--quick: short runs, indicative only)" if res["quick"] else ""),
        f"  date {res['date']}  |  nproc {m['nproc']} (usable {m['usable_cpus']})  |  {m['cpu_model']}",
        f"  Python {m['python']} ({m['implementation']})  |  uvloop in agent: "
        f"{'yes' if m.get('uvloop_in_agent') else 'no'}  |  httptools: "
        f"{'yes' if m.get('httptools_in_agent') else 'no'}  |  {m['ssh_version']}",
        f"  load average at start {m['loadavg_start']}, at end {m.get('loadavg_end', '?')}",
        "",
    ]

    def lat_table(key: str, title: str) -> None:
        lat = res.get(key)
        if not lat:
            return
        lines.append(title)
        lines.append(f"  {'server':<12} {'mode':<15} {'p50 us':>9} {'p99 us':>9} {'min us':>8} "
                     f"{'n':>7} {'errors':>6}")
        for name, shown in (("agent", "tm-hsm-agent"), ("ssh_agent", "ssh-agent")):
            for mode, mshown in (("per_conn", "per-connection"), ("keepalive", "keep-alive")):
                v = lat.get(name, {}).get(mode)
                if v:
                    lines.append(f"  {shown:<12} {mshown:<15} {v['p50_us']:>9.1f} {v['p99_us']:>9.1f} "
                                 f"{v['min_us']:>8.1f} {v['n']:>7} {v['errors']:>6}")
        if "ratio_p50" in lat:
            r = lat["ratio_p50"]
            lines.append(f"  p50 ratio agent/ssh-agent: per-connection {r['per_conn']:.2f}, "
                         f"keep-alive {r['keepalive']:.2f}  (target <= {TARGET_RATIO:.1f})")
        lines.append("")

    cpu = res.get("latency_pinned", {}).get("pinned_cpu")
    lat_table("latency_pinned", f"1/5. Round trips, client + servers pinned to CPU {cpu} (all threads)")
    lat_table("latency_unpinned", "     Round trips, unpinned (for reference)")
    ssh = res.get("ssh_agent", {})
    if not ssh.get("available"):
        lines += [f"  ssh-agent comparison NOT measured: {ssh.get('reason')}", ""]

    lines.append("2. Throughput, keep-alive clients, one request in flight per connection")
    lines.append(f"  {'server':<12} {'clients':>7} {'procs':>5} {'responses/s':>12} {'errors':>6} "
                 f"{'server CPU':>10} {'CPU us/resp':>11} {'client CPU':>10}")
    for lv in res.get("throughput", []):
        shown = "tm-hsm-agent" if lv["server"] == "agent" else "ssh-agent"
        lines.append(f"  {shown:<12} {lv['clients']:>7} {lv['client_procs']:>5} {lv['per_s']:>12,.0f} "
                     f"{lv['errors']:>6} {lv['server_cpu_pct']:>9.0f}% "
                     f"{_fmt(lv['server_cpu_us_per_response'], '.1f'):>11} {lv['client_cpu_pct']:>9.0f}%")
    lines.append("")
    st = res.get("startup")
    if st:
        lines.append("3. serve --prefetch: from Popen returning to ...")
        lines.append(f"  socket accepting connections: median {st['median_socket_up_s']:.3f} s; "
                     f"first token served: median {st['median_first_token_s']:.3f} s")
        lines.append("  runs (first token, s): " + ", ".join(f"{r['first_token_s']:.3f}" for r in st["runs"])
                     + f"   [cold run, byte-code cache empty: {st['cold_run']['first_token_s']:.3f} s]")
        lines.append("")
    rss = res.get("rss")
    if rss:
        extra = ""
        if rss.get("ssh_agent_vmrss_kb") and res.get("ssh_agent", {}).get("available"):
            extra = (f"; ssh-agent {rss['ssh_agent_vmrss_kb'] / 1024:.1f} MB + ssh-pkcs11-helper "
                     f"{_fmt((rss.get('ssh_pkcs11_helper_vmrss_kb') or 0) / 1024, '.1f')} MB")
        lines.append(f"4. Agent memory after the load runs: VmRSS {rss['agent_vmrss_kb'] / 1024:.1f} MB "
                     f"(peak VmHWM {rss['agent_vmhwm_kb'] / 1024:.1f} MB; "
                     f"{_fmt((rss.get('agent_vmrss_before_load_kb') or math.nan) / 1024, '.1f')} MB "
                     f"before the round-trip and load runs; {rss['agent_threads']} threads)"
                     + extra)
        lines.append("")
    lines.append("Targets")
    lines.append(f"  {'target':<48} {'goal':>10} {'measured':>20}  status")
    for t in res["targets"]:
        lines.append(f"  {t['target']:<48} {t['goal']:>10} {t['shown']:>20}  {t['status']}")
    lines.append("")
    lines.append(f"total bench run time {res['runtime_s']:.1f} s")
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    model = platform.processor() or "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    ssh_version = "ssh-agent not found"
    if shutil.which("ssh"):
        r = subprocess.run(["ssh", "-V"], capture_output=True, text=True)
        ssh_version = (r.stderr or r.stdout).strip().split(",")[0]
    return {
        "nproc": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "kernel": platform.release(),
        "ssh_version": ssh_version,
        "loadavg_start": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
    }


T0 = time.monotonic()


def _on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short runs for a smoke check (< 60 s)")
    ap.add_argument("--json", metavar="PATH", help="also write the figures as JSON here")
    ap.add_argument("--cpu", type=int, default=None,
                    help="CPU to pin the comparison on (default: the least busy one, sampled)")
    ap.add_argument("--iterations", type=int, default=None, help="timed round trips per figure")
    ap.add_argument("--duration", type=float, default=None, help="seconds per throughput level")
    ap.add_argument("--procs", type=int, default=None,
                    help="client processes for the load (default max(2, nproc))")
    ap.add_argument("--no-unpinned", action="store_true", help="skip the unpinned round-trip figures")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs) afterwards")
    args = ap.parse_args(argv)

    # Explicitly: a shell may start us with SIGINT ignored (background jobs), and then
    # Python would not turn Ctrl-C into KeyboardInterrupt.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGHUP, _on_sigterm)
    bench = Bench(args)
    res = bench.results
    res["date"] = time.strftime("%Y-%m-%d %H:%M:%S %z")
    res["quick"] = args.quick
    res["machine"] = machine_info()
    code = 0
    try:
        bench.run()
    except KeyboardInterrupt:
        print("\ninterrupted; cleaning up", file=sys.stderr)
        code = 130
    except BenchError as e:
        print(f"agent_bench: error: {e}", file=sys.stderr)
        code = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip the cleanup
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        bench.procs.stop_all()
        if args.keep or code not in (0, 130):
            print(f"logs kept in {bench.tmp}", file=sys.stderr)
        else:
            shutil.rmtree(bench.tmp, ignore_errors=True)
        bench.reaper.done()
    if code != 0:
        return code
    res["machine"]["loadavg_end"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    res["targets"] = targets(res)
    res["runtime_s"] = round(time.monotonic() - T0, 1)
    print(report(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str) + "\n")
        print(f"figures written to {args.json}")
    return code


if __name__ == "__main__":
    sys.exit(main())

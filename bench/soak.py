"""Soak: the agent against the sandbox with 4 s tokens, 10% random API faults, the remote
token (p11-kit server) dropped and restored (with refresh tokens revoked so that mints are
needed, with the token there and without), and 50 polling clients.

    python bench/soak.py --duration 60 [--json out.json]

Exit status 0 only when no expired token was served, no request failed while a valid
token existed, and RSS and open descriptors stayed flat.

"A valid token existed" is judged from the outside: the newest token any client had
seen before the request was sent still had more than VALID_MARGIN seconds to live when
the answer arrived (the agent stops serving at min(1 s, lifetime/10) before expiry, plus
0.5 s for the server clock's 1 s resolution). Both ends of that are chosen so that a
busy machine's scheduling delays cannot turn a correct 503 into a counted failure: a
token first seen after the request was sent may not have existed when the agent answered,
and the answer was given at some moment before it arrived.
"""

from __future__ import annotations

import argparse
import json
import random
import threading
import time
from collections import Counter

from harness import Harness, proc_usage

from tm_hsm_agent import client, jose
from tm_hsm_agent.sandbox import SandboxOptions

VALID_MARGIN = 1.5
FAULT_MODES = (
    {"mode": "status", "status": 503},
    {"mode": "status", "status": 429, "retry_after": 1},
    {"mode": "reset"},
    {"mode": "malformed_json"},
    {"mode": "status", "status": 500},
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--poll", type=float, default=0.1, help="seconds between a client's requests")
    parser.add_argument("--fault-rate", type=float, default=0.10)
    parser.add_argument("--drops", type=int, default=4, help="times the token is dropped (at least)")
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args()

    harness = Harness(SandboxOptions(access_ttl=4.0), remote=True)
    try:
        return run(harness, args)
    finally:
        harness.close()


def run(h: Harness, args: argparse.Namespace) -> int:
    agent = h.start_agent("--prefetch")
    sandbox = h.sandbox.state
    jwks = sandbox.jwks()
    lock = threading.Lock()
    counts: Counter[str] = Counter()
    newest_exp = [0.0]
    stop = threading.Event()

    client.get_token(h.socket)  # warm: first token minted
    time.sleep(1.0)
    start_rss, start_fds = proc_usage(agent.pid)

    def poller() -> None:
        rng = random.Random()  # noqa: S311
        time.sleep(rng.uniform(0, args.poll))
        while not stop.is_set():
            with lock:
                known_exp = newest_exp[0]  # only tokens the agent had before this request
            try:
                status, body = client.request("GET", "/v1/token", h.socket, timeout=15)
            except Exception:  # noqa: BLE001 - counted as a failed request
                status, body = -1, {}
            now = sandbox.now()
            with lock:
                counts["requests"] += 1
                # The agent answered at some moment before `now`: if a token it already had
                # was still good for VALID_MARGIN after `now`, it was good when it answered.
                valid_existed = known_exp - now > VALID_MARGIN
                if status == 200:
                    token = body["access_token"]
                    try:
                        claims = jose.verify_jwt(token, jwks).claims
                    except ValueError:
                        counts["bad_tokens"] += 1
                    else:
                        if claims["exp"] <= now:
                            counts["expired_served"] += 1
                        newest_exp[0] = max(newest_exp[0], float(claims["exp"]))
                elif valid_existed:
                    counts["failed_while_valid"] += 1
                elif status == 503:
                    counts["503_no_valid_token"] += 1
                else:
                    counts["failed_no_valid_token"] += 1
            stop.wait(args.poll)

    def faults() -> None:
        rng = random.Random(7)  # noqa: S311
        while not stop.is_set():
            sandbox.set_faults(rate=args.fault_rate, **rng.choice(FAULT_MODES))
            stop.wait(5.0)
        sandbox.clear_faults()

    def token_drops() -> None:
        # Each cycle: a refresh token revoked while the token is present (a mint must
        # follow and succeed), then the token dropped, and while it is away the refresh
        # token revoked again, so a signature is needed and cannot be had until it returns.
        n = max(args.drops, 4)
        gap = args.duration / (n + 1)
        for _ in range(n):
            if stop.wait(gap * 0.25):
                return
            sandbox.revoke_refresh_tokens()
            counts["revocations"] += 1
            if stop.wait(gap * 0.25):
                return
            h.drop_token_server()
            counts["token_drops"] += 1
            stop.wait(gap * 0.1)
            sandbox.revoke_refresh_tokens()
            counts["revocations"] += 1
            stop.wait(gap * 0.4)  # longer than a token's life: clients see 503s meanwhile
            h.start_token_server()

    threads = [threading.Thread(target=poller, daemon=True) for _ in range(args.clients)]
    threads += [threading.Thread(target=faults, daemon=True),
                threading.Thread(target=token_drops, daemon=True)]
    began = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(args.duration)
    stop.set()
    for t in threads:
        t.join(30)
    elapsed = time.monotonic() - began
    if h.p11kit is None or h.p11kit.poll() is not None:
        h.start_token_server()
    time.sleep(0.5)
    end_rss, end_fds = proc_usage(agent.pid)
    status = client.status(h.socket)
    stats = sandbox.stats()
    code = h.stop_agent()

    report = {
        "duration_s": round(elapsed, 1),
        "clients": args.clients,
        "requests": counts["requests"],
        "503_while_no_valid_token": counts["503_no_valid_token"],
        "other_failures_while_no_valid_token": counts["failed_no_valid_token"],
        "expired_tokens_served": counts["expired_served"],
        "failed_requests_while_valid_token": counts["failed_while_valid"],
        "tokens_not_verifying": counts["bad_tokens"],
        "mints": stats["mints"],
        "refreshes": stats["refreshes"],
        "api_faults_injected": stats["faults_injected"],
        "token_drops": counts["token_drops"],
        "refresh_revocations": counts["revocations"],
        "agent_failures_by_kind": {k[8:]: v for k, v in status["counters"].items()
                                   if k.startswith("failure:")},
        "rss_mb_start": round(start_rss, 1),
        "rss_mb_end": round(end_rss, 1),
        "fds_start": start_fds,
        "fds_end": end_fds,
        "agent_exit": code,
    }
    flat = end_fds <= start_fds + 4 and end_rss <= start_rss + 15
    ok = (
        report["expired_tokens_served"] == 0
        and report["failed_requests_while_valid_token"] == 0
        and report["tokens_not_verifying"] == 0
        and report["token_drops"] >= 4
        and flat
        and code == 0
    )
    report["flat"] = flat
    report["ok"] = ok
    width = max(len(k) for k in report)
    for key, value in report.items():
        print(f"{key:<{width}}  {value}")
    if args.json_path:
        with open(args.json_path, "w") as fh:
            json.dump(report, fh, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

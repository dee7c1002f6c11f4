"""The token cache: one worker thread mints and refreshes; readers take the current token.

* In memory only: tokens are never written to disk.
* Single flight by construction: only the worker thread talks to the Auth API or
  the token, so however many clients ask, at most one mint or refresh is in flight.
* Refresh ahead of expiry (when less than min(60 s, lifetime/2) remains) while the
  current token keeps being served; never serve a token with less than
  min(1 s, lifetime/10) left, judged on the server's clock (latest estimate).
* A refused refresh (401: expired, revoked, reused) falls back to a fresh mint;
  transient failures back off exponentially with jitter, capped, honouring
  Retry-After up to the same cap. A refused *mint* is not retried automatically:
  re-signing in a loop on a 4xx only burns audit lines and rate limits.

The hot path (``current``) is two attribute reads and a clock read.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import Any, Protocol

from tm_hsm_agent import jose
from tm_hsm_agent.auth import AuthClient, JwksVerifier, TokenSet
from tm_hsm_agent.errors import (
    ApiRejected,
    ApiTransient,
    ConfigError,
    NoTokenAvailable,
    PinError,
    SignatureFormatError,
    TmHsmError,
    TokenIdentityError,
    TokenUnavailable,
    TokenVerifyError,
)

log = logging.getLogger(__name__)


class ChallengeSigner(Protocol):
    def sign_challenge(self, key_id: str, timestamp: int, purpose: str = "mint") -> str: ...


@dataclass(frozen=True)
class CachePolicy:
    refresh_ahead: float = 60.0  # refresh when less than min(this, lifetime/2) remains
    min_left: float = 1.0  # never serve with less than min(this, lifetime/10) left
    backoff_base: float = 0.5
    backoff_cap: float = 4.0
    wait_timeout: float = 5.0  # how long a client waits when no valid token is at hand
    force_timeout: float = 30.0  # how long a forced refresh may take (it may mint: sign + API)


# One place that says what a failure means for the cache: (kind, what to do).
#   retry  - back off and try again later
#   remint - the refresh token is no good: drop it and mint at once
#   block  - a refused mint: wait for an operator (a forced refresh) before signing again
#   fatal  - the agent cannot go on (PIN, wrong token, no configuration)
FAILURE_TABLE: tuple[tuple[type[BaseException], str, str, str], ...] = (
    # (error type, operation or "*", kind, action) — first match wins
    (PinError, "*", "pin", "fatal"),
    (TokenIdentityError, "*", "token_identity", "fatal"),
    (ConfigError, "*", "config", "fatal"),
    (TokenUnavailable, "*", "token_unavailable", "retry"),
    (ApiTransient, "*", "api_transient", "retry"),
    (ApiRejected, "refresh", "refresh_rejected", "remint"),
    (ApiRejected, "mint", "mint_rejected", "block"),
    (ApiRejected, "verify", "token_verify", "retry"),  # a JWKS 4xx after a good mint
    (TokenVerifyError, "*", "token_verify", "retry"),
    (SignatureFormatError, "*", "signature", "retry"),
    (TmHsmError, "*", "other", "retry"),
)


def classify_failure(err: BaseException, operation: str) -> tuple[str, str]:
    for etype, op, kind, action in FAILURE_TABLE:
        if isinstance(err, etype) and op in ("*", operation):
            return kind, action
    return "unexpected", "retry"


class TokenCache:
    def __init__(
        self,
        client: AuthClient,
        signer: ChallengeSigner,
        key_id: str,
        *,
        verifier: JwksVerifier | None = None,
        policy: CachePolicy | None = None,
        rng: random.Random | None = None,
        on_fatal: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.client = client
        self.clock = client.clock
        self.signer = signer
        self.key_id = key_id
        self.verifier = verifier
        self.policy = policy or CachePolicy()
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not secrecy
        self._on_fatal = on_fatal

        self._cond = threading.Condition()
        # (token, serve until on the server clock), replaced as one object so a reader
        # never pairs one token with another token's deadline.
        self._serving: tuple[TokenSet, float] | None = None
        self._refresh_at = 0.0  # server clock
        self._refresh_token: str | None = None
        self._refresh_until = 0.0
        self._demand = False
        self._forced = False
        self._forced_inflight = False
        self._forced_done = 0
        self._force_waiters: list[tuple[int, Future[None]]] = []
        self._blocked: BaseException | None = None
        self._fatal: BaseException | None = None
        self._failures_in_row = 0
        self._next_retry = 0.0  # time.monotonic()
        self._outcome: Future[None] = Future()
        self._stopping = False
        self._thread: threading.Thread | None = None

        self.counters: Counter[str] = Counter()
        self.last: dict[str, dict[str, Any]] = {}
        self.last_error: str | None = None
        self.last_error_kind: str | None = None

    # -- the hot path -------------------------------------------------------------------

    def current(self) -> TokenSet | None:
        """The token to hand out now, or None. Never one about to expire."""
        serving = self._serving
        if serving is not None and self.clock.now() + 0.5 < serving[1]:
            return serving[0]
        return None

    # -- waiting for a token -------------------------------------------------------------

    def _hopeless(self, deadline: float) -> NoTokenAvailable | None:
        """Why no token can arrive before ``deadline`` (monotonic), or None if one might."""
        if self._fatal is not None:
            return NoTokenAvailable(f"agent stopped minting: {self._fatal}", reason="fatal")
        can_refresh = self._refresh_token is not None and self.clock.now() < self._refresh_until
        if self._blocked is not None and not can_refresh and not self._forced:
            return NoTokenAvailable(
                f"the server refused the last mint ({self._blocked}); not re-signing "
                "automatically — fix the cause, then POST /v1/token/refresh",
                reason="mint_refused",
            )
        if self._next_retry > deadline and not self._forced:
            wait = self._next_retry - time.monotonic()
            return NoTokenAvailable(
                f"no valid token: {self.last_error or 'previous attempt failed'}; "
                f"next attempt in {wait:.1f}s",
                reason=self.last_error_kind or "unavailable",
            )
        return None

    def next_outcome(self, deadline: float) -> Future[None]:
        """A future resolved when the worker finishes its next attempt (registers demand).

        Raises NoTokenAvailable at once when nothing can arrive before ``deadline``.
        """
        with self._cond:
            err = self._hopeless(deadline)
            if err is not None:
                raise err
            if not self._demand:
                self._demand = True
                self._cond.notify_all()
            return self._outcome

    def get(self, timeout: float | None = None) -> TokenSet:
        """Blocking: a valid token within ``timeout`` seconds, or NoTokenAvailable."""
        timeout = self.policy.wait_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            tok = self.current()
            if tok is not None:
                return tok
            fut = self.next_outcome(deadline)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._timeout_error(timeout)
            try:
                fut.result(timeout=remaining)
            except TimeoutError:
                raise self._timeout_error(timeout) from None

    def _timeout_error(self, timeout: float) -> NoTokenAvailable:
        why = f"; last error: {self.last_error}" if self.last_error else ""
        return NoTokenAvailable(f"no valid token within {timeout:.0f}s{why}", reason="timeout")

    def force(self) -> Future[None]:
        """Ask for a refresh (or mint) now, even if the current token is fresh; clears a
        refused-mint block. Returns a future resolved once a forced attempt that *started
        after this call* has finished (a refused refresh and the mint that follows it count
        as one), failed with NoTokenAvailable if that attempt failed.

        Callers arriving together share one attempt; nobody needs a thread to wait.
        """
        with self._cond:
            if self._fatal is not None:
                raise NoTokenAvailable(f"agent stopped minting: {self._fatal}", reason="fatal")
            if self._stopping:
                raise NoTokenAvailable("agent is stopping", reason="stopping")
            target = self._forced_done + (2 if self._forced_inflight else 1)
            waiter: Future[None] = Future()
            self._force_waiters.append((target, waiter))
            self._forced = True
            self._blocked = None
            self._next_retry = 0.0
            self._cond.notify_all()
            return waiter

    def force_refresh(self, timeout: float | None = None) -> TokenSet:
        """Blocking: ``force()``, wait for it, then return the valid token it produced."""
        timeout = self.policy.force_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        try:
            self.force().result(timeout=timeout)
        except TimeoutError:
            raise self.force_timeout_error(timeout) from None
        return self.get(max(deadline - time.monotonic(), 0.0))

    def force_timeout_error(self, timeout: float) -> NoTokenAvailable:
        still = " (the current token is still being served)" if self.current() else ""
        return NoTokenAvailable(f"forced refresh did not finish within {timeout:.0f}s{still}",
                                reason="timeout")

    def _settle_force_waiters(self, error: BaseException | None, everyone: bool = False) -> None:
        """Resolve the waiters whose forced attempt has finished (all of them with ``everyone``)."""
        keep: list[tuple[int, Future[None]]] = []
        for target, waiter in self._force_waiters:
            if not everyone and target > self._forced_done:
                keep.append((target, waiter))
                continue
            with contextlib.suppress(InvalidStateError):  # its caller gave up (cancelled) already
                if error is None:
                    waiter.set_result(None)
                elif isinstance(error, NoTokenAvailable):
                    waiter.set_exception(error)
                else:
                    why = "agent stopped minting" if everyone else "forced refresh failed"
                    waiter.set_exception(NoTokenAvailable(
                        f"{why}: {error}", reason=self.last_error_kind or "failed"))
        self._force_waiters = keep

    # -- the worker -------------------------------------------------------------------

    def start(self, prefetch: bool = False) -> None:
        self._demand = prefetch
        self._thread = threading.Thread(target=self._run, name="token-cache", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _plan(self) -> tuple[str | None, float | None]:
        """(action, None) to act now, or (None, seconds to sleep; None = until woken)."""
        if self._fatal is not None:
            return None, None
        now_mono = time.monotonic()
        can_refresh = self._refresh_token is not None and self.clock.now() < self._refresh_until
        action = "refresh" if can_refresh else "mint"
        if self._forced:
            return action, None
        if self._next_retry > now_mono:
            return None, self._next_retry - now_mono
        if self._serving is not None:
            due = self._refresh_at - self.clock.now()
            if due > 0:
                return None, due
        elif not self._demand:
            return None, None
        if action == "mint" and self._blocked is not None:
            return None, None
        return action, None

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._stopping:
                        self._outcome.set_result(None)
                        self._settle_force_waiters(
                            NoTokenAvailable("agent is stopping", reason="stopping"), everyone=True)
                        return
                    action, delay = self._plan()
                    if action is not None:
                        break
                    self._cond.wait(delay)
                forced, self._forced = self._forced, False
                self._forced_inflight = forced
                refresh_token = self._refresh_token
            self._attempt(action, refresh_token, forced)

    def _attempt(self, action: str, refresh_token: str | None, forced: bool) -> None:
        started = time.time()
        try:
            if action == "refresh" and refresh_token is not None:
                tokens = self.client.refresh(refresh_token, self.key_id)
            else:
                action = "mint"
                tokens = self.client.mint(self.key_id, self.signer.sign_challenge)
        except BaseException as e:  # noqa: BLE001 - classified below, re-raised if unknown
            self._failed(action, e, started, forced)
            if not isinstance(e, Exception):
                raise
            return
        if self.verifier is not None:
            try:
                self.verifier.verify(tokens.access_token)
            except Exception as e:  # noqa: BLE001 - classified below
                # The mint or refresh worked; only the check failed (a JWKS hiccup, a
                # rotating key). Keep the new refresh token so the retry needs no signature.
                self._failed("verify", e, started, forced, keep_refresh=tokens.refresh_token)
                return
        self._succeeded(action, tokens, started, forced)

    def _succeeded(self, action: str, tokens: TokenSet, started: float, forced: bool) -> None:
        lifetime = tokens.lifetime
        with self._cond:
            self._serving = (tokens, tokens.expires_at - min(self.policy.min_left, lifetime / 10))
            self._refresh_at = tokens.expires_at - min(self.policy.refresh_ahead, lifetime / 2)
            self._set_refresh_token(tokens.refresh_token)
            self._failures_in_row = 0
            self._next_retry = 0.0
            self._blocked = None
            self._demand = False
            self.last_error = None
            self.last_error_kind = None
            self.counters[f"{action}_ok"] += 1
            self.last[action] = {"at": started, "outcome": "ok", "token": tokens.fingerprint}
            self._publish(forced, None)
        log.info("%s ok: token %s valid for %.0fs", action, tokens.fingerprint, lifetime)

    def _failed(self, action: str, err: BaseException, started: float, forced: bool,
                keep_refresh: str | None = None) -> None:
        kind, what = classify_failure(err, action)
        with self._cond:
            if keep_refresh is not None:
                self._set_refresh_token(keep_refresh)
            self.counters[f"{action}_failed"] += 1
            self.counters[f"failure:{kind}"] += 1
            self.last_error = str(err)
            self.last_error_kind = kind
            self.last[action] = {"at": started, "outcome": kind, "error": str(err)}
            if what == "remint":
                # The refresh was due (or forced): mint now rather than at the next due time.
                self._refresh_token = None
                self._forced = True
            elif what == "block":
                self._blocked = err
            elif what == "fatal":
                self._fatal = err
            else:
                self._failures_in_row += 1
                self._next_retry = time.monotonic() + self._backoff(err)
            # A refused refresh hands over to the mint it triggers: that one finishes the force.
            self._publish(forced and what != "remint", err)
        log.warning("%s failed (%s, %s): %s", action, kind, what, err)
        if what == "fatal" and self._on_fatal is not None:
            self._on_fatal(err)

    def _set_refresh_token(self, token: str) -> None:
        self._refresh_token = token
        refresh_exp = _jwt_exp(token)
        # An opaque refresh token's lifetime is unknown: try it; a 401 means mint.
        self._refresh_until = refresh_exp if refresh_exp is not None else float("inf")

    def _backoff(self, err: BaseException) -> float:
        cap = self.policy.backoff_cap
        # The exponent is bounded: 2**1024 is past what a float holds (weeks of outage).
        step = min(cap, self.policy.backoff_base * 2 ** min(self._failures_in_row - 1, 60))
        delay = step / 2 + self._rng.uniform(0, step / 2)
        retry_after = getattr(err, "retry_after", None)
        if retry_after is not None:
            delay = max(delay, float(retry_after))
        return min(delay, cap)

    def _publish(self, forced_finished: bool, error: BaseException | None) -> None:
        self.counters["attempts"] += 1
        self._forced_inflight = False
        if forced_finished:
            self._forced_done += 1
            self._settle_force_waiters(error)
        if self._fatal is not None:  # no forced attempt will ever come now
            self._settle_force_waiters(self._fatal, everyone=True)
        done, self._outcome = self._outcome, Future()
        done.set_result(None)
        self._cond.notify_all()

    # -- status ---------------------------------------------------------------------

    @property
    def fatal(self) -> BaseException | None:
        return self._fatal

    def status(self) -> dict[str, Any]:
        tok = self._serving[0] if self._serving is not None else None
        retry_in = self._next_retry - time.monotonic()
        return {
            "key_id": self.key_id,
            "token": None
            if tok is None
            else {
                "id": tok.fingerprint,
                "expires_at": tok.expires_at,
                "expires_in_s": round(tok.expires_at - self.clock.now(), 3),
                "valid": self.current() is not None,
                "via": tok.via,
            },
            "last_mint": self.last.get("mint"),
            "last_refresh": self.last.get("refresh"),
            "last_error": self.last_error,
            "last_error_kind": self.last_error_kind,
            "next_retry_in_s": round(retry_in, 3) if retry_in > 0 else None,
            "mint_blocked": str(self._blocked) if self._blocked else None,
            "fatal": str(self._fatal) if self._fatal else None,
            "clock_offset_s": round(self.clock.offset, 3),
            "counters": dict(self.counters),
        }


def _jwt_exp(token: str) -> float | None:
    try:
        return jose.numeric_date(jose.decode_unverified(token).claims.get("exp"))
    except ValueError:
        return None  # an opaque refresh token: its lifetime is unknown

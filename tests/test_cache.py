"""The token cache: failure classification, single flight, refresh ahead, fallbacks, backoff.

Most tests run the real cache against the real sandbox over loopback with a software
P-256 signer (no PKCS#11). A few unit tests use a fake Auth client and a fake server
clock where the point is an exact interleaving or a very long run of failures.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from helpers import SoftSigner, wait_for

from tm_hsm_agent.auth import AuthClient, JwksVerifier, ServerClock, TokenSet
from tm_hsm_agent.cache import FAILURE_TABLE, CachePolicy, TokenCache, classify_failure
from tm_hsm_agent.errors import (
    ApiError,
    ApiRejected,
    ApiTransient,
    ConfigError,
    KeyNotFound,
    NoTokenAvailable,
    PinError,
    SignatureFormatError,
    TmHsmError,
    TokenError,
    TokenIdentityError,
    TokenUnavailable,
    TokenVerifyError,
)
from tm_hsm_agent.jose import verify_jwt

UNREGISTERED = "00000000-0000-4000-8000-000000000000"


class PinFailingSigner(SoftSigner):
    def sign_challenge(self, key_id: str, timestamp: int, purpose: str = "mint") -> str:
        self.calls.append((key_id, timestamp, purpose))
        raise PinError("the token refused the PIN (2 attempts left)", attempts_left="2")


class Desk:
    """The sandbox plus a registered software key; builds started caches and stops them."""

    def __init__(self, sandbox: Any) -> None:
        self.sandbox = sandbox
        self.signer = SoftSigner()
        self.key_id = sandbox.state.register_key(self.signer.pem())
        self.caches: list[TokenCache] = []
        self.fatals: list[BaseException] = []

    def cache(
        self,
        *,
        signer: Any = None,
        key_id: str | None = None,
        verify: bool = True,
        prefetch: bool = False,
        **policy: Any,
    ) -> TokenCache:
        client = AuthClient(self.sandbox.url, self.sandbox.jwks_url, timeout=2.0)
        policy.setdefault("backoff_base", 0.1)
        policy.setdefault("backoff_cap", 1.0)
        cache = TokenCache(
            client,
            signer or self.signer,
            key_id or self.key_id,
            verifier=JwksVerifier(client) if verify else None,
            policy=CachePolicy(**policy),
            rng=random.Random(1234),
            on_fatal=self.fatals.append,
        )
        cache.start(prefetch=prefetch)
        self.caches.append(cache)
        return cache

    def stats(self) -> dict[str, int]:
        return self.sandbox.state.stats()

    def valid(self, tok: TokenSet) -> dict[str, Any]:
        """The claims, if the token verifies and has not expired on the sandbox's clock."""
        return verify_jwt(tok.access_token, self.sandbox.state.jwks(), now=self.sandbox.state.now()).claims


@pytest.fixture
def desk(sandbox) -> Iterator[Desk]:
    d = Desk(sandbox)
    yield d
    for cache in d.caches:
        cache.stop(timeout=3)


# -- the failure table -------------------------------------------------------------------------

FAILURES = [
    # error, operation, kind, action
    (PinError("wrong PIN"), "mint", "pin", "fatal"),
    (PinError("wrong PIN"), "refresh", "pin", "fatal"),
    (TokenIdentityError("other token"), "mint", "token_identity", "fatal"),
    (ConfigError("no key_id"), "mint", "config", "fatal"),
    (TokenUnavailable("token gone"), "mint", "token_unavailable", "retry"),
    (TokenUnavailable("token gone"), "refresh", "token_unavailable", "retry"),
    (ApiTransient("503", status=503), "mint", "api_transient", "retry"),
    (ApiTransient("503", status=503), "refresh", "api_transient", "retry"),
    (ApiTransient("429", status=429, retry_after=3), "mint", "api_transient", "retry"),
    (ApiTransient("timeout"), "refresh", "api_transient", "retry"),
    (ApiRejected("401", status=401), "refresh", "refresh_rejected", "remint"),
    (ApiRejected("400", status=400), "refresh", "refresh_rejected", "remint"),
    (ApiRejected("401", status=401), "mint", "mint_rejected", "block"),
    (ApiRejected("400", status=400), "mint", "mint_rejected", "block"),
    (TokenVerifyError("bad JWT"), "mint", "token_verify", "retry"),
    (TokenVerifyError("bad JWT"), "refresh", "token_verify", "retry"),
    (SignatureFormatError("bad DER"), "mint", "signature", "retry"),
    (TokenError("CKR_DEVICE_ERROR"), "mint", "other", "retry"),
    (KeyNotFound("no key"), "mint", "other", "retry"),
    (ApiError("generic"), "refresh", "other", "retry"),
    (TmHsmError("generic"), "mint", "other", "retry"),
    (ValueError("surprise"), "mint", "unexpected", "retry"),
    (RuntimeError("surprise"), "refresh", "unexpected", "retry"),
]


@pytest.mark.parametrize(
    ("err", "op", "kind", "action"), FAILURES,
    ids=[f"{type(f[0]).__name__}-{f[1]}" for f in FAILURES],
)
def test_classify_failure_table(err: BaseException, op: str, kind: str, action: str) -> None:
    assert classify_failure(err, op) == (kind, action)


def test_failure_table_is_well_formed() -> None:
    actions = {row[3] for row in FAILURE_TABLE}
    assert actions <= {"retry", "remint", "block", "fatal"}
    assert {row[1] for row in FAILURE_TABLE} <= {"*", "mint", "refresh", "verify"}
    # No row is shadowed by an earlier, broader one (first match wins).
    for i, (etype, op, _kind, _action) in enumerate(FAILURE_TABLE):
        for earlier, eop, _k, _a in FAILURE_TABLE[:i]:
            assert not (issubclass(etype, earlier) and eop in ("*", op)), (etype, earlier)
    # Every row's kind is reachable through classify_failure.
    for etype, op, kind, action in FAILURE_TABLE:
        probe = etype.__new__(etype)
        assert classify_failure(probe, "mint" if op == "*" else op) == (kind, action)


# -- single flight -------------------------------------------------------------------------------


def test_single_flight_many_threads_one_mint(desk: Desk) -> None:
    cache = desk.cache()
    n = 48
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n

    def ask(i: int) -> None:
        barrier.wait()
        try:
            results[i] = cache.get(timeout=10)
        except Exception as e:  # noqa: BLE001 - reported below
            results[i] = e

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    failures = [r for r in results if not isinstance(r, TokenSet)]
    assert not failures, failures[:3]
    assert len({r.access_token for r in results}) == 1
    desk.valid(results[0])
    stats = desk.stats()
    assert (stats["mint_attempts"], stats["mints"]) == (1, 1)
    assert len(desk.signer.calls) == 1
    assert cache.counters["mint_ok"] == 1


# -- refresh ahead, never an expired token --------------------------------------------------------


@pytest.mark.parametrize("sandbox", [{"access_ttl": 2.0}], indirect=True)
def test_refresh_ahead_and_never_an_expired_token(desk: Desk) -> None:
    cache = desk.cache()
    first = cache.get(timeout=5)
    seen: list[TokenSet] = []
    seen_at: list[float] = []  # the sandbox's own clock when each token was first handed out

    def poll() -> bool:
        tok = cache.get(timeout=2)
        desk.valid(tok)  # raises if expired on the server's clock
        assert tok.expires_at - desk.sandbox.state.now() > 0
        if not seen or seen[-1].access_token != tok.access_token:
            seen.append(tok)
            seen_at.append(desk.sandbox.state.now())
        return len(seen) >= 3

    wait_for(poll, timeout=5.0, interval=0.05, what="two refreshes")
    assert [t.via for t in seen] == ["mint", "refresh", "refresh"]
    assert seen[0].access_token == first.access_token
    # The refreshed token was already being handed out while the first one still had time
    # left (refresh starts at half-life; the learned clock is only good to about 0.5 s).
    assert seen_at[1] < first.expires_at - 0.25
    assert seen_at[2] < seen[1].expires_at - 0.25
    stats = desk.stats()
    assert stats["mints"] == 1 and stats["refreshes"] >= 2
    assert len(desk.signer.calls) == 1  # refreshing signs nothing


# -- refused refresh / refused mint ----------------------------------------------------------------


def test_refused_refresh_falls_back_to_a_mint(desk: Desk) -> None:
    cache = desk.cache()
    first = cache.get(timeout=5)
    assert desk.sandbox.state.revoke_refresh_tokens() == 1
    second = cache.force_refresh(timeout=5)
    assert second.via == "mint" and second.access_token != first.access_token
    desk.valid(second)
    stats = desk.stats()
    assert (stats["refresh_attempts"], stats["refreshes"], stats["mints"]) == (1, 0, 2)
    assert cache.counters["failure:refresh_rejected"] == 1
    assert cache.last["refresh"]["outcome"] == "refresh_rejected"
    assert cache.status()["mint_blocked"] is None
    # And it goes on refreshing with the new refresh token.
    third = cache.force_refresh(timeout=5)
    assert third.via == "refresh" and desk.stats()["refreshes"] == 1


def test_refused_mint_blocks_without_re_signing(desk: Desk) -> None:
    cache = desk.cache(key_id=UNREGISTERED, backoff_cap=0.2)
    with pytest.raises(NoTokenAvailable) as e:
        cache.get(timeout=3)
    assert e.value.reason == "mint_refused"
    assert "POST /v1/token/refresh" in str(e.value)
    assert desk.stats()["mint_attempts"] == 1
    # However many clients ask, nothing is signed again: each is told at once.
    for _ in range(5):
        started = time.monotonic()
        with pytest.raises(NoTokenAvailable) as e:
            cache.get(timeout=2)
        assert e.value.reason == "mint_refused" and time.monotonic() - started < 0.5
    time.sleep(0.5)  # 2.5 times the backoff cap: a retry loop would have fired by now
    assert desk.stats()["mint_attempts"] == 1
    assert len(desk.signer.calls) == 1
    st = cache.status()
    assert st["mint_blocked"] and "401" in st["mint_blocked"]
    assert st["last_error_kind"] == "mint_rejected"


def test_force_refresh_clears_the_block(desk: Desk) -> None:
    desk.signer.broken = True
    cache = desk.cache()
    with pytest.raises(NoTokenAvailable) as e:
        cache.get(timeout=3)
    assert e.value.reason == "mint_refused"
    desk.signer.broken = False  # the operator fixed the cause
    tok = cache.force_refresh(timeout=5)
    assert tok.via == "mint"
    desk.valid(tok)
    assert cache.status()["mint_blocked"] is None
    assert desk.stats()["mint_attempts"] == 2 and desk.stats()["mints"] == 1
    assert cache.get(timeout=1).access_token == tok.access_token


# -- transient failures: backoff, still-valid token, recovery --------------------------------------


@pytest.mark.parametrize("sandbox", [{"access_ttl": 2.0}], indirect=True)
def test_transient_outage_bounded_attempts_valid_token_then_recovery(desk: Desk) -> None:
    cap = 1.0
    cache = desk.cache(backoff_base=0.1, backoff_cap=cap)
    tok = cache.get(timeout=5)
    cutoff = tok.expires_at - min(1.0, tok.lifetime / 10) - 0.5  # where serving it must stop
    before = desk.stats()["requests"]
    desk.sandbox.state.set_faults(count=-1, status=503)
    outage = 2.5
    end = time.monotonic() + outage
    served = refused = 0
    while time.monotonic() < end:
        try:
            got = cache.get(timeout=0.2)
        except NoTokenAvailable as e:
            refused += 1
            assert e.reason in ("api_transient", "timeout"), e.reason
            # Refusing while the old token was still servable would be a failure (the learned
            # server clock is good to about 0.5 s, Date having whole seconds).
            assert desk.sandbox.state.now() >= cutoff - 0.7
        else:
            served += 1
            assert got.access_token == tok.access_token
            desk.valid(got)  # never expired
        time.sleep(0.05)
    during = desk.stats()["requests"] - before
    # Refreshes start at half-life (~1-1.5 s in); backoff from 0.05 s, doubling, capped at 1 s.
    assert 2 <= during <= 10, during
    assert served > 5
    st = cache.status()
    assert st["last_error_kind"] == "api_transient" and "503" in st["last_error"]

    desk.sandbox.state.clear_faults()
    recovered_from = time.monotonic()

    def fresh() -> TokenSet | None:
        try:
            t = cache.get(timeout=0.5)
        except NoTokenAvailable:
            return None
        return t if t.access_token != tok.access_token else None

    new = wait_for(fresh, timeout=cap + 3.0, what="a fresh token after the outage")
    assert time.monotonic() - recovered_from <= cap + 1.5
    assert new.via == "refresh"  # the refresh token survived the outage
    desk.valid(new)
    assert desk.stats()["mints"] == 1
    assert cache.status()["last_error"] is None


def test_outage_with_no_token_answers_quickly(desk: Desk) -> None:
    desk.sandbox.state.set_faults(count=-1, status=503)
    cache = desk.cache(backoff_base=0.5, backoff_cap=2.0)
    started = time.monotonic()
    with pytest.raises(NoTokenAvailable) as e:
        cache.get(timeout=1.0)
    assert time.monotonic() - started < 1.5
    assert e.value.reason in ("api_transient", "timeout")
    assert "503" in str(e.value)


def test_retry_after_is_honoured_and_capped(desk: Desk) -> None:
    # Retry-After (30 s) beyond the cap (1 s): the cap wins.
    desk.sandbox.state.set_faults(count=-1, status=429, retry_after=30, endpoints=["mint"])
    started = time.monotonic()
    capped = desk.cache(backoff_base=0.1, backoff_cap=1.0)
    with pytest.raises(NoTokenAvailable) as e:
        capped.get(timeout=0.5)
    assert e.value.reason == "api_transient"
    st = capped.status()
    assert 0.5 < st["next_retry_in_s"] <= 1.0
    assert st["last_error_kind"] == "api_transient" and "429" in st["last_error"]
    assert desk.stats()["mint_attempts"] == 1
    wait_for(lambda: desk.stats()["mint_attempts"] >= 2, timeout=3.0, what="the second attempt")
    assert 0.95 <= time.monotonic() - started <= 2.5
    capped.stop(timeout=3)

    # Retry-After (2 s) under the cap (4 s) but above the jittered first step (<= 0.1 s): honoured.
    desk.sandbox.state.set_faults(count=-1, status=429, retry_after=2, endpoints=["mint"])
    honoured = desk.cache(backoff_base=0.1, backoff_cap=4.0)
    with pytest.raises(NoTokenAvailable):
        honoured.get(timeout=0.5)
    assert 1.5 < honoured.status()["next_retry_in_s"] <= 2.0
    honoured.stop(timeout=3)

    # A plain 503 without Retry-After: just the jittered exponential step (0.05-0.1 s).
    desk.sandbox.state.set_faults(count=1, status=503, endpoints=["mint"])
    plain = desk.cache(backoff_base=0.1, backoff_cap=4.0, verify=False)
    tok = plain.get(timeout=3)
    assert tok.via == "mint" and plain.counters["failure:api_transient"] == 1


# -- fatal ------------------------------------------------------------------------------------------


def test_fatal_error_calls_on_fatal_and_get_says_fatal(desk: Desk) -> None:
    signer = PinFailingSigner()
    cache = desk.cache(signer=signer)
    with pytest.raises(NoTokenAvailable) as e:
        cache.get(timeout=3)
    assert e.value.reason == "fatal" and "refused the PIN" in str(e.value)
    # on_fatal runs on the worker right after clients are told: poll for it.
    wait_for(lambda: desk.fatals, timeout=2.0, what="on_fatal")
    assert len(desk.fatals) == 1 and isinstance(desk.fatals[0], PinError)
    assert cache.fatal is desk.fatals[0]
    # Later callers are told at once, and nothing is tried again.
    started = time.monotonic()
    with pytest.raises(NoTokenAvailable) as e:
        cache.get(timeout=3)
    assert e.value.reason == "fatal" and time.monotonic() - started < 0.5
    assert len(signer.calls) == 1
    assert desk.stats()["mint_attempts"] == 0  # the PIN failed before any request
    st = cache.status()
    assert st["fatal"] and "PIN" in st["fatal"] and st["last_error_kind"] == "pin"


def test_forced_refreshes_asked_together_share_one_attempt(desk: Desk) -> None:
    cache = desk.cache()
    cache.get(timeout=5)
    desk.sandbox.state.set_faults(mode="delay", delay=0.5, endpoints=["refresh"], count=1)
    first = cache.force()
    wait_for(lambda: desk.stats()["refresh_attempts"] == 1, 5, what="the first forced refresh")
    # 100 callers while that one is in flight: they all need an attempt that starts after
    # them, and they all get the same one.
    waiters = [cache.force() for _ in range(100)]
    first.result(timeout=5)
    for waiter in waiters:
        waiter.result(timeout=5)
    assert desk.stats()["refresh_attempts"] == 2
    assert cache.get(timeout=1).via == "refresh"


def test_force_waiters_are_released_on_a_fatal_error_and_on_stop(desk: Desk) -> None:
    signer = PinFailingSigner()
    cache = desk.cache(signer=signer)
    waiter = cache.force()
    with pytest.raises(NoTokenAvailable) as e:
        waiter.result(timeout=5)
    assert e.value.reason == "pin" and "PIN" in str(e.value)

    slow = desk.cache()
    slow.get(timeout=5)
    desk.sandbox.state.set_faults(mode="delay", delay=1.0, endpoints=["refresh"], count=1)
    slow.force()
    wait_for(lambda: desk.stats()["refresh_attempts"] == 1, 5, what="a forced refresh in flight")
    pending = slow.force()  # wants the attempt after the one in flight, which never comes
    slow.stop(timeout=5)
    with pytest.raises(NoTokenAvailable) as e:
        pending.result(timeout=1)
    assert e.value.reason == "stopping"


def test_force_refresh_after_fatal_says_fatal_at_once(desk: Desk) -> None:
    cache = desk.cache(signer=PinFailingSigner())
    with pytest.raises(NoTokenAvailable):
        cache.get(timeout=3)
    started = time.monotonic()
    with pytest.raises(NoTokenAvailable) as e:
        cache.force_refresh(timeout=0.8)
    assert e.value.reason == "fatal"
    assert time.monotonic() - started < 0.5


# -- status -------------------------------------------------------------------------------------------


def test_status_fields(desk: Desk) -> None:
    cache = desk.cache()
    st = cache.status()
    assert st["token"] is None and st["last_mint"] is None and st["fatal"] is None
    tok = cache.get(timeout=5)
    st = cache.status()
    assert set(st) == {
        "key_id", "token", "last_mint", "last_refresh", "last_error", "last_error_kind",
        "next_retry_in_s", "mint_blocked", "fatal", "clock_offset_s", "counters",
    }
    assert st["key_id"] == desk.key_id
    assert st["token"]["id"] == tok.fingerprint and tok.access_token not in str(st)
    assert st["token"]["valid"] is True and st["token"]["via"] == "mint"
    assert st["token"]["expires_at"] == tok.expires_at
    assert 290 < st["token"]["expires_in_s"] <= 301
    assert st["last_mint"]["outcome"] == "ok" and st["last_mint"]["token"] == tok.fingerprint
    assert st["last_refresh"] is None
    assert st["last_error"] is None and st["last_error_kind"] is None
    assert st["next_retry_in_s"] is None and st["mint_blocked"] is None
    assert abs(st["clock_offset_s"]) < 2
    assert st["counters"]["mint_ok"] == 1 and st["counters"]["attempts"] == 1

    cache.force_refresh(timeout=5)
    st = cache.status()
    assert st["last_refresh"]["outcome"] == "ok" and st["token"]["via"] == "refresh"
    assert st["counters"]["refresh_ok"] == 1 and st["counters"]["attempts"] == 2


@pytest.mark.parametrize("sandbox", [{"clock_offset": 75.0}], indirect=True)
def test_skewed_server_clock_is_learned_and_used(desk: Desk) -> None:
    cache = desk.cache()
    tok = cache.get(timeout=5)
    desk.valid(tok)
    assert desk.stats()["mint_attempts"] == 2  # one skew retry
    assert cache.status()["clock_offset_s"] == pytest.approx(75, abs=2)
    assert 290 < cache.status()["token"]["expires_in_s"] <= 301


# -- bugs shown with a fake client ----------------------------------------------------------------


class FakeClock(ServerClock):
    """A server clock the test sets by hand; ``hook`` runs once inside the next ``now()``
    called from ``hook_thread`` — a thread switch placed at the worst moment."""

    def __init__(self, t: float) -> None:
        super().__init__()
        self.t = t
        self.hook: Callable[[], object] | None = None
        self.hook_thread: int | None = None

    def now(self) -> float:
        hook = self.hook
        if hook is not None and threading.get_ident() == self.hook_thread:
            self.hook = None
            hook()
        return self.t


class FakeClient:
    """Stands in for AuthClient: tokens live ``lifetime`` s on ``clock``; the first
    ``fail_first`` mints fail as transient."""

    def __init__(self, clock: ServerClock, lifetime: float = 10.0, fail_first: int = 0) -> None:
        self.clock = clock
        self.lifetime = lifetime
        self.fail_first = fail_first
        self.mints = 0
        self.refreshes = 0
        self.issued = 0

    def _tokens(self, via: str, key_id: str) -> TokenSet:
        self.issued += 1
        now = self.clock.now()
        return TokenSet(f"access-{self.issued}", f"refresh-{self.issued}", "Bearer",
                        now + self.lifetime, now, key_id, via)

    def mint(self, key_id: str, sign: Callable[[str, int], str]) -> TokenSet:
        self.mints += 1
        if self.mints <= self.fail_first:
            raise ApiTransient("HTTP 503: down", status=503)
        sign(key_id, int(self.clock.now()))
        return self._tokens("mint", key_id)

    def refresh(self, refresh_token: str, key_id: str) -> TokenSet:
        self.refreshes += 1
        return self._tokens("refresh", key_id)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_long_outage_does_not_kill_the_worker() -> None:
    fake = FakeClient(ServerClock(), lifetime=300, fail_first=1100)
    cache = TokenCache(fake, SoftSigner(), UNREGISTERED,  # type: ignore[arg-type]
                       policy=CachePolicy(backoff_base=1e-6, backoff_cap=1e-6), rng=random.Random(1))
    cache.start(prefetch=True)
    try:
        worker = cache._thread
        assert worker is not None
        wait_for(lambda: fake.mints > fake.fail_first or not worker.is_alive(), timeout=20,
                 what="the outage to end or the worker to die")
        assert worker.is_alive(), f"worker died after {fake.mints} attempts"
        assert cache.get(timeout=5).via == "mint"
    finally:
        cache.stop(timeout=2)


def test_current_never_pairs_an_old_token_with_a_new_deadline() -> None:
    """Regression: the token and its serve-until deadline must be read as one object; a
    refresh landing between two separate reads would hand out the old, expired token."""
    clock = FakeClock(1000.0)
    fake = FakeClient(clock, lifetime=10.0)
    cache = TokenCache(fake, SoftSigner(), UNREGISTERED,  # type: ignore[arg-type]
                       policy=CachePolicy(backoff_base=0.01, backoff_cap=0.05))
    cache.start()
    try:
        old = cache.get(timeout=5)
        assert old.expires_at == 1010.0
        clock.t = 1020.0  # the old token has expired (e.g. the API was down for a while)
        assert cache.current() is None
        # The worker's successful refresh lands between current()'s two reads.
        clock.hook_thread = threading.get_ident()
        clock.hook = lambda: cache.force_refresh(timeout=5)
        got = cache.current()
        assert fake.refreshes == 1  # the interleaving did happen
        assert got is None or got.expires_at > clock.t, f"handed out {got} expired at {got.expires_at}"
    finally:
        cache.stop(timeout=2)


def test_jwks_4xx_after_a_good_mint_is_not_a_refused_mint(desk: Desk) -> None:
    desk.sandbox.state.set_faults(count=1, status=404, endpoints=["jwks"])
    cache = desk.cache(backoff_base=0.1, backoff_cap=0.5)
    try:
        tok = cache.get(timeout=5)
    except NoTokenAvailable as e:
        pytest.fail(f"no token ({e.reason}): {e}")
    desk.valid(tok)

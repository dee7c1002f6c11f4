"""The Auth API client against the real sandbox over loopback, with a software P-256 signer.

The signer is a `cryptography` key standing in for the token (the PKCS#11 path has its
own tests); everything HTTP is real: the sandbox's http.server stack, real Date headers,
real injected faults.
"""

from __future__ import annotations

import email.utils
import math
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from helpers import SoftSigner

from tm_hsm_agent.auth import AuthClient, JwksVerifier, ServerClock, classify, parse_expires_in
from tm_hsm_agent.errors import ApiRejected, ApiTransient, TokenVerifyError
from tm_hsm_agent.jose import b64url_encode, decode_unverified, verify_jwt


class GarbageSigner(SoftSigner):
    """A signature of the right shape (64 bytes, base64url) that verifies for nothing."""

    def sign_challenge(self, key_id: str, timestamp: int, purpose: str = "mint") -> str:
        self.calls.append((key_id, timestamp, purpose))
        return b64url_encode(os.urandom(64))


@pytest.fixture
def signer() -> SoftSigner:
    return SoftSigner()


@pytest.fixture
def key_id(sandbox, signer: SoftSigner) -> str:
    return sandbox.state.register_key(signer.pem())


@pytest.fixture
def client(sandbox) -> Iterator[AuthClient]:
    c = AuthClient(sandbox.url, sandbox.jwks_url, timeout=5.0)
    yield c
    c.http.close()


def claims_of(token: str) -> dict[str, Any]:
    return decode_unverified(token).claims


# -- classify: the one place that decides what an HTTP failure means ------------------------

CLASSIFY_TABLE = [
    # status, class, retryable
    (400, ApiRejected, False),
    (401, ApiRejected, False),
    (403, ApiRejected, False),
    (404, ApiRejected, False),
    (408, ApiTransient, True),
    (429, ApiTransient, True),
    (500, ApiTransient, True),
    (502, ApiTransient, True),
    (503, ApiTransient, True),
    (504, ApiTransient, True),
]


@pytest.mark.parametrize(
    ("status", "cls", "retryable"), CLASSIFY_TABLE, ids=[str(r[0]) for r in CLASSIFY_TABLE]
)
def test_classify_table(status: int, cls: type, retryable: bool) -> None:
    err = classify(status, "the server's words", 12.0)
    assert type(err) is cls
    assert err.retryable is retryable
    assert err.status == status
    assert err.server_message == "the server's words"
    assert str(err) == f"HTTP {status}: the server's words"
    if cls is ApiTransient:
        assert err.retry_after == 12.0  # Retry-After is kept for the backoff to honour
    bare = classify(status, "", None)
    assert type(bare) is cls and str(bare) == f"HTTP {status}" and bare.retry_after is None


# -- expires_in --------------------------------------------------------------------------

NOW = 1_700_000_000.0
Y2030 = datetime(2030, 1, 1, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2030-01-01T00:00:00Z", Y2030),
        ("2030-01-01T00:00:00z", Y2030),
        ("2030-01-01t00:00:00Z", Y2030),
        ("2030-01-01T02:00:00+02:00", Y2030),
        ("2029-12-31T19:00:00-05:00", Y2030),
        ("2030-01-01T00:00:00.25Z", Y2030 + 0.25),
        ("2030-01-01T02:00:00.125+02:00", Y2030 + 0.125),
        ("2019-08-24T14:15:22Z", datetime(2019, 8, 24, 14, 15, 22, tzinfo=UTC).timestamp()),
        (300, NOW + 300),
        (1.5, NOW + 1.5),
        ("300", NOW + 300),
        ("86400", NOW + 86400),
    ],
)
def test_parse_expires_in_accepts(value: Any, expected: float) -> None:
    assert parse_expires_in(value, NOW) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    "value",
    [
        "2030-01-01T00:00:00",  # naive: no time zone
        "2030-01-01",
        True,
        False,
        -5,
        -0.5,
        0,
        0.0,
        math.nan,
        math.inf,
        "-300",
        "300s",
        " 300 ",
        "",
        None,
        "soon",
        "2030-13-01T00:00:00Z",
        [300],
        {"seconds": 300},
    ],
)
def test_parse_expires_in_rejects(value: Any) -> None:
    with pytest.raises(ValueError):
        parse_expires_in(value, NOW)


def test_parse_expires_in_rejects_zero_seconds_as_a_string() -> None:
    with pytest.raises(ValueError):
        parse_expires_in("0", NOW)


# -- the server's clock ---------------------------------------------------------------------


def test_server_clock_learns_from_date_headers() -> None:
    clock = ServerClock()
    assert (clock.offset, clock.known) == (0.0, False)
    for bad in (None, "", "yesterday", "Sun, 99 Nov 1994 08:49:37 GMT"):
        assert clock.learn(bad, 1000.0) is None
    assert (clock.offset, clock.known) == (0.0, False)

    server = datetime(1994, 11, 6, 8, 49, 37, tzinfo=UTC).timestamp()
    assert clock.learn("Sun, 06 Nov 1994 08:49:37 GMT", server + 10.0) == server
    assert clock.known
    # Date is truncated to the second: the midpoint of [server, server+1) is assumed.
    assert clock.offset == pytest.approx(-9.5)
    assert clock.now() == pytest.approx(time.time() - 9.5, abs=0.5)

    # The latest answer wins: a server 75 s ahead.
    received = time.time()
    ahead = email.utils.formatdate(received + 75, usegmt=True)
    clock.learn(ahead, received)
    assert clock.offset == pytest.approx(75, abs=1.0)
    assert clock.now() - time.time() == pytest.approx(75, abs=1.0)


# -- mint against the sandbox --------------------------------------------------------------


def test_mint_ok(sandbox, client: AuthClient, signer: SoftSigner, key_id: str) -> None:
    tokens = client.mint(key_id, signer.sign_challenge)
    assert tokens.via == "mint" and tokens.key_id == key_id and tokens.token_type == "Bearer"
    claims = verify_jwt(tokens.access_token, sandbox.state.jwks(), now=sandbox.state.now()).claims
    assert claims["sub"] == key_id
    assert tokens.expires_at == float(claims["exp"])
    assert 299 < tokens.lifetime <= 301  # default access_ttl 300 s, exp rounded up
    assert tokens.issued_at == pytest.approx(sandbox.state.now(), abs=2)
    assert claims_of(tokens.refresh_token)["token_use"] == "refresh"
    # One signature over `{key_id}.{timestamp}` with an integer timestamp on the server's clock.
    assert len(signer.calls) == 1
    (kid, ts, _purpose) = signer.calls[0]
    assert kid == key_id and isinstance(ts, int) and abs(ts - sandbox.state.now()) <= 2
    stats = sandbox.state.stats()
    assert (stats["mint_attempts"], stats["mints"]) == (1, 1)
    assert client.clock.known and abs(client.clock.offset) < 2
    # The access token itself never appears in the repr (logs use it).
    assert tokens.access_token not in repr(tokens) and tokens.fingerprint in repr(tokens)


@pytest.mark.parametrize(
    ("advertised", "expect"),
    [
        ("far_rfc3339", "exp"),  # expires_in a day later than the JWT's exp: exp wins
        (86_400, "exp"),  # numeric seconds, also later than exp
        ("86400", "exp"),
        (60, "expires_in"),  # earlier than exp: the earlier one is kept
    ],
)
def test_expires_in_never_trusted_past_the_jwt_exp(
    sandbox, client: AuthClient, signer: SoftSigner, key_id: str, monkeypatch: pytest.MonkeyPatch,
    advertised: Any, expect: str,
) -> None:
    """The sandbox always advertises expires_in == exp, so its answer is rewritten in place:
    ``SandboxState._token_response`` is wrapped on this instance to advertise another expiry."""
    original = sandbox.state._token_response

    def lying(access: dict[str, Any], refresh: dict[str, Any]) -> dict[str, Any]:
        answer = original(access, refresh)
        if advertised == "far_rfc3339":
            far = datetime.fromtimestamp(access["exp"] + 86_400, tz=UTC)
            answer["expires_in"] = far.strftime("%Y-%m-%dT%H:%M:%SZ")
        else:
            answer["expires_in"] = advertised
        return answer

    monkeypatch.setattr(sandbox.state, "_token_response", lying)
    tokens = client.mint(key_id, signer.sign_challenge)
    exp = float(claims_of(tokens.access_token)["exp"])
    if expect == "exp":
        assert tokens.expires_at == exp
    else:
        assert tokens.expires_at == pytest.approx(tokens.issued_at + advertised, abs=0.01)
        assert tokens.expires_at < exp - 200
    # The same rule on refresh.
    again = client.refresh(tokens.refresh_token, key_id)
    assert again.expires_at <= float(claims_of(again.access_token)["exp"])


@pytest.mark.parametrize("offset", [75.0, -75.0])
def test_clock_skew_is_corrected_with_exactly_one_retry(
    sandbox, client: AuthClient, signer: SoftSigner, key_id: str, offset: float
) -> None:
    sandbox.state.set_clock_offset(offset)
    tokens = client.mint(key_id, signer.sign_challenge)
    stats = sandbox.state.stats()
    assert (stats["mint_attempts"], stats["mints"]) == (2, 1)
    assert len(signer.calls) == 2
    first, second = signer.calls[0][1], signer.calls[1][1]
    assert second - first == pytest.approx(offset, abs=3)
    assert abs(second - sandbox.state.now()) <= 2
    assert client.clock.offset == pytest.approx(offset, abs=2)
    # Expiry is judged on the server's clock, not the local one.
    assert tokens.issued_at == pytest.approx(sandbox.state.now(), abs=2)
    assert 299 < tokens.lifetime <= 301
    verify_jwt(tokens.access_token, sandbox.state.jwks(), now=client.clock.now())
    # Now the offset is known: the next mint needs one attempt.
    client.mint(key_id, signer.sign_challenge)
    assert sandbox.state.stats()["mint_attempts"] == 3


def test_skew_inside_the_window_needs_no_retry(
    sandbox, client: AuthClient, signer: SoftSigner, key_id: str
) -> None:
    sandbox.state.set_clock_offset(20.0)
    client.mint(key_id, signer.sign_challenge)
    assert sandbox.state.stats()["mint_attempts"] == 1 and len(signer.calls) == 1


def test_bad_signature_is_refused_after_one_attempt(sandbox, client: AuthClient) -> None:
    garbage = GarbageSigner()
    kid = sandbox.state.register_key(garbage.pem())
    with pytest.raises(ApiRejected) as e:
        client.mint(kid, garbage.sign_challenge)
    assert e.value.status == 401 and not e.value.retryable
    assert e.value.server_message == "unauthorized" and e.value.server_message in str(e.value)
    assert "does not verify" in (sandbox.state.last_refusal or "")
    assert sandbox.state.stats()["mint_attempts"] == 1
    assert len(garbage.calls) == 1


def test_bad_signature_with_a_skewed_clock_is_still_bounded(sandbox, client: AuthClient) -> None:
    garbage = GarbageSigner()
    kid = sandbox.state.register_key(garbage.pem())
    sandbox.state.set_clock_offset(-75.0)
    with pytest.raises(ApiRejected):
        client.mint(kid, garbage.sign_challenge)
    assert sandbox.state.stats()["mint_attempts"] == 2  # one skew retry, never a loop


def test_error_bodies_carry_the_server_message(sandbox, client: AuthClient, signer: SoftSigner) -> None:
    unknown = "00000000-0000-4000-8000-000000000000"
    with pytest.raises(ApiRejected) as e:
        client.mint(unknown, signer.sign_challenge)
    assert (e.value.status, e.value.server_message) == (401, "unauthorized")  # says no more
    assert "unauthorized" in str(e.value) and unknown in str(e.value)
    assert sandbox.state.last_refusal == "unknown or revoked API key"

    with pytest.raises(ApiRejected) as e:
        client.mint("not-a-uuid", signer.sign_challenge)
    assert e.value.status == 400 and "UUID" in (e.value.server_message or "")

    with pytest.raises(ApiRejected) as e:
        client.refresh("not.a.jwt", unknown)
    assert e.value.status == 401 and "refresh token rejected" in (sandbox.state.last_refusal or "")
    assert "/token/refresh" in str(e.value)


# -- every fault the sandbox can inject ----------------------------------------------------

FAULTS = [
    ("status-503", {"mode": "status", "status": 503}),
    ("status-429", {"mode": "status", "status": 429, "retry_after": 7}),
    ("delay", {"mode": "delay", "delay": 1.0}),
    ("reset", {"mode": "reset"}),
    ("malformed_json", {"mode": "malformed_json"}),
    ("wrong_content_type", {"mode": "wrong_content_type"}),
]


@pytest.mark.parametrize("op", ["mint", "refresh", "jwks"])
@pytest.mark.parametrize(("name", "spec"), FAULTS, ids=[f[0] for f in FAULTS])
def test_every_fault_is_transient(
    sandbox, signer: SoftSigner, key_id: str, op: str, name: str, spec: dict[str, Any]
) -> None:
    client = AuthClient(sandbox.url, sandbox.jwks_url, timeout=0.25)
    refresh_token = client.mint(key_id, signer.sign_challenge).refresh_token if op == "refresh" else ""

    def call() -> Any:
        if op == "mint":
            return client.mint(key_id, signer.sign_challenge)
        if op == "refresh":
            return client.refresh(refresh_token, key_id)
        return client.jwks()

    sandbox.state.set_faults(count=1, endpoints=[op], **spec)
    started = time.monotonic()
    with pytest.raises(ApiTransient) as e:
        call()
    elapsed = time.monotonic() - started
    err = e.value
    assert err.retryable
    assert sandbox.state.stats()["faults_injected"] == 1
    if name == "status-503":
        assert (err.status, err.server_message, err.retry_after) == (503, "injected fault: HTTP 503", None)
    elif name == "status-429":
        assert (err.status, err.retry_after) == (429, 7.0)
    elif name == "delay":
        assert "no answer within" in str(err) and elapsed < 0.9
    elif name == "malformed_json":
        assert err.status == 200 and "not valid JSON" in str(err)
    elif name == "wrong_content_type":
        assert err.status == 200 and "text/html" in str(err)
    else:  # reset
        assert err.status is None
    # The fault was one request: the same call now succeeds (a faulted refresh consumed nothing).
    result = call()
    assert result is not None
    client.http.close()


def test_retry_after_as_an_http_date(sandbox, client: AuthClient, signer: SoftSigner, key_id: str) -> None:
    when = email.utils.formatdate(time.time() + 10, usegmt=True)
    sandbox.state.set_faults(count=1, status=503, retry_after=when)
    with pytest.raises(ApiTransient) as e:
        client.mint(key_id, signer.sign_challenge)
    assert e.value.retry_after == pytest.approx(10, abs=1.5)


# -- refresh ---------------------------------------------------------------------------------


def test_refresh_rotates_and_a_used_refresh_token_is_refused(
    sandbox, client: AuthClient, signer: SoftSigner, key_id: str
) -> None:
    first = client.mint(key_id, signer.sign_challenge)
    second = client.refresh(first.refresh_token, key_id)
    assert second.via == "refresh" and second.key_id == key_id
    assert second.refresh_token != first.refresh_token
    assert second.access_token != first.access_token
    verify_jwt(second.access_token, sandbox.state.jwks(), now=sandbox.state.now())
    assert second.expires_at == float(claims_of(second.access_token)["exp"])

    third = client.refresh(second.refresh_token, key_id)
    assert third.refresh_token not in (first.refresh_token, second.refresh_token)

    with pytest.raises(ApiRejected) as e:
        client.refresh(first.refresh_token, key_id)
    assert e.value.status == 401 and "already been used" in (sandbox.state.last_refusal or "")
    stats = sandbox.state.stats()
    assert (stats["refreshes"], stats["refresh_attempts"], stats["mints"]) == (2, 3, 1)
    assert len(signer.calls) == 1  # refresh needs no signature


def test_revoked_refresh_token_is_refused(
    sandbox, client: AuthClient, signer: SoftSigner, key_id: str
) -> None:
    tokens = client.mint(key_id, signer.sign_challenge)
    assert sandbox.state.revoke_refresh_tokens() == 1
    with pytest.raises(ApiRejected) as e:
        client.refresh(tokens.refresh_token, key_id)
    assert e.value.status == 401 and "revoked" in (sandbox.state.last_refusal or "")


# -- JWKS ----------------------------------------------------------------------------------------


def _rotate_signing_key(state) -> None:
    """Give the sandbox a new ES256 signing key (its kid changes), as a key rotation would.

    The sandbox has no public rotation knob, so its three private fields are swapped under
    its lock; `_sign_jwt` and `jwks()` read exactly these.
    """
    with state._lock:
        state._signing_key = ec.generate_private_key(ec.SECP256R1())
        state._jwk = state._public_jwk()
        state._kid = state._jwk["kid"]


@pytest.mark.parametrize("sandbox", [{"alg": "ES256"}], indirect=True)
def test_jwks_verifier_refetches_once_on_an_unknown_kid(
    sandbox, client: AuthClient, signer: SoftSigner, key_id: str
) -> None:
    verifier = JwksVerifier(client)
    old = client.mint(key_id, signer.sign_challenge).access_token
    assert verifier.verify(old).claims["sub"] == key_id
    assert sandbox.state.stats()["jwks"] == 1
    verifier.verify(old)
    assert sandbox.state.stats()["jwks"] == 1  # cached

    _rotate_signing_key(sandbox.state)
    new = client.mint(key_id, signer.sign_challenge).access_token
    assert decode_unverified(new).header["kid"] != decode_unverified(old).header["kid"]
    assert verifier.verify(new).claims["sub"] == key_id
    assert sandbox.state.stats()["jwks"] == 2  # exactly one refetch, then it verified

    # The old kid is gone from the JWKS now: one refetch, then a clear refusal.
    with pytest.raises(TokenVerifyError, match="kid"):
        verifier.verify(old)
    assert sandbox.state.stats()["jwks"] == 3

    # A known kid with a bad signature is refused without fetching anything.
    head, body, sig = new.split(".")
    tampered = f"{head}.{body}.{sig[:10]}{'A' if sig[10] != 'A' else 'B'}{sig[11:]}"
    assert decode_unverified(tampered).header["kid"] == decode_unverified(new).header["kid"]
    with pytest.raises(TokenVerifyError):
        verifier.verify(tampered)
    assert sandbox.state.stats()["jwks"] == 3


@pytest.mark.parametrize("sandbox", [{"access_ttl": 2.0}], indirect=True)
def test_jwks_verifier_checks_expiry_on_the_server_clock(
    sandbox, client: AuthClient, signer: SoftSigner, key_id: str
) -> None:
    tokens = client.mint(key_id, signer.sign_challenge)
    verifier = JwksVerifier(client)
    verifier.verify(tokens.access_token)
    # Push the learned server clock past exp (as a later Date header would).
    client.clock.offset += 10
    with pytest.raises(TokenVerifyError, match="expired"):
        verifier.verify(tokens.access_token)
    assert verifier.verify(tokens.access_token, check_exp=False).claims["sub"] == key_id


def test_jwks_verifier_allows_an_nbf_a_little_ahead_of_the_learned_clock(
    sandbox, client: AuthClient, signer: SoftSigner, key_id: str
) -> None:
    # A server whose Date header runs behind the clock that stamps its tokens (a proxy, or
    # just the header's 1 s resolution) must not make a fresh token "not valid yet".
    tokens = client.mint(key_id, signer.sign_challenge)
    assert "nbf" in claims_of(tokens.access_token)
    verifier = JwksVerifier(client)
    client.clock.offset -= 5
    assert verifier.verify(tokens.access_token).claims["sub"] == key_id
    client.clock.offset -= 60  # past the allowance: refused
    with pytest.raises(TokenVerifyError, match="nbf"):
        verifier.verify(tokens.access_token)

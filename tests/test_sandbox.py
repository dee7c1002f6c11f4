"""The sandbox Auth API, exercised over real sockets with requests and a software P-256 key."""

from __future__ import annotations

import email.utils
import http.client
import json
import random
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

import pytest
import requests
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tm_hsm_agent.errors import ApiError
from tm_hsm_agent.jose import (
    P256_N,
    b64url_decode,
    b64url_encode,
    decode_unverified,
    der_to_raw,
    split_raw,
    verify_jwt,
)
from tm_hsm_agent.sandbox import SandboxOptions, SandboxServer, SandboxState, admin, register_key

FROZEN = 1_800_000_000.75  # a fixed server clock for exact timestamp-window tests
TIMEOUT = 5.0


@pytest.fixture(scope="session")
def rsa_key() -> rsa.RSAPrivateKey:
    # One RSA key for the whole session: generating 2048-bit keys per test is slow.
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def make_server(rsa_key: rsa.RSAPrivateKey) -> Iterator[Callable[..., SandboxServer]]:
    servers: list[SandboxServer] = []

    def _make(**opts: Any) -> SandboxServer:
        if opts.get("alg", "RS256") == "RS256":
            opts.setdefault("signing_key", rsa_key)
        srv = SandboxServer(options=SandboxOptions(**opts)).start()
        servers.append(srv)
        return srv

    yield _make
    for srv in servers:
        srv.close()


def pem_of(priv: ec.EllipticCurvePrivateKey) -> str:
    return (
        priv.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode("ascii")
    )


def sign_raw(priv: ec.EllipticCurvePrivateKey, key_id: str, ts: int) -> bytes:
    return der_to_raw(priv.sign(f"{key_id}.{ts}".encode("ascii"), ec.ECDSA(hashes.SHA256())))


class Desk:
    """A client with a registered key, talking to one sandbox."""

    def __init__(self, server: SandboxServer) -> None:
        self.server = server
        self.priv = ec.generate_private_key(ec.SECP256R1())
        self.key_id = register_key(server.origin, pem_of(self.priv))

    def ts(self) -> int:
        return int(self.server.state.now())

    def sig(self, ts: int | None = None) -> tuple[int, str]:
        ts = self.ts() if ts is None else ts
        return ts, b64url_encode(sign_raw(self.priv, self.key_id, ts))

    def post_mint(self, body: Any, **kw: Any) -> requests.Response:
        kw.setdefault("timeout", TIMEOUT)
        return requests.post(self.server.url + "/api-key/token", json=body, **kw)

    def mint(self, ts: int | None = None, signature: str | None = None, **kw: Any) -> requests.Response:
        if signature is None:
            ts, signature = self.sig(ts)
        assert ts is not None
        return self.post_mint({"key_id": self.key_id, "timestamp": ts, "signature": signature}, **kw)

    def refresh(self, token: Any, **kw: Any) -> requests.Response:
        kw.setdefault("timeout", TIMEOUT)
        return requests.post(self.server.url + "/token/refresh", json={"refresh_token": token}, **kw)

    def tokens(self) -> dict[str, Any]:
        resp = self.mint()
        assert resp.status_code == 200, resp.text
        return resp.json()


@pytest.fixture
def server(make_server: Callable[..., SandboxServer]) -> SandboxServer:
    return make_server()


@pytest.fixture
def desk(server: SandboxServer) -> Desk:
    return Desk(server)


@pytest.fixture
def frozen_desk(make_server: Callable[..., SandboxServer]) -> Desk:
    return Desk(make_server(clock=lambda: FROZEN))


def jwks_of(server: SandboxServer) -> dict[str, Any]:
    resp = requests.get(server.jwks_url, timeout=TIMEOUT)
    assert resp.status_code == 200
    return resp.json()


def message_of(resp: requests.Response) -> str:
    assert resp.headers["Content-Type"] == "application/json"
    body = resp.json()
    assert set(body) == {"message"} and isinstance(body["message"], str) and body["message"]
    return body["message"]


def refusal_of(resp: requests.Response) -> str:
    """Why a 401 was given. Its body says the same for every cause, as the service's does;
    the cause is only in the sandbox's own header."""
    assert resp.status_code == 401
    assert message_of(resp) == "unauthorized"
    return resp.headers["X-Sandbox-Refusal"]


def rfc3339_ts(text: str) -> int:
    assert text.endswith("Z")
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp())


# ---------------------------------------------------------------------------
# Server basics


def test_urls_and_lifecycle(make_server: Callable[..., SandboxServer]) -> None:
    srv = make_server()
    port = int(srv.origin.rsplit(":", 1)[1])
    assert srv.origin == f"http://127.0.0.1:{port}"
    assert srv.url == srv.origin + "/v1/auth"
    assert srv.jwks_url == srv.origin + "/.well-known/jwks.json"
    srv.close()
    srv.close()  # idempotent
    with pytest.raises(requests.ConnectionError):
        requests.get(srv.jwks_url, timeout=TIMEOUT)


def test_context_manager_closes(rsa_key: rsa.RSAPrivateKey) -> None:
    with SandboxServer(options=SandboxOptions(signing_key=rsa_key)) as srv:
        assert requests.get(srv.jwks_url, timeout=TIMEOUT).status_code == 200
    with pytest.raises(requests.ConnectionError):
        requests.get(srv.jwks_url, timeout=TIMEOUT)


def test_keep_alive_and_content_length(server: SandboxServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", int(server.origin.rsplit(":", 1)[1]), timeout=TIMEOUT)
    try:
        for path in ("/.well-known/jwks.json", "/nope", "/.well-known/jwks.json"):
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read()
            assert int(resp.getheader("Content-Length") or -1) == len(body)
            assert resp.getheader("Content-Type") == "application/json"
            assert not resp.will_close
        sock = conn.sock
        conn.request("GET", "/admin/stats")
        conn.getresponse().read()
        assert conn.sock is sock  # the same TCP connection served every request
    finally:
        conn.close()


def test_close_drops_keep_alive_connections(make_server: Callable[..., SandboxServer]) -> None:
    srv = make_server()
    conn = http.client.HTTPConnection("127.0.0.1", int(srv.origin.rsplit(":", 1)[1]), timeout=TIMEOUT)
    conn.request("GET", "/admin/stats")
    conn.getresponse().read()
    srv.close()
    with pytest.raises((http.client.HTTPException, OSError)):
        conn.request("GET", "/admin/stats")
        conn.getresponse().read()
    conn.close()


# ---------------------------------------------------------------------------
# Mint: success


def test_mint_rs256_verifies_against_jwks(desk: Desk) -> None:
    resp = desk.mint()
    assert resp.status_code == 200
    assert resp.headers["Content-Type"] == "application/json"
    assert resp.headers["Cache-Control"] == "no-store"
    body = resp.json()
    assert set(body) == {"access_token", "refresh_token", "expires_in", "token_type"}
    assert body["token_type"] == "Bearer"

    jwks = jwks_of(desk.server)
    (jwk,) = jwks["keys"]
    assert jwk["kty"] == "RSA" and jwk["alg"] == "RS256" and jwk["use"] == "sig"
    assert {"n", "e", "kid"} <= set(jwk)

    now = time.time()
    access = verify_jwt(body["access_token"], jwks, now=now)
    refresh = verify_jwt(body["refresh_token"], jwks, now=now)
    assert access.header == {"alg": "RS256", "typ": "JWT", "kid": jwk["kid"]}
    claims = access.claims
    assert claims["iss"] == desk.server.url
    assert claims["sub"] == desk.key_id
    assert claims["token_use"] == "access"
    assert refresh.claims["token_use"] == "refresh"
    for name in ("iat", "nbf", "exp"):
        assert type(claims[name]) is int
    assert claims["iat"] == claims["nbf"]
    assert 300 <= claims["exp"] - claims["iat"] <= 301
    assert 3600 <= refresh.claims["exp"] - refresh.claims["iat"] <= 3601
    assert claims["jti"] != refresh.claims["jti"]
    assert rfc3339_ts(body["expires_in"]) == claims["exp"]
    assert body["expires_in"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(claims["exp"]))


def test_mint_es256_server_key(make_server: Callable[..., SandboxServer]) -> None:
    srv = make_server(alg="ES256")
    desk = Desk(srv)
    body = desk.tokens()
    jwks = jwks_of(srv)
    (jwk,) = jwks["keys"]
    assert jwk["kty"] == "EC" and jwk["crv"] == "P-256" and jwk["alg"] == "ES256"
    assert jwk["use"] == "sig" and "kid" in jwk
    jwt = verify_jwt(body["access_token"], jwks, now=time.time())
    assert jwt.header["alg"] == "ES256"
    assert len(jwt.signature) == 64  # raw r||s (RFC 7518), not DER
    split_raw(jwt.signature)


def test_high_s_signature_is_accepted_on_first_use(desk: Desk) -> None:
    ts = desk.ts()
    r, s = split_raw(sign_raw(desk.priv, desk.key_id, ts))
    flipped = r.to_bytes(32, "big") + (P256_N - s).to_bytes(32, "big")
    assert desk.mint(ts, b64url_encode(flipped)).status_code == 200


# ---------------------------------------------------------------------------
# Mint: 400


def _valid_body(desk: Desk) -> dict[str, Any]:
    ts, sig = desk.sig()
    return {"key_id": desk.key_id, "timestamp": ts, "signature": sig}


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda b: b.pop("key_id"), "key_id"),
        (lambda b: b.pop("timestamp"), "timestamp"),
        (lambda b: b.pop("signature"), "signature"),
        (lambda b: b.update(key_id=12345), "key_id"),
        (lambda b: b.update(key_id=None), "key_id"),
        (lambda b: b.update(key_id="not-a-uuid"), "key_id"),
        (lambda b: b.update(key_id=b["key_id"].replace("-", "")), "key_id"),
        (lambda b: b.update(key_id="{" + b["key_id"] + "}"), "key_id"),
        (lambda b: b.update(key_id=b["key_id"] + "\n"), "key_id"),
        (lambda b: b.update(timestamp=str(b["timestamp"])), "timestamp"),
        (lambda b: b.update(timestamp=float(b["timestamp"])), "timestamp"),
        (lambda b: b.update(timestamp=1.0), "timestamp"),
        (lambda b: b.update(timestamp=True), "timestamp"),
        (lambda b: b.update(timestamp=None), "timestamp"),
        (lambda b: b.update(signature=123), "signature"),
        (lambda b: b.update(signature=None), "signature"),
        (lambda b: b.update(signature=["abc"]), "signature"),
        (lambda b: b.update(extra="x"), "extra"),
    ],
)
def test_mint_field_errors_are_400(desk: Desk, mutate: Callable[[dict], Any], needle: str) -> None:
    body = _valid_body(desk)
    mutate(body)
    resp = desk.post_mint(body)
    assert resp.status_code == 400
    assert needle in message_of(resp)


@pytest.mark.parametrize(
    ("raw", "content_type"),
    [
        (b"{", "application/json"),
        (b"", "application/json"),
        (b"[]", "application/json"),
        (b'"key_id"', "application/json"),
        (b"null", "application/json"),
        (b'{"key_id": "\xff"}', "application/json"),
        (b'{"timestamp": NaN}', "application/json"),
        (b'{"timestamp": Infinity}', "application/json"),
        (b"[" * 5000 + b"]" * 5000, "application/json"),
        (None, "text/plain"),
        (None, None),
        (None, "application/json; charset=latin-1"),
        (None, "application/x-www-form-urlencoded"),
        (None, "application/json; boundary=x"),
    ],
)
def test_mint_body_errors_are_400(desk: Desk, raw: bytes | None, content_type: str | None) -> None:
    data = raw if raw is not None else json.dumps(_valid_body(desk)).encode()
    headers = {"Content-Type": content_type} if content_type else {}
    resp = requests.post(desk.server.url + "/api-key/token", data=data, headers=headers, timeout=TIMEOUT)
    assert resp.status_code == 400
    message_of(resp)


def test_duplicate_field_is_400(desk: Desk) -> None:
    body = _valid_body(desk)
    raw = json.dumps(body)[:-1] + ', "key_id": "' + body["key_id"] + '"}'
    resp = requests.post(
        desk.server.url + "/api-key/token",
        data=raw,
        headers={"Content-Type": "application/json"},
        timeout=TIMEOUT,
    )
    assert resp.status_code == 400
    assert "duplicate" in message_of(resp)


def test_oversized_body_is_400(desk: Desk) -> None:
    body = _valid_body(desk)
    body["signature"] += "A" * (65 * 1024)
    resp = desk.post_mint(body)
    assert resp.status_code == 400
    assert "65536" in message_of(resp)


@pytest.mark.parametrize(
    "content_type", ["application/json; charset=utf-8", "Application/JSON; charset=UTF-8"]
)
def test_charset_utf8_is_accepted(desk: Desk, content_type: str) -> None:
    resp = requests.post(
        desk.server.url + "/api-key/token",
        data=json.dumps(_valid_body(desk)),
        headers={"Content-Type": content_type},
        timeout=TIMEOUT,
    )
    assert resp.status_code == 200


def test_chunked_body_is_accepted(desk: Desk) -> None:
    raw = json.dumps(_valid_body(desk)).encode()
    resp = requests.post(
        desk.server.url + "/api-key/token",
        data=iter([raw[:10], raw[10:]]),
        headers={"Content-Type": "application/json"},
        timeout=TIMEOUT,
    )
    assert resp.request.headers.get("Transfer-Encoding") == "chunked"
    assert resp.status_code == 200


# ---------------------------------------------------------------------------
# Mint: 401


def test_unknown_key_is_401(desk: Desk) -> None:
    ts, sig = desk.sig()
    resp = desk.post_mint(
        {"key_id": "0b7c6f1e-2f64-4c1a-9a53-5f7a4c1b2d3e", "timestamp": ts, "signature": sig}
    )
    assert resp.status_code == 401
    assert "key" in refusal_of(resp)


def test_uppercase_key_id_is_not_the_registered_key(desk: Desk) -> None:
    upper = desk.key_id.upper()
    ts = desk.ts()
    sig = b64url_encode(der_to_raw(desk.priv.sign(f"{upper}.{ts}".encode(), ec.ECDSA(hashes.SHA256()))))
    resp = desk.post_mint({"key_id": upper, "timestamp": ts, "signature": sig})
    assert resp.status_code == 401


def test_revoked_key_is_401(desk: Desk) -> None:
    assert admin(desk.server.origin, "revoke", {"key_id": desk.key_id, "what": "key"}) == {"revoked": 1}
    resp = desk.mint()
    assert resp.status_code == 401
    assert "revoked" in refusal_of(resp)


# The server clock is FROZEN (x.75 s): the window is judged against the exact time, so
# int(FROZEN) - 30 is 30.75 s old (refused) and int(FROZEN) + 30 is 29.25 s ahead (taken).
@pytest.mark.parametrize(("delta", "status"),
                         [(-31, 401), (-30, 401), (-29, 200), (0, 200), (30, 200), (31, 401)])
def test_timestamp_window(frozen_desk: Desk, delta: int, status: int) -> None:
    resp = frozen_desk.mint(int(FROZEN) + delta)
    assert resp.status_code == status
    if status == 401:
        assert "timestamp" in refusal_of(resp)


def test_timestamp_far_out_of_range_is_401(frozen_desk: Desk) -> None:
    for ts in (0, -5, 10**30):
        _, sig = frozen_desk.sig(int(FROZEN))
        resp = frozen_desk.post_mint({"key_id": frozen_desk.key_id, "timestamp": ts, "signature": sig})
        assert resp.status_code == 401


def test_custom_skew(make_server: Callable[..., SandboxServer]) -> None:
    desk = Desk(make_server(clock=lambda: FROZEN, skew=5))
    assert desk.mint(int(FROZEN) + 6).status_code == 401
    assert desk.mint(int(FROZEN) + 5).status_code == 200


def test_clock_offset_moves_the_window(frozen_desk: Desk) -> None:
    admin(frozen_desk.server.origin, "clock", {"offset": 100})
    assert frozen_desk.mint(int(FROZEN)).status_code == 401
    assert frozen_desk.mint(int(FROZEN) + 100).status_code == 200


def _bad_signatures(desk: Desk, ts: int) -> dict[str, str]:
    raw = sign_raw(desk.priv, desk.key_id, ts)
    r, s = split_raw(raw)
    good = b64url_encode(raw)
    last = good[-1]
    spare = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    nudged = spare[spare.index(last) | 1]  # 64 bytes -> 4 spare bits in the last char
    other = ec.generate_private_key(ec.SECP256R1())
    return {
        "not base64": "!!!!" + good[4:],
        "standard alphabet": "+" + good[1:],
        "padded": good + "==",
        "spare bits": good[:-1] + nudged,
        "63 bytes": b64url_encode(raw[:63]),
        "65 bytes": b64url_encode(raw + b"\x00"),
        "DER": b64url_encode(desk.priv.sign(f"{desk.key_id}.{ts}".encode(), ec.ECDSA(hashes.SHA256()))),
        "empty": "",
        "r=0": b64url_encode(bytes(32) + s.to_bytes(32, "big")),
        "s=0": b64url_encode(r.to_bytes(32, "big") + bytes(32)),
        "r=n": b64url_encode(P256_N.to_bytes(32, "big") + s.to_bytes(32, "big")),
        "s=n": b64url_encode(r.to_bytes(32, "big") + P256_N.to_bytes(32, "big")),
        "wrong message": b64url_encode(sign_raw(desk.priv, desk.key_id, ts + 1)),
        "wrong key": b64url_encode(sign_raw(other, desk.key_id, ts)),
        "swapped r s": b64url_encode(s.to_bytes(32, "big") + r.to_bytes(32, "big")),
    }


def test_bad_signatures_are_401(desk: Desk) -> None:
    ts = desk.ts()
    for name, sig in _bad_signatures(desk, ts).items():
        resp = desk.mint(ts, sig)
        assert resp.status_code == 401, name
        message_of(resp)
    # Sanity: the padded one really differs from the canonical spelling only by padding.
    assert b64url_decode(_bad_signatures(desk, ts)["padded"][:-2])
    assert desk.server.state.stats()["mints"] == 0


def test_replay_is_401(desk: Desk) -> None:
    ts, sig = desk.sig()
    assert desk.mint(ts, sig).status_code == 200
    resp = desk.mint(ts, sig)
    assert resp.status_code == 401
    assert "already been used" in refusal_of(resp)


def test_malleated_replay_is_401(desk: Desk) -> None:
    ts = desk.ts()
    raw = sign_raw(desk.priv, desk.key_id, ts)
    r, s = split_raw(raw)
    assert desk.mint(ts, b64url_encode(raw)).status_code == 200
    flipped = r.to_bytes(32, "big") + (P256_N - s).to_bytes(32, "big")
    resp = desk.mint(ts, b64url_encode(flipped))
    assert resp.status_code == 401
    assert "already been used" in refusal_of(resp)


def test_fresh_signature_same_second_is_accepted(desk: Desk) -> None:
    ts = desk.ts()
    assert desk.mint(ts).status_code == 200
    assert desk.mint(ts).status_code == 200  # ECDSA is randomised: a new signature, not a replay


# ---------------------------------------------------------------------------
# Refresh


def test_refresh_rotates_and_reuse_is_refused(desk: Desk) -> None:
    first = desk.tokens()
    resp = desk.refresh(first["refresh_token"])
    assert resp.status_code == 200
    second = resp.json()
    assert set(second) == {"access_token", "refresh_token", "expires_in", "token_type"}
    assert second["refresh_token"] != first["refresh_token"]
    jwks = jwks_of(desk.server)
    claims = verify_jwt(second["access_token"], jwks, now=time.time()).claims
    assert claims["sub"] == desk.key_id and claims["token_use"] == "access"
    assert rfc3339_ts(second["expires_in"]) == claims["exp"]

    reused = desk.refresh(first["refresh_token"])
    assert reused.status_code == 401
    assert "already been used" in refusal_of(reused)
    # and the reuse revoked the token rotated from it (see the family test below)
    assert desk.refresh(second["refresh_token"]).status_code == 401


def test_revoked_refresh_is_401(desk: Desk) -> None:
    tokens = desk.tokens()
    other = Desk(desk.server)
    other_tokens = other.tokens()
    assert admin(desk.server.origin, "revoke", {"key_id": desk.key_id, "what": "refresh"}) == {"revoked": 1}
    resp = desk.refresh(tokens["refresh_token"])
    assert resp.status_code == 401
    assert "revoked" in refusal_of(resp)
    assert other.refresh(other_tokens["refresh_token"]).status_code == 200
    assert desk.tokens()  # the key itself still mints


def test_revoke_all_refresh_tokens(desk: Desk) -> None:
    a, b = desk.tokens(), desk.tokens()
    assert desk.server.state.revoke_refresh_tokens() == 2
    assert desk.refresh(a["refresh_token"]).status_code == 401
    assert desk.refresh(b["refresh_token"]).status_code == 401


def test_refresh_after_key_revoked_is_401(desk: Desk) -> None:
    tokens = desk.tokens()
    desk.server.state.revoke_key(desk.key_id)
    resp = desk.refresh(tokens["refresh_token"])
    assert resp.status_code == 401
    assert "revoked" in refusal_of(resp)


def test_expired_refresh_is_401(make_server: Callable[..., SandboxServer]) -> None:
    desk = Desk(make_server(refresh_ttl=1, access_ttl=1))
    tokens = desk.tokens()
    spare = desk.tokens()
    assert desk.refresh(spare["refresh_token"]).status_code == 200  # not expired yet: works
    exp = decode_unverified(tokens["refresh_token"]).claims["exp"]
    assert exp - time.time() <= 2.5  # exp is rounded up to whole seconds, never further out
    while time.time() < exp:  # poll the clock in small steps, at most ~2 s
        time.sleep(0.05)
    resp = desk.refresh(tokens["refresh_token"])
    assert resp.status_code == 401
    assert "expired" in refusal_of(resp)


def test_expired_refresh_by_clock_jump(desk: Desk) -> None:
    tokens = desk.tokens()
    desk.server.state.set_clock_offset(3601 + 5)
    resp = desk.refresh(tokens["refresh_token"])
    assert resp.status_code == 401
    assert "expired" in refusal_of(resp)


def test_access_token_is_not_a_refresh_token(desk: Desk) -> None:
    resp = desk.refresh(desk.tokens()["access_token"])
    assert resp.status_code == 401
    assert "not a refresh token" in refusal_of(resp)


def test_foreign_and_tampered_refresh_tokens_are_401(
    desk: Desk, make_server: Callable[..., SandboxServer]
) -> None:
    # Same signing key, different server: the signature verifies but the jti is unknown.
    foreign = Desk(make_server()).tokens()["refresh_token"]
    resp = desk.refresh(foreign)
    assert resp.status_code == 401
    tokens = desk.tokens()
    head, payload, sig = tokens["refresh_token"].split(".")
    claims = json.loads(b64url_decode(payload))
    claims["sub"] = "0b7c6f1e-2f64-4c1a-9a53-5f7a4c1b2d3e"
    forged = ".".join([head, b64url_encode(json.dumps(claims).encode()), sig])
    for token in (forged, "abc", "", "a.b.c", tokens["refresh_token"] + "x"):
        assert desk.refresh(token).status_code == 401, token
    assert desk.refresh(tokens["refresh_token"]).status_code == 200


@pytest.mark.parametrize(
    "body", [{}, {"refresh_token": 1}, {"refresh_token": None}, {"refresh_token": "x", "y": 1}]
)
def test_refresh_field_errors_are_400(desk: Desk, body: dict[str, Any]) -> None:
    resp = requests.post(desk.server.url + "/token/refresh", json=body, timeout=TIMEOUT)
    assert resp.status_code == 400
    message_of(resp)


def test_refresh_needs_json_content_type(desk: Desk) -> None:
    resp = requests.post(
        desk.server.url + "/token/refresh",
        data=json.dumps({"refresh_token": desk.tokens()["refresh_token"]}),
        headers={"Content-Type": "text/plain"},
        timeout=TIMEOUT,
    )
    assert resp.status_code == 400


# ---------------------------------------------------------------------------
# HTTP surface


def test_date_header_follows_clock_offset(make_server: Callable[..., SandboxServer]) -> None:
    srv = make_server(clock_offset=75)
    resp = requests.get(srv.jwks_url, timeout=TIMEOUT)
    ahead = email.utils.parsedate_to_datetime(resp.headers["Date"]).timestamp() - time.time()
    assert 73 <= ahead <= 76
    admin(srv.origin, "clock", {"offset": -75})
    resp = requests.get(srv.origin + "/nope", timeout=TIMEOUT)
    behind = email.utils.parsedate_to_datetime(resp.headers["Date"]).timestamp() - time.time()
    assert -77 <= behind <= -74
    assert resp.headers["Date"].endswith(" GMT")


def test_date_header_is_exact_with_frozen_clock(frozen_desk: Desk) -> None:
    resp = requests.get(frozen_desk.server.jwks_url, timeout=TIMEOUT)
    assert resp.headers["Date"] == email.utils.formatdate(FROZEN, usegmt=True)


def test_404_and_405_are_json(server: SandboxServer) -> None:
    resp = requests.get(server.origin + "/v1/auth/nope", timeout=TIMEOUT)
    assert resp.status_code == 404
    message_of(resp)
    resp = requests.post(server.url + "/api-key/token/", json={}, timeout=TIMEOUT)
    assert resp.status_code == 404
    resp = requests.get(server.url + "/api-key/token", timeout=TIMEOUT)
    assert resp.status_code == 405
    assert resp.headers["Allow"] == "POST"
    message_of(resp)
    resp = requests.post(server.jwks_url, json={}, timeout=TIMEOUT)
    assert resp.status_code == 405
    assert resp.headers["Allow"] == "GET"
    resp = requests.head(server.jwks_url, timeout=TIMEOUT)
    assert resp.status_code == 405 and resp.content == b""


def test_unparseable_request_and_unknown_method_are_json(server: SandboxServer) -> None:
    port = int(server.origin.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(b"GARBAGE\r\n\r\n")
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400")
    assert b"application/json" in head
    assert "message" in json.loads(body)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    conn.request("TRACE", "/")
    resp = conn.getresponse()
    assert resp.status == 501
    assert "message" in json.loads(resp.read())
    conn.close()


def test_internal_error_is_500_json(server: SandboxServer, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom() -> dict[str, int]:
        raise RuntimeError("kaboom")

    monkeypatch.setattr(server.state, "stats", boom)
    resp = requests.get(server.origin + "/admin/stats", timeout=TIMEOUT)
    assert resp.status_code == 500
    assert resp.json() == {"message": "internal error"}
    assert requests.get(server.jwks_url, timeout=TIMEOUT).status_code == 200


# ---------------------------------------------------------------------------
# Faults


def test_fault_status_with_retry_after_does_not_consume(desk: Desk) -> None:
    desk.server.state.set_faults(count=2, status=503, retry_after=7, endpoints=["mint"])
    ts, sig = desk.sig()
    for _ in range(2):
        resp = desk.mint(ts, sig)
        assert resp.status_code == 503
        assert resp.headers["Retry-After"] == "7"
        message_of(resp)
    assert desk.mint(ts, sig).status_code == 200  # the signature was not used up by the faults
    stats = desk.server.state.stats()
    assert stats["faults_injected"] == 2 and stats["mint_attempts"] == 3 and stats["mints"] == 1


def test_fault_until_cleared_over_admin(desk: Desk) -> None:
    origin = desk.server.origin
    spec = admin(origin, "faults", {"count": -1, "status": 429, "retry_after": 2})
    assert spec["faults"]["count"] == -1 and spec["faults"]["status"] == 429
    for _ in range(3):
        assert requests.get(desk.server.jwks_url, timeout=TIMEOUT).status_code == 429
    # Admin routes are never faulted.
    assert admin(origin, "stats")["faults_injected"] == 3
    assert admin(origin, "faults")["faults"]["status"] == 429
    assert admin(origin, "faults", method="DELETE") == {"faults": None}
    assert requests.get(desk.server.jwks_url, timeout=TIMEOUT).status_code == 200


def test_fault_endpoint_selection_and_refresh_not_consumed(desk: Desk) -> None:
    tokens = desk.tokens()
    desk.server.state.set_faults(endpoints=["refresh"], status=500)
    assert desk.refresh(tokens["refresh_token"]).status_code == 500
    assert desk.mint().status_code == 200
    assert requests.get(desk.server.jwks_url, timeout=TIMEOUT).status_code == 200
    desk.server.state.clear_faults()
    assert desk.refresh(tokens["refresh_token"]).status_code == 200


def test_fault_rate_is_seeded(server: SandboxServer) -> None:
    server.state.set_faults(rate=0.5, seed=7, status=502, endpoints=["jwks"])
    rng = random.Random(7)
    expected = [502 if rng.random() < 0.5 else 200 for _ in range(20)]
    got = [requests.get(server.jwks_url, timeout=TIMEOUT).status_code for _ in range(20)]
    assert got == expected
    assert 0 < expected.count(502) < 20


def test_fault_rate_one_and_zero(server: SandboxServer) -> None:
    server.state.set_faults(rate=1.0, status=503)
    assert [requests.get(server.jwks_url, timeout=TIMEOUT).status_code for _ in range(3)] == [503] * 3
    server.state.set_faults(rate=0.0)
    assert requests.get(server.jwks_url, timeout=TIMEOUT).status_code == 200


def test_fault_delay_answers_normally(desk: Desk) -> None:
    desk.server.state.set_faults(mode="delay", delay=0.3, count=1)
    start = time.monotonic()
    resp = desk.mint()
    assert resp.status_code == 200
    assert time.monotonic() - start >= 0.3


def test_fault_delay_exceeds_client_timeout(desk: Desk) -> None:
    desk.server.state.set_faults(mode="delay", delay=2.0, count=1)
    with pytest.raises(requests.Timeout):
        requests.get(desk.server.jwks_url, timeout=0.2)
    assert requests.get(desk.server.jwks_url, timeout=TIMEOUT).status_code == 200


def test_fault_reset_closes_without_response(desk: Desk) -> None:
    desk.server.state.set_faults(mode="reset", count=1, endpoints=["mint"])
    ts, sig = desk.sig()
    with pytest.raises(requests.ConnectionError):
        desk.mint(ts, sig)
    assert desk.mint(ts, sig).status_code == 200  # the aborted request consumed nothing


def test_fault_reset_is_a_tcp_rst(server: SandboxServer) -> None:
    server.state.set_faults(mode="reset", count=1, endpoints=["jwks"])
    port = int(server.origin.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(b"GET /.well-known/jwks.json HTTP/1.1\r\nHost: x\r\n\r\n")
        with pytest.raises(ConnectionResetError):
            while sock.recv(4096):
                pass


@pytest.mark.parametrize("endpoint", ["mint", "refresh", "jwks"])
def test_fault_malformed_json(desk: Desk, endpoint: str) -> None:
    tokens = desk.tokens()
    desk.server.state.set_faults(mode="malformed_json", count=1)
    if endpoint == "mint":
        resp = desk.mint()
    elif endpoint == "refresh":
        resp = desk.refresh(tokens["refresh_token"])
    else:
        resp = requests.get(desk.server.jwks_url, timeout=TIMEOUT)
    assert resp.status_code == 200
    assert resp.headers["Content-Type"] == "application/json"
    assert len(resp.content) == int(resp.headers["Content-Length"])
    with pytest.raises(ValueError):
        json.loads(resp.content)


def test_fault_wrong_content_type(desk: Desk) -> None:
    desk.server.state.set_faults(mode="wrong_content_type", count=1, endpoints=["mint"])
    resp = desk.mint()
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("text/html")
    assert b"<html>" in resp.content
    assert desk.server.state.stats()["mints"] == 0


@pytest.mark.parametrize(
    "spec",
    [
        {"mode": "bogus"},
        {"count": -2},
        {"count": 1.5},
        {"rate": 2},
        {"status": 200},
        {"endpoints": ["admin"]},
        {"endpoints": []},
        {"delay": -1},
        {"retry_after": -1},
        {"colour": "red"},
    ],
)
def test_bad_fault_specs_are_refused(server: SandboxServer, spec: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        server.state.set_faults(**spec)
    with pytest.raises(ApiError) as info:
        admin(server.origin, "faults", spec)
    assert info.value.status == 400
    assert server.state.faults() is None


# ---------------------------------------------------------------------------
# Stats, admin and state


def test_stats_counters(desk: Desk) -> None:
    tokens = desk.tokens()  # 1 attempt, 1 mint
    assert desk.mint(signature="AAAA", ts=desk.ts()).status_code == 401
    assert desk.refresh(tokens["refresh_token"]).status_code == 200
    assert desk.refresh(tokens["refresh_token"]).status_code == 401
    jwks_of(desk.server)
    desk.server.state.set_faults(count=1, endpoints=["jwks"])
    assert requests.get(desk.server.jwks_url, timeout=TIMEOUT).status_code == 503
    assert requests.get(desk.server.origin + "/nope", timeout=TIMEOUT).status_code == 404
    assert admin(desk.server.origin, "stats") == {
        "mints": 1,
        "refreshes": 1,
        "mint_attempts": 2,
        "refresh_attempts": 2,
        "jwks": 2,
        "requests": 7,
        "faults_injected": 1,
    }


def test_register_key_rejects_non_p256(server: SandboxServer) -> None:
    rsa_pem = (
        rsa.generate_private_key(public_exponent=65537, key_size=1024)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    p384 = pem_of(ec.generate_private_key(ec.SECP384R1()))
    for pem in (rsa_pem, p384, "not a pem", ""):
        with pytest.raises(ValueError):
            server.state.register_key(pem)
        with pytest.raises(ApiError) as info:
            register_key(server.origin, pem)
        assert info.value.status == 400


def test_register_key_accepts_bytes_and_returns_uuid(server: SandboxServer) -> None:
    priv = ec.generate_private_key(ec.SECP256R1())
    key_id = server.state.register_key(pem_of(priv).encode())
    parts = key_id.split("-")
    assert [len(p) for p in parts] == [8, 4, 4, 4, 12]
    assert key_id != server.state.register_key(pem_of(priv))


def test_admin_errors(server: SandboxServer) -> None:
    with pytest.raises(ApiError) as info:
        admin(server.origin, "nope")
    assert info.value.status == 404
    with pytest.raises(ApiError) as info:
        admin(server.origin, "revoke", {"key_id": "0b7c6f1e-2f64-4c1a-9a53-5f7a4c1b2d3e", "what": "key"})
    assert info.value.status == 404
    with pytest.raises(ApiError) as info:
        admin(server.origin, "revoke", {"what": "everything"})
    assert info.value.status == 400
    with pytest.raises(ApiError) as info:
        admin(server.origin, "clock", {"offset": "soon"})
    assert info.value.status == 400
    with pytest.raises(KeyError):
        server.state.revoke_key("0b7c6f1e-2f64-4c1a-9a53-5f7a4c1b2d3e")


def test_admin_unreachable_raises_api_error(make_server: Callable[..., SandboxServer]) -> None:
    srv = make_server()
    srv.close()
    with pytest.raises(ApiError) as info:
        admin(srv.origin, "stats", timeout=1)
    assert info.value.status is None


def test_clock_admin_and_state(make_server: Callable[..., SandboxServer]) -> None:
    srv = make_server(clock=lambda: FROZEN)
    assert srv.state.now() == FROZEN
    got = admin(srv.origin, "clock", {"offset": 12.5})
    assert got == {"offset": 12.5, "now": FROZEN + 12.5}
    assert srv.state.now() == FROZEN + 12.5
    assert admin(srv.origin, "clock")["offset"] == 12.5


def test_state_rejects_bad_options(rsa_key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(ValueError):
        SandboxState(SandboxOptions(alg="HS256"))
    with pytest.raises(ValueError):
        SandboxState(SandboxOptions(alg="ES256", signing_key=rsa_key))
    with pytest.raises(ValueError):
        SandboxState(SandboxOptions(signing_key=ec.generate_private_key(ec.SECP256R1())))


def test_concurrent_reuse_wins_exactly_once(desk: Desk) -> None:
    tokens = desk.tokens()
    ts, sig = desk.sig()
    with ThreadPoolExecutor(max_workers=12) as pool:
        refreshes = list(pool.map(lambda _: desk.refresh(tokens["refresh_token"]).status_code, range(12)))
        mints = list(pool.map(lambda _: desk.mint(ts, sig).status_code, range(12)))
    assert sorted(refreshes) == [200] + [401] * 11
    assert sorted(mints) == [200] + [401] * 11


@pytest.mark.parametrize("length", ["abc", "-1", "\u00b2", "9" * 5000, "5, 6"])
def test_bad_content_length_is_400(server: SandboxServer, length: str) -> None:
    port = int(server.origin.rsplit(":", 1)[1])
    request = (
        f"POST /v1/auth/token/refresh HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode("latin-1")
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    assert data.startswith(b"HTTP/1.1 400")
    assert b'"message"' in data


def test_reusing_a_refresh_token_revokes_its_whole_rotation_family(desk: Desk) -> None:
    first = desk.tokens()
    second = desk.refresh(first["refresh_token"])
    assert second.status_code == 200
    reuse = desk.refresh(first["refresh_token"])
    assert reuse.status_code == 401 and "family" in refusal_of(reuse)
    # the token rotated from it is revoked too, so a thief and the owner both lose it
    assert desk.refresh(second.json()["refresh_token"]).status_code == 401
    # another mint starts a new family and is unaffected
    other = desk.tokens()
    assert desk.refresh(other["refresh_token"]).status_code == 200

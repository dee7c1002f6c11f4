"""A strict local copy of the True Markets Auth API, for tests, demos and offline rehearsal.

It implements the published contract (mint with an ES256-signed challenge, rotate refresh
tokens, publish a JWKS) and is deliberately at least as strict as the contract implies, so
a client that works here does not meet a surprise against the real service. On top of
that it has an ``/admin/`` surface (what the API Keys settings page does, plus test knobs:
clock skew, key/refresh revocation and injected faults).

It runs on the stdlib ``http.server`` stack so that clients are exercised against real
sockets, real keep-alive and real ``Date`` headers rather than a mocked transport.
"""

from __future__ import annotations

import email.utils
import json
import logging
import math
import random
import re
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import TCPServer
from typing import Any
from urllib.parse import urlsplit

import requests
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from .auth import brief_transport_error
from .errors import ApiError
from .jose import (
    P256_N,
    b64url_decode,
    b64url_encode,
    der_to_raw,
    ec_jwk,
    jwk_thumbprint,
    split_raw,
    verify_es256,
    verify_jwt,
)

logger = logging.getLogger(__name__)

API_PREFIX = "/v1/auth"
JWKS_PATH = "/.well-known/jwks.json"
MINT_PATH = API_PREFIX + "/api-key/token"
REFRESH_PATH = API_PREFIX + "/token/refresh"

MAX_BODY = 64 * 1024
# Oversized bodies up to this size are read and discarded so the 400 reaches the client
# on a clean connection; anything larger is refused and the connection closed.
_DRAIN_LIMIT = 1024 * 1024
# Replay entries live this long past 2*skew (a signature is only acceptable while its
# timestamp is within ±skew, so older entries can never match an acceptable request).
_REPLAY_MARGIN = 60.0
# Refresh records are kept this long after they expire, then forgotten (an unknown jti is
# refused anyway).
_REFRESH_MARGIN = 600.0

_UUID_RE = re.compile(r"[0-9a-fA-F]{8}(?:-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}")
_HEX_RE = re.compile(rb"[0-9a-fA-F]{1,16}")
_DIGITS_RE = re.compile(r"[0-9]{1,18}")

ENDPOINTS = ("mint", "refresh", "jwks")
FAULT_MODES = ("status", "delay", "reset", "malformed_json", "wrong_content_type")
_FAULT_KEYS = frozenset({"count", "rate", "mode", "status", "retry_after", "delay", "endpoints", "seed"})

SigningKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


@dataclass
class SandboxOptions:
    """How the sandbox behaves. ``clock`` and ``signing_key`` exist so tests can be exact/fast."""

    access_ttl: float = 300.0  # seconds
    refresh_ttl: float = 3600.0
    clock_offset: float = 0.0  # server clock = clock() + clock_offset
    alg: str = "RS256"  # JWT signing algorithm: "RS256" or "ES256"
    skew: int = 30  # accepted |timestamp - server_now| in seconds
    clock: Callable[[], float] = time.time
    signing_key: SigningKey | None = None  # generated at start when None


class Unauthorized(Exception):
    """A request the API answers with 401; the message goes to the client."""


@dataclass
class _ApiKey:
    public_key: ec.EllipticCurvePublicKey
    revoked: bool = False


@dataclass
class _RefreshRecord:
    key_id: str
    exp: int
    family: str  # every token rotated from one mint shares it
    used: bool = False
    revoked: bool = False


@dataclass
class _Fault:
    mode: str = "status"
    count: int = -1
    rate: float = 0.0
    status: int = 503
    retry_after: float | str | None = None
    delay: float = 1.0
    endpoints: tuple[str, ...] = ENDPOINTS
    seed: int | None = None
    rng: random.Random = field(default_factory=random.Random, repr=False)

    def describe(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "count": self.count,
            "rate": self.rate,
            "status": self.status,
            "retry_after": self.retry_after,
            "delay": self.delay,
            "endpoints": list(self.endpoints),
            "seed": self.seed,
        }


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _parse_fault(spec: Mapping[str, Any]) -> _Fault:
    """Validate a fault spec up front so a typo fails loudly instead of silently not firing."""
    unknown = sorted(set(spec) - _FAULT_KEYS)
    if unknown:
        raise ValueError(f"unknown fault option(s): {', '.join(unknown)}")
    fault = _Fault()
    mode = spec.get("mode", "status")
    if mode not in FAULT_MODES:
        raise ValueError(f"fault mode must be one of {', '.join(FAULT_MODES)}")
    fault.mode = mode
    rate = spec.get("rate", 0.0)
    if not _is_number(rate) or not 0.0 <= rate <= 1.0:
        raise ValueError("fault rate must be a number in [0, 1]")
    fault.rate = float(rate)
    # With neither count nor rate given the fault is simply "on" until cleared.
    count = spec.get("count", 0 if "rate" in spec else -1)
    if not _is_int(count) or count < -1:
        raise ValueError("fault count must be an integer >= -1 (-1 = until cleared)")
    fault.count = count
    status = spec.get("status", 503)
    if not _is_int(status) or not 400 <= status <= 599:
        raise ValueError("fault status must be an integer HTTP error status (400-599)")
    fault.status = status
    retry_after = spec.get("retry_after")
    if retry_after is not None and not isinstance(retry_after, str):
        if not _is_number(retry_after) or retry_after < 0:
            raise ValueError("fault retry_after must be seconds >= 0 or an HTTP-date string")
    fault.retry_after = retry_after
    delay = spec.get("delay", 1.0)
    if not _is_number(delay) or delay < 0:
        raise ValueError("fault delay must be a number of seconds >= 0")
    fault.delay = float(delay)
    endpoints = spec.get("endpoints", ENDPOINTS)
    if isinstance(endpoints, str):
        endpoints = [endpoints]
    if (
        not isinstance(endpoints, (list, tuple))
        or not endpoints
        or any(e not in ENDPOINTS for e in endpoints)
    ):
        raise ValueError(f"fault endpoints must be a non-empty list of {', '.join(ENDPOINTS)}")
    fault.endpoints = tuple(dict.fromkeys(endpoints))
    seed = spec.get("seed")
    if seed is not None and not _is_int(seed):
        raise ValueError("fault seed must be an integer")
    fault.seed = seed
    fault.rng = random.Random(seed)
    return fault


def _rfc3339(ts: int) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class SandboxState:
    """Keys, tokens, replay memory, clock, faults and counters; one lock guards all of it."""

    def __init__(self, options: SandboxOptions | None = None, issuer: str = "") -> None:
        opts = options or SandboxOptions()
        if opts.alg not in ("RS256", "ES256"):
            raise ValueError("alg must be RS256 or ES256")
        if opts.access_ttl <= 0 or opts.refresh_ttl <= 0:
            raise ValueError("token lifetimes must be positive")
        if not _is_int(opts.skew) or opts.skew < 0:
            raise ValueError("skew must be a non-negative integer")
        self._lock = threading.Lock()
        self.issuer = issuer
        self._alg = opts.alg
        self._access_ttl = float(opts.access_ttl)
        self._refresh_ttl = float(opts.refresh_ttl)
        self._skew = opts.skew
        self._last_refusal: str | None = None
        self._clock = opts.clock
        self._offset = float(opts.clock_offset)
        self._signing_key = opts.signing_key or self._generate_key(opts.alg)
        self._check_signing_key()
        self._jwk = self._public_jwk()
        self._kid = self._jwk["kid"]
        self._keys: dict[str, _ApiKey] = {}
        self._refresh: dict[str, _RefreshRecord] = {}
        self._used_sigs: dict[tuple[str, int, int], float] = {}
        self._fault: _Fault | None = None
        self._stats = dict.fromkeys(
            (
                "mints",
                "refreshes",
                "mint_attempts",
                "refresh_attempts",
                "jwks",
                "requests",
                "faults_injected",
            ),
            0,
        )

    # -- setup ---------------------------------------------------------------

    @staticmethod
    def _generate_key(alg: str) -> SigningKey:
        if alg == "ES256":
            return ec.generate_private_key(ec.SECP256R1())
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def _check_signing_key(self) -> None:
        key = self._signing_key
        if self._alg == "RS256":
            if not isinstance(key, rsa.RSAPrivateKey) or key.key_size < 2048:
                raise ValueError("RS256 needs an RSA private key of at least 2048 bits")
        elif not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
            raise ValueError("ES256 needs a P-256 private key")

    def _public_jwk(self) -> dict[str, str]:
        pub = self._signing_key.public_key()
        if isinstance(pub, rsa.RSAPublicKey):
            nums = pub.public_numbers()
            jwk = {
                "kty": "RSA",
                "n": b64url_encode(nums.n.to_bytes((nums.n.bit_length() + 7) // 8, "big")),
                "e": b64url_encode(nums.e.to_bytes((nums.e.bit_length() + 7) // 8, "big")),
            }
        else:
            jwk = ec_jwk(pub)
        jwk["kid"] = jwk_thumbprint(jwk)
        jwk["use"] = "sig"
        jwk["alg"] = self._alg
        return jwk

    # -- clock ---------------------------------------------------------------

    def now(self) -> float:
        """The server clock: the real (or injected) clock plus the configured offset."""
        return self._clock() + self._offset

    def set_clock_offset(self, seconds: float) -> None:
        """Move the server clock, to rehearse a desk whose clock has drifted."""
        if not _is_number(seconds):
            raise ValueError("clock offset must be a finite number of seconds")
        with self._lock:
            self._offset = float(seconds)
        logger.info("sandbox clock offset set to %+.3f s", seconds)

    def clock_offset(self) -> float:
        with self._lock:
            return self._offset

    # -- keys ----------------------------------------------------------------

    def register_key(self, pem: str | bytes) -> str:
        """Register a P-256 SPKI PEM public key, as the API Keys page does; returns its key_id."""
        data = pem.encode("ascii", "replace") if isinstance(pem, str) else bytes(pem)
        try:
            key = serialization.load_pem_public_key(data)
        except (ValueError, TypeError) as e:
            raise ValueError(f"not a PEM SubjectPublicKeyInfo public key: {e}") from None
        if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
            raise ValueError("the public key must be an EC P-256 key")
        key_id = str(uuid.uuid4())
        with self._lock:
            self._keys[key_id] = _ApiKey(key)
        logger.info("sandbox registered API key %s", key_id)
        return key_id

    def revoke_key(self, key_id: str) -> None:
        """Revoke an API key: it can no longer mint, and its refresh tokens stop working."""
        with self._lock:
            rec = self._keys.get(key_id)
            if rec is None:
                raise KeyError(key_id)
            rec.revoked = True
        logger.info("sandbox revoked API key %s", key_id)

    def revoke_refresh_tokens(self, key_id: str | None = None) -> int:
        """Revoke every outstanding refresh token (of ``key_id`` if given); returns how many."""
        with self._lock:
            if key_id is not None and key_id not in self._keys:
                raise KeyError(key_id)
            now = self.now()
            count = 0
            for rec in self._refresh.values():
                if key_id is not None and rec.key_id != key_id:
                    continue
                if not rec.used and not rec.revoked and now < rec.exp:
                    rec.revoked = True
                    count += 1
        logger.info("sandbox revoked %d refresh token(s) (key %s)", count, key_id or "*")
        return count

    # -- faults --------------------------------------------------------------

    def set_faults(self, **spec: Any) -> None:
        """Make API requests fail in a chosen way (replaces any previous fault spec).

        Options: count (next N requests; -1 = until cleared), rate (probability per request),
        mode (status | delay | reset | malformed_json | wrong_content_type), status,
        retry_after, delay, endpoints (subset of mint, refresh, jwks), seed (for rate).
        """
        fault = _parse_fault(spec)
        with self._lock:
            self._fault = fault
        logger.info("sandbox faults set: %s", fault.describe())

    def clear_faults(self) -> None:
        with self._lock:
            self._fault = None
        logger.info("sandbox faults cleared")

    def faults(self) -> dict[str, Any] | None:
        """The active fault spec (with the remaining count), or None."""
        with self._lock:
            return self._fault.describe() if self._fault else None

    def _begin(self, endpoint: str) -> None:
        with self._lock:
            self._stats["requests"] += 1
            if endpoint == "mint":
                self._stats["mint_attempts"] += 1
            elif endpoint == "refresh":
                self._stats["refresh_attempts"] += 1
            elif endpoint == "jwks":
                self._stats["jwks"] += 1

    def _count_request(self) -> None:
        with self._lock:
            self._stats["requests"] += 1

    def _take_fault(self, endpoint: str) -> _Fault | None:
        """Decide whether this request fails; consumes one from ``count`` when it does."""
        with self._lock:
            fault = self._fault
            if fault is None or endpoint not in fault.endpoints:
                return None
            hit = False
            if fault.count == -1:
                hit = True
            elif fault.count > 0:
                fault.count -= 1
                hit = True
            elif fault.rate > 0 and fault.rng.random() < fault.rate:
                hit = True
            if hit:
                self._stats["faults_injected"] += 1
            return fault if hit else None

    def note_refusal(self, reason: str) -> None:
        """Remember why the last 401 was given (the answer itself does not say)."""
        with self._lock:
            self._last_refusal = reason

    @property
    def last_refusal(self) -> str | None:
        with self._lock:
            return self._last_refusal

    def stats(self) -> dict[str, int]:
        """Counters; attempts include refused and faulted requests, admin calls are not counted."""
        with self._lock:
            return dict(self._stats)

    # -- JWKS and JWT issuing ------------------------------------------------

    def jwks(self) -> dict[str, Any]:
        return {"keys": [dict(self._jwk)]}

    def _sign_jwt(self, claims: Mapping[str, Any]) -> str:
        header = {"alg": self._alg, "typ": "JWT", "kid": self._kid}
        signing_input = ".".join(
            b64url_encode(json.dumps(part, separators=(",", ":")).encode("utf-8"))
            for part in (header, claims)
        )
        data = signing_input.encode("ascii")
        key = self._signing_key
        if isinstance(key, rsa.RSAPrivateKey):
            sig = key.sign(data, padding.PKCS1v15(), hashes.SHA256())
        else:
            sig = der_to_raw(key.sign(data, ec.ECDSA(hashes.SHA256())))  # RFC 7518: raw r||s
        return signing_input + "." + b64url_encode(sig)

    def _new_pair_locked(
        self, key_id: str, now: float, family: str | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Claims for a new access/refresh pair; records the refresh jti. Caller holds the lock."""
        iat = math.floor(now)
        # Integer exp rounded up: a token never lives shorter than its configured TTL.
        access_exp = math.ceil(now + self._access_ttl)
        refresh_exp = math.ceil(now + self._refresh_ttl)
        refresh_jti = uuid.uuid4().hex
        base: dict[str, Any] = {"iss": self.issuer, "sub": key_id, "iat": iat, "nbf": iat}
        access = dict(base, exp=access_exp, jti=uuid.uuid4().hex, token_use="access")
        refresh = dict(base, exp=refresh_exp, jti=refresh_jti, token_use="refresh")
        for jti in [j for j, r in self._refresh.items() if r.exp + _REFRESH_MARGIN < now]:
            del self._refresh[jti]
        self._refresh[refresh_jti] = _RefreshRecord(key_id, refresh_exp, family or refresh_jti)
        return access, refresh

    def _token_response(self, access: Mapping[str, Any], refresh: Mapping[str, Any]) -> dict:
        return {
            "access_token": self._sign_jwt(access),
            "refresh_token": self._sign_jwt(refresh),
            "expires_in": _rfc3339(access["exp"]),
            "token_type": "Bearer",
        }

    # -- the two token operations --------------------------------------------

    def mint(self, key_id: str, timestamp: int, signature: str) -> dict[str, Any]:
        """Check an ES256-signed ``{key_id}.{timestamp}`` challenge and issue a token pair.

        Raises Unauthorized (401) for an unknown/revoked key, a timestamp outside ±skew,
        a malformed or non-verifying signature, or a replay. State changes only on success.
        """
        with self._lock:
            rec = self._keys.get(key_id)
            if rec is None or rec.revoked:
                raise Unauthorized("unknown or revoked API key")
            server_now = self.now()
        # Against the exact server time, not its whole second: "within ±30s" is the stricter
        # reading (a timestamp 30.9 s old is refused).
        if abs(timestamp - server_now) > self._skew:
            raise Unauthorized(
                f"timestamp is outside the accepted window of ±{self._skew} s around server "
                f"time {server_now:.3f}; check the clock"
            )
        try:
            raw = b64url_decode(signature)
        except ValueError:
            raise Unauthorized("signature is not canonical unpadded base64url") from None
        if len(raw) != 64:
            raise Unauthorized(f"signature must be 64 bytes (raw ES256 r||s), got {len(raw)}")
        try:
            r, s = split_raw(raw)
        except ValueError:
            raise Unauthorized("signature r or s is outside [1, n-1]") from None
        message = f"{key_id}.{timestamp}".encode("ascii")
        if not verify_es256(rec.public_key, message, raw):
            raise Unauthorized("signature does not verify for this key over '{key_id}.{timestamp}'")
        # (r, s) and (r, n-s) both verify; remember the pair in one normalised form.
        replay_key = (key_id, r, min(s, P256_N - s))
        with self._lock:
            if rec.revoked:
                raise Unauthorized("unknown or revoked API key")
            now = self.now()
            horizon = now - (2 * self._skew + _REPLAY_MARGIN)
            for old in [k for k, seen in self._used_sigs.items() if seen < horizon]:
                del self._used_sigs[old]
            if replay_key in self._used_sigs:
                raise Unauthorized("signature has already been used; sign a fresh challenge")
            self._used_sigs[replay_key] = now
            access, refresh = self._new_pair_locked(key_id, now)
            self._stats["mints"] += 1
        logger.info("sandbox minted tokens for key %s", key_id)
        return self._token_response(access, refresh)

    def refresh(self, refresh_token: str) -> dict[str, Any]:
        """Exchange a refresh token for a new pair; each refresh token works exactly once."""
        now = self.now()
        try:
            jwt = verify_jwt(refresh_token, self.jwks(), now=now)
        except (ValueError, TypeError, RecursionError) as e:
            raise Unauthorized(f"refresh token rejected: {e}") from None
        claims = jwt.claims
        if claims.get("token_use") != "refresh":
            raise Unauthorized("not a refresh token")
        if claims.get("iss") != self.issuer:
            raise Unauthorized("refresh token was not issued by this server")
        jti, sub = claims.get("jti"), claims.get("sub")
        with self._lock:
            rec = self._refresh.get(jti) if isinstance(jti, str) else None
            if rec is None or rec.key_id != sub:
                raise Unauthorized("refresh token is not recognised")
            if rec.used:
                # Reuse means the token leaked or a client is confused: like OAuth refresh
                # token rotation, revoke every token rotated from the same mint.
                for other in self._refresh.values():
                    if other.family == rec.family:
                        other.revoked = True
                raise Unauthorized("refresh token has already been used (they are single-use); "
                                   "its whole rotation family is now revoked")
            if rec.revoked:
                raise Unauthorized("refresh token has been revoked")
            key = self._keys.get(rec.key_id)
            if key is None or key.revoked:
                raise Unauthorized("the API key behind this refresh token has been revoked")
            now = self.now()
            if now >= rec.exp:
                raise Unauthorized("refresh token rejected: JWT has expired")
            rec.used = True
            access, refresh = self._new_pair_locked(rec.key_id, now, rec.family)
            self._stats["refreshes"] += 1
        logger.info("sandbox refreshed tokens for key %s", rec.key_id)
        return self._token_response(access, refresh)


# ---------------------------------------------------------------------------
# HTTP layer


# The service's 401 says the same whatever the cause (unknown, expired or revoked key, bad
# signature, timestamp out of range, used refresh token), so a client must not learn to
# read it. The sandbox says the same; the cause goes to its log and, for rehearsal and
# tests, to a header the real service does not send.
UNAUTHORIZED_MESSAGE = "unauthorized"
REFUSAL_HEADER = "X-Sandbox-Refusal"


def _refused(e: Unauthorized) -> _HttpError:
    reason = str(e).encode("ascii", "replace").decode("ascii")  # a header is latin-1 at most
    return _HttpError(401, UNAUTHORIZED_MESSAGE, headers=[(REFUSAL_HEADER, reason)])


class _HttpError(Exception):
    def __init__(
        self, status: int, message: str, *, close: bool = False, headers: Iterable[tuple[str, str]] = ()
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.close = close
        self.headers = list(headers)


class _DuplicateKey(ValueError):
    pass


def _object_no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(f"duplicate field {k!r}")
        out[k] = v
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _check_content_type(value: str | None) -> None:
    if value is None:
        raise _HttpError(400, "Content-Type must be application/json")
    parts = [p.strip() for p in value.split(";")]
    if parts[0].lower() != "application/json":
        raise _HttpError(400, f"Content-Type must be application/json, not {parts[0]!r}")
    for param in parts[1:]:
        name, _, val = param.partition("=")
        if name.strip().lower() != "charset" or val.strip().strip('"').lower() != "utf-8":
            raise _HttpError(400, "the only Content-Type parameter accepted is charset=utf-8")


def _json_object(body: bytes) -> dict[str, Any]:
    """Strict JSON: UTF-8, no duplicate fields, no NaN/Infinity, an object at the top."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise _HttpError(400, "request body is not valid UTF-8") from None
    try:
        obj = json.loads(text, object_pairs_hook=_object_no_duplicates, parse_constant=_reject_constant)
    except _DuplicateKey as e:
        raise _HttpError(400, f"malformed request body: {e}") from None
    except (ValueError, RecursionError):
        raise _HttpError(400, "request body is not valid JSON") from None
    if not isinstance(obj, dict):
        raise _HttpError(400, "request body must be a JSON object")
    return obj


def _fields(obj: Mapping[str, Any], spec: Mapping[str, tuple[type, str]]) -> list[Any]:
    """Required fields with exact JSON types; unknown fields are refused (strict)."""
    values = []
    for name, (typ, what) in spec.items():
        if name not in obj:
            raise _HttpError(400, f"missing required field '{name}'")
        value = obj[name]
        if not isinstance(value, typ) or isinstance(value, bool):
            raise _HttpError(400, f"field '{name}' must be {what}")
        values.append(value)
    extra = sorted(set(obj) - set(spec))
    if extra:
        raise _HttpError(400, f"unknown field(s): {', '.join(repr(e) for e in extra)}")
    return values


_MINT_FIELDS = {
    "key_id": (str, "a string (the API key UUID)"),
    "timestamp": (int, "an integer (Unix seconds)"),
    "signature": (str, "a string (base64url ES256 signature)"),
}
_REFRESH_FIELDS = {"refresh_token": (str, "a string")}

_MALFORMED = {
    "mint": b'{"access_token": "eyJhbGciOiJSUzI1NiIsInR5cCI6',
    "refresh": b'{"access_token": "eyJhbGciOiJSUzI1NiIsInR5cCI6',
    "jwks": b'{"keys": [{"kty": "RSA", "kid": "',
}
_HTML = (
    b"<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head><body>"
    b"<h1>Bad Gateway</h1></body></html>"
)

Route = Callable[["_Handler", bytes], tuple[int, Any]]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "tm-hsm-sandbox/1.0"
    sys_version = ""
    timeout = 120  # idle keep-alive connections are dropped after this
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes; without NODELAY, Nagle plus the
        # client's delayed ACK adds ~40 ms to every keep-alive request.
        try:
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        self._reset_connection = False
        self._responded = False

    @property
    def state(self) -> SandboxState:
        return self.server.sandbox.state

    # -- plumbing overrides --------------------------------------------------

    def date_time_string(self, timestamp: float | None = None) -> str:
        """Date header from the *server* clock, so clock offsets are visible to clients."""
        if timestamp is None:
            timestamp = self.state.now()
        return email.utils.formatdate(timestamp, usegmt=True)

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("sandbox %s %s", self.address_string(), format % args)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The base class calls this for unparseable requests; answer in JSON like the API."""
        if message is None:
            message = self.responses.get(code, ("error",))[0]
        if getattr(self, "request_version", "HTTP/0.9") == "HTTP/0.9":
            self.request_version = "HTTP/1.0"  # nobody speaks 0.9: always send a status line
        self._send_json(code, {"message": message}, close=True)

    def finish(self) -> None:
        if self._reset_connection:
            # Abort: SO_LINGER 0 turns close() into a TCP RST, with no response at all.
            try:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
            for f in (self.rfile, self.wfile):
                try:
                    f.close()
                except OSError:
                    pass
            self.connection.close()
            return
        super().finish()

    # -- responses -----------------------------------------------------------

    def _send(
        self,
        status: int,
        body: bytes,
        content_type: str = "application/json",
        headers: Iterable[tuple[str, str]] = (),
        close: bool = False,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if getattr(self, "path", "") != JWKS_PATH:  # tokens and errors must never be cached
            self.send_header("Cache-Control", "no-store")
        for name, value in headers:
            self.send_header(name, value)
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self._responded = True

    def _send_json(self, status: int, payload: Any, **kw: Any) -> None:
        self._send(status, json.dumps(payload).encode("utf-8"), **kw)

    # -- request body --------------------------------------------------------

    def _read_body(self) -> bytes:
        """Read the body (Content-Length or chunked), enforcing the 64 KiB limit."""
        te = self.headers.get_all("Transfer-Encoding") or []
        lengths = self.headers.get_all("Content-Length") or []
        if te:
            if lengths:
                raise _HttpError(400, "both Transfer-Encoding and Content-Length", close=True)
            if [t.strip().lower() for t in te] != ["chunked"]:
                raise _HttpError(400, "unsupported Transfer-Encoding", close=True)
            return self._read_chunked()
        if not lengths:
            return b""
        if len(set(lengths)) != 1 or not _DIGITS_RE.fullmatch(lengths[0].strip()):
            raise _HttpError(400, "invalid Content-Length", close=True)
        size = int(lengths[0])
        if size > MAX_BODY:
            if size > _DRAIN_LIMIT:
                raise _HttpError(400, f"request body exceeds {MAX_BODY} bytes", close=True)
            self._discard(size)
            raise _HttpError(400, f"request body exceeds {MAX_BODY} bytes")
        body = self.rfile.read(size)
        if len(body) != size:
            raise _HttpError(400, "request body shorter than Content-Length", close=True)
        return body

    def _discard(self, size: int) -> None:
        while size > 0:
            chunk = self.rfile.read(min(size, 65536))
            if not chunk:
                raise _HttpError(400, "request body shorter than Content-Length", close=True)
            size -= len(chunk)

    def _read_chunked(self) -> bytes:
        chunks: list[bytes] = []
        total = 0
        while True:
            line = self.rfile.readline(1024)
            if not line.endswith(b"\n"):
                raise _HttpError(400, "malformed chunked body", close=True)
            size_text = line.split(b";", 1)[0].strip()
            if not _HEX_RE.fullmatch(size_text):
                raise _HttpError(400, "malformed chunk size", close=True)
            size = int(size_text, 16)
            if size == 0:
                while True:  # trailers, up to the blank line
                    trailer = self.rfile.readline(8192)
                    if trailer in (b"\r\n", b"\n", b""):
                        break
                return b"".join(chunks)
            total += size
            if total > MAX_BODY:
                raise _HttpError(400, f"request body exceeds {MAX_BODY} bytes", close=True)
            data = self.rfile.read(size)
            if len(data) != size or self.rfile.read(2) != b"\r\n":
                raise _HttpError(400, "malformed chunked body", close=True)
            chunks.append(data)

    # -- dispatch ------------------------------------------------------------

    def _dispatch(self) -> None:
        self._responded = False
        path = urlsplit(self.path).path
        try:
            self._route(path)
        except _HttpError as e:
            self._send_json(e.status, {"message": e.message}, headers=e.headers, close=e.close)
        except Exception:  # noqa: BLE001 - the API answers 500 rather than dropping the socket
            logger.exception("sandbox: unhandled error on %s %s", self.command, path)
            if not self._responded:
                self._send_json(500, {"message": "internal error"}, close=True)
            else:
                self.close_connection = True

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = _dispatch

    def _route(self, path: str) -> None:
        methods = ROUTES.get(path)
        if methods is None:
            self._count_if_api(path)
            self._read_body()
            raise _HttpError(404, f"no such endpoint: {path}")
        action = methods.get(self.command)
        if action is None:
            self._count_if_api(path)
            self._read_body()
            allow = ", ".join(sorted(methods))
            raise _HttpError(
                405, f"method {self.command} not allowed on {path}; use {allow}", headers=[("Allow", allow)]
            )
        endpoint = _ENDPOINT_OF.get(path)
        if endpoint is None:  # admin: never faulted, not counted
            status, payload = action(self, self._read_body())
            self._send_json(status, payload)
            return
        self.state._begin(endpoint)
        body = self._read_body()
        fault = self.state._take_fault(endpoint)
        if fault is not None and self._inject(fault, endpoint):
            return
        status, payload = action(self, body)
        self._send_json(status, payload)

    def _count_if_api(self, path: str) -> None:
        if not path.startswith("/admin/"):
            self.state._count_request()

    def _inject(self, fault: _Fault, endpoint: str) -> bool:
        """Apply a fault; True when the response has been dealt with (not served normally)."""
        logger.info("sandbox injecting fault %s on %s", fault.mode, endpoint)
        if fault.mode == "delay":
            if self.server.sandbox._stopping.wait(fault.delay):
                self.close_connection = True
                return True
            return False
        if fault.mode == "reset":
            self._reset_connection = True
            self.close_connection = True
            return True
        if fault.mode == "malformed_json":
            self._send(200, _MALFORMED[endpoint])
        elif fault.mode == "wrong_content_type":
            self._send(200, _HTML, content_type="text/html; charset=utf-8")
        else:
            headers = []
            if fault.retry_after is not None:
                ra = fault.retry_after
                headers.append(("Retry-After", ra if isinstance(ra, str) else str(math.ceil(ra))))
            self._send_json(
                fault.status, {"message": f"injected fault: HTTP {fault.status}"}, headers=headers
            )
        return True

    # -- API endpoints -------------------------------------------------------

    def _mint(self, body: bytes) -> tuple[int, Any]:
        _check_content_type(self.headers.get("Content-Type"))
        key_id, timestamp, signature = _fields(_json_object(body), _MINT_FIELDS)
        if not _UUID_RE.fullmatch(key_id):
            raise _HttpError(400, "field 'key_id' must be a UUID (8-4-4-4-12 hex digits)")
        try:
            return 200, self.state.mint(key_id, timestamp, signature)
        except Unauthorized as e:
            logger.info("sandbox refused mint for key %s: %s", key_id, e)
            self.state.note_refusal(str(e))
            raise _refused(e) from None

    def _refresh(self, body: bytes) -> tuple[int, Any]:
        _check_content_type(self.headers.get("Content-Type"))
        (token,) = _fields(_json_object(body), _REFRESH_FIELDS)
        try:
            return 200, self.state.refresh(token)
        except Unauthorized as e:
            logger.info("sandbox refused refresh: %s", e)
            self.state.note_refusal(str(e))
            raise _refused(e) from None

    def _jwks(self, body: bytes) -> tuple[int, Any]:
        return 200, self.state.jwks()

    # -- admin ---------------------------------------------------------------

    def _admin_body(self, body: bytes) -> dict[str, Any]:
        _check_content_type(self.headers.get("Content-Type"))
        return _json_object(body)

    def _admin_keys(self, body: bytes) -> tuple[int, Any]:
        pem = self._admin_body(body).get("public_key_pem")
        if not isinstance(pem, str):
            raise _HttpError(400, "field 'public_key_pem' must be a string")
        try:
            return 201, {"key_id": self.state.register_key(pem)}
        except ValueError as e:
            raise _HttpError(400, str(e)) from None

    def _admin_revoke(self, body: bytes) -> tuple[int, Any]:
        obj = self._admin_body(body)
        key_id = obj.get("key_id")
        what = obj.get("what", "refresh")
        if key_id is not None and not isinstance(key_id, str):
            raise _HttpError(400, "field 'key_id' must be a string")
        try:
            if what == "refresh":
                return 200, {"revoked": self.state.revoke_refresh_tokens(key_id)}
            if what == "key":
                if key_id is None:
                    raise _HttpError(400, "revoking a key needs 'key_id'")
                self.state.revoke_key(key_id)
                return 200, {"revoked": 1}
        except KeyError:
            raise _HttpError(404, f"unknown key_id {key_id}") from None
        raise _HttpError(400, "field 'what' must be 'refresh' or 'key'")

    def _admin_clock_get(self, body: bytes) -> tuple[int, Any]:
        return 200, {"offset": self.state.clock_offset(), "now": self.state.now()}

    def _admin_clock_set(self, body: bytes) -> tuple[int, Any]:
        offset: Any = self._admin_body(body).get("offset")
        if not _is_number(offset):
            raise _HttpError(400, "field 'offset' must be a number of seconds")
        self.state.set_clock_offset(offset)
        return self._admin_clock_get(b"")

    def _admin_faults_get(self, body: bytes) -> tuple[int, Any]:
        return 200, {"faults": self.state.faults()}

    def _admin_faults_set(self, body: bytes) -> tuple[int, Any]:
        try:
            self.state.set_faults(**self._admin_body(body))
        except ValueError as e:
            raise _HttpError(400, str(e)) from None
        return self._admin_faults_get(b"")

    def _admin_faults_clear(self, body: bytes) -> tuple[int, Any]:
        self.state.clear_faults()
        return 200, {"faults": None}

    def _admin_stats(self, body: bytes) -> tuple[int, Any]:
        return 200, self.state.stats()


ROUTES: dict[str, dict[str, Route]] = {
    MINT_PATH: {"POST": _Handler._mint},
    REFRESH_PATH: {"POST": _Handler._refresh},
    JWKS_PATH: {"GET": _Handler._jwks},
    "/admin/keys": {"POST": _Handler._admin_keys},
    "/admin/revoke": {"POST": _Handler._admin_revoke},
    "/admin/clock": {"GET": _Handler._admin_clock_get, "POST": _Handler._admin_clock_set},
    "/admin/faults": {
        "GET": _Handler._admin_faults_get,
        "POST": _Handler._admin_faults_set,
        "DELETE": _Handler._admin_faults_clear,
    },
    "/admin/stats": {"GET": _Handler._admin_stats},
}
_ENDPOINT_OF = {MINT_PATH: "mint", REFRESH_PATH: "refresh", JWKS_PATH: "jwks"}


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], sandbox: SandboxServer) -> None:
        self.sandbox = sandbox
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls getfqdn(), a reverse DNS lookup that can stall.
        TCPServer.server_bind(self)
        self.server_name = str(self.server_address[0])
        self.server_port = int(self.server_address[1])

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._conns_lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Drop open keep-alive connections so no handler outlives close()."""
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class SandboxServer:
    """The sandbox Auth API on a real socket; port 0 picks a free port."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, options: SandboxOptions | None = None) -> None:
        self.options = options or SandboxOptions()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._serving = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self._httpd = _HTTPServer((host, port), self)
        bound = str(self._httpd.server_address[0])
        if bound in ("0.0.0.0", ""):
            bound = "127.0.0.1"
        elif bound == "::":
            bound = "::1"
        if ":" in bound:
            bound = f"[{bound}]"
        self._origin = f"http://{bound}:{self._httpd.server_address[1]}"
        try:
            self.state = SandboxState(self.options, issuer=self.url)
        except BaseException:
            self._httpd.server_close()
            raise

    @property
    def origin(self) -> str:
        return self._origin

    @property
    def url(self) -> str:
        return self._origin + API_PREFIX

    @property
    def jwks_url(self) -> str:
        return self._origin + JWKS_PATH

    def _claim_serving(self) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("sandbox server is closed")
            if self._serving:
                raise RuntimeError("sandbox server is already serving")
            self._serving = True

    def start(self) -> SandboxServer:
        """Serve in a daemon thread; returns self so ``SandboxServer().start()`` chains."""
        self._claim_serving()
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"tm-sandbox-{self._httpd.server_address[1]}",
            daemon=True,
        )
        self._thread.start()
        logger.info("sandbox listening on %s", self.url)
        return self

    def serve_forever(self) -> None:
        """Serve in the calling thread until close() is called from elsewhere."""
        self._claim_serving()
        logger.info("sandbox listening on %s", self.url)
        self._httpd.serve_forever(poll_interval=0.2)

    def close(self) -> None:
        """Stop serving, close the listening socket and drop open connections. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            serving = self._serving
        self._stopping.set()
        if serving:
            self._httpd.shutdown()
        self._httpd.server_close()
        self._httpd.close_connections()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        logger.info("sandbox on %s closed", self._origin)

    def __enter__(self) -> SandboxServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------
# Client helpers


def admin(
    origin: str,
    path: str,
    body: dict[str, Any] | None = None,
    timeout: float = 5.0,
    *,
    method: str | None = None,
) -> dict[str, Any]:
    """Call an admin route (POST when ``body`` is given, else GET; ``method`` overrides).

    ``path`` is "/admin/stats" or just "stats". Raises ApiError on any failure.
    """
    if not path.startswith("/"):
        path = "/admin/" + path
    url = origin.rstrip("/") + path
    verb = method or ("POST" if body is not None else "GET")
    try:
        resp = requests.request(verb, url, json=body, timeout=timeout)
    except requests.RequestException as e:
        raise ApiError(f"sandbox admin {verb} {url}: {brief_transport_error(e)} "
                       "(is `tm-hsm-agent sandbox serve` running there?)") from e
    try:
        data = resp.json()
    except ValueError:
        data = None
    if resp.status_code >= 300:
        msg = data.get("message") if isinstance(data, dict) else None
        raise ApiError(
            f"sandbox admin {verb} {path} answered HTTP {resp.status_code}: {msg or resp.reason}",
            status=resp.status_code,
            server_message=msg,
        )
    if not isinstance(data, dict):
        raise ApiError(
            f"sandbox admin {verb} {path} did not answer with a JSON object", status=resp.status_code
        )
    return data


def register_key(origin: str, pem: str, timeout: float = 5.0) -> str:
    """Register a P-256 public key PEM with a running sandbox; returns the new key_id."""
    data = admin(origin, "/admin/keys", {"public_key_pem": pem}, timeout)
    key_id = data.get("key_id")
    if not isinstance(key_id, str):
        raise ApiError("sandbox did not return a key_id")
    return key_id

"""Auth API client: mint, refresh, JWKS; the server's clock; one place that classifies failures.

Time is judged on the server's clock: every response's ``Date`` header updates the
learned offset. The server accepts a mint timestamp within ±30 s of its own clock,
and its 401 does not say why, so skew is told apart by the ``Date`` header, never
by the message text: a refused mint whose timestamp was far from the server's
``Date`` is signed again once with a corrected timestamp.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from email.utils import parsedate_to_datetime
from functools import cached_property
from typing import Any

import requests

from tm_hsm_agent import jose
from tm_hsm_agent.errors import ApiError, ApiRejected, ApiTransient, TokenVerifyError

log = logging.getLogger(__name__)

SKEW_WINDOW = 30  # the seed: "within ±30s of server UTC time"
# Beyond this distance between our timestamp and the server's Date, a 401 is
# attributed to clock skew (Date has 1 s resolution, plus network latency).
SKEW_SUSPECT = 25.0
MAX_ERROR_BODY = 64 * 1024
NBF_LEEWAY = float(SKEW_WINDOW)  # the skew the API itself tolerates for our timestamps


class ServerClock:
    """Local time plus the offset learned from the server's ``Date`` headers."""

    def __init__(self) -> None:
        self.offset = 0.0
        self.known = False
        self._lock = threading.Lock()

    def now(self) -> float:
        return time.time() + self.offset

    def learn(self, date_header: str | None, received_at: float) -> float | None:
        """Update the offset from a ``Date`` header; returns the server time it names."""
        if not date_header:
            return None
        try:
            server = parsedate_to_datetime(date_header).timestamp()
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        # Date is truncated to the second: the true server time is in [server, server+1).
        with self._lock:
            self.offset = server + 0.5 - received_at
            self.known = True
        return server


@dataclass(frozen=True)
class TokenSet:
    access_token: str
    refresh_token: str
    token_type: str
    expires_at: float  # server clock, seconds since the epoch
    issued_at: float  # server clock when received
    key_id: str
    via: str  # "mint" | "refresh"
    answer: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)  # as received

    @property
    def lifetime(self) -> float:
        return max(self.expires_at - self.issued_at, 0.0)

    @cached_property  # read on every hand-out: the hot path
    def fingerprint(self) -> str:
        """A short, non-secret name for this token (for logs and the audit trail)."""
        return jose.b64url_encode(hashlib.sha256(self.access_token.encode()).digest()[:9])

    def __repr__(self) -> str:
        return (
            f"TokenSet({self.via}, key_id={self.key_id}, "
            f"expires_at={self.expires_at:.0f}, id={self.fingerprint})"
        )


def parse_expires_in(value: Any, server_now: float) -> float:
    """``expires_in`` -> absolute expiry on the server clock.

    The seed documents an RFC 3339 date-time ("2019-08-24T14:15:22Z"); a plain
    number of seconds (OAuth style) is tolerated.
    """
    if isinstance(value, bool):
        raise ValueError("expires_in is a boolean")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value <= 0:
            raise ValueError("expires_in seconds must be positive")
        return server_now + float(value)
    if not isinstance(value, str) or not value:
        raise ValueError("expires_in is missing")
    if value.isdigit():
        if int(value) <= 0:
            raise ValueError("expires_in seconds must be positive")
        return server_now + float(value)
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"expires_in {value!r} is not an RFC 3339 date-time") from None
    if parsed.tzinfo is None:
        raise ValueError(f"expires_in {value!r} has no time zone")
    return parsed.timestamp()


def classify(status: int, message: str, retry_after: float | None) -> ApiError:
    """The one place that decides what an HTTP failure means (see tests/test_auth.py table).

    5xx, 429 and 408 are transient: back off and retry. Any other 4xx is a rejection:
    the same request will not succeed by repeating it.
    """
    text = f"HTTP {status}: {message}" if message else f"HTTP {status}"
    if status >= 500 or status in (408, 429):
        return ApiTransient(text, status=status, server_message=message, retry_after=retry_after)
    return ApiRejected(text, status=status, server_message=message)


def brief_transport_error(err: requests.RequestException) -> str:
    """One readable clause for a transport failure (requests' own text runs to lines)."""
    text = str(err)
    for needle, brief in (
        ("Connection refused", "connection refused"),
        ("Name or service not known", "host name not found"),
        ("Temporary failure in name resolution", "host name lookup failed"),
        ("No route to host", "no route to host"),
        ("CERTIFICATE_VERIFY_FAILED", "TLS certificate not trusted"),
        ("Connection reset", "connection reset"),
        ("RemoteDisconnected", "connection closed without an answer"),
    ):
        if needle in text:
            return brief
    return f"{type(err).__name__}: {text[:160]}"


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        return max(parsedate_to_datetime(value).timestamp() - time.time(), 0.0)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


class AuthClient:
    def __init__(
        self,
        auth_url: str,
        jwks_url: str,
        *,
        timeout: float = 10.0,
        clock: ServerClock | None = None,
        session: requests.Session | None = None,
    ) -> None:
        self.auth_url = auth_url.rstrip("/")
        self.jwks_url = jwks_url
        self.timeout = timeout
        self.clock = clock or ServerClock()
        self.http = session or requests.Session()
        self.http.headers["User-Agent"] = "tm-hsm-agent/0.1"

    # -- transport -------------------------------------------------------------------

    def _request(self, method: str, url: str, body: Mapping[str, Any] | None) -> dict[str, Any]:
        what = f"{method} {url}"
        try:
            resp = self.http.request(method, url, json=body, timeout=self.timeout)
        except requests.Timeout as e:
            raise ApiTransient(f"{what}: no answer within {self.timeout:.0f}s") from e
        except requests.RequestException as e:
            raise ApiTransient(f"{what}: {brief_transport_error(e)}") from e
        self.clock.learn(resp.headers.get("Date"), time.time())
        log.debug("%s -> HTTP %d (server clock offset %+.1fs)", what, resp.status_code, self.clock.offset)
        try:
            content = resp.content
        except requests.RequestException as e:
            raise ApiTransient(f"{what}: connection broke mid-answer: {e}") from e
        if not 200 <= resp.status_code < 300:  # the seed says 200; any 2xx carries the answer
            message = ""
            try:
                data = resp.json() if len(content) <= MAX_ERROR_BODY else None
                if isinstance(data, dict) and isinstance(data.get("message"), str):
                    message = data["message"]
            except ValueError:
                message = ""
            err = classify(resp.status_code, message, _retry_after(resp.headers.get("Retry-After")))
            err.args = (f"{what}: {err}",)
            raise err
        ctype = resp.headers.get("Content-Type", "")
        if not ctype.split(";")[0].strip().lower().endswith("json"):
            raise ApiTransient(f"{what}: answer is {ctype or 'untyped'}, not JSON", status=200)
        try:
            data = resp.json()
        except ValueError as e:
            raise ApiTransient(f"{what}: answer is not valid JSON", status=200) from e
        if not isinstance(data, dict):
            raise ApiTransient(f"{what}: answer is not a JSON object", status=200)
        return data

    def _token_set(self, data: Mapping[str, Any], key_id: str, via: str) -> TokenSet:
        now = self.clock.now()
        try:
            access = data["access_token"]
            refresh = data["refresh_token"]
            if not isinstance(access, str) or not isinstance(refresh, str):
                raise ValueError("access_token and refresh_token must be strings")
            token_type = data.get("token_type")
            if not isinstance(token_type, str) or token_type.lower() != "bearer":
                raise ValueError(f"token_type is {token_type!r}, not Bearer")
            expires_at = parse_expires_in(data.get("expires_in"), now)
            claims = jose.decode_unverified(access).claims
        except (KeyError, ValueError) as e:
            raise ApiTransient(f"{via}: malformed token answer: {e}", status=200) from e
        exp = jose.numeric_date(claims.get("exp"))
        if exp is not None:
            expires_at = min(expires_at, exp)  # never trust expires_in past the JWT's own exp
        return TokenSet(access, refresh, "Bearer", expires_at, now, key_id, via, dict(data))

    # -- API -------------------------------------------------------------------------

    def mint(self, key_id: str, sign: Callable[[str, int], str]) -> TokenSet:
        """POST /api-key/token, signing ``{key_id}.{timestamp}`` via ``sign``.

        If the server refuses and its Date shows our timestamp was out of its window,
        re-sign a fresh timestamp on the corrected clock and try exactly once more.
        """
        url = f"{self.auth_url}/api-key/token"
        for attempt in (1, 2):
            timestamp = int(round(self.clock.now()))
            signature = sign(key_id, timestamp)
            body = {"key_id": key_id, "timestamp": timestamp, "signature": signature}
            try:
                data = self._request("POST", url, body)
            except ApiRejected as e:
                skew = abs(self.clock.now() - timestamp)
                if e.status == 401 and attempt == 1 and skew > SKEW_SUSPECT:
                    log.warning(
                        "mint refused with our timestamp %.0fs from the server's clock; "
                        "retrying once with a corrected timestamp", skew,
                    )
                    continue
                if e.status == 401:
                    e.args = (
                        f"{e.args[0]} (unknown, expired or revoked key_id {key_id}, "
                        "or a signature the server does not accept)",
                    )
                raise
            return self._token_set(data, key_id, "mint")
        raise AssertionError("unreachable")  # pragma: no cover

    def refresh(self, refresh_token: str, key_id: str) -> TokenSet:
        data = self._request("POST", f"{self.auth_url}/token/refresh", {"refresh_token": refresh_token})
        return self._token_set(data, key_id, "refresh")

    def jwks(self) -> dict[str, Any]:
        data = self._request("GET", self.jwks_url, None)
        if not isinstance(data.get("keys"), list):
            raise ApiTransient(f"GET {self.jwks_url}: no 'keys' list in the JWKS", status=200)
        return data


class JwksVerifier:
    """Verifies JWTs against the server's JWKS, fetched once and again on an unknown kid."""

    def __init__(self, client: AuthClient) -> None:
        self.client = client
        self._jwks: dict[str, Any] | None = None
        self._lock = threading.Lock()

    def _fetch(self) -> dict[str, Any]:
        jwks = self.client.jwks()
        with self._lock:
            self._jwks = jwks
        return jwks

    def verify(self, token: str, *, check_exp: bool = True) -> jose.Jwt:
        jwks = self._jwks if self._jwks is not None else self._fetch()
        try:
            return jose.verify_jwt(
                token,
                jwks,
                now=self.client.clock.now() if check_exp else None,
                # Our clock is the server's Date (1 s resolution, plus latency), and a
                # server may stamp Date from another clock than its tokens (a proxy): a
                # token we were just handed is not refused for an nbf a moment ahead.
                nbf_leeway=NBF_LEEWAY,
                refetch=self._fetch,
            )
        except ValueError as e:
            raise TokenVerifyError(f"token does not verify against {self.client.jwks_url}: {e}") from e

"""JOSE codecs: base64url, ES256 signature forms, JWKs and JWT verification.

ES256 (RFC 7518 §3.4) carries a signature as exactly 64 bytes: r and s, each a
32-byte big-endian integer. PKCS#11 modules return that raw form (CKM_ECDSA), but
some return the X9.62 DER ``SEQUENCE { INTEGER r, INTEGER s }``. The converters
here are strict: they accept only canonical DER and only 0 < r, s < n, and pad
r and s to 32 bytes *each* (asn1crypto's ``to_p1363`` pads both to the longer of
the two, which is wrong about once in 65,536 signatures).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

# Order of the P-256 group (FIPS 186-4 D.1.2.3).
P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
COORD_LEN = 32
RAW_LEN = 2 * COORD_LEN

_B64URL_RE = re.compile(r"[A-Za-z0-9_-]*")


def b64url_encode(data: bytes) -> str:
    """Base64url without padding (RFC 7515 §2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Strict base64url: no padding, no other alphabet, no non-zero spare bits.

    Accepting several spellings of one value would let a signature be "replayed"
    under a different string, so only the canonical spelling passes.
    """
    if not isinstance(text, str):
        raise ValueError("base64url value must be a string")
    if not _B64URL_RE.fullmatch(text):
        raise ValueError("invalid base64url: characters outside the URL-safe alphabet or padding")
    if len(text) % 4 == 1:
        raise ValueError("invalid base64url: impossible length")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except binascii.Error as e:
        raise ValueError(f"invalid base64url: {e}") from None
    if b64url_encode(data) != text:
        raise ValueError("invalid base64url: non-canonical encoding (spare bits set)")
    return data


# ---------------------------------------------------------------------------
# ES256 signature forms


def _der_length(buf: bytes, pos: int) -> tuple[int, int]:
    """Read a DER length at ``pos``; return (length, next position). Minimal forms only."""
    if pos >= len(buf):
        raise ValueError("DER: truncated before length")
    first = buf[pos]
    pos += 1
    if first < 0x80:
        return first, pos
    count = first & 0x7F
    if count == 0:
        raise ValueError("DER: indefinite length is not allowed")
    if count > 4:
        raise ValueError("DER: length field too long")
    if pos + count > len(buf):
        raise ValueError("DER: truncated length")
    raw = buf[pos : pos + count]
    if raw[0] == 0:
        raise ValueError("DER: length has a leading zero byte")
    length = int.from_bytes(raw, "big")
    if length < 0x80:
        raise ValueError("DER: long-form length used where the short form fits")
    return length, pos + count


def _der_integer(buf: bytes, pos: int, end: int, name: str) -> tuple[int, int]:
    if pos >= end or buf[pos] != 0x02:
        raise ValueError(f"DER: expected INTEGER for {name}")
    length, pos = _der_length(buf, pos + 1)
    if length == 0:
        raise ValueError(f"DER: empty INTEGER for {name}")
    if pos + length > end:
        raise ValueError(f"DER: INTEGER {name} overruns its SEQUENCE")
    body = buf[pos : pos + length]
    if body[0] & 0x80:
        raise ValueError(f"DER: {name} is negative")
    if length > 1 and body[0] == 0 and not body[1] & 0x80:
        raise ValueError(f"DER: {name} has a superfluous leading zero")
    return int.from_bytes(body, "big"), pos + length


def _check_scalar(value: int, name: str) -> None:
    if not 0 < value < P256_N:
        raise ValueError(f"{name} is outside [1, n-1] for P-256")


def der_to_raw(der: bytes) -> bytes:
    """Canonical DER ECDSA-Sig-Value -> 64-byte JOSE ``r||s``; ValueError on anything else."""
    if not isinstance(der, (bytes, bytearray, memoryview)):
        raise ValueError("signature must be bytes")
    der = bytes(der)
    if len(der) < 2 or der[0] != 0x30:
        raise ValueError("DER: expected a SEQUENCE")
    length, pos = _der_length(der, 1)
    end = pos + length
    if end != len(der):
        raise ValueError("DER: SEQUENCE length does not match the input (truncated or trailing bytes)")
    r, pos = _der_integer(der, pos, end, "r")
    s, pos = _der_integer(der, pos, end, "s")
    if pos != end:
        raise ValueError("DER: extra data inside the SEQUENCE")
    _check_scalar(r, "r")
    _check_scalar(s, "s")
    return r.to_bytes(COORD_LEN, "big") + s.to_bytes(COORD_LEN, "big")


def split_raw(raw: bytes) -> tuple[int, int]:
    """64-byte ``r||s`` -> (r, s), both checked to lie in [1, n-1]."""
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise ValueError("signature must be bytes")
    raw = bytes(raw)
    if len(raw) != RAW_LEN:
        raise ValueError(f"raw ES256 signature must be {RAW_LEN} bytes, got {len(raw)}")
    r = int.from_bytes(raw[:COORD_LEN], "big")
    s = int.from_bytes(raw[COORD_LEN:], "big")
    _check_scalar(r, "r")
    _check_scalar(s, "s")
    return r, s


def _der_int_body(value: int) -> bytes:
    body = value.to_bytes((value.bit_length() + 7) // 8 or 1, "big")
    return b"\x00" + body if body[0] & 0x80 else body


def _der_tlv(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:
        return bytes([tag, n]) + body
    nbytes = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(nbytes)]) + nbytes + body


def raw_to_der(raw: bytes) -> bytes:
    """64-byte JOSE ``r||s`` -> canonical DER ECDSA-Sig-Value; ValueError on bad input."""
    r, s = split_raw(raw)
    return _der_tlv(0x30, _der_tlv(0x02, _der_int_body(r)) + _der_tlv(0x02, _der_int_body(s)))


def normalize_signature(sig: bytes) -> bytes:
    """Whatever a token returned -> 64-byte ``r||s``. 64 bytes is raw; all else must be DER."""
    if not isinstance(sig, (bytes, bytearray, memoryview)):
        raise ValueError("signature must be bytes")
    sig = bytes(sig)
    if len(sig) == RAW_LEN:
        split_raw(sig)
        return bytes(sig)
    return der_to_raw(sig)


# ---------------------------------------------------------------------------
# Keys


def ec_point_from_ck(value: bytes) -> bytes:
    """CKA_EC_POINT -> uncompressed point ``04||X||Y``.

    PKCS#11 says the attribute is a DER OCTET STRING wrapping the point, but some
    modules (older SoftHSM, some HSMs) return the bare point. A bare uncompressed
    P-256 point is 65 bytes starting 0x04; the wrapped one is 67 bytes starting 04 41.
    """
    value = bytes(value)
    if len(value) == 67 and value[0] == 0x04 and value[1] == 0x41:
        value = value[2:]
    if len(value) != 65 or value[0] != 0x04:
        raise ValueError("CKA_EC_POINT is not an uncompressed P-256 point")
    return value


def public_key_from_point(point: bytes) -> ec.EllipticCurvePublicKey:
    """Uncompressed point -> key object; raises ValueError if the point is not on P-256."""
    return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)


def ec_jwk(key: ec.EllipticCurvePublicKey) -> dict[str, str]:
    nums = key.public_numbers()
    return {
        "kty": "EC",
        "crv": "P-256",
        "x": b64url_encode(nums.x.to_bytes(COORD_LEN, "big")),
        "y": b64url_encode(nums.y.to_bytes(COORD_LEN, "big")),
    }


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638 thumbprint (SHA-256, base64url) over the required members only."""
    required = {"EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n")}[jwk["kty"]]
    canon = json.dumps({k: jwk[k] for k in required}, separators=(",", ":"), sort_keys=True)
    return b64url_encode(hashlib.sha256(canon.encode("utf-8")).digest())


def verify_es256(key: ec.EllipticCurvePublicKey, message: bytes, raw: bytes) -> bool:
    """True iff the 64-byte raw signature verifies over ``message`` (hashed with SHA-256)."""
    try:
        der = raw_to_der(raw)
        key.verify(der, message, ec.ECDSA(hashes.SHA256()))
    except (ValueError, InvalidSignature):
        return False
    return True


# ---------------------------------------------------------------------------
# JWKS and JWT verification

SUPPORTED_ALGS = ("RS256", "ES256")
VerifyKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


# ROCA (CVE-2017-15361): moduli from the affected Infineon library are
# k*M + (65537^a mod M), so N mod p lies in the subgroup <65537> of (Z/pZ)* for every
# small prime p dividing M. A random modulus passes that test for all of these
# primes with negligible probability.
_ROCA_PRIMES = (3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73,
                79, 83, 89, 97, 101, 103, 107, 109, 113, 127, 131, 137, 139, 149, 151, 157,
                163, 167)


def _subgroup_65537(p: int) -> frozenset[int]:
    seen, x = set(), 1
    while x not in seen:
        seen.add(x)
        x = x * 65537 % p
    return frozenset(seen)


_ROCA_SUBGROUPS = tuple((p, _subgroup_65537(p)) for p in _ROCA_PRIMES)


def roca_vulnerable(n: int) -> bool:
    return all(n % p in group for p, group in _ROCA_SUBGROUPS)


def _b64_uint(text: Any, what: str) -> int:
    data = b64url_decode(text)
    if not data:
        raise ValueError(f"JWK {what} is empty")
    if data[0] == 0:
        # RFC 7518 §6.3.1: minimal octets. Two spellings of one key would have two thumbprints.
        raise ValueError(f"JWK {what} has a leading zero octet")
    return int.from_bytes(data, "big")


def key_from_jwk(jwk: Mapping[str, Any]) -> tuple[str, VerifyKey]:
    """A JWK usable for signature checks -> (alg, key). ValueError for anything else.

    Refuses keys marked for encryption (``use`` != sig, ``key_ops`` without verify),
    symmetric keys, and an ``alg`` that does not match the key type.
    """
    if not isinstance(jwk, Mapping):
        raise ValueError("JWK must be an object")
    if jwk.get("use", "sig") != "sig":
        raise ValueError("JWK is not a signature key (use)")
    ops = jwk.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        raise ValueError("JWK key_ops does not allow verify")
    kty = jwk.get("kty")
    alg = jwk.get("alg")
    if kty == "RSA":
        if alg not in (None, "RS256"):
            raise ValueError(f"unsupported alg {alg!r} for an RSA key")
        n = _b64_uint(jwk.get("n"), "n")
        e = _b64_uint(jwk.get("e"), "e")
        if n.bit_length() < 2048:
            raise ValueError("RSA key shorter than 2048 bits")
        if n % 2 == 0 or e % 2 == 0 or e < 3:
            raise ValueError("RSA modulus and exponent must be odd (exponent at least 3)")
        if roca_vulnerable(n):
            raise ValueError("RSA key has the ROCA weakness (CVE-2017-15361)")
        return "RS256", rsa.RSAPublicNumbers(e, n).public_key()
    if kty == "EC":
        if alg not in (None, "ES256") or jwk.get("crv") != "P-256":
            raise ValueError("only P-256 / ES256 EC keys are supported")
        x = b64url_decode(jwk.get("x"))  # type: ignore[arg-type]
        y = b64url_decode(jwk.get("y"))  # type: ignore[arg-type]
        if len(x) != COORD_LEN or len(y) != COORD_LEN:
            raise ValueError("EC JWK coordinates must be 32 bytes")
        return "ES256", public_key_from_point(b"\x04" + x + y)
    raise ValueError(f"unsupported JWK kty {kty!r}")


def _no_constants(name: str) -> Any:
    raise ValueError(f"JSON constant {name} is not allowed")


def _json_object(data: bytes, what: str) -> dict[str, Any]:
    """RFC 7515 JSON: UTF-8 (no BOM, no UTF-16/32 guessing), an object, bounded nesting."""
    try:
        text = data.decode("utf-8")
        if text.startswith("\ufeff"):
            raise ValueError("byte-order mark")
        value = json.loads(text, parse_constant=_no_constants)
    except RecursionError:  # nesting deep enough to exhaust the stack: not a JWT
        raise ValueError(f"JWT {what} is nested too deeply") from None
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ValueError(f"JWT {what} is not UTF-8 JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"JWT {what} must be a JSON object")
    return value


# A NumericDate beyond this is no date (and past 2**53 no longer exact as a float).
_MAX_NUMERIC_DATE = 2**53


def _finite_number(value: Any) -> TypeGuard[int | float]:
    """A usable NumericDate: int or float, finite, no bigger than a float holds exactly."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return abs(value) <= _MAX_NUMERIC_DATE  # math.isfinite(10**400) raises OverflowError
    return isinstance(value, float) and math.isfinite(value) and abs(value) <= _MAX_NUMERIC_DATE


def numeric_date(value: Any) -> float | None:
    """A claim such as ``exp`` as a float, or None when it is missing or not a usable number."""
    return float(value) if _finite_number(value) else None


@dataclass(frozen=True)
class Jwt:
    header: dict[str, Any]
    claims: dict[str, Any]
    signing_input: bytes
    signature: bytes


def decode_unverified(token: str) -> Jwt:
    """Split and decode a compact JWS. Checks structure only, not the signature."""
    if not isinstance(token, str):
        raise ValueError("JWT must be a string")
    parts = token.split(".")
    if len(parts) != 3:
        raise ValueError("JWT must have three dot-separated parts")
    header = _json_object(b64url_decode(parts[0]), "header")
    claims = _json_object(b64url_decode(parts[1]), "payload")
    return Jwt(header, claims, f"{parts[0]}.{parts[1]}".encode("ascii"), b64url_decode(parts[2]))


def _verify_with(alg: str, key: VerifyKey, jwt: Jwt) -> bool:
    try:
        if alg == "RS256" and isinstance(key, rsa.RSAPublicKey):
            key.verify(jwt.signature, jwt.signing_input, padding.PKCS1v15(), hashes.SHA256())
            return True
        if alg == "ES256" and isinstance(key, ec.EllipticCurvePublicKey):
            return verify_es256(key, jwt.signing_input, jwt.signature)
    except InvalidSignature:
        return False
    return False


def select_keys(jwks: Mapping[str, Any], kid: str | None) -> list[tuple[str, VerifyKey]]:
    """Usable keys from a JWKS matching ``kid`` (all usable keys when kid is None).

    A kid that names two keys is ambiguous and yields an error rather than a guess.
    A JWKS that gives its keys no ``kid`` at all (the published schema lists only kty, alg,
    n, e) cannot match one; its keys are then the candidates, since kid is only a hint
    (RFC 7515 §4.1.4). A key carrying a *different* kid never is.
    """
    keys = jwks.get("keys") if isinstance(jwks, Mapping) else None
    if not isinstance(keys, list):
        raise ValueError("JWKS has no 'keys' list")
    found: list[tuple[str, VerifyKey]] = []
    kids_seen: dict[str, int] = {}
    for jwk in keys:
        if isinstance(jwk, Mapping) and isinstance(jwk.get("kid"), str):
            kids_seen[jwk["kid"]] = kids_seen.get(jwk["kid"], 0) + 1
        if kid is not None and (not isinstance(jwk, Mapping) or jwk.get("kid") != kid):
            continue
        try:
            found.append(key_from_jwk(jwk))
        except ValueError:
            continue
    if kid is not None and kids_seen.get(kid, 0) > 1:
        raise ValueError(f"JWKS has more than one key with kid {kid!r}")
    if kid is not None and not found and not kids_seen:
        return select_keys(jwks, None)
    return found


def verify_jwt(
    token: str,
    jwks: Mapping[str, Any],
    *,
    now: float | None = None,
    leeway: float = 0.0,
    nbf_leeway: float | None = None,
    refetch: Callable[[], Mapping[str, Any]] | None = None,
) -> Jwt:
    """Verify a compact JWS against a JWKS (RS256 or ES256, key chosen by ``kid``).

    On an unknown ``kid`` the JWKS is fetched again once through ``refetch`` (keys
    rotate). With ``now`` given, ``exp`` is required and checked (``leeway`` past it),
    and ``nbf`` too (``nbf_leeway`` before it; ``leeway`` when not given).
    Raises ValueError with the reason on any failure.
    """
    nbf_leeway = leeway if nbf_leeway is None else nbf_leeway
    for name, value in (("now", now), ("leeway", leeway), ("nbf_leeway", nbf_leeway)):
        if value is not None and not _finite_number(value):
            raise ValueError(f"{name} must be a finite number")  # nan/inf would pass any token
    jwt = decode_unverified(token)
    alg = jwt.header.get("alg")
    if alg not in SUPPORTED_ALGS:
        raise ValueError(f"JWT alg {alg!r} is not accepted (only RS256, ES256)")
    if "crit" in jwt.header:
        raise ValueError("JWT carries critical header parameters this verifier does not know")
    kid = jwt.header.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise ValueError("JWT kid must be a string")
    candidates = [(a, k) for a, k in select_keys(jwks, kid) if a == alg]
    if not candidates and kid is not None and refetch is not None:
        candidates = [(a, k) for a, k in select_keys(refetch(), kid) if a == alg]
    if not candidates:
        raise ValueError(f"no {alg} key with kid {kid!r} in the JWKS")
    if not any(_verify_with(alg, key, jwt) for _, key in candidates):
        raise ValueError("JWT signature does not verify")
    if now is not None:
        exp = jwt.claims.get("exp")
        if not _finite_number(exp):  # 1e400 parses as inf: a token that never expires
            raise ValueError("JWT has no finite numeric exp claim")
        if now >= exp + leeway:
            raise ValueError("JWT has expired")
        nbf = jwt.claims.get("nbf")
        if nbf is not None and not _finite_number(nbf):
            raise ValueError("JWT nbf claim is not a finite number")
        if _finite_number(nbf) and now + nbf_leeway < nbf:
            raise ValueError("JWT is not valid yet (nbf)")
    return jwt

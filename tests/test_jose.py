"""Tests for ``tm_hsm_agent.jose``: exact bytes first, every rejection, then public suites.

Expected values are hex literals worked out by hand (or taken from RFCs); where an
oracle is needed it is ``cryptography``'s own DER codec, never the code under test.

"Strict DER" below means: ``cryptography``'s ``decode_dss_signature`` accepts the
bytes, re-encoding (r, s) with ``encode_dss_signature`` gives back the identical
bytes, and 0 < r, s < n. That is exactly the set ``der_to_raw`` must accept.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import random
from collections.abc import Callable, Mapping
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.hazmat.primitives.serialization import load_der_public_key
from vectors import load, vectors_dir  # tests/ is on sys.path (conftest.py)

from tm_hsm_agent import jose

h = bytes.fromhex  # ignores spaces, so DER can be written tag by tag

# Order of the P-256 group (FIPS 186-4 D.1.2.3), written out independently of jose.P256_N.
N_HEX = "ffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632551"
NM1_HEX = "ffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632550"
N = int(N_HEX, 16)
ONE32 = "00" * 31 + "01"

SUPPORTED = ("RS256", "ES256")


def test_group_order_constant() -> None:
    assert jose.P256_N == N == int(NM1_HEX, 16) + 1


def strict_der_rs(sig: bytes) -> tuple[int, int] | None:
    """(r, s) if ``sig`` is strict DER (see module docstring), else None. The independent oracle."""
    try:
        r, s = decode_dss_signature(sig)
    except ValueError:
        return None
    if not (0 < r < N and 0 < s < N):
        return None
    if encode_dss_signature(r, s) != sig:
        return None
    return r, s


def _raw(r: int, s: int) -> bytes:
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _der_to_raw_or_none(sig: bytes) -> bytes | None:
    try:
        return jose.der_to_raw(sig)
    except ValueError:
        return None


# ---------------------------------------------------------------------------
# Exact bytes: (r as 32-byte hex, s as 32-byte hex, DER hex)

PINNED = [
    pytest.param(
        "0102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f20",
        "2122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f40",
        "30 44"
        " 02 20 0102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f20"
        " 02 20 2122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f40",
        id="r-s-32-bytes-top-bit-clear",
    ),
    pytest.param(
        "80" + "00" * 30 + "01",
        "7f" + "ff" * 31,
        "30 45  02 21 00 80" + "00" * 30 + "01  02 20 7f" + "ff" * 31,
        id="r-top-bit-set-gets-00-and-length-21",
    ),
    pytest.param(
        "11" * 32,
        "00" + "55" * 31,
        "30 43  02 20" + "11" * 32 + "  02 1f" + "55" * 31,
        id="s-31-bytes",
    ),
    pytest.param(
        "22" * 32,
        ONE32,
        "30 25  02 20" + "22" * 32 + "  02 01 01",
        id="s-is-1",
    ),
    pytest.param(
        "00 00 7f" + "33" * 29,
        "44" * 32,
        "30 42  02 1e 7f" + "33" * 29 + "  02 20" + "44" * 32,
        id="r-30-bytes",
    ),
    pytest.param(
        "00 c0" + "66" * 30,
        "00" * 31 + "80",
        "30 26  02 20 00 c0" + "66" * 30 + "  02 02 00 80",
        id="r-31-bytes-top-bit-set-s-0x80",
    ),
    pytest.param(
        "00" * 16 + "0f" * 16,
        "00 00 80" + "aa" * 29,
        "30 33  02 10" + "0f" * 16 + "  02 1f 00 80" + "aa" * 29,
        id="both-short",
    ),
    pytest.param(ONE32, ONE32, "30 06  02 01 01  02 01 01", id="r-1-s-1"),
    pytest.param("00" * 31 + "7f", "00" * 31 + "80", "30 07  02 01 7f  02 02 00 80", id="sign-byte-7f-vs-80"),
    pytest.param(
        "00" * 31 + "ff", "00" * 30 + "01 00", "30 08  02 02 00 ff  02 02 01 00", id="sign-byte-ff-vs-0100"
    ),
    pytest.param(
        NM1_HEX,
        NM1_HEX,
        "30 46  02 21 00" + NM1_HEX + "  02 21 00" + NM1_HEX,
        id="r-s-n-minus-1",
    ),
    pytest.param(
        # The asn1crypto to_p1363 trap: 33-byte r, 31-byte s; each must be padded to 32 on its own.
        "fe" + "00" * 31,
        "00" + "01" * 31,
        "30 44  02 21 00 fe" + "00" * 31 + "  02 1f" + "01" * 31,
        id="r-33-s-31-pad-each-to-32",
    ),
]


@pytest.mark.parametrize(("r_hex", "s_hex", "der_hex"), PINNED)
def test_pinned_conversions(r_hex: str, s_hex: str, der_hex: str) -> None:
    raw, der = h(r_hex) + h(s_hex), h(der_hex)
    assert len(raw) == 64
    assert encode_dss_signature(int(r_hex.replace(" ", ""), 16), int(s_hex.replace(" ", ""), 16)) == der
    assert jose.der_to_raw(der) == raw
    assert jose.raw_to_der(raw) == der
    assert jose.split_raw(raw) == (int.from_bytes(h(r_hex), "big"), int.from_bytes(h(s_hex), "big"))
    assert jose.der_to_raw(jose.raw_to_der(raw)) == raw
    assert jose.raw_to_der(jose.der_to_raw(der)) == der
    assert jose.normalize_signature(der) == raw
    assert jose.normalize_signature(raw) == raw
    assert type(jose.der_to_raw(bytearray(der))) is bytes  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# Every way der_to_raw must say no

R32 = "02 20" + "11" * 32
S32 = "02 20" + "22" * 32

DER_REJECTS = [
    pytest.param("", id="empty"),
    pytest.param("30", id="tag-only"),
    pytest.param("31 06 02 01 01 02 01 01", id="outer-tag-set-31"),
    pytest.param("a0 06 02 01 01 02 01 01", id="outer-tag-context-a0"),
    pytest.param("02 01 01", id="bare-integer"),
    pytest.param("04 08 30 06 02 01 01 02 01 01", id="octet-string-wrapped"),
    pytest.param("11" * 64, id="raw-64-bytes-not-der"),
    pytest.param("30 80 02 01 01 02 01 01 00 00", id="indefinite-length-80"),
    pytest.param("30 80 02 01 01 02 01 01", id="indefinite-length-no-eoc"),
    pytest.param("30 81 44" + R32 + S32, id="long-form-81-44-where-short-fits"),
    pytest.param("30 81 06 02 01 01 02 01 01", id="long-form-81-06-where-short-fits"),
    pytest.param("30 82 00 44" + R32 + S32, id="length-leading-zero-82-00-44"),
    pytest.param("30 82 00 06 02 01 01 02 01 01", id="length-leading-zero-82-00-06"),
    pytest.param("30 85 00 00 00 00 06 02 01 01 02 01 01", id="length-of-length-5"),
    pytest.param("30 84 ff ff ff ff 02 01 01 02 01 01", id="length-2-32-minus-1"),
    pytest.param("30 81", id="truncated-in-long-length"),
    pytest.param("30 07 02 01 01 02 01 01", id="truncated-seq-says-7-has-6"),
    pytest.param("30 06 02 01 01 02 01", id="truncated-last-byte"),
    pytest.param("30 44" + R32 + S32[:-2], id="truncated-full-size"),
    pytest.param("30 06 02 01 01 02 01 01 00", id="trailing-00-after-sequence"),
    pytest.param("30 06 02 01 01 02 01 01 30 00", id="trailing-sequence-after-sequence"),
    pytest.param("30 44" + R32 + S32 + "00", id="trailing-00-full-size"),
    pytest.param("30 05 02 01 01 02 01 01", id="seq-length-one-short"),
    pytest.param("30 09 02 01 01 02 01 01 02 01 01", id="extra-integer-inside"),
    pytest.param("30 08 02 01 01 02 01 01 05 00", id="extra-null-inside"),
    pytest.param("30 07 02 01 01 02 01 01 00", id="extra-byte-inside"),
    pytest.param("30 03 02 01 01", id="only-r"),
    pytest.param("30 00", id="empty-sequence"),
    pytest.param("30 07 02 02 00 01 02 01 01", id="r-superfluous-leading-00"),
    pytest.param("30 07 02 01 01 02 02 00 01", id="s-superfluous-leading-00"),
    pytest.param("30 08 02 03 00 00 80 02 01 01", id="r-two-leading-00-before-high-bit"),
    pytest.param("30 45 02 21 00" + "11" * 32 + S32, id="r-32-bytes-with-needless-00"),
    pytest.param("30 06 02 01 81 02 01 01", id="r-negative"),
    pytest.param("30 06 02 01 01 02 01 ff", id="s-negative"),
    pytest.param("30 44 02 20 80" + "00" * 30 + "01" + S32, id="r-negative-full-size-missing-00"),
    pytest.param("30 44" + R32 + "02 20" + NM1_HEX, id="s-n-minus-1-missing-00-is-negative"),
    pytest.param("30 05 02 00 02 01 01", id="r-zero-length"),
    pytest.param("30 05 02 01 01 02 00", id="s-zero-length"),
    pytest.param("30 06 03 01 01 02 01 01", id="r-tag-03-bit-string"),
    pytest.param("30 06 04 01 01 02 01 01", id="r-tag-04-octet-string"),
    pytest.param("30 06 02 01 01 03 01 01", id="s-tag-03-bit-string"),
    pytest.param("30 06 02 01 01 04 01 01", id="s-tag-04-octet-string"),
    pytest.param("30 05 05 00 02 01 01", id="r-tag-05-null"),
    pytest.param("30 08 22 03 02 01 01 02 01 01", id="r-constructed-integer-22"),
    pytest.param("30 0a 30 03 02 01 01 30 03 02 01 01", id="integers-wrapped-in-sequences"),
    pytest.param("30 07 02 81 01 01 02 01 01", id="r-long-form-length"),
    pytest.param("30 06 02 01 01 02 02 01", id="s-overruns-sequence"),
    pytest.param("30 06 02 05 01 02 01 01", id="r-overruns-sequence"),
    pytest.param("30 06 02 01 00 02 01 01", id="r-zero"),
    pytest.param("30 06 02 01 01 02 01 00", id="s-zero"),
    pytest.param("30 06 02 01 00 02 01 00", id="r-s-zero"),
    pytest.param("30 26 02 21 00" + N_HEX + "02 01 01", id="r-equals-n"),
    pytest.param("30 26 02 01 01 02 21 00" + N_HEX, id="s-equals-n"),
    pytest.param("30 46 02 21 00" + N_HEX + "02 21 00" + N_HEX, id="r-s-equal-n"),
    pytest.param("30 26 02 21 00" + "ff" * 32 + "02 01 01", id="r-2-256-minus-1"),
    pytest.param("30 26 02 21 01" + "00" * 32 + "02 01 01", id="r-2-256"),
    pytest.param("30 27 02 22 01" + "00" * 33 + "02 01 01", id="r-2-264"),
    pytest.param("30 26 02 01 01 02 21 01" + "00" * 32, id="s-2-256"),
    pytest.param("30 26 02 21 01" + NM1_HEX + "02 01 01", id="r-n-minus-1-plus-2-256"),
]


@pytest.mark.parametrize("der_hex", DER_REJECTS)
def test_der_to_raw_rejects(der_hex: str) -> None:
    der = h(der_hex)
    assert strict_der_rs(der) is None  # the oracle agrees this is not strict DER
    with pytest.raises(ValueError):
        jose.der_to_raw(der)
    with pytest.raises(ValueError):
        jose.der_to_raw(bytearray(der))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "value",
    [None, "3006020101020101", 0x3006020101020101, [0x30, 6, 2, 1, 1, 2, 1, 1], 1.5],
    ids=["none", "str", "int", "list", "float"],
)
def test_der_to_raw_rejects_non_bytes(value: Any) -> None:
    with pytest.raises(ValueError):
        jose.der_to_raw(value)


# ---------------------------------------------------------------------------
# raw_to_der / split_raw

RAW_REJECTS = [
    pytest.param("", id="0-bytes"),
    pytest.param("11" * 63, id="63-bytes"),
    pytest.param("11" * 65, id="65-bytes"),
    pytest.param("11" * 64 + "00", id="64-valid-plus-trailing-00"),
    pytest.param(ONE32 + ONE32 + "00", id="r1-s1-plus-trailing-00"),
    pytest.param("11" * 32 + "00" + "22" * 32, id="00-between-r-and-s"),
    pytest.param("00" + "11" * 64, id="64-valid-plus-leading-00"),
    pytest.param("11" * 32, id="32-bytes"),
    pytest.param("11" * 128, id="128-bytes"),
    pytest.param("00" * 32 + ONE32, id="r-zero"),
    pytest.param(ONE32 + "00" * 32, id="s-zero"),
    pytest.param("00" * 64, id="all-zero"),
    pytest.param(N_HEX + ONE32, id="r-equals-n"),
    pytest.param(ONE32 + N_HEX, id="s-equals-n"),
    pytest.param(N_HEX[:-1] + "2" + ONE32, id="r-n-plus-1"),
    pytest.param("ff" * 32 + ONE32, id="r-2-256-minus-1"),
    pytest.param("ff" * 64, id="all-ff"),
]


@pytest.mark.parametrize("raw_hex", RAW_REJECTS)
def test_raw_to_der_rejects(raw_hex: str) -> None:
    raw = h(raw_hex)
    for fn in (jose.raw_to_der, jose.split_raw, jose.normalize_signature):
        with pytest.raises(ValueError):
            fn(raw)
    with pytest.raises(ValueError):
        jose.raw_to_der(bytearray(raw))  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [None, "1" * 64, 7, [1] * 64], ids=["none", "str-64", "int", "list-64"])
def test_raw_to_der_rejects_non_bytes(value: Any) -> None:
    for fn in (jose.raw_to_der, jose.split_raw):
        with pytest.raises(ValueError):
            fn(value)


def test_normalize_signature_64_bytes_is_always_raw() -> None:
    # Documented rule: 64 bytes is raw. A strict-DER signature can also be 64 bytes long
    # (r and s of 29 bytes each); it is read as r||s, never as DER. Real signatures almost
    # never have both r and s below 2^232, so this ambiguity is theoretical.
    der64 = h("30 3e  02 1d" + "11" * 29 + "  02 1d" + "22" * 29)
    assert len(der64) == 64 and strict_der_rs(der64) is not None
    assert jose.normalize_signature(der64) == der64
    assert jose.der_to_raw(der64) == h("00 00 00" + "11" * 29 + "00 00 00" + "22" * 29)


# ---------------------------------------------------------------------------
# Differential and mutation testing against the strict-DER oracle


def _scalar(rng: random.Random) -> int:
    """A value in [1, n-1], biased to short encodings, sign-byte boundaries and n."""
    while True:
        pick = rng.random()
        if pick < 0.6:
            bits = rng.randint(1, 256)
            v = rng.getrandbits(bits) | (1 << (bits - 1))
        elif pick < 0.75:
            v = N - rng.randint(1, 1 << 24)
        elif pick < 0.9:
            v = (1 << (8 * rng.randint(1, 32) - 1)) + rng.randint(-2, 2)
        else:
            v = rng.randint(1, 300)
        if 0 < v < N:
            return v


def test_random_pairs_match_cryptography_encoding() -> None:
    rng = random.Random(20240607)
    lengths = set()
    for _ in range(20_000):
        r, s = _scalar(rng), _scalar(rng)
        der = encode_dss_signature(r, s)
        raw = _raw(r, s)
        lengths.add(len(der))
        assert jose.der_to_raw(der) == raw, der.hex()
        assert jose.raw_to_der(raw) == der, raw.hex()
        assert jose.split_raw(raw) == (r, s)
    assert min(lengths) == 8 and max(lengths) == 72  # the bias reaches both extremes


def _mutate(rng: random.Random, der: bytes) -> bytes:
    b = bytearray(der)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        # Half the edits land in the headers (first 6 bytes), where the parsing happens.
        pos = rng.randrange(min(len(b), 6)) if b and rng.random() < 0.5 else rng.randrange(len(b) + 1)
        value = rng.choice((0x00, 0x01, 0x02, 0x30, 0x7F, 0x80, 0x81, 0x82, 0xFF, rng.randrange(256)))
        op = rng.randrange(6)
        if op == 0 and pos < len(b):
            b[pos] ^= 1 << rng.randrange(8)
        elif op == 1 and pos < len(b):
            b[pos] = value
        elif op == 2:
            b.insert(pos, value)
        elif op == 3 and pos < len(b):
            del b[pos]
        elif op == 4:
            del b[pos:]
        elif op == 5 and b:
            b[pos:pos] = bytes([value]) * rng.randint(1, 3)
    return bytes(b)


def _disagreements(candidates: list[bytes]) -> list[str]:
    bad = []
    for sig in candidates:
        want = strict_der_rs(sig)
        got = _der_to_raw_or_none(sig)
        if (want is None) != (got is None) or (want is not None and got != _raw(*want)):
            bad.append(f"{sig.hex()}: oracle={want} der_to_raw={got.hex() if got else None}")
    return bad


def test_mutation_fuzz_matches_strict_der() -> None:
    rng = random.Random(7638)
    bases = [encode_dss_signature(_scalar(rng), _scalar(rng)) for _ in range(400)]
    mutants = [_mutate(rng, rng.choice(bases)) for _ in range(25_000)]
    accepted = sum(strict_der_rs(m) is not None for m in mutants)
    assert 100 < accepted < len(mutants) - 100  # both branches are exercised
    bad = _disagreements(mutants)
    assert not bad, "\n".join(bad[:20])


@pytest.mark.parametrize(
    "der_hex",
    [
        "30 06 02 01 01 02 01 01",
        "30 07 02 01 7f 02 02 00 80",
        "30 46 02 21 00" + NM1_HEX + "02 21 00" + NM1_HEX,
        "30 44 02 21 00 fe" + "00" * 31 + "02 1f" + "01" * 31,
    ],
    ids=["r1-s1", "7f-80", "n-1", "33-31"],
)
def test_every_single_byte_edit_matches_strict_der(der_hex: str) -> None:
    der = h(der_hex)
    cands = [der[:i] for i in range(len(der))]  # every truncation
    for i in range(len(der)):
        for v in range(256):
            cands.append(der[:i] + bytes([v]) + der[i + 1 :])  # every substitution
    for i in range(len(der) + 1):
        for v in (0x00, 0x01, 0x02, 0x30, 0x7F, 0x80, 0x81, 0xFF):
            cands.append(der[:i] + bytes([v]) + der[i:])  # insertions
        if i < len(der):
            cands.append(der[:i] + der[i + 1 :])  # deletions
    bad = _disagreements(cands)
    assert not bad, "\n".join(bad[:20])


# ---------------------------------------------------------------------------
# base64url


@pytest.mark.parametrize(
    ("data", "text"),
    [
        (b"", ""),
        (b"f", "Zg"),
        (b"fo", "Zm8"),
        (b"foo", "Zm9v"),
        (b"foob", "Zm9vYg"),
        (b"fooba", "Zm9vYmE"),
        (b"foobar", "Zm9vYmFy"),  # RFC 4648 §10, padding stripped
        (b"\xfb\xff", "-_8"),
        (b"\xfb\xff\xbf", "-_-_"),
        (b"\x00", "AA"),
        (b"\x00\x00", "AAA"),
        (b"\x03\xe0\xff", "A-D_"),
    ],
)
def test_b64url_known_values(data: bytes, text: str) -> None:
    assert jose.b64url_encode(data) == text
    assert jose.b64url_decode(text) == data


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("AA==", id="padding-2"),
        pytest.param("AAA=", id="padding-1"),
        pytest.param("Zm9v====", id="padding-on-full-quantum"),
        pytest.param("+_8", id="plus"),
        pytest.param("-/8", id="slash"),
        pytest.param("+/+/", id="standard-alphabet"),
        pytest.param("AB", id="spare-bits-AB-vs-AA"),
        pytest.param("AAB", id="spare-bits-AAB-vs-AAA"),
        pytest.param("QR", id="spare-bits-QR-vs-QQ"),
        pytest.param("Zm9vYh", id="spare-bits-Yh-vs-Yg"),
        pytest.param("A", id="len-mod-4-is-1"),
        pytest.param("AAAAA", id="len-5"),
        pytest.param("Zm9 v", id="space"),
        pytest.param("Zm9v\n", id="trailing-newline"),
        pytest.param(" Zm9v", id="leading-space"),
        pytest.param("Zm9v.", id="dot"),
        pytest.param("Zm9\u00e9", id="non-ascii"),
        pytest.param("\uff21\uff21", id="fullwidth-letters"),
    ],
)
def test_b64url_decode_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        jose.b64url_decode(text)


@pytest.mark.parametrize("value", [b"AA", None, 0], ids=["bytes", "none", "int"])
def test_b64url_decode_rejects_non_str(value: Any) -> None:
    with pytest.raises(ValueError):
        jose.b64url_decode(value)


def test_b64url_round_trip() -> None:
    rng = random.Random(4648)
    for n in range(0, 80):
        data = rng.randbytes(n)
        text = jose.b64url_encode(data)
        assert text == base64.urlsafe_b64encode(data).decode().rstrip("=")
        assert "=" not in text and len(text) % 4 != 1
        assert jose.b64url_decode(text) == data


# ---------------------------------------------------------------------------
# CKA_EC_POINT

# RFC 7515 A.3 public key, 04||X||Y (X, Y from the RFC's JWK x/y).
A3_X = "7fcdce2770f6c45d4183cbee6fdb4b7b580733357be9ef13bacf6e3c7bd15445"
A3_Y = "c7f144cd1bbd9b7e872cdfedb9eeb9f4b3695d6ea90b24ad8a4623288588e5ad"
A3_POINT = "04" + A3_X + A3_Y
A3_D = "8e9b109e719098bf980487df1f5d77e9cb29606ebed2263b5f57c213df84f4b2"


@pytest.mark.parametrize("value_hex", [A3_POINT, "04 41" + A3_POINT], ids=["raw-65", "wrapped-67"])
def test_ec_point_from_ck_accepts(value_hex: str) -> None:
    assert jose.ec_point_from_ck(h(value_hex)) == h(A3_POINT)
    key = jose.public_key_from_point(jose.ec_point_from_ck(h(value_hex)))
    assert key.public_numbers().x == int(A3_X, 16)
    assert key.public_numbers().y == int(A3_Y, 16)


@pytest.mark.parametrize(
    "value_hex",
    [
        pytest.param("", id="empty"),
        pytest.param("03" + A3_X, id="compressed-33"),
        pytest.param("04 21 03" + A3_X, id="wrapped-compressed-35"),
        pytest.param(A3_X + A3_Y, id="no-04-prefix-64"),
        pytest.param("02" + A3_X + A3_Y, id="65-wrong-prefix"),
        pytest.param("06" + A3_X + A3_Y, id="65-hybrid-prefix"),
        pytest.param(A3_POINT + "00", id="66-bytes"),
        pytest.param("04 41 05" + A3_X + A3_Y, id="wrapped-67-bad-inner-prefix"),
        pytest.param("04 42" + A3_POINT, id="wrapped-67-bad-length"),
        pytest.param("03 41" + A3_POINT, id="wrapped-67-bad-tag"),
        pytest.param("04 81 41" + A3_POINT, id="wrapped-68-long-form-length"),
        pytest.param("04 41" + A3_POINT + "00", id="wrapped-68-trailing"),
        pytest.param("04" + "00" * 96, id="p384-sized"),
    ],
)
def test_ec_point_from_ck_rejects(value_hex: str) -> None:
    with pytest.raises(ValueError):
        jose.ec_point_from_ck(h(value_hex))


def test_public_key_from_point_rejects_point_off_curve() -> None:
    with pytest.raises(ValueError):
        jose.public_key_from_point(h("04" + A3_X + A3_Y[:-1] + "e"))


# ---------------------------------------------------------------------------
# JWK thumbprint (RFC 7638)

RFC7638_N = (
    "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWK"
    "RXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMic"
    "AtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3"
    "XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
)


def test_jwk_thumbprint_rfc7638_example() -> None:
    jwk = {"kty": "RSA", "n": RFC7638_N, "e": "AQAB", "alg": "RS256", "kid": "2011-04-29"}
    assert jose.jwk_thumbprint(jwk) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def test_jwk_thumbprint_ec_uses_required_members_in_order() -> None:
    x = base64.urlsafe_b64encode(h(A3_X)).decode().rstrip("=")
    y = base64.urlsafe_b64encode(h(A3_Y)).decode().rstrip("=")
    canonical = '{"crv":"P-256","kty":"EC","x":"' + x + '","y":"' + y + '"}'
    want = base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()).decode().rstrip("=")
    jwk = {"y": y, "use": "sig", "kid": "k1", "x": x, "kty": "EC", "crv": "P-256", "d": "secret"}
    assert jose.jwk_thumbprint(jwk) == want
    key = jose.public_key_from_point(h(A3_POINT))
    assert jose.jwk_thumbprint(jose.ec_jwk(key)) == want
    assert jose.ec_jwk(key) == {"kty": "EC", "crv": "P-256", "x": x, "y": y}


# ---------------------------------------------------------------------------
# verify_jwt on tokens minted here


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _es256_sign(key: ec.EllipticCurvePrivateKey, signing_input: bytes) -> bytes:
    r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
    return _raw(r, s)


def _token(header: Mapping[str, Any], claims: Mapping[str, Any], sign: Callable[[bytes], bytes]) -> str:
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    return f"{signing_input}.{_b64(sign(signing_input.encode()))}"


A3_PRIVATE = ec.derive_private_key(int(A3_D, 16), ec.SECP256R1())
A3_PUBLIC_JWK = {
    "kty": "EC",
    "crv": "P-256",
    "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
    "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0",
}


def _es256(header: Mapping[str, Any], claims: Mapping[str, Any] | None = None) -> str:
    return _token(header, claims or {"sub": "x"}, lambda m: _es256_sign(A3_PRIVATE, m))


def _jwks(*kids: str | None) -> dict[str, Any]:
    return {"keys": [{**A3_PUBLIC_JWK, **({"kid": k} if k else {})} for k in kids]}


def test_verify_jwt_es256_ok_and_tampering() -> None:
    token = _es256({"alg": "ES256", "kid": "k1"}, {"sub": "x", "exp": 2000})
    jwt = jose.verify_jwt(token, _jwks("k1"), now=1999)
    assert jwt.claims == {"sub": "x", "exp": 2000} and jwt.header["kid"] == "k1"
    head, body, sig = token.split(".")
    raw = base64.urlsafe_b64decode(sig + "==")
    r, s = int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
    forged = {
        "der-signature": _b64(encode_dss_signature(r, s)),
        "bit-flip": _b64(raw[:-1] + bytes([raw[-1] ^ 1])),
        "r-s-swapped": _b64(raw[32:] + raw[:32]),
        "trailing-zero": _b64(raw + b"\0"),
        "truncated": _b64(raw[:-1]),
        "empty": "",
    }
    for name, bad_sig in forged.items():
        assert not _verify_jwt_ok(f"{head}.{body}.{bad_sig}", _jwks("k1")), name
    other = _es256({"alg": "ES256", "kid": "k1"}, {"sub": "y"}).split(".")[1]
    with pytest.raises(ValueError):
        jose.verify_jwt(f"{head}.{other}.{sig}", _jwks("k1"))


@pytest.mark.parametrize("alg", ["none", "HS256", "ES384", "ES512", "PS256", "RS384", "es256", None])
def test_verify_jwt_rejects_other_algs(alg: str | None) -> None:
    token = _es256({"alg": alg, "kid": "k1"})
    with pytest.raises(ValueError):
        jose.verify_jwt(token, _jwks("k1"))


@pytest.mark.parametrize(
    ("header", "jwks"),
    [
        pytest.param({"alg": "ES256", "kid": "k1", "crit": ["exp"]}, _jwks("k1"), id="crit"),
        pytest.param({"alg": "ES256", "kid": "k1"}, _jwks("k1", "k1"), id="duplicate-kid"),
        pytest.param({"alg": "ES256", "kid": "k2"}, _jwks("k1"), id="unknown-kid"),
        pytest.param({"alg": "ES256", "kid": 7}, _jwks("k1"), id="kid-not-string"),
        pytest.param({"alg": "RS256", "kid": "k1"}, _jwks("k1"), id="alg-does-not-match-key"),
        pytest.param({"alg": "ES256"}, {"keys": []}, id="empty-jwks"),
        pytest.param({"alg": "ES256"}, {}, id="no-keys-member"),
        pytest.param(
            {"alg": "ES256", "kid": "k1"},
            {"keys": [{**A3_PUBLIC_JWK, "kid": "k1", "use": "enc"}]},
            id="use-enc",
        ),
        pytest.param(
            {"alg": "ES256", "kid": "k1"},
            {"keys": [{**A3_PUBLIC_JWK, "kid": "k1", "key_ops": ["sign"]}]},
            id="key-ops-without-verify",
        ),
        pytest.param(
            {"alg": "ES256", "kid": "k1"},
            {"keys": [{**A3_PUBLIC_JWK, "kid": "k1", "alg": "ES384"}]},
            id="jwk-alg",
        ),
    ],
)
def test_verify_jwt_rejects(header: dict[str, Any], jwks: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        jose.verify_jwt(_es256(header), jwks)


@pytest.mark.parametrize(
    "token",
    ["", "a.b", "a.b.c.d", "e30.e30.", "W10.e30.AA", "e30.W10.AA", "eyJ.e30.AA"],
)
def test_verify_jwt_rejects_malformed(token: str) -> None:
    with pytest.raises(ValueError):
        jose.verify_jwt(token, _jwks(None))


def test_verify_jwt_kid_absent_tries_every_usable_key() -> None:
    other = jose.ec_jwk(ec.generate_private_key(ec.SECP256R1()).public_key())
    jose.verify_jwt(_es256({"alg": "ES256"}), {"keys": [other, A3_PUBLIC_JWK]})


def test_verify_jwt_refetches_once_on_unknown_kid() -> None:
    calls: list[int] = []

    def refetch_with(jwks: dict[str, Any]) -> Callable[[], dict[str, Any]]:
        def refetch() -> dict[str, Any]:
            calls.append(1)
            return jwks

        return refetch

    token = _es256({"alg": "ES256", "kid": "new"})
    jose.verify_jwt(token, _jwks("old"), refetch=refetch_with(_jwks("new")))
    assert len(calls) == 1
    calls.clear()
    with pytest.raises(ValueError):
        jose.verify_jwt(token, _jwks("old"), refetch=refetch_with(_jwks("older")))
    assert len(calls) == 1
    calls.clear()
    jose.verify_jwt(token, _jwks("new"), refetch=refetch_with(_jwks("new")))
    assert calls == []


def test_verify_jwt_time_claims() -> None:
    def check(claims: dict[str, Any], now: float, leeway: float = 0.0) -> None:
        jose.verify_jwt(_es256({"alg": "ES256"}, claims), _jwks(None), now=now, leeway=leeway)

    check({"exp": 100}, now=99.9)
    check({"exp": 100}, now=104, leeway=5)
    check({"exp": 100, "nbf": 50}, now=50)
    check({"exp": 100, "nbf": 50}, now=46, leeway=5)
    refused: list[tuple[dict[str, Any], float]] = [
        ({"exp": 100}, 100),
        ({"exp": 100}, 101),
        ({}, 0),
        ({"exp": "200"}, 0),
        ({"exp": True}, 0),
        ({"exp": None}, 0),
        ({"exp": 100, "nbf": 50}, 49),
    ]
    for claims, now in refused:
        with pytest.raises(ValueError):
            check(claims, now)
    jose.verify_jwt(_es256({"alg": "ES256"}, {}), _jwks(None))  # without now, exp is not required


def test_verify_jwt_kidless_jwks_keys_are_candidates_for_a_token_with_kid() -> None:
    # The published JWKS schema lists kty, alg, n, e: a JWKS may give no kid at all.
    token = _es256({"alg": "ES256", "kid": "k1"})
    assert jose.verify_jwt(token, _jwks(None)).header["kid"] == "k1"
    with pytest.raises(ValueError, match="no ES256 key with kid 'k1'"):  # another kid is no match
        jose.verify_jwt(token, {"keys": [{**A3_PUBLIC_JWK, "kid": "k2"}, A3_PUBLIC_JWK]})


def test_verify_jwt_nbf_leeway_is_separate_from_exp_leeway() -> None:
    token = _es256({"alg": "ES256"}, {"exp": 100, "nbf": 50})
    jose.verify_jwt(token, _jwks(None), now=21, nbf_leeway=30)
    with pytest.raises(ValueError, match="nbf"):
        jose.verify_jwt(token, _jwks(None), now=19, nbf_leeway=30)
    with pytest.raises(ValueError, match="expired"):  # nbf_leeway says nothing about exp
        jose.verify_jwt(token, _jwks(None), now=100, nbf_leeway=30)


@pytest.mark.parametrize("now, leeway", [
    (float("nan"), 0.0), (200.0, float("nan")), (200.0, float("inf")), (float("inf"), 0.0),
])
def test_verify_jwt_refuses_non_finite_time_parameters(now: float, leeway: float) -> None:
    with pytest.raises(ValueError, match="finite"):
        jose.verify_jwt(_es256({"alg": "ES256"}, {"exp": 100}), _jwks(None), now=now, leeway=leeway)


@pytest.mark.parametrize("claims", [{"exp": 10**400}, {"exp": 10**20}, {"exp": 100, "nbf": -(10**400)}])
def test_verify_jwt_huge_integer_dates_are_a_valueerror(claims: dict[str, Any]) -> None:
    # json parses 1 followed by 400 zeros as an int; math.isfinite on it overflows.
    with pytest.raises(ValueError, match="exp|nbf"):
        jose.verify_jwt(_es256({"alg": "ES256"}, claims), _jwks(None), now=50)
    assert jose.numeric_date(10**400) is None and jose.numeric_date(1e300) is None
    assert jose.numeric_date(1796325123) == 1796325123.0 and jose.numeric_date(True) is None


@pytest.mark.parametrize("header, payload", [
    (b'{"alg":"ES256"}', b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"),  # RecursionError
    (b'{"alg":"ES256"}', '{"sub":"x"}'.encode("utf-16")),
    (b'{"alg":"ES256"}', '{"sub":"x"}'.encode("utf-32-le")),
    (b"\xef\xbb\xbf" + b'{"alg":"ES256"}', b'{"sub":"x"}'),  # UTF-8 with a byte-order mark
    (b'{"alg":"ES256"}', b'{"sub":"\xff"}'),
    (b'{"alg":"ES256"}', b'{"n":NaN}'),
    (b'{"alg":"ES256"}', b"[1]"),
])
def test_decode_unverified_refuses_what_rfc7515_does_not_allow(header: bytes, payload: bytes) -> None:
    token = f"{_b64(header)}.{_b64(payload)}.{_b64(bytes(64))}"
    with pytest.raises(ValueError, match="JWT (header|payload)"):
        jose.decode_unverified(token)
    with pytest.raises(ValueError):
        jose.verify_jwt(token, _jwks(None), now=0)


@pytest.mark.parametrize("change, message", [
    (lambda j: {**j, "n": _b64(b"\x00" + jose.b64url_decode(j["n"]))}, "leading zero"),
    (lambda j: {**j, "e": _b64(b"\x00\x01\x00\x01")}, "leading zero"),
    (lambda j: {**j, "n": _b64((int.from_bytes(jose.b64url_decode(j["n"]), "big") ^ 1)
                             .to_bytes(256, "big"))}, "odd"),
    (lambda j: {**j, "e": _b64(b"\x01\x00\x00")}, "odd"),
    (lambda j: {**j, "e": _b64(b"\x01")}, "odd"),
])
def test_key_from_jwk_refuses_non_minimal_or_impossible_rsa_values(rsa_key, change, message) -> None:
    good = _rsa_jwk(rsa_key.public_key(), kid="r1")
    assert jose.key_from_jwk(good)[0] == "RS256"
    with pytest.raises(ValueError, match=message):
        jose.key_from_jwk(change(good))


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _rsa_jwk(key: rsa.RSAPublicKey, **extra: str) -> dict[str, str]:
    nums = key.public_numbers()
    n = nums.n.to_bytes((nums.n.bit_length() + 7) // 8, "big")
    return {"kty": "RSA", "n": _b64(n), "e": _b64(nums.e.to_bytes(3, "big")), **extra}


def test_verify_jwt_rs256(rsa_key: rsa.RSAPrivateKey) -> None:
    def sign(m: bytes) -> bytes:
        return rsa_key.sign(m, padding.PKCS1v15(), hashes.SHA256())

    jwks = {"keys": [_rsa_jwk(rsa_key.public_key(), kid="r1"), {**A3_PUBLIC_JWK, "kid": "e1"}]}
    token = _token({"alg": "RS256", "kid": "r1"}, {"sub": "x"}, sign)
    assert jose.verify_jwt(token, jwks).claims == {"sub": "x"}
    wrong_headers = [
        {"alg": "RS256", "kid": "e1"},
        {"alg": "ES256", "kid": "r1"},
        {"alg": "PS256", "kid": "r1"},
    ]
    for header in wrong_headers:
        with pytest.raises(ValueError):
            jose.verify_jwt(_token(header, {"sub": "x"}, sign), jwks)
    pss = _token(
        {"alg": "RS256", "kid": "r1"},
        {"sub": "x"},
        lambda m: rsa_key.sign(m, padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256()),
    )
    with pytest.raises(ValueError):
        jose.verify_jwt(pss, jwks)


def test_key_from_jwk_rejects_short_rsa() -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    with pytest.raises(ValueError):
        jose.key_from_jwk(_rsa_jwk(small))


# ---------------------------------------------------------------------------
# Defects found in review of jose.py, pinned so they stay fixed.


@pytest.mark.parametrize("exp_literal", ["NaN", "Infinity", "1e400"])
def test_verify_jwt_rejects_non_finite_exp(exp_literal: str) -> None:
    head = _b64(b'{"alg":"ES256"}')
    body = _b64(b'{"exp":' + exp_literal.encode() + b"}")
    sig = _b64(_es256_sign(A3_PRIVATE, f"{head}.{body}".encode()))
    with pytest.raises(ValueError):
        jose.verify_jwt(f"{head}.{body}.{sig}", _jwks(None), now=2e9)


def test_normalize_signature_rejects_non_bytes_with_value_error() -> None:
    with pytest.raises(ValueError):
        jose.normalize_signature(None)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# Shared vectors: locating them


def test_vectors_dir_override_and_skip(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.setenv("TM_VECTORS_DIR", str(tmp_path / "absent"))
    assert vectors_dir() == tmp_path / "absent"
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="public vectors not found at"):
        load("rfc7515_a3.json")
    monkeypatch.setenv("CI", "true")  # in CI a lost vector suite fails instead
    with pytest.raises(pytest.fail.Exception, match="in CI they must run"):
        load("rfc7515_a3.json")
    monkeypatch.delenv("TM_VECTORS_DIR")
    assert vectors_dir().parts[-2:] == ("shared", "vectors")


# ---------------------------------------------------------------------------
# RFC 7515 Appendix A.3


def test_rfc7515_a3() -> None:
    a3 = load("rfc7515_a3.json")
    jwk = {k: v for k, v in a3["jwk"].items() if k != "d"}
    assert jwk == A3_PUBLIC_JWK
    alg, key = jose.key_from_jwk(jwk)
    assert alg == "ES256" and isinstance(key, ec.EllipticCurvePublicKey)
    raw = jose.b64url_decode(a3["signature_b64u"])
    assert raw == h(a3["signature_raw_rs_hex"]) == h(a3["signature_r_hex"] + a3["signature_s_hex"])
    signing_input = a3["signing_input"].encode("ascii")
    assert a3["jws_compact"] == f"{a3['signing_input']}.{a3['signature_b64u']}"
    assert jose.verify_es256(key, signing_input, raw)
    assert not jose.verify_es256(key, signing_input + b"x", raw)
    assert not jose.verify_es256(key, signing_input, raw[:-1] + bytes([raw[-1] ^ 1]))

    der = h(a3["derived_not_in_rfc"]["signature_der_hex"])
    r, s = int(a3["signature_r_hex"], 16), int(a3["signature_s_hex"], 16)
    assert der == encode_dss_signature(r, s)  # the collector's DER, checked independently
    assert der[:6] == h("30 45 02 20 0e d1") and der[36:39] == h("02 21 00")  # s has its top bit set
    assert jose.raw_to_der(raw) == der
    assert jose.der_to_raw(der) == raw
    assert jose.normalize_signature(der) == raw

    point = h(a3["derived_not_in_rfc"]["public_key_uncompressed_hex"])
    assert point == h(A3_POINT)
    assert jose.ec_point_from_ck(b"\x04\x41" + point) == point
    assert jose.public_key_from_point(point).public_numbers() == key.public_numbers()

    jwt = jose.verify_jwt(a3["jws_compact"], {"keys": [jwk]})
    assert jwt.header == {"alg": "ES256"}
    assert jwt.claims == {"iss": "joe", "exp": 1300819380, "http://example.com/is_root": True}
    assert jwt.signing_input == signing_input and jwt.signature == raw
    jose.verify_jwt(a3["jws_compact"], {"keys": [jwk]}, now=1300819379)
    with pytest.raises(ValueError):
        jose.verify_jwt(a3["jws_compact"], {"keys": [jwk]}, now=1300819380)
    with pytest.raises(ValueError):  # a DER signature is not a JWS ES256 signature
        jose.verify_jwt(f"{a3['signing_input']}.{_b64(der)}", {"keys": [jwk]})


# ---------------------------------------------------------------------------
# Wycheproof


def _cases(data: Mapping[str, Any]) -> int:
    return sum(len(g["tests"]) for g in data["testGroups"])


def test_wycheproof_ecdsa_p256_sha256_der() -> None:
    data = load("wycheproof/ecdsa_secp256r1_sha256_test.json")
    assert _cases(data) == data["numberOfTests"]
    problems = []
    for group in data["testGroups"]:
        key = load_der_public_key(h(group["publicKeyDer"]))
        assert isinstance(key, ec.EllipticCurvePublicKey)
        point = jose.ec_point_from_ck(h(group["publicKey"]["uncompressed"]))
        assert jose.public_key_from_point(point).public_numbers() == key.public_numbers()
        for case in group["tests"]:
            tc, sig, msg, result = case["tcId"], h(case["sig"]), h(case["msg"]), case["result"]
            want = strict_der_rs(sig)
            raw = _der_to_raw_or_none(sig)
            if (want is None) != (raw is None):
                problems.append(f"tc {tc} ({case['comment']}): strict={want is not None} der_to_raw={raw!r}")
                continue
            if raw is None:
                if result == "valid":
                    problems.append(f"tc {tc}: valid signature is not strict DER")
                continue
            if want is not None and raw != _raw(*want):
                problems.append(f"tc {tc}: der_to_raw gave {raw.hex()}")
            if jose.raw_to_der(raw) != sig:
                problems.append(f"tc {tc}: raw_to_der does not give back the DER")
            if result != "acceptable" and jose.verify_es256(key, msg, raw) != (result == "valid"):
                problems.append(f"tc {tc} ({case['comment']}): verify_es256 disagrees with {result}")
    assert not problems, "\n".join(problems)


def test_wycheproof_ecdsa_p256_sha256_p1363() -> None:
    data = load("wycheproof/ecdsa_secp256r1_sha256_p1363_test.json")
    assert _cases(data) == data["numberOfTests"]
    problems = []
    for group in data["testGroups"]:
        key = load_der_public_key(h(group["publicKeyDer"]))
        assert isinstance(key, ec.EllipticCurvePublicKey)
        if "publicKeyJwk" in group:  # 9 of the 112 groups carry no JWK
            alg, jwk_key = jose.key_from_jwk(group["publicKeyJwk"])
            assert alg == "ES256" and jwk_key.public_numbers() == key.public_numbers()
        for case in group["tests"]:
            tc, sig, msg, valid = case["tcId"], h(case["sig"]), h(case["msg"]), case["result"] == "valid"
            if case["result"] != "acceptable" and jose.verify_es256(key, msg, sig) != valid:
                problems.append(f"tc {tc} ({case['comment']}): verify_es256 disagrees with {case['result']}")
            if len(sig) != 64:
                for fn in (jose.raw_to_der, jose.split_raw):
                    try:
                        fn(sig)
                        problems.append(f"tc {tc}: {fn.__name__} accepted {len(sig)} bytes")
                    except ValueError:
                        pass
                continue
            r, s = int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")
            in_range = 0 < r < N and 0 < s < N
            try:
                der = jose.raw_to_der(sig)
            except ValueError:
                if in_range:
                    problems.append(f"tc {tc}: raw_to_der rejected in-range r, s")
                continue
            if not in_range:
                problems.append(f"tc {tc}: raw_to_der accepted out-of-range r, s")
            elif der != encode_dss_signature(r, s) or jose.der_to_raw(der) != sig:
                problems.append(f"tc {tc}: DER round trip differs")
    assert not problems, "\n".join(problems)


PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})


def _public_set(jwk_or_set: Mapping[str, Any]) -> dict[str, Any]:
    """A JWKS from a JWK or JWK set, private members dropped (JWS groups hold one JWK)."""
    keys = jwk_or_set["keys"] if "keys" in jwk_or_set else [jwk_or_set]
    return {"keys": [{k: v for k, v in key.items() if k not in PRIVATE_MEMBERS} for key in keys]}


def _verify_jwt_ok(jws: Any, jwks: Mapping[str, Any]) -> bool:
    try:
        jose.verify_jwt(jws, jwks)
    except ValueError:
        return False
    return True


def _payload_is_json_object(jws: str) -> bool:
    try:
        return isinstance(json.loads(base64.urlsafe_b64decode(jws.split(".")[1] + "==")), dict)
    except (ValueError, IndexError):
        return False


def _jws_signature_verifies(jws: Any, jwks: Mapping[str, Any]) -> bool:
    """The JWS signature check alone (RS256/ES256), without verify_jwt's JWT rules.

    Uses jose's codecs, key selection and ES256 path; RS256 is checked with
    cryptography directly. The payload may be any bytes.
    """
    if not isinstance(jws, str) or jws.count(".") != 2:
        return False
    head, body, sig64 = jws.split(".")
    try:
        header = json.loads(jose.b64url_decode(head))
        jose.b64url_decode(body)
        sig = jose.b64url_decode(sig64)
        keys = jose.select_keys(jwks, header.get("kid")) if isinstance(header, dict) else []
    except ValueError:
        return False
    signing_input = f"{head}.{body}".encode("ascii")
    for alg, key in keys:
        if alg != header.get("alg"):
            continue
        if isinstance(key, ec.EllipticCurvePublicKey) and jose.verify_es256(key, signing_input, sig):
            return True
        if isinstance(key, rsa.RSAPublicKey):
            try:
                key.verify(sig, signing_input, padding.PKCS1v15(), hashes.SHA256())
                return True
            except InvalidSignature:
                pass
    return False


# Valid RS256/ES256 JWS whose payload is not a JSON object ("foo", "", 20 zero bytes, "a",
# "Test", bytes e0..ff, RFC 7520 Figure 13 prose). A JWT's payload must be a JSON object
# (RFC 7519 §7.2 step 10), so verify_jwt rejects these by design; their signatures are
# still checked through _jws_signature_verifies. The tests assert this list is exact.
NOT_A_JWT_JWS = {18, 33, 259, 260, 261, 262, 263, 345, 349, 378}
NOT_A_JWT_JWK = {5}
# tcId 349's private JWK has key_ops ["sign, verify"]: one string, not the op "verify", so
# key_from_jwk refuses it (documented: key_ops must include "verify"). The group's public
# JWK says key_ops ["verify"] and is accepted; only the stripped-private keyset differs.
KEY_OPS_NOT_VERIFY = {349}
# tcId 7 (ROCA-vulnerable RSA modulus) is checked by its own test below.
ROCA_TCID = 7


def test_wycheproof_json_web_signature() -> None:
    data = load("wycheproof/json_web_signature_test.json")
    assert _cases(data) == data["numberOfTests"]
    problems, not_jwt = [], set()
    for group in data["testGroups"]:
        alg = group["private"].get("alg")
        keysets = [("private-minus-secrets", _public_set(group["private"]))]
        if group.get("public"):
            keysets.append(("public", _public_set(group["public"])))
        for case in group["tests"]:
            tc, jws, valid = case["tcId"], case["jws"], case["result"] == "valid"
            if valid and alg in SUPPORTED and not _payload_is_json_object(jws):
                not_jwt.add(tc)
            for label, jwks in keysets:
                want = valid and alg in SUPPORTED and tc not in NOT_A_JWT_JWS
                if _verify_jwt_ok(jws, jwks) != want:
                    problems.append(f"tc {tc} {case['comment']} [{label}]: verify_jwt != {want}")
                # Groups whose key jose can use for RS256/ES256 (alg-less ones are the use/key_ops=enc keys).
                if alg in SUPPORTED or alg is None:
                    want = valid and not (tc in KEY_OPS_NOT_VERIFY and label == "private-minus-secrets")
                    if _jws_signature_verifies(jws, jwks) != want:
                        problems.append(f"tc {tc} {case['comment']} [{label}]: signature check != {want}")
    assert not_jwt == NOT_A_JWT_JWS
    assert not problems, "\n".join(problems)


def _signer_from_private_jwk(priv: Mapping[str, Any]) -> Callable[[bytes], bytes]:
    def num(name: str) -> int:
        return int.from_bytes(jose.b64url_decode(priv[name]), "big")

    if priv["alg"] == "ES256":
        return functools.partial(_es256_sign, ec.derive_private_key(num("d"), ec.SECP256R1()))
    pub = rsa.RSAPublicNumbers(num("e"), num("n"))
    key = rsa.RSAPrivateNumbers(num("p"), num("q"), num("d"), num("dp"), num("dq"), num("qi"), pub)
    return functools.partial(key.private_key().sign, padding=padding.PKCS1v15(), algorithm=hashes.SHA256())


def test_wycheproof_json_web_signature_keys_verify_real_jwts() -> None:
    """verify_jwt accepts a JWT (JSON payload) signed with the Wycheproof ES256/RS256 keys."""
    data = load("wycheproof/json_web_signature_test.json")
    seen = set()
    for group in data["testGroups"]:
        priv = group["private"]
        if group["comment"] not in ("es256", "rs256") or priv["kid"] not in ("kid-ec-sign", "kid-rsa-sign"):
            continue
        seen.add(priv["alg"])

        sign = _signer_from_private_jwk(priv)
        jwks = _public_set(priv)
        token = _token({"alg": priv["alg"], "kid": priv["kid"]}, {"sub": "wycheproof"}, sign)
        assert jose.verify_jwt(token, jwks).claims == {"sub": "wycheproof"}
        head, body, sig = token.split(".")
        tampered = _b64(jose.b64url_decode(sig)[:-1] + bytes([jose.b64url_decode(sig)[-1] ^ 1]))
        with pytest.raises(ValueError):
            jose.verify_jwt(f"{head}.{body}.{tampered}", jwks)
    assert seen == {"ES256", "RS256"}


def test_wycheproof_json_web_key() -> None:
    data = load("wycheproof/json_web_key_test.json")
    assert _cases(data) == data["numberOfTests"]
    problems, not_jwt = [], set()
    for group in data["testGroups"]:
        keysets = [("private", group["private"])]
        if group.get("public"):
            keysets.append(("public", group["public"]))
        for case in group["tests"]:
            tc, jws, result = case["tcId"], case["jws"], case["result"]
            alg = json.loads(base64.urlsafe_b64decode(jws.split(".")[0] + "=="))["alg"]
            if result == "valid" and alg in SUPPORTED and not _payload_is_json_object(jws):
                not_jwt.add(tc)
            for label, jwks in keysets:
                want = result == "valid" and alg in SUPPORTED and tc not in NOT_A_JWT_JWK
                if _verify_jwt_ok(jws, jwks) != want:
                    problems.append(f"tc {tc} {case['comment']} [{label}]: verify_jwt != {want}")
                if alg in SUPPORTED and tc != ROCA_TCID:
                    if _jws_signature_verifies(jws, jwks) != (result == "valid"):
                        problems.append(f"tc {tc} {case['comment']} [{label}]: signature check != {result}")
    assert not_jwt == NOT_A_JWT_JWK
    assert not problems, "\n".join(problems)


def test_wycheproof_json_web_key_roca_key_refused() -> None:
    data = load("wycheproof/json_web_key_test.json")
    group = next(g for g in data["testGroups"] if any(t["tcId"] == ROCA_TCID for t in g["tests"]))
    case = next(t for t in group["tests"] if t["tcId"] == ROCA_TCID)
    assert case["result"] == "invalid"
    assert not _jws_signature_verifies(case["jws"], group["public"])


def test_bytes_like_inputs_are_accepted_and_other_types_refused() -> None:
    der = bytes.fromhex("3006020101020102")  # r = 1, s = 2
    raw = (1).to_bytes(32, "big") + (2).to_bytes(32, "big")
    for kind in (bytes, bytearray, memoryview):
        assert jose.der_to_raw(kind(der)) == raw
        assert jose.raw_to_der(kind(raw)) == der
        assert jose.normalize_signature(kind(raw)) == raw
    for bad in ("3006020101020102", None, 12345, [0x30, 0x06]):
        with pytest.raises(ValueError):
            jose.der_to_raw(bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            jose.raw_to_der(bad)  # type: ignore[arg-type]

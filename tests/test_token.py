"""The token seam: PIN paths SoftHSM cannot show (a fake module), and the signer on top of
the real SoftHSMv2 token (raw, DER and faulty outputs)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pkcs11
import pytest
from conftest import KEY_LABEL, PIN
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from pkcs11 import Attribute, ObjectClass, TokenFlag

from tm_hsm_agent import jose
from tm_hsm_agent.audit import AuditLog
from tm_hsm_agent.errors import PinError, SignatureFormatError, TokenUnavailable
from tm_hsm_agent.pin import Pin, RejectedPins
from tm_hsm_agent.signer import Es256Signer, challenge
from tm_hsm_agent.token import KeyInfo, TokenHandle


class FakeToken:
    """Just enough of python-pkcs11's Token for the login path."""

    def __init__(self, flags: int, login_error: type[Exception] | None = None) -> None:
        self.flags = flags
        self.serial = b"FAKE0001"
        self.label = "fake"
        self.login_error = login_error
        self.logins = 0

    def open(self, user_pin=None, rw=False):
        if user_pin is not None:
            self.logins += 1
            if self.login_error is not None:
                raise self.login_error()
        raise AssertionError("login succeeded; the test stops here")


class FakeLib:
    def __init__(self, token: FakeToken) -> None:
        self.token = token

    def get_tokens(self, **kwargs):
        return iter([self.token])

    def reinitialize(self) -> None:
        pass


def _handle(token: FakeToken, tmp_path: Path, pin: str = "1234") -> TokenHandle:
    return TokenHandle(
        "fake.so", token_label="fake", key_label="k",
        pin_source=lambda: Pin(pin, "test"),
        rejected_pins=RejectedPins(tmp_path / "rejected.json"),
        lib_loader=lambda _: FakeLib(token),
    )


BASE = TokenFlag.USER_PIN_INITIALIZED | TokenFlag.LOGIN_REQUIRED | TokenFlag.TOKEN_INITIALIZED


def test_locked_pin_is_reported_without_a_login_attempt(tmp_path):
    token = FakeToken(BASE | TokenFlag.USER_PIN_LOCKED)
    with pytest.raises(PinError, match="locked"):
        _handle(token, tmp_path).key_info()
    assert token.logins == 0


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (TokenFlag.USER_PIN_FINAL_TRY, "one attempt left before the PIN locks"),
        (TokenFlag.USER_PIN_COUNT_LOW, "few attempts left"),
        (0, None),
    ],
)
def test_wrong_pin_reports_attempts_left_from_token_flags(tmp_path, flags, expected):
    token = FakeToken(BASE | flags, login_error=pkcs11.exceptions.PinIncorrect)
    with pytest.raises(PinError) as info:
        _handle(token, tmp_path).key_info()
    assert token.logins == 1
    assert info.value.attempts_left == expected
    if expected:
        assert expected in str(info.value)
    assert "1234" not in str(info.value)


def test_wrong_pin_is_never_presented_twice(tmp_path):
    token = FakeToken(BASE, login_error=pkcs11.exceptions.PinIncorrect)
    handle = _handle(token, tmp_path)
    with pytest.raises(PinError):
        handle.key_info()
    with pytest.raises(PinError):
        handle.key_info()  # same handle: sticky
    with pytest.raises(PinError, match="not presented again"):
        _handle(token, tmp_path).key_info()  # a restart: remembered on disk
    assert token.logins == 1
    with pytest.raises(PinError, match="refused the PIN"):
        _handle(token, tmp_path, pin="5678").key_info()  # a changed PIN source is tried
    assert token.logins == 2


def test_already_logged_in_counts_as_success(tmp_path):
    class Session:
        pass

    class Slot:
        def get_mechanisms(self):
            return {pkcs11.Mechanism.ECDSA}

    class AlreadyIn(FakeToken):
        slot = Slot()

        def open(self, user_pin=None, rw=False):
            if user_pin is not None:
                self.logins += 1
                raise pkcs11.exceptions.UserAlreadyLoggedIn()
            return Session()

    token = AlreadyIn(BASE)
    handle = _handle(token, tmp_path)
    session = handle._call(handle._guarded(handle._ensure))
    assert isinstance(session, Session) and token.logins == 1


def test_device_error_becomes_token_unavailable_and_reinitialises(tmp_path):
    reinits = []

    class Broken(FakeLib):
        def get_tokens(self, **kwargs):
            raise pkcs11.exceptions.DeviceError()

        def reinitialize(self) -> None:
            reinits.append(1)

    handle = TokenHandle("fake.so", token_label="x", key_label="k", pin_source=lambda: Pin("1", "t"),
                         lib_loader=lambda _: Broken(FakeToken(BASE)))
    with pytest.raises(TokenUnavailable):
        handle.key_info()
    assert handle.present is False
    with pytest.raises(TokenUnavailable):
        handle.key_info()
    assert reinits == [1]  # the second call finalised and initialised the module first


# -- the signer on the real token ---------------------------------------------------------


@pytest.fixture
def real_handle(softhsm, hsm_key):
    handle = TokenHandle(softhsm.module, token_label=softhsm.label, key_label=KEY_LABEL,
                         pin_source=lambda: Pin(PIN, "test"))
    yield handle
    handle.close()


def test_softhsm_signature_is_raw_and_verifies(real_handle, hsm_key):
    message = challenge("123e4567-e89b-12d3-a456-426614174000", 1700000000)
    assert message == b"123e4567-e89b-12d3-a456-426614174000.1700000000"
    produced, info = real_handle.sign(message)
    assert len(produced) == 64  # CKM_ECDSA gives raw r||s
    assert jose.verify_es256(info.public_key, message, produced)
    assert info.thumbprint == hsm_key.thumbprint


class WrappingToken:
    """Wraps the real token and changes what it returns, as some modules do."""

    def __init__(self, real: TokenHandle, transform) -> None:
        self.real = real
        self.transform = transform

    def sign(self, message: bytes) -> tuple[bytes, KeyInfo]:
        sig, info = self.real.sign(message)
        return self.transform(sig, message, info), info

    def key_info(self) -> KeyInfo:
        return self.real.key_info()


def test_signer_accepts_der_from_a_module(real_handle, tmp_path):
    audit = AuditLog(tmp_path / "audit.log")
    signer = Es256Signer(WrappingToken(real_handle, lambda sig, m, i: jose.raw_to_der(sig)), audit)
    sig = signer.sign_challenge("k", 1700000000)
    raw = jose.b64url_decode(sig)
    assert len(raw) == 64 and "=" not in sig
    assert jose.verify_es256(real_handle.key_info().public_key, challenge("k", 1700000000), raw)
    audit.close()


def test_signer_refuses_a_signature_that_does_not_verify(real_handle, tmp_path):
    audit = AuditLog(tmp_path / "audit.log")
    other = ec.generate_private_key(ec.SECP256R1())

    def wrong_key(sig, message, info):
        r, s = decode_dss_signature(other.sign(message, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    signer = Es256Signer(WrappingToken(real_handle, wrong_key), audit)
    with pytest.raises(SignatureFormatError, match="does not verify"):
        signer.sign_challenge("k", 1700000000)
    audit.close()
    assert '"outcome":"did-not-verify"' in (tmp_path / "audit.log").read_text()


@pytest.mark.parametrize("mangle", [lambda s: s[:63], lambda s: b"\x30\x00", lambda s: s + b"\x00"])
def test_signer_refuses_garbage_from_a_module(real_handle, tmp_path, mangle):
    audit = AuditLog(tmp_path / "audit.log")
    signer = Es256Signer(WrappingToken(real_handle, lambda sig, m, i: mangle(sig)), audit)
    with pytest.raises(SignatureFormatError):
        signer.sign_challenge("k", 1700000000)
    audit.close()


def test_hash_first_when_only_ckm_ecdsa_is_listed(real_handle):
    # SoftHSM 2.6 lists CKM_ECDSA but not CKM_ECDSA_SHA256: the handle must hash locally.
    real_handle.key_info()
    listed = real_handle._token.slot.get_mechanisms()
    assert real_handle._hashed_mech is (pkcs11.Mechanism.ECDSA_SHA256 in listed)
    message = b"abc"
    sig, info = real_handle.sign(message)
    # verifies as ECDSA over SHA-256(message), whichever mechanism was used
    assert jose.verify_es256(info.public_key, message, sig)
    assert not jose.verify_es256(info.public_key, hashlib.sha256(message).digest(), sig)


def test_generated_key_usage_cannot_be_widened_or_copied(softhsm, hsm_key):
    # The key is made sign-only; a logged-in session must not be able to change that later.
    lib = pkcs11.lib(softhsm.module)
    token = lib.get_token(token_label=softhsm.label)
    with token.open(user_pin=PIN, rw=True) as session:
        priv = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=KEY_LABEL)
        assert priv[Attribute.MODIFIABLE] is False and priv[Attribute.COPYABLE] is False
        for attribute in (Attribute.DERIVE, Attribute.DECRYPT, Attribute.SIGN_RECOVER):
            with pytest.raises(pkcs11.PKCS11Error):
                priv[attribute] = True
            assert priv[attribute] is False
        with pytest.raises(pkcs11.PKCS11Error):
            priv.copy({Attribute.LABEL: "copy"})
        assert not list(session.get_objects({Attribute.LABEL: "copy"}))


def test_keygen_falls_back_when_a_module_does_not_know_copyable(softhsm, hsm_key, tmp_path, monkeypatch):
    # Some modules predate PKCS#11 v2.40 (CKA_COPYABLE) and refuse the attribute; keygen
    # must still make a sign-only key there, not fail.
    from pkcs11._pkcs11 import LocalDomainParameters  # the class create_domain_parameters returns

    original = LocalDomainParameters.generate_keypair
    templates = []

    def strict_module(self, *args, private_template=None, **kwargs):
        templates.append(dict(private_template))
        if Attribute.COPYABLE in private_template:
            raise pkcs11.exceptions.AttributeTypeInvalid()
        return original(self, *args, private_template=private_template, **kwargs)

    monkeypatch.setattr(LocalDomainParameters, "generate_keypair", strict_module)
    handle = TokenHandle(softhsm.module, token_label=softhsm.label, key_label="tm-fallback-key",
                         pin_source=lambda: Pin(PIN, "test"), rw=True)
    try:
        info = handle.generate_key()
    finally:
        handle.close()
    assert info.label == "tm-fallback-key"
    assert [Attribute.COPYABLE in t for t in templates] == [True, False]
    assert templates[1][Attribute.SIGN] is True and templates[1][Attribute.DERIVE] is False

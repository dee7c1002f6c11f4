"""The PKCS#11 token: one self-healing session handle, every call under one lock and a deadline.

Hardware and protocol quirks this module absorbs:

* Slots are found by token label or serial, never by index: SoftHSM renumbers slots.
* SoftHSM 2.6 offers CKM_ECDSA but not CKM_ECDSA_SHA256, so we hash locally and
  use CKM_ECDSA unless the token lists the hashed mechanism.
* CKA_EC_POINT is a DER OCTET STRING per the spec, but some modules return the bare point.
* p11-kit's client module answers CKR_DEVICE_ERROR after its server comes back,
  until the module is finalised and initialised again; a re-login may then say
  CKR_USER_ALREADY_LOGGED_IN, which is success.
* A token can hang (a network HSM stuck mid-call). Calls run on one worker thread
  and the caller waits at most ``op_timeout``; a call that overruns is abandoned,
  and nothing else (certainly not C_Finalize) enters the module until it returns.
* A wrong PIN is presented once and remembered (see ``pin.py``): never retried.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pkcs11
from cryptography.hazmat.primitives.asymmetric import ec
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass, TokenFlag
from pkcs11.util.ec import encode_named_curve_parameters

from tm_hsm_agent import jose
from tm_hsm_agent.errors import (
    KeyExists,
    KeyNotFound,
    PinError,
    TokenError,
    TokenIdentityError,
    TokenUnavailable,
)
from tm_hsm_agent.paths import write_private
from tm_hsm_agent.pin import Pin, RejectedPins

log = logging.getLogger(__name__)
T = TypeVar("T")

P256_OID_PARAMS = encode_named_curve_parameters("secp256r1")


@dataclass(frozen=True)
class KeyInfo:
    public_key: ec.EllipticCurvePublicKey
    cka_id: bytes
    label: str
    token_serial: str
    token_label: str
    thumbprint: str


class _Worker:
    """One daemon thread running PKCS#11 calls in order.

    Not a ThreadPoolExecutor: its threads are joined at interpreter exit, so a call stuck
    in a hung module would keep the process from ever exiting on SIGTERM.
    """

    def __init__(self, name: str) -> None:
        self._queue: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]] | None]
        self._queue = queue.SimpleQueue()
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        future: Future[T] = Future()
        self._queue.put((future, fn, args))
        return future

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            future, fn, args = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - handed to the caller through the future
                future.set_exception(e)

    def shutdown(self) -> None:
        self._queue.put(None)


class IdentityPins:
    """Token serial and key fingerprint recorded at first use (trust on first use).

    A different token or key answering under the same label is refused: it may be
    a swapped or cloned device, and signing with it would fail server-side anyway.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def _load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise TokenError(f"cannot read the identity record {self.path}: {e}") from e
        return data if isinstance(data, dict) else {}

    def check(self, name: str, serial: str, thumbprint: str) -> None:
        data = self._load()
        seen = data.get(name)
        if seen is None:
            data[name] = {"serial": serial, "thumbprint": thumbprint, "since": time.time()}
            write_private(self.path, json.dumps(data, indent=1).encode())
            return
        if seen.get("serial") != serial or seen.get("thumbprint") != thumbprint:
            raise TokenIdentityError(
                f"{name}: expected token serial {seen.get('serial')} with key "
                f"{seen.get('thumbprint')}, found serial {serial} with key {thumbprint}; "
                f"refusing a different token or key. If the change is intended, "
                f"run `tm-hsm-agent identity reset`"
            )

    def reset(self, name: str) -> bool:
        data = self._load()
        if data.pop(name, None) is None:
            return False
        write_private(self.path, json.dumps(data, indent=1).encode())
        return True


def _attempts_left(flags: int) -> str | None:
    if flags & TokenFlag.USER_PIN_FINAL_TRY:
        return "one attempt left before the PIN locks"
    if flags & TokenFlag.USER_PIN_COUNT_LOW:
        return "few attempts left"
    return None


class TokenHandle:
    """One PKCS#11 session on one token, reopened on demand, used by one thread at a time."""

    def __init__(
        self,
        module: str,
        *,
        key_label: str,
        pin_source: Callable[[], Pin],
        token_label: str | None = None,
        token_serial: str | None = None,
        rejected_pins: RejectedPins | None = None,
        identity: IdentityPins | None = None,
        op_timeout: float = 5.0,
        probe_interval: float = 2.0,
        rw: bool = False,
        lib_loader: Callable[[str], Any] = pkcs11.lib,
    ) -> None:
        if not token_label and not token_serial:
            raise TokenError("select the token with TM_TOKEN_LABEL or TM_TOKEN_SERIAL")
        self.module = module
        self.token_label = token_label
        self.token_serial = token_serial
        self.key_label = key_label
        self._pin_source = pin_source
        self._rejected = rejected_pins
        self._identity = identity
        self.op_timeout = op_timeout
        self.probe_interval = probe_interval
        self._rw = rw
        self._lib_loader = lib_loader

        self._lock = threading.Lock()
        self._worker = _Worker("pkcs11")
        self._stuck: Future[Any] | None = None
        # Fields below are touched only on the worker thread.
        self._lib: Any = None
        self._needs_reinit = False
        self._session: Any = None
        self._token: Any = None
        self._priv: Any = None
        self._key: KeyInfo | None = None
        self._hashed_mech = False
        # Readable from any thread (status).
        self.present: bool | None = None
        self.last_error: str | None = None
        self._last_failure = 0.0
        self._pin_error: PinError | None = None

    @property
    def name(self) -> str:
        which = f"label '{self.token_label}'" if self.token_label else f"serial {self.token_serial}"
        return f"token {which}, key '{self.key_label}'"

    # -- running calls under the lock and a deadline --------------------------------

    def _call(self, fn: Callable[[], T], timeout: float | None = None) -> T:
        timeout = self.op_timeout if timeout is None else timeout
        if self._pin_error is not None:
            raise self._pin_error
        if not self._lock.acquire(timeout=timeout):
            raise TokenUnavailable(f"{self.name}: busy for more than {timeout:.0f}s")
        try:
            if self._stuck is not None and not self._stuck.done():
                raise TokenUnavailable(
                    f"{self.name}: a previous call is still inside the PKCS#11 module (hung)"
                )
            self._stuck = None
            future = self._worker.submit(fn)
            try:
                result = future.result(timeout=timeout)
            except FutureTimeout:
                self._stuck = future
                future.add_done_callback(self._after_hang)
                self._mark_absent(f"no answer within {timeout:.0f}s (token hung?)")
                raise TokenUnavailable(
                    f"{self.name}: the token did not answer within {timeout:.0f}s"
                ) from None
            except PinError as e:
                self._pin_error = e
                raise
            except TokenUnavailable as e:
                self._mark_absent(str(e))
                raise
            self.present = True
            self.last_error = None
            return result
        finally:
            self._lock.release()

    def _after_hang(self, _: Future[Any]) -> None:
        # Runs once the abandoned call finally returns: its session state is unknown.
        self._worker.submit(self._drop_session, True)

    def _mark_absent(self, why: str) -> None:
        self.present = False
        self.last_error = why
        self._last_failure = time.monotonic()

    # -- worker-thread internals ------------------------------------------------------

    def _drop_session(self, reinit: bool) -> None:
        session, self._session = self._session, None
        self._priv = None
        self._token = None
        if reinit:
            self._needs_reinit = True
        if session is not None:
            try:
                session.close()
            except pkcs11.PKCS11Error:
                pass  # the session is already gone with the device

    def _find_token(self) -> Any:
        if self._lib is None:
            try:
                self._lib = self._lib_loader(self.module)
            except pkcs11.PKCS11Error as e:
                raise TokenError(f"cannot load PKCS#11 module {self.module}: {e}") from e
        if self._needs_reinit:
            try:
                self._lib.reinitialize()
            except pkcs11.PKCS11Error as e:
                raise TokenUnavailable(f"{self.name}: module re-initialisation failed: {e!r}") from e
            self._needs_reinit = False
        kwargs: dict[str, Any] = {}
        if self.token_label:
            kwargs["token_label"] = self.token_label
        else:
            kwargs["token_serial"] = str(self.token_serial).encode()
        tokens = list(self._lib.get_tokens(**kwargs))
        if not tokens:
            # Some modules (p11-kit's client) fix their slot list at C_Initialize: a token
            # that comes back is only seen after finalising and initialising again.
            self._needs_reinit = True
            try:
                # (an empty label is SoftHSM's spare uninitialised slot)
                there = sorted(label for t in self._lib.get_tokens() if (label := str(t.label).strip()))
            except pkcs11.PKCS11Error:
                there = []
            seen = f"tokens there: {', '.join(repr(t) for t in there)}" if there else "no token there"
            raise TokenUnavailable(f"{self.name}: no such token on module {self.module} ({seen})")
        if len(tokens) > 1:
            raise TokenError(f"{self.name}: {len(tokens)} tokens match; select by serial")
        return tokens[0]

    def _login(self, token: Any) -> Any:
        serial = str(token.serial.decode() if isinstance(token.serial, bytes) else token.serial)
        flags = int(token.flags)
        if flags & TokenFlag.USER_PIN_LOCKED:
            raise PinError(f"token {serial}: the user PIN is locked; unlock it with the SO PIN/PUK")
        if not flags & TokenFlag.USER_PIN_INITIALIZED:
            raise PinError(f"token {serial}: the user PIN is not initialised")
        pin = self._pin_source()
        if self._rejected is not None:
            self._rejected.check(serial, pin)
        try:
            session = token.open(user_pin=pin.reveal(), rw=self._rw)
        except pkcs11.exceptions.UserAlreadyLoggedIn:
            # p11-kit after a server restart, or another session of ours: already logged in.
            session = token.open(rw=self._rw)
        except pkcs11.exceptions.PinIncorrect:
            if self._rejected is not None:
                self._rejected.remember(serial, pin)
            left = _attempts_left(int(self._find_token().flags))
            raise PinError(
                f"token {serial} refused the PIN from {pin.source}"
                + (f" ({left})" if left else "")
                + "; it will not be presented again until the PIN changes",
                attempts_left=left,
            ) from None
        except pkcs11.exceptions.PinLocked:
            raise PinError(f"token {serial}: the user PIN is locked") from None
        except (pkcs11.exceptions.PinLenRange, pkcs11.exceptions.PinInvalid) as e:
            raise PinError(f"token {serial}: the PIN from {pin.source} is malformed ({e!r})") from None
        if self._rejected is not None:
            self._rejected.clear_if_present(serial)
        return session

    def _ensure(self) -> Any:
        if self._session is not None:
            return self._session
        try:
            token = self._find_token()
            session = self._login(token)
        except (PinError, TokenError):
            raise
        except pkcs11.PKCS11Error as e:
            self._drop_session(reinit=True)
            raise TokenUnavailable(f"{self.name}: {e!r}") from e
        self._session, self._token = session, token
        try:
            mechanisms = token.slot.get_mechanisms()
        except pkcs11.PKCS11Error:
            mechanisms = set()
        self._hashed_mech = Mechanism.ECDSA_SHA256 in mechanisms
        return session

    @staticmethod
    def _objects(session: Any, cls: ObjectClass, **attrs: Any) -> list[Any]:
        """All EC keys of ``cls`` matching ``attrs``. A list, read to the end: python-pkcs11's
        get_key leaves its search open when several objects match, and the session then
        answers CKR_OPERATION_ACTIVE to everything after."""
        template = {Attribute.CLASS: cls, Attribute.KEY_TYPE: KeyType.EC}
        for name, value in attrs.items():
            template[{"label": Attribute.LABEL, "id": Attribute.ID}[name]] = value
        return list(session.get_objects(template))

    def _find_private_key(self, session: Any) -> Any:
        found = self._objects(session, ObjectClass.PRIVATE_KEY, label=self.key_label)
        if not found:
            raise KeyNotFound(
                f"{self.name}: no EC private key labelled '{self.key_label}' (run `keygen`)"
            )
        if len(found) > 1:
            raise TokenError(f"{self.name}: {len(found)} private keys share this label")
        return found[0]

    def _load_key(self) -> KeyInfo:
        session = self._ensure()
        if self._key is not None and self._priv is not None:
            return self._key
        priv = self._find_private_key(session)
        # The public half: same CKA_ID and label, else the same label, else the same CKA_ID.
        pubs = self._objects(session, ObjectClass.PUBLIC_KEY, id=priv.id, label=self.key_label)
        for attrs in ({"label": self.key_label}, {"id": priv.id}):
            if len(pubs) == 1:
                break
            pubs = self._objects(session, ObjectClass.PUBLIC_KEY, **attrs)
        if len(pubs) != 1:
            raise TokenError(f"{self.name}: cannot tell which public key belongs to the private "
                             f"key ({len(pubs)} candidates by label and CKA_ID)")
        pub = pubs[0]
        if bytes(pub[Attribute.EC_PARAMS]) != P256_OID_PARAMS:
            raise TokenError(f"{self.name}: the key is not on curve P-256 (secp256r1)")
        try:
            point = jose.ec_point_from_ck(pub[Attribute.EC_POINT])
            public_key = jose.public_key_from_point(point)
        except ValueError as e:
            raise TokenError(f"{self.name}: unusable public key: {e}") from e
        token = self._token
        serial = token.serial.decode() if isinstance(token.serial, bytes) else str(token.serial)
        info = KeyInfo(
            public_key=public_key,
            cka_id=bytes(priv.id or b""),
            label=self.key_label,
            token_serial=serial.strip(),
            token_label=str(token.label).strip(),
            thumbprint=jose.jwk_thumbprint(jose.ec_jwk(public_key)),
        )
        if self._identity is not None:
            self._identity.check(self.identity_name, info.token_serial, info.thumbprint)
        self._priv, self._key = priv, info
        return info

    @property
    def identity_name(self) -> str:
        which = self.token_label or f"serial:{self.token_serial}"
        return f"{which}/{self.key_label}"

    def _guarded(self, fn: Callable[[], T]) -> Callable[[], T]:
        """Wrap a worker-thread operation: device-level failures reset the session."""

        def run() -> T:
            try:
                return fn()
            except (PinError, TokenError):
                raise
            except pkcs11.PKCS11Error as e:
                self._drop_session(reinit=True)
                raise TokenUnavailable(f"{self.name}: {e!r}") from e

        return run

    # -- public operations ------------------------------------------------------------

    def key_info(self) -> KeyInfo:
        return self._call(self._guarded(self._load_key))

    def sign(self, message: bytes) -> tuple[bytes, KeyInfo]:
        """Sign ``message`` with ECDSA/SHA-256. Returns the token's raw output (r||s or DER)."""

        def op() -> tuple[bytes, KeyInfo]:
            info = self._load_key()
            if self._hashed_mech:
                sig = self._priv.sign(message, mechanism=Mechanism.ECDSA_SHA256)
            else:
                digest = hashlib.sha256(message).digest()
                sig = self._priv.sign(digest, mechanism=Mechanism.ECDSA)
            return bytes(sig), info

        return self._call(self._guarded(op))

    def probe(self, force: bool = False) -> bool:
        """Is the token there? Rate-limited after a failure so a dead HSM is not hammered."""
        if not force and self.present is False:
            if time.monotonic() - self._last_failure < self.probe_interval:
                return False
        try:
            self._call(self._guarded(self._probe_op))
        except TokenUnavailable:
            return False
        return True

    def _probe_op(self) -> None:
        self._load_key()  # after a reconnect: the key is looked up and its identity checked
        self._find_private_key(self._session)  # a real round trip to the token every probe

    def generate_key(self, cka_id: bytes | None = None) -> KeyInfo:
        """Make an EC P-256 key pair on the token: sign-only, sensitive, never extractable."""

        def op() -> KeyInfo:
            session = self._ensure()
            for cls in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
                if list(session.get_objects({Attribute.CLASS: cls, Attribute.LABEL: self.key_label})):
                    raise KeyExists(
                        f"{self.name}: a key labelled '{self.key_label}' exists; refusing to "
                        "overwrite it (choose another TM_KEY_LABEL)"
                    )
            if cka_id is not None:
                # On a YubiKey (ykcs11) a CKA_ID is a PIV slot: a second key there would
                # replace the first, and two keys with one ID confuse every lookup.
                taken = [o for cls in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY)
                         for o in session.get_objects({Attribute.CLASS: cls, Attribute.ID: cka_id})]
                if taken:
                    raise KeyExists(
                        f"{self.name}: CKA_ID {cka_id.hex()} is already used by the key labelled "
                        f"'{str(taken[0].label)}'; refusing to generate another one with it "
                        "(choose another --cka-id)"
                    )
            ident = cka_id or secrets.token_bytes(16)
            params = session.create_domain_parameters(
                KeyType.EC, {Attribute.EC_PARAMS: P256_OID_PARAMS}, local=True
            )
            # python-pkcs11's default EC template adds DERIVE; a signing key must do nothing else.
            private = {
                Attribute.TOKEN: True,
                Attribute.PRIVATE: True,
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False,
                Attribute.SIGN: True,
                Attribute.DECRYPT: False,
                Attribute.UNWRAP: False,
                Attribute.DERIVE: False,
                Attribute.SIGN_RECOVER: False,
            }
            # Not modifiable and not copyable, or a logged-in session could later widen the
            # usage (SoftHSM lets C_SetAttributeValue turn DERIVE/DECRYPT on) or copy the key
            # with other attributes. CKA_COPYABLE is PKCS#11 v2.40: a module that does not
            # know these two gets the base template, and the key is still sign-only.
            locked = {**private, Attribute.MODIFIABLE: False, Attribute.COPYABLE: False}
            for template in (locked, private):
                try:
                    params.generate_keypair(
                        store=True,
                        label=self.key_label,
                        id=ident,
                        mechanism=Mechanism.EC_KEY_PAIR_GEN,
                        public_template={
                            Attribute.TOKEN: True,
                            Attribute.VERIFY: True,
                            Attribute.ENCRYPT: False,
                            Attribute.WRAP: False,
                            Attribute.DERIVE: False,
                        },
                        private_template=template,
                    )
                    break
                except (pkcs11.exceptions.AttributeTypeInvalid,
                        pkcs11.exceptions.AttributeValueInvalid,
                        pkcs11.exceptions.TemplateInconsistent) as e:
                    if template is private:
                        raise
                    log.warning("%s: module refused a non-modifiable, non-copyable key (%r); "
                                "generating it without those two attributes", self.name, e)
            if self._identity is not None:
                self._identity.reset(self.identity_name)
            self._key = None
            return self._load_key()

        return self._call(self._guarded(op), timeout=max(self.op_timeout, 30.0))

    def close(self) -> None:
        """Log out and close the session (unless a hung call still holds the module)."""
        acquired = self._lock.acquire(timeout=self.op_timeout)
        try:
            if self._stuck is None or self._stuck.done():
                fut = self._worker.submit(self._drop_session, False)
                try:
                    fut.result(timeout=self.op_timeout)
                except FutureTimeout:
                    log.warning("%s: closing the session timed out", self.name)
        finally:
            if acquired:
                self._lock.release()
        self._worker.shutdown()

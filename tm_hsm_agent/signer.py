"""ES256 challenge signer: ``{key_id}.{timestamp}`` -> base64url raw ``r||s``.

Every signature is normalised to exactly 64 bytes and verified with the public key
before it leaves the process: cheap next to a token round trip, and it catches a
faulty token or a format slip before the server does. It is written to the audit
log (and fsync'd) before it is returned.
"""

from __future__ import annotations

from typing import Protocol

from tm_hsm_agent import jose
from tm_hsm_agent.errors import SignatureFormatError
from tm_hsm_agent.token import KeyInfo


class SigningToken(Protocol):
    """The seam between signer and token: the real TokenHandle or a test fake."""

    def sign(self, message: bytes) -> tuple[bytes, KeyInfo]: ...

    def key_info(self) -> KeyInfo: ...


class AuditSink(Protocol):
    def record_now(self, event: str, **fields: object) -> None: ...


def challenge(key_id: str, timestamp: int) -> bytes:
    """The exact bytes the Auth API verifies: ASCII ``{key_id}.{timestamp}``."""
    if isinstance(timestamp, bool) or not isinstance(timestamp, int):
        raise TypeError("timestamp must be an integer number of seconds")
    return f"{key_id}.{timestamp}".encode("ascii")


class Es256Signer:
    def __init__(self, token: SigningToken, audit: AuditSink) -> None:
        self.token = token
        self.audit = audit

    def sign_challenge(self, key_id: str, timestamp: int, purpose: str = "mint") -> str:
        message = challenge(key_id, timestamp)
        produced, info = self.token.sign(message)
        try:
            raw = jose.normalize_signature(produced)
        except ValueError as e:
            self.audit.record_now("sign", key_id=key_id, purpose=purpose, outcome=f"bad-format: {e}")
            raise SignatureFormatError(
                f"token returned a signature that is neither 64-byte r||s nor strict DER: {e}"
            ) from e
        if not jose.verify_es256(info.public_key, message, raw):
            self.audit.record_now("sign", key_id=key_id, purpose=purpose, outcome="did-not-verify")
            raise SignatureFormatError(
                "the token's signature does not verify with its own public key; "
                "refusing to send it (faulty token or wrong key?)"
            )
        self.audit.record_now(
            "sign", key_id=key_id, purpose=purpose, outcome="ok", ts=timestamp,
            key=info.thumbprint,
        )
        return jose.b64url_encode(raw)

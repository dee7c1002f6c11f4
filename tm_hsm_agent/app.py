"""Wiring: build the layers from a Config. Shared by the CLI commands and the agent."""

from __future__ import annotations

from collections.abc import Callable

from tm_hsm_agent.audit import AuditLog
from tm_hsm_agent.auth import AuthClient, JwksVerifier, TokenSet
from tm_hsm_agent.config import Config
from tm_hsm_agent.errors import ConfigError
from tm_hsm_agent.pin import RejectedPins, pin_source
from tm_hsm_agent.signer import Es256Signer
from tm_hsm_agent.token import IdentityPins, TokenHandle

UUID_HELP = "the key_id (UUID) the API Keys page returned when you registered the public key"


def open_token(
    cfg: Config, *, rw: bool = False, prompt: Callable[[str], str] | None = None
) -> TokenHandle:
    if not cfg.token_label and not cfg.token_serial:
        raise ConfigError("TM_TOKEN_LABEL (or TM_TOKEN_SERIAL) is not set: which token holds the key?")
    state = cfg.state_path
    return TokenHandle(
        cfg.module,
        token_label=cfg.token_label,
        token_serial=cfg.token_serial,
        key_label=cfg.key_label,
        pin_source=pin_source(cfg.pin_file, prompt=prompt),
        rejected_pins=RejectedPins(state / "rejected-pins.json"),
        identity=IdentityPins(state / "identity.json"),
        op_timeout=cfg.token_timeout,
        rw=rw,
    )


def auth_client(cfg: Config) -> AuthClient:
    return AuthClient(cfg.auth_url, cfg.jwks_url, timeout=cfg.http_timeout)


def signer(cfg: Config, token: TokenHandle) -> Es256Signer:
    return Es256Signer(token, AuditLog(cfg.audit_path))


def mint_once(cfg: Config, token: TokenHandle) -> tuple[TokenSet, dict[str, object]]:
    """Sign, mint, and verify the answer against the JWKS: the one-shot main job."""
    key_id = cfg.require("key_id", UUID_HELP)
    client = auth_client(cfg)
    sig = signer(cfg, token)
    try:
        tokens = client.mint(key_id, sig.sign_challenge)
    finally:
        sig.audit.close()  # type: ignore[attr-defined]
    claims = JwksVerifier(client).verify(tokens.access_token).claims
    return tokens, claims

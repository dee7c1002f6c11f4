"""Typed errors: the one vocabulary every layer raises and the CLI maps to exit codes.

Each error says whether retrying is safe (``retryable``) so callers decide once,
in one place, instead of guessing from message text.
"""

from __future__ import annotations

# Exit statuses are part of the public interface (documented in docs/operations.md,
# and the PIN status is named in the systemd unit's RestartPreventExitStatus=).
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_TOKEN = 4
EXIT_API = 5
EXIT_PIN = 78  # EX_CONFIG: a restart cannot fix a rejected or locked PIN.
EXIT_AGENT = 6
EXIT_NO_TOKEN = 7  # the agent answered, but has no valid token to give (503)
EXIT_VERIFY = 8  # a JWT did not verify


class TmHsmError(Exception):
    """Base of every error the library raises on purpose."""

    exit_code: int = EXIT_FAILURE
    retryable: bool = False


class ConfigError(TmHsmError, ValueError):
    """A configuration value is missing or malformed; names the key and its source."""

    exit_code = EXIT_CONFIG


class TokenError(TmHsmError):
    """The PKCS#11 token or module failed or is not there."""

    exit_code = EXIT_TOKEN


class TokenUnavailable(TokenError):
    """The token is absent, hung or not answering; trying again later may work."""

    retryable = True


class TokenIdentityError(TokenError):
    """The token or key differs from the one pinned at first use."""


class KeyNotFound(TokenError):
    """No key with the configured label exists on the token."""


class KeyExists(TokenError):
    """keygen refuses to overwrite an existing key of the same label."""


class PinError(TokenError):
    """The PIN was refused, is locked, or was refused before and is withheld.

    Never retried automatically: a YubiKey locks after three wrong PINs.
    """

    exit_code = EXIT_PIN

    def __init__(self, message: str, *, attempts_left: str | None = None) -> None:
        super().__init__(message)
        self.attempts_left = attempts_left


class SignatureFormatError(TmHsmError, ValueError):
    """A signature from the token is neither 64-byte r||s nor strict DER, or fails to verify."""

    exit_code = EXIT_TOKEN


class ApiError(TmHsmError):
    """The Auth API answered with an error or could not be reached."""

    exit_code = EXIT_API

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        server_message: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.server_message = server_message
        self.retry_after = retry_after


class ApiTransient(ApiError):
    """Timeout, connection error, 5xx, 429 or a garbled answer: back off and retry."""

    retryable = True


class ApiRejected(ApiError):
    """A 4xx answer: the request itself was refused; re-signing the same way will not help."""


class TokenVerifyError(TmHsmError):
    """A JWT did not verify against the JWKS, or is malformed or expired."""

    exit_code = EXIT_VERIFY


class AgentError(TmHsmError):
    """Talking to a running agent over its socket failed."""

    exit_code = EXIT_AGENT


class NoTokenAvailable(TmHsmError):
    """The cache has no valid token to hand out; carries why."""

    exit_code = EXIT_NO_TOKEN

    def __init__(self, message: str, *, reason: str = "unavailable") -> None:
        super().__init__(message)
        self.reason = reason

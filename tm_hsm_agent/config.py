"""Configuration: defaults < TOML file < environment < command line, each value with its source.

The environment names (``TM_*``) are a public interface. A config error names the
key and where the bad value came from, because "invalid URL" alone sends a desk
hunting through three places.

The file holds one profile today (top-level keys). Several profiles (production and
UAT side by side) will live under ``[profiles.NAME]`` tables with the same keys;
``load_config`` takes a ``profile`` argument already so callers need not change.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tm_hsm_agent import paths
from tm_hsm_agent.errors import ConfigError

# The seed's two base URLs (Auth Service API 1.0.0).
ENVIRONMENTS = {
    "production": "https://api.truemarkets.co/v1/auth",
    "uat": "https://api.uat.truemarkets.co/v1/auth",
}

SOFTHSM_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/opt/homebrew/lib/softhsm/libsofthsm2.so",
)


def default_module() -> str | None:
    """SoftHSMv2's module where installed: the embedded default for demos and tests."""
    return next((p for p in SOFTHSM_CANDIDATES if os.path.exists(p)), None)


def _str(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("must be a non-empty string")
    return value


_UUID = re.compile(r"[0-9a-fA-F]{8}(?:-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}")


def _uuid(value: Any) -> str:
    value = _str(value)
    if not _UUID.fullmatch(value):
        raise ValueError(f"must be the UUID the API Keys page returned, got {value!r}")
    return value


def _float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("must be a number")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"must be a number, got {value!r}") from None
    if not 0 < out < 1e9:  # also refuses nan and inf
        raise ValueError(f"must be a positive finite number, got {value!r}")
    return out


def _env_name(value: Any) -> str:
    value = _str(value).lower()
    if value not in ENVIRONMENTS:
        raise ValueError(f"must be one of {', '.join(ENVIRONMENTS)}, got {value!r}")
    return value


def _ids(value: Any) -> tuple[int, ...]:
    if isinstance(value, str):
        value = [v for v in value.replace(",", " ").split() if v]
    if not isinstance(value, list):
        raise ValueError("must be a list of numeric ids")
    try:
        return tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"must be numeric ids, got {value!r}") from None


def _url(value: Any) -> str:
    value = _str(value).rstrip("/")
    parts = urlsplit(value)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError(f"must be an http(s) URL, got {value!r}")
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        # Tokens and refresh tokens travel in these requests: plain HTTP only to this host.
        raise ValueError("plain http is only allowed to a loopback host; use https")
    return value


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Key:
    name: str
    env: str
    parse: Callable[[Any], Any]
    default: Any = None
    help: str = ""


KEYS: tuple[Key, ...] = (
    Key("pkcs11_module", "TM_PKCS11_MODULE", _str, None, "PKCS#11 module path"),
    Key("token_label", "TM_TOKEN_LABEL", _str, None, "token label"),
    Key("token_serial", "TM_TOKEN_SERIAL", _str, None, "token serial"),
    Key("key_label", "TM_KEY_LABEL", _str, "tm-api-key", "key label on the token"),
    Key("pin_file", "TM_PIN_FILE", _str, None, "file holding the user PIN (0600/0400)"),
    Key("key_id", "TM_KEY_ID", _uuid, None, "key_id (UUID) from the API Keys page"),
    Key("env", "TM_ENV", _env_name, None, "production | uat"),
    Key("auth_url", "TM_AUTH_URL", _url, None, "Auth API base URL"),
    Key("jwks_url", "TM_JWKS_URL", _url, None, "JWKS URL"),
    Key("agent_socket", "TM_AGENT_SOCKET", _str, None, "agent Unix socket path"),
    Key("state_dir", "TM_STATE_DIR", _str, None, "state directory"),
    Key("audit_log", "TM_AUDIT_LOG", _str, None, "audit log path"),
    Key("http_timeout", "TM_HTTP_TIMEOUT", _float, 10.0, "seconds per API call"),
    Key("token_timeout", "TM_TOKEN_TIMEOUT", _float, 5.0, "seconds per PKCS#11 call"),
    Key("backoff_cap", "TM_BACKOFF_CAP", _float, 4.0, "max seconds between retries"),
    Key("socket_group", "TM_SOCKET_GROUP", _str, None, "group allowed on the socket (0660)"),
    Key("allow_uids", "TM_ALLOW_UIDS", _ids, (), "extra uids allowed on the socket"),
    Key("allow_gids", "TM_ALLOW_GIDS", _ids, (), "gids allowed on the socket"),
)
_BY_NAME = {k.name: k for k in KEYS}


@dataclass(frozen=True)
class Config:
    values: Mapping[str, Any]
    sources: Mapping[str, str] = field(default_factory=dict)
    path: Path | None = None
    environ: Mapping[str, str] | None = None  # what XDG defaults are resolved against

    def __getattr__(self, name: str) -> Any:
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None

    def source(self, name: str) -> str:
        return self.sources.get(name, "default")

    def require(self, name: str, hint: str = "") -> Any:
        value = self.values.get(name)
        if value is None:
            key = _BY_NAME[name]
            raise ConfigError(f"{key.env} is not set ({hint or key.help}); "
                              f"set it, or {name} in the config file")
        return value

    @property
    def module(self) -> str:
        module = self.values.get("pkcs11_module") or default_module()
        if not module:
            raise ConfigError(
                "TM_PKCS11_MODULE is not set and SoftHSMv2 is not installed; "
                "point it at your PKCS#11 module (e.g. libykcs11.so)"
            )
        return str(module)

    @property
    def auth_url(self) -> str:
        url = self.values.get("auth_url")
        if url:
            return str(url)
        env = self.values.get("env")
        if env:
            return ENVIRONMENTS[env]
        raise ConfigError(
            "no API selected: set TM_ENV to production or uat, or TM_AUTH_URL "
            "(e.g. http://127.0.0.1:8080/v1/auth for the sandbox)"
        )

    @property
    def jwks_url(self) -> str:
        url = self.values.get("jwks_url")
        if url:
            return str(url)
        parts = urlsplit(self.auth_url)
        return f"{parts.scheme}://{parts.netloc}/.well-known/jwks.json"

    @property
    def state_path(self) -> Path:
        value = self.values.get("state_dir")
        return Path(value) if value else paths.state_dir(self.environ)

    @property
    def socket_path(self) -> Path:
        value = self.values.get("agent_socket")
        return Path(value) if value else paths.default_socket(self.environ)

    @property
    def audit_path(self) -> Path:
        value = self.values.get("audit_log")
        return Path(value) if value else self.state_path / "audit.log"


def config_file_path(explicit: str | os.PathLike[str] | None, environ: Mapping[str, str]) -> Path:
    if explicit:
        return Path(explicit)
    if environ.get("TM_HSM_AGENT_CONFIG"):
        return Path(environ["TM_HSM_AGENT_CONFIG"])
    return paths.config_dir(environ) / "config.toml"


def _read_file(path: Path, explicit: bool, profile: str | None) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        if explicit or profile:
            what = f" (asked for profile [profiles.{profile}])" if profile else ""
            raise ConfigError(f"config file {path} does not exist{what}") from None
        return {}
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"config file {path}: {e}") from e
    if profile:
        profiles = data.get("profiles", {})
        if profile not in profiles:
            raise ConfigError(f"config file {path}: no [profiles.{profile}] table")
        data = {**{k: v for k, v in data.items() if k != "profiles"}, **profiles[profile]}
    data.pop("profiles", None)
    return data


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    profile: str | None = None,
) -> Config:
    """Merge the layers. ``overrides`` are CLI options (None means not given)."""
    environ = os.environ if environ is None else environ
    file_path = config_file_path(path, environ)
    explicit = bool(path or environ.get("TM_HSM_AGENT_CONFIG"))
    file_values = _read_file(file_path, explicit, profile)
    if "pin" in file_values:
        raise ConfigError(f"config file {file_path}: the PIN may not be stored in the config "
                          "file; put it in a file of its own (mode 0600) and set pin_file")
    unknown = sorted(set(file_values) - set(_BY_NAME))
    if unknown:
        raise ConfigError(f"config file {file_path}: unknown key(s) {', '.join(unknown)}")

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key in KEYS:
        layers = (
            ((overrides or {}).get(key.name), f"option --{key.name.replace('_', '-')}"),
            (environ.get(key.env) or None, f"environment {key.env}"),
            (file_values.get(key.name), f"config file {file_path}"),
        )
        for raw, where in layers:
            if raw is None:
                continue
            try:
                values[key.name] = key.parse(raw)
            except ValueError as e:
                raise ConfigError(f"{key.name} from {where}: {e}") from None
            sources[key.name] = where
            break
        else:
            values[key.name] = key.default
    if values["token_label"] and values["token_serial"]:
        raise ConfigError(
            f"set only one of token_label ({sources['token_label']}) and "
            f"token_serial ({sources['token_serial']})"
        )
    return Config(values, sources, file_path, environ)

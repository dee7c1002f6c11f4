"""The user PIN: where it comes from, and remembering a PIN the token refused.

A YubiKey locks its PIV PIN after three wrong tries, and systemd restarts failed
services. So a PIN the token rejected is remembered (a salted scrypt hash bound to
the token serial, in a 0600 state file) and is never presented again until the
PIN source yields a different PIN or the record is cleared with ``pin forget``.

Limits of the remembered hash: scrypt (N=2**15, r=8, p=1, ~30 ms, 32 MiB) slows a
guesser down, but a short numeric PIN (6-8 digits) can still be brute-forced from
the file in hours. The file is 0600 in the user's state directory; it only ever
holds PINs that were *wrong*.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import stat
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tm_hsm_agent.errors import ConfigError, PinError
from tm_hsm_agent.paths import write_private

SYSTEMD_CREDENTIAL = "tm-hsm-agent-pin"
_SCRYPT = {"n": 2**15, "r": 8, "p": 1, "maxmem": 64 * 1024 * 1024, "dklen": 32}


class Pin:
    """A PIN that will not show itself in a repr, a log line or a traceback."""

    __slots__ = ("_value", "source")

    def __init__(self, value: str, source: str) -> None:
        self._value = value
        self.source = source

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Pin(<redacted>, source={self.source!r})"

    __str__ = __repr__


def check_secret_file(path: Path, what: str, *, credential: bool = False) -> None:
    """A secret file must be a regular file of this user with no group/other bits (0600, 0400).

    A systemd ``credential`` may also belong to root and show group read: systemd gives a
    ``User=`` service a root-owned 0400 file plus an ACL for the user, which stat shows as
    0440. It lives in a directory only that service sees.
    """
    owners, forbidden = ((os.getuid(), 0), 0o027) if credential else ((os.getuid(),), 0o077)
    try:
        st = path.stat()
    except OSError as e:
        raise ConfigError(f"{what} {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{what} {path} is not a regular file")
    if st.st_uid not in owners:
        raise ConfigError(f"{what} {path} belongs to uid {st.st_uid}, not to this user; refused")
    if st.st_mode & forbidden:
        raise ConfigError(
            f"{what} {path} has mode {stat.S_IMODE(st.st_mode):04o}; "
            f"it must be 0600 or 0400 (chmod 600 {path})"
        )


def _read_pin_file(path: Path, what: str) -> str:
    check_secret_file(path, what, credential=what == "systemd credential")
    text = path.read_text(encoding="utf-8")
    # One trailing newline is what `echo PIN > file` leaves; anything else is the PIN.
    pin = text[:-1] if text.endswith("\n") else text
    if not pin:
        # Refused here: presenting an empty PIN would cost one of the token's few tries.
        raise ConfigError(f"{what} {path} is empty")
    return pin


PinSource = Callable[[], Pin]


def pin_source(
    pin_file: str | None,
    environ: Mapping[str, str] | None = None,
    prompt: Callable[[str], str] | None = None,
) -> PinSource:
    """Choose where the PIN comes from: TM_PIN, the PIN file, a systemd credential, a TTY prompt.

    Returns a callable so the PIN is read when it is needed (and re-read after a
    PIN file is fixed) rather than kept around.
    """
    environ = os.environ if environ is None else environ

    def get() -> Pin:
        if environ.get("TM_PIN"):
            return Pin(environ["TM_PIN"], "environment TM_PIN")
        if pin_file:
            return Pin(_read_pin_file(Path(pin_file), "PIN file"), f"PIN file {pin_file}")
        creds = environ.get("CREDENTIALS_DIRECTORY")
        if creds and (Path(creds) / SYSTEMD_CREDENTIAL).exists():
            path = Path(creds) / SYSTEMD_CREDENTIAL
            return Pin(_read_pin_file(path, "systemd credential"), f"systemd credential {path}")
        if prompt is not None and sys.stdin.isatty():
            return Pin(prompt("Token user PIN"), "prompt")
        raise ConfigError(
            "no PIN: set TM_PIN or TM_PIN_FILE, pass a systemd credential "
            f"'{SYSTEMD_CREDENTIAL}', or run on a terminal to be prompted"
        )

    return get


@dataclass
class RejectedPins:
    """The 0600 state file of PINs a token refused: ``{serial: [{salt, hash, at}, ...]}``.

    Every refused PIN is kept (the newest ``KEEP`` per token): on a YubiKey, trying A,
    then B, then A again would use up all three tries.
    """

    path: Path
    KEEP = 8

    def _damaged(self, why: str) -> PinError:
        # A damaged file must not turn into "no PIN was ever refused", nor be overwritten.
        return PinError(
            f"the rejected-PIN record {self.path} is damaged ({why}); inspect or remove it "
            "(`tm-hsm-agent pin forget` rewrites it)"
        )

    def _load(self) -> dict[str, list[dict[str, Any]]]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise self._damaged(str(e)) from e
        if not isinstance(data, dict):
            raise self._damaged("not a JSON object")
        for serial, entries in data.items():
            if not isinstance(entries, list):
                raise self._damaged(f"entry for {serial} is not a list")
            for entry in entries:
                try:
                    bytes.fromhex(entry["salt"])
                    bytes.fromhex(entry["hash"])
                    float(entry["at"])
                except (TypeError, KeyError, ValueError):
                    raise self._damaged(f"malformed entry for {serial}") from None
        return data

    @staticmethod
    def _hash(pin: str, salt: bytes, serial: str) -> bytes:
        return hashlib.scrypt(f"{serial}\0{pin}".encode(), salt=salt, **_SCRYPT)

    def check(self, serial: str, pin: Pin) -> None:
        """Raise PinError if this PIN was refused by this token before."""
        for entry in self._load().get(serial, []):
            digest = self._hash(pin.reveal(), bytes.fromhex(entry["salt"]), serial).hex()
            if hmac.compare_digest(digest, entry["hash"]):
                when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(entry["at"])))
                raise PinError(
                    f"the PIN from {pin.source} was refused by token {serial} at {when}; "
                    "it is not presented again (a token locks after a few wrong PINs). "
                    "Fix the PIN source, or clear the record with `tm-hsm-agent pin forget`"
                )

    def remember(self, serial: str, pin: Pin) -> None:
        data = self._load()
        salt = secrets.token_bytes(16)
        entry = {"salt": salt.hex(), "hash": self._hash(pin.reveal(), salt, serial).hex(),
                 "at": time.time()}
        data[serial] = [*data.get(serial, []), entry][-self.KEEP:]
        write_private(self.path, json.dumps(data, indent=1).encode())

    def forget(self, serial: str | None = None) -> int:
        """Drop the records (of one token, or all); returns how many PINs were forgotten."""
        if serial is None:
            # Forgetting everything also clears a damaged file, so do not parse it first.
            try:
                count = sum(len(v) for v in self._load().values())
            except PinError:
                count = 1
            if count:
                write_private(self.path, b"{}")
            return count
        data = self._load()
        count = len(data.pop(serial, []))
        if count:
            write_private(self.path, json.dumps(data, indent=1).encode())
        return count

    def clear_if_present(self, serial: str) -> None:
        """After a successful login the record for this token is stale."""
        if serial in self._load():
            self.forget(serial)

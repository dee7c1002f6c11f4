"""PIN sources, PIN file modes (also checked as an unprivileged user), and the record of
PINs a token refused (issue 4, "PINs")."""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import struct
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import NOBODY, python_as_nobody

from tm_hsm_agent.errors import EXIT_PIN, ConfigError, PinError
from tm_hsm_agent.pin import SYSTEMD_CREDENTIAL, Pin, RejectedPins, check_secret_file, pin_source


def secret(directory: Path, content: str = "123456\n", mode: int = 0o600, name: str = "pin") -> Path:
    path = directory / name
    path.write_text(content, encoding="utf-8")
    os.chmod(path, mode)
    return path


class FakeStdin:
    def __init__(self, tty: bool) -> None:
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


class Prompt:
    def __init__(self, answer: str = "from-the-prompt") -> None:
        self.answer = answer
        self.asked: list[str] = []

    def __call__(self, label: str) -> str:
        self.asked.append(label)
        return self.answer


# -- where the PIN comes from -------------------------------------------------------------------


def test_pin_source_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", FakeStdin(tty=True))
    pin_file = secret(tmp_path, "from-the-file\n")
    creds = tmp_path / "creds"
    creds.mkdir()
    secret(creds, "from-systemd\n", 0o400, SYSTEMD_CREDENTIAL)
    prompt = Prompt()
    env = {"TM_PIN": "from-env", "CREDENTIALS_DIRECTORY": str(creds)}

    pin = pin_source(str(pin_file), env, prompt)()
    assert (pin.reveal(), pin.source) == ("from-env", "environment TM_PIN")

    env["TM_PIN"] = ""  # empty is unset
    pin = pin_source(str(pin_file), env, prompt)()
    assert (pin.reveal(), pin.source) == ("from-the-file", f"PIN file {pin_file}")

    pin = pin_source(None, env, prompt)()
    assert pin.reveal() == "from-systemd"
    assert pin.source == f"systemd credential {creds / SYSTEMD_CREDENTIAL}"

    (creds / SYSTEMD_CREDENTIAL).unlink()  # a credentials directory without ours: next source
    pin = pin_source(None, env, prompt)()
    assert (pin.reveal(), pin.source) == ("from-the-prompt", "prompt")
    assert prompt.asked == ["Token user PIN"]  # only the last one prompted


def test_no_tty_no_prompt_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", FakeStdin(tty=False))
    prompt = Prompt()
    with pytest.raises(ConfigError) as e:
        pin_source(None, {"CREDENTIALS_DIRECTORY": str(tmp_path)}, prompt)()
    assert prompt.asked == []
    for name in ("TM_PIN", "TM_PIN_FILE", SYSTEMD_CREDENTIAL, "terminal"):
        assert name in str(e.value)
    # A TTY but no prompt function (a library caller) is the same error.
    monkeypatch.setattr(sys, "stdin", FakeStdin(tty=True))
    with pytest.raises(ConfigError):
        pin_source(None, {}, None)()


def test_pin_is_read_when_needed_not_when_configured(tmp_path: Path) -> None:
    path = secret(tmp_path, "first\n", 0o644)
    get = pin_source(str(path), {})
    with pytest.raises(ConfigError, match="0644"):
        get()
    os.chmod(path, 0o600)  # the desk fixes the file; the same source now reads it
    assert get().reveal() == "first"
    path.write_text("second\n")
    assert get().reveal() == "second"


def test_systemd_credential_mode_is_checked_too(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    secret(creds, "1234\n", 0o644, SYSTEMD_CREDENTIAL)
    with pytest.raises(ConfigError) as e:
        pin_source(None, {"CREDENTIALS_DIRECTORY": str(creds)})()
    assert "systemd credential" in str(e.value) and "0644" in str(e.value)


# -- PIN file checks ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_pin_file_modes_accepted(tmp_path: Path, mode: int) -> None:
    path = secret(tmp_path, "4321\n", mode)
    check_secret_file(path, "PIN file")
    assert pin_source(str(path), {})().reveal() == "4321"


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o606, 0o610, 0o601, 0o666])
def test_pin_file_modes_refused(tmp_path: Path, mode: int) -> None:
    path = secret(tmp_path, "4321\n", mode)
    with pytest.raises(ConfigError) as e:
        check_secret_file(path, "PIN file")
    msg = str(e.value)
    assert f"{mode:04o}" in msg and str(path) in msg and "0600 or 0400" in msg
    assert "4321" not in msg
    with pytest.raises(ConfigError, match=f"{mode:04o}"):
        pin_source(str(path), {})()


def test_pin_file_missing_or_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="No such file"):
        check_secret_file(tmp_path / "absent", "PIN file")
    d = tmp_path / "dir"
    d.mkdir(mode=0o700)
    with pytest.raises(ConfigError, match="not a regular file"):
        check_secret_file(d, "PIN file")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("123456\n", "123456"),  # what `echo PIN > file` leaves
        ("123456", "123456"),
        ("123456\n\n", "123456\n"),  # only one newline is stripped; the rest is the PIN
        (" 12 34 \n", " 12 34 "),  # no other trimming
        ("pässwörd\n", "pässwörd"),
    ],
)
def test_pin_file_trailing_newline(tmp_path: Path, content: str, expected: str) -> None:
    path = secret(tmp_path, content)
    assert pin_source(str(path), {})().reveal() == expected


def test_pin_never_shows_its_value() -> None:
    pin = Pin("s3cr3t-973", "environment TM_PIN")
    logged = logging.LogRecord("t", logging.INFO, __file__, 1, "login with %s (%r)", (pin, pin), None)
    for text in (repr(pin), str(pin), f"{pin}", logged.getMessage(), repr([pin]), str({"pin": pin})):
        assert "s3cr3t-973" not in text and "redacted" in text
    assert "environment TM_PIN" in repr(pin)
    assert not hasattr(pin, "__dict__")  # slots: vars() cannot dump it either
    assert pin.reveal() == "s3cr3t-973"
    err = PinError(f"token refused the PIN from {pin}")
    assert "s3cr3t-973" not in str(err) and err.exit_code == EXIT_PIN


# -- as an unprivileged user: root's file modes prove nothing ------------------------------------


CHECK = """
import sys
from pathlib import Path
from tm_hsm_agent.errors import ConfigError
from tm_hsm_agent.pin import pin_source
try:
    pin = pin_source(sys.argv[1] or None, {"CREDENTIALS_DIRECTORY": sys.argv[2]} if sys.argv[2] else {})()
except ConfigError as e:
    print("REFUSED", e)
else:
    print("OK", pin.reveal())
"""


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory outside pytest's 0700 tmp tree that uid 65534 can search."""
    d = Path(tempfile.mkdtemp(prefix="tm-pin-test-"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def as_nobody(pin_file: Path | None, creds: Path | None = None) -> str:
    proc = python_as_nobody(CHECK, str(pin_file or ""), str(creds or ""))
    assert proc.returncode == 0, proc.stderr
    assert os.geteuid() == 0  # this process is still root; only the child was unprivileged
    return proc.stdout.strip()


def test_as_nobody_a_root_owned_pin_file_is_refused(shared_dir: Path) -> None:
    path = secret(shared_dir, "7777\n", 0o600)  # owned by root (this process)
    assert path.stat().st_uid == 0
    out = as_nobody(path)
    assert out.startswith("REFUSED") and "belongs to uid 0" in out and "7777" not in out


def test_as_nobody_own_file_modes(shared_dir: Path) -> None:
    path = secret(shared_dir, "8888\n", 0o640)
    os.chown(path, NOBODY, NOBODY)
    out = as_nobody(path)
    assert out.startswith("REFUSED") and "0640" in out
    os.chmod(path, 0o600)
    assert as_nobody(path) == "OK 8888"
    os.chmod(path, 0o400)
    assert as_nobody(path) == "OK 8888"


def _acl_read_for(path: Path, uid: int) -> None:
    """What systemd's write_credential() does for a service user: 0400 root file plus a POSIX
    ACL entry user:UID:r (setfacl -m u:UID:r), written as the raw system.posix_acl_access xattr."""

    def entry(tag: int, perm: int, ident: int = 0xFFFFFFFF) -> bytes:
        return struct.pack("<HHI", tag, perm, ident)

    acl = struct.pack("<I", 2) + b"".join([
        entry(0x01, 4),  # user::r--
        entry(0x02, 4, uid),  # user:UID:r--
        entry(0x04, 0),  # group::---
        entry(0x10, 4),  # mask::r--
        entry(0x20, 0),  # other::---
    ])
    try:
        os.setxattr(path, "system.posix_acl_access", acl)
    except OSError as e:
        pytest.skip(f"no POSIX ACL support here: {e}")


def test_as_nobody_a_systemd_credential_with_an_acl_is_accepted(shared_dir: Path) -> None:
    creds = shared_dir / "credentials"
    creds.mkdir(mode=0o755)
    path = secret(creds, "5555\n", 0o400, SYSTEMD_CREDENTIAL)
    _acl_read_for(path, NOBODY)
    assert stat.S_IMODE(path.stat().st_mode) == 0o440  # the ACL mask shows in the group bits
    assert as_nobody(None, creds) == "OK 5555"


# -- PINs the token refused ------------------------------------------------------------------------


@pytest.fixture
def record(tmp_path: Path) -> RejectedPins:
    return RejectedPins(tmp_path / "state" / "rejected-pins.json")


def test_rejected_pin_is_remembered_per_serial(record: RejectedPins) -> None:
    wrong = Pin("000000", "PIN file /etc/tm/pin")
    record.check("SERIAL-A", wrong)  # nothing recorded yet
    record.remember("SERIAL-A", wrong)
    with pytest.raises(PinError) as e:
        record.check("SERIAL-A", Pin("000000", "PIN file /etc/tm/pin"))
    msg = str(e.value)
    assert "SERIAL-A" in msg and "pin forget" in msg and "PIN file /etc/tm/pin" in msg
    assert "000000" not in msg and e.value.exit_code == EXIT_PIN
    # A different PIN on the same token, or the same PIN on another token, is not withheld.
    record.check("SERIAL-A", Pin("123456", "t"))
    record.check("SERIAL-B", Pin("000000", "t"))
    # A restart (a fresh object on the same file) still withholds it.
    with pytest.raises(PinError):
        RejectedPins(record.path).check("SERIAL-A", Pin("000000", "t"))


def test_record_file_is_private_and_holds_no_pin(record: RejectedPins) -> None:
    old = os.umask(0)  # even a permissive umask must not widen it
    try:
        record.remember("SERIAL-A", Pin("271828", "t"))
        record.remember("SERIAL-B", Pin("271828", "t"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(record.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(record.path.parent.stat().st_mode) == 0o700
    text = record.path.read_text()
    assert "271828" not in text
    data = json.loads(text)
    assert set(data) == {"SERIAL-A", "SERIAL-B"}
    assert [set(e) for e in data["SERIAL-A"]] == [{"salt", "hash", "at"}]
    # Salted: the same PIN hashes differently each time.
    assert data["SERIAL-A"][0]["salt"] != data["SERIAL-B"][0]["salt"]
    assert data["SERIAL-A"][0]["hash"] != data["SERIAL-B"][0]["hash"]


def test_forget_and_clear_if_present(record: RejectedPins) -> None:
    pin = Pin("999999", "t")
    record.remember("S1", pin)
    record.remember("S2", pin)
    record.remember("S3", pin)

    record.clear_if_present("S1")  # a successful login on S1
    record.check("S1", pin)
    with pytest.raises(PinError):
        record.check("S2", pin)
    record.clear_if_present("NOT-THERE")  # harmless
    assert record.forget("S2") == 1
    assert record.forget("S2") == 0
    record.check("S2", pin)
    with pytest.raises(PinError):
        record.check("S3", pin)
    record.remember("S4", pin)
    assert record.forget() == 2  # everything left: S3, S4
    record.check("S3", pin)
    record.check("S4", pin)
    assert json.loads(record.path.read_text()) == {}
    assert RejectedPins(record.path.parent / "never-written.json").forget() == 0


def test_every_refused_pin_stays_withheld(record: RejectedPins) -> None:
    record.remember("SERIAL-A", Pin("111111", "t"))
    record.remember("SERIAL-A", Pin("222222", "t"))
    with pytest.raises(PinError):
        record.check("SERIAL-A", Pin("222222", "t"))
    with pytest.raises(PinError):
        record.check("SERIAL-A", Pin("111111", "t"))


@pytest.mark.parametrize(
    "content",
    [
        "this is not json",
        '{"SERIAL-A": {"salt": "00',
        "",
        "\x00\x01\x02",
        pytest.param("[]", id="json-list"),
        pytest.param('"text"', id="json-string"),
        pytest.param('{"SERIAL-A": {}}', id="empty-entry"),
        pytest.param('{"SERIAL-A": "x"}', id="entry-not-object"),
        pytest.param('{"SERIAL-A": {"salt": "zz", "hash": "00", "at": 0}}',
                     id="salt-not-hex"),
        pytest.param('{"SERIAL-A": {"salt": "00"}}', id="entry-without-hash"),
    ],
)
def test_damaged_record_is_a_pin_error_not_silence(record: RejectedPins, content: str) -> None:
    record.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    record.path.write_text(content)
    os.chmod(record.path, 0o600)
    with pytest.raises(PinError) as e:
        record.check("SERIAL-A", Pin("000000", "t"))
    assert str(record.path) in str(e.value)
    # Nor does remembering silently replace the damaged evidence.
    with pytest.raises(PinError):
        record.remember("SERIAL-A", Pin("000000", "t"))
    assert record.path.read_text() == content

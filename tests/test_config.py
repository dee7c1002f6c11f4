"""Configuration: option > environment > file > default, every key's public name, and errors
that name the key *and* where the bad value came from (issue 2, "Configuration")."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest

from tm_hsm_agent import paths
from tm_hsm_agent.config import ENVIRONMENTS, KEYS, config_file_path, load_config
from tm_hsm_agent.errors import EXIT_CONFIG, ConfigError

PROD = "https://api.truemarkets.co/v1/auth"
UAT = "https://api.uat.truemarkets.co/v1/auth"
SANDBOX = "http://127.0.0.1:8080/v1/auth"


@pytest.fixture(autouse=True)
def hermetic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No TM_*/XDG variable of the machine leaks in; $HOME is a fresh directory."""
    for name in list(os.environ):
        if name.startswith(("TM_", "XDG_")) or name == "CREDENTIALS_DIRECTORY":
            monkeypatch.delenv(name)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


def toml(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# -- the public names --------------------------------------------------------------------

# Issue 2 names these environment variables as the public interface; the rest are the
# agent's (issues 3 and 4). A renamed variable breaks desks' unit files: pin them all.
PUBLIC_ENV = {
    "pkcs11_module": "TM_PKCS11_MODULE",
    "token_label": "TM_TOKEN_LABEL",
    "token_serial": "TM_TOKEN_SERIAL",
    "key_label": "TM_KEY_LABEL",
    "pin_file": "TM_PIN_FILE",
    "key_id": "TM_KEY_ID",
    "env": "TM_ENV",
    "auth_url": "TM_AUTH_URL",
    "jwks_url": "TM_JWKS_URL",
    "agent_socket": "TM_AGENT_SOCKET",
    "state_dir": "TM_STATE_DIR",
    "audit_log": "TM_AUDIT_LOG",
    "http_timeout": "TM_HTTP_TIMEOUT",
    "token_timeout": "TM_TOKEN_TIMEOUT",
    "backoff_cap": "TM_BACKOFF_CAP",
    "socket_group": "TM_SOCKET_GROUP",
    "allow_uids": "TM_ALLOW_UIDS",
    "allow_gids": "TM_ALLOW_GIDS",
}

# A valid environment spelling of every key, and the value it must parse to.
ENV_SAMPLES: dict[str, tuple[str, Any]] = {
    "pkcs11_module": ("/opt/hsm/libpkcs11.so", "/opt/hsm/libpkcs11.so"),
    "token_label": ("desk-token", "desk-token"),
    "token_serial": ("0123456789abcdef", "0123456789abcdef"),
    "key_label": ("desk-key", "desk-key"),
    "pin_file": ("/run/secrets/pin", "/run/secrets/pin"),
    "key_id": ("5f1c1a4e-0b1d-4c7e-9d0e-1f2a3b4c5d6e", "5f1c1a4e-0b1d-4c7e-9d0e-1f2a3b4c5d6e"),
    "env": ("UAT", "uat"),
    "auth_url": ("http://127.0.0.1:8080/v1/auth/", SANDBOX),
    "jwks_url": ("https://keys.example.com/jwks.json", "https://keys.example.com/jwks.json"),
    "agent_socket": ("/run/tm/agent.sock", "/run/tm/agent.sock"),
    "state_dir": ("/var/lib/tm", "/var/lib/tm"),
    "audit_log": ("/var/log/tm/audit.log", "/var/log/tm/audit.log"),
    "http_timeout": ("2.5", 2.5),
    "token_timeout": ("7", 7.0),
    "backoff_cap": ("1.5", 1.5),
    "socket_group": ("traders", "traders"),
    "allow_uids": ("1000, 1001 1002", (1000, 1001, 1002)),
    "allow_gids": ("50", (50,)),
}


def test_every_key_has_its_public_env_name() -> None:
    assert {k.name: k.env for k in KEYS} == PUBLIC_ENV
    assert set(ENV_SAMPLES) == set(PUBLIC_ENV), "add a sample for the new key"
    assert "pin" not in PUBLIC_ENV  # the PIN itself is never a config key (TM_PIN is read by pin.py)


@pytest.mark.parametrize("name", sorted(PUBLIC_ENV))
def test_each_env_name_sets_its_key(name: str, tmp_path: Path) -> None:
    raw, parsed = ENV_SAMPLES[name]
    cfg = load_config(environ={PUBLIC_ENV[name]: raw, "XDG_CONFIG_HOME": str(tmp_path)})
    assert cfg.values[name] == parsed
    assert cfg.source(name) == f"environment {PUBLIC_ENV[name]}"
    # Every other key kept its default.
    for other in KEYS:
        if other.name != name:
            assert cfg.values[other.name] == other.default, other.name
            assert cfg.source(other.name) == "default"


# -- precedence -------------------------------------------------------------------------

# (key, file TOML literal, file value, env string, env value, option string, option value, default)
PRECEDENCE = [
    ("key_label", '"file-key"', "file-key", "env-key", "env-key", "opt-key", "opt-key", "tm-api-key"),
    ("http_timeout", "1.25", 1.25, "2.5", 2.5, "3.75", 3.75, 10.0),
    ("backoff_cap", "9", 9.0, "8", 8.0, "0.5", 0.5, 4.0),
    ("auth_url", '"http://127.0.0.1:1/v1/auth"', "http://127.0.0.1:1/v1/auth",
     "http://127.0.0.1:2/v1/auth", "http://127.0.0.1:2/v1/auth",
     "https://auth.example.com/v1/auth", "https://auth.example.com/v1/auth", None),
    ("allow_uids", "[1, 2]", (1, 2), "3,4", (3, 4), "5 6", (5, 6), ()),
    ("agent_socket", '"/f.sock"', "/f.sock", "/e.sock", "/e.sock", "/o.sock", "/o.sock", None),
]


@pytest.mark.parametrize(
    ("key", "file_lit", "file_val", "env_raw", "env_val", "opt_raw", "opt_val", "default"),
    PRECEDENCE,
    ids=[p[0] for p in PRECEDENCE],
)
def test_precedence_option_env_file_default(
    tmp_path: Path, key: str, file_lit: str, file_val: Any, env_raw: str, env_val: Any,
    opt_raw: str, opt_val: Any, default: Any,
) -> None:
    env_name = PUBLIC_ENV[key]
    empty = toml(tmp_path, "", "empty.toml")
    cfg = load_config(empty, environ={})
    assert cfg.values[key] == default and cfg.source(key) == "default"

    path = toml(tmp_path, f"{key} = {file_lit}\n")
    cfg = load_config(path, environ={})
    assert cfg.values[key] == file_val
    assert cfg.source(key) == f"config file {path}"

    cfg = load_config(path, environ={env_name: env_raw})
    assert cfg.values[key] == env_val
    assert cfg.source(key) == f"environment {env_name}"

    option = f"option --{key.replace('_', '-')}"
    cfg = load_config(path, overrides={key: opt_raw}, environ={env_name: env_raw})
    assert cfg.values[key] == opt_val
    assert cfg.source(key) == option

    # An option left out (None, as click passes it) and an empty variable do not shadow lower layers.
    cfg = load_config(path, overrides={key: None}, environ={env_name: ""})
    assert cfg.values[key] == file_val


# -- where the file is --------------------------------------------------------------------


def test_config_path_precedence(tmp_path: Path) -> None:
    xdg = tmp_path / "xdg"
    (xdg / "tm-hsm-agent").mkdir(parents=True)
    default_file = toml(xdg / "tm-hsm-agent", 'key_label = "from-default"\n')
    env_file = toml(tmp_path, 'key_label = "from-env-path"\n', "env.toml")
    opt_file = toml(tmp_path, 'key_label = "from-option-path"\n', "opt.toml")
    environ = {"XDG_CONFIG_HOME": str(xdg)}

    assert config_file_path(None, environ) == default_file
    assert load_config(environ=environ).key_label == "from-default"

    environ["TM_HSM_AGENT_CONFIG"] = str(env_file)
    assert config_file_path(None, environ) == env_file
    cfg = load_config(environ=environ)
    assert cfg.key_label == "from-env-path" and cfg.path == env_file

    # --config beats TM_HSM_AGENT_CONFIG.
    assert config_file_path(opt_file, environ) == opt_file
    cfg = load_config(opt_file, environ=environ)
    assert cfg.key_label == "from-option-path" and cfg.path == opt_file


def test_missing_default_file_is_fine_but_a_named_one_is_not(tmp_path: Path) -> None:
    cfg = load_config(environ={"XDG_CONFIG_HOME": str(tmp_path / "nothing-here")})
    assert cfg.key_label == "tm-api-key"
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=f"{missing}.*does not exist"):
        load_config(environ={"TM_HSM_AGENT_CONFIG": str(missing)})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(missing, environ={})


def test_malformed_toml_names_the_file(tmp_path: Path) -> None:
    path = toml(tmp_path, "key_label = \n")
    with pytest.raises(ConfigError) as e:
        load_config(path, environ={})
    assert str(path) in str(e.value)


@pytest.fixture
def restore_logging():
    """cli.main() installs its own stderr handler on the root logger: put pytest's back."""
    root, urllib3 = logging.getLogger(), logging.getLogger("urllib3")
    handlers, level, urllib3_level = root.handlers[:], root.level, urllib3.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    urllib3.setLevel(urllib3_level)


def _records(state: Path, n: int) -> None:
    state.mkdir(parents=True)
    entries = ",".join(f'"s{i}": [{{"salt": "00", "hash": "00", "at": 0}}]' for i in range(n))
    (state / "rejected-pins.json").write_text("{" + entries + "}")


def test_cli_config_option_env_and_option_through_the_real_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], restore_logging
) -> None:
    """`--config PATH` and `--state-dir` reach load_config through the click front end.

    `pin forget` reports how many records it found in <state_dir>/rejected-pins.json: a
    different count in each layer's directory shows which layer won.
    """
    from tm_hsm_agent.cli import main

    file_state, env_state, opt_state = tmp_path / "f", tmp_path / "e", tmp_path / "o"
    _records(file_state, 1)
    _records(env_state, 2)
    _records(opt_state, 3)
    cfg_path = toml(tmp_path, f'state_dir = "{file_state}"\n', "desk.toml")

    def run(*args: str) -> tuple[int, str]:
        with pytest.raises(SystemExit) as e:
            main(list(args))
        return int(e.value.code or 0), capsys.readouterr().err

    code, err = run("--config", str(cfg_path), "pin", "forget")
    assert code == 0 and "forgot 1 " in err
    monkeypatch.setenv("TM_STATE_DIR", str(env_state))
    code, err = run("--config", str(cfg_path), "pin", "forget")
    assert code == 0 and "forgot 2 " in err
    code, err = run("--config", str(cfg_path), "--state-dir", str(opt_state), "pin", "forget")
    assert code == 0 and "forgot 3 " in err

    # TM_HSM_AGENT_CONFIG is honoured by the CLI too, and a bad file is one clear line, exit 3.
    bad = toml(tmp_path, "frobnicate = 1\n", "bad.toml")
    monkeypatch.setenv("TM_HSM_AGENT_CONFIG", str(bad))
    code, err = run("pin", "forget")
    assert code == EXIT_CONFIG
    assert "frobnicate" in err and str(bad) in err and "Traceback" not in err


# -- refusals -----------------------------------------------------------------------------


def test_unknown_file_key_is_refused(tmp_path: Path) -> None:
    path = toml(tmp_path, 'key_label = "k"\nkey_lable = "typo"\n')
    with pytest.raises(ConfigError) as e:
        load_config(path, environ={})
    assert "key_lable" in str(e.value) and str(path) in str(e.value)


def test_pin_in_the_config_file_is_refused(tmp_path: Path) -> None:
    path = toml(tmp_path, 'pin = "123456"\n')
    with pytest.raises(ConfigError) as e:
        load_config(path, environ={})
    assert "pin" in str(e.value) and "123456" not in str(e.value)


@pytest.mark.parametrize(
    ("key", "file_lit", "env_raw", "opt_raw"),
    [
        ("http_timeout", '"soon"', "soon", "soon"),
        ("http_timeout", "0", "0", "-1"),
        ("token_timeout", "true", "nan", "x"),
        ("env", '"staging"', "staging", "prod"),
        ("auth_url", '"http://auth.example.com/v1/auth"', "ftp://127.0.0.1/x", "not a url"),
        ("jwks_url", '"http://10.0.0.1/jwks.json"', "http://localhost.evil.example/jwks.json",
         "http://127.0.0.1@evil.example/jwks.json"),
        ("allow_uids", '["root"]', "a,b", "1 x"),
        ("key_label", '""', None, ""),
        ("key_label", "5", None, None),
    ],
)
def test_bad_value_names_key_and_source(
    tmp_path: Path, key: str, file_lit: str, env_raw: str | None, opt_raw: str | None
) -> None:
    env_name = PUBLIC_ENV[key]
    path = toml(tmp_path, f"{key} = {file_lit}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, environ={})
    assert f"{key} from config file {path}" in str(e.value)
    assert e.value.exit_code == EXIT_CONFIG

    empty = toml(tmp_path, "", "empty.toml")
    if env_raw is not None:
        with pytest.raises(ConfigError) as e:
            load_config(empty, environ={env_name: env_raw})
        assert f"{key} from environment {env_name}" in str(e.value)
    if opt_raw is not None:
        with pytest.raises(ConfigError) as e:
            load_config(empty, overrides={key: opt_raw}, environ={})
        assert f"{key} from option --{key.replace('_', '-')}" in str(e.value)


def test_the_winning_layer_is_the_one_validated(tmp_path: Path) -> None:
    """A bad value in a shadowed layer is not what the error blames (and a good top layer wins)."""
    path = toml(tmp_path, "http_timeout = 2\n")
    with pytest.raises(ConfigError, match="http_timeout from environment TM_HTTP_TIMEOUT"):
        load_config(path, environ={"TM_HTTP_TIMEOUT": "never"})
    cfg = load_config(path, overrides={"http_timeout": "3"}, environ={"TM_HTTP_TIMEOUT": "never"})
    assert cfg.http_timeout == 3.0


@pytest.mark.parametrize("raw", ["inf", "1e999"])
def test_infinite_timeout_is_refused(tmp_path: Path, raw: str) -> None:
    with pytest.raises(ConfigError, match="http_timeout from environment TM_HTTP_TIMEOUT"):
        load_config(toml(tmp_path, ""), environ={"TM_HTTP_TIMEOUT": raw})


def test_token_label_and_serial_together_are_refused(tmp_path: Path) -> None:
    path = toml(tmp_path, 'token_label = "desk"\n')
    with pytest.raises(ConfigError) as e:
        load_config(path, environ={"TM_TOKEN_SERIAL": "abc123"})
    msg = str(e.value)
    assert "token_label" in msg and "token_serial" in msg
    assert f"config file {path}" in msg and "environment TM_TOKEN_SERIAL" in msg
    # Either one alone is fine.
    assert load_config(path, environ={}).token_label == "desk"
    assert load_config(toml(tmp_path, "", "e.toml"), environ={"TM_TOKEN_SERIAL": "abc123"}).token_serial


# -- which API -----------------------------------------------------------------------------


def test_tm_env_maps_to_the_seed_urls(tmp_path: Path) -> None:
    assert ENVIRONMENTS == {"production": PROD, "uat": UAT}
    empty = toml(tmp_path, "")
    prod = load_config(empty, environ={"TM_ENV": "production"})
    assert prod.auth_url == PROD
    assert prod.jwks_url == "https://api.truemarkets.co/.well-known/jwks.json"
    uat = load_config(empty, environ={"TM_ENV": "uat"})
    assert uat.auth_url == UAT
    assert uat.jwks_url == "https://api.uat.truemarkets.co/.well-known/jwks.json"
    # TM_AUTH_URL overrides the environment's base URL.
    both = load_config(empty, environ={"TM_ENV": "production", "TM_AUTH_URL": SANDBOX})
    assert both.auth_url == SANDBOX


def test_no_api_selected_is_an_error_naming_both_variables(tmp_path: Path) -> None:
    cfg = load_config(toml(tmp_path, ""), environ={})
    for attr in ("auth_url", "jwks_url"):
        with pytest.raises(ConfigError) as e:
            getattr(cfg, attr)
        assert "TM_ENV" in str(e.value) and "TM_AUTH_URL" in str(e.value)


@pytest.mark.parametrize(
    ("auth_url", "jwks"),
    [
        ("http://127.0.0.1:8080/v1/auth", "http://127.0.0.1:8080/.well-known/jwks.json"),
        ("https://auth.example.com:8443/deep/v1/auth/", "https://auth.example.com:8443/.well-known/jwks.json"),
        ("http://[::1]:9000/v1/auth", "http://[::1]:9000/.well-known/jwks.json"),
    ],
)
def test_jwks_default_is_the_auth_origin(tmp_path: Path, auth_url: str, jwks: str) -> None:
    cfg = load_config(toml(tmp_path, ""), environ={"TM_AUTH_URL": auth_url})
    assert cfg.jwks_url == jwks
    explicit = load_config(toml(tmp_path, ""), environ={"TM_AUTH_URL": auth_url,
                                                        "TM_JWKS_URL": "https://k.example.com/j"})
    assert explicit.jwks_url == "https://k.example.com/j"


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:8080/v1/auth", "http://localhost:1/v1/auth", "http://[::1]:8080/v1/auth",
     "http://127.9.9.9/v1/auth", "HTTP://127.0.0.1/v1/auth", "https://api.example.com/v1/auth"],
)
def test_http_to_loopback_or_https_anywhere_is_accepted(tmp_path: Path, url: str) -> None:
    assert load_config(toml(tmp_path, ""), environ={"TM_AUTH_URL": url}).auth_url == url


@pytest.mark.parametrize(
    "url",
    ["http://api.truemarkets.co/v1/auth", "http://10.1.2.3/v1/auth", "http://192.168.0.1:8080/v1/auth",
     "http://localhost.evil.example/v1/auth", "http://127.0.0.1@evil.example/v1/auth",
     "http://0.0.0.0:8080/v1/auth"],
)
def test_plain_http_off_loopback_is_refused(tmp_path: Path, url: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(toml(tmp_path, ""), environ={"TM_AUTH_URL": url})
    assert "auth_url from environment TM_AUTH_URL" in str(e.value)
    assert "loopback" in str(e.value) or "http(s) URL" in str(e.value)


# -- XDG defaults ----------------------------------------------------------------------------


def test_xdg_defaults(tmp_path: Path, hermetic: Path) -> None:
    env = {"XDG_CONFIG_HOME": str(tmp_path / "c"), "XDG_STATE_HOME": str(tmp_path / "s"),
           "XDG_RUNTIME_DIR": str(tmp_path / "r")}
    assert paths.config_dir(env) == tmp_path / "c" / "tm-hsm-agent"
    assert paths.state_dir(env) == tmp_path / "s" / "tm-hsm-agent"
    assert paths.runtime_dir(env) == tmp_path / "r" / "tm-hsm-agent"
    assert paths.default_socket(env) == tmp_path / "r" / "tm-hsm-agent" / "agent.sock"
    assert config_file_path(None, env) == tmp_path / "c" / "tm-hsm-agent" / "config.toml"

    # Unset: $HOME/.config, $HOME/.local/state, and a per-user directory under the temp dir.
    assert paths.config_dir({}) == hermetic / ".config" / "tm-hsm-agent"
    assert paths.state_dir({}) == hermetic / ".local" / "state" / "tm-hsm-agent"
    assert paths.runtime_dir({}).name == f"tm-hsm-agent-{os.getuid()}"


def test_relative_xdg_paths_are_ignored(hermetic: Path) -> None:
    env = {"XDG_CONFIG_HOME": "rel/config", "XDG_STATE_HOME": "./state",
           "XDG_RUNTIME_DIR": "run"}
    assert paths.config_dir(env) == hermetic / ".config" / "tm-hsm-agent"
    assert paths.state_dir(env) == hermetic / ".local" / "state" / "tm-hsm-agent"
    assert paths.runtime_dir(env).is_absolute()
    assert paths.runtime_dir(env).name == f"tm-hsm-agent-{os.getuid()}"


def test_config_paths_default_under_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    cfg = load_config(toml(tmp_path, ""))
    assert cfg.state_path == tmp_path / "state" / "tm-hsm-agent"
    assert cfg.audit_path == tmp_path / "state" / "tm-hsm-agent" / "audit.log"
    assert cfg.socket_path == tmp_path / "run" / "tm-hsm-agent" / "agent.sock"
    # Explicit keys win over the XDG defaults.
    explicit = {"TM_STATE_DIR": "/srv/tm", "TM_AGENT_SOCKET": "/srv/a.sock"}
    cfg = load_config(toml(tmp_path, ""), environ=explicit)
    assert cfg.state_path == Path("/srv/tm") and cfg.audit_path == Path("/srv/tm/audit.log")
    assert cfg.socket_path == Path("/srv/a.sock")
    cfg = load_config(toml(tmp_path, ""), environ={"TM_AUDIT_LOG": "/srv/audit.jsonl"})
    assert cfg.audit_path == Path("/srv/audit.jsonl")


def test_config_paths_follow_the_environ_it_was_loaded_from(tmp_path: Path) -> None:
    environ = {"XDG_CONFIG_HOME": str(tmp_path / "c"), "XDG_STATE_HOME": str(tmp_path / "s"),
               "XDG_RUNTIME_DIR": str(tmp_path / "r")}
    cfg = load_config(environ=environ)
    assert cfg.path == tmp_path / "c" / "tm-hsm-agent" / "config.toml"  # honoured
    assert cfg.state_path == tmp_path / "s" / "tm-hsm-agent"  # not honoured today
    assert cfg.socket_path == tmp_path / "r" / "tm-hsm-agent" / "agent.sock"


# -- profiles --------------------------------------------------------------------------------

PROFILES = f"""
key_label = "top-key"
env = "production"
http_timeout = 3

[profiles.uat]
env = "uat"
key_label = "uat-key"

[profiles.sandbox]
auth_url = "{SANDBOX}"
"""


def test_profiles_select_a_table_over_the_top_level(tmp_path: Path) -> None:
    path = toml(tmp_path, PROFILES)
    top = load_config(path, environ={})
    assert (top.key_label, top.auth_url, top.http_timeout) == ("top-key", PROD, 3.0)

    uat = load_config(path, environ={}, profile="uat")
    assert (uat.key_label, uat.auth_url, uat.http_timeout) == ("uat-key", UAT, 3.0)
    assert uat.source("key_label") == f"config file {path}"

    sand = load_config(path, environ={}, profile="sandbox")
    assert (sand.key_label, sand.auth_url) == ("top-key", SANDBOX)

    # The environment still beats the profile.
    assert load_config(path, environ={"TM_KEY_LABEL": "e"}, profile="uat").key_label == "e"


def test_unknown_profile_and_unknown_key_in_a_profile_are_refused(tmp_path: Path) -> None:
    path = toml(tmp_path, PROFILES)
    with pytest.raises(ConfigError) as e:
        load_config(path, environ={}, profile="staging")
    assert "profiles.staging" in str(e.value) and str(path) in str(e.value)

    bad = toml(tmp_path, '[profiles.uat]\nenv = "uat"\nkey_lable = "x"\n', "bad.toml")
    with pytest.raises(ConfigError, match="key_lable"):
        load_config(bad, environ={}, profile="uat")
    bad_value = toml(tmp_path, '[profiles.uat]\nenv = "staging"\n', "bad2.toml")
    with pytest.raises(ConfigError, match=f"env from config file {bad_value}"):
        load_config(bad_value, environ={}, profile="uat")


def test_a_requested_profile_without_any_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="profiles.uat"):
        load_config(environ={"XDG_CONFIG_HOME": str(tmp_path / "none"), "TM_ENV": "production"},
                    profile="uat")

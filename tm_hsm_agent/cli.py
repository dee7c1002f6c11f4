"""The command line: a thin shell over the library, with one error funnel in ``main``."""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import Any

import click
from cryptography.hazmat.primitives import serialization

from tm_hsm_agent import __version__, app, jose, logsetup
from tm_hsm_agent.config import KEYS, Config, load_config
from tm_hsm_agent.errors import EXIT_USAGE, ConfigError, TmHsmError


class Ctx:
    def __init__(self, config_path: str | None, overrides: dict[str, Any]) -> None:
        self._path = config_path
        self._overrides = overrides
        self._cfg: Config | None = None

    @property
    def cfg(self) -> Config:
        if self._cfg is None:
            self._cfg = load_config(self._path, self._overrides)
        return self._cfg


def _config_options(fn: Any) -> Any:
    for key in reversed(KEYS):
        fn = click.option(
            f"--{key.name.replace('_', '-')}",
            key.name,
            default=None,
            help=f"{key.help} [env {key.env}]",
        )(fn)
    return fn


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="config file [env TM_HSM_AGENT_CONFIG; default $XDG_CONFIG_HOME/tm-hsm-agent/config.toml]")
@click.option("-v", "--verbose", count=True, help="more log output on stderr (-vv for debug)")
@_config_options
@click.version_option(__version__, prog_name="tm-hsm-agent")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, verbose: int, **overrides: Any) -> None:
    """Mint True Markets API tokens with a P-256 key kept on a PKCS#11 token."""
    logsetup.setup(verbose)
    ctx.obj = Ctx(config_path, overrides)


def _prompt(label: str) -> str:
    return str(click.prompt(label, hide_input=True, err=True))


@cli.command()
@click.option("--cka-id", default=None,
              help="CKA_ID in hex for both halves (ykcs11 maps it to a PIV slot); default random")
@click.pass_obj
def keygen(obj: Ctx, cka_id: str | None) -> None:
    """Generate the EC P-256 key pair on the token (refuses to overwrite one)."""
    ident = None
    if cka_id is not None:
        try:
            ident = bytes.fromhex(cka_id)
        except ValueError:
            raise ConfigError(f"--cka-id {cka_id!r} is not hex") from None
    token = app.open_token(obj.cfg, rw=True, prompt=_prompt)
    try:
        info = token.generate_key(ident)
    finally:
        token.close()
    click.echo(
        f"generated P-256 key '{info.label}' (CKA_ID {info.cka_id.hex()}) on token "
        f"'{info.token_label}' serial {info.token_serial}\nJWK thumbprint: {info.thumbprint}\n"
        "Next: `tm-hsm-agent pubkey --format pem` and register it on the API Keys page.",
        err=True,
    )


@cli.command()
@click.option("--format", "fmt", type=click.Choice(["pem", "jwk"]), default="pem", show_default=True)
@click.pass_obj
def pubkey(obj: Ctx, fmt: str) -> None:
    """Print the public key: SubjectPublicKeyInfo PEM (for registration) or JWK."""
    token = app.open_token(obj.cfg, prompt=_prompt)
    try:
        info = token.key_info()
    finally:
        token.close()
    if fmt == "pem":
        pem = info.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        click.echo(pem.decode(), nl=False)
    else:
        jwk = {**jose.ec_jwk(info.public_key), "alg": "ES256", "use": "sig", "kid": info.thumbprint}
        click.echo(json.dumps({"jwk": jwk, "thumbprint": info.thumbprint}, indent=2))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="print the whole API answer")
@click.pass_obj
def mint(obj: Ctx, as_json: bool) -> None:
    """One shot: sign a challenge on the token, mint, verify, print the access token."""
    token = app.open_token(obj.cfg, prompt=_prompt)
    try:
        tokens, _claims = app.mint_once(obj.cfg, token)
    finally:
        token.close()
    if as_json:
        click.echo(json.dumps(tokens.answer, indent=2))  # the API's answer, as received
    else:
        click.echo(tokens.access_token)


@cli.command()
@click.argument("token", default="-")
@click.option("--ignore-exp", is_flag=True, help="check the signature only, not expiry")
@click.pass_obj
def verify(obj: Ctx, token: str, ignore_exp: bool) -> None:
    """Check a JWT (argument, or '-' for stdin) against the JWKS and print its claims."""
    from tm_hsm_agent.auth import JwksVerifier

    if token == "-":
        token = sys.stdin.read().strip()
    jwt = JwksVerifier(app.auth_client(obj.cfg)).verify(token, check_exp=not ignore_exp)
    click.echo(json.dumps({"header": jwt.header, "claims": jwt.claims}, indent=2))


@cli.command()
@click.option("--prefetch", is_flag=True, help="mint at start instead of on first demand")
@click.option("--no-verify", is_flag=True, help="do not check minted tokens against the JWKS")
@click.pass_obj
def serve(obj: Ctx, prefetch: bool, no_verify: bool) -> None:
    """Run the agent in the foreground: serve tokens on the Unix socket until SIGTERM."""
    from tm_hsm_agent.agent import AgentOptions, run_agent

    logsetup.at_least_info()  # a service says what it is doing without -v
    run_agent(obj.cfg, AgentOptions(prefetch=prefetch, verify_tokens=not no_verify), prompt=_prompt)


@cli.command("token")
@click.option("--json", "as_json", is_flag=True, help="print the agent's whole answer")
@click.option("--header", "as_header", is_flag=True, help="print 'Authorization: Bearer …'")
@click.pass_obj
def token_cmd(obj: Ctx, as_json: bool, as_header: bool) -> None:
    """Ask the running agent for the current access token."""
    from tm_hsm_agent import client

    if as_json and as_header:
        raise click.UsageError("choose one of --json and --header")
    info = client.get_token_info(obj.cfg.socket_path)
    if as_json:
        click.echo(json.dumps(info, separators=(",", ":")))
    elif as_header:
        click.echo(f"Authorization: Bearer {info['access_token']}")
    else:
        click.echo(info["access_token"])


@cli.command()
@click.pass_obj
def status(obj: Ctx) -> None:
    """Print the running agent's status."""
    from tm_hsm_agent import client

    click.echo(json.dumps(client.status(obj.cfg.socket_path), indent=2))


@cli.command("systemd-unit")
@click.option("--socket", "which", flag_value="socket", help="print the .socket unit instead")
def systemd_unit(which: str | None) -> None:
    """Print the hardened systemd user unit (or its socket unit) shipped with the package."""
    from importlib.resources import files

    name = "tm-hsm-agent.socket" if which == "socket" else "tm-hsm-agent.service"
    click.echo(files("tm_hsm_agent").joinpath("data", name).read_text(), nl=False)


@cli.group()
def identity() -> None:
    """The token serial and key fingerprint pinned at first use."""


@identity.command("show")
@click.pass_obj
def identity_show(obj: Ctx) -> None:
    """Print the pinned identities."""
    path = obj.cfg.state_path / "identity.json"
    click.echo(path.read_text() if path.exists() else "{}")


@identity.command("reset")
@click.pass_obj
def identity_reset(obj: Ctx) -> None:
    """Forget the pinned identity of the configured token/key (a replacement was intended)."""
    from tm_hsm_agent.token import IdentityPins

    token = app.open_token(obj.cfg)
    try:
        done = IdentityPins(obj.cfg.state_path / "identity.json").reset(token.identity_name)
    finally:
        token.close()
    click.echo(f"{'forgot' if done else 'no'} pinned identity for {token.identity_name}", err=True)


@cli.group()
def pin() -> None:
    """The remembered rejected PIN."""


@pin.command("forget")
@click.option("--serial", default=None, help="only this token's record (default: all)")
@click.pass_obj
def pin_forget(obj: Ctx, serial: str | None) -> None:
    """Forget PINs a token refused, so the configured PIN is presented again (once)."""
    from tm_hsm_agent.pin import RejectedPins

    count = RejectedPins(obj.cfg.state_path / "rejected-pins.json").forget(serial)
    click.echo(f"forgot {count} rejected-PIN record(s)", err=True)


@cli.group()
def sandbox() -> None:
    """A faithful local copy of the Auth API, for tests, the demo and offline rehearsal."""


@sandbox.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True, type=int, help="0 picks a free port")
@click.option("--access-ttl", default=300.0, show_default=True, type=float, help="seconds")
@click.option("--refresh-ttl", default=3600.0, show_default=True, type=float, help="seconds")
@click.option("--clock-offset", default=0.0, show_default=True, type=float,
              help="run the server clock this many seconds ahead (negative: behind)")
@click.option("--alg", type=click.Choice(["RS256", "ES256"]), default="RS256", show_default=True)
@click.option("--port-file", type=click.Path(dir_okay=False), default=None,
              help="write the bound port here once listening (for scripts)")
def sandbox_serve(host: str, port: int, access_ttl: float, refresh_ttl: float,
                  clock_offset: float, alg: str, port_file: str | None) -> None:
    """Run the sandbox Auth API until interrupted."""
    import signal

    from tm_hsm_agent.sandbox import SandboxOptions, SandboxServer

    logsetup.at_least_info()  # each refusal's cause is logged (the 401 itself does not say)
    opts = SandboxOptions(access_ttl=access_ttl, refresh_ttl=refresh_ttl,
                          clock_offset=clock_offset, alg=alg)
    server = SandboxServer(host, port, opts)
    click.echo(f"sandbox Auth API at {server.url} (JWKS {server.jwks_url}); "
               f"register keys with `tm-hsm-agent sandbox register --url {server.origin} PEM`",
               err=True)
    if port_file:
        Path(port_file).write_text(f"{server.origin.rsplit(':', 1)[1]}\n")

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # leaves serve_forever, closes the server, exits 0

    signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()


@sandbox.command("register")
@click.argument("pem_file", type=click.File("r"), default="-")
@click.option("--url", "origin", default="http://127.0.0.1:8080", show_default=True,
              help="sandbox origin")
def sandbox_register(pem_file: Any, origin: str) -> None:
    """Register a public key PEM with the sandbox; print its key_id."""
    from tm_hsm_agent.sandbox import register_key

    click.echo(register_key(origin.rstrip("/"), pem_file.read()))


@sandbox.command("fault")
@click.option("--url", "origin", default="http://127.0.0.1:8080", show_default=True, help="sandbox origin")
@click.option("--mode", default="status", show_default=True,
              type=click.Choice(["status", "delay", "reset", "malformed_json", "wrong_content_type"]))
@click.option("--status", "status_code", type=int, default=503, show_default=True,
              help="HTTP status for --mode status (5xx, 429...)")
@click.option("--count", type=int, default=None, help="fail the next N requests (-1: until cleared)")
@click.option("--rate", type=float, default=None, help="fail each request with this probability")
@click.option("--retry-after", type=float, default=None, help="Retry-After seconds to send")
@click.option("--delay", type=float, default=None, help="seconds to stall for --mode delay")
@click.option("--endpoint", "endpoints", multiple=True, type=click.Choice(["mint", "refresh", "jwks"]),
              help="limit to these endpoints (repeatable; default all)")
@click.option("--clear", is_flag=True, help="remove the fault")
def sandbox_fault(origin: str, mode: str, status_code: int, count: int | None, rate: float | None,
                  retry_after: float | None, delay: float | None, endpoints: tuple[str, ...],
                  clear: bool) -> None:
    """Make a running sandbox misbehave (or behave again with --clear)."""
    from tm_hsm_agent.sandbox import admin

    origin = origin.rstrip("/")
    if clear:
        click.echo(json.dumps(admin(origin, "/admin/faults", method="DELETE")))
        return
    spec: dict[str, Any] = {"mode": mode}
    if mode == "status":
        spec["status"] = status_code
    for key, value in (("count", count), ("rate", rate), ("retry_after", retry_after),
                       ("delay", delay)):
        if value is not None:
            spec[key] = value
    if endpoints:
        spec["endpoints"] = list(endpoints)
    click.echo(json.dumps(admin(origin, "/admin/faults", spec)))


@sandbox.command("revoke")
@click.option("--url", "origin", default="http://127.0.0.1:8080", show_default=True, help="sandbox origin")
@click.option("--key-id", default=None, help="only this key's tokens (required for --what key)")
@click.option("--what", type=click.Choice(["refresh", "key"]), default="refresh", show_default=True)
def sandbox_revoke(origin: str, key_id: str | None, what: str) -> None:
    """Revoke outstanding refresh tokens (or a whole key) on a running sandbox."""
    from tm_hsm_agent.sandbox import admin

    body: dict[str, Any] = {"what": what}
    if key_id:
        body["key_id"] = key_id
    click.echo(json.dumps(admin(origin.rstrip("/"), "/admin/revoke", body)))


def main(argv: list[str] | None = None) -> None:
    """The error funnel: typed errors become one line and an exit code."""
    try:
        cli.main(args=argv, prog_name="tm-hsm-agent", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("tm-hsm-agent: aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(EXIT_USAGE if isinstance(e, click.UsageError) else e.exit_code)
    except TmHsmError as e:
        click.echo(f"tm-hsm-agent: error: {logsetup.redact(str(e))}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(1)
    except Exception:  # noqa: BLE001 - the funnel's last resort shows the traceback
        traceback.print_exc()
        click.echo("tm-hsm-agent: unexpected error (a bug); please report it", err=True)
        sys.exit(1)
    sys.exit(0)

"""The `stacyvm` command: run the server, talk to it, check the host, manage images."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import httpx
import typer

from stacyvm_server import __version__
from stacyvm_server.config import Settings, load_settings

app = typer.Typer(no_args_is_help=True, add_completion=False, help="StacyVM: sandboxes for AI agents.")
image_app = typer.Typer(no_args_is_help=True, help="Manage the local image cache.")
app.add_typer(image_app, name="image")
microvm_app = typer.Typer(no_args_is_help=True, help="The microvm provider's guest assets.")
app.add_typer(microvm_app, name="microvm")

ConfigOpt = typer.Option(None, "--config", "-c", help="Path to stacyvm.yaml", envvar="STACYVM_CONFIG")
UrlOpt = typer.Option("http://127.0.0.1:7423", "--url", envvar="STACYVM_URL", help="Server URL")
KeyOpt = typer.Option(None, "--api-key", envvar="STACYVM_API_KEY", help="API key")
UserOpt = typer.Option(None, "--user", envvar="STACYVM_USER_ID", help="Act as this owner (X-User-ID)")


def _fail(message: str, code: int = 1) -> NoReturn:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _settings(config: Path | None) -> Settings:
    try:
        return load_settings(config)
    except Exception as exc:
        _fail(f"bad configuration: {exc}")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@app.command()
def serve(
    config: Path | None = ConfigOpt,
    host: str | None = typer.Option(None, help="Listen address (default from config: 0.0.0.0)"),
    port: int | None = typer.Option(None, help="Listen port (default 7423)"),
    allow_unauthenticated_remote: bool = typer.Option(
        False, "--allow-unauthenticated-remote", help="Listen on a non-loopback address without API keys"
    ),
) -> None:
    """Run the API server."""
    import uvicorn

    from stacyvm_server.core.server import Core
    from stacyvm_server.http.app import create_app

    settings = _settings(config)
    logging.basicConfig(
        level=settings.server.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    explicit_host = host is not None or "host" in settings.server.model_fields_set
    bind = host or settings.server.host
    if not settings.auth.enabled and not _is_loopback(bind):
        if allow_unauthenticated_remote or settings.server.allow_unauthenticated_remote:
            typer.secho(f"WARNING: no API keys configured and listening on {bind}: anyone can run code here.",
                        fg=typer.colors.YELLOW, err=True)
        elif explicit_host:
            _fail(
                f"refusing to listen on {bind} without API keys: set auth.api_key (STACYVM_AUTH_API_KEY) "
                "or pass --allow-unauthenticated-remote"
            )
        else:
            bind = "127.0.0.1"
            typer.secho("No API keys configured: listening on 127.0.0.1 only. Set STACYVM_AUTH_API_KEY to "
                        "serve other hosts.", fg=typer.colors.YELLOW, err=True)
    try:
        core = Core(settings)
    except Exception as exc:
        _fail(f"cannot start: {exc}")
    uvicorn.run(
        create_app(core),
        host=bind,
        port=port or settings.server.port,
        log_level=settings.server.log_level,
        timeout_graceful_shutdown=10,
        # Measured here: uvloop's process spawn costs 3-4 ms more per `crun exec` than
        # asyncio's (vfork-based) one, and every exec and create spawns the runtime.
        loop="asyncio",
    )


# client commands -------------------------------------------------------------------
def _client(url: str, api_key: str | None, user: str | None, timeout: float | None = 60.0) -> httpx.Client:
    headers = {}
    if api_key:
        headers["X-API-Key"] = api_key
    if user:
        headers["X-User-ID"] = user
    return httpx.Client(base_url=url.rstrip("/") + "/api/v1", headers=headers, timeout=timeout)


def _call(client: httpx.Client, method: str, path: str, **kw: Any) -> Any:
    try:
        resp = client.request(method, path, **kw)
    except httpx.ConnectError:
        _fail(f"cannot reach the server at {client.base_url} (is `stacyvm serve` running?)")
    if resp.is_error:
        try:
            body = resp.json()
            _fail(f"{body.get('message', resp.text)} ({resp.status_code} {body.get('code', '')})")
        except ValueError:
            _fail(f"{resp.status_code}: {resp.text.strip()}")
    return resp.json() if resp.content else None


@app.command()
def spawn(
    image: str | None = typer.Option(None, help="Image reference (server default if omitted)"),
    provider: str | None = typer.Option(None),
    memory_mb: int | None = typer.Option(None, "--memory"),
    vcpus: int | None = typer.Option(None),
    ttl: str | None = typer.Option(None, help="Go duration, e.g. 10m"),
    network: str | None = typer.Option(None, help="none or bridge"),
    url: str = UrlOpt,
    api_key: str | None = KeyOpt,
    user: str | None = UserOpt,
) -> None:
    """Create a sandbox and print its id."""
    body = {k: v for k, v in {"image": image, "provider": provider, "memory_mb": memory_mb, "vcpus": vcpus,
                              "ttl": ttl, "network": network}.items() if v is not None}
    with _client(url, api_key, user, timeout=300) as c:
        sb = _call(c, "POST", "/sandboxes", json=body)
    typer.echo(sb["id"])


@app.command(name="exec", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def exec_(
    ctx: typer.Context,
    sandbox_id: str = typer.Argument(...),
    shell: bool = typer.Option(False, "--shell", help="Run the words as one shell command line"),
    timeout: str | None = typer.Option(None, help="Go duration, e.g. 30s"),
    workdir: str | None = typer.Option(None),
    interactive: bool = typer.Option(False, "-i", "--interactive", help="Send our stdin (WebSocket)"),
    tty: bool = typer.Option(False, "-t", "--tty", help="A terminal: raw mode, Ctrl-C and resizes go through"),
    url: str = UrlOpt,
    api_key: str | None = KeyOpt,
    user: str | None = UserOpt,
) -> None:
    """Run a command in a sandbox (argv by default), stream its output, exit with its code."""
    words = [w for w in ctx.args if w != "--"]
    if not words:
        _fail("nothing to run: stacyvm exec SANDBOX -- COMMAND [ARGS...]")
    if interactive or tty:
        from stacyvm_server import cli_ws

        start: dict[str, Any] = {"mode": "shell", "command": " ".join(words)} if shell else {
            "mode": "argv", "command": words[0], "args": words[1:]}
        if timeout:
            start["timeout"] = timeout
        if workdir:
            start["workdir"] = workdir
        headers = {k: v for k, v in (("X-API-Key", api_key), ("X-User-ID", user)) if v}
        raise typer.Exit(cli_ws.run(url, headers, sandbox_id, start, tty))
    body: dict[str, Any] = {"stream": True, "report_exit": True}
    if shell:
        body.update(mode="shell", command=" ".join(words))
    else:
        body.update(mode="argv", command=words[0], args=words[1:])
    if timeout:
        body["timeout"] = timeout
    if workdir:
        body["workdir"] = workdir
    code = 0
    with _client(url, api_key, user, timeout=None) as c:
        try:
            with c.stream("POST", f"/sandboxes/{sandbox_id}/exec", json=body) as resp:
                if resp.is_error:
                    resp.read()
                    _call_error(resp)
                for line in resp.iter_lines():
                    if not line.strip():
                        continue
                    chunk = json.loads(line)
                    if chunk.get("stream") == "exit":
                        code = int(chunk["exit_code"])
                    else:
                        out = sys.stderr if chunk.get("stream") == "stderr" else sys.stdout
                        out.write(chunk.get("data", ""))
                        out.flush()
        except httpx.ConnectError:
            _fail(f"cannot reach the server at {url}")
    raise typer.Exit(code)


def _call_error(resp: httpx.Response) -> NoReturn:
    try:
        body = resp.json()
        _fail(f"{body.get('message')} ({resp.status_code} {body.get('code')})")
    except ValueError:
        _fail(f"{resp.status_code}: {resp.text.strip()}")


@app.command(name="ls")
def ls_(url: str = UrlOpt, api_key: str | None = KeyOpt, user: str | None = UserOpt) -> None:
    """List sandboxes."""
    with _client(url, api_key, user) as c:
        items = _call(c, "GET", "/sandboxes")
    if not items:
        typer.echo("no sandboxes")
        return
    typer.echo(f"{'ID':<18} {'STATE':<10} {'PROVIDER':<8} {'EXPIRES':<22} IMAGE")
    for sb in items:
        typer.echo(f"{sb['id']:<18} {sb['state']:<10} {sb['provider']:<8} {sb['expires_at']:<22} {sb['image']}")


@app.command()
def kill(
    sandbox_ids: list[str] = typer.Argument(..., help="Sandbox ids to destroy"),
    url: str = UrlOpt,
    api_key: str | None = KeyOpt,
    user: str | None = UserOpt,
) -> None:
    """Destroy sandboxes."""
    with _client(url, api_key, user) as c:
        for sid in sandbox_ids:
            _call(c, "DELETE", f"/sandboxes/{sid}")
            typer.echo(f"destroyed {sid}")


@app.command()
def logs(
    sandbox_id: str,
    lines: int = typer.Option(100, "--lines", "-n"),
    url: str = UrlOpt,
    api_key: str | None = KeyOpt,
    user: str | None = UserOpt,
) -> None:
    """Show the last lines of a sandbox's main process output."""
    with _client(url, api_key, user) as c:
        for line in _call(c, "GET", f"/sandboxes/{sandbox_id}/logs", params={"lines": lines}):
            typer.echo(line)


@app.command()
def doctor(
    config: Path | None = ConfigOpt,
    fix: bool = typer.Option(False, "--fix", help="Apply the safe fixes"),
) -> None:
    """Check this host for each provider; explain what is missing and how to fix it."""
    from stacyvm_server.providers.native import host

    settings = _settings(config)
    problems = asyncio.run(host.fix_host(settings)) if fix else host.check_host(settings)
    bad = 0
    typer.echo("native provider:")
    for p in problems:
        mark = typer.style("ok  ", fg=typer.colors.GREEN) if p.ok else typer.style("FAIL", fg=typer.colors.RED)
        typer.echo(f"  [{mark}] {p.name}: {p.detail}")
        if not p.ok:
            bad += 1
            typer.echo(f"         fix: {p.fix_description}")
    if bad:
        typer.echo(f"{bad} problem(s). Run `stacyvm doctor --fix` as root to apply the safe fixes.")
        raise typer.Exit(1)
    typer.echo("all checks passed")


@app.command()
def version() -> None:
    """Print the server version."""
    typer.echo(f"stacyvm-server {__version__}")


# images ------------------------------------------------------------------------------
def _images(config: Path | None) -> Any:
    from stacyvm_server.images.store import ImageStore

    settings = _settings(config)
    return ImageStore(settings.images_dir, settings.images)


def _run(coro: Any) -> Any:
    try:
        return asyncio.run(coro)
    except Exception as exc:
        _fail(str(exc))


@image_app.command("pull")
def image_pull(ref: str, config: Path | None = ConfigOpt) -> None:
    """Pull an image into the cache."""
    img = _run(_images(config).pull(ref))
    typer.echo(f"{img.ref} {img.digest}")


@image_app.command("import")
def image_import(path: Path, ref: str, config: Path | None = ConfigOpt) -> None:
    """Import a docker-save tar, an OCI layout, or a rootfs tar under the name REF."""
    img = _run(_images(config).import_archive(path, ref))
    typer.echo(f"{img.ref} {img.digest}")


@image_app.command("ls")
def image_ls(config: Path | None = ConfigOpt) -> None:
    """List cached images."""
    for img in _images(config).list():
        typer.echo(f"{img.ref:<60} {img.digest[:19]} {img.size / 1e6:8.1f} MB")


@image_app.command("rm")
def image_rm(ref: str, config: Path | None = ConfigOpt) -> None:
    """Remove an image reference from the cache."""
    _run(_images(config).remove(ref))
    typer.echo(f"removed {ref}")


@image_app.command("prune")
def image_prune(config: Path | None = ConfigOpt) -> None:
    """Delete cached data no image uses."""
    freed = _run(_images(config).prune())
    typer.echo(f"freed {freed / 1e6:.1f} MB")


@microvm_app.command("build-assets")
def microvm_build_assets(
    config: Path | None = ConfigOpt,
    dest: Path | None = typer.Option(None, help="Output directory (default: microvm.assets_dir)"),
    force: bool = typer.Option(False, help="Rebuild even when the assets are current"),
) -> None:
    """Build the guest kernel and initramfs from Debian packages (apt-get download)."""
    from stacyvm_server.providers.microvm import assets

    settings = load_settings(config)
    out = dest or settings.microvm.assets_dir or settings.microvm_dir / "assets"
    try:
        built = assets.build(out, typer.echo, force=force)
    except (RuntimeError, OSError) as exc:
        typer.echo(f"build-assets failed: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"kernel {built.kernel} ({built.kernel_release}), initramfs {built.initrd}, id {built.assets_id}")


def main() -> None:
    if os.environ.get("STACYVM_DEBUG"):
        logging.basicConfig(level=logging.DEBUG)
    app()

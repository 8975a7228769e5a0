"""Command line: a thin shell over the config model and the runtime.

Exit codes: 0 clean stop, 1 failure at run time, 2 bad configuration or usage.
This is the only module that picks them.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any

import typer

from albatross.config import Config, ConfigError, config_from_mapping, load_config
from albatross.runtime.app import App, EngineFiles

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Albatross: LLM streams that survive."
)

EXIT_FAILURE = 1
EXIT_CONFIG = 2


def _resolve_files(config: Config) -> EngineFiles:
    """Locate (or build, once) what managed replicas need. Raises ConfigError."""
    from albatross.engines.embedded_model import embedded_model_path
    from albatross.engines.llama_build import llama_server_binary

    managed = [(i, m) for i, m in enumerate(config.models) if m.replicas > 0]
    llama = any(m.engine == "llama-server" for _, m in managed)
    binary = llama_server_binary(config.llama_server) if llama else None
    vllm_python = _vllm_python(config) if any(m.engine == "vllm" for _, m in managed) else None
    paths: dict[str, Path] = {}
    for i, m in managed:
        if m.engine == "vllm":
            if m.path is None or not (m.path / "config.json").is_file():
                raise ConfigError(
                    "config",
                    [
                        f"models.{i}.path = {str(m.path) if m.path else None!r}: "
                        "engine = 'vllm' needs a Hugging Face model directory (with config.json)"
                    ],
                )
            paths[m.name] = m.path
            continue
        p = m.path if m.path is not None else embedded_model_path()
        if not p.is_file():
            raise ConfigError("config", [f"models.{i}.path = {str(p)!r}: file does not exist"])
        paths[m.name] = p
    return EngineFiles(binary, paths, vllm_python)


def _vllm_python(config: Config) -> Path:
    from albatross.engines.vllm_install import installed_python

    python = config.vllm.python or installed_python()
    if python is None or not python.is_file():
        raise ConfigError(
            "config",
            [
                f"vllm.python = {str(python) if python else None!r}: no python with vLLM; "
                "set vllm.python or run python -m albatross.engines.vllm_install"
            ],
        )
    return python


async def _until_signal(
    start: Callable[[], Coroutine[Any, Any, None]],
    stop: Callable[[], Awaitable[None]],
    started: Callable[[], str],
    stopping: str,
) -> None:
    """Run ``start()``; once it returns print ``started()``, wait for SIGINT/SIGTERM,
    print ``stopping`` and run ``stop()``. A signal during start cancels it; an error
    from start is raised after ``stop()``."""
    signalled = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, signalled.set)
    starting = asyncio.create_task(start())
    stopper = asyncio.create_task(signalled.wait())
    await asyncio.wait({starting, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if starting.done() and starting.exception() is None:
        print(started(), flush=True)
        await stopper
    else:
        starting.cancel()
    print(stopping, flush=True)
    await stop()
    if starting.done() and not starting.cancelled() and starting.exception() is not None:
        raise starting.exception()  # type: ignore[misc]


async def _serve(config: Config, files: EngineFiles) -> None:
    application = App(config, files)

    def started() -> str:
        g = config.gateway
        names = ", ".join(
            f"{m.name} ({m.replicas} replicas{', ' + str(len(m.endpoints)) + ' endpoints' if m.endpoints else ''})"
            for m in config.models
        )
        return f"albatross: serving {names} on http://{g.host}:{application.port}"

    await _until_signal(application.start, application.stop, started, "albatross: stopping")


def _config_error(exc: ConfigError) -> typer.Exit:
    """Print a configuration problem, one line per rule broken; the exit to raise."""
    print(f"albatross: invalid configuration in {exc.source}:", file=sys.stderr)
    for p in exc.problems:
        print(f"  {p}", file=sys.stderr)
    return typer.Exit(EXIT_CONFIG)


def _logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@app.command()
def serve(
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="TOML config file; default: the embedded default."),
    ] = None,
    port: Annotated[int | None, typer.Option(help="Override gateway.port.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Start the gateway and its engine replicas; Ctrl-C stops everything."""
    _logging(verbose)
    try:
        cfg = load_config(config)
        if port is not None:
            # Through validation, like the file: model_copy(update=...) would skip it.
            data = cfg.model_dump()
            data["gateway"]["port"] = port
            cfg = config_from_mapping(data, "--port")
        files = _resolve_files(cfg)
    except ConfigError as exc:
        raise _config_error(exc) from exc
    try:
        import uvloop

        uvloop.run(_serve(cfg, files))
    except Exception as exc:
        logging.getLogger("albatross").error(
            "%s", exc, exc_info=logging.getLogger().isEnabledFor(logging.DEBUG)
        )
        raise typer.Exit(EXIT_FAILURE) from exc


async def _agent(config: Config, files: EngineFiles, url: str, token: str) -> None:
    from albatross.runtime.agent import Agent

    a = Agent(config, files, url, token)
    names = ", ".join(f"{m.name} ({m.replicas} replicas)" for m in config.models)
    await _until_signal(
        a.start,
        a.stop,
        lambda: f"albatross agent {a.host_id}: serving {names} for {url}",
        "albatross agent: stopping",
    )


@app.command()
def agent(
    config: Annotated[Path, typer.Option("--config", "-c", help="TOML config file.")],
    gateway: Annotated[
        str | None, typer.Option(help="The gateway's base URL; overrides agent.gateway_url.")
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            envvar="ALBATROSS_CONTROL_TOKEN", help="Control API token; default: control.token."
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run this host's engine replicas and register them with a gateway (engine hosts)."""
    from albatross.runtime.agent import GatewayRejected

    _logging(verbose)
    try:
        cfg = load_config(config)
        if gateway is not None:
            data = cfg.model_dump()
            data["agent"]["gateway_url"] = gateway
            cfg = config_from_mapping(data, "--gateway")
        if cfg.agent.gateway_url is None:
            raise ConfigError("config", ["agent.gateway_url = None: set it or pass --gateway"])
        secret = token or cfg.control.token
        if not secret:
            raise ConfigError(
                "config",
                ["control.token = None: set it, pass --token or set ALBATROSS_CONTROL_TOKEN"],
            )
        if not any(m.replicas for m in cfg.models):
            raise ConfigError("config", ["models: an agent needs a model with replicas >= 1"])
        files = _resolve_files(cfg)
    except ConfigError as exc:
        raise _config_error(exc) from exc
    try:
        import uvloop

        uvloop.run(_agent(cfg, files, cfg.agent.gateway_url, secret))
    except GatewayRejected as exc:
        print(f"albatross agent: the gateway refused this host: {exc}", file=sys.stderr)
        raise typer.Exit(EXIT_CONFIG) from exc
    except Exception as exc:
        logging.getLogger("albatross").error(
            "%s", exc, exc_info=logging.getLogger().isEnabledFor(logging.DEBUG)
        )
        raise typer.Exit(EXIT_FAILURE) from exc


@app.command("check-config")
def check_config(config: Annotated[Path, typer.Argument(help="TOML config file.")]) -> None:
    """Validate a config file and print it resolved with defaults."""
    try:
        cfg = load_config(config)
    except ConfigError as exc:
        raise _config_error(exc) from exc
    print(cfg.model_dump_json(indent=2))


def _control_call(
    url: str, token: str | None, method: str, path: str, body: dict[str, object] | None = None
) -> str:
    """One control API call from the command line; exits 2 without a token, 1 on failure."""
    import json
    import urllib.error
    import urllib.request

    if not token:
        print(
            "albatross: no control token: pass --token or set ALBATROSS_CONTROL_TOKEN",
            file=sys.stderr,
        )
        raise typer.Exit(EXIT_CONFIG)
    req = urllib.request.Request(
        url.rstrip("/") + path,
        data=None if body is None else json.dumps(body).encode(),
        method=method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return str(r.read().decode())
    except urllib.error.HTTPError as exc:
        print(f"albatross: {exc.code}: {exc.read().decode(errors='replace')}", file=sys.stderr)
        raise typer.Exit(EXIT_FAILURE) from exc
    except (urllib.error.URLError, OSError) as exc:
        print(f"albatross: cannot reach {url}: {exc}", file=sys.stderr)
        raise typer.Exit(EXIT_FAILURE) from exc


_URL = Annotated[str, typer.Option(help="The gateway.")]
_TOKEN = Annotated[
    str | None, typer.Option(envvar="ALBATROSS_CONTROL_TOKEN", help="Control API token.")
]


@app.command()
def preempt(
    replica: Annotated[
        str | None, typer.Option(help="Replica id; default: every managed replica.")
    ] = None,
    deadline_s: Annotated[float, typer.Option(help="Seconds until the replica goes away.")] = 30.0,
    url: _URL = "http://127.0.0.1:8000",
    token: _TOKEN = None,
) -> None:
    """Send a preemption notice to a running gateway (as a spot notice would)."""
    print(
        _control_call(
            url, token, "POST", "/admin/preempt", {"replica": replica, "deadline_s": deadline_s}
        )
    )


@app.command("migrate-gateway")
def migrate_gateway(
    to: Annotated[str, typer.Option(help="The peer gateway (its netmove id or host).")],
    url: _URL = "http://127.0.0.1:8000",
    token: _TOKEN = None,
) -> None:
    """Move every live streaming connection of a gateway to a peer, mid-stream."""
    print(_control_call(url, token, "POST", "/admin/migrate-gateway", {"to": to}))


@app.command()
def cost(url: _URL = "http://127.0.0.1:8000", token: _TOKEN = None) -> None:
    """Spend so far, what on-demand instances would have cost, and the savings."""
    import json

    data = json.loads(_control_call(url, token, "GET", "/admin/cost"))
    head = f"{'replica':<32} {'type':<12} {'uptime h':>9} {'tokens':>10} {'preempt':>7} {'spend':>10} {'on-demand':>10} {'savings':>10}"
    print(head)
    for r in data["replicas"]:
        print(
            f"{r['replica']:<32} {r['instance_type']:<12} {r['uptime_s'] / 3600:>9.3f} {r['tokens']:>10} "
            f"{r['preemptions_survived']:>7} {r['spend']:>10.4f} {r['on_demand_equivalent']:>10.4f} {r['savings']:>10.4f}"
        )
    t = data["total"]
    ratio = "" if t["savings_ratio"] is None else f" ({100 * t['savings_ratio']:.0f}%)"
    print(
        f"total: spend {t['spend']:.4f}, on-demand {t['on_demand_equivalent']:.4f}, savings {t['savings']:.4f}{ratio}"
    )


def main() -> None:
    app()

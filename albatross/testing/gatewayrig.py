"""Two real gateways in network namespaces, for moving live HTTP streams between them.

On a :func:`albatross.testing.netns.topology`, :class:`GatewayPair` runs ``albatross
serve`` as a process in gateway A's namespace and another in B's (``ip netns exec``),
each with ``netmove`` enabled: the same VIP (on A at first), the router's VIP route
pointed by whichever gateway claims it, handoff servers on their own addresses, each
other as peers. Engines are either each gateway's own managed llama-server replicas,
or (``shared_engines``) llama-servers in the router's namespace on an address both
gateways reach, which both list as endpoints.

Clients run in the client namespace (:meth:`GatewayPair.client`); control calls are
made from inside a gateway's namespace. Everything is stopped on exit (SIGINT, then
SIGKILL of the process group), whatever failed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from albatross.testing.netns import Netns, Topology

__all__ = ["ENGINE_IP", "HANDOFF_PORT", "PORT", "TOKEN", "GatewayPair"]

ALBATROSS = str(Path(sys.executable).with_name("albatross"))
TOKEN = "gateway-move-control-token-0123"
KEY = "gateway-move-handoff-key-0123456789"
PORT = 8000
HANDOFF_PORT = 7070
MODEL = "tiny"
ENGINE_IP = "10.77.50.1"
"""Shared engines listen here, on the router's loopback; both gateways route to it."""
ENGINE_PORT = 8300


def _toml(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return json.dumps(str(v))


class GatewayPair:
    """See the module docstring. Use as a context manager."""

    def __init__(
        self,
        topo: Topology,
        workdir: Path,
        *,
        binary: Path,
        model_path: Path,
        replicas: int = 1,
        parallel: int = 4,
        ctx_size: int = 2304,
        numerics: str = "exact",
        shared_engines: bool = False,
    ) -> None:
        self.topo = topo
        self.workdir = workdir
        self.binary = binary
        self.model_path = model_path
        self.replicas = replicas
        self.parallel = parallel
        self.ctx_size = ctx_size
        self.numerics = numerics
        self.shared_engines = shared_engines
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, Path] = {}
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> GatewayPair:
        try:
            self._start()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    # ---- processes ----------------------------------------------------------------
    def _spawn(self, name: str, ns: Netns, argv: Sequence[str]) -> subprocess.Popen[bytes]:
        log = self.workdir / f"{name}.log"
        self.logs[name] = log
        with log.open("ab") as out:
            proc = subprocess.Popen(
                ns.argv(*argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                process_group=0,
                env={**os.environ, "ALBATROSS_HANDOFF_KEY": KEY},
            )
        self.procs[name] = proc
        self._stack.callback(self._stop, proc)
        return proc

    @staticmethod
    def _stop(proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def log(self, name: str) -> str:
        return self.logs[name].read_text(errors="replace")

    def _engines(self) -> list[str]:
        t = self.topo
        subprocess.run(
            ["ip", "-n", t.router.name, "addr", "add", f"{ENGINE_IP}/32", "dev", "lo"], check=True
        )
        urls = []
        exact = ["-ub", "1", "-fa", "off", "-ctk", "f32", "-ctv", "f32"]
        for i in range(self.replicas):
            port = ENGINE_PORT + i
            self._spawn(
                f"engine{i}",
                t.router,
                [
                    str(self.binary), "-m", str(self.model_path), "--host", ENGINE_IP,
                    "--port", str(port), "-np", str(self.parallel),
                    "-c", str(self.ctx_size * self.parallel), "-t", "1", "--no-webui",
                    *(exact if self.numerics == "exact" else []),
                ],
            )  # fmt: skip
            urls.append(f"http://{ENGINE_IP}:{port}")
        with t.router.entered(), httpx.Client(timeout=2.0) as c:
            for url in urls:
                deadline = time.monotonic() + 60
                while True:
                    with contextlib.suppress(httpx.HTTPError):
                        if c.get(url + "/health").status_code == 200:
                            break
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"shared engine {url} not ready: {self.log('engine0')}")
                    time.sleep(0.1)
        return urls

    def _config(self, me: str, peer: str, my_ip: str, peer_ip: str, engines: list[str]) -> Path:
        d = self.workdir / me
        sections: dict[str, dict[str, object]] = {
            "gateway": {"host": "0.0.0.0", "port": PORT, "first_token_timeout_s": 300.0},
            # 100 moved streams re-prefilled at once (numerics = "exact": one token per
            # micro-batch) keep a small engine busy for seconds; its /health may answer
            # late then, and restarting it would be a second disruption, not the move.
            "supervisor": {"log_dir": d / "logs", "health_timeout_s": 30.0},
            "llama_server": {"binary": self.binary},
            "continuity": {"slot_dir": d / "slots"},
            "control": {"token": TOKEN},
            "netmove": {
                "enabled": True,
                "gateway_id": me,
                "interface": self.topo.gw_ifname,
                "vip": self.topo.vip,
                "route_netns": self.topo.router.name,
                "route_via": my_ip,
                "listen_host": my_ip,
                "listen_port": HANDOFF_PORT,
                "peers": {peer: f"{peer_ip}:{HANDOFF_PORT}"},
            },
        }
        lines: list[str] = []
        for name, values in sections.items():
            lines += [f"[{name}]", *(f"{k} = {_toml(v)}" for k, v in values.items()), ""]
        lines += [
            "[[models]]",
            f"name = {_toml(MODEL)}",
            f"path = {_toml(self.model_path)}",
            f"replicas = {0 if engines else self.replicas}",
            f"endpoints = {_toml(engines)}",
            f"parallel = {self.parallel}",
            f"ctx_size = {self.ctx_size}",
            "threads = 1",
            f"numerics = {_toml(self.numerics)}",
        ]
        d.mkdir(parents=True, exist_ok=True)
        path = d / "albatross.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def _start(self) -> None:
        t = self.topo
        engines = self._engines() if self.shared_engines else []
        configs = {
            "a": self._config("gw-a", "gw-b", t.gw_a_ip, t.gw_b_ip, engines),
            "b": self._config("gw-b", "gw-a", t.gw_b_ip, t.gw_a_ip, engines),
        }
        for name, ns in (("a", t.gw_a), ("b", t.gw_b)):
            self._spawn(name, ns, [ALBATROSS, "serve", "--config", str(configs[name])])
        for name in ("a", "b"):
            self._wait_serving(name)
        for name in ("a", "b"):
            self._wait_ready(name)

    def _wait_serving(self, name: str, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while "albatross: serving" not in self.log(name):
            if self.procs[name].poll() is not None:
                raise RuntimeError(f"gateway {name} exited:\n{self.log(name)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"gateway {name} not serving:\n{self.log(name)}")
            time.sleep(0.05)

    def _wait_ready(self, name: str, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if self.get(name, "/health").get("status") == "ok":
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"gateway {name} not healthy:\n{self.log(name)}")
            time.sleep(0.1)

    # ---- calls --------------------------------------------------------------------
    def _ns_ip(self, name: str) -> tuple[Netns, str]:
        t = self.topo
        return (t.gw_a, t.gw_a_ip) if name == "a" else (t.gw_b, t.gw_b_ip)

    def get(self, name: str, path: str) -> dict[str, Any]:
        """``GET path`` on gateway ``name`` (``a`` or ``b``), from inside its namespace."""
        ns, ip = self._ns_ip(name)
        with ns.entered(), httpx.Client(timeout=10.0) as c:
            r = c.get(f"http://{ip}:{PORT}{path}", headers={"Authorization": f"Bearer {TOKEN}"})
        out: dict[str, Any] = r.json()
        return out

    def migrate(self, source: str = "a", to: str = "gw-b") -> dict[str, Any]:
        """``albatross migrate-gateway --to TO`` against gateway ``source``, as a user runs it."""
        ns, ip = self._ns_ip(source)
        done = subprocess.run(
            ns.argv(ALBATROSS, "migrate-gateway", "--to", to, "--url", f"http://{ip}:{PORT}"),
            capture_output=True,
            text=True,
            env={**os.environ, "ALBATROSS_CONTROL_TOKEN": TOKEN},
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"migrate-gateway exited {done.returncode}: {done.stderr}")
        out: dict[str, Any] = json.loads(done.stdout)
        return out

    def wait_position(
        self, name: str, position: int, count: int = 1, timeout_s: float = 60.0
    ) -> None:
        """Until ``count`` streams on gateway ``name`` are past ``position``."""
        deadline = time.monotonic() + timeout_s
        while True:
            live = self.get(name, "/admin/requests")["requests"]
            if sum(r["position"] >= position for r in live) >= count:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"streams on {name}: {[r['position'] for r in live]}")
            time.sleep(0.02)

    def client(self, *argv: str) -> subprocess.Popen[str]:
        """A process in the client namespace (stdout and stderr piped)."""
        return subprocess.Popen(
            self.topo.client.argv(*argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

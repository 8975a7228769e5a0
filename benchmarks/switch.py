"""Switch latency per eviction level, against a cold start, as the switch performs them.

Runs the runtime's own step engines (``albatross/runtime/switch_engines.py``) on a
real llama-server, so the figures are what a switch costs here:

- ``cold start``: a new llama-server process until its /health answers (the baseline);
- ``stop``: TERM until the process is gone (``discard`` + ``stop``, sleep side);
- ``router load`` / ``router unload``: a model behind a running router (``discard`` +
  ``keep_running``);
- ``criu restore`` / ``criu dump``: the engine dumped and restored with CRIU
  (``offload`` + ``checkpoint``), only when CRIU is installed and we are root.

Each is repeated ``--runs`` times; the median is printed with its ratio to the cold
start's median. Wake-side ratios below 1 mean the level wakes faster than a cold
start. vLLM sleep levels and cuda-checkpoint need a GPU to mean anything and are not
measured here.

    .venv/bin/python benchmarks/switch.py [--model GGUF] [--runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from albatross.config import CheckpointConfig, LlamaServerConfig, ModelConfig, SupervisorConfig
from albatross.core.eviction import Step
from albatross.engines.embedded_model import embedded_model_path
from albatross.engines.llama_build import llama_server_binary
from albatross.engines.llama_router import LlamaRouterClient
from albatross.gateway.metrics import Metrics
from albatross.runtime.app import llama_server_argv, probe
from albatross.runtime.pool import Pool
from albatross.runtime.switch_engines import PoolListener, ProcessModel, RouterModel, router_argv
from albatross.supervisor.supervisor import ReplicaImages, ReplicaSpec, Supervisor


async def _timed(fn: Callable[[], Awaitable[None]]) -> float:
    t0 = time.perf_counter()
    await fn()
    return time.perf_counter() - t0


class _Quiet:
    def replica_ready(self, replica_id: str, base_url: str, pid: int) -> None:
        self.url = base_url

    def replica_lost(self, replica_id: str, reason: str) -> None:
        pass


async def _process_levels(
    binary: Path, model: Path, work: Path, runs: int, images: ReplicaImages | None
) -> dict[str, list[float]]:
    m = ModelConfig(name="m", replicas=1, parallel=1, ctx_size=1024, threads=1)
    pool = Pool(Metrics(), 3)
    pool.add("m/0", "m", managed=True, slots=1)
    spec = ReplicaSpec("m/0", llama_server_argv(binary, model, m, work / "slots"), work / "m.log")
    cfg = SupervisorConfig(log_dir=work, stop_grace_s=5.0)
    pm = ProcessModel(spec, cfg, PoolListener(pool), probe, images=images)
    out: dict[str, list[float]] = {"cold start": [], "stop": []}
    if images is not None:
        out["criu dump"], out["criu restore"] = [], []
    try:
        for _ in range(runs):
            out["cold start"].append(await _timed(lambda: pm.perform(Step.START_PROCESS)))
            if images is not None:
                out["criu dump"].append(await _timed(lambda: pm.perform(Step.CRIU_DUMP)))
                out["criu restore"].append(await _timed(lambda: pm.perform(Step.CRIU_RESTORE)))
            out["stop"].append(await _timed(lambda: pm.perform(Step.STOP_PROCESS)))
    finally:
        await pm.close()
    return out


async def _router_levels(
    binary: Path, model: Path, work: Path, runs: int
) -> dict[str, list[float]]:
    models = work / "router-models"
    spec = ReplicaSpec("router", router_argv(binary, models, 1, 1024, 1), work / "router.log")
    listener = _Quiet()
    sup = Supervisor([spec], SupervisorConfig(log_dir=work), listener, probe)
    pool = Pool(Metrics(), 3)
    pool.add("m/0", "m", managed=True, slots=1)
    out: dict[str, list[float]] = {"router load": [], "router unload": []}
    await sup.start()
    client = LlamaRouterClient(listener.url)
    rm = RouterModel(client, "m", pool, "m/0")
    try:
        for _ in range(runs):
            out["router load"].append(await _timed(lambda: rm.perform(Step.ROUTER_LOAD)))
            out["router unload"].append(await _timed(lambda: rm.perform(Step.ROUTER_UNLOAD)))
    finally:
        client.close()
        await sup.close()
    return out


def _images(work: Path) -> ReplicaImages | None:
    from albatross.checkpoint.engine import ReplicaCheckpointer
    from albatross.checkpoint.install import installed_criu

    if os.geteuid() != 0 or installed_criu() is None:
        return None
    cfg = CheckpointConfig(enabled=True, image_dir=work / "images", tcp_established=True)
    return ReplicaCheckpointer.from_config(cfg)


async def _measure(
    binary: Path, model: Path, work: Path, runs: int, images: ReplicaImages | None
) -> dict[str, list[float]]:
    results = await _process_levels(binary, model, work, runs, images)
    results.update(await _router_levels(binary, model, work, runs))
    return results


def main(model: Path, runs: int) -> None:
    size = model.stat().st_size
    binary = llama_server_binary(LlamaServerConfig())
    with tempfile.TemporaryDirectory(prefix="albatross-bench-switch-") as tmp:
        work = Path(tmp)
        (work / "slots").mkdir()
        (work / "router-models").mkdir()
        (work / "router-models" / "m.gguf").symlink_to(model.resolve())
        images = _images(work)
        results = asyncio.run(_measure(binary, model, work, runs, images))
    base = statistics.median(results["cold start"])
    print(f"model: {model.name} ({size / 1e6:.0f} MB), {runs} runs, medians")
    print(f"{'level':<16}{'side':<7}{'median s':>10}{'vs cold start':>15}")
    wake = {"cold start", "router load", "criu restore"}
    for name, values in results.items():
        med = statistics.median(values)
        side = "wake" if name in wake else "sleep"
        print(f"{name:<16}{side:<7}{med:>10.3f}{med / base:>14.2f}x")
    if images is None:
        print("criu: not measured (needs root and python -m albatross.checkpoint.install)")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None, help="GGUF; default: embedded SmolLM2")
    p.add_argument("--runs", type=int, default=5)
    a = p.parse_args()
    main(a.model or embedded_model_path(), a.runs)

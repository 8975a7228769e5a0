"""Warm restart vs cold start: CRIU dump time, restore time and image size, per model.

Run (as root): ``.venv/bin/python benchmarks/checkpoint.py [--models tiny,100m]
[--rounds 3] [--ctx 2048]``

Per model (``tiny``: the test model; ``100m``: a random Llama of ~90M parameters, f32
GGUF of ~360 MB, both from ``benchmarks/_stack.py``), one llama-server (``-t 1 -np 1
-c CTX``) is started the supervisor's way (setsid, stdin /dev/null, append-mode log),
and rounds alternate, side by side:

- *cold start*: spawn the engine and time until ``/health`` answers 200 **and** a first
  greedy ``/completion`` (8 tokens) has answered: the time until it is usable;
- *checkpoint*: the engine, warmed by one completion and idle, is checkpointed by the
  product's :class:`~albatross.checkpoint.engine.ReplicaCheckpointer` (estimate and
  budget check, ``criu dump --tcp-established``, sha256 of every file, metadata):
  the criu dump alone and the whole checkpoint are reported, with the image size;
- *warm restart*: the same checkpointer restores it (sha256 check, ``criu restore``)
  and the clock stops at the same point as for a cold start: ``/health`` 200 and a
  first completion answered. The restored answer is checked token-for-token against
  the answer before the dump.

Figures are medians over ``--rounds``; ratios are warm / cold. Model weights are
memory-mapped from the GGUF file, so they are not in the image (only anonymous memory:
KV cache, compute buffers, heap) and both paths read them from the page cache; the
file must be at the same path at restore. Never asserts: it prints.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _stack import MODELS, make_model, model_params

from albatross.checkpoint.criu import Criu
from albatross.checkpoint.engine import ReplicaCheckpointer
from albatross.checkpoint.install import install_criu
from albatross.checkpoint.store import ImageStore
from albatross.config import LlamaServerConfig
from albatross.engines.llama_build import llama_server_binary
from albatross.supervisor.process import EngineProcess, spawn
from albatross.testing.llama import free_port

PROMPT = "The albatross glides over the southern ocean"


def _get(url: str, path: str, body: dict[str, object] | None = None) -> tuple[int, bytes]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        if body is None:
            conn.request("GET", path)
        else:
            conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _usable(url: str, limit_s: float = 120.0) -> tuple[float, list[int]]:
    """Poll until /health is 200, then one greedy completion: when health answered
    (``time.monotonic()``) and the completion's token ids."""
    deadline = time.monotonic() + limit_s
    while True:
        try:
            if _get(url, "/health")[0] == 200:
                healthy_at = time.monotonic()
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} not healthy within {limit_s:g} s")
        time.sleep(0.005)
    body = {"prompt": PROMPT, "n_predict": 8, "temperature": 0, "return_tokens": True}
    status, data = _get(url, "/completion", body)
    if status != 200:
        raise RuntimeError(f"{url}/completion answered {status}: {data[:200]!r}")
    tokens: list[int] = json.loads(data)["tokens"]
    return healthy_at, tokens


async def _cold(
    argv: list[str], log: Path, url: str
) -> tuple[EngineProcess, float, float, list[int]]:
    started = time.monotonic()
    proc = await spawn(argv, log)
    healthy_at, tokens = await asyncio.to_thread(_usable, url)
    return proc, healthy_at - started, time.monotonic() - started, tokens


async def bench_model(
    kind: str, args: argparse.Namespace, work: Path, criu: Criu
) -> dict[str, float]:
    binary = llama_server_binary(LlamaServerConfig())
    model = make_model(work / "models", kind, context=max(args.ctx, 512))
    log = work / f"{kind}.log"
    store = ImageStore(work / "images")
    cp = ReplicaCheckpointer(criu, store, stop_grace_s=2.0)
    rows: dict[str, list[float]] = {
        k: []
        for k in ("cold_health", "cold", "dump", "checkpoint", "restore_health", "restore", "size")
    }
    for r in range(args.rounds):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        argv = [
            str(binary), "--host", "127.0.0.1", "--port", str(port), "-m", str(model),
            "-np", "1", "-c", str(args.ctx), "-t", "1",
        ]  # fmt: skip
        # Cold start.
        proc, cold_health_s, cold_s, cold_tokens = await _cold(argv, log, url)
        # Checkpoint the warmed, idle engine.
        t0 = time.monotonic()
        outcome = await cp.checkpoint(f"{kind}/0", proc, url)
        checkpoint_s = time.monotonic() - t0
        await proc.wait()
        # Warm restart, measured to the same point as the cold start.
        t0 = time.monotonic()
        restored, _ = await cp.restore(f"{kind}/0", log)
        healthy_at, warm_tokens = await asyncio.to_thread(_usable, url)
        restore_s = time.monotonic() - t0
        restore_health_s = healthy_at - t0
        await restored.stop(2.0)
        if warm_tokens != cold_tokens:
            print(f"  {kind} round {r}: MISMATCH after restore: {warm_tokens} vs {cold_tokens}")
        rows["cold"].append(cold_s)
        rows["cold_health"].append(cold_health_s)
        rows["restore_health"].append(restore_health_s)
        rows["dump"].append(outcome.dump_seconds)
        rows["checkpoint"].append(checkpoint_s)
        rows["restore"].append(restore_s)
        rows["size"].append(outcome.size_bytes)
        print(
            f"  {kind} round {r}: cold {cold_s:.3f} s (health {cold_health_s:.3f} s) | dump {outcome.dump_seconds:.3f} s "
            f"(checkpoint {checkpoint_s:.3f} s) | restore->usable {restore_s:.3f} s "
            f"(health {restore_health_s:.3f} s) | "
            f"image {outcome.size_bytes / 2**20:.1f} MiB | tokens equal: {warm_tokens == cold_tokens}",
            flush=True,
        )
    med = {k: statistics.median(v) for k, v in rows.items()}
    med["model_mib"] = model.stat().st_size / 2**20
    return med


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", default="tiny,100m", help="comma-separated: " + ",".join(MODELS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--ctx", type=int, default=2048, help="llama-server -c (KV cache size)")
    return p.parse_args()


async def amain(args: argparse.Namespace) -> int:
    criu = Criu(install_criu(progress=lambda line: print(line, file=sys.stderr)))
    results = {}
    with tempfile.TemporaryDirectory(prefix="albatross-bench-ckpt-") as tmp:
        for kind in args.models.split(","):
            print(f"{kind} (~{model_params(kind) / 1e6:.1f}M parameters), {args.rounds} rounds:")
            results[kind] = await bench_model(kind, args, Path(tmp), criu)
    print()
    print("medians; 'usable' = /health 200 and a first 8-token completion answered")
    print(
        f"{'model':<6} {'GGUF':>9} {'image':>9} | {'cold: health':>12} {'usable':>8} | "
        f"{'dump':>7} {'checkpoint':>10} | {'restore: health':>15} {'usable':>8} | "
        f"{'ratios warm/cold: health':>24} {'usable':>7} {'dump':>6}"
    )
    for kind, m in results.items():
        print(
            f"{kind:<6} {m['model_mib']:>5.1f} MiB {m['size'] / 2**20:>5.1f} MiB | "
            f"{m['cold_health']:>10.3f} s {m['cold']:>6.3f} s | "
            f"{m['dump']:>5.3f} s {m['checkpoint']:>8.3f} s | "
            f"{m['restore_health']:>13.3f} s {m['restore']:>6.3f} s | "
            f"{m['restore_health'] / m['cold_health']:>23.2f}x {m['restore'] / m['cold']:>6.2f}x "
            f"{m['dump'] / m['cold']:>5.2f}x"
        )
    return 0


def main() -> int:
    if os.geteuid() != 0:
        print("benchmarks/checkpoint.py: CRIU needs root", file=sys.stderr)
        return 2
    return asyncio.run(amain(parse_args()))


if __name__ == "__main__":
    sys.exit(main())

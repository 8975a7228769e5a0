"""What the albatross gateway costs, measured against llama-server directly.

Run: ``.venv/bin/python benchmarks/gateway_overhead.py [--concurrency 64] [--tokens 128]
[--rounds 3] [--replicas 2]``

Setup: a tiny random-weight model (greedy streams never hit EOS, so every stream runs
to ``max_tokens``), ``--replicas`` llama-server processes (``-t 1``, one slot per
stream), and ``albatross serve`` as a separate process whose config lists the replicas
as external endpoints (``replicas = 0``): the gateway starts no engines of its own.

Then alternating rounds, direct, gateway, direct, gateway... (one discarded warm-up
round of each first). A round launches ``--concurrency`` streams of
``POST /v1/completions`` (fixed ~16-token id prompt, ``temperature=0``,
``stream=true``) at once: round-robin over the replicas on the direct path, to the
gateway (``"model": NAME``) on the other. Per round: aggregate tokens/s (tokens / wall
time), TTFT p50/p99, inter-token gap p50/p99 (gaps between successive token-carrying
events of a stream, pooled), end-to-end p50/p99, and CPU per token: the gateway
process's utime+stime (split user/kernel, and schedstat, ns-exact), the replicas', the
load generator's and the whole machine's (from /proc/stat, which includes anything
else running). Also, for gateway rounds, the gateway's own TTFT and write-gap
histograms (its /metrics, as bucket bounds) and how long the gateway and the engines
sat runnable waiting for a CPU (schedstat): on a small machine a long wait there, not
the gateway's code, is what shows up as burst delivery and a large p99 gap.

Wall-clock figures on a busy 2-core machine swing by +-30% between rounds; the
gateway's CPU per token is the steady figure. Use more ``--rounds`` to judge the rest,
and ``--dump FILE`` for every stream's token times.

Targets (shared/RECIPES.md, "Gateway overhead"): throughput >= 0.9x direct and
<= 1 ms added p99 inter-token latency; a gateway must stay under about 25 us of CPU
per token to get there. They are printed as PASS/MISS, never asserted. The exit status
is non-zero only when correctness fails: a stream that errs or does not deliver exactly
``--tokens`` tokens, or a gateway stream whose text differs from the direct one.

``--direct-api native`` sends the direct path to llama-server's native ``/completion``
(what the gateway itself calls, cheaper for the engine than ``/v1/completions``), to
separate the gateway's own cost from that difference. ``--profile-gateway FILE`` runs
the gateway under cProfile (several times slower: the timings are then not the
gateway's) and prints its top functions at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import pstats
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _loadgen as lg

from albatross.config import LlamaServerConfig
from albatross.engines.llama_build import llama_server_binary
from albatross.testing.llama import free_port, healthy, log_tail, running_llama_server
from albatross.testing.tinymodel import make_tiny_model

MODEL_NAME = "tiny"
# A fixed token-id prompt (ids 0-2 are the special tokens; these are ordinary ones).
PROMPT_IDS = [41, 97, 130, 265, 58, 301, 77, 144, 212, 19, 388, 120, 66, 250, 173, 90]
THROUGHPUT_TARGET = 0.9
ADDED_P99_ITL_TARGET_MS = 1.0
CPU_BUDGET_US = 25.0
GATEWAY_READY_TIMEOUT_S = 60.0
STOP_GRACE_S = 5.0

# Runs the gateway's CLI under cProfile. argv: profile-file cli-args...
_LAUNCHER = """
import sys
prof, args = sys.argv[1], sys.argv[2:]
sys.argv = ["albatross", *args]
from albatross.cli import main
import cProfile
cProfile.run("main()", prof)
"""


# ---- processes ---------------------------------------------------------------------
def _pids_listening(binary: Path, ports: list[int]) -> dict[int, int]:
    """port -> pid of the llama-server started with ``--port PORT``."""
    found: dict[int, int] = {}
    want = {f"--port\0{p}\0".encode(): p for p in ports}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes()
        except OSError:
            continue
        if not cmd.startswith(str(binary).encode()):
            continue
        for needle, port in want.items():
            if needle in cmd:
                found[port] = int(d.name)
    return found


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group, wait, then SIGKILL it."""
    if proc.poll() is None:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            print(f"gateway pid {proc.pid} ignored SIGTERM; killing it", file=sys.stderr)
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


class GatewayStartError(RuntimeError):
    pass


def start_gateway(
    stack: ExitStack, cfg: Path, url: str, log: Path, *, profile: Path | None
) -> subprocess.Popen[bytes]:
    venv_bin = Path(sys.executable).parent
    if profile is not None:
        argv = [sys.executable, "-c", _LAUNCHER, str(profile), "serve", "--config", str(cfg)]
    else:
        argv = [str(venv_bin / "albatross"), "serve", "--config", str(cfg)]
    with open(log, "ab") as f:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    stack.callback(_stop, proc)
    deadline = time.monotonic() + GATEWAY_READY_TIMEOUT_S
    while not healthy(url):
        if proc.poll() is not None:
            raise GatewayStartError(
                f"gateway exited with {proc.returncode}; log {log}:\n{log_tail(log)}"
            )
        if time.monotonic() > deadline:
            raise GatewayStartError(
                f"gateway not healthy after {GATEWAY_READY_TIMEOUT_S:g} s; log {log}:\n{log_tail(log)}"
            )
        time.sleep(0.05)
    return proc


# ---- measuring -------------------------------------------------------------------
def body(tokens: int, model: str | None) -> dict[str, Any]:
    b: dict[str, Any] = {
        "prompt": PROMPT_IDS,
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if model is not None:
        b["model"] = model
    return b


def native_body(tokens: int) -> dict[str, Any]:
    """What the gateway itself sends llama-server (``/completion``, token ids back)."""
    return {
        "prompt": PROMPT_IDS,
        "n_predict": tokens,
        "temperature": 0,
        "stream": True,
        "return_tokens": True,
        "cache_prompt": True,
    }


def summarize(
    rr: lg.RoundResult, cpu: lg.CpuSnapshot, gw_pid: int, engine_pids: list[int]
) -> dict[str, float]:
    toks = rr.tokens or 1
    ttft, gaps, e2e = rr.ttfts(), rr.gaps(), rr.e2es()
    gw = cpu.procs.get(gw_pid, (float("nan"),) * 5)
    eng = sum(cpu.procs[p][0] for p in engine_pids if p in cpu.procs)
    eng_wait = sum(cpu.procs[p][4] for p in engine_pids if p in cpu.procs)
    return {
        "tok_s": rr.tokens_per_s,
        "wall_s": rr.wall,
        "tokens": rr.tokens,
        "ttft_p50": lg.pct(ttft, 50) * 1e3,
        "ttft_p99": lg.pct(ttft, 99) * 1e3,
        "itl_p50": lg.pct(gaps, 50) * 1e3,
        "itl_p99": lg.pct(gaps, 99) * 1e3,
        "e2e_p50": lg.pct(e2e, 50) * 1e3,
        "e2e_p99": lg.pct(e2e, 99) * 1e3,
        "events_per_stream": sum(r.events for r in rr.results) / max(len(rr.results), 1),
        "gw_us_tok": gw[0] / toks * 1e6,
        "gw_exact_us_tok": gw[1] / toks * 1e6,
        "gw_user_us_tok": gw[2] / toks * 1e6,
        "gw_sys_us_tok": gw[3] / toks * 1e6,
        "engine_us_tok": eng / toks * 1e6,
        "gw_wait_ms": gw[4] * 1e3,
        "engine_wait_ms": eng_wait * 1e3,
        "loadgen_us_tok": cpu.self_ / toks * 1e6,
        "machine_us_tok": cpu.machine / toks * 1e6,
    }


def _gw_histograms(gw_url: str) -> tuple[dict[float, float], dict[float, float]]:
    """The gateway's own TTFT and inter-write histograms (cumulative buckets)."""
    return (
        lg.scrape_histogram(gw_url, "albatross_time_to_first_token_seconds"),
        lg.scrape_histogram(gw_url, "albatross_inter_token_seconds"),
    )


async def measure_round(
    targets: list[lg.Target],
    marker: bytes,
    pids: list[int],
    gw_pid: int,
    engine_pids: list[int],
    settle_s: float,
) -> tuple[lg.RoundResult, dict[str, float]]:
    before = lg.CpuSnapshot.take(pids)
    rr = await lg.run_round(targets, marker=marker)
    # The gateway's closing work for this round (connections, metrics) belongs to it.
    await asyncio.sleep(settle_s)
    cpu = lg.CpuSnapshot.take(pids).since(before)
    return rr, summarize(rr, cpu, gw_pid, engine_pids)


async def sanity(direct_url: str, gw_url: str, tokens: int) -> list[str]:
    """One stream each way: exactly ``tokens`` tokens (no EOS) and the same text."""
    problems = []
    d = await lg.stream_once(
        lg.post_target(direct_url, "/v1/completions", body(tokens, None)), collect_text=True
    )
    g = await lg.stream_once(
        lg.post_target(gw_url, "/v1/completions", body(tokens, MODEL_NAME)), collect_text=True
    )
    for name, r in (("direct", d), ("gateway", g)):
        if not r.ok:
            problems.append(f"sanity {name}: {r.error or 'incomplete'}")
        elif r.tokens != tokens:
            problems.append(
                f"sanity {name}: {r.tokens} tokens, expected {tokens} (EOS or truncation?)"
            )
    dt, gt = "".join(d.text or []), "".join(g.text or [])
    print(
        f"sanity: direct {d.tokens} tokens in {d.events} events, gateway {g.tokens} tokens in "
        f"{g.events} events, text identical: {'yes' if dt == gt else 'NO'} ({len(dt)} chars)"
    )
    if dt != gt:
        problems.append(
            f"sanity: gateway text differs from direct text:\n  direct  {dt[:120]!r}\n  gateway {gt[:120]!r}"
        )
    return problems


async def bench(
    args: argparse.Namespace,
    replica_urls: list[str],
    gw_url: str,
    gw_pid: int,
    engine_pids: list[int],
    dump: list[dict[str, Any]] | None = None,
) -> tuple[dict[str, list[dict[str, float]]], list[str]]:
    if args.direct_api == "native":
        dpath, dbody, dmarker = "/completion", native_body(args.tokens), lg.CHAT_MARKER
    else:
        dpath, dbody, dmarker = "/v1/completions", body(args.tokens, None), lg.COMPLETION_MARKER
    direct = [
        lg.post_target(replica_urls[i % len(replica_urls)], dpath, dbody)
        for i in range(args.concurrency)
    ]
    gateway = [
        lg.post_target(gw_url, "/v1/completions", body(args.tokens, MODEL_NAME))
    ] * args.concurrency
    pids = [gw_pid, *engine_pids]
    problems = await sanity(replica_urls[0], gw_url, args.tokens)
    rows: dict[str, list[dict[str, float]]] = {"direct": [], "gateway": []}
    for rnd in range(args.rounds + 1):
        for kind, targets, marker in (
            ("direct", direct, dmarker),
            ("gateway", gateway, lg.COMPLETION_MARKER),
        ):
            h0 = _gw_histograms(gw_url) if kind == "gateway" else None
            rr, s = await measure_round(targets, marker, pids, gw_pid, engine_pids, args.settle)
            if h0 is not None:
                h1 = _gw_histograms(gw_url)
                for key, (b0, b1) in zip(
                    ("gw_seen_ttft", "gw_seen_itl"), zip(h0, h1, strict=True), strict=True
                ):
                    s[key + "_p50"] = lg.histogram_quantile(b0, b1, 0.5) * 1e3
                    s[key + "_p99"] = lg.histogram_quantile(b0, b1, 0.99) * 1e3
            else:
                for key in (
                    "gw_seen_ttft_p50",
                    "gw_seen_ttft_p99",
                    "gw_seen_itl_p50",
                    "gw_seen_itl_p99",
                ):
                    s[key] = float("nan")
            bad = rr.failures(args.tokens)
            tag = "warm-up" if rnd == 0 else f"round {rnd}"
            print(
                f"  {tag:8} {kind:7} {s['tok_s']:8.0f} tok/s  wall {s['wall_s']:6.2f} s  "
                f"TTFT p50 {s['ttft_p50']:7.1f} ms  ITL p50/p99 {s['itl_p50']:6.2f}/{s['itl_p99']:6.2f} ms  "
                f"e2e p50 {s['e2e_p50']:7.0f} ms  gw {s['gw_us_tok']:6.1f} us/tok  "
                f"machine {s['machine_us_tok']:5.0f} us/tok"
                + (f"  FAILED {len(bad)}" if bad else ""),
                flush=True,
            )
            problems += [f"{tag} {kind}: {b}" for b in bad[:5]]
            if len(bad) > 5:
                problems.append(f"{tag} {kind}: ... {len(bad) - 5} more")
            if rnd > 0:
                rows[kind].append(s)
            if dump is not None:
                dump.append({"round": rnd, "kind": kind, "summary": s, "streams": [
                    {"start": r.start - rr.t0, "head": r.head - rr.t0 if r.head else None,
                     "first": r.first - rr.t0 if r.first else None, "end": r.end - rr.t0,
                     "tokens": r.tokens, "events": r.events, "error": r.error,
                     "token_times": [round(t - rr.t0, 6) for t in r.token_times]}
                    for r in rr.results]})  # fmt: skip
    return rows, problems


# ---- report --------------------------------------------------------------------
def _med(rows: list[dict[str, float]], key: str) -> float:
    return lg.median([r[key] for r in rows])


def report(
    args: argparse.Namespace, rows: dict[str, list[dict[str, float]]], problems: list[str]
) -> None:
    d, g = rows["direct"], rows["gateway"]
    print()
    print(
        f"gateway overhead: {args.concurrency} concurrent streams x {args.tokens} tokens, "
        f"{args.replicas} llama-server replicas (-t 1), {args.rounds} rounds each, medians over rounds"
    )
    lines = [
        ("throughput (tok/s)", "tok_s", "{:.0f}", "ratio"),
        ("TTFT p50 (ms)", "ttft_p50", "{:.1f}", "ratio"),
        ("TTFT p99 (ms)", "ttft_p99", "{:.1f}", "ratio"),
        ("ITL p50 (ms)", "itl_p50", "{:.2f}", "diff"),
        ("ITL p99 (ms)", "itl_p99", "{:.2f}", "diff"),
        ("end-to-end p50 (ms)", "e2e_p50", "{:.0f}", "ratio"),
        ("end-to-end p99 (ms)", "e2e_p99", "{:.0f}", "ratio"),
        ("token events per stream", "events_per_stream", "{:.1f}", ""),
        ("TTFT p50 seen by gateway (<= ms)", "gw_seen_ttft_p50", "{:g}", ""),
        ("TTFT p99 seen by gateway (<= ms)", "gw_seen_ttft_p99", "{:g}", ""),
        ("write gap p50 seen by gateway (<= ms)", "gw_seen_itl_p50", "{:g}", ""),
        ("write gap p99 seen by gateway (<= ms)", "gw_seen_itl_p99", "{:g}", ""),
        ("gateway CPU (us/token)", "gw_us_tok", "{:.1f}", ""),
        ("  of which user (us/token)", "gw_user_us_tok", "{:.1f}", ""),
        ("  of which kernel (us/token)", "gw_sys_us_tok", "{:.1f}", ""),
        ("  same total, schedstat (us/token)", "gw_exact_us_tok", "{:.1f}", ""),
        ("engines CPU (us/token)", "engine_us_tok", "{:.0f}", ""),
        ("gateway waiting for a CPU (ms/round)", "gw_wait_ms", "{:.0f}", ""),
        ("engines waiting for a CPU (ms/round)", "engine_wait_ms", "{:.0f}", ""),
        ("load generator CPU (us/token)", "loadgen_us_tok", "{:.1f}", ""),
        ("whole machine CPU (us/token)", "machine_us_tok", "{:.0f}", ""),
    ]
    print(f"  {'':40}{'direct':>10}{'gateway':>10}   gateway vs direct")
    for label, key, fmt, cmp in lines:
        dv, gv = _med(d, key), _med(g, key)
        ds = "-" if key.startswith("gw_") else fmt.format(dv)
        c = ""
        if cmp == "ratio" and dv > 0:
            c = f"{gv / dv:.2f}x"
        elif cmp == "diff":
            c = f"{gv - dv:+.2f} ms"
        print(f"  {label:40}{ds:>10}{fmt.format(gv):>10}   {c}")
    thr = _med(g, "tok_s") / _med(d, "tok_s")
    pairs = [gr["tok_s"] / dr["tok_s"] for dr, gr in zip(d, g, strict=True)]
    print(
        f"  throughput ratio per round pair: {' '.join(f'{x:.2f}' for x in pairs)} (median {lg.median(pairs):.2f}x)"
    )
    added = _med(g, "itl_p99") - _med(d, "itl_p99")
    cpu = _med(g, "gw_us_tok")
    print()
    print(
        f"  throughput gateway/direct  {thr:.3f}x   target >= {THROUGHPUT_TARGET}x   {'PASS' if thr >= THROUGHPUT_TARGET else 'MISS'}"
    )
    print(
        f"  added p99 inter-token      {added:+.3f} ms  target <= {ADDED_P99_ITL_TARGET_MS:g} ms  {'PASS' if added <= ADDED_P99_ITL_TARGET_MS else 'MISS'}"
    )
    print(
        f"  gateway CPU per token      {cpu:.1f} us  guide < ~{CPU_BUDGET_US:g} us (Rust router ~27, nginx 15-17)  {'OK' if cpu < CPU_BUDGET_US else 'OVER'}"
    )
    ok = not problems
    print(
        f"  correctness: every stream {args.tokens} tokens, no errors, same text: {'PASS' if ok else 'FAIL'}"
    )
    for p in problems:
        print(f"    {p}")


def print_profile(path: Path, tokens: int, top: int = 30) -> None:
    if not path.exists():
        print(f"(no profile written to {path})")
        return
    print(
        f"\ngateway profile ({path}), top {top} by own time; per-token figures use {tokens} tokens:"
    )
    st = pstats.Stats(str(path))
    entries = sorted(st.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]  # type: ignore[attr-defined]
    print(f"  {'tottime s':>10} {'us/token':>9} {'calls':>10} {'cumtime s':>10}  function")
    for (file, line, fn), (_cc, nc, tt, ct, _callers) in entries:
        short = file.replace(str(Path.cwd()) + "/", "")
        if "site-packages/" in short:
            short = short.split("site-packages/", 1)[1]
        print(
            f"  {tt:10.3f} {tt / max(tokens, 1) * 1e6:9.2f} {nc:10d} {ct:10.3f}  {fn} ({short}:{line})"
        )


# ---- main ------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--concurrency", type=int, default=64, help="streams launched at once per round")
    p.add_argument("--tokens", type=int, default=128, help="max_tokens of every stream")
    p.add_argument(
        "--rounds", type=int, default=3, help="measured rounds per path (after one warm-up each)"
    )
    p.add_argument("--replicas", type=int, default=2, help="llama-server processes")
    p.add_argument(
        "--settle", type=float, default=0.3, help="seconds after a round before reading CPU meters"
    )
    p.add_argument(
        "--direct-api",
        choices=("v1", "native"),
        default="v1",
        help="direct path: POST /v1/completions (default) or llama-server's native /completion, "
        "which the gateway itself uses and which is cheaper for the engine",
    )
    p.add_argument("--dump", type=Path, default=None, metavar="FILE",
                   help="write every stream of every round (times relative to the round's start) as JSON")  # fmt: skip
    p.add_argument("--profile-gateway", type=Path, default=None, metavar="FILE",
                   help="run the gateway under cProfile, write stats to FILE and print the top functions")  # fmt: skip
    a = p.parse_args()
    if min(a.concurrency, a.tokens, a.rounds, a.replicas) < 1:
        p.error("--concurrency, --tokens, --rounds and --replicas must be >= 1")
    return a


def _sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@dataclass
class Setup:
    """What :func:`start_all` started (all stopped when its ExitStack closes)."""

    replica_urls: list[str]
    engine_pids: list[int]
    gateway_url: str
    gateway: subprocess.Popen[bytes]
    logs: Path
    parallel: int
    ctx: int


def start_all(
    stack: ExitStack,
    *,
    concurrency: int,
    tokens: int,
    replicas: int,
    profile: Path | None = None,
    gateway_toml: str = "",
) -> Setup:
    """Tiny model, ``replicas`` llama-servers sized for ``concurrency`` streams of
    ``tokens`` tokens, and ``albatross serve`` over them as external endpoints.
    ``gateway_toml`` is appended to the ``[gateway]`` table."""
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="albatross-gwbench-")))
    # Kept when something fails (post-mortems); main() removes it after a clean run.
    logs = Path(tempfile.mkdtemp(prefix="albatross-gwbench-logs-"))
    binary = llama_server_binary(LlamaServerConfig())
    parallel = math.ceil(concurrency / replicas)
    per_slot = math.ceil((len(PROMPT_IDS) + tokens + 16) / 256) * 256
    ctx = per_slot * parallel
    model = make_tiny_model(tmp, context=max(4096, per_slot))
    urls = []
    for i in range(replicas):
        url = stack.enter_context(
            running_llama_server(
                binary, model, parallel=parallel, ctx=ctx, log_path=logs / f"llama-{i}.log"
            )
        )
        urls.append(url)
    ports = [lg.split_url(u)[1] for u in urls]
    by_port = _pids_listening(binary, ports)
    engine_pids = [by_port[p] for p in ports if p in by_port]
    gw_port = free_port()
    gw_url = f"http://127.0.0.1:{gw_port}"
    cfg = tmp / "gateway.toml"
    endpoints = ", ".join(f'"{u}"' for u in urls)
    cfg.write_text(
        f'[gateway]\nhost = "127.0.0.1"\nport = {gw_port}\nmax_tokens_limit = {max(8192, tokens)}\n'
        f"{gateway_toml}\n\n"
        f'[supervisor]\nlog_dir = "{tmp / "logs"}"\n\n'
        f'[[models]]\nname = "{MODEL_NAME}"\nreplicas = 0\nendpoints = [{endpoints}]\n'
    )
    gw_log = logs / "gateway.log"
    gw = start_gateway(stack, cfg, gw_url, gw_log, profile=profile)
    return Setup(urls, engine_pids, gw_url, gw, logs, parallel, ctx)


def main() -> int:
    args = parse_args()
    signal.signal(signal.SIGTERM, _sigterm)
    # Ctrl-C must stop (and clean up) even when started from a shell that ignores SIGINT.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    t_start = time.monotonic()
    import uvloop

    with ExitStack() as stack:
        su = start_all(
            stack,
            concurrency=args.concurrency,
            tokens=args.tokens,
            replicas=args.replicas,
            profile=args.profile_gateway,
        )
        print(
            f"setup: {args.replicas} x llama-server (-np {su.parallel}, -c {su.ctx}, -t 1) "
            f"pids {su.engine_pids}, gateway pid {su.gateway.pid} on {su.gateway_url}; "
            f"direct path: {'POST /completion (native)' if args.direct_api == 'native' else 'POST /v1/completions'}; "
            f"logs in {su.logs}",
            flush=True,
        )
        dump: list[dict[str, Any]] | None = [] if args.dump is not None else None
        rows, problems = uvloop.run(
            bench(args, su.replica_urls, su.gateway_url, su.gateway.pid, su.engine_pids, dump)
        )
        if args.dump is not None:
            args.dump.write_bytes(orjson.dumps(dump))
            print(f"per-stream records written to {args.dump}")
        report(args, rows, problems)
        if args.profile_gateway is not None:
            _stop(su.gateway)
            gw_tokens = (args.rounds + 1) * args.concurrency * args.tokens + args.tokens
            print_profile(args.profile_gateway, gw_tokens)
    if problems:
        print(f"logs kept in {su.logs}")
    else:
        shutil.rmtree(su.logs, ignore_errors=True)
    print(f"\ntook {time.monotonic() - t_start:.0f} s")
    return 1 if problems else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; everything started was stopped", file=sys.stderr)
        sys.exit(130)

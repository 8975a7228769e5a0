"""Chaos: many concurrent streams while replicas are SIGKILLed; every stream must be exact.

Run: ``.venv/bin/python benchmarks/chaos.py [--streams 200] [--replicas 3] [--kills 10]
[--interval 3] [--tokens 768]``

Setup: the tiny random-weight model (greedy streams never hit EOS, so each one runs to
``--tokens``), ``albatross serve`` with ``--replicas`` managed llama-servers (``-t 1``,
``ceil(streams / replicas) + 4`` slots each, so the survivors of a kill have room for the
streams that move to them), ``continuity.max_migrations`` 20, a control token.

1. Reference pass: all streams at once, nothing killed. Stream ``i`` has its own text
   prompt; every ``--chat-every``-th one is a chat request, the others completions;
   ``temperature`` 0.
2. Chaos pass: the same requests again, all at once; every ``--interval`` s one random
   *ready* replica (pid from ``GET /admin/replicas``) gets SIGKILL, until ``--kills``
   kills were made or every stream has ended. The supervisor restarts it (back-off
   ``--backoff`` s); its streams continue on the others by re-prefill.

Each chaos stream is checked against its reference: no HTTP error, no dropped
connection, no error event, ``[DONE]`` seen (errors); SSE ids strictly increasing, every
text event with an id, last text id + 1 == final event id == ``--tokens`` (gaps and
duplicates); the concatenated text byte-identical to the reference (a difference is
classified as a gap when text is missing, a duplicate when a repeated piece was
inserted, else a mismatch). Printed: counts, kills, migrations by reason/path and
continuation failures (``/metrics`` delta over the chaos pass), the gateway's own stall
histogram (mean by path), replicas the supervisor itself took down for failed health
checks (from the gateway log), client-observed stall per stream (its largest
inter-token gap: p50/p99/max, for streams that moved and those that did not, and the
same in the reference pass), time to first token, and wall times. For each mismatch:
where the text first differs (character, and the token range of the SSE event holding
it) and the stream's legs, so a divergence in the middle of a re-prefilled leg (the
engine's numerics) can be told from one at a leg start. Exit status 1 if any stream has
an error, gap, duplicate or mismatch; 2 if the reference pass itself failed.

Defaults: 200 streams x 768 tokens take ~45-50 s per pass on 2 cores (~3,000-3,300
tok/s through the gateway), so 10 kills 3 s apart fall inside the chaos pass; the whole
run takes ~2 min. (With ``--tokens 256`` a pass lasts ~13 s and only ~4 kills fit.)
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import math
import os
import random
import signal
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _loadgen as lg
import _stack as st

_WORDS = "albatross ocean wind wave storm harbour sailor captain chart rope sail island penguin market lamp river stone house road light moon sun tree cat dog tea bread cheese"  # fmt: skip
WORDS = _WORDS.split()


@dataclass
class Kill:
    t: float  # seconds since the chaos pass started
    replica: str
    pid: int
    in_flight: int


def prompts(n: int, seed: int, chat_every: int) -> list[tuple[str, dict[str, Any]]]:
    """(path, body without max_tokens) per stream; distinct prompts."""
    rng = random.Random(seed)
    out: list[tuple[str, dict[str, Any]]] = []
    for i in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12)))
        text = f"Stream {i}: the {words}"
        if chat_every and i % chat_every == chat_every - 1:
            out.append(("/v1/chat/completions", {"messages": [{"role": "user", "content": text}]}))
        else:
            out.append(("/v1/completions", {"prompt": text}))
    return out


def targets(url: str, reqs: list[tuple[str, dict[str, Any]]], tokens: int) -> list[lg.Target]:
    common = {"model": st.MODEL_NAME, "max_tokens": tokens, "temperature": 0, "stream": True}
    return [lg.post_target(url, path, {**body, **common}) for path, body in reqs]


# ---- checks ------------------------------------------------------------------------
def classify(text: str, ref: str) -> str:
    """'' when equal, else 'gap' (a piece missing), 'duplicate' (a piece repeated) or
    'mismatch'."""
    if text == ref:
        return ""
    p = 0
    n = min(len(text), len(ref))
    while p < n and text[p] == ref[p]:
        p += 1
    s = 0
    while s < n - p and text[-1 - s] == ref[-1 - s]:
        s += 1
    if len(text) < len(ref) and p + s >= len(text):
        return "gap"
    if len(text) > len(ref) and p + s >= len(ref):
        extra = text[p : len(text) - s]
        # Inserted text that repeats what came right before (or right after) it.
        if text[p - len(extra) : p] == extra or text[p + len(extra) : p + 2 * len(extra)] == extra:
            return "duplicate"
    return "mismatch"


def check(r: st.SseResult, ref: str, tokens: int) -> dict[str, str]:
    """Problems of one chaos stream by kind: error, gap, duplicate, mismatch."""
    bad: dict[str, str] = {}
    errs = []
    if r.error:
        errs.append(r.error)
    if r.error_events:
        errs.append(f"error event {r.error_events[0][:200]!r}")
    if not r.error and not r.done:
        errs.append("no [DONE]")
    if errs:
        bad["error"] = "; ".join(errs)
    ids = r.ids
    if any(i is None for i in ids):
        bad["gap"] = f"{sum(i is None for i in ids)} text events without an id"
    known = [i for i in ids if i is not None]
    dup = sum(1 for a, b in itertools.pairwise(known) if b <= a)
    if dup:
        bad["duplicate"] = f"{dup} SSE ids not increasing"
    if "error" in bad:
        return bad  # an ended stream: its missing tail is the error, not a gap
    if r.done and r.final_id != tokens:
        bad.setdefault("gap", f"final event id {r.final_id}, expected {tokens}")
    if r.done and known and known[-1] != tokens - 1:
        bad.setdefault("gap", f"last text event id {known[-1]}, expected {tokens - 1}")
    kind = classify(r.text(), ref)
    if kind and "error" not in bad:
        bad.setdefault(kind, f"text differs from the reference ({kind})")
    return bad


def first_difference(r: st.SseResult, ref: str) -> tuple[int, int, int]:
    """Where a stream's text first differs from the reference: (char offset, first and
    last token position of the event holding that character, from the SSE ids)."""
    text = r.text()
    p = 0
    n = min(len(text), len(ref))
    while p < n and text[p] == ref[p]:
        p += 1
    seen, prev = 0, -1
    for eid, d in zip(r.ids, r.datas, strict=True):
        ch = orjson.loads(d)["choices"][0]
        seen += len((ch["delta"].get("content") or "") if "delta" in ch else ch["text"])
        if seen > p:
            return p, prev + 1, eid if eid is not None else prev + 1
        prev = eid if eid is not None else prev
    return p, prev + 1, prev + 1


def where(lo: int, hi: int, info: dict[str, Any] | None) -> str:
    """'boundary' when a leg started inside the token range [lo, hi], else 'inside'
    (the divergence began in the middle of a leg)."""
    starts = [g["start"] for g in (info or {}).get("legs", [])[1:]]
    return "boundary" if any(lo <= s <= hi for s in starts) else "inside"


def legs_of(admin: st.Admin, results: list[st.SseResult]) -> list[dict[str, Any] | None]:
    """Each stream's record from ``GET /admin/requests/{id}`` (kept after it ended)."""
    out: list[dict[str, Any] | None] = []
    for r in results:
        try:
            out.append(admin.request(r.response_id) if r.response_id else None)
        except RuntimeError:
            out.append(None)
    return out


def legs_str(x: dict[str, Any] | None) -> str:
    if x is None:
        return "legs unknown"
    return "legs " + ", ".join(f"{g['replica']}@{g['start']}:{g['path']}" for g in x["legs"])


def max_gaps(results: list[st.SseResult]) -> list[float]:
    return [max(r.gaps(), default=0.0) for r in results]


def ms3(values: list[float]) -> str:
    if not values:
        return "-"
    return (
        f"p50 {lg.pct(values, 50) * 1e3:7.1f}  p99 {lg.pct(values, 99) * 1e3:7.1f}  "
        f"max {max(values) * 1e3:7.1f} ms  (n={len(values)})"
    )


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] not in (b"Z", b"X")


def supervisor_kills(log: Path, since: str) -> list[str]:
    """Gateway log lines, from ``since`` (a log timestamp prefix) on, where the supervisor
    took a replica down for failing its health checks."""
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if line[:23] >= since and "lost: failed" in line and "albatross.supervisor" in line:
            out.append(line)
    return out


# ---- the run -----------------------------------------------------------------------
async def killer(
    args: argparse.Namespace,
    admin: st.Admin,
    t0: float,
    all_done: asyncio.Future[None],
    rng: random.Random,
) -> list[Kill]:
    kills: list[Kill] = []
    while len(kills) < args.kills:
        try:
            await asyncio.wait_for(asyncio.shield(all_done), args.interval)
            break  # every stream ended
        except TimeoutError:
            pass
        rs = await asyncio.to_thread(admin.replicas)
        ready = [r for r in rs if r["state"] == "ready" and r["pid"]]
        if not ready:
            print(f"  t={time.perf_counter() - t0:6.2f} s: no ready replica to kill", flush=True)
            continue
        victim = rng.choice(ready)
        if not _alive(victim["pid"]):
            continue  # the supervisor is already replacing it (a stale answer)
        try:
            os.kill(victim["pid"], signal.SIGKILL)
        except ProcessLookupError:
            continue
        k = Kill(time.perf_counter() - t0, victim["id"], victim["pid"], victim["in_flight"])
        kills.append(k)
        print(
            f"  t={k.t:6.2f} s: SIGKILL {k.replica} (pid {k.pid}, {k.in_flight} streams in flight, "
            f"{victim['slots']} slots)",
            flush=True,
        )
    return kills


async def run_pass(
    tgts: list[lg.Target], timeout_s: float
) -> tuple[list[st.SseResult], float, float]:
    gc.collect()
    gc.disable()  # no collector pauses in the client's timestamps
    try:
        t0 = time.perf_counter()
        res = await asyncio.gather(*(st.sse_stream(t, timeout_s=timeout_s) for t in tgts))
        return list(res), t0, time.perf_counter()
    finally:
        gc.enable()


async def bench(args: argparse.Namespace, gw: st.Managed) -> int:
    admin = gw.admin
    reqs = prompts(args.streams, args.seed, args.chat_every)
    tgts = targets(gw.url, reqs, args.tokens)
    n_chat = sum(p.endswith("chat/completions") for p, _ in reqs)

    print(f"reference pass: {args.streams} streams ({n_chat} chat), nothing killed", flush=True)
    ref, r0, r1 = await run_pass(tgts, args.timeout)
    ref_bad = [(i, r) for i, r in enumerate(ref) if r.error or r.error_events or not r.done]
    print(
        f"  {r1 - r0:.1f} s, {args.streams * args.tokens / (r1 - r0):.0f} tok/s, "
        f"{len(ref_bad)} failed",
        flush=True,
    )
    if ref_bad:
        for i, r in ref_bad[:5]:
            print(f"  stream {i}: {r.error or r.error_events[:1] or 'no [DONE]'}")
        return 2
    ref_texts = [r.text() for r in ref]
    ref_info = await asyncio.to_thread(legs_of, admin, ref)
    ref_moved = sum(1 for x in ref_info if x is not None and x["migrations"] > 0)
    if ref_moved:
        print(f"  note: {ref_moved} reference streams moved although nothing was killed")

    m0 = await asyncio.to_thread(admin.metrics)
    log_since = time.strftime("%Y-%m-%d %H:%M:%S")
    print(
        f"chaos pass: {args.streams} streams, SIGKILL a random ready replica every "
        f"{args.interval:g} s, up to {args.kills} kills",
        flush=True,
    )
    loop = asyncio.get_running_loop()
    started = loop.create_future()
    rng = random.Random(args.seed)

    async def kill_when_started() -> list[Kill]:
        t0, done = await started
        return await killer(args, admin, t0, done, rng)

    async def chaos() -> tuple[list[st.SseResult], float, float]:
        all_done: asyncio.Future[None] = loop.create_future()
        gc.collect()
        gc.disable()
        try:
            t0 = time.perf_counter()
            started.set_result((t0, all_done))
            tasks = [asyncio.ensure_future(st.sse_stream(t, timeout_s=args.timeout)) for t in tgts]
            res = await asyncio.gather(*tasks)
            all_done.set_result(None)
            return list(res), t0, time.perf_counter()
        finally:
            gc.enable()

    (results, c0, c1), kills = await asyncio.gather(chaos(), kill_when_started())
    await asyncio.sleep(0.2)
    try:
        m1 = await asyncio.to_thread(admin.metrics)
    except OSError as exc:
        # The gateway itself is gone: say so, with what its log says, and fail.
        alive = _alive(gw.gateway_pid)
        print(f"\nthe gateway does not answer after the chaos pass ({exc}); process alive: {alive}")
        print("  gateway log tail:\n" + gw.log.read_text(errors="replace")[-3000:])
        errors = sum(1 for r in results if r.error or r.error_events or not r.done)
        print(f"  streams with errors {errors} / {args.streams}; result: FAIL")
        return 1

    info = await asyncio.to_thread(legs_of, admin, results)

    # ---- checks and report -------------------------------------------------------
    problems: dict[str, list[tuple[int, str]]] = {
        "error": [],
        "gap": [],
        "duplicate": [],
        "mismatch": [],
    }
    for i, (r, t) in enumerate(zip(results, ref_texts, strict=True)):
        for kind, why in check(r, t, args.tokens).items():
            problems[kind].append((i, why))
    moved = [i for i, x in enumerate(info) if x is not None and x["migrations"] > 0]
    unmoved = [i for i, x in enumerate(info) if x is not None and x["migrations"] == 0]
    mg = max_gaps(results)
    migr = st.delta(
        st.counters(m0, "albatross_migrations_total"), st.counters(m1, "albatross_migrations_total")
    )
    fails = st.delta(
        st.counters(m0, "albatross_continuation_failures_total"),
        st.counters(m1, "albatross_continuation_failures_total"),
    )
    ssum = st.delta(
        st.counters(m0, "albatross_migration_stall_seconds_sum"),
        st.counters(m1, "albatross_migration_stall_seconds_sum"),
    )
    scnt = st.delta(
        st.counters(m0, "albatross_migration_stall_seconds_count"),
        st.counters(m1, "albatross_migration_stall_seconds_count"),
    )
    per_stream_m = [x["migrations"] for x in info if x is not None]
    leg_paths: dict[str, int] = {}
    for x in info:
        for leg in (x or {}).get("legs", [])[1:]:
            leg_paths[leg["path"]] = leg_paths.get(leg["path"], 0) + 1

    print()
    print(
        f"chaos: {args.streams} streams x {args.tokens} tokens ({n_chat} chat), "
        f"{args.replicas} managed replicas (-t 1, -np {gw.parallel}), tiny model"
    )
    print(
        f"  kills made                     {len(kills)} (of {args.kills}, every {args.interval:g} s)"
    )
    print(
        f"  chaos pass wall                {c1 - c0:.1f} s ({args.streams * args.tokens / (c1 - c0):.0f} tok/s); "
        f"reference pass {r1 - r0:.1f} s"
    )
    print("  migrations (/metrics delta)    " + (", ".join(
        f"{dict(k).get('reason')}/{dict(k).get('path')}: {v:.0f}" for k, v in sorted(migr.items())
    ) or "none"))  # fmt: skip
    print(
        "  continuation failures          "
        + (", ".join(f"{dict(k).get('reason')}: {v:.0f}" for k, v in fails.items()) or "0")
    )
    print("  gateway stall, mean by path    " + (", ".join(
        f"{dict(k).get('path')}: {ssum.get(k, 0) / v * 1e3:.0f} ms (n={v:.0f})" for k, v in sorted(scnt.items())
    ) or "-"))  # fmt: skip
    if per_stream_m:
        hist: dict[int, int] = {}
        for m in per_stream_m:
            hist[m] = hist.get(m, 0) + 1
        print(
            "  streams by migrations          "
            + ", ".join(f"{k}: {v}" for k, v in sorted(hist.items()))
            + f"   (legs after the first by path: {leg_paths or '-'})"
        )
    sk = supervisor_kills(gw.log, log_since)
    print(f"  replicas the supervisor took down for failed health checks: {len(sk)}")
    for line in sk[:5]:
        print(f"    {line[:160]}")
    print(f"  streams with errors            {len(problems['error'])}")
    print(f"  streams with gaps              {len(problems['gap'])}")
    print(f"  streams with duplicates        {len(problems['duplicate'])}")
    print(f"  streams not identical to ref.  {len(problems['mismatch'])}")
    if problems["mismatch"]:
        kinds = [
            where(*first_difference(results[i], ref_texts[i])[1:], info[i])
            for i, _ in problems["mismatch"]
        ]
        print(
            f"    first difference inside a leg: {kinds.count('inside')}, in an event that "
            f"spans a leg start: {kinds.count('boundary')}"
        )
        print(
            "    (a divergence inside a leg that started by re-prefill is llama-server's: a\n"
            "     re-prefilled KV cache is not bit-identical to the one built token by token,\n"
            "     and greedy decoding of a random-weight model flips at near-ties)"
        )
    ok_identical = sum(
        1 for i in range(args.streams) if not any(i == j for v in problems.values() for j, _ in v)
    )
    print(f"  streams identical, complete    {ok_identical} / {args.streams}")
    print("  client-observed stall (largest inter-token gap per stream):")
    print(f"    all streams, chaos           {ms3(mg)}")
    print(f"    streams that moved           {ms3([mg[i] for i in moved])}")
    print(f"    streams that did not move    {ms3([mg[i] for i in unmoved])}")
    print(f"    reference pass (no kills)    {ms3(max_gaps(ref))}")
    print("  time to first token (not in the gaps above; a stream can wait here instead):")
    print(
        f"    chaos                        {ms3([r.times[0] - r.start for r in results if r.times])}"
    )
    print(f"    reference                    {ms3([r.times[0] - r.start for r in ref if r.times])}")
    for kind, items in problems.items():
        for i, why in items[:5]:
            p, lo, hi = first_difference(results[i], ref_texts[i])
            print(
                f"  {kind}: stream {i} ({reqs[i][0]}): {why}; first difference at char {p}, "
                f"token {lo}..{hi} ({where(lo, hi, info[i])}); chaos {legs_str(info[i])}; "
                f"reference {legs_str(ref_info[i])}"
            )
        if len(items) > 5:
            print(f"  {kind}: ... {len(items) - 5} more")
    failed = any(problems.values())
    print(f"  result: {'FAIL' if failed else 'PASS'}")
    return 1 if failed else 0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--streams", type=int, default=200)
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--interval", type=float, default=3.0, help="seconds between kills")
    p.add_argument("--tokens", type=int, default=768, help="max_tokens of every stream")
    p.add_argument(
        "--chat-every", type=int, default=4, help="every Nth stream is a chat request (0: none)"
    )
    p.add_argument(
        "--parallel", type=int, default=0, help="slots per replica (0: ceil(streams/replicas)+4)"
    )
    p.add_argument("--max-migrations", type=int, default=20)
    p.add_argument(
        "--numerics",
        choices=("exact", "fast"),
        default="exact",
        help="the replicas' numerics (exact: re-prefill is bit-identical to decoding)",
    )
    p.add_argument(
        "--backoff", type=float, default=0.5, help="supervisor.restart_backoff_initial_s"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep-logs", action="store_true", help="keep the logs also after a PASS")
    p.add_argument("--timeout", type=float, default=600.0, help="per-stream limit, seconds")
    a = p.parse_args()
    if min(a.streams, a.replicas, a.tokens) < 1 or a.kills < 0 or a.interval <= 0:
        p.error("--streams, --replicas, --tokens must be >= 1, --kills >= 0, --interval > 0")
    return a


def _sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    args = parse_args()
    signal.signal(signal.SIGTERM, _sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    t_start = time.monotonic()
    import uvloop

    rc = -1

    parallel = args.parallel or math.ceil(args.streams / args.replicas) + 4
    # Prompts are < 64 tokens (chat template included).
    ctx = math.ceil((64 + args.tokens + 16) / 256) * 256
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="albatross-chaos-")))
        model = st.make_model(tmp, "tiny")
        gw = st.start_managed(
            stack,
            model,
            replicas=args.replicas,
            parallel=parallel,
            ctx_size=ctx,
            max_migrations=args.max_migrations,
            restart_backoff_s=args.backoff,
            work=tmp,
            numerics=args.numerics,
        )
        print(
            f"setup: gateway pid {gw.gateway_pid} on {gw.url}, {args.replicas} managed replicas "
            f"(-np {parallel}, ctx {ctx} per slot), max_migrations {args.max_migrations}, "
            f"restart back-off {args.backoff:g} s",
            flush=True,
        )
        try:
            rc = uvloop.run(bench(args, gw))
        except Exception:
            rc = 3
            raise
        finally:
            if rc != 0 or args.keep_logs:
                st.keep_logs(gw.logs, "chaos")
    print(f"\ntook {time.monotonic() - t_start:.0f} s")
    return rc


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; everything started was stopped", file=sys.stderr)
        sys.exit(130)

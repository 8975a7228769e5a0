"""The supervisor with real engine processes (``fake_engine.py``) and real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop

from albatross.config import SupervisorConfig
from albatross.supervisor.supervisor import (
    START_ATTEMPTS,
    ReplicaSpec,
    Supervisor,
    SupervisorError,
)

T = TypeVar("T")
Runner = Callable[[Coroutine[Any, Any, T]], T]
FAKE_ENGINE = str(Path(__file__).with_name("fake_engine.py"))
# Short everything: the whole module must stay fast.
CONFIG = SupervisorConfig(
    ready_timeout_s=3.0,
    health_interval_s=0.1,
    health_timeout_s=0.2,
    health_failures=2,
    restart_backoff_initial_s=0.2,
    restart_backoff_max_s=0.8,
    stop_grace_s=0.5,
)


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Runner[Any]:
    return asyncio.run if request.param == "asyncio" else uvloop.run


# --- helpers: processes seen through /proc ----------------------------------------------


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie counts as gone (pid 1 here may reap late)."""
    fields = _stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def group_members(pgid: int) -> list[int]:
    """Live processes whose process group is ``pgid``."""
    found = []
    for entry in Path("/proc").iterdir():
        f = _stat(int(entry.name)) if entry.name.isdigit() else None
        if f is not None and f[0] not in ("Z", "X") and int(f[2]) == pgid:
            found.append(int(entry.name))
    return found


async def until(predicate: Callable[[], bool], within_s: float = 5.0) -> None:
    async with asyncio.timeout(within_s):
        while not predicate():  # noqa: ASYNC110 -- polls /proc and lists, no event to wait on
            await asyncio.sleep(0.02)


# --- helpers: the engine side -------------------------------------------------------------


async def get_health(base_url: str) -> tuple[int, bytes]:
    host, port = base_url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"GET /health HTTP/1.0\r\n\r\n")
        await writer.drain()
        reply = await reader.read()
    finally:
        writer.close()
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def probe(base_url: str) -> bool:
    # Raises on a refused connection: the supervisor must count that as "not healthy".
    status, _ = await get_health(base_url)
    return status == 200


def spec(tmp_path: Path, replica_id: str, *flags: str) -> ReplicaSpec:
    def argv(port: int) -> list[str]:
        return [sys.executable, FAKE_ENGINE, "--port", str(port), *flags]

    return ReplicaSpec(replica_id, argv, tmp_path / f"{replica_id.replace('/', '_')}.log")


@dataclass
class Recorder:
    """A ReplicaListener that keeps (time, kind, replica, url-or-reason, pid)."""

    events: list[tuple[float, str, str, str, int | None]] = field(default_factory=list)

    def replica_ready(self, replica_id: str, base_url: str, pid: int) -> None:
        self.events.append((time.monotonic(), "ready", replica_id, base_url, pid))

    def replica_lost(self, replica_id: str, reason: str) -> None:
        self.events.append((time.monotonic(), "lost", replica_id, reason, None))

    def kinds(self, replica_id: str) -> list[str]:
        return [e[1] for e in self.events if e[2] == replica_id]

    def last(self, kind: str, replica_id: str) -> tuple[float, str, str, str, int | None]:
        return [e for e in self.events if e[1] == kind and e[2] == replica_id][-1]


# --- tests ------------------------------------------------------------------------------


async def test_no_replicas_starts_and_closes_at_once() -> None:
    # A gateway in front of external endpoints only supervises nothing.
    rec = Recorder()
    sup = Supervisor([], CONFIG, rec, probe)
    async with asyncio.timeout(1):
        await sup.start()
        await sup.close()
    assert rec.events == []


async def test_ready_only_after_health_answers(tmp_path: Path) -> None:
    rec = Recorder()
    sup = Supervisor([spec(tmp_path, "m/0", "--ready-after", "0.6")], CONFIG, rec, probe)
    t0 = time.monotonic()
    await sup.start()
    try:
        assert time.monotonic() - t0 >= 0.6
        assert rec.kinds("m/0") == ["ready"]
        _, _, _, url, pid = rec.events[0]
        assert pid is not None and pid == sup.pid("m/0")
        status, body = await get_health(url)
        assert status == 200 and json.loads(body)["pid"] == pid
        assert os.readlink(f"/proc/{pid}/fd/0") == "/dev/null"
        assert os.getpgid(pid) == pid
    finally:
        await sup.close()
    assert rec.kinds("m/0") == ["ready", "lost"]
    assert "closing" in rec.events[-1][3]
    assert not alive(pid) and sup.pid("m/0") is None


def test_crash_is_reported_then_restarted_with_backoff(
    run: Runner[Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rec = Recorder()
    s = spec(tmp_path, "m/0", "--grandchild")
    s.log_path.write_text("from before\n")

    async def main() -> None:
        sup = Supervisor([s], CONFIG, rec, probe)
        await sup.start()
        try:
            for n, delay in ((1, 0.2), (2, 0.4)):
                pid = sup.pid("m/0")
                assert pid is not None
                assert len(group_members(pid)) == 2  # engine + grandchild
                await sup.kill("m/0")
                await until(lambda n=n: rec.kinds("m/0").count("ready") == n + 1)  # type: ignore[misc]
                lost, ready = rec.last("lost", "m/0"), rec.last("ready", "m/0")
                assert lost[3] == "killed by SIGKILL"
                assert ready[0] - lost[0] >= delay  # back-off doubles: runs were short
                assert ready[4] != pid and sup.pid("m/0") == ready[4]
                assert group_members(pid) == []  # the grandchild went with the group
        finally:
            await sup.close()

    with caplog.at_level(logging.INFO, logger="albatross.supervisor"):
        run(main())
    assert rec.kinds("m/0") == ["ready", "lost", "ready", "lost", "ready", "lost"]
    text = caplog.text
    assert "restarting in 0.20 s" in text and "restarting in 0.40 s" in text
    assert re.search(r"ready at http://127\.0\.0\.1:\d+ after \d+\.\d+ s", text)
    log = s.log_path.read_text()
    assert log.startswith("from before\n") and log.count("--- albatross") == 3
    assert log.count("fake_engine pid=") == 3


async def test_exit_of_one_replica_leaves_the_others_alone(tmp_path: Path) -> None:
    rec = Recorder()
    specs = [spec(tmp_path, "m/0"), spec(tmp_path, "m/1", "--crash-after", "0.3")]
    sup = Supervisor(specs, CONFIG, rec, probe)
    await sup.start()
    try:
        steady = sup.pid("m/0")
        await until(lambda: rec.kinds("m/1").count("ready") >= 2)
        assert "exited with code 3" in rec.last("lost", "m/1")[3]
        assert rec.kinds("m/0") == ["ready"] and sup.pid("m/0") == steady
    finally:
        await sup.close()


def test_close_stops_every_process_including_grandchildren(
    run: Runner[Any], tmp_path: Path
) -> None:
    rec = Recorder()

    async def main() -> list[int]:
        specs = [spec(tmp_path, f"m/{i}", "--grandchild") for i in range(2)]
        sup = Supervisor(specs, CONFIG, rec, probe)
        await sup.start()
        groups = [p for s in specs if (p := sup.pid(s.replica_id)) is not None]
        assert [len(group_members(g)) for g in groups] == [2, 2]
        await sup.close()
        await sup.close()  # idempotent
        assert all(t.done() for t in sup._tasks)
        assert [sup.pid(s.replica_id) for s in specs] == [None, None]
        return groups

    groups = run(main())
    assert [group_members(g) for g in groups] == [[], []]
    assert sorted(e[1] for e in rec.events) == ["lost", "lost", "ready", "ready"]


async def test_engine_ignoring_term_is_killed_after_grace(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sup = Supervisor(
        [spec(tmp_path, "m/0", "--ignore-term", "--grandchild")], CONFIG, Recorder(), probe
    )
    await sup.start()
    pid = sup.pid("m/0")
    assert pid is not None
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="albatross.supervisor"):
        await sup.close()
    assert time.monotonic() - t0 >= CONFIG.stop_grace_s
    assert group_members(pid) == []
    assert f"engine pid {pid} still running" in caplog.text


async def test_start_timeout_names_replica_and_log_and_stops_everything(tmp_path: Path) -> None:
    rec = Recorder()
    config = CONFIG.model_copy(update={"ready_timeout_s": 1.0})
    good, never = spec(tmp_path, "m/0"), spec(tmp_path, "m/1", "--ready-after", "600")
    sup = Supervisor([good, never], config, rec, probe)
    with pytest.raises(SupervisorError) as info:
        await sup.start()
    err = info.value
    assert err.replica_id == "m/1" and err.log_path == never.log_path
    message = str(err)
    assert "'m/1'" in message and str(never.log_path) in message
    assert "not ready within 1 s" in message
    assert "fake_engine pid=" in message  # the log's last lines
    pids = [int(m) for m in re.findall(r"fake_engine pid=(\d+)", good.log_path.read_text())]
    pids += [int(m) for m in re.findall(r"fake_engine pid=(\d+)", never.log_path.read_text())]
    assert len(pids) == 2 and not any(alive(p) for p in pids)
    assert all(t.done() for t in sup._tasks)
    assert rec.kinds("m/0") == ["ready", "lost"]


async def test_engine_that_keeps_failing_fails_start_fast(tmp_path: Path) -> None:
    rec = Recorder()
    code = "import sys; print('error: model file not found', file=sys.stderr); sys.exit(1)"
    bad = ReplicaSpec("m/0", lambda port: [sys.executable, "-c", code], tmp_path / "bad.log")
    sup = Supervisor([bad], CONFIG, rec, probe)
    t0 = time.monotonic()
    with pytest.raises(SupervisorError, match="exited with code 1 before becoming ready") as info:
        await sup.start()
    assert time.monotonic() - t0 < CONFIG.ready_timeout_s
    assert "error: model file not found" in str(info.value)
    assert rec.kinds("m/0") == ["lost"] * START_ATTEMPTS


async def test_missing_program_fails_start_with_the_os_error(tmp_path: Path) -> None:
    bad = ReplicaSpec("m/0", lambda port: ["/nonexistent/llama-server"], tmp_path / "x.log")
    sup = Supervisor([bad], CONFIG, Recorder(), probe)
    with pytest.raises(SupervisorError, match=r"cannot start the engine: .*No such file"):
        await sup.start()


async def test_unusable_host_fails_start_naming_it(tmp_path: Path) -> None:
    sup = Supervisor([spec(tmp_path, "m/0")], CONFIG, Recorder(), probe, host="192.0.2.1")
    with pytest.raises(SupervisorError, match=re.escape("cannot pick a free port on '192.0.2.1'")):
        await sup.start()


async def test_lost_port_race_heals_on_a_new_port(tmp_path: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    busy = taken.getsockname()[1]
    asked: list[int] = []

    def argv(port: int) -> list[str]:
        # The first run is told a port someone else got first, as in a real race.
        asked.append(port)
        return [sys.executable, FAKE_ENGINE, "--port", str(busy if len(asked) == 1 else port)]

    rec = Recorder()
    sup = Supervisor([ReplicaSpec("m/0", argv, tmp_path / "race.log")], CONFIG, rec, probe)
    try:
        await sup.start()
        assert rec.kinds("m/0") == ["lost", "ready"]
        assert "exited with code 1 before becoming ready" in rec.events[0][3]
        assert len(asked) == 2 and asked[0] != asked[1]
        assert rec.events[1][3] == f"http://127.0.0.1:{asked[1]}"
    finally:
        await sup.close()
        taken.close()


async def test_hung_engine_is_restarted_after_failed_health_checks(tmp_path: Path) -> None:
    rec = Recorder()
    sup = Supervisor([spec(tmp_path, "m/0")], CONFIG, rec, probe)
    await sup.start()
    try:
        hung = sup.pid("m/0")
        await sup.kill("m/0", signal.SIGSTOP)  # alive but answering nothing
        await until(lambda: rec.kinds("m/0") == ["ready", "lost", "ready"])
        assert rec.events[1][3] == "failed 2 health checks in a row"
        assert hung is not None and not alive(hung)
    finally:
        await sup.close()


async def test_listener_errors_do_not_stop_supervision(tmp_path: Path) -> None:
    class Broken:
        def replica_ready(self, replica_id: str, base_url: str, pid: int) -> None:
            raise RuntimeError("listener bug")

        def replica_lost(self, replica_id: str, reason: str) -> None:
            raise RuntimeError("listener bug")

    sup = Supervisor([spec(tmp_path, "m/0")], CONFIG, Broken(), probe)
    await sup.start()
    first = sup.pid("m/0")
    await sup.kill("m/0")
    await until(lambda: sup.pid("m/0") not in (None, first))
    await sup.close()


async def test_close_during_start_makes_start_fail_promptly(tmp_path: Path) -> None:
    sup = Supervisor([spec(tmp_path, "m/0", "--ready-after", "600")], CONFIG, Recorder(), probe)
    starting = asyncio.create_task(sup.start())
    await until(lambda: sup.pid("m/0") is not None)
    pid = sup.pid("m/0")
    t0 = time.monotonic()
    await sup.close()
    with pytest.raises(SupervisorError, match="closed while starting"):
        await starting
    assert time.monotonic() - t0 < 1.0
    assert pid is not None and not alive(pid)


async def test_api_misuse_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unique"):
        Supervisor([spec(tmp_path, "m/0"), spec(tmp_path, "m/0")], CONFIG, Recorder(), probe)
    sup = Supervisor([spec(tmp_path, "m/0")], CONFIG, Recorder(), probe)
    with pytest.raises(KeyError, match="unknown replica 'm/9'; known: m/0"):
        sup.pid("m/9")
    with pytest.raises(KeyError):
        await sup.kill("m/9")
    assert sup.pid("m/0") is None
    await sup.kill("m/0")  # nothing running: no-op
    await sup.close()
    with pytest.raises(RuntimeError):
        await sup.start()


PARENT = """
import asyncio, json, sys, uvloop
from pathlib import Path
from albatross.config import SupervisorConfig
from albatross.supervisor.supervisor import ReplicaSpec, Supervisor

class Quiet:
    def replica_ready(self, *args): pass
    def replica_lost(self, *args): pass

async def probe(url):
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /health HTTP/1.0\\r\\n\\r\\n")
    ok = (await reader.readline()).split()[1] == b"200"
    writer.close()
    return ok

async def main():
    argv = lambda port: [sys.executable, {engine!r}, "--port", str(port),
                         "--grandchild", "--forward-term"]
    specs = [ReplicaSpec(f"m/{{i}}", argv, Path({logs!r}) / f"{{i}}.log") for i in range(2)]
    sup = Supervisor(specs, SupervisorConfig(ready_timeout_s=5), Quiet(), probe)
    await sup.start()
    print(json.dumps([sup.pid(s.replica_id) for s in specs]), flush=True)
    await asyncio.sleep(60)

uvloop.run(main())
"""


def test_sigkilled_gateway_leaves_no_engine_behind(tmp_path: Path) -> None:
    script = PARENT.format(engine=FAKE_ENGINE, logs=str(tmp_path))
    argv = [sys.executable, "-c", script]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) as parent:
        try:
            assert parent.stdout is not None
            engines = json.loads(parent.stdout.readline())
            processes = [p for pgid in engines for p in group_members(pgid)]
            assert len(processes) == 4  # two engines, each with a grandchild
        finally:
            parent.kill()

    async def all_gone() -> None:
        await until(lambda: not any(alive(p) for p in processes))

    try:
        asyncio.run(all_gone())
    finally:
        for pgid in engines:  # the test failed: do not leave the engines behind
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)

"""One engine process, with real processes, under both asyncio's loop and uvloop."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop

from albatross.supervisor.process import describe_returncode, spawn

T = TypeVar("T")
FAKE_ENGINE = str(Path(__file__).with_name("fake_engine.py"))
Runner = Callable[[Coroutine[Any, Any, T]], T]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Runner[Any]:
    """Runs a coroutine on a fresh loop of the kind the test is parametrized with."""
    return asyncio.run if request.param == "asyncio" else uvloop.run


def alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie counts as gone (pid 1 here may reap late)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def group_members(pgid: int) -> list[int]:
    """Live processes whose process group is ``pgid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            found.append(int(entry.name))
    return found


async def until(predicate: Callable[[], bool], within_s: float = 5.0) -> None:
    async with asyncio.timeout(within_s):
        while not predicate():  # noqa: ASYNC110 -- polls /proc and files, no event to wait on
            await asyncio.sleep(0.02)


def log_has(path: Path, text: str) -> Callable[[], bool]:
    return lambda: path.exists() and text in path.read_text()


def test_own_session_devnull_stdin_appended_log_and_term_stops_group(
    run: Runner[Any], tmp_path: Path
) -> None:
    log = tmp_path / "nested" / "dir" / "engine.log"
    log.parent.mkdir(parents=True)
    log.write_text("earlier run\n")

    async def main() -> None:
        p = await spawn([sys.executable, FAKE_ENGINE, "--port", "0", "--grandchild"], log)
        await until(log_has(log, "fake_engine pid="))
        assert os.getpgid(p.pid) == p.pid and os.getsid(p.pid) == p.pid
        assert os.readlink(f"/proc/{p.pid}/fd/0") == "/dev/null"
        assert len(group_members(p.pid)) == 2  # engine + grandchild
        assert p.returncode is None
        assert await p.stop(2.0) == -signal.SIGTERM
        assert p.returncode == -signal.SIGTERM
        assert group_members(p.pid) == []

    run(main())
    text = log.read_text()
    assert text.startswith("earlier run\n--- albatross ")
    assert f"starting {sys.executable} {FAKE_ENGINE}" in text


def test_log_directory_is_created(run: Runner[Any], tmp_path: Path) -> None:
    log = tmp_path / "a" / "b" / "x.log"

    async def main() -> int:
        return await (await spawn(["true"], log)).wait()

    assert run(main()) == 0
    assert log.exists()


def test_child_ignoring_term_is_killed_after_grace(
    run: Runner[Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = tmp_path / "e.log"

    async def main() -> None:
        argv = [sys.executable, FAKE_ENGINE, "--port", "0", "--grandchild", "--ignore-term"]
        p = await spawn(argv, log)
        await until(log_has(log, "fake_engine pid="))
        t0 = time.monotonic()
        assert await p.stop(0.3) == -signal.SIGKILL
        assert 0.3 <= time.monotonic() - t0 < 2.0
        assert group_members(p.pid) == []

    with caplog.at_level(logging.WARNING, logger="albatross.supervisor"):
        run(main())
    assert any("SIGKILL" in r.getMessage() for r in caplog.records)


def test_stopped_child_is_continued_so_term_works_without_waiting_for_grace(
    run: Runner[Any], tmp_path: Path
) -> None:
    async def main() -> None:
        p = await spawn(["sleep", "60"], tmp_path / "s.log")
        os.kill(p.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        assert await p.stop(5.0) == -signal.SIGTERM
        assert time.monotonic() - t0 < 1.0

    run(main())


def test_stop_is_idempotent_concurrent_and_safe_after_exit(
    run: Runner[Any], tmp_path: Path
) -> None:
    async def main() -> None:
        done = await spawn([sys.executable, "-c", "raise SystemExit(7)"], tmp_path / "a.log")
        assert await done.wait() == 7
        assert await done.stop(1.0) == 7
        assert await done.stop(1.0) == 7

        sleeper = await spawn(["sleep", "60"], tmp_path / "b.log")
        results = await asyncio.gather(sleeper.stop(1.0), sleeper.stop(1.0))
        assert list(results) == [-signal.SIGTERM, -signal.SIGTERM]
        assert await sleeper.stop(1.0) == -signal.SIGTERM

    run(main())


def test_stop_after_exit_sweeps_what_the_child_left_in_its_group(
    run: Runner[Any], tmp_path: Path
) -> None:
    leaver = "import subprocess; print(subprocess.Popen(['sleep', '60']).pid, flush=True)"

    async def main() -> None:
        p = await spawn([sys.executable, "-c", leaver], tmp_path / "l.log")
        assert await p.wait() == 0
        assert len(group_members(p.pid)) == 1  # the orphaned sleep
        assert await p.stop(1.0) == 0
        await until(lambda: group_members(p.pid) == [])

    run(main())


def test_no_shell_env_replaced_and_secrets_hidden_in_header(
    run: Runner[Any], tmp_path: Path
) -> None:
    log = tmp_path / "s.log"
    code = "import os, sys; print(sys.argv[1:], os.environ.get('ONLY'), 'HOME' in os.environ)"
    argv = [
        sys.executable,
        "-c",
        code,
        "$HOME; echo pwned",
        "--api-key",
        "s3cret",
        "--hf-token=t0k",
    ]

    async def main() -> int:
        return await (await spawn(argv, log, env={"ONLY": "yes"})).wait()

    assert run(main()) == 0
    text = log.read_text()
    assert "['$HOME; echo pwned', '--api-key', 's3cret', '--hf-token=t0k'] yes False" in text
    header = text.splitlines()[0]
    assert "s3cret" not in header and "--api-key '***'" in header
    assert "t0k" not in header and "'--hf-token=***'" in header


def test_unstartable_program_raises(run: Runner[Any], tmp_path: Path) -> None:
    async def main(argv: list[str]) -> None:
        await spawn(argv, tmp_path / "x.log")

    with pytest.raises(FileNotFoundError):
        run(main(["/nonexistent/engine"]))
    with pytest.raises(ValueError, match="empty"):
        run(main([]))


PARENT = """
import asyncio, sys, uvloop
from pathlib import Path
from albatross.supervisor.process import spawn
async def main():
    p = await spawn([sys.executable, {engine!r}, "--port", "0"], Path({log!r}))
    print(p.pid, flush=True)
    await asyncio.sleep(60)
(uvloop.run if {loop!r} == "uvloop" else asyncio.run)(main())
"""


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_sigkilled_parent_takes_its_engine_down(loop: str, tmp_path: Path) -> None:
    script = PARENT.format(engine=FAKE_ENGINE, log=str(tmp_path / "p.log"), loop=loop)
    argv = [sys.executable, "-c", script]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) as parent:
        try:
            assert parent.stdout is not None
            engine = int(parent.stdout.readline())
            assert alive(engine)
        finally:
            parent.kill()

    async def gone() -> None:
        await until(lambda: not alive(engine))

    try:
        asyncio.run(gone())
    finally:
        if alive(engine):  # the test failed: do not leave the engine behind
            os.killpg(engine, signal.SIGKILL)


@pytest.mark.parametrize(
    ("code", "text"),
    [(0, "exited with code 0"), (-9, "killed by SIGKILL"), (-200, "killed by signal 200")],
)
def test_describe_returncode(code: int, text: str) -> None:
    assert describe_returncode(code) == text

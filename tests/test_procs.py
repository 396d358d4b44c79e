"""The dispatcher-as-a-process harness (testkit/procs.py): start, kill, restart, signal, memory."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from testkit.harness import (
    DAILY_KEY,
    FLY_TOKEN,
    JWT_SECRET,
    dispatcher_process,
    emulators,
    fly_emulator,
)
from testkit.procs import DispatcherProcess
from testkit.waits import eventually


def headers(user: str = "user-1") -> dict[str, str]:
    token = jwt.encode({"sub": user, "exp": int(time.time()) + 600}, JWT_SECRET, algorithm="HS256")
    return {"Authorization": f"Bearer {token}"}


async def wait_state(http: httpx.AsyncClient, sid: str, state: str) -> dict[str, Any]:
    session: dict[str, Any] = {}

    async def reached() -> bool:
        nonlocal session
        answer = await http.get(f"/sessions/{sid}", headers=headers())
        assert answer.status_code == 200, answer.text
        session = answer.json()
        assert session["state"] != "failed", session
        return session["state"] == state

    await eventually(reached, timeout=15, what=f"{sid} {state} (last: {session})")
    return session


def environ_names(pid: int) -> set[str]:
    """The names in a process's environment."""
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return {item.split(b"=", 1)[0].decode() for item in environ if item}


async def start_session(http: httpx.AsyncClient) -> str:
    started = await http.post("/start", json={"createDailyRoom": True}, headers=headers())
    assert started.status_code == 200, started.text
    return str(started.json()["sessionId"])


@pytest.mark.slow
async def test_kill_restart_terminate(tmp_path: Path) -> None:
    """A real process: healthy, a session ready, SIGKILL (-9), restarted on the same port with
    the session still there, the session deleted and ended, SIGTERM (-15), a log written."""
    async with emulators(fly=fly_emulator()) as urls:
        db = f"sqlite:///{tmp_path}/d.db"
        async with dispatcher_process(urls, tmp_path, db=db) as proc:
            port = proc.port
            assert not proc.running
            await proc.start()
            assert proc.running and proc.url == f"http://127.0.0.1:{port}"
            first_pid = proc.pid
            async with httpx.AsyncClient(base_url=proc.url, timeout=10) as http:
                assert (await http.get("/healthz")).status_code == 200
                sid = await start_session(http)
                await wait_state(http, sid, "ready")

                proc.kill()
                assert await proc.wait(10) == -signal.SIGKILL
                assert not proc.running and proc.returncode == -signal.SIGKILL
                assert proc.peak_rss_bytes() is None

                await proc.restart()
                assert proc.running and proc.pid != first_pid and proc.port == port
                assert (await wait_state(http, sid, "ready"))["sessionId"] == sid

                deleted = await http.delete(f"/sessions/{sid}", headers=headers())
                assert deleted.status_code == 202, deleted.text
                await wait_state(http, sid, "ended")
            fly = urls.fly
            assert fly is not None and fly.machines
            await eventually(
                lambda: not any(m.active for m in fly.machines.values()), what="machines gone"
            )

            proc.terminate()
            assert await proc.wait(20) == -signal.SIGTERM
    log = proc.log_text()
    assert log.count("===== start ") == 2
    assert log.count(f"dispatcher listening on http://127.0.0.1:{port}") == 2, log
    assert "dispatcher stopped" in log
    assert DAILY_KEY not in log and FLY_TOKEN not in log and JWT_SECRET not in log


@pytest.mark.slow
async def test_process_on_a_fresh_postgresql_database(tmp_path: Path, pg_database_url: str) -> None:
    """`pg_database_url` is a database of its own that a dispatcher process can use."""
    async with (
        emulators(fly=fly_emulator()) as urls,
        dispatcher_process(urls, tmp_path, db=pg_database_url) as proc,
        httpx.AsyncClient(base_url=proc.url, timeout=10) as http,
    ):
        await proc.start()
        sid = await start_session(http)
        session = await wait_state(http, sid, "ready")
        assert session["sessionId"] == sid
        ready = await http.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert (await http.delete(f"/sessions/{sid}", headers=headers())).status_code == 202
        await wait_state(http, sid, "ended")
    assert "configuration error" not in proc.log_text()


async def test_peak_rss_while_running(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """VmHWM of the running process is a plausible size; nothing once it exited. The child
    leads a process group of its own and does not inherit this process's environment."""
    monkeypatch.setenv("PROCS_TEST_SENTINEL", "leaked")
    env = {"DATABASE_URL": f"sqlite:///{tmp_path}/d.db"}
    async with DispatcherProcess(env, tmp_path) as proc:
        assert proc.peak_rss_bytes() is None
        await proc.start()
        assert os.getpgid(proc.pid) == proc.pid != os.getpgid(0)
        names = environ_names(proc.pid)
        assert names <= {
            "PATH",
            "HOME",
            "PYTHONUNBUFFERED",
            "LOG_LEVEL",
            "DATABASE_URL",
            "POOL_SIZE",
        }, names
        peak = proc.peak_rss_bytes()
        assert peak is not None and 10 * 2**20 < peak < 2 * 2**30, peak
        proc.terminate()
        assert await proc.wait(20) == -signal.SIGTERM
        assert proc.peak_rss_bytes() is None


async def test_start_fails_with_the_log_when_the_process_exits(tmp_path: Path) -> None:
    """A dispatcher that cannot start (a configuration error, exit code 2) fails start() at once,
    with its output in the message."""
    env = {"DATABASE_URL": f"sqlite:///{tmp_path}/d.db", "MAX_SESSIONS": "many"}
    async with DispatcherProcess(env, tmp_path) as proc:
        with pytest.raises(RuntimeError, match="exited with 2") as failure:
            await proc.start()
        assert "MAX_SESSIONS" in str(failure.value)
        assert not proc.running and proc.returncode == 2

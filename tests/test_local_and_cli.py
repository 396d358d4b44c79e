"""The local machine backend, and the `dispatcher serve` command run as a real process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import jwt
import pytest

from dispatcher.cli import listen
from dispatcher.config import Settings
from dispatcher.machines import BotSpec
from dispatcher.machines.local import BOT_PORTS, LocalMachines, free_port
from testkit.fakes import TESTBOT_DIR
from testkit.harness import (
    DAILY_KEY,
    JWT_SECRET,
    daily_emulator,
    dispatcher_env,
    dispatcher_stack,
)
from testkit.net import bind_loopback, serve
from testkit.waits import eventually

REPO = Path(__file__).resolve().parent.parent


async def test_local_backend_runs_a_whole_session(tmp_path: Path) -> None:
    """With the local backend the bot is a subprocess: ready, DELETE, SIGTERM, ended."""
    async with dispatcher_stack(tmp_path, local=True) as stack:
        sid = (await stack.start()).json()["sessionId"]
        session = await stack.wait_state(sid, "ready")
        assert session["machineId"].startswith("local-") and session["region"] == "local"
        await stack.http.delete(f"/sessions/{sid}", headers=stack.headers())
        ended = await stack.wait_state(sid, "ended")
        assert ended["endReason"] == "deleted" and ended["exitCode"] == 0
        daily = stack.daily
        assert daily is not None
        await eventually(lambda: sid not in daily.rooms, what="room deleted (by the janitor)")


async def test_local_backend_records_a_crash(tmp_path: Path) -> None:
    """A local bot that exits before ready fails the session with its exit code."""
    async with dispatcher_stack(tmp_path, local=True) as stack:
        sid = (await stack.start({"testBot": {"exit_before_ready": 7}})).json()["sessionId"]
        session = await stack.wait_state(sid, "failed")
        assert session["exitCode"] == 7


async def test_local_bots_never_get_the_dispatchers_secrets(tmp_path: Path) -> None:
    """The local backend strips the dispatcher's own credentials from the bot's environment."""
    out = tmp_path / "env.txt"
    machines = LocalMachines(
        base_env={
            "PATH": os.environ["PATH"],
            "DAILY_API_KEY": "k",
            "JWT_SECRET": "j",
            "FLY_API_TOKEN": "f",
            "DATABASE_URL": "d",
            "KEEP": "1",
        },
    )
    script = f"import os; open({str(out)!r}, 'w').write(' '.join(sorted(os.environ)))"
    ref = await machines.launch(
        BotSpec(session_id="s-x", user="u", cmd=("python", "-c", script), env={"SESSION_ID": "s"})
    )
    exit = await machines.wait_exit(ref, 10)
    assert exit is not None and exit.exit_code == 0
    names = out.read_text().split()
    assert "KEEP" in names and "SESSION_ID" in names
    assert not {"DAILY_API_KEY", "JWT_SECRET", "FLY_API_TOKEN", "DATABASE_URL"} & set(names)
    await machines.aclose()


async def test_local_stop_escalates_to_sigkill(tmp_path: Path) -> None:
    """A local bot that ignores SIGTERM is killed after the grace period, exit 128+9."""
    machines = LocalMachines()
    ignoring = tmp_path / "ignoring-sigterm"
    script = (
        "import pathlib, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        f"pathlib.Path({str(ignoring)!r}).touch(); time.sleep(60)"
    )
    ref = await machines.launch(
        BotSpec(session_id="s-y", user="u", cmd=("python", "-c", script), env={})
    )
    await eventually(ignoring.exists, timeout=30, what="the bot to ignore SIGTERM")
    await machines.stop(ref, grace_s=1)
    exit = await machines.wait_exit(ref, 10)
    assert exit is not None and exit.exit_code == 137 and exit.requested_stop
    await machines.aclose()


@asynccontextmanager
async def dispatcher_process(
    env: dict[str, str], port: int, *args: str
) -> AsyncIterator[asyncio.subprocess.Process]:
    """`python -m dispatcher serve` as a child process on loopback."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dispatcher",
        "serve",
        "--port",
        str(port),
        *args,
        env={"PATH": os.environ["PATH"], "POOL_SIZE": "0", **env},
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def wait_healthy(url: str) -> None:
    async with httpx.AsyncClient(base_url=url) as http:

        async def healthy() -> bool:
            try:
                return (await http.get("/healthz")).status_code == 200
            except httpx.TransportError:
                return False

        await eventually(healthy, timeout=20, what="dispatcher up")


async def test_serve_runs_a_daily_session_as_a_process(tmp_path: Path) -> None:
    """`python -m dispatcher serve` with Daily and the local backend serves a whole session."""
    daily = daily_emulator()
    async with serve(daily.app) as daily_url:
        sock = bind_loopback()
        port = sock.getsockname()[1]
        sock.close()
        url = f"http://127.0.0.1:{port}"
        env = dispatcher_env(
            fly_url=None, daily_url=daily_url, dispatcher_url=url, db=f"sqlite:///{tmp_path}/d.db"
        ) | {"LOCAL_BOT_DIR": str(TESTBOT_DIR)}
        async with dispatcher_process(env, port) as proc:
            await wait_healthy(url)
            token = jwt.encode({"sub": "cli-user", "exp": 2**31}, JWT_SECRET, algorithm="HS256")
            headers = {"Authorization": f"Bearer {token}"}
            async with httpx.AsyncClient(base_url=url, headers=headers) as http:
                answer = (await http.post("/start", json={})).json()
                sid = answer["sessionId"]

                async def state(wanted: str) -> bool:
                    return (await http.get(f"/sessions/{sid}")).json()["state"] == wanted

                await eventually(lambda: state("ready"), timeout=15, what="ready")
                assert (await http.delete(f"/sessions/{sid}")).status_code == 202
                await eventually(lambda: state("ended"), timeout=15, what="ended")
            proc.send_signal(signal.SIGTERM)
            # uvicorn shuts down gracefully, then re-raises the signal it caught
            assert await asyncio.wait_for(proc.wait(), 20) in (0, -signal.SIGTERM)
            assert proc.stdout is not None
            output = (await proc.stdout.read()).decode()
    assert f"listening on http://127.0.0.1:{port}" in output
    assert "dispatcher stopped" in output
    assert DAILY_KEY not in output and JWT_SECRET not in output


async def test_serve_with_no_credentials_runs_webrtc_sessions(tmp_path: Path) -> None:
    """With no credentials it serves on loopback, webrtc sessions with local bots, the page."""
    sock = bind_loopback()
    port = sock.getsockname()[1]
    sock.close()
    url = f"http://127.0.0.1:{port}"
    env = {"DATABASE_URL": f"sqlite:///{tmp_path}/d.db", "LOCAL_BOT_DIR": str(TESTBOT_DIR)}
    async with dispatcher_process(env, port) as proc:
        await wait_healthy(url)
        async with httpx.AsyncClient(base_url=url) as http:
            started = await http.post("/start", json={})
            assert started.status_code == 200, started.text
            assert set(started.json()) == {"sessionId", "iceConfig"}
            sid = started.json()["sessionId"]
            offer = await http.post(
                f"/sessions/{sid}/api/offer", json={"sdp": "v=0", "type": "offer"}
            )
            assert offer.status_code == 200 and offer.json()["type"] == "answer"
            daily = await http.post("/start", json={"transport": "daily"})
            assert daily.status_code == 400
            assert daily.json()["code"] == "transport-unavailable"
            assert "DAILY_API_KEY" in daily.json()["detail"]
            assert (await http.get("/")).headers["content-type"].startswith("text/html")
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 20)
        assert proc.stdout is not None
        output = (await proc.stdout.read()).decode()
    assert f"open {url}/ in a browser" in output
    assert "authentication is off" in output
    assert "transports=webrtc" in output


async def test_bot_callbacks_only_on_the_internal_listener(tmp_path: Path) -> None:
    """With INTERNAL_PORT, bots call back there (DISPATCHER_URL's default) and the public port
    answers 404 to the callback routes."""
    ports = []
    for _ in range(2):
        sock = bind_loopback()
        ports.append(sock.getsockname()[1])
        sock.close()
    public, internal = ports
    env = {
        "DATABASE_URL": f"sqlite:///{tmp_path}/d.db",
        "LOCAL_BOT_DIR": str(TESTBOT_DIR),
        "INTERNAL_PORT": str(internal),
        "INTERNAL_HOST": "127.0.0.1",
    }
    url = f"http://127.0.0.1:{public}"
    async with dispatcher_process(env, public) as proc:
        await wait_healthy(url)
        async with httpx.AsyncClient(base_url=url) as http:
            started = await http.post("/start", json={})
            sid = started.json()["sessionId"]

            async def ready() -> bool:
                return (await http.get(f"/sessions/{sid}")).json()["state"] == "ready"

            await eventually(ready, timeout=15, what="ready through the internal port")
            for op in ("ready", "ended"):
                refused = await http.post(
                    f"/internal/sessions/{sid}/{op}",
                    json={"reason": "completed", "exit_code": 0},
                    headers={"Authorization": "Bearer whatever"},
                )
                assert refused.status_code == 404, refused.text
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{internal}") as http:
            wrong_token = await http.post(
                f"/internal/sessions/{sid}/ready", headers={"Authorization": "Bearer whatever"}
            )
            assert wrong_token.status_code == 401
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 20)
        assert proc.stdout is not None
        output = (await proc.stdout.read()).decode()
    assert f"bot callbacks on 127.0.0.1 port {internal} only" in output


@pytest.mark.slow
async def test_serve_refuses_bad_config_naming_the_variable() -> None:
    """A malformed setting stops start-up with exit code 2 and the variable's name."""
    async with dispatcher_process({"MAX_SESSIONS": "lots"}, 0) as proc:
        assert await asyncio.wait_for(proc.wait(), 20) == 2
        assert proc.stdout is not None
        output = (await proc.stdout.read()).decode()
    assert "MAX_SESSIONS" in output and "Traceback" not in output


@pytest.mark.slow
async def test_serve_refuses_public_address_without_auth() -> None:
    """Without credentials, listening on a non-loopback address is refused."""
    async with dispatcher_process({}, 0, "--host", "0.0.0.0") as proc:
        assert await asyncio.wait_for(proc.wait(), 20) == 2
        assert proc.stdout is not None
        assert "loopback" in (await proc.stdout.read()).decode()


def test_settings_used_by_the_harness_are_valid() -> None:
    """The harness's environment is itself a valid configuration (fly + daily + jwt)."""
    env = dispatcher_env(
        fly_url="http://127.0.0.1:1",
        daily_url="http://127.0.0.1:2",
        dispatcher_url="http://127.0.0.1:3",
        db="sqlite:///x.db",
    )
    settings = Settings.from_env(env)
    assert settings.machine_backend == "fly" and settings.transports == ("daily",)


def test_listening_sockets_are_tcp_so_answers_are_not_delayed() -> None:
    """`dispatcher serve` listens on sockets created as IPPROTO_TCP: asyncio sets TCP_NODELAY
    only on accepted sockets with that protocol, and without it each answer waits ~40 ms for a
    delayed ACK."""
    for host in ("127.0.0.1", "::1"):
        sock = listen(host, 0)
        try:
            assert sock.proto == socket.IPPROTO_TCP
        finally:
            sock.close()


def test_bot_ports_are_chosen_below_the_ephemeral_range() -> None:
    """A local bot's port comes from BOT_PORTS, below every ephemeral range (on Linux read from
    the kernel), so nothing that binds port 0 or connects out takes it before the bot listens;
    it is free when chosen, and a port in use is never chosen."""
    low = 49152
    with contextlib.suppress(OSError, ValueError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    assert BOT_PORTS.stop <= low
    held = []
    try:
        for _ in range(20):
            port = free_port("127.0.0.1")
            assert port in BOT_PORTS
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", port))  # free when chosen
            sock.listen(1)
            held.append(sock)
        assert len({s.getsockname()[1] for s in held}) == len(held)  # none in use chosen
    finally:
        for sock in held:
            sock.close()

"""`make run` and `dispatcher serve` as a person runs them: the first screen of a first run
(and an install that fails), and how they stop with local bots running (`make run` in a
terminal and Ctrl-C, `make run` and SIGTERM to its whole process group, which is what
`timeout`, systemd and IDE stop buttons send, `dispatcher serve` and a second SIGTERM, or
SIGKILL), and what the next start records of the sessions a killed dispatcher left behind.

The terminal is a real pseudo-terminal whose controlling process is `make`: typing Ctrl-C
there signals the whole foreground process group (make, uv, the dispatcher), as a terminal
does. The `make run` tests run the real bot (the example bot, offline: an echo), made ready by
an aiortc peer through the dispatcher's proxy, as the web page does.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import re
import shutil
import signal
import struct
import sys
import termios
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from dispatcher.store import Event, Session, Store
from testkit.fakes import TESTBOT_DIR
from testkit.net import free_port
from testkit.procs import REPO, DispatcherProcess, alive, bot_pids, pool_worker_pids
from testkit.waits import eventually
from tests.fixtures.peer import Peer, Speaker

pytestmark = pytest.mark.timeout(600)

# Settings that would move `make run` off its embedded defaults, and the bot contract's
# variables: none may leak in from the environment running the tests.
DISPATCHER_ENV = re.compile(
    r"^(HOST|PORT|MACHINE_BACKEND|FLY_.*|BOT_.*|DAILY_.*|DATABASE_URL|DISPATCHER_.*|SESSION_.*|"
    r"READY_TIMEOUT_S|MAX_SESSIONS|JWT_.*|LOCAL_BOT_DIR|ICE_SERVERS|TRACEPARENT|LOG_.*|OTEL_.*|"
    r"TRACE_USER_IDS|UV_PROJECT_ENVIRONMENT|UV_PYTHON|VIRTUAL_ENV|MAKEFLAGS|MFLAGS|MAKELEVEL)$"
)
START_TIMEOUT_S = 180  # `make run` syncs the environment first
MAKE = ["make", "--no-print-directory"]
# A terminal's control sequences (colours), not shown as text.
ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# A line of uv's install report (`+ package==1.2.3`, `Resolved 165 packages in 12ms`).
INSTALL_REPORT = re.compile(
    r"^\s*([+-] \S+==\S+|Resolved \d+|Prepared \d+|Installed \d+|Checked \d+)"
)
BOT_TIMEOUT_S = 90  # a real bot's cold start on a loaded machine
STOP_TIMEOUT_S = 60
# Run `argv` with the terminal on fd 0 as its controlling terminal.
WITH_CTTY = (
    "import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
    "os.execvp(sys.argv[1], sys.argv[1:])"
)
# What a stop must never show: a crash, make's own complaint, a bot that lost its dispatcher.
ALARMS = ("Traceback", "KeyboardInterrupt", "Interrupt", "make: ***", "callback failed")


def make_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """This process's environment minus the dispatcher's settings, with a database in tmp and
    a stop grace long enough that a bot ending on a loaded machine reports before any SIGKILL."""
    env = {k: v for k, v in os.environ.items() if not DISPATCHER_ENV.match(k)}
    settings = {"DATABASE_URL": f"sqlite:///{tmp_path}/d.db", "BOT_STOP_TIMEOUT_S": "60"}
    return env | settings | extra


class Terminal:
    """A command in a pseudo-terminal of its own, as a person runs it in a terminal window:
    its output is what the window shows, and `ctrl_c()` types Ctrl-C there."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.argv = argv
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None
        self._master = -1
        self._output = bytearray()
        self._closed = False

    async def start(self) -> None:
        """Open the terminal (200 columns) and run the command as its controlling process."""
        self._master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                WITH_CTTY,
                *self.argv,
                stdin=slave,
                stdout=slave,
                stderr=slave,
                cwd=REPO,
                env=self.env,
                start_new_session=True,
            )
        finally:
            os.close(slave)
        asyncio.get_running_loop().add_reader(self._master, self._read)

    def _read(self) -> None:
        try:
            data = os.read(self._master, 65536)
        except OSError:
            data = b""
        if not data:
            asyncio.get_running_loop().remove_reader(self._master)
            self._closed = True
        self._output += data

    @property
    def text(self) -> str:
        """Everything the terminal showed, as text: line ends as `\\n`, no colours."""
        return ESCAPES.sub("", self._output.decode(errors="replace").replace("\r\n", "\n"))

    async def wait_for(self, needle: str, timeout: float) -> None:
        """Until the terminal shows `needle` (fails if the command exits first)."""

        def shown() -> bool:
            assert self.proc is not None
            if needle in self.text:
                return True
            assert self.proc.returncode is None, f"exited {self.proc.returncode}:\n{self.text}"
            return False

        await eventually(shown, timeout=timeout, what=f"{needle!r} on the terminal")

    def ctrl_c(self) -> None:
        """Type Ctrl-C."""
        os.write(self._master, b"\x03")

    async def wait(self, timeout: float) -> int:
        """The command's exit status (negative: the signal that ended it)."""
        assert self.proc is not None
        try:
            code = await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            raise AssertionError(f"still running after {timeout} s:\n{self.text}") from None
        await eventually(
            lambda: self._closed, what="the terminal closed (unless a process still holds it)"
        )
        return code

    async def aclose(self) -> None:
        """SIGKILL what is left of the command's process group, and close the terminal."""
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()
        if self._master >= 0:
            if not self._closed:
                asyncio.get_running_loop().remove_reader(self._master)
            os.close(self._master)
            self._master = -1


async def session_pids(url: str, sid: str) -> list[int]:
    """The live process of a session's bot: a cold bot, or the pool worker that serves it."""
    async with httpx.AsyncClient(base_url=url, timeout=30, trust_env=False) as http:
        machine = (await http.get(f"/sessions/{sid}")).json()["machineId"]
    return bot_pids(sid, machine)


class ProxiedBot:
    """A session's bot behind the dispatcher's proxy, as the page reaches it."""

    def __init__(self, http: httpx.AsyncClient, session_id: str) -> None:
        self.http = http
        self.session_id = session_id

    async def post(self, body: Any) -> httpx.Response:
        """POST the offer; a bot still booting past the proxy's wait is asked again."""
        answer: httpx.Response | None = None

        async def answered() -> bool:
            nonlocal answer
            answer = await self.http.post(
                f"/sessions/{self.session_id}/api/offer", json=body, timeout=60
            )
            return answer.status_code not in (502, 503, 504)

        await eventually(answered, timeout=BOT_TIMEOUT_S, what="the bot's answer to the offer")
        assert answer is not None
        return answer


@contextlib.asynccontextmanager
async def ready_session(url: str) -> AsyncIterator[str]:
    """A webrtc session of the real bot, ready: a peer connected through the proxy."""
    async with httpx.AsyncClient(base_url=url, timeout=30, trust_env=False) as http:
        started = await http.post("/start", json={})
        assert started.status_code == 200, started.text
        sid = str(started.json()["sessionId"])
        peer = Peer(Speaker(np.zeros(0, dtype=np.int16)))
        try:
            await peer.connect(ProxiedBot(http, sid))

            async def ready() -> bool:
                return bool((await http.get(f"/sessions/{sid}")).json()["state"] == "ready")

            await eventually(ready, timeout=BOT_TIMEOUT_S, what="the session ready")
            yield sid
        finally:
            await peer.close()


async def stored(tmp_path: Path, sid: str) -> tuple[Session, list[Event]]:
    """The session and its event log, from the dispatcher's database."""
    store = await Store.open(f"sqlite:///{tmp_path}/d.db")
    try:
        session = await store.get(sid)
        assert session is not None
        return session, await store.events(sid)
    finally:
        await store.close()


async def assert_ended_by_the_stop(tmp_path: Path, sid: str) -> None:
    """The session ended because its dispatcher stopped, its bot's `ended` accepted (exit 0)."""
    session, log = await stored(tmp_path, sid)
    assert session.state == "ended", session
    assert session.end_reason == "dispatcher_stopped" and session.exit_code == 0, session
    reports = [e.details for e in log if e.kind == "bot_ended"]
    assert [(r["reason"], r["exit_code"]) for r in reports] == [("sigterm", 0)], log


@pytest.mark.slow
async def test_first_screen_of_a_first_make_run(tmp_path: Path) -> None:
    """A first `make run` (an empty environment to install) shows where to open the page and
    what to do, with no package list before it."""
    port = free_port()
    env = make_env(tmp_path, UV_PROJECT_ENVIRONMENT=str(tmp_path / "venv"))
    terminal = Terminal([*MAKE, "run", f"PORT={port}"], env)
    try:
        await terminal.start()
        await terminal.wait_for("press Connect", START_TIMEOUT_S)
        assert (tmp_path / "venv" / "bin" / "dispatcher").exists()
        screen = terminal.text.split("press Connect")[0].splitlines()
        assert not [line for line in screen if INSTALL_REPORT.match(line)], terminal.text
        assert len(screen) <= 4, terminal.text
        assert f"dispatcher listening on http://127.0.0.1:{port}" in screen, terminal.text
        assert screen[-1].startswith(f"open http://127.0.0.1:{port}/ in a browser"), screen
        terminal.ctrl_c()
        await terminal.wait(STOP_TIMEOUT_S)
    finally:
        await terminal.aclose()
        shutil.rmtree(tmp_path / "venv", ignore_errors=True)


async def test_a_failed_install_still_shows_why(tmp_path: Path) -> None:
    """When `make run` cannot install, uv's error is on the screen and make stops there."""
    env = make_env(
        tmp_path, UV_PROJECT_ENVIRONMENT=str(tmp_path / "venv"), UV_PYTHON="3.99", UV_OFFLINE="1"
    )
    terminal = Terminal([*MAKE, "run", f"PORT={free_port()}"], env)
    try:
        await terminal.start()
        assert await terminal.wait(START_TIMEOUT_S) != 0
        assert "error: No interpreter found for Python 3.99" in terminal.text, terminal.text
        assert "dispatcher listening" not in terminal.text
    finally:
        await terminal.aclose()


@pytest.mark.slow
async def test_ctrl_c_of_make_run_in_a_terminal(tmp_path: Path) -> None:
    """Ctrl-C of `make run` in a terminal, with a session live: the bot ends properly first (its
    `ended` accepted, no retries), the terminal shows no traceback, no `Interrupt` and no error,
    and make ends as Ctrl-C ends it (or with its recipe's 0); no bot is left running."""
    port = free_port()
    terminal = Terminal([*MAKE, "run", f"PORT={port}"], make_env(tmp_path))
    try:
        await terminal.start()
        await terminal.wait_for(f"open http://127.0.0.1:{port}/", START_TIMEOUT_S)
        url = f"http://127.0.0.1:{port}"
        async with ready_session(url) as sid:
            pids = await session_pids(url, sid)
            assert pids, terminal.text
            # The warm pool's idle bot process (make run keeps one) goes with it too.
            await eventually(
                lambda: set(pool_worker_pids(url)) - set(pids),
                timeout=60,
                what="an idle pool worker",
            )
            pids = sorted(set(pids) | set(pool_worker_pids(url)))
            shown = len(terminal.text)
            terminal.ctrl_c()
            # make dies by the SIGINT it got (GNU make re-raises it once its recipe has ended);
            # one loaded run saw it exit 0 with its recipe instead. Either way, nothing alarming.
            assert await terminal.wait(STOP_TIMEOUT_S) in (-signal.SIGINT, 0)
        after = terminal.text[shown:]
        assert not [a for a in ALARMS if a in after], after
        assert "dispatcher stopped" in after, after
        assert not [pid for pid in pids if alive(pid)], after
        await assert_ended_by_the_stop(tmp_path, sid)
    finally:
        await terminal.aclose()


@pytest.mark.slow
async def test_sigterm_to_the_process_group_of_make_run(tmp_path: Path) -> None:
    """SIGTERM to the whole process group of `make run` (make, uv and the dispatcher each get
    it, and uv and make pass it on), with a session live: the dispatcher drains once, its bot
    ends properly before it exits, and no bot is left running."""
    port = free_port()
    log_path = tmp_path / "make-run.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            *MAKE,
            "run",
            f"PORT={port}",
            cwd=REPO,
            env=make_env(tmp_path),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=url, trust_env=False) as http:

            async def healthy() -> bool:
                assert proc.returncode is None, log_path.read_text()
                with contextlib.suppress(httpx.TransportError):
                    return (await http.get("/healthz")).status_code == 200
                return False

            await eventually(healthy, timeout=START_TIMEOUT_S, what="make run serving")
        async with ready_session(url) as sid:
            pids = await session_pids(url, sid)
            assert pids
            await eventually(
                lambda: set(pool_worker_pids(url)) - set(pids),
                timeout=60,
                what="an idle pool worker",
            )
            pids = sorted(set(pids) | set(pool_worker_pids(url)))
            os.killpg(proc.pid, signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
        output = log_path.read_text(errors="replace")
        assert not [pid for pid in pids if alive(pid)], output
        assert "Traceback" not in output and "callback failed" not in output, output
        assert output.count("draining:") == 1, output
        await assert_ended_by_the_stop(tmp_path, sid)
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()


@pytest.mark.slow
async def test_sigkill_takes_the_bots_and_the_next_start_records_them_lost(
    tmp_path: Path,
) -> None:
    """SIGKILL of `dispatcher serve` takes its local bots with it; at its next start the
    sessions they served end as `dispatcher_lost` (ended if the bot had been ready, failed if
    not, no exit code), and `dispatcher trace` says the bot was lost with its dispatcher."""
    env = {
        "DATABASE_URL": f"sqlite:///{tmp_path}/d.db",
        "LOCAL_BOT_DIR": str(TESTBOT_DIR),
        "RECONCILE_INTERVAL_S": "0.3",
    }
    async with DispatcherProcess(env, tmp_path) as proc:
        await proc.start()
        async with httpx.AsyncClient(base_url=proc.url, trust_env=False, timeout=30) as http:
            ready = (await http.post("/start", json={})).json()["sessionId"]
            body = {"body": {"testBot": {"skip_ready": True}}}
            booting = (await http.post("/start", json=body)).json()["sessionId"]

            async def live() -> bool:
                state = (await http.get(f"/sessions/{ready}")).json()["state"]
                return state == "ready" and bool(bot_pids(ready)) and bool(bot_pids(booting))

            await eventually(live, timeout=30, what="a ready session and a booting one")
            pids = bot_pids(ready) + bot_pids(booting)
            proc.kill()
            await proc.wait()
            await eventually(
                lambda: not [pid for pid in pids if alive(pid)],
                timeout=30,
                what="the bots gone with their dispatcher",
            )

            await proc.restart()

            async def over(sid: str) -> bool:
                return (await http.get(f"/sessions/{sid}")).json()["state"] in ("ended", "failed")

            for sid in (ready, booting):
                await eventually(lambda sid=sid: over(sid), timeout=30, what=f"{sid} over")
            lost_ready = (await http.get(f"/sessions/{ready}")).json()
            lost_booting = (await http.get(f"/sessions/{booting}")).json()
    assert (lost_ready["state"], lost_ready["endReason"], lost_ready["exitCode"]) == (
        "ended",
        "dispatcher_lost",
        None,
    )
    assert (lost_booting["state"], lost_booting["endReason"], lost_booting["exitCode"]) == (
        "failed",
        "dispatcher_lost",
        None,
    )
    trace = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dispatcher",
        "trace",
        ready,
        cwd=REPO,
        env={"PATH": os.environ["PATH"], **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out = (await trace.communicate())[0].decode()
    assert trace.returncode == 0, out
    assert "dispatcher_lost" in out, out
    notes = [line for line in out.splitlines() if line.startswith("note:")]
    assert any("lost with its dispatcher" in note for note in notes), out


async def test_a_second_sigterm_kills_local_bots_at_once(tmp_path: Path) -> None:
    """A second SIGTERM while the dispatcher waits for a bot that ignores its stop ends the
    dispatcher at once (killed by SIGTERM), and the bot with it."""
    env = {
        "DATABASE_URL": f"sqlite:///{tmp_path}/d.db",
        "LOCAL_BOT_DIR": str(TESTBOT_DIR),
        "BOT_STOP_TIMEOUT_S": "300",
    }
    async with DispatcherProcess(env, tmp_path) as proc:
        await proc.start()
        async with httpx.AsyncClient(base_url=proc.url, trust_env=False, timeout=30) as http:
            body = {"body": {"testBot": {"ignore_sigterm": True}}}
            sid = (await http.post("/start", json=body)).json()["sessionId"]

            async def ready() -> bool:
                return (await http.get(f"/sessions/{sid}")).json()["state"] == "ready"

            await eventually(ready, timeout=30, what="the session ready")
        pids = bot_pids(sid)
        assert pids
        proc.terminate()
        await eventually(
            lambda: "sigterm ignored" in proc.log_text(), timeout=30, what="the bot's stop"
        )
        proc.terminate()
        assert await proc.wait(STOP_TIMEOUT_S) == -signal.SIGTERM
    await eventually(lambda: not [pid for pid in pids if alive(pid)], what="the bot gone")
    assert "stopping at once" in proc.log_text()


# A parent that passes SIGINT and SIGTERM on to its child, as some versions of `uv run` do.
FORWARDER = (
    "import signal, subprocess, sys\n"
    "child = subprocess.Popen(sys.argv[1:])\n"
    "for sig in (signal.SIGINT, signal.SIGTERM):\n"
    "    signal.signal(sig, lambda signum, _: child.send_signal(signum))\n"
    "sys.exit(child.wait())\n"
)


async def test_ctrl_c_passed_on_by_the_parent_counts_once(tmp_path: Path) -> None:
    """Ctrl-C that reaches the dispatcher twice, from the terminal and passed on by its parent
    (here: SIGINT to the process group of a parent that forwards it), is one stop: one drain,
    the bot's session ended properly, exit status 0."""
    port = free_port()
    env = {
        "PATH": os.environ["PATH"],
        "PYTHONUNBUFFERED": "1",
        "DATABASE_URL": f"sqlite:///{tmp_path}/d.db",
        "LOCAL_BOT_DIR": str(TESTBOT_DIR),
        "BOT_STOP_TIMEOUT_S": "60",
        "POOL_SIZE": "0",
    }
    log_path = tmp_path / "dispatcher.log"
    serve = [sys.executable, "-m", "dispatcher", "serve", "--port", str(port)]
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            FORWARDER,
            *serve,
            cwd=REPO,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=30
        ) as http:

            async def ready(sid: str) -> bool:
                with contextlib.suppress(httpx.TransportError):
                    return (await http.get(f"/sessions/{sid}")).json()["state"] == "ready"
                return False

            async def healthy() -> bool:
                assert proc.returncode is None, log_path.read_text()
                with contextlib.suppress(httpx.TransportError):
                    return (await http.get("/healthz")).status_code == 200
                return False

            await eventually(healthy, timeout=30, what="the dispatcher serving")
            sid = (await http.post("/start", json={})).json()["sessionId"]
            await eventually(lambda: ready(sid), timeout=30, what="the session ready")
        pids = bot_pids(sid)
        os.killpg(proc.pid, signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S) == 0, log_path.read_text()
        output = log_path.read_text(errors="replace")
        assert output.count("draining:") == 1, output
        assert "stopping at once" not in output and "Traceback" not in output, output
        assert not [pid for pid in pids if alive(pid)], output
        await assert_ended_by_the_stop(tmp_path, sid)
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()

"""The dispatcher as a real child process (`python -m dispatcher serve`), for tests that signal,
kill and restart it, run several instances on one database, or measure its memory."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal as signals
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

import httpx

from testkit.net import free_port

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 20.0


class DispatcherProcess:
    """`python -m dispatcher serve --host 127.0.0.1 --port <port>`, restartable on the same port.

    The child's environment is PATH, HOME, PYTHONUNBUFFERED=1, LOG_LEVEL and POOL_SIZE=0 (no
    warm bot processes unless a test asks for them) plus `env`, never this process's whole
    environment. Its stdout and stderr go to `<log_dir>/dispatcher-<port>.log`,
    appended across restarts. It runs in a session of its own, so signals meant for the test
    runner (Ctrl-C) do not reach it.
    """

    def __init__(
        self,
        env: Mapping[str, str],
        log_dir: Path,
        *,
        port: int | None = None,
        log_level: str = "INFO",
    ) -> None:
        self.port = port or free_port()
        self.env = dict(env)
        self.log_level = log_level
        self.log_path = Path(log_dir) / f"dispatcher-{self.port}.log"
        self.starts = 0
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        """Where the dispatcher listens (the same across restarts)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        """The pid of the current (or last) child process."""
        if self._proc is None:
            raise RuntimeError("the dispatcher was never started")
        return self._proc.pid

    @property
    def running(self) -> bool:
        """Whether the child was started and has not been reaped yet."""
        return self._proc is not None and self._proc.returncode is None

    @property
    def returncode(self) -> int | None:
        """The last child's return code (negative: killed by that signal); None while running."""
        return None if self._proc is None else self._proc.returncode

    def _child_env(self) -> dict[str, str]:
        base = {
            "PATH": os.environ.get("PATH", os.defpath),
            "PYTHONUNBUFFERED": "1",
            "POOL_SIZE": "0",
        }
        if "HOME" in os.environ:
            base["HOME"] = os.environ["HOME"]
        return base | {"LOG_LEVEL": self.log_level} | self.env

    async def start(self) -> None:
        """Spawn the child and wait until GET /healthz answers 200 (at most 20 s)."""
        if self.running:
            raise RuntimeError(f"the dispatcher on port {self.port} is already running")
        self.starts += 1
        argv = [sys.executable, "-m", "dispatcher", "serve", "--host", "127.0.0.1"]
        argv += ["--port", str(self.port)]
        with self.log_path.open("ab") as log:
            log.write(f"===== start {self.starts}: {' '.join(argv)}\n".encode())
            log.flush()
            self._proc = await asyncio.create_subprocess_exec(
                *argv,
                cwd=REPO,
                env=self._child_env(),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        async with httpx.AsyncClient(base_url=self.url, timeout=2, trust_env=False) as http:
            while True:
                if not self.running:
                    raise RuntimeError(
                        f"the dispatcher exited with {self.returncode} before it was healthy:\n"
                        + self.log_tail()
                    )
                with contextlib.suppress(httpx.TransportError):
                    if (await http.get("/healthz")).status_code == 200:
                        return
                if time.monotonic() > deadline:
                    await self.aclose()
                    raise RuntimeError(
                        f"the dispatcher was not healthy after {START_TIMEOUT_S} s:\n"
                        + self.log_tail()
                    )
                await asyncio.sleep(0.05)

    async def restart(self) -> None:
        """Start again, on the same port, after the last child exited."""
        if self._proc is None or self.running:
            raise RuntimeError("restart() needs a dispatcher that ran and exited")
        await self.start()

    def signal(self, sig: int) -> None:
        """Send `sig` to the child (ProcessLookupError if it is not running)."""
        if self._proc is None or not self.running:
            raise ProcessLookupError(f"the dispatcher on port {self.port} is not running")
        self._proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL: no shutdown at all, as when a VM dies."""
        self.signal(signals.SIGKILL)

    def terminate(self) -> None:
        """SIGTERM: uvicorn's graceful shutdown, then the signal re-raised (exit code -15)."""
        self.signal(signals.SIGTERM)

    async def wait(self, timeout: float = 30.0) -> int:
        """The child's return code once it exits; TimeoutError after `timeout` seconds."""
        if self._proc is None:
            raise RuntimeError("the dispatcher was never started")
        try:
            return await asyncio.wait_for(self._proc.wait(), timeout)
        except TimeoutError:
            raise TimeoutError(
                f"the dispatcher (pid {self._proc.pid}) still runs after {timeout} s:\n"
                + self.log_tail()
            ) from None

    async def aclose(self) -> None:
        """SIGKILL the child if it runs (its whole process group when it leads one), and reap it.

        Bots of the local machine backend run in process groups of their own: not killed here.
        """
        proc = self._proc
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                if os.getpgid(proc.pid) == proc.pid:
                    os.killpg(proc.pid, signals.SIGKILL)
                else:
                    proc.kill()
        await proc.wait()

    async def __aenter__(self) -> DispatcherProcess:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def peak_rss_bytes(self) -> int | None:
        """The child's peak resident memory (VmHWM) while it runs; None when not available."""
        if not self.running:
            return None
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return None
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return None

    def log_text(self) -> str:
        """Everything the child wrote, across restarts."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the log."""
        return "\n".join(self.log_text().splitlines()[-lines:])


def alive(pid: int) -> bool:
    """Whether the process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def pids_with_env(*entries: str) -> list[int]:
    """Live processes whose environment (as they were started with it) holds one of `entries`
    (`NAME=value`)."""
    needles = {entry.encode() for entry in entries}
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and alive(int(entry.name)):
            with contextlib.suppress(OSError):
                if needles & set((entry / "environ").read_bytes().split(b"\0")):
                    found.append(int(entry.name))
    return found


def bot_pids(session_id: str, machine_id: str | None = None) -> list[int]:
    """A local session's bot: the process started with SESSION_ID=<session_id> (a cold bot),
    or with FLY_MACHINE_ID=<machine_id> (a pool worker, which learnt its session after it
    started: its /proc environ is still the one it was started with)."""
    entries = [f"SESSION_ID={session_id}"]
    if machine_id:
        entries.append(f"FLY_MACHINE_ID={machine_id}")
    return pids_with_env(*entries)


def pool_worker_pids(dispatcher_url: str) -> list[int]:
    """Live local pool workers of the dispatcher at `dispatcher_url` (its DISPATCHER_URL)."""
    found = []
    for pid in pids_with_env(f"DISPATCHER_URL={dispatcher_url}"):
        with contextlib.suppress(OSError):
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            if any(e.startswith(b"POOL_TOKEN=") for e in environ):
                found.append(pid)
    return found

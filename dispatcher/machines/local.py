"""Bots as local subprocesses: the same command and env as on Fly, on this host.

Local bots never outlive their dispatcher. Each runs in a session of its own (a terminal's
Ctrl-C or a kill of the dispatcher's process group reaches the dispatcher only, which ends its
bots' sessions properly as it stops, see dispatcher/app.py), and on Linux each is started
through a leash that asks the kernel to SIGKILL it when the dispatcher dies however it dies,
SIGKILL included (PR_SET_PDEATHSIG).

The warm pool (dispatcher/pool/) runs here too: `create_pooled` starts the bot runtime with a
POOL_TOKEN and no session, leashed the same way, with its webrtc port chosen at once (kept as
the address of the session it will serve). It loads everything and long-polls for its
assignment, as a pooled Fly machine does. `pool_image` is a hash of the bot's code (the
BOT_ENTRYPOINT value and the .py files of its folder) and of this backend instance, so that an
edited bot rolls the pool over, and no worker of an earlier dispatcher process is ever claimed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
import signal
import socket
import sys
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

from dispatcher.aio import cancel_and_wait
from dispatcher.env import DISPATCHER_SECRETS
from dispatcher.machines import BOT_COMMAND, BotSpec, MachineExit, MachineInfo, MachineRef

log = logging.getLogger(__name__)

# Where a local bot serves its HTTP routes (SmallWebRTC offers), on a port chosen per launch.
BOT_HOST = "127.0.0.1"
# Bot ports are chosen below the ephemeral ranges (Linux 32768-60999, macOS and Windows
# 49152-65535), which the kernel hands out to anything that binds port 0 or connects out: a
# port from there could be taken between its choice and the bot's listen (a slow boot), and an
# offer would reach another server.
BOT_PORTS = range(20000, 32768)
PORT_TRIES = 50

# The bot runtime's default entry point (bot_runtime/entrypoint.py), from the repository root.
EXAMPLE_BOT = Path(__file__).resolve().parents[2] / "examples" / "bot" / "bot.py"
# At most this many .py files of the bot's folder go into its code's hash.
CODE_FILES_HASHED = 200
# How many ended bots' exits are remembered once their processes are forgotten.
EXITS_KEPT = 1024
# Run as `python -I -S -c LEASH <dispatcher pid> <command...>`, it execs the command with a
# clean signal mask and SIGPIPE's default action (as a direct child would have), after asking
# the kernel for SIGKILL when its parent dies (PR_SET_PDEATHSIG = 1), unless that parent has
# died already. The command keeps the process, its pid and its environment.
LEASH = (
    "import ctypes, os, signal, sys\n"
    "signal.pthread_sigmask(signal.SIG_SETMASK, ())\n"
    "signal.signal(signal.SIGPIPE, signal.SIG_DFL)\n"
    "if ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL) != 0:\n"
    "    sys.exit('local bot: prctl(PR_SET_PDEATHSIG) failed')\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit('local bot: its dispatcher is gone')\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


class LocalMachines:
    """The machine backend that runs each bot as a child process of the dispatcher."""

    name = "local"
    bots_outlive_dispatcher = False

    def __init__(
        self,
        *,
        bot_dir: str | None = None,
        base_env: Mapping[str, str] | None = None,
        stop_grace_s: int = 10,
    ) -> None:
        self._bot_dir = bot_dir
        self._base_env = {
            k: v
            for k, v in (os.environ if base_env is None else base_env).items()
            if k not in DISPATCHER_SECRETS
        }
        self._stop_grace_s = stop_grace_s
        self._procs: dict[str, asyncio.subprocess.Process] = {}
        self._stopping: set[str] = set()
        self._by_session: dict[str, str] = {}
        self._killers: set[asyncio.Task[None]] = set()
        self._addresses: dict[str, str] = {}
        self._pooled: set[str] = set()
        # Pool workers of this process only: its rows in a store kept across restarts name
        # workers that died with an earlier dispatcher.
        self._instance = secrets.token_hex(4)
        # Exits of bots destroyed (and so forgotten), for `exited` and `wait_exit`.
        self._exits: OrderedDict[str, MachineExit] = OrderedDict()

    async def launch(self, spec: BotSpec) -> MachineRef:
        """Start the bot command as a subprocess (`python` is this interpreter)."""
        machine_id = f"local-{secrets.token_hex(6)}"
        await self._spawn(machine_id, spec.cmd, spec.env)
        self._by_session[spec.session_id] = machine_id
        return MachineRef(machine_id, "local", None)

    async def create_pooled(
        self, env: dict[str, str], region: str | None, *, launch: bool
    ) -> MachineRef:
        """Start a pool worker: the bot runtime with `env` (a POOL_TOKEN, no session) and its
        id as FLY_MACHINE_ID, as a pooled Fly machine has it. Always launched: a local process
        waits running."""
        machine_id = f"local-pool-{secrets.token_hex(6)}"
        await self._spawn(machine_id, BOT_COMMAND, {**env, "FLY_MACHINE_ID": machine_id})
        self._pooled.add(machine_id)
        return MachineRef(machine_id, None, None)

    async def _spawn(
        self, machine_id: str, command: tuple[str, ...], extra: dict[str, str]
    ) -> None:
        cmd = list(command)
        if cmd and cmd[0] in ("python", "python3"):
            cmd[0] = sys.executable
        port = free_port(BOT_HOST)
        env = {**self._base_env, **extra, "BOT_HOST": BOT_HOST, "BOT_PORT": str(port)}
        if self._bot_dir:
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (self._bot_dir, env.get("PYTHONPATH")) if p
            )
        proc = await asyncio.create_subprocess_exec(
            *leashed(cmd), env=env, cwd=self._bot_dir or None, start_new_session=True
        )
        self._procs[machine_id] = proc
        self._addresses[machine_id] = f"{BOT_HOST}:{port}"
        log.info("bot process %s started (pid %s)", machine_id, proc.pid)

    def pool_image(self) -> str:
        """This backend instance and a hash of the bot's code: BOT_ENTRYPOINT as the bots get
        it, and the .py files of the entry point's folder (contents and names)."""
        raw = self._base_env.get("BOT_ENTRYPOINT", "").strip()
        digest = hashlib.sha256(raw.encode())
        for path in code_files(raw, Path(self._bot_dir or os.getcwd())):
            with contextlib.suppress(OSError):
                digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
        return f"local:{self._instance}:{digest.hexdigest()[:16]}"

    async def start(self, ref: MachineRef) -> str | None:
        """A worker waits running: nothing to start. One that has died raises."""
        if self.pool_dead(ref):
            raise RuntimeError(f"pool worker {ref.id} is not running")
        return None

    async def rotate(self, ref: MachineRef, env: dict[str, str]) -> MachineRef:
        """Never: a local worker that ended is gone (POOL_RECYCLE is Fly's only)."""
        raise NotImplementedError("local bot processes are not recycled")

    async def suspend(self, ref: MachineRef, timeout_s: int) -> bool:
        """Local workers are never suspended (POOL_MODE=running only)."""
        raise NotImplementedError("local bot processes are not suspended")

    def pool_dead(self, ref: MachineRef) -> bool:
        """Whether the worker's process has exited, or is not one of this process's."""
        proc = self._procs.get(ref.id)
        return proc is None or proc.returncode is not None

    async def cleanup(self, session_id: str) -> None:
        """Kill the session's process if the launch got that far."""
        machine_id = self._by_session.get(session_id)
        if machine_id:
            await self.destroy(MachineRef(machine_id))

    async def wait_exit(self, ref: MachineRef, timeout_s: float) -> MachineExit | None:
        """Wait for the process to exit; one this backend never started is lost."""
        proc = self._procs.get(ref.id)
        if proc is None:
            return self._gone(ref)
        try:
            code = await asyncio.wait_for(proc.wait(), timeout=max(0.0, timeout_s))
        except TimeoutError:
            return None
        return _exit(code, requested=ref.id in self._stopping)

    async def live_ids(self) -> set[str]:
        """The bot processes of this dispatcher still running."""
        return {mid for mid, proc in self._procs.items() if proc.returncode is None}

    async def inventory(self) -> list[MachineInfo]:
        """The bot processes this dispatcher started (local bots do not outlive it)."""
        sessions = {machine_id: sid for sid, machine_id in self._by_session.items()}
        return [
            MachineInfo(
                id=machine_id,
                session_id=sessions.get(machine_id),
                state="started" if proc.returncode is None else "stopped",
                live=proc.returncode is None,
                region="local",
                pool=machine_id in self._pooled,
            )
            for machine_id, proc in self._procs.items()
        ]

    async def exited(self, ref: MachineRef) -> MachineExit | None:
        """None while the process runs; its exit once it ended (never started here: lost)."""
        proc = self._procs.get(ref.id)
        if proc is None:
            return self._gone(ref)
        if proc.returncode is None:
            return None
        return _exit(proc.returncode, requested=ref.id in self._stopping)

    async def stop(self, ref: MachineRef, grace_s: int) -> None:
        """SIGTERM now, SIGKILL after `grace_s` (in the background)."""
        proc = self._procs.get(ref.id)
        if proc is None or proc.returncode is not None:
            return
        self._stopping.add(ref.id)
        _signal(proc, signal.SIGTERM)
        task = asyncio.create_task(self._kill_after(proc, grace_s))
        self._killers.add(task)
        task.add_done_callback(self._killers.discard)

    async def _kill_after(self, proc: asyncio.subprocess.Process, grace_s: float) -> None:
        try:
            await asyncio.wait_for(proc.wait(), timeout=grace_s)
        except TimeoutError:
            _signal(proc, signal.SIGKILL)
            await proc.wait()

    async def destroy(self, ref: MachineRef) -> None:
        """Kill the process if it still runs and forget it once it has exited (its exit is
        remembered for `exited`)."""
        proc = self._procs.get(ref.id)
        if proc is None:
            return
        if proc.returncode is None:
            self._stopping.add(ref.id)
            _signal(proc, signal.SIGKILL)
        code = await proc.wait()
        if self._procs.pop(ref.id, None) is None:
            return  # a concurrent destroy forgot it already
        self._exits[ref.id] = _exit(code, requested=ref.id in self._stopping)
        while len(self._exits) > EXITS_KEPT:
            self._exits.popitem(last=False)
        self._stopping.discard(ref.id)
        self._addresses.pop(ref.id, None)
        self._pooled.discard(ref.id)
        for session_id in [s for s, m in self._by_session.items() if m == ref.id]:
            del self._by_session[session_id]

    def _gone(self, ref: MachineRef) -> MachineExit:
        """The exit of a process no longer held: remembered, or lost (not started here)."""
        return self._exits.get(ref.id) or MachineExit(lost=True)

    def address(self, ref: MachineRef) -> str | None:
        """The loopback port the bot was told to listen on, while its process runs."""
        proc = self._procs.get(ref.id)
        if proc is None or proc.returncode is not None:
            return None
        return self._addresses.get(ref.id)

    async def check(self) -> None:
        """Always reachable."""

    def kill_all(self) -> None:
        """SIGKILL every bot still running, now (the dispatcher stops at once)."""
        for machine_id, proc in self._procs.items():
            if proc.returncode is None:
                self._stopping.add(machine_id)
                _signal(proc, signal.SIGKILL)

    async def aclose(self) -> None:
        """Stop every bot still running (local bots cannot outlive the dispatcher)."""
        running = [(mid, p) for mid, p in self._procs.items() if p.returncode is None]
        for mid, proc in running:
            self._stopping.add(mid)
            _signal(proc, signal.SIGTERM)
        await asyncio.gather(
            *(self._kill_after(p, self._stop_grace_s) for _, p in running),
            return_exceptions=True,
        )
        await cancel_and_wait(*self._killers)
        self._procs.clear()


def free_port(host: str) -> int:
    """A TCP port of BOT_PORTS free on `host` right now (the bot binds it a moment later),
    chosen at random; any free port if none of PORT_TRIES was."""
    for _ in range(PORT_TRIES):
        port = BOT_PORTS.start + secrets.randbelow(len(BOT_PORTS))
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def code_files(entrypoint: str, cwd: Path) -> list[Path]:
    """The .py files of the bot's folder (the entry point's own first), found as the bot
    runtime finds it: a path to a .py file (relative to the bot's working directory), a
    module name (under it), or unset: the example bot."""
    target = entrypoint
    head, sep, tail = entrypoint.rpartition(":")
    if sep and "/" not in tail and "\\" not in tail and len(head) > 1:
        target = head
    if not target:
        entry = EXAMPLE_BOT
    elif target.endswith(".py") or "/" in target:
        entry = cwd / Path(target).expanduser()
    else:
        base = cwd.joinpath(*target.split("."))
        entry = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
    if not entry.is_file():
        return []
    siblings = sorted(p for p in entry.parent.glob("*.py") if p != entry)
    return [entry, *siblings[: CODE_FILES_HASHED - 1]]


def leashed(cmd: list[str]) -> list[str]:
    """`cmd` started through the leash (see LEASH) where the kernel offers one (Linux)."""
    if not sys.platform.startswith("linux"):
        return cmd
    return [sys.executable, "-I", "-S", "-c", LEASH, str(os.getpid()), *cmd]


def _signal(proc: asyncio.subprocess.Process, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)


def _exit(code: int, *, requested: bool) -> MachineExit:
    """A process's return code as a machine exit (death by signal N is 128+N, as a shell says)."""
    if code < 0:
        return MachineExit(exit_code=128 - code, requested_stop=requested, signal=-code)
    return MachineExit(exit_code=code, requested_stop=requested)

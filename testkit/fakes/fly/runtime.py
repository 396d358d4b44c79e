"""The local processes that play machines' VMs: boot, run, restart, suspend, resume, stop, kill."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Awaitable
from typing import Any

from testkit.fakes.fly.light import LightProcess
from testkit.fakes.fly.machine import MachineRecord, utc_now

logger = logging.getLogger(__package__)

DEFAULT_MAX_RETRIES = 10
EXIT_EVENT_SHAPES = ("exit_event", "MonitorEvent")
"""Where an exit event's details sit in its `request`: `request.exit_event`, or
`request.MonitorEvent.exit_event` (fly-go's GetExitCode reads the latter first: both occur)."""


class MachineRuntime:
    """Launching, running, restarting, suspending, resuming, stopping and killing the local
    processes that play VMs."""

    machines: dict[str, MachineRecord]
    regions: dict[str, int | None]
    secrets: dict[str, str]
    default_cmd: list[str]
    boot_delay_s: float
    start_delay_s: float
    resume_delay_s: float
    suspend_delay_s: float
    destroy_delay_s: float
    restart_delay_s: float
    exit_event_shape: str
    light_machines: bool
    _tasks: set[asyncio.Task[None]]
    _closing: bool

    def _spawn_task(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _boot(self, machine: MachineRecord, delay_s: float) -> None:
        """Boot `machine` in `delay_s` seconds: half before `starting`, half after."""
        machine.stop_requested = machine.destroy_requested = machine.oom_killed = False
        machine.restart_count = 0
        machine.runner = self._spawn_task(self._run(machine, delay_s))

    def _suspend_process(self, m: MachineRecord) -> None:
        """Freeze the process group now (SIGSTOP) and reach `suspended` after the suspend delay.

        [inf] Firecracker pauses the VM before it writes the snapshot, so nothing runs while the
        machine is `suspending`; the memory (everything the bot loaded) is kept as it was.
        """
        assert m.process is not None
        _kill_group(m.process, signal.SIGSTOP)
        m.frozen = True
        m.add_event("suspend", "suspending", "user")
        m.set_state("suspending")
        m.transition = self._spawn_task(self._finish_suspend(m))

    async def _finish_suspend(self, m: MachineRecord) -> None:
        await asyncio.sleep(self.suspend_delay_s)
        if m.state == "suspending" and m.frozen:
            m.set_state("suspended")
            m.add_event("suspend", "suspended", "flyd")

    def _resume_process(self, m: MachineRecord) -> None:
        """Go `starting`, then after the resume delay continue the same process (SIGCONT) and
        reach `started`: a resume is a snapshot restore, not a boot (same pid, same memory)."""
        m.add_event("start", "starting", "user")
        m.set_state("starting")
        m.transition = self._spawn_task(self._finish_resume(m))

    async def _finish_resume(self, m: MachineRecord) -> None:
        await asyncio.sleep(self.resume_delay_s)
        if m.state == "starting" and m.frozen:
            self._thaw(m)
            m.set_state("started")
            m.add_event("resume", "started", "flyd")

    @staticmethod
    def _thaw(m: MachineRecord) -> None:
        """Continue a frozen process group (SIGCONT) and drop any pending suspend or resume."""
        if m.transition is not None:
            m.transition.cancel()
            m.transition = None
        if m.frozen and m.process is not None:
            _kill_group(m.process, signal.SIGCONT)
        m.frozen = False

    def _halt(self, machine: MachineRecord, sig: signal.Signals, timeout: float) -> None:
        """Ask the process to stop with `sig`, then SIGKILL it after `timeout` seconds.

        A frozen (suspended) process gets `sig` while still stopped and then SIGCONT, so the
        signal is pending and handled as it continues (a SIGTERM sent right after a SIGCONT was
        sometimes lost: seen with CPython's handlers on Linux).
        [unv] whether Fly lets a suspended guest see the stop signal or just discards the snapshot
        ("fly machine stop" is documented only as forcing the next start to be cold).
        """
        machine.stop_requested = True
        proc = machine.process
        if proc is None or proc.returncode is not None:
            self._thaw(machine)
            return
        if sig == signal.SIGKILL:
            _kill_group(proc)
            self._thaw(machine)
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        self._thaw(machine)
        machine.kill_timer = self._spawn_task(_kill_after(proc, timeout))

    async def _run(self, m: MachineRecord, boot_s: float) -> None:
        """Boot `m`, run its process to exit, restart it per policy, then stop or destroy it."""
        await asyncio.sleep(boot_s / 2)
        while True:
            if not m.stop_requested:
                m.set_state("starting")
                await asyncio.sleep(boot_s / 2)
            if m.stop_requested:
                returncode = 0
            elif self.light_machines:
                returncode = await self._run_light(m)
            else:
                returncode = await self._run_process(m)
            exit_event = _exit_event(returncode, m.oom_killed, m.stop_requested)
            m.oom_killed = False
            restarting = self._restarts(m, exit_event["exit_code"])
            exit_event["restarting"] = restarting
            status = "restarting" if restarting else "stopped"
            request: dict[str, Any] = {"restart_count": m.restart_count}
            if self.exit_event_shape == "MonitorEvent":
                request["MonitorEvent"] = {"exit_event": exit_event}
            else:
                request["exit_event"] = exit_event
            m.add_event("exit", status, "flyd", request)
            if not restarting:
                break
            m.set_state("restarting")
            m.restart_count += 1
            await asyncio.sleep(self.restart_delay_s)
            m.add_event("restart", "starting", "flyd")
        m.reached.setdefault(m.instance_id, set()).add("stopped")  # its process has exited
        m.notify()
        if m.destroy_requested:
            await self._finish_destroy(m, "user")
        elif m.config.get("auto_destroy"):
            m.set_state("stopped")
            m.set_state("destroying")
            await self._finish_destroy(m, "flyd")
        else:
            m.set_state("stopped")

    def _restarts(self, m: MachineRecord, exit_code: int) -> bool:
        restart = m.config.get("restart") or {}
        policy = restart.get("policy") or "on-failure"
        if m.stop_requested or self._closing or policy == "no":
            return False
        if policy == "always":
            return True
        max_retries = restart.get("max_retries")
        limit = DEFAULT_MAX_RETRIES if max_retries is None else max_retries
        return exit_code != 0 and m.restart_count < limit

    async def _run_process(self, m: MachineRecord) -> int:
        """Spawn the machine's command, mark it started, and return its exit status."""
        argv = self._argv(m.config)
        m.env = self._env(m)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                cwd=m.image_dir,
                env=m.env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            self._mark_started(m)
            m.logs.append(f"Error: UnhandledIoError({exc})")
            return 1
        m.process = proc
        assert proc.stdout is not None
        m.reader = asyncio.ensure_future(_read_lines(proc.stdout, m))
        self._mark_started(m)
        try:
            return await proc.wait()
        finally:
            _kill_group(proc)  # the VM is gone: nothing the process started outlives it
            await proc.wait()
            await asyncio.wait({m.reader}, timeout=2.0)
            m.reader.cancel()
            if m.kill_timer is not None:
                m.kill_timer.cancel()
            if m.transition is not None:
                m.transition.cancel()
            m.process, m.frozen = None, False

    async def _run_light(self, m: MachineRecord) -> int:
        """Play the machine's process with a task (testkit/fakes/fly/light.py), mark it started,
        and return its exit status."""
        m.env = self._env(m)
        light = LightProcess(m.env, m.logs)
        m.process = light
        self._mark_started(m)
        try:
            return await light.wait()
        finally:
            light.signal_group(signal.SIGKILL)
            await light.wait()
            if m.kill_timer is not None:
                m.kill_timer.cancel()
            if m.transition is not None:
                m.transition.cancel()
            m.process, m.frozen = None, False

    @staticmethod
    def _mark_started(m: MachineRecord) -> None:
        if m.stop_requested:  # stopped or destroyed while it booted
            if m.process is not None:
                _kill_group(m.process)
            return
        m.set_state("started")
        m.add_event("start", "started", "flyd")

    def _argv(self, config: dict[str, Any]) -> list[str]:
        init = config.get("init") or {}
        if init.get("exec"):
            argv = list(init["exec"])
        elif init.get("entrypoint"):
            argv = [*init["entrypoint"], *(init.get("cmd") or [])]
        else:
            argv = list(init.get("cmd") or self.default_cmd)
        if argv[0] in ("python", "python3"):
            argv[0] = sys.executable
        return argv

    def _env(self, m: MachineRecord) -> dict[str, str]:
        guest = m.config.get("guest") or {}
        return {
            "PATH": os.environ.get("PATH", os.defpath),
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            "HOME": os.environ.get("HOME", "/root"),
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": str(m.image_dir),
            "FLY_APP_NAME": m.app,
            "FLY_MACHINE_ID": m.id,
            "FLY_ALLOC_ID": m.id,
            "FLY_REGION": m.region,
            "FLY_IMAGE_REF": str(m.config["image"]),
            "FLY_MACHINE_VERSION": m.instance_id,
            "FLY_PRIVATE_IP": m.private_ip,
            "FLY_VM_MEMORY_MB": str(guest.get("memory_mb", 256)),
            "PRIMARY_REGION": next(iter(self.regions), m.region),
            **self.secrets,
            **(m.config.get("env") or {}),
        }

    async def _finish_destroy(self, m: MachineRecord, source: str) -> None:
        await asyncio.sleep(self.destroy_delay_s)
        m.add_event("destroy", "destroyed", source)
        m.set_state("destroyed")

    async def aclose(self) -> None:
        """Kill every machine's process and finish every background task (idempotent)."""
        self._closing = True
        for machine in self.machines.values():
            machine.stop_requested = True
            if machine.process is not None:
                _kill_group(machine.process)
        pending = set(self._tasks)
        if pending:
            _, late = await asyncio.wait(pending, timeout=5.0)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)


def _exit_event(returncode: int, oom_killed: bool, requested_stop: bool) -> dict[str, Any]:
    sig = -returncode if returncode < 0 else -1
    code = 128 + sig if returncode < 0 else returncode
    return {
        "exit_code": code,
        "guest_exit_code": code,
        "guest_signal": sig,
        "oom_killed": oom_killed,
        "requested_stop": requested_stop and not oom_killed,
        "restarting": False,
        "signal": sig,
        "exited_at": utc_now("milliseconds"),
    }


def _kill_group(proc: asyncio.subprocess.Process | LightProcess, sig: int = signal.SIGKILL) -> None:
    if isinstance(proc, LightProcess):
        proc.signal_group(sig)
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


async def _kill_after(proc: asyncio.subprocess.Process | LightProcess, grace_s: float) -> None:
    await asyncio.sleep(grace_s)
    if proc.returncode is None:
        _kill_group(proc)


async def _read_lines(stream: asyncio.StreamReader, m: MachineRecord) -> None:
    """Append the process's output to `m.logs`, line by line, until EOF."""
    pending = b""
    while chunk := await stream.read(65536):
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            text = line.decode("utf-8", "replace").rstrip("\r")
            m.logs.append(text)
            logger.debug("%s: %s", m.id, text)
    if pending:
        m.logs.append(pending.decode("utf-8", "replace"))

"""Where bots run: the machine backend interface."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

BOT_COMMAND = ("python", "-m", "bot_runtime")


@dataclass(frozen=True)
class BotSpec:
    """What a session's bot needs: the command, its env (the bot contract) and where to run."""

    session_id: str
    user: str
    cmd: tuple[str, ...]
    env: dict[str, str] = field(repr=False)
    regions: tuple[str, ...] = ()


@dataclass(frozen=True)
class MachineRef:
    """A launched bot: the backend's id for it, its region, and the version to wait on."""

    id: str
    region: str | None = None
    version: str | None = None
    # Taken from the warm pool (dispatcher/pool/) rather than created for the session.
    pooled: bool = False


def where(ref: MachineRef) -> str:
    """Where a machine runs, for a log line: `in <region>`, or `on this host` (local bots)."""
    return f"in {ref.region}" if ref.region else "on this host"


@dataclass(frozen=True)
class MachineExit:
    """How a bot's machine ended: exit code when known, OOM, whether we asked it to stop."""

    exit_code: int | None = None
    oom_killed: bool = False
    requested_stop: bool = False
    signal: int | None = None
    # Nothing is known of its end: a local bot of an earlier dispatcher process, which died
    # with it (the machine backend cannot see how).
    lost: bool = False


@dataclass(frozen=True)
class MachineInfo:
    """A machine as an inventory lists it: whose session it serves and whether it still runs."""

    id: str
    session_id: str | None
    state: str
    live: bool
    region: str | None = None
    version: str | None = None
    created_at: float | None = None
    # A warm pool machine (dispatcher/pool/), not yet or no longer labelled with a session.
    pool: bool = False

    @property
    def ref(self) -> MachineRef:
        """The reference the other calls take."""
        return MachineRef(self.id, self.region, self.version)


class MachineBackend(Protocol):
    """Launches one bot per session and follows it to its exit."""

    name: str
    # Whether bots keep running when the dispatcher stops (Fly machines do; local processes
    # do not: the dispatcher ends their sessions as it stops).
    bots_outlive_dispatcher: bool

    async def launch(self, spec: BotSpec) -> MachineRef:
        """Start the bot; never two machines for one session, even after ambiguous failures."""

    async def cleanup(self, session_id: str) -> None:
        """Remove whatever the backend may hold for a session whose launch failed ambiguously."""

    async def wait_exit(self, ref: MachineRef, timeout_s: float) -> MachineExit | None:
        """Wait up to `timeout_s` for the bot to exit; None if it still runs."""

    async def live_ids(self) -> set[str]:
        """The ids of this dispatcher's machines still running, in one batched read whatever
        their number (may lag: a machine made moments ago may be missing)."""

    async def inventory(self) -> list[MachineInfo]:
        """Every machine this dispatcher made that is not destroyed (may lag behind reality)."""

    async def exited(self, ref: MachineRef) -> MachineExit | None:
        """None while the machine runs; how it ended once it stopped or is gone."""

    async def stop(self, ref: MachineRef, grace_s: int) -> None:
        """SIGTERM now, SIGKILL after `grace_s`; a machine already gone counts as stopped."""

    async def destroy(self, ref: MachineRef) -> None:
        """Remove the machine for good, killing it if it still runs."""

    def address(self, ref: MachineRef) -> str | None:
        """`host:port` where this dispatcher reaches the bot's own HTTP server, if it can."""

    async def check(self) -> None:
        """Raise if the backend cannot be reached."""

    def kill_all(self) -> None:
        """Kill at once every bot that cannot outlive the dispatcher (a stop with no goodbye)."""

    async def aclose(self) -> None:
        """Release what the backend holds (bots on Fly are never touched)."""


class PoolBackend(Protocol):
    """What the warm pool (dispatcher/pool/) needs of a machine backend: make a pool
    machine, start or resume it, suspend it, retire it, and tell what code it runs."""

    def pool_image(self) -> str:
        """What pool machines made now run (Fly: BOT_IMAGE; local: the bot code's hash): a
        machine of another image is never claimed, and is retired."""

    async def create_pooled(
        self, env: dict[str, str], region: str | None, *, launch: bool
    ) -> MachineRef:
        """Make a pool machine with `env`: booted (`launch`), or created only (Fly's
        `skip_launch`). One attempt: the pool tries again on its next pass."""

    async def start(self, ref: MachineRef) -> str | None:
        """Start (or resume) a stopped (or suspended) pool machine; the version it runs now
        when the backend read it (None: the one known stands)."""

    async def rotate(self, ref: MachineRef, env: dict[str, str]) -> MachineRef:
        """Give a stopped pool machine (POOL_RECYCLE) a new env, leaving it stopped; the
        machine with its new version."""

    async def wait_exit(self, ref: MachineRef, timeout_s: float) -> MachineExit | None:
        """Wait up to `timeout_s` for the machine to stop; None if it still runs."""

    async def suspend(self, ref: MachineRef, timeout_s: int) -> bool:
        """Suspend a booted pool machine; whether it was suspended within `timeout_s`."""

    async def exited(self, ref: MachineRef) -> MachineExit | None:
        """None while the machine runs; how it ended once it stopped or is gone."""

    def pool_dead(self, ref: MachineRef) -> bool:
        """Whether a pool machine is known to have died, without asking anyone (a local
        process's exit); False when that would take a call (Fly: the reconciler's inventory
        finds it)."""

    async def destroy(self, ref: MachineRef) -> None:
        """Remove the machine for good, killing it if it still runs."""

"""`Pool`: the claims, the warming and the replenishment of the warm pool (dispatcher/pool/).

On Fly a cold create takes seconds and the Machines API allows about one a second per app;
starting a machine that already exists takes well under a second and is limited per machine
(docs/reference/fly-machines.md §6, §9, §10). On one host (the local backend) a cold bot process
spends seconds importing Pipecat and loading Silero. So the pool keeps POOL_SIZE machines per
region ready, in one of three modes:

- `stopped` (Fly): created with `skip_launch` (never booted; rootfs billing only). A claim
  starts it; the bot boots, loads, and fetches its assignment.
- `suspended` (Fly): created and booted; the bot loads everything (Pipecat, the VAD model) and
  asks for its assignment; that first ask is the sign it is warm, so the pool suspends it
  (memory kept). A claim resumes it, and the bot's next ask gets the session: joining the room
  is all that is left.
- `running` (Fly, and the only mode of local processes): booted and loaded, its first ask
  offers it, and it keeps asking: a claim answers that ask, with no start or resume on the way.
  A machine still loading may be claimed too when none is loaded (it is further along than a
  cold one); a local worker that dies while idle is replaced at the next pass.

A machine serves one session and is destroyed after it, like a cold one, unless POOL_RECYCLE
returns it (recycle.py). Per-session data cannot ride in a pool machine's env (a started machine
keeps the config it was created with), so the bot fetches it: `GET
/internal/machines/{id}/assignment` with the machine's own token (dispatcher/callbacks.py builds
the answer). The replenisher takes a create turn only when one is free at once, so the pool
never delays a cold start, and an empty pool means a cold create, never an error. On one host
the pool's processes count against MAX_SESSIONS (see `target`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence

from dispatcher.aio import every
from dispatcher.auth import new_callback_token
from dispatcher.config import Settings
from dispatcher.errors import DispatcherError
from dispatcher.machines import MachineInfo, MachineRef, PoolBackend, where
from dispatcher.metrics import Metrics
from dispatcher.pacing import Pacer
from dispatcher.pool.machines import PoolMachines, ref_of
from dispatcher.pool.recycle import Recycling
from dispatcher.pool.repairs import repair
from dispatcher.store import (
    AVAILABLE,
    CLAIMED,
    RECYCLING,
    WARMING,
    PoolMachine,
    PoolRows,
    Store,
)

log = logging.getLogger(__name__)

# How often a long-polling assignment request looks for its claim in the store (a claim made
# on this instance wakes it at once).
CLAIM_POLL_S = 0.2
SUSPEND_WAIT_S = 60
LEADER_POLL_S = 1.0


class Pool:
    """The pool of one dispatcher app: claims, replenishment, the assignment wait."""

    def __init__(
        self,
        rows: PoolRows,
        machines: PoolBackend,
        settings: Settings,
        pacer: Pacer | None,
        metrics: Metrics,
        *,
        dispatcher_url: str,
        transports: Sequence[str] = ("daily",),
        capacity: Store | None = None,
    ) -> None:
        self._m = PoolMachines(
            rows, machines, settings, metrics, dispatcher_url=dispatcher_url, transports=transports
        )
        self._pacer = pacer
        self.transports = self._m.transports
        self.recycling = Recycling(self._m)
        # Local: the store whose live sessions, with the pool's idle machines, are held to
        # MAX_SESSIONS (bot processes on this host). None on Fly: machines are not the host's.
        self._capacity = capacity
        self._claimed: dict[str, asyncio.Event] = {}
        self._suspending: set[str] = set()

    @property
    def image(self) -> str:
        """What pool machines must run: Fly's BOT_IMAGE, or the local bot code's hash."""
        return self._m.image

    @property
    def mode(self) -> str:
        """`stopped`, `suspended` or `running` (POOL_MODE)."""
        return self._m.mode

    def regions(self) -> tuple[str, ...]:
        """Where the pool keeps machines: each of FLY_REGION, or one pool where Fly picks."""
        return self._m.settings.fly_regions or ("",)

    # -- claims --------------------------------------------------------------------------------

    async def take(self, session_id: str, regions: Sequence[str], body: str) -> PoolMachine | None:
        """Claim a machine for a session in the first of `regions` that has one (store only:
        `start` boots it), or None: a miss."""
        image = self.image
        # Running mode: a machine still loading is further along than a cold one.
        states = (AVAILABLE, WARMING) if self.mode == "running" else (AVAILABLE,)
        for state in states:
            for region in regions or self.regions():
                row = await self._m.rows.claim(
                    region=region, image=image, session_id=session_id, body=body, state=state
                )
                if row is not None:
                    self._m.metrics.pool_claim()
                    return row
        self._m.metrics.pool_miss()
        return None

    async def row(self, machine_id: str) -> PoolMachine | None:
        """The stored row of a pool machine."""
        return await self._m.rows.get(machine_id)

    async def release(self, row: PoolMachine) -> None:
        """Give back a claimed machine never started (its session was refused)."""
        await self._m.rows.move(
            row.machine_id, AVAILABLE, from_states=(CLAIMED,), session_id=None, body=None
        )

    async def start(self, row: PoolMachine) -> MachineRef:
        """Start (or resume) a claimed machine, or, running, check that it still runs; one
        that fails is destroyed and raises."""
        ref = MachineRef(row.machine_id, row.region or None, row.version, pooled=True)
        try:
            if self.mode != "running":
                version = await self._m.backend.start(ref)
                if version:
                    ref = dataclasses.replace(ref, version=version)
            elif self._m.backend.pool_dead(ref):
                raise RuntimeError("the pool machine is not running")
        except Exception:
            self._m.metrics.pool_start_failed()
            log.warning("pool machine %s failed to start: destroying it", row.machine_id)
            await self._m.rows.forget(row.machine_id)
            self._m.spawn(self._m.destroy(ref))
            raise
        return ref

    async def claimed(self, row: PoolMachine, wait_s: float) -> PoolMachine | None:
        """The row once claimed, waiting up to `wait_s` (None: still unclaimed, or gone)."""
        deadline = time.monotonic() + wait_s
        event = self._claimed.setdefault(row.machine_id, asyncio.Event())
        current: PoolMachine | None = row
        try:
            while current is not None and current.state != CLAIMED:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), min(remaining, CLAIM_POLL_S))
                current = await self._m.rows.get(row.machine_id)
            return current
        finally:
            self._claimed.pop(row.machine_id, None)

    def warm(self, row: PoolMachine) -> None:
        """The bot of a warming machine asked for its assignment: it is loaded. Suspended mode:
        suspend it, then offer it; running mode: offer it now; stopped mode never boots pool
        machines before a claim."""
        if row.state != WARMING or row.machine_id in self._suspending:
            return
        self._suspending.add(row.machine_id)
        self._m.spawn(self._offer(row) if self.mode == "running" else self._suspend(row))

    def notify(self, row: PoolMachine) -> None:
        """The claiming session is stored: an assignment request of the machine held on this
        instance can answer now (other instances find it on their next look)."""
        event = self._claimed.get(row.machine_id)
        if event is not None:
            event.set()

    # -- replenishment -------------------------------------------------------------------------

    async def run(self, leader: Callable[[], bool]) -> None:
        """Replenish every POOL_INTERVAL_S while this instance leads, until cancelled (an
        instance that does not lead looks again every second: it may take over)."""
        interval_s = self._m.settings.pool_interval_s

        async def step() -> float | None:
            if not leader():
                return min(interval_s, LEADER_POLL_S)
            await self.replenish()
            return None

        await every(interval_s, step, log=log, what="pool replenish pass")

    async def replenish(self) -> int:
        """Retire machines of another image, forget those known dead, retire what is over the
        host's capacity, then make what each region lacks, as far as free create turns allow;
        how many machines were made."""
        image = self.image
        rows = await self._m.rows.all()
        for row in rows:
            if row.state not in (WARMING, AVAILABLE):
                continue
            if row.image != image:
                await self._m.retire(row)
            elif self._m.backend.pool_dead(MachineRef(row.machine_id)):
                log.warning("pool machine %s died while idle: replacing it", row.machine_id)
                self._m.metrics.pool_replenish_failed()
                await self._m.retire(row)
        size = await self.target()
        counts = await self._m.rows.counts(image)
        wanted: list[str] = []
        for region in self.regions():
            idle = counts.get((region, WARMING), 0) + counts.get((region, AVAILABLE), 0)
            # Recycling machines are on their way back: none is made in their stead.
            have = idle + counts.get((region, RECYCLING), 0)
            if idle > size:
                await self._shrink(image, region, idle - size)
            wanted += [region] * max(0, size - have)
        # As many at once as free create turns allow (never a turn a start would wait for).
        turns = 0
        while turns < len(wanted) and (self._pacer is None or await self._pacer.take_now()):
            turns += 1
        results = await asyncio.gather(*(self._make(region) for region in wanted[:turns]))
        return sum(results)

    async def target(self) -> int:
        """How many idle machines each region should have: POOL_SIZE; on one host at most
        MAX_SESSIONS minus the live sessions, so that the host never runs more bots than
        MAX_SESSIONS allows sessions (a session's bot is its claimed machine, or a cold one)."""
        size = self._m.settings.pool_size
        if self._capacity is None:
            return size
        live = await self._capacity.count_active()
        return max(0, min(size, self._m.settings.max_sessions - live))

    async def _shrink(self, image: str, region: str, surplus: int) -> None:
        """Retire `surplus` idle machines of a region: those still loading first, newest first."""
        rows = [
            r
            for r in await self._m.rows.all()
            if r.image == image and r.region == region and r.state in (WARMING, AVAILABLE)
        ]
        rows.sort(key=lambda r: (r.state != WARMING, -r.created_at))
        for row in rows[:surplus]:
            log.info("pool machine %s is over the host's capacity: retiring it", row.machine_id)
            await self._m.retire(row)

    async def _make(self, region: str) -> bool:
        token, token_hash = new_callback_token()
        launch = self.mode != "stopped"
        image = self.image
        env = self._m.env(token)
        try:
            ref = await self._m.backend.create_pooled(env, region or None, launch=launch)
        except (DispatcherError, OSError) as exc:
            self._m.metrics.pool_replenish_failed()
            log.warning("pool machine create failed in %s: %s", region or "any region", exc)
            return False
        await self._m.rows.add(
            ref.id,
            region=region,
            image=image,
            state=WARMING if launch else AVAILABLE,
            token_hash=token_hash,
            version=ref.version,
        )
        log.info("pool machine %s made %s", ref.id, where(ref))
        return True

    async def _offer(self, row: PoolMachine) -> None:
        """Running mode: a loaded machine is available as it is."""
        try:
            await self._m.rows.move(row.machine_id, AVAILABLE, from_states=(WARMING,))
        finally:
            self._suspending.discard(row.machine_id)

    async def _suspend(self, row: PoolMachine) -> None:
        ref = ref_of(row)
        try:
            if await self._m.backend.suspend(ref, SUSPEND_WAIT_S):
                await self._m.rows.move(row.machine_id, AVAILABLE, from_states=(WARMING,))
                return
            raise TimeoutError("not suspended in time")
        except Exception as exc:
            self._m.metrics.pool_replenish_failed()
            log.warning("pool machine %s could not be suspended: %s", row.machine_id, exc)
            await self._m.drop(ref)
        finally:
            self._suspending.discard(row.machine_id)

    # -- the reconciler's pass -----------------------------------------------------------------

    async def validate(
        self, inventory: Sequence[MachineInfo], live_sessions: set[str], now: float
    ) -> int:
        """Repair the pool's rows against Fly's inventory (repairs.py); how many repairs."""
        return await repair(self._m, inventory, live_sessions, now)

    async def claims(self) -> dict[str, str]:
        """Claimed machines and their sessions: machine id -> session id."""
        return {
            r.machine_id: r.session_id
            for r in await self._m.rows.all()
            if r.state == CLAIMED and r.session_id
        }

    async def status(self) -> list[PoolMachine]:
        """Every row of the pool (`dispatcher pool status`, /metrics)."""
        return await self._m.rows.all()

    async def aclose(self) -> None:
        """Cancel background work (suspends, recycles and destroys in flight: the reconciler
        redoes)."""
        await self._m.aclose()

"""The warm pool: bots of the current code made ahead of sessions, per region.

One mechanism for both machine backends (a `PoolBackend`: make a pool machine, start or resume
it, suspend it, retire it). On Fly a cold create takes seconds and the Machines API allows
about one a second per app; starting a machine that already exists takes well under a second
and is limited per machine (docs/reference/fly-machines.md §6, §9, §10). On one host (the local
backend) a cold bot process spends seconds importing Pipecat and loading Silero. So the pool
keeps POOL_SIZE machines per region ready, in one of three modes:

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

A machine serves one session and is destroyed after it, like a cold one; with POOL_RECYCLE
(Fly) it is returned to the pool instead (`recycle`): once Fly reports it stopped it gets a new
POOL_TOKEN through Fly's update (the previous session's bot, which saw the old token, can no
longer ask for an assignment) and is `available` again; its next start is a fresh boot of the
image (Fly resets the root filesystem on a stop). A machine that fails to stop or to take its
new config is destroyed. Per-session data
cannot ride in a pool machine's env (a started machine keeps the config it was created with),
so the bot fetches it: `GET /internal/machines/{id}/assignment` with the machine's own token
(dispatcher/callbacks.py builds the answer). Claims are row updates (dispatcher/store/pool.py),
safe across instances. The replenisher runs on the reconciler's leader; on Fly it takes a
create turn only when one is free at once, so the pool never delays a cold start, and an empty
pool means a cold create, never an error. On one host the pool's processes count against
MAX_SESSIONS: it keeps at most MAX_SESSIONS minus the live sessions idle (see `capacity`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from dispatcher.aio import cancel_and_wait, every
from dispatcher.auth import new_callback_token
from dispatcher.config import Settings
from dispatcher.errors import DispatcherError
from dispatcher.machines import MachineInfo, MachineRef, PoolBackend
from dispatcher.metrics import Metrics
from dispatcher.pacing import Pacer
from dispatcher.store import (
    AVAILABLE,
    CLAIMED,
    RECYCLING,
    RETIRED,
    WARMING,
    PoolMachine,
    PoolRows,
    Store,
)

log = logging.getLogger(__name__)

# How often a long-polling assignment request looks for its claim in the store (a claim made
# on this instance wakes it at once).
CLAIM_POLL_S = 0.2
# Rows whose machine the inventory no longer lists are dropped after this (the list lags).
LIST_LAG_S = 30.0
# A machine labelled as ours but without a row (its row lost, or its create answered an error
# but happened) is destroyed once this old.
ORPHAN_AGE_S = 120.0
SUSPEND_WAIT_S = 60
LEADER_POLL_S = 1.0
# A suspended-mode machine whose bot has not asked for its assignment by then is retired.
WARM_TIMEOUT_S = 300.0
# A recycled machine not back in the pool by then (its dispatcher died mid-way) is destroyed.
RECYCLE_TIMEOUT_S = 300.0
# How long past the stop's grace periods a recycled machine's stop is waited for.
RECYCLE_MARGIN_S = 15.0


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
        self._rows = rows
        self._machines = machines
        self._settings = settings
        self._pacer = pacer
        self._metrics = metrics
        self._dispatcher_url = dispatcher_url
        self.transports = tuple(transports)
        # Local: the store whose live sessions, with the pool's idle machines, are held to
        # MAX_SESSIONS (bot processes on this host). None on Fly: machines are not the host's.
        self._capacity = capacity
        self._claimed: dict[str, asyncio.Event] = {}
        self._suspending: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def image(self) -> str:
        """What pool machines must run: Fly's BOT_IMAGE, or the local bot code's hash."""
        return self._machines.pool_image()

    @property
    def mode(self) -> str:
        """`stopped`, `suspended` or `running` (POOL_MODE)."""
        return self._settings.pool_mode

    def regions(self) -> tuple[str, ...]:
        """Where the pool keeps machines: each of FLY_REGION, or one pool where Fly picks."""
        return self._settings.fly_regions or ("",)

    # -- claims --------------------------------------------------------------------------------

    async def take(self, session_id: str, regions: Sequence[str], body: str) -> PoolMachine | None:
        """Claim a machine for a session in the first of `regions` that has one (store only:
        `start` boots it), or None: a miss."""
        image = self.image
        # Running mode: a machine still loading is further along than a cold one.
        states = (AVAILABLE, WARMING) if self.mode == "running" else (AVAILABLE,)
        for state in states:
            for region in regions or self.regions():
                row = await self._rows.claim(
                    region=region, image=image, session_id=session_id, body=body, state=state
                )
                if row is not None:
                    self._metrics.pool_claim()
                    return row
        self._metrics.pool_miss()
        return None

    async def row(self, machine_id: str) -> PoolMachine | None:
        """The stored row of a pool machine."""
        return await self._rows.get(machine_id)

    async def release(self, row: PoolMachine) -> None:
        """Give back a claimed machine never started (its session was refused)."""
        await self._rows.move(
            row.machine_id, AVAILABLE, from_states=(CLAIMED,), session_id=None, body=None
        )

    async def start(self, row: PoolMachine) -> MachineRef:
        """Start (or resume) a claimed machine, or, running, check that it still runs; one
        that fails is destroyed and raises."""
        ref = MachineRef(row.machine_id, row.region or None, row.version, pooled=True)
        try:
            if self.mode != "running":
                version = await self._machines.start(ref)
                if version:
                    ref = dataclasses.replace(ref, version=version)
            elif self._machines.pool_dead(ref):
                raise RuntimeError("the pool machine is not running")
        except Exception:
            self._metrics.pool_start_failed()
            log.warning("pool machine %s failed to start: destroying it", row.machine_id)
            await self._rows.forget(row.machine_id)
            self._spawn(self._destroy(ref))
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
                current = await self._rows.get(row.machine_id)
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
        self._spawn(self._offer(row) if self.mode == "running" else self._suspend(row))

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
        interval_s = self._settings.pool_interval_s

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
        rows = await self._rows.all()
        for row in rows:
            if row.state not in (WARMING, AVAILABLE):
                continue
            if row.image != image:
                await self._retire(row)
            elif self._machines.pool_dead(MachineRef(row.machine_id)):
                log.warning("pool machine %s died while idle: replacing it", row.machine_id)
                self._metrics.pool_replenish_failed()
                await self._retire(row)
        size = await self.target()
        counts = await self._rows.counts(image)
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
        size = self._settings.pool_size
        if self._capacity is None:
            return size
        live = await self._capacity.count_active()
        return max(0, min(size, self._settings.max_sessions - live))

    async def _shrink(self, image: str, region: str, surplus: int) -> None:
        """Retire `surplus` idle machines of a region: those still loading first, newest first."""
        rows = [
            r
            for r in await self._rows.all()
            if r.image == image and r.region == region and r.state in (WARMING, AVAILABLE)
        ]
        rows.sort(key=lambda r: (r.state != WARMING, -r.created_at))
        for row in rows[:surplus]:
            log.info("pool machine %s is over the host's capacity: retiring it", row.machine_id)
            await self._retire(row)

    def _env(self, token: str) -> dict[str, str]:
        """A pool machine's env: whom to ask for its assignment, with which token."""
        return {
            "DISPATCHER_URL": self._dispatcher_url,
            "POOL_TOKEN": token,
            "BOT_TRANSPORT": self.transports[0],
            # What the bot preloads: every transport its session may use.
            "POOL_TRANSPORTS": ",".join(self.transports),
        }

    async def _make(self, region: str) -> bool:
        token, token_hash = new_callback_token()
        launch = self.mode != "stopped"
        image = self.image
        env = self._env(token)
        try:
            ref = await self._machines.create_pooled(env, region or None, launch=launch)
        except (DispatcherError, OSError) as exc:
            self._metrics.pool_replenish_failed()
            log.warning("pool machine create failed in %s: %s", region or "any region", exc)
            return False
        await self._rows.add(
            ref.id,
            region=region,
            image=image,
            state=WARMING if launch else AVAILABLE,
            token_hash=token_hash,
            version=ref.version,
        )
        log.info("pool machine %s made in %s", ref.id, ref.region)
        return True

    # -- recycling (POOL_RECYCLE) ----------------------------------------------------------------

    @property
    def recycles(self) -> bool:
        """Whether machines whose session ended come back to the pool (POOL_RECYCLE)."""
        return self._settings.pool_recycle

    async def recycle(self, session_id: str, ref: MachineRef) -> bool:
        """Take back the machine of an ended session, if it is a pool machine claimed by it
        and POOL_RECYCLE is on: whether the pool took it (else the caller destroys it). One
        row update now: the old POOL_TOKEN stops working at once (its hash is replaced); the
        wait for the stop and the new config happen in the background, so the session's end
        waits for nothing."""
        if not self.recycles:
            return False
        row = await self._rows.get(ref.id)
        if row is None or row.state != CLAIMED or row.session_id != session_id:
            return False
        token, token_hash = new_callback_token()
        moved = await self._rows.move(
            ref.id,
            RECYCLING,
            from_states=(CLAIMED,),
            token_hash=token_hash,
            session_id=None,
            body=None,
        )
        if not moved:
            return False
        version = ref.version or row.version
        target = MachineRef(ref.id, row.region or None, version, pooled=True)
        self._spawn(self._recycle(target, token))
        return True

    async def _recycle(self, ref: MachineRef, token: str) -> None:
        """Wait for the machine to stop, give it its new token (and the current image), and
        offer it again; destroy it if any of that fails."""
        wait_s = 2 * self._settings.bot_stop_timeout_s + RECYCLE_MARGIN_S
        try:
            if await self._machines.wait_exit(ref, wait_s) is None:
                raise TimeoutError(f"not stopped within {wait_s:.0f} s")
            rotated = await self._machines.rotate(ref, self._env(token))
            fields: dict[str, Any] = {"version": rotated.version, "image": self.image}
            if self.mode == "stopped":
                moved = await self._rows.move(ref.id, AVAILABLE, from_states=(RECYCLING,), **fields)
            else:
                # Booted again ahead of a claim: its bot's first ask makes it warm.
                moved = await self._rows.move(ref.id, WARMING, from_states=(RECYCLING,), **fields)
                if moved:
                    await self._machines.start(rotated)
            if not moved:
                raise RuntimeError("its pool row moved on meanwhile")
        except Exception as exc:
            self._metrics.pool_recycle_failed()
            log.warning("pool machine %s could not be recycled (%s): destroying it", ref.id, exc)
            await self._rows.forget(ref.id)
            await self._destroy(ref)
            return
        self._metrics.pool_recycled()
        log.info("pool machine %s recycled", ref.id)

    async def _offer(self, row: PoolMachine) -> None:
        """Running mode: a loaded machine is available as it is."""
        try:
            await self._rows.move(row.machine_id, AVAILABLE, from_states=(WARMING,))
        finally:
            self._suspending.discard(row.machine_id)

    async def _suspend(self, row: PoolMachine) -> None:
        ref = MachineRef(row.machine_id, row.region or None, row.version)
        try:
            if await self._machines.suspend(ref, SUSPEND_WAIT_S):
                await self._rows.move(row.machine_id, AVAILABLE, from_states=(WARMING,))
                return
            raise TimeoutError("not suspended in time")
        except Exception as exc:
            self._metrics.pool_replenish_failed()
            log.warning("pool machine %s could not be suspended: %s", row.machine_id, exc)
            await self._rows.forget(row.machine_id)
            await self._destroy(ref)
        finally:
            self._suspending.discard(row.machine_id)

    async def _retire(self, row: PoolMachine) -> None:
        """Destroy an unclaimed machine (another image, dead, or no longer wanted)."""
        if await self._rows.move(row.machine_id, RETIRED, from_states=(WARMING, AVAILABLE)):
            log.info("retiring pool machine %s (image %s)", row.machine_id, row.image)
            await self._destroy(MachineRef(row.machine_id, row.region or None, row.version))
            await self._rows.forget(row.machine_id)

    async def _destroy(self, ref: MachineRef) -> None:
        try:
            await self._machines.destroy(ref)
        except Exception as exc:
            # Still labelled as a pool machine: a later pass finds it without a row.
            log.warning("pool machine %s destroy failed: %s", ref.id, exc)

    # -- the reconciler's pass -----------------------------------------------------------------

    async def validate(
        self, inventory: Sequence[MachineInfo], live_sessions: set[str], now: float
    ) -> int:
        """Drop rows whose machine is gone (a bot that crashed while pooled, a session over);
        offer machines suspended by a dispatcher that died before offering them; retire
        machines that never got warm; destroy machines claimed by a session that never got
        going (its dispatcher died between the claim and the start) and pool machines without a
        row; how many repairs were made."""
        listed = {m.id: m for m in inventory}
        rows = {r.machine_id: r for r in await self._rows.all()}
        repairs = 0
        for row in rows.values():
            machine = listed.get(row.machine_id)
            if row.state == WARMING and machine is not None and machine.state == "suspended":
                # Suspended by a dispatcher that died before it could offer the machine.
                await self._rows.move(row.machine_id, AVAILABLE, from_states=(WARMING,))
                repairs += 1
                continue
            if await self._stopped_while_idle(row, machine):
                log.warning("pool machine %s stopped while idle: retiring it", row.machine_id)
                await self._retire(row)
                repairs += 1
                continue
            if row.state == RECYCLING and now - row.updated_at > RECYCLE_TIMEOUT_S:
                log.warning("pool machine %s was never recycled: destroying it", row.machine_id)
                await self._rows.forget(row.machine_id)
                await self._destroy(MachineRef(row.machine_id, row.region or None, row.version))
                repairs += 1
                continue
            if row.state == WARMING and now - row.updated_at > WARM_TIMEOUT_S:
                log.warning("pool machine %s never got warm: retiring it", row.machine_id)
                await self._retire(row)
                repairs += 1
                continue
            settled = now - row.updated_at > max(LIST_LAG_S, self._settings.start_timeout_s)
            if row.machine_id not in listed and now - row.updated_at > LIST_LAG_S:
                await self._rows.forget(row.machine_id)
                repairs += 1
            elif row.state == CLAIMED and row.session_id not in live_sessions and settled:
                log.warning("pool machine %s was claimed by a dead start", row.machine_id)
                await self._rows.forget(row.machine_id)
                await self._destroy(MachineRef(row.machine_id, row.region or None, row.version))
                repairs += 1
        for machine in inventory:
            young = machine.created_at is not None and now - machine.created_at < ORPHAN_AGE_S
            if machine.pool and not machine.session_id and machine.id not in rows and not young:
                log.warning("destroying pool machine %s that has no pool row", machine.id)
                await self._destroy(machine.ref)
                repairs += 1
        return repairs

    async def _stopped_while_idle(self, row: PoolMachine, machine: MachineInfo | None) -> bool:
        """Running mode: whether an unclaimed machine that the inventory misses, or lists as
        not running, has stopped (asked of the machine itself: the list lags)."""
        if self.mode != "running" or row.state not in (WARMING, AVAILABLE):
            return False
        if machine is not None and machine.live:
            return False
        ref = MachineRef(row.machine_id, row.region or None, row.version)
        return await self._machines.exited(ref) is not None

    async def claims(self) -> dict[str, str]:
        """Claimed machines and their sessions: machine id -> session id."""
        return {
            r.machine_id: r.session_id
            for r in await self._rows.all()
            if r.state == CLAIMED and r.session_id
        }

    async def status(self) -> list[PoolMachine]:
        """Every row of the pool (`dispatcher pool status`, /metrics)."""
        return await self._rows.all()

    def _spawn(self, work: Any) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self) -> None:
        """Cancel background work (suspends and destroys in flight: the reconciler redoes)."""
        await cancel_and_wait(*self._tasks)

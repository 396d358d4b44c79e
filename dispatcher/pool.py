"""The warm pool: machines of the current bot image made ahead of sessions, per region.

A cold create takes seconds and the Machines API allows about one a second per app; starting a
machine that already exists takes well under a second and is limited per machine
(docs/reference/fly-machines.md §6, §9, §10). So the pool keeps POOL_SIZE machines per
region ready:

- `stopped` mode: created with `skip_launch` (never booted; rootfs billing only). A claim
  starts it; the bot boots, loads, and fetches its assignment.
- `suspended` mode: created and booted; the bot loads everything (Pipecat, the VAD model) and
  asks for its assignment; that first ask is the sign it is warm, so the pool suspends it
  (memory kept). A claim resumes it, and the bot's next ask gets the session: joining the room
  is all that is left.

A machine serves one session and is destroyed after it, like a cold one. Per-session data
cannot ride in a pool machine's env (a started machine keeps the config it was created with),
so the bot fetches it: `GET /internal/machines/{id}/assignment` with the machine's own token
(dispatcher/sessions.py builds the answer). Claims are row updates (dispatcher/store/pool.py),
safe across instances. The replenisher runs on the reconciler's leader; it takes a create turn
only when one is free at once, so the pool never delays a cold start, and an empty pool means a
cold create, never an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from dispatcher.aio import cancel_and_wait, every
from dispatcher.auth import new_callback_token
from dispatcher.config import Settings
from dispatcher.errors import DispatcherError
from dispatcher.machines import MachineInfo, MachineRef
from dispatcher.machines.fly import FlyMachines
from dispatcher.metrics import Metrics
from dispatcher.pacing import Pacer
from dispatcher.store import AVAILABLE, CLAIMED, RETIRED, WARMING, PoolMachine, PoolRows

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


class Pool:
    """The pool of one dispatcher app: claims, replenishment, the assignment wait."""

    def __init__(
        self,
        rows: PoolRows,
        machines: FlyMachines,
        settings: Settings,
        pacer: Pacer | None,
        metrics: Metrics,
        *,
        dispatcher_url: str,
    ) -> None:
        self._rows = rows
        self._machines = machines
        self._settings = settings
        self._pacer = pacer
        self._metrics = metrics
        self._dispatcher_url = dispatcher_url
        self._claimed: dict[str, asyncio.Event] = {}
        self._suspending: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def image(self) -> str:
        """The image pool machines must run: the current BOT_IMAGE."""
        return self._settings.bot_image or ""

    def regions(self) -> tuple[str, ...]:
        """Where the pool keeps machines: each of FLY_REGION, or one pool where Fly picks."""
        return self._settings.fly_regions or ("",)

    # -- claims --------------------------------------------------------------------------------

    async def take(self, session_id: str, regions: Sequence[str], body: str) -> PoolMachine | None:
        """Claim a machine for a session in the first of `regions` that has one (store only:
        `start` boots it), or None: a miss."""
        for region in regions or self.regions():
            row = await self._rows.claim(
                region=region, image=self.image, session_id=session_id, body=body
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
        """Start (or resume) a claimed machine; one that fails is destroyed and raises."""
        ref = MachineRef(row.machine_id, row.region or None, row.version, pooled=True)
        try:
            await self._machines.start(ref)
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
        suspend it, then offer it; stopped mode never boots pool machines before a claim."""
        if row.state == WARMING and row.machine_id not in self._suspending:
            self._suspending.add(row.machine_id)
            self._spawn(self._suspend(row))

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
        """Retire machines of another image, then make what each region lacks, as far as free
        create turns allow; how many machines were made."""
        rows = await self._rows.all()
        for row in rows:
            if row.image != self.image and row.state in (WARMING, AVAILABLE):
                await self._retire(row)
        counts = await self._rows.counts(self.image)
        wanted: list[str] = []
        for region in self.regions():
            have = counts.get((region, WARMING), 0) + counts.get((region, AVAILABLE), 0)
            wanted += [region] * max(0, self._settings.pool_size - have)
        # As many at once as free create turns allow (never a turn a start would wait for).
        turns = 0
        while turns < len(wanted) and (self._pacer is None or await self._pacer.take_now()):
            turns += 1
        results = await asyncio.gather(*(self._make(region) for region in wanted[:turns]))
        return sum(results)

    async def _make(self, region: str) -> bool:
        token, token_hash = new_callback_token()
        suspended = self._settings.pool_mode == "suspended"
        env = {
            "DISPATCHER_URL": self._dispatcher_url,
            "POOL_TOKEN": token,
            "BOT_TRANSPORT": "daily",
        }
        try:
            ref = await self._machines.create_pooled(env, region or None, launch=suspended)
        except DispatcherError as exc:
            self._metrics.pool_replenish_failed()
            log.warning("pool machine create failed in %s: %s", region or "any region", exc)
            return False
        await self._rows.add(
            ref.id,
            region=region,
            image=self.image,
            state=WARMING if suspended else AVAILABLE,
            token_hash=token_hash,
            version=ref.version,
        )
        log.info("pool machine %s made in %s", ref.id, ref.region)
        return True

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
        """Destroy an unclaimed machine (another image, or no longer wanted)."""
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

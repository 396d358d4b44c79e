"""The reconciler: compares the store with the machines and rooms that exist, and repairs both.

It is the safety net under the supervisor (dispatcher/supervisor.py). A supervisor keeps the
timers of the sessions its own instance follows, and loses them with it (a deploy, a crash);
its watch of silent exits runs on the reconciler's leader. The reconciler runs on exactly one
instance at a time (the holder of a PostgreSQL advisory lock; another takes over when that one
goes), looks at every live session and every machine the dispatcher made, and finishes
whatever nobody else will:

- a session stuck in `starting` (its dispatcher died mid-start) fails as `start_interrupted`;
  any machine made for it is destroyed and its room deleted;
- a session whose machine is gone ends, with the exit code from the machine's events;
- a session past its max duration, or not ready in time, is asked to end and its bot stopped
  (SIGTERM and the grace period); a machine still running after that grace is destroyed;
- a machine that no live session owns (its session ended or is unknown) is stopped, then
  destroyed on a later pass; a second machine of a live session is destroyed at once;
- rooms of ended sessions still undeleted (in the store's record or in Daily's list) are
  handed to the janitor, whose queue deletes them in batch calls paced under Daily's limit (a
  pass never waits for room deletes);
- the ids of handled Daily webhook events are forgotten after a day;
- idempotency keys older than a day are forgotten, and rate-limit buckets full again.

A pass makes one machine list call, one room list call per room backend, and then only calls
for what needs repair, all through the clients' retry policy (which honours Retry-After).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field

from dispatcher.aio import every
from dispatcher.config import Settings
from dispatcher.ids import SESSION_ID
from dispatcher.janitor import RoomJanitor
from dispatcher.lifecycle import EndReason, State, interrupt_start
from dispatcher.logs import session_context
from dispatcher.machines import MachineBackend, MachineInfo, MachineRef
from dispatcher.pool import Pool
from dispatcher.rooms import RoomBackend
from dispatcher.store import HeldLock, Session, Store
from dispatcher.supervisor import EXIT_MARGIN_S, Supervisor
from dispatcher.telemetry import Telemetry

log = logging.getLogger(__name__)

# Rooms of sessions that ended less than this ago are left to the supervisor that ended them.
ROOM_GRACE_S = 10.0
ROOMS_PER_PASS = 50
IDEMPOTENCY_KEY_TTL_S = 24 * 3600.0
# Ids of handled Daily webhook events are kept this long (replays within it are ignored).
WEBHOOK_ID_TTL_S = 24 * 3600.0


@dataclass
class Report:
    """What one pass saw and did."""

    sessions: int = 0
    machines: int = 0
    starts_failed: int = 0
    sessions_ended: int = 0
    stops: int = 0
    destroyed: int = 0
    rooms_queued: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def repaired(self) -> int:
        """How many repairs the pass made."""
        return (
            self.starts_failed + self.sessions_ended + self.stops + self.destroyed
        ) + self.rooms_queued


class Reconciler:
    """The loop, its leadership, and one pass (`reconcile`)."""

    def __init__(
        self,
        store: Store,
        machines: MachineBackend,
        rooms: Mapping[str, RoomBackend],
        supervisor: Supervisor,
        janitor: RoomJanitor,
        settings: Settings,
        telemetry: Telemetry | None = None,
        pool: Pool | None = None,
        *,
        exit_margin_s: float = EXIT_MARGIN_S,
    ) -> None:
        self._telemetry = telemetry or Telemetry()
        # How long past a stop's grace period a machine is given before it is destroyed.
        self.exit_margin_s = exit_margin_s
        self._pool = pool
        self._store = store
        self._machines = machines
        self._rooms = rooms
        self._supervisor = supervisor
        self._janitor = janitor
        self._settings = settings
        self._lock: HeldLock | None = None
        self._stopping: dict[str, float] = {}
        self.passes = 0
        self.last: Report | None = None

    @property
    def leader(self) -> bool:
        """Whether this instance runs the reconciler now."""
        return self._lock is not None

    @property
    def lock_name(self) -> str:
        """The advisory lock that elects the leader among instances of one dispatcher."""
        return f"reconciler:{self._settings.dispatcher_name}"

    async def run(self) -> None:
        """Lead (or wait to) and reconcile every interval, until cancelled."""
        interval_s = self._settings.reconcile_interval_s
        await every(interval_s, self._pass, log=log, what="reconciler pass")

    async def _pass(self) -> None:
        if not await self._lead():
            return
        report = await self.reconcile()
        if report.repaired or report.errors:
            log.info(
                "reconciled: %d sessions, %d machines; %d starts failed, "
                "%d sessions ended, %d stops, %d destroyed, %d room deletes queued, "
                "%d errors",
                report.sessions,
                report.machines,
                report.starts_failed,
                report.sessions_ended,
                report.stops,
                report.destroyed,
                report.rooms_queued,
                len(report.errors),
            )

    async def _lead(self) -> bool:
        if self._lock is not None:
            if await self._lock.alive():
                return True
            log.warning("lost the reconciler lock")
            self._lock = None
        self._lock = await self._store.try_lock(self.lock_name)
        if self._lock is not None:
            log.info("this instance (%s) runs the reconciler", self._settings.instance_id)
        return self._lock is not None

    async def aclose(self) -> None:
        """Give up leadership, so that another instance takes over at once."""
        lock, self._lock = self._lock, None
        if lock is not None:
            await lock.release()

    async def reconcile(self) -> Report:
        """One pass over every live session, every machine of ours and the rooms to delete
        (a span of its own, whose children are the pass's upstream calls)."""
        with self._telemetry.tracing.span("reconcile") as span:
            report = await self._reconcile()
            span.set_attribute("reconcile.sessions", report.sessions)
            span.set_attribute("reconcile.machines", report.machines)
            span.set_attribute("reconcile.repairs", report.repaired)
            return report

    async def _reconcile(self) -> Report:
        report = Report()
        now = time.time()
        inventory = await self._machines.inventory()
        # Only this dispatcher's sessions: several dispatcher apps may share one database.
        active = [
            s
            for s in await self._store.active_sessions()
            if s.dispatcher == self._settings.dispatcher_name
        ]
        report.sessions, report.machines = len(active), len(inventory)
        by_session: dict[str, list[MachineInfo]] = {}
        for machine in inventory:
            if machine.session_id:
                by_session.setdefault(machine.session_id, []).append(machine)
        if self._pool is not None:
            # A pool machine's metadata names no session: its claim in the store does.
            claimed = await self._pool.claims()
            for machine in inventory:
                if machine.pool and machine.id in claimed:
                    by_session.setdefault(claimed[machine.id], []).append(machine)
        for session in active:
            with session_context(
                session.id, machine_id=session.machine_id, traceparent=session.traceparent
            ):
                await self._guard(report, self._session(session, by_session, now, report))
        known = {s.id: s for s in active}
        others = await self._store.get_many(sid for sid in by_session if sid not in known)
        for machine in inventory:
            if machine.session_id:
                owner = known.get(machine.session_id) or others.get(machine.session_id)
                with session_context(machine.session_id, machine_id=machine.id):
                    await self._guard(report, self._machine(machine, owner, now, report))
        listed = {m.id for m in inventory}
        self._stopping = {k: v for k, v in self._stopping.items() if k in listed}
        if self._pool is not None:
            await self._guard(report, self._validate_pool(inventory, known, now, report))
        await self._guard(report, self._rooms_of_ended(now, report))
        await self._guard(report, self._purge_keys(now))
        await self._guard(report, self._purge_webhook_ids(now))
        await self._guard(report, self._purge_rate_buckets(now))
        self.passes += 1
        self.last = report
        self._telemetry.metrics.repaired(
            {
                "start_failed": report.starts_failed,
                "session_ended": report.sessions_ended,
                "machine_stop": report.stops,
                "machine_destroy": report.destroyed,
                "room_delete": report.rooms_queued,
            }
        )
        return report

    async def _guard(self, report: Report, step: Awaitable[None]) -> None:
        try:
            await step
        except Exception as exc:
            log.warning("reconciler step failed: %s", exc)
            report.errors.append(str(exc))

    async def _session(
        self,
        session: Session,
        machines: Mapping[str, list[MachineInfo]],
        now: float,
        report: Report,
    ) -> None:
        """Repair one live session."""
        # No machine recorded: its start is still running, or died with its dispatcher (the
        # session may have left `starting` meanwhile: its bot called back, or a DELETE came).
        if session.state == State.STARTING or not session.machine_id:
            if now - session.created_at > self._settings.start_timeout_s:
                await self._fail_stuck_start(session, now, report)
            return
        ref = MachineRef(session.machine_id, session.region, session.machine_version)
        listed = next((m for m in machines.get(session.id, []) if m.id == ref.id), None)
        if listed is None or not listed.live:
            exit = await self._machines.exited(ref)  # the list lags: ask the machine itself
            if exit is not None:
                await self._supervisor.finish(session.id, ref, exit)
                report.sessions_ended += 1
            return
        if session.state == State.ENDING:
            # Whoever asked for the end stops the machine (or the bot, having reported its
            # end, is leaving): its goodbye takes up to the stop's grace period, which a second
            # SIGTERM would cut short. Past that, its dispatcher died before the stop, the stop
            # failed, or the bot hangs: stop it, and destroy it if it outlives the stop.
            requested = session.end_requested_at or session.updated_at
            if now - requested < self._settings.bot_stop_timeout_s:
                return
            await self._stop_then_destroy(ref, now, report)
            return
        reason = None
        if now >= session.expires_at:
            reason = EndReason.MAX_DURATION
        elif (
            session.state == State.DISPATCHED
            and session.ready_at is None
            and now - session.created_at > self._settings.ready_timeout_s
        ):
            reason = EndReason.READY_TIMEOUT
        if reason and await self._supervisor.ask_to_end(session.id, reason):
            log.info("ending the session: %s", reason)
            await self._stop_then_destroy(ref, now, report)

    async def _stop_then_destroy(self, ref: MachineRef, now: float, report: Report) -> None:
        """First sighting: Fly's stop (SIGTERM, SIGKILL after the grace period). A pass after
        the grace plus a margin: destroy it if it is still there."""
        deadline = self._stopping.get(ref.id)
        if deadline is None:
            await self._machines.stop(ref, self._settings.bot_stop_timeout_s)
            self._stopping[ref.id] = now + self._settings.bot_stop_timeout_s + self.exit_margin_s
            report.stops += 1
        elif now >= deadline:
            log.warning("machine outlived its stop grace period: destroying it")
            await self._machines.destroy(ref)
            self._stopping.pop(ref.id, None)
            report.destroyed += 1

    async def _fail_stuck_start(self, session: Session, now: float, report: Report) -> None:
        details = {"reason": EndReason.START_INTERRUPTED, "source": "reconciler"}
        failed = await interrupt_start(self._store, session, details)
        self._telemetry.session_ended(failed)
        if failed is None:
            return
        log.warning("a start was interrupted: cleaning up")
        report.starts_failed += 1
        await self._machines.cleanup(session.id)
        report.rooms_queued += self._janitor.submit(failed)

    async def _machine(
        self, machine: MachineInfo, owner: Session | None, now: float, report: Report
    ) -> None:
        """Stop, then destroy, a machine that no live session owns."""
        if owner is not None and owner.active:
            if owner.state == State.STARTING or owner.machine_id in (None, machine.id):
                return
        elif (
            owner is None
            and machine.created_at is not None
            and now - machine.created_at < self._settings.start_timeout_s
        ):
            # Sessions are stored before their machine is created, so an unknown session is
            # not a start in flight; still, leave young machines alone (a lost database, clocks).
            return
        # A second machine of a live session runs with that session's callback token: stopped
        # gracefully, its bot would report `ended` for the session and end the live one.
        duplicate = owner is not None and owner.active
        if duplicate or not machine.live:
            log.warning("destroying a machine no live session owns")
            await self._machines.destroy(machine.ref)
            self._stopping.pop(machine.id, None)
            report.destroyed += 1
            return
        if machine.id not in self._stopping:
            log.warning("stopping a machine no live session owns")
        await self._stop_then_destroy(machine.ref, now, report)

    async def _rooms_of_ended(self, now: float, report: Report) -> None:
        """Delete the rooms of ended sessions that still exist, as far as we can tell."""
        due = {
            s.id: s
            for s in await self._store.rooms_to_delete(
                ended_before=now - ROOM_GRACE_S, limit=ROOMS_PER_PASS
            )
        }
        for rooms in self._rooms.values():
            names = [n for n in await rooms.inventory() if SESSION_ID.match(n)]
            for session in (await self._store.get_many(names)).values():
                ended_at = session.ended_at or session.updated_at
                if not session.active and ended_at < now - ROOM_GRACE_S:
                    due.setdefault(session.id, session)
        for session in list(due.values())[:ROOMS_PER_PASS]:
            report.rooms_queued += self._janitor.submit(session)

    async def _validate_pool(
        self,
        inventory: list[MachineInfo],
        live: Mapping[str, Session],
        now: float,
        report: Report,
    ) -> None:
        assert self._pool is not None
        report.destroyed += await self._pool.validate(inventory, set(live), now)

    async def _purge_keys(self, now: float) -> None:
        await self._store.purge_keys(created_before=now - IDEMPOTENCY_KEY_TTL_S)

    async def _purge_webhook_ids(self, now: float) -> None:
        await self._store.purge_webhooks(received_before=now - WEBHOOK_ID_TTL_S)

    async def _purge_rate_buckets(self, now: float) -> None:
        await self._store.purge_tokens(now=now)

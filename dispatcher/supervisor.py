"""Follows every dispatched session to its end, at a cost in upstream requests that grows with
the sessions started and ended, never with the sessions alive (docs/sessions.md, "The follow").

No task and no request per live session; one loop (`run`) drives three mechanisms:

- **Ending sessions.** Whatever moves a session to `ending` (the bot's `ended` callback, a
  DELETE, a webhook, a time limit) makes `follow` start one wait for that machine's exit (on
  Fly one `wait` for `stopped`, on a client of its own, bounded by the stop's grace periods);
  the session is finished with that exit as soon as it comes.
- **The watch** for machines that exit without a word (a crash, the OOM killer): every
  FOLLOW_INTERVAL_S one batched read (`MachineBackend.live_ids`: on Fly the pages of one list
  call filtered by `metadata.dispatcher`) is compared with the store's live sessions; a session
  whose machine is gone has its exit read once and is finished. Bound: FOLLOW_INTERVAL_S plus
  one pass, within 30 s up to 10,000 sessions on Fly's default 10 s.
- **Timers** (ready timeout, max duration, an ending bot's grace, a stop's grace before the
  destroy) are deadlines in one in-memory index swept every second; a stop or destroy refused
  by an outage is asked again on later sweeps.

The watch runs on the leader only (the reconciler's lock holder) and finishes every instance's
sessions through the store, where each transition is a compare-and-set: one leader lists at one
rate however many instances run, under Fly's list limit (about 1 a second per app), where N
instances each listing overran it. Timers stay with the instance that follows the session; a
session whose follower died is the reconciler's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from dispatcher.aio import cancel_and_wait
from dispatcher.cleanup import Cleanup, Recycler
from dispatcher.config import Settings
from dispatcher.deadlines import Deadlines
from dispatcher.errors import UpstreamError
from dispatcher.janitor import RoomJanitor
from dispatcher.lifecycle import (
    EndReason,
    State,
    finish_on_exit,
    request_end,
)
from dispatcher.logs import session_context
from dispatcher.machines import MachineBackend, MachineExit, MachineRef
from dispatcher.store import Session, Store
from dispatcher.telemetry import Telemetry

log = logging.getLogger(__name__)

# How long past a stop's grace period a machine's exit is waited for.
EXIT_MARGIN_S = 15
# The sweep of deadlines runs at least this often (the watch every FOLLOW_INTERVAL_S).
TICK_S = 1.0
# A stop or destroy refused by an upstream failure is asked again after this long.
RETRY_S = 1.0


class Phase(Enum):
    """Where a followed session is, as its follower sees it."""

    # Dispatched or ready: its deadline is its ready timeout, or its max duration.
    LIVE = "live"
    # Ending, its bot given the stop's grace period to leave: then it is stopped.
    ENDING = "ending"
    # Its machine was sent the stop: destroyed if still there after the grace and a margin.
    STOPPING = "stopping"


@dataclass
class Followed:
    """One session this instance follows: its machine, its deadline, and what is due then."""

    session_id: str
    ref: MachineRef
    created_at: float
    expires_at: float
    traceparent: str | None
    ready: bool
    phase: Phase = Phase.LIVE
    due: float = 0.0
    exit_wait: asyncio.Task[None] | None = field(default=None, repr=False)


class Supervisor:
    """Follows sessions (`follow`), runs their timers and the watch (`run`), finishes them."""

    def __init__(
        self,
        store: Store,
        machines: MachineBackend,
        janitor: RoomJanitor,
        settings: Settings,
        *,
        telemetry: Telemetry | None = None,
        clock: Callable[[], float] = time.time,
        recycler: Recycler | None = None,
    ) -> None:
        self._telemetry = telemetry or Telemetry()
        self._store = store
        self._machines = machines
        self._clean_up = Cleanup(store, machines, janitor, recycler)
        self._settings = settings
        self._clock = clock
        self._followed: dict[str, Followed] = {}
        self._deadlines = Deadlines()
        self.watches = 0

    # -- what the rest of the dispatcher tells it ---------------------------------------------

    def follow(self, session: Session, *, stop_sent: bool = False) -> None:
        """Follow a dispatched session to its end; called again when it moves to `ending`
        (`stop_sent`: its machine was just sent the stop)."""
        if not session.machine_id or not session.active:
            return
        entry = self._followed.get(session.id)
        if entry is None:
            entry = Followed(
                session.id,
                _ref(session),
                session.created_at,
                session.expires_at,
                session.traceparent,
                ready=session.ready_at is not None,
            )
            self._followed[session.id] = entry
            if session.state != State.ENDING:
                self._schedule_live(entry)
        if session.state == State.ENDING:
            if stop_sent:
                self._stopping(entry, self._clock())
            elif entry.phase is Phase.LIVE:
                self._ending(entry, session)

    def notify_ready(self, session_id: str) -> None:
        """The bot of a session called back ready on this instance."""
        entry = self._followed.get(session_id)
        if entry is not None and entry.phase is Phase.LIVE and not entry.ready:
            entry.ready = True
            self._schedule_live(entry)

    @property
    def watching(self) -> int:
        """How many sessions this instance follows."""
        return len(self._followed)

    async def ask_to_end(self, session_id: str, reason: EndReason) -> bool:
        """Move a live session to `ending` with a reason of the dispatcher's."""
        return await request_end(self._store, session_id, reason, {"reason": reason}) is not None

    async def end_all(self, reason: EndReason) -> bool:
        """End every session this instance follows, for `reason` (one of the dispatcher's):
        each live one moves to `ending` and its bot gets the stop (SIGTERM, SIGKILL after the
        grace period); then wait until each has ended and is recorded, its bot's `ended`
        callback taken meanwhile. Whether all were done within the grace period and margin."""
        grace = self._settings.bot_stop_timeout_s
        for entry in list(self._followed.values()):
            with session_context(entry.session_id, machine_id=entry.ref.id):
                if await self.ask_to_end(entry.session_id, reason):
                    await self._machines.stop(entry.ref, grace)
                    self._stopping(entry, self._clock())
                else:
                    await self._refresh(entry)
        waits = [e.exit_wait for e in self._followed.values() if e.exit_wait is not None]
        if not waits:
            return not self._followed
        _, left = await asyncio.wait(waits, timeout=grace + EXIT_MARGIN_S)
        return not left

    # -- the loop ------------------------------------------------------------------------------

    async def run(self, leads: Callable[[], bool]) -> None:
        """Sweep the deadlines every TICK_S at most, and every FOLLOW_INTERVAL_S watch the
        machines while `leads()` (this instance holds the reconciler's lock); until cancelled."""
        interval = self._settings.follow_interval_s
        next_watch = time.monotonic()
        while True:
            await self._guarded("the follow's sweep", self.sweep())
            if time.monotonic() >= next_watch:
                next_watch = time.monotonic() + interval
                if leads():
                    await self._guarded("the watch", self.watch())
            await asyncio.sleep(min(TICK_S, interval, max(0.0, next_watch - time.monotonic())))

    async def _guarded(self, what: str, step: Any) -> None:
        try:
            await step
        except UpstreamError as exc:
            log.warning("%s failed: %s; again on the next pass", what, exc)
        except Exception:
            log.exception("%s failed", what)

    async def sweep(self) -> int:
        """Act on every deadline that has passed: how many were due."""
        due = self._deadlines.overdue(self._clock())
        for session_id in due:
            entry = self._followed.get(session_id)
            if entry is None:
                continue
            with session_context(
                session_id, machine_id=entry.ref.id, traceparent=entry.traceparent
            ):
                try:
                    await self._overdue(entry)
                except Exception:
                    log.exception("following the session failed")
                    if self._followed.get(session_id) is entry:
                        self._deadlines.schedule(session_id, self._clock() + RETRY_S)
        return len(due)

    async def watch(self) -> int:
        """One pass of the watch: finish every live session of this dispatcher whose machine
        has exited, as one batched read and the store's live sessions show (the machines that
        are not listed running are asked themselves: a list lags). How many were finished."""
        live = await self._machines.live_ids()
        self.watches += 1
        finished = 0
        for session in await self._store.active_sessions():
            if (
                session.dispatcher != self._settings.dispatcher_name
                or session.state == State.STARTING
                or not session.machine_id
                or session.machine_id in live
            ):
                continue
            entry = self._followed.get(session.id)
            if entry is not None and entry.exit_wait is not None:
                continue  # its exit is being waited for here
            ref = _ref(session)
            with session_context(session.id, machine_id=ref.id, traceparent=session.traceparent):
                exit = await self._machines.exited(ref)
                if exit is None:
                    continue  # made moments ago, not listed yet
                log.info("the machine has exited (seen by the watch)")
                if await self.finish(session.id, ref, exit) is not None:
                    finished += 1
        return finished

    async def aclose(self) -> None:
        """Stop following (the bots themselves are not touched)."""
        waits = [e.exit_wait for e in self._followed.values() if e.exit_wait is not None]
        await cancel_and_wait(*waits)

    # -- timers --------------------------------------------------------------------------------

    def _schedule_live(self, entry: Followed) -> None:
        if entry.ready:
            entry.due = entry.expires_at
        else:
            ready_by = entry.created_at + self._settings.ready_timeout_s
            entry.due = min(ready_by, entry.expires_at)
        self._deadlines.schedule(entry.session_id, entry.due)

    def _ending(self, entry: Followed, session: Session) -> None:
        """The session is ending: its bot gets the stop's grace period to leave, then the stop;
        its exit is waited for meanwhile."""
        entry.phase = Phase.ENDING
        requested = session.end_requested_at or session.updated_at
        entry.due = requested + self._settings.bot_stop_timeout_s
        self._deadlines.schedule(entry.session_id, entry.due)
        self._wait_for_exit(entry)

    def _stopping(self, entry: Followed, now: float) -> None:
        """Its machine was sent the stop: destroyed if it outlives the grace and margin."""
        entry.phase = Phase.STOPPING
        entry.due = now + self._settings.bot_stop_timeout_s + EXIT_MARGIN_S
        self._deadlines.schedule(entry.session_id, entry.due)
        self._wait_for_exit(entry)

    async def _overdue(self, entry: Followed) -> None:
        if entry.phase is Phase.ENDING:
            log.info("stopping the machine")
            await self._send_stop(entry)
            return
        if entry.phase is Phase.STOPPING:
            await self._destroy(entry)
            return
        current = await self._refresh(entry)
        if current is None or entry.phase is not Phase.LIVE:
            return  # over, or ending (and in its ending phase now)
        if not entry.ready and current.ready_at is not None:
            entry.ready = True  # its ready callback reached another instance
            self._schedule_live(entry)
            if entry.due > self._clock():
                return
        reason = EndReason.MAX_DURATION if entry.ready else EndReason.READY_TIMEOUT
        if not await self.ask_to_end(entry.session_id, reason):
            await self._refresh(entry)
            if self._followed.get(entry.session_id) is entry and entry.phase is Phase.LIVE:
                self._deadlines.schedule(entry.session_id, self._clock() + RETRY_S)
            return
        if reason == EndReason.READY_TIMEOUT:
            log.warning("bot not ready after %.0f s", self._settings.ready_timeout_s)
        else:
            log.info("ending the session: %s", reason)
        await self._send_stop(entry)

    async def _refresh(self, entry: Followed) -> Session | None:
        """The session as stored: None (and forgotten here) when it is over; an ending one
        moves to its ending phase."""
        current = await self._store.get(entry.session_id)
        if current is None or not current.active:
            self._forget(entry.session_id)
            return None
        if current.state == State.ENDING and entry.phase is Phase.LIVE:
            self._ending(entry, current)
        return current

    async def _send_stop(self, entry: Followed) -> None:
        """The machine's stop (SIGTERM, SIGKILL after the grace period); asked again on a
        later sweep while an upstream failure refuses it."""
        try:
            await self._machines.stop(entry.ref, self._settings.bot_stop_timeout_s)
        except UpstreamError as exc:
            if not exc.retryable:
                raise
            log.warning("machine stop failed (%s): asking again", exc)
            entry.phase = Phase.ENDING
            entry.due = self._clock() + RETRY_S
            self._deadlines.schedule(entry.session_id, entry.due)
            self._wait_for_exit(entry)
            return
        self._stopping(entry, self._clock())

    async def _destroy(self, entry: Followed) -> None:
        """The machine outlived its stop: destroy it, then finish the session."""
        log.warning("machine outlived its stop grace period: destroying it")
        try:
            await self._machines.destroy(entry.ref)
        except UpstreamError as exc:
            if not exc.retryable:
                raise
            log.warning("machine destroy failed (%s): asking again", exc)
            self._deadlines.schedule(entry.session_id, self._clock() + RETRY_S)
            return
        await self.finish(entry.session_id, entry.ref, MachineExit(requested_stop=True))

    # -- exits ---------------------------------------------------------------------------------

    def _wait_for_exit(self, entry: Followed) -> None:
        """Wait for the machine's exit (once per session), then finish the session."""
        if entry.exit_wait is not None:
            return
        horizon = 2 * self._settings.bot_stop_timeout_s + EXIT_MARGIN_S
        entry.exit_wait = asyncio.create_task(
            self._exit_wait(entry, horizon), name=f"exit of {entry.session_id}"
        )

    async def _exit_wait(self, entry: Followed, horizon: float) -> None:
        with session_context(
            entry.session_id, machine_id=entry.ref.id, traceparent=entry.traceparent
        ):
            try:
                exit = await self._machines.wait_exit(entry.ref, horizon)
                if exit is not None:
                    # Shielded: forgetting the session (and cancelling this wait) while its
                    # finish is under way must not cut the finish short.
                    await asyncio.shield(self.finish(entry.session_id, entry.ref, exit))
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("waiting for the machine's exit failed")
            finally:
                if entry.exit_wait is asyncio.current_task():
                    entry.exit_wait = None

    def _forget(self, session_id: str) -> None:
        """Drop a session's follow state (its exit wait cancelled, unless that is the caller)."""
        entry = self._followed.pop(session_id, None)
        self._deadlines.cancel(session_id)
        wait = entry.exit_wait if entry is not None else None
        if wait is not None and wait is not asyncio.current_task():
            wait.cancel()

    async def finish(self, session_id: str, ref: MachineRef, exit: MachineExit) -> Session | None:
        """Record how the session ended (`lifecycle.finish_on_exit`), then clean up after it
        (cleanup.py: its machine destroyed or recycled, its room's delete queued)."""
        session = await self._store.get(session_id)
        if session is None or not session.active:
            self._forget(session_id)
            return session
        ended, reason, exit_code = await finish_on_exit(self._store, session, ref.id, exit)
        self._forget(session_id)
        self._telemetry.session_ended(ended)
        state = ended.state if ended else "over"
        log.info("session %s: %s (exit code %s)", state, reason, exit_code)
        await self._clean_up(session, ref)
        return ended


def _ref(session: Session) -> MachineRef:
    return MachineRef(session.machine_id or "", session.region, session.machine_version)

"""Follows each dispatched session to its end: readiness, exit, ready timeout, max duration."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from dispatcher.aio import cancel_and_wait
from dispatcher.config import Settings
from dispatcher.errors import UpstreamError
from dispatcher.janitor import RoomJanitor
from dispatcher.lifecycle import (
    DISPATCHER_REASONS,
    USER_ENDED,
    EndReason,
    State,
    finish,
    request_end,
)
from dispatcher.logs import session_context
from dispatcher.machines import MachineBackend, MachineExit, MachineRef
from dispatcher.store import Session, Store
from dispatcher.telemetry import Telemetry

log = logging.getLogger(__name__)

# How long past a stop's grace period a machine's exit is waited for.
EXIT_MARGIN_S = 15


class Supervisor:
    """One watch task per session; the tasks are owned here and cancelled on shutdown."""

    def __init__(
        self,
        store: Store,
        machines: MachineBackend,
        janitor: RoomJanitor,
        settings: Settings,
        *,
        poll_s: float = 5.0,
        telemetry: Telemetry | None = None,
    ) -> None:
        self._telemetry = telemetry or Telemetry()
        self._store = store
        self._machines = machines
        self._janitor = janitor
        self._settings = settings
        self._poll_s = poll_s
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._machines_of: dict[str, MachineRef] = {}
        self._ready: dict[str, asyncio.Event] = {}

    def follow(self, session: Session) -> None:
        """Watch a dispatched session until it ends (once per session)."""
        if session.id in self._tasks or not session.machine_id:
            return
        task = asyncio.create_task(self._follow(session), name=f"follow {session.id}")
        self._tasks[session.id] = task
        self._machines_of[session.id] = _ref(session)

    def notify_ready(self, session_id: str) -> None:
        """The bot of a session called back ready on this instance."""
        self._ready.setdefault(session_id, asyncio.Event()).set()

    @property
    def watching(self) -> int:
        """How many sessions this instance follows."""
        return len(self._tasks)

    async def end_all(self, reason: EndReason) -> bool:
        """End every session this instance follows, for `reason` (one of the dispatcher's):
        each live one moves to `ending` and its bot gets the stop (SIGTERM, SIGKILL after the
        grace period); then wait until each has ended and is recorded, its bot's `ended`
        callback taken meanwhile. Whether all were done within the grace period and margin."""
        grace = self._settings.bot_stop_timeout_s
        for session_id, ref in list(self._machines_of.items()):
            with session_context(session_id, machine_id=ref.id):
                if await self.ask_to_end(session_id, reason):
                    await self._machines.stop(ref, grace)
        tasks = list(self._tasks.values())
        if not tasks:
            return True
        _, left = await asyncio.wait(tasks, timeout=grace + EXIT_MARGIN_S)
        return not left

    async def aclose(self) -> None:
        """Stop watching (the bots themselves are not touched)."""
        await cancel_and_wait(*self._tasks.values())

    async def _follow(self, session: Session) -> None:
        try:
            with session_context(
                session.id, machine_id=session.machine_id, traceparent=session.traceparent
            ):
                await self._watch(session)
        except Exception:
            with session_context(session.id, machine_id=session.machine_id):
                log.exception("watching the session failed")
        finally:
            self._tasks.pop(session.id, None)
            self._machines_of.pop(session.id, None)
            self._ready.pop(session.id, None)

    async def _watch(self, session: Session) -> None:
        ref = _ref(session)
        horizon = session.expires_at - time.time() + self._settings.bot_stop_timeout_s
        exit_task = asyncio.create_task(self._machines.wait_exit(ref, max(1.0, horizon)))
        try:
            if session.ready_at is None and session.state in (State.STARTING, State.DISPATCHED):
                outcome = await self._until_ready(session, exit_task)
                if outcome == "timeout" and await self.ask_to_end(
                    session.id, EndReason.READY_TIMEOUT
                ):
                    log.warning("bot not ready after %.0f s", self._settings.ready_timeout_s)
                    await self._stop(ref, exit_task)
                    await self.finish(session.id, ref, await self._exit_within(exit_task, ref))
                    return
            remaining = session.expires_at - time.time()
            done, _ = await asyncio.wait({exit_task}, timeout=max(0.0, remaining))
            if not done:
                await self.ask_to_end(session.id, EndReason.MAX_DURATION)
                await self._stop(ref, exit_task)
            exit = await self._exit_within(exit_task, ref)
            await self.finish(session.id, ref, exit)
        finally:
            await cancel_and_wait(exit_task)

    async def _until_ready(
        self, session: Session, exit_task: asyncio.Task[MachineExit | None]
    ) -> str:
        """Wait for the ready callback: 'ready', 'exited', 'ending' (asked to end) or 'timeout'."""
        event = self._ready.setdefault(session.id, asyncio.Event())
        deadline = min(session.created_at + self._settings.ready_timeout_s, session.expires_at)
        while (remaining := deadline - time.time()) > 0:
            ready_wait = asyncio.create_task(event.wait())
            done, _ = await asyncio.wait(
                {ready_wait, exit_task},
                timeout=min(remaining, self._poll_s),
                return_when=asyncio.FIRST_COMPLETED,
            )
            ready_wait.cancel()
            if event.is_set():
                return "ready"
            if exit_task in done:
                return "exited"
            current = await self._store.get(session.id)
            if current is None or current.ready_at is not None:
                return "ready"
            if current.state not in (State.STARTING, State.DISPATCHED):
                return "ending"
        return "timeout"

    async def ask_to_end(self, session_id: str, reason: EndReason) -> bool:
        """Move a live session to `ending` with a reason of the dispatcher's."""
        return await request_end(self._store, session_id, reason, {"reason": reason}) is not None

    async def _stop(self, ref: MachineRef, exit_task: asyncio.Task[MachineExit | None]) -> None:
        """The machine's stop: SIGTERM, SIGKILL after the grace period."""
        grace_s = self._settings.bot_stop_timeout_s
        await self._insist("stop", lambda: self._machines.stop(ref, grace_s), exit_task)

    async def _insist(
        self,
        what: str,
        call: Callable[[], Awaitable[None]],
        exit_task: asyncio.Task[MachineExit | None],
    ) -> None:
        """Make a call on the machine (a stop, a destroy), again every poll through an upstream
        outage, until it is taken or the machine has exited anyway."""
        while True:
            try:
                await call()
                return
            except UpstreamError as exc:
                if not exc.retryable:
                    raise
                log.warning("machine %s failed (%s): asking again", what, exc)
            done, _ = await asyncio.wait({exit_task}, timeout=self._poll_s)
            if done:
                return

    async def _exit_within(
        self, exit_task: asyncio.Task[MachineExit | None], ref: MachineRef
    ) -> MachineExit:
        """The machine's exit, giving it the stop grace period; destroyed if it outlives that."""
        grace = self._settings.bot_stop_timeout_s + EXIT_MARGIN_S
        done, _ = await asyncio.wait({exit_task}, timeout=grace)
        exit = exit_task.result() if done else None
        if exit is None:
            log.warning("machine outlived its stop grace period: destroying it")
            await self._insist("destroy", lambda: self._machines.destroy(ref), exit_task)
            exit = MachineExit(requested_stop=True)
        return exit

    async def finish(self, session_id: str, ref: MachineRef, exit: MachineExit) -> Session | None:
        """Record how the session ended, then delete its room and make sure its machine is gone.

        The exit code is the machine's, except when the bot reported its own and the machine
        then died of the stop the dispatcher sent (SIGTERM, or SIGKILL after the grace): the
        bot's report wins (the machine's code stays in the event). A machine lost with an
        earlier dispatcher keeps what the store knew (ready or not, the bot's exit code)."""
        session = await self._store.get(session_id)
        if session is None or not session.active:
            return session
        reached_ready = session.ready_at is not None or session.end_reason in USER_ENDED
        reason = session.end_reason
        if exit.oom_killed and reason not in DISPATCHER_REASONS:
            reason = EndReason.OOM_KILLED
        if reason is None:
            if exit.lost:
                reason = EndReason.DISPATCHER_LOST
            elif not reached_ready:
                reason = EndReason.EXITED_BEFORE_READY
            elif exit.exit_code in (0, None):
                reason = EndReason.COMPLETED
            else:
                reason = EndReason.CRASHED
        stopped_after_report = (
            session.exit_code is not None and exit.requested_stop and exit.signal is not None
        )
        exit_code = exit.exit_code
        if exit_code is None or stopped_after_report:
            exit_code = session.exit_code
        details: dict[str, Any] = {
            "machine_id": ref.id,
            "exit_code": exit_code,
            "oom_killed": exit.oom_killed,
            "requested_stop": exit.requested_stop,
            "signal": exit.signal,
        }
        if exit_code != exit.exit_code and exit.exit_code is not None:
            details["machine_exit_code"] = exit.exit_code
        if exit.lost:
            details["lost"] = True
        ended = await finish(
            self._store,
            session_id,
            failed=not reached_ready or reason == EndReason.READY_TIMEOUT,
            reason=reason,
            exit_code=exit_code,
            details=details,
        )
        self._telemetry.session_ended(ended)
        state = ended.state if ended else "over"
        log.info("session %s: %s (exit code %s)", state, reason, exit_code)
        await self.clean_up(session, ref)
        return ended

    async def clean_up(self, session: Session, ref: MachineRef | None) -> None:
        """Destroy the session's machine and queue its room's delete; failures are recorded."""
        if ref is not None:
            await self._attempt(session.id, "machine_destroy", self._machines.destroy(ref))
        self._janitor.submit(session)

    async def _attempt(self, session_id: str, what: str, call: Any) -> bool:
        try:
            await call
        except Exception as exc:
            log.warning("%s failed: %s", what, exc)
            await self._store.record(
                session_id, "cleanup_failed", {"what": what, "error": str(exc)}
            )
            return False
        return True


def _ref(session: Session) -> MachineRef:
    return MachineRef(session.machine_id or "", session.region, session.machine_version)

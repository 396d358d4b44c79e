"""Sessions: start one (shielded, under its Idempotency-Key; the making is dispatcher.starter),
look it up, list them, end one."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from opentelemetry import trace

from dispatcher.auth import Principal
from dispatcher.config import Settings
from dispatcher.errors import (
    Conflict,
    ErrorCode,
    Forbidden,
    Gone,
    NotFound,
    Unavailable,
)
from dispatcher.idempotency import IDEMPOTENT_WAIT_S, Idempotency, IdempotentStarts
from dispatcher.ids import new_session_id
from dispatcher.janitor import RoomJanitor
from dispatcher.lifecycle import ACTIVE_STATES, EndReason, State, request_end
from dispatcher.logs import bind, session_context
from dispatcher.machines import MachineBackend, MachineRef
from dispatcher.pacing import Pacer
from dispatcher.pool import Pool
from dispatcher.rooms import RoomBackend
from dispatcher.rooms.stock import RoomStock
from dispatcher.start import StartRequest
from dispatcher.starter import Starter
from dispatcher.store import Session, Store
from dispatcher.supervisor import Supervisor
from dispatcher.telemetry import Telemetry

log = logging.getLogger(__name__)


class SessionService:
    """The dispatcher's use cases; HTTP handlers call these and nothing else."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        machines: MachineBackend,
        rooms: Mapping[str, RoomBackend],
        supervisor: Supervisor,
        janitor: RoomJanitor,
        pacer: Pacer | None = None,
        telemetry: Telemetry | None = None,
        pool: Pool | None = None,
        *,
        room_pacer: Pacer | None = None,
        stock: RoomStock | None = None,
        idempotent_wait_s: float = IDEMPOTENT_WAIT_S,
    ) -> None:
        self._settings = settings
        self._telemetry = telemetry or Telemetry()
        self._store = store
        self._machines = machines
        self._rooms = rooms
        self._supervisor = supervisor
        self._starter = Starter(
            settings,
            store,
            machines,
            rooms,
            supervisor,
            janitor,
            pacer,
            self._telemetry,
            pool,
            room_pacer,
            stock,
        )
        self._keys = IdempotentStarts(
            store, abandoned_after_s=settings.start_timeout_s, wait_s=idempotent_wait_s
        )
        self._starts: set[asyncio.Task[dict[str, Any]]] = set()
        self.draining = False

    @property
    def starts_in_flight(self) -> int:
        """Starts begun and not finished (shielded from their clients)."""
        return len(self._starts)

    async def drain(self, timeout_s: float) -> bool:
        """Refuse new starts and wait up to `timeout_s` for those in flight; whether they all
        finished (one that did not is failed and cleaned up by the reconciler later)."""
        self.draining = True
        pending = set(self._starts)
        if pending:
            _, left = await asyncio.wait(pending, timeout=timeout_s)
            return not left
        return True

    async def start(
        self, principal: Principal, request: StartRequest, idempotency: Idempotency | None = None
    ) -> dict[str, Any]:
        """Start a session, shielded: a client that goes away leaves nothing half made."""
        if self.draining:
            raise Unavailable(
                "this dispatcher is shutting down: retry", code=ErrorCode.DRAINING, retry_after=2
            )
        task = asyncio.create_task(self._start_once(principal, request, idempotency))
        self._starts.add(task)
        task.add_done_callback(self._starts.discard)
        return await asyncio.shield(task)

    async def _start_once(
        self, principal: Principal, request: StartRequest, idempotency: Idempotency | None
    ) -> dict[str, Any]:
        """A start under an Idempotency-Key answers what the first start with it answered. A
        room made ahead names the session; it goes back to the stock unless a session of that
        name was stored (which then owns it: its room is deleted with it, failed or not)."""
        stocked = await self._starter.stocked_room(request)
        session_id = stocked.name if stocked is not None else new_session_id()
        # This task's own context: every record logged for the start carries its session.
        bind(session_id=session_id)
        span = trace.get_current_span()
        span.set_attribute("session.id", session_id)
        span.set_attribute("user.id", self._telemetry.tracing.user_id(principal.user))
        if request.region:
            span.set_attribute("session.region_requested", request.region)
        started = False

        def start() -> Awaitable[dict[str, Any]]:
            nonlocal started
            started = True
            return self._starter.start(principal, request, session_id, stocked)

        kept = False
        try:
            if idempotency is None:
                answer = await start()
            else:
                answer = await self._keys.run(principal.user, idempotency, session_id, start)
            kept = started  # a replayed key answered another session's start
            return answer
        finally:
            if stocked is not None and not kept and await self._store.get(session_id) is None:
                await self._starter.put_back(stocked)

    async def get(self, principal: Principal, session_id: str) -> Session:
        """The caller's session, or any session for an admin (someone else's is reported as
        not found)."""
        session = await self._store.get(session_id)
        if session is None or not (principal.admin or session.user_id == principal.user):
            raise NotFound(f"no session {session_id}", code=ErrorCode.SESSION_NOT_FOUND)
        return session

    async def list_sessions(
        self,
        principal: Principal,
        *,
        state: str | None = None,
        user: str | None = None,
        limit: int = 100,
    ) -> list[Session]:
        """Sessions for an admin, newest first: the active ones, or those in `state`."""
        if not principal.admin:
            raise Forbidden("listing sessions needs the admin role", code=ErrorCode.ADMIN_REQUIRED)
        return await self._store.list_sessions(
            state=state,
            states=None if state else ACTIVE_STATES,
            user=user,
            limit=limit,
        )

    async def bot_address(self, principal: Principal, session_id: str) -> Callable[[], str | None]:
        """Where the caller's live session's bot listens, asked afresh on each attempt (the
        owner's only: an admin reads and ends sessions, it does not talk to their bots)."""
        session = await self.get(principal, session_id)
        if session.user_id != principal.user:
            raise NotFound(f"no session {session_id}", code=ErrorCode.SESSION_NOT_FOUND)
        rooms = self._rooms.get(session.transport)
        if rooms is None or not rooms.bot_routes:
            raise NotFound(
                f"{session.transport} sessions have no bot routes", code=ErrorCode.NO_BOT_ROUTES
            )
        if session.state not in (State.DISPATCHED, State.READY):
            if session.state == State.STARTING:
                raise Conflict("the session is starting", code=ErrorCode.SESSION_STARTING)
            raise Gone(f"the session is {session.state}", code=ErrorCode.SESSION_ENDED)
        assert session.machine_id is not None
        ref = MachineRef(session.machine_id, session.region, session.machine_version)
        return lambda: self._machines.address(ref)

    async def end(self, principal: Principal, session_id: str) -> Session:
        """End the caller's session (an admin: any session): SIGTERM to the bot with a grace
        period; idempotent."""
        with session_context(session_id):
            session = await self.get(principal, session_id)
            bind(machine_id=session.machine_id, traceparent=session.traceparent)
            ending = await end_session(
                self._store,
                self._machines,
                session_id,
                by=principal.user,
                grace_s=self._settings.bot_stop_timeout_s,
            )
            if ending is None:
                return await self.get(principal, session_id)
            self._supervisor.follow(ending, stop_sent=True)
            return ending


async def end_session(
    store: Store, machines: MachineBackend, session_id: str, *, by: str, grace_s: int
) -> Session | None:
    """Move a live session to `ending` (reason `deleted`, by whom), then send its machine the
    stop (SIGTERM, SIGKILL after `grace_s`); None if the session was not live."""
    reason = EndReason.DELETED
    ending = await request_end(store, session_id, reason, {"reason": reason, "by": by})
    if ending is not None and ending.machine_id:
        ref = MachineRef(ending.machine_id, ending.region, ending.machine_version)
        await machines.stop(ref, grace_s)
    return ending

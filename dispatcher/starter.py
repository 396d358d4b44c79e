"""The start path: plan the room (one made ahead when the room stock has one), claim a pool
machine or create one under the shared pacing, create both at once, record the dispatch, and
undo what was made when either fails."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from opentelemetry import trace

from dispatcher.auth import Principal, new_callback_token
from dispatcher.callbacks import bot_env
from dispatcher.cleanup import record_failure
from dispatcher.config import Settings
from dispatcher.errors import (
    BadRequest,
    Conflict,
    DispatcherError,
    ErrorCode,
    RetryLater,
    Unavailable,
    UpstreamError,
)
from dispatcher.janitor import RoomJanitor
from dispatcher.lifecycle import EndReason, State, dispatch, fail_start
from dispatcher.logs import bind
from dispatcher.machines import BOT_COMMAND, BotSpec, MachineBackend, MachineRef, where
from dispatcher.pacing import Pacer
from dispatcher.pool import Pool
from dispatcher.rooms import RoomBackend, RoomPlan
from dispatcher.rooms.stock import RoomStock
from dispatcher.start import StartRequest
from dispatcher.store import PoolMachine, Session, Store
from dispatcher.store.room_stock import StockRoom
from dispatcher.supervisor import Supervisor
from dispatcher.telemetry import Telemetry

log = logging.getLogger(__name__)


class Starter:
    """Makes one session's room and machine; SessionService shields and keys the starts."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        machines: MachineBackend,
        rooms: Mapping[str, RoomBackend],
        supervisor: Supervisor,
        janitor: RoomJanitor,
        pacer: Pacer | None,
        telemetry: Telemetry,
        pool: Pool | None,
        room_pacer: Pacer | None = None,
        stock: RoomStock | None = None,
    ) -> None:
        self._settings = settings
        self._telemetry = telemetry
        self._store = store
        self._machines = machines
        self._rooms = rooms
        self._supervisor = supervisor
        self._janitor = janitor
        self._pacer = pacer
        # Daily room creates (their share of Daily's budget), shared like the machine creates.
        self._room_pacer = room_pacer
        self._pool = pool
        self._stock = stock

    async def stocked_room(self, request: StartRequest) -> StockRoom | None:
        """A room made ahead for this start (named as its session id), when it is a Daily start
        that sets no room properties of its own and the stock has one."""
        if self._stock is None or request.transport != "daily" or request.room_properties:
            return None
        return await self._stock.claim()

    async def put_back(self, room: StockRoom) -> None:
        """Return a room taken from the stock for a start that stored no session."""
        if self._stock is not None:
            await self._stock.put_back(room)

    async def start(
        self,
        principal: Principal,
        request: StartRequest,
        session_id: str,
        stocked: StockRoom | None = None,
    ) -> dict[str, Any]:
        """Start the session `session_id` in `stocked`, a room made ahead, if given (whose
        return when no session was stored is the caller's business)."""
        rooms = self._room_backend(request.transport)
        await rooms.open()
        pooled = None
        if self._pool is not None and request.transport in self._pool.transports:
            pooled = await self._pool.take(
                session_id, self._regions(request.region), request.body_json
            )
        # A cold create and a Daily room take their turns now: a full queue is refused
        # before anything is made, and a turn taken is given back.
        fly = self._pacer if pooled is None else None
        room = self._room_pacer if request.transport == "daily" and stocked is None else None
        taken: list[Pacer] = []
        try:
            delay = await fly.reserve() if fly else 0.0
            taken += [fly] if fly else []
            room_delay = await room.reserve() if room else 0.0
            taken += [room] if room else []
        except BaseException:
            with contextlib.suppress(Exception):
                await self._give_back(taken, pooled)
            raise
        try:
            return await self._create(
                principal, request, session_id, rooms, (delay, room_delay), pooled, stocked
            )
        except RetryLater:
            await self._give_back(taken, None)
            raise

    async def _give_back(self, pacers: list[Pacer], pooled: PoolMachine | None) -> None:
        """Undo the turns taken (and the pool machine claimed) for a start refused."""
        for pacer in pacers:
            await pacer.cancel()
        if pooled is not None and self._pool is not None:
            await self._pool.release(pooled)

    async def _create(
        self,
        principal: Principal,
        request: StartRequest,
        session_id: str,
        rooms: RoomBackend,
        delays: tuple[float, float],
        pooled: PoolMachine | None,
        stocked: StockRoom | None,
    ) -> dict[str, Any]:
        delay, room_delay = delays
        now = time.time()
        expires_at = now + self._settings.session_max_duration_s
        plan = rooms.plan(
            session_id,
            principal.user,
            expires_at,
            request.room_properties,
            request.token_properties,
            default_ice_servers=request.default_ice_servers,
            made_ahead_exp=stocked.exp if stocked is not None else None,
        )
        callback_token, callback_hash = new_callback_token()
        traceparent = self._telemetry.tracing.traceparent()
        bind(traceparent=traceparent)
        session = Session(
            id=session_id,
            user_id=principal.user,
            state=State.STARTING,
            transport=request.transport,
            dispatcher=self._settings.dispatcher_name,
            created_at=now,
            updated_at=now,
            expires_at=expires_at,
            room_name=plan.name or None,
            room_url=plan.url or None,
            room_expires_at=plan.expires_at if plan.name else None,
            callback_hash=callback_hash,
            traceparent=traceparent,
        )
        requested = {
            "user": principal.user,
            "transport": request.transport,
            "region": request.region,
            "traceparent": traceparent,
        }
        try:
            await self._store.create_session(
                session,
                max_sessions=self._settings.max_sessions,
                max_per_user=self._settings.max_sessions_per_user,
                events=[("requested", requested)],
            )
        except RetryLater:
            if pooled is not None and self._pool is not None:
                await self._pool.release(pooled)
            raise
        if pooled is not None and self._pool is not None:
            self._pool.notify(pooled)
        contract = rooms.bot_contract(plan)
        spec = BotSpec(
            session_id=session_id,
            user=principal.user,
            cmd=(*BOT_COMMAND, *contract.args),
            env={
                **bot_env(
                    self._settings, session_id, callback_token, request.body_json, traceparent
                ),
                **contract.env,
            },
            regions=self._regions(request.region),
        )
        made = _nothing() if plan.made_ahead else _after(room_delay, lambda: rooms.create(plan))
        room_done, launched = await asyncio.gather(
            made,
            self._launch(spec, delay, pooled),
            return_exceptions=True,
        )
        room_error = room_done if isinstance(room_done, BaseException) else None
        machine = launched if isinstance(launched, MachineRef) else None
        machine_error = launched if isinstance(launched, BaseException) else None
        if room_error or machine_error:
            await self._undo(session, plan, room_error, machine, machine_error)
            error = room_error or machine_error
            assert error is not None
            raise error
        assert machine is not None
        bind(machine_id=machine.id)
        span = trace.get_current_span()
        span.set_attribute("fly.machine.id", machine.id)
        span.set_attribute("session.pooled", machine.pooled)
        if machine.region:
            span.set_attribute("cloud.region", machine.region)
        room = {"room": plan.name} | ({"made_ahead": True} if plan.made_ahead else {})
        room_created = [("room_created", room)] if plan.name else []
        dispatched = await dispatch(
            self._store,
            session_id,
            machine_id=machine.id,
            region=machine.region,
            machine_version=machine.version,
            pooled=machine.pooled,
            events=room_created,
        )
        if dispatched is None:
            for kind, details in room_created:
                await self._store.record(session_id, kind, details)
            dispatched = await self._after_race(session_id, machine)
        log.info(
            "session dispatched to %s machine %s %s",
            "pool" if machine.pooled else "new",
            machine.id,
            where(machine),
        )
        self._supervisor.follow(dispatched)
        return {**rooms.answer(plan), "sessionId": session_id}

    async def _launch(self, spec: BotSpec, delay: float, pooled: PoolMachine | None) -> MachineRef:
        """Start the claimed pool machine (another if it fails), else create one once its turn
        under the create pacing comes."""
        while pooled is not None and self._pool is not None:
            try:
                return await self._pool.start(pooled)
            except Exception:
                pooled = await self._pool.take(
                    spec.session_id, spec.regions, spec.env["SESSION_BODY"]
                )
                if pooled is not None:
                    self._pool.notify(pooled)
                elif self._pacer is not None:
                    delay = await self._pacer.reserve(bounded=False)
        if delay > 0:
            await asyncio.sleep(delay)
        return await self._machines.launch(spec)

    async def _after_race(self, session_id: str, machine: MachineRef) -> Session:
        """The session left `starting` while its machine was created: a fast bot, or a DELETE."""
        await self._store.update(
            session_id,
            machine_id=machine.id,
            region=machine.region,
            machine_version=machine.version,
        )
        current = await self._store.get(session_id)
        assert current is not None
        if not current.active:
            # Failed by the reconciler meanwhile: the start took longer than START_TIMEOUT_S.
            await self._machines.destroy(machine)
            self._janitor.submit(current)
            raise Unavailable("the start took too long: retry", code=ErrorCode.START_INTERRUPTED)
        self._supervisor.follow(current)
        if current.end_reason == EndReason.DELETED:
            await self._machines.stop(machine, self._settings.bot_stop_timeout_s)
            raise Conflict(
                "the session was ended while it was starting", code=ErrorCode.SESSION_ENDED
            )
        return current

    async def _undo(
        self,
        session: Session,
        plan: RoomPlan,
        room_error: BaseException | None,
        machine: MachineRef | None,
        machine_error: BaseException | None,
    ) -> None:
        """Undo a start that failed half-way: destroy the machine, delete the room, fail it."""
        cleanups = []
        if machine is not None:
            cleanups.append(("machine_destroy", self._machines.destroy(machine)))
        elif _maybe_happened(machine_error):
            cleanups.append(("machine_cleanup", self._machines.cleanup(session.id)))
        if plan.name and (room_error is None or _maybe_happened(room_error)):
            self._janitor.submit(session)
        results = await asyncio.gather(*(c for _, c in cleanups), return_exceptions=True)
        for (what, _), result in zip(cleanups, results, strict=True):
            if isinstance(result, BaseException):
                log.warning("undo %s failed: %s", what, result)
                await record_failure(self._store, session.id, what, result)
        error = room_error or machine_error
        details = (
            error.details() if isinstance(error, UpstreamError) else {"error": type(error).__name__}
        )
        failed_on = "room" if room_error else "machine"
        reason = EndReason.ROOM_CREATE_FAILED if room_error else EndReason.MACHINE_CREATE_FAILED
        failed = await fail_start(self._store, session.id, reason, details)
        self._telemetry.session_ended(failed)
        log.warning("start failed on the %s: %s", failed_on, error)

    def _room_backend(self, transport: str) -> RoomBackend:
        rooms = self._rooms.get(transport)
        if rooms is None:
            available = ", ".join(self._rooms) or "none"
            raise BadRequest(
                f"transport {transport!r} is not available on this dispatcher (available: "
                f"{available}); daily sessions need DAILY_API_KEY, webrtc sessions the local "
                "machine backend",
                code=ErrorCode.TRANSPORT_UNAVAILABLE,
            )
        return rooms

    def _regions(self, requested: str | None) -> tuple[str, ...]:
        regions = self._settings.fly_regions
        if requested:
            return (requested, *(r for r in regions if r != requested))
        return regions


async def _after(delay: float, call: Callable[[], Awaitable[None]]) -> None:
    """`call()` once `delay` seconds have passed (a paced call's turn)."""
    if delay > 0:
        await asyncio.sleep(delay)
    await call()


async def _nothing() -> None:
    """No call (a room made ahead)."""


def _maybe_happened(error: BaseException | None) -> bool:
    """Whether a failed call may still have taken effect (or failed in a way we cannot tell)."""
    if error is None:
        return False
    if isinstance(error, DispatcherError):
        return bool(getattr(error, "ambiguous", False))
    return True

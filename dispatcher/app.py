"""The app: `create_app` puts the routes and the services together, and the lifespan that owns
every resource builds those services, runs the background loops and closes it all in order."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

import httpx
from starlette.applications import Starlette

from dispatcher.aio import cancel_and_wait
from dispatcher.auth import Authenticator
from dispatcher.callbacks import BotCallbacks
from dispatcher.clients import machine_backend, room_backends, upstreams
from dispatcher.config import Settings
from dispatcher.errors import DispatcherError
from dispatcher.http.context import Core, Services
from dispatcher.http.cors import cors_middleware
from dispatcher.http.errors import EXCEPTION_HANDLERS
from dispatcher.http.proxy import BotProxy
from dispatcher.http.routes import routes
from dispatcher.janitor import ROOM_DELETE_BURST, ROOM_DELETE_RATE, RoomJanitor
from dispatcher.lifecycle import EndReason
from dispatcher.machines import MachineBackend
from dispatcher.machines.fly import FlyMachines
from dispatcher.machines.local import LocalMachines
from dispatcher.metrics import Metrics
from dispatcher.pacing import Pacer
from dispatcher.pool import Pool
from dispatcher.ratelimit import StartLimiter
from dispatcher.readiness import Readiness
from dispatcher.reconciler import Reconciler
from dispatcher.rooms import RoomBackend
from dispatcher.rooms.daily import ROOM_CREATE_BURST, ROOM_CREATE_RATE, DailyRooms
from dispatcher.rooms.stock import RoomStock
from dispatcher.sessions import SessionService
from dispatcher.store import PoolRows, Store, StoreBucket
from dispatcher.supervisor import Supervisor
from dispatcher.telemetry import Telemetry, Tracing
from dispatcher.upstream import RetryPolicy
from dispatcher.webhooks import DailyWebhooks

log = logging.getLogger(__name__)

# How long an offer waits for a bot that is still booting (capped by READY_TIMEOUT_S).
BOOT_WAIT_S = 30.0
# Creates are spaced this fraction wider than 1/FLY_CREATE_RATE. A create reaches Fly some
# time after its turn, and that time varies (store writes, a new connection): paced at Fly's
# exact rate, a create that waited for its turn reaches Fly just before Fly's own bucket has
# refilled whenever it travels faster than the one before it, and gets a 429.
CREATE_PACING_SLACK = 0.1


def create_app(
    settings: Settings,
    *,
    store: Store | None = None,
    machines: MachineBackend | None = None,
    rooms: Mapping[str, RoomBackend] | None = None,
    retry: RetryPolicy | None = None,
    upstream_timeout_s: float = 15.0,
    tracing: Tracing | None = None,
) -> Starlette:
    """Build the dispatcher; backends not passed in are built from the settings in the lifespan.
    `tracing` makes the spans (off when not given); whoever made it shuts it down."""
    metrics = Metrics()
    tracing = tracing or Tracing()
    telemetry = Telemetry(metrics, tracing)
    # The app's own copy of the policy, telling this app's metrics of retries.
    retry = dataclasses.replace(retry or RetryPolicy(), on_retry=telemetry.upstream_retry)
    core = Core(settings, Authenticator(settings), metrics, tracing)
    lifespan = Lifespan(
        core,
        telemetry,
        retry,
        Backends(store, machines, rooms, upstream_timeout_s=upstream_timeout_s),
    )
    table = routes(settings)
    app = Starlette(
        routes=table,
        lifespan=lifespan.run,
        middleware=cors_middleware(settings.cors_origins, table),
        exception_handlers=EXCEPTION_HANDLERS,
    )
    app.state.core = core
    app.state.drain = lifespan.drain
    app.state.halt = lifespan.halt
    return app


@dataclasses.dataclass(frozen=True)
class Backends:
    """The backends a test passes in (the others are built from the settings), and timings."""

    store: Store | None
    machines: MachineBackend | None
    rooms: Mapping[str, RoomBackend] | None
    upstream_timeout_s: float = 15.0


class Lifespan:
    """Owns every resource: builds the services at start-up and closes them in order at
    shutdown; drains and halts the bots for the server (`app.state.drain`, `.halt`)."""

    def __init__(
        self, core: Core, telemetry: Telemetry, retry: RetryPolicy, backends: Backends
    ) -> None:
        self._core = core
        self._telemetry = telemetry
        self._retry = retry
        self._backends = backends
        self.services: Services | None = None

    @contextlib.asynccontextmanager
    async def run(self, app: Starlette) -> AsyncIterator[dict[str, Services]]:
        """Build the services (the lifespan state's `services`), run the loops, close it all."""
        settings, metrics, telemetry = self._core.settings, self._core.metrics, self._telemetry
        retry, upstream_timeout_s = self._retry, self._backends.upstream_timeout_s
        store, machines, rooms = self._backends.store, self._backends.machines, self._backends.rooms
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(self._core.auth.aclose)
            db = store or await Store.open(settings.database_url)
            if store is None:
                stack.push_async_callback(db.close)
            pacer = _pacer(settings, db)
            apis = await stack.enter_async_context(
                upstreams(settings, retry, timeout_s=upstream_timeout_s, telemetry=telemetry)
            )
            bots = machines or machine_backend(settings, apis, retry, pacer)
            stack.push_async_callback(bots.aclose)
            transports = rooms if rooms is not None else room_backends(settings, apis, retry)
            await _open(transports)
            janitor = RoomJanitor(db, transports, pacer=_daily_pacer(db, transports, "delete"))
            room_pacer = _daily_pacer(db, transports, "create", settings.create_queue_wait_s)
            stack.push_async_callback(janitor.aclose)
            pool = _pool(settings, db, bots, pacer, metrics)
            if pool is not None:
                stack.push_async_callback(pool.aclose)
            stock = _stock(settings, db, transports, room_pacer, janitor.pacer, metrics)
            supervisor = Supervisor(
                db,
                bots,
                janitor,
                settings,
                telemetry=telemetry,
                recycler=pool.recycling.recycle if pool is not None and pool.recycling.on else None,
            )
            stack.push_async_callback(supervisor.aclose)
            reconciler = Reconciler(
                db, bots, transports, supervisor, janitor, settings, telemetry, pool
            )
            stack.push_async_callback(reconciler.aclose)
            http = httpx.AsyncClient(trust_env=False)
            stack.push_async_callback(http.aclose)
            self.services = services = Services(
                settings=settings,
                service=SessionService(
                    settings,
                    db,
                    bots,
                    transports,
                    supervisor,
                    janitor,
                    pacer,
                    telemetry,
                    pool,
                    room_pacer=room_pacer,
                    stock=stock,
                ),
                callbacks=BotCallbacks(settings, db, transports, supervisor, telemetry, pool),
                readiness=_readiness(db, bots, transports),
                proxy=BotProxy(http, boot_wait_s=min(settings.ready_timeout_s, BOOT_WAIT_S)),
                reconciler=reconciler,
                limiter=StartLimiter(db, settings),
                machines=bots,
                supervisor=supervisor,
                webhooks=(
                    DailyWebhooks(settings, db, bots, supervisor)
                    if settings.daily_webhook_secret is not None
                    else None
                ),
            )
            metrics.watch(
                db,
                settings.dispatcher_name,
                create_queue=lambda: pacer.waiting if pacer else 0,
                room_delete_queue=lambda: janitor.queued,
                paced={
                    name: p
                    for name, p in (
                        ("fly_create", pacer),
                        ("daily_room_create", room_pacer),
                        ("daily_room_delete", janitor.pacer if "daily" in transports else None),
                    )
                    if p is not None
                },
                leader=lambda: reconciler.leader,
                pool=_pool_states(pool) if pool is not None else None,
                room_stock=stock.available if stock is not None else None,
            )
            loop_task = asyncio.create_task(reconciler.run(), name="reconciler")
            stack.push_async_callback(cancel_and_wait, loop_task)
            # The follow: timers here, and the watch of machines on the reconciler's leader.
            follow_task = asyncio.create_task(
                supervisor.run(lambda: reconciler.leader), name="follow"
            )
            stack.push_async_callback(cancel_and_wait, follow_task)
            if pool is not None:
                pool_task = asyncio.create_task(pool.run(lambda: reconciler.leader), name="pool")
                stack.push_async_callback(cancel_and_wait, pool_task)
            if stock is not None:
                stock_task = asyncio.create_task(
                    stock.run(lambda: reconciler.leader), name="room stock"
                )
                stack.push_async_callback(cancel_and_wait, stock_task)
            log.info(
                "dispatcher ready: machines=%s transports=%s auth=%s store=%s",
                bots.name,
                ",".join(transports) or "none",
                settings.auth,
                db.dialect,
            )
            yield {"services": services}
            log.info("dispatcher stopping: %d sessions watched", supervisor.watching)
        log.info("dispatcher stopped")

    async def drain(self) -> bool:
        """Stop taking starts and let those in flight finish, within DRAIN_TIMEOUT_S; then, for
        bots that cannot outlive the dispatcher (local processes), end their sessions while
        it still serves their `ended` callbacks."""
        s = self.services
        if s is None:
            return True
        log.info(
            "draining: %d starts in flight, up to %.0f s",
            s.service.starts_in_flight,
            s.settings.drain_timeout_s,
        )
        finished = await s.service.drain(s.settings.drain_timeout_s)
        if not finished:
            log.warning("drain time is up with starts in flight: the reconciler will finish them")
        if s.machines.bots_outlive_dispatcher or not s.supervisor.watching:
            return finished
        live = s.supervisor.watching
        log.info(
            "ending %d session%s: local bots stop with this dispatcher", live, "s"[live == 1 :]
        )
        try:
            if not await s.supervisor.end_all(EndReason.DISPATCHER_STOPPED):
                log.warning("bots still running after their stop: they are killed")
        except Exception:
            log.exception("ending the sessions failed: their bots are stopped as it exits")
        return finished

    def halt(self) -> None:
        """Kill at once the bots that cannot outlive the dispatcher (it stops with no drain)."""
        if self.services is not None:
            self.services.machines.kill_all()


def _pacer(settings: Settings, db: Store) -> Pacer | None:
    """The pacing of machine creates (fly only), a little under Fly's own rate, in the store:
    one bucket per bot app, shared by every instance on the database."""
    if settings.machine_backend != "fly":
        return None
    return Pacer(
        settings.fly_create_rate / (1 + CREATE_PACING_SLACK),
        settings.fly_create_burst,
        max_wait_s=settings.create_queue_wait_s,
        what="machine creates",
        bucket=StoreBucket(db, f"pace:fly-create:{settings.fly_bot_app}"),
    )


def _daily_pacer(
    db: Store, transports: Mapping[str, RoomBackend], call: str, max_wait_s: float = math.inf
) -> Pacer | None:
    """The pacing of Daily room creates or deletes (`call`), in the store: one bucket per
    Daily domain (learnt when Daily first answers), shared by every instance on the database."""
    daily = transports.get("daily")
    if daily is None:
        return None

    def key() -> str:
        domain = daily.domain.name if isinstance(daily, DailyRooms) else "daily"
        return f"pace:daily-room-{call}:{domain}"

    if call == "create":
        rate, burst = ROOM_CREATE_RATE, ROOM_CREATE_BURST
    else:
        rate, burst = ROOM_DELETE_RATE, ROOM_DELETE_BURST
    return Pacer(
        rate, burst, max_wait_s=max_wait_s, what=f"room {call}s", bucket=StoreBucket(db, key)
    )


def _stock(
    settings: Settings,
    db: Store,
    transports: Mapping[str, RoomBackend],
    create_pacer: Pacer | None,
    delete_pacer: Pacer,
    metrics: Metrics,
) -> RoomStock | None:
    """The Daily room stock, when DAILY_ROOM_STOCK asks for one."""
    daily = transports.get("daily")
    if not settings.daily_room_stock or not isinstance(daily, DailyRooms):
        return None
    return RoomStock(
        db,
        settings.dispatcher_name,
        daily,
        size=settings.daily_room_stock,
        session_max_s=settings.session_max_duration_s,
        create_pacer=create_pacer,
        delete_pacer=delete_pacer,
        metrics=metrics,
    )


async def _open(transports: Mapping[str, RoomBackend]) -> None:
    """Open each room backend; one that is not reachable yet is tried again on the next start."""
    for name, backend in transports.items():
        try:
            await backend.open()
        except DispatcherError as exc:
            log.warning(
                "%s is not reachable at start-up (%s): tried again on the next start",
                name,
                exc.detail,
            )


def _pool(
    settings: Settings, db: Store, bots: MachineBackend, pacer: Pacer | None, metrics: Metrics
) -> Pool | None:
    """The warm pool, with POOL_SIZE: Fly machines (daily sessions), or local bot processes
    (every transport offered; counted against MAX_SESSIONS with the host's sessions)."""
    if not settings.pool_size or not isinstance(bots, FlyMachines | LocalMachines):
        return None
    assert settings.dispatcher_url is not None
    local = isinstance(bots, LocalMachines)
    return Pool(
        PoolRows(db, settings.dispatcher_name),
        bots,
        settings,
        pacer,
        metrics,
        dispatcher_url=settings.dispatcher_url,
        transports=settings.transports if local else ("daily",),
        capacity=db if local else None,
    )


def _readiness(db: Store, bots: MachineBackend, transports: Mapping[str, RoomBackend]) -> Readiness:
    """The checks of `/readyz`: the store, the machine backend, and Daily when configured."""
    checks: dict[str, Callable[[], Awaitable[None]]] = {
        "store": db.ping,
        "machines": bots.check,
    }
    if "daily" in transports:
        checks["rooms"] = transports["daily"].check
    return Readiness(checks)


def _pool_states(pool: Pool) -> Callable[[], Awaitable[list[tuple[str, str]]]]:
    async def states() -> list[tuple[str, str]]:
        return [(row.region, row.state) for row in await pool.status()]

    return states

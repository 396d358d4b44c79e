"""The HTTP app: routes, JSON errors, and the lifespan that owns every resource."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from dispatcher.auth import Authenticator, bearer_token
from dispatcher.callbacks import BotCallbacks
from dispatcher.config import Settings
from dispatcher.cors import cors_middleware
from dispatcher.daily_api import DailyAPI
from dispatcher.errors import (
    BadRequest,
    DispatcherError,
    NotFound,
    Unavailable,
    error_body,
    http_status,
)
from dispatcher.fly_api import FlyAPI
from dispatcher.http_input import read_body, read_json_object, whole_number
from dispatcher.idempotency import Idempotency
from dispatcher.janitor import RoomJanitor
from dispatcher.lifecycle import EndReason
from dispatcher.logs import session_context
from dispatcher.machines import MachineBackend
from dispatcher.machines.fly import FlyMachines
from dispatcher.machines.local import LocalMachines
from dispatcher.metrics import CONTENT_TYPE, Metrics
from dispatcher.openapi import openapi_document
from dispatcher.pacing import Pacer
from dispatcher.pool import Pool
from dispatcher.proxy import MAX_PROXY_BODY_BYTES, METHODS, BotProxy, check_path
from dispatcher.ratelimit import StartLimiter, client_address
from dispatcher.reconciler import Reconciler
from dispatcher.rooms import RoomBackend
from dispatcher.rooms.daily import DailyRooms
from dispatcher.rooms.webrtc import WebRTCRooms
from dispatcher.sessions import SessionService
from dispatcher.start import MAX_BODY_BYTES, parse_start
from dispatcher.store import ACTIVE_STATES, TERMINAL_STATES, PoolRows, Store
from dispatcher.supervisor import Supervisor
from dispatcher.telemetry import Telemetry, Tracing
from dispatcher.upstream import RetryPolicy
from dispatcher.webhooks import MAX_WEBHOOK_BYTES, DailyWebhooks

log = logging.getLogger(__name__)

MAX_CALLBACK_BYTES = 4096
# An ended report carries the bot's error (cut to 1000 characters once read): room for a much
# longer one, escaped, so that a bot never loses its report to a long message.
MAX_ENDED_BYTES = 64 * 1024
MAX_LIST_LIMIT = 1000
DEFAULT_LIST_LIMIT = 100
SESSION_STATES = (*ACTIVE_STATES, *TERMINAL_STATES)
MAX_IDEMPOTENCY_KEY = 255
READINESS_TTL_S = 5.0
READINESS_TIMEOUT_S = 5.0
# How long an offer waits for a bot that is still booting (capped by READY_TIMEOUT_S).
BOOT_WAIT_S = 30.0
# Creates are spaced this fraction wider than 1/FLY_CREATE_RATE. A create reaches Fly some
# time after its turn, and that time varies (store writes, a new connection): paced at Fly's
# exact rate, a create that waited for its turn reaches Fly just before Fly's own bucket has
# refilled whenever it travels faster than the one before it, and gets a 429.
CREATE_PACING_SLACK = 0.1
# The web page served at `/` in local mode (built from web/, committed).
WEB_DIR = Path(__file__).parent / "web"


@dataclass
class Services:
    """What the lifespan built and the handlers use."""

    settings: Settings
    service: SessionService
    callbacks: BotCallbacks
    readiness: Readiness
    proxy: BotProxy
    reconciler: Reconciler
    limiter: StartLimiter
    machines: MachineBackend
    supervisor: Supervisor
    webhooks: DailyWebhooks | None = None


class Readiness:
    """Whether every backend answers, checked at most every few seconds."""

    def __init__(self, checks: dict[str, Callable[[], Awaitable[None]]]) -> None:
        self._checks = checks
        self._at = 0.0
        self._result: dict[str, str] = {}
        self._lock = asyncio.Lock()

    async def status(self) -> dict[str, str]:
        """`ok` or the error of each backend."""
        async with self._lock:
            if time.monotonic() - self._at > READINESS_TTL_S:
                names = list(self._checks)
                results = await asyncio.gather(
                    *(asyncio.wait_for(self._checks[n](), READINESS_TIMEOUT_S) for n in names),
                    return_exceptions=True,
                )
                self._result = {
                    name: "ok" if not isinstance(r, BaseException) else _describe(r)
                    for name, r in zip(names, results, strict=True)
                }
                self._at = time.monotonic()
            return dict(self._result)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, DispatcherError):
        return exc.detail
    return type(exc).__name__


def create_app(
    settings: Settings,
    *,
    store: Store | None = None,
    machines: MachineBackend | None = None,
    rooms: Mapping[str, RoomBackend] | None = None,
    retry: RetryPolicy | None = None,
    poll_s: float = 5.0,
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
    auth = Authenticator(settings)
    holder: dict[str, Services] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(auth.aclose)
            db = store or await Store.open(settings.database_url)
            if store is None:
                stack.push_async_callback(db.close)
            pacer = (
                Pacer(
                    settings.fly_create_rate / (1 + CREATE_PACING_SLACK),
                    settings.fly_create_burst,
                    max_wait_s=settings.create_queue_wait_s,
                    what="machine creates",
                )
                if settings.machine_backend == "fly"
                else None
            )
            bots = machines or _machine_backend(
                settings, retry, upstream_timeout_s, stack, pacer, telemetry
            )
            stack.push_async_callback(bots.aclose)
            transports = (
                rooms
                if rooms is not None
                else _room_backends(settings, retry, upstream_timeout_s, stack, telemetry)
            )
            for name, backend in transports.items():
                try:
                    await backend.open()
                except DispatcherError as exc:
                    log.warning(
                        "%s is not reachable at start-up (%s): tried again on the next start",
                        name,
                        exc.detail,
                    )
            janitor = RoomJanitor(db, transports)
            stack.push_async_callback(janitor.aclose)
            pool = None
            if settings.pool_size and isinstance(bots, FlyMachines):
                assert settings.dispatcher_url is not None
                pool = Pool(
                    PoolRows(db, settings.dispatcher_name),
                    bots,
                    settings,
                    pacer,
                    metrics,
                    dispatcher_url=settings.dispatcher_url,
                )
                stack.push_async_callback(pool.aclose)
            supervisor = Supervisor(db, bots, janitor, settings, poll_s=poll_s, telemetry=telemetry)
            stack.push_async_callback(supervisor.aclose)
            reconciler = Reconciler(
                db, bots, transports, supervisor, janitor, settings, telemetry, pool
            )
            stack.push_async_callback(reconciler.aclose)
            checks: dict[str, Callable[[], Awaitable[None]]] = {
                "store": db.ping,
                "machines": bots.check,
            }
            if "daily" in transports:
                checks["rooms"] = transports["daily"].check
            http = httpx.AsyncClient(trust_env=False)
            stack.push_async_callback(http.aclose)
            holder["s"] = Services(
                settings=settings,
                service=SessionService(
                    settings, db, bots, transports, supervisor, janitor, pacer, telemetry, pool
                ),
                callbacks=BotCallbacks(settings, db, transports, supervisor, telemetry, pool),
                readiness=Readiness(checks),
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
                create_queue=lambda: pacer.queued if pacer else 0,
                room_delete_queue=lambda: janitor.queued,
                leader=lambda: reconciler.leader,
                pool=_pool_states(pool) if pool is not None else None,
            )
            loop_task = asyncio.create_task(reconciler.run(), name="reconciler")
            stack.push_async_callback(_cancel, loop_task)
            if pool is not None:
                pool_task = asyncio.create_task(pool.run(lambda: reconciler.leader), name="pool")
                stack.push_async_callback(_cancel, pool_task)
            log.info(
                "dispatcher ready: machines=%s transports=%s auth=%s store=%s",
                bots.name,
                ",".join(transports) or "none",
                settings.auth,
                db.dialect,
            )
            yield
            log.info("dispatcher stopping: %d sessions watched", supervisor.watching)
        log.info("dispatcher stopped")

    def services() -> Services:
        return holder["s"]

    async def start(request: Request) -> Response:
        """`POST /start`, and the same at Pipecat Cloud's path (any agent name: one dispatcher
        runs one bot); one span name for both, `http.route` telling which."""
        began = time.monotonic()
        route = PIPECAT_CLOUD_START if "agent" in request.path_params else "/start"
        attributes = {**START_SPAN, "http.route": route}
        with tracing.span("POST /start", kind=SpanKind.SERVER, attributes=attributes) as span:
            try:
                answer = await start_session(request)
            except DispatcherError as exc:
                metrics.start_failed(exc.code)
                _outcome(span, http_status(exc), exc.code)
                raise
            except Exception:
                metrics.start_failed("internal-error")
                _outcome(span, 500, "internal-error")
                raise
            metrics.started(time.monotonic() - began)
            _outcome(span, 200, "dispatched")
            return JSONResponse(answer)

    async def start_session(request: Request) -> dict[str, Any]:
        principal = await auth.authenticate(request.headers)
        if settings.auth == "none" and settings.machine_backend == "fly":
            # Every unauthenticated start boots a paid VM: say so each time, not only once.
            log.warning("unauthenticated start (DISPATCHER_AUTH=none): anyone can boot VMs")
        s = services()
        raw = await read_body(request, MAX_BODY_BYTES)
        start_request = parse_start(
            raw,
            default_transport=settings.default_transport,
            regions=settings.fly_regions,
            roomless_transport=settings.roomless_transport,
        )
        idempotency = idempotency_of(request.headers.get("idempotency-key"), raw)
        peer = request.client.host if request.client else None
        address = client_address(peer, request.headers, trust_proxy=settings.trust_proxy_headers)
        await s.limiter.check(principal.user, address)
        return await s.service.start(principal, start_request, idempotency)

    async def list_sessions(request: Request) -> Response:
        principal = await auth.authenticate(request.headers)
        query = request.query_params
        state = query.get("state") or None
        if state is not None and state not in SESSION_STATES:
            raise BadRequest(
                f"state must be one of {', '.join(SESSION_STATES)}", code="invalid-state"
            )
        limit = whole_number(
            query.get("limit"),
            name="limit",
            minimum=1,
            maximum=MAX_LIST_LIMIT,
            default=DEFAULT_LIST_LIMIT,
            code="invalid-limit",
        )
        user = query.get("user") or None
        if user is not None and len(user) > 256:
            raise BadRequest("user is at most 256 characters", code="invalid-user")
        found = await services().service.list_sessions(
            principal, state=state, user=user, limit=limit
        )
        return JSONResponse({"sessions": [s.public() for s in found]})

    async def get_session(request: Request) -> Response:
        principal = await auth.authenticate(request.headers)
        session = await services().service.get(principal, request.path_params["session_id"])
        return JSONResponse(session.public())

    async def delete_session(request: Request) -> Response:
        principal = await auth.authenticate(request.headers)
        session = await services().service.end(principal, request.path_params["session_id"])
        return JSONResponse(session.public(), status_code=202)

    def internal_only(request: Request) -> None:
        """With INTERNAL_PORT set, bot callbacks answer only on that (private) listener."""
        server = request.scope.get("server")
        if settings.internal_port is not None and (
            server is None or server[1] != settings.internal_port
        ):
            raise NotFound("not found", code="not-found")

    async def bot_ready(request: Request) -> Response:
        internal_only(request)
        await read_json_object(request, MAX_CALLBACK_BYTES)
        await services().callbacks.bot_ready(
            request.path_params["session_id"], bearer_token(request.headers)
        )
        return JSONResponse({"ok": True})

    async def assignment(request: Request) -> Response:
        internal_only(request)
        wait = whole_number(
            request.query_params.get("wait"),
            name="wait (seconds)",
            minimum=0,
            maximum=ASSIGNMENT_WAIT_S,
            default=ASSIGNMENT_WAIT_S,
            code="invalid-wait",
        )
        answer = await services().callbacks.assignment(
            request.path_params["machine_id"], bearer_token(request.headers), float(wait)
        )
        if answer is None:
            return Response(status_code=204)
        return JSONResponse(answer, headers={"Cache-Control": "no-store"})

    async def bot_ended(request: Request) -> Response:
        internal_only(request)
        data = await read_json_object(request, MAX_ENDED_BYTES)
        await services().callbacks.bot_ended(
            request.path_params["session_id"],
            bearer_token(request.headers),
            data.get("reason"),
            data.get("exit_code"),
            data.get("error"),
        )
        return JSONResponse({"ok": True})

    async def proxy(request: Request) -> Response:
        principal = await auth.authenticate(request.headers)
        path = check_path(request.path_params["path"])
        s = services()
        session_id = request.path_params["session_id"]
        address = await s.service.bot_address(principal, session_id)
        body = await read_body(request, MAX_PROXY_BODY_BYTES)
        with session_context(session_id):
            answer = await s.proxy.forward(
                session_id,
                address,
                request.method,
                path,
                request.url.query,
                dict(request.headers),
                body,
            )
        return Response(answer.body, answer.status, media_type=answer.content_type)

    async def page(request: Request) -> Response:
        return FileResponse(WEB_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    async def healthz(request: Request) -> Response:
        s = holder.get("s")
        return JSONResponse(
            {
                "status": "ok",
                "instance": settings.instance_id,
                "draining": bool(s and s.service.draining),
                "reconciler": "leader" if s and s.reconciler.leader else "standby",
            }
        )

    async def readyz(request: Request) -> Response:
        s = services()
        if s.service.draining:
            body = error_body(Unavailable("this dispatcher is draining", code="draining"))
            return JSONResponse({**body, "checks": {}}, status_code=503)
        checks = await s.readiness.status()
        if all(v == "ok" for v in checks.values()):
            return JSONResponse({"status": "ready", "checks": checks})
        body = error_body(Unavailable("a backend is unreachable", code="backend-unavailable"))
        return JSONResponse({**body, "checks": checks}, status_code=503)

    async def metrics_page(request: Request) -> Response:
        internal_only(request)
        return Response(await metrics.render(), media_type=CONTENT_TYPE)

    async def openapi(request: Request) -> Response:
        return JSONResponse(openapi_document(settings))

    async def daily_webhook(request: Request) -> Response:
        webhooks = services().webhooks
        assert webhooks is not None
        raw = await read_body(request, MAX_WEBHOOK_BYTES)
        return JSONResponse(await webhooks.receive(request.headers, raw))

    routes: list[BaseRoute] = [
        Route("/start", start, methods=["POST"]),
        Route(PIPECAT_CLOUD_START, start, methods=["POST"]),
        Route("/sessions", list_sessions, methods=["GET"]),
        Route("/sessions/{session_id}", get_session, methods=["GET"]),
        Route("/sessions/{session_id}", delete_session, methods=["DELETE"]),
        Route("/sessions/{session_id}/{path:path}", proxy, methods=list(METHODS)),
        Route("/internal/sessions/{session_id}/ready", bot_ready, methods=["POST"]),
        Route("/internal/sessions/{session_id}/ended", bot_ended, methods=["POST"]),
        Route("/internal/machines/{machine_id}/assignment", assignment, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/metrics", metrics_page, methods=["GET"]),
    ]
    if settings.machine_backend == "local":
        routes += [
            Route("/", page, methods=["GET"]),
            Mount("/web", StaticFiles(directory=WEB_DIR, check_dir=False), name="web"),
        ]
    if settings.daily_webhook_secret is not None:
        # Daily's public listener, verified by HMAC; without the secret webhooks are off (404).
        routes.append(Route("/webhooks/daily", daily_webhook, methods=["POST"]))

    async def drain() -> bool:
        """Stop taking starts and let those in flight finish, within DRAIN_TIMEOUT_S; then, for
        bots that cannot outlive the dispatcher (local processes), end their sessions while
        it still serves their `ended` callbacks."""
        s = holder.get("s")
        if s is None:
            return True
        log.info(
            "draining: %d starts in flight, up to %.0f s",
            s.service.starts_in_flight,
            settings.drain_timeout_s,
        )
        finished = await s.service.drain(settings.drain_timeout_s)
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

    def halt() -> None:
        """Kill at once the bots that cannot outlive the dispatcher (it stops with no drain)."""
        s = holder.get("s")
        if s is not None:
            s.machines.kill_all()

    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        middleware=cors_middleware(settings.cors_origins, routes),
        exception_handlers={
            DispatcherError: _dispatcher_error,
            HTTPException: _http_error,
            Exception: _unexpected_error,
        },
    )
    app.state.drain = drain
    app.state.halt = halt
    return app


def idempotency_of(header: str | None, raw: bytes) -> Idempotency | None:
    """The Idempotency-Key of a start (1-255 visible ASCII characters), with the body's hash."""
    if header is None:
        return None
    key = header.strip()
    if not key or len(key) > MAX_IDEMPOTENCY_KEY or not key.isascii() or not key.isprintable():
        raise BadRequest(
            f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII characters",
            code="invalid-idempotency-key",
        )
    return Idempotency(key, hashlib.sha256(raw).hexdigest())


# The longest a pool machine's assignment request is held before a 204 (ask again).
ASSIGNMENT_WAIT_S = 25


def _pool_states(pool: Pool) -> Callable[[], Awaitable[list[tuple[str, str]]]]:
    async def states() -> list[tuple[str, str]]:
        return [(row.region, row.state) for row in await pool.status()]

    return states


START_SPAN = {"http.request.method": "POST", "http.route": "/start"}
# Where the pipecatcloud SDK posts a start (`PIPECAT_API_HOST` + this): the same start.
PIPECAT_CLOUD_START = "/v1/public/{agent}/start"


def _outcome(span: Span, status: int, outcome: str) -> None:
    """How a /start ended, on its span: the status, and `dispatched` or the error code."""
    span.set_attribute("http.response.status_code", status)
    span.set_attribute("session.outcome", outcome)
    if status >= 500:
        span.set_status(Status(StatusCode.ERROR, outcome))


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _dispatcher_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, DispatcherError)
    status = http_status(exc)
    if status >= 500:
        log.warning("%s %s -> %s: %s", request.method, request.url.path, status, exc.detail)
    return JSONResponse(error_body(exc), status_code=status, headers=exc.headers())


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "http-error")
    return JSONResponse(
        error_body(DispatcherError(str(exc.detail), code=code)),
        status_code=exc.status_code,
        headers=exc.headers,
    )


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return JSONResponse(error_body(DispatcherError("internal error")), status_code=500)


def _machine_backend(
    settings: Settings,
    retry: RetryPolicy,
    timeout_s: float,
    stack: contextlib.AsyncExitStack,
    pacer: Pacer | None,
    telemetry: Telemetry,
) -> MachineBackend:
    if settings.machine_backend == "local":
        return LocalMachines(
            bot_dir=settings.local_bot_dir, stop_grace_s=settings.bot_stop_timeout_s
        )
    assert settings.fly_api_token is not None and settings.fly_bot_app is not None
    http = FlyAPI.client(
        settings.fly_api_base_url, settings.fly_api_token.reveal(), timeout_s=timeout_s
    )
    stack.push_async_callback(http.aclose)
    api = FlyAPI(http, settings.fly_bot_app, retry, telemetry)
    return FlyMachines(api, settings, retry, pacer)


def _room_backends(
    settings: Settings,
    retry: RetryPolicy,
    timeout_s: float,
    stack: contextlib.AsyncExitStack,
    telemetry: Telemetry,
) -> dict[str, RoomBackend]:
    backends: dict[str, RoomBackend] = {}
    for transport in settings.transports:
        if transport == "daily":
            assert settings.daily_api_key is not None
            http = DailyAPI.client(
                settings.daily_api_url, settings.daily_api_key.reveal(), timeout_s=timeout_s
            )
            stack.push_async_callback(http.aclose)
            backends[transport] = DailyRooms(
                DailyAPI(http, retry, telemetry), settings.daily_api_key, retry
            )
        else:
            backends[transport] = WebRTCRooms(settings.ice_servers, settings.default_ice_servers)
    return backends

"""The HTTP app: routes, JSON errors, and the lifespan that owns every resource."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from dispatcher.auth import Authenticator, bearer_token
from dispatcher.config import Settings
from dispatcher.daily_api import DailyAPI
from dispatcher.errors import (
    BadRequest,
    DispatcherError,
    PayloadTooLarge,
    Unavailable,
    error_body,
    http_status,
)
from dispatcher.fly_api import FlyAPI
from dispatcher.machines import MachineBackend
from dispatcher.machines.fly import FlyMachines
from dispatcher.machines.local import LocalMachines
from dispatcher.rooms import RoomBackend
from dispatcher.rooms.daily import DailyRooms
from dispatcher.sessions import SessionService
from dispatcher.start import MAX_BODY_BYTES, parse_start
from dispatcher.store import Store
from dispatcher.supervisor import Supervisor
from dispatcher.upstream import RetryPolicy

log = logging.getLogger(__name__)

MAX_CALLBACK_BYTES = 4096
READINESS_TTL_S = 5.0
READINESS_TIMEOUT_S = 5.0


@dataclass
class Services:
    """What the lifespan built and the handlers use."""

    settings: Settings
    service: SessionService
    readiness: Readiness


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
    rooms: RoomBackend | None = None,
    retry: RetryPolicy | None = None,
    poll_s: float = 5.0,
    upstream_timeout_s: float = 15.0,
) -> Starlette:
    """Build the dispatcher; backends not passed in are built from the settings in the lifespan."""
    retry = retry or RetryPolicy()
    auth = Authenticator(settings)
    holder: dict[str, Services] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            db = store or await Store.open(settings.database_url)
            if store is None:
                stack.push_async_callback(db.close)
            bots = machines or _machine_backend(settings, retry, upstream_timeout_s, stack)
            stack.push_async_callback(bots.aclose)
            room_backend = (
                rooms
                if rooms is not None
                else _room_backend(settings, retry, upstream_timeout_s, stack)
            )
            if room_backend is not None:
                await room_backend.open()
            else:
                log.warning(
                    "no room backend: DAILY_API_KEY is not set, so POST /start answers 400 "
                    "transport-unavailable (the local webrtc transport is not built yet)"
                )
            supervisor = Supervisor(db, bots, room_backend, settings, poll_s=poll_s)
            stack.push_async_callback(supervisor.aclose)
            checks: dict[str, Callable[[], Awaitable[None]]] = {
                "store": db.ping,
                "machines": bots.check,
            }
            if room_backend is not None:
                checks["rooms"] = room_backend.check
            holder["s"] = Services(
                settings=settings,
                service=SessionService(settings, db, bots, room_backend, supervisor),
                readiness=Readiness(checks),
            )
            await supervisor.resume()
            log.info(
                "dispatcher ready: machines=%s rooms=%s auth=%s store=%s",
                bots.name,
                room_backend.transport if room_backend else "none",
                settings.auth,
                db.dialect,
            )
            yield
            log.info("dispatcher stopping: %d sessions watched", supervisor.watching)
        log.info("dispatcher stopped")

    def services() -> Services:
        return holder["s"]

    async def start(request: Request) -> Response:
        principal = auth.authenticate(request.headers)
        s = services()
        raw = await read_body(request, MAX_BODY_BYTES)
        default_transport = "daily" if settings.room_backend == "daily" else "webrtc"
        start_request = parse_start(
            raw, default_transport=default_transport, regions=settings.fly_regions
        )
        return JSONResponse(await s.service.start(principal, start_request))

    async def get_session(request: Request) -> Response:
        principal = auth.authenticate(request.headers)
        session = await services().service.get(principal, request.path_params["session_id"])
        return JSONResponse(session.public())

    async def delete_session(request: Request) -> Response:
        principal = auth.authenticate(request.headers)
        session = await services().service.end(principal, request.path_params["session_id"])
        return JSONResponse(session.public(), status_code=202)

    async def bot_ready(request: Request) -> Response:
        await read_body(request, MAX_CALLBACK_BYTES)
        await services().service.bot_ready(
            request.path_params["session_id"], bearer_token(request.headers)
        )
        return JSONResponse({"ok": True})

    async def bot_ended(request: Request) -> Response:
        raw = await read_body(request, MAX_CALLBACK_BYTES)
        try:
            data = json.loads(raw or b"{}")
        except ValueError:
            raise BadRequest("body is not valid JSON", code="invalid-json") from None
        if not isinstance(data, dict):
            raise BadRequest("body must be a JSON object", code="invalid-json")
        await services().service.bot_ended(
            request.path_params["session_id"],
            bearer_token(request.headers),
            data.get("reason"),
            data.get("exit_code"),
        )
        return JSONResponse({"ok": True})

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        checks = await services().readiness.status()
        if all(v == "ok" for v in checks.values()):
            return JSONResponse({"status": "ready", "checks": checks})
        body = error_body(Unavailable("a backend is unreachable", code="backend-unavailable"))
        return JSONResponse({**body, "checks": checks}, status_code=503)

    routes = [
        Route("/start", start, methods=["POST"]),
        Route("/sessions/{session_id}", get_session, methods=["GET"]),
        Route("/sessions/{session_id}", delete_session, methods=["DELETE"]),
        Route("/internal/sessions/{session_id}/ready", bot_ready, methods=["POST"]),
        Route("/internal/sessions/{session_id}/ended", bot_ended, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
    ]
    return Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            DispatcherError: _dispatcher_error,
            HTTPException: _http_error,
            Exception: _unexpected_error,
        },
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) anything over `limit` bytes before reading it all."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body is over {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body is over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


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
        {"detail": str(exc.detail), "code": code},
        status_code=exc.status_code,
        headers=exc.headers,
    )


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"detail": "internal error", "code": "internal-error"}, status_code=500)


def _machine_backend(
    settings: Settings, retry: RetryPolicy, timeout_s: float, stack: contextlib.AsyncExitStack
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
    return FlyMachines(FlyAPI(http, settings.fly_bot_app, retry), settings, retry)


def _room_backend(
    settings: Settings, retry: RetryPolicy, timeout_s: float, stack: contextlib.AsyncExitStack
) -> RoomBackend | None:
    if settings.daily_api_key is None:
        return None
    http = DailyAPI.client(
        settings.daily_api_url, settings.daily_api_key.reveal(), timeout_s=timeout_s
    )
    stack.push_async_callback(http.aclose)
    return DailyRooms(DailyAPI(http, retry), settings.daily_api_key, retry)

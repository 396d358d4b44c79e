"""The emulator's app: routes, auth, rate limits, faults, latency and control endpoints."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import math
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from http import HTTPStatus
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from testkit.fakes.common import (
    DropConnections,
    DroppedConnection,
    Fault,
    FaultPlan,
    Latency,
    RateLimiter,
    control_routes,
)
from testkit.fakes.fly.errors import ApiError, ApiRequest, OutageBegan, _bad_request, _not_found
from testkit.fakes.fly.handlers import MachineHandlers
from testkit.fakes.fly.light import LightProcess
from testkit.fakes.fly.machine import MachineRecord, ulid
from testkit.fakes.fly.openapi import OpenAPIRequests, SpecViolation
from testkit.fakes.fly.runtime import EXIT_EVENT_SHAPES, _kill_group

DEFAULT_LIMITS: dict[str, tuple[float, int]] = {
    "create": (1.0, 3),
    "list": (1.0, 3),
    "get": (5.0, 10),
    "wait": (1.0, 3),
    "stop": (1.0, 3),
    "start": (1.0, 3),
    "suspend": (1.0, 3),
    "destroy": (1.0, 3),
    "update": (1.0, 3),
    "events": (1.0, 3),
    "metadata": (1.0, 3),
}
"""(requests a second, burst) per action: create and list per app, the rest per machine.

Reference §6: "1 request, per second, per action, burst 3", scoped per machine ID for start,
stop, suspend, wait and destroy ([inf]), so starts of distinct machines never contend. A resume
is a `start` call and shares the machine's start bucket.
"""


@functools.cache
def _openapi() -> OpenAPIRequests:
    """Fly's OpenAPI document, read once per process."""
    return OpenAPIRequests()


DEFAULT_TOKEN = "test-token"
DEFAULT_APP = "bots"
APP_SCOPED_LIMITS = frozenset({"create", "list"})


class _EmulatorApp(Starlette):
    """Starlette, plus a `fly-request-id` on every answer."""

    def build_middleware_stack(self) -> ASGIApp:
        inner = super().build_middleware_stack()

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await inner(scope, receive, send)
                return
            request_id = ulid().lower().encode()

            async def send_with_id(message: Message) -> None:
                if message["type"] == "http.response.start":
                    headers = [*message.get("headers", []), (b"fly-request-id", request_id)]
                    message = {**message, "headers": headers}
                await send(message)

            await inner(scope, receive, send_with_id)

        return app


Handler = Callable[[Request, Any], Awaitable[Response]]


class FlyEmulator(MachineHandlers):
    """The Fly Machines API for one org: apps, images, regions, and machines as local processes.

    A machine's own delays (seconds), each split around its transient state:
    `boot_delay_s` from a create to the process running (reference §9: image pull and rootfs
    are "maybe low double digit seconds" when uncached, boot "about 300ms");
    `start_delay_s` from a start of a `created` (skip_launch) or `stopped` machine to its fresh
    process ("well under a second"); `resume_delay_s` from a start of a `suspended` machine to
    its process continuing ("a few hundred ms"); `suspend_delay_s` from a suspend to
    `suspended` (no figure in the reference); `restart_delay_s` before a policy restart;
    `destroy_delay_s` before `destroyed`. API answer latency is `latency` (per operation).
    `exit_event_shape` says where exit events carry their details: `request.exit_event`
    (default) or `request.MonitorEvent.exit_event` (both occur on Fly). `undeclared` lists the
    request fields Fly's OpenAPI document does not declare (accepted, as the spec is open).
    `light_machines` plays every machine's process with a task instead of its command
    (testkit/fakes/fly/light.py): a bot that calls back as the test bot does, costing no
    process; `exit_machine` scripts such a bot's exit.
    """

    def __init__(
        self,
        *,
        token: str = DEFAULT_TOKEN,
        apps: Iterable[str] = (DEFAULT_APP,),
        images: Mapping[str, Path] | None = None,
        default_image_root: Path | None = None,
        default_cmd: Iterable[str] = ("python", "-m", "bot_runtime"),
        regions: Mapping[str, int | None] | None = None,
        secrets: Mapping[str, str] | None = None,
        boot_delay_s: float = 0.05,
        start_delay_s: float = 0.03,
        resume_delay_s: float = 0.02,
        suspend_delay_s: float = 0.02,
        destroy_delay_s: float = 0.02,
        restart_delay_s: float = 0.05,
        capacity_status: int = 412,
        retry_after_header: bool = True,
        rate_limits: bool = True,
        limits: Mapping[str, tuple[float, int]] | None = None,
        latency: float = 0.0,
        list_lag_s: float = 0.0,
        exit_event_shape: str = "exit_event",
        light_machines: bool = False,
    ) -> None:
        if exit_event_shape not in EXIT_EVENT_SHAPES:
            raise ValueError(f"exit_event_shape must be one of {EXIT_EVENT_SHAPES}")
        self.exit_event_shape = exit_event_shape
        self.light_machines = light_machines
        self.token = token
        self.apps = set(apps)
        self.images = {ref: Path(path) for ref, path in (images or {}).items()}
        self.default_image_root = default_image_root
        self.default_cmd = list(default_cmd)
        self.regions: dict[str, int | None] = dict(regions or {"iad": None, "ord": None})
        self.secrets = dict(secrets or {})
        self.boot_delay_s = boot_delay_s
        self.start_delay_s = start_delay_s
        self.resume_delay_s = resume_delay_s
        self.suspend_delay_s = suspend_delay_s
        self.destroy_delay_s = destroy_delay_s
        self.restart_delay_s = restart_delay_s
        self.capacity_status = capacity_status
        self.retry_after_header = retry_after_header
        self.list_lag_s = list_lag_s
        self.machines: dict[str, MachineRecord] = {}
        self.requests: list[ApiRequest] = []
        # When each of `requests` arrived (time.monotonic()), before the rate limit saw it.
        self.arrivals: list[float] = []
        self.openapi = _openapi()
        self.undeclared: list[str] = []
        self.faults = FaultPlan()
        self.latency = Latency(latency)
        self.limiter = RateLimiter({**DEFAULT_LIMITS, **(limits or {})}, enabled=rate_limits)
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self.app = _EmulatorApp(
            routes=self._routes(),
            lifespan=self._lifespan,
            middleware=[Middleware(DropConnections)],
        )

    # -- wiring ------------------------------------------------------------------------------

    def _routes(self) -> list[Route]:
        machine = "/v1/apps/{app}/machines/{id}"
        api = self._api
        return [
            Route("/v1/apps/{app}/machines", api("create", self._create), methods=["POST"]),
            Route("/v1/apps/{app}/machines", api("list", self._list), methods=["GET"]),
            Route(machine, api("get", self._get), methods=["GET"]),
            Route(machine, api("destroy", self._destroy), methods=["DELETE"]),
            Route(machine, api("update", self._update), methods=["POST"]),
            Route(f"{machine}/wait", api("wait", self._wait), methods=["GET"]),
            Route(f"{machine}/stop", api("stop", self._stop), methods=["POST"]),
            Route(f"{machine}/start", api("start", self._start), methods=["POST"]),
            Route(f"{machine}/suspend", api("suspend", self._suspend), methods=["POST"]),
            Route(f"{machine}/events", api("events", self._events), methods=["GET"]),
            Route(f"{machine}/metadata", api("metadata", self._metadata), methods=["GET"]),
            Route(f"{machine}/metadata/{{key}}", api("metadata", self._set_meta), methods=["POST"]),
            Route(
                f"{machine}/metadata/{{key}}", api("metadata", self._del_meta), methods=["DELETE"]
            ),
            Route("/v1/platform/regions", api("regions", self._regions), methods=["GET"]),
            *control_routes(self.faults, self.latency, self.limiter, self.snapshot),
            Route("/_emulator/machines/{id}/oom", self._control_oom, methods=["POST"]),
            Route("/_emulator/machines/{id}/exit", self._control_exit, methods=["POST"]),
            Route("/_emulator/secrets", self._control_secrets, methods=["POST"]),
            Route("/_emulator/regions", self._control_regions, methods=["POST"]),
        ]

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await self.aclose()

    def _api(self, op: str, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        """An endpoint: record, authorize, rate-limit, inject faults, operate, delay, answer."""

        async def endpoint(request: Request) -> Response:
            body = await self._record(request)
            try:
                self._authorize(request)
                self._rate_limit(op, request)
            except ApiError as exc:
                return exc.response()
            fault = self.faults.take(op, self._fault_region(op, request, body))
            if fault is not None and not fault.apply_first:
                return await self._fault_response(fault)
            try:
                if "app" in request.path_params and request.path_params["app"] not in self.apps:
                    raise ApiError(404, "app not found")
                await self._check_spec(request, body)
                response = await handler(request, body)
            except ApiError as exc:
                response = exc.response()
            except OutageBegan as exc:
                return await self._fault_response(exc.fault)
            await self.latency.sleep(op)
            return response if fault is None else await self._fault_response(fault)

        return endpoint

    async def _check_spec(self, request: Request, body: Any) -> None:
        """400 for a request Fly's OpenAPI document rejects; note the fields it does not
        declare (`undeclared`)."""
        operation = self.openapi.operation(request.method, request.url.path)
        if operation is None:
            return
        query = request.query_params.multi_items()
        try:
            fields = self.openapi.check(operation, query, body, bool(await request.body()))
        except SpecViolation as exc:
            raise _bad_request(str(exc)) from None
        self.undeclared += [f"{operation.route}: {field}" for field in fields]

    async def _record(self, request: Request) -> Any:
        raw = await request.body()
        body: Any = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw.decode("utf-8", "replace")
        self.requests.append(ApiRequest(request.method, request.url.path, request.url.query, body))
        self.arrivals.append(time.monotonic())
        return body

    def _authorize(self, request: Request) -> None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip().encode("utf-8", "replace")
        if scheme not in ("Bearer", "FlyV1") or not secrets.compare_digest(
            given, self.token.encode()
        ):
            raise ApiError(401, "token validation error", "unauthorized")

    def _rate_limit(self, op: str, request: Request) -> None:
        params = request.path_params
        scope = params.get("app", "")
        if op not in APP_SCOPED_LIMITS and "id" in params:
            scope = f"{scope}/{params['id']}"
        wait = self.limiter.check(op, scope)
        if wait is not None:
            headers = {"retry-after": str(max(1, math.ceil(wait)))}
            raise ApiError(
                429,
                "rate limit exceeded",
                "rate_limited",
                headers if self.retry_after_header else {},
            )

    def _fault_region(self, op: str, request: Request, body: Any) -> str | None:
        if op != "create" or not isinstance(body, dict):
            return None
        region = body.get("region")
        try:
            return self._place(region if isinstance(region, str) else None)
        except ApiError:
            return None

    async def _fault_response(self, fault: Fault) -> Response:
        if fault.delay_s > 0:
            await asyncio.sleep(fault.delay_s)
        if fault.status == 0:
            raise DroppedConnection
        body = fault.body
        if body is None:
            if fault.status >= 500:
                body = {"error": "internal error", "status": "unknown"}
            else:
                body = {"error": HTTPStatus(fault.status).phrase.lower(), "status": "unknown"}
        if isinstance(body, str):
            return Response(body, fault.status, headers=fault.headers, media_type="text/plain")
        return JSONResponse(body, fault.status, headers=fault.headers)

    # -- control API -------------------------------------------------------------------------

    async def _control_oom(self, request: Request) -> Response:
        """OOM-kill a machine's process: SIGKILL, reported with `oom_killed: true`."""
        machine = self.machines.get(request.path_params["id"])
        if machine is None:
            return _not_found().response()
        if machine.process is None:
            return JSONResponse({"error": "machine has no running process"}, 409)
        machine.oom_killed = True
        _kill_group(machine.process)
        return JSONResponse({"ok": True})

    def exit_machine(self, machine_id: str, exit_code: int = 0, *, ended: bool = True) -> None:
        """Make a light machine's bot exit now with `exit_code`, after its `ended` callback
        (unless not `ended`: a silent exit). LookupError for an unknown machine or one whose
        bot is not running; TypeError when it is not a light machine."""
        machine = self.machines.get(machine_id)
        if machine is None or machine.process is None:
            raise LookupError(f"machine {machine_id} has no running process")
        if not isinstance(machine.process, LightProcess):
            raise TypeError(f"machine {machine_id} is not a light machine")
        machine.process.exit(exit_code, ended=ended)

    async def _control_exit(self, request: Request) -> Response:
        """Script a light machine's exit: `{"exit_code": 0, "ended": true}` (both optional)."""
        if request.path_params["id"] not in self.machines:
            return _not_found().response()
        raw = await request.body()
        data = json.loads(raw) if raw else {}
        try:
            self.exit_machine(
                request.path_params["id"],
                int(data.get("exit_code", 0)),
                ended=bool(data.get("ended", True)),
            )
        except (LookupError, TypeError) as exc:
            return JSONResponse({"error": str(exc)}, 409)
        return JSONResponse({"ok": True})

    async def _control_secrets(self, request: Request) -> Response:
        """Set app secrets (null unsets one); machines see them from their next boot."""
        for key, value in (await request.json()).items():
            if value is None:
                self.secrets.pop(key, None)
            else:
                self.secrets[str(key)] = str(value)
        return JSONResponse(sorted(self.secrets))

    async def _control_regions(self, request: Request) -> Response:
        """Add regions or change their capacity (null: unlimited)."""
        for code, capacity in (await request.json()).items():
            self.regions[str(code)] = None if capacity is None else int(capacity)
        return JSONResponse(self.regions)

    def snapshot(self) -> dict[str, Any]:
        """The emulator's state as JSON, for `GET /_emulator/state`."""
        machines = [
            m.to_json(summary=True)
            | {"app": m.app, "restart_count": m.restart_count, "logs": m.logs[-100:]}
            for m in self.machines.values()
        ]
        return {
            "apps": sorted(self.apps),
            "regions": self.regions,
            "light_machines": self.light_machines,
            "machines": machines,
            "requests": len(self.requests),
            "faults": {"pending": self.faults.pending(), "fired": self.faults.fired},
            "rate_limited": self.limiter.refused,
        }

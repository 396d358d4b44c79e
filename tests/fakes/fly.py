"""A stateful emulator of the Fly Machines API that runs each machine as a local process.

Follows /work/shared/reference/fly-machines.md. Choices where the reference is silent:

- `wait`: `timeout` takes (fractional) seconds or a Go duration, default 60; larger values are
  clamped to 60. An unknown `version`/`instance_id` answers 400. `stopped` is satisfied once that
  version's process has exited, or by a destroyed machine; `started` only by the current state.
- `instance_id` (= `version`) is minted at create and kept by the first boot and by policy
  restarts; every API `start` that boots the machine mints a new one.
- A process killed by signal N reports `exit_code` = `guest_exit_code` = 128+N and
  `signal` = `guest_signal` = N (-1 when none); an OOM kill is SIGKILL (137), `oom_killed: true`.
- The exit event's `status` is the state entered next: `stopped`, or `restarting` when the
  restart policy boots the process again (`restarting: true` in the exit event).
- Durations in `stop_config.timeout` / stop's `timeout` are Go durations: strings like "1m30s",
  or numbers of nanoseconds (as fly-go's `Duration` decodes them).
- Stop on a machine that is not running answers `{"ok":true}`; start/stop on a destroyed machine,
  412; destroy of a destroyed machine, 404. An empty stop body counts as `{}`.
- A wait that can no longer be satisfied (started, on a stopped machine) runs to its 408.
- The image's CMD is `default_cmd` (`python -m bot`); `init.exec` replaces it, `init.entrypoint`
  runs with `init.cmd` only. Each process gets `PYTHONUNBUFFERED=1`, as the image's ENV would.
  An image directory's `bot/` needs an `__init__.py`: a namespace package loses to the repo's
  `bot` package, which the editable install puts on every interpreter's path.
- A fault with `status=0` closes uvicorn's transport: an ASGI app that returns without
  answering gets a 500 from uvicorn, not a dropped connection.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import hashlib
import json
import logging
import math
import os
import re
import secrets
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from pathlib import Path
from typing import Any, NamedTuple

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tests.fakes.common import (
    DropConnections,
    DroppedConnection,
    Fault,
    FaultPlan,
    Latency,
    RateLimiter,
    control_routes,
    serve,
    standalone,
)

logger = logging.getLogger(__name__)

DEFAULT_LIMITS: dict[str, tuple[float, int]] = {
    "create": (1.0, 3),
    "list": (1.0, 3),
    "get": (5.0, 10),
    "wait": (1.0, 3),
    "stop": (1.0, 3),
    "start": (1.0, 3),
    "destroy": (1.0, 3),
    "events": (1.0, 3),
    "metadata": (1.0, 3),
}
"""(requests a second, burst) per action: create and list per app, the rest per machine."""

DEFAULT_TOKEN = "test-token"
DEFAULT_APP = "bots"
APP_SCOPED_LIMITS = frozenset({"create", "list"})
WAITABLE_STATES = ("started", "stopped", "suspended", "destroyed")
MAX_WAIT_S = 60.0
DEFAULT_MAX_RETRIES = 10
REGION_NAMES = {
    "iad": "Ashburn, Virginia (US)",
    "ord": "Chicago, Illinois (US)",
    "dfw": "Dallas, Texas (US)",
    "ewr": "Secaucus, NJ (US)",
    "lax": "Los Angeles, California (US)",
    "sjc": "San Jose, California (US)",
    "sea": "Seattle, Washington (US)",
    "yyz": "Toronto, Canada",
    "gru": "Sao Paulo, Brazil",
    "lhr": "London, United Kingdom",
    "ams": "Amsterdam, Netherlands",
    "fra": "Frankfurt, Germany",
    "cdg": "Paris, France",
    "arn": "Stockholm, Sweden",
    "nrt": "Tokyo, Japan",
    "sin": "Singapore, Singapore",
    "syd": "Sydney, Australia",
    "bom": "Mumbai, India",
    "jnb": "Johannesburg, South Africa",
}
_ADJECTIVES = ("quiet", "patient", "bold", "young", "ancient", "shy", "dawn", "misty", "lively")
_NOUNS = ("river", "glitter", "sound", "wave", "forest", "meadow", "thunder", "sun", "frost")
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_DURATION = re.compile(r"(?:(?:\d+(?:\.\d*)?|\.\d+)(?:ns|us|µs|ms|s|m|h))+")
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def ulid() -> str:
    """A ULID-like id: 48 bits of milliseconds and 80 random bits, Crockford base32."""
    value = (time.time_ns() // 1_000_000) << 80 | secrets.randbits(80)
    return "".join(_CROCKFORD[(value >> (5 * i)) & 31] for i in reversed(range(26)))


def utc_now(timespec: str = "seconds") -> str:
    """The time now as ISO 8601 with a Z suffix."""
    return datetime.now(UTC).isoformat(timespec=timespec).replace("+00:00", "Z")


def parse_duration(value: Any) -> float:
    """Seconds in a Go duration: a string such as "1m30s" or "500ms", or a number of nanoseconds."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value) / 1e9
    if isinstance(value, str) and value == "0":
        return 0.0
    if not isinstance(value, str) or not _DURATION.fullmatch(value):
        raise ValueError(f"invalid duration {value!r}")
    return sum(float(n) * _DURATION_UNITS[unit] for n, unit in _DURATION_PART.findall(value))


def parse_signal(value: Any) -> signal.Signals:
    """A signal from its name, with or without the SIG prefix."""
    if not isinstance(value, str):
        raise ValueError(f"invalid signal {value!r}")
    name = value.upper() if value.upper().startswith("SIG") else f"SIG{value.upper()}"
    try:
        return signal.Signals[name]
    except KeyError:
        raise ValueError(f"invalid signal {value!r}") from None


def parse_image_ref(ref: str) -> dict[str, Any]:
    """The `image_ref` object Fly reports for an image reference."""
    name, _, digest = ref.partition("@")
    registry, slash, rest = name.partition("/")
    if not slash or not ("." in registry or ":" in registry or registry == "localhost"):
        registry, rest = "docker-hub-mirror.fly.io", name if "/" in name else f"library/{name}"
    repository, colon, tag = rest.rpartition(":")
    if not colon or "/" in tag:
        repository, tag = rest, "" if digest else "latest"
    digest = digest or f"sha256:{hashlib.sha256(ref.encode()).hexdigest()}"
    return {
        "registry": registry,
        "repository": repository,
        "tag": tag,
        "digest": digest,
        "labels": {},
    }


class ApiRequest(NamedTuple):
    """One API request as received: for tests that scan what the client sent."""

    method: str
    path: str
    query: str
    body: Any


class ApiError(Exception):
    """An API answer other than success, raised by a handler."""

    def __init__(
        self,
        status: int,
        error: str,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(error)
        self.status = status
        self.body: dict[str, str] = {"error": error} | ({"status": code} if code else {})
        self.headers = dict(headers or {})

    def response(self) -> Response:
        """The HTTP answer."""
        return JSONResponse(self.body, self.status, headers=self.headers)


def _not_found() -> ApiError:
    return ApiError(404, "machine not found")


def _bad_request(message: str) -> ApiError:
    return ApiError(400, message)


@dataclass(eq=False)
class MachineRecord:
    """One machine: the fields the API shows, plus the local process that plays its VM."""

    id: str
    app: str
    name: str
    region: str
    config: dict[str, Any]
    image_dir: Path
    instance_id: str
    private_ip: str
    state: str = "created"
    created_at: str = field(default_factory=utc_now)
    updated_at: str = field(default_factory=utc_now)
    created_mono: float = field(default_factory=time.monotonic)
    events: list[dict[str, Any]] = field(default_factory=list)
    logs: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict, repr=False)
    restart_count: int = 0
    process: asyncio.subprocess.Process | None = field(default=None, repr=False)
    stop_requested: bool = False
    destroy_requested: bool = False
    oom_killed: bool = False
    reached: dict[str, set[str]] = field(default_factory=dict, repr=False)
    changed: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    runner: asyncio.Task[None] | None = field(default=None, repr=False)
    reader: asyncio.Task[None] | None = field(default=None, repr=False)
    kill_timer: asyncio.Task[None] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.reached[self.instance_id] = {self.state}

    @property
    def active(self) -> bool:
        """Whether the machine is booting, running, stopping or restarting."""
        return self.runner is not None and not self.runner.done()

    @property
    def metadata(self) -> dict[str, str]:
        """`config.metadata`, empty when unset."""
        return dict(self.config.get("metadata") or {})

    def set_state(self, state: str) -> None:
        """Enter `state` and wake every waiter."""
        self.state = state
        self.updated_at = utc_now()
        self.reached.setdefault(self.instance_id, set()).add(state)
        self.notify()

    def notify(self) -> None:
        """Wake every waiter (they re-check their condition)."""
        self.changed.set()
        self.changed = asyncio.Event()

    def add_event(
        self, kind: str, status: str, source: str, request: dict[str, Any] | None = None
    ) -> None:
        """Record an event (newest first)."""
        event: dict[str, Any] = {"id": ulid(), "type": kind, "status": status, "source": source}
        event["timestamp"] = time.time_ns() // 1_000_000
        if request is not None:
            event["request"] = request
        self.events.insert(0, event)

    def satisfies(self, target: str, version: str | None) -> bool:
        """Whether a wait for `target` (of `version`) is over."""
        if target == "stopped" and self.state == "destroyed":
            return True
        if target == "stopped" and version is not None:
            return "stopped" in self.reached.get(version, set())
        return self.state == target and version in (None, self.instance_id)

    def exit_events(self) -> list[dict[str, Any]]:
        """The `exit_event` of every exit, newest first."""
        return [e["request"]["exit_event"] for e in self.events if e["type"] == "exit"]

    def to_json(self, summary: bool = False) -> dict[str, Any]:
        """The Machine object; `summary` leaves out config, events and checks."""
        doc: dict[str, Any] = {
            "id": self.id,
            "name": self.name,
            "state": self.state,
            "region": self.region,
            "image_ref": parse_image_ref(str(self.config["image"])),
            "instance_id": self.instance_id,
            "version": self.instance_id,
            "private_ip": self.private_ip,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "host_status": "ok",
        }
        if not summary:
            doc["config"] = copy.deepcopy(self.config)
            doc["events"] = copy.deepcopy(self.events)
            doc["checks"] = []
        return doc


def _str_map(value: Any, where: str) -> None:
    ok = isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    )
    if value is not None and not ok:
        raise _bad_request(f"invalid {where}: must be an object of string values")


def _str_list(value: Any, where: str) -> None:
    ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    if value is not None and not ok:
        raise _bad_request(f"invalid {where}: must be a list of strings")


def _object(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad_request(f"invalid {where}: must be an object")
    return value


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(value: Any) -> bool:
    return _integer(value) and value > 0


def _optional_bool(body: dict[str, Any], key: str, where: str) -> None:
    if body.get(key) is not None and not isinstance(body[key], bool):
        raise _bad_request(f"invalid {where}: must be a boolean")


def validate_create(body: Any) -> dict[str, Any]:
    """The create body's config, once its shape is checked (400 when it is wrong)."""
    if not isinstance(body, dict):
        raise _bad_request("invalid request body: must be a JSON object")
    for key in ("name", "region"):
        if body.get(key) is not None and not isinstance(body[key], str):
            raise _bad_request(f"invalid {key}: must be a string")
    _optional_bool(body, "skip_launch", "skip_launch")
    config = body.get("config")
    if not isinstance(config, dict):
        raise _bad_request("invalid config: must be an object")
    if not isinstance(config.get("image"), str) or not config["image"]:
        raise _bad_request("invalid config.image: an image is required")
    _str_map(config.get("env"), "config.env")
    _str_map(config.get("metadata"), "config.metadata")
    init = _object(config.get("init"), "config.init")
    for key in ("cmd", "entrypoint", "exec"):
        _str_list(init.get(key), f"config.init.{key}")
    _validate_guest(_object(config.get("guest"), "config.guest"))
    _validate_restart(_object(config.get("restart"), "config.restart"))
    stop = _object(config.get("stop_config"), "config.stop_config")
    try:
        if stop.get("signal") is not None:
            parse_signal(stop["signal"])
        if stop.get("timeout") is not None:
            parse_duration(stop["timeout"])
    except ValueError as exc:
        raise _bad_request(f"invalid config.stop_config: {exc}") from None
    _optional_bool(config, "auto_destroy", "config.auto_destroy")
    if config.get("services") is not None and not isinstance(config["services"], list):
        raise _bad_request("invalid config.services: must be a list")
    return config


def _validate_guest(guest: dict[str, Any]) -> None:
    if guest.get("cpu_kind") not in (None, "shared", "performance"):
        raise _bad_request(f"invalid config.guest.cpu_kind {guest['cpu_kind']!r}")
    if "cpus" in guest and not _positive_int(guest["cpus"]):
        raise _bad_request("invalid config.guest.cpus: must be a positive integer")
    memory = guest.get("memory_mb")
    if memory is not None and not (_positive_int(memory) and memory % 256 == 0):
        raise _bad_request(f"invalid config.guest.memory_mb {memory!r}: must be a multiple of 256")


def _validate_restart(restart: dict[str, Any]) -> None:
    if restart.get("policy") not in (None, "", "no", "always", "on-failure"):
        raise _bad_request(f"invalid config.restart.policy {restart['policy']!r}")
    retries = restart.get("max_retries")
    if retries is not None and not (_integer(retries) and retries >= 0):
        raise _bad_request("invalid config.restart.max_retries: must be a non-negative integer")


def _exit_event(returncode: int, oom_killed: bool, requested_stop: bool) -> dict[str, Any]:
    sig = -returncode if returncode < 0 else -1
    code = 128 + sig if returncode < 0 else returncode
    return {
        "exit_code": code,
        "guest_exit_code": code,
        "guest_signal": sig,
        "oom_killed": oom_killed,
        "requested_stop": requested_stop and not oom_killed,
        "restarting": False,
        "signal": sig,
        "exited_at": utc_now("milliseconds"),
    }


def _kill_group(proc: asyncio.subprocess.Process, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


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


class FlyEmulator:
    """The Fly Machines API for one org: apps, images, regions, and machines as local processes."""

    def __init__(
        self,
        *,
        token: str = DEFAULT_TOKEN,
        apps: Iterable[str] = (DEFAULT_APP,),
        images: Mapping[str, Path] | None = None,
        default_image_root: Path | None = None,
        default_cmd: Iterable[str] = ("python", "-m", "bot"),
        regions: Mapping[str, int | None] | None = None,
        secrets: Mapping[str, str] | None = None,
        boot_delay_s: float = 0.05,
        destroy_delay_s: float = 0.02,
        restart_delay_s: float = 0.05,
        capacity_status: int = 412,
        retry_after_header: bool = True,
        rate_limits: bool = True,
        limits: Mapping[str, tuple[float, int]] | None = None,
        latency: float = 0.0,
        list_lag_s: float = 0.0,
    ) -> None:
        self.token = token
        self.apps = set(apps)
        self.images = {ref: Path(path) for ref, path in (images or {}).items()}
        self.default_image_root = default_image_root
        self.default_cmd = list(default_cmd)
        self.regions: dict[str, int | None] = dict(regions or {"iad": None, "ord": None})
        self.secrets = dict(secrets or {})
        self.boot_delay_s = boot_delay_s
        self.destroy_delay_s = destroy_delay_s
        self.restart_delay_s = restart_delay_s
        self.capacity_status = capacity_status
        self.retry_after_header = retry_after_header
        self.list_lag_s = list_lag_s
        self.machines: dict[str, MachineRecord] = {}
        self.requests: list[ApiRequest] = []
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
            Route(f"{machine}/wait", api("wait", self._wait), methods=["GET"]),
            Route(f"{machine}/stop", api("stop", self._stop), methods=["POST"]),
            Route(f"{machine}/start", api("start", self._start), methods=["POST"]),
            Route(f"{machine}/events", api("events", self._events), methods=["GET"]),
            Route(f"{machine}/metadata", api("metadata", self._metadata), methods=["GET"]),
            Route(f"{machine}/metadata/{{key}}", api("metadata", self._set_meta), methods=["POST"]),
            Route(
                f"{machine}/metadata/{{key}}", api("metadata", self._del_meta), methods=["DELETE"]
            ),
            Route("/v1/platform/regions", api("regions", self._regions), methods=["GET"]),
            *control_routes(self.faults, self.latency, self.limiter, self.snapshot),
            Route("/_emulator/machines/{id}/oom", self._control_oom, methods=["POST"]),
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
                response = await handler(request, body)
            except ApiError as exc:
                response = exc.response()
            await self.latency.sleep(op)
            return response if fault is None else await self._fault_response(fault)

        return endpoint

    async def _record(self, request: Request) -> Any:
        raw = await request.body()
        body: Any = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw.decode("utf-8", "replace")
        self.requests.append(ApiRequest(request.method, request.url.path, request.url.query, body))
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

    def _machine(self, request: Request) -> MachineRecord:
        machine = self.machines.get(request.path_params["id"])
        if machine is None or machine.app != request.path_params["app"]:
            raise _not_found()
        return machine

    def _spawn_task(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- placement ---------------------------------------------------------------------------

    def _place(self, spec: str | None) -> str:
        """The region a machine lands in: the first of `spec` with capacity."""
        if not spec:
            codes = list(self.regions)[:1]
        elif spec == "any":
            codes = list(self.regions)
        else:
            codes = [code.strip() for code in spec.split(",") if code.strip()]
        for code in codes:
            if code not in self.regions:
                raise _bad_request(f"invalid region {code!r}")
        for code in codes:
            if self._has_capacity(code):
                return code
        raise self._capacity_error()

    def _has_capacity(self, region: str) -> bool:
        capacity = self.regions.get(region)
        used = sum(
            1
            for m in self.machines.values()
            if m.region == region and m.state not in ("stopped", "destroyed")
        )
        return capacity is None or used < capacity

    def _capacity_error(self) -> ApiError:
        return ApiError(
            self.capacity_status,
            "insufficient resources to create machine",
            "insufficient_capacity",
        )

    def _image_dir(self, ref: str) -> Path:
        if ref in self.images:
            return self.images[ref]
        if self.default_image_root is not None:
            return self.default_image_root
        raise ApiError(422, f"failed to resolve image {ref!r}: manifest unknown", "unknown")

    # -- handlers ----------------------------------------------------------------------------

    async def _create(self, request: Request, body: Any) -> Response:
        config = validate_create(body)
        app = request.path_params["app"]
        name = body.get("name") or self._generate_name()
        for other in self.machines.values():
            if other.app == app and other.name == name and other.state != "destroyed":
                raise ApiError(
                    422,
                    f"unique machine name violation, machine ID {other.id} already exists "
                    f'with name "{name}"',
                    "name_taken",
                )
        image_dir = self._image_dir(config["image"])
        region = self._place(body.get("region"))
        machine = MachineRecord(
            id=secrets.token_hex(7),
            app=app,
            name=name,
            region=region,
            config=copy.deepcopy(config),
            image_dir=image_dir,
            instance_id=ulid(),
            private_ip=self._private_ip(),
        )
        self.machines[machine.id] = machine
        machine.add_event("launch", "created", "user")
        answer = machine.to_json()
        if not body.get("skip_launch"):
            self._boot(machine)
        return JSONResponse(answer)

    async def _list(self, request: Request, body: Any) -> Response:
        query = request.query_params
        app = request.path_params["app"]
        states = set(query["state"].split(",")) if query.get("state") else None
        wanted = {k[9:]: v for k, v in query.multi_items() if k.startswith("metadata.")}
        deleted = query.get("include_deleted") == "true"
        visible_since = time.monotonic() - self.list_lag_s
        found = [
            m.to_json(summary=query.get("summary") == "true")
            for m in self.machines.values()
            if m.app == app
            and m.created_mono <= visible_since
            and (deleted or m.state != "destroyed")
            and (states is None or m.state in states)
            and query.get("region") in (None, m.region)
            and all(m.metadata.get(k) == v for k, v in wanted.items())
        ]
        return JSONResponse(found)

    async def _get(self, request: Request, body: Any) -> Response:
        return JSONResponse(self._machine(request).to_json())

    async def _wait(self, request: Request, body: Any) -> Response:
        machine = self._machine(request)
        query = request.query_params
        target = query.get("state") or "started"
        if target not in WAITABLE_STATES:
            raise _bad_request(
                f"invalid state {target!r}: want one of {', '.join(WAITABLE_STATES)}"
            )
        version = query.get("version") or query.get("instance_id")
        if target == "stopped" and not version:
            raise _bad_request("version (instance_id) is required when waiting for state stopped")
        if version is not None and version not in machine.reached:
            raise _bad_request(f"machine version {version!r} not found")
        timeout = self._wait_timeout(query.get("timeout"))
        if await self._await_state(request, machine, target, version, timeout):
            return JSONResponse({"ok": True, "state": target})
        raise ApiError(408, f"deadline_exceeded: timeout waiting for machine to be {target}")

    @staticmethod
    def _wait_timeout(raw: str | None) -> float:
        if raw is None or raw == "":
            return MAX_WAIT_S
        try:
            value = float(raw)
        except ValueError:
            try:
                value = parse_duration(raw)
            except ValueError:
                raise _bad_request(f"invalid timeout {raw!r}") from None
        if not value >= 0:
            raise _bad_request(f"invalid timeout {raw!r}")
        return min(value, MAX_WAIT_S)

    async def _await_state(
        self, request: Request, m: MachineRecord, target: str, version: str | None, within: float
    ) -> bool:
        """Wait until `m` satisfies `target`, the timeout passes, or the client goes away."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        gone = asyncio.ensure_future(_disconnected(request.receive))
        try:
            while not m.satisfies(target, version):
                remaining = deadline - loop.time()
                if remaining <= 0 or gone.done():
                    return False
                change = asyncio.ensure_future(m.changed.wait())
                await asyncio.wait(
                    {change, gone}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
                change.cancel()
            return True
        finally:
            gone.cancel()

    async def _stop(self, request: Request, body: Any) -> Response:
        machine = self._machine(request)
        body = {} if body is None else body
        if not isinstance(body, dict):
            raise _bad_request("invalid request body: must be a JSON object")
        defaults = machine.config.get("stop_config") or {}
        try:
            sig = parse_signal(_first(body.get("signal"), defaults.get("signal"), "SIGINT"))
            timeout = parse_duration(_first(body.get("timeout"), defaults.get("timeout"), "5s"))
        except ValueError as exc:
            raise _bad_request(str(exc)) from None
        if machine.state == "destroyed":
            raise self._wrong_state("stop", machine)
        if machine.active and not machine.stop_requested:
            machine.add_event("stop", "stopping", "user")
            machine.set_state("stopping")
            self._halt(machine, sig, timeout)
        return JSONResponse({"ok": True})

    async def _start(self, request: Request, body: Any) -> Response:
        machine = self._machine(request)
        previous = machine.state
        if previous in ("destroying", "destroyed"):
            raise self._wrong_state("start", machine)
        if not machine.active:
            if previous == "stopped" and not self._has_capacity(machine.region):
                raise self._capacity_error()
            machine.instance_id = ulid()
            machine.add_event("start", "starting", "user")
            machine.set_state("starting")
            self._boot(machine)
        return JSONResponse({"previous_state": previous, "migrated": False, "new_host": ""})

    async def _destroy(self, request: Request, body: Any) -> Response:
        machine = self._machine(request)
        force = request.query_params.get("force", "").lower() in ("true", "1")
        if machine.state == "destroyed":
            raise _not_found()
        if machine.active and not force:
            raise ApiError(412, "failed_precondition: machine still active, refusing to delete")
        if machine.state != "destroying":
            machine.set_state("destroying")
            if machine.active:
                machine.destroy_requested = True
                self._halt(machine, signal.SIGKILL, 0.0)
            else:
                self._spawn_task(self._finish_destroy(machine, "user"))
        return JSONResponse({"ok": True})

    async def _events(self, request: Request, body: Any) -> Response:
        machine = self._machine(request)
        raw = request.query_params.get("limit") or "20"
        if not raw.isdigit():
            raise _bad_request(f"invalid limit {raw!r}")
        return JSONResponse(machine.events[: max(1, min(int(raw), 50))])

    async def _metadata(self, request: Request, body: Any) -> Response:
        return JSONResponse(self._machine(request).metadata)

    async def _set_meta(self, request: Request, body: Any) -> Response:
        machine = self._machine(request)
        if not isinstance(body, dict) or not isinstance(body.get("value"), str):
            raise _bad_request('invalid request body: want {"value": "<string>"}')
        machine.config["metadata"] = machine.metadata | {request.path_params["key"]: body["value"]}
        machine.updated_at = utc_now()
        return Response(status_code=204)

    async def _del_meta(self, request: Request, body: Any) -> Response:
        machine = self._machine(request)
        metadata = machine.metadata
        metadata.pop(request.path_params["key"], None)
        machine.config["metadata"] = metadata
        machine.updated_at = utc_now()
        return Response(status_code=204)

    async def _regions(self, request: Request, body: Any) -> Response:
        regions = [{"code": code, "name": REGION_NAMES.get(code, code)} for code in self.regions]
        return JSONResponse({"Regions": regions, "Nearest": next(iter(self.regions), "")})

    @staticmethod
    def _wrong_state(action: str, machine: MachineRecord) -> ApiError:
        return ApiError(
            412,
            f"failed_precondition: unable to {action} machine from current state: "
            f"'{machine.state}'",
        )

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
            "machines": machines,
            "requests": len(self.requests),
            "faults": {"pending": self.faults.pending(), "fired": self.faults.fired},
            "rate_limited": self.limiter.refused,
        }

    # -- machines as processes ---------------------------------------------------------------

    def _boot(self, machine: MachineRecord) -> None:
        machine.stop_requested = machine.destroy_requested = machine.oom_killed = False
        machine.restart_count = 0
        machine.runner = self._spawn_task(self._run(machine))

    def _halt(self, machine: MachineRecord, sig: signal.Signals, timeout: float) -> None:
        """Ask the process to stop with `sig`, then SIGKILL it after `timeout` seconds."""
        machine.stop_requested = True
        proc = machine.process
        if proc is None or proc.returncode is not None:
            return
        if sig == signal.SIGKILL:
            _kill_group(proc)
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        machine.kill_timer = self._spawn_task(_kill_after(proc, timeout))

    async def _run(self, m: MachineRecord) -> None:
        """Boot `m`, run its process to exit, restart it per policy, then stop or destroy it."""
        await asyncio.sleep(self.boot_delay_s / 2)
        while True:
            if not m.stop_requested:
                m.set_state("starting")
                await asyncio.sleep(self.boot_delay_s / 2)
            returncode = 0 if m.stop_requested else await self._run_process(m)
            exit_event = _exit_event(returncode, m.oom_killed, m.stop_requested)
            m.oom_killed = False
            restarting = self._restarts(m, exit_event["exit_code"])
            exit_event["restarting"] = restarting
            status = "restarting" if restarting else "stopped"
            request = {"exit_event": exit_event, "restart_count": m.restart_count}
            m.add_event("exit", status, "flyd", request)
            if not restarting:
                break
            m.set_state("restarting")
            m.restart_count += 1
            await asyncio.sleep(self.restart_delay_s)
            m.add_event("restart", "starting", "flyd")
        m.reached.setdefault(m.instance_id, set()).add("stopped")  # its process has exited
        m.notify()
        if m.destroy_requested:
            await self._finish_destroy(m, "user")
        elif m.config.get("auto_destroy"):
            m.set_state("stopped")
            m.set_state("destroying")
            await self._finish_destroy(m, "flyd")
        else:
            m.set_state("stopped")

    def _restarts(self, m: MachineRecord, exit_code: int) -> bool:
        restart = m.config.get("restart") or {}
        policy = restart.get("policy") or "on-failure"
        if m.stop_requested or self._closing or policy == "no":
            return False
        if policy == "always":
            return True
        max_retries = restart.get("max_retries")
        limit = DEFAULT_MAX_RETRIES if max_retries is None else max_retries
        return exit_code != 0 and m.restart_count < limit

    async def _run_process(self, m: MachineRecord) -> int:
        """Spawn the machine's command, mark it started, and return its exit status."""
        argv = self._argv(m.config)
        m.env = self._env(m)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                cwd=m.image_dir,
                env=m.env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            self._mark_started(m)
            m.logs.append(f"Error: UnhandledIoError({exc})")
            return 1
        m.process = proc
        assert proc.stdout is not None
        m.reader = asyncio.ensure_future(_read_lines(proc.stdout, m))
        self._mark_started(m)
        try:
            return await proc.wait()
        finally:
            _kill_group(proc)  # the VM is gone: nothing the process started outlives it
            await proc.wait()
            await asyncio.wait({m.reader}, timeout=2.0)
            m.reader.cancel()
            if m.kill_timer is not None:
                m.kill_timer.cancel()
            m.process = None

    @staticmethod
    def _mark_started(m: MachineRecord) -> None:
        if m.stop_requested:  # stopped or destroyed while it booted
            if m.process is not None:
                _kill_group(m.process)
            return
        m.set_state("started")
        m.add_event("start", "started", "flyd")

    def _argv(self, config: dict[str, Any]) -> list[str]:
        init = config.get("init") or {}
        if init.get("exec"):
            argv = list(init["exec"])
        elif init.get("entrypoint"):
            argv = [*init["entrypoint"], *(init.get("cmd") or [])]
        else:
            argv = list(init.get("cmd") or self.default_cmd)
        if argv[0] in ("python", "python3"):
            argv[0] = sys.executable
        return argv

    def _env(self, m: MachineRecord) -> dict[str, str]:
        guest = m.config.get("guest") or {}
        return {
            "PATH": os.environ.get("PATH", os.defpath),
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            "HOME": os.environ.get("HOME", "/root"),
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": str(m.image_dir),
            "FLY_APP_NAME": m.app,
            "FLY_MACHINE_ID": m.id,
            "FLY_ALLOC_ID": m.id,
            "FLY_REGION": m.region,
            "FLY_IMAGE_REF": str(m.config["image"]),
            "FLY_MACHINE_VERSION": m.instance_id,
            "FLY_PRIVATE_IP": m.private_ip,
            "FLY_VM_MEMORY_MB": str(guest.get("memory_mb", 256)),
            "PRIMARY_REGION": next(iter(self.regions), m.region),
            **self.secrets,
            **(m.config.get("env") or {}),
        }

    async def _finish_destroy(self, m: MachineRecord, source: str) -> None:
        await asyncio.sleep(self.destroy_delay_s)
        m.add_event("destroy", "destroyed", source)
        m.set_state("destroyed")

    def _generate_name(self) -> str:
        taken = {m.name for m in self.machines.values()}
        while True:
            adjective, noun = secrets.choice(_ADJECTIVES), secrets.choice(_NOUNS)
            name = f"{adjective}-{noun}-{secrets.randbelow(10_000):04d}"
            if name not in taken:
                return name

    @staticmethod
    def _private_ip() -> str:
        groups = ":".join(secrets.token_hex(2) for _ in range(3))
        return f"fdaa:0:{secrets.token_hex(2)}:a7b:{groups}:2"

    async def aclose(self) -> None:
        """Kill every machine's process and finish every background task (idempotent)."""
        self._closing = True
        for machine in self.machines.values():
            machine.stop_requested = True
            if machine.process is not None:
                _kill_group(machine.process)
        pending = set(self._tasks)
        if pending:
            _, late = await asyncio.wait(pending, timeout=5.0)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)


def _first(*values: Any) -> Any:
    return next(v for v in values if v is not None)


async def _disconnected(receive: Receive) -> None:
    """Return once the client has gone away."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _kill_after(proc: asyncio.subprocess.Process, grace_s: float) -> None:
    await asyncio.sleep(grace_s)
    if proc.returncode is None:
        _kill_group(proc)


async def _read_lines(stream: asyncio.StreamReader, m: MachineRecord) -> None:
    """Append the process's output to `m.logs`, line by line, until EOF."""
    pending = b""
    while chunk := await stream.read(65536):
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            text = line.decode("utf-8", "replace").rstrip("\r")
            m.logs.append(text)
            logger.debug("%s: %s", m.id, text)
    if pending:
        m.logs.append(pending.decode("utf-8", "replace"))


# -- standalone --------------------------------------------------------------------------------


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"{flag} wants KEY=VALUE, got {item!r}")
        pairs[key] = value
    return pairs


def _parse_cli(argv: list[str]) -> tuple[argparse.Namespace, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="python -m tests.fakes.fly", add_help=False)
    parser.add_argument("--token", default=DEFAULT_TOKEN)
    parser.add_argument("--app", action="append", default=[], help="an app that exists")
    parser.add_argument("--image", action="append", default=[], metavar="REF=DIR")
    parser.add_argument("--default-image-root", type=Path, metavar="DIR")
    parser.add_argument("--secret", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--region", action="append", default=[], metavar="CODE[=CAPACITY]")
    parser.add_argument("--boot-delay", type=float, default=0.3, metavar="SECONDS")
    parser.add_argument("--destroy-delay", type=float, default=0.1, metavar="SECONDS")
    fly, rest = parser.parse_known_args(argv)
    if "-h" in rest or "--help" in rest:
        print(parser.format_help())
    sys.argv = [sys.argv[0], *rest]
    return fly, standalone("Fly Machines API emulator", default_port=4280)


def main(argv: list[str] | None = None) -> None:
    """Run the emulator on its own until interrupted."""
    fly, common = _parse_cli(sys.argv[1:] if argv is None else argv)
    regions: dict[str, int | None] = {}
    for item in fly.region or ["iad", "ord"]:
        code, _, capacity = item.partition("=")
        regions[code] = int(capacity) if capacity else None
    emulator = FlyEmulator(
        token=fly.token,
        apps=fly.app or [DEFAULT_APP],
        images={ref: Path(d) for ref, d in _pairs(fly.image, "--image").items()},
        default_image_root=fly.default_image_root,
        regions=regions,
        secrets=_pairs(fly.secret, "--secret"),
        boot_delay_s=fly.boot_delay,
        destroy_delay_s=fly.destroy_delay,
        rate_limits=not common.no_rate_limits,
        latency=common.latency,
    )

    async def run() -> None:
        async with serve(emulator.app, common.port, common.host) as url:
            print(f"fly emulator on {url}", flush=True)
            await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


if __name__ == "__main__":
    main()

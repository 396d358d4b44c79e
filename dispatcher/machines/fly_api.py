"""An async client of the Fly Machines API: one method per endpoint, typed results."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx

from dispatcher.errors import UpstreamError
from dispatcher.machines import MachineExit
from dispatcher.telemetry import Telemetry
from dispatcher.upstream import RetryPolicy, UpstreamClient, http_client

API = "fly"
REQUEST_ID = "fly-request-id"
MAX_WAIT_S = 60
# The list endpoint's page size when paginating: its `limit` is "between 1 and 1000; enables
# pagination", and `cursor` is the `fly-next-cursor` header of the previous page (Fly's OpenAPI
# document, tests/reference/fly-machines-openapi.json, Machines_list).
LIST_PAGE_SIZE = 1000
NEXT_CURSOR = "fly-next-cursor"
_MACAROON_PREFIXES = ("fm1r_", "fm1a_", "fm2_")


def auth_header(token: str) -> str:
    """The Authorization value for a Fly token, as fly-go builds it.

    Any `Bearer `/`FlyV1 ` prefix is stripped; macaroons (`fm1r_`, `fm1a_`, `fm2_`) go as
    `FlyV1 <token>`, anything else as `Bearer <token>`.
    """
    token = token.strip()
    for prefix in ("Bearer ", "FlyV1 "):
        if token.startswith(prefix):
            token = token[len(prefix) :].strip()
    scheme = "FlyV1" if token.startswith(_MACAROON_PREFIXES) else "Bearer"
    return f"{scheme} {token}"


@dataclass(frozen=True)
class Machine:
    """A Fly machine as the API describes it (the fields the dispatcher uses)."""

    id: str
    state: str
    region: str | None = None
    name: str | None = None
    instance_id: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    created_at: float | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Machine:
        """Parse a Machine object."""
        config = data.get("config") or {}
        return cls(
            id=str(data["id"]),
            state=str(data.get("state", "")),
            region=data.get("region"),
            name=data.get("name"),
            instance_id=data.get("instance_id") or data.get("version"),
            metadata=dict(config.get("metadata") or {}),
            events=list(data.get("events") or []),
            created_at=_timestamp(data.get("created_at")),
        )


class FlyAPI(UpstreamClient):
    """The Machines API of one app; `http` carries the base URL and the auth header."""

    api = API
    request_id_header = REQUEST_ID
    ok_statuses = frozenset({200})

    def __init__(
        self,
        http: httpx.AsyncClient,
        app: str,
        retry: RetryPolicy,
        telemetry: Telemetry | None = None,
    ) -> None:
        super().__init__(http, retry, telemetry, prefix=f"/v1/apps/{app}")

    @staticmethod
    def client(base_url: str, token: str, *, timeout_s: float = 15.0) -> httpx.AsyncClient:
        """The httpx client the API wants: base URL, auth, timeouts.

        No cap on connections: a burst of creates, stops and destroys never queues for one.
        The dispatcher builds two (dispatcher/clients.py): one for calls that answer at once,
        one for `wait`s, which hold a connection while they last, so that a create always
        finds a kept-alive connection free.
        """
        return http_client(
            base_url,
            auth_header(token),
            timeout_s=timeout_s,
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=20),
        )

    def error_detail(self, body: dict[str, Any]) -> tuple[str | None, str | None]:
        """Fly's error code is its `status`, its message `error` (or `message`)."""
        return _str_or_none(body.get("status")), _str_or_none(
            body.get("error") or body.get("message")
        )

    async def create(self, body: dict[str, Any], *, attempt: int = 1) -> Machine:
        """Create a machine: one attempt, never retried here (create is not idempotent; the
        caller's retries say which attempt this is)."""
        response = await self._call(
            "create", "POST", "/machines", json=body, mutating=True, attempt=attempt
        )
        return Machine.from_json(response.json())

    async def get(self, machine_id: str) -> Machine | None:
        """The machine, or None if Fly does not know it."""
        try:
            response = await self._retried("get", "GET", f"/machines/{machine_id}")
        except UpstreamError as exc:
            if exc.status == 404:
                return None
            raise
        return Machine.from_json(response.json())

    async def list_machines(
        self, *, metadata: dict[str, str] | None = None, include_deleted: bool = False
    ) -> list[Machine]:
        """Machines of the app whose metadata has every given key and value."""
        params: dict[str, str] = {f"metadata.{k}": v for k, v in (metadata or {}).items()}
        if include_deleted:
            params["include_deleted"] = "true"
        response = await self._retried("list", "GET", "/machines", params=params)
        return [Machine.from_json(m) for m in response.json() or []]

    async def list_page(
        self,
        *,
        metadata: dict[str, str] | None = None,
        summary: bool = False,
        limit: int = LIST_PAGE_SIZE,
        cursor: str | None = None,
    ) -> tuple[list[Machine], str | None]:
        """One page of the app's machines whose metadata has every given key and value, and
        the cursor of the next page (None: the last). With `summary`, Fly leaves out each
        machine's config (its metadata too), events and checks."""
        params: dict[str, str] = {f"metadata.{k}": v for k, v in (metadata or {}).items()}
        if summary:
            params["summary"] = "true"
        params["limit"] = str(max(1, min(LIST_PAGE_SIZE, limit)))
        if cursor:
            params["cursor"] = cursor
        response = await self._retried("list", "GET", "/machines", params=params)
        data = response.json()
        machines = [Machine.from_json(m) for m in data] if isinstance(data, list) else []
        return machines, response.headers.get(NEXT_CURSOR) or None

    async def wait(
        self, machine_id: str, state: str, *, timeout_s: int, version: str | None = None
    ) -> bool:
        """Wait up to `timeout_s` (at most 60) for a state; False when Fly's wait timed out."""
        timeout_s = max(1, min(MAX_WAIT_S, timeout_s))
        params = {"state": state, "timeout": str(timeout_s)}
        if version:
            params["version"] = version
        try:
            await self._call(
                "wait",
                "GET",
                f"/machines/{machine_id}/wait",
                params=params,
                deadline_s=timeout_s + 10,
            )
        except UpstreamError as exc:
            if exc.status == 408:
                return False
            raise
        return True

    async def start(self, machine_id: str) -> None:
        """Start a stopped or created machine, or resume a suspended one: one attempt (a warm
        pool tries another machine rather than wait)."""
        await self._call("start", "POST", f"/machines/{machine_id}/start", mutating=True)

    async def update(self, machine_id: str, body: dict[str, Any]) -> Machine:
        """Replace a machine's config (`config` is the whole of it; `skip_launch` leaves a
        stopped machine stopped): a new machine version. One attempt."""
        response = await self._call(
            "update", "POST", f"/machines/{machine_id}", json=body, mutating=True
        )
        return Machine.from_json(response.json())

    async def suspend(self, machine_id: str) -> None:
        """Suspend a started machine (its memory kept: it resumes where it was)."""
        await self._retried("suspend", "POST", f"/machines/{machine_id}/suspend", mutating=True)

    async def stop(self, machine_id: str, *, signal: str = "SIGTERM", timeout_s: int = 10) -> None:
        """Ask the machine to stop: `signal` now, SIGKILL after `timeout_s`. Gone counts as done."""
        body = {"signal": signal, "timeout": f"{timeout_s}s"}
        await self._tolerating_404("stop", "POST", f"/machines/{machine_id}/stop", json=body)

    async def destroy(self, machine_id: str) -> None:
        """Destroy the machine, killing it if it runs. Gone counts as done."""
        await self._tolerating_404(
            "destroy", "DELETE", f"/machines/{machine_id}", params={"force": "true"}
        )

    async def events(self, machine_id: str, *, limit: int = 50) -> list[dict[str, Any]]:
        """The machine's events, newest first (at most 50)."""
        response = await self._retried(
            "events",
            "GET",
            f"/machines/{machine_id}/events",
            params={"limit": str(min(50, limit))},
        )
        data = response.json()
        return list(data) if isinstance(data, list) else []

    async def _tolerating_404(self, operation: str, method: str, path: str, **kwargs: Any) -> None:
        try:
            await self._retried(operation, method, path, **kwargs)
        except UpstreamError as exc:
            if exc.status != 404:
                raise


def latest_exit(events: list[dict[str, Any]]) -> MachineExit | None:
    """The exit the newest `exit` event in a list of machine events records, or None."""
    exits = [e for e in events if e.get("type") == "exit"]
    if not exits:
        return None
    return exit_of(max(exits, key=lambda e: e.get("timestamp") or 0))


def exit_of(event: dict[str, Any]) -> MachineExit | None:
    """The exit of a machine's main process a Fly event records, or None when it records none.

    Its details are in `request.MonitorEvent.exit_event` or in `request.exit_event`: both
    shapes occur, and fly-go's GetExitCode reads the first before the second, as here.
    """
    request = event.get("request")
    if not isinstance(request, dict):
        return None
    monitor = request.get("MonitorEvent")
    info = monitor.get("exit_event") if isinstance(monitor, dict) else None
    if not isinstance(info, dict):
        info = request.get("exit_event")
    if not isinstance(info, dict):
        return None
    code = info.get("exit_code")
    signal = info.get("signal")
    return MachineExit(
        exit_code=code if isinstance(code, int) and not isinstance(code, bool) else None,
        oom_killed=bool(info.get("oom_killed")),
        requested_stop=bool(info.get("requested_stop")),
        signal=signal if isinstance(signal, int) and signal > 0 else None,
    )


def _timestamp(value: Any) -> float | None:
    """A unix time from an RFC 3339 string, or None."""
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None

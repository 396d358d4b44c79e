"""The Machines API endpoints: create, list, get, wait, start, stop, suspend, destroy, metadata."""

from __future__ import annotations

import asyncio
import copy
import secrets
import signal
import time
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive

from testkit.fakes.common import FaultPlan, Latency
from testkit.fakes.fly.errors import ApiError, OutageBegan, _bad_request, _not_found
from testkit.fakes.fly.machine import MachineRecord, parse_duration, parse_signal, ulid, utc_now
from testkit.fakes.fly.runtime import MachineRuntime
from testkit.fakes.fly.validation import validate_create

WAITABLE_STATES = ("started", "stopped", "suspended", "destroyed", "failed", "settled")
MAX_WAIT_S = 60.0
SUSPEND_MAX_MEMORY_MB = 2048
"""Reference §10: suspend needs <= 2 GB of RAM (one guide says 4 GB; the stricter figure wins)."""
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


class MachineHandlers(MachineRuntime):
    """The Machines API's handlers, and where new machines land."""

    images: dict[str, Path]
    default_image_root: Path | None
    capacity_status: int
    list_lag_s: float
    faults: FaultPlan
    latency: Latency

    def _machine(self, request: Request) -> MachineRecord:
        machine = self.machines.get(request.path_params["id"])
        if machine is None or machine.app != request.path_params["app"]:
            raise _not_found()
        return machine

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
        if capacity is None:
            return True
        used = sum(
            1
            for m in self.machines.values()
            if m.region == region and m.state not in ("stopped", "destroyed")
        )
        return used < capacity

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
            # The create answers `created` as the boot begins (FLY §4), once the image and root
            # filesystem are ready (FLY §9): the boot follows the create's latency.
            self._boot(machine, self.latency.of("create") + self.boot_delay_s)
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
        if not query.get("limit"):
            return JSONResponse(found)
        # Pages in id order; the cursor is the last id of the page before ([inf] its form).
        try:
            limit = int(query["limit"])
        except ValueError:
            raise _bad_request(f"invalid limit {query['limit']!r}") from None
        if not 1 <= limit <= 1000:
            raise _bad_request(f"limit must be between 1 and 1000, got {limit}")
        cursor = query.get("cursor") or ""
        rest = sorted((m for m in found if m["id"] > cursor), key=lambda m: str(m["id"]))
        page = rest[:limit]
        headers = {"fly-next-cursor": str(page[-1]["id"])} if len(rest) > limit else {}
        return JSONResponse(page, headers=headers)

    async def _get(self, request: Request, body: Any) -> Response:
        return JSONResponse(self._machine(request).to_json())

    async def _wait(self, request: Request, body: Any) -> Response:
        """Wait for any of the states asked (`state`, comma-separated or repeated; `started`
        by default); the spec has already refused states and timeouts it does not have."""
        machine = self._machine(request)
        query = request.query_params
        targets = [s for v in query.getlist("state") for s in v.split(",") if s] or ["started"]
        version = query.get("version") or query.get("instance_id")
        if "stopped" in targets and not version:
            raise _bad_request("version (instance_id) is required when waiting for state stopped")
        if version is not None and version not in machine.reached:
            raise _bad_request(f"machine version {version!r} not found")
        timeout = int(query.get("timeout") or MAX_WAIT_S)
        if timeout < 0:
            raise _bad_request(f"invalid timeout {timeout}")
        reached = await self._await_state(
            request, machine, targets, version, min(timeout, MAX_WAIT_S)
        )
        if reached is None:
            raise ApiError(
                408, f"deadline_exceeded: timeout waiting for machine to be {','.join(targets)}"
            )
        answer = {"ok": True, "state": reached, "version": machine.instance_id}
        return JSONResponse(answer | {"event_id": machine.events[0]["id"]})

    async def _await_state(
        self,
        request: Request,
        m: MachineRecord,
        targets: list[str],
        version: str | None,
        within: float,
    ) -> str | None:
        """The state reached once `m` satisfies one of `targets`; None once the timeout passes
        or the client goes away. An outage beginning meanwhile raises OutageBegan."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        gone = asyncio.ensure_future(_disconnected(request.receive))
        outage = asyncio.ensure_future(self.faults.next_outage())
        try:
            while (reached := m.reached_one_of(targets, version)) is None:
                remaining = deadline - loop.time()
                if outage.done():
                    raise OutageBegan(outage.result())
                if remaining <= 0 or gone.done():
                    return None
                change = asyncio.ensure_future(m.changed.wait())
                await asyncio.wait(
                    {change, gone, outage}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
                change.cancel()
            return reached
        finally:
            gone.cancel()
            outage.cancel()

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
        """Boot a created or stopped machine (start delay), or resume a suspended one (resume
        delay, same process and instance_id: [inf], the reference says nothing of the version).

        [unv] a start while `suspending` answers 412 here, rather than resuming once suspended.
        """
        machine = self._machine(request)
        previous = machine.state
        if previous in ("destroying", "destroyed", "suspending"):
            raise self._wrong_state("start", machine)
        if previous == "suspended" and machine.frozen:
            self._resume_process(machine)
        elif not machine.active:
            if previous == "stopped" and not self._has_capacity(machine.region):
                raise self._capacity_error()
            machine.instance_id = ulid()
            machine.add_event("start", "starting", "user")
            machine.set_state("starting")
            self._boot(machine, self.start_delay_s)
        return JSONResponse({"previous_state": previous, "migrated": False, "new_host": ""})

    async def _update(self, request: Request, body: Any) -> Response:
        """Replace a machine's config (`POST /machines/{id}`, reference §2: "full config only;
        `name` and `region` cannot change"): a new version (instance_id). A stopped or created
        machine stays so with `skip_launch`, else it boots the new config.

        Not emulated: the update of a machine that runs (Fly restarts it with the new config):
        412 `failed_precondition` here, [unv] on Fly. The machine answered is the updated one.
        """
        machine = self._machine(request)
        config = validate_create(body)
        if body.get("name") not in (None, machine.name):
            raise _bad_request("invalid name: a machine's name cannot change")
        if body.get("region") not in (None, machine.region):
            raise _bad_request("invalid region: a machine's region cannot change")
        if machine.state in ("destroying", "destroyed"):
            raise self._wrong_state("update", machine)
        if machine.active:
            raise self._wrong_state("update", machine, "failed_precondition")
        machine.image_dir = self._image_dir(config["image"])
        machine.config = copy.deepcopy(config)
        machine.instance_id = ulid()
        machine.reached[machine.instance_id] = {machine.state}
        machine.add_event("update", "updated", "user")
        machine.updated_at = utc_now()
        if not body.get("skip_launch"):
            machine.add_event("start", "starting", "user")
            machine.set_state("starting")
            self._boot(machine, self.start_delay_s)
        return JSONResponse(machine.to_json())

    async def _suspend(self, request: Request, body: Any) -> Response:
        """Suspend a started machine (reference §2, §10): its process is frozen, not ended.

        Refusals, with statuses that are [unv] (the reference names none): 412
        `failed_precondition` unless the machine is `started` with a running process; 400
        `invalid_argument` when its memory is over SUSPEND_MAX_MEMORY_MB or it has swap.
        """
        machine = self._machine(request)
        memory = (machine.config.get("guest") or {}).get("memory_mb", 256)
        if memory > SUSPEND_MAX_MEMORY_MB:
            raise ApiError(
                400,
                f"invalid_argument: machines with more than {SUSPEND_MAX_MEMORY_MB} MB of "
                f"memory cannot be suspended (this one has {memory} MB)",
                "invalid_argument",
            )
        if (machine.config.get("init") or {}).get("swap_size_mb"):
            raise ApiError(
                400, "invalid_argument: machines with swap cannot be suspended", "invalid_argument"
            )
        if machine.state != "started" or machine.process is None or machine.stop_requested:
            raise self._wrong_state("suspend", machine, "failed_precondition")
        self._suspend_process(machine)
        return JSONResponse({"ok": True})

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
    def _wrong_state(action: str, machine: MachineRecord, code: str | None = None) -> ApiError:
        return ApiError(
            412,
            f"failed_precondition: unable to {action} machine from current state: "
            f"'{machine.state}'",
            code,
        )

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


def _first(*values: Any) -> Any:
    return next(v for v in values if v is not None)


async def _disconnected(receive: Receive) -> None:
    """Return once the client has gone away."""
    while (await receive())["type"] != "http.disconnect":
        pass

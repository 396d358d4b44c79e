"""Plumbing shared by the API emulators: rate limits, latency, faults, their control routes."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send


class TokenBucket:
    """A token bucket: `rate` tokens a second, at most `burst` saved up."""

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._stamp = clock()

    def take(self) -> float | None:
        """Take a token; None if granted, else the seconds until one is available."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens >= 1:
            self._tokens -= 1
            return None
        return (1 - self._tokens) / self.rate


class RateLimiter:
    """Buckets keyed by (action, scope), each with the limit configured for its action."""

    def __init__(self, limits: dict[str, tuple[float, int]], enabled: bool = True) -> None:
        self.limits = dict(limits)
        self.enabled = enabled
        self._buckets: dict[tuple[str, str], TokenBucket] = {}
        self.refused: dict[str, int] = {}

    def check(self, action: str, scope: str = "") -> float | None:
        """None if the request may proceed, else the seconds a client should wait."""
        if not self.enabled or action not in self.limits:
            return None
        rate, burst = self.limits[action]
        bucket = self._buckets.get((action, scope))
        if bucket is None or (bucket.rate, bucket.burst) != (rate, burst):
            bucket = self._buckets[(action, scope)] = TokenBucket(rate, burst)
        wait = bucket.take()
        if wait is not None:
            self.refused[action] = self.refused.get(action, 0) + 1
        return wait


@dataclass
class Fault:
    """One injected failure of an operation.

    `apply_first` performs the operation and then answers with the error (a create that
    succeeded but answered 500); `delay_s` holds the answer back (client timeouts);
    `status=0` drops the connection without an answer.
    """

    status: int = 500
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    times: int = 1
    apply_first: bool = False
    delay_s: float = 0.0
    region: str | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Fault:
        """Build a fault from the control API's JSON."""
        known = {"status", "body", "headers", "times", "apply_first", "delay_s", "region"}
        return cls(**{k: v for k, v in data.items() if k in known})


class FaultPlan:
    """Faults queued per operation name, consumed in order, and outages.

    An outage answers every operation with one fault (503 by default) until it ends, queued
    faults untouched; an emulator also answers it to requests in flight that wait (long polls):
    [inf] an API that goes down drops the connections it holds open.
    """

    def __init__(self) -> None:
        self._queues: dict[str, deque[Fault]] = {}
        self.fired: list[tuple[str, int]] = []
        self.outage: Fault | None = None
        self._outage_began = asyncio.Event()

    def add(self, op: str, fault: Fault | None = None, **kwargs: Any) -> None:
        """Queue a fault for `op` (kwargs build one when none is given)."""
        self._queues.setdefault(op, deque()).append(fault or Fault(**kwargs))

    def begin_outage(self, fault: Fault | None = None, **kwargs: Any) -> None:
        """Answer every operation with `fault` (kwargs build one: a 503 by default) until
        `end_outage`."""
        self.outage = fault or Fault(**({"status": 503} | kwargs))
        began, self._outage_began = self._outage_began, asyncio.Event()
        began.set()

    def end_outage(self) -> None:
        """Let operations through again."""
        self.outage = None

    async def next_outage(self) -> Fault:
        """Wait until an outage begins; its fault."""
        began = self._outage_began
        await began.wait()
        return self.outage or Fault(status=503)

    def take(self, op: str, region: str | None = None) -> Fault | None:
        """The outage's fault, else the next fault for `op` (and `region`, for region-scoped
        faults), consuming one use."""
        if self.outage is not None:
            self.fired.append((op, self.outage.status))
            return self.outage
        queue = self._queues.get(op)
        if not queue:
            return None
        for fault in queue:
            if fault.region is None or fault.region == region:
                fault.times -= 1
                if fault.times <= 0:
                    queue.remove(fault)
                self.fired.append((op, fault.status))
                return fault
        return None

    def pending(self) -> dict[str, int]:
        """How many injected faults remain, by operation."""
        return {op: sum(f.times for f in q) for op, q in self._queues.items() if q}

    def clear(self) -> None:
        """Drop every queued fault and end any outage."""
        self._queues.clear()
        self.outage = None


class DroppedConnection(Exception):
    """Raised by a handler to close the connection without answering."""


class DropConnections:
    """Pure-ASGI middleware: a handler's DroppedConnection closes the socket without an answer.

    Swallowing the exception is not enough (uvicorn would answer 500), so it aborts uvicorn's
    transport, reached through its `receive` method, and waits for the disconnect to register.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        except DroppedConnection:
            transport = getattr(getattr(receive, "__self__", None), "transport", None)
            if transport is None:
                raise
            transport.abort()
            while (await receive())["type"] != "http.disconnect":
                pass


class Latency:
    """Per-operation delays in seconds, with a default."""

    def __init__(self, default: float = 0.0, **per_op: float) -> None:
        self.default = default
        self.per_op = dict(per_op)

    def of(self, op: str) -> float:
        """The delay configured for `op`."""
        return self.per_op.get(op, self.default)

    async def sleep(self, op: str) -> None:
        """Wait for the delay configured for `op`."""
        delay = self.of(op)
        if delay > 0:
            await asyncio.sleep(delay)


def control_routes(
    faults: FaultPlan, latency: Latency, limiter: RateLimiter, state: Callable[[], Any]
) -> list[Route]:
    """The `/_emulator/*` control API, for runs of an emulator in its own process."""

    async def add_fault(request: Request) -> Response:
        data = await request.json()
        faults.add(str(data["op"]), Fault.from_json(data))
        return JSONResponse({"pending": faults.pending()})

    async def clear_faults(request: Request) -> Response:
        faults.clear()
        return JSONResponse({"pending": {}})

    async def begin_outage(request: Request) -> Response:
        data = await request.body()
        faults.begin_outage(Fault.from_json({"status": 503} | (json.loads(data) if data else {})))
        return JSONResponse({"outage": True})

    async def end_outage(request: Request) -> Response:
        faults.end_outage()
        return JSONResponse({"outage": False})

    async def set_latency(request: Request) -> Response:
        data = await request.json()
        if "default" in data:
            latency.default = float(data.pop("default"))
        latency.per_op.update({str(k): float(v) for k, v in data.items()})
        return JSONResponse({"default": latency.default, **latency.per_op})

    async def set_limits(request: Request) -> Response:
        data = await request.json()
        if "enabled" in data:
            limiter.enabled = bool(data.pop("enabled"))
        for action, (rate, burst) in data.items():
            limiter.limits[str(action)] = (float(rate), int(burst))
        return JSONResponse({"enabled": limiter.enabled, "limits": limiter.limits})

    async def get_state(request: Request) -> Response:
        return JSONResponse(state())

    return [
        Route("/_emulator/faults", add_fault, methods=["POST"]),
        Route("/_emulator/faults", clear_faults, methods=["DELETE"]),
        Route("/_emulator/outage", begin_outage, methods=["POST"]),
        Route("/_emulator/outage", end_outage, methods=["DELETE"]),
        Route("/_emulator/latency", set_latency, methods=["POST"]),
        Route("/_emulator/limits", set_limits, methods=["POST"]),
        Route("/_emulator/state", get_state, methods=["GET"]),
    ]


def standalone(description: str, default_port: int) -> argparse.Namespace:
    """Parse the command line of an emulator run on its own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=default_port)
    parser.add_argument("--latency", type=float, default=0.0, help="default latency, seconds")
    parser.add_argument("--no-rate-limits", action="store_true")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    return parser.parse_args()

"""The upstream clients and the backends on them, built once for the service and the CLI."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from dispatcher.config import Settings
from dispatcher.machines import MachineBackend
from dispatcher.machines.fly import FlyMachines
from dispatcher.machines.fly_api import FlyAPI
from dispatcher.machines.local import LocalMachines
from dispatcher.pacing import Pacer
from dispatcher.rooms import RoomBackend
from dispatcher.rooms.daily import DailyRooms
from dispatcher.rooms.daily_api import DailyAPI
from dispatcher.rooms.webrtc import WebRTCRooms
from dispatcher.telemetry import Telemetry
from dispatcher.upstream import RetryPolicy


@dataclass(frozen=True)
class Upstreams:
    """The Fly and Daily API clients the settings configure (None: not configured). Fly's
    `wait`s go through a client (and connection pool) of their own, `fly_waits`: a wait holds
    its connection while it lasts, and a create must always find a kept-alive one free."""

    fly: FlyAPI | None
    daily: DailyAPI | None
    fly_waits: FlyAPI | None = None


@contextlib.asynccontextmanager
async def upstreams(
    settings: Settings,
    retry: RetryPolicy,
    *,
    timeout_s: float,
    telemetry: Telemetry | None = None,
) -> AsyncIterator[Upstreams]:
    """The API clients `settings` configure, their connections closed on exit."""
    async with contextlib.AsyncExitStack() as stack:
        fly = fly_waits = daily = None
        if settings.machine_backend == "fly" and settings.fly_api_token and settings.fly_bot_app:
            token = settings.fly_api_token.reveal()
            http = FlyAPI.client(settings.fly_api_base_url, token, timeout_s=timeout_s)
            stack.push_async_callback(http.aclose)
            fly = FlyAPI(http, settings.fly_bot_app, retry, telemetry)
            waits = FlyAPI.client(settings.fly_api_base_url, token, timeout_s=timeout_s)
            stack.push_async_callback(waits.aclose)
            fly_waits = FlyAPI(waits, settings.fly_bot_app, retry, telemetry)
        if settings.daily_api_key is not None:
            key = settings.daily_api_key.reveal()
            http = DailyAPI.client(settings.daily_api_url, key, timeout_s=timeout_s)
            stack.push_async_callback(http.aclose)
            daily = DailyAPI(http, retry, telemetry)
        yield Upstreams(fly, daily, fly_waits)


def machine_backend(
    settings: Settings, apis: Upstreams, retry: RetryPolicy, pacer: Pacer | None
) -> MachineBackend:
    """Where bots run: local processes, or Fly machines (creates paced by `pacer`)."""
    if settings.machine_backend == "local":
        return LocalMachines(
            bot_dir=settings.local_bot_dir, stop_grace_s=settings.bot_stop_timeout_s
        )
    assert apis.fly is not None
    return FlyMachines(apis.fly, settings, retry, pacer, waits=apis.fly_waits)


def room_backends(
    settings: Settings, apis: Upstreams, retry: RetryPolicy
) -> dict[str, RoomBackend]:
    """The room backend of each transport the settings offer."""
    backends: dict[str, RoomBackend] = {}
    for transport in settings.transports:
        if transport == "daily":
            assert apis.daily is not None and settings.daily_api_key is not None
            backends[transport] = DailyRooms(apis.daily, settings.daily_api_key, retry)
        else:
            backends[transport] = WebRTCRooms(settings.ice_servers, settings.default_ice_servers)
    return backends

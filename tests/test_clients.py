"""The one builder of the upstream clients and backends, shared by the service and the CLI."""

from __future__ import annotations

import pytest
import respx

from dispatcher.clients import machine_backend, room_backends, upstreams
from dispatcher.config import Settings
from dispatcher.machines.fly import FlyMachines
from dispatcher.machines.local import LocalMachines
from dispatcher.rooms.daily import DailyRooms
from dispatcher.rooms.webrtc import WebRTCRooms
from dispatcher.upstream import RetryPolicy
from tests.test_config import FLY

RETRY = RetryPolicy(attempts=1)


@respx.mock
async def test_fly_settings_build_both_clients_and_fly_backends() -> None:
    """Fly settings give the Fly and Daily clients (each with its base URL and auth, closed on
    exit), Fly machines and Daily rooms."""
    settings = Settings.from_env(FLY)
    fly_route = respx.get(f"{settings.fly_api_base_url}/v1/apps/my-bots/machines").respond(
        200, json=[]
    )
    daily_route = respx.get(f"{settings.daily_api_url}/rooms/r1/presence").respond(
        200, json={"data": []}
    )
    async with upstreams(settings, RETRY, timeout_s=10) as apis:
        assert apis.fly is not None and apis.daily is not None
        assert await apis.fly.list_machines() == [] and await apis.daily.presence("r1") == []
        assert isinstance(machine_backend(settings, apis, RETRY, None), FlyMachines)
        rooms = room_backends(settings, apis, RETRY)
        assert list(rooms) == ["daily"] and isinstance(rooms["daily"], DailyRooms)
    assert fly_route.calls.last.request.headers["authorization"] == "FlyV1 fm2_secret-token"
    assert daily_route.calls.last.request.headers["authorization"] == "Bearer daily-key"
    with pytest.raises(RuntimeError, match="closed"):
        await apis.fly.list_machines()
    with pytest.raises(RuntimeError, match="closed"):
        await apis.daily.presence("r1")


async def test_local_settings_build_no_fly_client() -> None:
    """Local settings give local machines and webrtc rooms; Daily only when its key is set."""
    settings = Settings.from_env({})
    async with upstreams(settings, RETRY, timeout_s=10) as apis:
        assert apis.fly is None and apis.daily is None
        assert isinstance(machine_backend(settings, apis, RETRY, None), LocalMachines)
        rooms = room_backends(settings, apis, RETRY)
        assert list(rooms) == ["webrtc"] and isinstance(rooms["webrtc"], WebRTCRooms)
    settings = Settings.from_env({"DAILY_API_KEY": "daily-key"})
    async with upstreams(settings, RETRY, timeout_s=10) as apis:
        assert apis.fly is None and apis.daily is not None
        assert list(room_backends(settings, apis, RETRY)) == ["daily", "webrtc"]

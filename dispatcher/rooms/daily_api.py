"""An async client of Daily's REST API: one method per endpoint, typed results."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import httpx

from dispatcher.errors import UpstreamError
from dispatcher.pacing import Pace
from dispatcher.upstream import UpstreamClient, http_client

API = "daily"
REQUEST_ID = "x-request-id"
ROOMS_PAGE = 100
# Rooms one batch call may create or delete (docs/reference/daily.md §2).
MAX_BATCH = 1000


@dataclass(frozen=True)
class Domain:
    """The Daily domain of the API key: its name (in room URLs) and id (in tokens)."""

    name: str
    id: str


@dataclass(frozen=True)
class Room:
    """A Daily room."""

    name: str
    url: str
    privacy: str


class _ListedRoom(NamedTuple):
    name: str
    id: str | None


class DailyAPI(UpstreamClient):
    """Daily's REST API; `http` carries the base URL and the API key."""

    api = API
    request_id_header = REQUEST_ID

    @staticmethod
    def client(base_url: str, api_key: str, *, timeout_s: float = 10.0) -> httpx.AsyncClient:
        """The httpx client the API wants: base URL, auth, timeouts."""
        return http_client(base_url.rstrip("/") + "/", f"Bearer {api_key}", timeout_s=timeout_s)

    def error_detail(self, body: dict[str, Any]) -> tuple[str | None, str | None]:
        """Daily's error code is its `error`, its message `info`."""
        code, info = body.get("error"), body.get("info")
        return (code if isinstance(code, str) else None, info if isinstance(info, str) else None)

    async def domain(self) -> Domain:
        """The domain of the API key (`GET /`)."""
        data = (await self._retried("domain", "GET", "")).json()
        try:
            return Domain(name=str(data["domain_name"]), id=str(data["domain_id"]))
        except (KeyError, TypeError):
            raise UpstreamError(
                "daily domain answer lacks domain_name/domain_id", api=API, operation="domain"
            ) from None

    async def create_room(
        self, name: str, *, privacy: str, properties: dict[str, Any], attempt: int = 1
    ) -> Room:
        """Create a room: one attempt (the caller decides on retries, the name makes it safe)."""
        body = {"name": name, "privacy": privacy, "properties": properties}
        response = await self._call(
            "create_room", "POST", "rooms", json=body, mutating=True, attempt=attempt
        )
        data = response.json()
        return _room(data)

    async def create_rooms(self, rooms: list[dict[str, Any]], *, attempt: int = 1) -> None:
        """Create rooms in one call, all or none (`POST /batch/rooms`): one attempt, as for
        `create_room`. Its answer is not read: what it holds is unverified, and the rooms are
        the ones asked for."""
        if not 1 <= len(rooms) <= MAX_BATCH:
            raise ValueError(f"a batch holds 1 to {MAX_BATCH} rooms")
        await self._call(
            "create_rooms",
            "POST",
            "batch/rooms",
            json={"rooms": rooms},
            mutating=True,
            attempt=attempt,
        )

    async def delete_rooms(self, names: list[str], *, pace: Pace | None = None) -> None:
        """Delete rooms in one call (`DELETE /batch/rooms`), retried; `pace` as for
        `delete_room`. Whether Daily refuses a batch that names a room it no longer has is not
        documented: the caller falls back to `delete_room` after a 4xx."""
        if not 1 <= len(names) <= MAX_BATCH:
            raise ValueError(f"a batch holds 1 to {MAX_BATCH} rooms")
        await self._retried(
            "delete_rooms", "DELETE", "batch/rooms", json={"rooms": names}, mutating=True, pace=pace
        )

    async def get_room(self, name: str) -> Room | None:
        """The room, or None if Daily does not have it (deleted or expired)."""
        try:
            data = (await self._retried("get_room", "GET", f"rooms/{name}")).json()
        except UpstreamError as exc:
            if exc.status == 404:
                return None
            raise
        return _room(data)

    async def delete_room(self, name: str, *, pace: Pace | None = None) -> None:
        """Delete a room; one Daily no longer has counts as deleted. `pace` is awaited before
        each attempt (retries included), to keep under Daily's delete limit."""
        try:
            await self._retried("delete_room", "DELETE", f"rooms/{name}", mutating=True, pace=pace)
        except UpstreamError as exc:
            if exc.status != 404:
                raise

    async def list_rooms(self, *, max_pages: int = 10) -> list[str]:
        """Names of the domain's rooms, 100 a page, at most `max_pages` pages.

        Daily documents the list as newest first, with `ending_before=<id>` for the rooms
        created before that one and `starting_after=<id>` for those created after it; a cursor
        API may as well read `starting_after` as "listed after it". The sweep relies on
        neither: from the last room of the latest page that brought new rooms it asks with the
        cursor that brought them (the documented one, `ending_before`, first), tries the other
        cursor when a page brings none (a repeated page, or no progress), and stops when
        neither does, or after a short page that did.
        """
        names: dict[str, None] = {}
        cursors = ["ending_before", "starting_after"]
        params: dict[str, str] = {"limit": str(ROOMS_PAGE)}
        last: str | None = None
        pages = barren = 0
        while pages < max_pages and barren < len(cursors):
            page = await self._rooms_page(params)
            fresh = [r for r in page if r.name not in names]
            names.update(dict.fromkeys(r.name for r in fresh))
            if fresh:
                pages, barren = pages + 1, 0
                last = next((r.id for r in reversed(page) if r.id), None)
                if len(page) < ROOMS_PAGE or last is None:
                    break
            else:
                barren += 1
                if last is None:
                    break
                cursors.append(cursors.pop(0))
            params = {"limit": str(ROOMS_PAGE), cursors[0]: last}
        return list(names)

    async def _rooms_page(self, params: dict[str, str]) -> list[_ListedRoom]:
        data = (await self._retried("list_rooms", "GET", "rooms", params=params)).json()
        page = data.get("data") if isinstance(data, dict) else None
        if not isinstance(page, list):
            return []
        return [
            _ListedRoom(str(r["name"]), r["id"] if isinstance(r.get("id"), str) else None)
            for r in page
            if isinstance(r, dict) and "name" in r
        ]

    async def presence(self, name: str) -> list[dict[str, Any]]:
        """Who is in the room now."""
        data = (await self._retried("presence", "GET", f"rooms/{name}/presence")).json()
        return list(data.get("data") or []) if isinstance(data, dict) else []


def _room(data: Any) -> Room:
    try:
        return Room(name=str(data["name"]), url=str(data["url"]), privacy=str(data["privacy"]))
    except (KeyError, TypeError):
        raise UpstreamError(
            "daily room answer lacks name/url/privacy", api=API, operation="room"
        ) from None

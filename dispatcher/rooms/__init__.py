"""Where users and bots meet: the room (transport) backend interface."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from dispatcher.pacing import Pace


@dataclass(frozen=True)
class RoomPlan:
    """A room decided before it exists: its name and URL, the two tokens, and its properties.

    A transport without rooms (webrtc) plans an empty name and URL: nothing to create; its
    properties are what its peers use (webrtc: `iceServers`). `made_ahead`: the room exists
    already (the room stock, dispatcher/rooms/stock.py), nothing to create either.
    """

    name: str
    url: str
    user_token: str = field(repr=False)
    bot_token: str = field(repr=False)
    expires_at: float
    properties: dict[str, Any] = field(default_factory=dict)
    made_ahead: bool = False


@dataclass(frozen=True)
class BotContract:
    """What a transport adds to the bot's command line and env."""

    args: tuple[str, ...]
    env: dict[str, str] = field(repr=False)


class RoomBackend(Protocol):
    """Creates and deletes the room of a session; minting tokens needs no I/O."""

    transport: str
    # Whether the session's bot serves HTTP routes the dispatcher proxies (SmallWebRTC offers).
    bot_routes: bool

    async def open(self) -> None:
        """Learn what the backend needs (for Daily, the domain); a no-op once it has.

        Called at start-up, where a failure is only logged (an upstream outage must not stop
        the dispatcher from starting), and again before each start until it succeeds.
        """

    def plan(
        self,
        session_id: str,
        user: str,
        expires_at: float,
        room_properties: dict[str, Any],
        token_properties: dict[str, Any],
        *,
        default_ice_servers: bool = False,
        made_ahead_exp: float | None = None,
    ) -> RoomPlan:
        """Name, URL, tokens and properties of the session's room; no I/O.
        `default_ice_servers`: the client asked for them (`enableDefaultIceServers`; webrtc).
        `made_ahead_exp`: the room was made ahead (named `session_id`), with this `exp`."""

    def answer(self, plan: RoomPlan) -> dict[str, Any]:
        """What `POST /start` answers besides `sessionId` (how the client joins)."""

    def bot_contract(self, plan: RoomPlan) -> BotContract:
        """The bot's command-line arguments and env for this transport."""

    async def create(self, plan: RoomPlan) -> None:
        """Create the planned room (retried; safe against a create that succeeded silently)."""

    async def delete(self, name: str, *, pace: Pace | None = None) -> None:
        """Delete the room; a room that is already gone counts as deleted. `pace`, when given,
        is awaited before each attempt (a rate limiter's turn, retries included)."""

    async def delete_many(self, names: list[str], *, pace: Pace | None = None) -> None:
        """Delete rooms in as few calls as the backend allows (`pace` as for `delete`); rooms
        already gone count as deleted."""

    async def inventory(self) -> list[str]:
        """Names of the rooms the backend holds now (bounded; may miss the oldest)."""

    async def check(self) -> None:
        """Raise if the backend cannot be reached."""

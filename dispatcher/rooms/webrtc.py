"""Peer-to-peer sessions over Pipecat's SmallWebRTC: no rooms, offers proxied to the bot.

The client gets `{"sessionId", "iceConfig"}` (as Pipecat Cloud and the Pipecat runner answer)
and posts its SDP offer to `/sessions/{id}/api/offer`, which the dispatcher forwards to the
session's bot (see `dispatcher.http.proxy`). There is nothing to create or delete. The client and
the bot get the same ICE servers: `ICE_SERVERS`, then, for a client that asked for them
(`enableDefaultIceServers`), the `DEFAULT_ICE_SERVERS` not already listed.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from dispatcher.pacing import Pace
from dispatcher.rooms import BotContract, RoomPlan

log = logging.getLogger(__name__)

TRANSPORT = "webrtc"


class WebRTCRooms:
    """The room backend of the `webrtc` transport."""

    transport = TRANSPORT
    bot_routes = True

    def __init__(
        self, ice_servers: tuple[str, ...] = (), default_ice_servers: tuple[str, ...] = ()
    ) -> None:
        self._ice_servers = ice_servers
        self._default_ice_servers = default_ice_servers

    async def open(self) -> None:
        """Nothing to learn."""

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
        """No room, only the session's ICE servers: Daily's room and token properties do not
        apply (and are ignored)."""
        if room_properties or token_properties:
            log.info("room and token properties ignored: they apply to daily sessions only")
        urls = self._ice_servers
        if default_ice_servers:
            urls = tuple(dict.fromkeys((*urls, *self._default_ice_servers)))
        return RoomPlan(
            name="",
            url="",
            user_token="",
            bot_token="",
            expires_at=expires_at,
            properties={"iceServers": [{"urls": list(urls)}] if urls else []},
        )

    def answer(self, plan: RoomPlan) -> dict[str, Any]:
        """The ICE servers the client should use (none on localhost and most LANs)."""
        return {"iceConfig": {"iceServers": plan.properties["iceServers"]}}

    def bot_contract(self, plan: RoomPlan) -> BotContract:
        """`--transport webrtc`; the bot's listening address comes from the machine backend."""
        return BotContract(
            args=("--transport", TRANSPORT),
            env={
                "BOT_TRANSPORT": TRANSPORT,
                "ICE_SERVERS": json.dumps(plan.properties["iceServers"]),
            },
        )

    async def create(self, plan: RoomPlan) -> None:
        """Nothing to create."""

    async def delete(self, name: str, *, pace: Pace | None = None) -> None:
        """Nothing to delete."""

    async def delete_many(self, names: list[str], *, pace: Pace | None = None) -> None:
        """Nothing to delete."""

    async def inventory(self) -> list[str]:
        """No rooms to list."""
        return []

    async def check(self) -> None:
        """Always available."""

"""Peer-to-peer sessions over Pipecat's SmallWebRTC: no rooms, offers proxied to the bot.

The client gets `{"sessionId", "iceConfig"}` (as Pipecat Cloud and the Pipecat runner answer)
and posts its SDP offer to `/sessions/{id}/api/offer`, which the dispatcher forwards to the
session's bot (see `dispatcher.proxy`). There is nothing to create or delete.
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

    def __init__(self, ice_servers: tuple[str, ...] = ()) -> None:
        self._ice_servers = [{"urls": list(ice_servers)}] if ice_servers else []

    async def open(self) -> None:
        """Nothing to learn."""

    def plan(
        self,
        session_id: str,
        user: str,
        expires_at: float,
        room_properties: dict[str, Any],
        token_properties: dict[str, Any],
    ) -> RoomPlan:
        """No room: Daily's room and token properties do not apply (and are ignored)."""
        if room_properties or token_properties:
            log.info("room and token properties ignored: they apply to daily sessions only")
        return RoomPlan(name="", url="", user_token="", bot_token="", expires_at=expires_at)

    def answer(self, plan: RoomPlan) -> dict[str, Any]:
        """The ICE servers the client should use (none on localhost and most LANs)."""
        return {"iceConfig": {"iceServers": self._ice_servers}}

    def bot_contract(self, plan: RoomPlan) -> BotContract:
        """`--transport webrtc`; the bot's listening address comes from the machine backend."""
        return BotContract(
            args=("--transport", TRANSPORT),
            env={"BOT_TRANSPORT": TRANSPORT, "ICE_SERVERS": json.dumps(self._ice_servers)},
        )

    async def create(self, plan: RoomPlan) -> None:
        """Nothing to create."""

    async def delete(self, name: str, *, pace: Pace | None = None) -> None:
        """Nothing to delete."""

    async def inventory(self) -> list[str]:
        """No rooms to list."""
        return []

    async def check(self) -> None:
        """Always available."""

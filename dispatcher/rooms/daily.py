"""Daily rooms: private, named after the session, with self-signed meeting tokens."""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import replace
from typing import Any

import jwt

from dispatcher.config import Secret
from dispatcher.errors import BadRequest, ErrorCode, UpstreamError
from dispatcher.pacing import Pace
from dispatcher.rooms import BotContract, RoomPlan
from dispatcher.rooms.daily_api import DailyAPI, Domain
from dispatcher.rooms.daily_properties import CLAIMS, ROOM, TOKEN, Property
from dispatcher.upstream import RetryPolicy

log = logging.getLogger(__name__)

# The longest string a client may give where Daily documents no values (a `user_name`): the
# dispatcher's own limit, which keeps the tokens small.
MAX_PROPERTY_LENGTH = 64


def _for_clients(prop: Property) -> Property:
    """Daily's fact about a property, with the dispatcher's length limit on a free string."""
    if prop.type == "string" and not prop.values and prop.max_length is None:
        return replace(prop, max_length=MAX_PROPERTY_LENGTH)
    return prop


# Room properties a client may set: none of them costs money or weakens the room's limits.
ROOM_PROPERTIES: dict[str, Property] = {
    name: _for_clients(ROOM[name])
    for name in (
        "enable_prejoin_ui",
        "enable_chat",
        "enable_knocking",
        "enable_people_ui",
        "enable_screenshare",
        "start_video_off",
        "start_audio_off",
        "lang",
        "geo",
    )
}
# Meeting-token properties a client may set (each becomes its claim in a self-signed token).
TOKEN_PROPERTIES: dict[str, Property] = {
    name: _for_clients(TOKEN[name])
    for name in ("user_name", "start_video_off", "start_audio_off", "enable_screenshare", "lang")
}
GEO_REGIONS = ROOM["geo"].values
MAX_PARTICIPANTS = 2
# Daily's budget is 20 requests a second, or 100 per 5 s, for most endpoints (reference/daily.md
# §2). Room creates take 15 a second of it, room delete calls 1.6 (up to 100 rooms each:
# dispatcher/janitor.py), and the rest is left for the odd room lookup, room list and readiness
# check.
ROOM_CREATE_RATE = 15.0
ROOM_CREATE_BURST = 10
ROOM_EXP_MARGIN_S = 300


def room_exp(session_expires_at: float) -> int:
    """The `exp` of a session's room: its hard end plus a margin (unix seconds)."""
    return int(session_expires_at) + ROOM_EXP_MARGIN_S


MAX_USER_ID = 36


def check_room_properties(props: dict[str, Any]) -> dict[str, Any]:
    """The client's room properties if each is allowed and of a type and value Daily takes,
    else BadRequest naming the property."""
    return _checked(props, ROOM_PROPERTIES, "dailyRoomProperties")


def check_token_properties(props: dict[str, Any]) -> dict[str, Any]:
    """The client's token properties if each is allowed and of a type and value Daily takes,
    else BadRequest naming the property."""
    return _checked(props, TOKEN_PROPERTIES, "dailyMeetingTokenProperties")


def _checked(props: dict[str, Any], allowed: dict[str, Property], field: str) -> dict[str, Any]:
    for key, value in props.items():
        rule = allowed.get(key)
        if rule is None:
            raise BadRequest(
                f"{field}.{key} may not be set by a client", code=ErrorCode.PROPERTY_NOT_ALLOWED
            )
        if not rule.allows(value):
            raise BadRequest(
                f"{field}.{key} must be {rule.expected}", code=ErrorCode.INVALID_PROPERTY
            )
    return props


def daily_user_id(user: str) -> str:
    """The user's id as Daily's `user_id` (at most 36 characters; longer ids are hashed)."""
    if len(user) <= MAX_USER_ID:
        return user
    return "u-" + hashlib.sha256(user.encode()).hexdigest()[: MAX_USER_ID - 2]


class DailyRooms:
    """The room backend on Daily's REST API."""

    transport = "daily"
    bot_routes = False

    def __init__(self, api: DailyAPI, api_key: Secret, retry: RetryPolicy) -> None:
        self._api = api
        self._key = api_key
        self._retry = retry
        self._domain: Domain | None = None

    async def open(self) -> None:
        """Fetch the key's domain (needed for room URLs and self-signed tokens) until known."""
        if self._domain is None:
            self._domain = await self._api.domain()

    @property
    def domain(self) -> Domain:
        """The domain learnt at start-up."""
        if self._domain is None:
            raise RuntimeError("DailyRooms.open() was not awaited")
        return self._domain

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
        """A private room named after the session, its URL and two self-signed tokens (ICE
        servers are Daily's business: `default_ice_servers` does not apply). The tokens expire
        with the session's room `exp`; a room made ahead keeps its own, later, `exp`."""
        exp = room_exp(expires_at)
        made_exp = exp if made_ahead_exp is None else int(made_ahead_exp)
        properties = {
            **room_properties,
            "exp": made_exp,
            "eject_at_room_exp": True,
            "max_participants": MAX_PARTICIPANTS,
        }
        user_claims = {CLAIMS[k]: v for k, v in token_properties.items()} | {
            "o": False,
            "ud": daily_user_id(user),
        }
        bot_claims = {"o": True, "u": "Pipecat Bot", "ud": f"bot-{session_id}"}
        return RoomPlan(
            name=session_id,
            url=f"https://{self.domain.name}.daily.co/{session_id}",
            user_token=self._token(session_id, exp, user_claims),
            bot_token=self._token(session_id, exp, bot_claims),
            expires_at=made_exp,
            properties=properties,
            made_ahead=made_ahead_exp is not None,
        )

    def answer(self, plan: RoomPlan) -> dict[str, Any]:
        """The room URL and the user's token, as Pipecat Cloud answers."""
        return {"dailyRoom": plan.url, "dailyToken": plan.user_token}

    def bot_contract(self, plan: RoomPlan) -> BotContract:
        """`--room-url`, and the room URL and the bot's own token in its env."""
        return BotContract(
            args=("--room-url", plan.url),
            env={
                "BOT_TRANSPORT": "daily",
                "DAILY_ROOM_URL": plan.url,
                "DAILY_TOKEN": plan.bot_token,
            },
        )

    def _token(self, room: str, exp: int, claims: dict[str, Any]) -> str:
        payload = {**claims, "r": room, "d": self.domain.id, "iat": int(time.time()), "exp": exp}
        return jwt.encode(payload, self._key.reveal(), algorithm="HS256")

    async def create(self, plan: RoomPlan) -> None:
        """Create the room; after an ambiguous failure, a room already there is adopted."""
        maybe_created = False
        async for attempt in self._retry.retrying():
            with attempt:
                if maybe_created and await self._api.get_room(plan.name) is not None:
                    return
                try:
                    await self._api.create_room(
                        plan.name,
                        privacy="private",
                        properties=plan.properties,
                        attempt=attempt.retry_state.attempt_number,
                    )
                except UpstreamError as exc:
                    maybe_created = maybe_created or exc.ambiguous
                    raise
                return

    async def delete(self, name: str, *, pace: Pace | None = None) -> None:
        """Delete the room (404 counts as done), awaiting `pace` before each attempt."""
        await self._api.delete_room(name, pace=pace)

    async def delete_many(self, names: list[str], *, pace: Pace | None = None) -> None:
        """Delete rooms in one batch call (rooms already gone count as deleted), awaiting `pace`
        before each attempt. A batch refused with a 4xx other than 429 (Daily does not say
        whether one unknown name fails the batch) is deleted one room at a time."""
        try:
            await self._api.delete_rooms(names, pace=pace)
            return
        except UpstreamError as exc:
            if exc.status is None or exc.status >= 500 or exc.status == 429 or len(names) == 1:
                raise
            log.warning("batch room delete refused (%s): deleting one at a time", exc)
        for name in names:
            await self._api.delete_room(name, pace=pace)

    async def make_ahead(self, names: list[str], exp: int) -> bool:
        """Make private rooms ahead of their sessions in one batch call (all or none), each
        with `exp` and the limits `plan` gives; whether they exist. After an ambiguous failure
        one room is looked up: the batch is all or none, so it tells for every room."""
        properties = {"exp": exp, "eject_at_room_exp": True, "max_participants": MAX_PARTICIPANTS}
        rooms = [{"name": n, "privacy": "private", "properties": properties} for n in names]
        try:
            await self._api.create_rooms(rooms)
        except UpstreamError as exc:
            if not exc.ambiguous:
                raise
            log.warning("batch room create may have failed (%s): looking one room up", exc)
            return await self._api.get_room(names[0]) is not None
        return True

    async def inventory(self) -> list[str]:
        """Names of the rooms Daily holds for our domain (up to a thousand)."""
        return await self._api.list_rooms()

    async def check(self) -> None:
        """Raise if Daily cannot be reached with our key."""
        self._domain = await self._api.domain()

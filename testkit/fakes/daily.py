"""A stateful emulator of Daily's REST API (`https://api.daily.co/v1`) for loopback tests.

It follows `docs/reference/daily.md`: rooms (one by one and in batches), REST and self-signed
meeting tokens, presence, Daily's error bodies and rate limits. A participant joining a room is
played by `DailyEmulator.join` (or `POST /_emulator/rooms/{name}/join`), which checks a token
the way Daily's media servers would; `GET /_emulator/rooms/{name}/participants` lists who is in it,
for the daily-python stand-in (`testkit/fakes/daily_python/`) to watch. `GET /rooms` lists rooms
newest first, and its cursors go by creation as Daily documents them: `starting_after=<id>`
gives the rooms created after that one, `ending_before=<id>` those created before it (the
`limit` rooms next to it, newest first: [inf]); `rooms_paging` plays other readings of them
(see `ROOM_PAGING`). Not emulated: the up-to-15 s lag of `GET /presence`, webhooks,
recordings, knocking, and Daily's exact `info` strings (debug text only).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import signal
import sys
import time
import uuid
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

import jwt
from jwt.types import Options
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from dispatcher.rooms import daily_properties
from dispatcher.rooms.daily_properties import Property
from testkit.fakes.common import (
    DropConnections,
    DroppedConnection,
    Fault,
    FaultPlan,
    Latency,
    RateLimiter,
    control_routes,
    standalone,
)
from testkit.net import serve

DEFAULT_API_KEY = "7c1f3e0a9b2d4c6e8f0a1b3c5d7e9f1a2b4c6d8e0f1a3b5c7d9e1f2a4b6c8d0e"
DEFAULT_DOMAIN_ID = "5c5a3bde-2b1e-4c8c-9a55-1d2f0e7b9a10"
MAX_PARTICIPANTS = 200
# Reference §2: most endpoints 20 req/s; DELETE /rooms/:name ~2 req/s ("or 50 per 30 s"),
# so a burst of 2: a third quick delete is refused. The batch endpoints (§2: "higher effective
# limits", no figure) count a call as one request, a batch delete as one delete [unv].
RATE_LIMITS = {"api": (20.0, 20), "delete_room": (2.0, 2)}
_NAME = re.compile(r"[A-Za-z0-9_-]{1,128}")
MAX_BATCH = 1000  # rooms a batch call may create or delete (§2)
ROOM_PAGING = ("documented", "stripe", "oldest_first")
"""How `GET /rooms` orders and pages: `documented` (Daily's docs: newest first, `starting_after`
gives rooms created after the cursor room, `ending_before` those created before it); `stripe`
(newest first, each cursor by list position: `starting_after` gives the rooms listed after it,
older ones); `oldest_first` (oldest first, cursors by creation, which is list position here)."""

Check = tuple[Callable[[Any], bool], str]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


BOOL: Check = (lambda v: isinstance(v, bool), "a boolean")
INT: Check = (lambda v: _is_int(v) and v >= 0, "a non-negative integer")
TIME: Check = (lambda v: _is_number(v) and v >= 0, "a unix timestamp in seconds")
STR: Check = (lambda v: isinstance(v, str), "a string")
OBJ: Check = (lambda v: isinstance(v, dict), "an object")
SEATS: Check = (
    lambda v: _is_int(v) and 1 <= v <= MAX_PARTICIPANTS,
    f"an integer between 1 and {MAX_PARTICIPANTS}",
)
# "NULL" is the `geo` default Daily's docs show (reference/daily.md §3); whether a request may
# send it is unverified, so it is accepted beside the documented regions.
GEO: Check = (
    lambda v: v == "NULL" or daily_properties.GEO.allows(v),
    daily_properties.GEO.expected + ' (or "NULL")',
)


def _documented(properties: dict[str, Property]) -> dict[str, Check]:
    """Checks of Daily's documented properties: their types, values and lengths, from the
    dispatcher's copy of the reference (dispatcher/rooms/daily_properties.py), so that the
    emulator refuses what the dispatcher checks against, and no more."""
    return {name: (p.allows, p.expected) for name, p in properties.items()}


# Daily's room properties, then what the emulator knows beyond that table: properties it
# omits, times as floats (as pipecat sends them; kept as whole seconds), the seat limit.
ROOM_PROPERTIES: dict[str, Check] = {
    **_documented(daily_properties.ROOM),
    **dict.fromkeys(["enable_cpu_warning_notifications", "auto_start_transcription"], BOOL),
    "dialin": OBJ, "exp": TIME, "nbf": TIME, "eject_after_elapsed": INT,
    "max_participants": SEATS, "geo": GEO,
}  # fmt: skip
ROOM_DEFAULTS: dict[str, Any] = {
    "max_participants": MAX_PARTICIPANTS, "geo": "NULL", "enable_chat": False,
    "start_video_off": False, "start_audio_off": False, "eject_at_room_exp": False,
    "enable_hidden_participants": False, "enforce_unique_user_ids": False,
}  # fmt: skip

# Self-signed token claims (docs: self-signing-tokens, "Token property abbreviations"), of the
# properties a token request may set.
TOKEN_CLAIMS = {
    name: claim
    for name, claim in daily_properties.CLAIMS.items()
    if name not in ("nbf", "exp", "domain_id")
}
# Daily's token properties, then claims its table omits (`knocking`, `intercom_join_alert`,
# `meeting_join_hook`), and times as floats.
TOKEN_PROPERTIES: dict[str, Check] = {
    **dict.fromkeys(TOKEN_CLAIMS, BOOL),
    **_documented(daily_properties.TOKEN),
    "meeting_join_hook": STR, "exp": TIME, "nbf": TIME, "eject_after_elapsed": INT,
}  # fmt: skip
_PROPERTY_OF_CLAIM = {claim: name for name, claim in TOKEN_CLAIMS.items()}


class JoinRefused(Exception):
    """Daily refused a participant's join; `reason` is a stable code such as `token-expired`."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ApiError(Exception):
    """An error answer of the API: HTTP status and Daily's `{"error", "info"}` body."""

    def __init__(self, status: int, error: str, info: str, **extra: Any) -> None:
        super().__init__(f"{status} {error}: {info}")
        self.status, self.body = status, {"error": error, "info": info, **extra}
        self.headers: dict[str, str] = {}

    def response(self) -> Response:
        return JSONResponse(self.body, self.status, self.headers)


class RecordedRequest(NamedTuple):
    """One API request as received: the JSON body, or its raw text if it did not parse."""

    method: str
    path: str
    query: dict[str, str]
    body: Any


@dataclass
class Participant:
    """Someone in a call; `eject_at` and `token_ejects` come from the token's ejt/eje claims."""

    id: str
    room: str
    user_id: str
    user_name: str | None
    is_owner: bool
    hidden: bool
    join_time: float
    session_id: str
    token_ejects: bool = False
    eject_at: float | None = None
    left_at: float | None = None
    left_reason: str | None = None

    def to_json(self, now: float) -> dict[str, Any]:
        """The presence entry, plus `owner` and `hidden`."""
        return {
            "room": self.room, "id": self.id, "userId": self.user_id, "userName": self.user_name,
            "mtgSessionId": self.session_id, "joinTime": _iso(self.join_time),
            "duration": int(now - self.join_time), "owner": self.is_owner, "hidden": self.hidden,
        }  # fmt: skip


@dataclass
class Room:
    """A room record; `deleted_at` is set once it is deleted (or replaced after expiring)."""

    id: str
    name: str
    privacy: str
    properties: dict[str, Any]
    created_at: float
    seq: int
    participants: dict[str, Participant] = field(default_factory=dict)
    session_id: str | None = None
    deleted_at: float | None = None

    def expired(self, now: float) -> bool:
        """Past `exp`: Daily treats the room as implicitly deleted."""
        exp = self.properties.get("exp")
        return exp is not None and now >= exp

    def to_json(self, domain_name: str) -> dict[str, Any]:
        """The room object; `config` lists non-default properties only."""
        config = {k: v for k, v in self.properties.items() if ROOM_DEFAULTS.get(k, ...) != v}
        return {
            "id": self.id, "name": self.name, "api_created": True, "privacy": self.privacy,
            "url": f"https://{domain_name}.daily.co/{self.name}",
            "created_at": _iso(self.created_at), "config": config,
        }  # fmt: skip


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _invalid(info: str) -> ApiError:
    return ApiError(400, "invalid-request-error", info)


def _not_found(name: str, **extra: Any) -> ApiError:
    return ApiError(404, "not-found", f"room {name} not found", **extra)


def _validate(props: Any, schema: dict[str, Check], what: str) -> dict[str, Any]:
    """Type-check `props` against `schema`; unknown names and wrong types are 400s."""
    if not isinstance(props, dict):
        raise _invalid("properties must be an object")
    for name, value in props.items():
        if name not in schema:
            raise _invalid(f"unknown {what} property '{name}'")
        check, expected = schema[name]
        if value is not None and not check(value):
            raise _invalid(f"{what} property '{name}' must be {expected}")
    return {k: int(v) if k in ("exp", "nbf") and v is not None else v for k, v in props.items()}


def _only_keys(body: dict[str, Any], allowed: set[str]) -> None:
    for key in body:
        if key not in allowed:
            raise _invalid(f"unknown parameter '{key}'")


def _privacy(value: Any) -> str:
    if value not in ("public", "private"):
        raise _invalid("privacy must be 'public' or 'private'")
    return str(value)


class DailyEmulator:
    """Daily's REST API as a Starlette app (`.app`), with its state public for tests.

    `rooms` maps a name to its current record, expired rooms included (check
    `Room.expired(now)`); deleted rooms, and expired ones replaced by a new room of the same
    name, move to `deleted`. `departures` lists participants who left or were ejected.
    """

    def __init__(
        self,
        *,
        api_key: str = DEFAULT_API_KEY,
        domain_name: str = "pipecat-test",
        domain_id: str = DEFAULT_DOMAIN_ID,
        rate_limits: bool = True,
        retry_after_header: bool = False,
        clock: Callable[[], float] = time.time,
        rooms_paging: str = "documented",
    ) -> None:
        if rooms_paging not in ROOM_PAGING:
            raise ValueError(f"rooms_paging must be one of {ROOM_PAGING}")
        self.rooms_paging = rooms_paging
        self.api_key, self.domain_name, self.domain_id = api_key, domain_name, domain_id
        self.retry_after_header = retry_after_header
        self.clock = clock
        self.rooms: dict[str, Room] = {}
        self.deleted: list[Room] = []
        self.departures: list[Participant] = []
        self.requests: list[RecordedRequest] = []
        # When each of `requests` arrived (time.monotonic()), before the rate limit saw it.
        self.arrivals: list[float] = []
        self.faults = FaultPlan()
        self.latency = Latency()
        self.limiter = RateLimiter(RATE_LIMITS, enabled=rate_limits)
        self._seq = 0
        self.app = Starlette(
            routes=self._routes(),
            middleware=[Middleware(DropConnections)],
            exception_handlers={HTTPException: self._http_error},
        )

    # -- participants -------------------------------------------------------------------

    def join(self, room_name: str, token: str | None = None) -> dict[str, Any]:
        """Play a participant joining `room_name` with `token`, checked as Daily would."""
        now = self.clock()
        self._sweep(now)
        room = self.rooms.get(room_name)
        if room is None:
            raise JoinRefused("room-not-found")
        claims = self._admission(room, token, now)
        pid = str(uuid.uuid4())
        user_id = str(claims.get("ud") or pid)
        unique = room.properties.get("enforce_unique_user_ids")
        displaced = [p for p in room.participants.values() if unique and p.user_id == user_id]
        seats = room.properties.get("max_participants", MAX_PARTICIPANTS)
        if len(room.participants) - len(displaced) >= seats:
            raise JoinRefused("room-full")
        for other in displaced:
            self._depart(room, other, now, "duplicate-user-id")
        if not room.participants:
            room.session_id = str(uuid.uuid4())
        owner = bool(claims.get("o", False))
        deadlines = [claims["exp"]] if claims.get("ejt") and claims.get("exp") else []
        if claims.get("eje") is not None:
            deadlines.append(now + claims["eje"])
        participant = Participant(
            id=pid, room=room.name, user_id=user_id, user_name=claims.get("u"), is_owner=owner,
            hidden=bool(room.properties.get("enable_hidden_participants")) and not owner,
            join_time=now, session_id=str(room.session_id),
            token_ejects=bool(claims.get("ejt")) or claims.get("eje") is not None,
            eject_at=min(deadlines, default=None),
        )  # fmt: skip
        room.participants[pid] = participant
        return participant.to_json(now)

    def leave(self, room_name: str, participant_id: str) -> dict[str, Any]:
        """Play a participant leaving; KeyError if it is not in that room."""
        now = self.clock()
        room = self.rooms[room_name]
        return self._depart(room, room.participants[participant_id], now, "left").to_json(now)

    def _admission(self, room: Room, token: str | None, now: float) -> dict[str, Any]:
        """The token's claims if it may enter `room` now ({} for no token), else JoinRefused."""
        nbf = room.properties.get("nbf")
        if room.expired(now):
            raise JoinRefused("room-expired")
        if nbf is not None and now < nbf:
            raise JoinRefused("room-not-yet-open")
        if token is None:
            if room.privacy == "private":
                raise JoinRefused("token-required")
            return {}
        claims = self._decode(token, now)
        if claims.get("r", room.name) != room.name:
            raise JoinRefused("token-wrong-room")
        return claims

    def _depart(self, room: Room, participant: Participant, now: float, reason: str) -> Participant:
        del room.participants[participant.id]
        participant.left_at, participant.left_reason = now, reason
        self.departures.append(participant)
        return participant

    def _eject_deadline(self, room: Room, participant: Participant) -> float | None:
        if participant.token_ejects:
            return participant.eject_at
        props, deadlines = room.properties, []
        if props.get("eject_at_room_exp") and props.get("exp") is not None:
            deadlines.append(props["exp"])
        if props.get("eject_after_elapsed") is not None:
            deadlines.append(participant.join_time + props["eject_after_elapsed"])
        return min(deadlines, default=None)

    def _sweep(self, now: float) -> None:
        """Eject everyone whose token or room deadline has passed."""
        for room in self.rooms.values():
            for participant in list(room.participants.values()):
                deadline = self._eject_deadline(room, participant)
                if deadline is not None and now >= deadline:
                    self._depart(room, participant, now, "ejected")

    def _retire(self, room: Room, now: float) -> None:
        """Delete `room`: eject its participants and move it to `deleted`."""
        for participant in list(room.participants.values()):
            self._depart(room, participant, now, "room-deleted")
        room.deleted_at = now
        del self.rooms[room.name]
        self.deleted.append(room)

    # -- tokens -------------------------------------------------------------------------

    def sign(self, claims: dict[str, Any]) -> str:
        """A JWT signed HS256 with the API key, like Daily's own and self-signed tokens."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", jwt.InsecureKeyLengthWarning)
            return jwt.encode(claims, self.api_key, algorithm="HS256")

    def _decode(self, token: str, now: float, ignore_nbf: bool = False) -> dict[str, Any]:
        """The claims of a token valid for this domain now, else JoinRefused with the reason."""
        options: Options = {"verify_exp": False, "verify_nbf": False, "verify_iat": False}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", jwt.InsecureKeyLengthWarning)
                claims = jwt.decode(token, self.api_key, algorithms=["HS256"], options=options)
        except jwt.PyJWTError as exc:
            raise JoinRefused("token-invalid") from exc
        exp, nbf = claims.get("exp"), claims.get("nbf")
        if claims.get("d") != self.domain_id:
            raise JoinRefused("token-wrong-domain")
        if not all(_is_number(t) for t in (exp, nbf) if t is not None):
            raise JoinRefused("token-invalid")
        if len(str(claims.get("ud", ""))) > 36:
            raise JoinRefused("token-invalid")
        if exp is not None and now >= exp:
            raise JoinRefused("token-expired")
        if nbf is not None and now < nbf and not ignore_nbf:
            raise JoinRefused("token-not-yet-valid")
        return dict(claims)

    # -- REST operations ------------------------------------------------------------------

    def _domain(self, request: Request, body: Any) -> dict[str, Any]:
        config = {"hide_daily_branding": False, "hipaa": False, "lang": "en"}
        return {"domain_name": self.domain_name, "domain_id": self.domain_id, "config": config}

    def _create_room(self, request: Request, body: Any) -> dict[str, Any]:
        room = self._new_room(_object(body), self.clock(), set())
        self._add(room)
        return room.to_json(self.domain_name)

    def _new_room(self, body: dict[str, Any], now: float, taken: set[str]) -> Room:
        """The room `body` asks for, checked as Daily would (not added yet); `taken` holds
        the names earlier rooms of the same batch take."""
        _only_keys(body, {"name", "privacy", "properties"})
        name = body.get("name") or uuid.uuid4().hex[:20]
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise _invalid("name may only contain A-Z, a-z, 0-9, '-' and '_', at most 128 chars")
        privacy = _privacy(body.get("privacy", "public"))
        props = _validate(body.get("properties", {}), ROOM_PROPERTIES, "room")
        old = self.rooms.get(name)
        if name in taken or (old is not None and not old.expired(now)):
            raise _invalid(f"a room named {name} already exists")
        taken.add(name)
        return Room(
            id=str(uuid.uuid4()), name=name, privacy=privacy, created_at=now, seq=0,
            properties={k: v for k, v in props.items() if v is not None},
        )  # fmt: skip

    def _add(self, room: Room) -> None:
        if (old := self.rooms.get(room.name)) is not None:
            self._retire(old, room.created_at)
        self._seq += 1
        room.seq = self._seq
        self.rooms[room.name] = room

    def _create_rooms(self, request: Request, body: Any) -> list[dict[str, Any]]:
        """`POST /batch/rooms`: every room or none; the answer is the rooms made, as
        `GET /rooms/:name` answers each [unv: docs/reference/daily.md §2]."""
        specs = _batch(_object(body), dict)
        now, taken = self.clock(), set[str]()
        made = [self._new_room(spec, now, taken) for spec in specs]
        for room in made:
            self._add(room)
        return [room.to_json(self.domain_name) for room in made]

    def _delete_rooms(self, request: Request, body: Any) -> dict[str, Any]:
        """`DELETE /batch/rooms`: the named rooms Daily has (live or past `exp`) are deleted;
        the answer is `{"deleted_count": N}` (Daily's OpenAPI page), N counting live rooms."""
        names = _batch(_object(body), str)
        now, count = self.clock(), 0
        for name in dict.fromkeys(names):
            room = self.rooms.get(name)
            if room is None:
                continue
            count += not room.expired(now)
            self._retire(room, now)
        return {"deleted_count": count}

    def _live_room(self, name: str) -> Room:
        room = self.rooms.get(name)
        if room is None or room.expired(self.clock()):
            raise _not_found(name)
        return room

    def _list_rooms(self, request: Request, body: Any) -> dict[str, Any]:
        now, query = self.clock(), request.query_params
        newest_first = self.rooms_paging != "oldest_first"
        live = sorted(
            (r for r in self.rooms.values() if not r.expired(now)),
            key=lambda r: r.seq,
            reverse=newest_first,
        )
        limit = _limit(query.get("limit"))
        page = live[:limit]
        if after := query.get("starting_after"):
            page = self._beside(live, self._cursor(after), limit, starting_after=True)
        elif (before := query.get("ending_before")) == "OLDEST":
            page = live[-limit:] if newest_first else live[:limit]
        elif before:
            page = self._beside(live, self._cursor(before), limit, starting_after=False)
        data = [r.to_json(self.domain_name) for r in page]
        return {"total_count": len(live), "data": data}

    def _beside(
        self, listed: list[Room], seq: int, limit: int, *, starting_after: bool
    ) -> list[Room]:
        """The `limit` rooms of `listed` next to the cursor room (`seq`), on its side that the
        cursor asks for under `rooms_paging`."""
        newest_first = self.rooms_paging != "oldest_first"
        later = [r for r in listed if r.seq > seq]  # created after it
        earlier = [r for r in listed if r.seq < seq]
        if self.rooms_paging == "stripe":
            listed_after = starting_after
            chosen = earlier if starting_after else later
        else:
            chosen = later if starting_after else earlier
            listed_after = (chosen is earlier) == newest_first
        return chosen[:limit] if listed_after else chosen[-limit:]

    def _cursor(self, room_id: str) -> int:
        for room in [*self.rooms.values(), *self.deleted]:
            if room.id == room_id:
                return room.seq
        raise _invalid(f"no room with id {room_id}")

    def _get_room(self, request: Request, body: Any) -> dict[str, Any]:
        return self._live_room(request.path_params["name"]).to_json(self.domain_name)

    def _update_room(self, request: Request, body: Any) -> dict[str, Any]:
        room = self._live_room(request.path_params["name"])
        body = _object(body)
        _only_keys(body, {"privacy", "properties"})
        privacy = _privacy(body.get("privacy", room.privacy))
        props = _validate(body.get("properties", {}), ROOM_PROPERTIES, "room")
        room.privacy = privacy
        for key, value in props.items():
            if value is None:
                room.properties.pop(key, None)
            else:
                room.properties[key] = value
        return room.to_json(self.domain_name)

    def _delete_room(self, request: Request, body: Any) -> dict[str, Any]:
        name, now = request.path_params["name"], self.clock()
        room = self.rooms.get(name)
        if room is None:
            raise _not_found(name)
        self._retire(room, now)
        if room.expired(now):
            raise _not_found(name, deleted=True)
        return {"deleted": True, "name": name}

    def _create_token(self, request: Request, body: Any) -> dict[str, Any]:
        body = _object(body)
        _only_keys(body, {"properties"})
        props = _validate(body.get("properties", {}), TOKEN_PROPERTIES, "meeting token")
        claims = {TOKEN_CLAIMS.get(k, k): v for k, v in props.items() if v is not None}
        claims.update(d=self.domain_id, iat=int(self.clock()))
        return {"token": self.sign(claims)}

    def _get_token(self, request: Request, body: Any) -> dict[str, Any]:
        ignore_nbf = request.query_params.get("ignoreNbf", "").lower() == "true"
        try:
            claims = self._decode(request.path_params["token"], self.clock(), ignore_nbf)
        except JoinRefused as exc:
            raise _invalid(f"meeting token refused: {exc.reason}") from exc
        return {_PROPERTY_OF_CLAIM.get(c, c): v for c, v in claims.items() if c not in ("d", "iat")}

    def _room_presence(self, request: Request, body: Any) -> dict[str, Any]:
        room, query = self._live_room(request.path_params["name"]), request.query_params
        now = self.clock()
        entries = [p.to_json(now) for p in room.participants.values() if not p.hidden]
        for param in ("userId", "userName"):
            if param in query:
                entries = [e for e in entries if e[param] == query[param]]
        return {"total_count": len(entries), "data": entries[: _limit(query.get("limit"))]}

    def _presence(self, request: Request, body: Any) -> dict[str, Any]:
        now = self.clock()
        return {
            room.name: entries
            for room in self.rooms.values()
            if (entries := [p.to_json(now) for p in room.participants.values() if not p.hidden])
        }

    # -- plumbing -------------------------------------------------------------------------

    def _routes(self) -> list[Route]:
        api = [
            ("/", "GET", "domain", self._domain),
            ("/rooms", "POST", "create_room", self._create_room),
            ("/rooms", "GET", "list_rooms", self._list_rooms),
            ("/rooms/{name}", "GET", "get_room", self._get_room),
            ("/rooms/{name}", "POST", "update_room", self._update_room),
            ("/rooms/{name}", "DELETE", "delete_room", self._delete_room),
            ("/rooms/{name}/presence", "GET", "presence", self._room_presence),
            ("/presence", "GET", "presence", self._presence),
            ("/batch/rooms", "POST", "create_rooms", self._create_rooms),
            ("/batch/rooms", "DELETE", "delete_rooms", self._delete_rooms),
            ("/meeting-tokens", "POST", "create_token", self._create_token),
            ("/meeting-tokens/{token}", "GET", "get_token", self._get_token),
        ]
        return [
            *(Route(path, self._endpoint(op, fn), methods=[verb]) for path, verb, op, fn in api),
            Route("/_emulator/rooms/{name}/join", self._control_join, methods=["POST"]),
            Route("/_emulator/rooms/{name}/leave", self._control_leave, methods=["POST"]),
            Route(
                "/_emulator/rooms/{name}/participants", self._control_participants, methods=["GET"]
            ),
            *control_routes(self.faults, self.latency, self.limiter, self.state),
        ]

    def _endpoint(
        self, op: str, operation: Callable[[Request, Any], Any]
    ) -> Callable[[Request], Awaitable[Response]]:
        """Auth, rate limit, latency, injected fault, then the operation itself."""

        async def endpoint(request: Request) -> Response:
            raw = await request.body()
            body = _parse(raw)
            logged = raw.decode(errors="replace") if body is _UNPARSEABLE else body
            query = dict(request.query_params)
            self.requests.append(RecordedRequest(request.method, request.url.path, query, logged))
            self.arrivals.append(time.monotonic())
            fault: Fault | None = None
            try:
                self._authenticate(request)
                self._throttle("delete_room" if op.startswith("delete_room") else "api")
                await self.latency.sleep(op)
                fault = self.faults.take(op)
                if fault is not None and not fault.apply_first:
                    return await _fault_response(fault)
                if body is _UNPARSEABLE:
                    raise ApiError(400, "json-parsing-error", "request body is not valid JSON")
                self._sweep(self.clock())
                result = operation(request, body)
            except ApiError as exc:
                return exc.response()
            return await _fault_response(fault) if fault else JSONResponse(result)

        return endpoint

    def _authenticate(self, request: Request) -> None:
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise ApiError(400, "authorization-header-error", "expected 'Bearer <api key>'")
        if key.strip() != self.api_key:
            raise ApiError(401, "authentication-error", "unknown API key")

    def _throttle(self, action: str) -> None:
        wait = self.limiter.check(action)
        if wait is not None:
            error = ApiError(429, "rate-limit-error", f"rate limit exceeded ({action})")
            if self.retry_after_header:
                error.headers["Retry-After"] = str(max(1, int(wait + 0.999)))
            raise error

    async def _control_join(self, request: Request) -> Response:
        data = await request.json()
        try:
            return JSONResponse(self.join(request.path_params["name"], data.get("token")))
        except JoinRefused as exc:
            return JSONResponse({"error": exc.reason}, 403)

    async def _control_leave(self, request: Request) -> Response:
        data = await request.json()
        try:
            return JSONResponse(self.leave(request.path_params["name"], str(data["id"])))
        except KeyError:
            return JSONResponse({"error": "not-found"}, 404)

    async def _control_participants(self, request: Request) -> Response:
        now = self.clock()
        self._sweep(now)
        room = self.rooms.get(request.path_params["name"])
        if room is None:
            return JSONResponse({"error": "not-found"}, 404)
        return JSONResponse([p.to_json(now) for p in room.participants.values()])

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        error = "not-found" if status == 404 else "invalid-request-error"
        return JSONResponse({"error": error, "info": str(exc)}, status)

    def state(self) -> dict[str, Any]:
        """A JSON summary for `GET /_emulator/state`."""
        now = self.clock()
        self._sweep(now)
        return {
            "domain_name": self.domain_name,
            "domain_id": self.domain_id,
            "rooms": {
                name: {
                    **room.to_json(self.domain_name),
                    "expired": room.expired(now),
                    "participants": [p.to_json(now) for p in room.participants.values()],
                }
                for name, room in self.rooms.items()
            },
            "deleted": [room.name for room in self.deleted],
            "requests": len(self.requests),
            "faults_pending": self.faults.pending(),
            "rate_limited": self.limiter.refused,
        }


_UNPARSEABLE = object()


def _parse(raw: bytes) -> Any:
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return _UNPARSEABLE


def _object(body: Any) -> dict[str, Any]:
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise _invalid("request body must be a JSON object")
    return body


def _batch(body: dict[str, Any], kind: type) -> list[Any]:
    """The `rooms` of a batch call: 1 to MAX_BATCH items of `kind`, else a 400."""
    _only_keys(body, {"rooms"})
    rooms = body.get("rooms")
    if not isinstance(rooms, list) or not 1 <= len(rooms) <= MAX_BATCH:
        raise _invalid(f"rooms must be an array of 1 to {MAX_BATCH} items")
    if not all(isinstance(r, kind) for r in rooms):
        raise _invalid(f"rooms must hold {'objects' if kind is dict else 'room names'}")
    return rooms


def _limit(value: str | None) -> int:
    if value is None:
        return 100
    if not value.isdigit() or not 1 <= int(value) <= 100:
        raise _invalid("limit must be an integer between 1 and 100")
    return int(value)


async def _fault_response(fault: Fault) -> Response:
    """The answer of an injected fault, after its delay; status 0 drops the connection."""
    if fault.delay_s > 0:
        await asyncio.sleep(fault.delay_s)
    if fault.status == 0:
        raise DroppedConnection
    codes = {400: "invalid-request-error", 401: "authentication-error", 403: "forbidden-error"}
    codes |= {404: "not-found", 429: "rate-limit-error"}
    body = fault.body
    if body is None:
        body = {"error": codes.get(fault.status, "server-error"), "info": "injected"}
    return JSONResponse(body, fault.status, fault.headers)


def main() -> None:
    """`python -m testkit.fakes.daily --port N [--api-key K] [--domain NAME] ...`."""
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--api-key", default=DEFAULT_API_KEY)
    own.add_argument("--domain", default="pipecat-test")
    own.add_argument("--domain-id", default=DEFAULT_DOMAIN_ID)
    own.add_argument("--retry-after-header", action="store_true")
    own.add_argument("--rooms-paging", choices=ROOM_PAGING, default="documented")
    extra, rest = own.parse_known_args()
    sys.argv[1:] = rest
    args = standalone("Emulator of Daily's REST API.", default_port=8788)
    emulator = DailyEmulator(
        api_key=extra.api_key,
        domain_name=extra.domain,
        domain_id=extra.domain_id,
        rate_limits=not args.no_rate_limits,
        retry_after_header=extra.retry_after_header,
        rooms_paging=extra.rooms_paging,
    )
    emulator.latency.default = args.latency
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_run(emulator, args.host, args.port))


async def _run(emulator: DailyEmulator, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with serve(emulator.app, port, host) as url:
        print(f"daily emulator on {url}", flush=True)
        await stop.wait()


if __name__ == "__main__":
    main()

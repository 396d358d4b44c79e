"""A stand-in for the dispatcher's bot callback endpoints, recording every call."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

ROOM_URL = "https://example.daily.co/s-test1"
CALLBACK_TOKEN = "cb-secret-token-0123456789"
DAILY_TOKEN = "daily-secret-token-0123456789"
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@dataclass
class Callback:
    """One callback the recorder received."""

    operation: str
    session_id: str
    authorization: str | None
    traceparent: str | None
    body: Any


@dataclass
class CallbackRecorder:
    """The dispatcher's `/internal/sessions/{id}/ready|ended` endpoints, recording each call.

    `statuses` are answered first, in order (to script failures), then 204.
    """

    statuses: list[int] = field(default_factory=list)
    calls: list[Callback] = field(default_factory=list)
    url: str = ""
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> Starlette:
        """The recorder as a Starlette app."""

        async def callback(request: Request) -> Response:
            self.calls.append(
                Callback(
                    operation=request.path_params["operation"],
                    session_id=request.path_params["session_id"],
                    authorization=request.headers.get("authorization"),
                    traceparent=request.headers.get("traceparent"),
                    body=json.loads(await request.body() or b"null"),
                )
            )
            self.arrived.set()
            return Response(status_code=self.statuses.pop(0) if self.statuses else 204)

        route = Route("/internal/sessions/{session_id}/{operation}", callback, methods=["POST"])
        return Starlette(routes=[route])

    def of(self, operation: str) -> list[Callback]:
        """The calls received for `operation`."""
        return [c for c in self.calls if c.operation == operation]

    async def wait_for(self, operation: str, timeout_s: float = 30.0) -> Callback:
        """The first call for `operation`, once it has arrived."""
        async with asyncio.timeout(timeout_s):
            while not self.of(operation):
                self.arrived.clear()
                await self.arrived.wait()
        return self.of(operation)[0]


def contract_env(dispatcher_url: str, **overrides: str | None) -> dict[str, str]:
    """The bot contract's environment for session s-test1 (an override of None removes it)."""
    env = {
        "SESSION_ID": "s-test1",
        "BOT_TRANSPORT": "daily",
        "DAILY_ROOM_URL": ROOM_URL,
        "DAILY_TOKEN": DAILY_TOKEN,
        "DISPATCHER_URL": dispatcher_url,
        "BOT_CALLBACK_TOKEN": CALLBACK_TOKEN,
        "SESSION_BODY": "{}",
        "SESSION_MAX_DURATION_S": "60",
        "TRACEPARENT": TRACEPARENT,
    }
    for name, value in overrides.items():
        if value is None:
            del env[name]
        else:
            env[name] = value
    return env

"""`POST /webhooks/daily`: Daily's events, served only with DAILY_WEBHOOK_SECRET."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from dispatcher.http.context import services
from dispatcher.http.input import read_body
from dispatcher.webhooks import MAX_WEBHOOK_BYTES


async def daily_webhook(request: Request) -> Response:
    """The raw body, within its limit, to the receiver that verifies and applies it."""
    webhooks = services(request).webhooks
    assert webhooks is not None
    raw = await read_body(request, MAX_WEBHOOK_BYTES)
    return JSONResponse(await webhooks.receive(request.headers, raw))

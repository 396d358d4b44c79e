"""CORS on the public routes, for an explicit allowlist of origins (`CORS_ORIGINS`).

Only `/start`, its Pipecat Cloud path (`/v1/public/{agent}/start`) and `/sessions/...` take
part; the bot callbacks (`/internal/...`) and the health routes never get CORS headers. A
request from an allowed origin gets `Access-Control-Allow-Origin` (and `Retry-After` exposed,
for 429s and 503s); a preflight from an allowed origin is answered 204 with the methods of the
route it asks about and the headers a client sends (`Authorization`, `Content-Type`,
`Idempotency-Key`). No credentials mode: tokens are bearer headers, never cookies. A request
from another origin gets no CORS header at all, and its preflight 403 `origin-not-allowed`.
"""

from __future__ import annotations

from collections.abc import Sequence

from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware import Middleware
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dispatcher.errors import ErrorCode, Forbidden, error_body

ALLOW_HEADERS = "Authorization, Content-Type, Idempotency-Key"
EXPOSE_HEADERS = "Retry-After"
MAX_AGE_S = 600


def is_public(path: str) -> bool:
    """Whether a path is one of the public routes that CORS applies to."""
    return path in ("/start", "/sessions") or path.startswith(("/sessions/", "/v1/public/"))


def cors_middleware(origins: Sequence[str], routes: Sequence[BaseRoute]) -> list[Middleware]:
    """The middleware list for the app: empty (no CORS at all) without allowed origins."""
    if not origins:
        return []
    return [Middleware(CORS, origins=tuple(origins), routes=tuple(routes))]


class CORS:
    """ASGI middleware: CORS headers for allowed origins on the public routes, preflights."""

    def __init__(
        self, app: ASGIApp, *, origins: tuple[str, ...], routes: tuple[BaseRoute, ...]
    ) -> None:
        self.app = app
        self.any_origin = "*" in origins
        self.origins = frozenset(origins)
        self.routes = routes

    def methods(self, scope: Scope) -> list[str]:
        """The methods of the routes at this path (HEAD left out)."""
        found: set[str] = set()
        for route in self.routes:
            if isinstance(route, Route) and route.methods:
                match, _ = route.matches({**scope, "method": "GET"})
                if match is not Match.NONE:
                    found |= route.methods
        found.discard("HEAD")
        return sorted(found)

    def allow_origin(self, origin: str) -> str | None:
        """The Access-Control-Allow-Origin for an origin, or None if it is not allowed."""
        if self.any_origin:
            return "*"
        return origin if origin in self.origins else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_public(scope["path"]):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        origin = headers.get("origin")
        methods = self.methods(scope)
        if origin is None or not methods:
            await self.app(scope, receive, send)
            return
        allowed = self.allow_origin(origin)
        if scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
            response: Response
            if allowed is None:
                response = JSONResponse(
                    error_body(
                        Forbidden("this origin is not allowed", code=ErrorCode.ORIGIN_NOT_ALLOWED)
                    ),
                    status_code=403,
                    headers={"Vary": "Origin"},
                )
            else:
                response = Response(
                    status_code=204,
                    headers={
                        "Access-Control-Allow-Origin": allowed,
                        "Access-Control-Allow-Methods": ", ".join(methods),
                        "Access-Control-Allow-Headers": ALLOW_HEADERS,
                        "Access-Control-Max-Age": str(MAX_AGE_S),
                        "Vary": "Origin",
                    },
                )
            await response(scope, receive, send)
            return
        if allowed is None:
            await self.app(scope, receive, send)
            return

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                out = MutableHeaders(scope=message)
                out["Access-Control-Allow-Origin"] = allowed
                out["Access-Control-Expose-Headers"] = EXPOSE_HEADERS
                out.add_vary_header("Origin")
            await send(message)

        await self.app(scope, receive, send_with_cors)

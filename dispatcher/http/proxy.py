"""The per-session proxy to a bot's own HTTP routes (SmallWebRTC offers), as Pipecat Cloud has.

`/sessions/{id}/{path}` reaches `http://<bot address>/{path}` of that session's bot. Only the
body, its content type and `X-Session-Id` go to the bot: never the caller's credentials. The
bot may still be booting when the client's offer arrives, so a refused connection is retried
until the bot listens, exits, or `boot_wait_s` passes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from dispatcher.errors import (
    BadRequest,
    BotTimeout,
    BotUnreachable,
    DispatcherError,
    ErrorCode,
    Gone,
    error_body,
)

log = logging.getLogger(__name__)

MAX_PROXY_BODY_BYTES = 64 * 1024
MAX_BOT_RESPONSE_BYTES = 256 * 1024
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
FORWARDED_HEADERS = ("content-type", "accept")
SESSION_HEADER = "X-Session-Id"
_PATH = re.compile(r"^[A-Za-z0-9_.~-]+(/[A-Za-z0-9_.~-]+)*$")
_FIRST_RETRY_S = 0.02
# A refused connection on loopback or the private network costs next to nothing: asking often
# answers the offer within 50 ms of the bot's listening (a warm pool's bot listens within a
# few hundred ms of its claim).
_MAX_RETRY_S = 0.05


@dataclass(frozen=True)
class ProxyAnswer:
    """The bot's answer, as the dispatcher passes it on."""

    status: int
    body: bytes
    content_type: str


def check_path(path: str) -> str:
    """A proxied path: plain segments only (no `..`, no empty segment), at most 256 bytes."""
    if len(path) > 256 or not _PATH.match(path) or ".." in path.split("/"):
        raise BadRequest(f"invalid session path {path!r}", code=ErrorCode.INVALID_PATH)
    return path


class BotProxy:
    """Forwards requests to bots over plain HTTP on the private network (loopback locally)."""

    def __init__(
        self, http: httpx.AsyncClient, *, boot_wait_s: float = 30.0, timeout_s: float = 15.0
    ) -> None:
        self._http = http
        self._boot_wait_s = boot_wait_s
        self._timeout_s = timeout_s

    async def forward(
        self,
        session_id: str,
        address: Callable[[], str | None],
        method: str,
        path: str,
        query: str,
        headers: dict[str, str],
        body: bytes,
    ) -> ProxyAnswer:
        """Send the request to the bot at `address()`; retried while the bot is booting."""
        sent = {k: v for k, v in headers.items() if k.lower() in FORWARDED_HEADERS}
        sent[SESSION_HEADER] = session_id
        deadline = time.monotonic() + self._boot_wait_s
        delay = _FIRST_RETRY_S
        while True:
            where = address()
            if where is None:
                raise Gone("the session's bot has exited", code=ErrorCode.BOT_GONE)
            url = f"http://{where}/{path}" + (f"?{query}" if query else "")
            try:
                response = await self._http.request(
                    method, url, headers=sent, content=body, timeout=self._timeout_s
                )
            except httpx.ConnectError:
                if time.monotonic() + delay > deadline:
                    raise BotUnreachable(
                        f"the session's bot did not listen within {self._boot_wait_s:.0f} s"
                    ) from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, _MAX_RETRY_S)
                continue
            except httpx.TimeoutException:
                raise BotTimeout(
                    f"the session's bot did not answer within {self._timeout_s:.0f} s"
                ) from None
            except httpx.HTTPError as exc:
                raise BotUnreachable(f"the session's bot failed: {type(exc).__name__}") from None
            return _answer(response)


def _answer(response: httpx.Response) -> ProxyAnswer:
    """The bot's answer; an oversized or non-JSON error answer becomes a JSON error."""
    content_type = response.headers.get("content-type", "application/octet-stream")
    if len(response.content) > MAX_BOT_RESPONSE_BYTES:
        raise BotUnreachable("the session's bot answered more than the proxy passes on")
    if response.status_code >= 400 and not content_type.startswith("application/json"):
        log.info("bot answered %s without a JSON body", response.status_code)
        body = error_body(
            DispatcherError(f"the bot answered {response.status_code}", code=ErrorCode.BOT_ERROR)
        )
        return ProxyAnswer(response.status_code, json.dumps(body).encode(), "application/json")
    return ProxyAnswer(response.status_code, response.content, content_type)

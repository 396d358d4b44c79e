"""The webrtc bot's own HTTP routes: SmallWebRTC signalling for its one session.

The dispatcher proxies the browser's `/sessions/{id}/api/offer` here with an `X-Session-Id`
header. `POST /api/offer` answers the peer's SDP offer (the first one makes the session's
only peer connection, later ones with its `pc_id` renegotiate it); `PATCH /api/offer` adds
trickled ICE candidates. Every answer is JSON, errors `{"detail", "code"}`, as the Pipecat
JS client expects. aiohttp (a pipecat dependency) serves it: Pipecat's own request handler
needs FastAPI.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from aiohttp import web
from aiortc import RTCIceCandidate, RTCIceServer
from aiortc.exceptions import InvalidAccessError, InvalidStateError
from aiortc.sdp import SessionDescription, candidate_from_sdp
from loguru import logger
from pipecat.transports.smallwebrtc.connection import SmallWebRTCConnection

SESSION_HEADER = "X-Session-Id"
MAX_BODY_BYTES = 64 * 1024
SHUTDOWN_TIMEOUT_S = 1.0

_STATUS_CODES = {
    400: "bad-request",
    404: "not-found",
    405: "method-not-allowed",
    413: "payload-too-large",
}


# What aiortc raises for an offer it cannot answer.
_SDP_ERRORS = (
    ValueError,
    KeyError,
    IndexError,
    AssertionError,
    InvalidAccessError,
    InvalidStateError,
)


class SignallingError(Exception):
    """A request the bot refuses: its HTTP status and a stable kebab-case code."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail


def new_connection(ice_servers: Iterable[dict[str, Any]] = ()) -> SmallWebRTCConnection:
    """The session's peer connection, waiting for its offer; ICE servers as RTCIceServer dicts."""
    return SmallWebRTCConnection(ice_servers=[RTCIceServer(**server) for server in ice_servers])


def error_body(status: int, code: str, detail: str) -> web.Response:
    """A JSON error answer."""
    return web.json_response({"detail": detail, "code": code}, status=status)


@web.middleware
async def _json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except SignallingError as exc:
        return error_body(exc.status, exc.code, exc.detail)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_body(exc.status, _STATUS_CODES.get(exc.status, "http-error"), exc.reason)
    except Exception:
        logger.exception(f"{request.method} {request.path} failed")
        return error_body(500, "internal-error", "the bot failed to handle the request")


class OfferServer:
    """Serves `/api/offer` for one session's peer connection on `host:port`."""

    def __init__(
        self, connection: SmallWebRTCConnection, *, session_id: str, host: str, port: int
    ) -> None:
        self._connection = connection
        self._session_id = session_id
        self._host = host
        self._port = port
        self._peer = False
        self._closed = False
        self._lock = asyncio.Lock()
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        """The routes as an aiohttp application."""
        app = web.Application(middlewares=[_json_errors], client_max_size=MAX_BODY_BYTES)
        app.router.add_post("/api/offer", self._offer)
        app.router.add_patch("/api/offer", self._candidates)
        return app

    async def start(self) -> None:
        """Listen on `host:port`."""
        runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
        await runner.setup()
        self._runner = runner
        await web.TCPSite(runner, self._host, self._port).start()
        logger.info(f"Listening for the session's WebRTC offer on {self._host}:{self._port}")

    async def close(self) -> None:
        """Stop listening; later offers would find the port closed."""
        self._closed = True
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _offer(self, request: web.Request) -> web.Response:
        self._check_session(request)
        body = await _json_object(request)
        sdp, sdp_type = body.get("sdp"), body.get("type")
        if not isinstance(sdp, str) or not sdp or sdp_type != "offer":
            raise SignallingError(400, "invalid-offer", "an offer needs `sdp` and type `offer`")
        _check_audio(sdp)
        pc_id = body.get("pc_id")
        async with self._lock:
            if self._closed or self._connection.pc.connectionState == "closed":
                raise SignallingError(409, "session-ended", "the session has ended")
            if self._peer and pc_id != self._connection.pc_id:
                raise SignallingError(409, "peer-exists", "the session already has its peer")
            try:
                if self._peer:
                    restart = bool(body.get("restart_pc"))
                    logger.info(f"Renegotiating the peer connection (restart: {restart})")
                    await self._connection.renegotiate(sdp=sdp, type="offer", restart_pc=restart)
                else:
                    logger.info("Answering the peer's offer")
                    await self._connection.initialize(sdp=sdp, type="offer")
            except _SDP_ERRORS as exc:
                logger.info(f"Offer refused: {type(exc).__name__}: {exc}")
                raise SignallingError(400, "invalid-sdp", "the offer's SDP was refused") from None
            self._peer = True
            answer = self._connection.get_answer()  # type: ignore[no-untyped-call]
        return web.json_response(answer)

    async def _candidates(self, request: web.Request) -> web.Response:
        self._check_session(request)
        body = await _json_object(request)
        raw = body.get("candidates")
        if not isinstance(raw, list):
            raise SignallingError(400, "invalid-candidate", "`candidates` must be a list")
        candidates = [_candidate(c) for c in raw]
        if not self._peer or self._closed or body.get("pc_id") != self._connection.pc_id:
            raise SignallingError(404, "peer-not-found", "no such peer connection")
        for candidate in candidates:
            await self._connection.add_ice_candidate(candidate)  # type: ignore[no-untyped-call]
        return web.json_response({"status": "success"})

    def _check_session(self, request: web.Request) -> None:
        if request.headers.get(SESSION_HEADER) != self._session_id:
            raise SignallingError(404, "session-not-found", "no such session here")


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.read())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        # RecursionError: arrays or objects nested past the interpreter's limit (a 4 KB body).
        raise SignallingError(400, "invalid-json", "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise SignallingError(400, "invalid-json", "the body must be a JSON object")
    return body


def _check_audio(sdp: str) -> None:
    """The offer must parse and send the user's audio: the bot has nothing else to hear."""
    try:
        description = SessionDescription.parse(sdp)
    except (ValueError, KeyError, IndexError, AssertionError):
        raise SignallingError(400, "invalid-sdp", "the offer's SDP does not parse") from None
    if not any(media.kind == "audio" for media in description.media):
        raise SignallingError(400, "invalid-sdp", "the offer has no audio")


def _candidate(raw: Any) -> RTCIceCandidate | None:
    """One trickled candidate; an empty one is end-of-candidates (RFC 8840), None for aiortc."""
    if not isinstance(raw, dict) or not isinstance(raw.get("candidate"), str):
        raise SignallingError(400, "invalid-candidate", "each candidate needs `candidate`")
    line = raw["candidate"].strip()
    if not line:
        return None
    line = line.removeprefix("candidate:")
    mid, index = raw.get("sdp_mid"), raw.get("sdp_mline_index")
    if (
        len(line.split()) < 8
        or not isinstance(mid, str | None)
        or not isinstance(index, int | None)
    ):
        raise SignallingError(400, "invalid-candidate", "a candidate is malformed")
    try:
        candidate = candidate_from_sdp(line)
    except (ValueError, IndexError) as exc:
        raise SignallingError(400, "invalid-candidate", "a candidate is malformed") from exc
    candidate.sdpMid = mid
    candidate.sdpMLineIndex = index
    return candidate

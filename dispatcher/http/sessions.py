"""The client routes: `POST /start` (and Pipecat Cloud's path for it), `GET /sessions`,
`GET` and `DELETE /sessions/{id}`, and the proxy to a session's bot."""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from dispatcher.errors import BadRequest, DispatcherError, ErrorCode, http_status
from dispatcher.http.context import core, services
from dispatcher.http.input import read_body, whole_number
from dispatcher.http.proxy import MAX_PROXY_BODY_BYTES, check_path
from dispatcher.idempotency import Idempotency
from dispatcher.lifecycle import STATE_VALUES
from dispatcher.logs import session_context
from dispatcher.ratelimit import client_address
from dispatcher.start import MAX_BODY_BYTES, parse_start

log = logging.getLogger(__name__)

MAX_LIST_LIMIT = 1000
DEFAULT_LIST_LIMIT = 100
MAX_IDEMPOTENCY_KEY = 255
START_SPAN = {"http.request.method": "POST", "http.route": "/start"}
# Where the pipecatcloud SDK posts a start (`PIPECAT_API_HOST` + this): the same start.
PIPECAT_CLOUD_START = "/v1/public/{agent}/start"


async def start(request: Request) -> Response:
    """`POST /start`, and the same at Pipecat Cloud's path (any agent name: one dispatcher
    runs one bot); one span name for both, `http.route` telling which."""
    began = time.monotonic()
    metrics, tracing = core(request).metrics, core(request).tracing
    route = PIPECAT_CLOUD_START if "agent" in request.path_params else "/start"
    attributes = {**START_SPAN, "http.route": route}
    with tracing.span("POST /start", kind=SpanKind.SERVER, attributes=attributes) as span:
        try:
            answer = await _start_session(request)
        except DispatcherError as exc:
            metrics.start_failed(exc.code)
            _outcome(span, http_status(exc), exc.code)
            raise
        except Exception:
            metrics.start_failed(ErrorCode.INTERNAL_ERROR)
            _outcome(span, 500, ErrorCode.INTERNAL_ERROR)
            raise
        metrics.started(time.monotonic() - began)
        _outcome(span, 200, "dispatched")
        return JSONResponse(answer)


async def _start_session(request: Request) -> dict[str, Any]:
    settings = core(request).settings
    principal = await core(request).auth.authenticate(request.headers)
    if settings.auth == "none" and settings.machine_backend == "fly":
        # Every unauthenticated start boots a paid VM: say so each time, not only once.
        log.warning("unauthenticated start (DISPATCHER_AUTH=none): anyone can boot VMs")
    s = services(request)
    raw = await read_body(request, MAX_BODY_BYTES)
    start_request = parse_start(
        raw,
        default_transport=settings.default_transport,
        regions=settings.fly_regions,
        roomless_transport=settings.roomless_transport,
    )
    idempotency = idempotency_of(request.headers.get("idempotency-key"), raw)
    peer = request.client.host if request.client else None
    address = client_address(peer, request.headers, trust_proxy=settings.trust_proxy_headers)
    await s.limiter.check(principal.user, address)
    return await s.service.start(principal, start_request, idempotency)


def idempotency_of(header: str | None, raw: bytes) -> Idempotency | None:
    """The Idempotency-Key of a start (1-255 visible ASCII characters), with the body's hash."""
    if header is None:
        return None
    key = header.strip()
    if not key or len(key) > MAX_IDEMPOTENCY_KEY or not key.isascii() or not key.isprintable():
        raise BadRequest(
            f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII characters",
            code=ErrorCode.INVALID_IDEMPOTENCY_KEY,
        )
    return Idempotency(key, hashlib.sha256(raw).hexdigest())


def _outcome(span: Span, status: int, outcome: str) -> None:
    """How a /start ended, on its span: the status, and `dispatched` or the error code."""
    span.set_attribute("http.response.status_code", status)
    span.set_attribute("session.outcome", outcome)
    if status >= 500:
        span.set_status(Status(StatusCode.ERROR, outcome))


async def list_sessions(request: Request) -> Response:
    """`GET /sessions` (admin only): the active sessions or those in `state`, by `user`."""
    principal = await core(request).auth.authenticate(request.headers)
    query = request.query_params
    state = query.get("state") or None
    if state is not None and state not in STATE_VALUES:
        raise BadRequest(
            f"state must be one of {', '.join(STATE_VALUES)}", code=ErrorCode.INVALID_STATE
        )
    limit = whole_number(
        query.get("limit"),
        name="limit",
        minimum=1,
        maximum=MAX_LIST_LIMIT,
        default=DEFAULT_LIST_LIMIT,
        code=ErrorCode.INVALID_LIMIT,
    )
    user = query.get("user") or None
    if user is not None and len(user) > 256:
        raise BadRequest("user is at most 256 characters", code=ErrorCode.INVALID_USER)
    found = await services(request).service.list_sessions(
        principal, state=state, user=user, limit=limit
    )
    return JSONResponse({"sessions": [s.public() for s in found]})


async def get_session(request: Request) -> Response:
    """`GET /sessions/{id}`: the caller's own session (an admin's: any)."""
    principal = await core(request).auth.authenticate(request.headers)
    session = await services(request).service.get(principal, request.path_params["session_id"])
    return JSONResponse(session.public())


async def delete_session(request: Request) -> Response:
    """`DELETE /sessions/{id}`: end the session, answered 202 with it."""
    principal = await core(request).auth.authenticate(request.headers)
    session = await services(request).service.end(principal, request.path_params["session_id"])
    return JSONResponse(session.public(), status_code=202)


async def proxy(request: Request) -> Response:
    """`/sessions/{id}/{path}`: the request passed on to the session's bot."""
    principal = await core(request).auth.authenticate(request.headers)
    path = check_path(request.path_params["path"])
    s = services(request)
    session_id = request.path_params["session_id"]
    address = await s.service.bot_address(principal, session_id)
    body = await read_body(request, MAX_PROXY_BODY_BYTES)
    with session_context(session_id):
        answer = await s.proxy.forward(
            session_id,
            address,
            request.method,
            path,
            request.url.query,
            dict(request.headers),
            body,
        )
    return Response(answer.body, answer.status, media_type=answer.content_type)

"""The bots' callbacks (`/internal/...`): ready, ended, and a pool machine's assignment; with
INTERNAL_PORT set they answer only on that private listener."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from dispatcher.auth import bearer_token
from dispatcher.errors import ErrorCode, NotFound
from dispatcher.http.context import core, services
from dispatcher.http.input import read_json_object, whole_number

MAX_CALLBACK_BYTES = 4096
# An ended report carries the bot's error (cut to 1000 characters once read): room for a much
# longer one, escaped, so that a bot never loses its report to a long message.
MAX_ENDED_BYTES = 64 * 1024
# The longest a pool machine's assignment request is held before a 204 (ask again).
ASSIGNMENT_WAIT_S = 25


def internal_only(request: Request) -> None:
    """With INTERNAL_PORT set, bot callbacks answer only on that (private) listener."""
    internal_port = core(request).settings.internal_port
    server = request.scope.get("server")
    if internal_port is not None and (server is None or server[1] != internal_port):
        raise NotFound("not found", code=ErrorCode.NOT_FOUND)


async def bot_ready(request: Request) -> Response:
    """`POST /internal/sessions/{id}/ready`: the session's bot is up."""
    internal_only(request)
    await read_json_object(request, MAX_CALLBACK_BYTES)
    await services(request).callbacks.bot_ready(
        request.path_params["session_id"], bearer_token(request.headers)
    )
    return JSONResponse({"ok": True})


async def assignment(request: Request) -> Response:
    """`GET /internal/machines/{id}/assignment`: a pool machine's session, held up to `wait`
    seconds; 204 when none came."""
    internal_only(request)
    wait = whole_number(
        request.query_params.get("wait"),
        name="wait (seconds)",
        minimum=0,
        maximum=ASSIGNMENT_WAIT_S,
        default=ASSIGNMENT_WAIT_S,
        code=ErrorCode.INVALID_WAIT,
    )
    answer = await services(request).callbacks.assignment(
        request.path_params["machine_id"], bearer_token(request.headers), float(wait)
    )
    if answer is None:
        return Response(status_code=204)
    return JSONResponse(answer, headers={"Cache-Control": "no-store"})


async def bot_ended(request: Request) -> Response:
    """`POST /internal/sessions/{id}/ended`: the bot's report of how it ended."""
    internal_only(request)
    data = await read_json_object(request, MAX_ENDED_BYTES)
    await services(request).callbacks.bot_ended(
        request.path_params["session_id"],
        bearer_token(request.headers),
        data.get("reason"),
        data.get("exit_code"),
        data.get("error"),
    )
    return JSONResponse({"ok": True})

"""Every error as a JSON answer: the dispatcher's own through the one table in `errors.py`,
Starlette's 404 and 405 with a code, and anything unexpected as a logged 500."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from dispatcher.errors import DispatcherError, ErrorCode, error_body, http_status

log = logging.getLogger(__name__)

# The codes of Starlette's own refusals (no such route, method not allowed).
_STARLETTE_CODES = {404: ErrorCode.NOT_FOUND, 405: ErrorCode.METHOD_NOT_ALLOWED}


async def dispatcher_error(request: Request, exc: Exception) -> Response:
    """A DispatcherError as its status and JSON body; a 5xx is logged."""
    assert isinstance(exc, DispatcherError)
    status = http_status(exc)
    if status >= 500:
        log.warning("%s %s -> %s: %s", request.method, request.url.path, status, exc.detail)
    return JSONResponse(error_body(exc), status_code=status, headers=exc.headers())


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's HTTPException (no such route, method not allowed) as a JSON error."""
    assert isinstance(exc, HTTPException)
    code = _STARLETTE_CODES.get(exc.status_code, ErrorCode.HTTP_ERROR)
    return JSONResponse(
        error_body(DispatcherError(str(exc.detail), code=code)),
        status_code=exc.status_code,
        headers=exc.headers,
    )


async def unexpected_error(request: Request, exc: Exception) -> Response:
    """Anything else: logged with its traceback, answered 500 `internal-error`."""
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return JSONResponse(error_body(DispatcherError("internal error")), status_code=500)


EXCEPTION_HANDLERS: dict[type[Exception], Callable[[Request, Exception], Awaitable[Response]]] = {
    DispatcherError: dispatcher_error,
    HTTPException: http_error,
    Exception: unexpected_error,
}

"""Requests as recorded and API errors as raised by handlers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from starlette.responses import JSONResponse, Response

from testkit.fakes.common import Fault


class ApiRequest(NamedTuple):
    """One API request as received: for tests that scan what the client sent."""

    method: str
    path: str
    query: str
    body: Any


class ApiError(Exception):
    """An API answer other than success, raised by a handler."""

    def __init__(
        self,
        status: int,
        error: str,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(error)
        self.status = status
        self.body: dict[str, str] = {"error": error} | ({"status": code} if code else {})
        self.headers = dict(headers or {})

    def response(self) -> Response:
        """The HTTP answer."""
        return JSONResponse(self.body, self.status, headers=self.headers)


class OutageBegan(Exception):
    """An outage began while a request waited (a long poll): it is answered the outage's fault."""

    def __init__(self, fault: Fault) -> None:
        super().__init__(f"outage: {fault.status}")
        self.fault = fault


def _not_found() -> ApiError:
    return ApiError(404, "machine not found")


def _bad_request(message: str) -> ApiError:
    return ApiError(400, message)

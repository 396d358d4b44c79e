"""What operators and tools read about the dispatcher: `/healthz`, `/readyz`, `/metrics` (on
the internal listener when there is one) and `/openapi.json`."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from dispatcher.errors import ErrorCode, Unavailable, error_body
from dispatcher.http.bot import internal_only
from dispatcher.http.context import core, running, services
from dispatcher.metrics import CONTENT_TYPE
from dispatcher.openapi.document import openapi_document


async def healthz(request: Request) -> Response:
    """Liveness: 200 while the process runs, with whether it drains and leads."""
    s = running(request)
    return JSONResponse(
        {
            "status": "ok",
            "instance": core(request).settings.instance_id,
            "draining": bool(s and s.service.draining),
            "reconciler": "leader" if s and s.reconciler.leader else "standby",
        }
    )


async def readyz(request: Request) -> Response:
    """Readiness: 503 while draining or while a backend does not answer."""
    s = services(request)
    if s.service.draining:
        body = error_body(Unavailable("this dispatcher is draining", code=ErrorCode.DRAINING))
        return JSONResponse({**body, "checks": {}}, status_code=503)
    checks = await s.readiness.status()
    if all(v == "ok" for v in checks.values()):
        return JSONResponse({"status": "ready", "checks": checks})
    body = error_body(Unavailable("a backend is unreachable", code=ErrorCode.BACKEND_UNAVAILABLE))
    return JSONResponse({**body, "checks": checks}, status_code=503)


async def metrics_page(request: Request) -> Response:
    """The Prometheus scrape."""
    internal_only(request)
    return Response(await core(request).metrics.render(), media_type=CONTENT_TYPE)


async def openapi(request: Request) -> Response:
    """The OpenAPI document of this dispatcher as configured."""
    return JSONResponse(openapi_document(core(request).settings))

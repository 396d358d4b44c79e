"""Local mode's web page: `/` and its assets under `/web` (built from web/, committed)."""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

WEB_DIR = Path(__file__).parent.parent / "web"


async def page(request: Request) -> Response:
    """The page, never cached (a rebuilt page shows at once)."""
    return FileResponse(WEB_DIR / "index.html", headers={"Cache-Control": "no-cache"})


def web_routes() -> list[BaseRoute]:
    """The page and its assets."""
    return [
        Route("/", page, methods=["GET"]),
        Mount("/web", StaticFiles(directory=WEB_DIR, check_dir=False), name="web"),
    ]

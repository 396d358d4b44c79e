"""The route table: every route of the app, by the settings (local mode's page, webhooks)."""

from __future__ import annotations

from starlette.routing import BaseRoute, Route

from dispatcher.config import Settings
from dispatcher.http import bot, ops, sessions
from dispatcher.http.proxy import METHODS
from dispatcher.http.web import web_routes
from dispatcher.http.webhooks import daily_webhook


def routes(settings: Settings) -> list[BaseRoute]:
    """The routes these settings serve."""
    table: list[BaseRoute] = [
        Route("/start", sessions.start, methods=["POST"]),
        Route(sessions.PIPECAT_CLOUD_START, sessions.start, methods=["POST"]),
        Route("/sessions", sessions.list_sessions, methods=["GET"]),
        Route("/sessions/{session_id}", sessions.get_session, methods=["GET"]),
        Route("/sessions/{session_id}", sessions.delete_session, methods=["DELETE"]),
        Route("/sessions/{session_id}/{path:path}", sessions.proxy, methods=list(METHODS)),
        Route("/internal/sessions/{session_id}/ready", bot.bot_ready, methods=["POST"]),
        Route("/internal/sessions/{session_id}/ended", bot.bot_ended, methods=["POST"]),
        Route("/internal/machines/{machine_id}/assignment", bot.assignment, methods=["GET"]),
        Route("/healthz", ops.healthz, methods=["GET"]),
        Route("/readyz", ops.readyz, methods=["GET"]),
        Route("/openapi.json", ops.openapi, methods=["GET"]),
        Route("/metrics", ops.metrics_page, methods=["GET"]),
    ]
    if settings.machine_backend == "local":
        table += web_routes()
    if settings.daily_webhook_secret is not None:
        # Daily's public listener, verified by HMAC; without the secret webhooks are off (404).
        table.append(Route("/webhooks/daily", daily_webhook, methods=["POST"]))
    return table

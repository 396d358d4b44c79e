"""What handlers use: the app's core (on `app.state`, there from the start, lifespan or not)
and the services the lifespan built (in the lifespan state, there while it runs)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

from starlette.requests import HTTPConnection

from dispatcher.auth import Authenticator
from dispatcher.callbacks import BotCallbacks
from dispatcher.config import Settings
from dispatcher.http.proxy import BotProxy
from dispatcher.machines import MachineBackend
from dispatcher.metrics import Metrics
from dispatcher.ratelimit import StartLimiter
from dispatcher.readiness import Readiness
from dispatcher.reconciler import Reconciler
from dispatcher.sessions import SessionService
from dispatcher.supervisor import Supervisor
from dispatcher.telemetry import Tracing
from dispatcher.webhooks import DailyWebhooks


@dataclass(frozen=True)
class Core:
    """What `create_app` builds before any I/O: the settings, auth, metrics and tracing."""

    settings: Settings
    auth: Authenticator
    metrics: Metrics
    tracing: Tracing


@dataclass(frozen=True)
class Services:
    """What the lifespan built and the handlers use."""

    settings: Settings
    service: SessionService
    callbacks: BotCallbacks
    readiness: Readiness
    proxy: BotProxy
    reconciler: Reconciler
    limiter: StartLimiter
    machines: MachineBackend
    supervisor: Supervisor
    webhooks: DailyWebhooks | None = None


def core(request: HTTPConnection) -> Core:
    """The app's core."""
    return cast(Core, request.app.state.core)


def services(request: HTTPConnection) -> Services:
    """The services of the running lifespan."""
    return cast(Services, request.state.services)


def running(request: HTTPConnection) -> Services | None:
    """The services, or None when no lifespan runs (an app served without one)."""
    return cast("Services | None", getattr(request.state, "services", None))

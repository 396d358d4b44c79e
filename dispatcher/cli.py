"""The `dispatcher` command: `dispatcher serve --host H --port P`, and the on-call commands
`dispatcher sessions list|show|stop` and `dispatcher trace ID` (dispatcher/oncall.py)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence

import uvicorn

from dispatcher import oncall
from dispatcher.app import create_app
from dispatcher.config import DEFAULT_HOST, DEFAULT_PORT, Settings
from dispatcher.errors import ConfigError
from dispatcher.logs import configure_logging
from dispatcher.signals import StopSignals
from dispatcher.telemetry import Tracing, tracer_provider_from_env

log = logging.getLogger("dispatcher")


def parser() -> argparse.ArgumentParser:
    """The command line."""
    top = argparse.ArgumentParser(prog="dispatcher", description=__doc__)
    commands = top.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the HTTP service")
    serve.add_argument("--host", default=DEFAULT_HOST, help=f"default {DEFAULT_HOST}")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}")
    oncall.add_commands(commands)
    return top


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (an IPv6 wildcard takes IPv4 too).

    The protocol is given explicitly: asyncio sets TCP_NODELAY only on accepted sockets whose
    proto is IPPROTO_TCP, and without it every answer stalls ~40 ms behind a delayed ACK.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    try:
        sock.bind((host.strip("[]"), port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


def _url_host(host: str) -> str:
    """How a browser on this machine reaches a server bound to `host`."""
    if host in ("0.0.0.0", "::", ""):  # noqa: S104
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; configuration errors exit 2 with a message naming the variable."""
    args = parser().parse_args(argv)
    serving = args.command == "serve"
    try:
        settings = Settings.from_env(os.environ)
        if serving:
            settings = settings.listening_on(args.host, args.port)
    except ConfigError as exc:
        print(f"dispatcher: configuration error: {exc.detail}", file=sys.stderr)
        return 2
    # The on-call commands print their results; their logs are warnings unless asked.
    level = settings.log_level if serving or "LOG_LEVEL" in os.environ else "WARNING"
    configure_logging(level, settings.log_format)
    if not serving:
        return oncall.run(args, settings)
    stops = StopSignals()
    stops.block()  # before any thread starts (the tracer's exporter, the event loop's)
    if settings.auth == "none":
        log.warning(
            "authentication is off (DISPATCHER_AUTH=none): anyone who reaches %s:%s "
            "can start sessions",
            args.host,
            args.port,
        )
    try:
        sockets = [listen(args.host, args.port)]
        if settings.internal_port is not None:
            sockets.append(listen(settings.internal_host, settings.internal_port))
    except OSError as exc:
        print(f"dispatcher: cannot listen: {exc}", file=sys.stderr)
        return 2
    tracing = Tracing(
        tracer_provider_from_env(os.environ, instance_id=settings.instance_id),
        plain_user_ids=settings.trace_user_ids,
    )
    app = create_app(settings, tracing=tracing)
    url = f"http://{_url_host(args.host)}:{args.port}"
    print(f"dispatcher listening on {url}", flush=True)
    if settings.internal_port is not None:
        print(
            f"bot callbacks on {settings.internal_host} port {settings.internal_port} only",
            flush=True,
        )
    if settings.machine_backend == "local":
        print(f"open {url}/ in a browser and press Connect to talk to a bot", flush=True)
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
        lifespan="on",
        # The client address is the peer's; proxy headers count only with TRUST_PROXY_HEADERS
        # (dispatcher/ratelimit.py), never through uvicorn's own X-Forwarded-For rewriting.
        proxy_headers=False,
    )
    try:
        DrainingServer(config, stops, app.state.drain, app.state.halt).run(sockets=sockets)
    finally:
        tracing.shutdown()
    if stops.first == signal.SIGTERM:
        stops.end_as(signal.SIGTERM)
    return 0


class DrainingServer(uvicorn.Server):
    """uvicorn, draining on the first stop (SIGTERM, or Ctrl-C's SIGINT) before it stops.

    While it drains it still answers: `/readyz` is 503 (load balancers stop sending work) and
    `/start` answers 503 `draining`, while the starts in flight finish; then the sessions of
    bots that cannot outlive it (local processes) end, their `ended` callbacks still taken.
    Then it shuts down as uvicorn does; the process ends as the SIGTERM asked (killed by it),
    or with status 0 after a Ctrl-C (no traceback). A second stop (an echo of the first
    excepted, see dispatcher/signals.py) kills those bots and ends the process at once.
    """

    def __init__(
        self,
        config: uvicorn.Config,
        stops: StopSignals,
        drain: Callable[[], Awaitable[bool]],
        halt: Callable[[], None],
    ) -> None:
        super().__init__(config)
        self._stops = stops
        self._drain = drain
        self._halt = halt
        self._draining: asyncio.Task[None] | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with self._stops.delivered(asyncio.get_running_loop(), self._on_stop):
            yield

    def _on_stop(self, signum: int, at_once: bool) -> None:
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        if at_once:
            log.warning("%s again: stopping at once", name)
            self._halt()
            self.should_exit = self.force_exit = True
            # Ends the process now, as killed by the signal (unless it is a container's init,
            # which such a signal cannot kill: uvicorn then stops without waiting for anything).
            self._stops.end_as(signum)
            return
        log.info("%s: stopping (%s again stops at once)", name, name)
        self._draining = asyncio.create_task(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            await self._drain()
        finally:
            self.should_exit = True

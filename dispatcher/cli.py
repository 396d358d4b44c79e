"""The `dispatcher` command: `dispatcher serve --host H --port P`."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from collections.abc import Sequence

import uvicorn

from dispatcher.app import create_app
from dispatcher.config import DEFAULT_HOST, DEFAULT_PORT, Settings
from dispatcher.errors import ConfigError

log = logging.getLogger("dispatcher")


def parser() -> argparse.ArgumentParser:
    """The command line."""
    top = argparse.ArgumentParser(prog="dispatcher", description=__doc__)
    commands = top.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the HTTP service")
    serve.add_argument("--host", default=DEFAULT_HOST, help=f"default {DEFAULT_HOST}")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}")
    return top


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (an IPv6 wildcard takes IPv4 too)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
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
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        settings = Settings.from_env(os.environ).listening_on(args.host, args.port)
    except ConfigError as exc:
        print(f"dispatcher: configuration error: {exc.detail}", file=sys.stderr)
        return 2
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
    app = create_app(settings)
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
        timeout_graceful_shutdown=30,
        lifespan="on",
    )
    uvicorn.Server(config).run(sockets=sockets)
    return 0

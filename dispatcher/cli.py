"""The `dispatcher` command: `dispatcher serve --host H --port P`."""

from __future__ import annotations

import argparse
import logging
import os
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
    app = create_app(settings)
    url = f"http://{args.host}:{args.port}"
    print(f"dispatcher listening on {url}", flush=True)
    if settings.machine_backend == "local":
        page = settings.dispatcher_url or url
        print(f"open {page}/ in a browser and press Connect to talk to a bot", flush=True)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=30,
        lifespan="on",
    )
    return 0

"""Loopback networking for tests and benches: a listening socket, a free port, an app served."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import uvicorn
from starlette.types import ASGIApp

from dispatcher.machines.local import free_port as bot_port

LOOPBACK = "127.0.0.1"


def bind_loopback(port: int = 0, host: str = "127.0.0.1") -> socket.socket:
    """A listening TCP socket on loopback (port 0: any free port).

    The protocol is given explicitly: asyncio sets TCP_NODELAY only on sockets whose proto is
    IPPROTO_TCP, and without it small answers stall ~40 ms behind delayed ACKs.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (for a child process to listen on),
    chosen as the local backend chooses its bots' ports: below the ephemeral range, where no
    server binding port 0 and no outgoing connection takes it before the child listens."""
    return bot_port(LOOPBACK)


@contextlib.asynccontextmanager
async def serve(
    app: ASGIApp, port: int = 0, host: str = "127.0.0.1", *, sock: socket.socket | None = None
) -> AsyncIterator[str]:
    """Run `app` under uvicorn on loopback (or on `sock`) in this event loop; yields its URL."""
    sock = sock or bind_loopback(port, host)
    host = sock.getsockname()[0]
    config = uvicorn.Config(
        app, log_level="warning", lifespan="on", access_log=False, proxy_headers=False
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.005)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await task
        sock.close()

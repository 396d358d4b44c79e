"""Schemathesis against `/openapi.json`: generated requests to every operation of a real
dispatcher (under uvicorn, with the Fly and Daily emulators) answer no 5xx and only what the
document describes (status, content type, headers, body).

Bounded and deterministic: a fixed seed, `MAX_EXAMPLES` per operation, no example database.
Every session a generated `POST /start` makes is deleted at once, and the run ends only when
the emulator holds no live machine, so no bot process outlives it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import jwt
import pytest
import requests
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from dispatcher.config import Settings
from dispatcher.openapi.document import openapi_document
from testkit.harness import (
    JWT_SECRET,
    Stack,
    dispatcher_env,
    dispatcher_stack,
    fly_emulator,
)
from testkit.waits import eventually

# Schemathesis's cases share one node id, which an xdist worker would run once: not on xdist.
pytestmark = pytest.mark.serial

MAX_EXAMPLES = 25
# The operations that start a session (each one made is deleted at once).
STARTS = ("POST /start", "POST /v1/public/{agent}/start")
SEED = 20240607
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
# The caller: an admin (so that GET /sessions answers its list, not only 403), who is also an
# ordinary user for /start.
USER = "schemathesis"
# Generous limits: the run checks the answers, not the capacity (tested elsewhere).
ENV = {
    "MAX_SESSIONS": "200",
    "MAX_SESSIONS_PER_USER": "200",
    "FLY_CREATE_RATE": "100",
    "FLY_CREATE_BURST": "100",
    "START_RATE_PER_USER": "0",
    "START_RATE_PER_IP": "0",
    "DAILY_WEBHOOK_SECRET": base64.b64encode(b"schemathesis-webhook-secret").decode(),
}


@dataclass
class LiveStack:
    """A dispatcher stack served from its own event loop in a thread, for synchronous tests."""

    stack: Stack
    started: list[str] = field(default_factory=list)
    answers: Counter[tuple[str, int]] = field(default_factory=Counter)

    @property
    def url(self) -> str:
        return self.stack.url

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {admin_token()}"}


def admin_token() -> str:
    """A token of USER with the admin role."""
    return jwt.encode(
        {"sub": USER, "role": "admin", "exp": int(time.time()) + 600}, JWT_SECRET, "HS256"
    )


@contextlib.contextmanager
def live_stack(tmp_path: Path) -> Iterator[LiveStack]:
    """The stack in a thread; on exit every session is ended and every machine gone."""
    loop = asyncio.new_event_loop()
    ready: Future[LiveStack] = Future()
    finished: Future[None] = Future()
    stop = asyncio.Event()

    async def main() -> None:
        async with dispatcher_stack(
            tmp_path, env=ENV, fly=fly_emulator(rate_limits=False)
        ) as stack:
            ready.set_result(LiveStack(stack))
            await stop.wait()
            await end_everything(stack)

    def run() -> None:
        try:
            loop.run_until_complete(main())
        except BaseException as exc:
            for future in (ready, finished):
                if not future.done():
                    future.set_exception(exc)
        else:
            finished.set_result(None)

    thread = threading.Thread(target=run, name="dispatcher-stack", daemon=True)
    thread.start()
    try:
        yield ready.result(timeout=60)
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=120)
        assert not thread.is_alive(), "the stack did not stop"
        loop.close()
    finished.result()


async def end_everything(stack: Stack) -> None:
    """End every session left and wait until no machine is alive."""
    assert stack.fly is not None
    fly = stack.fly
    headers = {"Authorization": f"Bearer {admin_token()}"}
    listed = await stack.http.get("/sessions", params={"limit": 1000}, headers=headers)
    for session in listed.json()["sessions"]:
        await stack.http.delete(f"/sessions/{session['sessionId']}", headers=headers)

    async def settled() -> bool:
        active = await stack.http.get("/sessions", params={"limit": 1000}, headers=headers)
        return not active.json()["sessions"] and all(
            m.state == "destroyed" for m in fly.machines.values()
        )

    await eventually(settled, timeout=60, what="every session ended and every machine destroyed")


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveStack]:
    with live_stack(tmp_path_factory.mktemp("schemathesis")) as running:
        served = requests.get(f"{running.url}/openapi.json", timeout=10).json()
        assert served == openapi_document(SETTINGS)
        yield running
        if any(label in STARTS for label, _ in running.answers):
            # The run reached real starts (each deleted at once), not only refusals.
            assert running.started, sorted(running.answers.items())
    # Every start the run made was a real machine: all of them are gone now.
    fly = running.stack.fly
    assert fly is not None
    assert all(m.state == "destroyed" for m in fly.machines.values())


# The document this stack serves, built here because the operations are collected before the
# stack runs (schemathesis's `from_fixture` breaks on pytest 9); `live` checks that the served
# one is the same.
SETTINGS = Settings.from_env(
    dispatcher_env(
        fly_url="http://127.0.0.1:1",
        daily_url="http://127.0.0.1:2",
        dispatcher_url="http://127.0.0.1:3",
        db="sqlite:///unused.db",
    )
    | ENV
)
schema = schemathesis.openapi.from_dict(
    openapi_document(SETTINGS),
    config=schemathesis.Config.from_dict(
        {
            "seed": SEED,
            "generation": {
                "max-examples": MAX_EXAMPLES,
                "deterministic": True,
                "database": "none",
            },
        }
    ),
)


@pytest.mark.slow
@schema.parametrize()
def test_api(case: schemathesis.Case, live: LiveStack) -> None:
    """No 5xx, and every answer is one the document describes."""
    response = case.call(base_url=live.url, headers=live.auth, timeout=30)
    live.answers[case.operation.label, response.status_code] += 1
    case.validate_response(response, checks=CHECKS)
    if case.operation.label in STARTS and response.status_code == 200:
        session_id = response.json()["sessionId"]
        live.started.append(session_id)
        ended = requests.delete(f"{live.url}/sessions/{session_id}", headers=live.auth, timeout=30)
        assert ended.status_code == 202, ended.text

"""The runtime's side of the bot contract: its environment (`BotEnv`) and its callbacks
(`DispatcherClient`)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

import httpx
import pytest
import respx

from bot_runtime.callbacks import DispatcherClient
from bot_runtime.contract import BotEnv

DISPATCHER = "http://dispatcher.internal:8080"
READY = f"{DISPATCHER}/internal/sessions/s-abc123/ready"
ENDED = f"{DISPATCHER}/internal/sessions/s-abc123/ended"
CALLBACK_TOKEN = "cb-secret-token-0123456789"
DAILY_TOKEN = "daily-secret-token-0123456789"
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
ENVIRON = {
    "SESSION_ID": "s-abc123",
    "DAILY_ROOM_URL": "https://example.daily.co/s-abc123",
    "DAILY_TOKEN": DAILY_TOKEN,
    "DISPATCHER_URL": DISPATCHER + "/",
    "BOT_CALLBACK_TOKEN": CALLBACK_TOKEN,
    "SESSION_BODY": '{"persona": "pirate"}',
    "SESSION_MAX_DURATION_S": "600",
    "TRACEPARENT": TRACEPARENT,
}


@pytest.fixture
def router() -> respx.Router:
    """Routes standing in for the dispatcher's internal endpoints."""
    return respx.Router(assert_all_called=False)


@pytest.fixture
async def http(router: respx.Router) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client whose transport is the router."""
    async with httpx.AsyncClient(transport=httpx.MockTransport(router.async_handler)) as client:
        yield client


def client(
    http: httpx.AsyncClient,
    *,
    max_attempts: int = 4,
    total_timeout_s: float = 6.0,
    backoff_max_s: float = 0.02,
) -> DispatcherClient:
    """A client for session s-abc123 with a fast backoff."""
    return DispatcherClient(
        BotEnv.from_environ(ENVIRON),
        http,
        max_attempts=max_attempts,
        total_timeout_s=total_timeout_s,
        backoff_initial_s=0.01,
        backoff_max_s=backoff_max_s,
    )


async def test_ready_posts_empty_json_with_bearer(
    router: respx.Router, http: httpx.AsyncClient
) -> None:
    """`ready` POSTs `{}` to the session's ready URL with the callback token and traceparent."""
    route = router.post(READY).respond(204)
    assert await client(http).ready() is True
    request = route.calls.last.request
    assert request.headers["Authorization"] == f"Bearer {CALLBACK_TOKEN}"
    assert request.headers["traceparent"] == TRACEPARENT
    assert request.headers["Content-Type"] == "application/json"
    assert json.loads(request.content) == {}


async def test_ended_posts_reason_and_exit_code(
    router: respx.Router, http: httpx.AsyncClient
) -> None:
    """`ended` POSTs the reason and exit code to the session's ended URL; 200 counts as accepted."""
    route = router.post(ENDED).respond(200, json={"ok": True})
    assert await client(http).ended("participant_left", 0) is True
    request = route.calls.last.request
    assert request.headers["Authorization"] == f"Bearer {CALLBACK_TOKEN}"
    assert json.loads(request.content) == {"reason": "participant_left", "exit_code": 0}


async def test_ended_carries_the_error_when_there_is_one(
    router: respx.Router, http: httpx.AsyncClient
) -> None:
    """A failed session's `ended` carries its error line; a clean one's has no `error` key."""
    route = router.post(ENDED).respond(200, json={"ok": True})
    assert await client(http).ended("error", 1, "ValueError: no such voice") is True
    assert json.loads(route.calls.last.request.content) == {
        "reason": "error",
        "exit_code": 1,
        "error": "ValueError: no such voice",
    }
    assert await client(http).ended("completed", 0, None) is True
    assert "error" not in json.loads(route.calls.last.request.content)


async def test_retries_5xx_then_succeeds(router: respx.Router, http: httpx.AsyncClient) -> None:
    """A 503 (and a 429) is retried until the dispatcher accepts the callback."""
    route = router.post(READY).mock(
        side_effect=[httpx.Response(503), httpx.Response(429), httpx.Response(204)]
    )
    assert await client(http).ready() is True
    assert route.call_count == 3


@pytest.mark.parametrize("status", [401, 403, 404, 409, 410])
async def test_final_statuses_are_not_retried(
    router: respx.Router, http: httpx.AsyncClient, status: int, caplog: pytest.LogCaptureFixture
) -> None:
    """A final status is tried once, reported as not accepted, and logged by status only."""
    route = router.post(ENDED).respond(status, json={"detail": "no", "code": "x"})
    with caplog.at_level(logging.INFO, logger="bot_runtime.callbacks"):
        assert await client(http).ended("sigterm", 0) is False
    assert route.call_count == 1
    assert f"status {status}" in caplog.text
    assert CALLBACK_TOKEN not in caplog.text


async def test_gives_up_on_connection_errors_after_its_attempts(
    router: respx.Router, http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    """Repeated connection errors are retried a bounded number of times, then reported."""
    route = router.post(ENDED).mock(side_effect=httpx.ConnectError("refused"))
    with caplog.at_level(logging.INFO, logger="bot_runtime.callbacks"):
        assert await client(http, max_attempts=4).ended("error", 1) is False
    assert route.call_count == 4
    retries = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert [m.rsplit("attempt ", 1)[1] for m in retries] == ["2)", "3)", "4)"]
    assert "without an answer" not in caplog.text  # the attempts ran out, not the total time
    assert CALLBACK_TOKEN not in caplog.text


async def test_total_time_is_bounded(
    router: respx.Router, http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    """However many attempts are allowed, a call gives up once its total time is spent."""
    route = router.post(READY).mock(side_effect=httpx.ConnectError("refused"))
    bounded = client(http, max_attempts=1000, total_timeout_s=0.3, backoff_max_s=0.05)
    with caplog.at_level(logging.INFO, logger="bot_runtime.callbacks"):
        assert await bounded.ready() is False
    assert 1 < route.call_count < 1000
    assert "ready callback gave up after 0.3 s without an answer" in caplog.text


async def test_a_hanging_dispatcher_is_cut_off_at_the_bound(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A dispatcher that never answers holds the call no longer than its total bound: the
    pending request is cancelled and the call reports that it gave up."""
    cancelled = asyncio.Event()

    async def hang(request: httpx.Request) -> httpx.Response:
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()
        raise AssertionError("unreachable")

    async with httpx.AsyncClient(transport=httpx.MockTransport(hang)) as http:
        with caplog.at_level(logging.INFO, logger="bot_runtime.callbacks"):
            assert await client(http, total_timeout_s=0.2).ready() is False
    assert cancelled.is_set()
    assert "ready callback gave up after 0.2 s without an answer" in caplog.text


def test_bot_env_reads_the_contract() -> None:
    """`BotEnv` carries every contract variable, with the body parsed and the URL normalised."""
    env = BotEnv.from_environ(ENVIRON)
    assert env.session_id == "s-abc123"
    assert env.room_url == "https://example.daily.co/s-abc123"
    assert env.dispatcher_url == DISPATCHER
    assert env.daily_token == DAILY_TOKEN
    assert env.callback_token == CALLBACK_TOKEN
    assert env.body == {"persona": "pirate"}
    assert env.max_duration_s == 600
    assert env.traceparent == TRACEPARENT


def test_bot_env_optional_variables() -> None:
    """SESSION_BODY and TRACEPARENT may be absent (body {}); a JSON null body is {} too."""
    environ = {k: v for k, v in ENVIRON.items() if k not in ("SESSION_BODY", "TRACEPARENT")}
    env = BotEnv.from_environ(environ)
    assert env.body == {}
    assert env.traceparent is None
    assert BotEnv.from_environ({**ENVIRON, "SESSION_BODY": "null"}).body == {}


@pytest.mark.parametrize(
    "name",
    [
        "SESSION_ID",
        "DAILY_ROOM_URL",
        "DAILY_TOKEN",
        "DISPATCHER_URL",
        "BOT_CALLBACK_TOKEN",
        "SESSION_MAX_DURATION_S",
    ],
)
def test_bot_env_missing_variable_is_named(name: str) -> None:
    """A missing (or empty) required variable fails with an error naming it."""
    environ = {k: v for k, v in ENVIRON.items() if k != name}
    with pytest.raises(ValueError, match=name):
        BotEnv.from_environ(environ)
    with pytest.raises(ValueError, match=name):
        BotEnv.from_environ({**ENVIRON, name: ""})


@pytest.mark.parametrize(
    ("name", "value"),
    [("SESSION_MAX_DURATION_S", "ten"), ("SESSION_MAX_DURATION_S", "0"), ("SESSION_BODY", "{")],
)
def test_bot_env_malformed_variable_is_named(name: str, value: str) -> None:
    """A malformed variable fails with an error naming it."""
    with pytest.raises(ValueError, match=name):
        BotEnv.from_environ({**ENVIRON, name: value})


def test_bot_env_command_line_room_url_wins(caplog: pytest.LogCaptureFixture) -> None:
    """`--room-url` may stand in for DAILY_ROOM_URL, and wins (with a warning) when they differ."""
    other = "https://example.daily.co/other"
    with caplog.at_level(logging.WARNING, logger="bot_runtime.contract"):
        assert BotEnv.from_environ(ENVIRON, argv_room_url=other).room_url == other
    assert "differs" in caplog.text
    environ = {k: v for k, v in ENVIRON.items() if k != "DAILY_ROOM_URL"}
    assert BotEnv.from_environ(environ, argv_room_url=other).room_url == other


def test_bot_env_repr_hides_secrets() -> None:
    """Neither the Daily token nor the callback token shows in `repr` or `str`."""
    env = BotEnv.from_environ(ENVIRON)
    for text in (repr(env), str(env)):
        assert DAILY_TOKEN not in text
        assert CALLBACK_TOKEN not in text
        assert "s-abc123" in text


WEBRTC_ENVIRON = {
    **{k: v for k, v in ENVIRON.items() if k not in ("DAILY_ROOM_URL", "DAILY_TOKEN")},
    "BOT_TRANSPORT": "webrtc",
    "BOT_HOST": "127.0.0.1",
    "BOT_PORT": "8765",
    "ICE_SERVERS": json.dumps(
        [
            {"urls": "stun:stun.example.org:3478"},
            {"urls": ["turn:turn.example.org"], "username": "u", "credential": "turn-secret-1"},
        ]
    ),
}


def test_bot_env_reads_the_webrtc_contract() -> None:
    """BOT_TRANSPORT=webrtc needs no Daily variable: the address and ICE servers instead."""
    env = BotEnv.from_environ(WEBRTC_ENVIRON)
    assert env.transport == "webrtc"
    assert (env.host, env.port) == ("127.0.0.1", 8765)
    assert env.room_url is None and env.daily_token is None
    assert env.ice_servers == (
        {"urls": ["stun:stun.example.org:3478"]},
        {"urls": ["turn:turn.example.org"], "username": "u", "credential": "turn-secret-1"},
    )
    assert "turn-secret-1" not in repr(env)


def test_bot_env_webrtc_defaults() -> None:
    """BOT_HOST defaults to loopback; ICE_SERVERS absent or "[]" means none."""
    environ = {k: v for k, v in WEBRTC_ENVIRON.items() if k not in ("BOT_HOST", "ICE_SERVERS")}
    env = BotEnv.from_environ(environ)
    assert env.host == "127.0.0.1"
    assert env.ice_servers == ()
    assert BotEnv.from_environ({**WEBRTC_ENVIRON, "ICE_SERVERS": "[]"}).ice_servers == ()


def test_bot_env_transport_defaults_to_daily_and_argv_wins(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Without BOT_TRANSPORT the transport is daily; `--transport` wins (with a warning)."""
    assert BotEnv.from_environ(ENVIRON).transport == "daily"
    environ = {**WEBRTC_ENVIRON, "BOT_TRANSPORT": "daily"}
    with caplog.at_level(logging.WARNING, logger="bot_runtime.callbacks"):
        assert BotEnv.from_environ(environ, argv_transport="webrtc").transport == "webrtc"
    assert "differs" in caplog.text
    environ = {k: v for k, v in WEBRTC_ENVIRON.items() if k != "BOT_TRANSPORT"}
    assert BotEnv.from_environ(environ, argv_transport="webrtc").port == 8765


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("BOT_TRANSPORT", "livekit"),
        ("BOT_PORT", ""),
        ("BOT_PORT", "eighty"),
        ("BOT_PORT", "70000"),
        ("ICE_SERVERS", "{"),
        ("ICE_SERVERS", '{"urls": "stun:x"}'),
        ("ICE_SERVERS", '[{"urls": []}]'),
        ("ICE_SERVERS", '[{"urls": "stun:x", "credential": 1}]'),
        ("ICE_SERVERS", '[{"url": "stun:x"}]'),
    ],
)
def test_bot_env_malformed_webrtc_variable_is_named(name: str, value: str) -> None:
    """A missing or malformed webrtc variable fails with an error naming it."""
    with pytest.raises(ValueError, match=name):
        BotEnv.from_environ({**WEBRTC_ENVIRON, name: value})

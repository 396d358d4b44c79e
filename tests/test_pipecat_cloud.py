"""Pipecat Cloud's client SDK (`pipecatcloud`) against a real dispatcher: it posts to
`PIPECAT_API_HOST + /v1/public/{agent}/start`, so pointing that host at the dispatcher is all a
client changes; errors reach the SDK's exception through the body's `error` key."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pipecatcloud.exception import AgentStartError
from pipecatcloud.session import Session, SessionParams

from testkit.harness import Stack, dispatcher_stack

AGENT = "my-agent"


@pytest.fixture
async def stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Stack]:
    """A fly-mode dispatcher, and the SDK's host pointed at it (the SDK reads its environment)."""
    async with dispatcher_stack(tmp_path) as running:
        monkeypatch.setenv("PIPECAT_API_HOST", running.url)
        yield running


def api_key(stack: Stack, user: str = "user-1") -> str:
    """A client JWT of the dispatcher, given to the SDK as its public API key."""
    return stack.headers(user)["Authorization"].removeprefix("Bearer ")


def bot_env(stack: Stack, sid: str) -> dict[str, str]:
    """The env the session's bot machine was created with."""
    assert stack.fly is not None
    (env,) = [
        m.config["env"] for m in stack.fly.machines.values() if m.config["env"]["SESSION_ID"] == sid
    ]
    return dict(env)


async def test_the_sdk_starts_a_daily_session(stack: Stack) -> None:
    """`Session(...).start()` with `use_daily` gets room, token and session id, with its data as
    the bot's body and its room properties applied."""
    params = SessionParams(
        data={"persona": "pirate"},
        use_daily=True,
        daily_room_properties={"start_video_off": True},
    )
    answer = await Session(AGENT, api_key(stack), params).start()
    assert set(answer) == {"dailyRoom", "dailyToken", "sessionId"}
    sid = answer["sessionId"]
    assert answer["dailyRoom"].endswith(f"/{sid}") and answer["dailyToken"]
    session = await stack.wait_state(sid, "ready")
    assert session["user"] == "user-1" and session["transport"] == "daily"
    assert json.loads(bot_env(stack, sid)["SESSION_BODY"]) == {"persona": "pirate"}
    assert stack.daily is not None
    assert stack.daily.rooms[sid].properties["start_video_off"] is True


async def test_the_sdks_default_start_gets_a_session(stack: Stack) -> None:
    """The SDK's default (`createDailyRoom: false`, no transport) on a Daily-only dispatcher
    starts a Daily session with its own room: a bot here always needs one."""
    answer = await Session(AGENT, api_key(stack)).start()
    assert set(answer) == {"dailyRoom", "dailyToken", "sessionId"}
    session = await stack.wait_state(answer["sessionId"], "ready")
    assert session["transport"] == "daily" and session["roomUrl"] == answer["dailyRoom"]


async def test_an_invalid_token_surfaces_the_dispatchers_message(stack: Stack) -> None:
    """A key that is not a valid client token: the SDK raises AgentStartError with the
    dispatcher's code and message, and nothing is made."""
    with pytest.raises(AgentStartError) as caught:
        await Session(AGENT, "pk_not-a-jwt").start()
    assert caught.value.error_code == "invalid-token"
    assert caught.value.message.startswith("invalid-token - ")
    assert "Unknown error" not in caught.value.message
    assert stack.fly is not None and not stack.fly.machines


async def test_at_capacity_surfaces_through_the_sdk(tmp_path: Path) -> None:
    """Past MAX_SESSIONS the SDK's exception carries `at-capacity` and the dispatcher's text."""
    async with dispatcher_stack(tmp_path, env={"MAX_SESSIONS": "1"}) as stack:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("PIPECAT_API_HOST", stack.url)
            await Session(AGENT, api_key(stack), SessionParams(use_daily=True)).start()
            with pytest.raises(AgentStartError) as caught:
                await Session(AGENT, api_key(stack), SessionParams(use_daily=True)).start()
        assert caught.value.error_code == "at-capacity"
        detail = caught.value.message.removeprefix("at-capacity - ")
        assert detail != caught.value.message and "Unknown error" not in detail


async def test_the_pipecat_cloud_path_is_the_same_start(stack: Stack) -> None:
    """Any agent name's path starts as `/start` does: the same auth (401 JSON with `error`),
    the same Idempotency-Key answers (shared with `/start`), the same answer."""
    path = "/v1/public/another-agent/start"
    refused = await stack.http.post(path, json={"createDailyRoom": True})
    assert refused.status_code == 401
    assert refused.json() == {
        "detail": refused.json()["detail"],
        "code": "missing-credentials",
        "error": refused.json()["detail"],
    }
    headers = stack.headers() | {"Idempotency-Key": "pcc-1"}
    first = await stack.http.post(path, json={"createDailyRoom": True}, headers=headers)
    assert first.status_code == 200, first.text
    again = await stack.http.post("/start", json={"createDailyRoom": True}, headers=headers)
    assert again.status_code == 200 and again.json() == first.json()
    assert stack.fly is not None and len(stack.fly.machines) == 1


async def test_rate_limits_count_both_paths(tmp_path: Path) -> None:
    """A user's starts on `/start` and on the Pipecat Cloud path share one rate limit."""
    async with dispatcher_stack(tmp_path, env={"START_RATE_PER_USER": "1/1h"}) as stack:
        assert (await stack.start()).status_code == 200
        refused = await stack.http.post(
            f"/v1/public/{AGENT}/start", json={"createDailyRoom": True}, headers=stack.headers()
        )
        assert refused.status_code == 429 and refused.json()["code"] == "rate-limited"
        assert refused.json()["error"] == refused.json()["detail"]


async def test_cors_applies_to_the_pipecat_cloud_path(tmp_path: Path) -> None:
    """An allowed origin's preflight and start on the Pipecat Cloud path get CORS as `/start`
    does; another origin's preflight is 403 JSON with `error`."""
    app = "https://app.example.com"
    path = f"/v1/public/{AGENT}/start"
    async with dispatcher_stack(tmp_path, env={"CORS_ORIGINS": app}) as stack:
        asked = {"Access-Control-Request-Method": "POST"}
        pre = await stack.http.options(path, headers={"Origin": app} | asked)
        assert pre.status_code == 204, pre.text
        assert pre.headers["access-control-allow-origin"] == app
        assert pre.headers["access-control-allow-methods"] == "POST"
        started = await stack.http.post(
            path, json={"createDailyRoom": True}, headers=stack.headers() | {"Origin": app}
        )
        assert started.status_code == 200
        assert started.headers["access-control-allow-origin"] == app
        other = await stack.http.options(path, headers={"Origin": "https://evil.example"} | asked)
        assert other.status_code == 403
        assert other.json()["code"] == "origin-not-allowed"
        assert other.json()["error"] == other.json()["detail"]

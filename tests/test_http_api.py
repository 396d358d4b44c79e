"""The HTTP contract: JSON errors with stable codes, auth, ownership, callbacks, health."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import jwt
import pytest

from dispatcher.callbacks import bot_error
from dispatcher.start import MAX_BODY_BYTES
from testkit.harness import JWT_SECRET, Stack, daily_emulator, dispatcher_stack
from testkit.waits import eventually


def upstream_untouched(stack: Stack) -> bool:
    """Whether no API call beyond start-up reached Fly or Daily."""
    assert stack.fly is not None and stack.daily is not None
    daily_calls = [r for r in stack.daily.requests if r.path != "/"]
    fly_calls = [r for r in stack.fly.requests if r.method != "GET"]
    return not daily_calls and not fly_calls and not stack.fly.machines


@pytest.fixture
async def stack(tmp_path: Path):  # type: ignore[no-untyped-def]
    async with dispatcher_stack(tmp_path) as running:
        yield running


@pytest.mark.parametrize(
    ("content", "code"),
    [
        (b"{oops", "invalid-json"),
        (b'"a string"', "invalid-json"),
        (b'{"createDailyRoom": "yes"}', "invalid-type"),
        (b'{"transport": "smoke-signals"}', "unknown-transport"),
        (b'{"dailyRoomProperties": {"exp": 99999999999}}', "property-not-allowed"),
        (b'{"dailyRoomProperties": {"enable_recording": "cloud"}}', "property-not-allowed"),
        (b'{"dailyMeetingTokenProperties": {"is_owner": true}}', "property-not-allowed"),
        (b'{"region": "syd"}', "region-not-allowed"),
        (b'{"dailyRoomProperties": {"privacy": "public"}}', "property-not-allowed"),
        (b'{"dailyRoomProperties": {"max_participants": 200}}', "property-not-allowed"),
        (b'{"dailyMeetingTokenProperties": {"exp": 99999999999}}', "property-not-allowed"),
        (b'{"dailyMeetingTokenProperties": {"user_id": "someone-else"}}', "property-not-allowed"),
        (b'{"body": ' + b"[" * 40 + b"]" * 40 + b"}", "json-too-deep"),
        (b'{"body": "' + b"x" * 17_000 + b'"}', "body-too-large"),
    ],
)
async def test_bad_input_is_400_json(stack: Stack, content: bytes, code: str) -> None:
    """Bad JSON, wrong types and disallowed properties: 400 JSON, nothing reaches Fly or Daily."""
    response = await stack.http.post(
        "/start",
        content=content,
        headers=stack.headers() | {"content-type": "application/json"},
    )
    assert response.status_code == 400
    assert response.json()["code"] == code and response.json()["detail"]
    assert upstream_untouched(stack)


async def test_oversize_body_is_413(stack: Stack) -> None:
    """A body over the limit answers 413 JSON before it is parsed."""
    response = await stack.http.post(
        "/start", content=b"{" + b" " * MAX_BODY_BYTES + b"}", headers=stack.headers()
    )
    assert response.status_code == 413
    assert response.json()["code"] == "payload-too-large"
    assert upstream_untouched(stack)


def expired_token() -> str:
    return jwt.encode({"sub": "u", "exp": int(time.time()) - 600}, JWT_SECRET, algorithm="HS256")


def signed(**claims: object) -> str:
    payload = {"sub": "u", "exp": int(time.time()) + 600} | claims
    return jwt.encode({k: v for k, v in payload.items() if v is not None}, JWT_SECRET, "HS256")


def tampered() -> str:
    header, _, signature = signed(sub="alice").split(".")
    forged = jwt.utils.base64url_encode(b'{"sub":"admin","role":"admin","exp":9999999999}')
    return f"{header}.{forged.decode()}.{signature}"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# The credentials, made when the test runs (a token's times are relative to then, however long
# the suite has run before it), and the code each gets.
BAD_CREDENTIALS: dict[str, tuple[Callable[[], dict[str, str]], str]] = {
    "none": (dict, "missing-credentials"),
    "garbage": (lambda: bearer("garbage"), "invalid-token"),
    "wrong-key": (
        lambda: bearer(
            jwt.encode(
                {"sub": "u", "exp": int(time.time()) + 600},
                "wrong-secret-" + "z" * 32,
                algorithm="HS256",
            )
        ),
        "invalid-token",
    ),
    "expired": (lambda: bearer(expired_token()), "token-expired"),
    "alg-none": (
        lambda: bearer(
            jwt.encode({"sub": "u", "exp": int(time.time()) + 600}, None, algorithm="none")
        ),
        "invalid-token",
    ),
    "tampered": (lambda: bearer(tampered()), "invalid-token"),
    "no-sub": (lambda: bearer(signed(sub=None)), "invalid-token"),
    "nbf": (lambda: bearer(signed(nbf=int(time.time()) + 600)), "invalid-token"),
}


@pytest.mark.parametrize("kind", BAD_CREDENTIALS)
async def test_no_or_bad_jwt_is_401_json(stack: Stack, kind: str) -> None:
    """Missing or bad credentials answer 401 JSON on /start and /sessions; nothing is made."""
    make, code = BAD_CREDENTIALS[kind]
    headers = make()
    response = await stack.http.post("/start", json={}, headers=headers)
    assert response.status_code == 401 and response.json()["code"] == code
    for method in ("GET", "DELETE"):
        response = await stack.http.request(method, "/sessions/s-0123456789abcdef", headers=headers)
        assert response.status_code == 401
    assert upstream_untouched(stack)


async def test_sessions_are_visible_to_their_owner_only(stack: Stack) -> None:
    """Another user's session answers 404, for reading and for deleting."""
    sid = (await stack.start(user="alice")).json()["sessionId"]
    assert (await stack.session(sid, user="alice"))["user"] == "alice"
    for method in ("GET", "DELETE"):
        response = await stack.http.request(
            method, f"/sessions/{sid}", headers=stack.headers("mallory")
        )
        assert response.status_code == 404
        assert response.json()["code"] == "session-not-found"
    assert (await stack.session(sid, user="alice"))["state"] in ("dispatched", "ready")


async def test_delete_is_idempotent(stack: Stack) -> None:
    """Deleting an ended session again answers 202 with the session as it is."""
    sid = (await stack.start()).json()["sessionId"]
    await stack.wait_state(sid, "ready")
    first = await stack.http.delete(f"/sessions/{sid}", headers=stack.headers())
    assert first.status_code == 202
    await stack.wait_state(sid, "ended")
    again = await stack.http.delete(f"/sessions/{sid}", headers=stack.headers())
    assert again.status_code == 202 and again.json()["state"] == "ended"


async def test_callbacks_need_the_sessions_own_token(stack: Stack) -> None:
    """A callback with no token, a wrong one, or another session's is 401; after the end, 409."""
    assert stack.fly is not None
    one = (await stack.start({"testBot": {"skip_ready": True}})).json()["sessionId"]
    two = (await stack.start()).json()["sessionId"]
    await stack.wait_state(two, "ready")
    tokens = {
        m.config["env"]["SESSION_ID"]: m.config["env"]["BOT_CALLBACK_TOKEN"]
        for m in stack.fly.machines.values()
    }
    ready = f"/internal/sessions/{one}/ready"
    assert (await stack.http.post(ready)).status_code == 401
    bad = {"Authorization": "Bearer not-the-token"}
    assert (await stack.http.post(ready, headers=bad)).status_code == 401
    other = {"Authorization": f"Bearer {tokens[two]}"}
    refused = await stack.http.post(ready, headers=other)
    assert refused.status_code == 401 and refused.json()["code"] == "invalid-callback-token"
    assert (await stack.session(one))["state"] == "dispatched"

    own = {"Authorization": f"Bearer {tokens[one]}"}
    bad_reason = await stack.http.post(
        f"/internal/sessions/{one}/ended", headers=own, json={"reason": "<script>", "exit_code": 0}
    )
    assert bad_reason.status_code == 400
    assert (await stack.http.post(ready, headers=own)).status_code == 200
    await stack.wait_state(one, "ready")
    await stack.http.delete(f"/sessions/{one}", headers=stack.headers())
    await stack.wait_state(one, "ended")
    replay = await stack.http.post(ready, headers=own)
    assert replay.status_code == 409 and replay.json()["code"] == "session-ended"


# A bot that neither calls ready nor ended on its own: the tests send its callbacks.
SILENT_BOT = {"testBot": {"skip_ready": True, "no_ended": True}}


async def test_the_bots_error_is_shown_with_the_session(stack: Stack) -> None:
    """The `error` of the bot's ended report, stripped, is the session's `error` in its JSON."""
    sid = (await stack.start(SILENT_BOT)).json()["sessionId"]
    assert (await stack.session(sid))["error"] is None
    ended = await stack.bot_ended(
        sid, reason="crashed", exit_code=1, error="  ValueError: no such voice\n"
    )
    assert ended.status_code == 200, ended.text
    session = await stack.session(sid)
    assert session["state"] == "ending" and session["endReason"] == "crashed"
    assert session["exitCode"] == 1 and session["error"] == "ValueError: no such voice"


async def test_an_error_that_is_not_a_string_is_400_and_changes_nothing(stack: Stack) -> None:
    """An ended report whose `error` is not a string or null is 400 `invalid-error`, and the
    session stays as it was."""
    sid = (await stack.start(SILENT_BOT)).json()["sessionId"]
    before = await stack.session(sid)
    for error in (42, True, ["ValueError"], {"type": "ValueError"}):
        refused = await stack.bot_ended(sid, reason="crashed", exit_code=1, error=error)
        assert refused.status_code == 400, error
        assert refused.json()["code"] == "invalid-error" and refused.json()["detail"]
    assert await stack.session(sid) == before
    assert before["state"] == "dispatched" and before["error"] is None


async def test_a_long_error_is_stored_as_its_first_1000_characters(stack: Stack) -> None:
    """A 5000-character error (a body over the other callbacks' limit) is accepted and stored
    cut to its first 1000 characters."""
    sid = (await stack.start(SILENT_BOT)).json()["sessionId"]
    error = "ValueError: " + "é" * 4988
    ended = await stack.bot_ended(sid, reason="crashed", exit_code=1, error=error)
    assert ended.status_code == 200, ended.text
    assert (await stack.session(sid))["error"] == error[:1000]


async def test_the_bots_error_after_a_delete_is_stored_and_deleted_stays(stack: Stack) -> None:
    """A bot that reports its error after a DELETE: its error is stored, the end reason stays
    `deleted`, and a later report does not overwrite the error."""
    sid = (await stack.start({"testBot": {"ignore_sigterm": True, "no_ended": True}})).json()[
        "sessionId"
    ]
    await stack.wait_state(sid, "ready")
    deleted = await stack.http.delete(f"/sessions/{sid}", headers=stack.headers())
    assert deleted.json()["state"] == "ending"
    error = "RuntimeError: the pipeline was cancelled"
    ended = await stack.bot_ended(sid, reason="crashed", exit_code=1, error=error)
    assert ended.status_code == 200, ended.text
    again = await stack.bot_ended(sid, reason="crashed", exit_code=2, error="another error")
    assert again.status_code == 200, again.text
    session = await stack.session(sid)
    assert session["state"] == "ending" and session["endReason"] == "deleted"
    assert session["error"] == error and session["exitCode"] == 1
    final = await stack.wait_state(sid, "ended")
    assert final["endReason"] == "deleted" and final["error"] == error


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        (None, None),
        ("", None),
        (" \n\t ", None),
        ("  ValueError: no such voice  ", "ValueError: no such voice"),
        ("a\x00b", "a\ufffdb"),
        ("lone \ud800 surrogate", "lone ? surrogate"),
        ("x" * 1001, "x" * 1000),
    ],
    ids=["null", "empty", "blank", "stripped", "nul", "surrogate", "long"],
)
def test_the_error_is_made_storable(given: str | None, stored: str | None) -> None:
    """An ended report's error is stripped, blank is none, NUL and lone surrogates (which no
    database stores) are replaced, and it is cut to 1000 characters."""
    assert bot_error(given) == stored


async def test_unknown_routes_and_methods_are_json(stack: Stack) -> None:
    """404 and 405 answers are JSON too (Pipecat's client parses every error as JSON)."""
    missing = await stack.http.get("/nope")
    assert missing.status_code == 404 and missing.json()["code"] == "not-found"
    wrong = await stack.http.put("/start")
    assert wrong.status_code == 405 and wrong.json()["code"] == "method-not-allowed"


async def test_every_error_body_carries_error_beside_detail_and_code(stack: Stack) -> None:
    """Error answers (400, 401, 404, 405, 413) are `{"detail", "code", "error"}`, `error` being
    the `detail` text: what the pipecatcloud SDK reads."""
    answers = [
        await stack.http.post("/start", content=b"{oops", headers=stack.headers()),
        await stack.http.post("/start", json={}),
        await stack.http.get("/sessions/s-0123456789abcdef", headers=stack.headers()),
        await stack.http.get("/nope"),
        await stack.http.put("/start"),
        await stack.http.post(
            "/start", content=b" " * (MAX_BODY_BYTES + 1), headers=stack.headers()
        ),
    ]
    assert [a.status_code for a in answers] == [400, 401, 404, 404, 405, 413]
    for answer in answers:
        body = answer.json()
        assert set(body) == {"detail", "code", "error"} and body["error"] == body["detail"]


async def test_create_daily_room_false_is_a_daily_session_on_a_daily_only_dispatcher(
    stack: Stack,
) -> None:
    """`createDailyRoom: false` without a transport (the pipecatcloud SDK's default) on a
    dispatcher with Daily alone is a Daily session with its own room (a bot here always needs a
    transport); with `transport: "daily"` it stays 400 `room-required`."""
    started = await stack.http.post(
        "/start", json={"createDailyRoom": False}, headers=stack.headers()
    )
    assert started.status_code == 200, started.text
    assert set(started.json()) == {"dailyRoom", "dailyToken", "sessionId"}
    session = await stack.wait_state(started.json()["sessionId"], "ready")
    assert session["transport"] == "daily" and session["roomUrl"] == started.json()["dailyRoom"]
    refused = await stack.http.post(
        "/start", json={"transport": "daily", "createDailyRoom": False}, headers=stack.headers()
    )
    assert refused.status_code == 400 and refused.json()["code"] == "room-required"


async def test_health_and_readiness(stack: Stack) -> None:
    """/healthz answers while alive; /readyz is 200 with every backend reachable."""
    health = (await stack.http.get("/healthz")).json()
    assert health["status"] == "ok" and health["draining"] is False
    assert health["reconciler"] == "leader" and health["instance"]
    ready = await stack.http.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"store": "ok", "machines": "ok", "rooms": "ok"}


async def test_readiness_fails_when_a_backend_is_down(tmp_path: Path) -> None:
    """/readyz answers 503 JSON naming the backend that cannot be reached."""
    daily = daily_emulator()
    async with dispatcher_stack(tmp_path, daily=daily) as stack:
        daily.faults.add("domain", status=500, times=1000)
        response = await stack.http.get("/readyz")
        assert response.status_code == 503
        body = response.json()
        assert body["code"] == "backend-unavailable"
        assert body["checks"]["rooms"] != "ok" and body["checks"]["store"] == "ok"


async def test_capacity_is_429_with_retry_after(tmp_path: Path) -> None:
    """Past MAX_SESSIONS a start answers 429 JSON with Retry-After and makes nothing."""
    async with dispatcher_stack(tmp_path, env={"MAX_SESSIONS": "1"}) as stack:
        assert stack.fly is not None
        assert (await stack.start()).status_code == 200
        response = await stack.start()
        assert response.status_code == 429
        assert response.json()["code"] == "at-capacity"
        assert int(response.headers["retry-after"]) >= 1
        assert len(stack.fly.machines) == 1


@pytest.mark.slow
async def test_max_duration_ends_the_session(tmp_path: Path) -> None:
    """At SESSION_MAX_DURATION_S the bot gets SIGTERM and the session ends as max_duration."""
    async with dispatcher_stack(tmp_path, env={"SESSION_MAX_DURATION_S": "2"}) as stack:
        assert stack.fly is not None
        sid = (await stack.start({"testBot": {"ignore_max_duration": True}})).json()["sessionId"]
        session = await stack.wait_state(sid, "ended", timeout=20)
        assert session["endReason"] == "max_duration"
        (machine,) = stack.fly.machines.values()
        await eventually(lambda: machine.state == "destroyed", what="machine destroyed")
        assert machine.exit_events()[0]["requested_stop"] is True

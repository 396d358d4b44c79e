"""Daily webhooks: the signature check, and `POST /webhooks/daily` ending real sessions."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from dispatcher.config import Settings
from dispatcher.errors import ConfigError, Unauthorized
from dispatcher.store import Event, Store
from dispatcher.webhooks import (
    MAX_WEBHOOK_BYTES,
    TOLERANCE_S,
    decode_secret,
    is_ping,
    sign,
    timestamp_seconds,
    verify,
)
from testkit.harness import Stack, dispatcher_stack
from testkit.waits import eventually

KEY = bytes(range(32))
SECRET = base64.b64encode(KEY).decode()
BODY = b'{"version":"1.0.0","type":"meeting.ended","id":"e-1","payload":{"room":"s-1"}}'


def reference_signature(secret: str, timestamp: str, body: bytes) -> str:
    """The signature as reference/daily.md §7 writes it, computed independently of `sign`."""
    message = f"{timestamp}.{body.decode()}".encode()
    return base64.b64encode(
        hmac.new(base64.b64decode(secret), message, hashlib.sha256).digest()
    ).decode()


def check(signature: str | None, timestamp: str | None, body: bytes = BODY, **kw: Any) -> float:
    return verify(KEY, signature, timestamp, body, now=kw.pop("now", time.time()), **kw)


# -- the signature check -------------------------------------------------------------------


def test_a_good_signature_verifies() -> None:
    """The signature of reference/daily.md verifies, and gives the time it was sent."""
    now = time.time()
    ts = str(int(now))
    signature = reference_signature(SECRET, ts, BODY)
    assert sign(KEY, ts, BODY) == signature
    assert check(signature, ts, now=now) == int(now)
    assert check("  " + signature + " ", ts, now=now) == int(now)  # header whitespace


@pytest.mark.parametrize(
    "case",
    ["other key", "tampered body", "other timestamp", "not base64", "truncated", "empty"],
)
def test_a_bad_signature_is_refused(case: str) -> None:
    ts = str(int(time.time()))
    good = sign(KEY, ts, BODY)
    signature, body = {
        "other key": (sign(b"another key of 32 bytes, exactly", ts, BODY), BODY),
        "tampered body": (good, BODY.replace(b"s-1", b"s-2")),
        "other timestamp": (sign(KEY, str(int(ts) - 1), BODY), BODY),
        "not base64": ("!!" + good[2:], BODY),
        "truncated": (base64.b64encode(base64.b64decode(good)[:16]).decode(), BODY),
        "empty": ("", BODY),
    }[case]
    with pytest.raises(Unauthorized) as caught:
        check(signature, ts, body)
    assert caught.value.code == "invalid-signature"


@pytest.mark.parametrize("missing", ["signature", "timestamp", "both"])
def test_missing_headers_are_refused(missing: str) -> None:
    ts = str(int(time.time()))
    signature = None if missing in ("signature", "both") else sign(KEY, ts, BODY)
    timestamp = None if missing in ("timestamp", "both") else ts
    with pytest.raises(Unauthorized) as caught:
        check(signature, timestamp)
    assert caught.value.code == "invalid-signature"


@pytest.mark.parametrize("offset", [-TOLERANCE_S - 1, TOLERANCE_S + 1, -86400, 86400])
def test_old_and_future_timestamps_are_stale(offset: float) -> None:
    """An authentic delivery sent more than the tolerance from now, either way, is refused."""
    now = time.time()
    ts = str(int(now + offset))
    with pytest.raises(Unauthorized) as caught:
        check(sign(KEY, ts, BODY), ts, now=now)
    assert caught.value.code == "stale-webhook"


@pytest.mark.parametrize("offset", [-TOLERANCE_S + 5, 0, TOLERANCE_S - 5])
def test_timestamps_within_the_tolerance_pass(offset: float) -> None:
    now = time.time()
    ts = str(int(now + offset))
    assert check(sign(KEY, ts, BODY), ts, now=now) == int(now + offset)


def test_millisecond_timestamps() -> None:
    """The timestamp's unit is undocumented: milliseconds are told from seconds by size."""
    now = time.time()
    ts = str(int(now * 1000))
    assert check(sign(KEY, ts, BODY), ts, now=now) == pytest.approx(now, abs=0.01)
    old = str(int((now - TOLERANCE_S - 60) * 1000))
    with pytest.raises(Unauthorized) as caught:
        check(sign(KEY, old, BODY), old, now=now)
    assert caught.value.code == "stale-webhook"


def test_other_timestamp_forms() -> None:
    """Fractional seconds (as `event_ts`) and ISO 8601 pass; a signed non-time is refused."""
    now = time.time()
    for ts in (f"{now:.2f}", datetime.fromtimestamp(now, UTC).isoformat()):
        assert check(sign(KEY, ts, BODY), ts, now=now) == pytest.approx(now, abs=0.01)
    for ts in ("yesterday", "nan", "inf", "-5", "0"):
        with pytest.raises(Unauthorized) as caught:
            check(sign(KEY, ts, BODY), ts, now=now)
        assert caught.value.code == "invalid-signature"


def test_timestamp_units_by_magnitude() -> None:
    assert timestamp_seconds("1708972279") == 1708972279
    assert timestamp_seconds("1708972279960") == pytest.approx(1708972279.96)
    assert timestamp_seconds("99999999999") == 99999999999  # just under 1e11: seconds
    assert timestamp_seconds("100000000000") == 100000000  # 1e11: milliseconds
    assert timestamp_seconds("2024-02-26T18:31:19Z") == 1708972279
    assert timestamp_seconds("") is None


def test_the_secret_setting() -> None:
    """DAILY_WEBHOOK_SECRET must be base64 of 16 bytes or more; it never shows."""
    settings = Settings.from_env({"DAILY_WEBHOOK_SECRET": SECRET})
    assert settings.daily_webhook_secret is not None
    assert decode_secret(settings.daily_webhook_secret.reveal()) == KEY
    assert SECRET not in repr(settings) and SECRET not in str(settings)
    assert Settings.from_env({}).daily_webhook_secret is None
    unpadded = base64.b64encode(KEY[:31]).decode().rstrip("=")
    assert Settings.from_env({"DAILY_WEBHOOK_SECRET": unpadded}).daily_webhook_secret
    for bad in ("not base64 at all!", base64.b64encode(b"short").decode()):
        with pytest.raises(ConfigError) as caught:
            Settings.from_env({"DAILY_WEBHOOK_SECRET": bad})
        assert "DAILY_WEBHOOK_SECRET" in caught.value.detail and bad not in caught.value.detail


def test_what_counts_as_the_verification_request() -> None:
    for ping in (b"", b"  \n", b"{}", b'{"test": "test"}', b'{"test": true}'):
        assert is_ping(ping)
    for event in (BODY, b'{"type": "test"}', b"[1]", b"{oops", b"[" * 5000, b'"test"'):
        assert not is_ping(event)


async def test_event_ids_are_claimed_once(store: Store) -> None:
    """An event id is handled once; a released one again; ids older than a day are purged."""
    assert await store.claim_webhook("e-1")
    assert not await store.claim_webhook("e-1")
    await store.release_webhook("e-1")
    assert await store.claim_webhook("e-1")
    assert await store.claim_webhook("e-old", at=time.time() - 2 * 86400)
    assert await store.purge_webhooks(received_before=time.time() - 86400) == 1
    assert await store.claim_webhook("e-old")
    assert not await store.claim_webhook("e-1")


# -- POST /webhooks/daily on a whole dispatcher -----------------------------------------------


# The stop's grace: long enough for a test bot on a loaded machine to say goodbye and exit 0
# (a loaded run saw one killed at the default 2 s of the tests' environment).
GRACE_S = 10


@contextlib.asynccontextmanager
async def webhook_stack(tmp_path: Path) -> AsyncIterator[Stack]:
    env = {"DAILY_WEBHOOK_SECRET": SECRET, "BOT_STOP_TIMEOUT_S": str(GRACE_S)}
    async with dispatcher_stack(tmp_path, env=env) as stack:
        yield stack


def event(kind: str, room: str, event_id: str | None = None, **payload: Any) -> dict[str, Any]:
    """A webhook as reference/daily.md §7 shows Daily's envelope."""
    return {
        "version": "1.0.0",
        "type": kind,
        "id": event_id or str(uuid.uuid4()),
        "payload": {"room": room, **payload},
        "event_ts": time.time(),
    }


async def deliver(
    stack: Stack,
    body: dict[str, Any] | bytes,
    *,
    key: bytes = KEY,
    sent_at: float | None = None,
    signed: bool = True,
) -> httpx.Response:
    """POST a webhook, signed as Daily signs it (with `key`, sent at `sent_at`)."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if signed:
        ts = str(int(time.time() if sent_at is None else sent_at))
        headers |= {"X-Webhook-Timestamp": ts, "X-Webhook-Signature": sign(key, ts, raw)}
    return await stack.http.post("/webhooks/daily", content=raw, headers=headers)


async def ready_session(stack: Stack, body: Any = None) -> tuple[str, dict[str, Any]]:
    response = await stack.start(body)
    assert response.status_code == 200, response.text
    answer = response.json()
    await stack.wait_state(answer["sessionId"], "ready")
    return answer["sessionId"], answer


async def event_log(tmp_path: Path, sid: str) -> list[Event]:
    store = await Store.open(f"sqlite:///{tmp_path}/dispatcher.db")
    try:
        return await store.events(sid)
    finally:
        await store.close()


def webhooks_in(log: list[Event]) -> list[dict[str, Any]]:
    return [e.details for e in log if e.kind == "webhook"]


def stops(stack: Stack) -> list[Any]:
    assert stack.fly is not None
    return [r for r in stack.fly.requests if r.method == "POST" and r.path.endswith("/stop")]


async def test_meeting_ended_ends_a_ready_session(tmp_path: Path) -> None:
    """A signed meeting.ended for a session's room: `ending`, SIGTERM with the grace period,
    then `ended` as meeting_ended, machine destroyed, room deleted, webhook in the log."""
    async with webhook_stack(tmp_path) as stack:
        assert stack.fly is not None and stack.daily is not None
        sid, _ = await ready_session(stack)
        delivery = event("meeting.ended", sid, meeting_id="m-1", start_ts=time.time() - 60)
        response = await deliver(stack, delivery)
        assert response.status_code == 200, response.text
        assert response.json() == {"ok": True, "sessionId": sid, "ending": True}
        (stop,) = stops(stack)  # before the answer: not left to the reconciler
        session = await stack.wait_state(sid, "ended", timeout=GRACE_S + 30)
        assert session["endReason"] == "meeting_ended" and session["exitCode"] == 0
        assert stop.body == {"signal": "SIGTERM", "timeout": f"{GRACE_S}s"}
        (machine,) = stack.fly.machines.values()
        await eventually(lambda: machine.state == "destroyed", what="machine destroyed")
        await eventually(lambda: sid not in stack.daily.rooms, what="room deleted")
        log = await event_log(tmp_path, sid)
        (hook,) = webhooks_in(log)
        assert hook["type"] == "meeting.ended" and hook["event_id"] == delivery["id"]
        assert hook["session_state"] == "ready"
        (ending,) = [e for e in log if e.state == "ending"]
        assert ending.details == {
            "reason": "meeting_ended",
            "source": "webhook",
            "event_id": delivery["id"],
        }
        assert SECRET not in json.dumps([e.details for e in log])


async def test_participant_left_ends_it_only_for_its_user(tmp_path: Path) -> None:
    """participant.left of the bot or of someone else changes nothing; of the user (its
    Daily user_id, as Daily reports it for the user's token) it ends the session."""
    async with webhook_stack(tmp_path) as stack:
        assert stack.fly is not None and stack.daily is not None
        sid, answer = await ready_session(stack)
        user = stack.daily.join(sid, answer["dailyToken"])
        (machine,) = stack.fly.machines.values()
        bot = stack.daily.join(sid, machine.config["env"]["DAILY_TOKEN"])
        assert bot["userId"] == f"bot-{sid}"
        for user_id in (bot["userId"], "someone-else", None):
            response = await deliver(stack, event("participant.left", sid, user_id=user_id))
            assert response.status_code == 200, response.text
            assert response.json() == {"ok": True, "sessionId": sid, "ending": False}
        assert (await stack.session(sid))["state"] == "ready" and not stops(stack)

        left = event("participant.left", sid, user_id=user["userId"], duration=12)
        response = await deliver(stack, left)
        assert response.json() == {"ok": True, "sessionId": sid, "ending": True}
        assert len(stops(stack)) == 1
        session = await stack.wait_state(sid, "ended")
        assert session["endReason"] == "participant_left"
        await eventually(lambda: machine.state == "destroyed", what="machine destroyed")
        await eventually(lambda: sid not in stack.daily.rooms, what="room deleted")
        hooks = webhooks_in(await event_log(tmp_path, sid))
        assert [h["user_id"] for h in hooks] == [f"bot-{sid}", "someone-else", None, "user-1"]


async def test_deliveries_that_change_nothing(tmp_path: Path) -> None:
    """A bad or missing signature or an old or future timestamp is 401 before anything is
    read; unknown rooms and other events are 200 ignored; none touches the live session."""
    async with webhook_stack(tmp_path) as stack:
        sid, _ = await ready_session(stack)
        ended = event("meeting.ended", sid)
        raw = json.dumps(ended).encode()
        ts = str(int(time.time()))
        refused = [
            (await deliver(stack, ended, key=b"k" * 32), "invalid-signature"),
            (await deliver(stack, ended, signed=False), "invalid-signature"),
            (
                await stack.http.post(
                    "/webhooks/daily",
                    content=raw,
                    headers={"X-Webhook-Timestamp": ts, "X-Webhook-Signature": "%%%"},
                ),
                "invalid-signature",
            ),
            (await deliver(stack, ended, sent_at=time.time() - 600), "stale-webhook"),
            (await deliver(stack, ended, sent_at=time.time() + 600), "stale-webhook"),
        ]
        for response, code in refused:
            assert response.status_code == 401, response.text
            assert response.json()["code"] == code and response.json()["detail"]
        ignored = [
            (event("meeting.ended", "s-0123456789abcdef"), "room"),
            (event("meeting.ended", "lobby"), "room"),
            (event("participant.left", "", user_id="user-1"), "room"),
            (event("participant.joined", sid, user_id="user-1"), "event"),
            (event("meeting.started", sid), "event"),
            ({"type": ["meeting.ended"], "id": "x", "payload": {"room": sid}}, "event"),
        ]
        for body, why in ignored:
            response = await deliver(stack, body)
            assert response.status_code == 200, response.text
            assert response.json() == {"ok": True, "ignored": why}
        not_json = await deliver(stack, b'{"type": "meeting.ended", oops')
        assert not_json.status_code == 400 and not_json.json()["code"] == "invalid-json"
        assert (await stack.session(sid))["state"] == "ready" and not stops(stack)
        assert webhooks_in(await event_log(tmp_path, sid)) == []
        # The first delivery was refused, never claimed: the authentic one still counts.
        assert (await deliver(stack, ended)).json()["ending"] is True
        assert (await stack.wait_state(sid, "ended"))["endReason"] == "meeting_ended"


async def test_a_replayed_event_id_has_no_effect(tmp_path: Path) -> None:
    """An event id seen before is answered `duplicate` and not handled, whatever it carries."""
    async with webhook_stack(tmp_path) as stack:
        sid, _ = await ready_session(stack)
        first = event("participant.left", sid, event_id="evt-1", user_id=f"bot-{sid}")
        assert (await deliver(stack, first)).json()["ending"] is False
        same_id = event("meeting.ended", sid, event_id="evt-1")
        response = await deliver(stack, same_id)
        assert response.status_code == 200
        assert response.json() == {"ok": True, "duplicate": True}
        assert (await stack.session(sid))["state"] == "ready" and not stops(stack)

        ended = event("meeting.ended", sid, event_id="evt-2")
        assert (await deliver(stack, ended)).json()["ending"] is True
        assert (await deliver(stack, ended)).json() == {"ok": True, "duplicate": True}
        await stack.wait_state(sid, "ended")
        log = await event_log(tmp_path, sid)
        assert [h["event_id"] for h in webhooks_in(log)] == ["evt-1", "evt-2"]
        assert len([e for e in log if e.state == "ending"]) == 1
        assert len(stops(stack)) == 1


async def test_a_reason_of_the_dispatcher_is_not_overridden(tmp_path: Path) -> None:
    """A session already ending (here: DELETE) keeps its reason; the webhook is recorded."""
    async with webhook_stack(tmp_path) as stack:
        sid, _ = await ready_session(stack)
        deleted = await stack.http.delete(f"/sessions/{sid}", headers=stack.headers())
        assert deleted.status_code == 202
        response = await deliver(stack, event("meeting.ended", sid))
        assert response.json() == {"ok": True, "sessionId": sid, "ending": False}
        assert (await stack.wait_state(sid, "ended"))["endReason"] == "deleted"
        (hook,) = webhooks_in(await event_log(tmp_path, sid))
        assert hook["session_state"] == "ending"


async def test_the_user_leaving_before_the_bot_is_ready(tmp_path: Path) -> None:
    """Ended by a webhook before ready, a session is `ended` (the user's doing), not failed."""
    async with webhook_stack(tmp_path) as stack:
        assert stack.fly is not None
        response = await stack.start({"testBot": {"skip_ready": True}})
        sid = response.json()["sessionId"]
        await stack.wait_state(sid, "dispatched")
        assert (await deliver(stack, event("meeting.ended", sid))).json()["ending"] is True
        session = await stack.wait_state(sid, "ended", "failed")
        assert session["state"] == "ended" and session["endReason"] == "meeting_ended"
        (machine,) = stack.fly.machines.values()
        await eventually(lambda: machine.state == "destroyed", what="machine destroyed")


async def test_the_verification_request_is_answered(tmp_path: Path) -> None:
    """Daily's test request when a webhook is created gets 200 quickly, signed or not."""
    async with webhook_stack(tmp_path) as stack:
        for body in (b"", b'{"test": "test"}', b"{}"):
            for signed in (False, True):
                response = await deliver(stack, body, signed=signed)
                assert response.status_code == 200, response.text
                assert response.json() == {"ok": True, "test": True}
        bad = await stack.http.post(
            "/webhooks/daily",
            content=b'{"test": "test"}',
            headers={"X-Webhook-Timestamp": "1", "X-Webhook-Signature": "AAAA"},
        )
        assert bad.status_code == 200
        assert stack.fly is not None and not stack.fly.machines


async def test_oversize_webhook_is_413(tmp_path: Path) -> None:
    async with webhook_stack(tmp_path) as stack:
        body = b'{"test": "' + b"x" * MAX_WEBHOOK_BYTES + b'"}'
        response = await deliver(stack, body)
        assert response.status_code == 413
        assert response.json()["code"] == "payload-too-large"


async def test_without_the_secret_webhooks_are_off(tmp_path: Path) -> None:
    """No DAILY_WEBHOOK_SECRET: the route does not exist (404 JSON, for any method)."""
    async with dispatcher_stack(tmp_path) as stack:
        for method in ("POST", "GET"):
            response = await stack.http.request(method, "/webhooks/daily", content=b"")
            assert response.status_code == 404
            assert response.json()["code"] == "not-found"
        response = await deliver(stack, event("meeting.ended", "s-0123456789abcdef"))
        assert response.status_code == 404


async def test_the_reconciler_forgets_event_ids_after_a_day(tmp_path: Path) -> None:
    store = await Store.open(f"sqlite:///{tmp_path}/dispatcher.db")
    try:
        assert await store.claim_webhook("e-old", at=time.time() - 86400 - 60)
        assert await store.claim_webhook("e-new", at=time.time() - 86400 + 600)
        env = {"DAILY_WEBHOOK_SECRET": SECRET, "RECONCILE_INTERVAL_S": "0.2"}
        async with dispatcher_stack(tmp_path, env=env):

            async def purged() -> bool:
                return await store.claim_webhook("e-old")  # claimable again once forgotten

            await eventually(purged, what="the old event id purged")
        assert not await store.claim_webhook("e-new")
    finally:
        await store.close()

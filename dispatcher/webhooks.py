"""Daily webhooks: verified by HMAC, deduplicated by event id, a second signal that a session
is over.

Daily posts an event for every room of the domain (reference/daily.md §7). Two of them end a
session: `meeting.ended` for its room, and `participant.left` of its user (the bot exits on that
itself, and its machine's exit is followed anyway: the webhook is the backup for a bot that
hangs). Either moves the live session to `ending` with `meeting_ended` or `participant_left`
(a compare-and-set from `dispatched`/`ready`: a reason the dispatcher decided, a DELETE or a time
limit, is never overridden) and stops its machine with the grace period, as a DELETE does; the
supervisor or the reconciler then finishes it. Delivery is neither exactly-once nor ordered, and
the reconciler does not depend on webhooks: nothing is lost when one never comes.

What the reference leaves unverified, and what this module chose:

- The signature: `base64(HMAC-SHA256(key=b64decode(secret), msg=timestamp + "." + raw body))`
  in `X-Webhook-Signature`, with the timestamp of `X-Webhook-Timestamp`, as the community's
  verifiers of Daily webhooks compute it (Daily's own snippet was not retrieved).
- The timestamp's unit is undocumented: a number at or above 1e11 is taken as milliseconds
  (1e11 seconds is the year 5138, 1e11 milliseconds is 1973), below it as seconds; an ISO 8601
  time is accepted too. It must be within `TOLERANCE_S` of our clock, either way.
- Daily's verification request (sent when a webhook is created or updated, expecting a quick
  200) is documented only as "a test request body", maybe unsigned. So a body that is empty or
  a JSON object without `type` (every event has one; `{"test": "test"}` has none) is answered
  200 `{"ok": true, "test": true}` before any signature check: it has no effect at all.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import math
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from dispatcher.cleanup import record_failure
from dispatcher.config import Settings
from dispatcher.errors import BadRequest, ErrorCode, Unauthorized
from dispatcher.http.input import json_object
from dispatcher.ids import SESSION_ID
from dispatcher.lifecycle import EndReason, end_from_room
from dispatcher.logs import session_context
from dispatcher.machines import MachineBackend, MachineRef
from dispatcher.rooms.daily import daily_user_id
from dispatcher.store import Session, Store
from dispatcher.supervisor import Supervisor

log = logging.getLogger(__name__)

MAX_WEBHOOK_BYTES = 64 * 1024
# How far X-Webhook-Timestamp may be from our clock, into the past or the future.
TOLERANCE_S = 300.0
# A timestamp at or above this is in milliseconds (see the module's docstring).
MILLISECONDS_FROM = 1e11
# Event ids longer than this are stored as their hash (Daily's are UUIDs).
MAX_EVENT_ID = 128
# The events that end a session, and the end reason each gives.
ENDING_EVENTS = {
    "meeting.ended": EndReason.MEETING_ENDED,
    "participant.left": EndReason.PARTICIPANT_LEFT,
}


def decode_secret(secret: str) -> bytes:
    """The HMAC key of a webhook secret as Daily gives it (base64; missing padding is
    tolerated); ValueError if it is not base64."""
    text = secret.strip()
    key = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    if not key:
        raise ValueError("empty secret")
    return key


def _digest(key: bytes, timestamp: str, body: bytes) -> bytes:
    # Header values reach us decoded as latin-1: encoding back gives the bytes Daily signed.
    return hmac.new(key, timestamp.encode("latin-1") + b"." + body, hashlib.sha256).digest()


def sign(key: bytes, timestamp: str, body: bytes) -> str:
    """The X-Webhook-Signature of a body sent at `timestamp` (as the header carries it)."""
    return base64.b64encode(_digest(key, timestamp, body)).decode()


def timestamp_seconds(raw: str) -> float | None:
    """X-Webhook-Timestamp as unix seconds: seconds or milliseconds told apart by magnitude,
    or ISO 8601; None if it is none of these."""
    text = raw.strip()
    try:
        value = float(text)
    except ValueError:
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            return None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        return parsed.timestamp()
    if not math.isfinite(value) or value <= 0:
        return None
    return value / 1000 if value >= MILLISECONDS_FROM else value


def verify(
    key: bytes,
    signature: str | None,
    timestamp: str | None,
    body: bytes,
    *,
    now: float,
    tolerance_s: float = TOLERANCE_S,
) -> float:
    """Check a delivery's signature (constant time), then its age; the time it was sent.

    Unauthorized `invalid-signature` for missing headers, a signature that is not base64 or
    does not match, or a timestamp that is not a time; `stale-webhook` for an authentic
    delivery more than `tolerance_s` from `now`, either way.
    """
    if not signature or not timestamp:
        raise Unauthorized(
            "X-Webhook-Signature and X-Webhook-Timestamp are required",
            code=ErrorCode.INVALID_SIGNATURE,
        )
    try:
        given = base64.b64decode(signature.strip(), validate=True)
    except ValueError:
        raise Unauthorized(
            "X-Webhook-Signature is not base64", code=ErrorCode.INVALID_SIGNATURE
        ) from None
    if not hmac.compare_digest(given, _digest(key, timestamp, body)):
        raise Unauthorized(
            "the webhook signature does not verify", code=ErrorCode.INVALID_SIGNATURE
        )
    sent_at = timestamp_seconds(timestamp)
    if sent_at is None:
        raise Unauthorized("X-Webhook-Timestamp is not a time", code=ErrorCode.INVALID_SIGNATURE)
    if abs(now - sent_at) > tolerance_s:
        raise Unauthorized(
            f"the webhook was sent more than {tolerance_s:.0f} s from now",
            code=ErrorCode.STALE_WEBHOOK,
        )
    return sent_at


def is_ping(raw: bytes) -> bool:
    """Whether a body is Daily's verification request rather than an event: empty, or a JSON
    object without `type`."""
    try:
        return "type" not in json_object(raw)
    except BadRequest:
        return False


def _dedupe_key(event_id: Any) -> str | None:
    if not isinstance(event_id, str) or not event_id:
        return None
    if len(event_id) <= MAX_EVENT_ID:
        return event_id
    return "sha256:" + hashlib.sha256(event_id.encode()).hexdigest()


class DailyWebhooks:
    """`POST /webhooks/daily`: verification, deduplication, and the sessions it ends."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        machines: MachineBackend,
        supervisor: Supervisor,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        assert settings.daily_webhook_secret is not None
        self._key = decode_secret(settings.daily_webhook_secret.reveal())
        self._settings = settings
        self._store = store
        self._machines = machines
        self._supervisor = supervisor
        self._clock = clock

    async def receive(self, headers: Mapping[str, str], raw: bytes) -> dict[str, Any]:
        """Answer one delivery (its body at most MAX_WEBHOOK_BYTES, read by the caller)."""
        if is_ping(raw):
            log.info("daily webhook: verification request answered")
            return {"ok": True, "test": True}
        verify(
            self._key,
            headers.get("x-webhook-signature"),
            headers.get("x-webhook-timestamp"),
            raw,
            now=self._clock(),
        )
        event = json_object(raw)
        kind = event.get("type")
        if not isinstance(kind, str) or kind not in ENDING_EVENTS:
            return {"ok": True, "ignored": "event"}
        key = _dedupe_key(event.get("id"))
        if key is not None and not await self._store.claim_webhook(key):
            log.info("daily webhook %s: a replay of %s, ignored", kind, key)
            return {"ok": True, "duplicate": True}
        try:
            return await self._handle(kind, event)
        except BaseException:
            if key is not None:  # let Daily's retry of it be handled
                await self._store.release_webhook(key)
            raise

    async def _handle(self, kind: str, event: dict[str, Any]) -> dict[str, Any]:
        payload = event.get("payload")
        payload = payload if isinstance(payload, dict) else {}
        room = payload.get("room")
        session = None
        if isinstance(room, str) and SESSION_ID.match(room):
            session = await self._store.get(room)
        if (
            session is None
            or session.room_name != room
            or session.transport != "daily"
            or session.dispatcher != self._settings.dispatcher_name
        ):
            return {"ok": True, "ignored": "room"}
        with session_context(
            session.id, machine_id=session.machine_id, traceparent=session.traceparent
        ):
            return await self._act(kind, event, payload, session)

    async def _act(
        self, kind: str, event: dict[str, Any], payload: dict[str, Any], session: Session
    ) -> dict[str, Any]:
        """Record the event in the session's log and end the session when it says so."""
        details: dict[str, Any] = {
            "event_id": event.get("id"),
            "type": kind,
            "event_ts": event.get("event_ts"),
            "session_state": session.state,
        }
        ends = True
        if kind == "participant.left":
            user_id = payload.get("user_id")
            details["user_id"] = user_id
            # Only the session's user: the bot (`bot-<session id>`) leaving is followed through
            # its machine's exit, and nobody else holds a token for the room.
            ends = isinstance(user_id, str) and user_id == daily_user_id(session.user_id)
        await self._store.record(session.id, "webhook", details)
        ending = ends and await self._end(session, ENDING_EVENTS[kind], details["event_id"])
        log.info("daily webhook %s%s", kind, ": ending the session" if ending else "")
        return {"ok": True, "sessionId": session.id, "ending": ending}

    async def _end(self, session: Session, reason: EndReason, event_id: Any) -> bool:
        """Move a live session to `ending` and stop its machine (SIGTERM and the grace period);
        whether this call ended it."""
        details = {"reason": reason, "source": "webhook", "event_id": event_id}
        ending = await end_from_room(self._store, session.id, reason, details)
        if ending is None:
            return False
        if ending.machine_id:
            ref = MachineRef(ending.machine_id, ending.region, ending.machine_version)
            stopped = False
            try:
                await self._machines.stop(ref, self._settings.bot_stop_timeout_s)
                stopped = True
            except Exception as exc:
                # The session is `ending`: the reconciler stops its machine on its next pass.
                log.warning("machine stop failed: %s", exc)
                await record_failure(self._store, session.id, "machine_stop", exc)
            self._supervisor.follow(ending, stop_sent=stopped)
        return True

"""The admin role: GET /sessions, and reading and ending any user's session."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jwt

from testkit.harness import JWT_SECRET, Stack, dispatcher_stack


def token_headers(sub: str, **claims: Any) -> dict[str, str]:
    payload = {"sub": sub, "exp": int(time.time()) + 600, **claims}
    return {"Authorization": f"Bearer {jwt.encode(payload, JWT_SECRET, algorithm='HS256')}"}


ADMIN = token_headers("oncall", role="admin")


async def started(stack: Stack, user: str) -> str:
    response = await stack.start(user=user)
    assert response.status_code == 200, response.text
    sid = str(response.json()["sessionId"])
    await stack.wait_state(sid, "ready", user=user)
    return sid


async def test_admin_lists_reads_and_ends_any_session(tmp_path: Path) -> None:
    """An admin lists the active sessions (filtered by user, or by state), reads another user's
    session and ends it; the owner sees it ended."""
    async with dispatcher_stack(tmp_path) as stack:
        alice, bob = await started(stack, "alice"), await started(stack, "bob")

        listed = await stack.http.get("/sessions", headers=ADMIN)
        assert listed.status_code == 200, listed.text
        assert {s["sessionId"] for s in listed.json()["sessions"]} == {alice, bob}
        assert listed.json()["sessions"][0]["sessionId"] == bob  # newest first
        only_bob = await stack.http.get("/sessions", params={"user": "bob"}, headers=ADMIN)
        assert [s["sessionId"] for s in only_bob.json()["sessions"]] == [bob]
        one = await stack.http.get("/sessions", params={"limit": "1"}, headers=ADMIN)
        assert len(one.json()["sessions"]) == 1

        read = await stack.http.get(f"/sessions/{alice}", headers=ADMIN)
        assert read.status_code == 200 and read.json()["user"] == "alice"
        ended = await stack.http.delete(f"/sessions/{alice}", headers=ADMIN)
        assert ended.status_code == 202 and ended.json()["state"] == "ending"
        assert (await stack.wait_state(alice, "ended", user="alice"))["endReason"] == "deleted"

        active = await stack.http.get("/sessions", headers=ADMIN)
        assert [s["sessionId"] for s in active.json()["sessions"]] == [bob]
        done = await stack.http.get("/sessions", params={"state": "ended"}, headers=ADMIN)
        assert [s["sessionId"] for s in done.json()["sessions"]] == [alice]

        await stack.http.delete(f"/sessions/{bob}", headers=stack.headers("bob"))
        await stack.wait_state(bob, "ended", user="bob")


async def test_without_the_role(tmp_path: Path) -> None:
    """A user's token cannot list sessions (403), nor read or end another's (404); no token is
    401; an admin may not talk to someone else's bot through the proxy."""
    async with dispatcher_stack(tmp_path) as stack:
        alice = await started(stack, "alice")
        mallory = token_headers("mallory", role="user", roles=["viewer"])

        forbidden = await stack.http.get("/sessions", headers=mallory)
        assert forbidden.status_code == 403 and forbidden.json()["code"] == "admin-required"
        anonymous = await stack.http.get("/sessions")
        assert anonymous.status_code == 401
        assert (await stack.http.get(f"/sessions/{alice}", headers=mallory)).status_code == 404
        assert (await stack.http.delete(f"/sessions/{alice}", headers=mallory)).status_code == 404

        proxied = await stack.http.post(f"/sessions/{alice}/api/offer", headers=ADMIN, json={})
        assert proxied.status_code == 404 and proxied.json()["code"] == "session-not-found"
        own = await stack.http.post(
            f"/sessions/{alice}/api/offer", headers=stack.headers("alice"), json={}
        )
        assert own.status_code == 404 and own.json()["code"] == "no-bot-routes"

        assert (await stack.session(alice, user="alice"))["state"] == "ready"
        await stack.http.delete(f"/sessions/{alice}", headers=stack.headers("alice"))
        await stack.wait_state(alice, "ended", user="alice")


async def test_roles_claim_and_a_configured_role(tmp_path: Path) -> None:
    """The role may come in a `roles` list; JWT_ADMIN_ROLE names it."""
    async with dispatcher_stack(tmp_path, env={"JWT_ADMIN_ROLE": "dispatcher-admin"}) as stack:
        in_list = token_headers("oncall", roles=["staff", "dispatcher-admin"])
        assert (await stack.http.get("/sessions", headers=in_list)).status_code == 200
        assert (await stack.http.get("/sessions", headers=ADMIN)).status_code == 403


async def test_bad_list_queries(tmp_path: Path) -> None:
    """Unknown states and out-of-range limits are 400 with a stable code."""
    async with dispatcher_stack(tmp_path) as stack:
        for params, code in (
            ({"state": "sleeping"}, "invalid-state"),
            ({"limit": "0"}, "invalid-limit"),
            ({"limit": "1001"}, "invalid-limit"),
            ({"limit": "ten"}, "invalid-limit"),
            ({"user": "u" * 257}, "invalid-user"),
        ):
            answer = await stack.http.get("/sessions", params=params, headers=ADMIN)
            assert answer.status_code == 400 and answer.json()["code"] == code, params

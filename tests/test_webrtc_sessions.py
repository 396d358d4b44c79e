"""webrtc sessions: the start answer, the bot contract, and the per-session proxy to the bot.

The bots here are the test bot image (testkit/fakes/images/testbot) run as local processes: in
webrtc mode it checks the contract, serves `/api/offer` on the port it was given and answers
with what it saw. The real bot's WebRTC is tested in tests/test_bot_*.py and the browser test.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from dispatcher.errors import BadRequest, BotUnreachable, Gone
from dispatcher.http.proxy import BotProxy, check_path
from testkit.harness import Stack, dispatcher_stack
from testkit.net import bind_loopback

OFFER = {"sdp": "v=0 fake-offer", "type": "offer", "pc_id": None, "restart_pc": False}


@contextlib.asynccontextmanager
async def local_stack(tmp_path: Path, **env: str) -> AsyncIterator[Stack]:
    """A local-mode dispatcher (bots are test-bot processes), Daily configured too."""
    async with dispatcher_stack(tmp_path, local=True, env=env) as stack:
        yield stack


async def start_webrtc(stack: Stack, body: Any = None, user: str = "user-1") -> str:
    """POST /start for a webrtc session; its id."""
    request: dict[str, Any] = {"transport": "webrtc"}
    if body is not None:
        request["body"] = body
    response = await stack.http.post("/start", json=request, headers=stack.headers(user))
    assert response.status_code == 200, response.text
    return str(response.json()["sessionId"])


async def test_webrtc_start_answers_like_pipecat_cloud(tmp_path: Path) -> None:
    """The answer is {sessionId, iceConfig}; no Daily room is made; the bot gets its contract."""
    async with local_stack(tmp_path) as stack:
        response = await stack.http.post(
            "/start", json={"transport": "webrtc"}, headers=stack.headers()
        )
        assert response.status_code == 200, response.text
        answer = response.json()
        assert set(answer) == {"sessionId", "iceConfig"}
        assert answer["iceConfig"] == {"iceServers": []}
        sid = answer["sessionId"]
        # The test bot refuses a broken contract (exit 3), so ready proves the env was right.
        session = await stack.wait_state(sid, "ready")
        assert session["transport"] == "webrtc"
        assert session["roomUrl"] is None
        assert stack.daily is not None and not stack.daily.rooms
        assert (await stack.http.delete(f"/sessions/{sid}", headers=stack.headers())).status_code
        ended = await stack.wait_state(sid, "ended")
        assert ended["endReason"] == "deleted"


async def test_offer_is_proxied_to_the_sessions_bot_without_credentials(tmp_path: Path) -> None:
    """POST and PATCH reach the bot's /api/offer with X-Session-Id, never the caller's token."""
    async with local_stack(tmp_path) as stack:
        sid = await start_webrtc(stack)
        headers = stack.headers() | {"Cookie": "c=secret", "X-Extra": "1"}
        offer = await stack.http.post(f"/sessions/{sid}/api/offer?x=1", json=OFFER, headers=headers)
        assert offer.status_code == 200, offer.text
        assert offer.headers["content-type"].startswith("application/json")
        answer = offer.json()
        assert answer["sdp"] == "answer-to:v=0 fake-offer"
        assert answer["type"] == "answer" and answer["pc_id"] == "testbot-pc"
        assert answer["path"] == "/api/offer?x=1"
        assert "x-session-id" in answer["seen"]
        assert not {"authorization", "cookie", "x-extra"} & set(answer["seen"])
        candidates = {
            "pc_id": "testbot-pc",
            "candidates": [{"candidate": "candidate:1", "sdp_mid": "0", "sdp_mline_index": 0}],
        }
        patch = await stack.http.patch(
            f"/sessions/{sid}/api/offer", json=candidates, headers=stack.headers()
        )
        assert patch.status_code == 200 and patch.json()["candidates"] == 1
        unknown = await stack.http.post(
            f"/sessions/{sid}/other", json=OFFER, headers=stack.headers()
        )
        assert unknown.status_code == 404 and unknown.json()["code"] == "not-found"


async def test_ice_servers_reach_the_client_and_the_bot(tmp_path: Path) -> None:
    """ICE_SERVERS goes into iceConfig and into the bot's env, the same list."""
    async with local_stack(tmp_path, ICE_SERVERS="stun:stun.example.org:3478") as stack:
        response = await stack.http.post(
            "/start", json={"transport": "webrtc"}, headers=stack.headers()
        )
        servers = [{"urls": ["stun:stun.example.org:3478"]}]
        assert response.json()["iceConfig"] == {"iceServers": servers}
        sid = response.json()["sessionId"]
        offer = await stack.http.post(
            f"/sessions/{sid}/api/offer", json=OFFER, headers=stack.headers()
        )
        assert offer.json()["ice"] == servers


async def ice_of(stack: Stack, request: dict[str, Any]) -> tuple[Any, Any]:
    """The ICE servers a webrtc start gives the client (`iceConfig`) and the bot (its env)."""
    response = await stack.http.post("/start", json=request, headers=stack.headers())
    assert response.status_code == 200, response.text
    sid = response.json()["sessionId"]
    offer = await stack.http.post(f"/sessions/{sid}/api/offer", json=OFFER, headers=stack.headers())
    assert offer.status_code == 200, offer.text
    return response.json()["iceConfig"]["iceServers"], offer.json()["ice"]


async def test_default_ice_servers_are_given_when_asked_for(tmp_path: Path) -> None:
    """`enableDefaultIceServers: true` gives the client and the bot DEFAULT_ICE_SERVERS
    (Google's public STUN server unless set, as Pipecat's runner); without it, none."""
    async with local_stack(tmp_path) as stack:
        google = [{"urls": ["stun:stun.l.google.com:19302"]}]
        asked = {"transport": "webrtc", "enableDefaultIceServers": True}
        assert await ice_of(stack, asked) == (google, google)
        assert await ice_of(stack, {"transport": "webrtc"}) == ([], [])


async def test_default_ice_servers_are_merged_after_ice_servers(tmp_path: Path) -> None:
    """With ICE_SERVERS and DEFAULT_ICE_SERVERS set, asking for the defaults gives ICE_SERVERS
    then the defaults it lacks; not asking gives ICE_SERVERS alone."""
    env = {
        "ICE_SERVERS": "stun:stun.example.org:3478",
        "DEFAULT_ICE_SERVERS": "stun:stun.example.org:3478, stun:stun.example.net",
    }
    async with local_stack(tmp_path, **env) as stack:
        merged = [{"urls": ["stun:stun.example.org:3478", "stun:stun.example.net"]}]
        asked = {"transport": "webrtc", "enableDefaultIceServers": True}
        assert await ice_of(stack, asked) == (merged, merged)
        own = [{"urls": ["stun:stun.example.org:3478"]}]
        assert await ice_of(stack, {"transport": "webrtc"}) == (own, own)


async def test_create_daily_room_false_is_webrtc_where_webrtc_is_offered(tmp_path: Path) -> None:
    """With local bots (webrtc offered beside Daily), `createDailyRoom: false` without a
    transport is a webrtc session, as Pipecat Cloud (no Daily room) and the runner (webrtc
    by default) answer it; no Daily room is made."""
    async with local_stack(tmp_path) as stack:
        response = await stack.http.post(
            "/start",
            json={"createDailyRoom": False, "enableDefaultIceServers": True},
            headers=stack.headers(),
        )
        assert response.status_code == 200, response.text
        assert set(response.json()) == {"sessionId", "iceConfig"}
        session = await stack.wait_state(response.json()["sessionId"], "ready")
        assert session["transport"] == "webrtc" and session["roomUrl"] is None
        assert stack.daily is not None and not stack.daily.rooms


async def test_ready_when_the_bot_is_connected(tmp_path: Path) -> None:
    """A bot that reports ready once connected is ready only after the offer went through:
    a bot started beside it that does not wait for the offer is ready, it is not."""
    async with local_stack(tmp_path) as stack:
        sid = await start_webrtc(stack, {"testBot": {"ready_on_offer": True}})
        control = await start_webrtc(stack, {"testBot": {}})
        await stack.wait_state(control, "ready")
        assert (await stack.session(sid))["state"] == "dispatched"
        offer = await stack.http.post(
            f"/sessions/{sid}/api/offer", json=OFFER, headers=stack.headers()
        )
        assert offer.status_code == 200
        await stack.wait_state(sid, "ready")


@pytest.mark.slow
async def test_offer_waits_for_a_bot_that_is_still_booting(tmp_path: Path) -> None:
    """An offer sent before the bot listens is retried until it does."""
    async with local_stack(tmp_path) as stack:
        sid = await start_webrtc(stack, {"testBot": {"listen_delay_s": 1.0}})
        offer = await stack.http.post(
            f"/sessions/{sid}/api/offer", json=OFFER, headers=stack.headers()
        )
        assert offer.status_code == 200, offer.text
        assert offer.json()["pc_id"] == "testbot-pc"


async def test_proxy_refuses_strangers_ended_sessions_and_big_bodies(tmp_path: Path) -> None:
    """Another user's session is not found, no token is 401, an ended one is 410, 64 KiB max."""
    async with local_stack(tmp_path) as stack:
        sid = await start_webrtc(stack)
        url = f"/sessions/{sid}/api/offer"
        other = await stack.http.post(url, json=OFFER, headers=stack.headers("user-2"))
        assert other.status_code == 404 and other.json()["code"] == "session-not-found"
        anonymous = await stack.http.post(url, json=OFFER)
        assert anonymous.status_code == 401
        big = await stack.http.post(url, content=b"x" * (64 * 1024 + 1), headers=stack.headers())
        assert big.status_code == 413
        missing = await stack.http.post(
            "/sessions/s-0000000000000000/api/offer", json=OFFER, headers=stack.headers()
        )
        assert missing.status_code == 404
        await stack.http.delete(f"/sessions/{sid}", headers=stack.headers())
        await stack.wait_state(sid, "ended")
        gone = await stack.http.post(url, json=OFFER, headers=stack.headers())
        assert gone.status_code == 410 and gone.json()["code"] == "session-ended"


async def test_daily_sessions_still_work_beside_webrtc(tmp_path: Path) -> None:
    """With DAILY_API_KEY set, Daily stays the default and answers room and token."""
    async with local_stack(tmp_path) as stack:
        response = await stack.http.post("/start", json={}, headers=stack.headers())
        assert response.status_code == 200, response.text
        assert set(response.json()) == {"dailyRoom", "dailyToken", "sessionId"}
        sid = response.json()["sessionId"]
        await stack.wait_state(sid, "ready")
        offer = await stack.http.post(
            f"/sessions/{sid}/api/offer", json=OFFER, headers=stack.headers()
        )
        # A Daily bot serves no HTTP routes: nothing is proxied.
        assert offer.status_code == 404 and offer.json()["code"] == "no-bot-routes"


async def test_the_page_is_served_in_local_mode(tmp_path: Path) -> None:
    """GET / is the web page (HTML) in local mode."""
    async with local_stack(tmp_path) as stack:
        page = await stack.http.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")


async def test_no_page_in_fly_mode(tmp_path: Path) -> None:
    """In fly mode there is no page: GET / is a JSON 404."""
    async with dispatcher_stack(tmp_path) as stack:
        page = await stack.http.get("/")
        assert page.status_code == 404 and page.json()["code"] == "not-found"
        response = await stack.http.post(
            "/start", json={"transport": "webrtc"}, headers=stack.headers()
        )
        assert response.status_code == 400
        assert response.json()["code"] == "transport-unavailable"


# The proxy on its own: bots that are gone or never listen.


async def test_proxy_gives_up_on_a_bot_that_never_listens() -> None:
    """Connection refused until boot_wait_s: 502 bot-unreachable."""
    sock = bind_loopback()
    port = sock.getsockname()[1]
    sock.close()
    async with httpx.AsyncClient() as http:
        proxy = BotProxy(http, boot_wait_s=0.3)
        with pytest.raises(BotUnreachable) as caught:
            await proxy.forward(
                "s-1", lambda: f"127.0.0.1:{port}", "POST", "api/offer", "", {}, b""
            )
    assert caught.value.code == "bot-unreachable"


async def test_proxy_stops_waiting_when_the_bot_exits() -> None:
    """A bot that exits while the proxy waits for it: 410 bot-gone, at once."""
    sock = bind_loopback()
    port = sock.getsockname()[1]
    sock.close()
    answers = iter([f"127.0.0.1:{port}", None])
    async with httpx.AsyncClient() as http:
        proxy = BotProxy(http, boot_wait_s=30)
        with pytest.raises(Gone) as caught:
            await proxy.forward("s-1", lambda: next(answers), "POST", "api/offer", "", {}, b"")
    assert caught.value.code == "bot-gone"


@pytest.mark.parametrize("path", ["api/offer", "a/b.c/d_e~f-g"])
def test_plain_paths_are_proxied(path: str) -> None:
    """Plain segments pass."""
    assert check_path(path) == path


@pytest.mark.parametrize("path", ["../internal", "api/../x", "api//offer", "a b", "x" * 257, ""])
def test_odd_paths_are_refused(path: str) -> None:
    """Dot-dot, empty segments, spaces and long paths are 400 invalid-path."""
    with pytest.raises(BadRequest) as caught:
        check_path(path)
    assert caught.value.code == "invalid-path"

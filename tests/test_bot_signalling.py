"""The webrtc bot's offer routes, in process, around a stand-in peer connection."""

from __future__ import annotations

import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from testkit.net import free_port

with warnings.catch_warnings():
    # pipecat.audio.utils imports audioop, deprecated in Python 3.11 (audioop-lts from 3.13).
    warnings.filterwarnings("ignore", "'audioop' is deprecated", DeprecationWarning)
    from aiortc import RTCIceCandidate

    from bot_runtime.webrtc import MAX_BODY_BYTES, OfferServer

SESSION = {"X-Session-Id": "s-test1"}
OFFER_SDP = (
    "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n"
    "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\na=rtpmap:111 opus/48000/2\r\n"
    "a=mid:0\r\n"
)
OFFER = {"sdp": OFFER_SDP, "type": "offer", "pc_id": None}


@dataclass
class FakeConnection:
    """What the routes use of a `SmallWebRTCConnection`, recording every call."""

    fail: Exception | None = None
    pc_id: str = "pc-1"
    pc: Any = field(default_factory=lambda: SimpleNamespace(connectionState="new"))
    calls: list[tuple[str, bool]] = field(default_factory=list)
    candidates: list[RTCIceCandidate | None] = field(default_factory=list)

    async def initialize(self, sdp: str, type: str) -> None:
        if self.fail is not None:
            raise self.fail
        self.calls.append(("initialize", False))

    async def renegotiate(self, sdp: str, type: str, restart_pc: bool = False) -> None:
        self.calls.append(("renegotiate", restart_pc))
        if restart_pc:
            self.pc_id = "pc-2"

    def get_answer(self) -> dict[str, str]:
        return {"sdp": "v=0", "type": "answer", "pc_id": self.pc_id}

    async def add_ice_candidate(self, candidate: RTCIceCandidate | None) -> None:
        self.candidates.append(candidate)


@dataclass
class Served:
    connection: FakeConnection
    server: OfferServer
    http: httpx.AsyncClient


async def serve(connection: FakeConnection) -> tuple[OfferServer, str]:
    port = free_port()
    server = OfferServer(connection, session_id="s-test1", host="127.0.0.1", port=port)  # type: ignore[arg-type]
    await server.start()
    return server, f"http://127.0.0.1:{port}"


@pytest.fixture
async def served(request: pytest.FixtureRequest) -> AsyncIterator[Served]:
    """An offer server on loopback around a fake connection (parametrize `fail` indirectly)."""
    connection = FakeConnection(fail=getattr(request, "param", None))
    server, url = await serve(connection)
    async with httpx.AsyncClient(base_url=url, headers=SESSION) as http:
        yield Served(connection, server, http)
    await server.close()


async def test_restart_renegotiation_gets_a_new_pc_id(served: Served) -> None:
    """The peer's own pc_id renegotiates; a restart answers with the new pc_id, after which
    the old one is a stranger."""
    first = await served.http.post("/api/offer", json=OFFER)
    assert first.json()["pc_id"] == "pc-1"
    again = await served.http.post("/api/offer", json={**OFFER, "pc_id": "pc-1"})
    assert again.status_code == 200
    restarted = await served.http.post(
        "/api/offer", json={**OFFER, "pc_id": "pc-1", "restart_pc": True}
    )
    assert restarted.json()["pc_id"] == "pc-2"
    stale = await served.http.post("/api/offer", json={**OFFER, "pc_id": "pc-1"})
    assert (stale.status_code, stale.json()["code"]) == (409, "peer-exists")
    assert served.connection.calls == [
        ("initialize", False),
        ("renegotiate", False),
        ("renegotiate", True),
    ]


async def test_trickled_candidates_reach_the_connection(served: Served) -> None:
    """Browser candidates (with their `candidate:` prefix) become aiortc candidates on their
    media line; an empty one is end-of-candidates, passed on as None."""
    await served.http.post("/api/offer", json=OFFER)
    line = "candidate:842163049 1 udp 1677729535 203.0.113.7 54321 typ srflx raddr 10.0.0.2 rport 5"
    response = await served.http.patch(
        "/api/offer",
        json={
            "pc_id": "pc-1",
            "candidates": [
                {"candidate": line, "sdp_mid": "0", "sdp_mline_index": 0},
                {"candidate": "", "sdp_mid": "0", "sdp_mline_index": 0},
            ],
        },
    )
    assert response.status_code == 200, response.text
    candidate, end = served.connection.candidates
    assert isinstance(candidate, RTCIceCandidate)
    assert (candidate.foundation, candidate.ip, candidate.port, candidate.type) == (
        "842163049",
        "203.0.113.7",
        54321,
        "srflx",
    )
    assert (candidate.sdpMid, candidate.sdpMLineIndex) == ("0", 0)
    assert end is None


async def test_an_oversized_body_is_413_json(served: Served) -> None:
    """A body over the limit is refused before it is read whole, as JSON."""
    response = await served.http.post("/api/offer", content=b"x" * (MAX_BODY_BYTES + 1))
    assert (response.status_code, response.json()["code"]) == (413, "payload-too-large")


@pytest.mark.parametrize("method", ["POST", "PATCH"])
async def test_deeply_nested_json_is_400_json(served: Served, method: str) -> None:
    """4 KB of nested arrays (past the interpreter's recursion limit) is 400 invalid-json on
    both routes, never a 500."""
    body = b"[" * 2000 + b"]" * 2000
    response = await served.http.request(method, "/api/offer", content=body)
    assert (response.status_code, response.json()["code"]) == (400, "invalid-json")


@pytest.mark.parametrize("served", [ValueError("no ice-ufrag")], indirect=True)
async def test_an_sdp_aiortc_refuses_is_400(served: Served) -> None:
    """An offer aiortc cannot answer is 400 invalid-sdp, and makes no peer."""
    response = await served.http.post("/api/offer", json=OFFER)
    assert (response.status_code, response.json()["code"]) == (400, "invalid-sdp")
    patch = await served.http.patch("/api/offer", json={"pc_id": "pc-1", "candidates": []})
    assert patch.status_code == 404


@pytest.mark.parametrize("served", [RuntimeError("boom")], indirect=True)
async def test_an_unexpected_failure_is_500_json(served: Served) -> None:
    """A failure of the bot itself is still a JSON answer (the JS client parses errors)."""
    response = await served.http.post("/api/offer", json=OFFER)
    assert response.status_code == 500
    assert response.json() == {
        "detail": "the bot failed to handle the request",
        "code": "internal-error",
    }


async def test_after_close_offers_are_refused() -> None:
    """A closed server neither answers nor listens; a closed peer connection is 409."""
    connection = FakeConnection()
    server, url = await serve(connection)
    async with httpx.AsyncClient(base_url=url, headers=SESSION) as http:
        connection.pc.connectionState = "closed"
        ended = await http.post("/api/offer", json=OFFER)
        assert (ended.status_code, ended.json()["code"]) == (409, "session-ended")
        await server.close()
        with pytest.raises(httpx.ConnectError):
            await http.post("/api/offer", json=OFFER)

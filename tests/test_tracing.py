"""Spans of whole sessions against the emulators, read from an in-memory exporter: the start
span's attributes, the upstream calls under it, readiness and the end, one trace per session,
and the trace context the bot is given."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from dispatcher.telemetry import Tracing, hashed_user, tracer_provider_from_env
from testkit.fakes.common import Fault
from testkit.harness import Stack, dispatcher_stack, fly_emulator
from testkit.otlp_collector import OtlpCollector
from testkit.waits import eventually
from tests.test_bot_tracing import CONVERSATION_STARTED


class Spans:
    """The finished spans of one test, exported as they end."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))

    def all(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def named(self, name: str, trace_id: int | None = None) -> list[ReadableSpan]:
        return [
            s
            for s in self.all()
            if s.name == name and (trace_id is None or s.context.trace_id == trace_id)
        ]

    def one(self, name: str, trace_id: int | None = None) -> ReadableSpan:
        found = self.named(name, trace_id)
        assert len(found) == 1, [s.name for s in self.all()]
        return found[0]

    def start_of(self, session_id: str) -> ReadableSpan:
        found = [s for s in self.named("POST /start") if attr(s, "session.id") == session_id]
        assert len(found) == 1
        return found[0]


def attr(span: ReadableSpan, key: str) -> object:
    assert span.attributes is not None
    return span.attributes.get(key)


def parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


@pytest.fixture
def spans() -> Iterator[Spans]:
    recorded = Spans()
    yield recorded
    recorded.provider.shutdown()


async def ended(stack: Stack, spans: Spans, sid: str, trace_id: int) -> ReadableSpan:
    """The session's end span, once the session is over and its machine and room are gone."""
    await eventually(
        lambda: len(spans.named("session.end", trace_id)) == 1, what=f"{sid}'s end span"
    )
    return spans.one("session.end", trace_id)


async def test_the_spans_of_a_whole_session(tmp_path: Path, spans: Spans) -> None:
    """Start, ready, DELETE, end: one trace with the start span at its root, every Fly and
    Daily call of the session under it (the DELETE's stop too), readiness and end spans, and
    the start span's context handed to the bot as TRACEPARENT."""
    tracing = Tracing(spans.provider)
    async with dispatcher_stack(tmp_path, tracing=tracing) as stack:
        assert stack.fly is not None
        answer = await stack.start(region="ord")
        assert answer.status_code == 200, answer.text
        sid = answer.json()["sessionId"]
        await stack.wait_state(sid, "ready")
        start = spans.start_of(sid)
        trace_id = start.context.trace_id
        assert (await stack.http.delete(f"/sessions/{sid}", headers=stack.headers())).is_success
        await stack.wait_state(sid, "ended")
        end = await ended(stack, spans, sid, trace_id)
        await eventually(
            lambda: spans.named("daily delete_rooms", trace_id), what="the room delete's span"
        )
        machine = next(m for m in stack.fly.machines.values() if m.name == sid)
        env = machine.config["env"]

    assert start.kind == SpanKind.SERVER and start.parent is None
    assert attr(start, "http.route") == "/start"
    assert attr(start, "http.response.status_code") == 200
    assert attr(start, "session.outcome") == "dispatched"
    assert attr(start, "user.id") == hashed_user("user-1") != "user-1"
    assert attr(start, "session.region_requested") == "ord"
    assert attr(start, "cloud.region") == "ord"
    assert attr(start, "fly.machine.id") == machine.id
    assert start.status.status_code == StatusCode.UNSET

    # The bot's parent: the start span itself, sampled (flag 01; 02 is W3C level 2's
    # "random trace id", which this SDK sets).
    version, bot_trace, bot_parent, flags = env["TRACEPARENT"].split("-")
    assert (version, bot_trace, bot_parent) == (
        "00",
        f"{trace_id:032x}",
        f"{start.context.span_id:016x}",
    )
    assert int(flags, 16) & 1

    in_trace = [s for s in spans.all() if s.context.trace_id == trace_id]
    by_name: dict[str, list[ReadableSpan]] = {}
    for span in in_trace:
        by_name.setdefault(span.name, []).append(span)
    for name in ("daily create_room", "fly create"):
        (call,) = by_name[name]
        assert call.kind == SpanKind.CLIENT
        assert parent_id(call) == start.context.span_id
        assert attr(call, "http.request.method") == "POST"
        assert attr(call, "http.response.status_code") == 200
        assert attr(call, "http.request.resend_count") is None
    assert attr(by_name["fly create"][0], "upstream.request_id")
    # Later calls of the session join its trace: the follow's waits, the DELETE's stop, the
    # clean-up's destroy and the janitor's room delete.
    for name in ("fly wait", "fly stop", "fly destroy", "daily delete_rooms"):
        assert name in by_name, sorted(by_name)
        assert all(parent_id(s) == start.context.span_id for s in by_name[name])

    ready = spans.one("session.ready", trace_id)
    assert parent_id(ready) == start.context.span_id
    assert attr(ready, "session.id") == sid and attr(ready, "fly.machine.id") == machine.id
    assert ready.start_time is not None and ready.end_time is not None
    assert start.start_time is not None and start.start_time <= ready.start_time
    assert ready.end_time > ready.start_time

    assert parent_id(end) == start.context.span_id
    assert attr(end, "session.state") == "ended"
    assert attr(end, "session.end_reason") == "deleted"
    assert end.status.status_code == StatusCode.UNSET
    assert end.start_time is not None and ready.end_time <= end.start_time
    # No span of the session left its trace.
    strays = [
        s.name
        for s in spans.all()
        if s.context.trace_id != trace_id and s.attributes and s.attributes.get("session.id")
    ]
    assert strays == []


async def test_a_crash_before_ready_and_a_refused_start(tmp_path: Path, spans: Spans) -> None:
    """A bot that exits 3 before ready: no readiness span, an end span in error with the exit
    code. A start refused 429: its span says so, and is not an error of the dispatcher's."""
    env = {"MAX_SESSIONS": "1"}
    async with dispatcher_stack(tmp_path, env=env, tracing=Tracing(spans.provider)) as stack:
        holder = await stack.start({"testBot": {"exit_before_ready": 3}})
        assert holder.status_code == 200, holder.text
        sid = holder.json()["sessionId"]
        refused = await stack.start()
        assert refused.status_code == 429
        await stack.wait_state(sid, "failed")
        trace_id = spans.start_of(sid).context.trace_id
        end = await ended(stack, spans, sid, trace_id)

    assert spans.named("session.ready", trace_id) == []
    assert attr(end, "session.state") == "failed"
    assert attr(end, "session.end_reason") == "crashed"
    assert attr(end, "process.exit.code") == 3
    assert end.status.status_code == StatusCode.ERROR

    (refusal,) = [s for s in spans.named("POST /start") if attr(s, "session.id") != sid]
    assert attr(refusal, "http.response.status_code") == 429
    assert attr(refusal, "session.outcome") == "at-capacity"
    assert refusal.status.status_code == StatusCode.UNSET


async def test_a_retried_create_shows_each_attempt(tmp_path: Path, spans: Spans) -> None:
    """Fly answers the first create 429: two create spans under the start, the second with
    `http.request.resend_count` 1, the first in error with the status."""
    fly = fly_emulator()
    fly.faults.add("create", Fault(429, headers={"retry-after": "0"}))
    async with dispatcher_stack(tmp_path, fly=fly, tracing=Tracing(spans.provider)) as stack:
        answer = await stack.start()
        assert answer.status_code == 200, answer.text
        start = spans.start_of(answer.json()["sessionId"])

    creates = sorted(
        spans.named("fly create", start.context.trace_id), key=lambda s: s.start_time or 0
    )
    assert [attr(s, "http.response.status_code") for s in creates] == [429, 200]
    assert [attr(s, "http.request.resend_count") for s in creates] == [None, 1]
    assert creates[0].status.status_code == StatusCode.ERROR
    assert attr(creates[0], "error.type") == "429"
    assert all(parent_id(s) == start.context.span_id for s in creates)


async def test_user_ids_in_spans_only_when_opted_in(tmp_path: Path, spans: Spans) -> None:
    env = {"TRACE_USER_IDS": "true"}
    tracing = Tracing(spans.provider, plain_user_ids=True)
    async with dispatcher_stack(tmp_path, env=env, tracing=tracing) as stack:
        answer = await stack.start(user="alice@example.com")
        assert answer.status_code == 200, answer.text
        start = spans.start_of(answer.json()["sessionId"])
    assert attr(start, "user.id") == "alice@example.com"


async def test_tracing_off_still_gives_each_bot_a_trace(tmp_path: Path) -> None:
    """No provider: nothing is recorded, and each bot still gets its own sampled
    traceparent (the bot may trace on its own), different per session."""
    async with dispatcher_stack(tmp_path, tracing=Tracing()) as stack:
        assert stack.fly is not None
        sids = []
        for _ in range(2):
            answer = await stack.start()
            assert answer.status_code == 200, answer.text
            sids.append(answer.json()["sessionId"])
        parents = {
            m.name: m.config["env"]["TRACEPARENT"]
            for m in stack.fly.machines.values()
            if m.name in sids
        }
    assert len(set(parents.values())) == 2
    for value in parents.values():
        version, trace_id, span_id, flags = value.split("-")
        assert (version, len(trace_id), len(span_id), flags) == ("00", 32, 16, "01")
        assert int(trace_id, 16) and int(span_id, 16)


def test_the_environment_decides_whether_spans_are_exported() -> None:
    off = tracer_provider_from_env({}, instance_id="i-1")
    assert off is None
    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}
    assert (
        tracer_provider_from_env(endpoint | {"OTEL_SDK_DISABLED": "true"}, instance_id="i") is None
    )
    assert (
        tracer_provider_from_env(endpoint | {"OTEL_TRACES_EXPORTER": "none"}, instance_id="i")
        is None
    )
    on = tracer_provider_from_env(endpoint | {"OTEL_SERVICE_NAME": "disp-eu"}, instance_id="i-1")
    assert on is not None
    try:
        attributes = on.resource.attributes
        assert attributes["service.name"] == "disp-eu"
        assert attributes["service.instance.id"] == "i-1"
    finally:
        on.shutdown()
    traces_only = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"}
    provider = tracer_provider_from_env(traces_only, instance_id="i")
    assert provider is not None
    assert provider.resource.attributes["service.name"] == "pipecat-dispatcher"
    provider.shutdown()
    assert not Tracing().enabled


@pytest.mark.slow
async def test_the_real_bots_spans_join_the_dispatch_trace(
    tmp_path: Path,
    spans: Spans,
    otlp_collector: OtlpCollector,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """The example bot under the runtime (`python -m bot_runtime`, a local process, webrtc
    with no peer, its tracing on) exports to a collector the test runs: its conversation
    span's parent is the dispatcher's start span, its turn under the conversation, its
    `bot.ended` under the start span, all one trace with the dispatcher's own spans (in memory
    here)."""
    # Local bots inherit the dispatcher's environment (its secrets excepted): on Fly the bot
    # app's own secrets set these.
    monkeypatch.setenv("ENABLE_TRACING", "1")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp_collector.endpoint)
    # The bot logs (to this process's stderr) when Pipecat has begun the conversation's span.
    monkeypatch.setenv("LOG_LEVEL", "DEBUG")
    bot_output: list[str] = []

    def conversation_begun() -> bool:
        bot_output.append(capfd.readouterr().err)
        return CONVERSATION_STARTED in "".join(bot_output)

    env = {"LOCAL_BOT_DIR": "", "READY_TIMEOUT_S": "60"}
    tracing = Tracing(spans.provider)
    async with dispatcher_stack(tmp_path, local=True, env=env, tracing=tracing) as stack:
        answer = await stack.start(transport="webrtc")
        assert answer.status_code == 200, answer.text
        sid = answer.json()["sessionId"]
        # The bot listens once its pipeline runs; through the proxy, any answer of its own.
        probe = await stack.http.get(f"/sessions/{sid}/api/offer", headers=stack.headers())
        assert probe.json().get("code") not in ("bot-unreachable", "bot-gone"), probe.text
        await eventually(conversation_begun, timeout=30, what="the bot's conversation span")
        assert (await stack.http.delete(f"/sessions/{sid}", headers=stack.headers())).is_success
        await stack.wait_state(sid, "ended", timeout=30)
        start = spans.start_of(sid)
        trace_id = f"{start.context.trace_id:032x}"
        await otlp_collector.wait_for(
            lambda found: any(s["name"] == "bot.ended" for s in found), timeout_s=30
        )
        await ended(stack, spans, sid, start.context.trace_id)

    bot_spans = otlp_collector.spans()
    assert {s["trace_id"] for s in bot_spans} == {trace_id}
    by_name = {s["name"]: s for s in bot_spans}
    conversation, turn, goodbye = by_name["conversation"], by_name["turn"], by_name["bot.ended"]
    start_span_id = f"{start.context.span_id:016x}"
    assert conversation["parent_span_id"] == start_span_id
    assert conversation["attributes"]["conversation.id"] == sid
    assert turn["parent_span_id"] == conversation["span_id"]
    assert goodbye["parent_span_id"] == start_span_id
    assert conversation["attributes"]["session.id"] == sid

"""The bot's traces and logs join the dispatch trace of TRACEPARENT.

The real bot runs over SmallWebRTC with no peer (offline) and is stopped with SIGTERM; it
exports to an OTLP/HTTP collector the test runs. Turn 1 starts with the pipeline's StartFrame,
so even a session nobody joined has a conversation span and a turn span.
"""

from __future__ import annotations

import io
import json
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from loguru import logger
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from bot_runtime.logs import MASK, JsonLogSink, TextLogSink
from bot_runtime.tracing import ENDED_SPAN, Tracing, exporters, remote_parent
from testkit.bot_process import (
    SESSION_ID,
    BotProcess,
    start_bot,
)
from testkit.fakes.recorder import CallbackRecorder
from testkit.otlp_collector import OtlpCollector, Span
from testkit.waits import eventually

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN_ID = "00f067aa0ba902b7"
SAMPLED = f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"
UNSAMPLED = f"00-{TRACE_ID}-{PARENT_SPAN_ID}-00"
MACHINE_ID = "148ed193b95e89"
REGION = "cdg"
BOOT_TIMEOUT_S = 60.0
# Pipecat's debug line once its turn observer has started the conversation span.
CONVERSATION_STARTED = "Started tracing for Conversation"


async def stopped_session(
    bots: list[BotProcess],
    recorder: CallbackRecorder,
    tmp_path: Path,
    *,
    conversation: bool = True,
    **env: str | None,
) -> BotProcess:
    """A bot session with `env` added: booted, stopped with SIGTERM, exited 0. With
    `conversation`, the SIGTERM waits until Pipecat has begun the conversation's tracing (its
    observers see the start frame in tasks of their own, which may trail the port opening)."""
    bot = await start_bot(recorder, tmp_path, **({"LOG_LEVEL": "DEBUG"} | env))
    bots.append(bot)
    assert await bot.listening(), bot.output()
    if conversation:
        await eventually(
            lambda: CONVERSATION_STARTED in bot.output(),
            timeout=BOOT_TIMEOUT_S,
            what="the conversation's tracing to begin",
        )
    bot.proc.send_signal(signal.SIGTERM)
    assert await bot.exit_code() == 0, bot.output()
    await recorder.wait_for("ended")
    return bot


def traced(collector: OtlpCollector, traceparent: str | None = SAMPLED) -> dict[str, str | None]:
    """The bot's environment additions: the example bot's tracing on (its ENABLE_TRACING),
    exporting to `collector`, on a Fly machine."""
    return {
        "ENABLE_TRACING": "1",
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
        "TRACEPARENT": traceparent,
        "FLY_MACHINE_ID": MACHINE_ID,
        "FLY_REGION": REGION,
    }


def only(spans: list[Span], name: str) -> Span:
    """The one span called `name`."""
    named = [s for s in spans if s["name"] == name]
    assert len(named) == 1, spans
    return named[0]


def log_lines(bot: BotProcess) -> list[dict[str, Any]]:
    """The bot's JSON log lines (its stderr)."""
    text = (bot.logs / "stderr.log").read_text()
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.mark.slow
async def test_conversation_and_turns_join_the_dispatch_trace(
    bots: list[BotProcess],
    recorder: CallbackRecorder,
    tmp_path: Path,
    otlp_collector: OtlpCollector,
) -> None:
    """The example bot sets up Pipecat's tracing itself (ENABLE_TRACING): every span it exports
    is in TRACEPARENT's trace, the conversation (conversation.id the session's) and the
    runtime's `bot.ended` children of the dispatcher's span, the turns children of the
    conversation; every span carries the session's and the machine's IDs."""
    await stopped_session(bots, recorder, tmp_path, **traced(otlp_collector))
    spans = otlp_collector.spans()  # The bot exports before it exits.

    assert {s["trace_id"] for s in spans} == {TRACE_ID}
    conversation = only(spans, "conversation")
    assert conversation["parent_span_id"] == PARENT_SPAN_ID
    assert conversation["attributes"]["conversation.id"] == SESSION_ID
    turns = [s for s in spans if s["name"] == "turn"]
    assert turns, spans
    assert all(t["parent_span_id"] == conversation["span_id"] for t in turns)
    assert turns[0]["attributes"]["turn.number"] == 1
    assert all(conversation["start_ns"] <= t["start_ns"] <= conversation["end_ns"] for t in turns)
    ended = only(spans, ENDED_SPAN)
    assert ended["parent_span_id"] == PARENT_SPAN_ID
    assert ended["attributes"] == {
        "session.id": SESSION_ID,
        "session.end_reason": "sigterm",
        "process.exit.code": 0,
        "fly.machine.id": MACHINE_ID,
        "cloud.region": REGION,
    }
    for span in spans:
        assert span["resource"]["service.name"] == "pipecat-bot"
        assert span["attributes"]["session.id"] == SESSION_ID
        assert span["attributes"]["fly.machine.id"] == MACHINE_ID
        assert span["attributes"]["cloud.region"] == REGION
    assert otlp_collector.rejected == 0


async def test_without_the_bots_tracing_the_runtime_traces_its_own_end(
    bots: list[BotProcess],
    recorder: CallbackRecorder,
    tmp_path: Path,
    otlp_collector: OtlpCollector,
) -> None:
    """A bot that sets up no tracing of its own (no ENABLE_TRACING) still has the runtime's:
    `bot.ended` under TRACEPARENT, its resource naming the service, session and machine."""
    env = {**traced(otlp_collector), "ENABLE_TRACING": None}
    await stopped_session(bots, recorder, tmp_path, conversation=False, **env)
    spans = otlp_collector.spans()
    assert [s["name"] for s in spans] == [ENDED_SPAN]
    assert spans[0]["parent_span_id"] == PARENT_SPAN_ID
    resource = spans[0]["resource"]
    assert (resource["service.name"], resource["session.id"]) == ("pipecat-bot", SESSION_ID)
    assert (resource["fly.machine.id"], resource["cloud.region"]) == (MACHINE_ID, REGION)


@pytest.mark.slow
@pytest.mark.parametrize(
    "env",
    [
        pytest.param({"TRACEPARENT": UNSAMPLED}, id="unsampled-traceparent"),
        pytest.param({"OTEL_SDK_DISABLED": "true"}, id="sdk-disabled"),
        pytest.param({"OTEL_EXPORTER_OTLP_ENDPOINT": None}, id="no-endpoint"),
    ],
)
async def test_nothing_is_exported(
    bots: list[BotProcess],
    recorder: CallbackRecorder,
    tmp_path: Path,
    otlp_collector: OtlpCollector,
    env: dict[str, str | None],
) -> None:
    """A dispatch trace that is not sampled (flags 00), OTEL_SDK_DISABLED=true, or no OTLP
    endpoint: the whole session sends the collector nothing."""
    await stopped_session(
        bots, recorder, tmp_path, conversation=False, **{**traced(otlp_collector), **env}
    )
    assert otlp_collector.requests == 0
    assert otlp_collector.spans() == []


@pytest.mark.slow
async def test_a_malformed_traceparent_starts_a_new_trace(
    bots: list[BotProcess],
    recorder: CallbackRecorder,
    tmp_path: Path,
    otlp_collector: OtlpCollector,
) -> None:
    """A malformed TRACEPARENT is ignored: the conversation is the root of a trace of its own,
    and no log line carries the malformed value's trace ID."""
    malformed = f"00-{TRACE_ID}-nothex-01"
    bot = await stopped_session(bots, recorder, tmp_path, **traced(otlp_collector, malformed))
    conversation = only(otlp_collector.spans(), "conversation")
    assert conversation["parent_span_id"] is None
    assert conversation["trace_id"] != TRACE_ID
    assert all(line.get("trace_id") != TRACE_ID for line in log_lines(bot))


@pytest.mark.slow
async def test_log_lines_carry_the_session_machine_trace_and_span(
    bots: list[BotProcess],
    recorder: CallbackRecorder,
    tmp_path: Path,
    otlp_collector: OtlpCollector,
) -> None:
    """Every JSON line of a session carries session_id, machine_id and TRACEPARENT's trace_id;
    a line logged under a span carries its span_id: the dispatcher's span during the session,
    the `bot.ended` span while the ended callback is sent."""
    bot = await stopped_session(bots, recorder, tmp_path, **traced(otlp_collector))
    lines = log_lines(bot)
    assert lines
    for line in lines:
        assert line["session_id"] == SESSION_ID, line
        assert line["machine_id"] == MACHINE_ID, line
        assert line["trace_id"] == TRACE_ID, line
    ended_span_id = only(otlp_collector.spans(), ENDED_SPAN)["span_id"]
    by_msg = {line["msg"]: line for line in lines}
    assert by_msg["ended callback accepted"]["span_id"] == ended_span_id
    assert by_msg["Session ending: sigterm"]["span_id"] == PARENT_SPAN_ID
    assert {line["span_id"] for line in lines if "span_id" in line} == {
        PARENT_SPAN_ID,
        ended_span_id,
    }


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, set()),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, {"otlp"}),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, {"otlp"}),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c", "OTEL_SDK_DISABLED": "TRUE"}, set()),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c", "OTEL_TRACES_EXPORTER": "none"}, set()),
        ({"OTEL_TRACES_EXPORTER": "console"}, {"console"}),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c", "OTEL_TRACES_EXPORTER": "otlp,console"},
         {"otlp", "console"}),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, set()),
    ],
)  # fmt: skip
def test_exporters_follow_the_otel_variables(environ: dict[str, str], expected: set[str]) -> None:
    """OTLP only with an endpoint, console when asked, nothing when disabled or "none"; no
    exporter at all means no provider."""
    assert exporters(environ) == expected
    tracing = Tracing.from_environ(environ, session_id=SESSION_ID)
    assert (tracing is not None) == bool(expected)
    if tracing is not None:
        tracing.provider.shutdown()


def test_resource_names_the_service_session_and_machine() -> None:
    """The resource: OTEL_SERVICE_NAME (default pipecat-bot), session.id, and the Fly machine
    and region where Fly sets them."""
    base = {"OTEL_TRACES_EXPORTER": "console"}
    tracing = Tracing.from_environ(base, session_id="s-1")
    assert tracing is not None
    attributes = dict(tracing.provider.resource.attributes)
    assert attributes["service.name"] == "pipecat-bot"
    assert attributes["session.id"] == "s-1"
    assert "fly.machine.id" not in attributes and "cloud.region" not in attributes
    tracing.provider.shutdown()
    fly = {**base, "OTEL_SERVICE_NAME": "bot-eu", "FLY_MACHINE_ID": "m1", "FLY_REGION": "ams"}
    tracing = Tracing.from_environ(fly, session_id="s-1")
    assert tracing is not None
    attributes = dict(tracing.provider.resource.attributes)
    assert (attributes["service.name"], attributes["fly.machine.id"]) == ("bot-eu", "m1")
    assert attributes["cloud.region"] == "ams"
    tracing.provider.shutdown()


@pytest.fixture
def silent_collector() -> Iterator[str]:
    """An endpoint that accepts connections and never answers: a collector gone dead."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        host, port = listener.getsockname()
        yield f"http://{host}:{port}/v1/traces"


def test_shutdown_is_bounded_when_the_collector_hangs(silent_collector: str) -> None:
    """With a collector that never answers, `shutdown` gives up after its timeout and says so,
    rather than holding the bot's exit for the exporter's own timeout."""
    provider = TracerProvider(shutdown_on_exit=False)
    exporter = OTLPSpanExporter(endpoint=silent_collector, timeout=5)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    provider.get_tracer("test").start_span("queued").end()
    assert Tracing(provider).shutdown(timeout_s=0.2) is False


def test_log_lines_take_the_current_span() -> None:
    """Under a recording span a line carries its trace_id and span_id (over the fixed trace_id);
    under TRACEPARENT's span, that span's; outside any span, the fixed fields alone."""
    stream = io.StringIO()
    fixed = {"session_id": SESSION_ID, "trace_id": "f" * 32}
    handler = logger.add(JsonLogSink(stream, [], fixed), level="INFO")
    tracer = TracerProvider(shutdown_on_exit=False).get_tracer("test")
    try:
        logger.info("outside")
        with remote_parent(SAMPLED):
            logger.info("dispatch")
            with tracer.start_as_current_span("inner") as span:
                logger.info("inner")
    finally:
        logger.remove(handler)
    lines = {line["msg"]: line for line in map(json.loads, stream.getvalue().splitlines())}
    assert lines["outside"] == {**lines["outside"], **fixed}
    assert "span_id" not in lines["outside"]
    assert (lines["dispatch"]["trace_id"], lines["dispatch"]["span_id"]) == (
        TRACE_ID,
        PARENT_SPAN_ID,
    )
    context = span.get_span_context()
    assert lines["inner"]["trace_id"] == TRACE_ID
    assert lines["inner"]["span_id"] == f"{context.span_id:016x}"
    assert all(line["session_id"] == SESSION_ID for line in lines.values())


def test_text_format_is_one_readable_line_with_secrets_masked() -> None:
    """LOG_FORMAT=text: `time LEVEL logger: message key=value ...`, secrets masked, the
    traceback on the lines below."""
    stream = io.StringIO()
    secret = "cb-secret-token-0123456789"
    handler = logger.add(TextLogSink(stream, [secret], {"session_id": SESSION_ID}), level="INFO")
    try:
        logger.info(f"calling back with {secret}")
        try:
            raise RuntimeError("refused")
        except RuntimeError:
            logger.exception("failed")
    finally:
        logger.remove(handler)
    text = stream.getvalue()
    assert secret not in text
    first, second, *traceback = text.splitlines()
    assert first.endswith(f"INFO    {__name__}: calling back with {MASK}  session_id={SESSION_ID}")
    assert f"ERROR   {__name__}: failed  session_id={SESSION_ID}" in second
    assert traceback[-1] == "RuntimeError: refused"

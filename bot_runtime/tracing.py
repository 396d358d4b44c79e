"""The bot's OpenTelemetry traces: exported only when the standard `OTEL_*` variables ask.

A bot module that sets up tracing itself (Pipecat's `setup_tracing`, at import) keeps its
provider: the runtime's spans go through it too. Otherwise the runtime sets up its own:

With OTEL_EXPORTER_OTLP_ENDPOINT (or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) set, spans go over
OTLP/HTTP (the exporter reads the endpoint, headers, timeout and compression itself);
OTEL_TRACES_EXPORTER=console prints them on stdout instead or as well. Otherwise, or with
OTEL_SDK_DISABLED=true or OTEL_TRACES_EXPORTER=none, no provider is set up at all.

The dispatcher's `/start` span arrives as TRACEPARENT: `remote_parent` makes it the current
context of `bot()`, so Pipecat's conversation span (started under the current context, when
the bot's worker has `enable_tracing`) and the runtime's own spans join the dispatch trace;
the SDK's default sampler (ParentBased) honours its sampled flag.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from opentelemetry import context, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

DEFAULT_SERVICE_NAME = "pipecat-bot"
TRACER_NAME = "bot"
# The bot's own span: the `ended` callback, with the session's end reason and exit code.
ENDED_SPAN = "bot.ended"
# How long the exit may wait for the last spans to reach the collector.
FLUSH_TIMEOUT_S = 3.0

_ENDPOINTS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
# OpenTelemetry's resource attribute names for what Fly tells a machine about itself.
_FLY_RESOURCE = {"FLY_MACHINE_ID": "fly.machine.id", "FLY_REGION": "cloud.region"}


def exporters(environ: Mapping[str, str]) -> frozenset[str]:
    """The span exporters `environ` asks for ("otlp", "console"); empty means tracing is off."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return frozenset()
    names = {n.strip().lower() for n in environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",")}
    if "none" in names:
        return frozenset()
    if not any(environ.get(name, "").strip() for name in _ENDPOINTS):
        names.discard("otlp")
    return frozenset(names & {"otlp", "console"})


def span_exporters(environ: Mapping[str, str]) -> tuple[SpanExporter, ...]:
    """The span exporters `environ` asks for, built (and their modules imported); () when off."""
    names = exporters(environ)
    built: list[SpanExporter] = []
    if "otlp" in names:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        built.append(OTLPSpanExporter())
    if "console" in names:
        built.append(ConsoleSpanExporter())
    return tuple(built)


class SessionAttributes(SpanProcessor):
    """Sets the session's attributes on every span as it starts."""

    def __init__(self, attributes: Mapping[str, str]) -> None:
        self._attributes = dict(attributes)

    def on_start(self, span: Span, parent_context: context.Context | None = None) -> None:
        """Stamp the span."""
        span.set_attributes(self._attributes)


@dataclass(frozen=True)
class Tracing:
    """The process's tracer provider, with a shutdown that never holds the exit for long."""

    provider: TracerProvider

    @classmethod
    def from_environ(
        cls,
        environ: Mapping[str, str],
        *,
        session_id: str,
        built: Sequence[SpanExporter] | None = None,
    ) -> Tracing | None:
        """A provider exporting as `environ` asks, for session `session_id`; None when off.

        `built` are the exporters `span_exporters(environ)` made in advance (a pooled bot
        makes them at boot: the OTLP exporter's imports are the slow part of tracing).
        """
        chosen = span_exporters(environ) if built is None else tuple(built)
        if not chosen:
            return None
        attributes = {
            "service.name": environ.get("OTEL_SERVICE_NAME", "").strip() or DEFAULT_SERVICE_NAME,
            "session.id": session_id,
        }
        attributes |= {key: environ[var] for var, key in _FLY_RESOURCE.items() if environ.get(var)}
        # The process's own atexit shutdown would wait for a dead collector: `shutdown` bounds it.
        provider = TracerProvider(resource=Resource.create(attributes), shutdown_on_exit=False)
        for exporter in chosen:
            provider.add_span_processor(BatchSpanProcessor(exporter))
        return cls(provider)

    @classmethod
    def installed(cls) -> Tracing | None:
        """The SDK provider already set for the process (by the bot's module), if any."""
        provider = trace.get_tracer_provider()
        return cls(provider) if isinstance(provider, TracerProvider) else None

    def install(self) -> None:
        """Make it the global tracer provider (the one Pipecat's tracers use)."""
        trace.set_tracer_provider(self.provider)

    def stamp(self, environ: Mapping[str, str], session_id: str) -> None:
        """Give every span started from now on the session's ID and its machine's (a provider
        the bot's module made knows nothing of them)."""
        attributes = {"session.id": session_id}
        attributes |= {key: environ[var] for var, key in _FLY_RESOURCE.items() if environ.get(var)}
        self.provider.add_span_processor(SessionAttributes(attributes))

    def shutdown(self, timeout_s: float = FLUSH_TIMEOUT_S) -> bool:
        """Export the spans still queued and stop; False if that took over `timeout_s`.

        The export runs in a daemon thread, so an unreachable collector delays the exit by
        `timeout_s` at most. Calling it again does nothing.
        """
        worker = threading.Thread(target=self.provider.shutdown, name="otel-shutdown", daemon=True)
        worker.start()
        worker.join(timeout_s)
        return not worker.is_alive()


def remote_span(traceparent: str | None) -> trace.SpanContext | None:
    """The span context of a W3C `traceparent`; None if it is missing or malformed."""
    if not traceparent:
        return None
    parent = TraceContextTextMapPropagator().extract({"traceparent": traceparent.strip().lower()})
    span = trace.get_current_span(parent).get_span_context()
    return span if span.is_valid else None


@contextmanager
def remote_parent(traceparent: str | None) -> Iterator[None]:
    """Run the block with `traceparent`'s span as the current span (a malformed one: none)."""
    span = remote_span(traceparent)
    if span is None:
        yield
        return
    token = context.attach(trace.set_span_in_context(trace.NonRecordingSpan(span)))
    try:
        yield
    finally:
        context.detach(token)

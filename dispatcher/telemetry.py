"""Traces, and the one object the code reports to: `Telemetry` turns each event (an upstream
call, a session ready or ended) into its metrics and its spans.

Tracing is configured by the standard `OTEL_*` variables: with `OTEL_EXPORTER_OTLP_ENDPOINT`
(or `..._TRACES_ENDPOINT`) spans go out over OTLP/HTTP in batches; without it no tracer exists
and no span is made. The spans of a session share one trace: `POST /start` (the root) with a
child per Fly and Daily call, `session.ready` (request to the bot's ready callback) and
`session.end` (end asked, or the exit seen, to the final state). The bot gets the start span's
context as TRACEPARENT, so its own spans (Pipecat's conversation and turns) join the trace.
The ready and end spans are made afterwards from the stored timestamps and traceparent, so
they join the trace whichever instance sees them.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from dispatcher.metrics import Metrics

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span

    from dispatcher.store import Session

SERVICE_NAME = "pipecat-dispatcher"
_PROPAGATOR = TraceContextTextMapPropagator()


def tracer_provider_from_env(
    environ: Mapping[str, str], *, instance_id: str
) -> TracerProvider | None:
    """An exporting TracerProvider when the environment asks for one, else None (tracing off).

    The exporter and sampler read their own `OTEL_*` variables (endpoint, headers, timeout,
    `OTEL_TRACES_SAMPLER`); `OTEL_SERVICE_NAME` names the service.
    """
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return None
    if not (
        environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    ):
        return None
    # Imported only when tracing is on: the exporter pulls in protobuf.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create(
        {
            "service.name": environ.get("OTEL_SERVICE_NAME") or SERVICE_NAME,
            "service.instance.id": instance_id,
        }
    )
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


def traceparent_of(span: Span) -> str | None:
    """The W3C traceparent of a span, or None for an invalid one."""
    ctx = span.get_span_context()
    if not ctx.is_valid:
        return None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def random_traceparent() -> str:
    """A sampled traceparent of a new trace (tracing off here: the bot may still trace)."""
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


def hashed_user(user: str) -> str:
    """A user id for spans when ids are not opted in: stable, not the id itself."""
    return "sha256:" + hashlib.sha256(user.encode()).hexdigest()[:16]


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


class Tracing:
    """The dispatcher's spans; with no provider, every method is free and makes nothing."""

    def __init__(self, provider: TracerProvider | None = None, *, plain_user_ids: bool = False):
        self._provider = provider
        self._tracer = provider.get_tracer("dispatcher") if provider is not None else None
        self._plain_user_ids = plain_user_ids

    @property
    def enabled(self) -> bool:
        """Whether spans are made."""
        return self._tracer is not None

    @contextlib.contextmanager
    def span(
        self,
        name: str,
        *,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Mapping[str, str | int | float | bool] | None = None,
    ) -> Iterator[Span]:
        """A span, current inside the block (a non-recording one when tracing is off). Status
        is left to the caller: a 4xx answer is not an error of the dispatcher's."""
        if self._tracer is None:
            yield trace.INVALID_SPAN
            return
        with self._tracer.start_as_current_span(
            name,
            kind=kind,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            yield span

    def user_id(self, user: str) -> str:
        """The user as spans show it: hashed unless TRACE_USER_IDS opts in."""
        return user if self._plain_user_ids else hashed_user(user)

    def traceparent(self) -> str:
        """The context to hand to the session's bot: the current span's, else a new trace."""
        return traceparent_of(trace.get_current_span()) or random_traceparent()

    def session_ready(self, session: Session) -> None:
        """`session.ready`: from the request to the bot's ready callback."""
        if self._tracer is None or session.ready_at is None:
            return
        span = self._tracer.start_span(
            "session.ready",
            context=_parent(session.traceparent),
            start_time=_ns(session.created_at),
            attributes={**_session_attributes(session), "session.state": session.state},
        )
        span.end(end_time=_ns(max(session.ready_at, session.created_at)))

    def session_ended(self, session: Session) -> None:
        """`session.end`: from the end's request (or the exit seen) to the final state."""
        if self._tracer is None or session.ended_at is None:
            return
        began = session.end_requested_at or session.ended_at
        attributes = {
            **_session_attributes(session),
            "session.state": session.state,
            "session.end_reason": session.end_reason or "unknown",
            "session.duration_s": round(session.ended_at - session.created_at, 3),
        }
        if session.exit_code is not None:
            attributes["process.exit.code"] = session.exit_code
        span = self._tracer.start_span(
            "session.end",
            context=_parent(session.traceparent),
            start_time=_ns(min(began, session.ended_at)),
            attributes=attributes,
        )
        if session.state == "failed":
            span.set_status(Status(StatusCode.ERROR, session.end_reason))
        span.end(end_time=_ns(session.ended_at))

    def shutdown(self) -> None:
        """Export what is buffered and stop (bounded by the exporter's timeout)."""
        if self._provider is not None:
            self._provider.shutdown()


def _parent(traceparent: str | None) -> Context | None:
    if not traceparent:
        return None
    return _PROPAGATOR.extract({"traceparent": traceparent})


def _session_attributes(session: Session) -> dict[str, str | int | float | bool]:
    attributes: dict[str, str | int | float | bool] = {"session.id": session.id}
    if session.machine_id:
        attributes["fly.machine.id"] = session.machine_id
    if session.region:
        attributes["cloud.region"] = session.region
    return attributes


@dataclass
class UpstreamCall:
    """One request to Fly or Daily being made: tell it how it went."""

    api: str
    operation: str
    span: Span
    metrics: Metrics

    def answered(self, status: int, request_id: str | None) -> None:
        """An HTTP answer came back."""
        self.metrics.upstream_call(self.api, self.operation, status)
        self.span.set_attribute("http.response.status_code", status)
        if request_id:
            self.span.set_attribute("upstream.request_id", request_id)
        if status >= 400:
            self.span.set_attribute("error.type", str(status))
            self.span.set_status(Status(StatusCode.ERROR))

    def no_answer(self, exc: BaseException) -> None:
        """The request got no answer (connect failure, timeout, dropped connection)."""
        self.metrics.upstream_call(self.api, self.operation, None)
        self.span.set_attribute("error.type", type(exc).__name__)
        self.span.set_status(Status(StatusCode.ERROR))


class Telemetry:
    """Metrics and spans, reported to together."""

    def __init__(self, metrics: Metrics | None = None, tracing: Tracing | None = None) -> None:
        self.metrics = metrics or Metrics()
        self.tracing = tracing or Tracing()

    @contextlib.contextmanager
    def upstream(
        self, api: str, operation: str, method: str, *, attempt: int = 1
    ) -> Iterator[UpstreamCall]:
        """A request to an upstream API: a client span (the n-th attempt of a retried call
        says so in `http.request.resend_count`) and the call's count."""
        attributes: dict[str, str | int | float | bool] = {
            "http.request.method": method,
            "upstream.api": api,
            "upstream.operation": operation,
        }
        if attempt > 1:
            attributes["http.request.resend_count"] = attempt - 1
        name = f"{api} {operation}"
        with self.tracing.span(name, kind=SpanKind.CLIENT, attributes=attributes) as span:
            yield UpstreamCall(api, operation, span, self.metrics)

    def upstream_retry(self, api: str, operation: str) -> None:
        """A failed upstream call is about to be tried again."""
        self.metrics.upstream_retry(api, operation)

    def session_ready(self, session: Session | None) -> None:
        """A session moved to ready (None: it did not)."""
        if session is not None:
            self.metrics.session_ready(session)
            self.tracing.session_ready(session)

    def session_ended(self, session: Session | None) -> None:
        """A session reached its terminal state (None: another instance ended it)."""
        if session is not None:
            self.metrics.session_ended(session)
            self.tracing.session_ended(session)

"""A tiny OTLP/HTTP trace collector for tests: what a process exports, as plain dicts.

    with OtlpCollector() as collector:
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = collector.endpoint
        ...  # run something that exports spans over OTLP/HTTP (protobuf)
        spans = await collector.wait_for(lambda spans: any(s["name"] == "conversation" ...))

It is a real HTTP server on 127.0.0.1 (a free port), serving `POST /v1/traces` from a
background thread, so it receives from other processes as well as from this one without
depending on the test's event loop. The `otlp_collector` fixture (tests/conftest.py) runs one
per test.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import threading
import zlib
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, TypedDict

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

TRACES_PATH = "/v1/traces"
PROTOBUF = "application/x-protobuf"


class Span(TypedDict):
    """One received span. IDs are lowercase hex; `parent_span_id` is None for a root span."""

    name: str
    trace_id: str
    span_id: str
    parent_span_id: str | None
    attributes: dict[str, Any]
    resource: dict[str, Any]
    scope: str
    start_ns: int
    end_ns: int


def value(any_value: AnyValue) -> Any:
    """An OTLP attribute value as a Python value (arrays as lists, key-value lists as dicts)."""
    kind = any_value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [value(v) for v in any_value.array_value.values]
    if kind == "kvlist_value":
        return attributes(any_value.kvlist_value.values)
    return getattr(any_value, kind)


def attributes(pairs: Iterable[KeyValue]) -> dict[str, Any]:
    """OTLP `KeyValue`s as a dict."""
    return {pair.key: value(pair.value) for pair in pairs}


def spans_of(request: ExportTraceServiceRequest) -> list[Span]:
    """The spans of one export request, each with its resource's attributes and its scope."""
    spans: list[Span] = []
    for resource_spans in request.resource_spans:
        resource = attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(
                    Span(
                        name=span.name,
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex() or None,
                        attributes=attributes(span.attributes),
                        resource=resource,
                        scope=scope_spans.scope.name,
                        start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano,
                    )
                )
    return spans


class OtlpCollector:
    """An OTLP/HTTP trace receiver on loopback; a context manager that starts and stops it.

    `endpoint` is the value for OTEL_EXPORTER_OTLP_ENDPOINT (the exporter appends
    `/v1/traces`). Protobuf bodies only (what the Python exporter sends), plain, gzip or
    deflate; anything else is answered 404 or 415 and counted in `rejected`.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spans: list[Span] = []
        self.requests = 0
        self.rejected = 0
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._serve, name="otlp-collector", daemon=True)

    @property
    def endpoint(self) -> str:
        """`http://127.0.0.1:<port>`."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def spans(self) -> list[Span]:
        """Every span received so far, in arrival order."""
        with self._lock:
            return list(self._spans)

    def named(self, name: str) -> list[Span]:
        """The spans received so far called `name`."""
        return [s for s in self.spans() if s["name"] == name]

    async def wait_for(
        self, predicate: Callable[[list[Span]], bool], timeout_s: float = 10.0
    ) -> list[Span]:
        """All spans, once `predicate(spans)` holds; AssertionError with them after `timeout_s`."""
        waiter = (asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            self._waiters.add(waiter)
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    waiter[1].clear()
                    if predicate(spans := self.spans()):
                        return spans
                    await waiter[1].wait()
        except TimeoutError:
            raise AssertionError(f"no such spans within {timeout_s} s: {self.spans()}") from None
        finally:
            with self._lock:
                self._waiters.discard(waiter)

    def _serve(self) -> None:
        self._server.serve_forever(poll_interval=0.05)

    def start(self) -> OtlpCollector:
        """Start serving (in a daemon thread)."""
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join()
        self._server.server_close()

    def __enter__(self) -> OtlpCollector:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _receive(self, content_type: str, encoding: str, body: bytes) -> int:
        """Record one export; the HTTP status to answer."""
        if content_type.split(";")[0].strip().lower() != PROTOBUF:
            return self._reject(415)
        try:
            if encoding == "gzip":
                body = gzip.decompress(body)
            elif encoding == "deflate":
                body = zlib.decompress(body)
            request = ExportTraceServiceRequest.FromString(body)
        except Exception:
            return self._reject(400)
        with self._lock:
            self.requests += 1
            self._spans += spans_of(request)
            waiters = list(self._waiters)
        for loop, arrived in waiters:
            with contextlib.suppress(RuntimeError):  # That test's loop is closed.
                loop.call_soon_threadsafe(arrived.set)
        return 200

    def _reject(self, status: int) -> int:
        with self._lock:
            self.rejected += 1
        return status

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path.split("?")[0] != TRACES_PATH:
                    status = collector._reject(404)
                else:
                    status = collector._receive(
                        self.headers.get("Content-Type", ""),
                        self.headers.get("Content-Encoding", "").strip().lower(),
                        body,
                    )
                answer = ExportTraceServiceResponse().SerializeToString() if status == 200 else b""
                self.send_response(status)
                self.send_header("Content-Type", PROTOBUF)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet: the test's output is the bot's."""

        return Handler

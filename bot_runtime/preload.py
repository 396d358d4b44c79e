"""What a pooled bot loads before its session: Pipecat and the transports, the team's module,
Silero's model (handed over to the session's first analyzer), the trace exporters and the TLS
context of the session's callbacks."""

from __future__ import annotations

import importlib
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
from loguru import logger

from bot_runtime.contract import DAILY, WEBRTC
from bot_runtime.entrypoint import EntryPoint, EntryPointError, EntryPointSpec, load
from bot_runtime.tracing import span_exporters

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter


# What a session of each transport imports before the team's module runs (Pipecat's runner
# types and utilities come with it).
TRANSPORT_MODULES = {
    DAILY: ("pipecat.transports.daily.transport",),
    WEBRTC: ("pipecat.transports.smallwebrtc.transport", "bot_runtime.webrtc"),
}
RUNNER_MODULES = ("pipecat.runner.types", "pipecat.runner.utils", "bot_runtime.session")


@dataclass(frozen=True)
class Preloaded:
    """What a pooled bot loaded before its session, and how long each part took.

    `entry` is the team's bot, or `error` says why it could not be loaded: the session it
    is assigned then fails at once with that error, as a cold bot's would.
    """

    entry: EntryPoint | None
    error: str | None
    span_exporters: tuple[SpanExporter, ...]
    imports_s: float
    entry_s: float
    vad_s: float
    tracing_s: float
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False)

    def describe(self) -> str:
        """One log line's worth."""
        total = self.imports_s + self.entry_s + self.vad_s + self.tracing_s
        return (
            f"Preloaded in {total:.2f} s: Pipecat and the transport {self.imports_s:.2f} s, "
            f"the bot's module {self.entry_s:.2f} s, VAD {self.vad_s:.2f} s, "
            f"tracing {self.tracing_s:.2f} s"
        )


def preload(
    environ: Mapping[str, str], transports: str | tuple[str, ...], spec: EntryPointSpec
) -> Preloaded:
    """Import Pipecat, the transports and the team's module, load Silero (handed over to the
    session's first analyzer), build the exporters and the TLS context of the session's
    callbacks."""
    started = time.perf_counter()
    wanted = (transports,) if isinstance(transports, str) else transports
    for module in (*RUNNER_MODULES, *(m for t in wanted for m in TRANSPORT_MODULES.get(t, ()))):
        importlib.import_module(module)
    imported = time.perf_counter()
    entry, error = None, None
    try:
        entry = load(spec)
    except EntryPointError as exc:
        error = str(exc)
        logger.error(f"The bot cannot run: {error}")
    loaded = time.perf_counter()
    from pipecat.audio.vad.silero import SileroVADAnalyzer

    # The model's first load: onnxruntime's session, the file in cache.
    analyzer = SileroVADAnalyzer()
    try:
        hand_over_vad(analyzer)
    except AttributeError as exc:  # Pipecat's internals moved: the session loads its own
        logger.warning(f"The preloaded VAD model cannot be handed over: {exc}")
    vad = time.perf_counter()
    exporters = span_exporters(environ)
    # httpx loads the CA bundle for each client it makes (a quarter of a second): the session's
    # client takes this one.
    context = httpx.create_ssl_context()
    return Preloaded(
        entry,
        error,
        exporters,
        imports_s=imported - started,
        entry_s=loaded - imported,
        vad_s=vad - loaded,
        tracing_s=time.perf_counter() - vad,
        ssl_context=context,
    )


def hand_over_vad(analyzer: Any) -> None:
    """Give the Silero model `analyzer` loaded to the next SileroVADAnalyzer made (a pooled bot
    serves one session: its bot's analyzer then skips loading onnxruntime's session again);
    any further analyzer loads its own, as Pipecat does."""
    from pipecat.audio.vad import silero

    original: Any = silero.SileroOnnxModel
    spare = [analyzer._model]

    def model(path: Any, force_onnx_cpu: bool = True) -> Any:
        if spare and force_onnx_cpu:
            preloaded = spare.pop()
            preloaded.reset_states()
            silero.SileroOnnxModel = original  # type: ignore[misc]
            return preloaded
        return original(path, force_onnx_cpu=force_onnx_cpu)

    silero.SileroOnnxModel = model  # type: ignore[misc,assignment]

"""A stand-in for daily-python (`import daily`) whose calls join rooms of the Daily emulator.

With `testkit/fakes/daily_python` first on PYTHONPATH and `DAILY_EMULATOR_URL` set to the base URL
of a `testkit.fakes.daily.DailyEmulator`, a `CallClient` joins the room named by the meeting URL's
last path segment through the emulator's control routes (which check the token as Daily would),
watches the room for other participants, and leaves it again. Media is simulated at real-time
pace: written audio completes after its duration; remote participants sound like silence.
Like daily-python, completions and event handlers run on the library's own threads. Standard
library only, since it runs inside bot processes.
"""

from __future__ import annotations

import array
import heapq
import itertools
import json
import logging
import math
import os
import queue
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any
from urllib.parse import urlsplit

__all__ = [
    "AudioData",
    "CallClient",
    "CustomAudioSource",
    "CustomAudioTrack",
    "CustomVideoSource",
    "CustomVideoTrack",
    "Daily",
    "EventHandler",
    "LogLevel",
    "NativeVad",
    "VideoFrame",
    "VirtualCameraDevice",
    "VirtualMicrophoneDevice",
    "VirtualSpeakerDevice",
]

EMULATOR_URL_ENV = "DAILY_EMULATOR_URL"
POLL_INTERVAL_S = 0.1
HTTP_TIMEOUT_S = 5.0
THREAD_JOIN_S = HTTP_TIMEOUT_S + 2.0
PACER_IDLE_S = 0.5
SAMPLE_WIDTH = 2
NOT_SUPPORTED = "not supported by the daily-python stand-in"

Completion = Callable[..., None] | None
Job = Callable[[], None]

log = logging.getLogger("daily")
_ids = itertools.count(1)
_http = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _call(fn: Callable[..., Any] | None, *args: Any) -> None:
    """Run a completion or event callback the way a native library would: errors are logged."""
    if fn is None:
        return
    try:
        fn(*args)
    except Exception:
        log.exception("daily stand-in: callback %r failed", fn)


def _join_thread(thread: threading.Thread | None, timeout: float = THREAD_JOIN_S) -> None:
    if thread is not None and thread is not threading.current_thread() and thread.is_alive():
        thread.join(timeout)


def _request(method: str, url: str, body: Any = None) -> tuple[int, Any]:
    """Status and JSON answer of one emulator request; OSError if it is unreachable."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"content-type": "application/json"}
    request = urllib.request.Request(url, data=data, method=method, headers=headers)  # noqa: S310
    try:
        with _http.open(request, timeout=HTTP_TIMEOUT_S) as answer:
            return answer.status, json.loads(answer.read() or b"null")
    except urllib.error.HTTPError as exc:
        with exc:
            raw = exc.read()
        try:
            return exc.code, json.loads(raw or b"null")
        except ValueError:
            return exc.code, None


class LogLevel(Enum):
    """daily-core's log levels."""

    Off = 0
    Error = 1
    Warn = 2
    Info = 3
    Debug = 4
    Trace = 5

    def __str__(self) -> str:
        return self.name


_LOGGING_LEVELS = {
    LogLevel.Off: logging.CRITICAL + 1,
    LogLevel.Error: logging.ERROR,
    LogLevel.Warn: logging.WARNING,
    LogLevel.Info: logging.INFO,
    LogLevel.Debug: logging.DEBUG,
    LogLevel.Trace: logging.DEBUG,
}


# -- real-time pacing --------------------------------------------------------------------------


class _Pacer:
    """A daemon thread that runs callbacks at monotonic due times; it ends when idle."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Job]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def at(self, due: float, job: Job) -> None:
        with self._cond:
            heapq.heappush(self._heap, (due, next(self._seq), job))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="daily-pacer", daemon=True)
                self._thread.start()
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._heap.clear()
            thread = self._thread
            self._cond.notify()
        _join_thread(thread)

    def _run(self) -> None:
        while (job := self._next()) is not None:
            _call(job)

    def _next(self) -> Job | None:
        with self._cond:
            while True:
                if not self._heap:
                    if not self._cond.wait(PACER_IDLE_S) and not self._heap:
                        self._thread = None
                        return None
                    continue
                delay = self._heap[0][0] - time.monotonic()
                if delay <= 0:
                    return heapq.heappop(self._heap)[2]
                self._cond.wait(delay)


class _PacedAudio:
    """A 16-bit PCM stream played out in real time: it knows when each chunk has been played."""

    def __init__(self, sample_rate: int, channels: int) -> None:
        self.sample_rate, self.channels = sample_rate, channels
        self._end = 0.0
        self._lock = threading.Lock()

    def _frames_in(self, data: bytes) -> int:
        return len(data) // (SAMPLE_WIDTH * self.channels)

    def _play(self, num_frames: int, completion: Completion, *result: Any) -> None:
        """Queue `num_frames` behind what is still playing; complete (or return) once played."""
        with self._lock:
            self._end = max(self._end, time.monotonic()) + num_frames / self.sample_rate
            due = self._end
        if completion is None:
            time.sleep(max(0.0, due - time.monotonic()))
        else:
            _runtime.pacer.at(due, lambda: _call(completion, *result))


class _PacedWriter(_PacedAudio):
    """A stream the application writes to; each write completes once its audio has played."""

    def write_frames(self, frame: bytes, completion: Completion = None) -> int:
        num_frames = self._frames_in(frame)
        self._play(num_frames, completion, num_frames)
        return num_frames


# -- media objects -----------------------------------------------------------------------------


@dataclass(frozen=True)
class AudioData:
    """A chunk of 16-bit PCM audio received from a participant."""

    audio_frames: bytes
    sample_rate: int
    num_channels: int
    bits_per_sample: int = SAMPLE_WIDTH * 8

    @property
    def num_audio_frames(self) -> int:
        return len(self.audio_frames) // (SAMPLE_WIDTH * self.num_channels)


@dataclass(frozen=True)
class VideoFrame:
    """A video frame received from a participant (never produced: remote video is off)."""

    buffer: bytes
    width: int
    height: int
    color_format: str
    timestamp_us: int = 0


class CustomAudioSource(_PacedWriter):
    """An audio source the application writes to; each write completes once it has played."""

    def __init__(self, sample_rate: int, channels: int, auto_silence: bool = True) -> None:
        super().__init__(sample_rate, channels)
        self.auto_silence = auto_silence


@dataclass(frozen=True)
class CustomAudioTrack:
    """A track published from a `CustomAudioSource`."""

    source: CustomAudioSource
    id: str = field(default_factory=lambda: str(uuid.uuid4()))


@dataclass(frozen=True)
class CustomVideoSource:
    """A video source the application writes frames to; they go nowhere."""

    width: int
    height: int
    color_format: str = "RGBA"

    def write_frame(self, frame: bytes) -> None:
        return None


@dataclass(frozen=True)
class CustomVideoTrack:
    """A track published from a `CustomVideoSource`."""

    source: CustomVideoSource
    id: str = field(default_factory=lambda: str(uuid.uuid4()))


@dataclass(frozen=True)
class VirtualCameraDevice:
    """A virtual camera; frames written to it go nowhere."""

    name: str
    width: int
    height: int
    color_format: str

    def write_frame(self, frame: bytes) -> None:
        return None


class VirtualMicrophoneDevice(_PacedWriter):
    """A virtual microphone; writes complete once their audio has played."""

    def __init__(self, name: str, sample_rate: int, channels: int, non_blocking: bool) -> None:
        super().__init__(sample_rate, channels)
        self.name, self.non_blocking = name, non_blocking


class VirtualSpeakerDevice(_PacedAudio):
    """A virtual speaker: while selected and in a call with someone heard, it plays silence."""

    def __init__(self, name: str, sample_rate: int, channels: int, non_blocking: bool) -> None:
        super().__init__(sample_rate, channels)
        self.name, self.non_blocking = name, non_blocking

    def read_frames(self, num_frame: int, completion: Completion = None) -> bytes:
        if _runtime.speaker is not self or not _runtime.hears_someone():
            _call(completion, b"")
            return b""
        audio = bytes(num_frame * SAMPLE_WIDTH * self.channels)
        self._play(num_frame, completion, audio)
        return b"" if completion is not None else audio


@dataclass(frozen=True)
class NativeVad:
    """A voice activity detector: its confidence grows with the audio's loudness."""

    rest_period_ms: int
    sample_rate: int
    channels: int

    def analyze_frames(self, frame: bytes) -> float:
        samples = array.array("h", frame[: len(frame) // SAMPLE_WIDTH * SAMPLE_WIDTH])
        if not samples:
            return 0.0
        return min(1.0, math.sqrt(sum(s * s for s in samples) / len(samples)) / 2000.0)


# -- process-wide state ------------------------------------------------------------------------


class _Runtime:
    """What daily-python keeps per process: devices, the selected speaker, clients in a call."""

    def __init__(self) -> None:
        self.pacer = _Pacer()
        self.speakers: dict[str, VirtualSpeakerDevice] = {}
        self.speaker: VirtualSpeakerDevice | None = None
        self._in_call: set[CallClient] = set()
        self._lock = threading.Lock()

    def entered(self, client: CallClient) -> None:
        with self._lock:
            self._in_call.add(client)

    def exited(self, client: CallClient) -> None:
        with self._lock:
            self._in_call.discard(client)

    def hears_someone(self) -> bool:
        with self._lock:
            clients = list(self._in_call)
        return any(client.hears_someone() for client in clients)


_runtime = _Runtime()


class Daily:
    """daily-python's process-wide entry points: initialisation and virtual devices."""

    @staticmethod
    def init(worker_threads: int = 2, log_level: LogLevel = LogLevel.Off) -> None:
        Daily.set_log_level(log_level)

    @staticmethod
    def deinit() -> None:
        _runtime.pacer.stop()

    @staticmethod
    def set_log_level(log_level: LogLevel) -> None:
        log.setLevel(_LOGGING_LEVELS[log_level])

    @staticmethod
    def create_camera_device(
        device_name: str, width: int, height: int, color_format: str = "RGBA"
    ) -> VirtualCameraDevice:
        return VirtualCameraDevice(device_name, width, height, color_format)

    @staticmethod
    def create_speaker_device(
        device_name: str, sample_rate: int = 16000, channels: int = 1, non_blocking: bool = False
    ) -> VirtualSpeakerDevice:
        speaker = VirtualSpeakerDevice(device_name, sample_rate, channels, non_blocking)
        _runtime.speakers[device_name] = speaker
        return speaker

    @staticmethod
    def create_microphone_device(
        device_name: str, sample_rate: int = 16000, channels: int = 1, non_blocking: bool = False
    ) -> VirtualMicrophoneDevice:
        return VirtualMicrophoneDevice(device_name, sample_rate, channels, non_blocking)

    @staticmethod
    def create_native_vad(
        reset_period_ms: int = 500, sample_rate: int = 16000, channels: int = 1
    ) -> NativeVad:
        return NativeVad(reset_period_ms, sample_rate, channels)

    @staticmethod
    def select_speaker_device(device_name: str) -> None:
        _runtime.speaker = _runtime.speakers[device_name]


# -- the call client ---------------------------------------------------------------------------


class EventHandler:
    """The call's event callbacks; subclasses override those they need."""

    def on_active_speaker_changed(self, participant: Mapping[str, Any]) -> None: ...
    def on_app_message(self, message: Any, sender: str) -> None: ...
    def on_available_devices_updated(self, available_devices: Mapping[str, Any]) -> None: ...
    def on_call_state_updated(self, state: str) -> None: ...
    def on_dialin_connected(self, data: Mapping[str, Any]) -> None: ...
    def on_dialin_error(self, data: Mapping[str, Any]) -> None: ...
    def on_dialin_ready(self, sip_endpoint: str) -> None: ...
    def on_dialin_stopped(self, data: Mapping[str, Any]) -> None: ...
    def on_dialin_warning(self, data: Mapping[str, Any]) -> None: ...
    def on_dialout_answered(self, data: Mapping[str, Any]) -> None: ...
    def on_dialout_connected(self, data: Mapping[str, Any]) -> None: ...
    def on_dialout_error(self, data: Mapping[str, Any]) -> None: ...
    def on_dialout_stopped(self, data: Mapping[str, Any]) -> None: ...
    def on_dialout_warning(self, data: Mapping[str, Any]) -> None: ...
    def on_dtmf_event(self, data: Mapping[str, Any]) -> None: ...
    def on_error(self, message: str) -> None: ...
    def on_inputs_updated(self, input_settings: Mapping[str, Any]) -> None: ...
    def on_live_stream_error(self, stream_id: str, message: str) -> None: ...
    def on_live_stream_started(self, status: Mapping[str, Any]) -> None: ...
    def on_live_stream_stopped(self, stream_id: str) -> None: ...
    def on_live_stream_updated(self, state: str) -> None: ...
    def on_live_stream_warning(self, stream_id: str, message: str) -> None: ...
    def on_network_connection_status_updated(self, status: Mapping[str, Any]) -> None: ...
    def on_network_stats_updated(self, stats: Mapping[str, Any]) -> None: ...
    def on_participant_counts_updated(self, counts: Mapping[str, Any]) -> None: ...
    def on_participant_joined(self, participant: Mapping[str, Any]) -> None: ...
    def on_participant_left(self, participant: Mapping[str, Any], reason: str) -> None: ...
    def on_participant_updated(self, participant: Mapping[str, Any]) -> None: ...
    def on_publishing_updated(self, publishing_settings: Mapping[str, Any]) -> None: ...
    def on_recording_error(self, stream_id: str, message: str) -> None: ...
    def on_recording_started(self, status: Mapping[str, Any]) -> None: ...
    def on_recording_stopped(self, stream_id: str) -> None: ...
    def on_subscription_profiles_updated(self, profiles: Mapping[str, Any]) -> None: ...
    def on_subscriptions_updated(self, subscriptions: Mapping[str, Any]) -> None: ...
    def on_transcription_error(self, message: str) -> None: ...
    def on_transcription_message(self, message: Mapping[str, Any]) -> None: ...
    def on_transcription_started(self, status: Mapping[str, Any]) -> None: ...
    def on_transcription_stopped(self, stopped_by: str, stopped_by_error: bool) -> None: ...


class _JoinRefused(Exception):
    """The join failed; the message is the error text handed to the completion."""


@dataclass
class _Call:
    """One stay in a room: where it is, who we are there, and the thread watching it."""

    base_url: str
    room: str
    local_id: str
    stop: threading.Event = field(default_factory=threading.Event)
    watcher: threading.Thread | None = None

    def url(self, action: str) -> str:
        return f"{self.base_url}/_emulator/rooms/{self.room}/{action}"


@dataclass
class _Renderer:
    """An audio renderer: whose audio, how often, and when it is next due."""

    participant_id: str
    callback: Callable[[str, AudioData, str], None]
    audio_source: str
    sample_rate: int
    interval_s: float
    due: float = 0.0


def _media_state(on: bool) -> dict[str, Any]:
    if on:
        return {"state": "playable", "subscribed": "subscribed", "offReasons": []}
    return {"state": "off", "subscribed": "unsubscribed", "offReasons": ["user"]}


def _participant(
    entry: Mapping[str, Any], *, local: bool, user_name: str, audio: bool
) -> dict[str, Any]:
    """A participant shaped like daily-python's, from an emulator presence entry."""
    return {
        "id": entry["id"],
        "info": {
            "userId": entry.get("userId"),
            "userName": user_name,
            "isLocal": local,
            "isOwner": bool(entry.get("owner")),
            "joinedAt": entry.get("joinTime"),
        },
        "media": {
            "microphone": _media_state(audio),
            "camera": _media_state(False),
            "screenAudio": _media_state(False),
            "screenVideo": _media_state(False),
            "customAudio": {},
            "customVideo": {},
        },
    }


def _merge(into: dict[str, Any], update: Mapping[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


class CallClient:
    """A participant in an emulated Daily room, joined through the emulator's control routes."""

    def __init__(self, event_handler: EventHandler | None = None) -> None:
        self._handler = event_handler or EventHandler()
        self._name = f"daily-call-{next(_ids)}"
        self._lock = threading.RLock()
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._worker: threading.Thread | None = None
        self._released = False
        self._state = "initialized"
        self._call: _Call | None = None
        self._user_name = ""
        self._local: dict[str, Any] = _participant(
            {"id": str(uuid.uuid4())}, local=True, user_name="", audio=False
        )
        self._remote: dict[str, dict[str, Any]] = {}
        self._hidden = 0
        self._inputs: dict[str, Any] = {}
        self._publishing: dict[str, Any] = {}
        self._subscriptions: dict[str, Any] = {}
        self._profiles: dict[str, Any] = {}
        self._renderers: dict[tuple[str, str], _Renderer] = {}
        self._stop_rendering = threading.Event()
        self._renderer_thread: threading.Thread | None = None

    # -- threads -------------------------------------------------------------------------------

    def _submit(self, job: Job) -> None:
        """Run `job` on this client's worker thread, after the jobs before it."""
        with self._lock:
            if self._released:
                raise RuntimeError("this CallClient has been released")
            if self._worker is None:
                self._worker = threading.Thread(
                    target=self._work, name=f"{self._name}-worker", daemon=True
                )
                self._worker.start()
            self._jobs.put(job)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            _call(job)

    def _done(self, completion: Completion, *result: Any) -> None:
        if completion is not None:
            self._submit(lambda: _call(completion, *result))

    def _emit(self, event: str, *args: Any) -> None:
        if not self._released:
            _call(getattr(self._handler, event), *args)

    def release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
            call, worker = self._call, self._worker
        self._stop_rendering.set()
        _join_thread(self._renderer_thread)
        if call is not None:
            call.stop.set()
            _join_thread(call.watcher)
        if worker is not None:
            self._jobs.put(None)
            _join_thread(worker)
        with self._lock:
            in_call = self._state == "joined"
            self._state = "left"
        if call is not None and in_call:
            self._quit(call)

    # -- joining and leaving -------------------------------------------------------------------

    def join(
        self,
        meeting_url: str,
        meeting_token: str | None = None,
        client_settings: Mapping[str, Any] | None = None,
        completion: Completion = None,
    ) -> None:
        self._submit(lambda: self._join(meeting_url, meeting_token, client_settings, completion))

    def _join(
        self,
        meeting_url: str,
        token: str | None,
        settings: Mapping[str, Any] | None,
        completion: Completion,
    ) -> None:
        with self._lock:
            state = self._state
            if state in ("initialized", "left"):
                self._state = "joining"
                _merge(self._inputs, (settings or {}).get("inputs", {}))
                _merge(self._publishing, (settings or {}).get("publishing", {}))
        if state not in ("initialized", "left"):
            _call(completion, None, f"cannot join: the call is {state}")
            return
        self._emit("on_call_state_updated", "joining")
        try:
            call, entry = self._enter(meeting_url, token)
        except _JoinRefused as exc:
            with self._lock:
                self._state = "left"
            _call(completion, None, str(exc))
            self._emit("on_call_state_updated", "left")
            return
        with self._lock:
            released = self._released
            if not released:
                self._call, self._state, self._remote = call, "joined", {}
                name = self._user_name or entry.get("userName") or ""
                audio = self._sends("microphone")
                self._local = _participant(entry, local=True, user_name=name, audio=audio)
        if released:
            self._quit(call)
            _call(completion, None, "the CallClient was released while joining")
            return
        _runtime.entered(self)
        meeting = {"id": entry.get("mtgSessionId")}
        _call(completion, {"participants": {"local": self._local}, "meetingSession": meeting}, None)
        self._emit("on_call_state_updated", "joined")
        call.watcher = threading.Thread(
            target=self._watch, args=(call,), name=f"{self._name}-watcher", daemon=True
        )
        call.watcher.start()

    def _enter(self, meeting_url: str, token: str | None) -> tuple[_Call, dict[str, Any]]:
        """Join the emulator's room; the call and our presence entry, else _JoinRefused."""
        base_url = os.environ.get(EMULATOR_URL_ENV, "").rstrip("/")
        if not base_url:
            raise _JoinRefused(f"{EMULATOR_URL_ENV} is not set: no Daily emulator to join")
        room = urlsplit(meeting_url).path.rstrip("/").rsplit("/", 1)[-1]
        call = _Call(base_url, room, local_id="")
        try:
            status, answer = _request("POST", call.url("join"), {"token": token})
        except OSError as exc:
            raise _JoinRefused(f"cannot reach the Daily emulator at {base_url}: {exc}") from exc
        if status != 200 or not isinstance(answer, dict):
            reason = answer.get("error") if isinstance(answer, dict) else None
            raise _JoinRefused(f"join refused ({status}): {reason or answer}")
        call.local_id = str(answer["id"])
        return call, answer

    def _sends(self, device: str) -> bool:
        enabled = self._inputs.get(device, {}).get("isEnabled", False)
        return bool(enabled and self._publishing.get(device, {}).get("isPublishing", False))

    def leave(self, completion: Completion = None) -> None:
        self._submit(lambda: self._leave(completion))

    def _leave(self, completion: Completion) -> None:
        with self._lock:
            call = self._call
        if call is not None:
            call.stop.set()
            _join_thread(call.watcher)
        with self._lock:
            in_call = call is not None and self._state == "joined"
            if in_call:
                self._state = "leaving"
        if not in_call or call is None:
            _call(completion, None)
            return
        self._emit("on_call_state_updated", "leaving")
        error = self._quit(call)
        with self._lock:
            self._state = "left"
            self._remote = {}
        _call(completion, error)
        self._emit("on_call_state_updated", "left")

    def _quit(self, call: _Call) -> str | None:
        """Leave the emulator's room; an error text only if it answered with a failure."""
        _runtime.exited(self)
        try:
            status, answer = _request("POST", call.url("leave"), {"id": call.local_id})
        except OSError:
            return None
        return None if status in (200, 404) else f"leave failed ({status}): {answer}"

    # -- watching the room ---------------------------------------------------------------------

    def _watch(self, call: _Call) -> None:
        """Poll the room until the call stops; report arrivals, departures and the call's end."""
        while True:
            try:
                status, answer = _request("GET", call.url("participants"))
            except OSError:
                status, answer = 0, None
            if status == 404 or (status == 200 and not self._present(call, answer)):
                self._ended(call)
                return
            if status == 200:
                self._sync(call, answer)
            if call.stop.wait(POLL_INTERVAL_S):
                return

    @staticmethod
    def _present(call: _Call, entries: Any) -> bool:
        return isinstance(entries, list) and any(e.get("id") == call.local_id for e in entries)

    def _sync(self, call: _Call, entries: list[dict[str, Any]]) -> None:
        visible = {
            str(e["id"]): e for e in entries if e["id"] != call.local_id and not e.get("hidden")
        }
        with self._lock:
            if self._call is not call or self._state != "joined" or call.stop.is_set():
                return
            self._hidden = sum(1 for e in entries if e.get("hidden"))
            gone = [p for pid, p in self._remote.items() if pid not in visible]
            new = [
                _participant(e, local=False, user_name=e.get("userName") or "", audio=True)
                for pid, e in visible.items()
                if pid not in self._remote
            ]
            for participant in gone:
                del self._remote[participant["id"]]
            for participant in new:
                self._remote[participant["id"]] = participant
        for participant in gone:
            self._emit("on_participant_left", participant, "leftCall")
        for participant in new:
            self._emit("on_participant_joined", participant)
        if gone or new:
            self._emit("on_participant_counts_updated", self.participant_counts())

    def _ended(self, call: _Call) -> None:
        """The room is gone or we are no longer in it (ejected, deleted): the call is over."""
        with self._lock:
            if self._call is not call or self._state != "joined" or call.stop.is_set():
                return
            self._state = "left"
            self._remote = {}
        _runtime.exited(self)
        self._emit("on_call_state_updated", "left")

    def hears_someone(self) -> bool:
        """In a call with a participant whose microphone plays."""
        with self._lock:
            return self._state == "joined" and any(
                p["media"]["microphone"]["state"] == "playable" for p in self._remote.values()
            )

    # -- audio renderers -----------------------------------------------------------------------

    def set_audio_renderer(
        self,
        participant_id: str,
        callback: Callable[[str, AudioData, str], None],
        audio_source: str = "microphone",
        sample_rate: int = 16000,
        callback_interval_ms: int = 20,
    ) -> None:
        renderer = _Renderer(
            participant_id, callback, audio_source, sample_rate, callback_interval_ms / 1000
        )
        with self._lock:
            if self._released:
                return
            self._renderers[(participant_id, audio_source)] = renderer
            if self._renderer_thread is None:
                self._renderer_thread = threading.Thread(
                    target=self._render, name=f"{self._name}-audio", daemon=True
                )
                self._renderer_thread.start()

    def _render(self) -> None:
        """Hand each renderer `interval` of silence every `interval`, while its owner is here."""
        while True:
            with self._lock:
                renderers = list(self._renderers.values())
            if not renderers:
                return
            now = time.monotonic()
            for renderer in renderers:
                if renderer.due < now - 10 * renderer.interval_s:
                    renderer.due = now
            due = min(r.due for r in renderers)
            if self._stop_rendering.wait(max(0.0, due - now)):
                return
            for renderer in renderers:
                if renderer.due <= time.monotonic():
                    renderer.due += renderer.interval_s
                    self._deliver(renderer)

    def _deliver(self, renderer: _Renderer) -> None:
        with self._lock:
            participant = self._remote.get(renderer.participant_id)
            if self._state != "joined" or participant is None:
                return
        frames = round(renderer.sample_rate * renderer.interval_s)
        audio = AudioData(bytes(frames * SAMPLE_WIDTH), renderer.sample_rate, 1)
        _call(renderer.callback, renderer.participant_id, audio, renderer.audio_source)

    def set_video_renderer(
        self,
        participant_id: str,
        callback: Callable[[str, VideoFrame, str], None],
        video_source: str = "camera",
        color_format: str = "RGBA",
    ) -> None:
        return None

    # -- state ---------------------------------------------------------------------------------

    def participants(self) -> Mapping[str, Any]:
        with self._lock:
            return {"local": self._local, **self._remote}

    def participant_counts(self) -> Mapping[str, Any]:
        with self._lock:
            joined = self._state == "joined"
            return {"present": len(self._remote) + int(joined), "hidden": self._hidden}

    def active_speaker(self) -> Mapping[str, Any]:
        return {}

    def set_user_name(self, user_name: str) -> None:
        with self._lock:
            self._user_name = user_name
            self._local["info"]["userName"] = user_name

    def inputs(self) -> Mapping[str, Any]:
        with self._lock:
            return dict(self._inputs)

    def update_inputs(
        self, input_settings: Mapping[str, Any], completion: Completion = None
    ) -> None:
        with self._lock:
            _merge(self._inputs, input_settings)
        self._done(completion, None)

    def publishing(self) -> Mapping[str, Any]:
        with self._lock:
            return dict(self._publishing)

    def update_publishing(
        self, publishing_settings: Mapping[str, Any], completion: Completion = None
    ) -> None:
        with self._lock:
            _merge(self._publishing, publishing_settings)
        self._done(completion, None)

    def subscriptions(self) -> Mapping[str, Any]:
        with self._lock:
            return dict(self._subscriptions)

    def update_subscriptions(
        self,
        participant_settings: Mapping[str, Any] | None = None,
        profile_settings: Mapping[str, Any] | None = None,
        completion: Completion = None,
    ) -> None:
        with self._lock:
            _merge(self._subscriptions, participant_settings or {})
            _merge(self._profiles, profile_settings or {})
        self._done(completion, None)

    def subscription_profiles(self) -> Mapping[str, Any]:
        with self._lock:
            return dict(self._profiles)

    def update_subscription_profiles(
        self, profile_settings: Mapping[str, Any], completion: Completion = None
    ) -> None:
        with self._lock:
            _merge(self._profiles, profile_settings)
        self._done(completion, None)

    def get_network_stats(self) -> Mapping[str, Any]:
        return {"quality": 100, "threshold": "good", "stats": {}}

    # -- messages and remote participants ------------------------------------------------------

    def send_app_message(
        self,
        message: Any,
        participant_id: str | None = None,
        serialize_none: bool = True,
        completion: Completion = None,
    ) -> None:
        with self._lock:
            joined = self._state == "joined"
        self._done(completion, None if joined else "cannot send an app message: not in a call")

    def send_prebuilt_chat_message(
        self, message: str, user_name: str | None = None, completion: Completion = None
    ) -> None:
        self.send_app_message(message, completion=completion)

    def update_remote_participants(
        self, remote_participants: Mapping[str, Any], completion: Completion = None
    ) -> None:
        self._done(completion, None)

    def eject_remote_participants(self, ids: list[str], completion: Completion = None) -> None:
        self._submit(lambda: self._eject(ids, completion))

    def _eject(self, ids: list[str], completion: Completion) -> None:
        with self._lock:
            call = self._call if self._state == "joined" else None
        if call is None:
            _call(completion, "cannot eject: not in a call")
            return
        for participant_id in ids:
            try:
                _request("POST", call.url("leave"), {"id": participant_id})
            except OSError as exc:
                _call(completion, f"eject failed: {exc}")
                return
        _call(completion, None)

    def update_permissions(
        self, permissions: Mapping[str, Any], completion: Completion = None
    ) -> None:
        self._done(completion, None)

    # -- custom tracks -------------------------------------------------------------------------

    def add_custom_audio_track(
        self,
        track_name: str,
        audio_track: CustomAudioTrack,
        ignore_audio_level: bool | None = None,
        completion: Completion = None,
    ) -> None:
        self._done(completion, None)

    def update_custom_audio_track(
        self,
        track_name: str,
        audio_track: CustomAudioTrack,
        ignore_audio_level: bool | None = None,
        completion: Completion = None,
    ) -> None:
        self._done(completion, None)

    def remove_custom_audio_track(self, track_name: str, completion: Completion = None) -> None:
        self._done(completion, None)

    def add_custom_video_track(
        self, track_name: str, video_track: CustomVideoTrack, completion: Completion = None
    ) -> None:
        self._done(completion, None)

    def update_custom_video_track(
        self, track_name: str, video_track: CustomVideoTrack, completion: Completion = None
    ) -> None:
        self._done(completion, None)

    def remove_custom_video_track(self, track_name: str, completion: Completion = None) -> None:
        self._done(completion, None)

    # -- recording and transcription (accepted, nothing recorded or transcribed) ---------------

    def start_recording(
        self,
        streaming_settings: Mapping[str, Any] | None = None,
        stream_id: str | None = None,
        force_new: bool | None = None,
        completion: Completion = None,
    ) -> None:
        stream = stream_id or str(uuid.uuid4())
        self._done(completion, stream, None)
        self._submit(lambda: self._emit("on_recording_started", {"streamId": stream}))

    def stop_recording(self, stream_id: str | None = None, completion: Completion = None) -> None:
        self._done(completion, None)
        self._submit(lambda: self._emit("on_recording_stopped", stream_id or ""))

    def update_recording(
        self,
        update_settings: Mapping[str, Any],
        stream_id: str | None = None,
        completion: Completion = None,
    ) -> None:
        self._done(completion, None)

    def start_transcription(
        self, settings: Mapping[str, Any] | None = None, completion: Completion = None
    ) -> None:
        status = {"transcriptId": str(uuid.uuid4()), **(settings or {})}
        self._done(completion, None)
        self._submit(lambda: self._emit("on_transcription_started", status))

    def stop_transcription(self, completion: Completion = None) -> None:
        self._done(completion, None)
        self._submit(lambda: self._emit("on_transcription_stopped", self._local["id"], False))

    def update_transcription(
        self,
        participants: list[str] | None = None,
        instance_id: str | None = None,
        completion: Completion = None,
    ) -> None:
        self._done(completion, None)

    # -- telephony and live streaming (refused: the emulator has no SIP or RTMP) ---------------

    def start_dialout(self, settings: Mapping[str, Any], completion: Completion = None) -> None:
        self._done(completion, "", f"dial-out is {NOT_SUPPORTED}")

    def stop_dialout(
        self, participant_id: str | None = None, completion: Completion = None
    ) -> None:
        self._done(completion, f"dial-out is {NOT_SUPPORTED}")

    def send_dtmf(self, settings: Mapping[str, Any], completion: Completion = None) -> None:
        self._done(completion, f"DTMF is {NOT_SUPPORTED}")

    def sip_call_transfer(self, settings: Mapping[str, Any], completion: Completion = None) -> None:
        self._done(completion, f"SIP transfer is {NOT_SUPPORTED}")

    def sip_refer(self, settings: Mapping[str, Any], completion: Completion = None) -> None:
        self._done(completion, f"SIP REFER is {NOT_SUPPORTED}")

    def start_live_stream_with_endpoints(
        self,
        endpoints: list[str] | None,
        streaming_settings: Mapping[str, Any] | None = None,
        stream_id: str | None = None,
        force_new: bool | None = None,
        completion: Completion = None,
    ) -> None:
        self._done(completion, f"live streaming is {NOT_SUPPORTED}")

    def start_live_stream_with_rtmp_urls(
        self,
        rtmp_urls: list[str] | None,
        streaming_settings: Mapping[str, Any] | None = None,
        stream_id: str | None = None,
        force_new: bool | None = None,
        completion: Completion = None,
    ) -> None:
        self._done(completion, f"live streaming is {NOT_SUPPORTED}")

    def stop_live_stream(self, stream_id: str | None = None, completion: Completion = None) -> None:
        self._done(completion, f"live streaming is {NOT_SUPPORTED}")

    def update_live_stream(
        self,
        update_settings: Mapping[str, Any],
        stream_id: str | None = None,
        completion: Completion = None,
    ) -> None:
        self._done(completion, f"live streaming is {NOT_SUPPORTED}")

    # -- network -------------------------------------------------------------------------------

    def set_proxy_url(self, proxy_url: str | None = None, completion: Completion = None) -> None:
        self._done(completion, None)

    def set_ice_config(
        self, ice_config: Mapping[str, Any] | None = None, completion: Completion = None
    ) -> None:
        self._done(completion, None)

"""A stand-in bot image that plays the bot contract offline: `python -m bot_runtime --room-url URL`
(daily) or `python -m bot_runtime --transport webrtc` (webrtc).

Standard library only. It checks the contract (the command line and every environment
variable), calls `ready`, waits for SIGTERM or its time limit, and calls `ended`. In webrtc
mode it also serves `POST|PATCH /api/offer` on BOT_HOST:BOT_PORT for its own session only
(`X-Session-Id`), answering a fake SDP answer that lists the request headers it saw. The
`"testBot"` object of SESSION_BODY scripts misbehaviour:

    ready_delay_s      seconds before calling ready (default 0.05)
    skip_ready         never call ready
    exit_before_ready  exit with this code before ready (after ended "crashed")
    exit_after_s       exit this many seconds after ready, with exit_code (default 0):
    exit_code          ended "crashed" if it is non-zero, else "completed"
    ignore_sigterm     keep running on SIGTERM (and SIGINT)
    ignore_max_duration  keep running past SESSION_MAX_DURATION_S (the dispatcher must end it)
    no_ended           never call ended
    listen_delay_s     webrtc: seconds before it listens (a slow boot)
    ready_on_offer     webrtc: call ready when the first offer arrives, not after ready_delay_s

Pooled (the warm pool: POOL_TOKEN set, no SESSION_ID): sleep TESTBOT_BOOT_S (a simulated
preload, default 0), then long-poll `GET {DISPATCHER_URL}/internal/machines/{FLY_MACHINE_ID}/
assignment?wait=5` with `Authorization: Bearer <POOL_TOKEN>`, as the real bot does: 204 asks
again at once, 5xx/429/network errors after a backoff (0.2 s doubling to 2 s), a pause of the
process (SIGSTOP, a suspended machine) abandons the poll and asks again, 410 exits 0, any
other answer exits 2; SIGTERM while waiting exits 0. None of these call back. A 200's
`{"env": {...}, "args": [...]}` then plays the session as above, with the machine's env
overlaid with `env` and `args` as its command line.

Exit codes: 0 clean, 2 a pooled machine refused, 3 a broken contract (ended "bad_contract"
when it can be sent), else what the script says. One line per step on stdout, never a secret.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import queue
import random
import re
import signal
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

REQUIRED = (
    "SESSION_ID",
    "DISPATCHER_URL",
    "BOT_CALLBACK_TOKEN",
    "SESSION_MAX_DURATION_S",
    "TRACEPARENT",
)
REQUIRED_BY_TRANSPORT = {
    "daily": ("DAILY_ROOM_URL", "DAILY_TOKEN"),
    "webrtc": ("BOT_HOST", "BOT_PORT", "ICE_SERVERS"),
}
TRACEPARENT = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")
EXIT_POOL_REFUSED = 2
EXIT_BAD_CONTRACT = 3
CALLBACK_TIMEOUT_S = 5.0
CALLBACK_ATTEMPTS = 3
TICK_S = 0.02
POOL_WAIT_S = 5
POOL_MARGIN_S = 2.0
POOL_BACKOFF_S = (0.2, 2.0)
POOL_TICK_S = 0.25
POOL_PAUSE_S = 1.0


class Signals:
    """SIGTERM and SIGINT, remembered as a flag for the whole process's life."""

    def __init__(self) -> None:
        self.reason: str | None = None

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, _frame: object) -> None:
        # Only a flag: printing here could re-enter a print the signal interrupted.
        self.reason = self.reason or ("sigterm" if signum == signal.SIGTERM else "sigint")


class TestBot:
    """One scripted session: contract check, ready, wait, ended."""

    def __init__(
        self,
        room_url: str | None,
        transport: str | None,
        environ: dict[str, str],
        signals: Signals | None = None,
    ) -> None:
        self.room_url = room_url
        self.transport = transport
        self.env = environ
        self.signals = signals or Signals()
        self.offered = threading.Event()
        self.session_id = environ.get("SESSION_ID") or "-"
        self.announced = False
        self.started = time.monotonic()

    @property
    def stop_signal(self) -> str | None:
        """The stop signal received, if any."""
        return self.signals.reason

    def say(self, step: str) -> None:
        """Print one step of the session on stdout."""
        print(f"testbot session={self.session_id} {step}", flush=True)

    def run(self) -> int:
        """Play the session; returns the exit code."""
        self.signals.install()
        self.say(f"start pid={os.getpid()} room={self.room_url}")
        problem = self.contract_problem()
        if problem:
            self.say(f"bad_contract {problem}")
            return self.finish("bad_contract", EXIT_BAD_CONTRACT, script={})
        script = self.script()
        max_duration_s = int(self.env["SESSION_MAX_DURATION_S"])
        if script.get("exit_before_ready") is not None:
            return self.finish("crashed", int(script["exit_before_ready"]), script)
        if self.transport == "webrtc":
            stopped = self.wait(float(script.get("listen_delay_s", 0)), script, max_duration_s)
            if stopped:
                return self.finish(stopped, 0, script)
            self.serve()
        if script.get("ready_on_offer"):
            stopped = self.wait(None, script, max_duration_s, until=self.offered)
        else:
            stopped = self.wait(float(script.get("ready_delay_s", 0.05)), script, max_duration_s)
        if stopped:
            return self.finish(stopped, 0, script)
        if script.get("skip_ready"):
            self.say("ready skipped")
        else:
            self.say(f"ready status={self.callback('ready', {})}")
        exit_after_s = script.get("exit_after_s")
        if exit_after_s is not None:
            stopped = self.wait(float(exit_after_s), script, max_duration_s)
            if not stopped:
                code = int(script.get("exit_code", 0))
                return self.finish("crashed" if code else "completed", code, script)
        else:
            stopped = self.wait(None, script, max_duration_s)
        return self.finish(stopped or "completed", 0, script)

    def contract_problem(self) -> str | None:
        """What is wrong with the command line or the environment, if anything."""
        transport = self.env.get("BOT_TRANSPORT")
        if transport not in REQUIRED_BY_TRANSPORT:
            return "bad=BOT_TRANSPORT"
        wanted = REQUIRED + REQUIRED_BY_TRANSPORT[transport]
        missing = [name for name in wanted if not self.env.get(name)]
        if missing:
            return "missing=" + ",".join(missing)
        if transport == "daily" and self.room_url != self.env["DAILY_ROOM_URL"]:
            return "room_url_mismatch"
        if transport == "webrtc" and (
            self.transport != "webrtc" or self.room_url or self.env.get("DAILY_TOKEN")
        ):
            return "webrtc_mismatch"
        if not self.env["SESSION_MAX_DURATION_S"].isdigit() or not int(
            self.env["SESSION_MAX_DURATION_S"]
        ):
            return "bad=SESSION_MAX_DURATION_S"
        if not TRACEPARENT.match(self.env["TRACEPARENT"]):
            return "bad=TRACEPARENT"
        try:
            json.loads(self.env.get("SESSION_BODY") or "{}")
        except ValueError:
            return "bad=SESSION_BODY"
        return None

    def script(self) -> dict[str, Any]:
        """The `testBot` object of SESSION_BODY ({} if none)."""
        body = json.loads(self.env.get("SESSION_BODY") or "{}")
        script = body.get("testBot") if isinstance(body, dict) else None
        return script if isinstance(script, dict) else {}

    def wait(
        self,
        seconds: float | None,
        script: dict[str, Any],
        max_duration_s: int,
        until: threading.Event | None = None,
    ) -> str | None:
        """Sleep `seconds` (None: forever, or `until` is set); the end reason if a signal or
        the limit cut it short."""
        end = None if seconds is None else time.monotonic() + seconds
        deadline = self.started + max_duration_s
        while (end is None or time.monotonic() < end) and not (until and until.is_set()):
            if self.stop_signal and not self.announced:
                self.announced = True
                ignored = bool(script.get("ignore_sigterm"))
                self.say(self.stop_signal + (" ignored" if ignored else ""))
            if self.stop_signal and not script.get("ignore_sigterm"):
                return self.stop_signal
            if time.monotonic() >= deadline and not script.get("ignore_max_duration"):
                self.say("max_duration")
                return "max_duration"
            time.sleep(TICK_S)
        return None

    def serve(self) -> None:
        """Serve the offer routes on BOT_HOST:BOT_PORT in a background thread."""
        bot = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.offer()

            def do_PATCH(self) -> None:
                self.offer()

            def offer(self) -> None:
                if self.headers.get("X-Session-Id") != bot.session_id:
                    return self.answer(404, {"detail": "not my session", "code": "wrong-session"})
                if self.path.split("?")[0] != "/api/offer":
                    return self.answer(404, {"detail": "no such route", "code": "not-found"})
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    data = json.loads(self.rfile.read(length) or b"null")
                except ValueError:
                    return self.answer(400, {"detail": "bad json", "code": "invalid-json"})
                seen = sorted(k.lower() for k in self.headers)
                if self.command == "PATCH":
                    count = len(data.get("candidates", [])) if isinstance(data, dict) else 0
                    bot.say(f"patch candidates={count}")
                    return self.answer(200, {"ok": True, "candidates": count, "seen": seen})
                bot.say(f"offer path={self.path}")
                bot.offered.set()
                sdp = data.get("sdp", "") if isinstance(data, dict) else ""
                answer = {"sdp": f"answer-to:{sdp}", "type": "answer", "pc_id": "testbot-pc"}
                ice = json.loads(bot.env["ICE_SERVERS"])
                return self.answer(200, {**answer, "seen": seen, "path": self.path, "ice": ice})

            def answer(self, status: int, body: dict[str, Any]) -> None:
                raw = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        address = (self.env["BOT_HOST"], int(self.env["BOT_PORT"]))
        server = http.server.ThreadingHTTPServer(address, Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.say(f"listening port={address[1]}")

    def finish(self, reason: str, code: int, script: dict[str, Any]) -> int:
        """Send ended (unless scripted not to) and return the exit code."""
        if script.get("no_ended"):
            self.say(f"ended skipped reason={reason} exit_code={code}")
        elif all(self.env.get(k) for k in ("DISPATCHER_URL", "SESSION_ID", "BOT_CALLBACK_TOKEN")):
            status = self.callback("ended", {"reason": reason, "exit_code": code})
            self.say(f"ended reason={reason} exit_code={code} status={status}")
        else:
            self.say(f"ended impossible reason={reason} exit_code={code}")
        self.say(f"exit code={code}")
        return code

    def callback(self, operation: str, payload: dict[str, Any]) -> int | str:
        """POST a callback, retrying connection errors and 5xx/429; its status or error name."""
        url = (
            f"{self.env['DISPATCHER_URL'].rstrip('/')}/internal/sessions/"
            f"{self.env['SESSION_ID']}/{operation}"
        )
        headers = {
            "Authorization": f"Bearer {self.env['BOT_CALLBACK_TOKEN']}",
            "Content-Type": "application/json",
        }
        if self.env.get("TRACEPARENT"):
            headers["traceparent"] = self.env["TRACEPARENT"]
        result: int | str = "not_sent"
        for attempt in range(CALLBACK_ATTEMPTS):
            if attempt:
                time.sleep(0.2 * 2**attempt)
            request = urllib.request.Request(  # noqa: S310 (the dispatcher's http URL)
                url, data=json.dumps(payload).encode(), headers=headers, method="POST"
            )
            try:
                with urllib.request.urlopen(request, timeout=CALLBACK_TIMEOUT_S) as response:  # noqa: S310
                    return int(response.status)
            except urllib.error.HTTPError as exc:
                result = exc.code
                if exc.code != 429 and exc.code < 500:
                    return result
            except (urllib.error.URLError, OSError) as exc:
                result = type(exc).__name__
            self.say(f"{operation} attempt={attempt + 1} failed={result}")
        return result


class PooledMachine:
    """A pooled machine before its session: a simulated boot, then its assignment's long poll."""

    def __init__(self, environ: dict[str, str], signals: Signals) -> None:
        self.env = environ
        self.signals = signals
        self.machine_id = environ.get("FLY_MACHINE_ID", "")

    def say(self, step: str) -> None:
        """Print one step of the wait on stdout."""
        print(f"testbot machine={self.machine_id or '-'} {step}", flush=True)

    def wait_for_assignment(self) -> tuple[dict[str, str], list[str]] | int:
        """The assignment's (environment, command line), or the exit code if none came."""
        self.signals.install()
        missing = [n for n in ("DISPATCHER_URL", "FLY_MACHINE_ID") if not self.env.get(n)]
        if missing:
            self.say("pool_refused missing=" + ",".join(missing))
            return self.exit(EXIT_POOL_REFUSED)
        boot_s = float(self.env.get("TESTBOT_BOOT_S") or 0)
        self.say(f"pooled pid={os.getpid()} boot_s={boot_s}")
        if self.pause(boot_s) == "stopped":
            return self.stopped()
        self.say("asking")
        failures = 0
        while True:
            outcome, value = self.ask()
            if outcome == "stopped":
                return self.stopped()
            if outcome == "paused":
                self.say(f"paused s={value:.1f} asking again")
                failures = 0
                continue
            if outcome == "answer":
                status, body = value
                if status == 204:
                    failures = 0
                    continue
                if status == 200:
                    return self.assigned(body)
                if status == 410:
                    self.say("retired")
                    return self.exit(0)
                if status not in (408, 429) and status < 500:
                    self.say(f"pool_refused status={status}")
                    return self.exit(EXIT_POOL_REFUSED)
                value = status
            failures += 1
            delay = min(POOL_BACKOFF_S[1], POOL_BACKOFF_S[0] * 2 ** (failures - 1))
            delay = random.uniform(delay / 2, delay)
            self.say(f"assignment attempt={failures} failed={value} retry_s={delay:.2f}")
            if self.pause(delay) == "stopped":
                return self.stopped()

    def assigned(self, raw: bytes) -> tuple[dict[str, str], list[str]] | int:
        try:
            body = json.loads(raw)
            env, args = body["env"], body.get("args", [])
            if not all(isinstance(v, str) for v in [*env.values(), *env, *args]):
                raise TypeError("not strings")
        except (ValueError, KeyError, TypeError, AttributeError):
            self.say("pool_refused malformed_assignment")
            return self.exit(EXIT_POOL_REFUSED)
        self.say(f"assigned session={env.get('SESSION_ID', '-')}")
        return {**self.env, **env}, list(args)

    def ask(self) -> tuple[str, Any]:
        """One long poll in a thread: ("answer", (status, body)), ("error", name), or
        ("stopped" | "paused", seconds) when a signal or a pause of the process cut it short (a
        poll that failed across a pause, its socket timed out while frozen, is a pause too)."""
        box: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=1)
        threading.Thread(target=lambda: box.put(self.get()), daemon=True).start()
        monotonic, wall = time.monotonic(), time.time()
        while True:
            try:
                outcome: tuple[str, Any] | None = box.get(timeout=POOL_TICK_S)
            except queue.Empty:
                outcome = None
            if outcome is not None and outcome[0] == "answer":
                return outcome
            if self.signals.reason:
                return "stopped", 0.0
            now_monotonic, now_wall = time.monotonic(), time.time()
            late_s = max(now_monotonic - monotonic, now_wall - wall) - POOL_TICK_S
            if late_s > POOL_PAUSE_S:
                return "paused", late_s
            if outcome is not None:
                return outcome
            monotonic, wall = now_monotonic, now_wall

    def get(self) -> tuple[str, Any]:
        """GET the assignment once."""
        machine = urllib.parse.quote(self.machine_id, safe="")
        url = (
            f"{self.env['DISPATCHER_URL'].rstrip('/')}/internal/machines/{machine}/assignment"
            f"?wait={POOL_WAIT_S}"
        )
        headers = {"Authorization": f"Bearer {self.env['POOL_TOKEN']}"}
        request = urllib.request.Request(url, headers=headers)  # noqa: S310 (an http URL)
        try:
            with urllib.request.urlopen(request, timeout=POOL_WAIT_S + POOL_MARGIN_S) as response:  # noqa: S310
                return "answer", (int(response.status), response.read())
        except urllib.error.HTTPError as exc:
            return "answer", (exc.code, exc.read())
        except (urllib.error.URLError, OSError, ValueError) as exc:
            return "error", type(exc).__name__

    def pause(self, seconds: float) -> str | None:
        """Sleep `seconds`; "stopped" if a signal cut it short."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if self.signals.reason:
                return "stopped"
            time.sleep(TICK_S)
        return "stopped" if self.signals.reason else None

    def stopped(self) -> int:
        self.say(f"{self.signals.reason} before assignment")
        return self.exit(0)

    def exit(self, code: int) -> int:
        self.say(f"exit code={code}")
        return code


def main() -> int:
    """Parse the command line and play the session (a pooled machine's once assigned)."""
    parser = argparse.ArgumentParser(prog="python -m bot")
    parser.add_argument("--room-url")
    parser.add_argument("--transport")
    args = parser.parse_args()
    environ = dict(os.environ)
    signals = Signals()
    if not environ.get("SESSION_ID") and environ.get("POOL_TOKEN"):
        assigned = PooledMachine(environ, signals).wait_for_assignment()
        if isinstance(assigned, int):
            return assigned
        environ, argv = assigned
        args = parser.parse_args(argv)
    return TestBot(args.room_url, args.transport, environ, signals).run()


if __name__ == "__main__":
    sys.exit(main())

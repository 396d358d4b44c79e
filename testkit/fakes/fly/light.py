"""Light machines: a machine's process played by an asyncio task in the emulator, not an OS process.

With `FlyEmulator(light_machines=True)` (`--light-machines` on the command line) every machine
runs this instead of its command, so ten thousand live bots are ten thousand small tasks, not
ten thousand interpreters. A light machine plays the test bot's session
(testkit/fakes/images/testbot) on its happy path and in a few scripted ways; through the API it
is the same machine: the same states, events, waits and exit events, with exit codes and
signals as a process's (a SIGKILL is 137, signal 9).

What it does, from the machine's environment (the bot contract):

- calls `POST {DISPATCHER_URL}/internal/sessions/{SESSION_ID}/ready` with
  `Authorization: Bearer <BOT_CALLBACK_TOKEN>` (and `traceparent`) after `ready_delay_s`, as the
  test bot does (3 attempts, 5 s each, again after connection errors, 5xx and 429);
- stays running until SIGTERM or SIGINT (a stop), its SESSION_MAX_DURATION_S, a scripted exit
  (`exit_after_s`, or `FlyEmulator.exit_machine`: `POST /_emulator/machines/{id}/exit`), or a
  SIGKILL (which ends it at once, with nothing sent);
- then calls `ended` with `{"reason", "exit_code"}` (`sigterm`/`sigint`/`max_duration` exit 0;
  a scripted exit `completed`, or `crashed` when its code is not 0) unless told not to (a silent
  exit), and exits with the code.

The `testBot` script of SESSION_BODY is read as the test bot reads it, for the keys a light
machine plays: `ready_delay_s`, `skip_ready`, `exit_before_ready`, `exit_after_s`, `exit_code`,
`no_ended`, `ignore_sigterm`, `ignore_max_duration`. Not played: the command line and the
contract's finer checks (only the three variables a callback needs are required: without them
it exits 3, as the test bot's `bad_contract`) and webrtc's offer server (a light machine serves
nothing). A pooled machine (POOL_TOKEN, no SESSION_ID) plays the warm pool's assignment poll as
the bot runtime does (bot_runtime/pool.py): `GET {DISPATCHER_URL}/internal/machines/
{FLY_MACHINE_ID}/assignment?wait=5` with `Authorization: Bearer <POOL_TOKEN>`, again at once
after a 204 and after 0.2 s on a connection error, 429 or 5xx; a 200's `env` is overlaid on the
machine's and the session is played as above; a 410 (retired) exits 0, any other answer (401:
a token that is not the machine's) exits 2, a stop before any assignment exits 0. A machine
with neither waits for its stop and exits 0. SIGSTOP/SIGCONT (suspend, resume) pause and
continue it between its steps (a poll under way is abandoned and asked again); any other signal
whose default action ends a process ends it with 128+N. Callbacks and polls are plain HTTP/1.1
over a new connection each (`Connection: close`, as the test bot's urllib), http only.
Each step is a line in the machine's logs (`lightbot session=... ready status=204`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlsplit

CALLBACK_TIMEOUT_S = 5.0
CALLBACK_ATTEMPTS = 3
READY_DELAY_S = 0.05
EXIT_BAD_CONTRACT = 3
EXIT_REFUSED = 2
ASSIGNMENT_WAIT_S = 5
ASSIGNMENT_RETRY_S = 0.2
NEEDED = ("DISPATCHER_URL", "SESSION_ID", "BOT_CALLBACK_TOKEN")
# Signals whose default action does not end a process.
_HARMLESS = frozenset(
    {signal.SIGCHLD, signal.SIGCONT, signal.SIGURG, signal.SIGWINCH, signal.SIGSTOP}
)


class LightProcess:
    """What the emulator needs of a machine's process (`returncode`, `send_signal`, `signal_group`,
    `wait`), played by a task of the running event loop.

    `returncode` is None while it runs, then its exit code, or -N when signal N ended it (as
    asyncio's processes report it).
    """

    def __init__(self, env: Mapping[str, str], logs: list[str]) -> None:
        self.env = dict(env)
        self.logs = logs
        self.returncode: int | None = None
        self.stop_reason: str | None = None
        self.frozen = False
        self._exit: tuple[int, bool] | None = None
        self._limit: float | None = None  # the loop's time at SESSION_MAX_DURATION_S
        self._wake = asyncio.Event()
        self._thawed = asyncio.Event()
        self._thawed.set()
        self._task = asyncio.ensure_future(self._play())
        self._task.add_done_callback(self._finished)

    # -- what the runtime calls ----------------------------------------------------------------

    def send_signal(self, sig: int) -> None:
        """Deliver `sig` to the bot, as the kernel would to a process that handles only SIGTERM
        and SIGINT (while frozen, a stop signal waits for SIGCONT)."""
        if self.returncode is not None:
            raise ProcessLookupError
        if sig in (signal.SIGTERM, signal.SIGINT):
            self.stop_reason = self.stop_reason or (
                "sigterm" if sig == signal.SIGTERM else "sigint"
            )
            self._wake.set()
        elif sig == signal.SIGSTOP:
            self.frozen = True
            self._thawed.clear()
            self._wake.set()  # it stops at its next step
        elif sig == signal.SIGCONT:
            self.frozen = False
            self._thawed.set()
        elif sig not in _HARMLESS:
            self._die(sig)

    def signal_group(self, sig: int) -> None:
        """`sig` to the whole process group (there is only the bot); gone is not an error."""
        with contextlib.suppress(ProcessLookupError):
            self.send_signal(sig)

    def exit(self, code: int, *, ended: bool = True) -> None:
        """Script an exit now: `ended` first (unless not `ended`: a silent exit), then `code`."""
        if self.returncode is not None:
            raise ProcessLookupError
        self._exit = (code, ended)
        self._wake.set()

    async def wait(self) -> int:
        """The exit code once it has exited (-N: killed by signal N)."""
        await asyncio.wait({self._task})
        assert self.returncode is not None
        return self.returncode

    # -- the bot ---------------------------------------------------------------------------

    def _die(self, sig: int) -> None:
        if self.returncode is None:
            self.returncode = -sig
            self._task.cancel()

    def _finished(self, task: asyncio.Task[int]) -> None:
        if self.returncode is not None:
            return
        if task.cancelled():
            self.returncode = -signal.SIGKILL
        elif (exc := task.exception()) is not None:
            self.say(f"Traceback: {type(exc).__name__}: {exc}")
            self.returncode = 1
        else:
            self.returncode = task.result()

    def say(self, step: str) -> None:
        self.logs.append(f"lightbot session={self.env.get('SESSION_ID') or '-'} {step}")

    def _script(self) -> dict[str, Any]:
        try:
            body = json.loads(self.env.get("SESSION_BODY") or "{}")
        except ValueError:
            return {}
        script = body.get("testBot") if isinstance(body, dict) else None
        return script if isinstance(script, dict) else {}

    async def _play(self) -> int:
        await asyncio.sleep(0)  # the runtime marks the machine started first
        self.say("start")
        if not self.env.get("SESSION_ID") and self.env.get("POOL_TOKEN"):
            assigned = await self._assignment()
            if assigned is not None:
                return self._leave(assigned)
        if not self.env.get("SESSION_ID"):
            self.say("no session: waiting for a stop")
            await self._pause(None, {})
            return self._leave(0)
        missing = [name for name in NEEDED if not self.env.get(name)]
        if missing:
            self.say("bad_contract missing=" + ",".join(missing))
            return self._leave(EXIT_BAD_CONTRACT)
        script = self._script()
        loop = asyncio.get_running_loop()
        duration = self.env.get("SESSION_MAX_DURATION_S", "")
        self._limit = loop.time() + int(duration) if duration.isdigit() else None
        if script.get("exit_before_ready") is not None:
            return await self._finish("crashed", int(script["exit_before_ready"]), script)
        stopped = await self._pause(float(script.get("ready_delay_s", READY_DELAY_S)), script)
        if stopped:
            return await self._ended(stopped, script)
        if script.get("skip_ready"):
            self.say("ready skipped")
        else:
            self.say(f"ready status={await self._callback('ready', {})}")
        exit_after_s = script.get("exit_after_s")
        stopped = await self._pause(None if exit_after_s is None else float(exit_after_s), script)
        if stopped is None:
            code = int(script.get("exit_code", 0))
            return await self._finish("crashed" if code else "completed", code, script)
        return await self._ended(stopped, script)

    async def _assignment(self) -> int | None:
        """Ask for the pool's assignment until one comes (None: the session's env is now in
        `env`), or the exit code: 0 when stopped first or retired, EXIT_REFUSED when refused."""
        while True:
            await self._thawed.wait()
            if self.stop_reason or self._exit is not None:
                self.say("stopped before any assignment")
                return 0
            self._wake.clear()
            poll = asyncio.ensure_future(self._poll_assignment())
            wake = asyncio.ensure_future(self._wake.wait())
            await asyncio.wait({poll, wake}, return_when=asyncio.FIRST_COMPLETED)
            wake.cancel()
            if not poll.done():
                poll.cancel()  # a stop, an exit or a freeze: look again (a frozen poll is dead)
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await poll
                continue
            status: int | str
            try:
                status, body = poll.result()
            except (OSError, TimeoutError, ValueError) as exc:
                status, body = type(exc).__name__, b""
            if status == 204:
                continue
            if status == 200:
                try:
                    env = json.loads(body)["env"]
                    self.env.update({str(k): str(v) for k, v in env.items()})
                except (ValueError, KeyError, TypeError, AttributeError):
                    self.say("assignment malformed")
                    return EXIT_REFUSED
                self.say("assigned")
                return None
            if status == 410:
                self.say("retired")
                return 0
            if isinstance(status, int) and status != 429 and status < 500:
                self.say(f"assignment refused status={status}")
                return EXIT_REFUSED
            await asyncio.sleep(ASSIGNMENT_RETRY_S)

    async def _poll_assignment(self) -> tuple[int, bytes]:
        """One long poll of the assignment: its status and body."""
        env = self.env
        base = urlsplit(env["DISPATCHER_URL"].rstrip("/"))
        machine = quote(env.get("FLY_MACHINE_ID", ""), safe="")
        path = f"{base.path}/internal/machines/{machine}/assignment?wait={ASSIGNMENT_WAIT_S}"
        headers = {
            "Host": base.netloc,
            "Authorization": f"Bearer {env['POOL_TOKEN']}",
            "Connection": "close",
        }
        async with asyncio.timeout(ASSIGNMENT_WAIT_S + CALLBACK_TIMEOUT_S):
            return await _request("GET", base.hostname or "", base.port or 80, path, headers, None)

    async def _ended(self, stopped: str, script: dict[str, Any]) -> int:
        if stopped == "scripted" and self._exit is not None:
            code, ended = self._exit
            reason = "crashed" if code else "completed"
            return await self._finish(reason, code, script | ({} if ended else {"no_ended": True}))
        return await self._finish(stopped, 0, script)

    async def _pause(self, seconds: float | None, script: dict[str, Any]) -> str | None:
        """Wait `seconds` (None: until something happens); what cut it short, if anything:
        "scripted", the stop signal's reason, or "max_duration"."""
        loop = asyncio.get_running_loop()
        end = None if seconds is None else loop.time() + seconds
        limit = None if script.get("ignore_max_duration") else self._limit
        announced = False
        while True:
            await self._thawed.wait()
            if self._exit is not None:
                return "scripted"
            if self.stop_reason and not announced:
                announced = True
                self.say(self.stop_reason + (" ignored" if script.get("ignore_sigterm") else ""))
            if self.stop_reason and not script.get("ignore_sigterm"):
                return self.stop_reason
            now = loop.time()
            if limit is not None and now >= limit:
                self.say("max_duration")
                return "max_duration"
            if end is not None and now >= end:
                return None
            until = min((t for t in (end, limit) if t is not None), default=None)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), None if until is None else until - now)

    async def _finish(self, reason: str, code: int, script: dict[str, Any]) -> int:
        if script.get("no_ended"):
            self.say(f"ended skipped reason={reason} exit_code={code}")
        else:
            status = await self._callback("ended", {"reason": reason, "exit_code": code})
            self.say(f"ended reason={reason} exit_code={code} status={status}")
        return self._leave(code)

    def _leave(self, code: int) -> int:
        self.say(f"exit code={code}")
        return code

    async def _callback(self, operation: str, payload: dict[str, Any]) -> int | str:
        """POST a callback, again after connection errors, 5xx and 429; its status or error."""
        env = self.env
        base = urlsplit(env["DISPATCHER_URL"].rstrip("/"))
        path = f"{base.path}/internal/sessions/{quote(env['SESSION_ID'], safe='')}/{operation}"
        headers = {
            "Host": base.netloc,
            "Authorization": f"Bearer {env['BOT_CALLBACK_TOKEN']}",
            "Content-Type": "application/json",
            "Connection": "close",
        }
        if env.get("TRACEPARENT"):
            headers["traceparent"] = env["TRACEPARENT"]
        host, port = base.hostname or "", base.port or 80
        result: int | str = "not_sent"
        for attempt in range(CALLBACK_ATTEMPTS):
            if attempt:
                await asyncio.sleep(0.2 * 2**attempt)
            try:
                async with asyncio.timeout(CALLBACK_TIMEOUT_S):
                    result = await _post(host, port, path, headers, payload)
            except (OSError, TimeoutError, ValueError) as exc:
                result = type(exc).__name__
            if isinstance(result, int) and result != 429 and result < 500:
                return result
            self.say(f"{operation} attempt={attempt + 1} failed={result}")
        return result


async def _post(
    host: str, port: int, path: str, headers: dict[str, str], payload: dict[str, Any]
) -> int:
    """One HTTP/1.1 POST of `payload` as JSON over a new connection; the answer's status."""
    status, _ = await _request("POST", host, port, path, headers, payload)
    return status


async def _request(
    method: str,
    host: str,
    port: int,
    path: str,
    headers: dict[str, str],
    payload: dict[str, Any] | None,
) -> tuple[int, bytes]:
    """One HTTP/1.1 request (`payload` as JSON, if any) over a new connection (`Connection:
    close`); the answer's status and body (not de-chunked: a JSON body is found whole in it)."""
    body = b"" if payload is None else json.dumps(payload).encode()
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    if payload is not None:
        head += "Content-Type: application/json\r\n" if "Content-Type" not in headers else ""
        head += f"Content-Length: {len(body)}\r\n"
    head += "\r\n"
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(head.encode() + body)
        await writer.drain()
        status_line = await reader.readline()
        parts = status_line.split()
        if len(parts) < 2 or not parts[1].isdigit():
            raise ValueError(f"bad status line {status_line!r}")
        rest = b""
        while chunk := await reader.read(65536):  # the rest of the answer, until it closes
            rest += chunk
        fields, _, answer = rest.partition(b"\r\n\r\n")
        chunked = b"transfer-encoding: chunked" in fields.lower()
        return int(parts[1]), _dechunk(answer) if chunked else answer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def _dechunk(data: bytes) -> bytes:
    """A chunked transfer-encoded body's content."""
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out, data = out + data[:size], data[size + 2 :]
    return out

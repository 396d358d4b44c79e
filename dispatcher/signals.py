"""The stop signals of `dispatcher serve` (SIGINT, SIGTERM): each stop counted once.

One stop often reaches the dispatcher more than once. Ctrl-C in a terminal, or a kill of the
process group (what `timeout`, systemd and IDE stop buttons send), signals it directly, and its
parent passes the same stop on: `uv run` forwards SIGTERM (and SIGINT, in some versions), and
make kills its child on SIGTERM. A stop signal from the parent process after the first stop
came from elsewhere is such an echo, and is ignored. Any other repeat is a second stop, which
means "at once".

Only Linux tells who sent a signal to a program that waits for it: there the stop signals are
blocked in every thread from the start (`block()`, before any thread exists) and one thread
takes them, with their sender (sigwaitinfo). Elsewhere they are plain handlers, and every
repeat counts as a second stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from types import FrameType

log = logging.getLogger(__name__)

STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})
# Where a waiting thread learns the sender of each signal (sigwaitinfo).
SENDER_KNOWN = sys.platform.startswith("linux")
OnStop = Callable[[int, bool], None]


class StopSignals:
    """Tells `on_stop(signum, at_once)`, on the event loop, of the first stop (at_once False)
    and of any second one (True); echoes are dropped."""

    def __init__(self) -> None:
        self.first: int | None = None
        self._first_sender: int | None = None
        self._blocked = False
        self._reader: threading.Thread | None = None
        self._target: tuple[asyncio.AbstractEventLoop, OnStop] | None = None

    def block(self) -> None:
        """Hold the stop signals for the thread that reads them (Linux). Call it before any
        thread starts: threads inherit the mask of the thread that made them."""
        if SENDER_KNOWN and not self._blocked:
            signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
            self._blocked = True

    @contextlib.contextmanager
    def delivered(self, loop: asyncio.AbstractEventLoop, on_stop: OnStop) -> Iterator[None]:
        """While inside, stop signals go to `on_stop` on `loop` (one held since `block()`
        first); after, they are dropped (the process is ending)."""
        previous = {}
        self._target = (loop, on_stop)
        if not self._blocked:
            previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        elif self._reader is None:
            self._reader = threading.Thread(target=self._read, name="stop signals", daemon=True)
            self._reader.start()
        try:
            yield
        finally:
            self._target = None
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def end_as(self, signum: int) -> None:
        """End the process as killed by `signum` (what a service manager expects of SIGTERM),
        the signal's default action restored and the signal unblocked in this thread."""
        signal.signal(signum, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signum})
        signal.raise_signal(signum)

    def _read(self) -> None:
        while True:
            info = signal.sigwaitinfo(STOP_SIGNALS)
            self._relay(info.si_signo, info.si_pid)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self._relay(signum, None)

    def _relay(self, signum: int, sender: int | None) -> None:
        target = self._target
        if target is None:
            return
        loop, on_stop = target
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(self._received, signum, sender, on_stop)

    def _received(self, signum: int, sender: int | None, on_stop: OnStop) -> None:
        if self.first is None:
            self.first, self._first_sender = signum, sender
            on_stop(signum, False)
            return
        parent = os.getppid()
        if sender == parent and self._first_sender != parent:
            log.debug("%s passed on by the parent process: already stopping", _name(signum))
            return
        on_stop(signum, True)


def _name(signum: int) -> str:
    return signal.Signals(signum).name

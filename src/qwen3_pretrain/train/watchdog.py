"""`--hang-timeout-minutes M`: a rank on which no training iteration completes for M minutes prints the Python
stack of every one of its threads to stderr and exits with code 124 (as `timeout(1)` does), so a hung collective,
data read or save ends the job, showing where it hung, instead of waiting out the distributed timeout or forever.

A watchdog thread does this while the interpreter runs; when a C call holds the interpreter lock for good,
`faulthandler`'s own thread dumps the stacks and exits (code 1) half a minute later.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import tempfile
import threading
import time

HANG_EXIT_CODE = 124
INTERPRETER_STUCK_GRACE_S = 30.0  # faulthandler's fallback fires this long after the watchdog thread should have


class HangWatchdog:
    """Fires when `beat()` was not called for `minutes` between `start()` and `stop()`; None: does nothing."""

    def __init__(self, minutes: float | None, rank: int) -> None:
        self.seconds = None if minutes is None else minutes * 60.0
        self.rank = rank
        self._last_beat = time.monotonic()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.seconds is None:
            return
        self.beat()
        self._thread = threading.Thread(target=self._watch, args=(self.seconds,), name="hang-watchdog", daemon=True)
        self._thread.start()

    def beat(self) -> None:
        """An iteration completed: the next one has `minutes` from now."""
        if self.seconds is None:
            return
        self._last_beat = time.monotonic()
        faulthandler.dump_traceback_later(self.seconds + INTERPRETER_STUCK_GRACE_S, exit=True)

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stopped.set()
        self._thread.join()
        faulthandler.cancel_dump_traceback_later()

    def _watch(self, seconds: float) -> None:
        while not self._stopped.wait(max(self._last_beat + seconds - time.monotonic(), 0.0)):
            if time.monotonic() - self._last_beat >= seconds:
                self._fire(seconds / 60.0)

    def _fire(self, minutes: float) -> None:
        """Print the header and every thread's stack in one write (ranks share a terminal), then exit."""
        header = (
            f"rank {self.rank}: no training iteration completed in {minutes:g} minutes (--hang-timeout-minutes "
            f"{minutes:g}); the Python stack of every thread of this process follows, then it exits with code "
            f"{HANG_EXIT_CODE}\n"
        )
        with tempfile.TemporaryFile() as dump:
            faulthandler.dump_traceback(file=dump, all_threads=True)
            dump.seek(0)
            text = header.encode() + dump.read()
        sys.stderr.flush()
        while text:
            text = text[os.write(sys.stderr.fileno(), text):]
        os._exit(HANG_EXIT_CODE)

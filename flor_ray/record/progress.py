"""A one-line progress display while recording, for scripts that print nothing.

Shown only on a terminal (stderr is a TTY), never in replay mode, and off with
``FLOR_PROGRESS=0``. The line is drawn by a daemon thread once a second, and only
after the script itself has been silent for a second: the session taps
``sys.stdout``/``sys.stderr`` so that the line is cleared before any output of the
script, which therefore never interleaves with it.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any, Callable

__all__ = ["Progress", "wanted", "describe"]

CLEAR = "\r\x1b[K"


def wanted() -> bool:
    if os.environ.get("FLOR_PROGRESS", "1") == "0" or os.environ.get("FLOR_REPLAY"):
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class _Tap:
    """A stream that tells the display before each write of the script."""

    def __init__(self, inner: Any, progress: "Progress"):
        self._inner, self._progress = inner, progress

    def write(self, text: str) -> int:
        self._progress.script_wrote()
        return self._inner.write(text)

    def writelines(self, lines) -> None:
        self._progress.script_wrote()
        self._inner.writelines(lines)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class Progress:
    def __init__(self, describe: Callable[[], str], interval: float = 1.0):
        self._describe = describe
        self._interval = interval
        self._lock = threading.Lock()
        self._shown = False
        self._last_output = time.monotonic()
        self._stop = threading.Event()
        self._out = getattr(sys.stderr, "flor_uncaptured", sys.stderr)  # never in the run's captured output
        self._saved = (sys.stdout, sys.stderr)
        sys.stdout, sys.stderr = _Tap(sys.stdout, self), _Tap(sys.stderr, self)
        self._thread = threading.Thread(target=self._run, name="flor-progress", daemon=True)
        self._thread.start()

    def script_wrote(self) -> None:
        with self._lock:
            if self._shown:
                self._out.write(CLEAR)
                self._out.flush()
                self._shown = False
            self._last_output = time.monotonic()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            with self._lock:
                if time.monotonic() - self._last_output < self._interval:
                    continue
                try:
                    text = self._describe()
                except Exception:  # noqa: BLE001 - a display must never break training
                    continue
                self._out.write(CLEAR + text)
                self._out.flush()
                self._shown = True

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        with self._lock:
            if self._shown:
                self._out.write(CLEAR)
                self._out.flush()
                self._shown = False
        if isinstance(sys.stdout, _Tap):
            sys.stdout = self._saved[0]
        if isinstance(sys.stderr, _Tap):
            sys.stderr = self._saved[1]


def describe(run_id: str, frames: list, last: int | None, elapsed: float, outer_s: list[float]) -> str:
    """``flor_ray <run>: epoch 3/10 · step 120/500 · 12s, ~28s left``: each loop of
    ``frames`` (the loop stack's ``[name, iteration, item, length]``; the innermost
    iteration is ``last``), the seconds since the loop began, and the time left by
    the mean of the outer iterations done (``outer_s``)."""
    parts = []
    for k, f in enumerate(frames):
        it = last if k == len(frames) - 1 else f[1]
        total = f"/{f[3]}" if len(f) > 3 and f[3] else ""
        parts.append(f"{f[0]} {max(it, 0) + 1 if it is not None else 0}{total}")
    text = f"flor_ray {run_id}: " + " · ".join(parts) + f" · {elapsed:.0f}s"
    outer = frames[0] if frames else None
    done = len(outer_s)
    if outer is not None and len(outer) > 3 and outer[3] and done:
        left = (outer[3] - done) * (sum(outer_s) / done)
        text += f", ~{left:.0f}s left"
    return text

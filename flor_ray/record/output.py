"""Captured output: what a recording prints, kept with its run.

:class:`OutputCapture` tees ``sys.stdout`` and ``sys.stderr`` (every write goes to the
stream first, unchanged, so the terminal, ``isatty()``, ``encoding`` and ``fileno()``
stay the script's) and wraps ``logging.Logger.callHandlers`` for the ``logging`` records
that no captured stream shows (a handler set up before the capture, a file). Complete lines are buffered with their loop context and
written as one Parquet part per flush (zstd), by the session's synchronous flush at
the end of each outer iteration: a crash, even SIGKILL, loses only the lines printed
since. A carriage return overwrites the line as a terminal would, so a tqdm bar is kept
as its final state, not as one line per redraw.

Only the recording process captures: a process forked from it (a DataLoader worker)
writes through the tee untouched, and a replay runs another session, which installs
none, so a replay never adds to a run's output. Everything here is standard library
until the first flush, which builds the part with pyarrow.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
from typing import Any, Callable

from ..config import OUTPUT_MAX_LINE_CHARS
from ..store import layout
from ..store.logs import MAX_LOOP_DEPTH

__all__ = ["OutputCapture", "start_capture", "loop_context", "STREAMS"]

STREAMS = ("stdout", "stderr", "log")
#: terminal control sequences (colours, erase-line): kept out of the stored text
_CSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")
_ERASE = re.compile(r"\x1b\[[02]?K")
_TOKENS = re.compile(r"(\r|\x1b\[[02]?K)")


def loop_context(runtime: Any) -> tuple[str, tuple]:
    """``(loops, iterations)`` of a :class:`~.loops.LoopRuntime` now: ``("epoch/step", (2, 5))``."""
    stack = runtime._stack
    if not stack:
        return "", ()
    if len(stack) == 1:
        last = runtime._last
        return runtime._loops_str, (None if last is None or last < 0 else last,)
    its = [f[1] for f in stack[:-1]] + [runtime._last]
    return runtime._loops_str, tuple(None if i is None or i < 0 else i for i in its)


def _resolve(text: str) -> str:
    """The line a terminal shows for ``text``: a ``\\r`` moves the cursor to the line's
    start, text overwrites from the cursor, erase-line clears from it, other escape
    sequences (colours) are left out."""
    if "\r" not in text and "\x1b" not in text:
        return text
    shown, cur = "", 0
    for tok in _TOKENS.split(text):
        if not tok:
            continue
        if tok == "\r":
            cur = 0
        elif _ERASE.fullmatch(tok):
            shown = shown[:cur] if tok[-2] != "2" else " " * cur
        else:
            tok = _CSI.sub("", tok)
            shown = shown[:cur] + tok + shown[cur + len(tok):]
            cur += len(tok)
    return shown.rstrip()


def _collapse(pending: str) -> str:
    """A pending line with redraws (a progress bar) as its state so far plus the last
    redraw: it stays one bar long however often it is drawn."""
    i = pending.rfind("\r")
    return _resolve(pending[:i]) + pending[i:] if i > 0 else pending


class _Tee:
    """A text stream that writes to the script's stream, then hands the text to the capture."""

    def __init__(self, inner: Any, capture: "OutputCapture | None", stream: str):
        self._inner, self._capture, self._stream = inner, capture, stream

    @property
    def flor_uncaptured(self) -> Any:
        """The stream itself: flor_ray's own progress line is drawn there, never captured."""
        return self._inner

    def write(self, text: str) -> int:
        n = self._inner.write(text)
        cap = self._capture
        if cap is not None and type(text) is str:
            cap.feed(self._stream, text)
        return n

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _logged_line(logger: logging.Logger, record: logging.LogRecord) -> str | None:
    """The text of a record that its handlers showed somewhere other than a tee; None
    when a tee already captured it or no handler took it (logging's last resort then
    wrote it to ``sys.stderr``, the tee)."""
    shown = None
    node: Any = logger
    while node is not None:
        for h in node.handlers:
            if record.levelno >= h.level:
                if isinstance(h, logging.StreamHandler) and isinstance(h.stream, _Tee):
                    return None
                shown = shown or h
        if not node.propagate:
            break
        node = node.parent
    if shown is None:
        return None
    return shown.format(record)  # as that handler wrote it


class OutputCapture:
    """One recording's printed lines: buffered between flushes, written by :meth:`flush`.

    ``write(rel, data)`` stores a part (the session's spooling writer), ``context()``
    gives the loop context of a line as it completes (see :func:`loop_context`),
    ``max_bytes`` caps the text kept over the whole run.
    """

    def __init__(self, run_id: str, write: Callable[[str, bytes], Any], context: Callable[[], tuple],
                 max_bytes: int):
        self.run_id = run_id
        self._write, self._context, self.max_bytes = write, context, int(max_bytes)
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._pending = {"stdout": "", "stderr": ""}
        self._rows: list[tuple] = []
        self._tees: list[_Tee] = []
        self._call_handlers: Any = None  # logging.Logger.callHandlers, while it is wrapped
        self.lines = 0  # numbered lines, kept or not
        self.kept = 0
        self.kept_bytes = 0
        self.dropped = 0
        self.parts = 0
        self.error: str | None = None

    # ----------------------------------------------------------- install
    def install(self) -> "OutputCapture":
        if sys.stdout is not None:
            sys.stdout = self._tee(sys.stdout, "stdout")
        if sys.stderr is not None:
            sys.stderr = self._tee(sys.stderr, "stderr")
        self._wrap_logging()
        return self

    def _wrap_logging(self) -> None:
        """Capture each record after its handlers ran (see :func:`_logged_line`). A handler
        of our own on the root logger would change the script's logging: basicConfig does
        nothing once the root has a handler, and logging's last resort never runs."""
        original = logging.Logger.callHandlers
        capture = self

        def call_handlers(logger: logging.Logger, record: logging.LogRecord) -> None:
            original(logger, record)
            if os.getpid() != capture._pid or capture._call_handlers is None:
                return
            try:
                text = _logged_line(logger, record)
            except Exception:  # noqa: BLE001 - the handler that formats it reports its own errors
                return
            if text is not None:
                for line in text.split("\n"):
                    capture.add("log", line)

        call_handlers.flor_original = original  # type: ignore[attr-defined]
        self._call_handlers = call_handlers
        logging.Logger.callHandlers = call_handlers  # type: ignore[method-assign]

    def _tee(self, stream: Any, name: str) -> _Tee:
        tee = _Tee(stream, self, name)
        self._tees.append(tee)
        return tee

    def uninstall(self) -> None:
        """Stop capturing; a stream the script replaced since keeps writing, uncaptured."""
        for tee in self._tees:
            tee._capture = None
        if sys.stdout in self._tees:
            sys.stdout = sys.stdout._inner
        if sys.stderr in self._tees:
            sys.stderr = sys.stderr._inner
        wrapped, self._call_handlers = self._call_handlers, None
        if wrapped is not None and logging.Logger.callHandlers is wrapped:
            logging.Logger.callHandlers = wrapped.flor_original  # type: ignore[attr-defined]

    # ----------------------------------------------------------- capture
    def feed(self, stream: str, text: str) -> None:
        """Text written to ``stream``: its complete lines are added, the rest kept pending."""
        if os.getpid() != self._pid:  # a forked child (DataLoader worker): never flushed
            return
        try:
            with self._lock:
                buf = self._pending[stream] + text
                if "\n" in buf:
                    *done, buf = buf.split("\n")
                    for line in done:
                        self._add_locked(stream, _resolve(line[:-1] if line.endswith("\r") else line))
                if buf.count("\r") > 1:
                    buf = _collapse(buf)
                while len(buf) > OUTPUT_MAX_LINE_CHARS:
                    self._add_locked(stream, buf[:OUTPUT_MAX_LINE_CHARS])
                    buf = buf[OUTPUT_MAX_LINE_CHARS:]
                self._pending[stream] = buf
        except Exception as exc:  # noqa: BLE001 - a print of the script must never fail here
            self.error = self.error or f"{type(exc).__name__}: {exc}"

    def add(self, stream: str, text: str) -> None:
        """One complete line (a logging record's)."""
        if os.getpid() != self._pid:
            return
        with self._lock:
            self._add_locked(stream, _resolve(text))

    def _add_locked(self, stream: str, text: str) -> None:
        self.lines += 1
        size = len(text) if text.isascii() else len(text.encode("utf-8", "replace"))
        if self.kept_bytes + size > self.max_bytes:
            self.dropped += 1
            return
        self.kept += 1
        self.kept_bytes += size
        loops, its = self._context()
        self._rows.append((stream, self.lines, time.time(), loops, its, text))

    # ------------------------------------------------------------- write
    def flush(self, final: bool = False) -> None:
        """Write the lines completed since the last flush (``final``: the pending ones too)."""
        with self._flush_lock:
            with self._lock:
                if final:
                    for stream, buf in self._pending.items():
                        if _resolve(buf).strip():
                            self._add_locked(stream, _resolve(buf))
                        self._pending[stream] = ""
                rows, self._rows = self._rows, []
            if not rows:
                return
            rel = layout.output_part(self.run_id, self.parts)
            self.parts += 1
            self._write(rel, _to_parquet(self.run_id, rows))

    def close(self) -> None:
        """The last flush, then the streams and logging as they were."""
        try:
            self.flush(final=True)
        finally:
            self.uninstall()

    def summary(self) -> dict:
        """For the run's metadata: what was captured and what the cap left out."""
        out = {"lines": self.lines, "kept_lines": self.kept, "kept_bytes": self.kept_bytes,
               "dropped_lines": self.dropped, "max_bytes": self.max_bytes, "parts": self.parts}
        if self.error:
            out["error"] = self.error
        return out


def _to_parquet(run_id: str, rows: list[tuple]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pad = (None,) * MAX_LOOP_DEPTH
    iters = list(zip(*[(r[4] + pad)[:MAX_LOOP_DEPTH] for r in rows]))
    table = pa.table({
        "run_id": pa.array([run_id] * len(rows), pa.string()),
        "stream": pa.array([r[0] for r in rows], pa.string()),
        "line": pa.array([r[1] for r in rows], pa.int64()),
        "time": pa.array([int(r[2] * 1e6) for r in rows], pa.timestamp("us", tz="UTC")),
        "loops": pa.array([r[3] for r in rows], pa.string()),
        **{f"iter{k}": pa.array(list(iters[k]), pa.int64()) for k in range(MAX_LOOP_DEPTH)},
        "text": pa.array([r[5] for r in rows], pa.string()),
    })
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def start_capture(session: Any) -> OutputCapture | None:
    """The capture of a recording session that just started; None when turned off
    (``output_max_bytes`` 0, ``FLOR_OUTPUT_MAX_BYTES=0``)."""
    limit = session.settings.output_max_bytes
    if limit <= 0:
        return None
    cap = OutputCapture(session.run_id, lambda rel, data: session._spool.write(rel, data),
                        lambda: loop_context(session), limit)
    return cap.install()

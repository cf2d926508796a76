"""A background writer: one thread, FIFO, errors kept for the owner to report."""

from __future__ import annotations

import queue
import threading
import traceback
from typing import Any, Callable

__all__ = ["BackgroundWriter"]


class BackgroundWriter:
    """Runs submitted jobs in order on one daemon thread.

    Checkpoint serialisation and uploads go here so that training does not wait
    for the store. :meth:`drain` blocks until every job submitted so far is done;
    the session calls it at exit, so nothing submitted is lost on a normal exit.
    """

    def __init__(self, name: str = "flor-writer"):
        self._q: "queue.Queue[tuple[Callable[..., Any], tuple] | None]" = queue.Queue()
        self._name = name
        self._thread: threading.Thread | None = None
        self.errors: list[str] = []

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name=self._name, daemon=True)
            self._thread.start()
        self._q.put((fn, args))

    def _work(self) -> None:
        while True:
            job = self._q.get()
            try:
                if job is None:
                    return
                fn, args = job
                fn(*args)
            except BaseException:  # reported by the owner, never lost
                self.errors.append(traceback.format_exc())
            finally:
                self._q.task_done()

    def drain(self) -> None:
        if self._thread is not None:
            self._q.join()

    def close(self) -> None:
        if self._thread is not None:
            self._q.put(None)
            self._thread.join()
            self._thread = None

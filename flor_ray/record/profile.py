"""The recording session's hooks seam, and the one hooks object: where a recording
spends its time, ``FLOR_PROFILE=<file.json>`` (or ``=1`` for stderr).

``RecordSession(hooks=...)`` hands the session's verbs, steps, loop generators and
background jobs to :class:`RecordHooks` once, when the session is made; each hook
returns what the session then calls. The defaults return what they are given, and a
session made without hooks wraps nothing, so an unprofiled run executes exactly the
code it would without this module. The facade picks the hooks (``FLOR_PROFILE``).

On, it accounts, with ``time.perf_counter_ns``:

- on the training thread, the time inside each flor call: ``start`` (first verb:
  store, git snapshot, first metadata; its parts in ``start_parts``), ``log``,
  ``loop`` (inside the loop generators, hooks included), the hooks
  ``capture`` / ``submit`` / ``flush_rows`` / ``write_meta``, ``checkpointing``
  (enter and exit) and ``finish`` (the exit flush, ``drain`` = waiting for the writer);
- on the background writer, the CPU time (``time.thread_time``) and wall time of
  each job, by job name: this thread competes with training for cores and the GIL.

``main_s`` sums the verbs (``arg``, ``log``, ``loop``, ``checkpointing``, ``commit``,
``finish``): ``start`` and the hooks are parts of them;
``writer_cpu_s`` the writer's CPU. The wrappers add about 0.2 us per ``log`` call,
which is itself not counted.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Any, Callable

__all__ = ["RecordHooks", "Profile", "hooks_from_environment", "wanted"]

ENV = "FLOR_PROFILE"

_pc = time.perf_counter_ns
VERBS = ("arg", "log", "loop", "checkpointing", "commit", "finish")


def wanted() -> str | None:
    v = os.environ.get(ENV, "")
    return v if v and v != "0" else None


class RecordHooks:
    """What a recording session lets an observer wrap; these defaults wrap nothing."""

    def wrap(self, key: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """A verb or a step of the session (``key`` names it), run on the training thread."""
        return fn

    def wrap_loop(self, key: str, gen: Any) -> Any:
        """A ``flor.loop`` generator, as the script iterates it."""
        return gen

    def wrap_context(self, key: str, cm: Any) -> Any:
        """A context manager (``flor.checkpointing``), entered and exited by the script."""
        return cm

    def wrap_job(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """A job for the background writer, run on the writer's thread."""
        return fn

    def finished(self, session: Any) -> None:
        """The session's ``finish`` returned (or raised)."""


class _TimedContext:
    def __init__(self, prof: "Profile", key: str, cm: Any):
        self.prof, self.key, self.cm = prof, key, cm

    def __enter__(self) -> Any:
        tt = _pc()
        try:
            return self.cm.__enter__()
        finally:
            self.prof.add(self.key, _pc() - tt)

    def __exit__(self, *exc: Any) -> Any:
        tt = _pc()
        try:
            return self.cm.__exit__(*exc)
        finally:
            self.prof.add(self.key, _pc() - tt)


class Profile(RecordHooks):
    """Time accounting of each hooked call, written when the session finishes."""

    def __init__(self, target: str):
        self.target = target
        self.ns: dict[str, int] = {}
        self.calls: dict[str, int] = {}
        self.writer: dict[str, dict[str, float]] = {}
        self.start_parts: dict[str, float] = {}
        self._wlock = threading.Lock()

    def add(self, key: str, ns: int) -> None:
        self.ns[key] = self.ns.get(key, 0) + ns
        self.calls[key] = self.calls.get(key, 0) + 1

    def timed(self, key: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        add = self.add

        def wrapper(*a: Any, **k: Any) -> Any:
            t = _pc()
            try:
                return fn(*a, **k)
            finally:
                add(key, _pc() - t)

        return wrapper

    def timed_gen(self, key: str, gen: Any) -> Any:
        """A generator that forwards ``gen`` and counts the time spent inside it."""
        ns, calls = self.ns, self.calls
        ns.setdefault(key, 0)
        calls.setdefault(key, 0)
        try:
            while True:
                t = _pc()
                try:
                    item = next(gen)
                except StopIteration:
                    return
                finally:
                    ns[key] += _pc() - t
                    calls[key] += 1
                yield item
        finally:  # break / exception in the loop body: close the inner generator, timed
            t = _pc()
            gen.close()
            ns[key] += _pc() - t

    wrap = timed

    def wrap_loop(self, key: str, gen: Any) -> Any:
        return self.timed_gen(key, gen)

    def wrap_context(self, key: str, cm: Any) -> Any:
        return _TimedContext(self, key, cm)

    def wrap_job(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        return self.writer_job(fn)

    def finished(self, session: Any) -> None:
        if getattr(session, "started", False):
            self.start_parts = dict(getattr(session, "_start_parts", {}))
            self.write()

    def writer_job(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        name = getattr(fn, "__name__", type(fn).__name__)

        def job(*a: Any) -> Any:
            c, t = time.thread_time(), time.perf_counter()
            try:
                return fn(*a)
            finally:
                c, t = time.thread_time() - c, time.perf_counter() - t
                with self._wlock:
                    e = self.writer.setdefault(name, {"jobs": 0, "cpu_s": 0.0, "wall_s": 0.0})
                    e["jobs"] += 1
                    e["cpu_s"] += c
                    e["wall_s"] += t

        return job

    def report(self) -> dict:
        s = {k: v / 1e9 for k, v in self.ns.items()}
        # the verbs the script calls; `start` and the hooks are parts of them
        main = sum(s.get(k, 0.0) for k in VERBS)
        return {
            "main_s": main,
            "main": s,
            "calls": dict(self.calls),
            "start_parts": dict(self.start_parts),
            "writer": self.writer,
            "writer_cpu_s": sum(e["cpu_s"] for e in self.writer.values()),
            "writer_wall_s": sum(e["wall_s"] for e in self.writer.values()),
        }

    def write(self) -> None:
        rep = self.report()
        if self.target == "1":
            sys.stderr.write("FLOR_PROFILE " + json.dumps(rep) + "\n")
        else:
            with open(self.target, "w") as f:
                json.dump(rep, f, indent=1)


def hooks_from_environment() -> "Profile | None":
    """The hooks ``FLOR_PROFILE`` asks for (read by the facade when it makes the session)."""
    target = wanted()
    return Profile(target) if target else None

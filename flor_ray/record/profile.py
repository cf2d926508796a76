"""Where a recording spends its time: ``FLOR_PROFILE=<file.json>`` (or ``=1`` for stderr).

Off by default and free when off: the session checks the variable once, when it is
made, and only then wraps its own methods (instance attributes shadowing the class's),
so an unprofiled run executes exactly the code it would without this module.

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

__all__ = ["Profile", "install", "wanted"]

ENV = "FLOR_PROFILE"

_pc = time.perf_counter_ns
VERBS = ("arg", "log", "loop", "checkpointing", "commit", "finish")


def wanted() -> str | None:
    v = os.environ.get(ENV, "")
    return v if v and v != "0" else None


class Profile:
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


def install(session: Any, target: str) -> Profile:
    """Wrap ``session``'s methods (instance attributes) with the accounting."""
    prof = Profile(target)
    cls = type(session)
    t = prof.timed
    for key, meth in (
        ("start", "start"),
        ("capture", "_capture"),
        ("submit", "_submit_checkpoint"),
        ("flush_rows", "_flush_rows_only"),
        ("write_meta", "_write_meta"),
        ("commit", "commit"),
        ("arg", "arg"),
    ):
        setattr(session, meth, t(key, getattr(session, meth)))

    slow_log = t("log", cls.log.__get__(session))
    fast = cls.fast_log.fget(session)  # type: ignore[attr-defined]
    timed_fast = t("log", fast)
    session.log = slow_log
    # the facade rebinds flor.log to `fast_log` after the first call: keep it timed
    session.__dict__["_profiled_fast_log"] = timed_fast
    type_name = f"Profiled{cls.__name__}"
    session.__class__ = type(type_name, (cls,), {"fast_log": property(lambda self: self._profiled_fast_log)})

    loop = session.loop

    def timed_loop(name: str, iterable: Any) -> Any:
        tt = _pc()
        gen = loop(name, iterable)
        prof.add("loop", _pc() - tt)
        return prof.timed_gen("loop", gen)

    session.loop = timed_loop

    ckpt = session.checkpointing

    class _TimedCM:
        def __init__(self, cm: Any):
            self.cm = cm

        def __enter__(self) -> Any:
            tt = _pc()
            try:
                return self.cm.__enter__()
            finally:
                prof.add("checkpointing", _pc() - tt)

        def __exit__(self, *exc: Any) -> Any:
            tt = _pc()
            try:
                return self.cm.__exit__(*exc)
            finally:
                prof.add("checkpointing", _pc() - tt)

    session.checkpointing = lambda **objects: _TimedCM(ckpt(**objects))

    finish = session.finish

    def timed_finish() -> None:
        tt = _pc()
        try:
            finish()
        finally:
            prof.add("finish", _pc() - tt)
            if getattr(session, "started", False):
                prof.start_parts = dict(getattr(session, "_start_parts", {}))
                prof.write()

    session.finish = timed_finish
    drain = session.writer.drain
    session.writer.drain = t("drain", drain)
    submit = session.writer.submit
    session.writer.submit = lambda fn, *a: submit(prof.writer_job(fn), *a)
    return prof

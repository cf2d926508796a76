"""``flor.loop``'s machinery, shared by recording and replay.

:class:`LoopRuntime` owns the loop stack and its contexts and the row buffers that
``flor.log`` appends to. Its loop generators call hooks at each outer iteration's
begin and end, at the outer loop's exit and around each inner loop; the recording
session (:mod:`.session`) and the replay session (``execution.worker``) override
them, and this class's own hooks do nothing.
"""

from __future__ import annotations

import collections.abc as _abc
import sys
import time
from typing import Any, Iterable, Iterator

from ..errors import InvalidNameError, LoopError
from ..store.logs import MAX_LOOP_DEPTH
from ..store.values import INT64_MAX, INT64_MIN, convert
from .names import check_name
from .steps import Iteration, ended_by_exit

__all__ = ["LoopRuntime"]


class LoopRuntime:
    """Loop contexts and row buffers, shared by recording and replay."""

    def __init__(self) -> None:
        self._stack: list[list] = []  # frames: [name, iteration, item]
        self._loops_str = ""
        # Row buffers. A row's loop context is its prefix (loop names, the iterations
        # and items of the enclosing loops: constant while the innermost loop runs)
        # plus the innermost iteration. So a log costs four appends, and a context
        # object is built once per loop entry, not once per iteration.
        self._prefixes: list[tuple] = []
        self._prefix_id = -1  # current prefix id; -1 = not built yet
        self._last: int | None = None  # innermost iteration number
        self._last_item: Any = None  # innermost item, when not the iteration number
        self._r_prefix: list[int] = []
        self._r_last: list[int | None] = []
        self._r_item: list[tuple[int, Any]] = []
        self._names: list[str] = []
        self._values: list[Any] = []
        self._valid_names: set[str] = set()
        self._loop_names: set[str] = set()
        self._seq = 0
        self._outer_name: str | None = None
        self._outer_started = False
        self._outer_steps = False  # the outer loop is made of flor.iteration blocks
        self._iter_counts: dict[tuple, int] = {}  # flor.iteration numbers, per name and enclosing context
        self._checkpoint_objects: dict[str, Any] | None = None
        #: the user's frame that iterates the outer loop: checkpoints capture its
        #: loop-carried values, replays write them back (see carried.py)
        self._scope_frame: Any = None

    # ------------------------------------------------------------------- log
    def log(self, name: str, value: Any) -> Any:
        if name not in self._valid_names:
            self._check_log_name(name)
        t = value.__class__
        v = value
        if t is float or t is str or t is bool:
            pass
        elif t is int:
            if not INT64_MIN <= value <= INT64_MAX:
                v = convert(name, value)
        else:
            v = convert(name, value)
        prefix_id = self._prefix_id
        if prefix_id < 0:
            prefix_id = self._new_prefix()
        if self._last_item is not None:
            self._r_item.append((len(self._names), self._last_item))
        self._r_prefix.append(prefix_id)
        self._r_last.append(self._last)
        self._names.append(name)
        self._values.append(v)
        return value

    def _check_log_name(self, name: str) -> None:
        check_name("log", name)
        if name in self._loop_names:
            raise InvalidNameError("log", name, f"it is also the name of a flor.loop, whose iteration is a column "
                                   f"{name!r} of dataframe(); name the value differently, e.g. {name + '_value'!r}")
        self._valid_names.add(name)

    @property
    def fast_log(self):
        """The bound log method itself (the facade rebinds ``flor_ray.log`` to it)."""
        return LoopRuntime.log.__get__(self)

    def _new_prefix(self) -> int:
        st = self._stack
        enclosing = st[:-1]
        items = None
        if any(f[2] is not None for f in enclosing):
            items = tuple(f[2] for f in enclosing)
        self._prefixes.append((self._loops_str, tuple(f[1] for f in enclosing), items, len(st)))
        self._prefix_id = len(self._prefixes) - 1
        return self._prefix_id

    def take_rows(self) -> dict | None:
        """Hand over the buffered rows (and reset the buffers), or None if empty."""
        if not self._names:
            return None
        rows = {
            "prefixes": self._prefixes,
            "prefix_ids": self._r_prefix,
            "lasts": self._r_last,
            "items": self._r_item,
            "names": self._names,
            "values": self._values,
            "seq_start": self._seq,
        }
        self._seq += len(self._names)
        self._prefixes, self._r_prefix, self._r_last, self._r_item = [], [], [], []
        self._names, self._values = [], []
        self._prefix_id = -1
        return rows

    # ------------------------------------------------------------------ loop
    def loop(self, name: str, iterable: Iterable[Any]) -> Iterator[Any]:
        check_name("loop", name)
        # iter() is deferred to the generator's start: a skipped loop in replay never
        # builds its iterator (a DataLoader would start workers and draw RNG for nothing)
        if not (isinstance(iterable, _abc.Iterable) or hasattr(type(iterable), "__getitem__")):
            raise LoopError(
                f"flor.loop({name!r}, ...) needs an iterable (a range, list, DataLoader...), "
                f"got {type(iterable).__name__}"
            )
        it = iterable
        depth = len(self._stack)
        if depth >= MAX_LOOP_DEPTH:
            raise LoopError(
                f"flor.loop({name!r}) would be nested {depth + 1} deep; the log relation keeps "
                f"{MAX_LOOP_DEPTH} levels: use a plain for loop for the innermost ones"
            )
        if any(f[0] == name for f in self._stack):
            raise LoopError(f"flor.loop({name!r}) is nested inside a loop of the same name; give each level its own name")
        if name in self._valid_names:
            raise LoopError(f"flor.loop({name!r}) has the name of a logged value, and both would be the column "
                            f"{name!r} of dataframe(); give the loop or the value another name")
        if depth == 0 and name == self._outer_name and self._outer_steps:
            raise LoopError(f"flor.loop({name!r}) has the name of the script's flor.iteration step loop; give "
                            f"it its own name, e.g. {name + '_loop'!r}")
        if depth == 0 and name == self._outer_name and self._outer_started:
            raise LoopError(
                f"flor.loop({name!r}) runs a second time at the top level: its iteration numbers would repeat "
                f"(in the rows and the checkpoints); give the second loop its own name, e.g. {name + '2'!r}"
            )
        self._loop_names.add(name)
        try:
            length = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            length = None
        if depth == 0:
            return self._outer_gen(name, it, length)
        return self._inner_gen(name, it, depth, length)

    def _file_position(self) -> list:
        """Where the script is, as a recording and its replays both see it (the files it
        reads back are kept by it, :mod:`flor_ray.record.own_files`): in a top-level
        loop's iteration, or before or after the outer loop."""
        st = self._stack
        if st:
            return ["loop", st[0][0], self._last if len(st) == 1 else st[0][1]]
        return ["after" if self._outer_started else "setup", None, None]

    def _push(self, name: str, length: int | None = None) -> list:
        if self._stack:  # the enclosing loop's position becomes part of the prefix
            top = self._stack[-1]
            top[1], top[2] = self._last, self._last_item
        frame = [name, -1, None, length]
        self._stack.append(frame)
        self._loops_str = "/".join(f[0] for f in self._stack)
        self._prefix_id = -1
        self._last, self._last_item = None, None
        return frame

    def _pop(self) -> None:
        self._stack.pop()
        self._loops_str = "/".join(f[0] for f in self._stack)
        self._prefix_id = -1
        if self._stack:
            top = self._stack[-1]
            self._last, self._last_item = top[1], top[2]
        else:
            self._last, self._last_item = None, None

    def _inner_gen(self, name: str, it: Iterable[Any], depth: int, length: int | None = None) -> Iterator[Any]:
        if self._inner_skipped(name, depth):
            self._inner_done(name, depth, 0, 0.0, skipped=True)
            return
        frame = self._push(name, length)
        t0 = time.perf_counter()
        i = -1
        try:
            if type(it) is range and it.start == 0 and it.step == 1:
                # the common `range(n)`: items are the iteration numbers, nothing to keep
                for i in it:
                    self._last = i
                    yield i
            else:
                for item in iter(it):
                    i += 1
                    ti = type(item)
                    self._last = i
                    self._last_item = item if (ti is str or (ti is int and item != i)) else None
                    yield item
        finally:
            self._pop()
            self._inner_done(name, depth, i + 1, time.perf_counter() - t0, skipped=False)

    def _outer_gen(self, name: str, it: Iterable[Any], length: int | None) -> Iterator[Any]:
        if self._outer_name is None:
            self._outer_name = name
        is_outer = self._outer_name == name
        if is_outer:
            self._outer_started = True
        frame = self._push(name, length)
        if is_outer:
            from .carried import scope_frame

            self._scope_frame = scope_frame(sys._getframe(1))  # running: the caller's next() resumed us
        i = -1
        normal = False
        try:
            for item in iter(it):
                i += 1
                if is_outer and not self._outer_begin(i, length):
                    continue
                ti = type(item)
                self._last = i
                self._last_item = item if (ti is str or (ti is int and item != i)) else None
                t0 = time.perf_counter()
                completed = False
                try:
                    yield item
                    completed = True
                except GeneratorExit:  # a `break` keeps this iteration; an exception does not
                    completed = ended_by_exit(sys._getframe(1))
                    raise
                finally:
                    if is_outer:
                        self._outer_end(i, time.perf_counter() - t0, completed)
                if is_outer and self._outer_stop(i):
                    break
            normal = True
        # GeneratorExit (a `break` in the script, or an exception unwinding the
        # script's frame) is not a normal end: a replay cannot stop the script from
        # inside the generator's close
        finally:
            self._pop()
            if is_outer:
                self._scope_frame = None
                self._outer_exit(normal)

    # ------------------------------------------------------------- iteration
    def iteration(self, name: str, idx: Any = None, value: Any = None) -> Iteration:
        """One iteration of a loop the script drives itself (see steps.py)."""
        check_name("loop", name)
        if idx is not None:
            if isinstance(idx, bool) or not hasattr(idx, "__index__"):
                raise LoopError(f"flor.iteration({name!r}, idx, ...) takes the iteration's index as an int "
                                f"(or None), got {type(idx).__name__} {idx!r}; pass e.g. iter_num")
            idx = idx.__index__()
        return Iteration(self, name, idx, None if value is None else str(value))

    def _iteration_enter(self, it: Iteration, frame: Any) -> tuple[bool, int, bool]:
        """(is it an outer iteration, its number, whether its body runs)."""
        name = it.name
        depth = len(self._stack)
        if depth >= MAX_LOOP_DEPTH:
            raise LoopError(f"flor.iteration({name!r}) would be nested {depth + 1} deep; the log relation keeps "
                            f"{MAX_LOOP_DEPTH} levels")
        if any(f[0] == name for f in self._stack):
            raise LoopError(f"flor.iteration({name!r}) is nested inside a loop of the same name; give each level "
                            "its own name")
        if name in self._valid_names:
            raise LoopError(f"flor.iteration({name!r}) has the name of a logged value, and both would be the column "
                            f"{name!r} of dataframe(); give the loop or the value another name")
        outer = False
        if depth == 0:
            if self._outer_name is None:
                self._outer_name, self._outer_steps = name, True
            elif self._outer_name == name and not self._outer_steps:
                raise LoopError(f"flor.iteration({name!r}) has the name of the script's outer flor.loop; give "
                                f"the step loop its own name, e.g. {name + '_step'!r}")
            outer = self._outer_name == name
            key: tuple = (name,)
        else:
            key = (name, tuple((f[0], self._last if k == depth - 1 else f[1]) for k, f in enumerate(self._stack)))
        self._loop_names.add(name)
        i = self._iter_counts.get(key, -1) + 1
        self._iter_counts[key] = i
        it._i = i
        run = True
        if outer:
            self._outer_started = True
            from .carried import scope_frame

            self._scope_frame = scope_frame(frame)
            run = self._outer_begin(i, None)
        self._push(name)
        self._last, self._last_item = i, it.item()
        return outer, i, run

    def _iteration_exit(self, it: Iteration, seconds: float, skipped: bool, completed: bool) -> None:
        i = it._i
        if it._outer and not skipped:
            self._outer_end(i, seconds, completed)
        self._pop()
        if it._outer:
            self._iteration_done(i, completed and not skipped)

    # hooks, overridden by the sessions
    def _iteration_done(self, i: int, completed: bool) -> None:
        pass

    def _outer_begin(self, i: int, length: int | None) -> bool:
        return True

    def _outer_end(self, i: int, seconds: float, completed: bool) -> None:
        pass

    def _outer_stop(self, i: int) -> bool:
        return False

    def _outer_exit(self, normal: bool) -> None:
        pass

    def _inner_skipped(self, name: str, depth: int) -> bool:
        return False

    def _inner_done(self, name: str, depth: int, n: int, seconds: float, skipped: bool) -> None:
        pass


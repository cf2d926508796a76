"""Step loops: ``with flor.iteration(name, idx, value):`` and loops ended by ``break``.

A GPT-style training script drives its own loop (``while True:`` ... ``iter_num += 1``
... ``if iter_num > max_iters: break``), so there is no iterable to hand to
``flor.loop``. FlorDB's answer, kept here with its name and signature, is a context
manager around one iteration's body::

    while True:
        with flor.iteration("step", iter_num):
            ...                       # logs here get the context step=<n>
        iter_num += 1
        if iter_num > max_iters:
            break

Its iterations are numbered 0, 1, 2 ... in the order the script enters them, like a
``flor.loop``'s (checkpoints, the planner and ``dataframe``'s loop column use that
number); ``idx`` (or ``value``) is kept as the row's loop item where it differs. At the
top level each iteration is an outer iteration: the run counts it, the checkpoint
policy may checkpoint at its end, and a replay restores there. Nested in another loop
an iteration only gives its logs their context.

A replay must not run the bodies of iterations before its segment, but a context
manager cannot skip its body by itself. :func:`skip_body` makes it do so: it arms a
trace function on the script's frame that raises :class:`SkipBody` at the frame's next
instruction, inside the ``with`` statement, so the iteration's ``__exit__`` receives it
and suppresses it; the script then goes on after the block (``iter_num += 1`` still
runs). This is the mechanism debuggers use to stop in a running frame (CPython's
``f_trace`` with opcode events); a tracer already installed (a debugger, coverage) is
put back at ``__exit__``.

:func:`ended_by_exit` tells a ``break`` (or ``return``) out of a ``for`` loop over a
``flor.loop`` from an exception unwinding it: both close the generator with
``GeneratorExit``, but only a jump out of the loop pops the iterator with a
``POP_TOP`` in the script's frame; an exception leaves that frame's last instruction
at the one that raised.
"""

from __future__ import annotations

import opcode
import sys
import time
import types
from typing import Any

__all__ = ["Iteration", "SkipBody", "ended_by_exit", "skip_body"]

_POP_TOP = opcode.opmap["POP_TOP"]


class SkipBody(Exception):
    """Raised at the first instruction of an iteration body that a replay skips."""


def ended_by_exit(frame: types.FrameType | None) -> bool:
    """Whether the frame that closed a loop's generator did so by jumping out of the
    loop (``break``/``return``), not by unwinding an exception."""
    if frame is None:
        return False
    code = frame.f_code.co_code
    lasti = frame.f_lasti
    return 0 <= lasti < len(code) and code[lasti] == _POP_TOP


class _Armed:
    """The trace state :func:`skip_body` replaced, to be put back at ``__exit__``."""

    __slots__ = ("frame", "prev_global", "prev_local", "prev_opcodes")

    def __init__(self, frame: types.FrameType) -> None:
        self.frame = frame
        self.prev_global = sys.gettrace()
        self.prev_local = frame.f_trace
        self.prev_opcodes = frame.f_trace_opcodes

    def disarm(self) -> None:
        f = self.frame
        f.f_trace = self.prev_local
        f.f_trace_opcodes = self.prev_opcodes
        sys.settrace(self.prev_global)


def _raise_skip(frame: types.FrameType, event: str, arg: Any):
    raise SkipBody


def _no_trace(frame: types.FrameType, event: str, arg: Any):
    return None  # frames called from the body (none run) get no local tracer


def skip_body(frame: types.FrameType) -> _Armed:
    """Make ``frame`` raise :class:`SkipBody` at its next instruction."""
    armed = _Armed(frame)
    sys.settrace(_no_trace)  # line/opcode events reach a frame's f_trace only while tracing is on
    frame.f_trace = _raise_skip
    frame.f_trace_opcodes = True
    return armed


class Iteration:
    """The context manager ``flor.iteration`` returns (one per iteration)."""

    __slots__ = ("runtime", "name", "idx", "value", "_outer", "_run", "_armed", "_i", "_t0")

    def __init__(self, runtime: Any, name: str, idx: int | None, value: str | None) -> None:
        self.runtime, self.name, self.idx, self.value = runtime, name, idx, value
        self._armed: _Armed | None = None

    def __enter__(self) -> "Iteration":
        frame = sys._getframe(1)
        rt = self.runtime
        self._outer, self._i, self._run = rt._iteration_enter(self, frame)
        if not self._run:
            self._armed = skip_body(frame)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, tp, val, tb) -> bool:
        armed, self._armed = self._armed, None
        if armed is not None:
            armed.disarm()
        skipped = tp is SkipBody
        self.runtime._iteration_exit(self, time.perf_counter() - self._t0, skipped, completed=tp is None)
        return skipped

    @property
    def iteration(self) -> int:
        """This iteration's number (0, 1, 2 ... in the order the script entered them)."""
        return self._i

    def item(self) -> Any:
        """The loop item kept in the row's context: ``value`` if given, else ``idx``
        where it differs from the iteration number."""
        if self.value is not None:
            return self.value
        if self.idx is not None and self.idx != self._i:
            return self.idx
        return None

"""Replaying one run of a process that recorded several: ``with flor.run():`` blocks.

A process (a notebook's kernel, or a script) that enters ``with flor.run():`` blocks
records one run per block, and one per stretch of flor calls outside them (a
kernel-session run). Each run's metadata says which it was (``block``:
``{"block": k}`` for the k-th block the process entered, ``{"after_blocks": b}`` for
the calls made after b blocks), and its replay runs the whole recorded code: what
came before the run executes as plain Python (flor's verbs pass through, recording
nothing: the earlier blocks' training still happens, as it did in the kernel), the
run's own part under the :class:`~flor_ray.execution.worker.ReplaySession`, and the
replay ends where the run ended.
"""

from __future__ import annotations

import atexit
import sys
from contextlib import nullcontext
from typing import Any, Callable, Iterable, Iterator, Mapping

from .spec import TaskSpec

__all__ = ["PassiveSession", "BlockRouter", "replay_session"]


class PassiveSession:
    """flor's verbs outside the replayed run: values pass through, nothing is kept.
    ``flor.arg`` gives what the recording's process gave: its ``--kwargs``, else the default."""

    def __init__(self, kwargs: Mapping[str, str]):
        self.kwargs = dict(kwargs)

    def log(self, name: str, value: Any) -> Any:
        return value

    @property
    def fast_log(self):
        return self.log

    def arg(self, name: str, default: Any) -> Any:
        from ..record.args import arg_default, cast_arg

        default = arg_default(name, default)
        return cast_arg(name, self.kwargs[name], default) if name in self.kwargs else default

    def loop(self, name: str, iterable: Iterable[Any]) -> Iterator[Any]:
        return iter(iterable)

    def iteration(self, name: str, idx: Any = None, value: Any = None):
        return nullcontext()

    def checkpointing(self, **objects: Any):
        return nullcontext()

    def commit(self) -> None:
        pass


class BlockRouter:
    """The process's flor session in a replay of one of its runs: the replay session
    while the code of that run executes, a :class:`PassiveSession` elsewhere."""

    def __init__(self, block: Mapping[str, Any], make_replay: Callable[[], Any], replay: Any = None):
        self.target = int(block.get("block") or 0)  # 0: the run of calls outside the blocks
        self.after = int(block.get("after_blocks") or 0)
        self.entered = 0
        self.in_block = False
        self._make = make_replay
        self._replay = replay
        self.passive = PassiveSession(block.get("kwargs") or {})
        atexit.register(self._check_reached)

    def _active(self) -> bool:
        if self.target:
            return self.in_block and self.entered == self.target
        return not self.in_block and self.entered == self.after

    def current(self) -> Any:
        if not self._active():
            return self.passive
        if self._replay is None:
            self._replay = self._make()
        return self._replay

    # the verbs, as the facade calls them
    def log(self, name: str, value: Any) -> Any:
        return self.current().log(name, value)

    @property
    def fast_log(self):
        return self.log

    def arg(self, name: str, default: Any) -> Any:
        return self.current().arg(name, default)

    def loop(self, name: str, iterable: Iterable[Any]) -> Iterator[Any]:
        return self.current().loop(name, iterable)

    def iteration(self, name: str, idx: Any = None, value: Any = None):
        return self.current().iteration(name, idx, value)

    def checkpointing(self, **objects: Any):
        return self.current().checkpointing(**objects)

    def commit(self) -> None:
        self.current().commit()

    # the blocks
    def enter_block(self) -> None:
        from ..errors import FlorError

        if self.in_block:
            raise FlorError("`with flor.run():` inside another one; a run cannot hold another run: end the first")
        if not self.target and self.entered == self.after:  # the replayed run ended where this block began
            self._end()
        self.entered += 1
        self.in_block = True

    def exit_block(self) -> None:
        ended = self._active()
        self.in_block = False
        if ended:
            self._end()

    def _end(self) -> None:
        from .worker import SegmentDone

        replay = self._replay or self._make()
        self._replay = replay
        replay.finish()
        raise SegmentDone(0)

    def _check_reached(self) -> None:
        if self._replay is None:
            part = (f"block {self.target} of `with flor.run():`" if self.target
                    else f"the flor calls after block {self.after} of `with flor.run():`")
            sys.stderr.write(f"flor_ray: the replay never reached the recorded run's code ({part}): the cells or "
                             "the script took another path than when it recorded\n")


def replay_session(spec_path: str) -> Any:
    """The session of a replayed process: a :class:`BlockRouter` when the run is one
    of several its process recorded, else the replay session itself."""
    from .worker import ReplaySession

    with open(spec_path) as f:
        spec = TaskSpec.from_json(f.read())
    if spec.block:
        from .. import numerics

        if not numerics.restored():  # the code before the run trains too: with the recording's numerics
            numerics.restore(spec.numerics)
        return BlockRouter(spec.block, lambda: ReplaySession(spec))
    return ReplaySession(spec)

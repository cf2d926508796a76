"""How long a recorded script spends importing modules during its set-up.

A replay task runs in a process forked from a zygote that has torch, numpy and
pyarrow imported already, so the imports a script does before its first outer
iteration (``import torch`` at the top, and the lazy ones: the first optimizer
constructed imports ``torch._dynamo``, seconds on a small machine) are paid once
per worker, not once per task. The cost model needs them apart from the rest of the
set-up (data loading, model building), which every task repeats.

:class:`ImportClock` wraps ``builtins.__import__`` between the first flor call and
the first outer iteration (never during training) and sums the wall time of the
main thread's imports of modules not loaded yet. Imports from other threads (the
background writer's) and nested imports are not counted twice.
"""

from __future__ import annotations

import builtins
import sys
import threading
import time

__all__ = ["ImportClock"]


class ImportClock:
    def __init__(self) -> None:
        self.seconds = 0.0
        #: the imports timed, in order (the modules the main thread loaded)
        self.timed: list[str] = []
        self._orig = None
        self._depth = 0
        self._main = threading.main_thread().ident

    def start(self) -> "ImportClock":
        if self._orig is not None:
            return self
        orig = builtins.__import__
        self._orig = orig
        modules = sys.modules

        def timed(name, globals=None, locals=None, fromlist=(), level=0):
            if (self._depth or threading.get_ident() != self._main
                    or (level == 0 and name in modules and not fromlist)):
                return orig(name, globals, locals, fromlist, level)
            self._depth += 1
            self.timed.append(name)
            t = time.perf_counter()
            try:
                return orig(name, globals, locals, fromlist, level)
            finally:
                self._depth -= 1
                self.seconds += time.perf_counter() - t

        timed._flor_import_clock = True  # type: ignore[attr-defined]
        builtins.__import__ = timed
        return self

    def stop(self) -> float:
        """Unwrap (only if nobody wrapped ``__import__`` after us) and return the total."""
        if self._orig is not None:
            if getattr(builtins.__import__, "_flor_import_clock", False):
                builtins.__import__ = self._orig
            self._orig = None
        return self.seconds

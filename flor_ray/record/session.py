"""The recording runtime behind ``flor.log``, ``flor.arg``, ``flor.loop`` and
``flor.checkpointing``.

:class:`LoopRuntime` owns what recording and replay share: the loop stack and its
contexts, the row buffers and their conversion to Parquet. :class:`RecordSession`
adds the run: its id, code snapshot, args, checkpoints, timings and the runs-table
entry. Nothing happens until the first call of one of the four verbs, so a script
that merely imports flor_ray creates no run.
"""

from __future__ import annotations

import atexit
import collections.abc as _abc
import datetime as _dt
import json
import math
import os
import secrets
import socket
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from ..config import Settings
from ..errors import (
    ArgCastError,
    CheckpointingError,
    FlorError,
    InvalidNameError,
    LoopError,
    RepositoryError,
)
from ..relation import MAX_LOOP_DEPTH
from ..values import INT64_MAX, INT64_MIN, convert
from .steps import Iteration, ended_by_exit
from .writer import BackgroundWriter

__all__ = ["LoopRuntime", "RecordSession", "take_kwargs", "cast_arg", "process_start_time"]

#: the log relation's columns (and SQL's ``value``): a log or loop name among them would
#: shadow the column in ``dataframe`` and ``sql``
RESERVED_NAMES = frozenset({
    "run_id", "version", "source", "file", "loops", "items", "name", "vtype", "value",
    "value_float", "value_int", "value_str", "seq", "task", *(f"iter{d}" for d in range(MAX_LOOP_DEPTH)),
})
MAX_NAME_LEN = 200


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def process_start_time() -> float:
    """Wall-clock start of this process (Linux /proc), for the set-up timing."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:  # 10 ms resolution (/proc/stat's btime has whole seconds)
            uptime = float(f.read().split()[0])
        return time.time() - max(uptime - ticks / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError):
        return time.time()


def _pid_start_ticks() -> int | None:
    try:
        with open("/proc/self/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _kwarg_pair(given: str) -> tuple[str, str]:
    name, eq, value = given.partition("=")
    if not eq or not name.strip():
        from ..errors import KwargsError

        raise KwargsError(given)
    return name, value


def take_kwargs(argv: list[str]) -> dict[str, str]:
    """Remove FlorDB-style ``--kwargs a=1 b=2`` from ``argv`` (in place); return them.

    ``--kwargs`` takes the ``name=value`` words that follow it, up to the next word
    starting with ``-``; a word without ``=`` there, or none at all, is refused
    (it would otherwise be left in argv for the script's own parser to trip on).
    """
    out: dict[str, str] = {}
    i = 0
    while i < len(argv):
        if argv[i] == "--kwargs":
            j = i + 1
            while j < len(argv) and not argv[j].startswith("-"):
                k, v = _kwarg_pair(argv[j])
                out[k] = v
                j += 1
            if j == i + 1:
                from ..errors import KwargsError

                raise KwargsError(argv[j] if j < len(argv) else "")
            del argv[i:j]
        elif argv[i].startswith("--kwargs="):
            k, v = _kwarg_pair(argv[i][len("--kwargs="):])
            out[k] = v
            del argv[i]
        else:
            i += 1
    return out


def arg_default(name: str, default: Any) -> Any:
    """``default`` as a plain int, float, bool, str or None (numpy scalars unwrapped)."""
    if default is None or type(default) in (int, float, bool, str):
        return default
    np = sys.modules.get("numpy")
    if np is not None and isinstance(default, (np.integer, np.floating, np.bool_, np.str_)):
        return default.item()
    from ..errors import ArgDefaultError

    raise ArgDefaultError(name, default)


def cast_arg(name: str, raw: str, default: Any) -> Any:
    t = type(default)
    try:
        if default is None or t is str:
            return raw
        if t is bool:
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on", "t", "y"):
                return True
            if low in ("0", "false", "no", "off", "f", "n"):
                return False
            raise ValueError(raw)
        if t is int:
            return int(raw)
        if t is float:
            return float(raw)
    except ValueError as exc:
        raise ArgCastError(name, raw, default) from exc
    raise ArgCastError(name, raw, default)


def check_name(kind: str, name: Any) -> str:
    if type(name) is not str:
        raise InvalidNameError(kind, name, f"it is a {type(name).__name__}; use a string such as 'loss' or 'epoch'")
    if not name.strip():
        raise InvalidNameError(kind, name, "use a non-empty string such as 'loss' or 'val_acc'")
    if len(name) > MAX_NAME_LEN:
        raise InvalidNameError(kind, f"{name[:40]}...", f"it is {len(name)} characters long; the limit is "
                               f"{MAX_NAME_LEN}: use a shorter name")
    bad = next((c for c in name if c in "/\n\r\t" or not c.isprintable()), None)
    if bad is not None:
        why = ("'/' separates loop names in the relation" if bad == "/"
               else f"it holds the control character {bad!r}, which tables and the command line cannot show")
        raise InvalidNameError(kind, name, f"{why}; use letters, digits, '_', '.' or '-' (e.g. "
                               f"{''.join(c if c.isalnum() else '_' for c in name)!r})")
    if kind in ("log", "loop") and name in RESERVED_NAMES:
        raise InvalidNameError(kind, name, f"{name!r} is a column of the log relation (dataframe and sql would "
                               f"show the column, not your {kind}); pick another name, e.g. {name + '_'!r}")
    return name


def _warm_imports() -> None:
    import pyarrow.parquet  # noqa: F401

    from .. import relation  # noqa: F401
    from . import rows  # noqa: F401


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
        self._pid = -1  # current prefix id; -1 = not built yet
        self._last: int | None = None  # innermost iteration number
        self._last_item: Any = None  # innermost item, when not the iteration number
        self._r_pid: list[int] = []
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
        pid = self._pid
        if pid < 0:
            pid = self._new_prefix()
        if self._last_item is not None:
            self._r_item.append((len(self._names), self._last_item))
        self._r_pid.append(pid)
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
        self._pid = len(self._prefixes) - 1
        return self._pid

    def take_rows(self) -> dict | None:
        """Hand over the buffered rows (and reset the buffers), or None if empty."""
        if not self._names:
            return None
        rows = {
            "prefixes": self._prefixes,
            "pids": self._r_pid,
            "lasts": self._r_last,
            "items": self._r_item,
            "names": self._names,
            "values": self._values,
            "seq_start": self._seq,
        }
        self._seq += len(self._names)
        self._prefixes, self._r_pid, self._r_last, self._r_item = [], [], [], []
        self._names, self._values = [], []
        self._pid = -1
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

    def _push(self, name: str, length: int | None = None) -> list:
        if self._stack:  # the enclosing loop's position becomes part of the prefix
            top = self._stack[-1]
            top[1], top[2] = self._last, self._last_item
        frame = [name, -1, None, length]
        self._stack.append(frame)
        self._loops_str = "/".join(f[0] for f in self._stack)
        self._pid = -1
        self._last, self._last_item = None, None
        return frame

    def _pop(self) -> None:
        self._stack.pop()
        self._loops_str = "/".join(f[0] for f in self._stack)
        self._pid = -1
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


class RecordSession(LoopRuntime):
    """One recording run of one script."""

    def __init__(self, settings: Settings, kwargs: Mapping[str, str] | None = None, argv: list[str] | None = None):
        super().__init__()
        self.settings = settings
        self.kwargs = dict(kwargs or {})
        self.argv = list(sys.argv if argv is None else argv)
        self.started = False
        self.args: dict[str, Any] = {}
        self.writer = BackgroundWriter()
        self._lock = threading.Lock()
        self._t_process = process_start_time()
        self._start_s = max(time.time() - self._t_process, 0.0)  # imports, up to the first flor call
        from .imports import ImportClock

        self._import_clock = ImportClock().start()  # the set-up's imports, until the first iteration
        self._setup_imports_s = 0.0
        self._error: dict | None = None
        self._finished = False
        self._progress = None
        self._t_loop = time.monotonic()
        self._flushes = 0
        self._t_flushed = -math.inf
        # timings for the cost model
        self._setup_s: float | None = None
        self._outer_s: list[float] = []
        self._inner_s: list[float] = []
        self._inner_n: list[int] = []
        self._ckpt_s: list[float] = []  # training thread: capture
        self._ckpt_write_s: list[float] = []  # writer CPU charged to the checkpoint (see _outer_end)
        self._write_cpu_s: float | None = None  # CPU of the last checkpoint write, measured on the writer
        self._t_outer_end: float | None = None
        self._iter_inner_s = 0.0
        self._iter_inner_n = 0
        self._iter_inner_exits = 0
        # checkpoints
        self._in_checkpointing = False
        self._ckpt_due = False
        self._ckpt_period = 1
        self._last_ckpt: int | None = None
        self._pending_snap: dict | None = None
        self._pending_cost = 0.0
        self._manifest: list[dict] = []
        self._ckpt_errors: list[str] = []
        self._start_parts: dict[str, float] = {}
        target = os.environ.get("FLOR_PROFILE", "")
        if target and target != "0":  # wrap this session's methods with time accounting
            from .profile import install

            install(self, target)

    # ----------------------------------------------------------------- start
    def start(self) -> None:
        if self.started:
            return
        self.started = True  # set first: a failure below must not retry on every call
        try:
            self._start()
        except BaseException:
            self.started = False
            snap = getattr(self, "snapshot", None)
            if snap is not None:  # a run that never started leaves no snapshot ref
                from ..versions import discard

                discard(snap)
                self.snapshot = None
            raise

    def _start(self) -> None:
        parts = self._start_parts
        t = time.perf_counter()

        def mark(name: str) -> None:
            nonlocal t
            now = time.perf_counter()
            parts[name] = parts.get(name, 0.0) + now - t
            t = now

        from ..store import Store
        from ..versions import find_repo_root, snapshot, upload

        mark("imports")

        script = self.argv[0] if self.argv else ""
        if not script or not os.path.isfile(script):
            raise RepositoryError(
                f"flor_ray records scripts run as `python path/to/script.py`; sys.argv[0] is {script!r}, "
                "not a file (interactive sessions and `python -c` cannot be replayed)"
            )
        script_path = Path(script).resolve()
        repo_root = find_repo_root(script_path)
        rel_script = script_path.relative_to(repo_root).as_posix()
        mark("repo_root")
        url = self.settings.store or os.path.join(repo_root, ".flor")
        self.store = Store(url, self.settings.storage_options)
        self.store.ensure()
        mark("store")
        self.run_id = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(3)
        from .spool import SpoolingWriter

        self._spool = SpoolingWriter(self.store, self.run_id, self.settings.spool_dir, self.settings.write_retries)
        exclude = []
        if self.store.is_local:
            store_root = Path(self.store.root).resolve()
            if store_root == Path(repo_root) or Path(repo_root) in store_root.parents:
                exclude.append(store_root.relative_to(repo_root).as_posix())
        snap = snapshot(
            repo_root,
            f"refs/flor/{self.run_id}",
            exclude=exclude,
            max_untracked_bytes=self.settings.snapshot_max_file_bytes,
            max_untracked_files=self.settings.snapshot_max_untracked_files,
            max_untracked_total_bytes=self.settings.snapshot_max_untracked_total_bytes,
            message=f"flor_ray run {self.run_id} of {rel_script}",
            list_files=False,  # the writer lists them, off the training thread
        )
        mark("snapshot")
        self.snapshot = snap
        self.version = snap.tree
        self.script = rel_script
        self.meta: dict[str, Any] = {
            "run_id": self.run_id,
            "project": Path(repo_root).name,
            "script": rel_script,
            "version": snap.tree,
            "commit": snap.commit,
            "ref": snap.ref,
            "left_out_of_snapshot": list(snap.left_out),
            "left_out_of_snapshot_count": snap.left_out_count,
            "argv": self.argv[1:],
            "cwd": os.path.relpath(os.getcwd(), repo_root) if os.getcwd().startswith(repo_root) else None,
            "status": "running",
            "started_at": now_iso(),
            "ended_at": None,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pid_start": _pid_start_ticks(),
            "env": self._env(),
            "store_format": 1,
        }
        import numpy  # noqa: F401  # on this thread: the writer's pyarrow import needs it, and a
        # module half-imported by another thread must never be seen by capture_rng / _env
        mark("meta")
        self._write_meta()
        mark("write_meta")
        self.writer.submit(upload, self.store, snap)
        from .carried import install_loader_hook

        install_loader_hook()  # before the set-up makes its DataLoader iterators (when torch is imported)
        self.log = self.fast_log  # type: ignore[method-assign]  # started: skip the check
        atexit.register(self.finish)
        prev = sys.excepthook

        def hook(tp, val, tb):  # record the failure, then let Python report it
            self._error = {
                "type": tp.__name__,
                "message": str(val),
                "traceback": "".join(traceback.format_exception(tp, val, tb))[-8000:],
            }
            prev(tp, val, tb)

        sys.excepthook = hook
        mark("rest")

    def _capture_numerics(self) -> None:
        """The numerics the training loop runs with (see flor_ray.numerics), taken on
        the training thread once the set-up is done: torch is imported by then (it
        may not be at the first flor call) and the script's own thread and precision
        settings are made. Written with the next flush."""
        from .. import numerics

        self.meta["env"]["numerics"] = numerics.capture()

    def _env(self) -> dict:
        import platform

        env = {"python": platform.python_version(), "platform": platform.platform(), "device": "cpu"}
        torch = sys.modules.get("torch")
        if torch is not None:
            env["torch"] = torch.__version__
            try:
                if torch.cuda.is_available() and torch.cuda.is_initialized():
                    env["device"] = "cuda"
                    env["gpu"] = torch.cuda.get_device_name()
            except Exception:
                pass
        np = sys.modules.get("numpy")
        if np is not None:
            env["numpy"] = np.__version__
        return env

    # ------------------------------------------------------------------ verbs
    def log(self, name: str, value: Any) -> Any:
        if not self.started:
            check_name("log", name)  # bad input never creates a run
            convert(name, value)
            self.start()
        return LoopRuntime.log(self, name, value)

    def arg(self, name: str, default: Any) -> Any:
        check_name("arg", name)
        default = arg_default(name, default)
        if name in self.kwargs:
            value = cast_arg(name, self.kwargs[name], default)
        else:
            value = default
        if not self.started:
            self.start()
        if name in self.args:
            return self.args[name]
        self.args[name] = value
        return value

    def loop(self, name: str, iterable: Iterable[Any]) -> Iterator[Any]:
        gen = LoopRuntime.loop(self, name, iterable)
        if not self.started:
            self.start()
        return gen

    def iteration(self, name: str, idx: Any = None, value: Any = None) -> Iteration:
        it = LoopRuntime.iteration(self, name, idx, value)
        if not self.started:
            self.start()
        return it

    @contextmanager
    def checkpointing(self, **objects: Any):
        from .checkpoint import check_objects

        if self._in_checkpointing:
            raise CheckpointingError(
                "flor.checkpointing is already active; use one `with flor.checkpointing(...)` "
                "around the outer loop, listing every object in it"
            )
        check_objects(objects)
        import torch  # noqa: F401  # on the training thread, before the writer serialises anything
        from .carried import install_loader_hook

        install_loader_hook()
        if not self.started:
            self.start()
        self._in_checkpointing = True
        self._checkpoint_objects = dict(objects)
        self.meta["checkpointing"] = sorted(objects)
        try:
            yield self
        finally:
            self._in_checkpointing = False
            self._checkpoint_objects = None

    def commit(self) -> None:
        """Flush now: the rows are in the store when this returns."""
        if self.started:
            self._flush()

    # ----------------------------------------------------------- loop hooks
    def _outer_begin(self, i: int, length: int | None) -> bool:
        now = time.time()
        if self._setup_s is None:
            self._setup_s = now - self._t_process
            # pyarrow.parquet's import (~0.05 s of CPU) for the first flush, on the writer,
            # now rather than at the first flor call: set-up code (imports, data, the
            # first optimizer importing torch._dynamo) holds the GIL and the import would
            # compete with it, while a training loop mostly runs with the GIL released
            self.writer.submit(_warm_imports)
            self._setup_imports_s = self._import_clock.stop()
            self._capture_numerics()
            from .progress import Progress, wanted

            if wanted():
                self._t_loop = time.monotonic()
                self._progress = Progress(self._describe_progress)
        self._iter_inner_s = 0.0
        self._iter_inner_n = 0
        self._iter_inner_exits = 0
        self._pending_snap = None
        self._pending_cost = 0.0
        self._ckpt_due = self._checkpoint_objects is not None and (
            self._last_ckpt is None
            or i - self._last_ckpt >= self._ckpt_period
            or (length is not None and i == length - 1)
        )
        return True

    def _inner_done(self, name: str, depth: int, n: int, seconds: float, skipped: bool) -> None:
        if depth != 1 or self._outer_name is None:
            return
        self._iter_inner_s += seconds
        self._iter_inner_n += n
        self._iter_inner_exits += 1
        if self._ckpt_due and self._checkpoint_objects is not None:
            self._capture(self._last if len(self._stack) == 1 else self._stack[0][1])

    def _capture(self, i: int) -> None:
        from .checkpoint import capture

        t0 = time.perf_counter()
        self._pending_snap = capture(self._checkpoint_objects or {}, i, self._iter_inner_exits, self._scope_frame)
        self._pending_cost += time.perf_counter() - t0

    def _outer_end(self, i: int, seconds: float, completed: bool) -> None:
        ckpt_s = write_s = 0.0
        if completed and self._ckpt_due and self._checkpoint_objects is not None:
            if self._pending_snap is None:
                self._capture(i)
            ckpt_s = self._pending_cost
            self._submit_checkpoint(self._pending_snap)
            self._last_ckpt = i
            # A checkpoint costs its capture here plus its serialisation on the writer,
            # whose CPU competes with training (for cores, and for the GIL while it
            # pickles). This one is not written yet: charge the last measured write.
            write_s = self._write_cpu_s or 0.0
            train_s = max(seconds - ckpt_s, 1e-9)
            budget = max(self.settings.checkpoint_budget, 1e-6)
            self._ckpt_period = max(
                1, min(self.settings.checkpoint_max_period, math.ceil((ckpt_s + write_s) / (budget * train_s)))
            )
        self._pending_snap = None
        if completed:
            self._outer_s.append(seconds)
            self._inner_s.append(self._iter_inner_s)
            self._inner_n.append(self._iter_inner_n)
            self._ckpt_s.append(ckpt_s)
            self._ckpt_write_s.append(write_s)
        # an iteration cut short (by an exception) flushes at once: the run may end here
        if not completed or time.monotonic() - self._t_flushed >= self.settings.flush_interval_s:
            self._flush()

    def _outer_exit(self, normal: bool) -> None:
        self._t_outer_end = time.time()
        self._close_progress()

    def _iteration_done(self, i: int, completed: bool) -> None:
        self._t_outer_end = time.time()  # the teardown is timed from the last step's end

    def _close_progress(self) -> None:
        progress, self._progress = self._progress, None
        if progress is not None:
            progress.close()

    def _describe_progress(self) -> str:
        """``flor_ray <run>: epoch 3/10 · step 120/500 · 12s, ~28s left`` (display thread)."""
        parts = []
        frames = list(self._stack)
        for k, f in enumerate(frames):
            it = self._last if k == len(frames) - 1 else f[1]
            total = f"/{f[3]}" if len(f) > 3 and f[3] else ""
            parts.append(f"{f[0]} {max(it, 0) + 1 if it is not None else 0}{total}")
        elapsed = time.monotonic() - self._t_loop
        text = f"flor_ray {self.run_id}: " + " · ".join(parts) + f" · {elapsed:.0f}s"
        outer = frames[0] if frames else None
        done = len(self._outer_s)
        if outer is not None and len(outer) > 3 and outer[3] and done:
            left = (outer[3] - done) * (sum(self._outer_s) / done)
            text += f", ~{left:.0f}s left"
        return text

    def _submit_checkpoint(self, snap: dict | None) -> None:
        if snap is None:
            return
        from .checkpoint import serialize

        rel = f"checkpoints/{self.run_id}/{snap['iteration']:06d}.pt"

        def write(snap=snap, rel=rel):
            import hashlib

            cpu = time.thread_time()
            data = serialize(snap)
            if not self._spool.write(rel, data, durable=True, spill=False):
                return  # skipped, listed in the run's "lost": replays start from an earlier one
            entry = {
                "iteration": snap["iteration"],
                "inner_exits": snap["inner_exits"],
                "path": rel,
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),  # outside the lock: _write_meta takes it
            }
            scope = snap.get("scope")
            if scope is not None:  # what the planner may rely on when a replay restores it
                entry["carried"] = list(scope["captured"])
                entry["not_carried"] = dict(scope["missing"])
            with self._lock:
                self._manifest.append(entry)
            self._write_cpu_s = time.thread_time() - cpu  # CPU only: waiting for fsync costs training nothing

        self.writer.submit(write)

    # ----------------------------------------------------------------- flush
    def _flush(self) -> None:
        """Write the buffered rows and the run's metadata now.

        Synchronous on purpose: when an outer iteration ends, its rows are in the
        store, so a crash (even SIGKILL) loses at most the rows logged since.
        """
        self._flush_rows_only()
        self._write_meta()
        self._t_flushed = time.monotonic()

    def _timings(self) -> dict:
        return {
            "setup_s": self._setup_s,
            "start_s": self._start_s,
            "setup_imports_s": self._setup_imports_s,
            "outer_s": list(self._outer_s),
            "inner_s": list(self._inner_s),
            "inner_n": list(self._inner_n),
            "checkpoint_s": list(self._ckpt_s),
            "checkpoint_write_cpu_s": list(self._ckpt_write_s),
            "teardown_s": (time.time() - self._t_outer_end) if self._t_outer_end and self._finished else None,
        }

    def _write_meta(self) -> None:
        with self._lock:
            manifest = sorted(self._manifest, key=lambda m: m["iteration"])
        self.meta.update(
            {
                "args": dict(self.args),
                "outer_loop": self._outer_name,
                "iterations": len(self._outer_s),
                "timings": self._timings(),
                "checkpoints": manifest,
                "checkpoint_period": self._ckpt_period,
                "flushes": self._flushes,
                "updated_at": now_iso(),
            }
        )
        self.meta["env"] = {**self.meta["env"], **{k: v for k, v in self._env().items() if k in ("device", "gpu")}}
        for key in ("spooled", "lost"):
            self.meta.pop(key, None)
        self.meta.update(self._spool.record())
        data = json.dumps(self.meta, indent=1, sort_keys=True, default=str).encode()
        self._spool.write(self.store.runs_rel(self.run_id), data)

    # ------------------------------------------------------------------ exit
    def finish(self) -> None:
        """Flush rows, wait for background writes, verify checkpoints, close the run."""
        self._import_clock.stop()
        if not self.started or self._finished:
            return
        self._finished = True
        self._close_progress()
        problems: list[str] = []
        try:
            self._flush_rows_only()
        except FlorError as exc:
            problems.append(str(exc))
        self.writer.drain()
        problems += self.writer.errors
        with self._lock:
            manifest = list(self._manifest)
        for m in manifest if not self._spool.down else ():  # a store that is down is not read
            try:
                size = self.store.fs.size(self.store.path(m["path"]))
            except Exception as exc:  # noqa: BLE001 - reported below
                size = f"unreadable ({exc})"
            if size != m["bytes"]:
                problems.append(f"checkpoint {m['path']} has {size} bytes, expected {m['bytes']}")
                m["verified"] = False
            else:
                m["verified"] = True
        unused = sorted(set(self.kwargs) - set(self.args))
        if unused:
            sys.stderr.write(
                f"flor_ray: --kwargs {', '.join(unused)} given but never read by flor.arg(...); check the names\n"
            )
        if "numerics" not in self.meta["env"]:  # no outer loop ran
            self._capture_numerics()
        self.meta["status"] = "failed" if self._error else "finished"
        if self._error:
            self.meta["error"] = self._error
        if problems:
            self.meta["problems"] = problems
            sys.stderr.write("flor_ray: " + "\nflor_ray: ".join(p.strip() for p in problems) + "\n")
        self.meta["ended_at"] = now_iso()
        try:
            self._write_meta()
        finally:
            self.writer.close()

    def _flush_rows_only(self) -> None:
        rows = self.take_rows()
        if rows is not None:
            rel = f"logs/run_id={self.run_id}/source=record/part-{self._flushes:05d}.parquet"
            self._flushes += 1
            self._write_rows(rows, rel)

    def _write_rows(self, rows: dict, rel: str) -> None:
        from ..relation import table_to_parquet_bytes
        from .rows import rows_to_table  # never imports pandas / pyarrow.compute

        table = rows_to_table(version=self.version, file=self.script, **rows)
        self._spool.write(rel, table_to_parquet_bytes(table))

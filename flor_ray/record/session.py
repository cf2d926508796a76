"""The recording session behind ``flor.log``, ``flor.arg``, ``flor.loop`` and
``flor.checkpointing``.

:class:`RecordSession` adds the run to :class:`~.loops.LoopRuntime`'s loops and rows:
its id, code snapshot (:mod:`.start`), args, checkpoints, timings and the runs-table
entry. Nothing happens until the first call of one of the four verbs, so a script
that merely imports flor_ray creates no run. An observer (the profiler, see
:mod:`.profile`) wraps the session's calls through ``hooks``.
"""

from __future__ import annotations

import atexit
import json
import math
import sys
import threading
import time
from typing import Any, Iterable, Iterator, Mapping

from ..config import Settings
from ..errors import FlorError
from ..store import layout
from ..store.values import convert
from .args import arg_default, cast_arg
from .checkpoint import checkpoint_period, verify_written
from .loops import LoopRuntime
from .steps import Iteration
from .names import check_name
from .profile import RecordHooks
from .cells_run import CellsRun
from .checkpointing import Checkpointing
from .host import PartTimer, environment, now_iso, process_start_time
from .writer import BackgroundWriter

__all__ = ["RecordSession"]

#: the session's steps an observer may wrap besides the verbs: (hook key, method)
HOOKED_STEPS = (
    ("start", "start"),
    ("capture", "_capture"),
    ("submit", "_submit_checkpoint"),
    ("flush_rows", "_flush_rows_only"),
    ("write_meta", "_write_meta"),
    ("commit", "commit"),
    ("arg", "arg"),
)


def _warm_imports() -> None:
    import pyarrow.parquet  # noqa: F401

    from ..store import logs  # noqa: F401
    from . import rows  # noqa: F401


class RecordSession(Checkpointing, CellsRun, LoopRuntime):
    """One recording run of one script."""

    def __init__(self, settings: Settings, kwargs: Mapping[str, str] | None = None, argv: list[str] | None = None,
                 hooks: RecordHooks | None = None, block: Mapping[str, Any] | None = None):
        super().__init__()
        self.block = None if block is None else dict(block)  # see CellsRun: this run's part of the process
        self._cells = None  # a kernel's executed cells (record/notebook.py), when recording in one
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
        self._save_watch = None  # the script's own torch.save calls (record/own_saves.py), in checkpointing
        self._file_facts = None  # its saved-to paths (record/own_files.py), for the replays
        self._print_iter = False  # this iteration's checkpoint is to come from the script's save
        self._period_due = False
        self._start_parts: dict[str, float] = {}
        self._output = None  # the captured output (record/output.py), once started
        self._fast_log = LoopRuntime.log.__get__(self)
        if hooks is not None:
            self._attach(hooks)

    def _attach(self, hooks: RecordHooks) -> None:
        """Let ``hooks`` wrap the verbs and steps: instance attributes that shadow the methods."""
        for key, meth in HOOKED_STEPS:
            setattr(self, meth, hooks.wrap(key, getattr(self, meth)))
        self.log = hooks.wrap("log", self.log)  # type: ignore[method-assign]
        self._fast_log = hooks.wrap("log", self._fast_log)  # flor.log once the run started
        loop, checkpointing, finish = self.loop, self.checkpointing, hooks.wrap("finish", self.finish)
        timed_loop = hooks.wrap("loop", loop)
        self.loop = lambda name, iterable: hooks.wrap_loop("loop", timed_loop(name, iterable))  # type: ignore
        self.checkpointing = lambda **objects: hooks.wrap_context(  # type: ignore[method-assign]
            "checkpointing", checkpointing(**objects))  # from_saves=... is one of the keywords

        def finish_then_tell() -> None:
            try:
                finish()
            finally:
                hooks.finished(self)

        self.finish = finish_then_tell  # type: ignore[method-assign]
        self.writer.drain = hooks.wrap("drain", self.writer.drain)  # type: ignore[method-assign]
        submit = self.writer.submit
        self.writer.submit = lambda fn, *a: submit(hooks.wrap_job(fn), *a)  # type: ignore[method-assign]

    @property
    def fast_log(self):
        """The bound log method itself, hooked when the session has hooks."""
        return self._fast_log

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
        timer = PartTimer(self._start_parts)
        # the store's and git's modules (start's), imported at the first verb: timed as its own part
        from ..versions import upload
        from . import start as st

        timer.mark("imports")
        where = self._locate()
        timer.mark("repo_root")
        self.store = st.open_store(self.settings, where.repo_root)
        self.store.fs  # noqa: B018  # writes go through fsspec: imported here, never by the writer at exit
        timer.mark("store")
        self.run_id = st.new_run_id()
        from .spool import SpoolingWriter

        self._spool = SpoolingWriter(self.store, self.run_id, self.settings.spool_dir, self.settings.write_retries)
        cells = self._cells.script() if self._cells is not None else None
        snap = st.take_snapshot(self.settings, self.store, where, self.run_id,
                                extra={where.script: cells.text} if cells else None)
        timer.mark("snapshot")
        self.snapshot = snap
        self.version = snap.tree
        self.script = where.script
        self.meta: dict[str, Any] = st.run_meta(self.run_id, where, snap, self.argv)
        self._note_parts(cells)
        from .own_files import FileFacts

        self._file_facts = FileFacts(where.repo_root, self._file_position, self._keep_read_back, self._t_process)
        import numpy  # noqa: F401  # on this thread: the writer's pyarrow import needs it, and a
        # module half-imported by another thread must never be seen by capture_rng / environment()
        timer.mark("meta")
        self._write_meta()
        timer.mark("write_meta")
        self.writer.submit(upload, self.store, snap)
        from .carried import install_loader_hook

        install_loader_hook()  # before the set-up makes its DataLoader iterators (when torch is imported)
        self.log = self.fast_log  # type: ignore[method-assign]  # started: skip the check
        atexit.register(self.finish)
        st.install_excepthook(self._record_error)  # record the failure, then let Python report it
        from .output import start_capture

        self._output = start_capture(self)
        timer.mark("rest")

    def _keep_read_back(self, digest: str, suffix: str, data: bytes) -> str:
        """A file the script reads back, into the store before the script goes on (its
        replays read these bytes, :mod:`flor_ray.record.own_files`)."""
        from ..store import layout

        rel = layout.saved_file(self.run_id, f"read-{digest}{suffix}")
        self._spool.write(rel, data, durable=True)
        return rel

    def _record_error(self, error: dict) -> None:
        self._error = error

    def _capture_numerics(self) -> None:
        """The numerics the training loop runs with (see flor_ray.numerics), taken on
        the training thread once the set-up is done: torch is imported by then (it
        may not be at the first flor call) and the script's own thread and precision
        settings are made. Written with the next flush."""
        from .. import numerics

        self.meta["env"]["numerics"] = numerics.capture()

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
        self._period_due = self._checkpoint_objects is not None and (
            self._last_ckpt is None
            or i - self._last_ckpt >= self._ckpt_period
            or (length is not None and i == length - 1)
        )
        watch = self._save_watch
        if watch is not None:
            watch.outer_begin(i)
        # a checkpoint from the script's own save costs no copy: every iteration has one
        self._print_iter = watch is not None and watch.trusting
        self._ckpt_due = self._period_due or self._print_iter
        return True

    def _inner_done(self, name: str, depth: int, n: int, seconds: float, skipped: bool) -> None:
        if depth != 1 or self._outer_name is None:
            return
        self._iter_inner_s += seconds
        self._iter_inner_n += n
        self._iter_inner_exits += 1
        if self._ckpt_due and self._checkpoint_objects is not None:
            self._capture(self._last if len(self._stack) == 1 else self._stack[0][1])

    def _outer_end(self, i: int, seconds: float, completed: bool) -> None:
        ckpt_s = write_s = 0.0
        if self._print_iter and self._iter_inner_exits > 0:
            save_s = self._save_watch.end(i)
            if save_s is not None and completed:
                self._last_ckpt = i
                ckpt_s = self._pending_cost + save_s
                write_s = self._write_cpu_s or 0.0  # the writer stores the save's bytes: charged as flor's
        elif completed and self._period_due and self._checkpoint_objects is not None:
            if self._pending_snap is None:
                self._capture(i)
            ckpt_s = self._pending_cost
            self._submit_checkpoint(self._pending_snap)
            self._last_ckpt = i
            # A checkpoint costs its capture here plus its serialisation on the writer,
            # whose CPU competes with training (for cores, and for the GIL while it
            # pickles). This one is not written yet: charge the last measured write.
            write_s = self._write_cpu_s or 0.0
            self._ckpt_period = checkpoint_period(ckpt_s + write_s, seconds - ckpt_s, self.settings)
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
        """The progress line (display thread), see :func:`.progress.describe`."""
        from .progress import describe

        return describe(self.run_id, list(self._stack), self._last, time.monotonic() - self._t_loop, self._outer_s)

    # ----------------------------------------------------------------- flush
    def _flush(self) -> None:
        """Write the buffered rows and the run's metadata now.

        Synchronous on purpose: outer iterations end with a flush (at most one per
        ``flush_interval_s``), whose rows are in the store when it returns, so a crash
        (even SIGKILL) loses at most the rows logged since.
        """
        self._refresh_cells()
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
                "own_files": self._file_facts.as_meta() if self._file_facts is not None else None,
                "checkpoint_period": self._ckpt_period,
                "flushes": self._flushes,
                "updated_at": now_iso(),
            }
        )
        self.meta["env"] = {**self.meta["env"], **{k: v for k, v in environment().items() if k in ("device", "gpu")}}
        for key in ("spooled", "lost"):
            self.meta.pop(key, None)
        self.meta.update(self._spool.record())
        if self._output is not None:
            self.meta["output_capture"] = self._output.summary()
        data = json.dumps(self.meta, indent=1, sort_keys=True, default=str).encode()
        self._spool.write(self.store.runs_rel(self.run_id), data)

    # ------------------------------------------------------------------ exit
    def finish(self) -> None:
        """Flush rows, wait for background writes, verify checkpoints, close the run."""
        self._import_clock.stop()
        if not self.started or self._finished:
            return
        self._end_cells()
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
        if not self._spool.down:  # a store that is down is not read
            problems += verify_written(self.store, manifest)
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
            try:
                if self._output is not None:  # the lines printed above included
                    self._output.close()
            finally:
                self._write_meta()
            self._compact()
        finally:
            self.writer.close()

    def _compact(self) -> None:
        """The ended run's record parts as one file (:mod:`flor_ray.store.compaction`)
        and its entry in the store's manifest, unless some of its writes were spooled or
        lost (a later upload would add a part the file covers, or rewrite the run file);
        a store that fails leaves the parts for ``flor-ray check --repair``. Then the
        crashed runs' parts and the loose files of ended runs
        (:func:`flor_ray.store.consolidation.after_run`)."""
        after = self.settings.compact_after
        if not after or self._spool.down or self._spool.record():
            return
        from ..store.compaction import compact_record
        from ..store.manifest import seal

        from ..store.consolidation import after_run

        try:
            done = compact_record(self.store, self.run_id) if self._flushes >= after else None
            seal(self.store, self.run_id, json.loads(json.dumps(self.meta, default=str)),
                 done.names if done is not None and done.written else None)
            after_run(self.store, after, self.settings.consolidate_after)
        except (FlorError, OSError):
            pass

    def _flush_rows_only(self) -> None:
        rows = self.take_rows()
        if rows is not None:
            rel = layout.record_part(self.run_id, self._flushes)
            self._flushes += 1
            self._write_rows(rows, rel)
        if self._output is not None:  # synchronous, as the rows: a crash loses only the lines since
            self._output.flush()

    def _write_rows(self, rows: dict, rel: str) -> None:
        from ..store.logs import table_to_parquet_bytes
        from .rows import rows_to_table  # never imports pandas / pyarrow.compute

        table = rows_to_table(version=self.version, file=self.script, **rows)
        self._spool.write(rel, table_to_parquet_bytes(table))

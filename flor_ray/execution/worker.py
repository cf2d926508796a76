"""Replay mode: the runtime inside the replayed script's own process.

The task that replays a segment starts ``python <script>`` with ``FLOR_REPLAY``
naming a JSON spec; the script's ``import flor_ray`` then gets a
:class:`ReplaySession` instead of a recording one. It hands back the recorded args,
restores checkpoints where the spec says, skips what need not run, keeps the rows
of the segment's iterations and writes them as one Parquet file at exit. Nothing
of the recording (runs table, checkpoints, code) is written.

The spec's fields: :class:`~flor_ray.execution.spec.TaskSpec`.

Damaged checkpoints: ``fallbacks`` lists the run's checkpoint entries before
``stop``, ``damaged`` the ones an earlier attempt of this task found damaged
(``{path, iteration, reason}``). A restore that finds its checkpoint missing,
truncated or corrupted writes it to ``damage_marker`` and fails; the task then
runs the script again with it in ``damaged``, and this session routes around it
from the start: it restores the nearest earlier good checkpoint instead (or runs
from iteration 0) and re-executes the iterations in between, keeping only the
segment's rows, so the values are those of the recording. The done marker's
``notes`` say which fallback was used.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import time
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Mapping

from ..errors import CheckpointError, CheckpointingError, LoopError
from ..record.loops import LoopRuntime
from ..record.names import check_name
from .spec import TaskSpec

__all__ = ["ReplaySession", "SegmentDone"]


class SegmentDone(SystemExit):
    """Raised after the segment's last iteration: the rest of the script is not needed."""


class ReplaySession(LoopRuntime):
    def __init__(self, spec: TaskSpec):
        super().__init__()
        now = time.time()
        # where the task's time goes (reported back to the driver; the cost model's
        # calibration): process start -> first flor call -> first outer iteration ...
        t_start = float(os.environ.get("FLOR_T_START") or now)
        self.phases: dict[str, float] = {"start": max(now - t_start, 0.0), "setup": 0.0, "restore": 0.0,
                                         "loop": 0.0, "after": 0.0, "write": 0.0}
        self._t_mark = now
        from ..store.credentials import task_options
        from ..store import Store

        self.spec = spec
        self.store = Store(spec.store, task_options(spec.store, spec.storage_options))
        self.args = dict(spec.args)
        self.mode = spec.mode
        self.start, self.stop = spec.start, spec.stop
        self.names = None if spec.names is None else set(spec.names)
        self.restore_entry = spec.restore
        self.checkpoints = dict(spec.checkpoints)
        self.carried = spec.carried  # loop-carried names to write back at a restore
        # skip mode around damaged checkpoints: iterations re-executed, extra restores
        self._reexec: set[int] = set()
        self._fallback_at: dict[int, dict] = {}
        self._fallback_notes: list[tuple[dict, dict | None]] = []  # (damaged entry, used instead)
        self._damaged: list[dict] = []
        self._route_around(spec.damaged)
        self._objects: dict[str, Any] | None = None
        self._in_ckpt = False
        self._restore_at: dict | None = None  # entry to restore at a depth-1 exit
        self._exits = 0
        self._phase = "setup"  # setup -> loop -> after
        self._cur_iter = -1
        self._keep_iter = False
        self._past_stop = False
        from ..store.logs import empty_rows

        self._kept: dict[str, list] = empty_rows()
        self._written = False
        self._failed = False
        self._numerics_notes: list[str] | None = None
        self._restore_numerics()
        # open the store's client now, while the interpreter is fully alive: an
        # object-store client made first inside an atexit handler can be refused
        self.store.exists(self.spec.output)
        from .replay_files import ReplayFiles, load_facts, tree_of

        self.files = ReplayFiles(tree_of(spec.script, sys.argv[0] if sys.argv else ""),
                                 load_facts(self.store, spec.run_id), spec.run_id,
                                 keep=(str(self.store.root),) if self.store.is_local else ())
        self.files.position, self.files.fetch = self._file_position, self.store.read_bytes
        self.files.install()
        self._suppress_saves()
        atexit.register(self.finish)
        prev = sys.excepthook

        def hook(tp, val, tb):  # a failing script writes no partition
            self._failed = True
            prev(tp, val, tb)

        sys.excepthook = hook

    def _route_around(self, damaged: Iterable[Mapping[str, Any]]) -> None:
        """Replace each damaged checkpoint by the nearest earlier good one (None:
        iteration 0) and re-execute from there to the damaged one's iteration."""
        bad = {d["path"]: d for d in damaged}
        self._damaged = list(bad.values())
        if not bad:
            return
        good = {int(e["iteration"]): e for e in self.spec.fallbacks if e["path"] not in bad}

        def earlier(i: int) -> dict | None:
            before = [j for j in good if j < i]
            return good[max(before)] if before else None

        if self.mode == "reexec" and self.restore_entry and self.restore_entry["path"] in bad:
            instead = earlier(int(self.restore_entry["iteration"]))
            self._fallback_notes.append((bad[self.restore_entry["path"]], instead))
            self.restore_entry = instead
        elif self.mode == "skip":
            for i, entry in sorted(self.checkpoints.items()):
                if entry["path"] not in bad:
                    continue
                instead = earlier(i)
                self._fallback_notes.append((bad[entry["path"]], instead))
                if instead is not None:
                    self._fallback_at[int(instead["iteration"])] = instead
                self._reexec.update(range(int(instead["iteration"]) + 1 if instead else 0, i + 1))

    def _fallback_lines(self) -> list[str]:
        """One line per damaged checkpoint this task's attempts found, and what replaced it."""
        loop = self._outer_name or "iteration"
        used = {d["path"]: instead for d, instead in self._fallback_notes}
        out = []
        for d in self._damaged:
            if d["path"] not in used:
                how = "passed over as a fallback"
            elif used[d["path"]] is not None:
                how = f"replayed from the checkpoint of {loop} {used[d['path']]['iteration']}"
            else:
                how = f"re-executed from {loop} 0 (no earlier good checkpoint)"
            out.append(f"run {self.spec.run_id} {loop} {d['iteration']}: {d['reason']}; {how}")
        return out

    def _restore_numerics(self) -> None:
        """The recording's torch settings, where the process has not restored them
        yet: a plain ``python script.py`` (no zygote) restores them at its first flor
        call once torch is imported, else at the first outer iteration."""
        from .. import numerics

        if not numerics.restored():
            numerics.restore(self.spec.numerics)

    def _check_numerics(self) -> None:
        """At the loop's start, what the replay could not make as recorded."""
        from .. import numerics

        self._restore_numerics()
        self._numerics_notes = numerics.differences(self.spec.numerics, numerics.capture())

    @classmethod
    def from_spec_file(cls, path: str) -> "ReplaySession":
        with open(path) as f:
            return cls(TaskSpec.from_json(f.read()))

    def _suppress_saves(self) -> None:
        """Training side effects: torch.save does nothing in replay, and the files the
        script opens are the recorded run's (:mod:`.replay_files`). (Also hooks
        DataLoader iterators, so that a restore can re-draw their positions.)"""
        from ..record.carried import install_loader_hook

        install_loader_hook()
        torch = sys.modules.get("torch")
        if torch is not None and not getattr(torch.save, "_flor_suppressed", False):
            files = self.files

            def _no_save(_obj: Any = None, f: Any = None, *_a: Any, **_k: Any) -> None:
                files.discarding_save(f)
                return None

            _no_save._flor_suppressed = True  # type: ignore[attr-defined]
            torch.save = _no_save

    # ------------------------------------------------------------------ verbs
    def arg(self, name: str, default: Any) -> Any:
        check_name("arg", name)
        return self.args.get(name, default)

    def loop(self, name: str, iterable: Iterable[Any]) -> Iterator[Any]:
        self._suppress_saves()
        return LoopRuntime.loop(self, name, iterable)

    def iteration(self, name: str, idx: Any = None, value: Any = None):
        self._suppress_saves()
        return LoopRuntime.iteration(self, name, idx, value)

    @contextmanager
    def checkpointing(self, from_saves: bool = False, **objects: Any):
        # from_saves changes how the recording stored its checkpoints, not what a restore gets
        if self._in_ckpt:
            raise CheckpointingError("flor.checkpointing is already active")
        self._in_ckpt = True
        self._objects = dict(objects)
        try:
            yield self
        finally:
            self._in_ckpt = False

    def commit(self) -> None:
        pass

    # ------------------------------------------------------------ loop hooks
    def _lap(self, phase: str) -> None:
        now = time.time()
        self.phases[phase] += now - self._t_mark
        self._t_mark = now

    def _outer_begin(self, i: int, length: int | None) -> bool:
        self._move_rows()
        self._lap(self._phase)  # "setup" before the first iteration, then "loop"
        if self._numerics_notes is None:
            self._check_numerics()
        self._phase = "loop"
        self._cur_iter = i
        self._exits = 0
        self._restore_at = None
        if self._past_stop:  # only a segment with the code after the loop, which ends at the run's last step
            raise LoopError(
                f"the replay of run {self.spec.run_id} went on to step {i} of its flor.iteration loop, "
                f"past the last recorded step {self.stop}: the loop's end depends on code in the steps' "
                "bodies, which a replay skips; end the loop from code outside the `with flor.iteration` "
                "block (e.g. `if iter_num > max_iters: break` after it)")
        if self.mode == "setup":  # only the code before the outer loop was needed
            self._phase = "setup"
            self.finish()
            raise SegmentDone(0)
        if self.mode == "skip":
            keep = i >= self.start and i in self.checkpoints
            if i in self._reexec:  # on the way to (or at) a damaged checkpoint's iteration
                self._keep_iter = keep
                return True
            entry = self.checkpoints.get(i) if keep else self._fallback_at.get(i)
            if entry is None:  # not asked for (or replayed by another task): not executed
                return False
            self._restore_at = entry
            self._keep_iter = keep
            return True
        restore_iter = self.restore_entry["iteration"] if self.restore_entry else -1
        if i < restore_iter:
            return False  # before the restored checkpoint: not executed at all
        if i == restore_iter:
            self._restore_at = self.restore_entry
        self._keep_iter = self.start <= i <= self.stop
        return True

    def _inner_skipped(self, name: str, depth: int) -> bool:
        if depth != 1 or self._restore_at is None:
            return False
        self._exits += 1
        if self._exits >= max(1, int(self._restore_at.get("inner_exits", 1))):
            self._restore(self._restore_at)
            self._restore_at = None
        return True

    def _outer_end(self, i: int, seconds: float, completed: bool) -> None:
        if self._restore_at is not None and completed:
            # no inner loop in this iteration: the checkpoint was taken at its end
            self._restore(self._restore_at)
            self._restore_at = None
        self._move_rows()

    def _outer_stop(self, i: int) -> bool:
        return i >= self.stop

    def _outer_exit(self, normal: bool) -> None:
        self._move_rows()
        self._lap("loop")
        self._phase = "after"
        if normal and not self.spec.after:
            self.finish()  # write the partition now, not at interpreter exit
            raise SegmentDone(0)

    def _iteration_done(self, i: int, completed: bool) -> None:
        """After a step of a ``flor.iteration`` loop: the rows logged outside any step
        from here on are the code after the loop's (until the next step begins); the
        segment ends with its last step, unless the code after the loop is wanted."""
        self._move_rows()
        self._phase = "after"
        if i >= self.stop:  # ran or skipped: no later step is wanted
            self._past_stop = True
            if not self.spec.after:
                self._lap("loop")
                self.finish()
                raise SegmentDone(0)

    def _restore(self, entry: Mapping[str, Any]) -> None:
        from ..store.checkpoints import load_snapshot
        from ..record.checkpoint import restore

        self._lap("loop")
        where = self.store.full_url(entry["path"])
        try:
            snapshot = load_snapshot(self.store, entry)
        except CheckpointError as exc:  # damaged: the task retries around it (see the module doc)
            self._report_damage(entry, exc)
            raise
        restore(self._objects or {}, snapshot, where, self._scope_frame, self.carried)
        self._lap("restore")

    def _report_damage(self, entry: Mapping[str, Any], exc: CheckpointError) -> None:
        self._failed = True  # even if the script catches the error: its state is not the recording's
        marker = self.spec.damage_marker
        if marker:
            with open(marker, "w") as f:
                json.dump({"path": entry["path"], "iteration": int(entry["iteration"]), "reason": str(exc)}, f)

    # ------------------------------------------------------------------ rows
    def _move_rows(self) -> None:
        """Move buffered rows into the kept set if their phase/iteration is wanted."""
        rows = self.take_rows()
        if rows is None:
            return
        keep_phase = (
            (self._phase == "setup" and self.spec.setup)
            or (self._phase == "loop" and self._keep_iter)
            or (self._phase == "after" and self.spec.after)
        )
        if not keep_phase:
            return
        from ..store.logs import merge_rows

        merge_rows(self._kept, rows, self.names)

    def _footer(self) -> dict:
        """What the partition holds, for the planner (never replay it again) and for
        queries (the earliest task's value of an identity is the one shown)."""
        from ..store.logs import TASK_META_KEY

        spec = self.spec
        its = spec.iterations
        if its is None:
            its = sorted(self.checkpoints) if self.mode == "skip" else list(range(self.start, self.stop + 1))
        doc = {"task": spec.task, "patch": spec.patch, "names": sorted(self.names or ()),
               "iterations": [int(i) for i in its], "setup": spec.setup,
               "after": spec.after, "written_at": time.time()}
        return {TASK_META_KEY: json.dumps(doc).encode()}

    def finish(self) -> None:
        """Write the kept rows as the task's one partition (only on success)."""
        if self._written:
            return
        self._written = True
        if self._failed:
            return
        self._move_rows()
        self._lap(self._phase)
        from ..record.rows import rows_to_table
        from ..store.logs import table_to_parquet_bytes

        table = rows_to_table(
            version=self.spec.version, file=self.spec.script, seq_start=0, task=self.spec.task, **self._kept
        )
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **self._footer()})
        self.store.write_bytes(self.spec.output, table_to_parquet_bytes(table))
        self._lap("write")
        done = self.spec.done_marker
        if done:
            with open(done, "w") as f:
                json.dump({"rows": table.num_rows, "phases": {k: round(v, 4) for k, v in self.phases.items()},
                           "notes": self._fallback_lines() + list(self.files.notes.values()),
                           "numerics": self._numerics_notes or []}, f)

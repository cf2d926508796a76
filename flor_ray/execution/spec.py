"""What one replay task is told to do: the driver writes it, the task and the replayed
process's :class:`~flor_ray.execution.worker.ReplaySession` read it.

A :class:`TaskSpec` crosses the Ray boundary and is written to a JSON file that the
replayed script's process reads, possibly under another flor_ray on another node:
its JSON form carries ``format`` and a reader refuses a format it does not know
rather than guess at fields.

Checkpoint entries (``restore``, ``checkpoints``, ``fallbacks``, ``damaged``) stay
the JSON objects of the run's manifest (``{iteration, inner_exits, path, bytes,
sha256}``): the session hands them to the checkpoint reader as they are.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:  # pragma: no cover
    from ..planning.plan import Plan, Task

__all__ = ["TaskSpec", "SPEC_FORMAT"]

#: the JSON layout below; bump it when a field changes meaning or a required one is added
SPEC_FORMAT = 1


@dataclass(frozen=True)
class TaskSpec:
    """One task's segment of one run, and where its partition goes.

    ``mode``: ``skip`` restores each iteration's checkpoint and skips the inner loops;
    ``reexec`` restores ``restore`` once (or starts at iteration 0) and runs for real;
    ``setup`` runs only the code before the outer loop. ``start``/``stop``: the outer
    iterations whose rows are kept (inclusive). ``names``: the names kept (None: all).
    ``setup``/``after``: keep the rows before / after the outer loop.
    """

    store: str
    run_id: str
    version: str  # the code version the run recorded
    script: str
    args: Mapping[str, Any]
    mode: str
    start: int
    stop: int
    output: str  # the partition's store-relative path
    task: str  # the task's key
    storage_options: Mapping[str, Any] = field(default_factory=dict)  # without secrets: a task takes its own
    restore: Mapping[str, Any] | None = None
    checkpoints: Mapping[int, Mapping[str, Any]] = field(default_factory=dict)  # skip: iteration -> entry
    #: the run's checkpoints before ``stop``: where to go when one turns out damaged
    fallbacks: tuple[Mapping[str, Any], ...] = ()
    names: tuple[str, ...] | None = None
    setup: bool = False
    after: bool = False
    carried: tuple[str, ...] = ()  # loop-carried names a restore writes back
    patch: str = ""  # the digest of the propagated code
    iterations: tuple[int, ...] | None = None  # the outer iterations whose rows the partition holds
    numerics: Mapping[str, Any] | None = None  # the recording's, restored before the script runs
    block: Mapping[str, Any] | None = None  # the run's part of its process (RunInfo.block)
    # set by the task for the replayed process, not by the plan
    done_marker: str | None = None
    damage_marker: str | None = None
    damaged: tuple[Mapping[str, Any], ...] = ()  # {path, iteration, reason} found by earlier attempts

    @staticmethod
    def of(plan: "Plan", task: "Task") -> "TaskSpec":
        """The spec of one of the plan's tasks."""
        from ..store.credentials import without_secrets

        run = plan.run_info(task.run_id)
        return TaskSpec(
            store=plan.store_url,
            storage_options=without_secrets(plan.storage_options),
            run_id=task.run_id,
            version=task.version,
            script=task.script,
            args=dict(run.args),
            mode=task.mode,
            start=task.start,
            stop=task.stop,
            output=task.output,
            task=task.key,
            restore=task.restore.as_dict() if task.restore else None,
            checkpoints={c.iteration: c.as_dict() for c in task.checkpoints},
            fallbacks=tuple(c.as_dict() for c in run.checkpoints if c.iteration < task.stop),
            names=tuple(task.names),
            setup=task.setup,
            after=task.after,
            carried=tuple(task.carried),
            patch=task.patch,
            iterations=tuple(task.iterations),
            numerics=dict(run.numerics) if run.numerics else None,
            block=dict(run.block) if run.block else None,
        )

    def open_store(self):
        """The store this task replays into, with this process's credentials."""
        from ..store import Store
        from ..store.credentials import task_options

        return Store(self.store, task_options(self.store, self.storage_options))

    def to_json(self) -> str:
        doc = asdict(self)
        doc["storage_options"] = dict(self.storage_options)
        doc["checkpoints"] = {str(k): dict(v) for k, v in self.checkpoints.items()}
        return json.dumps({"format": SPEC_FORMAT, **doc})

    @staticmethod
    def from_json(text: str) -> "TaskSpec":
        d = json.loads(text)
        fmt = d.pop("format", 1)  # absent: the first format, written before the field was
        if fmt != SPEC_FORMAT:
            raise ValueError(f"task spec format {fmt!r} is not {SPEC_FORMAT}: the driver and this worker run "
                             "different flor_ray versions; install the same one on both")
        return TaskSpec(
            **{**d, "checkpoints": {int(k): v for k, v in (d.get("checkpoints") or {}).items()},
               "fallbacks": tuple(d.get("fallbacks") or ()), "damaged": tuple(d.get("damaged") or ()),
               "names": None if d.get("names") is None else tuple(d["names"]),
               "carried": tuple(d.get("carried") or ()),
               "iterations": None if d.get("iterations") is None else tuple(d["iterations"])})

"""The replay plan: frozen values. :func:`flor_ray.planning.make.make_plan` builds
them and :func:`flor_ray.execution.driver.run_plan` runs them; a plan has no
behaviour of its own beyond describing itself.

:func:`~flor_ray.planning.make.make_plan` reads no clock, cluster or store: the
runs, their checkpoint manifests, the propagated code, the cluster snapshot, the
done partitions and the calibration from earlier replays all come in as
arguments, so a plan is reproducible and ``explain()`` can be asserted.

Per run, the most demanding need of the requested names decides the mode:

* ``skip``: every requested name is computed at the outer level from restored
  state. Each needed iteration that has a checkpoint is replayed by restoring it
  where the inner loops ended and running only the outer-level code.
* ``reexec``: some name needs the inner loops. Training re-executes from the
  nearest checkpoint at or before each segment's start.
* loop-carried state (``lr`` annealed by ``lr /= 4``, ``best_acc``, ``global_step``,
  a sampler's generator, a batch iterator's position) that a requested name reads,
  or that the re-executed training code reads, must be restored with the
  checkpoint: a checkpoint is used only if it captured all of it; where none did
  (an open file, a Python generator), the run re-executes from iteration 0 and the
  task's note names the variable.

A requested name that cannot be placed in a version costs only that (version,
name) pair (:class:`Refused`); the version's other names still replay, and a run
is skipped only when none of them can be placed. A checkpoint found damaged
before planning (:class:`DamagedCheckpoint`: missing, or not its recorded size)
is planned around like an absent one.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Iterable, Mapping, Sequence

from ..store import layout
from ..errors import PlanningError

__all__ = [
    "CheckpointRef",
    "RunInfo",
    "VersionPatch",
    "patch_of",
    "ClusterSnapshot",
    "Resources",
    "Task",
    "SkipKind",
    "SkippedRun",
    "ReplayedPart",
    "Refused",
    "DamagedCheckpoint",
    "Plan",
    "task_key",
    "iteration_set",
]

PROCESS_OVERHEAD_S = 1.5  # python start + imports of a replay process when the run did not record its set-up
#: per task, beyond the script's own work: the store checks, the code copied, a
#: process forked from the worker's warm zygote, the partition written (0.10-0.12 s
#: on a 2-core machine, see TaskResult.phases), and Ray handing the worker its next
#: task (~0.03 s)
TASK_OVERHEAD_S = 0.15
#: a zygote imports pyarrow, pandas and flor_ray's replay modules besides the script's own
ZYGOTE_EXTRA_S = 1.0


@dataclass(frozen=True)
class CheckpointRef:
    iteration: int
    inner_exits: int
    path: str
    bytes: int | None = None
    sha256: str | None = None
    #: names of the outer loop's scope whose state the checkpoint holds; None for a
    #: checkpoint recorded before flor_ray captured loop-carried state
    carried: tuple[str, ...] | None = None
    not_carried: tuple[tuple[str, str], ...] = ()  # (name, why it is not captured)

    def holds(self, names: set[str] | frozenset[str]) -> bool:
        return not names or (self.carried is not None and set(names) <= set(self.carried))

    def as_dict(self) -> dict:
        return {"iteration": self.iteration, "inner_exits": self.inner_exits, "path": self.path,
                "bytes": self.bytes, "sha256": self.sha256}


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    version: str
    script: str
    args: tuple[tuple[str, Any], ...]
    argv: tuple[str, ...]
    cwd: str | None
    iterations: int
    checkpoints: tuple[CheckpointRef, ...]
    setup_s: float
    outer_s: tuple[float, ...]
    inner_s: tuple[float, ...]
    device: str = "cpu"
    logged: frozenset[str] = frozenset()
    status: str = "finished"
    #: process start -> first flor call (the imports) when the recording measured it
    start_s: float | None = None
    #: imports between the first flor call and the first iteration (lazy ones too)
    setup_imports_s: float = 0.0
    #: per outer iteration, the training thread's checkpoint capture (part of
    #: ``outer_s``; a replay restores checkpoints but never takes one)
    checkpoint_s: tuple[float, ...] = ()
    #: the numerics environment of the recording (flor_ray.numerics.capture), None
    #: for runs recorded before it was; every replay task restores it
    numerics: Mapping[str, Any] | None = field(default=None, hash=False)
    #: which part of its script's process the run was, when the process made several
    #: (``with flor.run():`` blocks, see flor_ray.execution.blocks): ``{"block": k}`` or
    #: ``{"after_blocks": b}``, with the ``kwargs`` the process was given
    block: Mapping[str, Any] | None = field(default=None, hash=False)

    @functools.cached_property
    def iteration_costs(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per recorded outer iteration, what a replay repeats of it: (all of it, the
        outer-level code only) (:func:`flor_ray.planning.cost.iter_cost`), computed once
        a run (in its ``__dict__``: a frozen dataclass's fields stay as they are)."""
        from .cost import iteration_costs

        return iteration_costs(self.outer_s, self.inner_s, self.checkpoint_s)

    @property
    def threads(self) -> int | None:
        """The recording's intra-op thread count, when recorded."""
        from ..numerics import threads

        return threads(self.numerics)

    @property
    def imports_s(self) -> float:
        """The script's imports: paid once per worker (its zygote), not per task."""
        if self.start_s is not None:
            return min(self.start_s + self.setup_imports_s, self.setup_s)
        return min(self.setup_s, PROCESS_OVERHEAD_S)

    @property
    def replay_setup_s(self) -> float:
        """What a replay task pays before its first iteration: the script's set-up
        without the imports (a task's process is forked with them done) plus the
        task's own overhead."""
        return TASK_OVERHEAD_S + max(self.setup_s - self.imports_s, 0.0)

    @staticmethod
    def from_meta(meta: Mapping[str, Any], logged: frozenset[str] = frozenset()) -> "RunInfo":
        from ..store.manifest import TIMINGS_ASIDE

        if TIMINGS_ASIDE in meta and "timings" not in meta:
            # the manifest's copy without its timings: estimates from none would be wrong numbers
            raise ValueError(f"run {meta.get('run_id')}'s metadata lacks the timings the manifest left out; "
                             "pass it through flor_ray.store.runs.with_timings first")
        t = meta.get("timings") or {}
        return RunInfo(
            run_id=meta["run_id"],
            version=meta["version"],
            script=meta["script"],
            args=tuple(sorted((meta.get("args") or {}).items())),
            argv=tuple(meta.get("argv") or ()),
            cwd=meta.get("cwd"),
            iterations=int(meta.get("iterations") or 0),
            checkpoints=tuple(
                CheckpointRef(c["iteration"], c.get("inner_exits", 1), c["path"], c.get("bytes"), c.get("sha256"),
                              None if c.get("carried") is None else tuple(c["carried"]),
                              tuple(sorted((c.get("not_carried") or {}).items())))
                for c in meta.get("checkpoints") or ()
                if c.get("verified", True)
            ),
            setup_s=float(t.get("setup_s") or PROCESS_OVERHEAD_S),
            outer_s=tuple(t.get("outer_s") or ()),
            inner_s=tuple(t.get("inner_s") or ()),
            device=(meta.get("env") or {}).get("device", "cpu"),
            logged=logged,
            status=meta.get("status", "finished"),
            start_s=None if t.get("start_s") is None else float(t["start_s"]),
            setup_imports_s=float(t.get("setup_imports_s") or 0.0),
            checkpoint_s=tuple(float(x or 0.0) for x in t.get("checkpoint_s") or ()),
            numerics=(meta.get("env") or {}).get("numerics"),
            block=meta.get("block"),
        )


@dataclass(frozen=True)
class Refused:
    """A requested name that cannot be placed in a version, and why."""

    version: str
    name: str
    reason: str
    runs: int = 0  # the plan's runs of that version (set by :func:`make_plan`)


@dataclass(frozen=True)
class DamagedCheckpoint:
    """A checkpoint of the manifest that the store does not hold as recorded."""

    run_id: str
    iteration: int
    path: str
    reason: str  # "is missing", "has 10 bytes, 2048 recorded"


@dataclass(frozen=True)
class VersionPatch:
    """Today's statements propagated into one version (or why they could not be).

    ``code`` is None when nothing could be done with the version (its file is
    unreadable or not Python); a requested name whose statement alone cannot be
    placed is listed in ``refused`` and the others are in ``code``.
    """

    version: str
    code: str | None
    error: str | None = None
    placements: tuple[str, ...] = ()
    needs: tuple[tuple[str, str, str, tuple[str, ...]], ...] = ()  # (name, kind, reason, carried)
    logged: tuple[str, ...] = ()  # every name the patched code logs
    loop_carried: tuple[str, ...] = ()  # ScriptAnalysis.loop_carried: what a restore writes back
    training_carried: tuple[str, ...] = ()  # ScriptAnalysis.training_carried: what re-executed training reads
    refused: tuple[Refused, ...] = ()
    #: the project's other modules with statements injected: (path in the version, code)
    modules: tuple[tuple[str, str], ...] = ()
    #: the version's script this patch is of; None: the script of every run of the version
    #: (two scripts recorded at one version have a patch each)
    script: str | None = None
    #: the names logged after the outer loop only (no site inside it: no rows an iteration)
    only_after: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """How explain() names the patch: its version, and its script where one is set."""
        return self.version[:8] + (f" {self.script}" if self.script else "")

    def files(self, script: str) -> dict[str, str]:
        """Every file the task writes over the version's tree: the script and the modules."""
        return {**dict(self.modules), script: self.code or ""}

    def refusal(self, name: str) -> str | None:
        """Why ``name`` cannot be replayed in this version; None when it can."""
        for r in self.refused:
            if r.name == name:
                return r.reason
        if name not in self.logged:
            return "after propagation the script still does not log it"
        return None

    @functools.cached_property
    def digest(self) -> str:
        """The propagated code's digest (computed once: each of the plan's tasks names it)."""
        h = hashlib.sha256((self.code or "").encode())
        for path, code in self.modules:
            h.update(b"\0" + path.encode() + b"\0" + code.encode())
        return h.hexdigest()[:16]

    @functools.cached_property
    def _need_of(self) -> dict[str, tuple[str, str, tuple[str, ...]]]:
        """name -> its first entry of ``needs``: a plan asks once a run for each name."""
        out: dict[str, tuple[str, str, tuple[str, ...]]] = {}
        for n, kind, reason, carried in self.needs:
            out.setdefault(n, (kind, reason, carried))
        return out

    def need(self, name: str) -> tuple[str, str, tuple[str, ...]]:
        hit = self._need_of.get(name)
        if hit is None:
            raise PlanningError(f"version {self.version[:8]} does not log {name!r} after propagation")
        return hit


@dataclass(frozen=True)
class ClusterSnapshot:
    num_cpus: float
    num_gpus: float = 0.0
    nodes: int = 1
    node_cpus: float | None = None  # the largest node's CPUs (None: num_cpus / nodes)

    @property
    def max_node_cpus(self) -> float:
        return self.node_cpus if self.node_cpus else self.num_cpus / max(1, self.nodes)


@dataclass(frozen=True)
class Resources:
    num_cpus: float | None = None  # None: the run's recorded intra-op threads (see _task_cpus), else 1
    num_gpus: float | None = None  # None: 1 for runs recorded on CUDA, else 0
    memory: int | None = None


@dataclass(frozen=True)
class Task:
    key: str
    run_id: str
    version: str
    script: str
    mode: str  # "skip" | "reexec" | "setup"
    start: int
    stop: int
    restore: CheckpointRef | None
    checkpoints: tuple[CheckpointRef, ...]
    names: tuple[str, ...]
    setup: bool
    after: bool
    num_cpus: float
    num_gpus: float
    memory: int | None
    estimate_s: float
    note: str = ""
    done: bool = False
    #: the calibration factor in ``estimate_s`` (``estimate_s / factor``: the estimate
    #: from the recorded timings alone)
    factor: float = 1.0
    carried: tuple[str, ...] = ()  # loop-carried names a restore writes back into the script
    patch: str = ""  # the digest of the propagated code it runs

    @property
    def output(self) -> str:
        return layout.replay_part(self.run_id, self.key)

    @property
    def iterations(self) -> tuple[int, ...]:
        """The outer iterations whose rows the task keeps."""
        if self.mode == "skip":
            return tuple(c.iteration for c in self.checkpoints)
        return tuple(range(self.start, self.stop + 1))


@dataclass(frozen=True)
class ReplayedPart:
    """A finished replay partition, from its footer: what it holds for its run.

    The planner leaves out what these already hold for the same propagated code
    (``patch``), so that no value is stored twice.
    """

    run_id: str
    key: str
    patch: str
    names: frozenset[str]
    iterations: frozenset[int]
    setup: bool
    after: bool


class SkipKind(str, Enum):
    """Why a run is left out of a plan (the reason says it in words)."""

    PROPAGATION_FAILED = "propagation failed"  # no code for its version
    NOTHING_PLACED = "nothing placed"  # none of the requested names can be placed in its version
    NO_ITERATIONS = "no iterations"  # it completed no outer iteration
    OUT_OF_RANGE = "out of range"  # the requested iterations select none of its own
    RUNNING = "running"  # still recording
    NOT_REPLAYABLE = "not replayable"  # its metadata says why (a run imported without its code...)
    OTHER_SCRIPT = "other script"  # recorded by another script than today's, which its version also holds


@dataclass(frozen=True)
class SkippedRun:
    run_id: str
    version: str
    reason: str
    kind: SkipKind


@dataclass(frozen=True)
class Plan:
    names: tuple[str, ...]
    where: str | None
    iterations: str
    store_url: str
    storage_options: Mapping[str, Any]
    runs: tuple[RunInfo, ...]
    patches: tuple[VersionPatch, ...]
    tasks: tuple[Task, ...]
    skipped: tuple[SkippedRun, ...]
    cluster: ClusterSnapshot
    makespan_s: float
    statements: tuple[tuple[str, str, str], ...] = ()  # (VersionPatch.label, name, "kind: reason")
    retries: int = 3
    #: once per worker that has not replayed before: its zygote's imports (torch...),
    #: in parallel on all workers; not part of ``makespan_s``
    startup_s: float = 0.0
    slots: int = 1  # tasks the cluster runs at once (what makespan_s assumes)
    per_node: int = 1  # replay tasks expected to share a node (what the calibration looked up)
    #: (mode, factor, samples) applied to this plan's estimates, from :class:`~flor_ray.planning.cost.Calibration`
    calibrated: tuple[tuple[str, float, int], ...] = ()
    refused: tuple[Refused, ...] = ()  # requested names left out, per version
    damaged: tuple[DamagedCheckpoint, ...] = ()  # checkpoints planned around
    #: per run: (run_id, its recorded numerics in one line, its tasks' CPUs and why)
    numerics: tuple[tuple[str, str, str], ...] = ()

    def run_info(self, run_id: str) -> RunInfo:
        for r in self.runs:
            if r.run_id == run_id:
                return r
        raise KeyError(run_id)

    def patch(self, version: str, script: str | None = None) -> VersionPatch:
        """The patch of ``script`` at ``version`` (or the version's one patch for every script)."""
        found = patch_of(self.patches, version, script)
        if found is None:
            raise KeyError((version, script))
        return found

    @property
    def pending(self) -> tuple[Task, ...]:
        return tuple(t for t in self.tasks if not t.done)

    def explain(self) -> str:
        from .explain import explain

        return explain(self)


# ---------------------------------------------------------------------- helpers
def iteration_set(spec: Any, n: int) -> list[int]:
    """Outer iterations asked for: "all", "last", an int, a range, a list, or "a:b"."""
    if n <= 0:
        return []
    if spec is None or spec == "all":
        return list(range(n))
    if spec == "last":
        return [n - 1]
    if isinstance(spec, int) and not isinstance(spec, bool):
        its = [spec]
    elif isinstance(spec, range):
        its = list(spec)
    elif isinstance(spec, str):
        try:
            if ":" in spec:
                a, b = spec.split(":", 1)
                its = list(range(int(a or 0), int(b) if b else n))
            else:
                its = [int(x) for x in spec.replace(",", " ").split()]
        except ValueError as exc:
            raise PlanningError(
                f"iterations={spec!r} is not understood; use 'all', 'last', '3', '0:5' or '1,4,7'"
            ) from exc
    elif isinstance(spec, Sequence):
        its = list(spec)
    else:
        raise PlanningError(f"iterations={spec!r} is not understood; use 'all', 'last', a list or a range")
    if any(not isinstance(i, int) or isinstance(i, bool) for i in its):
        raise PlanningError(f"iterations must be integers, got {its!r}")
    return sorted({i if i >= 0 else n + i for i in its if -n <= i < n})


def patch_of(patches: Iterable[VersionPatch], version: str, script: str | None) -> VersionPatch | None:
    """The patch of ``script`` at ``version``: its own where there is one, else the
    version's patch for every script; with no ``script``, the version's only patch.
    None when there is none (or several, for no ``script``)."""
    of_version = [p for p in patches if p.version == version]
    for p in of_version:
        if p.script == script:
            return p
    common = [p for p in of_version if p.script is None]
    if common:
        return common[0]
    return of_version[0] if script is None and len(of_version) == 1 else None


def task_key(run_id: str, version: str, patch: str, mode: str, start: int, stop: int,
             restore: int | None, names: Sequence[str], setup: bool, after: bool, carried: Sequence[str] = ()) -> str:
    from ..store.logs import SCHEMA_VERSION

    parts = [run_id, version, patch, mode, start, stop, restore, sorted(names), setup, after, SCHEMA_VERSION]
    if carried:  # a restore that writes carried state back computes other values than one that does not
        parts.append(sorted(carried))
    doc = json.dumps(parts)
    return hashlib.sha256(doc.encode()).hexdigest()[:20]

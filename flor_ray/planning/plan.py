"""The replay plan: frozen values and the pure function that builds them.

:func:`make_plan` reads no clock, cluster or store: the runs, their checkpoint
manifests, the propagated code, the cluster snapshot, the done partitions and the
calibration from earlier replays all come in as arguments, so a plan is
reproducible and ``explain()`` can be asserted.

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
import heapq
import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from ..store import layout
from ..store.credentials import StorageOptions, without_secrets
from ..errors import PlanningError

__all__ = [
    "CheckpointRef",
    "RunInfo",
    "VersionPatch",
    "ClusterSnapshot",
    "Calibration",
    "Resources",
    "Task",
    "SkippedRun",
    "ReplayedPart",
    "Refused",
    "DamagedCheckpoint",
    "Plan",
    "make_plan",
    "task_key",
    "iteration_set",
]

PROCESS_OVERHEAD_S = 1.5  # python start + imports of a replay process when the run did not record its set-up
RESTORE_BYTES_PER_S = 200e6  # reading + torch.load of a checkpoint, conservative for local disks and S3
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

    @property
    def digest(self) -> str:
        h = hashlib.sha256((self.code or "").encode())
        for path, code in self.modules:
            h.update(b"\0" + path.encode() + b"\0" + code.encode())
        return h.hexdigest()[:16]

    def need(self, name: str) -> tuple[str, str, tuple[str, ...]]:
        for n, kind, reason, carried in self.needs:
            if n == name:
                return kind, reason, carried
        raise PlanningError(f"version {self.version[:8]} does not log {name!r} after propagation")


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
class Calibration:
    """What earlier replays in the store took against what their plans estimated.

    The recorded timings predict a task well on an idle machine, but tasks that
    share a node slow each other down (caches, memory bandwidth, a host's
    hyper-threads): on a 2-core machine, re-executed tasks took 12% (CNN) and
    17% (LSTM) longer next to another one, and up to 35% in another run. No static model knows
    that number for a workload, so the planner learns it: each sample is one
    finished task, ``(run_id, script, mode, per_node, base_s, actual_s)``: its mode,
    how many replay tasks ran on its node at once (on average over its time,
    rounded), its estimate before calibration and its time without the worker's cold
    start. A new task's estimate is scaled by ``sum(actual) / sum(base)`` over the
    samples of the same mode and per-node concurrency, of the same run if there are
    any, else of the same script; without any it is left as it is.
    """

    samples: tuple[tuple[str, str, str, int, float, float], ...] = ()

    #: a factor is kept within these bounds: one odd replay must not wreck the next plan
    BOUNDS = (0.5, 3.0)

    @functools.cached_property
    def _sums(self) -> dict[tuple[str, str, str, int], list]:
        """(("run" | "script", its id, mode, per_node)) -> [sum of base_s, sum of actual_s, samples]:
        one pass over the samples, however many tasks the plan asks about."""
        sums: dict[tuple[str, str, str, int], list] = {}
        for run_id, script, mode, per_node, base, actual in self.samples:
            if base <= 0:
                continue
            for k in (("run", run_id, mode, per_node), ("script", script, mode, per_node)):
                acc = sums.setdefault(k, [0.0, 0.0, 0])
                acc[0] += base
                acc[1] += actual
                acc[2] += 1
        return sums

    def factor(self, run_id: str, script: str, mode: str, per_node: int) -> tuple[float, int]:
        """(factor, samples it rests on) for a task of ``run_id``'s ``mode`` run
        ``per_node`` to a node; (1.0, 0) when nothing comparable ran before."""
        for k in (("run", run_id, mode, per_node), ("script", script, mode, per_node)):
            acc = self._sums.get(k)
            if acc:
                return min(max(acc[1] / acc[0], self.BOUNDS[0]), self.BOUNDS[1]), acc[2]
        return 1.0, 0


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

    def spec(self, store_url: str, storage_options: Mapping[str, Any], run: RunInfo) -> dict:
        return {
            "numerics": dict(run.numerics) if run.numerics else None,
            "store": store_url,
            # credentials stay with the driver: a task takes its own from its environment
            "storage_options": without_secrets(storage_options),
            "run_id": self.run_id,
            "version": self.version,
            "script": self.script,
            "args": dict(run.args),
            "mode": self.mode,
            "start": self.start,
            "stop": self.stop,
            "restore": self.restore.as_dict() if self.restore else None,
            "checkpoints": {str(c.iteration): c.as_dict() for c in self.checkpoints},
            # where to go instead when a checkpoint turns out damaged (ReplaySession)
            "fallbacks": [c.as_dict() for c in run.checkpoints if c.iteration < self.stop],
            "names": list(self.names),
            "setup": self.setup,
            "after": self.after,
            "output": self.output,
            "task": self.key,
            "carried": list(self.carried),
            "patch": self.patch,
            "iterations": list(self.iterations),
        }


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


@dataclass(frozen=True)
class SkippedRun:
    run_id: str
    version: str
    reason: str


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
    statements: tuple[tuple[str, str, str], ...] = ()  # (version, name, "kind: reason")
    retries: int = 3
    #: once per worker that has not replayed before: its zygote's imports (torch...),
    #: in parallel on all workers; not part of ``makespan_s``
    startup_s: float = 0.0
    slots: int = 1  # tasks the cluster runs at once (what makespan_s assumes)
    per_node: int = 1  # replay tasks expected to share a node (what the calibration looked up)
    #: (mode, factor, samples) applied to this plan's estimates, from :class:`Calibration`
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

    def patch(self, version: str) -> VersionPatch:
        for p in self.patches:
            if p.version == version:
                return p
        raise KeyError(version)

    @property
    def pending(self) -> tuple[Task, ...]:
        return tuple(t for t in self.tasks if not t.done)

    def explain(self) -> str:
        from .explain import explain

        return explain(self)

    def run(self, *, progress: bool = True, ray_address: str | None = None):
        from ..execution.driver import run_plan

        return run_plan(self, progress=progress, ray_address=ray_address)


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


def task_key(run_id: str, version: str, patch: str, mode: str, start: int, stop: int,
             restore: int | None, names: Sequence[str], setup: bool, after: bool, carried: Sequence[str] = ()) -> str:
    from ..store.logs import SCHEMA_VERSION

    parts = [run_id, version, patch, mode, start, stop, restore, sorted(names), setup, after, SCHEMA_VERSION]
    if carried:  # a restore that writes carried state back computes other values than one that does not
        parts.append(sorted(carried))
    doc = json.dumps(parts)
    return hashlib.sha256(doc.encode()).hexdigest()[:20]


_RANK = {"setup": 0, "outer": 1, "after": 2, "inner": 3}


def _iter_cost(run: RunInfo, i: int, skip: bool) -> float:
    """Recorded time of outer iteration ``i`` that a replay repeats: all of it, or
    (``skip``) the outer-level code only; never the recording's checkpoint capture."""
    if i < len(run.outer_s):
        total = run.outer_s[i] - (run.checkpoint_s[i] if i < len(run.checkpoint_s) else 0.0)
        inner = run.inner_s[i] if i < len(run.inner_s) else 0.0
        return max(total - inner, 0.0) if skip else max(total, 0.0)
    if run.outer_s:  # not recorded (the run stopped before): the mean of those that were
        return sum(_iter_cost(run, j, skip) for j in range(len(run.outer_s))) / len(run.outer_s)
    return 0.0


def _restore_cost(c: CheckpointRef | None) -> float:
    return 0.0 if c is None or not c.bytes else 0.02 + c.bytes / RESTORE_BYTES_PER_S


# ------------------------------------------------------------------- the planner
def make_plan(
    *,
    names: Sequence[str],
    where: str | None,
    iterations: Any,
    runs: Sequence[RunInfo],
    patches: Mapping[str, VersionPatch],
    cluster: ClusterSnapshot,
    resources: Resources = Resources(),
    done_keys: frozenset[str] = frozenset(),
    store_url: str = "",
    storage_options: Mapping[str, Any] | None = None,
    retries: int = 3,
    calibration: Calibration = Calibration(),
    damaged: Sequence[DamagedCheckpoint] = (),
    replayed: Sequence[ReplayedPart] = (),
    skipped_runs: Sequence[SkippedRun] = (),
) -> Plan:
    names = tuple(names)
    tasks: list[Task] = []
    skipped: list[SkippedRun] = list(skipped_runs)
    statements: list[tuple[str, str, str]] = []
    refused: dict[tuple[str, str], Refused] = {}
    seen_versions: set[str] = set()
    cpus = {r.run_id: _task_cpus(r, resources, cluster) for r in runs}
    slots = max(1, int(cluster.num_cpus // max([c for c, _ in cpus.values()] or [1.0])))
    per_run_target = max(1, math.ceil(slots / max(1, len(runs))))
    runs = _without_damaged(runs, damaged)
    parts_of: dict[str, list[ReplayedPart]] = {}
    for part in replayed:
        parts_of.setdefault(part.run_id, []).append(part)

    for run in runs:
        patch = patches.get(run.version)
        if patch is None or patch.code is None:
            reason = patch.error if patch is not None else "no propagated code for this version"
            skipped.append(SkippedRun(run.run_id, run.version, f"propagation failed: {reason}"))
            continue
        run_names = _placed_names(patch, names, refused)
        if not run_names:
            skipped.append(SkippedRun(run.run_id, run.version, f"none of {', '.join(names)} can be placed in version "
                                      f"{run.version[:8]} (see the skipped names)"))
            continue
        if run.iterations == 0:
            skipped.append(SkippedRun(run.run_id, run.version, "the run completed no outer iteration"))
            continue
        kinds = {}
        carried: set[str] = set()
        for n in run_names:
            kind, reason, car = patch.need(n)
            kinds[n] = kind
            carried |= set(car)
            if run.version not in seen_versions:
                statements.append((run.version, n, f"{kind}: {reason}"))
        seen_versions.add(run.version)
        want = iteration_set(iterations, run.iterations)
        if not want and any(k != "setup" for k in kinds.values()):
            skipped.append(SkippedRun(run.run_id, run.version,
                                      f"iterations={iterations} selects none of its iterations 0..{run.iterations - 1}"))
            continue
        if any(k == "after" for k in kinds.values()) and run.iterations - 1 not in want:
            want.append(run.iterations - 1)
        ctx = _RunContext(run, patch, tuple(run_names), kinds, frozenset(carried), resources, per_run_target,
                          done_keys, cpus[run.run_id][0])
        run_tasks = _run_tasks(ctx, want)
        own = [p for p in parts_of.get(run.run_id, ()) if p.patch == patch.digest]
        if own:
            run_tasks = _leave_out_replayed(ctx, run_tasks, own)
        tasks.extend(run_tasks)

    # tasks that will share a node: the calibration's key
    n_pending = sum(not t.done for t in tasks)
    nodes = max(1, int(cluster.nodes))
    per_node = max(1, min(max(1, slots // nodes), math.ceil(n_pending / nodes))) if n_pending else 1
    calibrated: dict[str, tuple[float, int, int]] = {}  # mode -> (sum of factors, tasks, most samples)
    for i, t in enumerate(tasks):
        f, n = calibration.factor(t.run_id, t.script, t.mode, per_node)
        if n:
            tasks[i] = _replace(t, estimate_s=round(t.estimate_s * f, 3), factor=round(f, 4))
            if not t.done:
                c = calibrated.get(t.mode, (0.0, 0, 0))
                calibrated[t.mode] = (c[0] + f, c[1] + 1, max(c[2], n))
    # unrounded: explain() rounds once (rounding here too turned 1.4049 into "1.41")
    calibrated_summary = tuple((m, fs / k, n) for m, (fs, k, n) in sorted(calibrated.items()))
    makespan = _makespan([t.estimate_s for t in tasks if not t.done], slots)
    busy = {t.run_id for t in tasks if not t.done}
    startup = max((r.imports_s + ZYGOTE_EXTRA_S for r in runs if r.run_id in busy), default=0.0)
    from ..numerics import describe

    numerics = tuple((r.run_id, describe(r.numerics), cpus[r.run_id][1]) for r in runs
                     if any(t.run_id == r.run_id for t in tasks))
    return Plan(names, where, str(iterations), store_url, StorageOptions(storage_options or {}), tuple(runs),
                tuple(patches.values()), tuple(tasks), tuple(skipped), cluster, round(makespan, 3),
                tuple(statements), retries, round(startup, 3), slots, per_node, calibrated_summary,
                tuple(refused.values()), tuple(damaged), numerics)


def _placed_names(patch: VersionPatch, names: Sequence[str], refused: dict[tuple[str, str], Refused]) -> tuple[str, ...]:
    """The requested names this run's version can replay; counts the refused ones per version."""
    placed = []
    for n in names:
        why = patch.refusal(n)
        if why is None:
            placed.append(n)
            continue
        r = refused.get((patch.version, n)) or Refused(patch.version, n, why)
        refused[(patch.version, n)] = _replace(r, runs=r.runs + 1)
    return tuple(placed)


def _without_damaged(runs: Sequence[RunInfo], damaged: Sequence[DamagedCheckpoint]) -> list[RunInfo]:
    """The runs with their damaged checkpoints left out of their manifests."""
    import dataclasses

    bad = {(d.run_id, d.path) for d in damaged}
    if not bad:
        return list(runs)
    return [dataclasses.replace(r, checkpoints=tuple(c for c in r.checkpoints if (r.run_id, c.path) not in bad))
            for r in runs]


def _task_cpus(run: RunInfo, resources: Resources, cluster: ClusterSnapshot) -> tuple[float, str]:
    """(CPUs per task of ``run``, why) for explain().

    A task restores the recording's intra-op thread count whatever CPUs it gets:
    the thread count decides how float reductions are split, so it is the price of
    exact values. A task therefore asks for as many CPUs as the recording had
    threads (no other task's threads compete with its own), at most a node's.
    A user's ``num_cpus`` wins (they may prefer more tasks at once over each
    task's speed), and the threads are still restored: exactness first, speed second.
    """
    n = run.threads
    if resources.num_cpus is not None:
        c = float(resources.num_cpus)
        if n and c < n:
            return c, (f"cpus={c:g} from resources; threads restored to the recorded {n}, "
                       f"{n} threads on {c:g} CPU{'s' if c != 1 else ''} may oversubscribe (slower, same values)")
        return c, f"cpus={c:g} from resources"
    if not n:
        return 1.0, "cpus=1: no numerics recorded, threads follow the node"
    cap = max(1.0, math.floor(cluster.max_node_cpus))
    if n > cap:
        return cap, (f"cpus={cap:g}: the recorded {n} threads capped to the largest node's {cap:g} CPUs; "
                     f"threads restored to {n}, oversubscribed (slower, same values)")
    return float(n), f"cpus={n} from the recorded threads"


@dataclass(frozen=True)
class _RunContext:
    """What planning one run's tasks needs besides the iterations."""

    run: RunInfo
    patch: VersionPatch
    names: tuple[str, ...]
    kinds: Mapping[str, str]
    carried: frozenset[str]
    resources: Resources
    per_run_target: int
    done_keys: frozenset[str]
    cpus: float  # per task: the run's recorded threads, capped (see _task_cpus)


def _run_tasks(ctx: _RunContext, want: Sequence[int], edges: bool = True, need_after: bool = True) -> list[Task]:
    """The tasks of one run that keep the rows of iterations ``want``.

    ``edges``: the rows before the outer loop are still to be kept (by the first
    task); ``need_after``: those after it. With ``edges`` False (iterations left
    over by earlier replays) a gap in ``want`` is never re-executed to be kept.
    """
    run, patch, names, kinds, resources = ctx.run, ctx.patch, ctx.names, ctx.kinds, ctx.resources
    tasks: list[Task] = []
    worst = max(kinds.values(), key=_RANK.__getitem__) if kinds else "setup"
    need_after = need_after and any(k == "after" for k in kinds.values())
    need_setup = edges and any(k == "setup" for k in kinds.values())
    gpus = resources.num_gpus if resources.num_gpus is not None else (1.0 if run.device == "cuda" else 0.0)
    keep_reexec = sorted(set(names) | (set(patch.logged) & run.logged))
    keep_skip = sorted(
        set(names) | {n for n in patch.logged if n in run.logged and patch.need(n)[0] in ("setup", "outer", "after")}
    )
    # loop-carried state: what the requested names read (skip mode restores it where
    # the inner loops end) and what re-executed training reads besides (reexec)
    need_skip = ctx.carried
    need_reexec = need_skip | frozenset(patch.training_carried)
    restore_names = tuple(sorted(set(patch.loop_carried) | need_reexec))
    blocked = _blocked(run.checkpoints, need_reexec)
    suffix = f" (checkpoints without loop-carried {_fmt_blocked(blocked)} are not used)" if blocked else ""

    def add(mode, start, stop, restore, ckpts, keep, setup, after, note=""):
        if mode == "setup":
            est = run.replay_setup_s
        elif mode == "skip":
            est = run.replay_setup_s + sum(_iter_cost(run, c.iteration, True) + _restore_cost(c) for c in ckpts)
        else:
            first = (restore.iteration if restore else -1)
            est = run.replay_setup_s + _restore_cost(restore) + (
                _iter_cost(run, first, True) if restore else 0.0
            ) + sum(_iter_cost(run, i, False) for i in range(first + 1, stop + 1))
        car = restore_names if mode != "setup" else ()
        key = task_key(run.run_id, run.version, patch.digest, mode, start, stop,
                       restore.iteration if restore else None, keep, setup, after, car)
        tasks.append(Task(key, run.run_id, run.version, run.script, mode, start, stop, restore, tuple(ckpts),
                          tuple(keep), setup, after, ctx.cpus, gpus, resources.memory,
                          round(est, 3), note, key in ctx.done_keys, carried=car, patch=patch.digest))

    ckpts_skip = {c.iteration: c for c in run.checkpoints if c.holds(need_skip)}
    ckpts = {c.iteration: c for c in run.checkpoints if c.holds(need_reexec)}  # restore points of reexec
    if worst == "setup" or not want:
        if need_setup or worst != "setup":
            add("setup", 0, -1, None, (), sorted(set(names)), True, False)
        return tasks
    if blocked and not ckpts and (worst == "inner" or not ckpts_skip):
        for span in [list(want)] if edges else _spans(want):
            add("reexec", min(span), max(span), None, (), keep_reexec, need_setup,
                need_after and max(span) == run.iterations - 1,
                note=f"loop-carried {_fmt_blocked(blocked)} is in no checkpoint: replays from iteration 0")
        return tasks
    if worst in ("outer", "after"):
        with_ckpt = [i for i in want if i in ckpts_skip]
        without = [i for i in want if i not in ckpts_skip]
        if with_ckpt:
            unit = lambda i: _iter_cost(run, i, True) + _restore_cost(ckpts_skip[i])  # noqa: E731
            k = _worth_splitting(sum(unit(i) for i in with_ckpt), run.replay_setup_s,
                                 min(ctx.per_run_target, len(with_ckpt)))
            for ch in _split(with_ckpt, k, unit):
                add("skip", ch[0], ch[-1], None, [ckpts_skip[i] for i in ch], keep_skip, False,
                    need_after and ch[-1] == run.iterations - 1)
        # iterations without a checkpoint re-execute from the nearest earlier one
        for group in _group_by_restore(without, ckpts):
            restore = group[0]
            start, stop = group[1][0], group[1][-1]
            note = (f"no checkpoint for iteration{'s' if len(group[1]) > 1 else ''} {_fmt_its(group[1])}: "
                    + (f"re-executes from checkpoint {restore.iteration}" if restore else "re-executes from iteration 0"))
            add("reexec", start, stop, restore, (), keep_skip, False, need_after and stop == run.iterations - 1,
                note + suffix)
    else:
        for seg in _reexec_segments(ctx, ckpts, [list(range(min(want), max(want) + 1))] if edges else _spans(want)):
            a, b = seg[0], seg[-1]
            restore = _nearest(ckpts, a - 1)
            note = ""
            if a > 0 and (restore is None or restore.iteration != a - 1):
                note = (f"no checkpoint at iteration {a - 1}: " + (
                    f"re-executes from checkpoint {restore.iteration}" if restore else "re-executes from iteration 0")
                    + suffix)
            add("reexec", a, b, restore, (), keep_reexec, False, need_after and b == run.iterations - 1, note)
    if edges and tasks:
        # rows logged before the outer loop are kept by the run's first task only
        t0 = min(tasks, key=lambda t: t.start)
        idx = tasks.index(t0)
        key = task_key(run.run_id, run.version, patch.digest, t0.mode, t0.start, t0.stop,
                       t0.restore.iteration if t0.restore else None, t0.names, True, t0.after, t0.carried)
        tasks[idx] = _replace(t0, setup=True, key=key, done=key in ctx.done_keys)
    return tasks


def _spans(its: Sequence[int]) -> list[list[int]]:
    """``its`` as runs of consecutive iterations."""
    spans: list[list[int]] = []
    for i in sorted(set(its)):
        if spans and spans[-1][-1] == i - 1:
            spans[-1].append(i)
        else:
            spans.append([i])
    return spans


def _reexec_segments(ctx: _RunContext, ckpts: Mapping[int, CheckpointRef],
                     spans: Sequence[Sequence[int]]) -> list[list[int]]:
    """Each span cut where a checkpoint (of ``ckpts``, the restore points) lets a
    segment start, merged to the number of segments its work is worth."""
    run = ctx.run
    cost = {i: _iter_cost(run, i, False) for span in spans for i in span}
    out: list[list[int]] = []
    for span in spans:
        # split points: a segment may start at s when a checkpoint exists at s - 1
        starts = [span[0]] + [i for i in span[1:] if (i - 1) in ckpts]
        pieces = [list(range(a, b)) for a, b in zip(starts, starts[1:] + [span[-1] + 1])]
        target = _worth_splitting(sum(cost[i] for i in span), run.replay_setup_s,
                                  min(ctx.per_run_target, len(pieces)))
        out += _merge(pieces, target, lambda p: sum(cost[i] for i in p) + run.replay_setup_s)
    return out


def _leave_out_replayed(ctx: _RunContext, tasks: list[Task], parts: Sequence[ReplayedPart]) -> list[Task]:
    """The run's tasks without what finished partitions of the same code hold.

    A pending task whose iterations (and rows before / after the loop) they hold for
    every requested name is marked done; one they hold in part is planned again for
    the rest only. Tasks of the same query stay as they are (a rerun finds them done).
    """
    names = set(ctx.names)
    held = {i for i in range(ctx.run.iterations)
            if names <= set().union(*(p.names for p in parts if i in p.iterations))}
    setup_held = names <= set().union(*(p.names for p in parts if p.setup))
    after_held = names <= set().union(*(p.names for p in parts if p.after))
    out: list[Task] = []
    redo: set[int] = set()
    left_out: set[int] = set()
    by = ", ".join(sorted(p.key[:8] for p in parts))
    for t in tasks:
        its = set(t.iterations)
        edges_held = (not t.setup or setup_held) and (not t.after or after_held)
        if t.done or not (its & held) and not (t.mode == "setup" and setup_held):
            if not t.done and t.setup and t.mode != "setup" and setup_held:
                # the rows before the outer loop are held already: not kept again
                key = task_key(t.run_id, t.version, t.patch, t.mode, t.start, t.stop,
                               t.restore.iteration if t.restore else None, t.names, False, t.after, t.carried)
                t = _replace(t, setup=False, key=key, done=key in ctx.done_keys)
            out.append(t)
        elif its <= held and edges_held:
            out.append(_replace(t, done=True, note=f"held already by task {by}"))
        else:
            redo |= its - held
            left_out |= its & held
    if redo:
        # an iteration held already splits a re-executed segment: each span replays apart
        said = f"iteration{'s' if len(left_out) > 1 else ''} {_fmt_its(sorted(left_out))} held already by task {by}"
        out += [_replace(t, note=f"{t.note}; {said}" if t.note else said)
                for t in _run_tasks(ctx, sorted(redo), edges=False, need_after=not after_held)]
    return out


def _replace(task: Task, **kw: Any) -> Task:
    import dataclasses

    return dataclasses.replace(task, **kw)


def _blocked(checkpoints: Sequence[CheckpointRef], names: frozenset[str]) -> dict[str, str]:
    """Loop-carried ``names`` that some checkpoint does not hold, each with why (the latest's word)."""
    out: dict[str, str] = {}
    for c in checkpoints:
        why = dict(c.not_carried)
        for n in sorted(names - set(c.carried or ())):
            if c.carried is None:
                out[n] = "checkpoints recorded before flor_ray captured loop-carried state"
            else:
                out[n] = why.get(n, "not bound, or not a value flor_ray captures, when the checkpoint was taken")
    return out


def _fmt_blocked(blocked: Mapping[str, str]) -> str:
    return ", ".join(f"{n} ({why})" for n, why in sorted(blocked.items()))


def _nearest(ckpts: Mapping[int, CheckpointRef], i: int) -> CheckpointRef | None:
    best = [c for c in ckpts if c <= i]
    return ckpts[max(best)] if best else None


def _group_by_restore(its: Sequence[int], ckpts: Mapping[int, CheckpointRef]):
    groups: dict[int, tuple[CheckpointRef | None, list[int]]] = {}
    for i in its:
        r = _nearest(ckpts, i - 1)
        k = r.iteration if r else -1
        groups.setdefault(k, (r, []))[1].append(i)
    return [groups[k] for k in sorted(groups)]


def _fmt_its(its: Sequence[int]) -> str:
    its = list(its)
    if len(its) > 2 and its == list(range(its[0], its[-1] + 1)):
        return f"{its[0]}..{its[-1]}"
    return ", ".join(map(str, its))


def _worth_splitting(work: float, setup: float, k_max: int) -> int:
    """How many segments a run's work is worth: each segment pays the set-up again
    (a process start, imports, data loading), so a split must save more than that.
    With ``k`` segments on free workers the run takes ``setup + work / k``; each
    extra segment also costs ``setup`` of worker time that other runs could use, so
    we split only while a segment's share of the work stays above its set-up."""
    if setup <= 0:
        return max(1, k_max)
    return max(1, min(k_max, int(work // setup)))


def _split(items: Sequence[int], k: int, cost) -> list[list[int]]:
    """Contiguous chunks of ``items`` with balanced cost (k chunks at most)."""
    if k <= 1:
        return [list(items)]
    total = sum(cost(i) for i in items) or len(items)
    target = total / k
    chunks, cur, acc = [], [], 0.0
    for i in items:
        c = cost(i) or total / len(items)
        if cur and acc + c / 2 > target and len(chunks) < k - 1:
            chunks.append(cur)
            cur, acc = [], 0.0
        cur.append(i)
        acc += c
    chunks.append(cur)
    return chunks


def _merge(pieces: list[list[int]], k: int, cost) -> list[list[int]]:
    """Merge adjacent pieces until at most ``k`` remain, cheapest neighbours first."""
    pieces = [list(p) for p in pieces]
    while len(pieces) > k:
        j = min(range(len(pieces) - 1), key=lambda j: cost(pieces[j] + pieces[j + 1]))
        pieces[j : j + 2] = [pieces[j] + pieces[j + 1]]
    return pieces


def _makespan(costs: Sequence[float], workers: int) -> float:
    """Longest-processing-time-first list scheduling on ``workers`` slots."""
    loads = [0.0] * max(1, workers)
    heapq.heapify(loads)
    for c in sorted(costs, reverse=True):
        heapq.heappush(loads, heapq.heappop(loads) + c)
    return max(loads) if loads else 0.0

"""The planner: :func:`make_plan`, a pure function composed of passes.

1. per run (:func:`_run_pass`): the version's placed names, their needs, the
   iterations asked for, the run's tasks (:mod:`~flor_ray.planning.segments`),
   less what finished replay partitions of the same code hold;
2. :func:`_calibrate`: each task's estimate scaled by what earlier replays of the
   same mode and per-node concurrency took (:class:`~flor_ray.planning.cost.Calibration`);
3. :func:`_assemble`: the makespan on the cluster's slots, the cold start, the
   numerics lines, the :class:`~flor_ray.planning.plan.Plan`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from ..store.credentials import StorageOptions
from .cost import Calibration, task_cpus
from .plan import (ZYGOTE_EXTRA_S, ClusterSnapshot, DamagedCheckpoint, Plan, Refused, ReplayedPart, Resources,
                   RunInfo, SkipKind, SkippedRun, Task, VersionPatch, iteration_set, patch_of)
from .schedule import makespan
from .segments import RunContext, leave_out_replayed, run_tasks

__all__ = ["make_plan"]


@dataclass
class _Acc:
    """What the per-run pass gathers over the plan's runs."""

    tasks: list[Task] = field(default_factory=list)
    skipped: list[SkippedRun] = field(default_factory=list)
    statements: list[tuple[str, str, str]] = field(default_factory=list)
    refused: dict[tuple[str, str], Refused] = field(default_factory=dict)
    seen_patches: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class _Inputs:
    """make_plan's arguments that every run's pass reads."""

    names: tuple[str, ...]
    iterations: Any
    patches: Mapping[str, VersionPatch]
    resources: Resources
    done_keys: frozenset[str]
    per_run_target: int
    cpus: Mapping[str, tuple[float, str]]  # run_id -> (CPUs per task, why)
    parts_of: Mapping[str, Sequence[ReplayedPart]]


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
    """The plan of a replay from its inputs alone (no clock, cluster or store read)."""
    cpus = {r.run_id: task_cpus(r, resources, cluster) for r in runs}
    slots = max(1, int(cluster.num_cpus // max([c for c, _ in cpus.values()] or [1.0])))
    parts_of: dict[str, list[ReplayedPart]] = {}
    for part in replayed:
        parts_of.setdefault(part.run_id, []).append(part)
    inputs = _Inputs(tuple(names), iterations, patches, resources, done_keys,
                     max(1, math.ceil(slots / max(1, len(runs)))), cpus, parts_of)
    runs = _without_damaged(runs, damaged)
    acc = _Acc(skipped=list(skipped_runs))
    for run in runs:
        _run_pass(inputs, run, acc)
    per_node = _per_node(acc.tasks, slots, cluster)
    tasks, calibrated = _calibrate(acc.tasks, calibration, per_node)
    busy = {t.run_id for t in tasks if not t.done}
    startup = max((r.imports_s + ZYGOTE_EXTRA_S for r in runs if r.run_id in busy), default=0.0)
    from ..numerics import describe

    tasked = {t.run_id for t in tasks}
    numerics = tuple((r.run_id, describe(r.numerics), cpus[r.run_id][1]) for r in runs if r.run_id in tasked)
    return Plan(
        names=inputs.names, where=where, iterations=str(iterations), store_url=store_url,
        storage_options=StorageOptions(storage_options or {}), runs=tuple(runs), patches=tuple(patches.values()),
        tasks=tuple(tasks), skipped=tuple(acc.skipped), cluster=cluster,
        makespan_s=round(makespan([t.estimate_s for t in tasks if not t.done], slots), 3),
        statements=tuple(acc.statements), retries=retries, startup_s=round(startup, 3), slots=slots,
        per_node=per_node, calibrated=calibrated, refused=tuple(acc.refused.values()), damaged=tuple(damaged),
        numerics=numerics)


def _skip(acc: _Acc, run: RunInfo, kind: SkipKind, reason: str) -> None:
    acc.skipped.append(SkippedRun(run.run_id, run.version, reason, kind))


def _run_pass(inp: _Inputs, run: RunInfo, acc: _Acc) -> None:
    """One run's tasks into ``acc``, or the reason it is skipped."""
    patch = patch_of(inp.patches.values(), run.version, run.script)
    if patch is None or patch.code is None:
        reason = patch.error if patch is not None else "no propagated code for this version"
        return _skip(acc, run, SkipKind.PROPAGATION_FAILED, f"propagation failed: {reason}")
    run_names = _placed_names(patch, inp.names, acc.refused)
    if not run_names:
        return _skip(acc, run, SkipKind.NOTHING_PLACED, f"none of {', '.join(inp.names)} can be placed in "
                     f"version {run.version[:8]} (see the skipped names)")
    if run.iterations == 0:
        return _skip(acc, run, SkipKind.NO_ITERATIONS, "the run completed no outer iteration")
    kinds = {}
    carried: set[str] = set()
    for n in run_names:
        kind, reason, car = patch.need(n)
        kinds[n] = kind
        carried |= set(car)
        if patch.label not in acc.seen_patches:
            acc.statements.append((patch.label, n, f"{kind}: {reason}"))
    acc.seen_patches.add(patch.label)
    want = iteration_set(inp.iterations, run.iterations)
    if not want and any(k != "setup" for k in kinds.values()):
        return _skip(acc, run, SkipKind.OUT_OF_RANGE, f"iterations={inp.iterations} selects none of its "
                     f"iterations 0..{run.iterations - 1}")
    if any(k == "after" for k in kinds.values()) and run.iterations - 1 not in want:
        want.append(run.iterations - 1)
    ctx = RunContext(run, patch, tuple(run_names), kinds, frozenset(carried), inp.resources, inp.per_run_target,
                     inp.done_keys, inp.cpus[run.run_id][0])
    tasks = run_tasks(ctx, want)
    own = [p for p in inp.parts_of.get(run.run_id, ()) if p.patch == patch.digest]
    acc.tasks.extend(leave_out_replayed(ctx, tasks, own) if own else tasks)


def _per_node(tasks: Sequence[Task], slots: int, cluster: ClusterSnapshot) -> int:
    """Replay tasks expected to share a node: the calibration's key."""
    n_pending = sum(not t.done for t in tasks)
    nodes = max(1, int(cluster.nodes))
    return max(1, min(max(1, slots // nodes), math.ceil(n_pending / nodes))) if n_pending else 1


def _calibrate(tasks: Sequence[Task], calibration: Calibration,
               per_node: int) -> tuple[list[Task], tuple[tuple[str, float, int], ...]]:
    """The tasks with calibrated estimates, and per mode (mode, mean factor, most samples)."""
    out = list(tasks)
    calibrated: dict[str, tuple[float, int, int]] = {}  # mode -> (sum of factors, tasks, most samples)
    for i, t in enumerate(out):
        f, n = calibration.factor(t.run_id, t.script, t.mode, per_node)
        if n:
            out[i] = dataclasses.replace(t, estimate_s=round(t.estimate_s * f, 3), factor=round(f, 4))
            if not t.done:
                c = calibrated.get(t.mode, (0.0, 0, 0))
                calibrated[t.mode] = (c[0] + f, c[1] + 1, max(c[2], n))
    # unrounded: explain() rounds once (rounding here too turned 1.4049 into "1.41")
    return out, tuple((m, fs / k, n) for m, (fs, k, n) in sorted(calibrated.items()))


def _placed_names(patch: VersionPatch, names: Sequence[str], refused: dict[tuple[str, str], Refused]) -> tuple[str, ...]:
    """The requested names this run's version can replay; counts the refused ones per version."""
    placed = []
    for n in names:
        why = patch.refusal(n)
        if why is None:
            placed.append(n)
            continue
        r = refused.get((patch.label, n)) or Refused(patch.version, n, why)
        refused[(patch.label, n)] = dataclasses.replace(r, runs=r.runs + 1)
    return tuple(placed)


def _without_damaged(runs: Sequence[RunInfo], damaged: Sequence[DamagedCheckpoint]) -> list[RunInfo]:
    """The runs with their damaged checkpoints left out of their manifests."""
    bad = {(d.run_id, d.path) for d in damaged}
    if not bad:
        return list(runs)
    return [dataclasses.replace(r, checkpoints=tuple(c for c in r.checkpoints if (r.run_id, c.path) not in bad))
            for r in runs]

"""The cost model: what a replay task repeats of the recording, the CPUs it asks,
and the calibration learnt from earlier replays."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

from .plan import CheckpointRef, ClusterSnapshot, Resources, RunInfo

__all__ = ["RESTORE_BYTES_PER_S", "CalibrationSample", "Calibration", "iter_cost", "iteration_costs", "span_cost", "restore_cost", "task_cpus"]

RESTORE_BYTES_PER_S = 200e6  # reading + torch.load of a checkpoint, conservative for local disks and S3


class CalibrationSample(NamedTuple):
    """One finished task of an earlier replay."""

    run_id: str
    script: str
    mode: str
    per_node: int  # replay tasks on its node at once, on average over its time, rounded
    base_s: float  # its estimate before calibration
    actual_s: float  # its time without the worker's cold start


@dataclass(frozen=True)
class Calibration:
    """What earlier replays in the store took against what their plans estimated.

    The recorded timings predict a task well on an idle machine, but tasks that
    share a node slow each other down (caches, memory bandwidth, a host's
    hyper-threads): on a 2-core machine, re-executed tasks took 12% (CNN) and
    17% (LSTM) longer next to another one, and up to 35% in another run. No static model knows
    that number for a workload, so the planner learns it: each sample is one
    finished task, a :class:`CalibrationSample`: its mode,
    how many replay tasks ran on its node at once (on average over its time,
    rounded), its estimate before calibration and its time without the worker's cold
    start. A new task's estimate is scaled by ``sum(actual) / sum(base)`` over the
    samples of the same mode and per-node concurrency, of the same run if there are
    any, else of the same script; without any it is left as it is.
    """

    samples: tuple[CalibrationSample, ...] = ()

    #: a factor is kept within these bounds: one odd replay must not wreck the next plan
    BOUNDS = (0.5, 3.0)

    @functools.cached_property
    def _sums(self) -> dict[tuple[str, str, str, int], list]:
        """(("run" | "script", its id, mode, per_node)) -> [sum of base_s, sum of actual_s, samples]:
        one pass over the samples, however many tasks the plan asks about."""
        sums: dict[tuple[str, str, str, int], list] = {}
        for s in self.samples:
            if s.base_s <= 0:
                continue
            for k in (("run", s.run_id, s.mode, s.per_node), ("script", s.script, s.mode, s.per_node)):
                acc = sums.setdefault(k, [0.0, 0.0, 0])
                acc[0] += s.base_s
                acc[1] += s.actual_s
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


#: iteration_costs of the timings seen last: runs of one shape (a sweep's) share them
_COSTS: dict[tuple, tuple[tuple[float, ...], tuple[float, ...]]] = {}
_COSTS_MAX = 4096


def iteration_costs(outer_s: tuple[float, ...], inner_s: tuple[float, ...], checkpoint_s: tuple[float, ...],
                    ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per recorded outer iteration, the recorded time a replay repeats: (all of it, the
    outer-level code only); never the recording's checkpoint capture."""
    key = (outer_s, inner_s, checkpoint_s)
    hit = _COSTS.get(key)
    if hit is not None:
        return hit
    full, skip = [], []
    n_ck, n_in = len(checkpoint_s), len(inner_s)
    for i, o in enumerate(outer_s):
        total = o - (checkpoint_s[i] if i < n_ck else 0.0)
        inner = inner_s[i] if i < n_in else 0.0
        full.append(max(total, 0.0))
        skip.append(max(total - inner, 0.0))
    if len(_COSTS) >= _COSTS_MAX:
        _COSTS.clear()
    out = _COSTS[key] = (tuple(full), tuple(skip))
    return out


def iter_cost(run: RunInfo, i: int, skip: bool) -> float:
    """Recorded time of outer iteration ``i`` that a replay repeats: all of it, or
    (``skip``) the outer-level code only; never the recording's checkpoint capture."""
    costs = run.iteration_costs[skip]
    if i < len(costs):
        return costs[i]
    if costs:  # not recorded (the run stopped before): the mean of those that were
        return sum(costs) / len(costs)
    return 0.0


def span_cost(run: RunInfo, start: int, stop: int, skip: bool = False) -> float:
    """``sum(iter_cost(run, i, skip) for i in range(start, stop))``, the same number
    (the same terms added in the same order) without a call per iteration."""
    costs = run.iteration_costs[skip]
    if 0 <= start and stop <= len(costs):
        return sum(costs[start:stop])
    return sum([iter_cost(run, i, skip) for i in range(start, stop)])


def restore_cost(c: CheckpointRef | None) -> float:
    return 0.0 if c is None or not c.bytes else 0.02 + c.bytes / RESTORE_BYTES_PER_S



def task_cpus(run: RunInfo, resources: Resources, cluster: ClusterSnapshot) -> tuple[float, str]:
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

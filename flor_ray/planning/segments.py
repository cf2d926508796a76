"""One run's tasks: the segments of its requested iterations, by mode.

Per run, the most demanding need of the requested names decides the mode (see
:mod:`flor_ray.planning.plan`): ``setup`` only, ``skip`` from each iteration's
checkpoint, ``reexec`` of segments cut where checkpoints let one start, or a
re-execution from iteration 0 where no checkpoint holds the loop-carried state.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from .cost import iter_cost, restore_cost, span_cost
from .plan import CheckpointRef, ReplayedPart, Resources, RunInfo, Task, VersionPatch, task_key
from .schedule import merge, split, worth_splitting

__all__ = ["RunContext", "RANK", "run_tasks", "leave_out_replayed"]

#: needs from the least to the most demanding: the run's worst one decides its mode
RANK = {"setup": 0, "outer": 1, "after": 2, "inner": 3}


@dataclass(frozen=True)
class RunContext:
    """What planning one run's tasks needs besides the iterations."""

    run: RunInfo
    patch: VersionPatch
    names: tuple[str, ...]
    kinds: Mapping[str, str]
    carried: frozenset[str]
    resources: Resources
    per_run_target: int
    done_keys: frozenset[str]
    cpus: float  # per task: the run's recorded threads, capped (see cost.task_cpus)


class _Tasks:
    """The tasks of one run as they are built, with what each of them needs to know."""

    def __init__(self, ctx: RunContext, edges: bool, need_after: bool):
        run, patch, names, kinds = ctx.run, ctx.patch, ctx.names, ctx.kinds
        self.ctx, self.run, self.patch, self.edges = ctx, run, patch, edges
        self.tasks: list[Task] = []
        self.worst = max(kinds.values(), key=RANK.__getitem__) if kinds else "setup"
        self.need_after = need_after and any(k == "after" for k in kinds.values())
        self.need_setup = edges and any(k == "setup" for k in kinds.values())
        #: no requested name is logged in the loop: only the state at its end is needed
        self.only_after = all(k == "setup" or (k == "after" and n in patch.only_after) for n, k in kinds.items())
        res = ctx.resources
        self.gpus = res.num_gpus if res.num_gpus is not None else (1.0 if run.device == "cuda" else 0.0)
        self.keep_reexec = sorted(set(names) | (set(patch.logged) & run.logged))
        # loop-carried state: what the requested names read (skip mode restores it where
        # the inner loops end) and what re-executed training reads besides (reexec)
        need_skip = ctx.carried
        need_reexec = need_skip | frozenset(patch.training_carried)
        self.restore_names = tuple(sorted(set(patch.loop_carried) | need_reexec))
        self.blocked = _blocked(run.checkpoints, need_reexec)
        self.suffix = (f" (checkpoints without loop-carried {_fmt_blocked(self.blocked)} are not used)"
                       if self.blocked else "")
        self.ckpts_skip = {c.iteration: c for c in run.checkpoints if c.holds(need_skip)}
        self.ckpts = {c.iteration: c for c in run.checkpoints if c.holds(need_reexec)}  # restore points of reexec

    @functools.cached_property
    def keep_skip(self) -> list[str]:
        """The names a skip task keeps: the requested ones and those of the run's that
        the patched code logs outside the inner loops (asked by the outer modes only)."""
        patch, run = self.patch, self.run
        return sorted(set(self.ctx.names) | {n for n in patch.logged if n in run.logged
                                             and patch.need(n)[0] in ("setup", "outer", "after")})

    def _estimate(self, mode: str, stop: int, restore: CheckpointRef | None, ckpts: Sequence[CheckpointRef]) -> float:
        run = self.run
        if mode == "setup":
            return run.replay_setup_s
        if mode == "skip":
            return run.replay_setup_s + sum(iter_cost(run, c.iteration, True) + restore_cost(c) for c in ckpts)
        first = restore.iteration if restore else -1
        return run.replay_setup_s + restore_cost(restore) + (iter_cost(run, first, True) if restore else 0.0) + \
            span_cost(run, first + 1, stop + 1)

    def add(self, mode: str, start: int, stop: int, restore: CheckpointRef | None, ckpts: Sequence[CheckpointRef],
            keep: Sequence[str], setup: bool, after: bool, note: str = "") -> None:
        run, patch, ctx = self.run, self.patch, self.ctx
        car = self.restore_names if mode != "setup" else ()
        key = task_key(run.run_id, run.version, patch.digest, mode, start, stop,
                       restore.iteration if restore else None, keep, setup, after, car)
        self.tasks.append(Task(
            key=key, run_id=run.run_id, version=run.version, script=run.script, mode=mode, start=start, stop=stop,
            restore=restore, checkpoints=tuple(ckpts), names=tuple(keep), setup=setup, after=after,
            num_cpus=ctx.cpus, num_gpus=self.gpus, memory=ctx.resources.memory,
            estimate_s=round(self._estimate(mode, stop, restore, ckpts), 3), note=note, done=key in ctx.done_keys,
            carried=car, patch=patch.digest))

    def at_end(self, stop: int) -> bool:
        """The segment ending at ``stop`` keeps the rows after the outer loop."""
        return self.need_after and stop == self.run.iterations - 1

    def from_zero(self, want: Sequence[int]) -> None:
        """No checkpoint holds the loop-carried state: re-execute from iteration 0."""
        for span in [list(want)] if self.edges else _spans(want):
            self.add("reexec", min(span), max(span), None, (), self.keep_reexec, self.need_setup,
                     self.at_end(max(span)),
                     note=f"loop-carried {_fmt_blocked(self.blocked)} is in no checkpoint: replays from iteration 0")

    def outer(self, want: Sequence[int]) -> None:
        """Outer-level names: skip from each checkpoint, re-execute where there is none."""
        run, ckpts_skip = self.run, self.ckpts_skip
        with_ckpt = [i for i in want if i in ckpts_skip]
        without = [i for i in want if i not in ckpts_skip]
        if with_ckpt:
            unit = lambda i: iter_cost(run, i, True) + restore_cost(ckpts_skip[i])  # noqa: E731
            k = worth_splitting(sum(unit(i) for i in with_ckpt), run.replay_setup_s,
                                min(self.ctx.per_run_target, len(with_ckpt)))
            for ch in split(with_ckpt, k, unit):
                self.add("skip", ch[0], ch[-1], None, [ckpts_skip[i] for i in ch], self.keep_skip, False,
                         self.at_end(ch[-1]))
        # iterations without a checkpoint re-execute from the nearest earlier one
        for restore, its in _group_by_restore(without, self.ckpts):
            note = (f"no checkpoint for iteration{'s' if len(its) > 1 else ''} {_fmt_its(its)}: "
                    + (f"re-executes from checkpoint {restore.iteration}" if restore else "re-executes from iteration 0"))
            self.add("reexec", its[0], its[-1], restore, (), self.keep_skip, False, self.at_end(its[-1]),
                     note + self.suffix)

    def end(self, want: Sequence[int]) -> None:
        """Names after the loop only: the loop's end, from the last iteration's checkpoint
        (skipped to), or re-executed from the nearest earlier one. The iterations before
        it hold no row of these names, and a replay of them could not change the state
        the last checkpoint restores."""
        last = max(want)
        if last in self.ckpts_skip:
            self.add("skip", last, last, None, [self.ckpts_skip[last]], self.keep_skip, False, True,
                     "the names are logged after the loop: its last checkpoint is restored")
            return
        restore = _nearest(self.ckpts, last - 1)
        note = (f"no checkpoint for the last iteration {last}: "
                + (f"re-executes from checkpoint {restore.iteration}" if restore else "re-executes from iteration 0"))
        self.add("reexec", last, last, restore, (), self.keep_skip, False, True, note + self.suffix)

    def inner(self, want: Sequence[int]) -> None:
        """Names inside the inner loops: re-execute segments from the nearest checkpoint."""
        spans = [list(range(min(want), max(want) + 1))] if self.edges else _spans(want)
        for seg in _reexec_segments(self.ctx, self.ckpts, spans):
            a, b = seg[0], seg[-1]
            restore = _nearest(self.ckpts, a - 1)
            note = ""
            if a > 0 and (restore is None or restore.iteration != a - 1):
                note = (f"no checkpoint at iteration {a - 1}: " + (
                    f"re-executes from checkpoint {restore.iteration}" if restore else "re-executes from iteration 0")
                    + self.suffix)
            self.add("reexec", a, b, restore, (), self.keep_reexec, False, self.at_end(b), note)

    def first_keeps_setup(self) -> None:
        """Rows logged before the outer loop are kept by the run's first task only."""
        t0 = min(self.tasks, key=lambda t: t.start)
        key = task_key(t0.run_id, t0.version, t0.patch, t0.mode, t0.start, t0.stop,
                       t0.restore.iteration if t0.restore else None, t0.names, True, t0.after, t0.carried)
        self.tasks[self.tasks.index(t0)] = _replace(t0, setup=True, key=key, done=key in self.ctx.done_keys)


def run_tasks(ctx: RunContext, want: Sequence[int], edges: bool = True, need_after: bool = True) -> list[Task]:
    """The tasks of one run that keep the rows of iterations ``want``.

    ``edges``: the rows before the outer loop are still to be kept (by the first
    task); ``need_after``: those after it. With ``edges`` False (iterations left
    over by earlier replays) a gap in ``want`` is never re-executed to be kept.
    """
    b = _Tasks(ctx, edges, need_after)
    if b.worst == "setup" or not want:
        if b.need_setup or b.worst != "setup":
            b.add("setup", 0, -1, None, (), sorted(set(ctx.names)), True, False)
        return b.tasks
    if b.blocked and not b.ckpts and (b.worst == "inner" or not b.ckpts_skip):
        b.from_zero(want)
        return b.tasks
    if b.worst == "after" and b.only_after and b.at_end(max(want)):
        b.end(want)
    elif b.worst in ("outer", "after"):
        b.outer(want)
    else:
        b.inner(want)
    if edges and b.tasks:
        b.first_keeps_setup()
    return b.tasks


def _spans(its: Sequence[int]) -> list[list[int]]:
    """``its`` as runs of consecutive iterations."""
    spans: list[list[int]] = []
    for i in sorted(set(its)):
        if spans and spans[-1][-1] == i - 1:
            spans[-1].append(i)
        else:
            spans.append([i])
    return spans


def _reexec_segments(ctx: RunContext, ckpts: Mapping[int, CheckpointRef],
                     spans: Sequence[Sequence[int]]) -> list[list[int]]:
    """Each span cut where a checkpoint (of ``ckpts``, the restore points) lets a
    segment start, merged to the number of segments its work is worth."""
    run = ctx.run
    recorded = run.iteration_costs[0]
    cost: Sequence[float] | dict[int, float] = recorded  # iteration -> iter_cost(run, i, False)
    if any(i < 0 or i >= len(recorded) for span in spans for i in (span[0], span[-1])):
        cost = {i: iter_cost(run, i, False) for span in spans for i in span}
    out: list[list[int]] = []
    for span in spans:
        # split points: a segment may start at s when a checkpoint exists at s - 1
        starts = [span[0]] + [i for i in span[1:] if (i - 1) in ckpts]
        pieces = [list(range(a, b)) for a, b in zip(starts, starts[1:] + [span[-1] + 1])]
        target = worth_splitting(sum(cost[i] for i in span), run.replay_setup_s,
                                  min(ctx.per_run_target, len(pieces)))
        out += merge(pieces, target, lambda p: sum(cost[i] for i in p) + run.replay_setup_s)
    return out


def leave_out_replayed(ctx: RunContext, tasks: list[Task], parts: Sequence[ReplayedPart]) -> list[Task]:
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
                for t in run_tasks(ctx, sorted(redo), edges=False, need_after=not after_held)]
    return out


def _replace(task: Task, **kw: Any) -> Task:
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

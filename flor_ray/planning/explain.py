"""``Plan.explain()``: a pure rendering of the plan, one line per operator."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from .plan import Plan

__all__ = ["explain"]


def _secs(s: float) -> str:
    return f"{s:.1f}s" if s < 120 else f"{s / 60:.1f}min"


def _task_line(t) -> str:
    its = f"{t.start}" if t.start == t.stop else f"{t.start}..{t.stop}"
    if t.mode == "skip":
        what = f"restore+outer {its}"
    elif t.mode == "setup":
        what = "setup only"
    else:
        frm = f"restore@{t.restore.iteration}" if t.restore else "from 0"
        what = f"re-execute {its} {frm}"
    extra = "".join(
        [", setup" if t.setup and t.mode != "setup" else "", ", after" if t.after else "",
         f", gpus={t.num_gpus:g}" if t.num_gpus else ""]
    )
    status = " [done]" if t.done else ""
    note = f"  # {t.note}" if t.note else ""
    return f"  Task[{t.key[:8]} run={t.run_id} {what}{extra}, cpus={t.num_cpus:g}, est={_secs(t.estimate_s)}]{status}{note}"


def explain(plan: "Plan") -> str:
    from ..store.retention import GC_REASON

    pending = plan.pending
    head = (
        f"ReplayPlan[names={','.join(plan.names)}; runs={len(plan.runs)}"
        + (f" where {plan.where}" if plan.where else "")
        + f"; iterations={plan.iterations}; tasks={len(plan.tasks)} ({len(pending)} to run)"
        + f"; workers={int(plan.cluster.num_cpus)}; est. makespan={_secs(plan.makespan_s)}"
        + (f"; cold start={_secs(plan.startup_s)}" if pending and plan.startup_s else "")
        + "".join(f"; {mode} x{f:.2f} from {n} earlier task{'s' if n != 1 else ''} at {plan.per_node}/node"
                  for mode, f, n in plan.calibrated) + "]"
    )
    lines = [head]
    by_patch: dict[str, list[str]] = {}
    for label, name, what in plan.statements:
        by_patch.setdefault(label, []).append(f"{name} -> {what}")
    for p in plan.patches:
        if p.code is None:
            lines.append(f"  Propagate[{p.label}] FAILED: {p.error}")
            continue
        placed = "; ".join(p.placements) or ("nothing placed" if p.refused else "already logged")
        lines.append(f"  Propagate[{p.label}] {placed}")
        for s in by_patch.get(p.label, []):
            lines.append(f"    Need[{s}]")
    for r in plan.refused:
        lines.append(f"  Skip[name={r.name} version={r.version[:8]} runs={r.runs}] {r.reason}")
    for d in plan.damaged:
        if d.reason.startswith(GC_REASON):
            lines.append(f"  Collected[run={d.run_id} iteration={d.iteration}] checkpoint {d.path} {d.reason}: "
                         "segments that would start there start from an earlier checkpoint")
        else:
            lines.append(f"  Damaged[run={d.run_id} iteration={d.iteration}] checkpoint {d.path} {d.reason}: "
                         "planned around it")
    groups: dict[tuple[str, str], list[str]] = {}  # runs of the same numerics share a line
    for run_id, recorded, cpus in plan.numerics:
        groups.setdefault((recorded, cpus), []).append(run_id)
    for (recorded, cpus), ids in groups.items():
        who = f"run={ids[0]}" if len(ids) == 1 else f"runs={len(ids)} ({ids[0]}...)"
        lines.append(f"  Numerics[{who} {recorded}] {cpus}")
    for t in plan.tasks:
        lines.append(_task_line(t))
    for s in plan.skipped:
        lines.append(f"  Skip[run={s.run_id}] {s.reason}")
    return "\n".join(lines)

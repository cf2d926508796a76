"""What a replay did: its tasks' results, the fidelity check and the conflicts found."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from .fidelity import Fidelity
from .task import TaskResult

if TYPE_CHECKING:  # pragma: no cover
    from ..planning.plan import DamagedCheckpoint, Plan, Refused

__all__ = ["Report", "Conflict", "find_conflicts"]


@dataclass(frozen=True)
class Conflict:
    """Replay tasks that hold different values for one identity (run, name, loop
    context, occurrence); queries show the earliest task's."""

    run_id: str
    name: str
    context: str
    values: tuple[Any, ...]  # per task, earliest first
    tasks: tuple[str, ...]


@dataclass(frozen=True)
class Report:
    results: tuple[TaskResult, ...]
    skipped_runs: tuple[tuple[str, str], ...]
    fidelity: Fidelity
    wall_s: float
    estimate_s: float
    refused: tuple["Refused", ...] = ()  # requested names left out, per version
    damaged: tuple["DamagedCheckpoint", ...] = ()  # checkpoints the plan routed around
    conflicts: tuple[Conflict, ...] = ()

    @property
    def fallbacks(self) -> tuple[str, ...]:
        """Damaged checkpoints the tasks found and routed around, one line each."""
        return tuple(n for r in self.results for n in r.notes)

    @property
    def ok(self) -> bool:
        """No task failed, every recomputed recorded value matched, no replayed value
        disagrees with another replay of it."""
        return (all(r.status != "failed" for r in self.results) and self.fidelity.mismatched == 0
                and not self.conflicts)

    @property
    def failed(self) -> tuple[TaskResult, ...]:
        return tuple(r for r in self.results if r.status == "failed")

    @property
    def rows(self) -> int:
        return sum(r.rows for r in self.results)

    def __str__(self) -> str:
        n = {s: sum(r.status == s for r in self.results) for s in ("done", "failed", "skipped")}
        lines = [
            f"replay: {n['done']} done, {n['failed']} failed, {n['skipped']} skipped; {self.rows} rows; "
            f"wall {self.wall_s:.1f}s (estimate {self.estimate_s:.1f}s)"
        ]
        for r in self.results:
            est = f"est {r.estimate_s:.1f}s" if r.estimate_s else ""
            line = f"  {r.status:7s} {r.key[:8]} run={r.run_id} rows={r.rows} {r.wall_s:.1f}s {est}"
            if r.phases:
                line += "  [" + " ".join(f"{k} {v:.1f}s" for k, v in r.phases if v >= 0.05) + "]"
            if r.error:
                line += f"  {r.error}"
            lines.append(line)
            lines.extend(f"    {n}" for n in r.notes)
        for d in self.damaged:
            lines.append(f"  run {d.run_id} iteration {d.iteration}: checkpoint {d.path} {d.reason}; planned around it")
        for x in self.refused:
            lines.append(f"  skipped {x.name} in version {x.version[:8]} ({x.runs} run{'s' if x.runs != 1 else ''}): {x.reason}")
        for rid, why in self.skipped_runs:
            lines.append(f"  skipped run={rid}: {why}")
        f = self.fidelity
        lines.append(f"fidelity: {f.compared} recorded values recomputed, {f.mismatched} mismatched")
        for name, c, m in f.by_name:
            lines.append(f"  {name}: {c} compared, {m} mismatched")
        lines.extend(f"  e.g. {e}" for e in f.examples)
        lines.extend(f.numerics_lines())
        for t in f.by_task:
            if t.mismatched:
                lines.append(f"  kept apart: task {t.key[:8]} run={t.run_id} ({t.mismatched} of {t.compared} recorded "
                             "values differ): its values are not back-filled; see SQL's replay_mismatch")
        if f.mismatched_runs:
            lines.append(f"  runs affected: {', '.join(f.mismatched_runs)}")
        if self.conflicts:
            lines.append(f"conflicts: {len(self.conflicts)} replayed value(s) differ from an earlier replay "
                         "(queries show the earliest; SQL's logs_all has every row)")
            for c in self.conflicts[:5]:
                vals = ", ".join(f"{v!r} (task {k[:8]})" for v, k in zip(c.values, c.tasks))
                lines.append(f"  {c.name} run={c.run_id} {c.context}: {vals}")
        return "\n".join(lines)


def find_conflicts(plan: "Plan", run_ids: Sequence[str]) -> tuple[Conflict, ...]:
    """Identities of the plan's names in these runs whose replayed values differ
    between tasks (trusted partitions only), tasks in the order queries rank them."""
    from ..store import Store
    from ..store.logs import ITER_COLS, log_parts, parts_in_order, read_logs

    st = Store(plan.store_url, plan.storage_options)
    if not run_ids:
        return ()
    t = read_logs(st, list(plan.names), run_ids, sources=("replay",))
    if t.num_rows == 0:
        return ()
    d = t.to_pandas()
    if d["task"].nunique() < 2:
        return ()
    pieces, order = parts_in_order(log_parts(st), list(run_ids))
    rank = {p.task: int(o) for p, o in zip(pieces, order)}
    ctx = ["run_id", "name", "loops", *ITER_COLS, "items"]
    d = d.assign(_rank=d["task"].map(rank).fillna(len(rank))).sort_values(["_rank", "seq"], kind="stable")
    d["_occ"] = d.groupby(ctx + ["task"], dropna=False).cumcount()
    d = d[d.groupby(ctx + ["_occ"], dropna=False)["task"].transform("nunique") > 1]
    out = []
    for key, g in d.groupby(ctx + ["_occ"], dropna=False, sort=True):
        g = g.drop_duplicates("task")
        vals = [f if vt == "float" else (int(i) if vt == "int" else bool(i)) if vt in ("int", "bool") else s_
                for vt, f, i, s_ in zip(g["vtype"], g["value_float"], g["value_int"], g["value_str"])]
        if all(v == vals[0] or (v != v and vals[0] != vals[0]) for v in vals[1:]):
            continue
        rec = dict(zip(ctx + ["_occ"], key))
        where = ", ".join(f"{n}={rec[ITER_COLS[i]]}" for i, n in enumerate(x for x in str(rec["loops"]).split("/") if x))
        out.append(Conflict(rec["run_id"], rec["name"], where + (f" #{rec['_occ']}" if rec["_occ"] else ""),
                            tuple(vals), tuple(g["task"])))
    return tuple(out)

"""The fidelity check: a replay's recomputed recorded values against the recording."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from ..planning.plan import Plan
    from .task import TaskResult

__all__ = ["Fidelity", "TaskFidelity", "compare_fidelity", "keep_apart"]


@dataclass(frozen=True)
class TaskFidelity:
    """One task's check: its recomputed recorded values against the recording."""

    key: str
    run_id: str
    compared: int
    mismatched: int


@dataclass(frozen=True)
class Fidelity:
    compared: int = 0
    mismatched: int = 0
    by_name: tuple[tuple[str, int, int], ...] = ()  # (name, compared, mismatched)
    examples: tuple[str, ...] = ()
    by_task: tuple[TaskFidelity, ...] = ()
    #: (run_id, what of its recorded numerics a task could not reproduce), see flor_ray.numerics
    numerics: tuple[tuple[str, str], ...] = ()

    @property
    def mismatched_runs(self) -> tuple[str, ...]:
        """Runs with a task whose values are kept apart (SQL: replay_mismatch)."""
        return tuple(sorted({t.run_id for t in self.by_task if t.mismatched}))

    def numerics_lines(self) -> list[str]:
        """The numerics differences, as the likely cause where that run's values mismatched."""
        out = []
        for rid, why in self.numerics:
            lead = "likely cause" if rid in self.mismatched_runs else "numerics"
            out.append(f"  {lead}: run={rid}: {why}")
        return out


def compare_fidelity(plan: "Plan", results: Sequence["TaskResult"], rtol: float | None = None) -> Fidelity:
    """Compare every recomputed value that the run also recorded, per task.

    A value's identity is (run, name, loop context, occurrence): the k-th value a
    task logged in a context is compared with the k-th one the run recorded there.
    """
    from ..config import load_settings
    from ..store import Store
    from ..store.logs import ITER_COLS, MISMATCH_SOURCE, read_logs

    if rtol is None:
        rtol = load_settings().fidelity_rtol
    keys = {r.key for r in results}
    run_ids = sorted({r.run_id for r in results})
    notes = tuple(dict.fromkeys((r.run_id, why) for r in results for why in r.numerics))
    if not run_ids:
        return Fidelity()
    st = Store(plan.store_url, plan.storage_options)
    t = read_logs(st, None, run_ids, sources=("record", "replay", MISMATCH_SOURCE)).to_pandas()
    if t.empty:
        return Fidelity(numerics=notes)
    rep = t[(t["source"] != "record") & (t["task"].isin(keys))]
    rec = t[t["source"] == "record"]
    cols = ["run_id", "loops", *ITER_COLS, "items", "name"]
    rep = rep.assign(_k=rep.sort_values("seq").groupby(cols + ["task"], dropna=False).cumcount())
    rec = rec.assign(_k=rec.sort_values("seq").groupby(cols, dropna=False).cumcount())
    m = rep.merge(rec, on=cols + ["_k"], suffixes=("_rep", "_rec"))
    by: dict[str, list[int]] = {}
    per_task: dict[tuple[str, str], list[int]] = {}
    examples = []
    for row in m.itertuples(index=False):
        d = row._asdict()
        same = _same_value(d, rtol)
        for acc in (by.setdefault(d["name"], [0, 0]), per_task.setdefault((d["task_rep"], d["run_id"]), [0, 0])):
            acc[0] += 1
            acc[1] += not same
        if not same and len(examples) < 5:
            ctx = ", ".join(f"{n}={d[ITER_COLS[i]]}" for i, n in enumerate(filter(None, str(d["loops"]).split("/"))))
            a = (d["value_float_rep"], d["value_int_rep"], d["value_str_rep"])
            b = (d["value_float_rec"], d["value_int_rec"], d["value_str_rec"])
            examples.append(f"{d['name']} run={d['run_id']} {ctx}: recorded {b}, replayed {a}")
    return Fidelity(
        sum(c for c, _ in by.values()),
        sum(m_ for _, m_ in by.values()),
        tuple((n, c, m_) for n, (c, m_) in sorted(by.items())),
        tuple(examples),
        tuple(TaskFidelity(k, r, c, m_) for (k, r), (c, m_) in sorted(per_task.items())),
        notes,
    )


def _same_value(d: dict, rtol: float) -> bool:
    """A replayed value equals the recorded one (floats: within ``rtol``, NaN = NaN)."""
    import math

    vt = d["vtype_rec"]
    a = (d["value_float_rep"], d["value_int_rep"], d["value_str_rep"])
    b = (d["value_float_rec"], d["value_int_rec"], d["value_str_rec"])
    if vt == "float" and d["vtype_rep"] == "float":
        x, y = a[0], b[0]
        return x == y or (math.isnan(x) and math.isnan(y)) or (rtol > 0 and abs(x - y) <= rtol * max(abs(x), abs(y)))
    return d["vtype_rep"] == vt and all((p == q) or (p != p and q != q) for p, q in zip(a, b))


def keep_apart(plan: "Plan", fid: Fidelity) -> None:
    """Move the partitions of tasks that failed their fidelity check out of the
    back-filled values (to ``source=replay_mismatch``): copied first, then removed."""
    from ..store import Store, layout
    from ..store.logs import MISMATCH_SOURCE

    st = Store(plan.store_url, plan.storage_options)
    for t in fid.by_task:
        if not t.mismatched:
            continue
        src = layout.replay_part(t.run_id, t.key)
        if not st.exists(src):
            continue  # kept apart already (a rerun finds it done)
        st.write_bytes(layout.replay_part(t.run_id, t.key, MISMATCH_SOURCE), st.read_bytes(src))
        st.delete(src)

"""``flor.dataframe``: one row per (run, loop context), a column per loop, name and arg.

The parts are read by :mod:`flor_ray.queries.scan`; here each (name, source) series is
picked, several are joined on the loop context and occurrence, and the frame is
assembled with the runs' versions and args.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple, Sequence

from ..errors import QueryError
from ..store.logs import ITER_COLS, log_parts, parts_in_order
from .cache import CACHE
from .runs import select_runs
from .scan import Scan, Series, differ, first_seen, int_array, scan_parts, series_rows, values_of

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from ..store import Store

__all__ = ["dataframe", "ConflictWarning"]


class Picked(NamedTuple):
    """One column of the result: its name, its rows (a :class:`Series`), its values."""

    column: str
    series: Series
    values: Any


def dataframe(store: "Store", names: Sequence[str], where: str | None = None) -> "pd.DataFrame":
    """One row per (run, loop context); a column per loop, per name, per arg.

    A value recorded by the run is shown as is; a name only replayed shows the
    replayed value. Where both exist, ``<name>`` holds the recorded value and
    ``<name>__replay`` the replayed one, so the two can be compared side by side.
    A name logged several times in one loop context (a closure called by the
    optimizer, a forward pass per evaluation) keeps every value: the frame then has
    an ``occurrence`` column, one row per value in logging order. A value that
    several replay tasks hold is shown once, the earliest task's; where their values
    differ, ``<column>__conflict`` is True on its row and a :class:`ConflictWarning`
    names them. Partitions kept apart by the fidelity check are not read.
    Per name the rows are put in loop order with vectorised passes (no per-row
    Python); several names are joined on the loop context and occurrence.
    """
    import numpy as np
    import pandas as pd

    store.check()
    names = list(names)
    for n in names:
        if not isinstance(n, str) or not n:
            raise QueryError(f"log names must be non-empty strings, got {n!r}")
    metas = CACHE.runs(store).metas
    run_ids = select_runs(store, where, metas)
    files, task_order, scan = _scan(store, metas, run_ids if where else None, names or None)
    if scan is None:
        if names:
            raise QueryError(
                f"no values logged under {', '.join(map(repr, names))}"
                + (f" in the runs where {where}" if where else "")
                + "; list the names with `flor-ray sql \"SELECT DISTINCT name FROM logs\"`, "
                "or back-fill a new name with flor.replay"
            )
        return pd.DataFrame(columns=["run_id", "version"])
    scan.task = task_order[scan.file]
    rid_dict = scan.rid_dict
    order_of = {m["run_id"]: i for i, m in enumerate(metas)}
    run_rank = np.array([order_of.get(r, len(order_of) + i) for i, r in enumerate(rid_dict)], dtype=np.int64)
    n_names, n_vtypes = len(scan.name_vals), len(scan.vtype_vals)
    # which (name, source) series exist, and the value types of each
    combo = (scan.name.astype(np.int64) * 2 + scan.src) * n_vtypes + scan.vtype
    kinds: dict[tuple[str, str], set[str]] = {}
    for c in np.flatnonzero(np.bincount(combo, minlength=n_names * 2 * n_vtypes)):
        ns, vt = divmod(int(c), n_vtypes)
        nm, src = divmod(ns, 2)
        key = (str(scan.name_vals[nm]), ("record", "replay")[src])
        kinds.setdefault(key, set()).add(str(scan.vtype_vals[vt]))
    out_names = names or [str(scan.name_vals[c]) for c in first_seen(scan.name)]
    loop_vals = scan.loop_vals
    paths = [str(loop_vals[c]) for c in first_seen(scan.loops) if loop_vals[c] is not None]
    depth = max([len([x for x in p.split("/") if x]) for p in paths] + [0])
    series = [(name, source, suffix) for name in out_names
              for source, suffix in (("record", ""), ("replay", "__replay")) if (name, source) in kinds]
    picked = _pick_series(scan, series, kinds, run_rank)
    codes, loops, iter_arrays, occurrence, columns = _join_series(scan, picked, run_rank, depth)
    _warn_conflicts(scan, picked)
    cols = list(columns)
    loop_cats = [str(v) for v in loop_vals]
    return _assemble(codes, loops, loop_cats, iter_arrays, columns, cols, paths, rid_dict, metas, occurrence)


#: listings a query takes at most when parts vanish between its listing and its reads:
#: each compaction that deletes parts during a read costs one (a listing that did not
#: change ends the retries at once), and runs end far less often than queries run
LISTINGS = 64


def _scan(store: "Store", metas: list[dict], run_ids, names):
    """The parts of the query (in order), their task order and their rows; listed again
    when a part is gone before it is read (a compaction replaced it)."""
    before = None
    for attempt in range(LISTINGS):
        listing = log_parts(store, runs={m["run_id"] for m in metas})
        files, task_order = parts_in_order(listing, run_ids)
        try:
            return files, task_order, (scan_parts(store, files, names) if files else None)
        except FileNotFoundError as exc:
            if attempt == LISTINGS - 1 or listing == before:
                raise QueryError(f"a part of the log relation in {store.url!r} vanished while it was read ({exc}) "
                                 "and listing the store again did not settle it; run the query again") from exc
            before = listing
    raise AssertionError("unreachable")


class ConflictWarning(UserWarning):
    """Replay tasks hold different values for one identity (run, name, loop context,
    occurrence): the frame shows the earliest task's and flags the row."""


def _pick_series(scan: Scan, series: list, kinds: dict, run_rank) -> list[Picked]:
    """A :class:`Picked` for each (name, source, suffix) of ``series``."""
    import numpy as np

    key_iters = [it for it in scan.iters if it is not None]
    name_code = {str(v): i for i, v in enumerate(scan.name_vals)}

    def gather(a, rows):  # rows None: all of them, as they are
        return a if rows is None else a[rows]

    picked = []
    for name, source, suffix in series:
        sub = None  # one series: every row read belongs to it
        if len(series) > 1:
            sub = np.flatnonzero((scan.name == name_code[name]) & (scan.src == (source == "replay")))
        task = gather(scan.task, sub) if source == "replay" else None
        if task is not None and (not len(task) or task.min() == task.max()):
            task = None  # one task: nothing repeated across tasks
        ser = series_rows(run_rank[gather(scan.run, sub)], gather(scan.seq, sub),
                          [gather(it, sub) for it in key_iters], gather(scan.loops, sub), task)
        if sub is not None:
            ser = Series(sub if ser.rows is None else sub[ser.rows], ser.occ,
                         None if ser.dups is None else sub[ser.dups], None if ser.dup_of is None else sub[ser.dup_of])
        col = name if suffix == "" or (name, "record") not in kinds else name + suffix
        picked.append(Picked(col, ser, values_of(scan, ser.rows, kinds[(name, source)])))
        if ser.dups is not None and len(ser.dups):
            kind = kinds[(name, source)]
            changed = differ(values_of(scan, ser.dup_of, kind), values_of(scan, ser.dups, kind))
            if changed.any():
                at = np.arange(len(scan.run)) if ser.rows is None else ser.rows
                flag = np.isin(at, ser.dup_of[changed])
                picked.append(Picked(col + "__conflict",
                                     Series(ser.rows, ser.occ, ser.dups[changed], ser.dup_of[changed]), flag))
    return picked


def _join_series(scan: Scan, picked: list[Picked], run_rank, depth: int):
    """(run codes, loop codes, iteration arrays, occurrences or None, value columns) of
    the result: one series as it is, several outer-joined on (context, occurrence)."""
    import numpy as np
    import pandas as pd

    iter_cols = list(ITER_COLS[:depth])  # deeper columns are all null: not carried
    by_depth = {d: it for d, it in enumerate(scan.iters) if it is not None}
    loop_cats = [str(v) for v in scan.loop_vals]

    def gather(a, rows):
        return a if rows is None else a[rows]

    def iters_of(rows):
        n = len(gather(scan.run, rows))
        return {d: int_array(gather(by_depth[d], rows)) if d in by_depth
                else pd.arrays.IntegerArray(np.zeros(n, np.int64), np.ones(n, bool)) for d in range(depth)}

    several = any(ser.occ is not None for _, ser, _ in picked)
    if len(picked) == 1:
        col, ser, vals = picked[0]
        occ = None if ser.occ is None else ser.occ.astype(np.int64)
        return (gather(scan.run, ser.rows), gather(scan.loops, ser.rows), iters_of(ser.rows), occ, {col: vals})
    frames = []
    for col, ser, vals in picked:
        n = len(gather(scan.run, ser.rows))
        frames.append(pd.DataFrame({
            "_rank": run_rank[gather(scan.run, ser.rows)],
            "loops": pd.Categorical.from_codes(gather(scan.loops, ser.rows), categories=loop_cats),
            **{c: a for c, a in zip(iter_cols, iters_of(ser.rows).values())},
            "_occ": np.zeros(n, np.int64) if ser.occ is None else ser.occ.astype(np.int64),
            col: vals,
        }))
    key_cols = ["_rank", "loops", *iter_cols, "_occ"]
    wide = frames[0]
    for f in frames[1:]:
        wide = wide.merge(f, on=key_cols, how="outer", sort=False)
    wide = wide.sort_values(["_rank", *iter_cols, "_occ"], na_position="first", kind="stable").reset_index(drop=True)
    columns = {}
    for col, _, _ in picked:
        if col.endswith("__conflict"):
            wide[col] = wide[col].fillna(False).astype(bool)
        columns[col] = wide[col]
    return (_codes_from_rank(wide["_rank"].to_numpy(), run_rank), wide["loops"].cat.codes.to_numpy(),
            {d: wide[c].array for d, c in enumerate(iter_cols)},
            wide["_occ"].to_numpy() if several else None, columns)


def _warn_conflicts(scan: Scan, picked: list[Picked]) -> None:
    """A :class:`ConflictWarning` naming the identities whose replayed values differ."""
    import warnings

    found = [(col[: -len("__conflict")], ser) for col, ser, _ in picked if col.endswith("__conflict")]
    if not found:
        return
    lines = []
    for col, ser in found:
        for d, k in list(zip(ser.dups.tolist(), ser.dup_of.tolist()))[:5]:
            ctx = ", ".join(f"{n}={int(scan.iters[i][k])}" for i, n in
                            enumerate(x for x in str(scan.loop_vals[scan.loops[k]]).split("/") if x))
            lines.append(f"{col} run={scan.rid_dict[scan.run[k]]} {ctx}: "
                         f"{values_of(scan, [k], {'json'})[0]!r} (shown) vs {values_of(scan, [d], {'json'})[0]!r}")
    n = sum(len(ser.dups) for _, ser in found)
    warnings.warn(ConflictWarning(
        f"{n} replayed value(s) differ from an earlier replay of the same value; the earliest is shown and "
        f"<name>__conflict marks the row; the raw rows are in SQL's logs_all: " + "; ".join(lines)), stacklevel=4)


def _assemble(codes, loops, loop_cats, iter_arrays, columns: dict, cols: list, paths: list, rid_dict, metas,
              occurrence=None):
    """The result frame: run_id, version, the args, a column per loop, the
    occurrence where some context holds several values, the values."""
    import numpy as np
    import pandas as pd

    out: dict[str, Any] = {"run_id": _strings_by_run(codes, rid_dict), **columns}
    # loop columns named after the loops
    per_depth: dict[int, list[str]] = {}
    for path in paths:
        for d, lname in enumerate(x for x in path.split("/") if x):
            if lname not in per_depth.setdefault(d, []):
                per_depth[d].append(lname)
    loop_cols: list[str] = []
    for d, lnames in sorted(per_depth.items()):
        src = iter_arrays[d]
        for lname in lnames:
            if lname in loop_cols:
                continue
            loop_cols.append(lname)
            if len(lnames) == 1:
                out[lname] = src
            else:
                has = [len(p.split("/")) > d and p.split("/")[d] == lname for p in loop_cats]
                mask = np.asarray(has, dtype=bool)[loops]
                out[lname] = pd.Series(src).where(mask, pd.NA).array
    runs = {m["run_id"]: m for m in metas}
    out["version"] = _strings_by_run(codes, [str((runs.get(r) or {}).get("version")) for r in rid_dict])
    arg_names: list[str] = []
    for m in metas:
        for a in m.get("args") or {}:
            if a not in arg_names:
                arg_names.append(a)
    arg_cols = []
    for a in arg_names:
        col = a if a not in cols and a not in loop_cols and a not in ("run_id", "version") else f"arg_{a}"
        out[col] = _by_run(codes, rid_dict, {r: (m.get("args") or {}).get(a) for r, m in runs.items()})
        arg_cols.append(col)
    occ_cols = []
    if occurrence is not None:
        occ_cols = ["occurrence" if "occurrence" not in out else "flor_occurrence"]
        out[occ_cols[0]] = occurrence
    order = ["run_id", "version", *arg_cols, *loop_cols, *occ_cols, *cols]
    if len(set(order)) == len(order):
        return pd.DataFrame({c: out[c] for c in order}, copy=False)
    return pd.DataFrame(out, copy=False)[order]  # a log named like a loop: as it always was


def _strings_by_run(codes, per_run: list[str]):
    """A string column with one value per run, gathered in C++ by run codes.

    Gathered as ``large_string``, the type pandas keeps ``str`` columns in (a
    ``string`` array would be converted once more).
    """
    import pandas as pd
    import pyarrow as pa
    import pyarrow.compute as pc

    return pd.arrays.ArrowStringArray(pc.take(pa.array(per_run, pa.large_string()), pa.array(codes)),
                                      dtype=pd.StringDtype("pyarrow", na_value=float("nan")))


def _by_run(codes, rid_dict: list[str], value_of: dict):
    """A per-row column from one value per run, gathered by run codes (vectorised)."""
    import pandas as pd

    per_run = pd.Series([value_of.get(r) for r in rid_dict])  # the dtype pandas infers
    return per_run.to_numpy()[codes] if len(per_run) else []


def _codes_from_rank(ranks, run_rank):
    import numpy as np

    inv = np.empty(int(run_rank.max()) + 1 if len(run_rank) else 0, dtype=np.int64)
    inv[run_rank] = np.arange(len(run_rank))
    return inv[ranks]


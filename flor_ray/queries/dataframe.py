"""``flor.dataframe``: one row per (run, loop context), a column per loop, name and arg.

The parts are read by :mod:`flor_ray.queries.scan`; here each (name, source) series is
picked, several are joined on the loop context and occurrence, and the frame is
assembled with the runs' versions and args.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Sequence

from ..errors import QueryError
from ..store.logs import log_parts, parts_in_order
from .cache import CACHE
from .runs import select_runs
from .scan import NO_ITER, Scan, Series, differ, first_seen, scan_parts, series_rows, values_of

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from .render import Column

    from ..store import Store

__all__ = ["dataframe", "frame", "to_pandas", "render_columns", "Frame", "Col", "ConflictWarning"]


class Picked(NamedTuple):
    """One column of the result: its name, its rows (a :class:`Series`), its values."""

    column: str
    series: Series
    values: Any


@dataclass(frozen=True)
class Col:
    """One column of a :class:`Frame`, as numpy data that pandas wraps or
    :mod:`flor_ray.queries.render` prints.

    ``kind``: ``run`` (``data``: one string per run, gathered by the frame's run codes),
    ``arg`` (``data``: one value per run, likewise), ``loop`` (``data``: int64
    iterations, ``mask``: the rows without one) or ``values`` (``data``: a numpy array
    row by row).
    """

    kind: str
    data: Any
    mask: Any = None


@dataclass(frozen=True)
class Frame:
    """The result of :func:`dataframe` before pandas: its columns by name, their order
    (a name twice: a log named like a loop), each row's run code and the run ids."""

    columns: dict
    order: list
    codes: Any = None
    rows: int = 0


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
    return to_pandas(frame(store, names, where, stacklevel=5))


def frame(store: "Store", names: Sequence[str], where: str | None = None, stacklevel: int = 4) -> Frame:
    """:func:`dataframe`'s columns as numpy data, without pandas (the command line
    prints them through :func:`render_columns`)."""
    import numpy as np

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
        return Frame({}, ["run_id", "version"])
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
    _warn_conflicts(scan, picked, stacklevel)
    loop_cats = [str(v) for v in loop_vals]
    return _assemble(codes, loops, loop_cats, iter_arrays, columns, paths, rid_dict, metas, occurrence)


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
    """(run codes, loop codes, iterations per depth as (int64, mask), occurrences or None,
    value columns) of the result: one series as it is, several outer-joined on (run,
    loop context, occurrence).

    The join orders its rows by run, iterations (none first), occurrence, then loop
    path code: the order of pandas' sorted outer merge on (run, path, iterations,
    occurrence) followed by a stable sort on (run, iterations, occurrence). A column
    missing from some rows takes the type pandas gives it there: ints become floats,
    bools and strings objects with NaN, a conflict flag False.
    """
    import numpy as np

    by_depth = {d: it for d, it in enumerate(scan.iters) if it is not None}

    def gather(a, rows):
        return a if rows is None else a[rows]

    def iters_of(rows):
        n = len(gather(scan.run, rows))
        return [gather(by_depth[d], rows) if d in by_depth else np.full(n, NO_ITER, np.int32) for d in range(depth)]

    if len(picked) == 1:
        col, ser, vals = picked[0]
        occ = None if ser.occ is None else ser.occ.astype(np.int64)
        return (gather(scan.run, ser.rows), gather(scan.loops, ser.rows), [_loop_ints(it) for it in iters_of(ser.rows)],
                occ, {col: vals})
    several = any(ser.occ is not None for _, ser, _ in picked)
    sizes = [len(vals) for _, _, vals in picked]
    rank = np.concatenate([run_rank[gather(scan.run, ser.rows)] for _, ser, _ in picked])
    loops = np.concatenate([gather(scan.loops, ser.rows) for _, ser, _ in picked])
    occ = np.concatenate([np.zeros(n, np.int64) if ser.occ is None else ser.occ.astype(np.int64)
                          for n, (_, ser, _) in zip(sizes, picked)])
    per_series = [iters_of(ser.rows) for _, ser, _ in picked]
    iters = [np.concatenate([its[d] for its in per_series]) for d in range(depth)]
    keys = [rank, *iters, occ, loops]
    order = np.lexsort(tuple(reversed(keys)))
    new = np.ones(len(order), dtype=bool)
    if len(order) > 1:
        same = np.ones(len(order) - 1, dtype=bool)
        for k in keys:
            ks = k[order]
            same &= ks[1:] == ks[:-1]
        new[1:] = ~same
    pos = np.empty(len(order), dtype=np.int64)
    pos[order] = np.cumsum(new) - 1
    first = order[new]
    columns, at = {}, 0
    for (col, _, vals), n in zip(picked, sizes):
        columns[col] = _spread(vals, pos[at:at + n], len(first), col.endswith("__conflict"))
        at += n
    return (_codes_from_rank(rank[first], run_rank), loops[first], [_loop_ints(it[first]) for it in iters],
            occ[first] if several else None, columns)


def _spread(vals, at, n: int, flag: bool):
    """``vals`` put at rows ``at`` of ``n`` rows, the others missing as pandas' outer merge leaves them."""
    import numpy as np

    if len(at) == n:  # every row: the type as it is
        out = np.empty(n, dtype=vals.dtype)
    elif flag:
        out = np.zeros(n, dtype=bool)
    elif vals.dtype.kind in "fiu":
        out = np.full(n, np.nan)
    else:
        out = np.full(n, np.nan, dtype=object)
    out[at] = vals
    return out


def _loop_ints(values) -> tuple:
    """Iterations (int32, :data:`NO_ITER` for none) as (int64 values, mask of none)."""
    import numpy as np

    mask = values == NO_ITER
    out = values.astype(np.int64)
    if mask.any():
        out[mask] = 0
    return out, mask


def _warn_conflicts(scan: Scan, picked: list[Picked], stacklevel: int) -> None:
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
        f"<name>__conflict marks the row; the raw rows are in SQL's logs_all: " + "; ".join(lines)), stacklevel=stacklevel)


def _assemble(codes, loops, loop_cats, iter_arrays, columns: dict, paths: list, rid_dict, metas,
              occurrence=None) -> Frame:
    """The result's columns: run_id, version, the args, a column per loop, the
    occurrence where some context holds several values, the values."""
    import numpy as np

    cols = list(columns)
    out: dict[str, Col] = {"run_id": Col("run", list(rid_dict)), **{c: Col("values", v) for c, v in columns.items()}}
    # loop columns named after the loops
    per_depth: dict[int, list[str]] = {}
    for path in paths:
        for d, lname in enumerate(x for x in path.split("/") if x):
            if lname not in per_depth.setdefault(d, []):
                per_depth[d].append(lname)
    loop_cols: list[str] = []
    for d, lnames in sorted(per_depth.items()):
        values, none = iter_arrays[d]
        for lname in lnames:
            if lname in loop_cols:
                continue
            loop_cols.append(lname)
            if len(lnames) == 1:
                out[lname] = Col("loop", values, none)
            else:
                has = [len(p.split("/")) > d and p.split("/")[d] == lname for p in loop_cats]
                out[lname] = Col("loop", values, none | ~np.asarray(has, dtype=bool)[loops])
    runs = {m["run_id"]: m for m in metas}
    out["version"] = Col("run", [str((runs.get(r) or {}).get("version")) for r in rid_dict])
    arg_names: list[str] = []
    for m in metas:
        for a in m.get("args") or {}:
            if a not in arg_names:
                arg_names.append(a)
    arg_cols = []
    for a in arg_names:
        col = a if a not in cols and a not in loop_cols and a not in ("run_id", "version") else f"arg_{a}"
        out[col] = Col("arg", [((runs.get(r) or {}).get("args") or {}).get(a) for r in rid_dict])
        arg_cols.append(col)
    occ_cols = []
    if occurrence is not None:
        occ_cols = ["occurrence" if "occurrence" not in out else "flor_occurrence"]
        out[occ_cols[0]] = Col("values", occurrence)
    return Frame(out, ["run_id", "version", *arg_cols, *loop_cols, *occ_cols, *cols], codes, len(codes))


def to_pandas(fr: Frame) -> "pd.DataFrame":
    """The pandas frame of :func:`dataframe`: each :class:`Col` wrapped as the type
    pandas shows it (nullable Int64 loops, ``str`` run ids and versions, the dtype
    pandas infers for each arg)."""
    import pandas as pd

    if not fr.columns:
        return pd.DataFrame(columns=fr.order)
    out: dict[str, Any] = {}
    for name, c in fr.columns.items():
        if c.kind == "run":
            out[name] = _strings_by_run(fr.codes, c.data)
        elif c.kind == "arg":
            out[name] = pd.Series(c.data).to_numpy()[fr.codes]  # the dtype pandas infers
        elif c.kind == "loop":
            out[name] = pd.arrays.IntegerArray(c.data, c.mask)
        else:
            out[name] = c.data
    if len(set(fr.order)) == len(fr.order):
        return pd.DataFrame({c: out[c] for c in fr.order}, copy=False)
    return pd.DataFrame(out, copy=False)[fr.order]  # a log named like a loop: as it always was


def render_columns(fr: Frame, fmt: str) -> "list[Column] | None":
    """The frame as :mod:`flor_ray.queries.render` columns that print in ``fmt`` (table,
    csv or json) byte for byte as pandas prints :func:`to_pandas`'s frame; None where
    only pandas prints it so: a log named like a loop (a column twice), an arg or value
    of a type or magnitude the renderer leaves to pandas (lists, mixed types, floats
    beyond fixed notation in a table, ...)."""
    import numpy as np

    from .render import Column, array_column, column, none_column, printable

    if not fr.columns:
        return [Column(c, "str", []) for c in fr.order]
    if len(set(fr.order)) != len(fr.order):
        return None
    out = []
    for name in fr.order:
        c = fr.columns[name]
        if c.kind in ("run", "arg"):  # one value per run: the column of the runs, gathered on their rows
            per_run = np.empty(len(c.data), dtype=object)
            per_run[:] = c.data
            col = array_column(name, per_run) if c.kind == "run" else column(name, c.data)  # pandas' inference
            if c.kind == "arg" and all(v is None for v in c.data):  # an arg none of these runs set
                col = none_column(name, len(c.data))
            if col is not None:
                per_run[:] = col.values
                col = Column(name, col.kind, per_run[fr.codes].tolist(), col.formats)
        elif c.kind == "loop":
            col = array_column(name, c.data, c.mask)
        else:
            col = array_column(name, np.asarray(c.data))
        if col is None or not printable([col], fmt):
            return None
        out.append(col)
    return out


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


def _codes_from_rank(ranks, run_rank):
    import numpy as np

    inv = np.empty(int(run_rank.max()) + 1 if len(run_rank) else 0, dtype=np.int64)
    inv[run_rank] = np.arange(len(run_rank))
    return inv[ranks]


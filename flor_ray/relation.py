"""The log relation: one long table of recorded and replayed values.

On disk it is Hive-partitioned Parquet under ``<store>/logs/`` with partition keys
``run_id`` and ``source`` (``record`` or ``replay``); each file holds the columns of
:data:`SCHEMA`. A recording run writes one file per flush, a replay task exactly one
file named after its task key, so a query on a few runs reads only their folders and
a retried task overwrites its own file instead of adding duplicates.

The loop context of a row is ``loops`` (the loop names joined by ``/``, outermost
first, ``""`` outside any loop) and ``iter0..iter3`` (iteration numbers per depth),
plus ``items`` (a JSON list of the loop items where they are plain ints or strs that
differ from the iteration number). Values keep their type: ``vtype`` says which of
``value_float``, ``value_int`` (ints and bools) or ``value_str`` (strs and JSON) holds
the value.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from .errors import QueryError

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    import pyarrow as pa

    from .store import Store

__all__ = [
    "SCHEMA_VERSION",
    "MAX_LOOP_DEPTH",
    "ITER_COLS",
    "schema",
    "rows_to_table",
    "runs_frame",
    "select_runs",
    "read_logs",
    "dataframe",
    "sql",
]

#: Bump when the columns below change; part of every replay task key.
SCHEMA_VERSION = 1
#: Nesting depth of flor.loop that the relation has columns for.
MAX_LOOP_DEPTH = 4
ITER_COLS = tuple(f"iter{d}" for d in range(MAX_LOOP_DEPTH))


def schema() -> "pa.Schema":
    import pyarrow as pa

    return pa.schema(
        [
            ("version", pa.string()),
            ("file", pa.string()),
            ("loops", pa.string()),
            *[(c, pa.int32()) for c in ITER_COLS],
            ("items", pa.string()),
            ("name", pa.string()),
            ("vtype", pa.string()),
            ("value_float", pa.float64()),
            ("value_int", pa.int64()),
            ("value_str", pa.string()),
            ("seq", pa.int64()),
            ("task", pa.string()),
        ],
        metadata={b"flor_ray.schema_version": str(SCHEMA_VERSION).encode()},
    )


def _vtype_of(v: Any) -> str:
    from .values import JsonValue

    t = type(v)
    if t is float:
        return "float"
    if t is bool:
        return "bool"
    if t is int:
        return "int"
    if t is JsonValue:
        return "json"
    return "str"


def rows_to_table(
    *,
    version: str,
    file: str,
    contexts: Sequence[tuple],
    ctx_ids: Sequence[int],
    names: Sequence[str],
    values: Sequence[Any],
    seq_start: int,
    task: str | None = None,
) -> "pa.Table":
    """Build one Parquet-ready table from buffered rows.

    ``contexts[k]`` is ``(loops, iters, items)`` for context id ``k``; each row points
    at one through ``ctx_ids``. Context columns are built once per context and
    gathered with ``take``, so a million rows cost a few vectorised passes.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    n = len(names)
    sch = schema()
    idx = pa.array(ctx_ids, type=pa.int32())
    loops = pa.array([c[0] for c in contexts], type=pa.string())
    cols: dict[str, Any] = {
        "version": pa.DictionaryArray.from_arrays(pa.array([0] * n, pa.int32()), pa.array([version])).cast(pa.string())
        if n
        else pa.array([], pa.string()),
        "file": pa.array([file] * n, pa.string()),
        "loops": pc.take(loops, idx),
    }
    for d, col in enumerate(ITER_COLS):
        arr = pa.array([c[1][d] if len(c[1]) > d else None for c in contexts], type=pa.int32())
        cols[col] = pc.take(arr, idx)
    items = pa.array(
        [None if c[2] is None else json.dumps(list(c[2])) for c in contexts], type=pa.string()
    )
    cols["items"] = pc.take(items, idx)
    cols["name"] = pa.array(names, type=pa.string())

    types = set(map(type, values))
    if types == {float}:
        vtype = ["float"] * n
        vf, vi, vs = pa.array(values, pa.float64()), pa.nulls(n, pa.int64()), pa.nulls(n, pa.string())
    elif types == {int}:
        vtype = ["int"] * n
        vf, vi, vs = pa.nulls(n, pa.float64()), pa.array(values, pa.int64()), pa.nulls(n, pa.string())
    else:
        vtype = [_vtype_of(v) for v in values]
        vf = pa.array([v if t == "float" else None for v, t in zip(values, vtype)], pa.float64())
        vi = pa.array(
            [int(v) if t in ("int", "bool") else None for v, t in zip(values, vtype)], pa.int64()
        )
        vs = pa.array([str(v) if t in ("str", "json") else None for v, t in zip(values, vtype)], pa.string())
    cols["vtype"] = pa.array(vtype, pa.string())
    cols["value_float"], cols["value_int"], cols["value_str"] = vf, vi, vs
    cols["seq"] = pa.array(range(seq_start, seq_start + n), pa.int64())
    cols["task"] = pa.array([task] * n, pa.string())
    return pa.Table.from_arrays([cols[f.name] for f in sch], schema=sch)


def table_to_parquet_bytes(table: "pa.Table") -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", use_dictionary=True)
    return sink.getvalue().to_pybytes()


# ---------------------------------------------------------------- runs table
_RUN_COLS = (
    "run_id",
    "project",
    "script",
    "version",
    "status",
    "started_at",
    "ended_at",
    "iterations",
    "device",
    "argv",
)


def load_runs(store: "Store") -> list[dict]:
    """Every run's metadata, oldest first (run ids sort by start time)."""
    out = []
    for rid in store.iter_run_ids():
        try:
            meta = store.read_json(f"runs/{rid}.json")
        except FileNotFoundError:
            continue
        out.append(_with_liveness(meta))
    out.sort(key=lambda m: (m.get("started_at") or "", m["run_id"]))
    return out


def _with_liveness(meta: dict) -> dict:
    """A run left 'running' by a process that is gone is shown as 'incomplete'."""
    if meta.get("status") == "running":
        import os
        import socket

        pid = meta.get("pid")
        if meta.get("host") == socket.gethostname() and isinstance(pid, int):
            alive = True
            try:
                os.kill(pid, 0)
                # a reused pid: compare the process start time when we can
                with open(f"/proc/{pid}/stat") as f:
                    start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
                if meta.get("pid_start") is not None and meta["pid_start"] != start_ticks:
                    alive = False
            except (ProcessLookupError, PermissionError, FileNotFoundError):
                alive = False
            except (OSError, ValueError, IndexError):
                pass
            if not alive:
                meta = {**meta, "status": "incomplete"}
    return meta


def runs_frame(store: "Store", metas: list[dict] | None = None) -> "pd.DataFrame":
    """The runs table: fixed columns plus one column per ``flor.arg`` name."""
    import pandas as pd

    metas = load_runs(store) if metas is None else metas
    rows = []
    for m in metas:
        row = {c: m.get(c) for c in _RUN_COLS}
        row["argv"] = " ".join(m.get("argv") or [])
        row["device"] = (m.get("env") or {}).get("device")
        for k, v in (m.get("args") or {}).items():
            row[k if k not in _RUN_COLS else f"arg_{k}"] = v
        rows.append(row)
    df = pd.DataFrame(rows, columns=None if rows else list(_RUN_COLS))
    for c in ("started_at", "ended_at"):
        if c in df:
            df[c] = pd.to_datetime(df[c], utc=True, errors="coerce", format="ISO8601")
    return df


def select_runs(store: "Store", where: str | None, metas: list[dict] | None = None) -> list[str]:
    """Run ids whose row of the runs table satisfies the SQL predicate ``where``."""
    metas = load_runs(store) if metas is None else metas
    if not where:
        return [m["run_id"] for m in metas]
    if not isinstance(where, str):
        raise QueryError(f"where must be an SQL predicate string, got {type(where).__name__}")
    import duckdb

    runs = runs_frame(store, metas)
    con = duckdb.connect()
    try:
        con.register("runs", runs)
        try:
            res = con.execute(f"SELECT run_id FROM runs WHERE {where}").fetchall()
        except duckdb.Error as exc:
            cols = ", ".join(runs.columns)
            raise QueryError(
                f"invalid where predicate {where!r}: {str(exc).splitlines()[0]}; "
                f"it is SQL over the runs table, whose columns are: {cols}"
            ) from exc
    finally:
        con.close()
    keep = {r[0] for r in res}
    return [m["run_id"] for m in metas if m["run_id"] in keep]


# ------------------------------------------------------------------ logs table
def _partition_schema():
    import pyarrow as pa

    return pa.schema([("run_id", pa.string()), ("source", pa.string())])


def read_logs(
    store: "Store",
    names: Sequence[str] | None = None,
    run_ids: Iterable[str] | None = None,
    sources: Sequence[str] = ("record", "replay"),
) -> "pa.Table":
    """Rows of the relation (with ``run_id`` and ``source``) for these names/runs."""
    import pyarrow as pa
    import pyarrow.dataset as ds

    fs, root = store.arrow_fs()
    run_list = None if run_ids is None else list(run_ids)
    files: list[str] = []
    if run_list is None:
        files = store.find("logs", ".parquet")
    else:
        for rid in run_list:
            for src in sources:
                files += store.find(f"logs/run_id={rid}/source={src}", ".parquet")
    files = [f for f in files if any(f"/source={s}/" in f for s in sources)]
    full = pa.schema(list(schema()) + list(_partition_schema()))
    if not files:
        return full.empty_table()
    part = ds.partitioning(_partition_schema(), flavor="hive")
    dset = ds.dataset(
        [f"{root}/{f}" for f in files],
        schema=full,
        format="parquet",
        filesystem=fs,
        partitioning=part,
        partition_base_dir=f"{root}/logs",
    )
    flt = None
    if names is not None:
        flt = ds.field("name").isin(list(names))
    try:
        return dset.to_table(filter=flt)
    except (OSError, pa.ArrowInvalid) as exc:
        raise QueryError(
            f"the log relation under {store.full_url('logs')} could not be read ({exc}); "
            "a truncated or corrupted Parquet file is named above: delete it and replay again"
        ) from exc


def _value_column(sub: "pd.DataFrame") -> "pd.Series":
    """One typed column from the rows of one name."""
    import pandas as pd

    kinds = set(sub["vtype"].unique())
    if kinds <= {"float"}:
        return sub["value_float"]
    if kinds <= {"int"}:
        return sub["value_int"].astype("int64")
    if kinds <= {"int", "float"}:
        return sub["value_float"].fillna(sub["value_int"].astype("float64"))
    if kinds <= {"bool"}:
        return sub["value_int"].astype(bool)
    if kinds <= {"str"}:
        return sub["value_str"]
    out = []
    for vt, f, i, s in zip(sub["vtype"], sub["value_float"], sub["value_int"], sub["value_str"]):
        out.append(
            f if vt == "float" else int(i) if vt == "int" else bool(i) if vt == "bool"
            else json.loads(s) if vt == "json" else s
        )
    return pd.Series(out, index=sub.index, dtype=object)


def dataframe(store: "Store", names: Sequence[str], where: str | None = None) -> "pd.DataFrame":
    """One row per (run, loop context); a column per loop, per name, per arg.

    A value recorded by the run is shown as is; a name only replayed shows the
    replayed value. Where both exist, ``<name>`` holds the recorded value and
    ``<name>__replay`` the replayed one, so the two can be compared side by side.
    """
    import pandas as pd

    store.check()
    names = list(names)
    for n in names:
        if not isinstance(n, str) or not n:
            raise QueryError(f"log names must be non-empty strings, got {n!r}")
    metas = load_runs(store)
    run_ids = select_runs(store, where, metas)
    table = read_logs(store, names or None, run_ids if where else None)
    df = table.to_pandas(types_mapper=None) if table.num_rows else None
    key_cols = ["run_id", "loops", *ITER_COLS]
    if names and (df is None or df.empty):
        raise QueryError(
            f"no values logged under {', '.join(map(repr, names))}"
            + (f" in the runs where {where}" if where else "")
            + "; list the names with `flor-ray sql \"SELECT DISTINCT name FROM logs\"`, "
            "or back-fill a new name with flor.replay"
        )
    if df is None or df.empty:
        return pd.DataFrame(columns=["run_id", "version"])
    df = df.sort_values("seq", kind="stable")
    frames = []
    out_names = names or list(dict.fromkeys(df["name"]))
    for name in out_names:
        sub = df[df["name"] == name]
        for source, suffix in (("record", ""), ("replay", "__replay")):
            part = sub[sub["source"] == source]
            if part.empty:
                continue
            part = part.drop_duplicates(key_cols, keep="last")
            col = name + suffix
            frames.append(part[key_cols].assign(**{col: _value_column(part).to_numpy()}).set_index(key_cols))
    if not frames:
        return pd.DataFrame(columns=["run_id", "version", *names])
    if len(frames) == 1:
        wide = frames[0].reset_index()
    else:
        wide = pd.concat(frames, axis=1, join="outer", sort=False).reset_index()
    # a name only replayed is shown under its own name
    for name in out_names:
        rep = name + "__replay"
        if rep in wide and name not in wide:
            wide = wide.rename(columns={rep: name})
    # loop columns named after the loops
    loop_cols: list[str] = []
    loops_vals = wide["loops"].astype(str)
    for path in loops_vals.unique():
        mask = loops_vals == path
        for d, lname in enumerate(p for p in path.split("/") if p):
            if lname not in wide:
                wide[lname] = pd.array([pd.NA] * len(wide), dtype="Int64")
                loop_cols.append(lname)
            wide.loc[mask, lname] = wide.loc[mask, ITER_COLS[d]]
    for c in loop_cols:
        wide[c] = wide[c].astype("Int64")
    runs = {m["run_id"]: m for m in metas}
    wide["version"] = wide["run_id"].map(lambda r: (runs.get(r) or {}).get("version"))
    arg_names: list[str] = []
    for m in metas:
        for a in (m.get("args") or {}):
            if a not in arg_names:
                arg_names.append(a)
    arg_cols = []
    for a in arg_names:
        col = a if a not in wide.columns and a not in out_names else f"arg_{a}"
        wide[col] = wide["run_id"].map(lambda r, a=a: ((runs.get(r) or {}).get("args") or {}).get(a))
        arg_cols.append(col)
    order = {r: i for i, r in enumerate(runs)}
    wide["_order"] = wide["run_id"].map(order)
    wide = wide.sort_values(["_order", *ITER_COLS], na_position="first", kind="stable")
    value_cols = [c for c in wide.columns if c not in (*key_cols, "version", "_order", *loop_cols, *arg_cols)]
    wide = wide[["run_id", "version", *arg_cols, *loop_cols, *value_cols]].reset_index(drop=True)
    return wide


def sql(store: "Store", query: str) -> "pd.DataFrame":
    """Run DuckDB SQL with ``logs`` (the long relation) and ``runs`` as tables."""
    import duckdb

    store.check()
    if not isinstance(query, str) or not query.strip():
        raise QueryError("sql() needs a query string, e.g. \"SELECT name, count(*) FROM logs GROUP BY name\"")
    logs = read_logs(store)
    runs = runs_frame(store)
    con = duckdb.connect()
    try:
        con.register("logs_arrow", logs)
        con.execute(
            "CREATE VIEW logs AS SELECT *, "
            "CASE vtype WHEN 'float' THEN value_float WHEN 'int' THEN value_int::DOUBLE "
            "WHEN 'bool' THEN value_int::DOUBLE END AS value FROM logs_arrow"
        )
        con.register("runs", runs)
        try:
            return con.execute(query).df()
        except duckdb.Error as exc:
            raise QueryError(
                f"SQL failed: {str(exc).splitlines()[0]}; tables: logs(run_id, source, version, file, "
                "loops, iter0..iter3, items, name, vtype, value, value_float, value_int, value_str, seq, task) "
                f"and runs({', '.join(runs.columns)})"
            ) from exc
    finally:
        con.close()

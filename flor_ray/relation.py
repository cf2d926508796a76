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
    "merge_rows",
    "empty_rows",
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
    prefixes: Sequence[tuple],
    pids: Sequence[int],
    lasts: Sequence[int | None],
    items: Sequence[tuple[int, Any]],
    names: Sequence[str],
    values: Sequence[Any],
    seq_start: int,
    task: str | None = None,
) -> "pa.Table":
    """Build one Parquet-ready table from buffered rows.

    Row ``r`` sits in loop context ``prefixes[pids[r]]`` = ``(loops, enclosing
    iterations, enclosing items, depth)`` at innermost iteration ``lasts[r]``;
    ``items`` lists ``(row, innermost item)`` where the item is worth keeping.
    Prefix columns are built once per prefix and gathered with ``take``, so a
    million rows cost a few vectorised passes.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    n = len(names)
    sch = schema()
    idx = pa.array(pids, type=pa.int32())
    last = pa.array(lasts, type=pa.int32())
    depth = pc.take(pa.array([p[3] for p in prefixes], pa.int32()), idx)
    zeros = pa.array(np.zeros(n, dtype=np.int32))
    cols: dict[str, Any] = {
        "version": pc.take(pa.array([version], pa.string()), zeros),
        "file": pc.take(pa.array([file], pa.string()), zeros),
        "loops": pc.take(pa.array([p[0] for p in prefixes], pa.string()), idx),
    }
    for d, col in enumerate(ITER_COLS):
        enclosing = pa.array([p[1][d] if len(p[1]) > d else None for p in prefixes], type=pa.int32())
        cols[col] = pc.if_else(pc.equal(depth, d + 1), last, pc.take(enclosing, idx))
    if items or any(p[2] is not None for p in prefixes):
        inner = dict(items)
        docs: list[str | None] = []
        for r in range(n):
            p = prefixes[pids[r]]
            it = inner.get(r)
            if p[2] is None and it is None:
                docs.append(None)
            else:
                docs.append(json.dumps([*(p[2] or (None,) * len(p[1])), it]))
        cols["items"] = pa.array(docs, pa.string())
    else:
        cols["items"] = pa.nulls(n, pa.string())
    cols["name"] = pa.array(names, type=pa.string())

    types = set(map(type, values))
    if types == {float}:
        vtype = pa.array(["float"] * n, pa.string())
        vf, vi, vs = pa.array(values, pa.float64()), pa.nulls(n, pa.int64()), pa.nulls(n, pa.string())
    elif types == {int}:
        vtype = pa.array(["int"] * n, pa.string())
        vf, vi, vs = pa.nulls(n, pa.float64()), pa.array(values, pa.int64()), pa.nulls(n, pa.string())
    else:
        vt = [_vtype_of(v) for v in values]
        vtype = pa.array(vt, pa.string())
        vf = pa.array([v if t == "float" else None for v, t in zip(values, vt)], pa.float64())
        vi = pa.array([int(v) if t in ("int", "bool") else None for v, t in zip(values, vt)], pa.int64())
        vs = pa.array([str(v) if t in ("str", "json") else None for v, t in zip(values, vt)], pa.string())
    cols["vtype"] = vtype
    cols["value_float"], cols["value_int"], cols["value_str"] = vf, vi, vs
    cols["seq"] = pa.array(np.arange(seq_start, seq_start + n, dtype=np.int64))
    cols["task"] = pc.take(pa.array([task], pa.string()), zeros)
    return pa.Table.from_arrays([cols[f.name] for f in sch], schema=sch)


def merge_rows(into: dict, rows: dict, keep: "set[str] | None") -> None:
    """Append buffered ``rows`` (from ``take_rows``) to ``into``, keeping some names."""
    base = len(into["prefixes"])
    into["prefixes"].extend(rows["prefixes"])
    items = dict(rows["items"])
    for r, (pid, last, name, value) in enumerate(zip(rows["pids"], rows["lasts"], rows["names"], rows["values"])):
        if keep is None or name in keep:
            if r in items:
                into["items"].append((len(into["names"]), items[r]))
            into["pids"].append(base + pid)
            into["lasts"].append(last)
            into["names"].append(name)
            into["values"].append(value)


def empty_rows() -> dict:
    return {"prefixes": [], "pids": [], "lasts": [], "items": [], "names": [], "values": []}


def table_to_parquet_bytes(table: "pa.Table") -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    # dictionary pages for the repetitive string columns only: numbers and seq do not
    # repeat, and dictionary-encoding them made writes 3x slower and files 2x larger
    pq.write_table(table, sink, compression="zstd", use_dictionary=[c for c in _DICT_COLS if c in table.column_names])
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
_DICT_COLS = ("version", "file", "loops", "name", "vtype", "task")


def read_logs(
    store: "Store",
    names: Sequence[str] | None = None,
    run_ids: Iterable[str] | None = None,
    sources: Sequence[str] = ("record", "replay"),
    columns: Sequence[str] | None = None,
    dictionary: bool = False,
) -> "pa.Table":
    """Rows of the relation (with ``run_id`` and ``source``) for these names/runs.

    Only the files of the asked runs are opened. ``dictionary=True`` keeps the
    repetitive string columns dictionary-encoded, as they are in the files, which
    saves materialising millions of identical strings.
    """
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
    str_t = pa.dictionary(pa.int32(), pa.string()) if dictionary else pa.string()
    file_schema = pa.schema(
        [pa.field(f.name, str_t) if dictionary and f.name in _DICT_COLS else f for f in schema()]
    )
    part_schema = pa.schema([("run_id", str_t), ("source", str_t)])
    full = pa.schema(list(file_schema) + list(part_schema))
    if columns is not None:
        full = pa.schema([full.field(c) for c in columns])
    if not files:
        return full.empty_table()
    dset = _dataset(store, files, file_schema, part_schema, dictionary)
    flt = None
    if names is not None:
        flt = ds.field("name").isin(list(names))
    try:
        out = dset.to_table(filter=flt, columns=list(columns) if columns is not None else None)
        return out.unify_dictionaries() if dictionary else out
    except (OSError, pa.ArrowInvalid) as exc:
        raise _unreadable(store, files, exc) from exc


def _unreadable(store: "Store", files: Sequence[str], exc: Exception) -> QueryError:
    """Find which Parquet file is broken (read each alone) and name it in the error."""
    import pyarrow.parquet as pq

    fs, root = store.arrow_fs()
    bad: list[str] = []
    for full_read in (False, True):  # footers first (cheap), then whole files
        for f in files:
            try:
                with fs.open_input_file(f"{root}/{f}") as fh:
                    pq.read_table(fh) if full_read else pq.read_metadata(fh)
            except Exception:  # noqa: BLE001 - any failure marks the file
                bad.append(store.full_url(f))
        if bad:
            break
    where = ", ".join(bad[:5]) if bad else f"a file under {store.full_url('logs')}"
    fix = ("a recorded part is lost: re-record the run, or delete the file to read the rest"
           if any("/source=record/" in b for b in bad) else "delete it and replay again: the task rewrites it")
    return QueryError(f"cannot read the log relation: {where} is truncated or corrupted ({exc}); {fix}")


def _dataset(store: "Store", files: Sequence[str], file_schema, part_schema, dictionary: bool):
    import pyarrow as pa
    import pyarrow.dataset as ds

    fs, root = store.arrow_fs()
    kw = {}
    if dictionary:
        runs_seen = sorted({f.split("/")[1][len("run_id="):] for f in files})
        kw["dictionaries"] = {"run_id": pa.array(runs_seen), "source": pa.array(["record", "replay"])}
        fmt = ds.ParquetFileFormat(read_options=ds.ParquetReadOptions(dictionary_columns=list(_DICT_COLS)))
    else:
        fmt = ds.ParquetFileFormat()
    part = ds.partitioning(part_schema, flavor="hive", **kw)
    return ds.dataset(
        [f"{root}/{f}" for f in files],
        schema=pa.schema(list(file_schema) + list(part_schema)),
        format=fmt,
        filesystem=fs,
        partitioning=part,
        partition_base_dir=f"{root}/logs",
    )


def logs_dataset(store: "Store"):
    """The whole relation as a lazy pyarrow Dataset (scans push filters down)."""
    import pyarrow as pa

    files = store.find("logs", ".parquet")
    part_schema = pa.schema([("run_id", pa.string()), ("source", pa.string())])
    if not files:
        return None
    return _dataset(store, files, schema(), part_schema, False)


def _one_series(t: "pa.Table", kinds: set[str], run_rank: "np.ndarray"):
    """Rows of one (name, source): context keys in order, last value per context."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    rid = t.column("run_id").combine_chunks()
    if pa.types.is_dictionary(rid.type):
        rank = run_rank[rid.indices.to_numpy(zero_copy_only=False)] if len(run_rank) else np.zeros(len(rid), np.int64)
    else:
        rank = np.zeros(len(rid), np.int64)
    # Sort by (run, loop context, seq): rows of one context become neighbours even
    # when they come from several files (replay tasks number their rows from 0),
    # and the loop context order is the iteration order.
    seq = t.column("seq").to_numpy()
    loops_idx = pc.dictionary_encode(t.column("loops")).combine_chunks() if not pa.types.is_dictionary(
        t.column("loops").type) else t.column("loops").combine_chunks()
    keys = [rank] + [t.column(c).fill_null(-1).to_numpy() for c in ITER_COLS]
    keys.append(loops_idx.indices.to_numpy(zero_copy_only=False))
    order = np.lexsort((seq, keys[0]))  # run, then logging order: usually already context order
    keys = [k[order] for k in keys]
    if not _nondecreasing(keys[:-1]):
        again = np.lexsort((keys[-1], *reversed(keys[:-1])))  # stable: seq order kept within a context
        order, keys = order[again], [k[again] for k in keys]
    t = t.take(pa.array(order))
    n = t.num_rows
    last = np.ones(n, dtype=bool)  # keep the last row of each run of equal contexts
    if n > 1:
        same = np.ones(n - 1, dtype=bool)
        for k in keys:
            same &= k[1:] == k[:-1]
        last[:-1] = ~same
    t = t.filter(pa.array(last))
    if kinds <= {"float"}:
        vals = t.column("value_float").to_numpy()
    elif kinds <= {"int"}:
        vals = t.column("value_int").to_numpy()
    elif kinds <= {"int", "float"}:
        vals = pc.coalesce(t.column("value_float"), pc.cast(t.column("value_int"), pa.float64())).to_numpy()
    elif kinds <= {"bool"}:
        vals = t.column("value_int").to_numpy().astype(bool)
    elif kinds <= {"str"}:
        vals = t.column("value_str").to_numpy(zero_copy_only=False)
    else:
        decoded = [
            f if vt == "float" else int(i) if vt == "int" else bool(i) if vt == "bool"
            else json.loads(s_) if vt == "json" else s_
            for vt, f, i, s_ in zip(*(t.column(c).to_pylist() for c in ("vtype", "value_float", "value_int", "value_str")))
        ]
        vals = np.empty(len(decoded), dtype=object)  # lists stay elements, not a 2-D array
        vals[:] = decoded
    return t, vals


def dataframe(store: "Store", names: Sequence[str], where: str | None = None) -> "pd.DataFrame":
    """One row per (run, loop context); a column per loop, per name, per arg.

    A value recorded by the run is shown as is; a name only replayed shows the
    replayed value. Where both exist, ``<name>`` holds the recorded value and
    ``<name>__replay`` the replayed one, so the two can be compared side by side.
    Per name the rows are put in loop order and de-duplicated with vectorised
    passes (no per-row Python); several names are joined on the loop context.
    """
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import pyarrow.compute as pc

    store.check()
    names = list(names)
    for n in names:
        if not isinstance(n, str) or not n:
            raise QueryError(f"log names must be non-empty strings, got {n!r}")
    metas = load_runs(store)
    run_ids = select_runs(store, where, metas)
    table = read_logs(
        store, names or None, run_ids if where else None, dictionary=True,
        columns=["run_id", "source", "loops", *ITER_COLS, "name", "vtype", "value_float", "value_int", "value_str", "seq"],
    )
    if names and table.num_rows == 0:
        raise QueryError(
            f"no values logged under {', '.join(map(repr, names))}"
            + (f" in the runs where {where}" if where else "")
            + "; list the names with `flor-ray sql \"SELECT DISTINCT name FROM logs\"`, "
            "or back-fill a new name with flor.replay"
        )
    if table.num_rows == 0:
        return pd.DataFrame(columns=["run_id", "version"])
    rid_dict = table.column("run_id").combine_chunks().dictionary.to_pylist()
    order_of = {m["run_id"]: i for i, m in enumerate(metas)}
    run_rank = np.array([order_of.get(r, len(order_of) + i) for i, r in enumerate(rid_dict)], dtype=np.int64)
    kinds_t = table.group_by(["name", "source", "vtype"]).aggregate([])
    kinds: dict[tuple[str, str], set[str]] = {}
    for n, src, vt in zip(*(kinds_t.column(c).to_pylist() for c in ("name", "source", "vtype"))):
        kinds.setdefault((str(n), str(src)), set()).add(str(vt))
    out_names = names or list(dict.fromkeys(str(x) for x in pc.unique(table.column("name")).to_pylist()))
    paths = [str(p) for p in pc.unique(table.column("loops")).to_pylist() if p is not None]
    depth = max([len([x for x in p.split("/") if x]) for p in paths] + [0])
    iter_cols = list(ITER_COLS[:depth])  # deeper columns are all null: not carried
    key_cols = ["_rank", "loops", *iter_cols]
    frames: list[pd.DataFrame] = []
    cols: list[str] = []
    for name in out_names:
        for source, suffix in (("record", ""), ("replay", "__replay")):
            if (name, source) not in kinds:
                continue
            sub = table.filter(pc.and_(pc.equal(pc.cast(table.column("name"), pa.string()), name),
                                       pc.equal(pc.cast(table.column("source"), pa.string()), source)))
            t, vals = _one_series(sub, kinds[(name, source)], run_rank)
            col = name if suffix == "" or (name, "record") not in kinds else name + suffix
            rid = t.column("run_id").combine_chunks()
            frame = pd.DataFrame({
                "_rank": run_rank[rid.indices.to_numpy(zero_copy_only=False)],
                "run_id": pd.Categorical.from_codes(rid.indices.to_numpy(zero_copy_only=False), categories=rid_dict),
                "loops": pd.Categorical.from_codes(*_dict_codes(t.column("loops"))),
                **{c: _int_array(t.column(c)) for c in iter_cols},
                col: vals,
            })
            frames.append(frame)
            cols.append(col)
    if len(frames) == 1:
        wide = frames[0]
    else:
        wide = frames[0].drop(columns=["run_id"])
        for f in frames[1:]:
            wide = wide.merge(f.drop(columns=["run_id"]), on=key_cols, how="outer", sort=False)
        wide["run_id"] = pd.Categorical.from_codes(_codes_from_rank(wide["_rank"].to_numpy(), run_rank),
                                                   categories=rid_dict)
        wide = wide.sort_values(["_rank", *iter_cols], na_position="first", kind="stable")
    wide = wide.reset_index(drop=True)
    # plain (Arrow-backed) strings, gathered in C++ from the few distinct run ids
    codes = wide["run_id"].cat.codes.to_numpy()
    wide["run_id"] = _strings_by_run(codes, rid_dict)
    # loop columns named after the loops
    per_depth: dict[int, list[str]] = {}
    for path in paths:
        for d, lname in enumerate(x for x in path.split("/") if x):
            if lname not in per_depth.setdefault(d, []):
                per_depth[d].append(lname)
    loop_cols: list[str] = []
    for d, lnames in sorted(per_depth.items()):
        src = wide[ITER_COLS[d]]
        for lname in lnames:
            if lname in loop_cols:
                continue
            loop_cols.append(lname)
            if len(lnames) == 1:
                wide[lname] = src
            else:
                has = [len(p.split("/")) > d and p.split("/")[d] == lname for p in wide["loops"].cat.categories]
                mask = np.asarray(has, dtype=bool)[wide["loops"].cat.codes.to_numpy()]
                wide[lname] = src.where(mask, pd.NA)
    runs = {m["run_id"]: m for m in metas}
    wide["version"] = _strings_by_run(codes, [str((runs.get(r) or {}).get("version")) for r in rid_dict])
    arg_names: list[str] = []
    for m in metas:
        for a in m.get("args") or {}:
            if a not in arg_names:
                arg_names.append(a)
    arg_cols = []
    for a in arg_names:
        col = a if a not in cols and a not in loop_cols and a not in ("run_id", "version") else f"arg_{a}"
        wide[col] = _by_run(codes, rid_dict, {r: (m.get("args") or {}).get(a) for r, m in runs.items()})
        arg_cols.append(col)
    return wide[["run_id", "version", *arg_cols, *loop_cols, *cols]]


def _strings_by_run(codes, per_run: list[str]):
    """A string column with one value per run, gathered in C++ by run codes."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.compute as pc

    return pd.arrays.ArrowStringArray(pc.take(pa.array(per_run, pa.string()), pa.array(codes)),
                                      dtype=pd.StringDtype("pyarrow", na_value=float("nan")))


def _by_run(codes, rid_dict: list[str], value_of: dict):
    """A per-row column from one value per run, gathered by run codes (vectorised)."""
    import pandas as pd

    per_run = pd.Series([value_of.get(r) for r in rid_dict])
    return per_run.take(codes).reset_index(drop=True).to_numpy() if len(per_run) else []


def _int_array(col):
    """A nullable pandas Int64 array from an Arrow int column, without per-row work."""
    import numpy as np
    import pandas as pd

    arr = col.combine_chunks()
    values = arr.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    mask = arr.is_null().to_numpy(zero_copy_only=False)
    return pd.arrays.IntegerArray(values, mask)


def _nondecreasing(keys) -> bool:
    """Whether rows are in lexicographic order of ``keys`` (vectorised, O(n) per key)."""
    import numpy as np

    n = len(keys[0])
    if n < 2:
        return True
    undecided = np.ones(n - 1, dtype=bool)
    for k in keys:
        d = np.sign(k[1:].astype(np.int64) - k[:-1].astype(np.int64))
        if np.any(undecided & (d < 0)):
            return False
        undecided &= d == 0
    return True


def _dict_codes(col) -> tuple:
    """(codes, categories) of a dictionary-encoded (or plain string) Arrow column."""
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = col.combine_chunks()
    if not pa.types.is_dictionary(arr.type):
        arr = pc.dictionary_encode(arr)
    return arr.indices.to_numpy(zero_copy_only=False), [str(x) for x in arr.dictionary.to_pylist()]


def _codes_from_rank(ranks, run_rank):
    import numpy as np

    inv = np.empty(int(run_rank.max()) + 1 if len(run_rank) else 0, dtype=np.int64)
    inv[run_rank] = np.arange(len(run_rank))
    return inv[ranks]


_READ_ONLY = frozenset({"SELECT", "WITH", "FROM", "DESCRIBE", "SHOW", "SUMMARIZE", "PIVOT", "UNPIVOT", "VALUES", "EXPLAIN"})


def _sql_str(v: str) -> str:
    return "'" + v.replace("'", "''") + "'"


def _sql_error(exc: Exception, runs) -> QueryError:
    return QueryError(
        f"SQL failed: {str(exc).splitlines()[0]}; tables: logs(run_id, source, version, file, "
        "loops, iter0..iter3, items, name, vtype, value, value_float, value_int, value_str, seq, task) "
        f"and runs({', '.join(runs.columns)})"
    )


def sql(store: "Store", query: str) -> "pd.DataFrame":
    """Run DuckDB SQL with ``logs`` (the long relation) and ``runs`` as tables."""
    import duckdb

    store.check()
    if not isinstance(query, str) or not query.strip():
        raise QueryError("sql() needs a query string, e.g. \"SELECT name, count(*) FROM logs GROUP BY name\"")
    first = query.lstrip().lstrip("(").split(None, 1)[0].upper()
    if first not in _READ_ONLY:
        raise QueryError(
            f"sql() runs queries only ({', '.join(sorted(_READ_ONLY))}), not {first}: "
            "the store is written by recording and replay alone"
        )
    files = store.find("logs", ".parquet")
    runs = runs_frame(store)
    con = duckdb.connect()
    try:
        con.execute("SET enable_progress_bar = false")
        if files and store.is_local:  # DuckDB's own parallel Parquet reader, partitions from the paths
            paths = ", ".join(_sql_str(f"{store.root}/{f}") for f in files)
            con.execute(f"CREATE VIEW logs_arrow AS SELECT * FROM read_parquet([{paths}], hive_partitioning = true)")
        else:  # any fsspec store: a lazy Arrow dataset, projections and filters pushed down
            con.register("logs_arrow", logs_dataset(store) if files else read_logs(store))
        con.execute(
            "CREATE VIEW logs AS SELECT *, "
            "CASE vtype WHEN 'float' THEN value_float WHEN 'int' THEN value_int::DOUBLE "
            "WHEN 'bool' THEN value_int::DOUBLE END AS value FROM logs_arrow"
        )
        con.register("runs", runs)
        try:
            return con.execute(query).df()
        except (duckdb.IOException, duckdb.InvalidInputException) as exc:
            if "parquet" in str(exc).lower() or "thrift" in str(exc).lower():
                raise _unreadable(store, files, exc) from exc
            raise _sql_error(exc, runs) from exc
        except duckdb.Error as exc:
            raise _sql_error(exc, runs) from exc
        except (OSError, ValueError) as exc:  # a corrupted file met by the Arrow scan
            raise _unreadable(store, files, exc) from exc
    finally:
        con.close()

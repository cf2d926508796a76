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
import os
import threading
from dataclasses import dataclass
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
    "ConflictWarning",
    "sql",
]

#: Bump when the columns below change; part of every replay task key.
SCHEMA_VERSION = 1
#: The footer key of a replay partition: JSON saying what it holds (task, patch
#: digest, names, outer iterations, setup/after rows, written_at).
TASK_META_KEY = b"flor_ray.task"
#: A replay task whose recomputed recorded values differ from the recording has its
#: partition moved here: kept apart from the back-filled values, visible through SQL.
MISMATCH_SOURCE = "replay_mismatch"
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


# one implementation for recording and replay: numpy buffers straight into Arrow,
# never through pandas (which pyarrow imports on a first pa.array of python objects)
from .record.rows import rows_to_table  # noqa: E402


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
    """Every run's metadata, oldest first (run ids sort by start time).

    A run file that is not a run's metadata is left out, with one warning naming it.
    """
    out = []
    for rid in store.iter_run_ids():
        meta = _read_run_file(store, f"runs/{rid}.json")
        if meta is not None:
            out.append(_with_liveness(meta))
    out.sort(key=lambda m: (m.get("started_at") or "", m["run_id"]))
    return out


def _read_run_file(store: "Store", rel: str) -> dict | None:
    """The run's metadata in ``rel``; None (reported once) if gone, damaged or foreign."""
    from .damage import Damage, report, run_meta_problem

    try:
        data = store.read_bytes(rel)
    except FileNotFoundError:
        return None
    try:
        meta = json.loads(data)
        why = run_meta_problem(rel, meta)
    except ValueError as exc:  # UnicodeDecodeError too
        why = f"is not valid JSON (truncated or corrupted: {str(exc).splitlines()[0]})"
    if why:
        report(store, Damage(rel, why), "the run is left out of runs, queries and replays")
        return None
    return meta


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
    """Run ids whose row of the runs table satisfies the SQL predicate ``where``.

    ``where`` is one boolean expression over the runs table's columns, parsed and
    checked by :func:`flor_ray.sandbox.select_where` and run in its sandbox.
    """
    metas = load_runs(store) if metas is None else metas
    if not where:
        return [m["run_id"] for m in metas]
    if not isinstance(where, str):
        raise QueryError(f"where must be an SQL predicate string, got {type(where).__name__}")
    from .sandbox import select_where

    keep = select_where(runs_frame(store, metas), where)
    return [m["run_id"] for m in metas if m["run_id"] in keep]


# --------------------------------------------------------- listings and caches
# Queries list the store on every call (a run or a replay task may have added a file
# since the last one) and keep what they derived from the files (parsed run files,
# DuckDB tables) for as long as the listing stays the same. A listing entry's stamp
# changes whenever its file is rewritten: every write is a new file renamed into place
# (new inode, new mtime) or a new object (new etag / mtime).
_STAMP_KEYS = ("mtime", "LastModified", "last_modified", "ETag", "etag", "md5", "generation", "version_id", "created")
_CACHE_LOCK = threading.Lock()
_RUNS_CACHE: "dict[tuple, dict[str, tuple]]" = {}  # store key -> {path: (size, stamp, parsed run)}
_RUNS_CACHE_KEEP = 8


def _store_key(store: "Store") -> tuple:
    """What identifies a store's caches: this process (a fork starts over), URL, options."""
    return (os.getpid(), store.url, json.dumps(store.storage_options, sort_keys=True, default=str))


def _listing(store: "Store", rel: str, suffix: str, recursive: bool = True, raw: bool = False) -> tuple:
    """``(path, size, stamp)`` of the files below ``rel`` ending in ``suffix``, sorted by path.

    The files of :meth:`Store.find` (``recursive``) or of :meth:`Store.listdir`
    (otherwise), store-relative and without hidden temporaries; one ``os.scandir`` per
    folder on local disks, one listing call on object stores. Under ``logs``, parts
    that are damaged or belong to no valid run are left out (reported once) unless
    ``raw``.
    """
    out = _list_files(store, rel, suffix, recursive)
    if raw or not (rel == "logs" or rel.startswith("logs/")) or suffix != ".parquet":
        return out
    return _healthy_parts(store, out)


def _healthy_parts(store: "Store", listing: tuple) -> tuple:
    """The parts of ``listing`` that belong to a valid run and look like Parquet."""
    from .damage import Damage, part_problem, report

    metas, _ = _cached_runs(store)
    runs = {m["run_id"] for m in metas}
    keep, orphans = [], set()
    for entry in listing:
        rel, size, stamp = entry
        bits = rel.split("/")
        rid = bits[1][len("run_id="):] if len(bits) > 2 and bits[1].startswith("run_id=") else None
        if rid not in runs:
            orphans.add("/".join(bits[:2]) if rid else rel)
            continue
        why = part_problem(store, rel, size, stamp)
        if why:
            report(store, Damage(rel, why), f"its rows of run {rid} are left out of queries")
            continue
        keep.append(entry)
    for rel in sorted(orphans):
        report(store, Damage(rel, "holds rows of a run without a valid runs/<id>.json (deleted or damaged)"),
               "they are left out of queries")
    return tuple(keep)


def _list_files(store: "Store", rel: str, suffix: str, recursive: bool = True) -> tuple:
    base = store.path(rel)
    root = store.root
    out = []
    if store.is_local:
        folders = [base]
        while folders:
            folder = folders.pop()
            try:
                entries = os.scandir(folder)
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as exc:
                raise store._wrap(f"listing {rel}", exc) from exc
            with entries:
                for e in entries:
                    try:
                        if e.is_dir():  # follows links, as fsspec's find does
                            if recursive:
                                folders.append(e.path)
                            continue
                        if e.name.startswith((".", "_")) or not e.name.endswith(suffix):
                            continue
                        st = e.stat()
                    except FileNotFoundError:  # removed while listing
                        continue
                    out.append((e.path[len(root) + 1:], st.st_size, (st.st_mtime_ns, st.st_ino)))
    else:
        try:
            if recursive:
                found = store.fs.find(base, detail=True)
            else:
                found = {e["name"]: e for e in store.fs.ls(base, detail=True) if e.get("type") != "directory"}
        except FileNotFoundError:
            return ()
        except Exception as exc:
            raise store._wrap(f"listing {rel}", exc) from exc
        for p, info in found.items():
            p = p.rstrip("/")
            name = p.rsplit("/", 1)[-1]
            if name.startswith((".", "_")) or not p.endswith(suffix):
                continue
            stamp = tuple(str(info[k]) for k in _STAMP_KEYS if info.get(k) is not None)
            out.append((p[len(root) + 1:] if p.startswith(root) else p, info.get("size"), stamp))
    out.sort(key=lambda f: f[0])
    return tuple(out)


def _cached_runs(store: "Store") -> tuple[list[dict], tuple]:
    """:func:`load_runs` reading only new or rewritten run files; also the listing.

    The returned dicts are shared with the cache: callers read them, never change them.
    """
    listing = _listing(store, "runs", ".json", recursive=False)
    key = _store_key(store)
    with _CACHE_LOCK:
        old = _RUNS_CACHE.get(key) or {}
    new: dict[str, tuple] = {}
    metas = []
    for rel, size, stamp in listing:
        hit = old.get(rel)
        if hit is not None and hit[0] == size and hit[1] == stamp:
            meta = hit[2]
        else:
            meta = _read_run_file(store, rel)
        new[rel] = (size, stamp, meta)
        if meta is not None:
            metas.append(_with_liveness(meta))
    metas.sort(key=lambda m: (m.get("started_at") or "", m["run_id"]))
    with _CACHE_LOCK:
        _RUNS_CACHE.pop(key, None)
        _RUNS_CACHE[key] = new
        while len(_RUNS_CACHE) > _RUNS_CACHE_KEEP:
            _RUNS_CACHE.pop(next(iter(_RUNS_CACHE)))
    return metas, listing


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
        files = [f[0] for f in _listing(store, "logs", ".parquet")]
    else:
        listing: tuple = ()
        for rid in run_list:
            for src in sources:
                listing += _listing(store, f"logs/run_id={rid}/source={src}", ".parquet", raw=True)
        files = [f[0] for f in _healthy_parts(store, listing)]
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
        kw["dictionaries"] = {"run_id": pa.array(runs_seen), "source": pa.array(["record", "replay", MISMATCH_SOURCE])}
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

    files = [f[0] for f in _listing(store, "logs", ".parquet")]
    part_schema = pa.schema([("run_id", pa.string()), ("source", pa.string())])
    if not files:
        return None
    return _dataset(store, files, schema(), part_schema, False)


# ------------------------------------------------------------------- dataframe
#: the columns dataframe() reads from each file (the same ones as ever: a corrupted
#: page in any of them is reported), and those read dictionary-encoded
_DF_COLS = ("loops", *ITER_COLS, "name", "vtype", "value_float", "value_int", "value_str", "seq")
_DF_DICT_COLS = ("loops", "name", "vtype")
_NO_ITER = -(2 ** 31)  # a null iteration in the sort keys: before every real iteration


def _read_files(store: "Store", files: Sequence[str]) -> list:
    """The :data:`_DF_COLS` of each file (a ``pa.Table`` each, in order), read in parallel.

    One ``ParquetFile`` per file, no dataset machinery: the partition columns come from
    the paths. A column missing from an older file reads as nulls.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, root = store.arrow_fs()
    local = store.is_local
    want = schema()
    dict_t = pa.dictionary(pa.int32(), pa.string())

    def read(pf) -> "pa.Table":
        have = set(pf.schema_arrow.names)
        t = pf.read(columns=[c for c in _DF_COLS if c in have], use_threads=False)
        cols = []
        for c in _DF_COLS:
            typ = want.field(c).type
            if c not in have:
                cols.append(pa.nulls(t.num_rows, typ))
                continue
            col = t.column(c)
            if c in _DF_DICT_COLS:
                if col.type != dict_t:
                    col = col.cast(pa.string()).dictionary_encode()
            elif col.type != typ:
                col = col.cast(typ)
            cols.append(col)
        return pa.Table.from_arrays(cols, names=list(_DF_COLS))

    def one(rel: str) -> "pa.Table":
        if local:
            with pq.ParquetFile(f"{root}/{rel}", read_dictionary=list(_DF_DICT_COLS)) as pf:
                return read(pf)
        with fs.open_input_file(f"{root}/{rel}") as fh:
            return read(pq.ParquetFile(fh, read_dictionary=list(_DF_DICT_COLS)))

    if len(files) < 2:
        return [one(f) for f in files]
    from concurrent.futures import ThreadPoolExecutor

    workers = min(len(files), min(8, os.cpu_count() or 2) if local else 16)
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, files))


def _dict_codes(col) -> tuple:
    """(int32 codes, values) of a dictionary-encoded column whose chunks share one
    dictionary; nulls get -1."""
    import numpy as np

    arr = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    idx = arr.indices
    if idx.null_count:
        idx = idx.fill_null(-1)
    return idx.to_numpy(zero_copy_only=False).astype(np.int32, copy=False), arr.dictionary.to_pylist()


def _iter_values(col) -> "np.ndarray | None":
    """An iteration column as int32 with nulls as :data:`_NO_ITER`; None when all null."""
    import numpy as np

    if col.null_count == len(col):
        return None
    if col.null_count:
        col = col.fill_null(_NO_ITER)
    return col.to_numpy().astype(np.int32, copy=False)


def _scan(store: "Store", files: Sequence[str], names: Sequence[str] | None) -> dict | None:
    """The rows of ``names`` (all names: None) in ``files``, as flat arrays in file order.

    Returns None when no row is left; else run/source/name/vtype/loops codes per row,
    ``iters`` (per depth: int32 or None when all null), ``seq`` and the value columns
    (Arrow). Run codes index the sorted run ids of ``files`` (``rid_dict``); loop path
    codes follow the unified dictionaries of all files, in file order (the numbering
    that breaks ties between paths with equal iterations, as it always did).
    """
    import numpy as np
    import pyarrow as pa

    try:
        tables = _read_files(store, files)
    except (OSError, pa.ArrowInvalid) as exc:
        raise _unreadable(store, files, exc) from exc
    runs_of = [f.split("/")[1][len("run_id="):] for f in files]
    rid_dict = sorted(set(runs_of))
    run_code = {r: i for i, r in enumerate(rid_dict)}
    counts = [t.num_rows for t in tables]
    t = pa.concat_tables(tables).unify_dictionaries()
    if t.num_rows == 0:
        return None
    name, name_vals = _dict_codes(t.column("name"))
    if names is not None:
        wanted = list(dict.fromkeys(names))
        at = {n: i for i, n in enumerate(wanted)}
        lut = np.asarray([at.get(v, -1) for v in name_vals] + [-1], dtype=np.int32)
        name, name_vals = lut[name], wanted
    sel = None
    if (name < 0).any():
        sel = np.flatnonzero(name >= 0)
        if not len(sel):
            return None
        name = name[sel]

    def rows(a):
        return a if sel is None else a[sel]

    def column(c):
        col = t.column(c)
        return col if sel is None else col.take(pa.array(sel))

    vtype, vtype_vals = _dict_codes(t.column("vtype"))
    vtype = rows(vtype)
    if (vtype < 0).any():  # no type recorded: read as the string column, as ever
        vtype = np.where(vtype < 0, len(vtype_vals), vtype).astype(np.int32)
        vtype_vals = [*vtype_vals, None]
    loops, loop_vals = _dict_codes(t.column("loops"))
    seq = t.column("seq")
    iters = []
    for c in ITER_COLS:
        it = _iter_values(t.column(c))
        iters.append(None if it is None else rows(it))
    return {
        "rid_dict": rid_dict,
        "file": rows(np.repeat(np.arange(len(files), dtype=np.int32), counts)),
        "run": rows(np.repeat(np.asarray([run_code[r] for r in runs_of], dtype=np.int32), counts)),
        "src": rows(np.repeat(np.asarray(["/source=replay/" in f for f in files], dtype=np.int8), counts)),
        "name": name,
        "name_vals": name_vals,
        "vtype": vtype,
        "vtype_vals": vtype_vals,
        "loops": rows(loops),
        "loop_vals": loop_vals,
        "iters": iters,
        "seq": rows((seq.fill_null(0) if seq.null_count else seq).to_numpy()),
        "value_float": column("value_float"),
        "value_int": column("value_int"),
        "value_str": column("value_str"),
    }


def _first_seen(codes: "np.ndarray") -> list[int]:
    """The codes present in ``codes``, in the order of their first row."""
    import numpy as np

    if not len(codes):
        return []
    # a code first appears at row 0 or where the code changes: only those rows are looked at
    starts = codes[np.concatenate(([0], np.flatnonzero(codes[1:] != codes[:-1]) + 1))]
    present, first = np.unique(starts, return_index=True)
    return [int(c) for _, c in sorted(zip(first, present)) if c >= 0]


def _sorted_by(keys) -> bool:
    """Whether rows are in lexicographic order of ``keys`` (vectorised, O(n) per key)."""
    undecided = None
    for k in keys:
        a, b = k[:-1], k[1:]
        if undecided is None:
            if (b < a).any():
                return False
            undecided = b == a
        else:
            if (undecided & (b < a)).any():
                return False
            undecided &= b == a
        if not undecided.any():
            return True
    return True


@dataclass(frozen=True)
class _Series:
    """One (name, source) of a dataframe: its rows in result order and their identities.

    ``rows``: indices into the scan (None: all rows, as they are); ``occ``: each row's
    occurrence, its index among the values of its (run, loop context) in logging order
    (None: one value per context); ``dups`` / ``dup_of``: rows of later replay tasks
    that repeat the identity (run, context, occurrence) of a kept row, and that row.
    """

    rows: Any
    occ: Any = None
    dups: Any = None
    dup_of: Any = None


def _series_rows(rank, seq, iters, loops, task=None) -> _Series:
    """Rows of one (name, source) in context order, every value kept once.

    Rows are put in (run, task, logging order), where they usually already are, so
    that the rows of one loop context become neighbours even when they come from
    several files (replay tasks number their rows from 0); if the loop contexts are
    then out of order they are sorted (stable: task and logging order kept within a
    context). ``task`` orders the replay tasks (earliest first; None: one source of
    rows, a recording): of an identity that several tasks hold, the earliest one's
    row is kept and the others are returned as duplicates.
    """
    import numpy as np

    first = [rank, seq] if task is None else [rank, task, seq]
    order = None
    if not _sorted_by(first):
        order = np.lexsort(tuple(reversed(first)))
    keys = [rank, *iters]
    if order is not None:
        keys, loops = [k[order] for k in keys], loops[order]
        task = None if task is None else task[order]
    if not _sorted_by(keys):
        again = np.lexsort((loops, *reversed(keys)))  # stable: task and seq order kept within a context
        order = again if order is None else order[again]
        keys, loops = [k[again] for k in keys], loops[again]
        task = None if task is None else task[again]
    n = len(rank)
    if n < 2:
        return _Series(order)
    same = loops[1:] == loops[:-1]
    for k in keys:
        same &= k[1:] == k[:-1]
    if not same.any():
        return _Series(order)
    same_task = same if task is None else same & (task[1:] == task[:-1])
    idx = np.arange(n)
    starts = np.ones(n, dtype=bool)
    starts[1:] = ~same_task
    occ = idx - np.maximum.accumulate(np.where(starts, idx, 0))
    base = idx if order is None else order
    if task is None or not (same & ~same_task).any():
        return _Series(order, occ)
    ctx_start = np.ones(n, dtype=bool)
    ctx_start[1:] = ~same
    ident = (np.cumsum(ctx_start) - 1) * (int(occ.max()) + 1) + occ
    uniq, firsts = np.unique(ident, return_index=True)  # within a context the earliest task comes first
    keep = np.sort(firsts)
    dup = np.ones(n, dtype=bool)
    dup[firsts] = False
    dup_pos = np.flatnonzero(dup)
    kept_occ = occ[keep]
    return _Series(base[keep], kept_occ if kept_occ.any() else None, base[dup_pos],
                   base[firsts[np.searchsorted(uniq, ident[dup_pos])]])


def _differ(a, b) -> "np.ndarray":
    """Elementwise: the values differ (NaN equals NaN)."""
    import numpy as np

    if a.dtype.kind == "f" and b.dtype.kind == "f":
        return ~((a == b) | (np.isnan(a) & np.isnan(b)))
    return np.asarray([not (x == y or (x != x and y != y)) for x, y in zip(a.tolist(), b.tolist())], dtype=bool)


def _values(scan: dict, rows, kinds: set[str]):
    """The values of ``rows`` as a numpy array, typed by the kinds of the series."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    def col(c):
        arr = scan[c]
        return arr if rows is None else arr.take(pa.array(rows))

    if kinds <= {"float"}:
        return col("value_float").to_numpy()
    if kinds <= {"int"}:
        return col("value_int").to_numpy()
    if kinds <= {"int", "float"}:
        return pc.coalesce(col("value_float"), pc.cast(col("value_int"), pa.float64())).to_numpy()
    if kinds <= {"bool"}:
        return col("value_int").to_numpy().astype(bool)
    if kinds <= {"str"}:
        return col("value_str").to_numpy(zero_copy_only=False)
    vt = np.asarray(scan["vtype_vals"], dtype=object)[scan["vtype"] if rows is None else scan["vtype"][rows]]
    decoded = [
        f if t == "float" else int(i) if t == "int" else bool(i) if t == "bool"
        else json.loads(s_) if t == "json" else s_
        for t, f, i, s_ in zip(vt, *(col(c).to_pylist() for c in ("value_float", "value_int", "value_str")))
    ]
    vals = np.empty(len(decoded), dtype=object)  # lists stay elements, not a 2-D array
    vals[:] = decoded
    return vals


def _int_array(values) -> "pd.arrays.IntegerArray":
    """A nullable Int64 array from int32 iterations with :data:`_NO_ITER` for nulls."""
    import numpy as np
    import pandas as pd

    mask = values == _NO_ITER
    out = values.astype(np.int64)
    if mask.any():
        out[mask] = 0
    return pd.arrays.IntegerArray(out, mask)


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
    metas, _ = _cached_runs(store)
    run_ids = select_runs(store, where, metas)
    files, task_order = _dataframe_files(_listing(store, "logs", ".parquet"), run_ids if where else None)
    scan = _scan(store, files, names or None) if files else None
    if scan is None:
        if names:
            raise QueryError(
                f"no values logged under {', '.join(map(repr, names))}"
                + (f" in the runs where {where}" if where else "")
                + "; list the names with `flor-ray sql \"SELECT DISTINCT name FROM logs\"`, "
                "or back-fill a new name with flor.replay"
            )
        return pd.DataFrame(columns=["run_id", "version"])
    scan["task"] = task_order[scan["file"]]
    rid_dict = scan["rid_dict"]
    order_of = {m["run_id"]: i for i, m in enumerate(metas)}
    run_rank = np.array([order_of.get(r, len(order_of) + i) for i, r in enumerate(rid_dict)], dtype=np.int64)
    n_names, n_vtypes = len(scan["name_vals"]), len(scan["vtype_vals"])
    # which (name, source) series exist, and the value types of each
    combo = (scan["name"].astype(np.int64) * 2 + scan["src"]) * n_vtypes + scan["vtype"]
    kinds: dict[tuple[str, str], set[str]] = {}
    for c in np.flatnonzero(np.bincount(combo, minlength=n_names * 2 * n_vtypes)):
        ns, vt = divmod(int(c), n_vtypes)
        nm, src = divmod(ns, 2)
        key = (str(scan["name_vals"][nm]), ("record", "replay")[src])
        kinds.setdefault(key, set()).add(str(scan["vtype_vals"][vt]))
    out_names = names or [str(scan["name_vals"][c]) for c in _first_seen(scan["name"])]
    loop_vals = scan["loop_vals"]
    paths = [str(loop_vals[c]) for c in _first_seen(scan["loops"]) if loop_vals[c] is not None]
    depth = max([len([x for x in p.split("/") if x]) for p in paths] + [0])
    series = [(name, source, suffix) for name in out_names
              for source, suffix in (("record", ""), ("replay", "__replay")) if (name, source) in kinds]
    picked = _pick_series(scan, series, kinds, run_rank)
    codes, loops, iter_arrays, occurrence, columns = _join_series(scan, picked, run_rank, depth)
    _warn_conflicts(scan, picked)
    cols = list(columns)
    loop_cats = [str(v) for v in loop_vals]
    return _assemble(codes, loops, loop_cats, iter_arrays, columns, cols, paths, rid_dict, metas, occurrence)


class ConflictWarning(UserWarning):
    """Replay tasks hold different values for one identity (run, name, loop context,
    occurrence): the frame shows the earliest task's and flags the row."""


def _dataframe_files(listing: tuple, run_ids: "Sequence[str] | None") -> tuple[list[str], "np.ndarray"]:
    """The files a dataframe reads (those of ``run_ids`` in the runs' order, recorded
    then replayed; None: all) and each file's task order: replay partitions by the
    time they were written (their listing stamp, then their path), recordings 0."""
    import numpy as np

    if run_ids is not None:
        by_part: dict[tuple[str, str], list[str]] = {}
        for f, _, _ in listing:
            parts = f.split("/")
            if len(parts) > 2:
                by_part.setdefault((parts[1], parts[2]), []).append(f)
        files = [f for rid in run_ids for src in ("record", "replay")
                 for f in by_part.get((f"run_id={rid}", f"source={src}"), [])]
    else:
        files = [f for f, _, _ in listing if "/source=record/" in f or "/source=replay/" in f]
    stamps = {f: stamp for f, _, stamp in listing}
    replays = sorted((f for f in files if "/source=replay/" in f), key=lambda f: (stamps.get(f)[:1], f))
    rank = {f: i + 1 for i, f in enumerate(replays)}
    return files, np.asarray([rank.get(f, 0) for f in files], dtype=np.int32)


def _pick_series(scan: dict, series: list, kinds: dict, run_rank) -> list:
    """(column, :class:`_Series`, values) for each (name, source, suffix) of ``series``."""
    import numpy as np

    key_iters = [it for it in scan["iters"] if it is not None]
    name_code = {str(v): i for i, v in enumerate(scan["name_vals"])}

    def gather(a, rows):  # rows None: all of them, as they are
        return a if rows is None else a[rows]

    picked = []
    for name, source, suffix in series:
        sub = None  # one series: every row read belongs to it
        if len(series) > 1:
            sub = np.flatnonzero((scan["name"] == name_code[name]) & (scan["src"] == (source == "replay")))
        task = gather(scan["task"], sub) if source == "replay" else None
        if task is not None and (not len(task) or task.min() == task.max()):
            task = None  # one task: nothing repeated across tasks
        ser = _series_rows(run_rank[gather(scan["run"], sub)], gather(scan["seq"], sub),
                           [gather(it, sub) for it in key_iters], gather(scan["loops"], sub), task)
        if sub is not None:
            ser = _Series(sub if ser.rows is None else sub[ser.rows], ser.occ,
                          None if ser.dups is None else sub[ser.dups], None if ser.dup_of is None else sub[ser.dup_of])
        col = name if suffix == "" or (name, "record") not in kinds else name + suffix
        picked.append((col, ser, _values(scan, ser.rows, kinds[(name, source)])))
        if ser.dups is not None and len(ser.dups):
            kind = kinds[(name, source)]
            differ = _differ(_values(scan, ser.dup_of, kind), _values(scan, ser.dups, kind))
            if differ.any():
                at = np.arange(len(scan["run"])) if ser.rows is None else ser.rows
                flag = np.isin(at, ser.dup_of[differ])
                picked.append((col + "__conflict", _Series(ser.rows, ser.occ, ser.dups[differ], ser.dup_of[differ]),
                               flag))
    return picked


def _join_series(scan: dict, picked: list, run_rank, depth: int):
    """(run codes, loop codes, iteration arrays, occurrences or None, value columns) of
    the result: one series as it is, several outer-joined on (context, occurrence)."""
    import numpy as np
    import pandas as pd

    iter_cols = list(ITER_COLS[:depth])  # deeper columns are all null: not carried
    by_depth = {d: it for d, it in enumerate(scan["iters"]) if it is not None}
    loop_cats = [str(v) for v in scan["loop_vals"]]

    def gather(a, rows):
        return a if rows is None else a[rows]

    def iters_of(rows):
        n = len(gather(scan["run"], rows))
        return {d: _int_array(gather(by_depth[d], rows)) if d in by_depth
                else pd.arrays.IntegerArray(np.zeros(n, np.int64), np.ones(n, bool)) for d in range(depth)}

    several = any(ser.occ is not None for _, ser, _ in picked)
    if len(picked) == 1:
        col, ser, vals = picked[0]
        occ = None if ser.occ is None else ser.occ.astype(np.int64)
        return (gather(scan["run"], ser.rows), gather(scan["loops"], ser.rows), iters_of(ser.rows), occ, {col: vals})
    frames = []
    for col, ser, vals in picked:
        n = len(gather(scan["run"], ser.rows))
        frames.append(pd.DataFrame({
            "_rank": run_rank[gather(scan["run"], ser.rows)],
            "loops": pd.Categorical.from_codes(gather(scan["loops"], ser.rows), categories=loop_cats),
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


def _warn_conflicts(scan: dict, picked: list) -> None:
    """A :class:`ConflictWarning` naming the identities whose replayed values differ."""
    import warnings

    found = [(col[: -len("__conflict")], ser) for col, ser, _ in picked if col.endswith("__conflict")]
    if not found:
        return
    lines = []
    for col, ser in found:
        for d, k in list(zip(ser.dups.tolist(), ser.dup_of.tolist()))[:5]:
            ctx = ", ".join(f"{n}={int(scan['iters'][i][k])}" for i, n in
                            enumerate(x for x in str(scan["loop_vals"][scan["loops"][k]]).split("/") if x))
            lines.append(f"{col} run={scan['rid_dict'][scan['run'][k]]} {ctx}: "
                         f"{_values(scan, [k], {'json'})[0]!r} (shown) vs {_values(scan, [d], {'json'})[0]!r}")
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


_CTX = "name, loops, iter0, iter1, iter2, iter3, items"
#: ``logs_all``: every row of every partition (kept-apart ones too) with a typed
#: ``value``; ``logs``: recorded rows, and each replayed value once, the earliest
#: task's of its identity (run, name, loop context, occurrence); ``replay_mismatch``:
#: the rows of tasks that failed their fidelity check, next to the recorded values.
_VALUE_VIEWS = (
    "CREATE OR REPLACE VIEW logs_all AS SELECT *, "
    "CASE vtype WHEN 'float' THEN value_float WHEN 'int' THEN value_int::DOUBLE "
    "WHEN 'bool' THEN value_int::DOUBLE END AS value FROM logs_arrow",
    "CREATE OR REPLACE VIEW logs AS SELECT * FROM logs_all WHERE source = 'record' UNION ALL "
    "SELECT * EXCLUDE (_occ, _pick) FROM (SELECT l.*, row_number() OVER ("
    f"PARTITION BY l.run_id, {', '.join('l.' + c for c in _CTX.split(', '))}, l._occ "
    "ORDER BY o.written NULLS LAST, l.task) AS _pick FROM ("
    f"SELECT *, row_number() OVER (PARTITION BY run_id, task, {_CTX} ORDER BY seq) AS _occ "
    "FROM logs_all WHERE source = 'replay') l LEFT JOIN flor_replay_order o ON o.task = l.task) WHERE _pick = 1",
    "CREATE OR REPLACE VIEW replay_mismatch AS WITH "
    f"m AS (SELECT *, row_number() OVER (PARTITION BY run_id, task, {_CTX} ORDER BY seq) AS _occ "
    f"FROM logs_all WHERE source = '{MISMATCH_SOURCE}'), "
    "r AS (SELECT run_id, name, loops, iter0, iter1, iter2, iter3, items, vtype, value_float, value_int, value_str, "
    f"row_number() OVER (PARTITION BY run_id, {_CTX} ORDER BY seq) AS _occ FROM logs_all "
    f"WHERE source = 'record' AND run_id IN (SELECT run_id FROM m)) "
    "SELECT m.* EXCLUDE (_occ), r.value_float AS recorded_float, r.value_int AS recorded_int, "
    "r.value_str AS recorded_str, (r.name IS NOT NULL AND (m.vtype IS DISTINCT FROM r.vtype "
    "OR m.value_float IS DISTINCT FROM r.value_float OR m.value_int IS DISTINCT FROM r.value_int "
    "OR m.value_str IS DISTINCT FROM r.value_str)) AS mismatched FROM m LEFT JOIN r ON m.run_id = r.run_id "
    "AND m.name = r.name AND m._occ = r._occ AND "
    + " AND ".join(f"m.{c} IS NOT DISTINCT FROM r.{c}" for c in _CTX.split(", ")[1:]),
)


def _create_views(con, listing: tuple) -> None:
    """The views over ``logs_arrow``, and the order of the replay partitions in
    ``listing`` that ``logs`` keeps the earliest of (the same as dataframe()'s)."""
    stamps = {f: st for f, _, st in listing}
    replays = sorted((f for f in stamps if "/source=replay/" in f), key=lambda f: (stamps[f][:1], f))
    keys = [f.rsplit("/", 1)[-1][: -len(".parquet")].replace("'", "''") for f in replays]
    rows = ", ".join(f"('{k}', {i})" for i, k in enumerate(keys))
    con.execute("CREATE OR REPLACE TABLE flor_replay_order AS "
                + (f"SELECT * FROM (VALUES {rows}) t(task, written)" if rows
                   else "SELECT NULL::VARCHAR AS task, NULL::BIGINT AS written WHERE false"))
    for view in _VALUE_VIEWS:
        con.execute(view)


#: a relation up to this many rows is read into memory (~300 bytes a row) when its
#: tables are built, so that later queries do not open every file again
SQL_MATERIALIZE_ROWS = 100_000
#: files larger than this in all (a few KiB a file aside) are not tried: more rows
_SQL_MATERIALIZE_BYTES = 4 << 20
_SQL_KEEP = 4  # stores whose connections are kept (least recently used dropped)


def _sql_error(exc: Exception, runs) -> QueryError:
    return QueryError(
        f"SQL failed: {str(exc).splitlines()[0]}; tables: logs(run_id, source, version, file, "
        "loops, iter0..iter3, items, name, vtype, value, value_float, value_int, value_str, seq, task), "
        "logs_all (every row, replayed values as often as tasks wrote them), replay_mismatch (rows kept apart "
        f"by the fidelity check, with recorded_* and mismatched) and runs({', '.join(runs.columns)})"
    )


class _SqlConnection:
    """One store's sandboxed DuckDB connection (:mod:`flor_ray.sandbox`), kept between
    :func:`sql` calls.

    ``logs`` / ``logs_arrow`` and ``runs`` are Arrow data registered from Python, built
    from a listing of the store and registered again when a later listing differs (a
    new run, a new flush, a replay partition, a rewritten or deleted file). Used under
    ``lock`` only.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.con: Any = None
        self.logs_key: Any = None  # the listing the logs tables were built from
        #: "table": the rows in memory; "view": an Arrow dataset that reads the files per query
        self.logs_kind: str | None = None
        self.runs_key: Any = None
        self.runs: Any = None  # the runs DataFrame

    def connect(self):
        if self.con is None:
            from .sandbox import connect

            self.con = connect()
        return self.con

    def close(self) -> None:
        con, self.con = self.con, None
        self.logs_key = self.logs_kind = self.runs_key = self.runs = None
        if con is not None:
            try:
                con.close()
            except Exception:  # noqa: BLE001 - closing a connection that is going anyway
                pass

    def set_runs(self, runs, key) -> None:
        import duckdb

        con = self.connect()
        self.runs_key = None
        # as Arrow (a registered DataFrame is converted again by every query), unless a
        # column does not convert: then the DataFrame, failing only where it is used
        con.register("flor_runs_frame", runs)
        try:
            table = con.sql("SELECT * FROM flor_runs_frame").to_arrow_table()
        except duckdb.Error:
            table = runs
        finally:
            con.unregister("flor_runs_frame")
        con.register("runs", table)
        self.runs, self.runs_key = runs, key

    def set_logs(self, store: "Store", listing: tuple) -> None:
        import pyarrow as pa

        con = self.connect()
        self.logs_key = self.logs_kind = None
        files = [f[0] for f in listing]
        small = sum(f[1] or 0 for f in listing) <= _SQL_MATERIALIZE_BYTES + 8192 * len(files)
        if not files:
            source: Any = read_logs(store)
        else:  # a lazy Arrow dataset (projections and filters pushed down), or its rows
            # dictionary-encoded, as in the files: DuckDB scans the codes, not millions of
            # equal strings (as fast as its own Parquet reader on the 10^6-row benchmark)
            str_t = pa.dictionary(pa.int32(), pa.string())
            file_schema = pa.schema([pa.field(f.name, str_t) if f.name in _DICT_COLS else f for f in schema()])
            part_schema = pa.schema([("run_id", str_t), ("source", str_t)])
            source = _dataset(store, files, file_schema, part_schema, True)
            if small and source.count_rows() <= SQL_MATERIALIZE_ROWS:
                source = source.to_table()
        con.register("logs_arrow", source)
        self.logs_kind = "view" if files and not isinstance(source, pa.Table) else "table"
        _create_views(con, listing)
        self.logs_key = listing


_SQL_LOCK = threading.Lock()
_SQL_CONNECTIONS: "dict[tuple, _SqlConnection]" = {}
_SQL_ABANDONED: list = []  # connections inherited through fork(): never touched again


def _sql_connection(store: "Store") -> _SqlConnection:
    key = _store_key(store)
    dropped = []
    with _SQL_LOCK:
        pid = key[0]
        for k in [k for k in _SQL_CONNECTIONS if k[0] != pid]:  # a parent's: its threads are gone
            _SQL_ABANDONED.append(_SQL_CONNECTIONS.pop(k))
        state = _SQL_CONNECTIONS.pop(key, None) or _SqlConnection()
        _SQL_CONNECTIONS[key] = state  # most recently used last
        while len(_SQL_CONNECTIONS) > _SQL_KEEP:
            dropped.append(_SQL_CONNECTIONS.pop(next(iter(_SQL_CONNECTIONS))))
    for old in dropped:
        with old.lock:
            old.close()
    return state


def sql(store: "Store", query: str) -> "pd.DataFrame":
    """Run DuckDB SQL with ``logs`` (the long relation) and ``runs`` as tables.

    Queries only, in the sandbox of :mod:`flor_ray.sandbox`: no file, network,
    extension or setting is reachable, and no statement changes the tables. The
    connection and its tables are kept per store and reused while a listing of the
    store shows the same files (names, sizes, change stamps), so a small query costs a
    listing and the query itself; a new run, flush or replay partition is seen by the
    next call. A relation of up to :data:`SQL_MATERIALIZE_ROWS` rows is held in memory,
    larger ones are read from the Parquet files by every query.
    """
    import duckdb

    from .sandbox import check_query, refusal, run_query

    store.check()
    if not isinstance(query, str) or not query.strip():
        raise QueryError("sql() needs a query string, e.g. \"SELECT name, count(*) FROM logs GROUP BY name\"")
    listing = _listing(store, "logs", ".parquet")
    metas, runs_listing = _cached_runs(store)
    runs_key = (runs_listing, tuple(m.get("status") for m in metas))
    files = [f[0] for f in listing]
    state = _sql_connection(store)
    with state.lock:
        runs = state.runs if state.runs_key == runs_key else runs_frame(store, metas)
        try:
            con = state.connect()
            check_query(con, query)
            if state.runs_key != runs_key:
                state.set_runs(runs, runs_key)
            if state.logs_key != listing:
                state.set_logs(store, listing)
            return run_query(con, query)
        except QueryError:
            raise
        except (duckdb.IOException, duckdb.InvalidInputException) as exc:
            if "parquet" in str(exc).lower() or "thrift" in str(exc).lower():
                raise _unreadable(store, files, exc) from exc
            raise refusal(exc) or _sql_error(exc, runs) from exc
        except duckdb.FatalException as exc:  # the database is unusable: a new one next time
            state.close()
            raise _sql_error(exc, runs) from exc
        except duckdb.Error as exc:
            raise refusal(exc) or _sql_error(exc, runs) from exc
        except (OSError, ValueError) as exc:  # a corrupted file met by the Arrow scan
            raise _unreadable(store, files, exc) from exc

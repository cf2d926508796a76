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

from typing import TYPE_CHECKING, Any, Collection, Iterable, Sequence

from ..errors import QueryError
from . import layout
from .damage import healthy_parts
from .listing import Entry, list_files

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import pyarrow as pa

    from . import Store

__all__ = [
    "SCHEMA_VERSION",
    "TASK_META_KEY",
    "MISMATCH_SOURCE",
    "MAX_LOOP_DEPTH",
    "ITER_COLS",
    "DICT_COLS",
    "schema",
    "vtype_of",
    "merge_rows",
    "empty_rows",
    "table_to_parquet_bytes",
    "log_parts",
    "listed_parts",
    "parts_of_runs",
    "parts_in_order",
    "file_schemas",
    "read_logs",
    "dataset",
    "unreadable",
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


def vtype_of(v: Any) -> str:
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


def merge_rows(into: dict, rows: dict, keep: "set[str] | None") -> None:
    """Append buffered ``rows`` (from ``take_rows``) to ``into``, keeping some names.

    ``rows["prefix_ids"]`` holds each row's index into ``rows["prefixes"]``."""
    base = len(into["prefixes"])
    into["prefixes"].extend(rows["prefixes"])
    items = dict(rows["items"])
    columns = zip(rows["prefix_ids"], rows["lasts"], rows["names"], rows["values"])
    for r, (prefix, last, name, value) in enumerate(columns):
        if keep is None or name in keep:
            if r in items:
                into["items"].append((len(into["names"]), items[r]))
            into["prefix_ids"].append(base + prefix)
            into["lasts"].append(last)
            into["names"].append(name)
            into["values"].append(value)


def empty_rows() -> dict:
    """Buffers as ``take_rows`` hands them over, holding no row."""
    return {"prefixes": [], "prefix_ids": [], "lasts": [], "items": [], "names": [], "values": []}


def table_to_parquet_bytes(table: "pa.Table") -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    # dictionary pages for the repetitive string columns only: numbers and seq do not
    # repeat, and dictionary-encoding them made writes 3x slower and files 2x larger
    pq.write_table(table, sink, compression="zstd", use_dictionary=[c for c in DICT_COLS if c in table.column_names])
    return sink.getvalue().to_pybytes()

#: the repetitive string columns: dictionary-encoded in the files
DICT_COLS = ("version", "file", "loops", "name", "vtype", "task")


def log_parts(store: "Store", rel: str = layout.LOGS, runs: Collection[str] | None = None) -> tuple[Entry, ...]:
    """The Parquet parts below ``rel`` (``logs`` or a folder in it) that belong to a
    valid run and look like Parquet (:func:`flor_ray.store.damage.healthy_parts`).

    ``runs``: the ids of the store's valid runs, when the caller has them at hand.
    """
    if runs is None:
        from .runs import load_runs

        runs = {m["run_id"] for m in load_runs(store)}
    return healthy_parts(store, listed_parts(store, rel), runs)


def listed_parts(store: "Store", rel: str = layout.LOGS, recursive: bool = True) -> tuple[Entry, ...]:
    """The Parquet files below ``rel`` that hold rows: without the record parts that a
    compacted file replaces, from a listing without a gap in any run's flushes
    (:mod:`flor_ray.store.compaction` says why one more listing is enough)."""
    from .compaction import has_gap, live_parts

    listing = list_files(store, rel, ".parquet", recursive)
    if has_gap(listing):
        listing = list_files(store, rel, ".parquet", recursive)
    return live_parts(listing)


#: a query of more runs than this lists the whole relation once (a request per 1,000
#: files on object stores) rather than each run's folders (a request per folder)
LIST_ALL_FROM = 8


def parts_of_runs(store: "Store", run_ids: Sequence[str], sources: Sequence[str]) -> tuple[Entry, ...]:
    """:func:`listed_parts` of these runs' folders of these sources (unchecked)."""
    if len(run_ids) > LIST_ALL_FROM:
        want = set(run_ids)
        return tuple(e for e in listed_parts(store) if layout.part_run_id(e.path) in want
                     and layout.part_source(e.path) in sources)
    listing: tuple[Entry, ...] = ()
    for rid in run_ids:
        for src in sources:
            listing += listed_parts(store, layout.log_folder(rid, src))
    return listing


def parts_in_order(listing: Sequence[Entry], run_ids: "Sequence[str] | None") -> tuple[list[str], "np.ndarray"]:
    """The parts a query reads (those of ``run_ids`` in the runs' order, recorded then
    replayed; None: all) and each part's task order: replay partitions by the time
    they were written (their listing stamp, then their path), recordings 0."""
    import numpy as np

    if run_ids is not None:
        by_part: dict[tuple[str | None, str | None], list[str]] = {}
        for f, _, _ in listing:
            by_part.setdefault((layout.part_run_id(f), layout.part_source(f)), []).append(f)
        files = [f for rid in run_ids for src in ("record", "replay") for f in by_part.get((rid, src), [])]
    else:
        files = [f for f, _, _ in listing if layout.part_source(f) in ("record", "replay")]
    stamps = {f: stamp for f, _, stamp in listing}
    replays = sorted((f for f in files if layout.part_source(f) == "replay"), key=lambda f: (stamps.get(f)[:1], f))
    rank = {f: i + 1 for i, f in enumerate(replays)}
    return files, np.asarray([rank.get(f, 0) for f in files], dtype=np.int32)


def file_schemas(dictionary: bool = False) -> "tuple[pa.Schema, pa.Schema]":
    """The schema of the parts' columns and that of the partition columns (``run_id``,
    ``source``); ``dictionary``: the repetitive strings dictionary-encoded."""
    import pyarrow as pa

    str_t = pa.dictionary(pa.int32(), pa.string()) if dictionary else pa.string()
    file_schema = pa.schema([pa.field(f.name, str_t) if dictionary and f.name in DICT_COLS else f for f in schema()])
    return file_schema, pa.schema([("run_id", str_t), ("source", str_t)])


def read_logs(
    store: "Store",
    names: Sequence[str] | None = None,
    run_ids: Iterable[str] | None = None,
    sources: Sequence[str] = ("record", "replay"),
    columns: Sequence[str] | None = None,
    dictionary: bool = False,
    runs: Collection[str] | None = None,
) -> "pa.Table":
    """Rows of the relation (with ``run_id`` and ``source``) for these names/runs.

    Only the files of the asked runs are opened. ``dictionary=True`` keeps the
    repetitive string columns dictionary-encoded, as they are in the files, which
    saves materialising millions of identical strings. ``runs``: as for :func:`log_parts`.
    """
    import pyarrow as pa
    import pyarrow.dataset as ds

    run_list = None if run_ids is None else list(run_ids)
    files: list[str] = []
    if run_list is None:
        files = [f.path for f in log_parts(store, runs=runs)]
    else:
        listing = parts_of_runs(store, run_list, sources)
        if runs is None and listing:
            from .runs import load_runs

            runs = {m["run_id"] for m in load_runs(store)}
        files = [f.path for f in healthy_parts(store, listing, runs or ())]
    files = [f for f in files if layout.part_source(f) in sources]
    file_schema, part_schema = file_schemas(dictionary)
    full = pa.schema(list(file_schema) + list(part_schema))
    if columns is not None:
        full = pa.schema([full.field(c) for c in columns])
    if not files:
        return full.empty_table()
    dset = dataset(store, files, file_schema, part_schema, dictionary)
    flt = None
    if names is not None:
        flt = ds.field("name").isin(list(names))
    try:
        out = dset.to_table(filter=flt, columns=list(columns) if columns is not None else None)
        return out.unify_dictionaries() if dictionary else out
    except (OSError, pa.ArrowInvalid) as exc:
        raise unreadable(store, files, exc) from exc


def unreadable(store: "Store", files: Sequence[str], exc: Exception) -> QueryError:
    """Find which Parquet file is broken (read each alone) and name it in the error."""
    import pyarrow.parquet as pq

    fs, root = store.arrow_fs()
    bad: list[str] = []  # store-relative
    for full_read in (False, True):  # footers first (cheap), then whole files
        for f in files:
            try:
                with fs.open_input_file(f"{root}/{f}") as fh:
                    pq.read_table(fh) if full_read else pq.read_metadata(fh)
            except Exception:  # noqa: BLE001 - any failure marks the file
                bad.append(f)
        if bad:
            break
    where = ", ".join(map(store.full_url, bad[:5])) if bad else f"a file under {store.full_url(layout.LOGS)}"
    fix = ("a recorded part is lost: re-record the run, or delete the file to read the rest"
           if any(layout.part_source(b) == "record" for b in bad) else "delete it and replay again: the task rewrites it")
    return QueryError(f"cannot read the log relation: {where} is truncated or corrupted ({exc}); {fix}")


def dataset(store: "Store", files: Sequence[str], file_schema, part_schema, dictionary: bool):
    """A pyarrow dataset over these parts, partitioned by run and source as their folders are."""
    import pyarrow as pa
    import pyarrow.dataset as ds

    fs, root = store.arrow_fs()
    kw = {}
    if dictionary:
        runs_seen = sorted({layout.part_run_id(f) for f in files})
        kw["dictionaries"] = {"run_id": pa.array(runs_seen), "source": pa.array(["record", "replay", MISMATCH_SOURCE])}
        fmt = ds.ParquetFileFormat(read_options=ds.ParquetReadOptions(dictionary_columns=list(DICT_COLS)))
    else:
        fmt = ds.ParquetFileFormat()
    part = ds.partitioning(part_schema, flavor="hive", **kw)
    return ds.dataset(
        [f"{root}/{f}" for f in files],
        schema=pa.schema(list(file_schema) + list(part_schema)),
        format=fmt,
        filesystem=fs,
        partitioning=part,
        partition_base_dir=f"{root}/{layout.LOGS}",
    )

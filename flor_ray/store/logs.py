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
from .listing import Entry, list_files

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import pyarrow as pa

    from . import Store
    from .segments import Piece

__all__ = [
    "SCHEMA_VERSION",
    "list_pieces",
    "read_pieces",
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


def log_parts(store: "Store", runs: Collection[str] | None = None, run_ids: Sequence[str] | None = None,
              sources: Sequence[str] | None = None) -> "tuple[Piece, ...]":
    """The pieces of the relation (loose files and origins in segments,
    :mod:`flor_ray.store.segments`) that belong to a valid run, from files that look
    like Parquet (:func:`flor_ray.store.damage.healthy_pieces`); ``run_ids`` /
    ``sources``: only these (None: all).

    ``runs``: the ids of the store's valid runs, when the caller has them at hand.
    """
    from .damage import healthy_pieces

    if runs is None:
        from .runs import load_runs

        runs = {m["run_id"] for m in load_runs(store)}
    return healthy_pieces(store, list_pieces(store, run_ids, sources), runs)


def listed_parts(store: "Store", rel: str = layout.LOGS, recursive: bool = True) -> tuple[Entry, ...]:
    """The loose Parquet files below ``rel`` that hold rows (segments aside): without
    the record parts that a compacted file replaces, from a listing without a gap in
    any run's flushes (:mod:`flor_ray.store.compaction` says why one more listing is enough)."""
    from .compaction import has_gap, live_parts

    listing = list_files(store, rel, ".parquet", recursive)
    if has_gap(listing):
        listing = list_files(store, rel, ".parquet", recursive)
    return tuple(e for e in live_parts(listing) if not layout.is_segment(e.path))


#: a query of more runs than this lists the whole relation once (a request per 1,000
#: files on object stores) rather than each run's folders (a request per folder)
LIST_ALL_FROM = 8


def list_pieces(store: "Store", run_ids: Sequence[str] | None = None,
                sources: Sequence[str] | None = None) -> "tuple[Piece, ...]":
    """Every piece of the relation (unchecked), or those of ``run_ids`` / ``sources``:
    the loose files listed first, then the segments (:func:`~flor_ray.store.segments.resolve`)."""
    from .segments import resolve, stable_segments

    if run_ids is None or len(run_ids) > LIST_ALL_FROM:
        loose = listed_parts(store)
    else:
        loose = ()
        for rid in run_ids:
            for src in sources or ("record", "replay", MISMATCH_SOURCE):
                loose += listed_parts(store, layout.log_folder(rid, src))
    for attempt in range(8):
        try:
            pieces = resolve(store, loose, stable_segments(store))
            break
        except FileNotFoundError:  # a segment merged away since it was listed: list them again
            if attempt == 7:
                raise
    if run_ids is not None:
        want = set(run_ids)
        pieces = tuple(p for p in pieces if p.run_id in want)
    if sources is not None:
        pieces = tuple(p for p in pieces if p.source in sources)
    return pieces


def parts_of_runs(store: "Store", run_ids: Sequence[str], sources: Sequence[str]) -> "tuple[Piece, ...]":
    """:func:`list_pieces` of these runs and sources (unchecked)."""
    return list_pieces(store, list(run_ids), sources)


def parts_in_order(pieces: "Sequence[Piece]", run_ids: "Sequence[str] | None") -> "tuple[list[Piece], np.ndarray]":
    """The pieces a query reads (those of ``run_ids`` in the runs' order, recorded then
    replayed; None: all) and each one's task order: replay partitions by the time
    they were written (their listing stamp, then their path), recordings 0."""
    import numpy as np

    if run_ids is not None:
        by_part: dict[tuple[str, str], list] = {}
        for p in pieces:
            by_part.setdefault((p.run_id, p.source), []).append(p)
        chosen = [p for rid in run_ids for src in ("record", "replay") for p in by_part.get((rid, src), [])]
    else:
        chosen = [p for p in pieces if p.source in ("record", "replay")]
    replays = sorted((p for p in chosen if p.source == "replay"), key=lambda p: (p.stamp[:1], p.origin))
    rank = {p.origin: i + 1 for i, p in enumerate(replays)}
    return chosen, np.asarray([rank.get(p.origin, 0) for p in chosen], dtype=np.int32)


def file_schemas(dictionary: bool = False) -> "tuple[pa.Schema, pa.Schema]":
    """The schema of the parts' columns and that of the partition columns (``run_id``,
    ``source``); ``dictionary``: the repetitive strings dictionary-encoded."""
    import pyarrow as pa

    str_t = pa.dictionary(pa.int32(), pa.string()) if dictionary else pa.string()
    file_schema = pa.schema([pa.field(f.name, str_t) if dictionary and f.name in DICT_COLS else f for f in schema()])
    return file_schema, pa.schema([("run_id", str_t), ("source", str_t)])


def read_pieces(store: "Store", pieces: "Sequence[Piece]", columns: Sequence[str] | None = None,
                dictionary: bool = False) -> "pa.Table":
    """The rows of ``pieces`` with ``run_id`` and ``source``, in the columns of
    :func:`file_schemas` (a column an older file lacks reads as nulls)."""
    import numpy as np
    import pyarrow as pa

    from .segments import piece_tables

    file_schema, part_schema = file_schemas(dictionary)
    full = pa.schema(list(file_schema) + list(part_schema))
    if columns is not None:
        full = pa.schema([full.field(c) for c in columns])
    want = [f.name for f in full if f.name not in ("run_id", "source")]
    dict_cols = [c for c in want if dictionary and c in DICT_COLS]

    def read(pf, row_groups):
        have = [c for c in want if c in set(pf.schema_arrow.names)]
        return (pf.read(columns=have, use_threads=False) if row_groups is None
                else pf.read_row_groups(row_groups, columns=have, use_threads=False))

    tables = []
    for p, t in zip(pieces, piece_tables(store, pieces, read, dict_cols)):
        cols = []
        for f in full:
            if f.name in ("run_id", "source"):
                text = p.run_id if f.name == "run_id" else p.source
                if dictionary:  # from buffers: pa.array and pa.scalar import pandas (to ask if it is pandas')
                    raw = text.encode()
                    value = pa.Array.from_buffers(pa.string(), 1, [None, pa.py_buffer(np.array([0, len(raw)], np.int32)),
                                                                   pa.py_buffer(raw)])
                    codes = pa.Array.from_buffers(pa.int32(), t.num_rows,
                                                  [None, pa.py_buffer(np.zeros(t.num_rows, np.int32))])
                    cols.append(pa.DictionaryArray.from_arrays(codes, value))
                else:
                    cols.append(pa.repeat(pa.scalar(text, pa.string()), t.num_rows))
            elif f.name in t.column_names:
                col = t.column(f.name)
                cols.append(col if col.type == f.type else col.cast(f.type))
            else:
                cols.append(pa.nulls(t.num_rows, f.type))
        tables.append(pa.Table.from_arrays(cols, schema=full))
    if not tables:  # not Schema.empty_table(), which imports pandas
        return pa.Table.from_arrays([pa.nulls(0, f.type) for f in full], schema=full)
    out = pa.concat_tables(tables)
    return out.unify_dictionaries() if dictionary else out


def read_relation(store: "Store", pieces: "Sequence[Piece]", columns: Sequence[str] | None = None) -> "pa.Table":
    """:func:`read_pieces` (dictionary-encoded) in no particular row order: a segment wanted
    whole is read as one file, its run and source columns its own, not piece by piece
    (a thousand runs' pieces cost a thousand small tables)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .segments import whole_segments

    file_schema, part_schema = file_schemas(True)
    full = pa.schema(list(file_schema) + list(part_schema))
    if columns is not None:
        full = pa.schema([full.field(c) for c in columns])
    by_file: dict[str, list] = {}
    for p in pieces:
        if p.in_segment:
            by_file.setdefault(p.file, []).append(p)
    fs, root = store.arrow_fs()
    tables, whole = [], set()
    for rel, ps in by_file.items():
        if not whole_segments(store, ps):
            continue
        with fs.open_input_file(f"{root}/{rel}") as fh:
            pf = pq.ParquetFile(fh, read_dictionary=[f.name for f in full if pa.types.is_dictionary(f.type)])
            if not set(full.names) <= set(pf.schema_arrow.names):
                continue  # an older segment: piece by piece, the missing columns as nulls
            t = pf.read(columns=full.names)
        if t.schema.remove_metadata() != full.remove_metadata():
            continue
        tables.append(t.replace_schema_metadata(full.metadata))
        whole.add(rel)
    rest = [p for p in pieces if p.file not in whole]
    if rest or not tables:
        tables.append(read_pieces(store, rest, columns, dictionary=True))
    return pa.concat_tables(tables).unify_dictionaries() if len(tables) > 1 else tables[0]


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

    Only the files (and segment row groups) of the asked runs are read.
    ``dictionary=True`` keeps the repetitive string columns dictionary-encoded, as they
    are in the files, which saves materialising millions of identical strings.
    ``runs``: as for :func:`log_parts`. Listed again when a file is gone before it is
    read (compacted or consolidated meanwhile).
    """
    import pyarrow as pa

    run_list = None if run_ids is None else list(run_ids)
    cols = None if columns is None else list(dict.fromkeys([*columns, *(["name"] if names is not None else [])]))
    before = None
    for attempt in range(64):
        pieces = log_parts(store, runs=runs, run_ids=run_list, sources=sources)
        try:
            out = read_pieces(store, pieces, cols, dictionary)
            break
        except FileNotFoundError:
            if attempt == 63 or pieces == before:
                raise
            before = pieces
        except (OSError, pa.ArrowInvalid) as exc:
            raise unreadable(store, sorted({p.file for p in pieces}), exc) from exc
    if names is not None:
        import pyarrow.compute as pc

        out = out.filter(pc.is_in(out.column("name"), value_set=pa.array(list(names), pa.string())))
        if columns is not None:
            out = out.select(list(columns))
    return out


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


def dataset(store: "Store", pieces: "Sequence[Piece]", file_schema, part_schema, dictionary: bool):
    """A pyarrow dataset over these pieces: the loose files partitioned by run and source
    as their folders are, the segments holding them as columns; None when a segment is
    only partly wanted (the caller reads the pieces instead: :func:`read_pieces`)."""
    import pyarrow as pa
    import pyarrow.dataset as ds

    from .segments import whole_segments

    fs, root = store.arrow_fs()
    full = pa.schema(list(file_schema) + list(part_schema))
    loose = [p.file for p in pieces if not p.in_segment]
    segs = list(dict.fromkeys(p.file for p in pieces if p.in_segment))
    if not whole_segments(store, pieces):
        return None
    dict_cols = list(DICT_COLS)
    parts = []
    if loose:
        kw = {}
        if dictionary:
            runs_seen = sorted({p.run_id for p in pieces})
            kw["dictionaries"] = {"run_id": pa.array(runs_seen),
                                  "source": pa.array(["record", "replay", MISMATCH_SOURCE])}
        fmt = (ds.ParquetFileFormat(read_options=ds.ParquetReadOptions(dictionary_columns=dict_cols))
               if dictionary else ds.ParquetFileFormat())
        parts.append(ds.dataset([f"{root}/{f}" for f in loose], schema=full, format=fmt, filesystem=fs,
                                partitioning=ds.partitioning(part_schema, flavor="hive", **kw),
                                partition_base_dir=f"{root}/{layout.LOGS}"))
    if segs:
        fmt = (ds.ParquetFileFormat(read_options=ds.ParquetReadOptions(dictionary_columns=dict_cols + ["run_id", "source"]))
               if dictionary else ds.ParquetFileFormat())
        parts.append(ds.dataset([f"{root}/{f}" for f in segs], schema=full, format=fmt, filesystem=fs))
    return parts[0] if len(parts) == 1 else ds.dataset(parts)

"""Segments: the rows of many runs' files in one Parquet file, so that a query over
thousands of ended runs opens a few files instead of one (or more) per run.

A segment ``logs/segments/seg-<time>-<rand>.parquet`` holds the rows of *origins*:
files that stood on their own in a run's folder (a sealed run's compacted record
file, a replay task's partition), each copied whole, in path order, with ``run_id``
and ``source`` as columns. Its footer key :data:`SEGMENT_KEY` lists every origin:
its path, size and listing stamp as the writer listed it, its run and source, where
its rows are (row group, offset, count) and, for a replay partition, the footer the
task wrote (what the planner reads to know what the task covered). Row groups follow
the origins (a run's rows are never split across two origins' groups more than
needed), so reading one run's rows reads only its groups.

How a reader makes one row set out of loose files and segments, without a lock
(:func:`resolve`):

- an origin is taken from one place only: a loose file listed with the *same* size
  and stamp as a segment's origin is that origin not yet deleted (the segment is
  read, the file ignored); a loose file listed with *another* stamp was written after
  the segment (a retried task rewriting its partition), and wins over every segment;
- an origin several segments hold (two consolidations of the same files, or a merge
  of segments that left the old ones for a moment) is read from the last segment by
  name (names begin with the time of writing);
- the segments are listed after the loose files, and listed again until two listings
  agree (:func:`stable_segments`). A writer writes a segment before it deletes any
  file the segment holds, so a loose file missing from the first listing was deleted
  after its segment was written, before the segment listings began: they show it.
  A segment deleted after it was listed is a ``FileNotFoundError`` when read, which
  the queries answer by listing again.

The writer side is :mod:`flor_ray.store.consolidation`.
"""

from __future__ import annotations

import json
import threading
from functools import partial
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

from . import layout
from .listing import Entry, list_files

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa
    import pyarrow.parquet as pq

    from . import Store

__all__ = ["SEGMENT_KEY", "Origin", "Piece", "segment_origins", "stable_segments", "resolve", "loose_piece",
           "piece_tables", "piece_names", "distinct_names", "whole_segments"]

#: the footer key of a segment: JSON {"format": 1, "origins": [[path, size, stamp, run_id, source,
#: row_group, offset, rows, task_footer], ...], "names": [[name, ...] or null, ...]}: ``names``,
#: one list per origin (the distinct names of its rows, what a plan needs of a run's rows),
#: is absent from the segments of earlier versions, which read it as unknown
SEGMENT_KEY = b"flor_ray.segment"
SEGMENT_FORMAT = 1
#: listings of the segments folder a reader takes at most to see two that agree
SEGMENT_LISTINGS = 8


def _tupled(x: Any) -> Any:
    return tuple(_tupled(v) for v in x) if isinstance(x, list) else x


@dataclass(frozen=True)
class Origin:
    """A file whose rows a segment holds, as the segment's footer lists it."""

    path: str
    size: int | None
    stamp: Any
    run_id: str
    source: str
    row_group: int  # -1: no rows
    offset: int
    rows: int
    task_footer: str | None = None  # a replay partition's TASK_META_KEY footer
    names: tuple[str, ...] | None = None  # the distinct names of its rows; None: not known

    def as_json(self) -> list:
        return [self.path, self.size, self.stamp, self.run_id, self.source, self.row_group, self.offset,
                self.rows, self.task_footer]


@dataclass(frozen=True)
class Piece:
    """Rows a query reads: a loose file whole, or an origin's rows in a segment.

    ``origin``: the path the rows were written as (queries order and name rows by it,
    so a consolidated store reads exactly as it did before); ``stamp``: its listing
    stamp (replay tasks are ordered by it); ``file`` / ``file_size`` / ``file_stamp``:
    the file to open.
    """

    file: str
    file_size: int | None
    file_stamp: Any
    origin: str
    stamp: Any
    run_id: str
    source: str
    row_group: int | None = None  # None: the whole file
    offset: int = 0
    rows: int | None = None
    task_footer: str | None = None
    origin_size: int | None = None
    names: tuple[str, ...] | None = None  # the distinct names of its rows, where its segment says

    @property
    def task(self) -> str:
        """The task key of a replay partition (its file name without ``.parquet``)."""
        return layout.part_task(self.origin)

    @property
    def in_segment(self) -> bool:
        return self.row_group is not None


def loose_piece(e: Entry) -> Piece | None:
    """The piece of a loose file in a run's folder; None for a file outside one."""
    rid, src = layout.part_run_id(e.path), layout.part_source(e.path)
    if rid is None or src is None:
        return None
    return Piece(e.path, e.size, e.stamp, e.path, e.stamp, rid, src, origin_size=e.size)


_LOCK = threading.Lock()
_FOOTERS: dict[tuple, tuple[Origin, ...]] = {}  # (store url, path, size, stamp) -> origins
_FOOTERS_MAX = 4096


def _parse(raw: bytes) -> tuple[Origin, ...]:
    doc = json.loads(raw)
    if not isinstance(doc, dict) or doc.get("format") != SEGMENT_FORMAT:
        raise ValueError("not a segment footer of a known format")
    origins = doc["origins"]
    names = doc.get("names")
    if not isinstance(names, list) or len(names) != len(origins):
        names = [None] * len(origins)
    return tuple(Origin(p, s, _tupled(st), r, src, int(g), int(o), int(n), t,
                        None if ns is None else tuple(ns))
                 for (p, s, st, r, src, g, o, n, t), ns in zip(origins, names))


def _varint(data: bytes, i: int) -> tuple[int, int]:
    """A ULEB128 integer of Thrift's compact protocol at ``data[i:]``: (value, end)."""
    out = shift = 0
    while True:
        b = data[i]
        out |= (b & 0x7F) << shift
        i += 1
        if not b & 0x80:
            return out, i
        shift += 7


#: how a footer key is encoded in a Parquet file's footer (Thrift compact protocol:
#: KeyValue field 1, binary, then field 2, binary): what :func:`_local_footer_value` seeks
_KEY_FIELD = b"\x18" + bytes([len(SEGMENT_KEY)]) + SEGMENT_KEY + b"\x18"


def _local_footer_value(path: str) -> bytes | None:
    """The value of the segment's footer key, read from the file's footer bytes without
    pyarrow (whose import is most of a fresh process's cost of a listing); None when
    not found so (the caller reads the footer with pyarrow)."""
    with open(path, "rb") as f:
        f.seek(0, 2)
        n = f.tell()
        if n < 12:
            return None
        f.seek(n - 8)
        length = _footer_length(f.read(8), n)
        if length is None:
            return None
        f.seek(n - 8 - length)
        return _key_value(f.read(length))


def _remote_footer_value(store: "Store", path: str) -> bytes | None:
    """:func:`_local_footer_value` on an object store read by the lean reader: one
    ranged GET of the file's end (two when the footer is larger than that), kept for
    pyarrow's opening of the file (:mod:`flor_ray.store.s3arrow`)."""
    from .s3read import TAIL_BYTES

    data, n = store.reader.tail(path, TAIL_BYTES, keep=True)
    if n < 12 or len(data) < 8:
        return None
    length = _footer_length(data[-8:], n)
    if length is None:
        return None
    footer = data[-8 - length:-8] if length + 8 <= len(data) else store.reader.get(path, n - 8 - length, n - 8)
    return _key_value(footer)


def _footer_length(tail: bytes, n: int) -> int | None:
    length = int.from_bytes(tail[:4], "little")
    return length if tail[4:] == b"PAR1" and length <= n - 12 else None


def _key_value(footer: bytes) -> bytes | None:
    """The key-value metadata is the last field of the footer holding free bytes: its
    last match is the key's (row group statistics come before it; the Arrow schema kept
    there is base64), and the value found is parsed as a segment's footer before use."""
    at = footer.rfind(_KEY_FIELD)
    if at < 0:
        return None
    try:
        size, start = _varint(footer, at + len(_KEY_FIELD))
    except IndexError:
        return None
    value = footer[start:start + size]
    return value if len(value) == size else None


def _read_origins(store: "Store", e: Entry) -> tuple[Origin, ...] | None:
    """The origins of a segment's footer; None when it is not a segment."""
    if store.is_local or store.reader is not None:
        # FileNotFoundError: gone since the listing
        raw = (_local_footer_value if store.is_local else partial(_remote_footer_value, store))(store.path(e.path))
        if raw is not None:
            try:
                return _parse(raw)
            except (ValueError, KeyError, TypeError):
                pass  # not what it seemed: pyarrow reads the footer
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, root = store.arrow_fs()
    try:
        with fs.open_input_file(f"{root}/{e.path}") as fh:
            meta = pq.read_metadata(fh).metadata or {}
        return _parse(meta[SEGMENT_KEY])
    except FileNotFoundError:
        raise
    except (OSError, pa.ArrowInvalid, KeyError, ValueError, TypeError):
        return None


def segment_origins(store: "Store", e: Entry) -> tuple[Origin, ...] | None:
    """The origins a segment holds (its footer, read once per size and stamp); None when
    the file is not a segment (damaged: :func:`flor_ray.store.damage.scan` names it).
    Raises ``FileNotFoundError`` when it is gone since the listing."""
    key = (store.url, e.path, e.size, e.stamp)
    with _LOCK:
        hit = _FOOTERS.get(key)
    if hit is not None:
        return hit
    out = _read_origins(store, e)
    if out is None:
        return None
    with _LOCK:
        if len(_FOOTERS) >= _FOOTERS_MAX:
            _FOOTERS.clear()
        _FOOTERS[key] = out
    return out


def stable_segments(store: "Store") -> tuple[Entry, ...]:
    """The segments folder's listing, taken until two listings in a row agree."""
    last = list_files(store, layout.SEGMENTS, ".parquet", recursive=False)
    for _ in range(SEGMENT_LISTINGS - 1):
        again = list_files(store, layout.SEGMENTS, ".parquet", recursive=False)
        if again == last:
            return again
        last = again
    return last


def resolve(store: "Store", loose: Sequence[Entry], segments: Sequence[Entry]) -> tuple[Piece, ...]:
    """The pieces of a store's rows: each origin once, from the place the module
    docstring says; in origin path order (the order of the files before consolidation)."""
    held: dict[str, tuple[Entry, Origin]] = {}  # origin path -> the last segment's copy
    stamps: dict[str, set] = {}  # origin path -> (size, stamp) of every segment's copy
    for seg in sorted(segments, key=lambda s: s.path):
        origins = segment_origins(store, seg)
        if origins is None:
            from .damage import Damage, report

            report(store, Damage(seg.path, "is not a segment whose footer lists the files it holds"),
                   "its rows are left out of queries")
        for o in origins or ():
            held[o.path] = (seg, o)
            stamps.setdefault(o.path, set()).add((o.size, o.stamp))
    pieces: list[Piece] = []
    for e in loose:
        p = loose_piece(e)
        if p is None:
            continue
        if (e.size, e.stamp) in stamps.get(e.path, ()):
            continue  # a segment holds this very file: it is being deleted
        held.pop(e.path, None)  # written after the segments: it stands
        pieces.append(p)
    for seg, o in held.values():
        if o.rows:
            pieces.append(Piece(seg.path, seg.size, seg.stamp, o.path, o.stamp, o.run_id, o.source,
                                o.row_group, o.offset, o.rows, o.task_footer, o.size, o.names))
    pieces.sort(key=lambda p: p.origin)
    return tuple(pieces)


def piece_tables(store: "Store", pieces: Sequence[Piece],
                 read: "Callable[[pq.ParquetFile, list[int] | None], pa.Table]",
                 read_dictionary: Sequence[str] = (), threads: bool = True) -> list["pa.Table"]:
    """The rows of each piece (a table each, in order): ``read(file, row_groups)`` reads
    a file's row groups (None: all of it); each file is opened once, in parallel unless
    not ``threads`` (a recording's exit, when no new thread may start)
    (``read_dictionary``: columns read dictionary-encoded)."""
    import os

    import pyarrow.parquet as pq

    fs, root = store.arrow_fs()
    local = store.is_local
    groups: dict[str, list[int]] = {}
    for p in pieces:
        if p.in_segment:
            groups.setdefault(p.file, []).append(p.row_group)
    files = list(dict.fromkeys(p.file for p in pieces))

    def one(rel: str):
        rgs = sorted(set(groups[rel])) if rel in groups else None

        def go(pf):
            if rgs is None:
                return read(pf, None), None
            starts, n = {}, 0
            for g in rgs:
                starts[g] = n
                n += pf.metadata.row_group(g).num_rows
            return read(pf, rgs), starts

        if local:
            with pq.ParquetFile(f"{root}/{rel}", read_dictionary=list(read_dictionary)) as pf:
                return go(pf)
        with fs.open_input_file(f"{root}/{rel}") as fh:
            return go(pq.ParquetFile(fh, read_dictionary=list(read_dictionary)))

    if len(files) < 2 or not threads:
        read_all = [one(f) for f in files]
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(len(files), min(8, os.cpu_count() or 2) if local else 16)) as pool:
            read_all = list(pool.map(one, files))
    by_file = dict(zip(files, read_all))
    out = []
    for p in pieces:
        table, starts = by_file[p.file]
        out.append(table if starts is None else table.slice(starts[p.row_group] + p.offset, p.rows))
    return out



def distinct_names(table: "pa.Table") -> tuple[str, ...]:
    """The distinct values of a table's ``name`` column, sorted. A dictionary-encoded
    column is read from its codes, without ``pyarrow.compute`` (whose import a recording's
    exit does not pay: see :func:`flor_ray.store.compaction.compact_record`)."""
    import pyarrow as pa

    if "name" not in table.column_names:
        return ()
    col = table.column("name")
    if pa.types.is_dictionary(col.type):
        found: set[str] = set()
        for chunk in col.chunks:
            found.update(_referenced(chunk))
        return tuple(sorted(found))
    import pyarrow.compute as pc

    return tuple(sorted(n for n in pc.unique(col).to_pylist() if n is not None))


def _referenced(chunk: "pa.DictionaryArray") -> list[str]:
    """The dictionary values a chunk's non-null codes refer to (a dictionary may hold more)."""
    import numpy as np

    idx = chunk.indices
    if not len(idx):
        return []
    width = idx.type.bit_width // 8
    codes = np.frombuffer(idx.buffers()[1], dtype=f"<i{width}", count=idx.offset + len(idx))[idx.offset:]
    if idx.null_count:
        bits = np.unpackbits(np.frombuffer(idx.buffers()[0], dtype=np.uint8), bitorder="little")
        codes = codes[bits[idx.offset: idx.offset + len(idx)].astype(bool)]
    values = chunk.dictionary.to_pylist()
    return [values[c] for c in np.unique(codes) if values[c] is not None]


def piece_names(store: "Store", pieces: Sequence[Piece]) -> list[frozenset[str]]:
    """The distinct names of each piece's rows (its ``name`` column read; no pandas)."""

    def read(pf, row_groups):
        if "name" not in pf.schema_arrow.names:
            import pyarrow as pa

            return pa.table({"name": pa.nulls(pf.metadata.num_rows if row_groups is None else
                                              sum(pf.metadata.row_group(g).num_rows for g in row_groups), pa.string())})
        return (pf.read(columns=["name"], use_threads=False) if row_groups is None
                else pf.read_row_groups(row_groups, columns=["name"], use_threads=False))

    return [frozenset(distinct_names(t)) for t in piece_tables(store, pieces, read)]


def whole_segments(store: "Store", pieces: Sequence[Piece]) -> bool:
    """Whether every segment among ``pieces`` is wanted whole (each origin it holds with rows)."""
    segs: dict[str, tuple] = {}
    for p in pieces:
        if p.in_segment:
            segs.setdefault(p.file, (p, []))[1].append(p.origin)
    for rel, (p, origins) in segs.items():
        held = [o.path for o in segment_origins(store, Entry(rel, p.file_size, p.file_stamp)) or () if o.rows]
        if sorted(held) != sorted(origins):
            return False
    return True

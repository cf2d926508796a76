"""Consolidation: the files of ended runs merged into a few segments
(:mod:`flor_ray.store.segments`), so that a query over a store of thousands of runs
lists and opens O(10) files, not one per run and replay task.

What is consolidated: the record files of runs that are not recording (finished,
failed, or ``incomplete``: their process is gone), whose writes were not spooled (a
later ``flor-ray spool upload`` adds parts to their folders), once their parts are
compacted; and replay partitions (``source=replay`` and ``replay_mismatch``) written
at least ``replay_grace_s`` ago: a replay's driver checks fidelity right after its
tasks and moves a failed task's partition aside, and a retried task rewrites its
own; both happen within the replay, not minutes later. A rewrite that still comes
after consolidation is read in place of the segment's copy (its stamp differs).
Damaged files and runs without a run file are left for ``flor-ray check``.

When:

- at the end of a recording (:func:`after_run`, in the recording's process): first
  the crashed runs' parts are compacted (a run left ``incomplete`` by a process that is
  gone; never a run that is recording), then, when at least ``consolidate_after``
  ended runs have loose files, those files become one new segment, and when the store
  has more than :data:`MAX_SEGMENTS` segments the smallest are merged. A recording
  pays for this once every ``consolidate_after`` runs, so a store that grows by runs
  keeps O(10) files of ended runs without a job of its own;
- by ``flor-ray check --repair`` and ``flor-ray compact``: everything that can be, at
  once (``flor-ray compact`` also merges segments into as few as
  :data:`SEGMENT_ROWS` allows).

Safe against concurrent readers and writers without a lock: a segment is written
whole (a temporary renamed, one PUT) before any file it holds is deleted, and
:func:`flor_ray.store.segments.resolve` reads each origin from one place; two
consolidations of the same files write two segments holding the same origins, which
readers take from the later one.
"""

from __future__ import annotations

import datetime as _dt
import json
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from . import layout
from .segments import (SEGMENT_FORMAT, SEGMENT_KEY, Origin, Piece, distinct_names, piece_tables, resolve,
                       segment_origins, stable_segments)

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa

    from . import Store

__all__ = ["consolidate", "after_run", "Consolidated", "SEGMENT_ROWS", "GROUP_ROWS", "MAX_SEGMENTS",
           "REPLAY_GRACE_S"]

#: rows of one segment at most (a few hundred MB in memory while it is written)
SEGMENT_ROWS = 4_000_000
#: rows of a row group: origins are added to a group until it holds this many
GROUP_ROWS = 128 * 1024
#: segments beyond which the smallest are merged
MAX_SEGMENTS = 8
#: seconds after which a replay partition is consolidated (see the module docstring)
REPLAY_GRACE_S = 600.0


@dataclass(frozen=True)
class Consolidated:
    """What :func:`consolidate` did: segments written, files deleted, runs whose files moved."""

    written: tuple[str, ...] = ()
    deleted: tuple[str, ...] = ()
    runs: tuple[str, ...] = ()


def _age_s(stamp: Any, now: float) -> float | None:
    """Seconds since a listed file was written, from its stamp; None when unknown."""
    if not stamp:
        return None
    first = stamp[0]
    if isinstance(first, int):  # a local file: (mtime_ns, inode)
        return now - first / 1e9
    try:
        return now - _dt.datetime.fromisoformat(str(first)).timestamp()
    except ValueError:
        return None


def _eligible(store: "Store", pieces: Sequence[Piece], replay_grace_s: float) -> list[Piece]:
    """The loose pieces that may go into a segment (module docstring)."""
    from .damage import part_problem
    from .runs import load_runs

    ended = {m["run_id"] for m in load_runs(store) if m.get("status") != "running" and not m.get("spooled")}
    now = time.time()
    record: dict[str, list[Piece]] = {}
    out = []
    for p in pieces:
        if p.in_segment or p.run_id not in ended:
            continue
        if p.source == "record":
            record.setdefault(p.run_id, []).append(p)
        else:
            age = _age_s(p.stamp, now)
            if age is not None and age >= replay_grace_s and not part_problem(store, p.file, p.file_size, p.file_stamp):
                out.append(p)
    for rid, ps in record.items():
        spans = [layout.part_flushes(p.origin) for p in ps]
        loose_parts = sum("/part-" in p.origin for p in ps)
        if None in spans or (loose_parts and len(ps) > 1):
            continue  # not compacted (a gap or a damaged part keeps it so): for check --repair
        if any(part_problem(store, p.file, p.file_size, p.file_stamp) for p in ps):
            continue
        out += ps
    return out


def _segment_schema() -> "pa.Schema":
    import pyarrow as pa

    from .logs import schema

    base = schema()
    return pa.schema(list(base) + [("run_id", pa.string()), ("source", pa.string())], metadata=base.metadata)


def _normalised(table: "pa.Table", p: Piece, target: "pa.Schema") -> "pa.Table":
    """An origin's rows in the segment's columns (older files lack some: nulls)."""
    import pyarrow as pa

    n = table.num_rows
    cols = []
    for f in target:
        if f.name == "run_id":
            cols.append(pa.array([p.run_id] * n, pa.string()))
        elif f.name == "source":
            cols.append(pa.array([p.source] * n, pa.string()))
        elif f.name in table.column_names:
            col = table.column(f.name)
            cols.append(col if col.type == f.type else col.cast(f.type))
        else:
            cols.append(pa.nulls(n, f.type))
    return pa.Table.from_arrays(cols, schema=target)


def _read(store: "Store", pieces: Sequence[Piece]) -> list[tuple[Piece, "pa.Table", str | None]]:
    """Each piece's rows and, for a replay partition, the footer its task wrote."""
    from .logs import TASK_META_KEY

    def read(pf, row_groups):
        return pf.read(use_threads=False) if row_groups is None else pf.read_row_groups(row_groups, use_threads=False)

    out = []
    for p, table in zip(pieces, piece_tables(store, pieces, read, threads=False)):
        foot = p.task_footer
        if not p.in_segment and p.source != "record":
            raw = (table.schema.metadata or {}).get(TASK_META_KEY)
            foot = raw.decode() if raw else None
        out.append((p, table, foot))
    return out


def _layout(items: list[tuple[Piece, "pa.Table", str | None]]) -> list[list[int]]:
    """Row groups as lists of item indices: whole origins, about :data:`GROUP_ROWS` each."""
    groups: list[list[int]] = [[]]
    n = 0
    for i, (_, t, _) in enumerate(items):
        if groups[-1] and n + t.num_rows > GROUP_ROWS:
            groups.append([])
            n = 0
        groups[-1].append(i)
        n += t.num_rows
    return [g for g in groups if g]


def _write_segment(store: "Store", items: list[tuple[Piece, "pa.Table", str | None]]) -> str:
    """One segment holding ``items`` (in origin order); its path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .logs import DICT_COLS

    target = _segment_schema()
    origins: list[Origin] = []
    groups = _layout(items)
    tables = []
    for g_i, group in enumerate(groups):
        off = 0
        parts = []
        for i in group:
            p, t, foot = items[i]
            origins.append(Origin(p.origin, p.origin_size, p.stamp, p.run_id, p.source,
                                  g_i if t.num_rows else -1, off, t.num_rows, foot, distinct_names(t)))
            parts.append(_normalised(t, p, target))
            off += t.num_rows
        tables.append(pa.concat_tables(parts))
    meta = dict(target.metadata or {})
    meta[SEGMENT_KEY] = json.dumps({"format": SEGMENT_FORMAT, "origins": [o.as_json() for o in origins],
                                    "names": [list(o.names or ()) for o in origins]},
                                   separators=(",", ":"), default=str).encode()
    target = target.with_metadata(meta)
    sink = pa.BufferOutputStream()
    with pq.ParquetWriter(sink, target, compression="zstd", use_dictionary=[*DICT_COLS, "run_id", "source"]) as w:
        for t in tables:
            if t.num_rows:
                w.write_table(t.replace_schema_metadata(meta), row_group_size=max(t.num_rows, 1))
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S%f")
    rel = layout.segment(f"seg-{stamp}-{uuid.uuid4().hex[:8]}")
    store.write_bytes(rel, sink.getvalue().to_pybytes(), durable=True)
    return rel


def _batches(items: list, rows: int) -> list[list]:
    """Consecutive items in segments of about ``rows`` rows each."""
    out: list[list] = [[]]
    n = 0
    for it in items:
        if out[-1] and n + it[1].num_rows > rows:
            out.append([])
            n = 0
        out[-1].append(it)
        n += it[1].num_rows
    return [b for b in out if b]


def _to_merge(store: "Store", segs, pieces: Sequence[Piece], merge_all: bool, adding: bool, rows: int) -> list[str]:
    """The segments to rewrite: all (``merge_all``, when that leaves fewer or drops
    dead rows), else the smallest when there are more than :data:`MAX_SEGMENTS`."""
    live: dict[str, int] = {}
    for p in pieces:
        if p.in_segment:
            live[p.file] = live.get(p.file, 0) + (p.rows or 0)
    readable = [s for s in segs if segment_origins(store, s) is not None]
    held = {s.path: sum(o.rows for o in segment_origins(store, s) or ()) for s in readable}
    if merge_all:
        stale = [s.path for s in readable if live.get(s.path, 0) != held[s.path]]
        return [s.path for s in readable] if len(readable) > 1 or stale else []
    if len(readable) + adding <= MAX_SEGMENTS:
        return []
    out, n = [], 0
    for s in sorted(readable, key=lambda s: (live.get(s.path, 0), s.path)):
        if len(out) >= 2 and n + live.get(s.path, 0) > rows:
            break
        out.append(s.path)
        n += live.get(s.path, 0)
    return out if len(out) >= 2 else []


def _delete_loose(store: "Store", pieces: Sequence[Piece]) -> list[str]:
    """Delete the consolidated loose files; on a local disk only while each is the file
    that was read (a partition rewritten meanwhile stays, and wins over the segment)."""
    import os

    from .compaction import _delete

    if not store.is_local:
        rels = [p.file for p in pieces]
        _delete(store, rels)
        return rels
    out = []
    for p in pieces:
        path = store.path(p.file)
        try:
            st = os.stat(path)
            if (st.st_mtime_ns, st.st_ino) == tuple(p.file_stamp):
                os.unlink(path)
                out.append(p.file)
        except FileNotFoundError:
            pass
    _remove_empty_folders(store, out)
    return out


def _remove_empty_folders(store: "Store", rels: Sequence[str]) -> None:
    """Remove the partition folders (``source=``, then ``run_id=``) these deletions
    emptied: a local listing walks every folder, and a store of thousands of consolidated
    runs would keep thousands of empty ones. ``rmdir`` removes only an empty folder, and a
    writer that meets its folder gone makes it again (:func:`flor_ray.store.write_local`)."""
    import os

    folders = {os.path.dirname(r) for r in rels}
    for _ in range(2):  # source=, then run_id=
        parents = set()
        for rel in sorted(folders):
            if not rel.startswith(layout.LOGS + "/"):
                continue
            try:
                os.rmdir(store.path(rel))
            except OSError:  # not empty (or gone already)
                continue
            parents.add(os.path.dirname(rel))
        folders = parents


def consolidate(store: "Store", *, min_runs: int = 1, replay_grace_s: float = REPLAY_GRACE_S,
                merge_all: bool = False, rows: int = SEGMENT_ROWS) -> Consolidated:
    """Move the loose files of ended runs into a new segment when at least ``min_runs``
    runs have some, and merge segments (``merge_all``: all of them; else the smallest
    when there are more than :data:`MAX_SEGMENTS`); ``rows``: rows a segment holds at most."""
    from .compaction import _delete
    from .logs import listed_parts

    segs = stable_segments(store)
    pieces = resolve(store, listed_parts(store), segs)
    take = _eligible(store, pieces, replay_grace_s)
    runs = sorted({p.run_id for p in take})
    if len(runs) < max(min_runs, 1):
        take, runs = [], []
    merge = _to_merge(store, segs, pieces, merge_all, bool(take), rows)
    if not take and not merge:
        return Consolidated()
    merging = set(merge)
    chosen = sorted(take + [p for p in pieces if p.in_segment and p.file in merging], key=lambda p: p.origin)
    written = [_write_segment(store, batch) for batch in _batches(_read(store, chosen), rows)]
    deleted = _delete_loose(store, take)
    _delete(store, merge)
    return Consolidated(tuple(written), tuple(deleted + merge), tuple(runs))


def after_run(store: "Store", compact_after: int, consolidate_after: int) -> Consolidated:
    """What a recording does to the store when it has ended (module docstring): the
    crashed runs' parts compacted, then consolidation once enough runs are loose."""
    from .compaction import compact_ended

    if not compact_after:
        return Consolidated()
    compact_ended(store, compact_after, crashed_only=True)
    if not consolidate_after:
        return Consolidated()
    return consolidate(store, min_runs=consolidate_after)

"""Compaction of a run's record parts: one Parquet file (or a few of about a row
group each) instead of one per flush, once the run has ended.

A recording writes ``part-<flush>.parquet`` per outer iteration; compaction writes
``compact-<first>-<last>.parquet`` holding the rows of flushes ``first..last`` in
flush order (so in logging order), then deletes those parts. The file's name says
which parts it replaces, so it is atomic for readers without a lock or a manifest:

- while both exist, :func:`live_parts` drops the parts a compacted file covers (no
  row is read twice);
- a listing taken while the parts are being deleted may miss a part and still not
  show the compacted file, which was written before the first deletion: the flushes
  of a record folder are numbered without gaps, so a gap (:func:`has_gap`) means the
  listing is to be taken again, and a second listing, begun after the first ended,
  shows the compacted file;
- a part listed and deleted before it is opened is a ``FileNotFoundError`` that the
  query answers by listing again (:func:`flor_ray.queries.dataframe.dataframe`,
  :func:`flor_ray.queries.sql.sql`).

Replay partitions are one file per task (not per iteration) already, named by the task
key that the planner looks up and the queries order replays by, and rewritten whole by
a retried task: they are not compacted per run but consolidated with the files of
other runs into segments (:mod:`flor_ray.store.consolidation`), whose footer keeps each
task's key and footer. A run whose process crashed is compacted by the next recording
to the store (:func:`compact_ended` with ``crashed_only``) or by ``flor-ray check --repair``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Sequence

from . import layout
from .listing import Entry, list_files

if TYPE_CHECKING:  # pragma: no cover
    from . import Store

__all__ = ["live_parts", "has_gap", "compact_record", "Compacted", "COMPACTED_KEY", "COMPACT_ROWS"]

#: the footer key of a compacted file: JSON list of the part names it replaces
COMPACTED_KEY = b"flor_ray.compacted"
#: rows per compacted file (about one row group of pyarrow's default writer)
COMPACT_ROWS = 1_000_000


@dataclass(frozen=True)
class Compacted:
    """What :func:`compact_record` did: the files written and the parts deleted."""

    written: tuple[str, ...]
    deleted: tuple[str, ...]
    #: the distinct names of the run's record rows, when they were read (for its manifest entry)
    names: tuple[str, ...] | None = None


def _covered(entries: Sequence[Entry]) -> set[str]:
    """Paths among one record folder's ``entries`` that a compacted file covers."""
    spans = [(layout.part_flushes(e.path), e.path) for e in entries if "/compact-" in e.path]
    spans = [(s, p) for s, p in spans if s is not None]
    out = set()
    for e in entries:
        span = layout.part_flushes(e.path)
        if span is None:
            continue
        mine = (span[1] - span[0], "/compact-" in e.path, e.path)
        for (a, b), p in spans:
            if p != e.path and a <= span[0] and span[1] <= b and (b - a, True, p) > mine:
                out.add(e.path)
                break
    return out


def _by_record_folder(listing: Iterable[Entry]) -> dict[str, list[Entry]]:
    out: dict[str, list[Entry]] = {}
    for e in listing:
        if layout.part_source(e.path) == "record":
            out.setdefault(e.path.rsplit("/", 1)[0], []).append(e)
    return out


def live_parts(listing: Sequence[Entry]) -> tuple[Entry, ...]:
    """``listing`` without the record parts that a compacted file in it replaces."""
    drop: set[str] = set()
    for entries in _by_record_folder(listing).values():
        if len(entries) > 1:
            drop |= _covered(entries)
    return tuple(e for e in listing if e.path not in drop) if drop else tuple(listing)


def has_gap(listing: Sequence[Entry]) -> bool:
    """Whether some record folder of ``listing`` lacks a flush between its first and last
    (a listing taken while a compaction deleted parts, or a part lost or quarantined)."""
    for entries in _by_record_folder(listing).values():
        spans = sorted(s for s in (layout.part_flushes(e.path) for e in entries) if s is not None)
        upto = -1
        for a, b in spans:
            if a > upto + 1:
                return True
            upto = max(upto, b)
    return False


def _chunks(parts: Sequence[str], rows: Sequence[int]) -> list[list[int]]:
    """Consecutive groups of parts of about :data:`COMPACT_ROWS` rows each."""
    out: list[list[int]] = [[]]
    n = 0
    for i, r in enumerate(rows):
        if out[-1] and n + r > COMPACT_ROWS:
            out.append([])
            n = 0
        out[-1].append(i)
        n += r
    return out


def compact_record(store: "Store", run_id: str) -> Compacted:
    """Compact the record parts of an ended run; nothing when there is nothing to gain.

    A folder with a gap or a part that does not read is left as it is (a damaged part
    is for ``flor-ray check --repair`` to move aside, which compacts afterwards).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .damage import part_problem
    from .logs import table_to_parquet_bytes

    listing = live_parts(list_files(store, layout.log_folder(run_id, "record"), ".parquet", recursive=False))
    parts = sorted((layout.part_flushes(e.path), e) for e in listing if layout.part_flushes(e.path) is not None)
    loose = [e for span, e in parts if "/part-" in e.path]
    if not loose or has_gap(listing) or any(part_problem(store, e.path, e.size, e.stamp) for _, e in parts):
        return Compacted((), ())
    if len(parts) == 1 and len(loose) == 1:  # one flush: a file already
        return Compacted((), ())
    from .segments import distinct_names

    fs, root = store.arrow_fs()
    tables = []
    logged: set[str] = set()
    try:
        for _, e in parts:
            with fs.open_input_file(f"{root}/{e.path}") as fh:
                pf = pq.ParquetFile(fh)
                tables.append(pf.read())  # not read_table: a recording never imports pandas
                if "name" in pf.schema_arrow.names:  # the names dictionary-encoded: no pyarrow.compute
                    logged.update(distinct_names(pq.ParquetFile(fh, read_dictionary=["name"]).read(columns=["name"])))
    except (OSError, pa.ArrowInvalid):
        return Compacted((), ())
    written: list[str] = []
    gone: list[str] = []
    for group in _chunks([e.path for _, e in parts], [t.num_rows for t in tables]):
        if len(group) == 1 and "/compact-" in parts[group[0]][1].path:
            continue  # compacted already
        first, last = parts[group[0]][0][0], parts[group[-1]][0][1]
        rel = layout.compacted_part(run_id, first, last)
        table = pa.concat_tables([tables[i] for i in group], promote_options="default")
        names = [parts[i][1].path.rsplit("/", 1)[-1] for i in group]
        meta = dict(table.schema.metadata or {})
        meta[COMPACTED_KEY] = json.dumps(names).encode()
        store.write_bytes(rel, table_to_parquet_bytes(table.replace_schema_metadata(meta)), durable=True)
        written.append(rel)
        gone += [parts[i][1].path for i in group if parts[i][1].path != rel]
    _delete(store, gone)
    return Compacted(tuple(written), tuple(gone), tuple(sorted(logged)))


def _delete(store: "Store", rels: Sequence[str]) -> None:
    """Delete these files (one request per 1,000 on object stores)."""
    if not rels:
        return
    if store.is_local:
        import os

        for r in rels:
            try:
                os.unlink(store.path(r))
            except FileNotFoundError:
                pass
        return
    store.fs.rm([store.path(r) for r in rels])


def compact_ended(store: "Store", after: int = 2, crashed_only: bool = False) -> list[tuple[str, Compacted]]:
    """Compact the record parts of every run that is not recording (finished, failed,
    or left ``incomplete`` by a process that is gone): what ``flor-ray check --repair``
    does after moving damaged files aside; ``after``: as the setting ``compact_after``
    (runs with fewer loose parts are left; 0: none is compacted); ``crashed_only``:
    only the ``incomplete`` runs (what the next recording does: a run that ended kept
    its parts by its own settings). (run id, what was done) for each run compacted."""
    from .manifest import seal_many
    from .runs import load_runs, read_run_file

    loose: dict[str, int] = {}
    for e in list_files(store, layout.LOGS, ".parquet"):
        if layout.part_source(e.path) == "record" and "/part-" in e.path:
            rid = layout.part_run_id(e.path)
            if rid is not None:
                loose[rid] = loose.get(rid, 0) + 1
    out = []
    raws, names = {}, {}
    for meta in load_runs(store):
        rid = meta["run_id"]
        status = meta.get("status")
        if crashed_only and status != "incomplete":
            continue
        if after and status != "running" and loose.get(rid, 0) >= after and not meta.get("spooled"):
            done = compact_record(store, rid)
            if done.written:
                out.append((rid, done))
                raw = read_run_file(store, layout.run_meta(rid))
                if raw is not None:
                    raws[rid] = raw
                    if done.names is not None:
                        names[rid] = done.names
    seal_many(store, raws, names)
    return out

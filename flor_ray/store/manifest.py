"""The store manifest (``manifest.json``): what each sealed run holds, so that a query
on a store of thousands of runs reads one object instead of every run file and checks
no part it knows.

A run is sealed when it has ended and its record parts are compacted
(:mod:`flor_ray.store.compaction`): from then on its run file and its record folder
stay as they are. Its entry holds the run file's size and change stamp (as a listing
shows them), its metadata, and the size and stamp of each compacted file. The manifest
is a cache, checked against the listings a query takes anyway (``runs/`` and
``logs/``): an entry whose run file is listed with the same size and stamp stands for
that file (no read), a part listed with the same size and stamp is known to be whole
(no check). Anything else (a run recording, a run file rewritten by a spool upload, a
part quarantined or damaged, an entry lost to two runs sealing at once) is read from
the store, so the manifest can be stale or lost and queries stay right.

Why not a table format (Delta Lake, Iceberg): their log is the source of truth, so
every writer (recordings on many hosts, replay tasks on Ray workers) would have to
commit to it with an atomic put-if-absent the object store may not offer, and a lost
commit would lose rows. Here the files stay the truth and a lost manifest update costs
reads, never rows.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from . import layout
from .listing import Entry, list_files

if TYPE_CHECKING:  # pragma: no cover
    from . import Store

__all__ = ["Sealed", "read_manifest", "seal", "seal_many", "MANIFEST_FORMAT"]

MANIFEST_FORMAT = 1


@dataclass(frozen=True)
class Sealed:
    """A sealed run as the manifest holds it."""

    run_file: Entry
    meta: dict
    parts: tuple[Entry, ...]


def _tupled(x: Any) -> Any:
    """A stamp read back from JSON as the tuple a listing gives."""
    return tuple(_tupled(v) for v in x) if isinstance(x, list) else x


def read_manifest(store: "Store") -> dict[str, Sealed]:
    """Run file path -> :class:`Sealed`; empty when there is no manifest or it does not read."""
    try:
        doc = json.loads(store.read_bytes(layout.MANIFEST))
        if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
            return {}
        out = {}
        for rid, e in (doc.get("runs") or {}).items():
            rel = layout.run_meta(rid, checked=False)
            parts = tuple(Entry(p, s, _tupled(st)) for p, (s, st) in e["parts"].items())
            out[rel] = Sealed(Entry(rel, e["file"][0], _tupled(e["file"][1])), e["meta"], parts)
        return out
    except FileNotFoundError:
        return {}
    except (ValueError, KeyError, TypeError, AttributeError):
        return {}  # a damaged manifest is a cache miss: every file is read


def _entry(store: "Store", rel: str) -> Entry | None:
    """The listing entry of one file (as :func:`list_files` gives it)."""
    if store.is_local:
        try:
            st = os.stat(store.path(rel))
        except FileNotFoundError:
            return None
        return Entry(rel, st.st_size, (st.st_mtime_ns, st.st_ino))
    folder = rel.rsplit("/", 1)[0]
    return next((e for e in list_files(store, folder, ".json", recursive=False) if e.path == rel), None)


def seal(store: "Store", run_id: str, meta: Mapping[str, Any]) -> bool:
    """Add the ended run ``run_id`` (its metadata as written: ``meta``) to the manifest;
    False when its run file or record folder is not as a sealed run's is."""
    return bool(seal_many(store, {run_id: meta}))


def seal_many(store: "Store", metas: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """:func:`seal` for several runs in one update of the manifest; the runs sealed."""
    entries = {}
    files = None if store.is_local or len(metas) < 2 else {e.path: e for e in list_files(store, layout.RUNS, ".json", False)}
    for run_id, meta in metas.items():
        rel = layout.run_meta(run_id)
        run_file = _entry(store, rel) if files is None else files.get(rel)
        parts = list_files(store, layout.log_folder(run_id, "record"), ".parquet", recursive=False)
        loose = [p for p in parts if "/part-" in p.path]
        if run_file is not None and not (loose and len(parts) > 1):
            entries[run_id] = {"file": [run_file.size, run_file.stamp], "meta": dict(meta),
                               "parts": {p.path: [p.size, p.stamp] for p in parts}}
    if not entries:
        return []
    try:
        doc = json.loads(store.read_bytes(layout.MANIFEST))
        if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT or not isinstance(doc.get("runs"), dict):
            doc = None
    except (FileNotFoundError, ValueError):
        doc = None
    doc = doc or {"format": MANIFEST_FORMAT, "runs": {}}
    doc["runs"].update(entries)
    store.write_bytes(layout.MANIFEST, json.dumps(doc, separators=(",", ":"), default=str).encode())
    return list(entries)

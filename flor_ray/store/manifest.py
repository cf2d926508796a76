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

What only the planner reads goes to a second object, ``manifest-plan.json``
(:data:`~flor_ray.store.layout.PLAN_FACTS`, read with one request): each sealed run's
per-epoch ``timings`` (70% of a run's metadata, which ``flor-ray runs``, ``df`` and
``sql`` would parse for nothing) and the distinct names its record partition holds
(so a plan learns what each run logged without reading its rows). A manifest entry's
metadata has no ``timings``; :data:`TIMINGS_ASIDE` says they were left out and of
which run file, so that no reader takes it for a run without timings:
:func:`flor_ray.store.runs.with_timings` puts them back. Each plan entry names the run
file and the record parts it was taken from: an entry lost to two runs sealing at
once, or of another run file or other parts, is not used (the run file or the rows
are read instead).

Manifests of format 1 (timings inside, no plan facts) read as they are; the next seal
moves their timings to the plan facts.

Why not a table format (Delta Lake, Iceberg): their log is the source of truth, so
every writer (recordings on many hosts, replay tasks on Ray workers) would have to
commit to it with an atomic put-if-absent the object store may not offer, and a lost
commit would lose rows. Here the files stay the truth and a lost manifest update costs
reads, never rows.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Collection, Iterable, Mapping

from . import layout
from .listing import Entry, list_files

if TYPE_CHECKING:  # pragma: no cover
    from . import Store

__all__ = ["Sealed", "PlanFacts", "read_manifest", "read_plan_facts", "seal", "seal_many", "MANIFEST_FORMAT",
           "TIMINGS_ASIDE"]

MANIFEST_FORMAT = 2
#: manifest formats this code reads (1: the run's metadata whole, no plan facts)
READ_FORMATS = (1, 2)
#: the key of a manifest entry's metadata whose ``timings`` are in the plan facts: the
#: run file's [size, stamp] they belong to
TIMINGS_ASIDE = "timings_aside"


@dataclass(frozen=True)
class Sealed:
    """A sealed run as the manifest holds it."""

    run_file: Entry
    meta: dict
    parts: tuple[Entry, ...]


@dataclass(frozen=True)
class PlanFacts:
    """What the plan facts hold of one sealed run: its timings and the distinct names of
    its record partition (None: not known), taken from ``file`` (size, stamp) and ``parts``."""

    file: tuple
    timings: Mapping[str, Any] | None
    names: frozenset[str] | None
    parts: frozenset[tuple]  # (path, size, stamp) of each record file

    def stands_for(self, size: int | None, stamp: Any) -> bool:
        """Whether these facts are of the run file listed with ``size`` and ``stamp``."""
        return self.file == (size, _tupled(stamp))


def _tupled(x: Any) -> Any:
    """A stamp read back from JSON as the tuple a listing gives."""
    if not isinstance(x, list):
        return x
    return tuple(_tupled(v) if isinstance(v, list) else v for v in x)


#: per-epoch lists kept in the plan facts as little-endian binary (base64): JSON floats
#: cost 5x more to parse, and binary float64 and int64 give the same numbers back
_PACKED = {"f8": ("d", float), "i8": ("q", int)}


def _pack(timings: Mapping[str, Any] | None) -> tuple[dict | None, dict]:
    """``timings`` as (the values kept as JSON, the lists of floats or ints packed)."""
    from array import array
    from binascii import b2a_base64

    if not isinstance(timings, Mapping):
        return timings, {}
    plain, packed = {}, {}
    for k, v in timings.items():
        kind = None
        if isinstance(v, list) and v:
            kind = next((c for c, (_, t) in _PACKED.items() if all(type(x) is t for x in v)), None)
        if kind is None or (kind == "i8" and not all(-2 ** 63 <= x < 2 ** 63 for x in v)):
            plain[k] = v
            continue
        a = array(_PACKED[kind][0], v)
        if sys.byteorder == "big":
            a.byteswap()
        packed[k] = [kind, b2a_base64(a.tobytes(), newline=False).decode()]
    return plain, packed


def _unpack(plain: Any, packed: Mapping[str, Any]) -> Any:
    """The timings :func:`_pack` took apart."""
    from array import array
    from binascii import a2b_base64

    if not packed:
        return plain
    out = dict(plain)
    for k, (kind, data) in packed.items():
        a = array(_PACKED[kind][0])
        a.frombytes(a2b_base64(data))
        if sys.byteorder == "big":
            a.byteswap()
        out[k] = a.tolist()
    return out


def _read_doc(store: "Store", rel: str, formats: Collection[int]) -> dict | None:
    """The JSON object at ``rel`` when it is of one of ``formats``; None when missing or damaged."""
    try:
        doc = json.loads(store.read_bytes(rel))
    except (FileNotFoundError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("format") not in formats or not isinstance(doc.get("runs"), dict):
        return None
    return doc


def read_manifest(store: "Store") -> dict[str, Sealed]:
    """Run file path -> :class:`Sealed`; empty when there is no manifest or it does not read."""
    doc = _read_doc(store, layout.MANIFEST, READ_FORMATS)
    if doc is None:
        return {}
    try:
        out = {}
        for rid, e in doc["runs"].items():
            rel = layout.run_meta(rid, checked=False)
            parts = tuple(Entry(p, s, _tupled(st)) for p, (s, st) in e["parts"].items())
            meta = e["meta"]
            if not isinstance(meta, dict):
                raise TypeError("an entry's metadata is not an object")
            out[rel] = Sealed(Entry(rel, e["file"][0], _tupled(e["file"][1])), meta, parts)
        return out
    except (ValueError, KeyError, TypeError, AttributeError):
        return {}  # a damaged manifest is a cache miss: every file is read


def read_plan_facts(store: "Store") -> dict[str, PlanFacts]:
    """Run id -> :class:`PlanFacts` of the sealed runs (one read); empty when there are
    none or they do not read (the planner then reads run files and rows)."""
    doc = _read_doc(store, layout.PLAN_FACTS, (MANIFEST_FORMAT,))
    out = {}
    for rid, e in (doc or {}).get("runs", {}).items():
        try:
            names = e.get("names")
            out[rid] = PlanFacts((e["file"][0], _tupled(e["file"][1])), _unpack(e.get("timings"), e.get("packed")),
                                 None if names is None else frozenset(names),
                                 frozenset((p, s, _tupled(st)) for p, (s, st) in e["parts"].items()))
        except (ValueError, KeyError, TypeError, AttributeError):
            continue  # a damaged entry: that run's file and rows are read
    return out


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


def _record_names(store: "Store", parts: Iterable[Entry]) -> list[str] | None:
    """The distinct names the record files ``parts`` hold (their ``name`` column read);
    None when one does not read."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    fs, root = store.arrow_fs()
    names: set[str] = set()
    try:
        for p in parts:
            with fs.open_input_file(f"{root}/{p.path}") as fh:
                pf = pq.ParquetFile(fh)
                if "name" in pf.schema_arrow.names:
                    names.update(pc.unique(pf.read(columns=["name"]).column("name")).to_pylist())
    except (OSError, pa.ArrowInvalid):
        return None
    return sorted(n for n in names if n is not None)


def seal(store: "Store", run_id: str, meta: Mapping[str, Any], names: Collection[str] | None = None) -> bool:
    """Add the ended run ``run_id`` (its metadata as written: ``meta``; ``names``: the
    distinct names its record partition holds, None: read from its files) to the
    manifest; False when its run file or record folder is not as a sealed run's is."""
    return bool(seal_many(store, {run_id: meta}, None if names is None else {run_id: names}))


def _upgraded(doc: dict | None, facts: dict) -> dict:
    """A manifest of format 2: ``doc``'s entries, those of format 1 with their timings
    moved to ``facts`` (the plan facts' runs)."""
    if doc is None:
        return {"format": MANIFEST_FORMAT, "runs": {}}
    if doc.get("format") == MANIFEST_FORMAT:
        return doc
    runs = {}
    for rid, e in doc["runs"].items():
        try:
            meta, file = dict(e["meta"]), list(e["file"])
            timings = meta.pop("timings", None)
            if (facts.get(rid) or {}).get("file") != file:  # facts of this very run file may hold its names
                plain, packed = _pack(timings)
                facts[rid] = {"file": file, "timings": plain, "packed": packed, "parts": dict(e["parts"])}
            runs[rid] = {**e, "meta": {**meta, TIMINGS_ASIDE: file}}
        except (KeyError, TypeError, ValueError):
            continue  # a damaged entry: its run file is read
    return {"format": MANIFEST_FORMAT, "runs": runs}


def seal_many(store: "Store", metas: Mapping[str, Mapping[str, Any]],
              names: Mapping[str, Collection[str]] | None = None) -> list[str]:
    """:func:`seal` for several runs in one update of the manifest and its plan facts;
    the runs sealed. The plan facts are written first: a manifest entry never points at
    facts that were not written (a lost update is a cache miss, as for the manifest)."""
    entries, facts = {}, {}
    files = None if store.is_local or len(metas) < 2 else {e.path: e for e in list_files(store, layout.RUNS, ".json", False)}
    for run_id, meta in metas.items():
        rel = layout.run_meta(run_id)
        run_file = _entry(store, rel) if files is None else files.get(rel)
        parts = list_files(store, layout.log_folder(run_id, "record"), ".parquet", recursive=False)
        loose = [p for p in parts if "/part-" in p.path]
        if run_file is None or (loose and len(parts) > 1):
            continue
        file = [run_file.size, run_file.stamp]
        slim = {k: v for k, v in meta.items() if k != "timings"}
        slim[TIMINGS_ASIDE] = file
        listed = {p.path: [p.size, p.stamp] for p in parts}
        entries[run_id] = {"file": file, "meta": slim, "parts": listed}
        known = names.get(run_id) if names is not None else None
        found = sorted(set(known)) if known is not None else _record_names(store, parts)
        plain, packed = _pack(meta.get("timings"))
        facts[run_id] = {"file": file, "timings": plain, "packed": packed, "parts": listed,
                         **({} if found is None else {"names": found})}
    if not entries:
        return []
    plan = _read_doc(store, layout.PLAN_FACTS, (MANIFEST_FORMAT,)) or {"format": MANIFEST_FORMAT, "runs": {}}
    doc = _upgraded(_read_doc(store, layout.MANIFEST, READ_FORMATS), plan["runs"])
    plan["runs"].update(facts)
    doc["runs"].update(entries)
    store.write_bytes(layout.PLAN_FACTS, json.dumps(plan, separators=(",", ":"), default=str).encode())
    store.write_bytes(layout.MANIFEST, json.dumps(doc, separators=(",", ":"), default=str).encode())
    return list(entries)

"""Damaged or foreign files in a store, kept from sinking the rest of it.

A run file that is not a run's metadata (invalid JSON, not an object, no or another
``run_id``, an id that would escape the store), a Parquet part whose header or
footer is not Parquet's (zeroed, truncated), and rows of a run whose ``runs/<id>.json``
is gone each affect only that run: queries leave them out and warn once, naming the
file. :func:`scan` lists them for ``flor-ray check``; :func:`quarantine` moves them
under ``<store>/quarantine/`` (nothing is deleted).
"""

from __future__ import annotations

import datetime as _dt
import threading
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Collection

from ..errors import DamagedFileWarning, InvalidNameError
from . import layout
from .layout import QUARANTINE
from .listing import Entry, list_files

if TYPE_CHECKING:  # pragma: no cover
    from . import Store
    from .segments import Piece

__all__ = ["Damage", "run_meta_problem", "part_problem", "healthy_pieces", "report", "scan", "quarantine",
           "QUARANTINE"]

_MAGIC = b"PAR1"
_LOCK = threading.Lock()
_PART_CACHE: dict[tuple, str | None] = {}  # (store url, path, size, stamp) -> problem or None
_PART_CACHE_MAX = 200_000
_REPORTED: set[tuple] = set()


@dataclass(frozen=True)
class Damage:
    """One damaged or foreign file of a store (store-relative path)."""

    path: str
    why: str

    def __str__(self) -> str:
        return f"{self.path}: {self.why}"


def run_meta_problem(rel: str, meta: Any) -> str | None:
    """Why ``meta`` read from ``rel`` (``runs/<id>.json``) is not a run's metadata, or None."""
    stem = layout.run_id_of_meta(rel)
    if not isinstance(meta, dict):
        return f"holds a JSON {type(meta).__name__}, not a run's metadata object"
    rid = meta.get("run_id")
    if rid is None:
        return "has no run_id"
    try:
        layout.safe_component("run id", rid)
    except InvalidNameError:
        return f"its run_id {rid!r} is not a valid run id (it would name a path outside the run's folders)"
    if rid != stem:
        return f"its run_id {rid!r} is not the one of its file name ({stem!r})"
    for key, kind in _FIELD_TYPES.items():
        v = meta.get(key)
        if v is not None and not isinstance(v, kind):
            return f"its {key} is a {type(v).__name__}, not a {kind.__name__}"
    return None


#: fields that every reader of run files takes apart, with the type they must have
_FIELD_TYPES = {"args": dict, "argv": list, "env": dict, "timings": dict, "checkpoints": list,
                "iterations": int, "script": str, "version": str, "status": str}


def part_problem(store: "Store", rel: str, size: int | None, stamp: Any = None) -> str | None:
    """Why the Parquet part at ``rel`` cannot be read (magic bytes, footer length), or None.

    Reads 4 bytes at each end; the verdict is kept for as long as the file's size and
    stamp stay the same, so a query checks each part once.
    """
    key = (store.url, rel, size, stamp)
    with _LOCK:
        if key in _PART_CACHE:
            return _PART_CACHE[key]
    why = _check_part(store, rel, size)
    with _LOCK:
        if len(_PART_CACHE) > _PART_CACHE_MAX:
            _PART_CACHE.clear()
        _PART_CACHE[key] = why
    return why


def trust(store: "Store", parts: Collection[Entry]) -> None:
    """Take these parts as whole while they are listed with these sizes and stamps (the
    manifest's compacted files, checked when they were written)."""
    with _LOCK:
        if len(_PART_CACHE) + len(parts) > _PART_CACHE_MAX:
            _PART_CACHE.clear()
        for rel, size, stamp in parts:
            _PART_CACHE.setdefault((store.url, rel, size, stamp), None)


def _check_part(store: "Store", rel: str, size: int | None) -> str | None:
    path = store.path(rel)
    try:
        if store.is_local:
            with open(path, "rb") as f:
                head = f.read(4)
                f.seek(0, 2)
                size = f.tell()
                if size < 12:
                    return f"is {size} bytes long, too short for a Parquet file (truncated)"
                f.seek(size - 8)
                tail = f.read(8)
        else:
            reader = store.reader  # the lean S3 reader, or None: s3fs's
            cat = store.fs.cat_file if reader is None else reader.get
            if size is None:
                info = store.fs.info(path) if reader is None else reader.head(path)
                if info is None:
                    return None  # removed since the listing
                size = int(info["size"])
            if size < 12:
                return f"is {size} bytes long, too short for a Parquet file (truncated)"
            head = cat(path, start=0, end=4)
            tail = cat(path, start=size - 8, end=size)
    except FileNotFoundError:
        return None  # removed since the listing: nothing to leave out
    if head != _MAGIC or tail[4:] != _MAGIC:
        return "is not a Parquet file (no PAR1 magic at its start or end: zeroed, truncated or foreign)"
    footer = int.from_bytes(tail[:4], "little")
    if footer + 12 > size:
        return f"its Parquet footer claims {footer} bytes of a {size}-byte file (truncated)"
    return None


def report(store: "Store", damage: Damage, what: str) -> None:
    """Warn once (per process and file) that ``damage`` is left out: ``what`` says of what."""
    key = (store.url, damage.path, damage.why)
    with _LOCK:
        if key in _REPORTED:
            return
        _REPORTED.add(key)
    warnings.warn(
        DamagedFileWarning(
            f"{store.full_url(damage.path)} {damage.why}; {what}. `flor-ray check --repair` moves it to "
            f"{store.full_url(QUARANTINE)}"
        ),
        stacklevel=3,
    )


_ORPHANS = "holds rows of a run without a valid runs/<id>.json (deleted or damaged)"


def healthy_pieces(store: "Store", pieces: Collection["Piece"], runs: Collection[str]) -> tuple["Piece", ...]:
    """The pieces (:mod:`flor_ray.store.segments`) that belong to one of ``runs`` (the
    store's valid runs) and come from a file that looks like Parquet; the others are
    reported once and left out of queries."""
    keep, orphans = [], set()
    checked: dict[str, str | None] = {}
    for p in pieces:
        if p.run_id not in runs:
            orphans.add(layout.part_run_folder(p.origin) or p.origin)
            continue
        if p.file not in checked:
            checked[p.file] = part_problem(store, p.file, p.file_size, p.file_stamp)
        why = checked[p.file]
        if why:
            report(store, Damage(p.file, why), f"its rows of run {p.run_id} are left out of queries")
            continue
        keep.append(p)
    for rel in sorted(orphans):
        report(store, Damage(rel, _ORPHANS), "they are left out of queries")
    return tuple(keep)


# ------------------------------------------------------------------ check
def scan(store: "Store") -> list[Damage]:
    """Every damaged or foreign file of the store, and rows of runs without a run file."""
    out: list[Damage] = []
    good: set[str] = set()
    for rel, _size, _stamp in list_files(store, layout.RUNS, ".json", recursive=False):
        try:
            meta = store.read_json(rel)
        except FileNotFoundError:
            continue
        except Exception as exc:  # noqa: BLE001 - any unreadable run file is damage
            out.append(Damage(rel, f"is not readable JSON ({type(exc).__name__})"))
            continue
        why = run_meta_problem(rel, meta)
        if why:
            out.append(Damage(rel, why))
        else:
            good.add(meta["run_id"])
    orphans: set[str] = set()
    for rel, size, stamp in list_files(store, layout.LOGS, ".parquet"):
        rid = layout.part_run_id(rel)
        if layout.is_segment(rel):
            why = part_problem(store, rel, size, stamp) or _segment_problem(store, Entry(rel, size, stamp))
            if why:
                out.append(Damage(rel, why))
            continue
        if rid not in good:
            orphans.add(layout.part_run_folder(rel) or rel)
            continue
        why = part_problem(store, rel, size, stamp)
        if why:
            out.append(Damage(rel, why))
    for rel in sorted(orphans):
        out.append(Damage(rel, _ORPHANS))
    return out


def _segment_problem(store: "Store", e: Entry) -> str | None:
    from .segments import segment_origins

    try:
        return None if segment_origins(store, e) is not None else "has no readable list of the files it holds"
    except FileNotFoundError:
        return None


def quarantine(store: "Store", damages: list[Damage]) -> list[str]:
    """Move each damaged path under ``quarantine/<time>/`` (same relative path); the new paths."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
    moved = []
    for d in damages:
        dest = layout.quarantined(stamp, d.path)
        src_path, dest_path = store.path(d.path), store.path(dest)
        if store.is_local:
            import os

            os.makedirs(os.path.dirname(dest_path), exist_ok=True)
            os.replace(src_path, dest_path)
        else:
            store.fs.mv(src_path, dest_path, recursive=True)
        moved.append(dest)
    return moved

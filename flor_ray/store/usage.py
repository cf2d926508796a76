"""``flor-ray du``: the store's bytes by kind (logs, checkpoints, code, ...) and by run,
from one recursive listing (one request per thousand objects on an object store).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import layout

if TYPE_CHECKING:  # pragma: no cover
    from . import Store

__all__ = ["Usage", "RunUsage", "DiskUsage", "disk_usage"]


@dataclass(frozen=True)
class Usage:
    """The files of one kind and their bytes."""

    kind: str
    files: int
    bytes: int


@dataclass(frozen=True)
class RunUsage:
    """One run's bytes: its metadata, rows (record and replays), checkpoints (full
    copies or skeletons) and the tensors its checkpoints share."""

    run_id: str
    meta: int
    logs: int
    checkpoints: int
    objects: int

    @property
    def total(self) -> int:
        return self.meta + self.logs + self.checkpoints + self.objects


@dataclass(frozen=True)
class DiskUsage:
    kinds: tuple[Usage, ...]
    runs: tuple[RunUsage, ...]

    @property
    def total(self) -> int:
        return sum(u.bytes for u in self.kinds)


def _listing(store: "Store") -> dict[str, int]:
    """Store-relative path -> size of every file in the store (temporaries included:
    they take space too)."""
    try:
        found = store.infos(store.root, recursive=True)
    except FileNotFoundError:
        return {}
    except Exception as exc:  # noqa: BLE001 - botocore / aiohttp errors are not OSErrors
        raise store._wrap("listing the store", exc) from exc
    out = {}
    for path, info in found.items():
        if info.get("type") == "directory":
            continue
        rel = path[len(store.root) + 1:] if path.startswith(store.root) else path
        out[rel.lstrip("/")] = int(info.get("size") or 0)
    return out


def _segment_shares(store: "Store", rel: str, size: int) -> dict[str, int]:
    """A segment's bytes split among the runs it holds, by the sizes their files had."""
    from .listing import Entry
    from .segments import segment_origins

    try:
        origins = segment_origins(store, Entry(rel, size, None)) or ()
    except FileNotFoundError:
        return {}
    total = sum(o.size or 0 for o in origins)
    out: dict[str, int] = {}
    for o in origins:
        out[o.run_id] = out.get(o.run_id, 0) + ((o.size or 0) * size // total if total else 0)
    return out


def disk_usage(store: "Store") -> DiskUsage:
    """The store's files and bytes by kind, and each run's bytes."""
    kinds: dict[str, list[int]] = {}
    runs: dict[str, dict[str, int]] = {}
    for rel, size in _listing(store).items():
        kind = layout.kind_of(rel)
        k = kinds.setdefault(kind, [0, 0])
        k[0] += 1
        k[1] += size
        run = layout.run_of(rel)
        if run is not None:
            field = {"runs": "meta", "logs": "logs", "checkpoints": "checkpoints"}.get(kind, "objects")
            r = runs.setdefault(run, {"meta": 0, "logs": 0, "checkpoints": 0, "objects": 0})
            r[field] += size
        elif layout.is_segment(rel):
            for rid, share in _segment_shares(store, rel, size).items():
                runs.setdefault(rid, {"meta": 0, "logs": 0, "checkpoints": 0, "objects": 0})["logs"] += share
    return DiskUsage(
        tuple(Usage(kind, n, b) for kind, (n, b) in sorted(kinds.items(), key=lambda kv: -kv[1][1])),
        tuple(RunUsage(rid, **r) for rid, r in sorted(runs.items())),
    )


def human(n: int) -> str:
    """``n`` bytes as ``1.5 MiB``."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover

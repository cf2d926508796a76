"""Past checkpoints in hand: list a run's checkpoints and restore one into live
objects in any process (a notebook, a debugging script, another machine), from the
store alone.

A checkpoint is read whole, checked against the size and sha256 its run recorded, and
loaded with ``torch.load(weights_only=True)``: tensors and plain containers only, so
a crafted file cannot run code on load. Restoring puts the saved ``state_dict`` of
each named object into the object passed under that name; the RNG states it holds
are restored only when asked (a notebook's own random streams are its user's).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from .errors import CheckpointError, UnknownRunError
from .store import safe_component

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from .store import Store

__all__ = ["LoadedCheckpoint", "checkpoint_table", "load_checkpoint", "read_verified"]


@dataclass(frozen=True)
class LoadedCheckpoint:
    """What :func:`load_checkpoint` restored."""

    run_id: str
    iteration: int
    objects: tuple[str, ...]  # names whose state was restored
    path: str  # the checkpoint's URL
    rng: bool  # whether the RNG states were restored too


def _manifest(store: "Store", run_id: str) -> list[dict]:
    safe_component("run id", run_id)
    try:
        meta = store.read_json(store.runs_rel(run_id))
    except FileNotFoundError:
        raise UnknownRunError(run_id, store.url) from None
    entries = meta.get("checkpoints") if isinstance(meta, dict) else None
    if not isinstance(entries, list):
        return []
    return sorted((e for e in entries if isinstance(e, dict) and isinstance(e.get("iteration"), int)),
                  key=lambda e: e["iteration"])


def _times(store: "Store", run_id: str) -> dict[str, str]:
    """Checkpoint file name -> its write time (ISO, UTC), from one listing."""
    try:
        infos = store.fs.ls(store.path("checkpoints", run_id), detail=True)
    except (FileNotFoundError, OSError):
        return {}
    out = {}
    for info in infos:
        when = info.get("mtime") or info.get("LastModified") or info.get("created")
        if isinstance(when, (int, float)):
            when = _dt.datetime.fromtimestamp(when, _dt.timezone.utc)
        if isinstance(when, _dt.datetime):
            out[info["name"].rsplit("/", 1)[-1]] = when.isoformat(timespec="seconds")
    return out


def checkpoint_table(store: "Store", run_id: str) -> "pd.DataFrame":
    """One row per checkpoint of ``run_id``: iteration, bytes, time, verified, path."""
    import pandas as pd

    entries = _manifest(store, run_id)
    times = _times(store, run_id) if entries else {}
    rows = [{
        "iteration": e["iteration"],
        "bytes": e.get("bytes"),
        "time": times.get(str(e.get("path", "")).rsplit("/", 1)[-1]),
        "verified": e.get("verified"),
        "path": store.full_url(e["path"]) if e.get("path") else None,
    } for e in entries]
    return pd.DataFrame(rows, columns=["iteration", "bytes", "time", "verified", "path"])


def _nearest(available: list[int], iteration: int) -> str:
    below = [i for i in available if i < iteration][-2:]
    above = [i for i in available if i > iteration][:2]
    return ", ".join(map(str, below + above))


def _entry(store: "Store", run_id: str, iteration: Any) -> dict:
    entries = _manifest(store, run_id)
    if not entries:
        raise CheckpointError(
            f"run {run_id} has no checkpoints in {store.url}; it was recorded without "
            "flor.checkpointing(...) or ended before its first checkpoint")
    available = [e["iteration"] for e in entries]
    if iteration == "last":
        return entries[-1]
    if isinstance(iteration, bool) or not isinstance(iteration, int):
        raise CheckpointError(f"iteration must be an int or 'last', got {iteration!r}")
    if iteration < 0:
        iteration = available[-1] + 1 + iteration if -iteration <= available[-1] + 1 else -1
    for e in entries:
        if e["iteration"] == iteration:
            return e
    raise CheckpointError(
        f"run {run_id} has no checkpoint of iteration {iteration}; the nearest are "
        f"{_nearest(available, iteration)} (all: `flor-ray checkpoints {run_id}`)")


def read_verified(store: "Store", entry: Mapping[str, Any]) -> bytes:
    """A checkpoint's bytes, checked against the size and sha256 its run recorded."""
    where = store.full_url(entry["path"])
    try:
        data = store.read_bytes(entry["path"])
    except FileNotFoundError as exc:
        raise CheckpointError(f"checkpoint {where} is missing", path=where) from exc
    if entry.get("bytes") is not None and len(data) != entry["bytes"]:
        raise CheckpointError(
            f"checkpoint {where} is truncated: {len(data)} bytes, {entry['bytes']} recorded", path=where)
    if entry.get("sha256") and hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise CheckpointError(f"checkpoint {where} is corrupted (sha256 differs from the recording)", path=where)
    return data


def load_checkpoint(store: "Store", run_id: str, iteration: Any, objects: Mapping[str, Any],
                    rng: bool = False) -> LoadedCheckpoint:
    """Restore ``objects`` (name -> object with ``load_state_dict``) from a checkpoint."""
    from .record.checkpoint import check_objects, deserialize, restore_rng

    if not objects:
        raise CheckpointError(
            "name the objects to restore, e.g. load_checkpoint(run_id, 3, model=net, optimizer=opt)")
    check_objects(objects)
    entry = _entry(store, run_id, iteration)
    where = store.full_url(entry["path"])
    snap = deserialize(read_verified(store, entry), where)
    saved = snap.get("objects") or {}
    missing = sorted(set(objects) - set(saved))
    if missing:
        raise CheckpointError(
            f"checkpoint {where} holds no state for {', '.join(missing)}; it holds "
            f"{', '.join(sorted(saved)) or 'nothing'} (the names given to flor.checkpointing)", path=where)
    for name, obj in objects.items():
        obj.load_state_dict(saved[name])
    if rng:
        restore_rng(snap["rng"])
    return LoadedCheckpoint(run_id, int(entry["iteration"]), tuple(objects), where, rng)

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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from ..errors import CheckpointError
from ..store import layout
from ..store.checkpoints import entry, load_snapshot, manifest

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from ..store import Store

__all__ = ["LoadedCheckpoint", "checkpoint_table", "load_checkpoint"]


@dataclass(frozen=True)
class LoadedCheckpoint:
    """What :func:`load_checkpoint` restored."""

    run_id: str
    iteration: int
    objects: tuple[str, ...]  # names whose state was restored
    path: str  # the checkpoint's URL
    rng: bool  # whether the RNG states were restored too


def _times(store: "Store", run_id: str) -> dict[str, str]:
    """Checkpoint file name -> its write time (ISO, UTC), from one listing."""
    try:
        infos = store.infos(store.path(layout.checkpoint_folder(run_id))).values()
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
    """One row per checkpoint of ``run_id``: iteration, bytes, time, verified, path, stored_bytes."""
    import pandas as pd

    entries = manifest(store, run_id)
    times = _times(store, run_id) if entries else {}
    rows = [{
        "iteration": e["iteration"],
        "bytes": e.get("bytes"),
        "time": times.get(str(e.get("path", "")).rsplit("/", 1)[-1]),
        "verified": e.get("verified"),
        "path": store.full_url(e["path"]) if e.get("path") else None,
        # what it added to the store: a skeleton's bytes plus the tensors no earlier one stored
        "stored_bytes": e.get("stored_bytes", e.get("bytes")),
    } for e in entries]
    return pd.DataFrame(rows, columns=["iteration", "bytes", "time", "verified", "path", "stored_bytes"])




def load_checkpoint(store: "Store", run_id: str, iteration: Any, objects: Mapping[str, Any],
                    rng: bool = False) -> LoadedCheckpoint:
    """Restore ``objects`` (name -> object with ``load_state_dict``) from a checkpoint."""
    from ..record.checkpoint import check_objects, restore_rng

    if not objects:
        raise CheckpointError(
            "name the objects to restore, e.g. load_checkpoint(run_id, 3, model=net, optimizer=opt)")
    check_objects(objects)
    found = entry(store, run_id, iteration)
    where = store.full_url(found["path"])
    snap = load_snapshot(store, found)
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
    return LoadedCheckpoint(run_id, int(found["iteration"]), tuple(objects), where, rng)

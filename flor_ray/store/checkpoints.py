"""A run's checkpoints in its store: the manifest its run file lists, one entry of it,
and a checkpoint's bytes checked against the size and sha256 its run recorded.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any, Mapping

from ..errors import CheckpointError, UnknownRunError
from . import layout

if TYPE_CHECKING:  # pragma: no cover
    from . import Store

__all__ = ["manifest", "entry", "read_verified", "load_snapshot"]


def manifest(store: "Store", run_id: str) -> list[dict]:
    """The checkpoints a run's metadata lists, by iteration."""
    try:
        meta = store.read_json(layout.run_meta(run_id))
    except FileNotFoundError:
        raise UnknownRunError(run_id, store.url) from None
    entries = meta.get("checkpoints") if isinstance(meta, dict) else None
    if not isinstance(entries, list):
        return []
    return sorted((e for e in entries if isinstance(e, dict) and isinstance(e.get("iteration"), int)),
                  key=lambda e: e["iteration"])


def _nearest(available: list[int], iteration: int) -> str:
    below = [i for i in available if i < iteration][-2:]
    above = [i for i in available if i > iteration][:2]
    return ", ".join(map(str, below + above))


def entry(store: "Store", run_id: str, iteration: Any) -> dict:
    """The manifest entry of checkpoint ``iteration`` (an int, negative from the end, or
    ``"last"``) of a run; a :class:`CheckpointError` naming the nearest ones if none."""
    entries = manifest(store, run_id)
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
    from .retention import GC_REASON, tombstones

    for t in tombstones(store.read_json(layout.run_meta(run_id))):
        if t["iteration"] == iteration:
            raise CheckpointError(
                f"checkpoint {iteration} of run {run_id} {GC_REASON} ({t.get('policy')}, {t.get('at')}); the "
                f"nearest kept are {_nearest(available, iteration)} (all: `flor-ray checkpoints {run_id}`)")
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


def load_snapshot(store: "Store", entry: Mapping[str, Any]) -> dict:
    """A checkpoint's snapshot: a full copy, or a skeleton joined with its run's
    objects, each checked (a :class:`CheckpointError` naming what is damaged)."""
    from ..record.checkpoint import deserialize

    return deserialize(read_verified(store, entry), store.full_url(entry["path"]), store.read_bytes)

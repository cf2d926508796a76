"""``flor-ray gc``: delete the checkpoints a stated retention policy does not keep.

The policy keeps, of every finished run, its checkpoints at positions 0, K, 2K, ...
and its last one (``keep_every=K``), all checkpoints of the last N runs
(``keep_last_runs``) and of the runs a ``where`` selects; the others are deleted.
A run that is still recording is never touched. A shared tensor (an object, see
:mod:`flor_ray.record.ckpt_objects`) is deleted only when no kept checkpoint of its
run references it; when a kept checkpoint cannot be read, none of the run's objects
is deleted.

A deleted checkpoint leaves a tombstone in its run's metadata
(``collected_checkpoints``): the planner plans around it as around any missing
checkpoint, and ``explain()`` says that gc deleted it. The run file is rewritten
before any file is deleted, so no new plan relies on a checkpoint being deleted.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from ..errors import CheckpointError, RetentionError
from . import layout

if TYPE_CHECKING:  # pragma: no cover
    from . import Store

__all__ = ["Policy", "Collected", "GcReport", "collect", "TOMBSTONES", "GC_REASON", "tombstones"]

TOMBSTONES = "collected_checkpoints"
GC_REASON = "was deleted by flor-ray gc"


@dataclass(frozen=True)
class Policy:
    """What gc keeps (see the module doc); at least one of the three is required."""

    keep_every: int | None = None
    keep_last_runs: int | None = None
    where: str | None = None

    def check(self) -> "Policy":
        if self.keep_every is None and self.keep_last_runs is None and not self.where:
            raise RetentionError("state a retention policy: --keep-every K, --keep-last-runs N and/or "
                                 "--where EXPR (runs to keep whole); gc deletes nothing without one")
        for name, v, low in (("keep_every", self.keep_every, 1), ("keep_last_runs", self.keep_last_runs, 0)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < low):
                raise RetentionError(f"{name} must be an integer >= {low}, got {v!r}")
        return self

    def describe(self) -> str:
        bits = [f"keep every {self.keep_every}" if self.keep_every else "keep no checkpoint",
                f"whole last {self.keep_last_runs} runs" if self.keep_last_runs is not None else "",
                f"whole runs where {self.where}" if self.where else ""]
        return ", ".join(b for b in bits if b)


@dataclass(frozen=True)
class Collected:
    """One checkpoint gc deletes (or would, in a dry run)."""

    run_id: str
    iteration: int
    path: str
    bytes: int


@dataclass(frozen=True)
class GcReport:
    checkpoints: tuple[Collected, ...]
    objects: tuple[tuple[str, int], ...]  # (path, bytes) of the shared tensors deleted
    skipped: tuple[tuple[str, str], ...]  # (run id, why it was not touched)
    dry_run: bool

    @property
    def bytes(self) -> int:
        return sum(c.bytes for c in self.checkpoints) + sum(b for _, b in self.objects)


def tombstones(meta: Mapping[str, Any]) -> list[dict]:
    """The checkpoints gc deleted from a run (its metadata's tombstones)."""
    found = meta.get(TOMBSTONES) if isinstance(meta, Mapping) else None
    return [t for t in found if isinstance(t, dict) and isinstance(t.get("iteration"), int)] \
        if isinstance(found, list) else []


def _kept_positions(n: int, keep_every: int | None) -> set[int]:
    if not keep_every:
        return set()
    return {i for i in range(n) if i % keep_every == 0} | ({n - 1} if n else set())


def _whole_runs(store: "Store", metas: Sequence[dict], policy: Policy) -> set[str]:
    from ..queries.runs import select_runs

    whole: set[str] = set()
    if policy.keep_last_runs:
        whole.update(m["run_id"] for m in metas[-policy.keep_last_runs:])
    if policy.where:
        whole.update(select_runs(store, policy.where, list(metas)))
    return whole


def _referenced(store: "Store", kept: Iterable[Mapping[str, Any]]) -> set[str] | None:
    """The objects the kept checkpoints reference; None when one cannot be read."""
    import io
    import pickle

    import torch

    from .checkpoints import read_verified
    from ..record.ckpt_objects import refs

    out: set[str] = set()
    for e in kept:
        if e.get("format") != 2:
            continue
        try:
            skeleton = torch.load(io.BytesIO(read_verified(store, e)), weights_only=True, map_location="cpu")
        except (CheckpointError, pickle.UnpicklingError, RuntimeError, EOFError, ValueError, KeyError):
            return None  # unreadable: its references are unknown, so every object of the run is kept
        out |= refs(skeleton)
    return out


def _plan_run(store: "Store", meta: dict, policy: Policy) -> tuple[list[Collected], list[tuple[str, int]]]:
    from .checkpoints import manifest

    rid = meta["run_id"]
    entries = manifest(store, rid)
    keep = _kept_positions(len(entries), policy.keep_every)
    gone = [Collected(rid, e["iteration"], e["path"], int(e.get("bytes") or 0))
            for i, e in enumerate(entries) if i not in keep]
    if not gone:
        return [], []
    referenced = _referenced(store, (e for i, e in enumerate(entries) if i in keep))
    if referenced is None:
        return gone, []
    objects = store.sizes(layout.checkpoint_objects(rid))
    return gone, sorted((p, b) for p, b in objects.items() if p not in referenced)


def _tombstone(store: "Store", rid: str, gone: Sequence[Collected], policy: Policy) -> None:
    """Move the run's deleted entries from its manifest to its tombstones."""
    rel = layout.run_meta(rid, checked=False)
    meta = store.read_json(rel)
    paths = {c.path for c in gone}
    at = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    entries = meta.get("checkpoints") or []
    meta["checkpoints"] = [e for e in entries if e.get("path") not in paths]
    meta[TOMBSTONES] = tombstones(meta) + [
        {"iteration": e["iteration"], "path": e["path"], "bytes": e.get("bytes"), "at": at,
         "policy": policy.describe()}
        for e in entries if e.get("path") in paths]
    store.write_json(rel, meta)


def collect(store: "Store", policy: Policy, dry_run: bool = False) -> GcReport:
    """Delete (``dry_run``: only list) the checkpoints ``policy`` does not keep."""
    from .runs import load_runs

    policy = policy.check()
    metas = load_runs(store)
    whole = _whole_runs(store, metas, policy)
    gone: list[Collected] = []
    objects: list[tuple[str, int]] = []
    skipped: list[tuple[str, str]] = []
    for meta in metas:
        rid = meta["run_id"]
        if meta.get("status") == "running":
            skipped.append((rid, f"still recording (pid {meta.get('pid')} on {meta.get('host')})"))
            continue
        if rid in whole:
            continue
        run_gone, run_objects = _plan_run(store, meta, policy)
        if run_gone and not dry_run:
            _tombstone(store, rid, run_gone, policy)
            for rel in [c.path for c in run_gone] + [p for p, _ in run_objects]:
                store.delete(rel)
        gone += run_gone
        objects += run_objects
    return GcReport(tuple(gone), tuple(objects), tuple(skipped), dry_run)

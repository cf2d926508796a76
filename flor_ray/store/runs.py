"""The runs of a store: their metadata files, read, checked and shown alive or not.

A run file that is not a run's metadata is left out (:mod:`flor_ray.store.damage`
says why, once). A run left ``running`` by a process that is gone shows as
``incomplete``.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Mapping, NamedTuple, Sequence

from . import layout
from .damage import Damage, report, run_meta_problem
from .listing import Entry, list_files

if TYPE_CHECKING:  # pragma: no cover
    from . import Store
    from .manifest import PlanFacts

__all__ = ["load_runs", "read_run_file", "with_liveness", "cached_runs", "with_timings", "timings_left_out",
           "ParsedRun", "RunFiles"]


class ParsedRun(NamedTuple):
    """A run file as last read: its listing's size and stamp, its metadata (None: left out)."""

    size: int | None
    stamp: object
    meta: dict | None


class RunFiles(NamedTuple):
    """What :func:`cached_runs` found: the runs, the listing they came from, what was parsed."""

    metas: list[dict]
    listing: tuple[Entry, ...]
    parsed: dict[str, ParsedRun]


def _by_start(metas: list[dict]) -> list[dict]:
    metas.sort(key=lambda m: (m.get("started_at") or "", m["run_id"]))
    return metas


def load_runs(store: "Store") -> list[dict]:
    """Every run's metadata, oldest first (run ids sort by start time).

    A run file that is not a run's metadata is left out, with one warning naming it.
    The run files of sealed runs are not read: the manifest holds them, without their
    per-epoch ``timings`` (:func:`timings_left_out`; :func:`with_timings` adds them).
    """
    return cached_runs(store).metas


def sealed_runs(store: "Store") -> dict[str, ParsedRun]:
    """The manifest's runs as :class:`ParsedRun` entries (each checked against the
    listing by its caller), its record parts marked whole for the queries' checks."""
    from .damage import trust
    from .manifest import read_manifest

    out = {}
    for rel, sealed in read_manifest(store).items():
        if run_meta_problem(rel, sealed.meta) is None:
            out[rel] = ParsedRun(sealed.run_file.size, sealed.run_file.stamp, sealed.meta)
            trust(store, sealed.parts)
    return out


def read_run_file(store: "Store", rel: str) -> dict | None:
    """The run's metadata in ``rel``; None (reported once) if gone, damaged or foreign."""
    try:
        data = store.read_bytes(rel)
    except FileNotFoundError:
        return None
    try:
        meta = json.loads(data)
        why = run_meta_problem(rel, meta)
    except ValueError as exc:  # UnicodeDecodeError too
        why = f"is not valid JSON (truncated or corrupted: {str(exc).splitlines()[0]})"
    if why:
        report(store, Damage(rel, why), "the run is left out of runs, queries and replays")
        return None
    return meta


def _process_gone(pid: int, pid_start: object) -> bool:
    """Whether process ``pid`` of this host has ended (or its pid was reused)."""
    try:
        os.kill(pid, 0)
        # a reused pid: compare the process start time when we can
        with open(f"/proc/{pid}/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        return pid_start is not None and pid_start != start_ticks
    except (ProcessLookupError, PermissionError, FileNotFoundError):
        return True
    except (OSError, ValueError, IndexError):
        return False


def with_liveness(meta: dict) -> dict:
    """A run left 'running' by a process that is gone is shown as 'incomplete'."""
    if meta.get("status") == "running":
        import socket

        pid = meta.get("pid")  # the recording's process id
        if meta.get("host") == socket.gethostname() and isinstance(pid, int) \
                and _process_gone(pid, meta.get("pid_start")):
            meta = {**meta, "status": "incomplete"}
    return meta


def cached_runs(store: "Store", parsed: Mapping[str, ParsedRun] | None = None) -> RunFiles:
    """:func:`load_runs` reading only the run files that are new or rewritten since
    ``parsed`` (what an earlier call returned); also the listing.

    The returned dicts are shared with ``parsed``: callers read them, never change them.
    """
    listing = list_files(store, layout.RUNS, ".json", recursive=False)
    old = parsed or {}
    if any(old.get(rel) is None or old[rel][:2] != (size, stamp) for rel, size, stamp in listing):
        old = {**sealed_runs(store), **old}  # the manifest stands for the run files it knows
    new: dict[str, ParsedRun] = {}
    metas = []
    for rel, size, stamp in listing:
        hit = old.get(rel)
        meta = hit.meta if hit is not None and hit.size == size and hit.stamp == stamp else read_run_file(store, rel)
        new[rel] = ParsedRun(size, stamp, meta)
        if meta is not None:
            metas.append(with_liveness(meta))
    return RunFiles(_by_start(metas), listing, new)


def timings_left_out(meta: Mapping) -> bool:
    """Whether ``meta`` came from the manifest without its ``timings``
    (:mod:`flor_ray.store.manifest`): :func:`with_timings` puts them back."""
    from .manifest import TIMINGS_ASIDE

    return TIMINGS_ASIDE in meta and "timings" not in meta


def with_timings(store: "Store", metas: Sequence[dict], facts: "Mapping[str, PlanFacts] | None" = None) -> list[dict]:
    """``metas`` with the ``timings`` the manifest left out put back (new dicts for
    those; the others as they are), from the plan facts (``facts``, read here when
    None and some are needed: one read), else from the run's file."""
    from .manifest import TIMINGS_ASIDE, read_plan_facts

    if not any(timings_left_out(m) for m in metas):
        return list(metas)
    facts = read_plan_facts(store) if facts is None else facts
    out = []
    for m in metas:
        if timings_left_out(m):
            f, aside = facts.get(m["run_id"]), m[TIMINGS_ASIDE]  # aside: the run file's [size, stamp]
            if f is not None and isinstance(aside, list) and len(aside) == 2 and f.stands_for(*aside):
                timings = f.timings
            else:  # facts lost to two runs sealing at once: the run file holds them
                raw = read_run_file(store, layout.run_meta(m["run_id"], checked=False))
                timings = (raw or {}).get("timings")
            m = {k: v for k, v in m.items() if k != TIMINGS_ASIDE}
            m["timings"] = timings
        out.append(m)
    return out

"""The store's replay history: what each finished task took against its estimate.

After each replay the driver writes one small JSON file, ``replays/<time>-<id>.json``,
with a sample per finished task; the planner reads the latest files back as a
:class:`~flor_ray.planning.cost.Calibration` (see there for the model). The history
only tunes estimates: a file that cannot be read is skipped with a warning, and a
history that cannot be written costs the next plan its calibration, never a replay.
"""

from __future__ import annotations

import time
import uuid
import warnings
from typing import TYPE_CHECKING, Any, Sequence

from ..store import layout
from .cost import Calibration, CalibrationSample

if TYPE_CHECKING:  # pragma: no cover
    from ..store import Store
    from .plan import Plan

__all__ = ["HISTORY_DIR", "KEEP_REPLAYS", "load_calibration", "record_history", "concurrency"]

HISTORY_DIR = layout.REPLAYS
#: the planner learns from this many latest replays: recent enough to describe the
#: cluster as it is, enough to cover each mode and concurrency that recurs
KEEP_REPLAYS = 20

#: ``results`` below are the executor's task results
#: (:class:`flor_ray.execution.task.TaskResult`: ``key``, ``run_id``, ``status``,
#: ``node``, ``started_at``, ``wall_s``, ``phases``, ``notes``), read by attribute:
#: planning owns the history's format and imports nothing of the execution


def concurrency(results: Sequence[Any]) -> dict[str, float]:
    """Per task key: how many replay tasks ran on its node on average over its time
    (itself included), from the tasks' start times and walls."""
    spans = [(r.key, r.node, r.started_at, r.started_at + r.wall_s) for r in results
             if r.started_at is not None and r.wall_s > 0]
    out = {}
    for key, node, a, b in spans:
        shared = sum(max(0.0, min(b, d) - max(a, c)) for k, n, c, d in spans if n == node and k != key)
        out[key] = 1.0 + shared / (b - a)
    return out


def record_history(store: "Store", plan: "Plan", results: Sequence[Any]) -> str | None:
    """Write the samples of this replay's finished tasks; the file's store path, or
    None when no task ran (a warning when the store refuses the write)."""
    by_key = {t.key: t for t in plan.tasks}
    conc = concurrency([r for r in results if r.status == "done"])
    samples = []
    for r in results:
        t = by_key.get(r.key)
        if r.status != "done" or t is None or r.key not in conc or r.notes:
            continue  # (notes: a damaged checkpoint routed around; not the work estimated)
        cold = dict(r.phases).get("zygote", 0.0)  # the worker's cold start: modelled apart
        samples.append({"task": r.key, "run_id": r.run_id, "script": t.script, "mode": t.mode,
                        "per_node": max(1, round(conc[r.key])), "base_s": round(t.estimate_s / t.factor, 4),
                        "actual_s": round(max(r.wall_s - cold, 0.0), 4)})
    if not samples:
        return None
    rel = layout.replay_history(f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}.json")
    try:
        store.write_json(rel, {"version": 1, "at": time.time(), "tasks": samples})
    except Exception as exc:  # noqa: BLE001 - the replay's rows are written; only the next estimate loses
        warnings.warn(f"could not record the replay's timings in {store.url!r} ({exc}); "
                      "the next plan's estimates will not be calibrated by this replay", stacklevel=2)
        return None
    return rel


def load_calibration(store: "Store", keep: int = KEEP_REPLAYS) -> Calibration:
    """The samples of the latest ``keep`` replays in the store."""
    names = [n for n in store.listdir(HISTORY_DIR) if n.endswith(".json")][-keep:]
    samples = []
    for name in names:
        rel = layout.replay_history(name)
        try:
            doc = store.read_json(rel)
            for s in doc["tasks"]:
                samples.append(CalibrationSample(str(s["run_id"]), str(s["script"]), str(s["mode"]),
                                                 int(s["per_node"]), float(s["base_s"]), float(s["actual_s"])))
        except FileNotFoundError:
            continue
        except Exception as exc:  # noqa: BLE001 - a damaged hint is dropped, loudly
            warnings.warn(f"skipping the replay history file {store.full_url(rel)}: {exc}; "
                          "delete it to silence this warning", stacklevel=2)
    return Calibration(tuple(samples))

"""Replays planned and started from the page.

A job is planned first (the dry run: :func:`flor_ray.plan_replay` and its
``explain()``); starting it runs ``run_plan(plan)`` in a background thread of the server.
Its progress is read from the store, as the tasks' output partitions appear, so the
page sees what the driver has committed and nothing the driver would have to report.
Jobs live in the server's memory; the store's replay history outlives them.
"""

from __future__ import annotations

import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import FlorError, QueryError

if TYPE_CHECKING:  # pragma: no cover
    from ..store import Store

__all__ = ["Job", "Jobs"]


@dataclass
class Job:
    id: str
    plan: Any
    explain: str
    state: str = "planned"  # planned | running | finished | failed
    started_at: float | None = None
    ended_at: float | None = None
    report: Any = None
    error: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


def _names(value: Any) -> list[str] | None:
    if value in (None, "", []):
        return None
    if isinstance(value, str):
        value = value.replace(",", " ").split()
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise QueryError(f"names must be a list of log names, got {value!r}")
    return value


class Jobs:
    """The replay jobs of one server, by id."""

    def __init__(self, store: "Store", ray_address: str | None = None):
        self.store, self.ray_address = store, ray_address
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def plan(self, body: dict) -> dict:
        """Plan a replay from the page's form (names, where, iterations, script); runs nothing."""
        from ..api import plan_replay

        if not isinstance(body, dict):
            raise QueryError("the request body must be a JSON object: {\"names\": [...], \"where\": ...}")
        plan = plan_replay(_names(body.get("names")), where=body.get("where") or None,
                           iterations=body.get("iterations") or "all", script=body.get("script") or None,
                           store=self.store)
        job = Job(uuid.uuid4().hex[:12], plan, plan.explain())
        with self._lock:
            self._jobs[job.id] = job
        return self.describe(job.id)

    def start(self, job_id: str) -> dict:
        job = self._get(job_id)
        with job.lock:
            if job.state != "planned":
                raise QueryError(f"replay {job_id} is {job.state}; plan it again to rerun it")
            job.state, job.started_at = "running", time.time()
        threading.Thread(target=self._run, args=(job,), name=f"flor-ui-replay-{job.id}", daemon=True).start()
        return self.describe(job_id)

    def _run(self, job: Job) -> None:
        from ..execution.driver import ray_runner, run_plan

        try:
            report = run_plan(job.plan, runner=ray_runner(self.ray_address), progress=False)
            with job.lock:
                job.report, job.state = report, "finished"
        except FlorError as exc:
            with job.lock:
                job.error, job.state = str(exc), "failed"
        except Exception:  # noqa: BLE001 - a bug: the page shows its traceback instead of hiding it
            with job.lock:
                job.error, job.state = traceback.format_exc(), "failed"
        finally:
            job.ended_at = time.time()

    def _get(self, job_id: str) -> Job:
        from .api import NotFound

        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"no replay job {job_id!r} in this server; plan one on the replay page")
        return job

    def list(self) -> list[dict]:
        with self._lock:
            ids = list(self._jobs)
        return [self.describe(i, tasks=False) for i in reversed(ids)]

    def describe(self, job_id: str, tasks: bool = True) -> dict:
        job = self._get(job_id)
        plan = job.plan
        pending = plan.pending
        done = sum(self.store.exists(t.output) for t in pending) if job.state == "running" else None
        out: dict[str, Any] = {
            "id": job.id, "state": job.state, "names": list(plan.names), "where": plan.where,
            "iterations": plan.iterations, "explain": job.explain, "tasks_total": len(plan.tasks),
            "tasks_pending": len(pending), "tasks_written": done, "estimate_s": round(plan.makespan_s, 3),
            "started_at": job.started_at, "ended_at": job.ended_at, "error": job.error,
            "elapsed_s": round((job.ended_at or time.time()) - job.started_at, 1) if job.started_at else None,
        }
        if tasks:
            out["tasks"] = [{"key": t.key, "run_id": t.run_id, "mode": t.mode, "start": t.start, "stop": t.stop,
                             "estimate_s": round(t.estimate_s, 3), "done_before": t.done} for t in plan.tasks]
        if job.report is not None:
            r, f = job.report, job.report.fidelity
            out["report"] = {
                "ok": r.ok, "wall_s": r.wall_s, "estimate_s": r.estimate_s, "rows": r.rows, "text": str(r),
                "results": [{"key": x.key, "run_id": x.run_id, "status": x.status, "rows": x.rows,
                             "wall_s": round(x.wall_s, 3), "estimate_s": round(x.estimate_s, 3), "error": x.error}
                            for x in r.results],
                "fidelity": {"compared": f.compared, "mismatched": f.mismatched,
                             "by_name": [{"name": n, "compared": c, "mismatched": m} for n, c, m in f.by_name],
                             "examples": list(f.examples)},
            }
        return out

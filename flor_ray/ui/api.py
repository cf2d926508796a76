"""Store reads turned into JSON for the page.

Every read of the log relation and the runs table goes through
:func:`flor_ray.queries.sql.sql`, the command line's query layer with its sandbox and its
per-store caches (a request costs a listing of the store and the query itself), and
a ``where`` predicate is evaluated over the same ``runs`` table as ``--where``.
Values in SQL text are quoted here; nothing else of a request reaches SQL except the
``where`` predicate, which the sandbox confines to reading the store's tables.
"""

from __future__ import annotations

import difflib
import json
import math
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from ..errors import FlorError, QueryError, UnknownRunError
from ..store import layout

if TYPE_CHECKING:  # pragma: no cover
    from ..store import Store

__all__ = ["NotFound", "Series", "runs", "series", "parallel", "run_detail", "diff", "replays", "replay_detail"]

#: columns of the runs table that are not ``flor.arg`` values
FIXED_COLS = ("run_id", "project", "script", "version", "status", "started_at", "ended_at", "iterations",
              "device", "argv")
#: a chart stays readable and its JSON small: longer series are thinned evenly
MAX_POINTS = 2000
#: series drawn at once; the rest are left out and counted
MAX_SERIES = 200


class NotFound(FlorError, LookupError):
    """A run, replay or file that the store does not hold (HTTP 404)."""


@dataclass(frozen=True)
class Series:
    key: str
    label: str
    source: str  # "record" | "replay"
    x: tuple[float, ...]
    y: tuple[float | None, ...]

    def as_dict(self) -> dict:
        return {"key": self.key, "label": self.label, "source": self.source, "x": list(self.x), "y": list(self.y)}


def q(value: str) -> str:
    """An SQL string literal."""
    return "'" + str(value).replace("'", "''") + "'"


def _sql(store: "Store", query: str):
    from ..queries.sql import sql

    return sql(store, query)


def _json_value(v: Any) -> Any:
    if v is None:
        return None
    if hasattr(v, "isoformat"):
        try:
            if v != v:  # NaT
                return None
        except (TypeError, ValueError):
            pass
        return v.isoformat()
    if hasattr(v, "item"):  # numpy scalars
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def selected_ids(store: "Store", where: str | None) -> list[str] | None:
    """Run ids that satisfy ``where`` (None: no predicate, every run)."""
    if not where or not where.strip():
        return None
    try:
        df = _sql(store, f"SELECT run_id FROM runs WHERE ({where})")
    except QueryError as exc:
        raise QueryError(f"invalid where predicate {where!r}: {exc}") from exc
    return [str(r) for r in df["run_id"]]


_NAMES_LOCK = threading.Lock()
_NAMES: dict[tuple, tuple[tuple, dict]] = {}  # store -> (log files listed, names by run)


def _names_by_run(store: "Store") -> dict[str, dict[str, list[str]]]:
    """Per run: the names it recorded and the names replays wrote into it; kept while
    the store's log files stay the same (new flushes and replay partitions are new
    files), so the page's polling costs a listing, not a scan of every row."""
    key = (store.url, json.dumps(store.storage_options, sort_keys=True, default=str))
    files = tuple(store.find(layout.LOGS, ".parquet"))
    with _NAMES_LOCK:
        hit = _NAMES.get(key)
    if hit is not None and hit[0] == files:
        return hit[1]
    names = _scan_names(store)
    with _NAMES_LOCK:
        _NAMES[key] = (files, names)
    return names


def _scan_names(store: "Store") -> dict[str, dict[str, list[str]]]:
    try:
        df = _sql(store, "SELECT run_id, source, name FROM logs GROUP BY ALL ORDER BY run_id, source, name")
    except QueryError:  # a store with runs and no values yet has no logs table to scan
        return {}
    out: dict[str, dict[str, list[str]]] = {}
    for rid, src, name in zip(df["run_id"], df["source"], df["name"]):
        out.setdefault(str(rid), {"record": [], "replay": []}).setdefault(str(src), []).append(str(name))
    return out


def _duration(started: Any, ended: Any, status: str) -> float | None:
    if started is None or started != started:
        return None
    if ended is None or ended != ended:
        if status != "running":
            return None
        return max(0.0, time.time() - started.timestamp())
    return round((ended - started).total_seconds(), 3)


def runs(store: "Store", where: str | None = None) -> dict:
    """The runs table with durations and the names each run holds, oldest first."""
    df = _sql(store, "SELECT * FROM runs ORDER BY started_at, run_id")
    keep = selected_ids(store, where)
    if keep is not None:
        df = df[df["run_id"].isin(set(keep))]
    args = [c for c in df.columns if c not in FIXED_COLS]
    names = _names_by_run(store)
    rows = []
    for rec in df.to_dict("records"):
        rid = str(rec["run_id"])
        logged = names.get(rid, {})
        rows.append({
            "run_id": rid, "version": rec.get("version"), "script": rec.get("script"),
            "status": rec.get("status"), "started_at": _json_value(rec.get("started_at")),
            "ended_at": _json_value(rec.get("ended_at")), "iterations": _json_value(rec.get("iterations")),
            "duration_s": _duration(rec.get("started_at"), rec.get("ended_at"), str(rec.get("status"))),
            "args": {a: _json_value(rec.get(a)) for a in args},
            "recorded": logged.get("record", []),
            # a replay recomputes recorded names too (the fidelity check): back-filled are the others
            "replayed": [n for n in logged.get("replay", []) if n not in logged.get("record", [])],
            "recomputed": [n for n in logged.get("replay", []) if n in logged.get("record", [])],
        })
    all_names = sorted({n for v in names.values() for src in v.values() for n in src})
    return {"args": args, "runs": rows, "names": all_names, "total": int(len(rows))}


def _thin(xs: list, ys: list) -> tuple[list, list]:
    if len(xs) <= MAX_POINTS:
        return xs, ys
    step = len(xs) / MAX_POINTS
    idx = [int(i * step) for i in range(MAX_POINTS)] + [len(xs) - 1]
    return [xs[i] for i in idx], [ys[i] for i in idx]


def series(store: "Store", name: str, where: str | None = None, by: str = "run", raw: bool = False) -> dict:
    """A numeric name across the outer loop: per run (or per version, the mean of its
    runs) and per source. Inner-loop values are averaged per outer iteration unless
    ``raw``, where each step is placed at ``iteration + step / steps``."""
    if not name:
        raise QueryError("name a logged value, e.g. /api/series?name=loss")
    if by not in ("run", "version"):
        raise QueryError(f"by must be 'run' or 'version', got {by!r}")
    keep = selected_ids(store, where)
    cond = f"name = {q(name)} AND value IS NOT NULL"
    if keep is not None:
        if not keep:
            return {"name": name, "by": by, "raw": raw, "series": [], "left_out": 0}
        cond += f" AND run_id IN ({', '.join(q(r) for r in keep)})"
    group = "run_id" if by == "run" else "version"
    # Grouped aggregates only (no window over the rows): a context that two replays
    # wrote holds the same value twice, which leaves every mean as it is.
    if raw:  # per step (deeper loops averaged), every stride-th step so that a series keeps ~MAX_POINTS
        stats = _sql(store, f"SELECT max(iter1) + 1 AS steps, count(DISTINCT iter0) AS outer_n FROM logs WHERE {cond}")
        steps = int(stats["steps"].iloc[0]) if len(stats) and stats["steps"].iloc[0] == stats["steps"].iloc[0] else 1
        outer_n = int(stats["outer_n"].iloc[0] or 1) if len(stats) else 1
        stride = max(1, math.ceil(steps * outer_n / MAX_POINTS))
        per_run = (f"SELECT run_id, version, source, coalesce(iter0, 0) + coalesce(iter1, 0) / {steps} AS x, "
                   f"avg(value) AS value FROM logs WHERE {cond} AND coalesce(iter1, 0) % {stride} = 0 GROUP BY ALL")
    else:
        per_run = (f"SELECT run_id, version, source, coalesce(iter0, 0) AS x, avg(value) AS value FROM logs "
                   f"WHERE {cond} GROUP BY ALL")
    # series in the order of their first run, which is the runs table's (run ids sort by start)
    query = (f"SELECT k, source, x, y FROM (SELECT {group} AS k, source, x, avg(value) AS y, min(run_id) AS first "
             f"FROM ({per_run}) GROUP BY k, source, x) ORDER BY min(first) OVER (PARTITION BY k), k, source, x")
    df = _sql(store, query)
    if not len(df):
        names = _sql(store, "SELECT DISTINCT name FROM logs ORDER BY name")["name"].tolist()
        raise NotFound(f"no numeric values logged under {name!r}"
                       + (f" in the runs where {where}" if where else "")
                       + f"; names in the store: {', '.join(map(str, names)) or 'none'}")
    out: list[Series] = []
    recorded = set(df.loc[df["source"] == "record", "k"])
    for (k, src), part in df.groupby(["k", "source"], sort=False):
        xs, ys = _thin([float(v) for v in part["x"]], [_json_value(float(v)) for v in part["y"]])
        # a replay of a recorded name recomputes it (the fidelity check); of a new one, back-fills it
        tag = "" if src == "record" else " (recomputed)" if k in recorded else " (back-filled)"
        label = (str(k) if by == "run" else f"version {str(k)[:8]}") + tag
        out.append(Series(f"{k}:{src}", label, str(src), tuple(xs), tuple(ys)))
    return {"name": name, "by": by, "raw": raw, "series": [s.as_dict() for s in out[:MAX_SERIES]],
            "left_out": max(0, len(out) - MAX_SERIES)}


def parallel(store: "Store", metric: str, where: str | None = None, agg: str = "last") -> dict:
    """Per run: its args and one figure of ``metric`` (its last, min or max value;
    recorded, else back-filled), for a parallel-coordinates view."""
    fn = {"last": "arg_max(value, it * 1000000 + coalesce(iter1, 0))", "min": "min(value)", "max": "max(value)"}
    if agg not in fn:
        raise QueryError(f"agg must be one of {', '.join(fn)}, got {agg!r}")
    table = runs(store, where)
    query = (f"SELECT run_id, source, {fn[agg]} AS v FROM (SELECT run_id, source, coalesce(iter0, 0) AS it, iter1, "
             f"value FROM logs WHERE name = {q(metric)} AND value IS NOT NULL) GROUP BY ALL")
    df = _sql(store, query)
    best: dict[str, float] = {}
    for rid, src, v in zip(df["run_id"], df["source"], df["v"]):
        if src == "record" or str(rid) not in best:
            best[str(rid)] = _json_value(float(v))
    rows = [{"run_id": r["run_id"], "args": r["args"], "value": best.get(r["run_id"])} for r in table["runs"]]
    return {"metric": metric, "agg": agg, "args": table["args"], "runs": rows}


def _meta(store: "Store", run_id: str) -> dict:
    try:
        return store.read_json(store.runs_rel(run_id))
    except FileNotFoundError as exc:
        raise NotFound(str(UnknownRunError(run_id, store.url))) from exc


def _history(store: "Store") -> list[tuple[str, dict]]:
    from ..planning.history import HISTORY_DIR

    out = []
    for name in sorted(store.listdir(HISTORY_DIR)):
        if name.endswith(".json"):
            try:
                out.append((name[: -len(".json")], store.read_json(layout.replay_history(name))))
            except (FileNotFoundError, ValueError):
                continue
    return out


def run_detail(store: "Store", run_id: str) -> dict:
    """A run's metadata, its version's files, what it logged and the replays into it."""
    from ..versions import read_version

    meta = _meta(store, run_id)
    logged = _sql(store, f"SELECT source, name, task, count(*) AS n FROM logs WHERE run_id = {q(run_id)} "
                         "GROUP BY ALL ORDER BY source, name")
    names = [{"source": s, "name": n, "rows": int(c)} for s, n, c in
             logged.groupby(["source", "name"], sort=False)["n"].sum().reset_index().itertuples(index=False)]
    tasks: dict[str, set] = {}
    for s, n, t in zip(logged["source"], logged["name"], logged["task"]):
        if s == "replay" and t is not None:
            tasks.setdefault(str(t), set()).add(str(n))
    replays = []
    for rid, doc in _history(store):
        mine = [t for t in doc.get("tasks", []) if t.get("run_id") == run_id]
        if mine:
            replays.append({"id": rid, "at": doc.get("at"), "tasks": len(mine),
                            "names": sorted({n for t in mine for n in tasks.get(t.get("task"), ())})})
    try:
        files = sorted(read_version(store, meta["version"])["files"]) if meta.get("version") else []
    except FlorError:
        files = []
    meta = dict(meta)
    meta["status"] = _status_now(store, run_id, meta.get("status"))
    return {"meta": meta, "names": names, "files": files, "replays": replays,
            "replay_tasks": [{"task": k, "names": sorted(v)} for k, v in sorted(tasks.items())],
            "output": _output_text(store, run_id)}


def _output_text(store: "Store", run_id: str) -> str | None:
    from ..queries.output import output_text

    return output_text(store, run_id)


def _status_now(store: "Store", run_id: str, status: Any) -> Any:
    """The runs table's status: a 'running' run whose process is gone reads 'incomplete'."""
    df = _sql(store, f"SELECT status FROM runs WHERE run_id = {q(run_id)}")
    return df["status"].iloc[0] if len(df) else status


def diff(store: "Store", run_id: str, other: str) -> dict:
    """Unified diffs, file by file, from ``other``'s code version to ``run_id``'s."""
    from ..versions import read_version

    a, b = _meta(store, other), _meta(store, run_id)
    fa, fb = read_version(store, a["version"])["files"], read_version(store, b["version"])["files"]
    files = []
    for path in sorted(set(fa) | set(fb)):
        if fa.get(path) == fb.get(path):
            continue
        old, new = (_text(store, fa.get(path)), _text(store, fb.get(path)))
        text = "".join(difflib.unified_diff(old, new, f"{other}/{path}", f"{run_id}/{path}"))
        files.append({"path": path, "status": "added" if path not in fa else "removed" if path not in fb
                      else "changed", "diff": text})
    return {"from": other, "to": run_id, "from_version": a["version"], "to_version": b["version"], "files": files}


def _text(store: "Store", blob: str | None) -> list[str]:
    if blob is None:
        return []
    data = store.read_bytes(layout.code_object(blob))
    if b"\0" in data[:8192]:
        return ["(binary file)\n"]
    return data.decode("utf-8", "replace").splitlines(keepends=True)


def source(store: "Store", run_id: str, path: str) -> dict:
    """One file of the run's code version."""
    from ..versions import read_file

    meta = _meta(store, run_id)
    try:
        data = read_file(store, meta["version"], path)
    except FlorError as exc:
        raise NotFound(str(exc)) from exc
    return {"path": path, "version": meta["version"], "text": "".join(_text_of(data))}


def _text_of(data: bytes) -> list[str]:
    return ["(binary file)"] if b"\0" in data[:8192] else [data.decode("utf-8", "replace")]


def _summary(rid: str, doc: dict) -> dict:
    tasks = doc.get("tasks", [])
    at = doc.get("at")
    return {"id": rid, "at": datetime.fromtimestamp(at, timezone.utc).isoformat() if at else None,
            "tasks": len(tasks), "runs": sorted({t.get("run_id") for t in tasks}),
            "modes": sorted({t.get("mode") for t in tasks}),
            "estimate_s": round(sum(t.get("base_s", 0.0) for t in tasks), 3),
            "actual_s": round(sum(t.get("actual_s", 0.0) for t in tasks), 3)}


def replays(store: "Store") -> dict:
    """The store's replay history, newest first."""
    return {"replays": [_summary(rid, doc) for rid, doc in reversed(_history(store))]}


def replay_detail(store: "Store", replay_id: str) -> dict:
    from ..store import safe_component

    safe_component("replay id", replay_id)
    try:
        doc = store.read_json(layout.replay_history(f"{replay_id}.json"))
    except FileNotFoundError as exc:
        raise NotFound(f"no replay {replay_id!r} in the store {store.url!r}; the replay page lists them") from exc
    return {**_summary(replay_id, doc), "task_list": doc.get("tasks", [])}

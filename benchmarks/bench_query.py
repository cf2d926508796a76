"""Query cost: flor_ray.dataframe and flor_ray.sql against FlorDB 4.0.1's flor.dataframe.

For each size n (full: 10^4, 10^5, 10^6, 10^7 log rows; quick: 10^4 .. 10^6) the same
history is written for both tools without running any training: 10 runs, each
logging ``loss`` at every (epoch, step) of 10 epochs, n/10 rows per run.

* flor_ray: the relation is built in ``flor_ray.store.logs.schema()`` and written with
  ``table_to_parquet_bytes`` + ``Store.write_bytes`` (one Parquet file per run and epoch, as a recording
  flushes per outer iteration), plus one ``runs/<id>.json`` per run.
* FlorDB: the same rows are inserted into its sqlite ``logs`` table (TEXT values,
  JSON loop context), as its recording would leave them, in its own virtualenv.

Timed (median of 3 after a warm-up, each in a warm process): ``flor_ray.dataframe("loss")``,
``flor_ray.sql`` (mean loss per run, a GROUP BY over every row), and FlorDB's
``flor.dataframe("loss")`` and ``flor.query`` with the same GROUP BY; the table and the
plot give flor_ray's time over FlorDB's per size (below 1: flor_ray is faster).

FlorDB gets a time limit per size (``--flordb-timeout``; full 900 s, quick 60 s). Before
a size, its cost is extrapolated linearly from the largest size it completed (import,
insert, one dataframe and one query, and its peak memory): a size that would exceed the
limit, or need more than half of the memory available, is not run and recorded as
"not run: would take ~X s (extrapolated ...)"; a size that runs past the limit anyway is
killed and recorded as a timeout, with what it had measured. FlorDB repeats a query
only while the repetitions fit in a third of the limit.
Prints a table; writes benchmarks/results/query.json and query.png (quick: query_quick.png).
Usage: ``python benchmarks/bench_query.py [--quick] [--sizes 1e4,1e5] [--flordb auto|install|skip]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (ROOT, RESULTS_DIR, ensure_flordb, flordb_env, flordb_python, log, make_repo, med,  # noqa: E402
                     save_results, timed_run, shown)

RUNS = 10
EPOCHS = 10
SQL = "SELECT run_id, avg(value) AS mean_loss, count(*) AS n FROM logs WHERE name = 'loss' GROUP BY run_id"


def _epoch_table(run: int, e: int, steps: int):
    """One flush of a recording: the rows of one epoch, in flor_ray's relation schema.

    Built column by column against ``flor_ray.store.logs.schema()`` (any column this
    benchmark does not know is left null), so it survives changes to the buffering
    helpers of the recorder; the values are those a recording would write.
    """
    import numpy as np
    import pyarrow as pa

    from flor_ray.store.logs import schema

    sch = schema()
    s = np.arange(steps, dtype=np.int64)
    known = {
        "version": pa.array(["0" * 40] * steps, pa.string()),
        "file": pa.array(["train.py"] * steps, pa.string()),
        "loops": pa.array(["epoch/step"] * steps, pa.string()),
        "iter0": pa.array(np.full(steps, e, dtype=np.int32)),
        "iter1": pa.array(s.astype(np.int32)),
        "name": pa.array(["loss"] * steps, pa.string()),
        "vtype": pa.array(["float"] * steps, pa.string()),
        "value_float": pa.array(1.0 / (1 + e + s * 1e-3) + run * 1e-3),
        "seq": pa.array(e * steps + s),
    }
    cols = [known[f.name].cast(f.type) if f.name in known else pa.nulls(steps, f.type) for f in sch]
    return pa.Table.from_arrays(cols, schema=sch)


def write_flor_ray(path: Path, n: int) -> float:
    """A flor_ray store with n rows; returns seconds spent writing."""
    from flor_ray.store.logs import table_to_parquet_bytes
    from flor_ray.store import Store

    t = time.perf_counter()
    st = Store(str(path))
    st.ensure()
    steps = max(1, n // (RUNS * EPOCHS))
    for r in range(RUNS):
        rid = f"20260101T0000{r:02d}-bench{r:02d}"
        st.write_json(st.runs_rel(rid), {
            "run_id": rid, "project": "bench", "script": "train.py", "version": "0" * 40, "argv": [],
            "status": "finished", "started_at": f"2026-01-01T00:00:{r:02d}+00:00",
            "ended_at": f"2026-01-01T00:10:{r:02d}+00:00", "iterations": EPOCHS, "args": {"lr": 0.01 * (r + 1)},
            "env": {"device": "cpu"}, "timings": {}, "checkpoints": [],
        })
        for e in range(EPOCHS):
            st.write_bytes(f"logs/run_id={rid}/source=record/part-{e:05d}.parquet",
                           table_to_parquet_bytes(_epoch_table(r, e, steps)))
    return time.perf_counter() - t


def time_flor_ray(path: Path, reps: int) -> dict:
    import flor_ray

    store = str(path)
    out: dict = {}
    for label, fn in (("dataframe", lambda: flor_ray.dataframe("loss", store=store)),
                      ("sql", lambda: flor_ray.sql(SQL, store=store))):
        first = time.perf_counter()
        res = fn()  # warm-up (imports, page cache)
        first = time.perf_counter() - first
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            res = fn()
            times.append(time.perf_counter() - t)
        out[label] = {"first_s": first, "times_s": times, "median_s": med(times), "rows_out": int(len(res))}
    return out


# Runs inside FlorDB's virtualenv, cwd = a git repository of its own.
FLORDB_SCRIPT = textwrap.dedent('''
    import json, resource, sqlite3, sys, time
    n, reps, budget = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    def rss_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    RUNS, EPOCHS = {runs}, {epochs}
    t = time.perf_counter()
    import flordb as flor
    from flordb import database
    import_s = time.perf_counter() - t
    import_rss_mb = rss_mb()
    conn, cur = database.conn_and_cursor()
    steps = max(1, n // (RUNS * EPOCHS))
    t = time.perf_counter()
    def rows():
        for r in range(RUNS):
            ts = "2026-01-01T00:00:%02d" % r
            yield ("bench", ts, "train.py", None, "lr", str(0.01 * (r + 1)), 1, "forward")
            for e in range(EPOCHS):
                for s in range(steps):
                    ctx = json.dumps([{{"name": "epoch", "iteration": e, "value": None}},
                                      {{"name": "step", "iteration": s, "value": None}}])
                    yield ("bench", ts, "train.py", ctx, "loss", str(1.0 / (1 + e + s * 1e-3) + r * 1e-3), 1, "forward")
    cur.executemany("INSERT INTO logs (projid, tstamp, filename, ctx, value_name, value, value_type, source) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows())
    conn.commit()
    conn.close()
    insert_s = time.perf_counter() - t
    out = {{"import_s": import_s, "insert_s": insert_s, "import_rss_mb": import_rss_mb, "max_rss_mb": rss_mb()}}
    print("PARTIAL" + json.dumps(out), flush=True)
    sql = ("SELECT tstamp, avg(CAST(value AS REAL)) AS mean_loss, count(*) AS n FROM logs "
           "WHERE value_name = 'loss' GROUP BY tstamp")
    for label, fn in (("dataframe", lambda: flor.dataframe("loss")), ("sql", lambda: flor.query(sql))):
        t = time.perf_counter()
        res = fn()
        first = time.perf_counter() - t
        times = []
        # repeat only while the budget allows (a 10^7-row FlorDB dataframe takes minutes)
        for _ in range(reps if first * (reps + 1) < budget else 0):
            t = time.perf_counter()
            res = fn()
            times.append(time.perf_counter() - t)
        times = times or [first]
        out[label] = {{"first_s": first, "times_s": times, "median_s": sorted(times)[len(times) // 2],
                       "rows_out": int(len(res))}}
        del res
        out["max_rss_mb"] = rss_mb()
        print("PARTIAL" + json.dumps(out), flush=True)
    print("JSON" + json.dumps(out), flush=True)
''').format(runs=RUNS, epochs=EPOCHS)


def time_flordb(tmp: Path, n: int, reps: int, timeout: float) -> dict:
    repo = make_repo(tmp, f"flordb-{n}")
    (repo / "q.py").write_text(FLORDB_SCRIPT)
    wall, proc = timed_run([str(flordb_python()), "q.py", str(n), str(reps), str(timeout / 3)], repo,
                           flordb_env(), timeout=timeout)
    last = None
    for ln in (proc.stdout or "").splitlines():
        if ln.startswith("JSON"):
            return {"ok": True, "wall_s": wall, **json.loads(ln[4:])}
        if ln.startswith("PARTIAL"):
            last = json.loads(ln[7:])
    if proc.returncode == 124:
        err = f"timeout: killed after the limit of {timeout:.0f} s per size"
    else:
        err = f"exit {proc.returncode}: {(proc.stderr or '').strip()[-400:]}"
    return {"ok": False, "timed_out": proc.returncode == 124, "wall_s": wall, "error": err, **(last or {})}


def _mem_available_mb() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def flordb_estimate(done: dict | None, n: int) -> dict | None:
    """FlorDB's cost at n rows, extrapolated linearly from the largest size it completed.

    Time: import + (insert + one dataframe + one query) x n/m, i.e. the least the run
    at n needs to measure anything (the repetitions are dropped when they would not
    fit). Memory: its resident memory after the import plus the growth of its peak
    beyond that x n/m. A rough guide (its fixed costs are scaled too), recorded with
    the entry so that a size left out can be judged.
    """
    if not done or not done.get("ok"):
        return None
    m = done["rows"]
    k = n / m
    once = sum((done.get(key) or {}).get("first_s", 0.0) for key in ("dataframe", "sql"))
    est = done.get("import_s", 0.0) + (done.get("insert_s", 0.0) + once) * k
    out = {"from_rows": m, "estimate_s": est}
    if done.get("max_rss_mb"):
        base = done.get("import_rss_mb") or 0.0
        out["estimate_rss_mb"] = base + (done["max_rss_mb"] - base) * k
    return out


def _median(side: dict, key: str):
    return (side.get(key) or {}).get("median_s")


def ratios(entry: dict) -> dict:
    """flor_ray's median over FlorDB's, per query kind (below 1: flor_ray is faster)."""
    fr, fd = entry["flor_ray"], entry.get("flordb") or {}
    out = {}
    for key in ("dataframe", "sql"):
        a, b = _median(fr, key), _median(fd, key)
        out[key] = a / b if a and b else None
    return out


def flordb_note(fd: dict) -> str:
    if fd.get("ok"):
        return ""
    return str(fd.get("reason") or fd.get("error") or "not run")


def table(res: dict) -> str:
    hdr = (f"{'rows':>10s} {'fr df (s)':>10s} {'fr sql (s)':>10s} {'FlorDB df (s)':>13s} {'FlorDB sql (s)':>14s} "
           f"{'df fr/FlorDB':>12s} {'sql fr/FlorDB':>13s}  rows out fr / FlorDB")
    lines = [hdr, "-" * len(hdr)]
    notes = []

    def num(x, w, fmt):
        return f"{x:{w}{fmt}}" if x else f"{'-':>{w}s}"

    for e in res["sizes"]:
        fr = e["flor_ray"]
        fd = e.get("flordb") or {}
        r = e.get("ratio_fr_over_flordb") or ratios(e)
        note = flordb_note(fd)
        mark = ""
        if note:
            notes.append(f"{e['rows']:,} rows, FlorDB: {note}")
            mark = f"  [{len(notes)}]"
        lines.append(f"{e['rows']:>10,d} {fr['dataframe']['median_s']:10.3f} {fr['sql']['median_s']:10.3f} "
                     f"{num(_median(fd, 'dataframe'), 13, '.3f')} {num(_median(fd, 'sql'), 14, '.3f')} "
                     f"{num(r['dataframe'], 12, '.3f')} {num(r['sql'], 13, '.3f')}  "
                     f"{fr['dataframe']['rows_out']} / {(fd.get('dataframe') or {}).get('rows_out', '-')}{mark}")
    lines += [f"[{i}] {n}" for i, n in enumerate(notes, 1)]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = res["sizes"]
    xs = [e["rows"] for e in sizes]
    fig, (ax, axr) = plt.subplots(1, 2, figsize=(12, 4.2))
    ax.plot(xs, [e["flor_ray"]["dataframe"]["median_s"] for e in sizes], "o-", color="C0", label="flor_ray.dataframe")
    ax.plot(xs, [e["flor_ray"]["sql"]["median_s"] for e in sizes], "s-", color="C1", label="flor_ray.sql (GROUP BY)")
    for key, lab, m, c in (("dataframe", "FlorDB flor.dataframe", "o--", "C0"),
                           ("sql", "FlorDB flor.query (GROUP BY)", "s--", "C1")):
        pts = [(e["rows"], _median(e.get("flordb") or {}, key)) for e in sizes]
        pts = [(x, y) for x, y in pts if y]
        if pts:
            ax.plot(*zip(*pts), m, color=c, mfc="none", label=lab)
    for e in sizes:  # FlorDB sizes not run, or killed: the extrapolated time, marked
        fd = e.get("flordb") or {}
        if not fd.get("ok") and fd.get("estimate_s"):
            ax.plot([e["rows"]], [fd["estimate_s"]], "x", color="C3", ms=9)
            ax.annotate(f"FlorDB not run\n(~{fd['estimate_s']:.0f} s est.)", (e["rows"], fd["estimate_s"]),
                        textcoords="offset points", xytext=(-100, -22), fontsize=7, color="C3")
        elif fd.get("timed_out"):
            ax.annotate("FlorDB: timeout", (e["rows"], res.get("flordb_timeout_s") or 1),
                        textcoords="offset points", xytext=(-40, 6), fontsize=7, color="C3")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("log rows")
    ax.set_ylabel("seconds (median)")
    ax.set_title(f"query time ({res['mode']})")
    ax.legend(fontsize=7)
    for key, lab, m, c in (("dataframe", "dataframe", "o-", "C0"), ("sql", "sql (GROUP BY)", "s-", "C1")):
        pts = [(e["rows"], (e.get("ratio_fr_over_flordb") or ratios(e)).get(key)) for e in sizes]
        pts = [(x, y) for x, y in pts if y]
        if pts:
            axr.plot(*zip(*pts), m, color=c, label=lab)
            for x, y in pts:
                axr.annotate(f"{y:.2g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=c)
    axr.axhline(1.0, color="grey", lw=0.8, ls=":")
    axr.set_xscale("log")
    axr.set_yscale("log")
    axr.set_xlim(min(xs) / 2, max(xs) * 2)
    axr.set_xlabel("log rows")
    axr.set_ylabel("flor_ray time / FlorDB time")
    axr.set_title("flor_ray / FlorDB (below 1: flor_ray faster)")
    if axr.lines[:-1]:
        axr.legend(fontsize=7)
    else:
        axr.text(0.5, 0.5, "FlorDB not measured", transform=axr.transAxes, ha="center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="10^4 .. 10^6 rows")
    ap.add_argument("--sizes", default=None, help="comma list, e.g. 1e4,1e5 (quick: 1e4,1e5,1e6; full: up to 1e7)")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions after the warm-up (default 3)")
    ap.add_argument("--flordb", choices=["auto", "install", "skip"], default=None,
                    help="auto: use benchmarks/.flordb-venv if present (quick default); install: create it (full default)")
    ap.add_argument("--flordb-max-rows", type=float, default=None,
                    help="largest size FlorDB is asked for (quick 1e5, full 1e7)")
    ap.add_argument("--flordb-timeout", type=float, default=None,
                    help="FlorDB's time limit per size in seconds (quick 60, full 900): sizes extrapolated past it "
                         "are not run, a run past it is killed")
    ap.add_argument("--no-save", action="store_true")
    a = ap.parse_args()
    mode = "quick" if a.quick else "full"
    sizes = [int(float(x)) for x in (a.sizes or ("1e4,1e5,1e6" if a.quick else "1e4,1e5,1e6,1e7")).split(",")]
    fmax = int(a.flordb_max_rows or (1e5 if a.quick else 1e7))
    ftimeout = a.flordb_timeout or (60.0 if a.quick else 900.0)
    t_all = time.perf_counter()
    res: dict = {"mode": mode, "python": platform.python_version(), "cpus": os.cpu_count(),
                 "load_avg_start": os.getloadavg(), "runs": RUNS, "epochs": EPOCHS, "sql": SQL, "sizes": []}
    fdb = ensure_flordb(a.flordb or ("auto" if a.quick else "install"))
    res["flordb"] = fdb
    if not fdb["available"]:
        log(f"FlorDB: {fdb['reason']}")
    res["flordb_timeout_s"] = ftimeout
    done = None  # FlorDB's largest completed size, for the extrapolation
    with tempfile.TemporaryDirectory(prefix="flor_bench_query_") as d:
        tmp = Path(d)
        for n in sizes:
            path = tmp / f"store-{n}"
            w = write_flor_ray(path, n)
            fr = time_flor_ray(path, a.reps)
            shutil.rmtree(path, ignore_errors=True)
            rows = RUNS * EPOCHS * max(1, n // (RUNS * EPOCHS))
            entry = {"rows": rows, "flor_ray_write_s": w, "flor_ray": fr}
            log(f"  {n:,} rows: flor_ray write {w:.1f} s, dataframe {fr['dataframe']['median_s']:.3f} s, "
                f"sql {fr['sql']['median_s']:.3f} s")
            est = flordb_estimate(done, rows)
            avail = _mem_available_mb()
            if not fdb["available"]:
                entry["flordb"] = {"ok": False, "reason": fdb["reason"]}
            elif n > fmax:
                entry["flordb"] = {"ok": False, "reason": f"not run above {fmax:,} rows in this mode (--flordb-max-rows)"}
            elif est and est["estimate_s"] > ftimeout:
                entry["flordb"] = {"ok": False, "skipped": True, **est, "reason": (
                    f"not run: would take ~{est['estimate_s']:.0f} s (extrapolated linearly from "
                    f"{est['from_rows']:,} rows), over the limit of {ftimeout:.0f} s per size")}
            elif est and avail and est.get("estimate_rss_mb", 0) > avail / 2:
                entry["flordb"] = {"ok": False, "skipped": True, **est, "mem_available_mb": avail, "reason": (
                    f"not run: would need ~{est['estimate_rss_mb'] / 1024:.1f} GiB (extrapolated linearly from "
                    f"{est['from_rows']:,} rows), over half of the {avail / 1024:.1f} GiB available")}
            else:
                fd = time_flordb(tmp, n, a.reps, ftimeout)
                if est:
                    fd["extrapolated"] = est
                entry["flordb"] = fd
                if fd["ok"]:
                    done = {"rows": rows, **fd}
                elif est:  # killed: what it would have taken at least
                    fd["estimate_s"] = est["estimate_s"]
                log(f"  {n:,} rows: FlorDB dataframe {_median(fd, 'dataframe')} s, "
                    f"sql {_median(fd, 'sql')} s {'' if fd['ok'] else fd['error']}")
            entry["ratio_fr_over_flordb"] = ratios(entry)
            res["sizes"].append(entry)
    res["total_s"] = time.perf_counter() - t_all
    res["load_avg_end"] = os.getloadavg()
    res["date"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    print(table(res))
    print(f"\n({mode} mode, {res['total_s']:.0f} s; fr = flor_ray; medians of {a.reps} after a warm-up; "
          f"load average {res['load_avg_start'][0]:.1f}: other processes share this machine)")
    if not a.no_save:
        png = RESULTS_DIR / f"query{'_quick' if a.quick else ''}.png"
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        plot(res, png)
        res["png"] = shown(png)
        save_results("query", mode, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())

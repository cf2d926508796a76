"""Query cost: flor_ray.dataframe and flor_ray.sql against FlorDB 4.0.1's flor.dataframe.

For each size n (10^4 .. 10^7 log rows; quick: 10^4 .. 10^6) the same history is
written for both tools without running any training: 10 runs, each logging
``loss`` at every (epoch, step) of 10 epochs, n/10 rows per run.

* flor_ray: the relation is built in ``flor_ray.relation.schema()`` and written with
  ``table_to_parquet_bytes`` + ``Store.write_bytes`` (one Parquet file per run and epoch, as a recording
  flushes per outer iteration), plus one ``runs/<id>.json`` per run.
* FlorDB: the same rows are inserted into its sqlite ``logs`` table (TEXT values,
  JSON loop context), as its recording would leave them, in its own virtualenv.

Timed (median of 3 after a warm-up, each in a warm process): ``flor_ray.dataframe("loss")``,
``flor_ray.sql`` (mean loss per run, a GROUP BY over every row), and FlorDB's
``flor.dataframe("loss")`` and ``flor.query`` with the same GROUP BY. FlorDB sizes
that would exceed ``--flordb-timeout`` are reported as such.
Prints a table; writes benchmarks/results/query.json and query.png.
Usage: ``python benchmarks/bench_query.py [--quick] [--sizes 1e4,1e5] [--flordb auto|install|skip]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (ROOT, RESULTS_DIR, ensure_flordb, flordb_env, flordb_python, log, make_repo, med,  # noqa: E402
                     save_results, timed_run)

RUNS = 10
EPOCHS = 10
SQL = "SELECT run_id, avg(value) AS mean_loss, count(*) AS n FROM logs WHERE name = 'loss' GROUP BY run_id"


def _epoch_table(run: int, e: int, steps: int):
    """One flush of a recording: the rows of one epoch, in flor_ray's relation schema.

    Built column by column against ``flor_ray.relation.schema()`` (any column this
    benchmark does not know is left null), so it survives changes to the buffering
    helpers of the recorder; the values are those a recording would write.
    """
    import numpy as np
    import pyarrow as pa

    from flor_ray.relation import schema

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
    from flor_ray.relation import table_to_parquet_bytes
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
    import json, sqlite3, sys, time
    n, reps, budget = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    RUNS, EPOCHS = {runs}, {epochs}
    t = time.perf_counter()
    import flordb as flor
    from flordb import database
    import_s = time.perf_counter() - t
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
    out = {{"import_s": import_s, "insert_s": insert_s}}
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
    err = "timeout" if proc.returncode == 124 else f"exit {proc.returncode}: {(proc.stderr or '').strip()[-400:]}"
    return {"ok": False, "wall_s": wall, "error": err, **(last or {})}


def table(res: dict) -> str:
    hdr = (f"{'rows':>10s} {'fr df (s)':>10s} {'fr sql (s)':>10s} {'FlorDB df (s)':>13s} {'FlorDB sql (s)':>14s} "
           f"{'df: FlorDB/fr':>13s} {'sql: FlorDB/fr':>14s}  rows out fr / FlorDB")
    lines = [hdr, "-" * len(hdr)]
    for e in res["sizes"]:
        fr = e["flor_ray"]
        fd = e.get("flordb") or {}
        fdd = (fd.get("dataframe") or {}).get("median_s")
        fds = (fd.get("sql") or {}).get("median_s")
        rdf = f"{fdd / fr['dataframe']['median_s']:13.1f}" if fdd else f"{'-':>13s}"
        rsq = f"{fds / fr['sql']['median_s']:14.1f}" if fds else f"{'-':>14s}"
        note = "" if fd.get("ok", False) else f"  FlorDB: {fd.get('error') or fd.get('reason', 'not run')}"[:90]
        lines.append(f"{e['rows']:>10,d} {fr['dataframe']['median_s']:10.3f} {fr['sql']['median_s']:10.3f} "
                     f"{(f'{fdd:13.3f}' if fdd else f'{chr(45):>13s}')} {(f'{fds:14.3f}' if fds else f'{chr(45):>14s}')} "
                     f"{rdf} {rsq}  {fr['dataframe']['rows_out']} / {(fd.get('dataframe') or {}).get('rows_out', '-')}{note}")
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [e["rows"] for e in res["sizes"]]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(xs, [e["flor_ray"]["dataframe"]["median_s"] for e in res["sizes"]], "o-", label="flor_ray.dataframe")
    ax.plot(xs, [e["flor_ray"]["sql"]["median_s"] for e in res["sizes"]], "s-", label="flor_ray.sql (GROUP BY)")
    for key, lab, m in (("dataframe", "FlorDB flor.dataframe", "o--"), ("sql", "FlorDB flor.query (GROUP BY)", "s--")):
        pts = [(e["rows"], (e.get("flordb") or {}).get(key, {}).get("median_s")) for e in res["sizes"]]
        pts = [(x, y) for x, y in pts if y]
        if pts:
            ax.plot(*zip(*pts), m, label=lab)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("log rows")
    ax.set_ylabel("seconds (median)")
    ax.set_title(f"query time ({res['mode']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="10^4 .. 10^6 rows")
    ap.add_argument("--sizes", default=None, help="comma list, e.g. 1e4,1e5 (quick: 1e4,1e5,1e6; full: up to 1e7)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions after the warm-up (quick 1, full 3)")
    ap.add_argument("--flordb", choices=["auto", "install", "skip"], default=None,
                    help="auto: use benchmarks/.flordb-venv if present (quick default); install: create it (full default)")
    ap.add_argument("--flordb-max-rows", type=float, default=None,
                    help="largest size FlorDB is asked for (quick 1e5, full 1e7)")
    ap.add_argument("--flordb-timeout", type=float, default=None, help="seconds per FlorDB size (quick 60, full 900)")
    ap.add_argument("--no-save", action="store_true")
    a = ap.parse_args()
    mode = "quick" if a.quick else "full"
    a.reps = a.reps or (1 if a.quick else 3)
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
    with tempfile.TemporaryDirectory(prefix="flor_bench_query_") as d:
        tmp = Path(d)
        for n in sizes:
            path = tmp / f"store-{n}"
            w = write_flor_ray(path, n)
            fr = time_flor_ray(path, a.reps)
            entry = {"rows": RUNS * EPOCHS * max(1, n // (RUNS * EPOCHS)), "flor_ray_write_s": w, "flor_ray": fr}
            log(f"  {n:,} rows: flor_ray dataframe {fr['dataframe']['median_s']:.3f} s, sql {fr['sql']['median_s']:.3f} s")
            if not fdb["available"]:
                entry["flordb"] = {"ok": False, "reason": fdb["reason"]}
            elif n > fmax:
                entry["flordb"] = {"ok": False, "reason": f"not run above {fmax:,} rows in this mode (--flordb-max-rows)"}
            else:
                entry["flordb"] = time_flordb(tmp, n, a.reps, ftimeout)
                fd = entry["flordb"]
                log(f"  {n:,} rows: FlorDB dataframe {(fd.get('dataframe') or {}).get('median_s')} s, "
                    f"sql {(fd.get('sql') or {}).get('median_s')} s {'' if fd['ok'] else fd['error']}")
            res["sizes"].append(entry)
            import shutil

            shutil.rmtree(path, ignore_errors=True)
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
        res["png"] = str(png.relative_to(ROOT))
        save_results("query", mode, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())

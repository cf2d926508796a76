"""The store at the scale of continuous training: queries at 50 and at 1,000 runs.

One real run of a small training script is recorded (its code version, its metadata);
N runs × E epochs are then written from it through the store's own writers
(:func:`flor_ray.record.rows.rows_to_table`, :func:`flor_ray.store.logs.table_to_parquet_bytes`,
the paths of :mod:`flor_ray.store.layout`, :func:`flor_ray.store.manifest.seal_many`),
each run as a run leaves it once it has ended: one compacted record file and its
manifest entry (``--loose``: one part per epoch, as before compaction); then the runs'
files are consolidated into segments as ``flor-ray compact`` does (``--no-consolidate``:
a file a run). Timed, each
in a fresh process: ``flor-ray df acc``, an SQL aggregate, ``flor-ray runs`` and a
``flor-ray replay gnorm --dry-run``; the ratios time(large) / time(small) are printed
side by side.

    python benchmarks/bench_store.py            # 50 and 1,000 runs × 50 epochs
    python benchmarks/bench_store.py --quick    # 5 and 40 runs × 4 epochs (the test suite)
    python benchmarks/bench_store.py --s3       # the stores on S3 (moto on 127.0.0.1), requests counted
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, MotoS3, clean_env, git, log, make_repo, med, save_results  # noqa: E402

sys.path.insert(0, str(ROOT))

SCRIPT = '''
import argparse
import math

import flor_ray as flor


def lr_at(base, epoch, epochs):
    return base * 0.5 * (1 + math.cos(math.pi * epoch / epochs))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    opts = p.parse_args()
    base = flor.arg("lr", 0.1)
    w = 1.0
    for epoch in flor.loop("epoch", range(opts.epochs)):
        lr = lr_at(base, epoch, opts.epochs)
        for step in flor.loop("step", range(opts.steps)):
            grad = 2 * w
            w -= lr * grad
            flor.log("loss", w * w)
        flor.log("acc", 1.0 / (1.0 + w * w))


if __name__ == "__main__":
    main()
'''

#: today's script: one more statement, for the dry-run plan
TODAY = SCRIPT.replace('            flor.log("loss", w * w)', '            flor.log("loss", w * w)\n            flor.log("gnorm", abs(grad))')

TARGETS_S = {"df": 1.0, "sql": 0.5, "runs": 0.3, "plan": 2.0}
RATIO_TARGET = 3.0


def record_template(repo: Path, env: dict) -> dict:
    """Record one real run; its metadata (version, script, env) is every synthetic run's."""
    (repo / "train.py").write_text(SCRIPT)
    git(repo, "add", "train.py")
    git(repo, "commit", "-qm", "train")
    subprocess.run([sys.executable, "train.py"], cwd=repo, env=env, check=True, capture_output=True)
    store = _store(env)
    from flor_ray.store.runs import load_runs, with_timings

    (meta,) = with_timings(store, load_runs(store))
    return meta


def _store(env: dict):
    from flor_ray.store import Store

    return Store(env["FLOR_STORE"])


def epoch_rows(epochs: int, steps: int, run: int) -> dict:
    """The rows a run of ``epochs`` × ``steps`` logs: a loss per step, an acc per epoch."""
    prefixes = [("epoch", (), None, 1)] + [("epoch/step", (e,), None, 2) for e in range(epochs)]
    prefix_ids, lasts, names, values = [], [], [], []
    w = 1.0 + run * 1e-3
    for e in range(epochs):
        for s in range(steps):
            w *= 0.9
            prefix_ids.append(1 + e), lasts.append(s), names.append("loss"), values.append(w * w)
        prefix_ids.append(0), lasts.append(e), names.append("acc"), values.append(1.0 / (1.0 + w * w))
    return {"prefixes": prefixes, "prefix_ids": prefix_ids, "lasts": lasts, "names": names, "values": values}


def write_runs(store, template: dict, n_runs: int, epochs: int, steps: int, loose: bool = False,
               first: int = 0) -> list[str]:
    """Write ``n_runs`` ended runs from ``template`` (ids ``<template>-s<i>``); their ids."""
    from flor_ray.record.rows import rows_to_table
    from flor_ray.store import layout
    from flor_ray.store.logs import table_to_parquet_bytes
    from flor_ray.store.manifest import seal_many

    from concurrent.futures import ThreadPoolExecutor

    timings = dict(template.get("timings") or {})
    for k in ("outer_s", "inner_s", "inner_n", "checkpoint_s", "checkpoint_write_cpu_s"):
        seen = timings.get(k) or [0]
        timings[k] = [type(seen[0])(sum(seen) / len(seen))] * epochs  # every epoch timed, as a run's are
    metas, names = {}, {}
    pool = ThreadPoolExecutor(1 if store.is_local else 16)  # an object store's PUTs wait on the network
    pending = []

    def put(rel: str, data: bytes) -> None:
        pending.append(pool.submit(store.write_bytes, rel, data))

    for i in range(first, first + n_runs):
        rid = f"{template['run_id']}-s{i:05d}"
        meta = {**template, "run_id": rid, "args": {"lr": round(0.01 * (1 + i % 50), 4), "seed": i},
                "iterations": epochs, "flushes": epochs, "status": "finished", "checkpoints": [],
                "timings": timings}
        rows = epoch_rows(epochs, steps, i)
        per = steps + 1  # rows of one epoch
        if loose:
            for e in range(epochs):
                part = {k: v[e * per:(e + 1) * per] if k != "prefixes" else v for k, v in rows.items()}
                table = rows_to_table(version=meta["version"], file=meta["script"], items=[], seq_start=e * per, **part)
                put(layout.record_part(rid, e), table_to_parquet_bytes(table))
        else:
            table = rows_to_table(version=meta["version"], file=meta["script"], items=[], seq_start=0, **rows)
            put(layout.compacted_part(rid, 0, epochs - 1), table_to_parquet_bytes(table))
        put(layout.run_meta(rid), json.dumps(meta, indent=1, sort_keys=True, default=str).encode())
        metas[rid] = meta
        names[rid] = sorted(set(rows["names"]))
    for f in pending:
        f.result()
    pool.shutdown()
    if not loose:
        seal_many(store, metas, names)
    return list(metas)


def timed_cli(repo: Path, env: dict, args: list[str], repeat: int,
              s3: "MotoS3 | None" = None) -> tuple[float, float, dict]:
    """Median wall time and CPU time (user + system) of ``flor-ray ARGS`` in a fresh
    process (imports included), and on S3 the requests of its last repetition, by kind.
    The CPU time is the figure that holds on a loaded machine, where the wall time
    waits for other processes."""
    import resource

    times, cpus, requests = [], [], {}
    for _ in range(repeat):
        if s3 is not None:
            s3.counting.take()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "flor_ray.cli", *args], cwd=repo, env=env,
                              capture_output=True, text=True)
        times.append(time.perf_counter() - t0)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        if s3 is not None:
            requests = s3.counting.take()
        if proc.returncode != 0:
            raise RuntimeError(f"flor-ray {' '.join(args)} failed: {proc.stderr[-2000:]}")
    return med(times), med(cpus), requests


SQL = "SELECT run_id, max(value) AS best FROM logs WHERE name = 'acc' GROUP BY run_id"


def commands(repo: Path) -> dict[str, list[str]]:
    """The four timed commands, by the name of their target."""
    return {
        "df": ["df", "acc", "--format", "csv", "-o", str(repo / "df.csv")],
        "sql": ["sql", SQL, "--format", "csv", "-o", str(repo / "sql.csv")],
        "runs": ["runs", "--format", "csv", "-o", str(repo / "runs.csv")],
        "plan": ["replay", "gnorm", "--script", "today.py", "--dry-run", "--num-gpus", "0"],
    }


def measure(repo: Path, env: dict, repeat: int, s3: "MotoS3 | None" = None) -> tuple[dict, dict, dict]:
    """The four commands' wall and CPU times (seconds) on the store of ``env``, and their S3 requests."""
    times, cpus, requests = {}, {}, {}
    for key, args in commands(repo).items():
        times[key], cpus[key], requests[key] = timed_cli(repo, env, args, repeat, s3)
    return times, cpus, requests


#: each call in one warm process with the query caches emptied first: the store's
#: share of a command, without the interpreter's start and imports
_IN_PROCESS = r"""
import json, sys, time
import duckdb, pandas, pyarrow.dataset  # noqa: F401  imported before the clock starts
import flor_ray
from flor_ray.queries.cache import CACHE
from flor_ray.store import damage
sql, repeat = sys.argv[1], int(sys.argv[2])
calls = {
    "df": lambda: flor_ray.dataframe("acc"),
    "sql": lambda: flor_ray.sql(sql),
    "runs": lambda: flor_ray.runs(),
    "plan": lambda: flor_ray.plan_replay("gnorm", script="today.py", resources={"num_gpus": 0}),
}
calls["runs"]()  # the first call's lazy imports (sandbox, config) are not the store's
out = {}
for k, fn in calls.items():
    ts = []
    for _ in range(repeat):
        CACHE.reset()
        damage._PART_CACHE.clear()
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    out[k] = sorted(ts)[len(ts) // 2]
print(json.dumps(out))
"""


def measure_in_process(repo: Path, env: dict, repeat: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", _IN_PROCESS, SQL, str(repeat)], cwd=repo, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"in-process timing failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def files_of(store_dir: Path) -> int:
    return sum(1 for p in store_dir.rglob("*") if p.is_file())


def build(tmp: Path, n: int, a, s3: "MotoS3 | None") -> tuple[Path, dict, dict]:
    """A store of ``n`` ended runs (consolidated unless told otherwise): its repository,
    the environment that reaches it, and what building it took."""
    repo = make_repo(tmp, f"n{n}")
    store_dir = tmp / f"store{n}"
    url = f"s3://{s3.bucket}/store{n}" if s3 else str(store_dir)
    env = clean_env(FLOR_STORE=url, **(s3.env() if s3 else {}))
    template = record_template(repo, env)
    st = _store(env)
    t0 = time.perf_counter()
    write_runs(st, template, n - 1, a.epochs, a.steps, loose=a.loose)
    built = time.perf_counter() - t0
    merged = 0.0
    if not a.loose and not a.no_consolidate:  # what `flor-ray compact` does
        from flor_ray.store.consolidation import consolidate

        t0 = time.perf_counter()
        consolidate(st, merge_all=True)
        merged = time.perf_counter() - t0
    files = s3.objects(f"store{n}/") if s3 else files_of(store_dir)
    log(f"{n} runs × {a.epochs} epochs: {files} {'objects' if s3 else 'files'}, written in {built:.1f} s, "
        f"consolidated in {merged:.1f} s")
    (repo / "today.py").write_text(TODAY)
    return repo, env, {"files": files, "rows": n * a.epochs * (a.steps + 1), "write_s": round(built, 2),
                       "consolidate_s": round(merged, 2)}


def report(res: dict, small: int, large: int) -> None:
    """The times side by side, their ratios and targets (and on S3 the requests)."""
    s, l = res["runs"][str(small)], res["runs"][str(large)]
    res["ratios"] = {}
    for kind in ("in_process_s", "cli_s", "cli_cpu_s"):
        res["ratios"][kind] = {k: round(l[kind][k] / s[kind][k], 2) for k in TARGETS_S}
        print(f"{kind:<14}{small:>8} runs{large:>8} runs{'ratio':>8}{'target':>9}")
        for k in TARGETS_S:
            met = "" if kind == "in_process_s" else ("  ok" if l[kind][k] <= TARGETS_S[k] else "  over")
            print(f"  {k:<12}{s[kind][k]:>12.3f}s{l[kind][k]:>12.3f}s{res['ratios'][kind][k]:>8.2f}"
                  f"{TARGETS_S[k]:>8.1f}s{met}")
    if "requests" in l:
        print(f"{'S3 requests':<14}{small:>8} runs{large:>8} runs")
        for k in TARGETS_S:
            print(f"  {k:<12}{sum(s['requests'][k].values()):>13}{sum(l['requests'][k].values()):>13}"
                  f"   {json.dumps(s['requests'][k], sort_keys=True)}  {json.dumps(l['requests'][k], sort_keys=True)}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, one repetition (the test suite's mode)")
    ap.add_argument("--small", type=int, help="runs of the small store (default 50; quick 5)")
    ap.add_argument("--large", type=int, help="runs of the large store (default 1000; quick 40)")
    ap.add_argument("--epochs", type=int, help="epochs a run (default 50; quick 4)")
    ap.add_argument("--steps", type=int, default=20, help="steps an epoch (default 20)")
    ap.add_argument("--repeat", type=int, help="repetitions a command (default 3; quick 1)")
    ap.add_argument("--loose", action="store_true", help="one record part per epoch (no compaction, no manifest)")
    ap.add_argument("--no-consolidate", action="store_true",
                    help="leave a compacted file a run (no segments: the store before `flor-ray compact`)")
    ap.add_argument("--s3", action="store_true", help="the stores on S3 (a moto server on 127.0.0.1), requests counted")
    a = ap.parse_args(argv)
    small, large = a.small or (5 if a.quick else 50), a.large or (40 if a.quick else 1000)
    a.epochs, repeat = a.epochs or (4 if a.quick else 50), a.repeat or (1 if a.quick else 3)
    mode = ("quick" if a.quick else "full") + ("-s3" if a.s3 else "")
    res: dict = {"mode": mode, "sizes": [small, large], "epochs": a.epochs, "steps": a.steps, "loose": a.loose,
                 "consolidated": not (a.loose or a.no_consolidate), "s3": a.s3, "targets_s": TARGETS_S,
                 "ratio_target": RATIO_TARGET, "runs": {}}
    s3 = MotoS3("flor-bench") if a.s3 else None
    saved_env = dict(os.environ)
    os.environ.update(s3.env() if s3 else {})  # this process writes the stores too
    try:
        with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
            for n in (small, large):
                repo, env, built = build(Path(tmp), n, a, s3)
                inproc = measure_in_process(repo, env, repeat)
                times, cpus, requests = measure(repo, env, repeat, s3)
                res["runs"][str(n)] = {**built, "cli_s": {k: round(v, 3) for k, v in times.items()},
                                       "cli_cpu_s": {k: round(v, 3) for k, v in cpus.items()},
                                       "in_process_s": {k: round(v, 3) for k, v in inproc.items()},
                                       **({"requests": requests} if s3 else {})}
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        if s3:
            s3.stop()
    report(res, small, large)
    path = save_results("store", res["mode"], res)
    log(f"wrote {path}")
    print(json.dumps({"ratios": res["ratios"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

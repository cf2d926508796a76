"""Replay cost of flor_ray on realistic histories, against FlorDB 4.0.1.

A history: R runs of each of 2-3 versions of a training script (benchmarks/workloads:
a small CNN on synthetic 3x32x32 images, an LSTM language model on generated tokens;
v1 baseline, v2 variable renamed + train step extracted, v3 LR scheduler added),
each run E epochs, recorded as fresh ``python train.py`` processes in a temporary git
repository. Today's script is v3 plus two hindsight statements. Then:

(a) outer-level statement (reads only the model, logged after validation): flor_ray
    replays it in skip mode from checkpoints; replay wall (planning + ``run_plan(plan)``
    on a local Ray with 2 CPUs, already started) / the original recording wall (sum
    over runs). Measured twice: on cold workers (each first starts its zygote, the
    imports of torch) and on warm ones (a cluster that has replayed before).
    Target <= 0.05.
(b) inner-level statement (reads gradients inside the train step): training is
    re-executed; 1 Ray worker vs 2, measured side by side in one Ray (``num_cpus=2``)
    by asking for 2 CPUs (1 slot) or 1 CPU (2 slots) per task, alternating 1,2,2,1...
    Target speed-up >= 1.9.
(c) |plan estimate - actual| / actual of the plan's makespan, for every plan run.
    Target <= 0.20. Each replay leaves its tasks' actual times in the store, and
    later plans of the same runs, mode and tasks per node are calibrated by them
    (planning.history): reported apart for plans made with and without that history.
(d) FlorDB 4.0.1 (its own virtualenv, benchmarks/.flordb-venv) records the same
    history (same scripts, args and seeds) in its own repository, then
    ``python -m flordb replay --apply <name>`` is timed on it, its failures noted and
    its values compared with flor_ray's.
(e) the ceiling of (b) on this machine: two recordings of the latest version one
    after the other vs both at once (``--no-ceiling`` skips it). Two cores of a VM
    may share more than they show (caches, memory bandwidth, the host's
    hyper-threads); no scheduler can beat this ratio here.

The two tools' recordings alternate run by run. This machine may be shared: every
ratio is taken from runs made side by side in one invocation.
Prints a table; writes benchmarks/results/replay.json (one entry per mode) and replay.png.
Usage: ``python benchmarks/bench_replay.py [--quick] [--workload cnn|lm|all] [--flordb auto|install|skip]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import workloads as wl  # noqa: E402
from _common import (ROOT, RESULTS_DIR, clean_env, ensure_flordb, flordb_env, flordb_python, git, log,  # noqa: E402
                     make_repo, med, save_results, timed_run, shown)

TARGET_OUTER_RATIO = 0.05
TARGET_SPEEDUP = 1.9
TARGET_EST_ERR = 0.20

LRS = ("0.05", "0.02", "0.1")  # run r of a version uses LRS[r % 3] (lm: divided by 5)


def _lr(workload: str, r: int) -> str:
    v = float(LRS[r % len(LRS)])
    return repr(v / 5 if workload == "lm" else v)


# ----------------------------------------------------------------------------- recording
def record_history(tmp: Path, workload: str, versions, runs_per_version: int, epochs: int, steps: int,
                   ckpt_budget: float, flordb: bool, flordb_timeout: float) -> dict:
    """Record the same history with flor_ray (and FlorDB), alternating run by run."""
    ray_repo = make_repo(tmp, f"{workload}-flor_ray")
    fdb_repo = make_repo(tmp, f"{workload}-flordb") if flordb else None
    runs = []
    fdb_errors = []
    for v in versions:
        src = wl.source(workload, v)
        (ray_repo / "train.py").write_text(wl.render(src, "flor_ray"))
        git(ray_repo, "add", "train.py")
        git(ray_repo, "commit", "-qm", f"{workload} {v}")
        if fdb_repo is not None:
            (fdb_repo / "train.py").write_text(wl.render(src, "flordb"))
        for r in range(runs_per_version):
            lr = _lr(workload, r)
            kw = ["--kwargs", f"lr={lr}", f"epochs={epochs}", f"steps={steps}"]
            wall, proc = timed_run([sys.executable, "train.py", *kw], ray_repo,
                                   clean_env(FLOR_CHECKPOINT_BUDGET=str(ckpt_budget)))
            if proc.returncode != 0:
                raise RuntimeError(f"flor_ray recording of {workload} {v} failed:\n{proc.stderr[-3000:]}")
            entry = {"version": v, "lr": lr, "flor_ray_wall_s": wall}
            if fdb_repo is not None:
                fwall, fproc = timed_run([str(flordb_python()), "train.py", *kw], fdb_repo, flordb_env(),
                                         timeout=flordb_timeout)
                entry["flordb_wall_s"] = fwall
                if fproc.returncode != 0:
                    fdb_errors.append(f"record {v} lr={lr}: exit {fproc.returncode}: "
                                      f"{_last_line(fproc.stderr or fproc.stdout)}")
            runs.append(entry)
            log(f"  recorded {workload} {v} lr={lr}: flor_ray {wall:.1f} s"
                + (f", FlorDB {entry['flordb_wall_s']:.1f} s" if "flordb_wall_s" in entry else ""))
    return {"ray_repo": ray_repo, "fdb_repo": fdb_repo, "runs": runs, "flordb_record_errors": fdb_errors}


def _last_line(text: str) -> str:
    lines = [ln for ln in (text or "").strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "no output"


# ----------------------------------------------------------------------------- flor_ray replay
def _clear_replay(store) -> int:
    n = 0
    for f in store.find("logs", ".parquet"):
        if "/source=replay/" in f:
            store.delete(f)
            n += 1
    return n


def _plan_and_run(repo: Path, name: str, slots: int):
    """Plan ``name`` for ``slots`` concurrent tasks on the 2-CPU Ray, run it; timings and report."""
    import flor_ray
    from flor_ray.execution.driver import run_plan
    from flor_ray.planning.plan import ClusterSnapshot, Resources

    store = str(repo / ".flor")
    t0 = time.perf_counter()
    plan = flor_ray.plan_replay([name], store=store, script=repo / "train.py", cluster=ClusterSnapshot(2.0),
                                resources=Resources(num_cpus=2.0 / slots))
    plan_s = time.perf_counter() - t0
    report = run_plan(plan, progress=False)
    total = time.perf_counter() - t0
    modes = sorted({t.mode for t in plan.tasks})
    res = {
        "slots": slots,
        "tasks": len(plan.tasks),
        "pending": len(plan.pending),
        "modes": modes,
        "skipped_runs": [s.reason for s in plan.skipped],
        "plan_s": plan_s,
        "run_wall_s": report.wall_s,
        "total_s": total,
        "estimate_s": report.estimate_s,  # the makespan, plus the cold start when the workers were cold
        "makespan_estimate_s": plan.makespan_s,
        "cold_start_estimate_s": plan.startup_s,
        "estimate_err": abs(report.estimate_s - report.wall_s) / report.wall_s if report.wall_s else None,
        # estimates scaled by the store's replay history (earlier replays' actual / estimate)
        "calibrated": [list(c) for c in plan.calibrated],
        "all_calibrated": bool(plan.pending) and all(t.factor != 1.0 for t in plan.pending),
        "task_wall_s": [r.wall_s for r in report.results],
        "task_estimate_s": [r.estimate_s for r in report.results],
        "task_phases_s": [dict(r.phases) for r in report.results],
        "failed": [f"{r.key[:8]}: {r.error}" for r in report.failed],
        "rows": report.rows,
        "fidelity_compared": report.fidelity.compared,
        "fidelity_mismatched": report.fidelity.mismatched,
    }
    zyg = [dict(r.phases).get("zygote", 0.0) for r in report.results]
    log(f"    tasks {[round(r.wall_s, 1) for r in report.results]} s; zygote starts {[round(z, 1) for z in zyg if z]} s; "
        f"workers {sorted({r.worker for r in report.results if r.worker})}")
    return res, plan


def _start_ray(num_cpus: int = 2) -> None:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    os.environ["PYTHONPATH"] = env["PYTHONPATH"]
    # as flor_ray's own local Ray (execution.driver.ensure_ray): idle workers, with
    # their warm zygotes, are not killed
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env},
             _system_config={"kill_idle_workers_interval_ms": 0})

    @ray.remote(num_cpus=1)
    def warm(_):
        import flor_ray.execution.task  # noqa: F401 - the import replay workers do

        time.sleep(0.5)
        return os.getpid()

    ray.get([warm.remote(i) for i in range(num_cpus)])  # start both workers before measuring


def replay_flor_ray(hist: dict, workload: str, reps: int) -> dict:
    from flor_ray.store import Store

    repo = hist["ray_repo"]
    store = Store(str(repo / ".flor"))
    (repo / "train.py").write_text(wl.today(workload))
    out: dict = {}
    # (a) outer-level statement, 2 slots: first on cold workers (each starts its
    # zygote: the imports of torch...), then again on the now warm ones, as on a
    # cluster that has replayed before
    for label in ("outer_cold", "outer"):
        _clear_replay(store)
        res, plan = _plan_and_run(repo, wl.OUTER[workload], 2)
        log(f"  flor_ray outer ({wl.OUTER[workload]}, {'cold' if label == 'outer_cold' else 'warm'} workers): "
            f"{res['tasks']} tasks {res['modes']}, {res['total_s']:.1f} s (estimate {res['estimate_s']:.1f} s)")
        out[label] = res
    out["outer_explain"] = plan.explain()
    import flor_ray

    df = flor_ray.dataframe(wl.OUTER[workload], store=str(repo / ".flor"))
    out["outer_values"] = [[int(r), int(e), float(v)] for r, e, v in
                           zip(df["run_id"].map({k: i for i, k in enumerate(dict.fromkeys(df["run_id"]))}),
                               df["epoch"], df[wl.OUTER[workload]])]
    meta = [store.read_json(f"runs/{rid}.json") for rid in dict.fromkeys(df["run_id"])]
    out["checkpoints_per_run"] = [len(m.get("checkpoints") or []) for m in meta]
    out["iterations_per_run"] = [m.get("iterations") for m in meta]
    # (b) inner-level statement: 1 slot vs 2 slots, alternating
    inner: dict[str, list] = {"1": [], "2": []}
    for rep in range(reps):
        for slots in ((1, 2) if rep % 2 == 0 else (2, 1)):
            _clear_replay(store)
            res, _ = _plan_and_run(repo, wl.INNER[workload], slots)
            inner[str(slots)].append(res)
            log(f"  flor_ray inner ({wl.INNER[workload]}) rep {rep + 1}/{reps}, {slots} worker(s): "
                f"{res['tasks']} tasks, run {res['run_wall_s']:.1f} s (estimate {res['estimate_s']:.1f} s), "
                f"mismatched {res['fidelity_mismatched']}/{res['fidelity_compared']}")
    out["inner"] = inner
    return out


def hardware_ceiling(tmp: Path, workload: str, epochs: int, steps: int, ckpt_budget: float, reps: int) -> dict:
    """What this machine gives two copies of the workload at once: the most that
    2 workers can gain over 1 here, whatever the scheduler does.

    Two runs of the latest version (recorded, in their own repository) one after the
    other, then the same two started together; ``(t_a + t_b) / max(t_a', t_b')`` over
    their train loops (the recorded per-epoch times, imports left out as a warm
    replay worker leaves them out) and over their process walls. Rounds alternate
    alone-first and together-first."""
    import subprocess

    from flor_ray.store import Store

    repo = make_repo(tmp, f"{workload}-ceiling")
    (repo / "train.py").write_text(wl.render(wl.source(workload, "v3"), "flor_ray"))
    git(repo, "add", "train.py")
    git(repo, "commit", "-qm", "v3")
    store = Store(str(repo / ".flor"))
    env = clean_env(FLOR_CHECKPOINT_BUDGET=str(ckpt_budget))
    cmds = [[sys.executable, "train.py", "--kwargs", f"lr={_lr(workload, r)}", f"epochs={epochs}", f"steps={steps}"]
            for r in range(2)]

    def loops_of(n: int) -> list[float]:
        metas = sorted((store.read_json(f) for f in store.find("runs", ".json")), key=lambda m: m.get("started_at", ""))
        return [sum(m["timings"]["outer_s"]) for m in metas[-n:]]

    rounds = []
    for rep in range(reps):
        res: dict = {}
        for what in (("alone", "together") if rep % 2 == 0 else ("together", "alone")):
            if what == "alone":
                walls = []
                for cmd in cmds:
                    w, proc = timed_run(cmd, repo, env)
                    if proc.returncode != 0:
                        raise RuntimeError(f"ceiling run failed:\n{proc.stderr[-2000:]}")
                    walls.append(w)
                res["alone_wall_s"], res["alone_loop_s"] = walls, loops_of(2)
            else:
                t = time.perf_counter()
                procs = [subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                          text=True) for cmd in cmds]
                walls = []
                for p in procs:
                    _, err = p.communicate()
                    walls.append(time.perf_counter() - t)
                    if p.returncode != 0:
                        raise RuntimeError(f"ceiling run failed:\n{err[-2000:]}")
                res["together_wall_s"], res["together_loop_s"] = walls, loops_of(2)
        res["ceiling_loop"] = sum(res["alone_loop_s"]) / max(res["together_loop_s"])
        res["ceiling_wall"] = sum(res["alone_wall_s"]) / max(res["together_wall_s"])
        res["slowdown_together"] = med([b / a for a, b in zip(res["alone_loop_s"], res["together_loop_s"])])
        rounds.append(res)
        log(f"  hardware ceiling {workload} round {rep + 1}/{reps}: train loops alone {res['alone_loop_s']}, together "
            f"{res['together_loop_s']} -> 2 vs 1 at most {res['ceiling_loop']:.2f}x (process walls {res['ceiling_wall']:.2f}x)")
    return {"rounds": rounds, "ceiling_loop": med([r["ceiling_loop"] for r in rounds]),
            "ceiling_wall": med([r["ceiling_wall"] for r in rounds]),
            "slowdown_together": med([r["slowdown_together"] for r in rounds])}


# ----------------------------------------------------------------------------- FlorDB replay
_FDB_DF = ("import json, sys\nimport flordb as flor\n"
           "df = flor.dataframe(sys.argv[1])\n"
           "print('JSON' + df.astype(str).to_json(orient='records'))\n")


def replay_flordb(hist: dict, workload: str, name: str, timeout: float) -> dict:
    repo = hist["fdb_repo"]
    (repo / "train.py").write_text(wl.render(wl.today(workload), "flordb"))
    wall, proc = timed_run([str(flordb_python()), "-m", "flordb", "replay", "--apply", name], repo, flordb_env(),
                           timeout=timeout, stdin="y\n")
    text = (proc.stdout or "") + "\n" + (proc.stderr or "")
    entered = text.count("entering ")
    commands = [ln.strip() for ln in text.splitlines() if "--replay_flor" in ln and ln.strip().startswith("python")]
    failures = [ln.strip() for ln in text.splitlines()
                if "Exception raised" in ln or "exited with code" in ln or "Traceback" in ln or "Error" in ln][:10]
    res = {"name": name, "wall_s": wall, "returncode": proc.returncode, "versions_entered": entered,
           "replay_commands": commands, "failures": failures, "output_tail": text[-2500:]}
    # what landed in FlorDB's relation
    _, dproc = timed_run([str(flordb_python()), "-c", _FDB_DF, name], repo, flordb_env(), timeout=120)
    rows = []
    for ln in dproc.stdout.splitlines():
        if ln.startswith("JSON"):
            rows = json.loads(ln[4:])
    rep = [r for r in rows if r.get("source") == "replay" and r.get(name) not in (None, "None", "nan")]
    tst = sorted({r["tstamp"] for r in rep})
    res["replayed_rows"] = len(rep)
    res["replayed_runs"] = len(tst)
    res["values"] = sorted([[tst.index(r["tstamp"]), int(float(r["epoch"])), float(r[name])] for r in rep
                            if r.get("epoch") not in (None, "None", "nan")])
    if dproc.returncode != 0:
        res["dataframe_error"] = _last_line(dproc.stderr)
    return res


def compare_values(ours: list, theirs: list, runs_ok: int) -> dict:
    """Match (run index, epoch) of flor_ray's and FlorDB's replayed values (FlorDB's run index
    counts only the runs it replayed, so this is meaningful when it replayed a prefix of the history)."""
    a = {(r, e): v for r, e, v in ours}
    b = {(r, e): v for r, e, v in theirs}
    common = sorted(set(a) & set(b))
    same = sum(1 for k in common if a[k] == b[k] or abs(a[k] - b[k]) <= 1e-12 * max(abs(a[k]), 1.0))
    return {"compared": len(common), "equal": same}


# ----------------------------------------------------------------------------- report
def summarize(w: dict) -> dict:
    orig = sum(r["flor_ray_wall_s"] for r in w["history"])
    outer = w["flor_ray"]["outer"]
    inner = w["flor_ray"]["inner"]
    t1 = med([x["run_wall_s"] for x in inner["1"]])
    t2 = med([x["run_wall_s"] for x in inner["2"]])
    cold = w["flor_ray"].get("outer_cold") or outer
    plans = [cold, outer] + [x for k in ("1", "2") for x in inner[k]]
    errs = [p["estimate_err"] for p in plans if p["estimate_err"] is not None]
    # plans whose every task was calibrated by an earlier replay of its run, mode and
    # tasks per node, and plans made without such a history (a first replay)
    cal = [p["estimate_err"] for p in plans if p.get("all_calibrated") and p["estimate_err"] is not None]
    uncal = [p["estimate_err"] for p in plans if not p.get("all_calibrated") and p["estimate_err"] is not None]
    s = {
        "original_wall_s": orig,
        "outer_replay_s": outer["total_s"],
        "outer_ratio": outer["total_s"] / orig,
        "outer_pass": outer["total_s"] / orig <= TARGET_OUTER_RATIO,
        "outer_cold_replay_s": cold["total_s"],
        "outer_cold_ratio": cold["total_s"] / orig,
        "inner_1_worker_s": t1,
        "inner_2_workers_s": t2,
        "speedup_2_vs_1": t1 / t2 if t2 else None,
        "speedup_pass": bool(t2) and t1 / t2 >= TARGET_SPEEDUP,
        "estimate_err_max": max(errs) if errs else None,
        "estimate_err_median": med(errs) if errs else None,
        "estimate_pass": bool(errs) and max(errs) <= TARGET_EST_ERR,
        "estimate_err_calibrated": cal,
        "estimate_err_uncalibrated": uncal,
        "estimate_calibrated_pass": bool(cal) and max(cal) <= TARGET_EST_ERR,
        "fidelity_mismatched": outer["fidelity_mismatched"] + sum(x["fidelity_mismatched"] for k in ("1", "2")
                                                                 for x in inner[k]),
        "failed_tasks": len(outer["failed"]) + sum(len(x["failed"]) for k in ("1", "2") for x in inner[k]),
    }
    hw = w.get("ceiling")
    if hw:
        s["ceiling_2_vs_1"] = hw["ceiling_loop"]
        s["ceiling_2_vs_1_wall"] = hw["ceiling_wall"]
        s["slowdown_together"] = hw["slowdown_together"]
        s["speedup_of_ceiling"] = (t1 / t2) / hw["ceiling_loop"] if t2 else None
    f = w.get("flordb") or {}
    if f.get("available"):
        forig = sum(r.get("flordb_wall_s", 0.0) for r in w["history"])
        s["flordb_original_wall_s"] = forig
        o = f.get("outer") or {}
        s["flordb_outer_replay_s"] = o.get("wall_s")
        s["flordb_outer_ratio"] = o["wall_s"] / forig if o.get("wall_s") and forig else None
        s["flordb_outer_runs_replayed"] = o.get("replayed_runs")
        # against flor_ray's cold-worker replay: FlorDB has no warm workers to reuse
        s["flordb_vs_flor_ray_outer"] = (o["wall_s"] / cold["total_s"]) if o.get("wall_s") else None
        s["flordb_values_equal"] = (f.get("outer_compare") or {}).get("equal")
        s["flordb_values_compared"] = (f.get("outer_compare") or {}).get("compared")
        i = f.get("inner") or {}
        if i:
            s["flordb_inner_replay_s"] = i.get("wall_s")
            s["flordb_inner_runs_replayed"] = i.get("replayed_runs")
            s["flordb_vs_flor_ray_inner_2w"] = i["wall_s"] / t2 if t2 and i.get("wall_s") else None
    return s


def table(res: dict) -> str:
    ok = lambda b: "ok" if b else "MISS"  # noqa: E731
    lines = []
    for wname, w in res["workloads"].items():
        s = w["summary"]
        n = len(w["history"])
        lines += [
            f"workload {wname}: {n} runs ({', '.join(w['versions'])} x {w['runs_per_version']}), "
            f"{w['epochs']} epochs x {w['steps']} steps; checkpoints per run {w['flor_ray']['checkpoints_per_run']}",
            f"{'measurement':58s} {'value':>10s} {'target':>9s}",
            "-" * 84,
            f"{'original recording, sum of run walls (s)':58s} {s['original_wall_s']:10.2f}",
            f"{'(a) outer ' + wl.OUTER[wname] + ': plan + replay wall, cold workers (s)':58s} "
            f"{s['outer_cold_replay_s']:10.2f}",
            f"{'(a) outer: replay / original, cold workers':58s} {s['outer_cold_ratio']:10.3f}",
            f"{'(a) outer: plan + replay wall, warm workers (s)':58s} {s['outer_replay_s']:10.2f}",
            f"{'(a) outer: replay / original, warm workers':58s} {s['outer_ratio']:10.3f} {'<= 0.05':>9s}  "
            f"{ok(s['outer_pass'])}",
            f"{'(b) inner ' + wl.INNER[wname] + ': 1 worker (s)':58s} {s['inner_1_worker_s']:10.2f}",
            f"{'(b) inner: 2 workers (s)':58s} {s['inner_2_workers_s']:10.2f}",
            f"{'(b) inner: speed-up 2 vs 1':58s} {s['speedup_2_vs_1']:10.2f} {'>= 1.9':>9s}  {ok(s['speedup_pass'])}",
            f"{'(c) |estimate - actual| / actual, max over plans':58s} {s['estimate_err_max']:10.2f} "
            f"{'<= 0.20':>9s}  {ok(s['estimate_pass'])}",
            f"{'(c)   median over plans':58s} {s['estimate_err_median']:10.2f}",
            f"{'(c)   max over calibrated plans (' + str(len(s['estimate_err_calibrated'])) + ')':58s} "
            f"{max(s['estimate_err_calibrated'], default=float('nan')):10.2f} {'<= 0.20':>9s}  "
            f"{ok(s['estimate_calibrated_pass'])}",
            f"{'(c)   max over first plans, no history (' + str(len(s['estimate_err_uncalibrated'])) + ')':58s} "
            f"{max(s['estimate_err_uncalibrated'], default=float('nan')):10.2f}",
            *([f"{'(e) this machine, 2 training processes at once vs 1 by 1 (loops)':58s} {s['ceiling_2_vs_1']:10.2f}",
               f"{'(e)   a training loop next to another takes (x alone)':58s} {s['slowdown_together']:10.2f}",
               f"{'(e)   flor_ray 2-vs-1 speed-up / this ceiling':58s} {s['speedup_of_ceiling']:10.2f}"]
              if "ceiling_2_vs_1" in s else []),
            f"{'fidelity mismatches / failed tasks':58s} {str(s['fidelity_mismatched']) + ' / ' + str(s['failed_tasks']):>10s}",
        ]
        f = w.get("flordb") or {}
        if not f.get("available"):
            lines.append(f"(d) FlorDB: not run: {f.get('reason')}")
        else:
            lines += [
                f"{'(d) FlorDB: original recording, sum of run walls (s)':58s} {s['flordb_original_wall_s']:10.2f}",
                f"{'(d) FlorDB: outer replay wall (s)':58s} {s['flordb_outer_replay_s']:10.2f}",
                f"{'(d) FlorDB: outer replay / its original':58s} {s['flordb_outer_ratio'] or float('nan'):10.3f}",
                f"{'(d) FlorDB outer wall / flor_ray outer wall (cold)':58s} {s['flordb_vs_flor_ray_outer'] or float('nan'):10.2f}",
                f"{'(d) FlorDB: runs it replayed (of ' + str(n) + ')':58s} {s['flordb_outer_runs_replayed']:10d}",
                f"{'(d) FlorDB values equal to flor_ray`s / compared':58s} "
                f"{str(s['flordb_values_equal']) + ' / ' + str(s['flordb_values_compared']):>10s}",
            ]
            if "flordb_inner_replay_s" in s:
                lines += [
                    f"{'(d) FlorDB: inner replay wall (s)':58s} {s['flordb_inner_replay_s']:10.2f}",
                    f"{'(d) FlorDB inner wall / flor_ray inner (2 workers)':58s} "
                    f"{s['flordb_vs_flor_ray_inner_2w'] or float('nan'):10.2f}",
                ]
            for kind in ("outer", "inner"):
                for fl in (f.get(kind) or {}).get("failures", [])[:4]:
                    lines.append(f"    FlorDB {kind} replay: {fl[:150]}")
            for e in f.get("record_errors", [])[:3]:
                lines.append(f"    FlorDB {e[:150]}")
        lines.append("")
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ws = list(res["workloads"].items())
    fig, axes = plt.subplots(1, len(ws), figsize=(6 * len(ws), 4), squeeze=False)
    for ax, (name, w) in zip(axes[0], ws):
        s = w["summary"]
        labels = ["original\nrecording", "flor_ray\nouter cold", "flor_ray\nouter warm", "flor_ray\ninner 1w",
                  "flor_ray\ninner 2w"]
        vals = [s["original_wall_s"], s["outer_cold_replay_s"], s["outer_replay_s"], s["inner_1_worker_s"],
                s["inner_2_workers_s"]]
        colors = ["gray", "tab:blue", "tab:blue", "tab:cyan", "tab:blue"]
        if s.get("flordb_outer_replay_s"):
            labels.append("FlorDB\nouter")
            vals.append(s["flordb_outer_replay_s"])
            colors.append("tab:red")
        if s.get("flordb_inner_replay_s"):
            labels.append("FlorDB\ninner")
            vals.append(s["flordb_inner_replay_s"])
            colors.append("tab:red")
        ax.bar(labels, vals, color=colors)
        ax.set_ylabel("wall seconds")
        ax.set_title(f"{name}: {len(w['history'])} runs x {w['epochs']} epochs ({res['mode']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="cnn, 2 versions x 1 run, 3 short epochs (~1 minute)")
    ap.add_argument("--workload", choices=["cnn", "lm", "all"], default=None)
    ap.add_argument("--versions", default=None, help="comma list (quick: v1,v3; full: v1,v2,v3)")
    ap.add_argument("--runs", type=int, default=None, help="runs per version (quick 1, full 2)")
    ap.add_argument("--epochs", type=int, default=None, help="quick 3, full 6")
    ap.add_argument("--steps", type=int, default=None, help="steps per epoch (quick 8, full 150)")
    ap.add_argument("--reps", type=int, default=None, help="1-vs-2-worker repetitions (quick 1, full 2)")
    ap.add_argument("--ckpt-budget", type=float, default=0.05,
                    help="FLOR_CHECKPOINT_BUDGET while recording (fraction of training time)")
    ap.add_argument("--flordb", choices=["auto", "install", "skip"], default=None,
                    help="auto: use benchmarks/.flordb-venv if present (quick default); install: create it (full default)")
    ap.add_argument("--flordb-inner", action="store_true", help="also time FlorDB on the inner statement (full default)")
    ap.add_argument("--no-ceiling", action="store_true",
                    help="skip (e): two training runs at once vs one by one, what 2 workers can gain on this machine")
    ap.add_argument("--no-save", action="store_true")
    a = ap.parse_args()
    mode = "quick" if a.quick else "full"
    workload_names = (["cnn"] if a.quick else ["cnn", "lm"]) if a.workload in (None,) else (
        list(wl.WORKLOADS) if a.workload == "all" else [a.workload])
    versions = (a.versions or ("v1,v3" if a.quick else "v1,v2,v3")).split(",")
    runs_per = a.runs or (1 if a.quick else 2)
    epochs = a.epochs or (3 if a.quick else 6)
    steps = a.steps or (8 if a.quick else 150)
    reps = a.reps or (1 if a.quick else 2)
    fpolicy = a.flordb or ("auto" if a.quick else "install")
    flordb_inner = a.flordb_inner or not a.quick
    t_all = time.perf_counter()
    res: dict = {"mode": mode, "python": platform.python_version(), "cpus": os.cpu_count(),
                 "load_avg_start": os.getloadavg(), "workloads": {}}
    fdb = ensure_flordb(fpolicy)
    res["flordb"] = fdb
    if not fdb["available"]:
        log(f"FlorDB: {fdb['reason']}")
    _start_ray(2)
    try:
        with tempfile.TemporaryDirectory(prefix="flor_bench_replay_") as d:
            for wname in workload_names:
                log(f"{wname}: recording {len(versions)} versions x {runs_per} runs x {epochs} epochs x {steps} steps")
                hist = record_history(Path(d), wname, versions, runs_per, epochs, steps, a.ckpt_budget,
                                      fdb["available"], 600)
                w: dict = {"versions": versions, "runs_per_version": runs_per, "epochs": epochs, "steps": steps,
                           "history": hist["runs"]}
                w["flor_ray"] = replay_flor_ray(hist, wname, reps)
                if not a.no_ceiling:
                    w["ceiling"] = hardware_ceiling(Path(d), wname, epochs, steps, a.ckpt_budget, reps)
                if fdb["available"]:
                    f: dict = {"available": True, "record_errors": hist["flordb_record_errors"]}
                    log(f"  FlorDB replay --apply {wl.OUTER[wname]} ...")
                    f["outer"] = replay_flordb(hist, wname, wl.OUTER[wname], 900)
                    f["outer_compare"] = compare_values(w["flor_ray"]["outer_values"], f["outer"]["values"],
                                                        f["outer"]["replayed_runs"])
                    log(f"  FlorDB outer: {f['outer']['wall_s']:.1f} s, rc {f['outer']['returncode']}, "
                        f"{f['outer']['replayed_runs']} runs replayed; failures: {f['outer']['failures'][:2]}")
                    if flordb_inner:
                        log(f"  FlorDB replay --apply {wl.INNER[wname]} ...")
                        f["inner"] = replay_flordb(hist, wname, wl.INNER[wname], 900)
                        log(f"  FlorDB inner: {f['inner']['wall_s']:.1f} s, rc {f['inner']['returncode']}")
                    w["flordb"] = f
                else:
                    w["flordb"] = {"available": False, "reason": fdb["reason"]}
                w["summary"] = summarize(w)
                res["workloads"][wname] = w
    finally:
        import ray

        ray.shutdown()
    res["total_s"] = time.perf_counter() - t_all
    res["load_avg_end"] = os.getloadavg()
    res["date"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    print(table(res))
    print(f"({mode} mode, {res['total_s']:.0f} s; 2-CPU local Ray; load average {res['load_avg_start'][0]:.1f} at "
          f"start, {res['load_avg_end'][0]:.1f} at end: other processes share this machine)")
    if not a.no_save:
        png = RESULTS_DIR / f"replay{'_quick' if a.quick else ''}.png"
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        plot(res, png)
        res["png"] = shown(png)
        save_results("replay", mode, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())

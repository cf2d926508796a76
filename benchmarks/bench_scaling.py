"""Scaling of flor_ray's plan execution on Ray: makespan against the ideal total/W.

This measures scheduling, not training. A synthetic history of N runs (>= 1,000)
with known per-epoch costs (seeded log-normal, a few long runs among many short
ones, like a real sweep) is planned with flor_ray's own planner
(``flor_ray.planning.make.make_plan``, one re-execution task per run) for W worker
slots, W = 1, 2, 4, 8, 16. Each planned task is then run on Ray as a
``time.sleep`` of exactly its estimated cost, instead of a replay process (so W can
exceed this machine's cores: sleeps need none). The tasks go through the driver's
own packing and collection (``flor_ray.execution.batches``, which
``flor_ray.execution.driver.RayRunner`` runs replays with): short tasks share Ray
tasks, longest first; each W also runs with one Ray task per planned task (the
comparison, ``unbatched``; ``--no-unbatched`` skips it).

The Ray cluster is started on this machine with several nodes
(``ray.cluster_utils.Cluster``, which starts each node as ``ray start`` does:
its own raylet and object store): full mode 4 nodes x 4 CPUs, quick mode 2 nodes
x 8 CPUs, 16 slots either way. For each W a placement group of W one-CPU bundles
(spread over the nodes) confines the tasks to W slots; the cluster's start and the
worker processes' start (once, before any timing) are outside the makespan, which
runs from the first submission to the last result.

Reported per W: measured makespan, the Ray tasks sent, the planner's LPT estimate
(``plan.makespan_s``), the ideal total/W, efficiency = ideal / measured, the
estimate error, and where the slot time (W x makespan) went besides the sleeps:
``first_s`` (each worker's wait for its first task: submission, leases),
``gaps_s`` (between a worker's tasks: Ray's per-task costs, result gathering) and
``tail_s`` (after a worker's last task: imbalance), summed over the W slots.
Prints a table; writes benchmarks/results/scaling.json and scaling.png.
Usage: ``python benchmarks/bench_scaling.py [--quick] [--tasks N] [--work S] [--max-w W]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ROOT, RESULTS_DIR, log, save_results, shown  # noqa: E402


def synthetic_runs(n: int, total_s: float, seed: int = 0):
    """n RunInfos, one epoch each, costs log-normal (sigma 0.8) scaled to sum to total_s."""
    from flor_ray.planning.plan import RunInfo

    rng = random.Random(seed)
    raw = [rng.lognormvariate(0.0, 0.8) for _ in range(n)]
    scale = total_s / sum(raw)
    runs = []
    for i, c in enumerate(raw):
        cost = round(c * scale, 6)
        runs.append(RunInfo(run_id=f"run{i:05d}", version="v" * 40, script="train.py", args=(("i", i),), argv=(),
                            cwd=None, iterations=1, checkpoints=(), setup_s=0.0, outer_s=(cost,), inner_s=(cost,)))
    return runs


def make(runs, w: int):
    import flor_ray.planning.plan as plan_mod
    from flor_ray.planning.make import make_plan
    from flor_ray.planning.plan import ClusterSnapshot, Resources, VersionPatch

    # a sleep task has no replay process to fork and no partition to write: its
    # estimate is exactly its synthetic work
    plan_mod.TASK_OVERHEAD_S = 0.0

    patch = VersionPatch("v" * 40, "# synthetic\n", None, (), (("x", "inner", "synthetic", ()),), ("x",))
    t = time.perf_counter()
    plan = make_plan(names=["x"], where=None, iterations="all", runs=runs, patches={patch.version: patch},
                     cluster=ClusterSnapshot(float(w)), resources=Resources(num_cpus=1.0))
    return plan, time.perf_counter() - t


def start_cluster(nodes: int, cpus: int):
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": cpus, "include_dashboard": False})
    for _ in range(nodes - 1):
        cluster.add_node(num_cpus=cpus)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    return cluster


def sleep_task(s: float) -> tuple:
    """The stand-in for a replay: sleep the task's estimate; (worker pid, start, end)."""
    t = time.time()
    time.sleep(s)
    return os.getpid(), t, time.time()


def run_width(plan, w: int, batching) -> dict:
    """The plan's tasks on W slots through the driver's own packing and collection
    (flor_ray.execution.batches, as RayRunner runs them), sleeps instead of replays."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from flor_ray.execution.batches import pack, run_packed

    pg = placement_group([{"CPU": 1}] * w, strategy="SPREAD")
    ray.get(pg.ready())
    opts = {"num_cpus": 1, "scheduling_strategy": PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=-1)}
    est = [t.estimate_s for t in plan.tasks]
    spans: list = []
    t0 = time.time()
    batches = pack(est, w, batching)
    run_packed(sleep_task, [(e,) for e in est], batches, options=lambda i: opts, retries=0,
               on_done=lambda o: spans.append(o.value), report_s=batching.report_s)
    end = time.time()
    remove_placement_group(pg)
    return {"makespan_s": end - t0, "ray_tasks": len(batches), "tasks_done": len(spans),
            **where_time_went(spans, t0, end, w)}


def where_time_went(spans: list, t0: float, end: float, w: int) -> dict:
    """Slot time (W x makespan) split into the sleeps (the work), the wait for each
    worker's first task (submission and lease), the gaps between its tasks (Ray's
    per-task costs, result gathering) and the tail after its last (imbalance)."""
    by_worker: dict = {}
    for pid, a, b in spans:
        by_worker.setdefault(pid, []).append((a, b))
    first = gaps = tail = 0.0
    for xs in by_worker.values():
        xs.sort()
        first += xs[0][0] - t0
        gaps += sum(max(n[0] - p[1], 0.0) for p, n in zip(xs, xs[1:]))
        tail += end - xs[-1][1]
    idle = (w - len(by_worker)) * (end - t0)  # slots that never ran a task
    return {"workers": len(by_worker), "slot_s": w * (end - t0), "slept_s": sum(b - a for _, a, b in spans),
            "first_s": first, "gaps_s": gaps, "tail_s": tail + idle,
            # the share of slot time spent in the tasks: efficiency without the sleeps'
            # own lateness on a loaded machine (a sleep woken late counts as work here)
            "occupancy": sum(b - a for _, a, b in spans) / (w * (end - t0))}


def table(res: dict) -> str:
    hdr = f"{'W':>4s} {'tasks':>6s} {'Ray tasks':>9s} {'measured (s)':>13s} {'estimate (s)':>13s} " \
          f"{'ideal T/W (s)':>14s} {'efficiency':>10s} {'unbatched':>9s} {'occupancy':>9s} "\
          f"{'slept/first/gaps/tail (slot-s)':>31s}"
    lines = [hdr, "-" * len(hdr)]
    for r in res["widths"]:
        u = f"{r['unbatched']['efficiency']:9.2f}" if "unbatched" in r else f"{'-':>9s}"
        lines.append(f"{r['w']:>4d} {r['tasks']:>6d} {r['ray_tasks']:>9d} {r['makespan_s']:13.2f} {r['estimate_s']:13.2f} "
                     f"{r['ideal_s']:14.2f} {r['efficiency']:10.2f} {u} {r['occupancy']:9.2f} "
                     f"{r['slept_s']:7.2f}/{r['first_s']:7.2f}/{r['gaps_s']:7.2f}/{r['tail_s']:7.2f}")
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ws = [r["w"] for r in res["widths"]]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    a1.plot(ws, [r["makespan_s"] for r in res["widths"]], "o-", label="measured makespan")
    a1.plot(ws, [r["estimate_s"] for r in res["widths"]], "s--", label="plan estimate (LPT)")
    a1.plot(ws, [r["ideal_s"] for r in res["widths"]], "k:", label="ideal total / W")
    a1.set_xscale("log", base=2)
    a1.set_yscale("log")
    a1.set_xlabel("worker slots W")
    a1.set_ylabel("seconds")
    a1.set_title(f"{res['tasks']} sleep tasks, total {res['total_work_s']:.0f} s ({res['mode']})")
    a1.legend(fontsize=8)
    a2.plot(ws, [r["efficiency"] for r in res["widths"]], "o-", label="batched (the driver's default)")
    if all("unbatched" in r for r in res["widths"]):
        a2.plot(ws, [r["unbatched"]["efficiency"] for r in res["widths"]], "x--", label="one Ray task per task")
    a2.legend(fontsize=8)
    a2.axhline(1.0, color="k", lw=0.5)
    a2.set_xscale("log", base=2)
    a2.set_ylim(0, 1.1)
    a2.set_xlabel("worker slots W")
    a2.set_ylabel("ideal / measured")
    a2.set_title(f"scheduling efficiency on {res['nodes']} local Ray nodes")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1,000 tasks, 8 s of work, W up to 16 (under 2 minutes)")
    ap.add_argument("--tasks", type=int, default=None, help="runs (= tasks) in the history (1000)")
    ap.add_argument("--work", type=float, default=None, help="total seconds of work (quick 8, full 64)")
    ap.add_argument("--max-w", type=int, default=None, help="largest W (16)")
    ap.add_argument("--nodes", type=int, default=None, help="Ray nodes on this machine (quick 2, full 4)")
    ap.add_argument("--widths", default=None, help="the Ws to run, e.g. 8,16 (default: powers of 2 up to --max-w)")
    ap.add_argument("--no-unbatched", action="store_true",
                    help="skip the comparison run with one Ray task per planned task")
    ap.add_argument("--no-save", action="store_true")
    a = ap.parse_args()
    mode = "quick" if a.quick else "full"
    n = a.tasks or 1000
    total = a.work or (8.0 if a.quick else 64.0)
    max_w = a.max_w or 16
    nodes = a.nodes or (2 if a.quick else 4)
    widths = [int(x) for x in a.widths.split(",")] if a.widths else \
        [w for w in (1, 2, 4, 8, 16, 32, 64, 128, 256) if w <= max_w]
    max_w = max(widths)
    cpus = max(1, -(-max_w // nodes))
    t_all = time.perf_counter()
    res: dict = {"mode": mode, "python": platform.python_version(), "cpus": os.cpu_count(),
                 "load_avg_start": os.getloadavg(), "tasks": n, "nodes": nodes, "cpus_per_node": cpus,
                 "measures": "Ray scheduling of planned sleep tasks (each sleeps its estimated cost), not training",
                 "widths": []}
    runs = synthetic_runs(n, total)
    res["total_work_s"] = sum(r.outer_s[0] for r in runs)
    res["task_cost_s"] = {"min": min(r.outer_s[0] for r in runs), "max": max(r.outer_s[0] for r in runs),
                          "mean": res["total_work_s"] / n}
    log(f"starting a local Ray cluster: {nodes} nodes x {cpus} CPUs")
    t = time.perf_counter()
    cluster = start_cluster(nodes, cpus)
    import ray

    try:
        res["cluster_start_s"] = time.perf_counter() - t

        from flor_ray.execution.batches import BATCHING, NO_BATCHING, Batch, run_packed

        # start every worker process before timing (one per slot of the widest W), with
        # the code of both kinds of Ray task the driver sends (one task, a batch)
        t = time.perf_counter()
        warm = [Batch((i,), 1.0) for i in range(max_w)] + [Batch((max_w + 2 * i, max_w + 2 * i + 1), 1.0)
                                                           for i in range(max_w)]
        run_packed(sleep_task, [(0.5,)] * (3 * max_w), warm, options=lambda i: {"num_cpus": 1}, retries=0,
                   on_done=lambda o: None)
        res["warmup_s"] = time.perf_counter() - t
        log(f"  cluster {res['cluster_start_s']:.1f} s, {max_w} workers warm in {res['warmup_s']:.1f} s")
        for w in widths:
            plan, plan_s = make(runs, w)
            ideal = res["total_work_s"] / w
            r = {"w": w, "tasks": len(plan.tasks), "plan_s": plan_s, "estimate_s": plan.makespan_s, "ideal_s": ideal}
            if not a.no_unbatched:  # one Ray task per planned task: what the driver did before batching
                u = run_width(plan, w, NO_BATCHING)
                r["unbatched"] = {**u, "efficiency": ideal / u["makespan_s"]}
            m = run_width(plan, w, BATCHING)
            r.update(m, efficiency=ideal / m["makespan_s"],
                     estimate_err=abs(plan.makespan_s - m["makespan_s"]) / m["makespan_s"])
            res["widths"].append(r)
            before = f", unbatched {r['unbatched']['makespan_s']:.2f} s" if "unbatched" in r else ""
            log(f"  W={w:3d}: {m['makespan_s']:.2f} s in {m['ray_tasks']} Ray tasks (estimate {plan.makespan_s:.2f} s, "
                f"ideal {ideal:.2f} s{before})")
    finally:
        ray.shutdown()
        cluster.shutdown()
    res["total_s"] = time.perf_counter() - t_all
    res["load_avg_end"] = os.getloadavg()
    res["date"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    print(table(res))
    print(f"\n({mode} mode, {res['total_s']:.0f} s; {n} tasks of {res['task_cost_s']['min'] * 1e3:.1f}.."
          f"{res['task_cost_s']['max'] * 1e3:.0f} ms (mean {res['task_cost_s']['mean'] * 1e3:.1f} ms) on "
          f"{nodes} Ray nodes x {cpus} CPUs on one {os.cpu_count()}-core machine; this measures scheduling "
          f"of sleep tasks, not training)")
    if not a.no_save:
        png = RESULTS_DIR / f"scaling{'_quick' if a.quick else ''}.png"
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        plot(res, png)
        res["png"] = shown(png)
        save_results("scaling", mode, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())

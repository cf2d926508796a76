"""Recording cost of flor_ray: overhead on a real training script, import time, log-heavy scripts.

Three measurements, every script run as a fresh ``python script.py`` process inside
a temporary git repository (the store is that repository's ``.flor``):

1. record overhead: a small CNN on synthetic images (generated data, fixed seeds,
   CPU, one torch thread) trained for several epochs, logging the loss every step
   and checkpointing model + optimizer, against the same script with every flor
   call removed. The two variants alternate (A B A B ...); the ratio of the median
   process wall times is reported (target <= 1.02). The workload is calibrated on
   this machine to about ``--workload`` seconds (default 8 s quick, 32 s full).
2. ``import flor_ray``: median over 10 fresh ``python -c`` processes (target <= 0.2 s).
3. log-heavy recording: ``flor.log("x", i)`` in a 10 x 100,000 nested ``flor.loop``
   (quick: 10 x 20,000); process wall time minus the wall time of a script that only
   imports flor_ray (target: 1M rows in <= 3 s, scaled linearly in quick mode), with
   an in-process breakdown (loop / exit flush); then ``flor_ray.dataframe("x")`` over
   those rows, in this process, median of 3 after a warm-up (target <= 0.5 s for 1M).

Prints a table and writes ``benchmarks/results/record.json`` (one entry per mode,
so a quick and a full run are both kept).
Usage: ``python benchmarks/bench_record.py [--quick] [--pairs N] [--workload S] [--profile]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "record.json"

TARGET_OVERHEAD = 1.02
TARGET_IMPORT_S = 0.2
TARGET_LOG_1M_S = 3.0
TARGET_DF_1M_S = 0.5

# ----------------------------------------------------------------------------- scripts
# One template, two renderings: {flor} fills the flor calls in, {plain} takes them out.
CNN_TEMPLATE = '''
import atexit
import os
import random
import sys
import time

T0 = time.perf_counter()
atexit.register(lambda: print(f"BENCH exit={{time.perf_counter() - T2:.6f}}", flush=True))
import numpy as np
import torch
import torch.nn as nn
{import_flor}

torch.set_num_threads(1)
torch.manual_seed(0)
random.seed(0)
np.random.seed(0)

EPOCHS = {epochs}
STEPS = {steps}
BATCH = 64
N = 2048

# synthetic 28x28 images; labels from a fixed random projection, so the loss falls
X = torch.randn(N, 1, 28, 28)
W = torch.randn(28 * 28, 10)
Y = (X.flatten(1) @ W).argmax(1)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 7 * 7, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = torch.max_pool2d(torch.relu(self.c1(x)), 2)
        x = torch.max_pool2d(torch.relu(self.c2(x)), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


net = Net()
opt = torch.optim.SGD(net.parameters(), lr={lr}, momentum=0.9)
T1 = time.perf_counter()
{with_ckpt}
    for epoch in {loop_epoch}:
        perm = torch.randperm(N)
        for step in {loop_step}:
            idx = perm[(step * BATCH) % N : (step * BATCH) % N + BATCH]
            loss = nn.functional.cross_entropy(net(X[idx]), Y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            {log_loss}
T2 = time.perf_counter()
print(f"BENCH setup={{T1 - T0:.6f}} train={{T2 - T1:.6f}} per_step={{(T2 - T1) / (EPOCHS * STEPS):.6f}} "
      f"loss={{loss.item():.6f}}", flush=True)
'''

CNN_FLOR = {
    "import_flor": "import flor_ray as flor",
    "lr": 'flor.arg("lr", 0.05)',
    "with_ckpt": "with flor.checkpointing(model=net, optimizer=opt):",
    "loop_epoch": 'flor.loop("epoch", range(EPOCHS))',
    "loop_step": 'flor.loop("step", range(STEPS))',
    "log_loss": 'flor.log("loss", loss.item())',
}
CNN_PLAIN = {
    "import_flor": "",
    "lr": "0.05",
    "with_ckpt": "if True:",
    "loop_epoch": "range(EPOCHS)",
    "loop_step": "range(STEPS)",
    "log_loss": "loss.item()",
}

# atexit handlers run last-registered first: this one, registered before flor_ray's
# (made at the first flor verb), runs after flor's exit flush, so it sees the whole run.
LOG_HEAVY = '''
import atexit
import time

T0 = time.perf_counter()
atexit.register(lambda: print(f"BENCH import={{T1 - T0:.6f}} loop={{T2 - T1:.6f}} "
                              f"exit={{time.perf_counter() - T2:.6f}}", flush=True))
import flor_ray as flor

T1 = time.perf_counter()
for e in flor.loop("outer", range({outer})):
    for i in flor.loop("inner", range({inner})):
        flor.log("x", i)
T2 = time.perf_counter()
'''

EMPTY = '''
import atexit
import time

T0 = time.perf_counter()
import flor_ray
T1 = time.perf_counter()
T2 = T1
atexit.register(lambda: print(f"BENCH import={T1 - T0:.6f} loop=0 exit={time.perf_counter() - T2:.6f}", flush=True))
'''

IMPORT_CMD = "import time;t=time.perf_counter();import flor_ray;print(time.perf_counter()-t)"


# ----------------------------------------------------------------------------- helpers
def clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOR_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def make_repo(parent: Path, name: str) -> Path:
    repo = parent / name
    repo.mkdir()
    for args in (["init", "-q"], ["config", "user.email", "bench@example.com"], ["config", "user.name", "Bench"]):
        subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)
    return repo


def run_py(repo: Path, script: str, *prefix: str) -> tuple[float, dict]:
    """Run ``python [prefix] script`` in ``repo``; (wall seconds, parsed BENCH line)."""
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, *prefix, script], cwd=repo, env=clean_env(), capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    info: dict = {}
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH "):
            for kv in line.split()[1:]:
                k, v = kv.split("=", 1)
                info[k] = float(v)
    return wall, info


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- benchmarks
def bench_overhead(tmp: Path, quick: bool, pairs: int, workload: float | None) -> dict:
    repo = make_repo(tmp, "cnn")
    epochs = 4 if quick else 8
    target_s = workload or (8.0 if quick else 32.0)

    def render(sub: dict, steps: int, ep: int = epochs) -> str:
        return textwrap.dedent(CNN_TEMPLATE).format(epochs=ep, steps=steps, **sub)

    # calibrate: time per step of the plain script on this machine
    (repo / "calib.py").write_text(render(CNN_PLAIN, 40, 1))
    _, info = run_py(repo, "calib.py")
    per_step = info["per_step"]
    steps = max(10, round(target_s / (epochs * per_step)))
    log(f"overhead: {per_step * 1e3:.2f} ms/step -> {epochs} epochs x {steps} steps (~{epochs * steps * per_step:.1f} s)")
    (repo / "calib.py").unlink()
    (repo / "train_flor.py").write_text(render(CNN_FLOR, steps))
    (repo / "train_plain.py").write_text(render(CNN_PLAIN, steps))

    walls: dict[str, list[float]] = {"plain": [], "flor": []}
    trains: dict[str, list[float]] = {"plain": [], "flor": []}
    setups: dict[str, list[float]] = {"plain": [], "flor": []}
    exits: dict[str, list[float]] = {"plain": [], "flor": []}
    losses: dict[str, set] = {"plain": set(), "flor": set()}
    for p in range(pairs):
        for variant in ("plain", "flor"):  # A B A B ...
            wall, info = run_py(repo, f"train_{variant}.py")
            walls[variant].append(wall)
            trains[variant].append(info["train"])
            setups[variant].append(info["setup"])
            exits[variant].append(info["exit"])
            losses[variant].add(round(info["loss"], 6))
            log(f"  pair {p + 1}/{pairs} {variant:5s}: wall {wall:7.2f} s, setup {info['setup']:5.2f} s, "
                f"train loop {info['train']:7.2f} s, exit {info['exit']:5.2f} s")
    # what was recorded
    import flor_ray

    df = flor_ray.dataframe("loss", store=str(repo / ".flor"))
    runs = flor_ray.runs(store=str(repo / ".flor"))
    ckpts = sorted((repo / ".flor").rglob("*.pt"))
    ratio = med(walls["flor"]) / med(walls["plain"])
    return {
        "epochs": epochs,
        "steps_per_epoch": steps,
        "ms_per_step_calibrated": per_step * 1e3,
        "pairs": pairs,
        "wall_s": walls,
        "train_loop_s": trains,
        "median_wall_plain_s": med(walls["plain"]),
        "median_wall_flor_s": med(walls["flor"]),
        "median_train_plain_s": med(trains["plain"]),
        "median_train_flor_s": med(trains["flor"]),
        "setup_s": setups,
        "exit_s": exits,
        "median_setup_plain_s": med(setups["plain"]),
        "median_setup_flor_s": med(setups["flor"]),
        "median_exit_plain_s": med(exits["plain"]),
        "median_exit_flor_s": med(exits["flor"]),
        "ratio_wall": ratio,
        "ratio_train_loop": med(trains["flor"]) / med(trains["plain"]),
        "target_ratio": TARGET_OVERHEAD,
        "same_final_loss": losses["plain"] == losses["flor"] and len(losses["plain"]) == 1,
        "loss_rows_recorded": int(len(df)),
        "loss_rows_expected": pairs * epochs * steps,
        "runs_recorded": int(len(runs)),
        "checkpoint_files": len(ckpts),
        "checkpoint_bytes_each": ckpts[0].stat().st_size if ckpts else 0,
        "pass": ratio <= TARGET_OVERHEAD,
    }


def bench_import(n: int = 10) -> dict:
    times = []
    for _ in range(n):
        out = subprocess.run(
            [sys.executable, "-c", IMPORT_CMD], env=clean_env(), capture_output=True, text=True, check=True,
            cwd=tempfile.gettempdir(),
        )
        times.append(float(out.stdout.strip().splitlines()[-1]))
    m = med(times)
    return {"runs": n, "times_s": times, "median_s": m, "target_s": TARGET_IMPORT_S, "pass": m <= TARGET_IMPORT_S}


def bench_log_heavy(tmp: Path, quick: bool, repeats: int, profile: bool) -> dict:
    outer, inner = (10, 20_000) if quick else (10, 100_000)
    rows = outer * inner
    target_s = TARGET_LOG_1M_S * rows / 1_000_000
    target_df = TARGET_DF_1M_S * rows / 1_000_000
    empty_repo = make_repo(tmp, "empty")
    (empty_repo / "empty.py").write_text(textwrap.dedent(EMPTY))

    heavy_walls, empty_walls, loops, exits = [], [], [], []
    store = None
    for r in range(repeats):
        # a fresh repository per run, so that the dataframe reads exactly one run's rows
        repo = make_repo(tmp, f"heavy{r}")
        (repo / "heavy.py").write_text(textwrap.dedent(LOG_HEAVY).format(outer=outer, inner=inner))
        w_empty, _ = run_py(empty_repo, "empty.py")
        w_heavy, info = run_py(repo, "heavy.py")
        empty_walls.append(w_empty)
        heavy_walls.append(w_heavy)
        loops.append(info["loop"])
        exits.append(info["exit"])
        store = repo / ".flor"
        log(f"  log-heavy {r + 1}/{repeats}: wall {w_heavy:.2f} s (empty {w_empty:.2f} s), "
            f"loop {info['loop']:.2f} s, exit flush {info['exit']:.2f} s")
    recording = med(heavy_walls) - med(empty_walls)

    import flor_ray

    df_times = []
    flor_ray.dataframe("x", store=str(store))  # warm-up
    for _ in range(3):
        t = time.perf_counter()
        df = flor_ray.dataframe("x", store=str(store))
        df_times.append(time.perf_counter() - t)
    n_rows = int(len(df))
    parquet = sorted(store.rglob("*.parquet"))

    result = {
        "outer": outer,
        "inner": inner,
        "rows": rows,
        "repeats": repeats,
        "wall_heavy_s": heavy_walls,
        "wall_empty_s": empty_walls,
        "median_wall_heavy_s": med(heavy_walls),
        "median_wall_empty_s": med(empty_walls),
        "recording_s": recording,
        "median_loop_s": med(loops),
        "median_exit_flush_s": med(exits),
        "us_per_log": recording / rows * 1e6,
        "target_recording_s": target_s,
        "recording_pass": recording <= target_s,
        "parquet_files": len(parquet),
        "parquet_bytes": sum(p.stat().st_size for p in parquet),
        "dataframe_rows": n_rows,
        "dataframe_rows_ok": n_rows == rows,
        "dataframe_times_s": df_times,
        "dataframe_median_s": med(df_times),
        "target_dataframe_s": target_df,
        "dataframe_pass": med(df_times) <= target_df,
    }
    if profile:
        result["profile_top"] = profile_log_heavy(tmp, outer, inner)
    return result


def profile_log_heavy(tmp: Path, outer: int, inner: int, top: int = 15) -> list[dict]:
    """cProfile the log-heavy script in a fresh process; the top functions by own time."""
    import pstats

    repo = make_repo(tmp, "profiled")
    (repo / "heavy.py").write_text(textwrap.dedent(LOG_HEAVY).format(outer=outer, inner=inner))
    prof = tmp / "heavy.prof"
    run_py(repo, "heavy.py", "-m", "cProfile", "-o", str(prof))
    st = pstats.Stats(str(prof))
    rows = []
    for (file, line, fn), (cc, nc, tt, ct, _) in st.stats.items():  # type: ignore[attr-defined]
        rows.append({"function": f"{Path(file).name}:{line}({fn})", "calls": nc, "tottime_s": tt, "cumtime_s": ct})
    rows.sort(key=lambda r: r["tottime_s"], reverse=True)
    return rows[:top]


# ----------------------------------------------------------------------------- report
def table(res: dict) -> str:
    o, i, h = res["overhead"], res["import"], res["log_heavy"]
    ok = lambda b: "ok" if b else "MISS"  # noqa: E731
    k = h["rows"] / 1000
    lines = [
        f"{'measurement':52s} {'value':>12s} {'target':>12s} {'ratio':>7s}  ",
        "-" * 92,
        f"{'record overhead: plain median wall (s)':52s} {o['median_wall_plain_s']:12.2f} {'':>12s}",
        f"{'record overhead: flor median wall (s)':52s} {o['median_wall_flor_s']:12.2f} {'':>12s}",
        f"{'record overhead: flor / plain (wall)':52s} {o['ratio_wall']:12.4f} {'<= 1.02':>12s} "
        f"{o['ratio_wall'] / TARGET_OVERHEAD:7.3f}  {ok(o['pass'])}",
        f"{'record overhead: flor / plain (train loop only)':52s} {o['ratio_train_loop']:12.4f} {'<= 1.02':>12s}",
        f"{'record overhead: setup plain / flor (s)':52s} "
        f"{format(o['median_setup_plain_s'], '.2f') + ' / ' + format(o['median_setup_flor_s'], '.2f'):>12s}",
        f"{'record overhead: exit plain / flor (s)':52s} "
        f"{format(o['median_exit_plain_s'], '.2f') + ' / ' + format(o['median_exit_flor_s'], '.2f'):>12s}",
        f"{'import flor_ray, median of 10 (s)':52s} {i['median_s']:12.4f} {'<= 0.2':>12s} "
        f"{i['median_s'] / TARGET_IMPORT_S:7.3f}  {ok(i['pass'])}",
        f"{'log-heavy: empty script wall (s)':52s} {h['median_wall_empty_s']:12.3f} {'':>12s}",
        f"{'log-heavy: ' + f'{k:.0f}k-row script wall (s)':52s} {h['median_wall_heavy_s']:12.3f} {'':>12s}",
        f"{'log-heavy: recording = difference (s)':52s} {h['recording_s']:12.3f} "
        f"{'<= ' + format(h['target_recording_s'], '.2f'):>12s} {h['recording_s'] / h['target_recording_s']:7.3f}  "
        f"{ok(h['recording_pass'])}",
        f"{'log-heavy:   of which loop / exit flush (s)':52s} "
        f"{format(h['median_loop_s'], '.2f') + ' / ' + format(h['median_exit_flush_s'], '.2f'):>12s}",
        f"{'log-heavy:   per flor.log (us)':52s} {h['us_per_log']:12.2f} {'<= 3.00':>12s}",
        f"{'dataframe(x) over ' + f'{k:.0f}k rows, median of 3 (s)':52s} {h['dataframe_median_s']:12.3f} "
        f"{'<= ' + format(h['target_dataframe_s'], '.2f'):>12s} {h['dataframe_median_s'] / h['target_dataframe_s']:7.3f}  "
        f"{ok(h['dataframe_pass'])}",
    ]
    lines.append("")
    lines.append(
        f"workload: {o['epochs']} epochs x {o['steps_per_epoch']} steps ({o['ms_per_step_calibrated']:.2f} ms/step), "
        f"{o['pairs']} A/B pairs; rows recorded {o['loss_rows_recorded']}/{o['loss_rows_expected']}, "
        f"{o['checkpoint_files']} checkpoint files; same final loss: {o['same_final_loss']}"
    )
    lines.append(f"log-heavy: {h['parquet_files']} parquet files, {h['parquet_bytes'] / 1e6:.2f} MB; "
                 f"dataframe rows {h['dataframe_rows']} (expected {h['rows']})")
    if "profile_top" in h:
        lines.append("\nlog-heavy profile, top functions by own time:")
        for r in h["profile_top"]:
            lines.append(f"  {r['tottime_s']:8.3f} s own {r['cumtime_s']:8.3f} s cum {r['calls']:>9d}  {r['function']}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="~8 s workload, 200k log rows (under ~2 minutes)")
    ap.add_argument("--pairs", type=int, default=3, help="A/B pairs for the overhead measurement")
    ap.add_argument("--workload", type=float, default=None, help="seconds of training per run (8 quick, 32 full)")
    ap.add_argument("--repeats", type=int, default=None, help="log-heavy repeats (3 quick, 3 full)")
    ap.add_argument("--profile", action="store_true", help="also cProfile the log-heavy script")
    ap.add_argument("--skip-overhead", action="store_true", help="skip the training measurement")
    ap.add_argument("--no-save", action="store_true", help="do not write benchmarks/results/record.json")
    a = ap.parse_args()
    mode = "quick" if a.quick else "full"
    t_all = time.perf_counter()
    res: dict = {"mode": mode, "python": platform.python_version(), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="flor_bench_record_") as d:
        tmp = Path(d)
        log("import time ...")
        res["import"] = bench_import()
        log("log-heavy ...")
        res["log_heavy"] = bench_log_heavy(tmp, a.quick, a.repeats or 3, a.profile)
        if a.skip_overhead:
            res["overhead"] = None
        else:
            log("record overhead ...")
            res["overhead"] = bench_overhead(tmp, a.quick, a.pairs, a.workload)
    res["total_s"] = time.perf_counter() - t_all
    res["date"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    if res["overhead"] is not None:
        print(table(res))
    else:
        print(json.dumps(res["log_heavy"], indent=1))
    print(f"\n({mode} mode, {res['total_s']:.0f} s)")
    if not a.no_save:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        try:
            saved = json.loads(RESULTS.read_text())
        except (OSError, ValueError):
            saved = {}
        saved[mode] = res
        RESULTS.write_text(json.dumps(saved, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

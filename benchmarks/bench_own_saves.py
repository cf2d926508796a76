"""What ``flor.checkpointing(from_saves=True)`` saves: one script recorded with flor's own
checkpoints and with the script's own ``torch.save`` taken as them, side by side.

The script (a fresh ``python train.py`` in a temporary git repository) trains an MLP
of ``--width`` (default 1024: 3.2 M parameters, a 38 MB checkpoint with Adam's
state) for ``--epochs`` epochs of ``--steps`` steps and ``torch.save``s
``{'epoch', 'model', 'optimizer', 'scheduler'}`` every epoch, as scripts in the field
do. Both variants checkpoint every epoch (``FLOR_CHECKPOINT_MAX_PERIOD=1``), and
they alternate in ``--rounds`` rounds. Reported per variant: the median process wall
and CPU (user + sys), and flor's own accounting from the run's metadata: the time
its checkpoints cost the training thread (``checkpoint_s``) and the background
writer's CPU for them (``checkpoint_write_cpu_s``), summed over the run; then the
ratios from_saves / own. Writes ``benchmarks/results/own_saves.json``.
Usage: ``python benchmarks/bench_own_saves.py [--rounds N] [--width W] [--epochs E] [--steps S]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from _common import RESULTS_DIR, clean_env, log, med

SCRIPT = textwrap.dedent('''
    import argparse
    import torch
    import torch.nn as nn
    import flor_ray as flor

    p = argparse.ArgumentParser()
    p.add_argument("--from-saves", type=int, default=1)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    torch.manual_seed(0)
    w = args.width
    net = nn.Sequential(nn.Linear(w, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU(), nn.Linear(w, 1))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
    X, Y = torch.randn(64, w), torch.randn(64, 1)
    with flor.checkpointing(from_saves=bool(args.from_saves), net=net, opt=opt, sched=sched):
        for epoch in flor.loop("epoch", range(args.epochs)):
            for step in flor.loop("step", range(args.steps)):
                loss = nn.functional.mse_loss(net(X), Y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                flor.log("loss", loss.item())
            sched.step()
            torch.save({"epoch": epoch, "model": net.state_dict(), "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict()}, "ckpt.pt")
''')


def _run(repo: Path, from_saves: int, a) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "train.py", "--from-saves", str(from_saves), "--width", str(a.width),
                    "--epochs", str(a.epochs), "--steps", str(a.steps)], cwd=repo, check=True,
                   env=clean_env(FLOR_CHECKPOINT_MAX_PERIOD="1"), capture_output=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    meta = max((json.loads(p.read_text()) for p in (repo / ".flor" / "runs").glob("*.json")),
               key=lambda m: m["started_at"])
    t = meta["timings"]
    assert len(meta["checkpoints"]) == a.epochs
    assert all(bool(c.get("from_save")) == bool(from_saves) for c in meta["checkpoints"])
    return {"wall_s": wall, "cpu_s": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
            "checkpoint_s": sum(t["checkpoint_s"]), "checkpoint_write_cpu_s": sum(t["checkpoint_write_cpu_s"]),
            "train_loop_s": sum(t["outer_s"])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    a = ap.parse_args()
    res: dict[str, list[dict]] = {"own": [], "from_saves": []}
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp)
        (repo / "train.py").write_text(SCRIPT)
        (repo / ".gitignore").write_text("ckpt.pt\n.flor/\n")
        for cmd in (["init", "-q"], ["add", "-A"], ["-c", "user.email=b@b", "-c", "user.name=b", "commit", "-qm", "x"]):
            subprocess.run(["git", *cmd], cwd=repo, check=True)
        for r in range(a.rounds):
            order = ("own", "from_saves") if r % 2 == 0 else ("from_saves", "own")
            for v in order:
                res[v].append(_run(repo, int(v == "from_saves"), a))
                log(f"round {r} {v}: {res[v][-1]}")
    keys = ("wall_s", "cpu_s", "checkpoint_s", "checkpoint_write_cpu_s", "train_loop_s")
    summary = {v: {k: med([x[k] for x in xs]) for k in keys} for v, xs in res.items()}
    ratio = {k: summary["from_saves"][k] / summary["own"][k] if summary["own"][k] else None for k in keys}
    print(f"{'median':24s} {'own':>10s} {'from_saves':>11s} {'ratio':>7s}")
    for k in keys:
        print(f"{k:24s} {summary['own'][k]:10.3f} {summary['from_saves'][k]:11.3f} {ratio[k] or float('nan'):7.3f}")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "own_saves.json").write_text(json.dumps(
        {"args": vars(a), "runs": res, "median": summary, "ratio": ratio}, indent=1))


if __name__ == "__main__":
    main()

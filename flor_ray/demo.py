"""``flor-ray demo``: the whole idea on a small real history, in about a minute.

It makes a git repository with a small torch training script, records runs of three
versions that differ the way real histories do (a renamed variable, the train step
moved into a function, a learning-rate scheduler added), adds new log statements to
today's version, shows the replay plan, back-fills the values on a local Ray and
prints recorded and hindsight columns side by side. The directory stays behind so
the user can try the CLI on it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["run_demo", "V1", "V2", "V3", "with_statements", "plain"]

HEAD = '''
import random

import torch
import torch.nn as nn

import flor_ray as flor

torch.manual_seed(0)
random.seed(0)
lr = flor.arg("lr", 0.05)
epochs = flor.arg("epochs", 4)
X = torch.randn(96, 8)
Y = (X[:, 0] - X[:, 2] > 0).long()
'''

# v1: `net`, train step inline
V1 = HEAD + '''
net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 2))
opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)

with flor.checkpointing(net=net, opt=opt):
    for epoch in flor.loop("epoch", range(epochs)):
        net.train()
        perm = torch.randperm(96)
        for step in flor.loop("step", range(6)):
            idx = perm[step * 16 : step * 16 + 16]
            loss = nn.functional.cross_entropy(net(X[idx]), Y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            #GNORM_NET
            flor.log("loss", loss.item())
        net.eval()
        with torch.no_grad():
            acc = (net(X).argmax(1) == Y).float().mean().item()
        flor.log("acc", acc)
        #WNORM_NET
'''

# v2: renamed to `model`; the train step extracted into a function
V2 = HEAD + '''
model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 2))
opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)


def train_step(idx):
    loss = nn.functional.cross_entropy(model(X[idx]), Y[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
    #GNORM_MODEL
    return loss


with flor.checkpointing(model=model, opt=opt):
    for epoch in flor.loop("epoch", range(epochs)):
        model.train()
        perm = torch.randperm(96)
        for step in flor.loop("step", range(6)):
            loss = train_step(perm[step * 16 : step * 16 + 16])
            flor.log("loss", loss.item())
        model.eval()
        with torch.no_grad():
            acc = (model(X).argmax(1) == Y).float().mean().item()
        flor.log("acc", acc)
        #WNORM_MODEL
'''

# v3 = today's shape: a learning-rate scheduler added
V3 = V2.replace(
    "opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)\n",
    "opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)\n"
    "scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)\n",
).replace("with flor.checkpointing(model=model, opt=opt):", "with flor.checkpointing(model=model, opt=opt, scheduler=scheduler):").replace(
    '        flor.log("acc", acc)\n        #WNORM_MODEL\n',
    '        flor.log("acc", acc)\n        scheduler.step()\n        #WNORM_MODEL\n',
)

GNORM = 'flor.log("gnorm", sum(p.grad.norm() ** 2 for p in {m}.parameters()).item())'
WNORM = 'flor.log("wnorm", {m}[0].weight.norm().item())'


def with_statements(src: str) -> str:
    """The version with both statements typed in by hand."""
    for m in ("net", "model"):
        src = src.replace(f"#GNORM_{m.upper()}", GNORM.format(m=m)).replace(f"#WNORM_{m.upper()}", WNORM.format(m=m))
    return src


def plain(src: str) -> str:
    return "\n".join(ln for ln in src.splitlines() if not ln.strip().startswith("#")) + "\n"


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=flor-ray demo", "-c", "user.email=demo@localhost", *args],
                   cwd=repo, check=True, capture_output=True)


def _say(msg: str) -> None:
    print(f"\n== {msg}", flush=True)


def run_demo(directory: str | os.PathLike = "flor-ray-demo") -> Path:
    from .errors import FlorError

    t0 = time.time()
    repo = Path(directory).resolve()
    if repo.exists() and any(repo.iterdir()):
        raise FlorError(f"demo directory {str(repo)!r} exists and is not empty; pass a new directory")
    repo.mkdir(parents=True, exist_ok=True)
    _git(repo, "init", "-q", "-b", "main")
    (repo / ".gitignore").write_text("__pycache__/\n*.png\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOR_")}
    history = [("v1: first version", V1, "0.05"), ("v2: net renamed model, train step extracted", V2, "0.1"),
               ("v3: learning-rate scheduler added", V3, "0.1")]
    for title, src, lr in history:
        (repo / "train.py").write_text(plain(src))
        _git(repo, "add", "train.py", ".gitignore")
        _git(repo, "commit", "-qm", title)
        _say(f"record {title} (lr={lr})")
        subprocess.run([sys.executable, "train.py", "--kwargs", f"lr={lr}"], cwd=repo, env=env, check=True)

    import flor_ray

    store = str(repo / ".flor")
    _say("runs")
    print(flor_ray.runs(store=store)[["run_id", "version", "status", "lr", "iterations"]].to_string(index=False))

    today = with_statements(V3)
    (repo / "train.py").write_text(today)
    _say("today's train.py adds two statements nobody logged before:")
    for line in today.splitlines():
        if "wnorm" in line or "gnorm" in line:
            print("   ", line.strip())

    _say("plan for the epoch-level weight norm (skips training where checkpoints allow)")
    os.chdir(repo)
    plan = flor_ray.plan_replay(["wnorm"], store=store, script=repo / "train.py")
    print(plan.explain())
    report = plan.run()
    print(report)

    _say("recorded acc and hindsight wnorm, side by side")
    df = flor_ray.dataframe("acc", "wnorm", store=store)
    print(df[["run_id", "lr", "epoch", "acc", "wnorm"]].to_string(index=False))

    png = repo / "wnorm.png"
    from .plot import plot_metric

    plot_metric(df, "wnorm", png)
    _say(f"plot of wnorm per run: {png}")
    print(f"\ndone in {time.time() - t0:.0f}s. Try, in {repo}:\n"
          "  flor-ray runs\n  flor-ray df acc wnorm\n  flor-ray replay gnorm --dry-run\n"
          "  flor-ray sql \"SELECT name, count(*) FROM logs GROUP BY name\"")
    return repo

"""The script's own checkpoint files: recording from its torch.save, replays that
leave the user's files alone and never resume from the user's latest checkpoint.

The script is shaped like the field's: argparse, a DataLoader, an LR scheduler
stepped before the save, ``torch.save({'epoch', 'model', 'optimizer', 'scheduler'},
ckpt)`` every epoch, a metrics file appended to, and a resume at start when the
checkpoint file exists. Each history is recorded once in a real git repository; the
oracle is a full re-execution with the new statements typed in by hand.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
import torch

import flor_ray
from flor_ray.execution.driver import LocalRunner, run_plan
from flor_ray.store import Store
from flor_ray.store.checkpoints import load_snapshot
from flor_ray.store.logs import read_logs

from conftest import clean_env, git, init_repo, start_script, write

SCRIPT = '''
import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import flor_ray as flor

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=4)
parser.add_argument("--out", default="out")
parser.add_argument("--from-saves", type=int, default=1)
parser.add_argument("--save-optimizer", type=int, default=1)
parser.add_argument("--shift", default="")  # a data file kept out of git
args = parser.parse_args()
os.makedirs(args.out, exist_ok=True)
ckpt = os.path.join(args.out, "ckpt.pt")
torch.manual_seed(0)
X = torch.randn(192, 24)
Y = X @ torch.randn(24, 1) + 0.1 * torch.randn(192, 1)
if args.shift:
    X = X + float(Path(args.shift).read_text())
net = nn.Sequential(nn.Linear(24, 48), nn.ReLU(), nn.Dropout(0.1), nn.Linear(48, 1))
opt = torch.optim.Adam(net.parameters(), lr=0.01)
sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
loader = DataLoader(TensorDataset(X, Y), batch_size=32, shuffle=True)
start_epoch = 0
if os.path.exists(ckpt):
    state = torch.load(ckpt)
    net.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    start_epoch = state["epoch"] + 1


def evaluate(model):
    model.eval()
    with torch.no_grad():
        return nn.functional.mse_loss(model(X), Y).item()


with flor.checkpointing(from_saves=bool(args.from_saves), net=net, opt=opt, sched=sched):
    for epoch in flor.loop("epoch", range(start_epoch, args.epochs)):
        net.train()
        for x, y in flor.loop("step", loader):
            loss = nn.functional.mse_loss(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            #INNER
        val = evaluate(net)
        flor.log("val", val)
        sched.step()
        #OUTER
        state = {"epoch": epoch, "model": net.state_dict(), "scheduler": sched.state_dict()}
        if args.save_optimizer:
            state["optimizer"] = opt.state_dict()
        torch.save(state, ckpt)
        with open(os.path.join(args.out, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({"epoch": epoch, "val": val}) + "\\n")
        Path(args.out, "last.txt").write_text(str(epoch))
        np.save(os.path.join(args.out, "val.npy"), np.array([val]))
'''
INNER = 'flor.log("wsum", float(net[0].weight.sum()))'
OUTER = 'flor.log("lr_now", opt.param_groups[0]["lr"])\n        flor.log("wnorm", net[0].weight.norm().item())'
PROPOSAL = "would take those saves as flor's checkpoints"


def _script(typed: bool) -> str:
    inner, outer = (INNER, OUTER) if typed else ("", "")
    return SCRIPT.replace("#INNER", inner).replace("#OUTER", outer)


def _repo(base: Path, name: str, typed: bool) -> Path:
    (base / name).mkdir()
    repo = init_repo(base / name)
    write(repo, "train.py", _script(typed))
    write(repo, ".gitignore", "out/\n.flor/\ndata/\n")
    write(repo, "data/shift.txt", "0.25")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "train")
    return repo


def _start(repo: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    return start_script(repo, "train.py", *args, env=env)


def _wait(*procs: subprocess.Popen) -> list[str]:
    errs = []
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        errs.append(err)
    return errs


@pytest.fixture(scope="module")
def hist(tmp_path_factory):
    """proj: from_saves, its files under an absolute path in the repository; hand: the
    oracle (the statements typed, flor's own checkpoint every epoch); outside: files
    outside the repository, a run of 2 epochs, then one that resumed from it."""
    base = tmp_path_factory.mktemp("own_saves")
    proj, hand, outside = _repo(base, "proj", False), _repo(base, "hand", True), _repo(base, "outside", False)
    ext = base / "elsewhere"
    every = clean_env(FLOR_CHECKPOINT_MAX_PERIOD="1")
    errs = _wait(_start(proj, "--out", str(proj / "out"), "--shift", str(proj / "data" / "shift.txt")),
                 _start(hand, "--out", str(hand / "out"), "--shift", str(hand / "data" / "shift.txt"),
                        "--from-saves", "0", env=every),
                 _start(outside, "--out", str(ext), "--epochs", "2", "--shift", str(outside / "data" / "shift.txt")))
    partial = _repo(base, "partial", False)
    # the second outside run finds the first's ckpt.pt: epochs 2 and 3; partial saves no optimizer state
    errs += _wait(_start(outside, "--out", str(ext), "--shift", str(outside / "data" / "shift.txt")),
                  _start(partial, "--save-optimizer", "0"))
    for repo in (proj, outside):
        write(repo, "train.py", _script(True))  # today's script, not committed
    return {"proj": proj, "hand": hand, "outside": outside, "ext": ext, "partial": partial, "stderr": errs}


def _meta(repo: Path) -> list[dict]:
    return sorted((json.loads(p.read_text()) for p in (repo / ".flor" / "runs").glob("*.json")),
                  key=lambda m: m["started_at"])


def _values(store: Store, name: str, source: str) -> list:
    t = read_logs(store, [name], sources=(source,)).to_pandas()
    inner = t["iter1"].fillna(-1) if "iter1" in t else [-1] * len(t)
    return sorted(zip(t["iter0"], inner, t["value_float"]))


def _tree(repo: Path) -> dict[str, str]:
    """Every file of the working tree (the store aside) -> its sha256."""
    return {str(p.relative_to(repo)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(repo.rglob("*")) if p.is_file() and ".flor" not in p.parts and ".git" not in p.parts}


@pytest.fixture(scope="module")
def runner():
    with LocalRunner() as r:  # one zygote for the module's replays
        yield r


def _replay(runner, repo: Path, names: list[str], iterations="all"):
    plan = flor_ray.plan_replay(names, store=Store(str(repo / ".flor")), script=repo / "train.py",
                                iterations=iterations)
    return plan, run_plan(plan, runner=runner, progress=False)


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def test_from_saves_takes_the_scripts_saves_as_checkpoints_equal_to_flors_own(hist):
    (rec,), (own,) = _meta(hist["proj"]), _meta(hist["hand"])
    assert [c["iteration"] for c in rec["checkpoints"]] == [0, 1, 2, 3]
    assert all(c["from_save"].endswith("out/ckpt.pt") and c["verified"] for c in rec["checkpoints"])
    assert all("from_save" not in c for c in own["checkpoints"])
    store, hand_store = Store(str(hist["proj"] / ".flor")), Store(str(hist["hand"] / ".flor"))
    by_iter = {c["iteration"]: c for c in own["checkpoints"]}
    for entry in rec["checkpoints"]:
        mine, flors = load_snapshot(store, entry), load_snapshot(hand_store, by_iter[entry["iteration"]])
        # the state at the training loop's exit, scheduler not yet stepped, bit for bit
        assert _equal(mine["objects"], flors["objects"]), entry["iteration"]
        assert mine["objects"]["sched"]["last_epoch"] == entry["iteration"]
        assert torch.equal(mine["rng"]["torch"], flors["rng"]["torch"])
        assert mine["inner_exits"] == flors["inner_exits"] == 1


def test_the_proposal_is_made_once_without_from_saves(hist):
    proj_err, hand_err = hist["stderr"][:2]
    assert hand_err.count(PROPOSAL) == 1, hand_err
    assert "from_saves=True, net=net, opt=opt, sched=sched" in hand_err
    assert PROPOSAL not in proj_err and "from_saves=True): iteration" not in proj_err


def test_backfill_from_the_scripts_saves_equals_the_oracle_and_leaves_the_tree_as_it_was(hist, runner):
    proj = hist["proj"]
    before, status = _tree(proj), git(proj, "status", "--porcelain", "--ignored")
    assert (proj / "out" / "ckpt.pt").exists()  # the user's latest: a resume would start at epoch 4
    store, hand = Store(str(proj / ".flor")), Store(str(hist["hand"] / ".flor"))
    # outer-level values: each iteration's checkpoint restored, its scheduler.step() run again
    plan, report = _replay(runner, proj, ["lr_now", "wnorm"])
    assert not report.failed, str(report)
    assert any(f"{proj / 'out' / 'ckpt.pt'} read as absent, as when the run started" in n
               for n in report.fallbacks), str(report)
    assert all(t.mode == "skip" for t in plan.tasks) and plan.tasks, plan.explain()
    # an inner-loop value: re-executed from the checkpoint of epoch 1
    plan2, report2 = _replay(runner, proj, ["wsum"], iterations="2:")
    assert not report2.failed, str(report2)
    assert [t.restore.iteration for t in plan2.tasks] == [1], plan2.explain()
    for name in ("lr_now", "wnorm", "wsum"):
        got, want = _values(store, name, "replay"), _values(hand, name, "record")
        want = [v for v in want if name != "wsum" or v[0] >= 2]
        assert got == want and want, name
    assert report2.fidelity.compared > 0 and report.fidelity.mismatched == report2.fidelity.mismatched == 0
    # torch.save, open(..., "a"), Path.write_text and np.save to absolute paths in the repository
    assert _tree(proj) == before
    assert git(proj, "status", "--porcelain", "--ignored") == status


def test_outside_the_repository_a_checkpoint_absent_at_the_runs_start_reads_as_absent(hist, runner):
    """The first run started without elsewhere/ckpt.pt; the second resumed from it and
    overwrote it: the first replays from its start, the second is refused."""
    outside, ext = hist["outside"], hist["ext"]
    first, second = _meta(outside)
    assert first["iterations"] == 2 and second["iterations"] == 2  # epochs 2, 3 after the resume
    saved = str(ext / "ckpt.pt")
    assert first["own_files"]["saved"][saved] == {"existed": False}
    assert second["own_files"]["saved"][saved]["existed"] is True
    latest = (ext / "ckpt.pt").read_bytes()
    plan, report = _replay(runner, outside, ["wnorm"])
    assert {r.run_id for r in report.failed} == {second["run_id"]}, str(report)
    (why,) = {r.error for r in report.failed}
    assert f"found {saved} when it started" in why and "has changed since the run started" in why, why
    got = [v for v in _values(Store(str(outside / ".flor")), "wnorm", "replay")]
    assert got == [v for v in _values(Store(str(hist["hand"] / ".flor")), "wnorm", "record") if v[0] <= 1]
    assert (ext / "ckpt.pt").read_bytes() == latest  # torch.save outside the repository: not written either


def test_a_save_that_lacks_state_falls_back_to_flors_own_checkpoints_said_once(hist):
    (meta,) = _meta(hist["partial"])
    err = hist["stderr"][4]
    assert err.count("flor.checkpointing(from_saves=True): iteration 0 has no checkpoint "
                     "(its save lacks some of the checkpointed state)") == 1, err
    assert err.count("from_saves=True)") == 1
    entries = meta["checkpoints"]
    assert entries and 0 not in [c["iteration"] for c in entries] and 3 in [c["iteration"] for c in entries]
    assert all("from_save" not in c for c in entries)

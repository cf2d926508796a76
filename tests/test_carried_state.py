"""Loop-carried training state and training at the outer level, replayed on a local Ray.

Each script is recorded once without the new statement, and once more with the
statement typed in by hand (the oracle: a full re-execution). A replay restores
mid-run checkpoints, so it is exact only if the checkpoints carry what the training
code carries from one iteration to the next: an annealed ``lr`` and
``best_val_loss``, a sampler's ``torch.Generator`` and an endless loader's position.
"""

from __future__ import annotations

import sys

import pytest

import flor_ray
from flor_ray.execution.driver import run_plan
from flor_ray.planning.plan import ClusterSnapshot
from flor_ray.store.logs import read_logs
from flor_ray.store import Store

from conftest import clean_env, git, start_script, write

HEAD = '''
import argparse

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import flor_ray as flor

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=6)
args = parser.parse_args()
torch.manual_seed(0)
X = torch.randn(128, 6)
Y = X @ torch.randn(6, 1) + 0.3 * torch.randn(128, 1)
Xv, Yv = X[96:], Y[96:]
net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))


def evaluate(model):
    with torch.no_grad():
        return nn.functional.mse_loss(model(Xv), Yv).item()
'''

# (a) lr annealed with `lr /= 4` when validation stops improving, best_val_loss
ANNEAL = HEAD + '''
train = DataLoader(TensorDataset(X[:96], Y[:96]), batch_size=16, shuffle=True)
opt = torch.optim.SGD(net.parameters(), lr=0.3, momentum=0.9)
lr = flor.arg("lr", 0.3)
best_val_loss = float("inf")
with flor.checkpointing(net=net, opt=opt):
    for epoch in flor.loop("epoch", range(args.epochs)):
        for g in opt.param_groups:
            g["lr"] = lr
        for x, y in flor.loop("step", train):
            loss = nn.functional.mse_loss(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            #NEW
        val_loss = evaluate(net)
        if val_loss < best_val_loss:
            best_val_loss = val_loss
        else:
            lr /= 4
        flor.log("val_loss", val_loss)
        flor.log("lr", lr)
'''
ANNEAL_NEW = 'flor.log("gnorm", sum(p.grad.norm() ** 2 for p in net.parameters()).item())'

# (b) a step loop drawing from an endless loader whose sampler has its own generator
STEPS = HEAD + '''
class BatchLoader:
    """Batches without end: a new pass over the loader when one runs out."""

    def __init__(self, loader):
        self.loader = loader
        self.it = iter(loader)
        self.passes = 0

    def next(self):
        try:
            return next(self.it)
        except StopIteration:
            self.passes += 1
            self.it = iter(self.loader)
            return next(self.it)


g = torch.Generator()
g.manual_seed(7)
batch_loader = BatchLoader(DataLoader(TensorDataset(X[:96], Y[:96]), batch_size=16, shuffle=True, generator=g))
opt = torch.optim.SGD(net.parameters(), lr=0.05)


def train_step(x, y):
    opt.zero_grad()
    loss = nn.functional.mse_loss(net(x), y)
    loss.backward()
    opt.step()
    return loss.item()


with flor.checkpointing(net=net, opt=opt):
    for step in flor.loop("step", range(args.epochs)):
        x, y = batch_loader.next()
        loss = train_step(x, y)
        flor.log("loss", loss)
        if (step + 1) % 4 == 0:
            flor.log("val_loss", evaluate(net))
            #NEW
'''
STEPS_NEW = 'flor.log("wnorm", net[0].weight.norm().item())'

# (c) one LBFGS step per epoch, no inner loop
LBFGS = HEAD + '''
model = nn.Linear(6, 1)
optimizer = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=3, history_size=4)


def closure():
    optimizer.zero_grad()
    loss = nn.functional.mse_loss(model(X), Y)
    loss.backward()
    return loss


with flor.checkpointing(model=model, optimizer=optimizer):
    for epoch in flor.loop("epoch", range(args.epochs)):
        loss = optimizer.step(closure)
        flor.log("loss", loss.item())
        #NEW
'''
LBFGS_NEW = 'flor.log("wnorm", model.weight.norm().item())'

# (d) an lr schedule read from an open file, one line per epoch
SCHEDULE = HEAD + '''
import os

train = DataLoader(TensorDataset(X[:96], Y[:96]), batch_size=32, shuffle=True)
opt = torch.optim.SGD(net.parameters(), lr=0.1)
schedule = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "schedule.txt"))
with flor.checkpointing(net=net, opt=opt):
    for epoch in flor.loop("epoch", range(args.epochs)):
        lr = float(schedule.readline())
        for g in opt.param_groups:
            g["lr"] = lr
        for x, y in flor.loop("step", train):
            loss = nn.functional.mse_loss(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            #NEW
        flor.log("val_loss", evaluate(net))
'''
SCHEDULE_NEW = 'flor.log("step_loss", loss.item())'

CASES = {
    "anneal": (ANNEAL, ANNEAL_NEW, 6, " " * 12),
    "steps": (STEPS, STEPS_NEW, 30, " " * 12),
    "lbfgs": (LBFGS, LBFGS_NEW, 6, " " * 8),
    "schedule": (SCHEDULE, SCHEDULE_NEW, 5, " " * 12),
}


def _fill(case: str, typed: bool) -> str:
    src, new, _, indent = CASES[case]
    return src.replace(f"{indent}#NEW", indent + new if typed else "")


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, ray_local):
    """Per case: the recorded run (a checkpoint every iteration), today's script with
    the statement, and the hand-typed full re-execution's store."""
    out = {}
    base = tmp_path_factory.mktemp("carried")
    for case, (_, _, epochs, _) in CASES.items():
        repo, hand = base / case / "proj", base / case / "hand"
        for d, typed in ((repo, False), (hand, True)):
            d.mkdir(parents=True)
            git(d, "init", "-q")
            write(d, "schedule.txt", "".join(f"{0.2 / (k + 1):.4f}\n" for k in range(epochs)))
            write(d, "train.py", _fill(case, typed))
        procs = [_start(repo, epochs, clean_env(FLOR_CHECKPOINT_MAX_PERIOD="1")), _start(hand, epochs, clean_env())]
        for p in procs:  # the two at once: each snapshots its code at its first flor call
            _, err = p.communicate(timeout=300)
            assert p.returncode == 0, err
        write(repo, "train.py", _fill(case, True))  # today's script
        out[case] = (repo, Store(str(repo / ".flor")), Store(str(hand / ".flor")))
    return out


def _start(repo, epochs, env):
    return start_script(repo, "train.py", "--epochs", str(epochs), env=env)


def _values(store, name, source, first=0):
    t = read_logs(store, [name], sources=(source,)).to_pandas()
    t = t[t["iter0"] >= first]
    inner = t["iter1"].fillna(-1) if "iter1" in t else [-1] * len(t)
    return sorted(zip(t["iter0"], inner, t["value_float"]))


def _replay(recorded, case, name, iterations):
    repo, store, hand = recorded[case]
    plan = flor_ray.plan_replay([name], store=store, script=repo / "train.py", iterations=iterations,
                                cluster=ClusterSnapshot(2))
    report = run_plan(plan, progress=False)
    assert not report.failed, str(report)
    return plan, report, store, hand


def test_annealed_lr_and_best_val_loss_are_restored_mid_run(recorded):
    plan, report, store, hand = _replay(recorded, "anneal", "gnorm", "3:")
    text = plan.explain()
    assert "Need[gnorm -> inner:" in text
    assert all(t.mode == "reexec" and t.restore is not None and t.restore.iteration == 2 for t in plan.tasks), text
    assert {"best_val_loss", "lr"} <= set(plan.tasks[0].carried)
    lrs = [v for _, _, v in _values(hand, "lr", "record")]
    assert lrs[2] < 0.3  # annealed before the restored checkpoint: a restart from lr=0.3 would differ
    assert _values(store, "gnorm", "replay") == _values(hand, "gnorm", "record", first=3)
    assert report.fidelity.compared > 0 and report.fidelity.mismatched == 0


def test_step_loop_restores_the_samplers_generator_and_the_loaders_position(recorded):
    plan, report, store, hand = _replay(recorded, "steps", "wnorm", "17:")
    text = plan.explain()
    assert "Need[wnorm -> inner:" in text and "in an iteration without inner loops" in text
    assert all(t.restore is not None and t.restore.iteration >= 16 for t in plan.tasks), text
    assert "batch_loader" in plan.tasks[0].carried
    replayed = _values(store, "wnorm", "replay")
    assert len(replayed) == 3  # steps 19, 23, 27 (the eval every 4 steps)
    assert replayed == _values(hand, "wnorm", "record", first=17)
    # every step's loss was recomputed from the restored batches and compared
    assert report.fidelity.compared >= 13 and report.fidelity.mismatched == 0


def test_lbfgs_closure_at_the_outer_level_reexecutes_from_the_checkpoint_before(recorded):
    plan, report, store, hand = _replay(recorded, "lbfgs", "wnorm", "2:")
    text = plan.explain()
    assert "Need[wnorm -> inner:" in text and "in an iteration without inner loops" in text, text
    assert all(t.mode == "reexec" and t.restore is not None for t in plan.tasks), text
    assert _values(store, "wnorm", "replay") == _values(hand, "wnorm", "record", first=2)
    assert report.fidelity.compared > 0 and report.fidelity.mismatched == 0


def test_a_carried_open_file_forces_a_replay_from_iteration_zero(recorded):
    plan, report, store, hand = _replay(recorded, "schedule", "step_loss", "3:")
    text = plan.explain()
    (task,) = plan.tasks
    assert task.restore is None and task.start == 3
    assert "loop-carried schedule (an open file (TextIOWrapper)) is in no checkpoint: replays from iteration 0" in text
    assert _values(store, "step_loss", "replay") == _values(hand, "step_loss", "record", first=3)
    assert report.fidelity.mismatched == 0


# ------------------------------------------------------------ the parts, without Ray
def test_function_locals_cells_and_scalars_round_trip_through_a_checkpoint(tmp_path):
    import sys as _sys

    import numpy as np
    import torch

    from flor_ray.record.carried import capture_scope, restore_scope
    from flor_ray.record.checkpoint import FORMAT, deserialize, serialize

    def train():
        lr, step, ema = 0.1, np.int64(3), torch.tensor(0.5, dtype=torch.float64)
        hist, cfg = [1.0, (2, "a"), None], {"k": np.float32(0.25), 3: True}
        rng = torch.Generator().manual_seed(5)
        fh = open(tmp_path / "f.txt", "w")
        batches = (i for i in range(3))
        get_lr = lambda: lr  # noqa: E731 - lr is a cell of this frame
        frame = _sys._getframe()
        scope = deserialize(serialize({"format": FORMAT, "scope": capture_scope(frame, ())}), "mem")["scope"]
        expected_draw = torch.rand(2, generator=rng)
        lr, step, ema, hist, cfg = 9.0, 0, torch.tensor(0.0), [], {}
        restore_scope(frame, scope, ["lr", "step", "ema", "hist", "cfg"])
        fh.close()
        return lr, step, ema, hist, cfg, get_lr(), torch.rand(2, generator=rng), expected_draw, scope, batches

    lr, step, ema, hist, cfg, cell, draw, expected, scope, _ = train()
    assert (lr, cell, hist) == (0.1, 0.1, [1.0, (2, "a"), None])
    assert type(step) is np.int64 and step == 3
    assert ema.dtype == torch.float64 and ema.item() == 0.5
    assert cfg == {"k": 0.25, 3: True} and type(cfg["k"]) is np.float32
    assert torch.equal(draw, expected)  # the generator's state was set back
    assert scope["missing"]["fh"] == "an open file (TextIOWrapper)"
    assert scope["missing"]["batches"].startswith("a generator")
    assert {"lr", "step", "ema", "hist", "cfg", "rng"} <= set(scope["captured"])


def test_analysis_names_what_the_training_code_carries():
    from flor_ray.analysis import analyze

    anneal = analyze(_fill("anneal", True))
    assert {"lr", "best_val_loss"} <= set(anneal.training_carried)
    assert anneal.need("gnorm").kind == "inner" and anneal.need("val_loss").kind == "outer"
    steps = analyze(_fill("steps", True))
    assert "batch_loader" in steps.training_carried
    assert steps.need("wnorm").kind == "inner" and steps.need("loss").kind == "inner"
    assert analyze(_fill("schedule", True)).training_carried == ("schedule",)
    lbfgs = analyze(_fill("lbfgs", True))
    assert lbfgs.need("wnorm").kind == "inner" and "optimizer.step(closure)" in lbfgs.need("loss").reason

"""Only the requested names, and damaged checkpoints routed around (issue 13, parts 4 and 6).

A three-version history of a small training script (argparse, a shuffling
DataLoader, an annealed learning rate, the train step in a closure from v2 on)
where only v3 computes ``epoch_loss``. Today's script logs ``train_loss`` from it,
plus ``grad_norm`` (in the step loop) and ``weight_norm`` (at the epoch level).
The oracle for every replayed value is a full re-execution of each version with
the statements it can hold typed in by hand, compared bit for bit.
"""

from __future__ import annotations

import shutil

import pytest

import flor_ray
from flor_ray.execution.driver import run_plan
from flor_ray.execution.spec import TaskSpec
from flor_ray.planning.plan import (
    CheckpointRef,
    ClusterSnapshot,
    DamagedCheckpoint,
    Refused,
    RunInfo,
    VersionPatch,
)
from flor_ray.planning.make import make_plan
from flor_ray.propagation import PropagationError, propagate_detailed
from flor_ray.store.logs import read_logs
from flor_ray.store import Store

from conftest import clean_env, git, start_script, write

HEAD = '''
import argparse
import random

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import flor_ray as flor


def make_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 8, generator=g)
    return TensorDataset(X, (X[:, 0] - X[:, 3] > 0).long())


parser = argparse.ArgumentParser()
parser.add_argument("--hidden", type=int, default=16)
parser.add_argument("--batch-size", type=int, default=16)
cli = parser.parse_args()

torch.manual_seed(0)
random.seed(0)
np.random.seed(0)
lr = flor.arg("lr", 0.05)
epochs = flor.arg("epochs", 4)
loader = DataLoader(make_data(96, 1), batch_size=cli.batch_size, shuffle=True)


def accuracy(m):
    m.eval()
    with torch.no_grad():
        X, Y = loader.dataset.tensors
        return (m(X).argmax(1) == Y).float().mean().item()

'''

# v1: `net`, the train step inline
V1 = HEAD + '''
net = nn.Sequential(nn.Linear(8, cli.hidden), nn.ReLU(), nn.Dropout(0.1), nn.Linear(cli.hidden, 2))
opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)

with flor.checkpointing(net=net, opt=opt, sched=sched):
    for epoch in flor.loop("epoch", range(epochs)):
        net.train()
        for x, y in flor.loop("step", loader):
            loss = nn.functional.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            #GRAD_NORM:net
            flor.log("loss", loss.item())
        sched.step()
        flor.log("acc", accuracy(net))
        #WEIGHT_NORM:net
'''

# v2: renamed `model`, the train step a closure made by a factory
V2 = HEAD + '''
model = nn.Sequential(nn.Linear(8, cli.hidden), nn.ReLU(), nn.Dropout(0.1), nn.Linear(cli.hidden, 2))
opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)


def make_step(m, optimizer):
    def train_step(x, y):
        loss = nn.functional.cross_entropy(m(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        #GRAD_NORM:m
        return loss

    return train_step


train_step = make_step(model, opt)

with flor.checkpointing(model=model, opt=opt, sched=sched):
    for epoch in flor.loop("epoch", range(epochs)):
        model.train()
        for x, y in flor.loop("step", loader):
            loss = train_step(x, y)
            flor.log("loss", loss.item())
        sched.step()
        flor.log("acc", accuracy(model))
        #WEIGHT_NORM:model
'''

# v3: the epoch's mean loss computed (printed, not logged)
V3 = V2.replace('''        for x, y in flor.loop("step", loader):
            loss = train_step(x, y)
            flor.log("loss", loss.item())
        sched.step()
''', '''        epoch_loss = 0.0
        for x, y in flor.loop("step", loader):
            loss = train_step(x, y)
            epoch_loss += loss.item()
            flor.log("loss", loss.item())
        sched.step()
        print(f"epoch {epoch}: train loss {epoch_loss / len(loader):.4f}")
''').replace("        #WEIGHT_NORM:model", "        #TRAIN_LOSS\n        #WEIGHT_NORM:model")

STATEMENTS = {
    "GRAD_NORM": 'flor.log("grad_norm", torch.stack([p.grad.norm() for p in {m}.parameters()]).norm().item())',
    "WEIGHT_NORM": 'flor.log("weight_norm", {m}[0].weight.norm().item())',
    "TRAIN_LOSS": 'flor.log("train_loss", epoch_loss / len(loader))',
}
HELD = {"v1": ("GRAD_NORM", "WEIGHT_NORM"), "v2": ("GRAD_NORM", "WEIGHT_NORM"), "v3": tuple(STATEMENTS)}
RUNS = {"v1": ("0.05", "0.1"), "v2": ("0.05",), "v3": ("0.1",)}
ARGV = ("--hidden", "12")


def typed_in(src: str, which=()) -> str:
    """The version with the statements of ``which`` typed in at their markers."""
    out = []
    for ln in src.splitlines():
        key, _, m = ln.strip()[1:].partition(":")
        if ln.strip().startswith("#"):
            if key in which:
                out.append(ln[: len(ln) - len(ln.lstrip())] + STATEMENTS[key].replace("{m}", m))
            continue
        out.append(ln)
    return "\n".join(out) + "\n"


TODAY = typed_in(V3, tuple(STATEMENTS))


@pytest.fixture(scope="module")
def history(tmp_path_factory, ray_local):
    """The runs of each version, and the same runs re-executed in full with the
    statements typed in (one store per run). Runs of one version start together:
    each snapshots its code at its first flor call, before the next is written."""
    base = tmp_path_factory.mktemp("names")
    repo = base / "proj"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    hands = {}
    for v, src in (("v1", V1), ("v2", V2), ("v3", V3)):
        write(repo, "train.py", typed_in(src))
        git(repo, "add", "train.py")
        git(repo, "-c", "user.name=d", "-c", "user.email=d@x", "commit", "-qm", v)
        procs = []
        for lr in RUNS[v]:
            args = ["train.py", *ARGV, "--kwargs", f"lr={lr}"]
            procs.append(start_script(repo, *args, env=clean_env(FLOR_CHECKPOINT_BUDGET="1", FLOR_CHECKPOINT_MAX_PERIOD="1")))
            hand = base / f"hand-{v}-{lr}"
            hand.mkdir()
            git(hand, "init", "-q")
            write(hand, "train.py", typed_in(src, HELD[v]))
            hands[(v, float(lr))] = Store(str(hand / ".flor"))
            procs.append(start_script(hand, *args))
        for p in procs:
            _, err = p.communicate(timeout=300)
            assert p.returncode == 0, err
    write(repo, "train.py", TODAY)
    return repo, Store(str(repo / ".flor")), hands


def _labels(store):
    """run id -> (version label, lr): versions numbered in recording order."""
    runs = flor_ray.runs(store=store)
    labels = {ver: f"v{i + 1}" for i, ver in enumerate(dict.fromkeys(runs["version"]))}
    return {r: (labels[ver], float(lr)) for r, ver, lr in zip(runs["run_id"], runs["version"], runs["lr"])}


def _rows(t, key):
    return [(key(r), e, s if s == s else -1, v) for r, e, s, v in zip(t["run_id"], t["iter0"], t["iter1"], t["value_float"])]


def replayed(store, plan, name):
    """The rows of ``name`` that the plan's tasks wrote, as (run key, epoch, step, value)."""
    t = read_logs(store, [name], sources=("replay",)).to_pandas()
    t = t[t["task"].isin({task.key for task in plan.tasks})]
    return sorted(_rows(t, _labels(store).__getitem__))


def by_hand(hands, name, iterations=range(4)):
    out = []
    for k, st in hands.items():
        out += _rows(read_logs(st, [name], sources=("record",)).to_pandas(), lambda r, k=k: k)
    return sorted(r for r in out if r[1] in iterations)


# ------------------------------------------------------------ pure parts first
def test_propagation_injects_only_the_requested_names_and_returns_refusals():
    old = typed_in(V1)
    # today's train_loss cannot go into v1; not asked for, it neither goes in nor fails the call
    res = propagate_detailed(TODAY, old, names=["weight_norm"])
    assert res.code == typed_in(V1, ("WEIGHT_NORM",)) and res.refused == ()
    with pytest.raises(PropagationError, match="epoch_loss"):
        propagate_detailed(TODAY, old)
    res = propagate_detailed(TODAY, old, names=["train_loss", "weight_norm"], partial=True)
    assert res.code == typed_in(V1, ("WEIGHT_NORM",))
    assert [r.names for r in res.refused] == [("train_loss",)]
    assert "`epoch_loss`, which is not defined in the target" in res.refused_names["train_loss"]
    assert propagate_detailed(TODAY, typed_in(V3), names=["train_loss"]).code == typed_in(V3, ("TRAIN_LOSS",))


def _run(rid, version, n=4, ckpts=range(4)):
    return RunInfo(
        run_id=rid, version=version, script="train.py", args=(("lr", 0.1),), argv=(), cwd=".", iterations=n,
        checkpoints=tuple(CheckpointRef(i, 1, f"checkpoints/{rid}/{i:06d}.pt", 1000, "x") for i in ckpts),
        setup_s=2.0, outer_s=(10.0,) * n, inner_s=(9.0,) * n, logged=frozenset({"loss", "acc"}),
    )


def test_plan_replays_each_versions_placed_names_and_lists_the_refused_pairs():
    needs = (("loss", "inner", "in the step loop", ()), ("acc", "outer", "outer level", ()),
             ("wnorm", "outer", "outer level", ()), ("tl", "inner", "reads epoch_loss", ()))
    old = VersionPatch("old", "code", None, ("+wnorm at line 9 [epoch]",), needs[:3], ("loss", "acc", "wnorm"),
                       refused=(Refused("old", "tl", "it reads `epoch_loss`, not defined"),))
    new = VersionPatch("new", "code", None, ("+tl at line 9", "+wnorm at line 10"), needs, ("loss", "acc", "wnorm", "tl"))
    bare = VersionPatch("bare", "code", None, (), needs[:2], ("loss", "acc"))  # the names simply not there
    runs = [_run("a", "old"), _run("b", "old"), _run("c", "new"), _run("d", "bare")]
    damaged = [DamagedCheckpoint("c", 2, "checkpoints/c/000002.pt", "is missing")]
    p = make_plan(names=["tl", "wnorm"], where=None, iterations="all", runs=runs, damaged=damaged,
                  patches={"old": old, "new": new, "bare": bare}, cluster=ClusterSnapshot(2), store_url="memory://s")
    assert {t.run_id: set(t.names) for t in p.tasks if t.run_id != "c"} == {"a": {"wnorm", "acc"}, "b": {"wnorm", "acc"}}
    assert all(t.mode == "skip" for t in p.tasks if t.run_id in ("a", "b"))  # tl's inner need does not apply there
    assert {"tl", "wnorm"} <= {n for t in p.tasks if t.run_id == "c" for n in t.names}
    assert [(r.version, r.name, r.runs) for r in p.refused] == [("old", "tl", 2), ("bare", "tl", 1), ("bare", "wnorm", 1)]
    assert [s.run_id for s in p.skipped] == ["d"] and "none of tl, wnorm can be placed" in p.skipped[0].reason
    text = p.explain()
    assert "  Skip[name=tl version=old runs=2] it reads `epoch_loss`, not defined" in text
    assert "  Skip[name=wnorm version=bare runs=1] after propagation the script still does not log it" in text
    assert "  Damaged[run=c iteration=2] checkpoint checkpoints/c/000002.pt is missing: planned around it" in text
    # run c re-executes around its missing checkpoint: no task restores it, and its fallbacks leave it out
    (c,) = [t for t in p.tasks if t.run_id == "c"]
    assert c.restore is None or c.restore.iteration != 2
    spec = TaskSpec.of(p, c)
    assert [e["iteration"] for e in spec.fallbacks] == [i for i in (0, 1, 3) if i < c.stop]


def test_damaged_checkpoints_found_by_one_listing_per_run():
    from flor_ray.planning.planner import damaged_checkpoints

    st = Store("memory://names-damaged")
    runs = [_run("a", "v"), _run("b", "v", ckpts=())]
    for i in range(4):
        st.write_bytes(f"checkpoints/a/{i:06d}.pt", b"x" * 1000)
    st.delete("checkpoints/a/000001.pt")
    st.write_bytes("checkpoints/a/000003.pt", b"x" * 10)
    st.write_bytes("checkpoints/a/.tmp-123", b"x" * 1000)  # a write in flight is no checkpoint
    assert st.sizes("checkpoints/a") == {"checkpoints/a/000000.pt": 1000, "checkpoints/a/000002.pt": 1000,
                                         "checkpoints/a/000003.pt": 10}
    assert damaged_checkpoints(st, runs) == [
        DamagedCheckpoint("a", 1, "checkpoints/a/000001.pt", "is missing"),
        DamagedCheckpoint("a", 3, "checkpoints/a/000003.pt", "has 10 bytes, 1000 recorded"),
    ]


# ------------------------------------------------------------------ on Ray
def test_requested_names_replay_in_every_version(history):
    repo, store, hands = history
    plan = flor_ray.plan_replay(["grad_norm", "weight_norm"], store=store, script=repo / "train.py",
                                cluster=ClusterSnapshot(2))
    text = plan.explain()
    assert not plan.skipped and not plan.refused and "train_loss" not in text, text
    assert len([ln for ln in text.splitlines() if ln.startswith("  Propagate[")]) == 3
    assert all("train_loss" not in p.code for p in plan.patches)  # not asked for: not injected
    report = run_plan(plan, progress=False)
    assert report.ok, str(report)
    for name in ("grad_norm", "weight_norm"):
        assert replayed(store, plan, name) == by_hand(hands, name)
    assert len(replayed(store, plan, "weight_norm")) == 4 * 4 and len(replayed(store, plan, "grad_norm")) == 4 * 4 * 6


def test_every_name_replays_where_it_can_and_the_refused_are_reported(history):
    repo, store, hands = history
    plan = flor_ray.plan_replay(None, store=store, script=repo / "train.py", cluster=ClusterSnapshot(2))
    assert set(plan.names) == {"train_loss", "grad_norm", "weight_norm"}
    labels = _labels(store)
    version_of = {labels[r.run_id]: r.version for r in plan.runs}
    refused = {(r.version, r.name): r for r in plan.refused}
    assert set(refused) == {(version_of[("v1", 0.05)], "train_loss"), (version_of[("v2", 0.05)], "train_loss")}
    v1 = refused[(version_of[("v1", 0.05)], "train_loss")]
    assert v1.runs == 2 and "`epoch_loss`, which is not defined in the target" in v1.reason
    text = plan.explain()
    assert f"  Skip[name=train_loss version={v1.version[:8]} runs=2] " in text and not plan.skipped, text
    report = run_plan(plan, progress=False)
    assert report.ok, str(report)
    assert f"  skipped train_loss in version {v1.version[:8]} (2 runs): flor.log('train_loss')" in str(report)
    for name in ("grad_norm", "weight_norm", "train_loss"):
        assert replayed(store, plan, name) == by_hand(hands, name), name
    assert {k[0] for k, *_ in replayed(store, plan, "train_loss")} == {"v3"}
    assert report.fidelity.compared > 0 and report.fidelity.mismatched == 0


# ------------------------------------------------------- damaged checkpoints
@pytest.fixture(scope="module")
def damaged(history, tmp_path_factory):
    """A copy of the recorded store (no replays) with damaged checkpoints: v1
    lr=0.05 epoch 1 corrupted, v1 lr=0.1 epochs 0 and 1 corrupted, v2 epoch 2
    deleted, v3 epoch 0 corrupted and epoch 1 truncated."""
    repo, store, hands = history
    dst = tmp_path_factory.mktemp("damaged") / "proj"
    dst.mkdir()
    shutil.copytree(store.root, dst / ".flor", ignore=shutil.ignore_patterns("source=replay", "replays"))
    write(dst, "train.py", TODAY)
    st = Store(str(dst / ".flor"))
    run = {k: r for r, k in _labels(st).items()}
    rel = lambda k, i: f"checkpoints/{run[k]}/{i:06d}.pt"  # noqa: E731

    def corrupt(path):
        data = bytearray(st.read_bytes(path))
        for i in range(len(data) // 3, len(data) // 3 + 64):
            data[i] ^= 0x5A
        st.write_bytes(path, bytes(data))

    corrupt(rel(("v1", 0.05), 1))
    corrupt(rel(("v1", 0.1), 0))
    corrupt(rel(("v1", 0.1), 1))
    corrupt(rel(("v3", 0.1), 0))
    st.delete(rel(("v2", 0.05), 2))
    st.write_bytes(rel(("v3", 0.1), 1), st.read_bytes(rel(("v3", 0.1), 1))[:100])
    return dst, st, run, hands


def test_dry_run_finds_missing_and_truncated_checkpoints_and_plans_around_them(damaged):
    repo, st, run, _ = damaged
    plan = flor_ray.plan_replay(["weight_norm"], store=st, script=repo / "train.py", cluster=ClusterSnapshot(2))
    text = plan.explain()
    v2, v3 = run[("v2", 0.05)], run[("v3", 0.1)]
    assert f"  Damaged[run={v2} iteration=2] checkpoint checkpoints/{v2}/000002.pt is missing: planned around it" in text
    assert f"  Damaged[run={v3} iteration=1] checkpoint checkpoints/{v3}/000001.pt has 100 bytes, " in text
    assert len(plan.damaged) == 2  # a corrupted file of the right size is found by its task, not here
    uses = {c.path for t in plan.tasks for c in (*t.checkpoints, *([t.restore] if t.restore else []))}
    assert {d.path for d in plan.damaged}.isdisjoint(uses)
    assert "no checkpoint for iteration 2: re-executes from checkpoint 1" in text


def test_replay_falls_back_around_damaged_checkpoints_bit_for_bit(damaged):
    repo, st, run, hands = damaged
    plan = flor_ray.plan_replay(["weight_norm"], store=st, script=repo / "train.py", cluster=ClusterSnapshot(2))
    report = run_plan(plan, progress=False)
    assert report.ok, str(report)
    assert replayed(st, plan, "weight_norm") == by_hand(hands, "weight_norm")
    v1, v3 = run[("v1", 0.05)], run[("v3", 0.1)]
    notes = "\n".join(report.fallbacks)
    assert f"run {v1} epoch 1: checkpoint " in notes and f"checkpoints/{v1}/000001.pt is corrupted (sha256 differs" in notes
    assert "; replayed from the checkpoint of epoch 0" in notes
    assert f"run {v3} epoch 0: checkpoint " in notes and "re-executed from epoch 0 (no earlier good checkpoint)" in notes
    text = str(report)
    assert f"checkpoints/{run[('v2', 0.05)]}/000002.pt is missing; planned around it" in text
    assert notes.splitlines()[0] in text and report.fidelity.mismatched == 0
    again = flor_ray.plan_replay(["weight_norm"], store=st, script=repo / "train.py", cluster=ClusterSnapshot(2))
    assert not again.pending and run_plan(again, progress=False).ok

    # a re-executing query over the same damage, restoring epoch 1 in v1's runs:
    # lr=0.05 falls back to epoch 0's checkpoint; lr=0.1 finds epoch 0's damaged
    # too and re-executes from epoch 0; v2 restores epoch 1 (its epoch 2 is gone);
    # v3 plans epoch 0 (its epoch 1 is truncated), finds it corrupted and re-executes
    # from epoch 0; only the asked epochs' rows are kept
    plan = flor_ray.plan_replay(["grad_norm"], store=st, script=repo / "train.py", iterations="2:",
                                cluster=ClusterSnapshot(2))
    v1b, v2 = run[("v1", 0.1)], run[("v2", 0.05)]
    assert {t.run_id: t.restore.iteration for t in plan.tasks if t.restore} == {v1: 1, v1b: 1, v2: 1, v3: 0}, \
        plan.explain()
    report = run_plan(plan, progress=False)
    assert report.ok, str(report)
    assert replayed(st, plan, "grad_norm") == by_hand(hands, "grad_norm", iterations=(2, 3))
    notes = sorted(report.fallbacks)
    assert len(notes) == 4, notes
    assert any(n.startswith(f"run {v3} epoch 0: ") and n.endswith("; re-executed from epoch 0 (no earlier good checkpoint)")
               for n in notes), notes
    assert any(n.startswith(f"run {v1} epoch 1: ") and n.endswith("; replayed from the checkpoint of epoch 0")
               for n in notes), notes
    assert any(n.startswith(f"run {v1b} epoch 1: ") and n.endswith("; re-executed from epoch 0 (no earlier good checkpoint)")
               for n in notes), notes
    assert any(n.startswith(f"run {v1b} epoch 0: ") and n.endswith("; passed over as a fallback") for n in notes), notes

"""Each value once, none lost: on a local Ray, against full re-executions of the
script with the statements typed in by hand (bit for bit, CPU).

The script trains with LBFGS, whose closure the optimizer calls several times per
step: a statement inside it logs several values in one loop context, and every one
of them is kept, recorded or back-filled. A value that the store already holds is
never replayed again; replays that disagree are surfaced; a task that fails its
fidelity check is kept apart; a run still recording is left out unless asked.
"""

from __future__ import annotations

import subprocess
import sys
import time
import warnings

import pandas as pd
import pytest

import flor_ray
from flor_ray.execution.driver import run_plan
from flor_ray.queries.dataframe import ConflictWarning
from flor_ray.store.logs import read_logs
from flor_ray.store import Store

from conftest import clean_env, git, start_script, write

EPOCHS = 4
LRS = (0.1, 0.05)

HELPERS = '''
import torch


def make_data(n):
    g = torch.Generator().manual_seed(1)
    X = torch.randn(n, 8, generator=g)
    Y = (X[:, 0] - X[:, 1] > 0).long()
    return X, Y


def grad_norm(model):
    return sum(p.grad.norm() ** 2 for p in model.parameters()).item()
'''

TRAIN = '''
import argparse
import time

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import flor_ray as flor
from helpers import grad_norm, make_data

parser = argparse.ArgumentParser()
parser.add_argument("--batch-size", type=int, default=24)
opts, _ = parser.parse_known_args()

torch.manual_seed(0)
lr = flor.arg("lr", 0.1)
epochs = flor.arg("epochs", 4)
jitter = flor.arg("jitter", 0)
pause = flor.arg("pause", 0.0)
X, Y = make_data(96)
loader = DataLoader(TensorDataset(X, Y), batch_size=opts.batch_size, shuffle=True)
net = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
opt = torch.optim.LBFGS(net.parameters(), lr=lr, max_iter=4)
sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.8)

with flor.checkpointing(net=net, opt=opt, sched=sched):
    for epoch in flor.loop("epoch", range(epochs)):
        for x, y in flor.loop("step", loader):
            def closure():
                opt.zero_grad()
                out = nn.functional.cross_entropy(net(x), y)
                out.backward()
                flor.log("closure_loss", out.item())
                #GNORM
                return out

            loss = opt.step(closure)
            flor.log("loss", loss.item())
        sched.step()
        flor.log("tick", time.time() if jitter else float(epoch))
        #WNORM
        time.sleep(pause)
'''

GNORM = 'flor.log("gnorm", grad_norm(net))'
WNORM = 'flor.log("wnorm", net[0].weight.norm().item())'


def _src(gnorm: str = "", wnorm: str = "") -> str:
    return TRAIN.replace("#GNORM", gnorm).replace("#WNORM", wnorm)


def _record(repo, *kwargs: str, env=None) -> subprocess.Popen:
    return start_script(repo, "train.py", "--batch-size", "24", "--kwargs", *kwargs,
                        env=env or clean_env(FLOR_CHECKPOINT_BUDGET="0.5"))


def _wait(procs) -> None:
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err


@pytest.fixture(scope="module")
def history(tmp_path_factory, ray_local):
    """Runs lr=0.1 and lr=0.05 (and one with a clock-dependent recorded value), and
    the lr runs again with both statements typed in by hand (one store each)."""
    base = tmp_path_factory.mktemp("once")
    repo = base / "proj"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    write(repo, "helpers.py", HELPERS)
    write(repo, "train.py", _src())
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=d", "-c", "user.email=d@x", "commit", "-qm", "v1")
    procs = [_record(repo, f"lr={lr}") for lr in LRS] + [_record(repo, "lr=0.1", "jitter=1")]
    hands = {}
    for lr in LRS:
        hand = base / f"hand-{lr}"
        hand.mkdir()
        git(hand, "init", "-q")
        write(hand, "helpers.py", HELPERS)
        write(hand, "train.py", _src(GNORM, WNORM))
        procs.append(_record(hand, f"lr={lr}", env=clean_env()))
        hands[lr] = Store(str(hand / ".flor"))
    _wait(procs)
    write(repo, "train.py", _src(GNORM, WNORM))  # today's script
    return repo, Store(str(repo / ".flor")), hands


def _lr_of(store) -> dict:
    runs = flor_ray.runs(store=store)
    return dict(zip(runs["run_id"], runs["lr"]))


def _hand(hands, name) -> dict:
    """(lr, epoch, step) -> the values the hand-typed re-execution logged, in order."""
    out: dict = {}
    for lr, st in hands.items():
        t = read_logs(st, [name], sources=("record",)).to_pandas().sort_values("seq")
        for e, s, v in zip(t["iter0"], t["iter1"], t["value_float"]):
            out.setdefault((lr, int(e), -1 if s != s else int(s)), []).append(v)
    return out


def _frame_values(df, store, col) -> dict:
    lr = _lr_of(store)
    out: dict = {}
    step = df["step"] if "step" in df else [None] * len(df)
    for r, e, s, v in zip(df["run_id"], df["epoch"], step, df[col]):
        if not pd.isna(v):
            out.setdefault((lr[r], int(e), -1 if pd.isna(s) else int(s)), []).append(v)
    return out


def _sql(store, q):
    return flor_ray.sql(q, store=store)


def test_last_then_all_holds_each_value_once(history):
    repo, store, hands = history
    where = "jitter = 0"
    first = flor_ray.plan_replay(["wnorm"], where=where, iterations="last", store=store, script=repo / "train.py")
    assert all(t.iterations == (EPOCHS - 1,) for t in first.pending), first.explain()
    assert run_plan(first, progress=False).ok
    plan = flor_ray.plan_replay(["wnorm"], where=where, store=store, script=repo / "train.py")
    text = plan.explain()
    # only what the store does not hold yet: epochs 0..2 of each run
    assert sorted(i for t in plan.pending for i in t.iterations) == [0, 0, 1, 1, 2, 2], text
    assert "held already by task" in text
    report = run_plan(plan, progress=False)
    assert report.ok, str(report)

    df = flor_ray.dataframe("wnorm", where=where, store=store)
    assert "occurrence" not in df and len(df) == len(LRS) * EPOCHS
    want = {k: v for k, v in _hand(hands, "wnorm").items()}
    assert _frame_values(df, store, "wnorm") == want  # bit for bit, each (run, epoch) once
    for table in ("logs", "logs_all"):  # stored once: the raw rows hold no duplicate either
        n = _sql(store, f"SELECT run_id, count(*) AS n FROM {table} JOIN runs USING (run_id) "
                        f"WHERE name = 'wnorm' AND {where} GROUP BY run_id")
        assert sorted(n["n"]) == [EPOCHS] * len(LRS), table
    again = flor_ray.plan_replay(["wnorm"], where=where, store=store, script=repo / "train.py")
    assert not again.pending, again.explain()


def test_closure_values_all_kept_in_order(history):
    repo, store, hands = history
    where = "jitter = 0"
    report = run_plan(flor_ray.plan_replay(["gnorm"], where=where, store=store, script=repo / "train.py"), progress=False)
    assert not report.failed and report.fidelity.mismatched == 0, str(report)
    assert dict((n, c) for n, c, _ in report.fidelity.by_name)["closure_loss"] > len(LRS) * EPOCHS * 4

    df = flor_ray.dataframe("closure_loss", "gnorm", where=where, store=store)
    assert "occurrence" in df and "closure_loss__replay" in df
    assert df["occurrence"].max() >= 2  # the closure ran several times in one step
    hand_loss, hand_gnorm = _hand(hands, "closure_loss"), _hand(hands, "gnorm")
    assert _frame_values(df, store, "closure_loss") == hand_loss  # recorded: every value, in order
    assert _frame_values(df, store, "closure_loss__replay") == hand_loss  # recomputed, the same
    assert _frame_values(df, store, "gnorm") == hand_gnorm  # back-filled: every value, in order
    n = _sql(store, "SELECT count(*) AS n FROM logs JOIN runs USING (run_id) WHERE name = 'gnorm' AND jitter = 0")
    assert int(n["n"][0]) == sum(map(len, hand_gnorm.values()))


def test_disagreeing_replays_are_surfaced(history, tmp_path, capsys):
    repo, store, hands = history
    where = "jitter = 0 AND lr = 0.1"
    run_plan(flor_ray.plan_replay(["wnorm"], where=where, store=store, script=repo / "train.py"), progress=False)
    changed = tmp_path / "train.py"  # today's statement changed, under the same name
    changed.write_text(_src("", WNORM.replace(".norm()", ".abs().sum()")))
    report = run_plan(flor_ray.plan_replay(["wnorm"], where=where, store=store, script=changed), progress=False)
    assert not report.failed and len(report.conflicts) == EPOCHS, str(report)
    assert not report.ok and "conflicts: 4 replayed value(s) differ" in str(report)
    (rid,) = {c.run_id for c in report.conflicts}

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        df = flor_ray.dataframe("wnorm", where=where, store=store)
    assert any(issubclass(w.category, ConflictWarning) for w in caught)
    assert df["wnorm__conflict"].tolist() == [True] * EPOCHS
    hand = _hand(hands, "wnorm")
    assert _frame_values(df, store, "wnorm") == {k: v for k, v in hand.items() if k[0] == 0.1}  # the first replay's
    assert [c.values[0] for c in report.conflicts] == [v[0] for k, v in sorted(hand.items()) if k[0] == 0.1]
    counts = {t: int(_sql(store, f"SELECT count(*) AS n FROM {t} WHERE name = 'wnorm' AND run_id = '{rid}'")["n"][0])
              for t in ("logs", "logs_all")}
    assert counts == {"logs": EPOCHS, "logs_all": 2 * EPOCHS}  # seen once; the raw rows all kept

    from flor_ray.cli import main

    with pytest.warns(ConflictWarning, match="4 replayed value"):
        assert main(["df", "wnorm", "--where", where, "--store", store.url]) == 0
    assert "wnorm__conflict" in capsys.readouterr().out


def test_fidelity_mismatch_is_kept_apart(history):
    repo, store, _ = history
    where = "jitter = 1"
    report = run_plan(flor_ray.plan_replay(["wnorm"], where=where, store=store, script=repo / "train.py"), progress=False)
    (rid,) = flor_ray.runs(store=store).query("jitter == 1")["run_id"]
    assert not report.failed and report.fidelity.mismatched == EPOCHS, str(report)  # tick is a clock reading
    assert report.fidelity.mismatched_runs == (rid,) and f"runs affected: {rid}" in str(report)
    assert "kept apart" in str(report) and not report.ok
    df = flor_ray.dataframe("tick", "wnorm", where=where, store=store)
    assert "wnorm" not in df and len(df) == EPOCHS  # not shown as back-filled
    assert int(_sql(store, f"SELECT count(*) AS n FROM logs WHERE run_id = '{rid}' AND source <> 'record'")["n"][0]) == 0
    kept = _sql(store, f"SELECT name, mismatched FROM replay_mismatch WHERE run_id = '{rid}' ORDER BY name, iter0")
    assert kept[kept["name"] == "tick"]["mismatched"].tolist() == [True] * EPOCHS
    assert (kept["name"] == "wnorm").sum() == EPOCHS
    again = flor_ray.plan_replay(["wnorm"], where=where, store=store, script=repo / "train.py")
    assert not again.pending, again.explain()  # done, kept apart: not replayed again


def test_running_run_left_out_unless_asked(ray_local, tmp_path):
    """A run still recording is skipped with the reason; asked for, what it has
    recorded so far is replayed, and once it has finished only the rest is."""
    repo = tmp_path / "live"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    write(repo, "helpers.py", HELPERS)
    write(repo, "train.py", _src())
    today = write(tmp_path, "today.py", _src(GNORM, WNORM))
    store = Store(str(repo / ".flor"))
    proc = _record(repo, "lr=0.05", f"epochs={EPOCHS}", "pause=2.0")
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            runs = flor_ray.runs(store=store) if store.exists("runs") else None
            if runs is not None and len(runs) and int(runs["iterations"][0] or 0) >= 2:
                break
            assert proc.poll() is None, proc.communicate()[1]
            time.sleep(0.2)
        plan = flor_ray.plan_replay(["wnorm"], store=store, script=today)
        assert not plan.tasks and "still recording" in plan.skipped[0].reason, plan.explain()
        live = flor_ray.plan_replay(["wnorm"], store=store, script=today, include_running=True)
        assert live.pending and not live.skipped, live.explain()
        done_live = sorted(i for t in live.pending for i in t.iterations)
        assert run_plan(live, progress=False).ok
        _wait([proc])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    # finished now: only the iterations it had not recorded then are replayed
    after = flor_ray.plan_replay(["wnorm"], store=store, script=today)
    rest = sorted(i for t in after.pending for i in t.iterations)
    assert rest == [i for i in range(EPOCHS) if i not in done_live], after.explain()
    assert run_plan(after, progress=False).ok
    n = _sql(store, "SELECT count(*) AS n, count(DISTINCT iter0) AS e FROM logs_all WHERE name = 'wnorm'")
    assert n.to_dict("list") == {"n": [EPOCHS], "e": [EPOCHS]}


# ------------------------------------------------- the planner, as a pure function
def _plan_run(n=6, ckpts=(0, 1, 2, 3, 4, 5)):
    from flor_ray.planning.plan import CheckpointRef, RunInfo

    return RunInfo(run_id="r1", version="v1", script="train.py", args=(), argv=(), cwd=".", iterations=n,
                   checkpoints=tuple(CheckpointRef(i, 1, f"c/{i}.pt", 1000, "x") for i in ckpts),
                   setup_s=2.0, outer_s=(10.0,) * n, inner_s=(9.0,) * n, logged=frozenset({"loss"}))


def _pure_plan(iterations, replayed=(), names=("gnorm",)):
    from flor_ray.planning.make import make_plan
    from flor_ray.planning.plan import ClusterSnapshot, VersionPatch

    patch = VersionPatch("v1", "code", None, (), (("loss", "inner", "step loop", ()),
                                                  ("gnorm", "inner", "step loop", ()),
                                                  ("wnorm", "outer", "outer level", ())), ("loss", "gnorm", "wnorm"))
    return make_plan(names=list(names), where=None, iterations=iterations, runs=[_plan_run()],
                     patches={"v1": patch}, cluster=ClusterSnapshot(2), store_url="memory://s", replayed=replayed)


def _held(plan, digest=None):
    from flor_ray.planning.plan import ReplayedPart

    return tuple(ReplayedPart("r1", t.key, digest or t.patch, frozenset(t.names), frozenset(t.iterations),
                              t.setup, t.after) for t in plan.tasks)


def test_planner_leaves_out_what_finished_partitions_hold():
    middle = _pure_plan("2,3")
    full = _pure_plan("all", _held(middle))
    # the spans around the held iterations, re-executed apart: 0..1 and 4..5
    assert sorted(i for t in full.pending for i in t.iterations) == [0, 1, 4, 5], full.explain()
    assert all(t.stop < 2 or t.start > 3 for t in full.pending)
    last = _pure_plan("last")
    rest = _pure_plan("all", _held(last))
    assert sorted(i for t in rest.pending for i in t.iterations) == [0, 1, 2, 3, 4], rest.explain()
    # the rows before the outer loop are held too: no task keeps them again
    assert last.tasks[0].setup and not any(t.setup for t in rest.pending + full.pending)
    assert "iterations 2, 3 held already by task" in full.explain()
    assert not _pure_plan("all", _held(middle) + _held(full)).pending
    # held for another name only, or by other code: replayed again
    assert sorted(i for t in _pure_plan("all", _held(middle), names=("gnorm", "wnorm")).pending
                  for i in t.iterations) == list(range(6))
    other_code = _pure_plan("all", _held(middle, digest="other"))
    assert sorted(i for t in other_code.pending for i in t.iterations) == list(range(6))
    # the same query again keeps its keys (a rerun finds them done)
    assert [t.key for t in _pure_plan("2,3", _held(middle)).tasks] == [t.key for t in middle.tasks]

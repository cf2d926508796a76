"""Short tasks share Ray tasks (flor_ray.execution.batches; issue 17, part 5).

The packing first (pure), then batches on the session's real local Ray: every task's
outcome comes back exactly once, a failing task is that task's failure only, a task
whose worker died (SIGKILL) or whose process was killed is retried alone with the
retries it has left, and nothing runs twice except what a retry reruns. Last, a
replay of a small training history (argparse, a shuffling DataLoader, an annealed
learning rate) whose short tasks the driver batches gives the values of the same
plan run one Ray task per task, and both equal a full re-execution of each run with
the statement typed in by hand, bit for bit.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import uuid
from pathlib import Path

import pytest
from ray import cloudpickle

import flor_ray
from flor_ray.execution.batches import BATCHING, NO_BATCHING, Batch, Batching, pack, run_packed
from flor_ray.execution.driver import RayRunner, run_plan
from flor_ray.execution.task import ReplayProcessKilled
from flor_ray.planning.plan import ClusterSnapshot
from flor_ray.store import Store
from flor_ray.store.logs import read_logs

from conftest import git, start_script, write

# the Ray workers cannot import this module: its functions travel by value
cloudpickle.register_pickle_by_value(sys.modules[__name__])


# ------------------------------------------------------------------- packing
def _estimates(n: int = 400) -> list[float]:
    import random

    rng = random.Random(3)
    return [round(rng.lognormvariate(-4.0, 1.0), 6) for _ in range(n)] + [0.9, 2.0]


def test_pack_places_every_task_once_longest_first_and_keeps_long_ones_alone():
    est = _estimates()
    batches = pack(est, 8)
    items = [i for b in batches for i in b.items]
    assert sorted(items) == list(range(len(est)))
    assert [b.estimate_s for b in batches] == sorted((b.estimate_s for b in batches), reverse=True)
    assert all(abs(b.estimate_s - sum(est[i] for i in b.items)) < 1e-9 for b in batches)
    for i in (len(est) - 2, len(est) - 1):  # 0.9 s and 2 s: over solo_s, a Ray task each
        assert Batch((i,), est[i]) in batches
    assert len(batches) < len(est) / 4  # few Ray tasks for many short ones
    # guided: the last batches are short, so the slots finish together
    assert batches[-1].estimate_s <= BATCHING.min_s + max(est[i] for i in batches[-1].items)
    assert max(b.estimate_s for b in batches if len(b.items) > 1) <= sum(est) / (BATCHING.per_slot * 8) + 0.2


def test_pack_never_mixes_resource_groups_and_leaves_few_tasks_alone():
    est = _estimates(60)
    groups = ["gpu" if i % 3 == 0 else "cpu" for i in range(len(est))]
    for b in pack(est, 2, groups=groups):
        assert len({groups[i] for i in b.items}) == 1
    assert all(len(b.items) == 1 for b in pack(est, 2, NO_BATCHING))
    assert all(len(b.items) == 1 for b in pack([0.01] * 4, 4))  # no more tasks than slots: no batching


# ------------------------------------------------------------- batches on Ray
def work(i: int, marks: str, fail: tuple = (), kill: tuple = (), killed_proc: tuple = ()) -> int:
    """Task i: a mark per execution; fails, or kills its worker / raises as a killed
    replay process would, on its first execution only where listed."""
    first = not any(p.name.startswith(f"{i}-") for p in Path(marks).iterdir())
    (Path(marks) / f"{i}-{uuid.uuid4().hex}").touch()
    if i in fail:
        raise ValueError(f"task {i} fails")
    if first and i in kill:
        import time

        time.sleep(0.3)  # the batch's earlier reports reach the driver first
        os.kill(os.getpid(), signal.SIGKILL)
    if first and i in killed_proc:
        raise ReplayProcessKilled(f"task {i}: killed by signal 9")
    return i * 10


def _run(tmp_path, n: int, batches=None, retries: int = 2, report_s: float = 0.0, **faults):
    marks = tmp_path / f"marks-{uuid.uuid4().hex[:6]}"
    marks.mkdir()
    batches = batches or [Batch(tuple(range(j, min(j + 5, n))), 0.1) for j in range(0, n, 5)]
    got = []
    run_packed(work, [(i, str(marks), *(tuple(faults.get(k, ())) for k in ("fail", "kill", "killed_proc")))
                      for i in range(n)],
               batches, options=lambda i: {"num_cpus": 1}, retries=retries, retry_exceptions=(ReplayProcessKilled,),
               on_done=got.append, report_s=report_s)
    runs: dict[int, int] = {}
    for p in marks.iterdir():
        k = int(p.name.split("-")[0])
        runs[k] = runs.get(k, 0) + 1
    return got, runs


def test_batches_return_every_result_once_and_a_failure_stays_its_tasks(tmp_path, ray_local):
    got, runs = _run(tmp_path, 20, fail=(7,))
    assert sorted(o.index for o in got) == list(range(20))
    by = {o.index: o for o in got}
    assert isinstance(by[7].error, ValueError) and "task 7 fails" in str(by[7].error)
    assert {i: o.value for i, o in by.items() if i != 7} == {i: i * 10 for i in range(20) if i != 7}
    assert all(o.error is None for i, o in by.items() if i != 7)
    assert runs == {i: 1 for i in range(20)}  # a failure is not retried, nothing runs twice


def test_a_worker_killed_mid_batch_loses_no_task_and_reruns_only_its_running_one(tmp_path, ray_local):
    # task 6 is the second of batch 5..9: 5 has reported, 6 is running when the worker dies
    got, runs = _run(tmp_path, 15, kill=(6,))
    assert sorted(o.index for o in got) == list(range(15))
    assert all(o.error is None and o.value == o.index * 10 for o in got)
    assert runs == {i: 2 if i == 6 else 1 for i in range(15)}


def test_retries_stay_per_task_in_a_batch(tmp_path, ray_local):
    got, runs = _run(tmp_path, 10, killed_proc=(3,))  # retried alone, then done
    assert sorted(o.index for o in got) == list(range(10)) and all(o.error is None for o in got)
    assert runs == {i: 2 if i == 3 else 1 for i in range(10)}
    # no retries left: the killed task fails, named, and its batch's other tasks still finish
    got, runs = _run(tmp_path, 10, retries=0, killed_proc=(3,), kill=(8,))
    by = {o.index: o for o in got}
    assert sorted(by) == list(range(10))
    assert isinstance(by[3].error, ReplayProcessKilled) and "task 3" in str(by[3].error)
    assert by[8].error is not None  # its worker died with no retry left
    assert all(by[i].value == i * 10 for i in range(10) if i not in (3, 8))
    assert runs == {i: 1 for i in range(10)}


def test_guided_batches_on_ray_run_each_task_once(tmp_path, ray_local):
    est = [0.002] * 120
    batches = pack(est, 2, Batching(min_s=0.02))
    assert 1 < len(batches) < 40
    got, runs = _run(tmp_path, 120, batches=batches, report_s=BATCHING.report_s)
    assert sorted(o.index for o in got) == list(range(120)) and all(o.error is None for o in got)
    assert runs == {i: 1 for i in range(120)}


# ------------------------------------------------------- a batched real replay
SCRIPT = '''
import argparse
import random

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import flor_ray as flor


def make_data(n):
    g = torch.Generator().manual_seed(1)
    X = torch.randn(n, 6, generator=g)
    return TensorDataset(X, (X[:, 0] + X[:, 2] > 0).long())


parser = argparse.ArgumentParser()
parser.add_argument("--hidden", type=int, default=8)
cli = parser.parse_args()
torch.manual_seed(0)
random.seed(0)
lr = flor.arg("lr", 0.1)
loader = DataLoader(make_data(64), batch_size=16, shuffle=True)
net = nn.Sequential(nn.Linear(6, cli.hidden), nn.ReLU(), nn.Linear(cli.hidden, 2))
opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.8)

with flor.checkpointing(net=net, opt=opt, sched=sched):
    for epoch in flor.loop("epoch", range(3)):
        for x, y in flor.loop("step", loader):
            loss = nn.functional.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            flor.log("loss", loss.item())
        sched.step()
        #WNORM
'''
WNORM = 'flor.log("wnorm", net[0].weight.norm().item())'
LRS = ("0.05", "0.1", "0.3")


@pytest.fixture(scope="module")
def history(tmp_path_factory):
    """Three runs, and each run again in full with the statement typed in (the oracle)."""
    base = tmp_path_factory.mktemp("width")
    repo = base / "proj"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    write(repo, "train.py", SCRIPT)
    git(repo, "add", "train.py")
    git(repo, "-c", "user.name=d", "-c", "user.email=d@x", "commit", "-qm", "v1")
    hand = base / "hand"
    hand.mkdir()
    git(hand, "init", "-q")
    write(hand, "train.py", SCRIPT.replace("#WNORM", WNORM))
    procs = [start_script(d, "train.py", "--kwargs", f"lr={lr}")
             for lr in LRS for d in (repo, hand)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    write(repo, "train.py", SCRIPT.replace("#WNORM", WNORM))
    return repo, Store(str(hand / ".flor"))


def _values(store: Store, key: str) -> list:
    runs = flor_ray.runs(store=store)
    lr = dict(zip(runs["run_id"], runs["lr"]))
    t = read_logs(store, ["wnorm"], sources=(key,)).to_pandas()
    return sorted((float(lr[r]), int(e), v) for r, e, v in zip(t["run_id"], t["iter0"], t["value_float"]))


def test_a_batched_replay_equals_the_unbatched_one_and_the_oracle(history, tmp_path, ray_local):
    repo, hand = history
    oracle = _values(hand, "record")
    assert len(oracle) == len(LRS) * 3
    got = {}
    # real replay tasks take a second or more here (solo by default): a policy that
    # batches them puts the driver's batched path under a real replay
    batched = Batching(solo_s=60.0, min_s=1.0)
    for mode, batching in (("batched", batched), ("unbatched", NO_BATCHING)):
        proj = tmp_path / mode
        shutil.copytree(repo, proj, symlinks=True)
        store = Store(str(proj / ".flor"))
        plan = flor_ray.plan_replay(["wnorm"], store=store, script=proj / "train.py", cluster=ClusterSnapshot(1.0),
                                    resources={"num_cpus": 1})
        batches = pack([t.estimate_s for t in plan.pending], plan.slots, batching)
        if batching is batched:
            assert any(len(b.items) > 1 for b in batches), (plan.slots, [t.estimate_s for t in plan.pending])
        report = run_plan(plan, runner=RayRunner(batching=batching), progress=False)
        assert report.ok, str(report)
        assert sorted(r.key for r in report.results) == sorted(t.key for t in plan.tasks)
        assert {r.status for r in report.results} == {"done"}
        got[mode] = _values(store, "replay")
    assert got["batched"] == got["unbatched"] == oracle

"""``with flor.run():`` in a script: a run per block, and one for the flor calls outside
them; a replay of one block runs the blocks before it as plain code (the fine-tuning
block starts from the weights the first one trained), compared bit for bit with the
script run with the statement typed in by hand."""

from __future__ import annotations

import pytest

import flor_ray
from flor_ray.execution.driver import LocalRunner, run_plan
from flor_ray.planning.plan import ClusterSnapshot
from flor_ray.store import Store
from flor_ray.store.logs import read_logs

from conftest import clean_env, git, init_repo, run_script, write

SCRIPT = '''
import argparse

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import flor_ray as flor

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=3)
args = parser.parse_args()

g = torch.Generator().manual_seed(0)
X = torch.randn(64, 4, generator=g)
Y = X.sum(1, keepdim=True) + 0.1 * torch.randn(64, 1, generator=g)
torch.manual_seed(0)
net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.1), nn.Linear(8, 1))


def train(tag, lr):
    opt = torch.optim.SGD(net.parameters(), lr=flor.arg(tag + "_lr", lr), momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    loader = DataLoader(TensorDataset(X, Y), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(1))
    with flor.checkpointing(model=net, optimizer=opt, sched=sched):
        for epoch in flor.loop("epoch", range(args.epochs)):
            for x, y in flor.loop("step", loader):
                opt.zero_grad()
                loss = nn.functional.mse_loss(net(x), y)
                loss.backward()
                opt.step()
                flor.log("loss", loss.item()){step}
            sched.step()
            flor.log("lr", sched.get_last_lr()[0])


with flor.run():
    train("pre", 0.05)
with flor.run():  # fine-tunes the weights the first block trained
    train("tune", 0.01)
flor.log("final", net(X).mean().item())
'''
NEW = '\n                flor.log("gnorm", net[0].weight.grad.norm().item())'


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    from concurrent.futures import ThreadPoolExecutor

    base = tmp_path_factory.mktemp("blocks")

    def record(name: str, step: str):
        (base / name).mkdir()
        repo = init_repo(base / name)
        write(repo, "train.py", SCRIPT.replace("{step}", step))
        git(repo, "add", "-A")
        git(repo, "commit", "-qm", "train")
        run_script(repo, env=clean_env(FLOR_STORE=str(base / f"{name}-store")))
        return repo, Store(str(base / f"{name}-store"))

    with ThreadPoolExecutor(2) as pool:  # the recording and the hand-typed oracle side by side
        return list(pool.map(record, ("proj", "hand"), ("", NEW)))


def _runs(store):
    return flor_ray.runs(store=store).sort_values("started_at").reset_index(drop=True)


def test_each_block_and_the_calls_after_them_are_runs(recorded):
    (_, store), _ = recorded
    runs = _runs(store)
    metas = [store.read_json(f"runs/{r}.json") for r in runs["run_id"]]
    assert [m["block"].get("block") for m in metas] == [1, 2, None] and metas[2]["block"]["after_blocks"] == 2
    assert list(runs["status"]) == ["finished"] * 3 and len(set(runs["version"])) == 1
    assert runs["pre_lr"][0] == 0.05 and runs["tune_lr"][1] == 0.01
    df = flor_ray.dataframe("lr", "final", store=store)
    counts = df.groupby("run_id")["lr"].count()
    assert [counts[r] for r in runs["run_id"]] == [3, 3, 0] and df["final"].notna().sum() == 1


def test_a_step_statement_replays_into_the_fine_tuning_block_bit_for_bit(recorded, monkeypatch):
    (repo, store), (_, hand) = recorded
    from conftest import REPO_ROOT

    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT))
    write(repo, "train.py", SCRIPT.replace("{step}", NEW))  # today's script
    runs = _runs(store)
    plan = flor_ray.plan_replay(["gnorm"], store=store, script=repo / "train.py", cluster=ClusterSnapshot(2),
                                where=f"run_id = '{runs['run_id'][1]}'")
    assert {t.mode for t in plan.tasks} == {"reexec"}, plan.explain()
    report = run_plan(plan, progress=False, runner=LocalRunner())
    assert not report.failed, str(report)
    assert report.fidelity.mismatched == 0 and report.fidelity.compared > 0

    def gnorm(st, run_id, source):
        t = read_logs(st, ["gnorm"], run_ids=[run_id], sources=(source,)).to_pandas()
        return list(t.sort_values(["iter0", "iter1"])["value_float"])

    replayed = gnorm(store, runs["run_id"][1], "replay")
    assert len(replayed) == 3 * 4
    assert replayed == gnorm(hand, _runs(hand)["run_id"][1], "record")  # exact floats


def test_a_block_that_raises_and_a_crash_after_the_blocks_fail_their_own_runs(tmp_path):
    repo = init_repo(tmp_path)
    write(repo, "train.py", """
        import flor_ray as flor

        try:
            with flor.run():
                flor.log("a", 1)
                raise KeyError("inside the block")
        except KeyError:
            pass
        with flor.run():
            flor.log("b", 2)
        flor.log("c", 3)
        raise ValueError("after the blocks")
    """)
    proc = run_script(repo, check=False)
    assert proc.returncode == 1 and "ValueError: after the blocks" in proc.stderr
    store = Store(str(repo / ".flor"))
    metas = [store.read_json(f"runs/{r}.json") for r in _runs(store)["run_id"]]
    assert [(m["status"], (m.get("error") or {}).get("type")) for m in metas] == [
        ("failed", "KeyError"), ("finished", None), ("failed", "ValueError")]

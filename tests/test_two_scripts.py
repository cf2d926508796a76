"""Two training scripts recorded into one store at one version (``train.py`` and
``finetune.py`` side by side, as projects keep them): today's statement is
propagated into the script it was typed into, each run replays its own script's
patched code, and the runs of the other script are left out with the reason.
A script renamed between versions (``train_v1.py`` -> ``train.py``, the old name
gone) still takes today's statement under its earlier name.

Oracle: the same scripts re-run in full with the statement typed in by hand.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import flor_ray
from flor_ray.execution.driver import LocalRunner, run_plan
from flor_ray.planning.plan import ClusterSnapshot, SkipKind
from flor_ray.store import Store
from flor_ray.store.logs import read_logs

from conftest import git, init_repo, start_script, write

# The two scripts differ where it shows in a weight norm: the width, the optimiser,
# the learning rate and the data seed.
SCRIPT = '''
import argparse

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import flor_ray as flor

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=3)
args = parser.parse_args()
torch.manual_seed({seed})
X = torch.randn(48, 5)
Y = (X[:, 0] + X[:, 3] > 0).long()
loader = DataLoader(TensorDataset(X, Y), batch_size=12, shuffle=True)
net = nn.Sequential(nn.Linear(5, {hidden}), nn.Tanh(), nn.Linear({hidden}, 2))
opt = torch.optim.{opt}(net.parameters(), lr=flor.arg("lr", {lr}))
sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.8)

with flor.checkpointing(net=net, opt=opt, sched=sched):
    for epoch in flor.loop("epoch", range(args.epochs)):
        for x, y in loader:
            loss = nn.functional.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        flor.log("loss", loss.item())
        #WNORM
'''

WNORM = 'flor.log("wnorm", net[0].weight.norm().item())'
KINDS = {
    "train.py": dict(seed=0, hidden=9, opt="SGD", lr=0.2),
    "finetune.py": dict(seed=7, hidden=6, opt="Adam", lr=0.01),
}


def source(script: str, today: bool) -> str:
    text = SCRIPT.format(**KINDS["finetune.py" if script == "finetune.py" else "train.py"])
    return text.replace("#WNORM", WNORM if today else "")


def _record(repo: Path, *scripts: str) -> None:
    procs = [start_script(repo, s) for s in scripts]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err


def _new_repo(path: Path) -> Path:
    path.mkdir()
    return init_repo(path)


def _commit(repo: Path, msg: str) -> None:
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", msg)


def _wnorm(store: Store, source_: str) -> dict[tuple[str, int], float]:
    """(script, epoch) -> wnorm of the store's rows of ``source_`` (one value each)."""
    t = read_logs(store, ["wnorm"], sources=(source_,)).to_pandas()
    out: dict[tuple[str, int], set[float]] = {}
    for f, e, v in zip(t["file"], t["iter0"].astype(int), t["value_float"]):
        out.setdefault((f, e), set()).add(v)
    assert all(len(v) == 1 for v in out.values()), out
    return {k: v.pop() for k, v in out.items()}


@pytest.fixture(scope="module")
def side_by_side(tmp_path_factory):
    """Both scripts at one version, recorded into one store (finetune.py last, so the
    latest run is not train.py's), and the oracle: both with the statement typed in."""
    base = tmp_path_factory.mktemp("two-scripts")
    repo, hand = _new_repo(base / "proj"), _new_repo(base / "hand")
    for s in KINDS:
        write(repo, s, source(s, today=False))
        write(hand, s, source(s, today=True))
    _commit(repo, "two scripts")
    _record(repo, "train.py")
    _record(repo, "finetune.py")
    _record(hand, *KINDS)
    for s in KINDS:
        write(repo, s, source(s, today=True))
    return repo, Store(str(repo / ".flor")), Store(str(hand / ".flor"))


@pytest.mark.parametrize("script", sorted(KINDS))
def test_each_script_replays_its_own_patched_code(side_by_side, script):
    repo, store, hand = side_by_side
    other = next(s for s in KINDS if s != script)
    plan = flor_ray.plan_replay(["wnorm"], store=store, script=repo / script, cluster=ClusterSnapshot(2))
    (skipped,) = plan.skipped
    assert skipped.kind is SkipKind.OTHER_SCRIPT
    assert f"recorded by {other}" in skipped.reason and f"script='{other}'" in skipped.reason
    assert {plan.run_info(t.run_id).script for t in plan.tasks} == {script}
    assert [p.script for p in plan.patches] == [script]
    report = run_plan(plan, runner=LocalRunner(), progress=False)
    assert not report.failed, str(report)
    got = {k: v for k, v in _wnorm(store, "replay").items() if k[0] == script}
    want = {k: v for k, v in _wnorm(hand, "record").items() if k[0] == script}
    assert len(want) == 3 and got == want


def test_two_scripts_at_one_version_get_a_patch_each():
    from flor_ray.planning.plan import VersionPatch, patch_of

    common = VersionPatch("v1", "x = 1\n")
    own = VersionPatch("v1", "y = 2\n", script="finetune.py")
    assert patch_of([common, own], "v1", "finetune.py") is own
    assert patch_of([common, own], "v1", "train.py") is common
    assert patch_of([own], "v1", "train.py") is None
    assert patch_of([own], "v1", None) is own  # the version's only patch
    assert patch_of([own, VersionPatch("v1", "z = 3\n", script="train.py")], "v1", None) is None
    assert own.label == "v1 finetune.py" and common.label == "v1"


def test_a_script_renamed_between_versions_takes_todays_statement(tmp_path):
    repo, hand = _new_repo(tmp_path / "proj"), _new_repo(tmp_path / "hand")
    write(repo, "train_v1.py", source("train.py", today=False))
    _commit(repo, "v1")
    _record(repo, "train_v1.py")
    git(repo, "mv", "train_v1.py", "train.py")
    _commit(repo, "v2: renamed")
    write(repo, "train.py", source("train.py", today=True))
    write(hand, "train_v1.py", source("train.py", today=True))
    _record(hand, "train_v1.py")
    store = Store(str(repo / ".flor"))
    plan = flor_ray.plan_replay(["wnorm"], store=store, script=repo / "train.py", cluster=ClusterSnapshot(2))
    assert not plan.skipped, plan.explain()
    report = run_plan(plan, runner=LocalRunner(), progress=False)
    assert not report.failed, str(report)
    assert _wnorm(store, "replay") == _wnorm(Store(str(hand / ".flor")), "record")

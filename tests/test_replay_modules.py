"""Hindsight statements in the project's other modules: a model's forward and a data
helper, one of them renamed between versions; replayed on a local Ray and compared,
bit for bit, with full re-executions that have the statements typed in by hand."""

from __future__ import annotations

import subprocess

import pytest

import flor_ray
from flor_ray.execution.driver import run_plan
from flor_ray.store.logs import read_logs
from flor_ray.store.runs import load_runs
from flor_ray.store import Store

from conftest import clean_env, git, start_script, write

MAIN = '''
import argparse

import torch
from torch.utils.data import DataLoader, TensorDataset

import flor_ray as flor
from model import Net
from {data} import describe

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=3)
args = parser.parse_args()
torch.manual_seed(0)
X = torch.randn(64, 6)
Y = (X[:, 0] * X[:, 1] > 0).long()
loader = DataLoader(TensorDataset(X, Y), batch_size=16, shuffle=True)
net = Net()
opt = torch.optim.SGD(net.parameters(), lr=flor.arg("lr", 0.1), momentum=0.9)
with flor.checkpointing(net=net, opt=opt):
    for epoch in flor.loop("epoch", range(args.epochs)):
        for x, y in flor.loop("step", loader):
            describe(x)
            loss = torch.nn.functional.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            flor.log("loss", loss.item())
        with torch.no_grad():
            flor.log("acc", (net(X).argmax(1) == Y).float().mean().item())
'''

MODEL = {
    "v1": '''
import torch
import torch.nn as nn

import flor_ray as flor


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 12)
        self.fc2 = nn.Linear(12, 2)

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        #HNORM
        return self.fc2(h)
''',
    "v2": '''
import torch.nn as nn
import torch.nn.functional as F

import flor_ray as flor


class Net(nn.Module):
    """Two layers, ReLU."""

    def __init__(self, hidden=12):
        super().__init__()
        self.fc1 = nn.Linear(6, hidden)
        self.fc2 = nn.Linear(hidden, 2)

    def forward(self, x):
        h = F.relu(self.fc1(x))
        #HNORM
        return self.fc2(h)
''',
}

DATA = '''
import flor_ray as flor


def describe(batch):
    """Statistics of a batch (for debugging)."""
    mean = batch.mean()
    #XMEAN
    return mean
'''

HNORM = 'flor.log("hnorm", h.norm().item())'
XMEAN = 'flor.log("xmean", mean.item())'


def _typed_in(text: str) -> str:
    return text.replace("#HNORM", HNORM).replace("#XMEAN", XMEAN)


def _plain(text: str) -> str:
    return text.replace("        #HNORM\n", "").replace("    #XMEAN\n", "")


def _files(version: str) -> dict[str, str]:
    data = "datautil" if version == "v1" else "data"  # renamed in v2
    return {"train.py": MAIN.format(data=data), "model.py": MODEL[version], f"{data}.py": DATA}


def _record(repo, files, typed: bool) -> subprocess.Popen:
    for name, text in files.items():
        write(repo, name, _typed_in(text) if typed else _plain(text))
    return start_script(repo, "train.py", env=clean_env(FLOR_CHECKPOINT_BUDGET="1"))


@pytest.fixture(scope="module")
def project(tmp_path_factory, ray_local):
    repo = tmp_path_factory.mktemp("mods") / "proj"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    hands = {}
    for version in ("v1", "v2"):
        if version == "v2":
            git(repo, "mv", "datautil.py", "data.py")
        files = _files(version)
        for name, text in files.items():
            write(repo, name, _plain(text))
        git(repo, "add", "-A")
        git(repo, "-c", "user.name=d", "-c", "user.email=d@x", "commit", "-qm", version)
        hand = repo.parent / f"hand-{version}"
        hand.mkdir()
        git(hand, "init", "-q")
        procs = [_record(repo, files, typed=False), _record(hand, files, typed=True)]
        for p in procs:
            _, err = p.communicate(timeout=300)
            assert p.returncode == 0, err
        hands[version] = Store(str(hand / ".flor"))
    for name, text in _files("v2").items():  # today: v2 with the statements in model.py and data.py
        write(repo, name, _typed_in(text))
    return repo, hands


def _values(store: Store, name: str, source: str) -> list:
    t = read_logs(store, [name]).to_pandas()
    t = t[t["source"] == source].sort_values(["iter0", "iter1", "seq"], na_position="first")
    return t["value_float"].tolist()


def test_statements_in_other_modules_replay_exactly(project):
    repo, hands = project
    store = Store(str(repo / ".flor"))
    plan = flor_ray.plan_replay(["hnorm", "xmean"], script=str(repo / "train.py"), store=store.url)
    text = plan.explain()
    assert "model.py: +hnorm" in text and "in forward()" in text
    assert "datautil.py: +xmean" in text and "data.py: +xmean" in text  # v1's name for the file
    report = run_plan(plan, progress=False)
    assert report.ok, str(report)
    assert report.fidelity.mismatched == 0
    metas = sorted(load_runs(store), key=lambda m: m["started_at"])  # v1's run, then v2's
    by_version = {"v1": metas[0]["run_id"], "v2": metas[1]["run_id"]}
    for version, hand in hands.items():
        rid = by_version[version]
        for name in ("hnorm", "xmean"):
            replayed = [v for v in _values_of_run(store, rid, name)]
            want = _values(hand, name, "record")
            # every step of 3 epochs x 4 batches, and hnorm in each epoch's evaluation too
            assert len(want) == (15 if name == "hnorm" else 12)
            assert replayed == want, (version, name)


def _values_of_run(store: Store, run_id: str, name: str) -> list:
    t = read_logs(store, [name], [run_id]).to_pandas()
    t = t[t["source"] == "replay"].sort_values(["iter0", "iter1", "seq"], na_position="first")
    return t["value_float"].tolist()


def test_a_module_name_unknown_everywhere_names_the_files(project):
    repo, _ = project
    with pytest.raises(flor_ray.FlorError, match="not logged by today's script .* or a module of its repository"):
        flor_ray.plan_replay(["nope"], script=str(repo / "train.py"), store=str(repo / ".flor"))

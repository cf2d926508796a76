"""Past checkpoints in hand: flor.checkpoints, flor.load_checkpoint, `flor-ray checkpoints`,
in a fresh process with nothing but the store."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import clean_env, git, init_repo, run_script, write

# A training script shaped like the field's: argparse, a DataLoader, a helper module;
# it saves its own weights after each epoch's training (the oracle of this test).
MODEL = '''
import torch.nn as nn


class Net(nn.Module):
    def __init__(self, hidden=16):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, 2))

    def forward(self, x):
        return self.body(x)
'''

TRAIN = '''
import argparse

import torch
from torch.utils.data import DataLoader, TensorDataset

import flor_ray as flor
from model import Net

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=5)
args = parser.parse_args()
torch.manual_seed(0)
X = torch.randn(128, 8)
Y = (X[:, 0] > 0).long()
loader = DataLoader(TensorDataset(X, Y), batch_size=16, shuffle=True)
net = Net()
opt = torch.optim.Adam(net.parameters(), lr=flor.arg("lr", 0.01))
with flor.checkpointing(model=net, optimizer=opt):
    for epoch in flor.loop("epoch", range(args.epochs)):
        for x, y in flor.loop("step", loader):
            loss = torch.nn.functional.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            flor.log("loss", loss.item())
        torch.save(net.state_dict(), f"weights-{epoch}.pt")
        flor.log("acc", (net(X).argmax(1) == Y).float().mean().item())
'''


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    repo = tmp_path_factory.mktemp("ckpt") / "proj"
    repo.mkdir()
    init_repo(repo)
    write(repo, "model.py", MODEL)
    write(repo, "train.py", TRAIN)
    write(repo, ".gitignore", "weights-*.pt\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "v1")
    # every epoch checkpointed: the adaptive period would skip some of these tiny epochs
    run_script(repo, "train.py", env=clean_env(FLOR_CHECKPOINT_BUDGET="1"))
    run_id = json.loads(next((repo / ".flor" / "runs").glob("*.json")).read_text())["run_id"]
    return repo, run_id


def _python(repo: Path, code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=repo, env=clean_env(), capture_output=True, text=True)


def test_checkpoints_lists_each_iteration_with_size_and_time(recorded):
    import flor_ray as flor

    repo, run_id = recorded
    df = flor.checkpoints(run_id, store=str(repo / ".flor"))
    assert df["iteration"].tolist() == [0, 1, 2, 3, 4]
    assert (df["bytes"] > 1000).all() and df["time"].notna().all()
    assert df["path"].str.endswith(".pt").all() and df["verified"].all()


def test_load_checkpoint_restores_the_recorded_state_in_a_fresh_process(recorded):
    repo, run_id = recorded
    out = _python(repo, f'''
import torch, flor_ray as flor
from model import Net
net = Net()
opt = torch.optim.Adam(net.parameters(), lr=0.01)
got = flor.load_checkpoint({run_id!r}, 2, model=net, optimizer=opt)
want = torch.load("weights-2.pt")
assert all(torch.equal(net.state_dict()[k], want[k]) for k in want), "weights differ"
assert opt.state_dict()["state"], "optimizer state not restored"
last = flor.load_checkpoint({run_id!r}, "last", model=net)
assert torch.equal(net.state_dict()["body.0.weight"], torch.load("weights-4.pt")["body.0.weight"])
print(got.iteration, got.objects, last.iteration, got.rng)
''')
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["2", "('model',", "'optimizer')", "4", "False"]


def test_missing_iteration_names_the_nearest(recorded, tmp_path):
    import flor_ray as flor
    from flor_ray.errors import CheckpointError, UnknownRunError

    repo, run_id = recorded
    net = __import__("torch").nn.Linear(1, 1)
    with pytest.raises(CheckpointError, match=r"no checkpoint of iteration 9; the nearest are 3, 4"):
        flor.load_checkpoint(run_id, 9, store=str(repo / ".flor"), model=net)
    with pytest.raises(CheckpointError, match="holds no state for net; it holds model, optimizer"):
        flor.load_checkpoint(run_id, 1, store=str(repo / ".flor"), net=net)
    with pytest.raises(UnknownRunError, match="no run '20990101T000000-abcdef'"):
        flor.checkpoints("20990101T000000-abcdef", store=str(repo / ".flor"))


def test_a_corrupted_checkpoint_is_refused_and_the_others_still_load(recorded, tmp_path):
    import shutil

    import torch

    import flor_ray as flor
    from flor_ray.errors import CheckpointError

    repo, run_id = recorded
    store = tmp_path / "store"
    shutil.copytree(repo / ".flor", store)
    part = store / "checkpoints" / run_id / "000001.pt"
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    with pytest.raises(CheckpointError, match="corrupted"):
        flor.load_checkpoint(run_id, 1, store=str(store), model=torch.nn.Module())
    # a state dict of another shape fails in the object's own load_state_dict, unchanged
    body = torch.nn.Module()
    body.body = net
    assert flor.load_checkpoint(run_id, 0, store=str(store), model=body).iteration == 0


def test_cli_lists_checkpoints(recorded):
    repo, run_id = recorded
    out = subprocess.run([sys.executable, "-m", "flor_ray.cli", "checkpoints", run_id, "--format", "csv"],
                         cwd=repo, env=clean_env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].split(",")[:3] == ["iteration", "bytes", "time"]
    assert [line.split(",")[0] for line in lines[1:]] == ["0", "1", "2", "3", "4"]
    bad = subprocess.run([sys.executable, "-m", "flor_ray.cli", "checkpoints", "../etc"],
                         cwd=repo, env=clean_env(), capture_output=True, text=True)
    assert bad.returncode == 2 and "run id" in bad.stderr

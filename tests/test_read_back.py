"""A script that loads what it saved earlier in the run: the best model reloaded on a
plateau inside the loop (``torch.save(state_dict, path)`` / ``torch.load(path)``) and
loaded after the loop for a test score (``open(path, "wb")`` + ``torch.save(model, f)``,
then ``open(path, "rb")`` + ``torch.load(f)``, as pytorch/examples' word language
model does). The recording keeps the bytes each ``torch.load`` of its own saves read;
a replay reads them at the same place in the script. The oracle is a full
re-execution with the new statements typed in by hand.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

import flor_ray
from flor_ray.execution.driver import LocalRunner, run_plan
from flor_ray.execution.replay_files import ReplayFileError, ReplayFiles
from flor_ray.store import Store
from flor_ray.store.logs import read_logs

from conftest import clean_env, git, init_repo, start_script, write

SCRIPT = '''
import argparse

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import flor_ray as flor

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=6)
parser.add_argument("--lr", type=float, default=0.6)
parser.add_argument("--save", default="model.pt")
parser.add_argument("--best-state", default="best_state.pt")
args = parser.parse_args()
torch.manual_seed(0)
X = torch.randn(200, 12)
Y = X @ torch.randn(12, 1) + 0.3 * torch.randn(200, 1)
Xv, Yv, Xt, Yt = X[:40], Y[:40], X[40:80], Y[40:80]
train = DataLoader(TensorDataset(X[80:], Y[80:]), batch_size=20, shuffle=True)
model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 1))
lr = args.lr
opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)


def evaluate(m, x, y):
    m.eval()
    with torch.no_grad():
        return nn.functional.mse_loss(m(x), y).item()


best_val = None
with flor.checkpointing(model=model, optimizer=opt):
    for epoch in flor.loop("epoch", range(args.epochs)):
        model.train()
        for x, y in flor.loop("step", train):
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        val = evaluate(model, Xv, Yv)
        flor.log("val", val)
        if best_val is None or val < best_val:
            with open(args.save, "wb") as f:
                torch.save(model, f)
            torch.save(model.state_dict(), args.best_state)
            best_val = val
        else:  # no improvement: back to the best weights, and anneal the learning rate
            model.load_state_dict(torch.load(args.best_state))
            lr /= 4.0
            for group in opt.param_groups:
                group["lr"] = lr
        #OUTER
with open(args.save, "rb") as f:
    model = torch.load(f, weights_only=False)
flor.log("test", evaluate(model, Xt, Yt))
#AFTER
'''
OUTER = 'flor.log("wnorm", model[0].weight.norm().item())'
AFTER = 'flor.log("test_wsum", float(sum(p.sum() for p in model.parameters())))'


def _script(typed: bool) -> str:
    return SCRIPT.replace("#OUTER", OUTER if typed else "").replace("#AFTER", AFTER if typed else "")


def _repo(base: Path, name: str, typed: bool) -> Path:
    (base / name).mkdir()
    repo = init_repo(base / name)
    write(repo, "train.py", _script(typed))
    write(repo, ".gitignore", "*.pt\n.flor/\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "train")
    return repo


def _wait(*procs: subprocess.Popen) -> None:
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err


@pytest.fixture(scope="module")
def hist(tmp_path_factory):
    """proj: the files in the repository (relative paths); outside: in a folder outside
    it; hand: the oracle (the statements typed, flor's own checkpoint every epoch)."""
    base = tmp_path_factory.mktemp("read_back")
    proj, outside, hand = _repo(base, "proj", False), _repo(base, "outside", False), _repo(base, "hand", True)
    ext = base / "elsewhere"
    ext.mkdir()
    _wait(start_script(proj, "train.py"),
          start_script(outside, "train.py", "--save", str(ext / "model.pt"), "--best-state", str(ext / "best.pt")),
          start_script(hand, "train.py", env=clean_env(FLOR_CHECKPOINT_MAX_PERIOD="1")))
    for repo in (proj, outside):
        write(repo, "train.py", _script(True))  # today's script, not committed
    return {"proj": proj, "outside": outside, "hand": hand, "ext": ext}


@pytest.fixture(scope="module")
def runner():
    with LocalRunner() as r:
        yield r


def _meta(repo: Path) -> dict:
    (path,) = (repo / ".flor" / "runs").glob("*.json")
    return json.loads(path.read_text())


def _values(store: Store, name: str, source: str) -> list:
    t = read_logs(store, [name], sources=(source,)).to_pandas()
    return sorted(zip(t["iter0"].fillna(-1), t["value_float"]))


def _replay(runner, repo: Path, names: list[str]):
    plan = flor_ray.plan_replay(names, store=Store(str(repo / ".flor")), script=repo / "train.py")
    return plan, run_plan(plan, runner=runner, progress=False)


def test_the_recording_keeps_what_each_load_of_its_own_saves_read(hist):
    meta = _meta(hist["proj"])
    reads = meta["own_files"]["read_back"]
    proj = hist["proj"]
    at = {(Path(r["path"]).name, r["at"][0]) for r in reads}
    # reloads of the best state on a plateau (in the loop), the best model after it
    assert ("best_state.pt", "loop") in at and ("model.pt", "after") in at, reads
    assert meta["own_files"]["saved"][str(proj / "model.pt")] == {"opened": True}
    store = Store(str(proj / ".flor"))
    for r in reads:
        data = store.read_bytes(r["stored"])
        assert hashlib.sha256(data).hexdigest() == r["sha256"] and len(data) == r["bytes"]
        assert r["stored"].startswith(f"checkpoints/{meta['run_id']}/saved/read-")
    (last,) = [r for r in reads if r["at"][0] == "after"]
    assert last["sha256"] == hashlib.sha256((proj / "model.pt").read_bytes()).hexdigest()
    assert len({r["stored"] for r in reads}) == len({r["sha256"] for r in reads})  # one copy a content


@pytest.mark.parametrize("where", ["proj", "outside"])
def test_a_replay_reads_what_the_recording_read_back_and_equals_the_oracle(hist, runner, where):
    repo, hand = hist[where], Store(str(hist["hand"] / ".flor"))
    user_files = {p: p.read_bytes() for p in (list(hist["ext"].iterdir()) if where == "outside"
                                               else [repo / "model.pt", repo / "best_state.pt"])}
    assert len(user_files) == 2
    for p in user_files:  # the user's latest files, which a replay must neither read nor write
        p.write_bytes(b"the user's newer model")
    try:
        plan, report = _replay(runner, repo, ["wnorm", "test_wsum"])
        assert not report.failed, str(report)
        store = Store(str(repo / ".flor"))
        for name in ("wnorm", "test_wsum"):
            got, want = _values(store, name, "replay"), _values(hand, name, "record")
            assert got == want and want, name
        assert report.fidelity.compared > 0 and report.fidelity.mismatched == 0, str(report)
        assert all(p.read_bytes() == b"the user's newer model" for p in user_files)
    finally:
        for p, data in user_files.items():
            p.write_bytes(data)


def test_a_damaged_kept_copy_fails_the_task_and_says_so(hist, runner):
    repo = hist["proj"]
    meta = _meta(repo)
    (after,) = [r for r in meta["own_files"]["read_back"] if r["at"][0] == "after"]
    kept = repo / ".flor" / after["stored"]
    good = kept.read_bytes()
    kept.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    try:
        _, report = _replay(runner, repo, ["test_wsum"])
        (why,) = {r.error for r in report.failed}
        assert "is not the bytes it read (damaged)" in why and after["stored"] in why, why
    finally:
        kept.write_bytes(good)


def test_reads_at_one_place_get_the_recorded_contents_in_order(tmp_path):
    """Two reads of one file at the same place with different contents: the n-th read
    gets the n-th; a read more is refused; elsewhere nothing is served."""
    store = Store(str(tmp_path / "store"))
    contents = [b"first", b"second"]
    reads = []
    for data in contents:
        digest = hashlib.sha256(data).hexdigest()
        rel = f"checkpoints/r/saved/read-{digest}.pt"
        store.write_bytes(rel, data)
        reads.append({"path": str(tmp_path / "repo" / "m.pt"), "at": ["loop", "epoch", 3], "sha256": digest,
                      "bytes": len(data), "stored": rel})
    files = ReplayFiles(str(tmp_path / "tree"), {"repo_root": str(tmp_path / "repo"), "read_back": reads,
                                                 "saved": {str(tmp_path / "repo" / "m.pt"): {"opened": True}}}, "r")
    here = ["loop", "epoch", 3]
    files.position, files.fetch = (lambda: here), store.read_bytes
    files._real.update(open=open, replace=os.replace, stat=os.stat)  # the rules alone, not installed
    path = tmp_path / "tree" / "m.pt"  # the scratch copy's path of the recorded file
    assert Path(files.served(path, count=False)).read_bytes() == b"first"
    assert [Path(files.served(path)).read_bytes() for _ in contents] == contents
    with pytest.raises(ReplayFileError, match="reads .* 3 times at .* where the recording read it 2 times"):
        files.served(path)
    here = ["loop", "epoch", 4]
    assert files.served(path) is None


def test_a_read_back_that_cannot_be_kept_leaves_the_run_going(tmp_path):
    """The store refusing the kept copy: the script's own load still works, said once;
    the run has no read-back, so a replay will refuse rather than guess."""
    from conftest import run_script

    repo = init_repo(tmp_path)
    faulty = ("from flor_ray.record.session import RecordSession\n"
              "def _refuse(self, digest, suffix, data):\n"
              "    raise OSError('the store refused it')\n"
              "RecordSession._keep_read_back = _refuse\n")
    write(repo, "train.py", faulty + _script(False).replace('parser.add_argument("--epochs", type=int, default=6)',
                                                            'parser.add_argument("--epochs", type=int, default=3)'))
    write(repo, ".gitignore", "*.pt\n.flor/\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "train")
    proc = run_script(repo, fork=False)
    assert proc.stderr.count("could not keep") >= 1 and "the store refused it" in proc.stderr, proc.stderr
    meta = _meta(repo)
    assert meta["status"] == "finished" and "read_back" not in meta["own_files"]
    assert (repo / "model.pt").exists()

"""Files git ignores, kept in the repository and read by relative paths: a dataset read
with numpy, ``open``, ``glob``, ``os.listdir``, ``os.walk`` and ``Path.iterdir``, probed
with ``os.path.exists``, and a cache the script writes next to it. The replay's scratch
copy holds the snapshot only, so the replay reads them in the recorded repository, as
the run found them: a file added or changed since reads as absent, and a changed file
that the script opens is refused with the reason. The oracle is a full re-execution
with the new statements typed in by hand.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

import flor_ray
from flor_ray.execution.driver import LocalRunner, run_plan
from flor_ray.store import Store
from flor_ray.store.logs import read_logs

from conftest import git, init_repo, run_script, write

SCRIPT = '''
import argparse
import glob
import os
from pathlib import Path

import numpy as np
import torch

import flor_ray as flor

parser = argparse.ArgumentParser()
parser.add_argument("--data", default="data")
parser.add_argument("--epochs", type=int, default=4)
args = parser.parse_args()
X = torch.tensor(np.loadtxt(os.path.join(args.data, "x.csv"), delimiter=","), dtype=torch.float32)
with open(os.path.join(args.data, "labels.txt")) as f:
    Y = torch.tensor([float(v) for v in f.read().split()]).unsqueeze(1)
shards = sorted(glob.glob(os.path.join(args.data, "shards", "part-*.txt")))
listed = sorted(os.listdir(os.path.join(args.data, "shards")))
walked = sorted(name for _, _, names in os.walk(args.data) for name in names)
assets = sorted(p.name for p in Path("assets").iterdir())
have_x = os.path.exists(os.path.join(args.data, "x.csv"))
bias = sum(float(Path(s).read_text()) for s in shards)
with open(os.path.join(args.data, "cache.txt"), "w") as f:  # a cache next to the data
    f.write(f"{bias} {len(walked)}")
torch.manual_seed(0)
model = torch.nn.Linear(X.shape[1], 1)
opt = torch.optim.SGD(model.parameters(), lr=0.05)


def train_step(m, o):
    o.zero_grad()
    loss = ((m(X) + bias - Y) ** 2).mean()
    loss.backward()
    o.step()
    return loss.item()


with flor.checkpointing(model=model, opt=opt):
    for epoch in flor.loop("epoch", range(args.epochs)):
        loss = train_step(model, opt)
        flor.log("loss", loss)
#AFTER
'''
AFTER = ('flor.log("final_w", float(model.weight.sum()))\n'
         'flor.log("data_seen", float(len(shards) * 1000 + len(listed) * 100 + len(walked) * 10 + len(assets) + have_x))'
         '\nflor.log("assets", ",".join(assets))')


def _repo(base: Path, name: str, typed: bool) -> Path:
    (base / name).mkdir()
    repo = init_repo(base / name)
    write(repo, "train.py", SCRIPT.replace("#AFTER", AFTER if typed else ""))
    write(repo, ".gitignore", "data/\nassets/extra.txt\n.flor/\n")
    write(repo, "assets/README", "kept in git")
    write(repo, "assets/extra.txt", "ignored by git")
    rows = [[(i * 7 + j * 3) % 11 / 10 for j in range(3)] for i in range(24)]
    write(repo, "data/x.csv", "\n".join(",".join(str(v) for v in r) for r in rows) + "\n")
    write(repo, "data/labels.txt", " ".join(str((i % 5) / 4) for i in range(24)) + "\n")
    for k in range(3):
        write(repo, f"data/shards/part-{k}.txt", str(0.01 * (k + 1)))
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "train")
    return repo


@pytest.fixture(scope="module")
def hist(tmp_path_factory):
    base = tmp_path_factory.mktemp("ignored")
    proj, hand = _repo(base, "proj", False), _repo(base, "hand", True)
    time.sleep(0.2)  # the data's change stamps well before the runs' start
    # plain processes: the cache the script writes comes well after the process's start
    run_script(proj, fork=False)
    run_script(hand, fork=False)
    write(proj, "train.py", SCRIPT.replace("#AFTER", AFTER))  # today's script, not committed
    write(proj, "data/shards/part-9.txt", "5.0")  # a shard added since the run
    return proj, hand


def _values(store: Store, name: str, source: str) -> list:
    t = read_logs(store, [name], sources=(source,)).to_pandas()
    return sorted(zip(t["vtype"], t["value_float"].fillna(0), t["value_str"].fillna("")))


def _replay(proj: Path, names: list[str]):
    plan = flor_ray.plan_replay(names, store=Store(str(proj / ".flor")), script=proj / "train.py")
    with LocalRunner() as runner:
        return plan, run_plan(plan, runner=runner, progress=False)


def test_a_replay_reads_the_ignored_data_as_the_run_found_it_and_equals_the_oracle(hist):
    proj, hand = hist
    data_before = {p: p.read_bytes() for p in (proj / "data").rglob("*") if p.is_file()}
    plan, report = _replay(proj, ["final_w", "data_seen", "assets"])
    assert not report.failed, str(report)
    # logged after the loop only: one task, the last checkpoint restored, no iteration re-executed
    (task,) = plan.tasks
    assert (task.mode, task.start, task.stop, task.after) == ("skip", 3, 3, True), plan.explain()
    for name in ("final_w", "data_seen", "assets"):
        assert _values(Store(str(proj / ".flor")), name, "replay") == _values(Store(str(hand / ".flor")), name,
                                                                           "record"), name
    assert _values(Store(str(hand / ".flor")), "assets", "record") == [("str", 0.0, "README,extra.txt")]
    # the shard added since the run is not seen, and says so; the cache went into the scratch copy
    assert any("part-9.txt read as absent: it changed after the run started" in n for n in report.fallbacks), \
        str(report)
    assert {p: p.read_bytes() for p in (proj / "data").rglob("*") if p.is_file()} == data_before
    assert report.fidelity.mismatched == 0


def test_a_changed_ignored_file_the_script_opens_is_refused(hist):
    proj, _ = hist
    labels = proj / "data" / "labels.txt"
    before = labels.read_bytes()
    labels.write_text(" ".join("1" for _ in range(24)) + "\n")  # the data made again
    try:
        for f in (proj / ".flor").rglob("*.parquet"):
            if "source=replay" in str(f):
                f.unlink()
        _, report = _replay(proj, ["final_w"])
        (why,) = {r.error for r in report.failed}
        assert f"reads {labels}, which git ignores" in why and "has changed since the run started" in why, why
    finally:
        labels.write_bytes(before)
        os.utime(labels, (0, 0))  # as old as it was: before the run

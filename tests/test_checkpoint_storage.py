"""Checkpoint storage: tensors stored once across a run's checkpoints, `flor-ray du`,
`flor-ray gc` under a retention policy, replays still exact after both."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import time

import pytest

import flor_ray
from flor_ray.cli import main
from flor_ray.errors import CheckpointError, RetentionError
from flor_ray.execution.driver import run_plan
from flor_ray.planning.plan import ClusterSnapshot
from flor_ray.store import Store
from flor_ray.store.checkpoints import load_snapshot, manifest
from flor_ray.store.logs import read_logs
from flor_ray.store.retention import Policy, collect

from conftest import clean_env, git, start_script, write

# An embedding and a backbone, frozen; a head trained with AdamW, a step schedule,
# a DataLoader shuffling with its own generator. `#WNORM` marks today's statement.
SCRIPT = '''
import argparse

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import flor_ray as flor

p = argparse.ArgumentParser()
p.add_argument("--epochs", type=int, default=4)
cli = p.parse_args()
torch.manual_seed(0)
lr = flor.arg("lr", 0.05)
tokens = torch.randint(0, 1000, (128, 6))
labels = (tokens[:, 0] % 2).long()
loader = DataLoader(TensorDataset(tokens, labels), batch_size=16, shuffle=True,
                    generator=torch.Generator().manual_seed(1))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(1000, 64)
        self.backbone = nn.Sequential(nn.Linear(64, 256), nn.Tanh())
        self.head = nn.Linear(256, 16)
        self.out = nn.Linear(16, 2)

    def forward(self, x):
        return self.out(torch.relu(self.head(self.backbone(self.embed(x).mean(1)))))


net = Net()
for part in (net.embed, net.backbone):
    part.requires_grad_(False)
opt = torch.optim.AdamW([q for q in net.parameters() if q.requires_grad], lr=lr)
sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)


def train_step(x, y):
    loss = nn.functional.cross_entropy(net(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


with flor.checkpointing(net=net, opt=opt, sched=sched):
    for epoch in flor.loop("epoch", range(cli.epochs)):
        for x, y in flor.loop("step", loader):
            flor.log("loss", train_step(x, y))
        sched.step()
        #WNORM
        flor.log("lr_now", sched.get_last_lr()[0])
'''
WNORM = 'flor.log("wnorm", float(sum(q.double().norm() ** 2 for q in net.head.parameters())))'
RUNS = ("0.05", "0.1")


def typed(with_statement: bool) -> str:
    return SCRIPT.replace("#WNORM", WNORM if with_statement else "pass")


def _record(cwd, lr, env):
    return start_script(cwd, "train.py", "--kwargs", f"lr={lr}", env=env)


@pytest.fixture(scope="module")
def history(tmp_path_factory):
    """Two recorded runs (a checkpoint every epoch) and, per run, a full execution of
    the script with the statement typed in by hand (its own store)."""
    base = tmp_path_factory.mktemp("ckptstore")
    repo = base / "proj"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    write(repo, "train.py", typed(False))
    git(repo, "add", "train.py")
    git(repo, "-c", "user.name=d", "-c", "user.email=d@x", "commit", "-qm", "v1")
    procs, hands = [], {}
    for lr in RUNS:
        procs.append(_record(repo, lr, clean_env(FLOR_CHECKPOINT_MAX_PERIOD="1", FLOR_CHECKPOINT_BUDGET="1")))
        hand = base / f"hand-{lr}"
        hand.mkdir()
        git(hand, "init", "-q")
        write(hand, "train.py", typed(True))
        hands[float(lr)] = Store(str(hand / ".flor"))
        procs.append(_record(hand, lr, clean_env()))
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    write(repo, "train.py", typed(True))  # today's version, not committed
    store = Store(str(repo / ".flor"))
    runs = flor_ray.runs(store=store)
    by_lr = {float(lr): rid for rid, lr in zip(runs["run_id"], runs["lr"])}
    return repo, store, by_lr, hands


def _copy(history, tmp_path):
    repo, store, by_lr, hands = history
    dst = tmp_path / "proj"
    shutil.copytree(repo, dst, ignore=shutil.ignore_patterns("source=replay", "replays"))
    return dst, Store(str(dst / ".flor")), by_lr, hands


def _files(root) -> dict[str, int]:
    out = {}
    for folder, _, names in os.walk(root):
        for n in names:
            path = os.path.join(folder, n)
            out[os.path.relpath(path, root)] = os.path.getsize(path)
    return out


def _replayed(store, plan, by_lr, name):
    t = read_logs(store, [name], sources=("replay",)).to_pandas()
    t = t[t["task"].isin({task.key for task in plan.tasks})]
    lr_of = {rid: lr for lr, rid in by_lr.items()}
    return sorted((lr_of[r], int(e), v) for r, e, v in zip(t["run_id"], t["iter0"], t["value_float"]))


def _by_hand(hands, name):
    out = []
    for lr, st in hands.items():
        t = read_logs(st, [name], sources=("record",)).to_pandas()
        out += [(lr, int(e), v) for e, v in zip(t["iter0"], t["value_float"])]
    return sorted(out)


# ------------------------------------------------------------------ storage
def test_frozen_backbone_second_checkpoint_stores_only_what_changed(history):
    _, store, by_lr, _ = history
    for rid in by_lr.values():
        entries = manifest(store, rid)
        assert [e["iteration"] for e in entries] == [0, 1, 2, 3]
        first, second = entries[0]["stored_bytes"], entries[1]["stored_bytes"]
        # the embedding (256 KB) and backbone (66 KB) are stored once, with the first
        assert second < first / 4, (first, second)
        files = _files(os.path.join(store.root, "checkpoints", rid))
        assert sum(files.values()) == sum(e["stored_bytes"] for e in entries)
        objects = [p for p in files if p.startswith("objects" + os.sep)]
        assert len(objects) == sum(e["new_objects"] for e in entries) < sum(e["objects"] for e in entries)
        table = flor_ray.checkpoints(rid, store=store)
        assert list(table["stored_bytes"]) == [e["stored_bytes"] for e in entries]
        full = sum(len(_full_copy(store, e)) for e in entries)
        assert sum(files.values()) < full / 2, (sum(files.values()), full)


def _full_copy(store, entry) -> bytes:
    from flor_ray.record.checkpoint import serialize

    return serialize(load_snapshot(store, entry))


def test_deduplicated_checkpoint_restores_the_state_bit_for_bit_and_full_copies_stay_readable(history, tmp_path):
    import torch

    dst, st, by_lr, _ = _copy(history, tmp_path)
    rid = by_lr[0.1]
    entry = manifest(st, rid)[2]
    snap = load_snapshot(st, entry)
    # an old store's full copy of the same checkpoint, in place of the skeleton
    data = _full_copy(st, entry)
    meta = st.read_json(f"runs/{rid}.json")
    for e in meta["checkpoints"]:
        if e["iteration"] == 2:
            e.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
            for k in ("format", "objects", "new_objects", "stored_bytes"):
                e.pop(k)
    st.write_bytes(entry["path"], data)
    st.write_json(f"runs/{rid}.json", meta)
    old = load_snapshot(st, manifest(st, rid)[2])
    flat = lambda s: dict(s["objects"]["net"])  # noqa: E731
    assert flat(old).keys() == flat(snap).keys()
    for k, v in flat(snap).items():
        assert v.dtype == flat(old)[k].dtype and torch.equal(v, flat(old)[k]), k
    assert torch.equal(old["rng"]["torch"], snap["rng"]["torch"])
    # two equal optimizer buffers come back as two tensors, not one shared
    states = [s for s in snap["objects"]["opt"]["state"].values()]
    assert all(a["exp_avg"].data_ptr() != b["exp_avg"].data_ptr() for a in states for b in states if a is not b)


def test_a_damaged_object_is_found_and_named(history, tmp_path):
    dst, st, by_lr, _ = _copy(history, tmp_path)
    rid = by_lr[0.05]
    obj_dir = os.path.join(st.root, "checkpoints", rid, "objects")
    name = sorted(os.listdir(obj_dir))[0]
    path = os.path.join(obj_dir, name)
    data = bytearray(open(path, "rb").read())
    data[-10] ^= 0x5A
    open(path, "wb").write(bytes(data))
    damaged = [e for e in manifest(st, rid) if _refs(st, e) & {f"checkpoints/{rid}/objects/{name}"}]
    assert damaged
    with pytest.raises(CheckpointError, match=f"{name} is corrupted"):
        load_snapshot(st, damaged[0])


def _refs(store, entry) -> set[str]:
    import torch

    from flor_ray.record.ckpt_objects import refs
    from flor_ray.store.checkpoints import read_verified

    return refs(torch.load(io.BytesIO(read_verified(store, entry)), weights_only=True))


def test_replay_from_deduplicated_checkpoints_is_bit_exact(history, ray_local):
    repo, store, by_lr, hands = history
    plan = flor_ray.plan_replay(["wnorm"], store=store, script=repo / "train.py", cluster=ClusterSnapshot(2))
    assert all(t.mode == "skip" for t in plan.tasks), plan.explain()
    report = run_plan(plan, progress=False)
    assert report.ok, str(report)
    assert _replayed(store, plan, by_lr, "wnorm") == _by_hand(hands, "wnorm")


def test_a_damaged_shared_tensor_is_routed_around_and_the_replay_stays_exact(history, tmp_path, ray_local):
    dst, st, by_lr, hands = _copy(history, tmp_path)
    rid = by_lr[0.05]
    obj_dir = os.path.join(st.root, "checkpoints", rid, "objects")
    biggest = max(os.listdir(obj_dir), key=lambda n: os.path.getsize(os.path.join(obj_dir, n)))
    path = os.path.join(obj_dir, biggest)  # the frozen embedding: every checkpoint of the run holds it
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x5A
    open(path, "wb").write(bytes(data))
    plan = flor_ray.plan_replay(["wnorm"], store=st, script=dst / "train.py", where="lr = 0.05",
                                iterations="2:", cluster=ClusterSnapshot(2))
    report = run_plan(plan, progress=False)
    assert report.ok, str(report)
    assert f"{biggest} is corrupted" in "\n".join(report.fallbacks)
    assert _replayed(st, plan, by_lr, "wnorm") == [r for r in _by_hand(hands, "wnorm") if r[0] == 0.05 and r[1] >= 2]


# ---------------------------------------------------------------------- du
def test_du_sums_match_the_files(history, capsys):
    _, store, by_lr, _ = history
    assert main(["du", "--runs", "--store", store.root]) == 0
    out = capsys.readouterr().out
    files = _files(store.root)
    rows = {ln[:20].strip(): ln[20:].split() for ln in out.splitlines()[1:] if ln.strip() and not ln.startswith(" ")}
    assert int(rows["total"][1]) == sum(files.values()) and int(rows["total"][0]) == len(files)
    ckpt = sum(b for p, b in files.items() if p.startswith("checkpoints") and os.sep + "objects" + os.sep not in p)
    objs = sum(b for p, b in files.items() if os.sep + "objects" + os.sep in p and p.startswith("checkpoints"))
    logs = sum(b for p, b in files.items() if p.startswith("logs"))
    assert (int(rows["checkpoints"][1]), int(rows["checkpoint objects"][1]), int(rows["logs"][1])) == (ckpt, objs, logs)
    for rid in by_lr.values():
        line = next(ln for ln in out.splitlines() if ln.startswith(rid))
        mine = sum(b for p, b in files.items() if rid in p)
        assert int(line.split()[-1]) == mine


# ---------------------------------------------------------------------- gc
def test_gc_without_a_policy_is_refused_and_dry_run_deletes_nothing(history, tmp_path, capsys):
    dst, st, by_lr, _ = _copy(history, tmp_path)
    before = _files(st.root)
    with pytest.raises(RetentionError, match="state a retention policy"):
        collect(st, Policy())
    assert main(["gc", "--keep-every", "2", "--dry-run", "--store", st.root]) == 0
    out = capsys.readouterr().out
    assert _files(st.root) == before
    for rid in by_lr.values():
        assert f"would delete checkpoints/{rid}/000001.pt" in out
        assert f"checkpoints/{rid}/000002.pt" not in out and f"checkpoints/{rid}/000003.pt" not in out
    report = collect(st, Policy(keep_every=2), dry_run=True)
    assert f"would delete 2 checkpoints, {report.bytes} bytes" in out and report.objects


def test_gc_keeps_what_the_policy_says_and_replays_stay_exact(history, tmp_path, ray_local):
    dst, st, by_lr, hands = _copy(history, tmp_path)
    rid, kept_whole = by_lr[0.1], by_lr[0.05]
    before = _files(st.root)
    report = collect(st, Policy(keep_every=2, where="lr = 0.05"))
    assert [(c.run_id, c.iteration) for c in report.checkpoints] == [(rid, 1)]
    after = _files(st.root)
    gone = set(before) - set(after)
    assert sum(before[p] for p in gone) == report.bytes
    assert {p for p in gone if not p.endswith(".json")} == \
        {os.path.join("checkpoints", rid, "000001.pt")} | {p.replace("/", os.sep) for p, _ in report.objects}
    assert [e["iteration"] for e in manifest(st, rid)] == [0, 2, 3]
    assert [e["iteration"] for e in manifest(st, kept_whole)] == [0, 1, 2, 3]
    for e in manifest(st, rid):  # every kept checkpoint still loads: its objects are there
        load_snapshot(st, e)
    with pytest.raises(CheckpointError, match="checkpoint 1 of run .* was deleted by flor-ray gc .*nearest kept are 0, 2"):
        flor_ray.load_checkpoint(rid, 1, store=st, net=Holder())
    held = Holder()
    flor_ray.load_checkpoint(rid, 2, store=st, net=held)
    assert tuple(held.state["head.weight"].shape) == (16, 256)
    plan = flor_ray.plan_replay(["wnorm"], store=st, script=dst / "train.py", cluster=ClusterSnapshot(2))
    text = plan.explain()
    assert f"Collected[run={rid} iteration=1] checkpoint checkpoints/{rid}/000001.pt was deleted by flor-ray gc" in text
    assert "no checkpoint for iteration 1: re-executes from checkpoint 0" in text
    report = run_plan(plan, progress=False)
    assert report.ok, str(report)
    assert _replayed(st, plan, by_lr, "wnorm") == _by_hand(hands, "wnorm")


class Holder:
    """An object flor.load_checkpoint restores into: it keeps the state it is given."""

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        self.state = state


SLOW = '''
import os
import time

import torch

import flor_ray as flor

net = torch.nn.Linear(64, 64)
with flor.checkpointing(net=net):
    for epoch in flor.loop("epoch", range(3)):
        with torch.no_grad():
            net.weight.add_(1.0)
        flor.log("w", float(net.weight.sum()))
        while epoch == 1 and not os.path.exists("go"):
            time.sleep(0.05)
'''


def test_gc_never_touches_a_run_that_is_recording(tmp_path, repo):
    write(repo, "slow.py", SLOW)
    git(repo, "add", "slow.py")
    git(repo, "commit", "-qm", "slow")
    st = Store(str(repo / ".flor"))
    env = clean_env(FLOR_CHECKPOINT_MAX_PERIOD="1", FLOR_CHECKPOINT_BUDGET="1")
    proc = subprocess.Popen([sys.executable, "slow.py"], cwd=repo, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            runs = flor_ray.runs(store=st) if st.exists("runs") else None
            if runs is not None and len(runs) and len(manifest(st, runs["run_id"][0])) >= 1:
                break
            time.sleep(0.2)
        rid = runs["run_id"][0]
        before = _files(st.root)
        report = collect(st, Policy(keep_last_runs=0))
        assert [r for r, _ in report.skipped] == [rid] and "still recording" in report.skipped[0][1]
        assert not report.checkpoints
        assert {p: b for p, b in _files(st.root).items() if "checkpoints" in p} == \
            {p: b for p, b in before.items() if "checkpoints" in p}
    finally:
        (repo / "go").write_text("")
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    report = collect(st, Policy(keep_last_runs=0))  # finished now: the policy applies
    assert [c.iteration for c in report.checkpoints] == [0, 1, 2] and not manifest(st, rid)
    assert not [p for p in _files(st.root) if "checkpoints" in p]

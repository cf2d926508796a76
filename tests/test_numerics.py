"""The numerics environment (threads, flags, dtype) recorded with a run and restored in
every replay task, on real processes, a real zygote and a real local Ray."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

import flor_ray
from flor_ray.execution.driver import run_plan
from flor_ray import numerics
from flor_ray.planning.plan import ClusterSnapshot, Resources
from flor_ray.store.logs import read_logs
from flor_ray.store.runs import load_runs
from flor_ray.store import Store

from conftest import clean_env, git, run_script, start_script, write

# An LSTM sequence classifier: its head's weight gradient sums over a batch of 256,
# which torch/MKL split by the intra-op thread count, so 1 and 2 threads give other
# bits from the first step on (checked on a 2-core machine for this shape).
TRAIN = '''
"""Sequence classifier: embedding, LSTM, linear head; SGD with a step schedule."""
import argparse
import os
import random

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import flor_ray as flor

VOCAB, SEQ, CLASSES = 32, 12, 10


class Classifier(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        self.lstm = nn.LSTM(16, hidden, batch_first=True)
        self.head = nn.Linear(hidden, CLASSES)

    def forward(self, x):
        out, _ = self.lstm(self.emb(x))
        return self.head(out[:, -1])


def make_data(n):
    x = torch.randint(0, VOCAB, (n, SEQ))
    return TensorDataset(x, x[:, -1] % CLASSES)


def grad_norm(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    #THREADS
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    lr = flor.arg("lr", 0.02)
    loader = DataLoader(make_data(1536), batch_size=args.batch, shuffle=True)
    model = Classifier(args.hidden)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with flor.checkpointing(model=model, opt=opt, sched=sched):
        for epoch in flor.loop("epoch", range(flor.arg("epochs", 2))):
            model.train()
            for x, y in flor.loop("step", loader):
                loss = nn.functional.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                #GNORM
                opt.step()
                flor.log("loss", loss.item())
            sched.step()


if __name__ == "__main__":
    main()
'''
GNORM = 'flor.log("gnorm", grad_norm(model))'


#: a launcher's thread choice, else one per core: decided by the machine, not the code
PINNED = 'torch.set_num_threads(int(os.environ.get("TRAIN_THREADS", os.cpu_count())))'


def _script(with_gnorm: bool, pinned: bool = False) -> str:
    return TRAIN.replace("#GNORM", GNORM if with_gnorm else "").replace("#THREADS", PINNED if pinned else "")


def _py(code: str, env: dict | None = None) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env or clean_env(),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


# ------------------------------------------------------------------ unit
def test_capture_restore_round_trip_in_fresh_processes():
    changed = json.loads(_py('''
        import json, torch
        from flor_ray import numerics
        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.set_default_dtype(torch.float64)
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        print(json.dumps(numerics.capture()))
    '''))
    default = json.loads(_py('import json, torch\nfrom flor_ray import numerics\nprint(json.dumps(numerics.capture()))'))
    assert changed["intra_op_threads"] == 1 and changed["deterministic"] and changed["default_dtype"] == "float64"
    assert changed["fp32_precision"]["mkldnn.matmul"] == "bf16"
    assert changed != default  # the settings are seen, not just read back
    after = json.loads(_py(f'''
        import json, torch
        from flor_ray import numerics
        numerics.restore(json.loads({json.dumps(json.dumps(changed))}))
        print(json.dumps(numerics.capture()))
    '''))
    assert after == changed
    assert numerics.differences(changed, after) == []
    assert any("intra-op thread" in d for d in numerics.differences(changed, default))


def test_differences_name_what_cannot_be_restored():
    here = json.loads(_py('import json, torch\nfrom flor_ray import numerics\nprint(json.dumps(numerics.capture()))'))
    more = {**here, "intra_op_threads": here["cores"] * 4}
    gpu = {**here, "cuda": {"device": "NVIDIA A100-SXM4-80GB", "capability": "8.0", "cuda": "12.4", "cudnn": 90100}}
    cpu = {**here, "cpu_capability": "NOT-" + str(here["cpu_capability"])}
    d = numerics.differences
    assert d(here, here) == []
    assert any(f"replayed with {here['intra_op_threads']}" in x for x in d(more, here))
    here_more = {**here, "intra_op_threads": more["intra_op_threads"]}  # restored, on too few cores
    assert any(f"this node has {here['cores']} cores" in x for x in d(more, here_more))
    assert d(gpu, here) == ["recorded on GPU NVIDIA A100-SXM4-80GB, replayed without CUDA"]
    assert any("CPU vector capability" in x for x in d(cpu, here))


def test_replay_env_takes_the_recorded_thread_variables():
    rec = {"env": {"MKL_CBWR": "AVX2"}, "intra_op_threads": 6}
    ray_worker = {"OMP_NUM_THREADS": "1", "PATH": "/bin", "MKL_NUM_THREADS": "1"}
    assert numerics.replay_env(rec, ray_worker) == {"PATH": "/bin", "MKL_CBWR": "AVX2", "OMP_NUM_THREADS": "6"}
    assert numerics.replay_env({**rec, "env": {"OMP_NUM_THREADS": "3"}}, ray_worker) == {
        "PATH": "/bin", "OMP_NUM_THREADS": "3"}
    assert numerics.replay_env(None, ray_worker) == ray_worker  # a run recorded without numerics


def test_zygote_child_restores_threads_of_a_default_process(tmp_path):
    """A zygote started under Ray's OMP_NUM_THREADS=1 (torch imported with one
    thread) forks a child that gets the recording's threads and computes the bits
    of a default process."""
    probe = tmp_path / "probe.py"
    probe.write_text(textwrap.dedent('''
        import hashlib, json, torch
        torch.manual_seed(0)
        grads = []
        for batch, features in ((256, 256), (1024, 64)):  # sums over the batch, split by thread
            lin = torch.nn.Linear(features, 10)
            lin(torch.randn(batch, features)).square().sum().backward()
            grads.append(lin.weight.grad.numpy().tobytes())
        print(json.dumps({"threads": torch.get_num_threads(), "bits": hashlib.sha256(b"".join(grads)).hexdigest()}))
    '''))
    default = json.loads(_py(f'''
        import json, runpy, sys, io, contextlib, torch
        from flor_ray import numerics
        rec = numerics.capture()
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            runpy.run_path({str(probe)!r}, run_name="__main__")
        print(json.dumps({{"numerics": rec, "out": json.loads(buf.getvalue())}}))
    '''))
    z = subprocess.Popen([sys.executable, "-m", "flor_ray.execution.zygote"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, env=clean_env(OMP_NUM_THREADS="1"))
    try:
        assert z.stdout.readline()
        outs = {}
        for label, rec in (("restored", default["numerics"]), ("as Ray left it", None)):
            out = tmp_path / f"{len(outs)}.out"
            env = numerics.replay_env(rec, clean_env(OMP_NUM_THREADS="1"))
            req = {"script": str(probe), "argv": [], "cwd": str(tmp_path), "env": env, "stdout": str(out),
                   "stderr": str(tmp_path / "err"), "numerics": rec}
            z.stdin.write(json.dumps(req) + "\n")
            z.stdin.flush()
            assert json.loads(z.stdout.readline())["code"] == 0, (tmp_path / "err").read_text()
            outs[label] = json.loads(out.read_text())
    finally:
        z.stdin.close()
        z.wait(timeout=30)
    assert outs["restored"] == default["out"]
    assert outs["as Ray left it"]["threads"] == 1
    if default["out"]["threads"] > 1:  # the bug this guards against, on a multi-core machine
        assert outs["as Ray left it"]["bits"] != default["out"]["bits"]


def test_plan_sizes_task_cpus_from_recorded_threads():
    """Pure planning: 4 recorded threads ask for 4 CPUs, at most a node's; resources win."""
    import dataclasses

    from flor_ray.planning.make import make_plan
    from flor_ray.planning.plan import CheckpointRef, RunInfo, VersionPatch

    base = RunInfo(run_id="r1", version="v1", script="train.py", args=(), argv=(), cwd=".", iterations=4,
                   checkpoints=tuple(CheckpointRef(i, 1, f"c/{i}.pt", 1000, "x") for i in range(4)),
                   setup_s=1.0, outer_s=(5.0,) * 4, inner_s=(4.5,) * 4, logged=frozenset({"loss"}),
                   numerics={"intra_op_threads": 4, "inter_op_threads": 4, "env": {}, "default_dtype": "float32"})
    patch = VersionPatch("v1", "code", None, (), (("gnorm", "inner", "in the step loop", ()),), ("gnorm",))

    def plan(run=base, **kw):
        return make_plan(names=["gnorm"], where=None, iterations="all", runs=[run], patches={"v1": patch},
                         store_url="memory://s", **kw)

    p = plan(cluster=ClusterSnapshot(8.0))
    assert {t.num_cpus for t in p.tasks} == {4.0} and p.slots == 2
    assert "Numerics[run=r1 threads=4 interop=4 OMP_NUM_THREADS=unset" in p.explain()
    small = plan(cluster=ClusterSnapshot(8.0, nodes=4, node_cpus=2.0))
    assert {t.num_cpus for t in small.tasks} == {2.0}
    assert "capped to the largest node's 2 CPUs; threads restored to 4" in small.explain()
    user = plan(cluster=ClusterSnapshot(8.0), resources=Resources(num_cpus=1))
    assert {t.num_cpus for t in user.tasks} == {1.0} and user.slots == 8
    assert "4 threads on 1 CPU may oversubscribe" in user.explain()
    old = plan(run=dataclasses.replace(base, numerics=None), cluster=ClusterSnapshot(8.0))
    assert {t.num_cpus for t in old.tasks} == {1.0} and "Numerics[run=r1 not recorded]" in old.explain()


# ------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def history(tmp_path_factory, ray_local):
    """Two recorded runs: train.py at default threads (lr=0.02), and train_pinned.py
    (lr=0.01), whose code sets the threads from its launcher's TRAIN_THREADS=1 else
    from the machine's cores (no replay can know the former); the hand-typed oracle:
    today's train.py (gnorm typed in) run in full at default threads."""
    root = tmp_path_factory.mktemp("numerics")
    repo = root / "proj"
    repo.mkdir()
    git(repo, "init", "-q")
    write(repo, "train.py", _script(False))
    write(repo, "train_pinned.py", _script(False, pinned=True))
    hand = root / "hand"
    hand.mkdir()
    git(hand, "init", "-q")
    write(hand, "train.py", _script(True))
    # the oracle's repository is its own: it runs beside the two recordings
    oracle = start_script(hand, "train.py", env=clean_env(FLOR_STORE=str(root / "hand-store")))
    run_script(repo)
    run_script(repo, "train_pinned.py", "--kwargs", "lr=0.01", env=clean_env(TRAIN_THREADS="1"))
    _, err = oracle.communicate(timeout=300)
    assert oracle.returncode == 0, err
    write(repo, "train.py", _script(True))  # today's scripts
    write(repo, "train_pinned.py", _script(True, pinned=True))
    store = Store(str(repo / ".flor"))
    return repo, store, Store(str(root / "hand-store"))


def _values(store, name, run_ids=None):
    t = read_logs(store, [name], run_ids).to_pandas().sort_values(["iter0", "iter1", "seq"])
    return [float(v).hex() for v in t["value_float"]]


def _run_ids(store):
    return {m["args"]["lr"]: m["run_id"] for m in load_runs(store)}


def test_recording_keeps_the_numerics(history):
    _, store, _ = history
    default = json.loads(_py('import json, torch\nfrom flor_ray import numerics\nprint(json.dumps(numerics.capture()))'))
    metas = {m["args"]["lr"]: m for m in load_runs(store)}
    rec = metas[0.02]["env"]["numerics"]
    assert rec["intra_op_threads"] == default["intra_op_threads"] and rec["env"] == default["env"]
    assert rec["default_dtype"] == "float32" and rec["deterministic"] is False
    assert metas[0.01]["env"]["numerics"]["intra_op_threads"] == 1  # the script's own setting, as it ran


def test_replayed_gnorm_equals_hand_typed_rerun_bit_for_bit(history):
    repo, store, hand = history
    rid = _run_ids(store)[0.02]
    # one CPU per task: Ray gives the worker OMP_NUM_THREADS=1, the restore undoes it
    plan = flor_ray.plan_replay(["gnorm"], where="lr = 0.02", store=store, script=repo / "train.py",
                                resources={"num_cpus": 1})
    assert all(t.mode == "reexec" for t in plan.tasks) and plan.tasks
    report = run_plan(plan, progress=False)
    assert not report.failed, report
    assert report.fidelity.compared >= 12 and report.fidelity.mismatched == 0, report
    assert not report.fidelity.numerics, report
    assert _values(store, "gnorm", [rid]) == _values(hand, "gnorm")


def test_unrestorable_thread_setting_is_named_as_the_likely_cause(history):
    repo, store, _ = history
    plan = flor_ray.plan_replay(["gnorm"], where="lr = 0.01", store=store, script=repo / "train_pinned.py")
    report = run_plan(plan, progress=False)
    assert not report.failed, report
    text = str(report)
    rid = _run_ids(store)[0.01]
    cores = json.loads(_py('import os; print(os.cpu_count())'))
    if cores > 1:  # on one core, both thread counts are 1
        assert report.fidelity.mismatched > 0 and rid in report.fidelity.mismatched_runs, text
        assert f"likely cause: run={rid}: recorded with 1 intra-op thread, replayed with {cores}" in text


def test_explain_shows_threads_and_cpus(history):
    repo, store, _ = history
    n = next(m for m in load_runs(store) if m["args"]["lr"] == 0.02)["env"]["numerics"]["intra_op_threads"]
    rid = _run_ids(store)[0.02]

    def plan(**kw):
        return flor_ray.plan_replay(["gnorm"], where="lr = 0.02", store=store, script=repo / "train.py", **kw)

    text = plan(cluster=ClusterSnapshot(float(n) * 2)).explain()
    assert f"Numerics[run={rid} threads={n} " in text and f"cpus={n} from the recorded threads" in text
    assert f"cpus={n}, est=" in text
    over = plan(resources={"num_cpus": 0.5}).explain()
    assert f"cpus=0.5 from resources; threads restored to the recorded {n}" in over and "cpus=0.5, est=" in over
    if n > 1:
        capped = plan(cluster=ClusterSnapshot(float(n - 1))).explain()
        assert f"the recorded {n} threads capped to the largest node's {n - 1} CPUs" in capped


def test_plain_process_replay_restores_numerics(history, tmp_path):
    """FLOR_REPLAY_FORK=0: the task runs ``python train.py`` under Ray's OMP_NUM_THREADS=1;
    the recorded thread variables and torch settings still reach it."""
    import shutil

    from flor_ray.execution.fidelity import compare_fidelity
    from flor_ray.execution.spec import TaskSpec
    from flor_ray.store import Store

    repo, shared, hand = history
    # a copy without the other tests' replays, which already hold these values
    shutil.copytree(shared.root, tmp_path / "store", ignore=shutil.ignore_patterns("source=replay", "replays"))
    store = Store(str(tmp_path / "store"))
    rid = _run_ids(store)[0.02]
    plan = flor_ray.plan_replay(["gnorm"], where="lr = 0.02", iterations="last", store=store,
                                script=repo / "train.py", resources={"num_cpus": 1})
    (task,) = plan.pending
    run = plan.run_info(rid)
    args = [TaskSpec.of(plan, task).to_json(), plan.patch(task.version).files(run.script),
            list(run.argv), run.cwd, task.estimate_s]
    code = f'''
        import json, sys
        from flor_ray.execution.spec import TaskSpec
        from flor_ray.execution.task import fork_enabled, run_task
        assert not fork_enabled()
        spec, *rest = json.loads(sys.stdin.read())
        r = run_task(TaskSpec.from_json(spec), *rest)
        print(json.dumps([r.status, r.error, r.traceback, list(r.numerics)]))
    '''
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], input=json.dumps(args),
                          env=clean_env(FLOR_REPLAY_FORK="0", OMP_NUM_THREADS="1"), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    status, error, tb, notes = json.loads(proc.stdout.strip().splitlines()[-1])
    assert status == "done" and notes == [], (error, tb, notes)
    from flor_ray.execution.task import TaskResult

    fid = compare_fidelity(plan, [TaskResult(task.key, rid, "done")])
    assert fid.compared >= 6 and fid.mismatched == 0, fid
    t = read_logs(store, ["gnorm"], [rid]).to_pandas()
    t = t[t["task"] == task.key].sort_values(["iter1", "seq"])
    assert [float(v).hex() for v in t["value_float"]] == _values(hand, "gnorm")[-len(t):]

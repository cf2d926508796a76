"""Faults of the environment: a store that fills up or turns read-only mid-run, damaged
files in the store, endpoints and clusters that never answer.

Disk-full and read-only stores are a real size-limited tmpfs (``mount -t tmpfs -o
size=...``), remounted read-only from the test while the script trains; the tests
skip, saying why, where the machine does not allow ``mount``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import flor_ray
from conftest import S3, clean_env, git, init_repo, run_script, write

EPOCHS = 6

TRAIN = '''
import argparse
import time

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import flor_ray as flor


def make_data(n=128, d=64):
    g = torch.Generator().manual_seed(1)
    X = torch.randn(n, d, generator=g)
    return TensorDataset(X, (X[:, 0] > 0).long())


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sleep", type=float, default=0.0)
    opts = p.parse_args()
    torch.manual_seed(0)
    # ~0.5 MB of parameters and momentum per checkpoint: a 2 MB store fills up mid-run
    net = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 128), nn.ReLU(), nn.Linear(128, 2))
    opt = torch.optim.SGD(net.parameters(), lr=flor.arg("lr", 0.05), momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    loader = DataLoader(make_data(), batch_size=32, shuffle=True)
    with flor.checkpointing(net=net, opt=opt):
        for epoch in flor.loop("epoch", range({epochs})):
            for x, y in flor.loop("step", loader):
                loss = nn.functional.cross_entropy(net(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                flor.log("loss", loss.item())
            sched.step()
            flor.log("lr_now", sched.get_last_lr()[0])
            time.sleep(opts.sleep)
    print("trained", {epochs}, "epochs")


if __name__ == "__main__":
    main()
'''.replace("{epochs}", str(EPOCHS))


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"mount -t tmpfs is not permitted here ({proc.stderr.strip()}); "
                    "the disk-full and read-only tests need a real size-limited filesystem")


def _remount(path: Path, opts: str) -> None:
    # read-only is refused while a file there is open for writing (the recording's flush or
    # checkpoint of that instant, "mount point is busy"): again until the kernel lets it
    for _ in range(100):
        proc = subprocess.run(["mount", "-o", f"remount,{opts}", str(path)], capture_output=True, text=True)
        if proc.returncode == 0 or "busy" not in proc.stderr.lower():
            break
        time.sleep(0.02)
    proc.check_returncode()


@pytest.fixture
def tmpfs(tmp_path):
    mnt = tmp_path / "store"
    _mount_tmpfs(mnt, "2m")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.fixture(scope="module")
def train_repo(tmp_path_factory):
    r = tmp_path_factory.mktemp("faults_more") / "proj"
    r.mkdir()
    init_repo(r)
    write(r, "train.py", TRAIN)
    write(r, ".gitignore", ".flor/\n")
    git(r, "add", ".")
    git(r, "commit", "-qm", "train")
    return r


@pytest.fixture(scope="module")
def reference(train_repo):
    """The rows of a run whose store never failed."""
    store = train_repo.parent / "ref-store"
    env = clean_env(FLOR_STORE=str(store), FLOR_CHECKPOINT_BUDGET="1")
    run_script(train_repo, env=env)
    return _values(store)


def _values(store) -> "object":
    df = flor_ray.dataframe("loss", "lr_now", store=store if not isinstance(store, Path) else str(store))
    return df[["epoch", "step", "loss", "lr_now"]].reset_index(drop=True)


def _tmp_files(root: Path) -> list[str]:
    return [str(p) for p in root.rglob(".tmp-*")]


def _record(repo, store, spool, *args):
    env = clean_env(FLOR_STORE=str(store), FLOR_SPOOL=str(spool), FLOR_CHECKPOINT_BUDGET="1")
    return subprocess.Popen([sys.executable, "train.py", *args], cwd=repo, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _spooled_meta(spool: Path) -> dict:
    (folder,) = [p for p in spool.iterdir() if (p / "spool.json").is_file()]
    (meta,) = list((folder / "runs").glob("*.json"))
    return json.loads(meta.read_text())


def _upload_and_compare(store, spool, reference, remount):
    remount()
    proc = subprocess.run([sys.executable, "-m", "flor_ray.cli", "spool", "upload"],
                          env=clean_env(FLOR_SPOOL=str(spool)), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "uploaded" in proc.stdout
    assert not any(spool.iterdir())  # the spool is emptied once everything is in the store
    (run,) = flor_ray.runs(store=str(store)).to_dict("records")
    assert run["status"] == "finished" and run["iterations"] == EPOCHS
    got = _values(store)
    assert got.equals(reference), (got, reference)
    meta = json.loads(next((store / "runs").glob("*.json")).read_text())
    assert meta["spooled"]["uploaded_at"]


def _fill(mnt: Path) -> None:
    """Another process fills the disk: write until ENOSPC."""
    with open(mnt / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass


def _record_with_fault(repo, store, spool, fault):
    """Record, and once epoch 1's rows are in the store, apply ``fault`` to it."""
    proc = _record(repo, store, spool, "--sleep", "0.4")
    deadline = time.time() + 120
    while not list(store.glob("logs/run_id=*/source=record/part-00001.parquet")):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    fault()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert f"trained {EPOCHS} epochs" in out  # training went on to the end
    assert err.count("cannot write the store") == 1, err  # warned once, naming where the spool is
    assert str(spool) in err
    assert _tmp_files(store) == []
    meta = _spooled_meta(spool)
    assert meta["status"] == "finished" and meta["iterations"] == EPOCHS
    assert meta["spooled"]["folder"].startswith(str(spool))
    assert any(f.startswith("logs/") for f in meta["spooled"]["files"])
    return meta


def test_store_full_mid_run_training_finishes_and_spool_uploads(train_repo, tmpfs, tmp_path, reference):
    _remount(tmpfs, "size=8m")
    spool = tmp_path / "spool"
    meta = _record_with_fault(train_repo, tmpfs, spool, lambda: _fill(tmpfs))
    lost = [x["path"] for x in meta["lost"]]
    assert any(p.startswith("checkpoints/") for p in lost)  # skipped rather than blocking training
    assert not set(lost) & {c["path"] for c in meta["checkpoints"]}  # the manifest holds only stored ones
    _upload_and_compare(tmpfs, spool, reference, lambda: (tmpfs / "filler").unlink())


def test_store_turns_read_only_mid_run(train_repo, tmpfs, tmp_path, reference):
    _remount(tmpfs, "size=64m")
    spool = tmp_path / "spool"
    _record_with_fault(train_repo, tmpfs, spool, lambda: _remount(tmpfs, "ro"))
    _upload_and_compare(tmpfs, spool, reference, lambda: _remount(tmpfs, "rw"))


def test_s3_server_stopped_mid_run_training_finishes_and_spool_uploads(train_repo, tmp_path, reference):
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    s3 = S3()
    try:
        s3.client().create_bucket(Bucket="flor-down")
        spool = tmp_path / "spool"
        env = s3.env(FLOR_STORE="s3://flor-down/p", FLOR_SPOOL=str(spool), FLOR_CHECKPOINT_BUDGET="1")
        proc = subprocess.Popen([sys.executable, "train.py", "--sleep", "0.4"], cwd=train_repo, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while not any(o["Key"].endswith("part-00001.parquet")
                      for o in s3.client().list_objects_v2(Bucket="flor-down").get("Contents", [])):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.1)
        s3.stop()
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        assert f"trained {EPOCHS} epochs" in out and err.count("cannot write the store") == 1, err
        meta = _spooled_meta(spool)
        assert meta["status"] == "finished" and any(f.startswith("logs/") for f in meta["spooled"]["files"])
        s3.start()
        up = subprocess.run([sys.executable, "-m", "flor_ray.cli", "spool", "upload"], env=s3.env(FLOR_SPOOL=str(spool)),
                            capture_output=True, text=True)
        assert up.returncode == 0, up.stderr
        st = s3.store("s3://flor-down/p")
        assert _values(st).equals(reference)
        (run,) = flor_ray.runs(store=st).to_dict("records")
        assert run["status"] == "finished" and run["iterations"] == EPOCHS
    finally:
        s3.stop()


# ------------------------------------------------------------- bounded waits
SMALL = '''
import argparse
import os
import time

import flor_ray as flor

MARK = {mark!r}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=3)
    opts = p.parse_args()
    k = flor.arg("k", 1)
    total = 0
    for epoch in flor.loop("epoch", range(opts.epochs)):
        for step in flor.loop("step", range(2)):
            total += k * step
        if os.environ.get("FLOR_REPLAY") and MARK:  # replay: say so, then take a long time
            open(os.path.join(MARK, f"running-{{os.getpid()}}"), "w").close()
            time.sleep(600)
        flor.log("total", total)


if __name__ == "__main__":
    main()
'''


@pytest.fixture(scope="module")
def small_repo(tmp_path_factory):
    r = tmp_path_factory.mktemp("bounded") / "proj"
    mark = r.parent / "marks"
    mark.mkdir()
    r.mkdir()
    git(r, "init", "-q", "-b", "main")
    write(r, "train.py", SMALL.format(mark=str(mark)))
    run_script(r)
    write(r, "train.py", SMALL.format(mark=str(mark)).replace(
        'flor.log("total", total)', 'flor.log("total", total)\n        flor.log("twice", 2 * total)'))
    return r


@pytest.fixture
def silent_endpoint():
    """A server on 127.0.0.1 that accepts connections (the kernel's backlog) and never answers."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(128)
    yield f"http://127.0.0.1:{s.getsockname()[1]}"
    s.close()


def _s3_env(endpoint, **extra):
    return clean_env(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1",
                     AWS_ENDPOINT_URL=endpoint, FLOR_READ_TIMEOUT="1", FLOR_CONNECT_TIMEOUT="1", **extra)


def test_silent_s3_endpoint_fails_runs_within_the_timeout(tmp_path, silent_endpoint):
    pytest.importorskip("s3fs")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "flor_ray.cli", "runs", "--store", "s3://b/p"], cwd=tmp_path,
                          env=_s3_env(silent_endpoint), capture_output=True, text=True, timeout=120)
    took = time.monotonic() - t0
    assert proc.returncode == 2, proc.stderr
    assert took < 30, took  # a few 1 s read timeouts, not minutes
    assert silent_endpoint in proc.stderr and "read_timeout_s=1" in proc.stderr and "FLOR_READ_TIMEOUT" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_recording_to_a_silent_s3_endpoint_is_bounded(small_repo, tmp_path, silent_endpoint):
    pytest.importorskip("s3fs")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "train.py"], cwd=small_repo,
                          env=_s3_env(silent_endpoint, FLOR_STORE="s3://b/rec"), capture_output=True, text=True,
                          timeout=120)
    assert time.monotonic() - t0 < 30
    assert proc.returncode != 0 and silent_endpoint in proc.stderr and "FLOR_READ_TIMEOUT" in proc.stderr


def test_replay_to_an_unreachable_ray_address_fails_fast(small_repo):
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "flor_ray.cli", "replay", "twice", "--address", "127.0.0.1:1"],
                          cwd=small_repo, env=clean_env(), capture_output=True, text=True, timeout=120)
    assert time.monotonic() - t0 < 20
    assert proc.returncode == 2, proc.stderr
    assert "127.0.0.1:1" in proc.stderr and "FLOR_RAY_CONNECT_TIMEOUT" in proc.stderr and "ray start" in proc.stderr


def test_gpu_plan_on_a_cluster_without_gpus_fails_at_planning(small_repo, ray_local):
    from flor_ray.errors import ClusterError

    store = str(small_repo / ".flor")
    with pytest.raises(ClusterError, match="tasks need 1 GPU; the cluster has 0: pass --num-gpus 0"):
        flor_ray.plan_replay(["twice"], store=store, script=small_repo / "train.py", resources={"num_gpus": 1})
    with pytest.raises(ClusterError, match="tasks need 64 CPUs; the cluster has 2"):
        flor_ray.plan_replay(["twice"], store=store, script=small_repo / "train.py", resources={"num_cpus": 64})
    proc = subprocess.run([sys.executable, "-m", "flor_ray.cli", "replay", "twice", "--num-gpus", "1", "--dry-run"],
                          cwd=small_repo, env=clean_env(CUDA_VISIBLE_DEVICES=""), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "tasks need 1 GPU; the cluster has 0" in proc.stderr, proc.stderr


def test_ctrl_c_stops_a_replay_at_once_and_cancels_its_tasks(small_repo):
    import signal

    marks = small_repo.parent / "marks"
    # the command as a terminal starts it: SIGINT at its default, unblocked, whatever this
    # process's threads left in the disposition and mask a child inherits
    start = ("import os, signal, sys\n"
             "signal.signal(signal.SIGINT, signal.SIG_DFL)\n"
             "signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])\n"
             "os.execv(sys.executable, [sys.executable, '-m', 'flor_ray.cli', 'replay', 'twice', '-q'])\n")
    proc = subprocess.Popen([sys.executable, "-c", start], cwd=small_repo,
                            env=clean_env(PYTHONFAULTHANDLER="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 180
    while not list(marks.glob("running-*")):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.1)
    (mark,) = list(marks.glob("running-*"))
    script_pid = int(mark.name.split("-")[1])
    t0 = time.monotonic()
    with open(f"/proc/{proc.pid}/status") as f:  # said where it fails: the driver's signal mask and ignored set
        masks = " ".join(line.strip() for line in f if line.startswith(("SigBlk", "SigIgn", "SigCgt")))
    proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:  # where the driver hangs: its threads' stacks (faulthandler)
        proc.send_signal(signal.SIGABRT)
        out, err = proc.communicate(timeout=30)
        pytest.fail(f"the replay did not stop within 60 s of Ctrl-C ({masks}):\n{err[-8000:]}")
    assert time.monotonic() - t0 < 30
    assert proc.returncode == 130, err
    assert "interrupted" in err and "cancelled" in err
    for _ in range(100):  # the replayed script goes with its cancelled task
        if not Path(f"/proc/{script_pid}").exists():
            break
        time.sleep(0.1)
    else:
        os.kill(script_pid, 9)
        pytest.fail("the replayed script outlived its cancelled task")
    store = small_repo / ".flor"
    assert not list(store.glob("logs/run_id=*/source=replay/*.parquet"))  # nothing half-written
    mark.unlink()


def test_replay_to_a_port_that_is_not_ray_fails_fast(small_repo, silent_endpoint):
    address = silent_endpoint[len("http://"):]
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "flor_ray.cli", "replay", "twice", "--address", address],
                          cwd=small_repo, env=clean_env(FLOR_RAY_CONNECT_TIMEOUT="2"), capture_output=True,
                          text=True, timeout=120)
    assert time.monotonic() - t0 < 20
    assert proc.returncode == 2, proc.stderr
    assert "does not answer as a Ray cluster" in proc.stderr and address in proc.stderr


def test_a_real_ray_head_passes_the_reachability_check(ray_local):
    from flor_ray.execution.driver import check_reachable

    check_reachable(ray_local.get_runtime_context().gcs_address, 5.0)  # raises if not

"""Faults during recording and replay: each test ends with every row present exactly once.

The recorded script holds a fault hook that does nothing unless the test *arms* it
(a marker file in a directory whose path is written into the script, because the
Ray workers do not see the test's environment). An armed fault fires once: the
hook creates ``<point>.fired`` with O_EXCL first, so a retried task runs clean.

Faults injected here:

* the Ray worker running a replay task is SIGKILLed mid-task (Ray retries it);
* the replayed script's own process is SIGKILLed (a failed result; a rerun runs it);
* the driver is SIGKILLed mid-replay (a rerun of the query runs only the rest);
* a checkpoint is truncated, another corrupted (planned or routed around, named);
* a Parquet file of the relation is truncated or corrupted (named in the error);
* two recording runs write one store at the same time (local and S3);
* the S3 server stops during a replay (clear error, no partial partition, resumable).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import flor_ray
from flor_ray.errors import DamagedFileWarning, QueryError, StoreError
from flor_ray.execution.driver import ray_runner, run_plan
from flor_ray.planning.plan import ClusterSnapshot
from flor_ray.store.logs import read_logs
from flor_ray.store import Store

from conftest import REPO_ROOT, S3, clean_env, git, run_script, start_script, write

EPOCHS = 6
KS = (1, 2)  # one run per value of the arg k

RECORDED = '''
import os
import signal
import time

# imported here, on the main thread: left to the checkpoint writer's thread, the import
# races with the training thread's RNG capture (see the report of issue 5)
import torch  # noqa: F401

import flor_ray as flor

FAULTS = {faults!r}


def ray_worker_pid():
    """The Ray worker above this process (the task may fork the script from a helper)."""
    pid = os.getppid()
    while pid > 1:
        with open(f"/proc/{{pid}}/cmdline", "rb") as f:
            if f.read().startswith(b"ray::"):
                return pid
        with open(f"/proc/{{pid}}/stat") as f:
            pid = int(f.read().rsplit(")", 1)[1].split()[1])
    raise RuntimeError("no Ray worker above this process")


def fault(point, epoch):
    """Fire the fault `point` once, in replay only, when the test armed it for `epoch`."""
    if not os.environ.get("FLOR_REPLAY"):
        return
    slow = os.path.join(FAULTS, "slow")  # "<k or *>:<seconds>": sleep per replayed epoch
    if point == "slow":
        if os.path.exists(slow):
            who, secs = open(slow).read().split(":")
            if who in ("*", str(k)):
                time.sleep(float(secs))
        return
    armed = os.path.join(FAULTS, point + ".armed")
    if not os.path.exists(armed) or open(armed).read().strip() != str(epoch):
        return
    try:
        os.close(os.open(os.path.join(FAULTS, point + ".fired"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    if point == "kill_worker":
        os.kill(ray_worker_pid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


class Counter:
    def __init__(self):
        self.n = 0

    def state_dict(self):
        return {{"n": self.n}}

    def load_state_dict(self, d):
        self.n = d["n"]


c = Counter()
k = flor.arg("k", 1)
with flor.checkpointing(c=c):
    for epoch in flor.loop("epoch", range({epochs})):
        for step in flor.loop("step", range(3)):
            c.n += k
        fault("kill_worker", epoch)
        fault("kill_script", epoch)
        fault("slow", epoch)
        flor.log("n", c.n)
'''


def today(recorded: str) -> str:
    """Today's script: the recorded one plus a new outer-level statement."""
    return recorded.replace('flor.log("n", c.n)', 'flor.log("n", c.n)\n        flor.log("n2", c.n * 2)')


def expected_n2() -> dict:
    return {(k, e): 2 * 3 * k * (e + 1) for k in KS for e in range(EPOCHS)}


@pytest.fixture(scope="module")
def faults_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def recorded_repo(tmp_path_factory, faults_dir) -> Path:
    """Two runs (k=1, k=2) of a small script with a checkpoint every epoch."""
    repo = tmp_path_factory.mktemp("recorded") / "proj"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    (repo / "train.py").write_text(RECORDED.format(faults=str(faults_dir), epochs=EPOCHS))
    procs = [
        subprocess.Popen([sys.executable, "train.py", "--kwargs", f"k={k}"], cwd=repo,  # a part per epoch, kept
                         env=clean_env(FLOR_CHECKPOINT_MAX_PERIOD="1", FLOR_COMPACT_AFTER="0", FLOR_FLUSH_INTERVAL="0"), stderr=subprocess.PIPE,
                         text=True)
        for k in KS
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    return repo


def splittable(store: Store) -> Store:
    """Give the runs recorded timings that make every epoch worth its own task.

    The planner splits a run only when the work outweighs a task's set-up; the toy
    script's epochs take microseconds, so the recorded timings are set by hand to
    make the task split depend only on the cluster snapshot each test passes.
    """
    for rid in store.iter_run_ids():
        meta = store.read_json(f"runs/{rid}.json")
        meta["timings"].update(setup_s=0.1, outer_s=[1.0] * EPOCHS, inner_s=[0.0] * EPOCHS)
        store.write_json(f"runs/{rid}.json", meta)
    return store


@pytest.fixture
def proj(recorded_repo, tmp_path, faults_dir) -> Path:
    """A private copy of the recorded repository and store; today's script in place."""
    dst = tmp_path / "proj"
    shutil.copytree(recorded_repo, dst, symlinks=True)
    splittable(store_of(dst))
    (dst / "train.py").write_text(today((recorded_repo / "train.py").read_text()))
    yield dst
    for f in faults_dir.iterdir():
        f.unlink()


def store_of(repo: Path) -> Store:
    return Store(str(repo / ".flor"))


def plan(repo: Path, cpus: int, **kw):
    """A plan whose task split does not depend on this machine (cluster given, and one
    CPU per task rather than the recording's thread count, which follows its cores)."""
    kw.setdefault("resources", {"num_cpus": 1})
    return flor_ray.plan_replay(["n2"], store=kw.pop("store", None) or store_of(repo), script=repo / "train.py",
                                cluster=ClusterSnapshot(float(cpus)), **kw)


def k_of_runs(store: Store) -> dict:
    runs = flor_ray.runs(store=store)
    return dict(zip(runs["run_id"], runs["k"]))


def replay_keys(store: Store) -> list[str]:
    return sorted(p.rsplit("/", 1)[-1][: -len(".parquet")] for p in store.find("logs", ".parquet") if "/source=replay/" in p)


def assert_rows_once(store: Store, plan_keys) -> None:
    """Every (run, epoch) of n2 exactly once, with the right value; one partition per task."""
    assert replay_keys(store) == sorted(plan_keys)
    ks = k_of_runs(store)
    t = read_logs(store, ["n2"], sources=("replay",)).to_pandas()
    got = [(ks[r], int(e)) for r, e in zip(t["run_id"], t["iter0"])]
    assert sorted(got) == sorted(expected_n2()), "rows lost or duplicated"
    assert {(ks[r], int(e)): int(v) for r, e, v in zip(t["run_id"], t["iter0"], t["value_int"])} == expected_n2()


def arm(faults_dir: Path, point: str, epoch: int) -> None:
    (faults_dir / f"{point}.armed").write_text(str(epoch))


# ---------------------------------------------------------------- Ray worker
def test_ray_worker_killed_mid_task_is_retried(proj, faults_dir, ray_local):
    arm(faults_dir, "kill_worker", 2)
    p = plan(proj, 4)  # 2 tasks per run: epochs 0..2 and 3..5
    assert len(p.pending) == 4
    report = run_plan(p, progress=False)
    assert (faults_dir / "kill_worker.fired").exists(), "the fault did not fire"
    assert not report.failed and {r.status for r in report.results} == {"done"}, str(report)
    assert_rows_once(store_of(proj), [t.key for t in p.tasks])


def test_replayed_script_killed_by_a_signal_is_retried(proj, faults_dir, ray_local):
    arm(faults_dir, "kill_script", 4)
    p = plan(proj, 4)
    report = run_plan(p, progress=False)
    assert (faults_dir / "kill_script.fired").exists(), "the fault did not fire"
    assert not report.failed and {r.status for r in report.results} == {"done"}, str(report)
    assert_rows_once(store_of(proj), [t.key for t in p.tasks])


# -------------------------------------------------------------------- driver
DRIVER = textwrap.dedent(
    """
    import sys
    import flor_ray
    from flor_ray.execution.driver import ray_runner, run_plan
    from flor_ray.planning.plan import ClusterSnapshot
    from flor_ray.store import Store

    store, script, address = sys.argv[1:4]
    plan = flor_ray.plan_replay(["n2"], store=Store(store), script=script, cluster=ClusterSnapshot(6.0),
                                resources={"num_cpus": 1})  # the split of plan(repo, 6)
    print("planned", len(plan.pending), flush=True)
    run_plan(plan, runner=ray_runner(address), progress=False)
    print("finished", flush=True)
    """
)


def _replay_processes(keys) -> list[int]:
    """Pids of replayed scripts of these tasks still alive: their temp dir names the
    key, in the command line of a plain process and in the working directory of one
    forked from a zygote (whose command line is the zygote's)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        try:
            cwd = os.readlink(d / "cwd")
        except OSError:
            cwd = ""
        if any(f"flor-task-{k[:8]}-" in cmd or f"flor-task-{k[:8]}-" in cwd for k in keys):
            pids.append(int(d.name))
    return pids


def test_driver_killed_mid_replay_rerun_runs_only_missing_tasks(proj, faults_dir, ray_local):
    (faults_dir / "slow").write_text("*:1.0")  # tasks long enough for the kill to land mid-replay
    st = store_of(proj)
    full = plan(proj, 6)
    keys = [t.key for t in full.tasks]
    assert len(keys) == 6
    address = ray_local.get_runtime_context().gcs_address
    drv = tmp = proj.parent / "driver.py"
    drv.write_text(DRIVER)
    proc = subprocess.Popen([sys.executable, str(tmp), st.url, str(proj / "train.py"), address],
                            env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 90
        while len(replay_keys(st)) < 2:
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline, "no task finished in time"
            time.sleep(0.1)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
    # replayed scripts orphaned by the dead driver may still finish (atomically) or die
    deadline = time.time() + 60
    while _replay_processes(keys) and time.time() < deadline:
        time.sleep(0.2)
    (faults_dir / "slow").unlink()
    done = replay_keys(st)
    assert 2 <= len(done) < 6, "the driver was killed too late to test anything"
    again = plan(proj, 6)
    assert [t.key for t in again.tasks] == keys  # same query, same keys
    assert sorted(t.key for t in again.pending) == sorted(set(keys) - set(done))
    assert f"({6 - len(done)} to run)" in again.explain()
    report = run_plan(again, progress=False)
    assert not report.failed and len([r for r in report.results if r.status == "done"]) == 6 - len(done), str(report)
    assert_rows_once(st, keys)


# ---------------------------------------------------------------- checkpoint
def test_truncated_and_corrupted_checkpoints_are_routed_around(proj, ray_local):
    st = store_of(proj)
    ks = k_of_runs(st)
    by_k = {k: r for r, k in ks.items()}
    trunc = f"checkpoints/{by_k[1]}/000001.pt"
    corrupt = f"checkpoints/{by_k[2]}/000004.pt"
    data = st.read_bytes(trunc)
    (Path(st.root) / trunc).write_bytes(data[: len(data) // 2])
    trunc_msg = f"checkpoint {trunc} has {len(data) // 2} bytes, {len(data)} recorded: planned around it"
    data = bytearray(st.read_bytes(corrupt))
    for i in range(len(data) // 3, len(data) // 3 + 64):
        data[i] ^= 0x5A
    (Path(st.root) / corrupt).write_bytes(bytes(data))

    p = plan(proj, 6)
    # the truncated one is found by the plan's listing (its size), the corrupted one by its task
    assert [(d.run_id, d.path) for d in p.damaged] == [(by_k[1], trunc)], p.explain()
    assert trunc_msg in p.explain()
    assert all(trunc not in {c.path for c in t.checkpoints} for t in p.tasks)
    assert any(corrupt in {c.path for c in t.checkpoints} for t in p.tasks)
    report = run_plan(p, progress=False)
    assert report.ok, str(report)
    (note,) = report.fallbacks
    assert note.startswith(f"run {by_k[2]} epoch 4: checkpoint ") and "corrupted (sha256 differs" in note
    assert note.endswith("replayed from the checkpoint of epoch 3") and note in str(report)
    assert_rows_once(st, [t.key for t in p.tasks])
    # a rerun does not fail again: the tasks are done
    again = plan(proj, 6)
    assert not again.pending and run_plan(again, progress=False).ok


# ------------------------------------------------------------------- parquet
def _record_part(st: Store, run_id: str, n: int = 2) -> Path:
    return Path(st.root) / f"logs/run_id={run_id}/source=record/part-{n:05d}.parquet"


def test_truncated_parquet_is_named_and_left_out(proj):
    st = store_of(proj)
    by_k = {k: r for r, k in k_of_runs(st).items()}
    bad = _record_part(st, by_k[2])
    bad.write_bytes(bad.read_bytes()[:100])
    name = f"run_id={by_k[2]}/source=record/{bad.name}"
    with pytest.warns(DamagedFileWarning, match=name):  # the file is named, its rows left out
        df = flor_ray.dataframe("n", store=st)
    assert sorted(df.loc[df["k"] == 2, "epoch"]) == [e for e in range(EPOCHS) if e != 2]
    assert flor_ray.sql("SELECT count(*) AS c FROM logs WHERE name = 'n'", store=st)["c"][0] == 2 * EPOCHS - 1
    assert plan(proj, 2).tasks  # the replay of both runs is still planned
    # the other run is whole
    df = flor_ray.dataframe("n", where="k = 1", store=st)
    assert sorted(df["n"]) == [3 * (e + 1) for e in range(EPOCHS)]


def test_corrupted_parquet_is_named(proj):
    st = store_of(proj)
    by_k = {k: r for r, k in k_of_runs(st).items()}
    bad = _record_part(st, by_k[2])
    data = bytearray(bad.read_bytes())
    for i in range(200, 400):
        data[i] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(QueryError) as info:
        flor_ray.dataframe("n", store=st)
    assert bad.name in str(info.value) and by_k[2] in str(info.value)


# ------------------------------------------------------- concurrent recording
def _record_concurrently(repo: Path, env: dict, ks=(3, 4)) -> None:
    procs = [start_script(repo, "train.py", "--kwargs", f"k={k}", env=env) for k in ks]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err


def _assert_recorded(st: Store, ks) -> None:
    runs = flor_ray.runs(store=st)
    assert sorted(runs["k"]) == sorted(ks) and set(runs["status"]) == {"finished"}
    df = flor_ray.dataframe("n", store=st)
    got = sorted((int(k), int(e), int(v)) for k, e, v in zip(df["k"], df["epoch"], df["n"]))
    assert got == sorted((k, e, 3 * k * (e + 1)) for k in ks for e in range(EPOCHS)), "rows lost or duplicated"
    for rid in runs["run_id"]:
        meta = st.read_json(f"runs/{rid}.json")
        assert len(meta["checkpoints"]) == EPOCHS and all(c["verified"] for c in meta["checkpoints"])
        assert not meta.get("problems")


def test_two_recordings_write_one_local_store_at_once(proj):
    _record_concurrently(proj, clean_env(FLOR_CHECKPOINT_MAX_PERIOD="1"))
    _assert_recorded(store_of(proj), (*KS, 3, 4))


# ------------------------------------------------------------------------ S3
@pytest.fixture(scope="module")
def s3():
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    server = S3()
    import boto3

    boto3.client("s3", endpoint_url=server.endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                 region_name="us-east-1").create_bucket(Bucket="flor-faults")
    yield server
    server.stop()


def test_two_recordings_write_one_s3_store_at_once(recorded_repo, tmp_path, s3):
    repo = tmp_path / "proj"
    shutil.copytree(recorded_repo, repo, symlinks=True, ignore=shutil.ignore_patterns(".flor"))
    url = "s3://flor-faults/concurrent"
    _record_concurrently(repo, s3.env(FLOR_STORE=url, FLOR_CHECKPOINT_MAX_PERIOD="1"))
    _assert_recorded(s3.store(url), (3, 4))


def test_s3_stopped_during_replay_then_resumed(recorded_repo, tmp_path, faults_dir, s3, ray_local):
    repo = tmp_path / "proj"
    shutil.copytree(recorded_repo, repo, symlinks=True, ignore=shutil.ignore_patterns(".flor"))
    url = "s3://flor-faults/stopped"
    _record_concurrently(repo, s3.env(FLOR_STORE=url, FLOR_CHECKPOINT_MAX_PERIOD="1"), ks=KS)
    (repo / "train.py").write_text(today((repo / "train.py").read_text()))
    st = s3.store(url)
    _assert_recorded(st, KS)
    splittable(st)
    p = plan(repo, 6, store=st)
    keys = [t.key for t in p.tasks]
    assert len(keys) == 6 and all(t.mode == "skip" for t in p.tasks), p.explain()
    (faults_dir / "slow").write_text("*:1.0")
    out: dict = {}

    def drive():
        try:
            out["report"] = run_plan(p, progress=False)
        except Exception as exc:  # noqa: BLE001 - examined below
            out["error"] = exc

    th = threading.Thread(target=drive)
    th.start()
    try:
        deadline = time.time() + 90
        while not replay_keys(st):
            assert th.is_alive() and time.time() < deadline, str(out.get("report", out))
            time.sleep(0.1)
    finally:
        s3.stop()
    th.join(timeout=240)
    assert not th.is_alive()
    (faults_dir / "slow").unlink()
    # the replay ends with a clear error (as failed tasks or as a store error), never silently
    if "error" in out:
        assert isinstance(out["error"], StoreError) and url in str(out["error"]), out["error"]
    else:
        rep = out["report"]
        assert rep.failed and all("store" in r.error.lower() or "connect" in r.error.lower() for r in rep.failed), str(rep)
    s3.start()
    done = replay_keys(st)
    assert 1 <= len(done) < len(keys)
    read_logs(st, ["n2"], sources=("replay",))  # every visible partition is whole
    again = plan(repo, 6, store=st)
    assert sorted(t.key for t in again.pending) == sorted(set(keys) - set(done))
    report = run_plan(again, progress=False)
    assert not report.failed, str(report)
    assert_rows_once(st, keys)


PLAIN = """
import flor_ray as flor

for epoch in flor.loop("epoch", range(3)):
    flor.log("a", epoch)
"""


def test_s3_replay_without_checkpoint_writes_its_partition(tmp_path, s3, ray_local):
    repo = tmp_path / "plain"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    write(repo, "train.py", PLAIN)
    url = "s3://flor-faults/plain"
    run_script(repo, env=s3.env(FLOR_STORE=url))
    write(repo, "train.py", PLAIN + '    flor.log("b", epoch * 2)\n')
    report = run_plan(flor_ray.plan_replay(["b"], store=s3.store(url), script=repo / "train.py"), progress=False)
    assert not report.failed, str(report)
    assert sorted(flor_ray.dataframe("b", store=s3.store(url))["b"]) == [0, 2, 4]

"""Segments: ended runs' files and replay partitions consolidated into a few store-level
Parquet files. Queries read them bit for bit as before, a reader concurrent with a
consolidation sees each row once, a replan knows what consolidated replays hold, the
next recording compacts a crashed run and never touches one that is recording, and
the same on S3 (moto)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

import flor_ray
from flor_ray.execution.driver import run_plan
from flor_ray.planning.plan import ClusterSnapshot
from flor_ray.queries.cache import CACHE
from flor_ray.store import Store, layout
from flor_ray.store.consolidation import consolidate
from flor_ray.store.logs import log_parts, read_logs

from conftest import REPO_ROOT, S3, Counting, clean_env, git, reads_during, start_script, write

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import bench_store  # noqa: E402

# `#GNORM` marks today's statement; --crash-at kills the run in that epoch, --wait-for
# holds it in its third epoch until a file appears (a recording in progress)
SCRIPT = '''
import argparse
import os
import signal
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

import flor_ray as flor


def make_data(n):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return TensorDataset(x, x @ torch.tensor([1.0, -2.0, 0.5, 3.0]))


def train_step(model, opt, x, y):
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x).squeeze(1), y)
    loss.backward()
    opt.step()
    return loss


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--crash-at", type=int, default=-1)
    p.add_argument("--wait-for", default="")
    opts = p.parse_args()
    torch.manual_seed(0)
    lr = flor.arg("lr", 0.05)
    loader = DataLoader(make_data(32), batch_size=8, shuffle=True)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    with flor.checkpointing(model=model, opt=opt, sched=sched):
        for epoch in flor.loop("epoch", range(opts.epochs)):
            if epoch == opts.crash_at:
                os.kill(os.getpid(), signal.SIGKILL)
            while epoch == 2 and opts.wait_for and not os.path.exists(opts.wait_for):
                time.sleep(0.05)
            for x, y in flor.loop("step", loader):
                loss = train_step(model, opt, x, y)
                flor.log("loss", loss.item())
            sched.step()
            #GNORM
            flor.log("lr_now", sched.get_last_lr()[0])


if __name__ == "__main__":
    main()
'''
GNORM = 'flor.log("gnorm", float(sum(q.double().norm() ** 2 for q in model.parameters())))'
RUNS = ("0.05", "0.1")
ENV = {"FLOR_FLUSH_INTERVAL": "0", "FLOR_CHECKPOINT_MAX_PERIOD": "1", "FLOR_CHECKPOINT_BUDGET": "1"}


def typed(with_statement: bool) -> str:
    return SCRIPT.replace("#GNORM", GNORM if with_statement else "pass")


def _start(cwd: Path, *args: str, **env: str) -> subprocess.Popen:
    return start_script(cwd, "train.py", *args, env=clean_env(**{**ENV, **env}))


def _done(p: subprocess.Popen, ok: bool = True) -> None:
    _, err = p.communicate(timeout=300)
    assert not ok or p.returncode == 0, err


def _repo(path: Path, text: str) -> Path:
    path.mkdir(parents=True)
    git(path, "init", "-q", "-b", "main")
    write(path, "train.py", text)
    return path


@pytest.fixture(scope="module")
def history(tmp_path_factory):
    """Two recorded runs (a part and a checkpoint per epoch, compacted at their end) and,
    per run, the script with the statement typed in by hand, run in its own store."""
    base = tmp_path_factory.mktemp("segments")
    repo = _repo(base / "proj", typed(False))
    git(repo, "add", "train.py")
    git(repo, "-c", "user.name=d", "-c", "user.email=d@x", "commit", "-qm", "v1")
    procs, hands = [], {}
    for lr in RUNS:
        procs.append(_start(repo, "--kwargs", f"lr={lr}"))
        hand = _repo(base / f"hand-{lr}", typed(True))
        hands[float(lr)] = Store(str(hand / ".flor"))
        procs.append(_start(hand, "--kwargs", f"lr={lr}"))
    for p in procs:
        _done(p)
    write(repo, "train.py", typed(True))  # today's version, not committed
    return repo, hands


def _copy(history, tmp_path: Path) -> tuple[Path, Store]:
    repo, _ = history
    dst = tmp_path / "proj"
    shutil.copytree(repo, dst, symlinks=True)
    return dst, Store(str(dst / ".flor"))


def _frame(st: Store, *names: str) -> pd.DataFrame:
    CACHE.reset()
    return flor_ray.dataframe(*(names or ("loss", "lr_now")), store=st)


def _rows(st: Store) -> pd.DataFrame:
    CACHE.reset()
    return flor_ray.sql("SELECT * FROM logs_all ORDER BY run_id, source, task, seq", store=st)


def _loose(st: Store) -> list[str]:
    root = Path(st.path(layout.LOGS))
    return sorted(str(p.relative_to(root)) for p in root.rglob("run_id=*/*/*.parquet"))


def _segments(st: Store) -> list[Path]:
    return sorted(Path(st.path(layout.SEGMENTS)).glob("seg-*.parquet"))


def test_flor_ray_compact_reads_bit_for_bit_as_before(history, tmp_path):
    _, st = _copy(history, tmp_path)
    frame, rows = _frame(st), _rows(st)
    assert len(_loose(st)) == len(RUNS)  # a compacted file a run
    proc = subprocess.run([sys.executable, "-m", "flor_ray.cli", "compact", "--store", st.url],
                          env=clean_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert f"of {len(RUNS)} runs into 1 segment" in proc.stdout, proc.stdout
    assert _loose(st) == [] and len(_segments(st)) == 1
    assert not list(Path(st.path(layout.LOGS)).glob("run_id=*")), "the emptied partition folders are removed"
    assert {p.file for p in log_parts(st)} == {str(_segments(st)[0].relative_to(st.root))}
    pd.testing.assert_frame_equal(_frame(st), frame, check_exact=True)
    pd.testing.assert_frame_equal(_rows(st), rows, check_exact=True)
    again = subprocess.run([sys.executable, "-m", "flor_ray.cli", "compact", "--store", st.url],
                           env=clean_env(), capture_output=True, text=True)
    assert "nothing to consolidate" in again.stdout, again.stdout
    check = subprocess.run([sys.executable, "-m", "flor_ray.cli", "check", "--store", st.url],
                           env=clean_env(), capture_output=True, text=True)
    assert check.returncode == 0, check.stdout  # a segment is no orphan and no damage


def test_a_reader_during_consolidation_sees_each_row_once(tmp_path):
    st = Store(str(tmp_path / "store"))
    st.ensure()
    template = {"run_id": "20260101T000000-abc123", "version": "v1", "script": "train.py", "status": "finished",
                "started_at": "2026-01-01T00:00:00+00:00", "argv": ["train.py"], "env": {}}
    runs, epochs, steps = 40, 30, 10
    bench_store.write_runs(st, template, runs, epochs, steps)
    want = runs * epochs * steps
    per_run = epochs * (steps + 1)

    def work():  # into 8 segments (the loose files deleted), then merged into 1 (the 8 deleted)
        consolidate(st, rows=5 * per_run)
        consolidate(st, merge_all=True)

    assert any(reads_during(st, work, want))  # a read began while consolidating
    assert _loose(st) == [] and len(_segments(st)) == 1
    assert sorted(p.name for p in Path(st.path(layout.LOGS)).iterdir()) == ["segments"]


def test_a_writer_meets_its_partition_folder_removed_and_makes_it_again(tmp_path):
    # consolidations remove the folders they empty while recordings write beside them:
    # every flush lands, none fails for a folder removed between its makedirs and its open
    import threading

    from flor_ray.store import write_local

    folder = tmp_path / "logs" / "run_id=r" / "source=record"
    stop = threading.Event()

    def remover():  # as consolidations would, each removing the folder once, many times a second
        while not stop.wait(0.0005):
            for d in (folder, folder.parent):
                try:
                    d.rmdir()
                except OSError:
                    pass

    t = threading.Thread(target=remover)
    t.start()
    try:
        for i in range(2000):
            write_local(str(folder / f"part-{i:05d}.parquet"), b"x")
            (folder / f"part-{i:05d}.parquet").unlink()  # empty again, for the remover
    finally:
        stop.set()
        t.join()


def _replayed(st: Store, name: str, lr_of: dict) -> list:
    t = read_logs(st, [name], sources=("replay",)).to_pandas()
    return sorted((lr_of[r], int(e), v) for r, e, v in zip(t["run_id"], t["iter0"], t["value_float"]))


def _by_hand(hands: dict, name: str) -> list:
    out = []
    for lr, hs in hands.items():
        t = read_logs(hs, [name], sources=("record",)).to_pandas()
        out += [(lr, int(e), v) for e, v in zip(t["iter0"], t["value_float"])]
    return sorted(out)


def test_consolidated_replays_are_known_to_the_planner_and_stay_exact(history, tmp_path, ray_local):
    repo, st = _copy(history, tmp_path)
    _, hands = history
    runs = flor_ray.runs(store=st)
    lr_of = dict(zip(runs["run_id"], runs["lr"]))
    plan = flor_ray.plan_replay(["gnorm"], store=st, script=repo / "train.py", cluster=ClusterSnapshot(2))
    assert plan.pending
    report = run_plan(plan, progress=False)
    assert report.ok, str(report)
    oracle = _by_hand(hands, "gnorm")
    assert _replayed(st, "gnorm", lr_of) == oracle
    replays = [r for r in _loose(st) if "/source=replay/" in r]
    assert len(replays) == len(plan.tasks)
    kept = {r: Path(st.path(layout.LOGS, r)).read_bytes() for r in replays}
    frame = _frame(st, "loss", "gnorm")
    done = consolidate(st, replay_grace_s=0, merge_all=True)
    assert len(done.written) == 1 and _loose(st) == []
    again = flor_ray.plan_replay(["gnorm"], store=st, script=repo / "train.py", cluster=ClusterSnapshot(2))
    assert not again.pending, again.explain()  # the segment's footer says which tasks are done
    assert _replayed(st, "gnorm", lr_of) == oracle
    pd.testing.assert_frame_equal(_frame(st, "loss", "gnorm"), frame, check_exact=True)
    # a retried task rewrites its partition after the consolidation: read in place of
    # the segment's copy, each value once
    rel, data = next(iter(kept.items()))
    time.sleep(0.01)
    st.write_bytes(f"{layout.LOGS}/{rel}", data)  # as a task writes it (its folder, emptied, was removed)
    assert sum(p.origin == f"{layout.LOGS}/{rel}" for p in log_parts(st)) == 1
    assert [p.file for p in log_parts(st) if p.origin == f"{layout.LOGS}/{rel}"] == [f"{layout.LOGS}/{rel}"]
    pd.testing.assert_frame_equal(_frame(st, "loss", "gnorm"), frame, check_exact=True)
    assert _replayed(st, "gnorm", lr_of) == oracle


def test_the_next_recording_compacts_a_crashed_run_and_leaves_a_recording_one(tmp_path):
    repo = _repo(tmp_path / "proj", typed(False))
    st = Store(str(repo / ".flor"))
    release = tmp_path / "release"
    _done(_start(repo, "--kwargs", "lr=0.2", "--crash-at", "2"), ok=False)
    waiting = _start(repo, "--kwargs", "lr=0.3", "--wait-for", str(release))
    try:
        deadline = time.time() + 120
        while len(flor_ray.runs(store=st)) < 2 or len(_loose(st)) < 4:  # 2 parts each
            assert time.time() < deadline and waiting.poll() is None, waiting.stderr.read() if waiting.poll() else ""
            time.sleep(0.1)
            CACHE.reset()
        runs = flor_ray.runs(store=st)
        crashed = runs.loc[runs["lr"] == 0.2, "run_id"].item()
        live = runs.loc[runs["lr"] == 0.3, "run_id"].item()
        assert runs.set_index("run_id")["status"].to_dict() == {crashed: "incomplete", live: "running"}
        before = _frame(st, "loss")
        _done(_start(repo, "--kwargs", "lr=0.05", FLOR_CONSOLIDATE_AFTER="2"))
        # the crashed run compacted, then consolidated with the finished one; the
        # recording one untouched
        assert [r for r in _loose(st) if live in r] == [f"run_id={live}/source=record/part-0000{i}.parquet"
                                                        for i in range(2)]
        assert [r for r in _loose(st) if live not in r] == []
        (piece,) = log_parts(st, run_ids=[crashed], sources=["record"])
        assert piece.in_segment and piece.origin.endswith("/compact-00000-00001.parquet")
        after = _frame(st, "loss")
        pd.testing.assert_frame_equal(after[after["run_id"].isin(before["run_id"])].reset_index(drop=True),
                                      before.reset_index(drop=True), check_exact=True)
    finally:
        release.touch()
        _done(waiting)
    assert [r for r in _loose(st) if live in r] == [f"run_id={live}/source=record/compact-00000-00003.parquet"]


# ------------------------------------------------------------------------- S3
def test_s3_consolidation_reads_as_before_in_a_few_requests(history, capsys):
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    from flor_ray.store import damage

    repo, _ = history
    server = S3()
    try:
        server.client().create_bucket(Bucket="flor-segments")
        counting = Counting(server.server._server.app)
        server.server._server.app = counting
        url = "s3://flor-segments/store"
        proc = subprocess.run([sys.executable, "train.py", "--kwargs", "lr=0.05"], cwd=repo,
                              env=server.env(FLOR_STORE=url, **ENV), capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        st = server.store(url)
        (template,) = flor_ray.runs(store=st)["run_id"]
        bench_store.write_runs(st, st.read_json(layout.run_meta(template)), 39, 4, 5)
        frame, rows = _frame(st), _rows(st)
        done = consolidate(st, merge_all=True)
        assert len(done.runs) == 40 and len(done.written) == 1
        assert not [f for f in st.find(layout.LOGS, ".parquet") if "/run_id=" in f]
        counting.take()
        damage._PART_CACHE.clear()
        after = _frame(st)
        got = counting.take()
        pd.testing.assert_frame_equal(after, frame, check_exact=True)
        pd.testing.assert_frame_equal(_rows(st), rows, check_exact=True)
        with capsys.disabled():
            print(f"\nS3 requests of dataframe() over 40 consolidated runs: {got}")
        assert sum(got.values()) <= 20, got  # listings, the manifest, one segment: not a file a run
    finally:
        server.stop()

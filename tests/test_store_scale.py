"""The store at the scale of continuous training: a run's record parts compacted when it
ends (or by ``flor-ray check --repair`` after a crash) with every row kept exactly once,
readers that never see a row twice or miss one while a compaction runs, and queries
whose S3 requests do not grow with the number of files."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import flor_ray
from flor_ray.queries.cache import CACHE
from flor_ray.store import Store, damage, layout
from flor_ray.store.compaction import COMPACTED_KEY, compact_record
from flor_ray.store.consolidation import consolidate
from flor_ray.store.logs import log_parts
from flor_ray.store.manifest import read_manifest

from conftest import REPO_ROOT, S3, Counting, clean_env, git, reads_during, run_script, write

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import bench_store  # noqa: E402

EPOCHS = 4

TRAIN = '''
import argparse
import os
import signal

import torch
from torch.utils.data import DataLoader, TensorDataset

import flor_ray as flor


def make_data(n):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return TensorDataset(x, x @ torch.tensor([1.0, -2.0, 0.5, 3.0]))


def evaluate(model, loader):
    with torch.no_grad():
        return sum(float(torch.nn.functional.mse_loss(model(x).squeeze(1), y)) for x, y in loader)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default={epochs})
    p.add_argument("--crash-at", type=int, default=-1)
    opts = p.parse_args()
    torch.manual_seed(0)
    lr = flor.arg("lr", 0.05)
    loader = DataLoader(make_data(32), batch_size=8, shuffle=True)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for epoch in flor.loop("epoch", range(opts.epochs)):
        if epoch == opts.crash_at:
            os.kill(os.getpid(), signal.SIGKILL)
        for x, y in flor.loop("step", loader):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x).squeeze(1), y)
            loss.backward()
            opt.step()
            flor.log("loss", loss.item())
        sched.step()
        flor.log("acc", evaluate(model, loader))


if __name__ == "__main__":
    main()
'''.replace("{epochs}", str(EPOCHS))


def _record(repo: Path, *args: str, check: bool = True, **env: str) -> None:
    env = {"FLOR_FLUSH_INTERVAL": "0", **env}  # a part per epoch (the epochs take milliseconds)
    proc = run_script(repo, "train.py", *args, env=clean_env(**env), check=False)
    assert not check or proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> Path:
    """Runs lr=0.05 and lr=0.1 kept as one part per epoch, lr=0.05 compacted at its end,
    and lr=0.2 killed (SIGKILL) in its third epoch."""
    repo = tmp_path_factory.mktemp("scale") / "proj"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    write(repo, "train.py", TRAIN)
    _record(repo, "--kwargs", "lr=0.05", FLOR_COMPACT_AFTER="0")
    _record(repo, "--kwargs", "lr=0.1", FLOR_COMPACT_AFTER="0")
    _record(repo, "--kwargs", "lr=0.05")
    _record(repo, "--kwargs", "lr=0.2", "--crash-at", "2", check=False)
    return repo


def _copy(recorded: Path, tmp_path: Path) -> Store:
    dst = tmp_path / "proj"
    shutil.copytree(recorded, dst, symlinks=True)
    return Store(str(dst / ".flor"))


def _record_files(st: Store, run_id: str) -> list[str]:
    return sorted(p.name for p in Path(st.path(layout.log_folder(run_id, "record"))).iterdir())


def _frame(st: Store) -> pd.DataFrame:
    return flor_ray.dataframe("loss", "acc", store=st)


def _rows(st: Store) -> pd.DataFrame:
    return flor_ray.sql("SELECT run_id, name, loops, iter0, iter1, seq, value FROM logs "
                        "ORDER BY run_id, seq", store=st)


def _repair(st: Store) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "flor_ray.cli", "check", "--repair", "--store", st.url],
                          env=clean_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_a_run_compacts_its_parts_when_it_ends(recorded, tmp_path):
    st = _copy(recorded, tmp_path)
    runs = flor_ray.runs(store=st)
    kept, compacted = runs.loc[runs["lr"] == 0.05, "run_id"]
    assert len(_record_files(st, kept)) == EPOCHS
    (only,) = _record_files(st, compacted)
    assert only == f"compact-00000-{EPOCHS - 1:05d}.parquet"
    import pyarrow.parquet as pq

    replaced = json.loads(pq.read_metadata(st.path(layout.log_folder(compacted, "record"), only)).metadata[COMPACTED_KEY])
    assert replaced == [f"part-{e:05d}.parquet" for e in range(EPOCHS)]
    assert layout.run_meta(compacted) in read_manifest(st)  # sealed: its run file need not be read
    df = _frame(st)
    one, other = (df[df["run_id"] == r].drop(columns="run_id").reset_index(drop=True) for r in (kept, compacted))
    pd.testing.assert_frame_equal(one, other)  # the same training, parts or one file


def test_repair_compacts_crashed_and_kept_parts_keeping_every_row_once(recorded, tmp_path):
    st = _copy(recorded, tmp_path)
    runs = flor_ray.runs(store=st)
    crashed = runs.loc[runs["lr"] == 0.2, "run_id"].item()
    assert runs.loc[runs["lr"] == 0.2, "status"].item() == "incomplete"
    assert _record_files(st, crashed) == ["part-00000.parquet", "part-00001.parquet"]
    frame, rows = _frame(st), _rows(st)
    assert sorted(frame.loc[frame["run_id"] == crashed, "epoch"].unique()) == [0, 1]
    proc = _repair(st)
    assert f"run {crashed}" in proc.stdout
    for rid in runs["run_id"]:  # one compacted file a run, in its folder or in a segment
        (piece,) = log_parts(st, run_ids=[rid], sources=["record"])
        assert "/compact-" in piece.origin, piece
    CACHE.reset()
    pd.testing.assert_frame_equal(_frame(st), frame)
    pd.testing.assert_frame_equal(_rows(st), rows)
    assert {layout.run_meta(r) for r in runs["run_id"]} <= set(read_manifest(st))
    assert "compacted" not in _repair(st).stdout  # nothing left to do


def _synthetic(tmp_path: Path, runs: int, epochs: int, loose: bool) -> tuple[Store, list[str]]:
    st = Store(str(tmp_path / "store"))
    st.ensure()
    template = {"run_id": "20260101T000000-abc123", "version": "v1", "script": "train.py", "status": "finished",
                "started_at": "2026-01-01T00:00:00+00:00", "argv": ["train.py"], "env": {}}
    return st, bench_store.write_runs(st, template, runs, epochs, 5, loose=loose)


def test_a_reader_during_compaction_sees_each_row_once(tmp_path):
    runs, epochs = 24, 30
    st, ids = _synthetic(tmp_path, runs, epochs, loose=True)
    want = runs * epochs * 5

    def compact_all():
        for rid in ids:
            compact_record(st, rid)

    assert any(reads_during(st, compact_all, want))  # a read began while compacting
    assert all(len(_record_files(st, r)) == 1 for r in ids)


# ------------------------------------------------------------------------- S3
@pytest.fixture(scope="module")
def s3_store(tmp_path_factory):
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    server = S3()
    server.client().create_bucket(Bucket="flor-scale")
    counting = Counting(server.server._server.app)
    server.server._server.app = counting
    repo = tmp_path_factory.mktemp("s3scale") / "proj"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    write(repo, "train.py", bench_store.SCRIPT)
    url = "s3://flor-scale/store"
    run_script(repo, "train.py", "--epochs", "4", env=server.env(FLOR_STORE=url))
    st = server.store(url)
    (template,) = flor_ray.runs(store=st)["run_id"]
    meta = st.read_json(layout.run_meta(template))
    bench_store.write_runs(st, meta, RUNS_S3 - 1, 4, 5)
    consolidate(st, merge_all=True)  # as `flor-ray compact` leaves it: the runs' files in one segment
    write(repo, "today.py", bench_store.TODAY)
    yield st, repo, counting
    server.stop()


#: enough runs that a cost per run stands out from a fixed one: a listing per run folder
#: (200 or more) against the 8 allowed, 4 requests a run (800) against 3 a run and 50
RUNS_S3 = 200


def _requests(counting: Counting, fn) -> dict:
    CACHE.reset()
    damage._PART_CACHE.clear()
    counting.take()
    fn()
    return counting.take()


def test_s3_requests_do_not_grow_with_files(s3_store, capsys):
    st, repo, counting = s3_store
    got = {
        "runs": _requests(counting, lambda: flor_ray.runs(store=st)),
        "df": _requests(counting, lambda: flor_ray.dataframe("acc", store=st)),
        "sql": _requests(counting, lambda: flor_ray.sql("SELECT count(*) FROM logs", store=st)),
        "plan": _requests(counting, lambda: flor_ray.plan_replay(
            "gnorm", store=st, script=repo / "today.py", resources={"num_gpus": 0})),
    }
    with capsys.disabled():
        print(f"\nS3 requests at {RUNS_S3} runs: " + json.dumps(got))
    for what, counts in got.items():
        # a few listings (runs/, logs/, replays/, and logs/segments/ twice a read of the
        # relation: the plan reads it twice), a page of 1,000 objects each: a listing per
        # run folder would be RUNS_S3 or more
        assert counts.get("LIST", 0) <= 12, (what, got)
    # the run files are in the manifest: one GET, not one per run
    assert sum(got["runs"].values()) <= 6, got
    # df, SQL and the plan open the one segment that holds every run's rows: a file a run
    # would take 2 or more requests a run
    for what in ("df", "sql", "plan"):
        assert sum(got[what].values()) <= 40, (what, got)


@pytest.mark.slow
def test_bench_store_quick(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "bench_store.py"), "--quick"],
                          cwd=REPO_ROOT, env=clean_env(BENCH_RESULTS_DIR=str(tmp_path)), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    res = json.loads((tmp_path / "store.json").read_text())["quick"]
    assert set(res["ratios"]["in_process_s"]) == {"df", "sql", "runs", "plan"}
    for n in map(str, res["sizes"]):
        assert res["runs"][n]["files"] < int(n) * 4  # a compacted file a run, not a part per epoch

"""Restoring a mid-run checkpoint and continuing reproduces the recording bit for bit."""

from __future__ import annotations

import json
import shutil

import pytest

import flor_ray
from flor_ray.store.logs import read_logs
from flor_ray.store import Store

from conftest import TRAIN_SCRIPT, clean_env, init_repo, run_script, write


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """One recording of the training script, a checkpoint every epoch."""
    repo = tmp_path_factory.mktemp("restore") / "proj"
    repo.mkdir()
    init_repo(repo)
    write(repo, "train.py", TRAIN_SCRIPT)
    run_script(repo, env=clean_env(FLOR_CHECKPOINT_MAX_PERIOD="1"))
    return repo


@pytest.fixture
def repo(recorded, tmp_path):
    """The recorded repository and its store, copied: each test's replay rows are its own."""
    copy = tmp_path / "proj"
    shutil.copytree(recorded, copy, symlinks=True)
    return copy


def _recorded_run(repo):
    st = Store(str(repo / ".flor"))
    rid = flor_ray.runs(store=st).loc[0, "run_id"]
    return st, st.read_json(f"runs/{rid}.json")


def _replay(repo, st, meta, **spec):
    full = {
        "store": st.url,
        "run_id": meta["run_id"],
        "version": meta["version"],
        "script": meta["script"],
        "args": meta["args"],
        "names": None,
        "setup": False,
        "after": False,
        "output": f"logs/run_id={meta['run_id']}/source=replay/{spec['task']}.parquet",
        **spec,
    }
    path = repo.parent / f"{spec['task']}.json"
    path.write_text(json.dumps(full))
    run_script(repo, env=clean_env(FLOR_REPLAY=str(path)))
    return read_logs(st, run_ids=[meta["run_id"]], sources=("replay",)).to_pandas()


def _rows(df, name):
    d = df[df["name"] == name].sort_values(["iter0", "iter1"], na_position="first")
    return [(int(e), None if s != s or s is None else int(s), v) for e, s, v in zip(d["iter0"], d["iter1"], d["value_float"])]


def test_reexecute_from_mid_run_checkpoint_is_bit_for_bit(repo):
    st, meta = _recorded_run(repo)
    ckpts = {c["iteration"]: c for c in meta["checkpoints"]}
    assert sorted(ckpts) == [0, 1, 2, 3]
    rec = read_logs(st, run_ids=[meta["run_id"]], sources=("record",)).to_pandas()
    rep = _replay(repo, st, meta, task="reexec", mode="reexec", start=2, stop=3, restore=ckpts[1])
    want = [r for r in _rows(rec, "loss") if r[0] >= 2]
    got = _rows(rep, "loss")
    assert len(want) == 12 and got == want  # == on floats: bit for bit
    assert _rows(rep, "acc") == [r for r in _rows(rec, "acc") if r[0] >= 2]
    assert set(rep["task"]) == {"reexec"}


def test_skip_mode_restores_each_epoch(repo):
    st, meta = _recorded_run(repo)
    ckpts = {str(c["iteration"]): c for c in meta["checkpoints"]}
    rec = read_logs(st, run_ids=[meta["run_id"]], sources=("record",)).to_pandas()
    rep = _replay(repo, st, meta, task="skip", mode="skip", start=0, stop=3, checkpoints=ckpts, names=["acc"])
    assert _rows(rep, "acc") == _rows(rec, "acc")
    assert "loss" not in set(rep["name"])  # the inner loops were skipped


def test_replay_from_iteration_zero_matches_recording(repo):
    st, meta = _recorded_run(repo)
    rec = read_logs(st, run_ids=[meta["run_id"]], sources=("record",)).to_pandas()
    rep = _replay(repo, st, meta, task="full", mode="reexec", start=0, stop=3, restore=None)
    assert _rows(rep, "loss") == _rows(rec, "loss") and _rows(rep, "acc") == _rows(rec, "acc")

"""Recording end to end: runs, versions, the relation, args, errors, crashes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

import flor_ray
from flor_ray.store import Store

from conftest import TRAIN_SCRIPT, clean_env, git, run_script, write


def store_of(repo) -> Store:
    return Store(str(repo / ".flor"))


DETERMINISTIC = """
import flor_ray as flor

k = flor.arg("k", 2)
flor.log("setup", 7)
for epoch in flor.loop("epoch", range(3)):
    for step in flor.loop("step", range(2)):
        flor.log("x", epoch * 10 + step * k)
    flor.log("y", float(epoch) / 4 + VERSION_BUMP)
"""


def test_two_versions_exact_dataframe(repo):
    write(repo, "train.py", DETERMINISTIC.replace("VERSION_BUMP", "0"))
    git(repo, "add", "train.py")
    git(repo, "commit", "-qm", "v1")
    run_script(repo)
    write(repo, "train.py", DETERMINISTIC.replace("VERSION_BUMP", "1"))
    run_script(repo, "train.py", "--kwargs", "k=3")

    st = store_of(repo)
    runs = flor_ray.runs(store=st)
    assert list(runs["status"]) == ["finished", "finished"]
    assert list(runs["k"]) == [2, 3]
    v1, v2 = runs["version"]
    assert v1 != v2
    r1, r2 = runs["run_id"]

    df = flor_ray.dataframe("x", "y", store=st)
    rows = []
    for rid, ver, k, bump in ((r1, v1, 2, 0), (r2, v2, 3, 1)):
        for e in range(3):
            rows.append({"run_id": rid, "version": ver, "k": k, "epoch": e, "step": pd.NA, "x": float("nan"), "y": e / 4 + bump})
            for s in range(2):
                rows.append({"run_id": rid, "version": ver, "k": k, "epoch": e, "step": s, "x": e * 10 + s * k, "y": float("nan")})
    expected = pd.DataFrame(rows)
    expected["epoch"] = expected["epoch"].astype("Int64")
    expected["step"] = expected["step"].astype("Int64")
    got = df[expected.columns].reset_index(drop=True)
    got["x"] = got["x"].astype(float)
    pd.testing.assert_frame_equal(got, expected, check_dtype=False)

    # typed values: ints stay ints in the relation
    types = flor_ray.sql("SELECT name, vtype FROM logs GROUP BY ALL ORDER BY name", store=st)
    assert dict(zip(types["name"], types["vtype"])) == {"setup": "int", "x": "int", "y": "float"}
    # where over the args
    assert list(flor_ray.dataframe("x", where="k = 3", store=st)["run_id"].unique()) == [r2]
    assert list(flor_ray.runs(where="k < 3", store=st)["run_id"]) == [r1]


def test_user_git_state_untouched(repo):
    write(repo, "train.py", DETERMINISTIC.replace("VERSION_BUMP", "0"))
    write(repo, "notes.txt", "tracked\n")
    write(repo, ".gitignore", "data/\n")
    write(repo, "data/big.bin", "ignored data\n")
    git(repo, "add", "notes.txt", ".gitignore")
    git(repo, "commit", "-qm", "init")
    write(repo, "notes.txt", "tracked, modified and not staged\n")
    write(repo, "staged.txt", "staged\n")
    git(repo, "add", "staged.txt")
    before = (
        git(repo, "rev-parse", "HEAD"),
        git(repo, "symbolic-ref", "HEAD"),
        (repo / ".git" / "index").read_bytes(),
        git(repo, "status", "--porcelain"),
        (repo / "notes.txt").read_text(),
    )
    run_script(repo)
    after = (
        git(repo, "rev-parse", "HEAD"),
        git(repo, "symbolic-ref", "HEAD"),
        (repo / ".git" / "index").read_bytes(),
        git(repo, "status", "--porcelain"),
        (repo / "notes.txt").read_text(),
    )
    assert before == after  # .flor/ ignores itself, so status is unchanged too
    meta = flor_ray.runs(store=store_of(repo)).iloc[0]
    ref = f"refs/flor/{meta['run_id']}"
    files = git(repo, "ls-tree", "-r", "--name-only", ref).split()
    assert sorted(files) == [".gitignore", "notes.txt", "staged.txt", "train.py"]
    assert git(repo, "show", f"{ref}:notes.txt") == "tracked, modified and not staged\n"
    assert git(repo, "rev-parse", f"{ref}^") == before[0]
    assert git(repo, "rev-parse", f"{ref}^{{tree}}").strip() == meta["version"]
    # the code is in the store, content-addressed, readable without git
    from flor_ray.versions import read_file

    assert read_file(store_of(repo), meta["version"], "notes.txt") == b"tracked, modified and not staged\n"


def test_import_only_creates_no_run(repo):
    write(repo, "train.py", "import flor_ray\nprint('hello')\n")
    proc = run_script(repo)
    assert proc.stdout == "hello\n"
    assert not (repo / ".flor").exists()
    assert git(repo, "for-each-ref", "refs/flor") == ""


def test_import_is_light():
    code = (
        "import sys, time; t=time.perf_counter(); import flor_ray; dt=time.perf_counter()-t;"
        "heavy=[m for m in ('ray','torch','pyarrow','pandas','git','libcst','duckdb','numpy') if m in sys.modules];"
        "print(heavy, dt)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=clean_env(), check=True).stdout
    heavy, _ = out.rsplit(" ", 1)
    assert heavy == "[]"


def test_kwargs_removed_before_argparse_and_cast(repo):
    write(
        repo,
        "train.py",
        """
        import argparse
        import flor_ray as flor
        p = argparse.ArgumentParser()
        p.add_argument("--hidden", type=int, default=4)
        a = p.parse_args()
        lr = flor.arg("lr", 0.1)
        use = flor.arg("use_bn", False)
        name = flor.arg("opt", "sgd")
        flor.log("cfg", [a.hidden, lr, use, name])
        """,
    )
    run_script(repo, "train.py", "--hidden", "8", "--kwargs", "lr=0.5", "use_bn=true", "opt=adam")
    runs = flor_ray.runs(store=store_of(repo))
    assert runs.loc[0, "lr"] == 0.5 and bool(runs.loc[0, "use_bn"]) is True and runs.loc[0, "opt"] == "adam"
    assert runs.loc[0, "argv"] == "--hidden 8"
    df = flor_ray.dataframe("cfg", store=store_of(repo))
    assert df.loc[0, "cfg"] == [8, 0.5, True, "adam"]


@pytest.mark.parametrize(
    "body, message",
    [
        ("flor.log('', 1)", "invalid log name"),
        ("flor.log(3, 1)", "invalid log name"),
        ("flor.log('run_id', 1)", "column of the log relation"),
        ("flor.log('x', object())", "got a value of type object"),
        ("import torch; flor.log('x', torch.ones(3))", "more than one element"),
        ("flor.log('x', 2**70)", "int64"),
        ("flor.loop('e', 5)", "needs an iterable"),
        ("flor.arg('lr', 0.1)", "cannot be cast to float"),
        ("with flor.checkpointing():\n    with flor.checkpointing():\n        pass", "already active"),
        ("flor.checkpointing(x=3).__enter__()", "has no state_dict"),
    ],
)
def test_bad_input_is_a_clear_error(repo, body, message):
    write(repo, "train.py", "import flor_ray as flor\n" + body + "\n")
    proc = run_script(repo, "train.py", "--kwargs", "lr=fast", check=False)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "flor_ray.errors" in proc.stderr


def test_missing_repository_is_a_clear_error(tmp_path):
    write(tmp_path, "train.py", "import flor_ray as flor\nflor.log('x', 1)\n")
    proc = run_script(tmp_path, check=False)
    assert proc.returncode != 0 and "not inside a git repository" in proc.stderr and "git init" in proc.stderr
    assert not (tmp_path / ".flor").exists()


def test_unreachable_store_is_a_clear_error(repo):
    write(repo, "train.py", "import flor_ray as flor\nflor.log('x', 1)\n")
    proc = run_script(repo, env=clean_env(FLOR_STORE="nosuchproto://bucket/x"), check=False)
    assert proc.returncode != 0 and "nosuchproto" in proc.stderr and "FLOR_STORE" in proc.stderr


def test_failed_run_is_marked_and_keeps_rows(repo):
    write(
        repo,
        "train.py",
        """
        import flor_ray as flor
        for e in flor.loop("epoch", range(5)):
            flor.log("e", e)
            if e == 2:
                raise RuntimeError("diverged")
        """,
    )
    proc = run_script(repo, check=False)
    assert proc.returncode == 1 and "diverged" in proc.stderr
    st = store_of(repo)
    runs = flor_ray.runs(store=st)
    assert runs.loc[0, "status"] == "failed"
    meta = st.read_json(f"runs/{runs.loc[0, 'run_id']}.json")
    assert meta["error"]["type"] == "RuntimeError"
    assert list(flor_ray.dataframe("e", store=st)["e"]) == [0, 1, 2]


def test_sigkill_keeps_flushed_rows(repo):
    write(
        repo,
        "train.py",
        """
        import sys, time
        import flor_ray as flor
        for e in flor.loop("epoch", range(100)):
            for s in flor.loop("step", range(3)):
                flor.log("v", e * 3 + s)
            if e == 3:
                flor.log("unflushed", 1)
                print("ready", flush=True)
                time.sleep(60)
        """,
    )
    # epochs of microseconds: with the default flush_interval_s they would share one flush
    proc = subprocess.Popen([sys.executable, "train.py"], cwd=repo, env=clean_env(FLOR_FLUSH_INTERVAL="0"),
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    st = store_of(repo)
    runs = flor_ray.runs(store=st)
    assert runs.loc[0, "status"] == "incomplete"
    assert runs.loc[0, "iterations"] == 3
    df = flor_ray.dataframe("v", store=st)
    assert sorted(df["v"]) == list(range(9))  # epochs 0..2 flushed; epoch 3 lost
    with pytest.raises(flor_ray.errors.QueryError):
        flor_ray.dataframe("unflushed", store=st)


def test_commit_flushes_by_hand(repo):
    write(
        repo,
        "train.py",
        """
        import time
        import flor_ray as flor
        flor.log("a", 1)
        flor.commit()
        print("committed", flush=True)
        time.sleep(60)
        """,
    )
    proc = subprocess.Popen([sys.executable, "train.py"], cwd=repo, env=clean_env(), stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "committed"
    df = flor_ray.dataframe("a", store=store_of(repo))
    proc.kill()
    proc.wait()
    assert list(df["a"]) == [1]


def test_checkpoints_and_timings_recorded(repo):
    write(repo, "train.py", TRAIN_SCRIPT)
    run_script(repo)
    st = store_of(repo)
    rid = flor_ray.runs(store=st).loc[0, "run_id"]
    meta = st.read_json(f"runs/{rid}.json")
    assert meta["outer_loop"] == "epoch" and meta["iterations"] == 4
    its = [c["iteration"] for c in meta["checkpoints"]]
    assert its[0] == 0 and its[-1] == 3  # first (to measure) and last are always kept
    assert all(c["verified"] and c["inner_exits"] == 1 for c in meta["checkpoints"])
    t = meta["timings"]
    assert len(t["outer_s"]) == 4 and t["inner_n"] == [6, 6, 6, 6]
    assert all(i <= o for i, o in zip(t["inner_s"], t["outer_s"])) and t["setup_s"] > 0
    assert meta["env"]["device"] == "cpu" and meta["checkpointing"] == ["net", "opt"]

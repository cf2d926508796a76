"""Inputs refused with a message that names the fix (issue 14, part 6).

Names that would shadow the relation's columns or loop columns, names with '/',
control characters or over the length limit, numpy defaults of ``flor.arg``, broken
``--kwargs``, malformed and unreachable store URLs, binary files given to
``propagate``, and a top-level loop that runs twice under one name.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from flor_ray.errors import InvalidNameError, KwargsError, LoopError, StoreError
from flor_ray.record.args import take_kwargs
from flor_ray.record.loops import LoopRuntime
from flor_ray.record.names import check_name
from flor_ray.store import Store

from conftest import clean_env, git, run_script, write


def cli(cwd, *args, env=None):
    return subprocess.run([sys.executable, "-m", "flor_ray.cli", *args], cwd=cwd, env=env or clean_env(),
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def proj(repo):
    write(repo, "README", "a project\n")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "init")
    return repo


# ------------------------------------------------------------------ names
@pytest.mark.parametrize("name", ["loops", "value", "iter0", "name", "run_id"])
def test_log_and_loop_names_that_are_relation_columns_are_refused(name):
    for kind in ("log", "loop"):
        with pytest.raises(InvalidNameError, match=f"{name!r} is a column of the log relation.*pick another name"):
            check_name(kind, name)


def test_a_log_named_like_a_loop_is_refused_either_way():
    rt = LoopRuntime()
    for epoch in rt.loop("epoch", range(2)):
        with pytest.raises(InvalidNameError, match="also the name of a flor.loop.*'epoch_value'"):
            rt.log("epoch", epoch)
    rt2 = LoopRuntime()
    rt2.log("step", 1)
    with pytest.raises(LoopError, match="name of a logged value"):
        rt2.loop("step", range(2))


@pytest.mark.parametrize("name, message", [
    ("train/loss", "'/' separates loop names.*'train_loss'"),
    ("a\tb", "control character '\\\\t'"),
    ("x" * 201, "201 characters long; the limit is 200"),
    (3, "it is a int; use a string"),
])
def test_malformed_names_say_what_is_wrong(name, message):
    with pytest.raises(InvalidNameError, match=message):
        check_name("log", name)


def test_df_of_a_script_logging_a_loop_name_fails_in_the_script_not_in_df(proj):
    write(proj, "train.py", """
        import flor_ray as flor
        for epoch in flor.loop("epoch", range(2)):
            flor.log("epoch", epoch * 10)
    """)
    proc = run_script(proj, check=False)
    assert proc.returncode == 1 and "InvalidNameError" in proc.stderr and "'epoch_value'" in proc.stderr


def test_second_top_level_loop_with_the_same_name_is_refused(proj):
    write(proj, "train.py", """
        import flor_ray as flor
        for epoch in flor.loop("epoch", range(2)):
            flor.log("a", epoch)
        for epoch in flor.loop("epoch", range(2)):
            flor.log("b", epoch)
    """)
    proc = run_script(proj, check=False)
    assert proc.returncode == 1 and "runs a second time at the top level" in proc.stderr, proc.stderr
    assert "'epoch2'" in proc.stderr


# -------------------------------------------------------------- flor.arg
def test_arg_with_a_numpy_default_is_a_plain_number(proj):
    write(proj, "train.py", """
        import numpy as np
        import flor_ray as flor
        lr = flor.arg("lr", np.float64(0.1))
        n = flor.arg("n", np.int64(3))
        print(type(lr).__name__, lr, type(n).__name__, n)
        try:
            flor.arg("layers", [1, 2])
        except TypeError as exc:
            print("refused:", exc)
    """)
    proc = run_script(proj, "train.py", "--kwargs", "lr=0.5")
    assert "float 0.5 int 3" in proc.stdout
    assert "refused: flor.arg('layers', default) got a default of type list" in proc.stdout
    assert "invalid arg name" not in proc.stdout


@pytest.mark.parametrize("argv, given", [
    (["--kwargs", "n"], "'n'"),
    (["--kwargs="], "nothing after it"),
    (["--kwargs"], "nothing after it"),
    (["--kwargs", "--lr", "1"], "'--lr'"),
    (["--kwargs", "a=1", "b"], "'b'"),
])
def test_kwargs_without_name_value_are_refused(argv, given):
    with pytest.raises(KwargsError, match=f"--kwargs takes name=value pairs.*got {given}"):
        take_kwargs(list(argv))


def test_kwargs_pairs_are_taken_out_of_argv():
    argv = ["train.py", "--kwargs", "lr=0.1", "name=a=b", "--epochs", "3", "--kwargs=k=2"]
    assert take_kwargs(argv) == {"lr": "0.1", "name": "a=b", "k": "2"}
    assert argv == ["train.py", "--epochs", "3"]


def test_script_given_a_broken_kwargs_stops_with_the_fix(proj):
    write(proj, "train.py", """
        import flor_ray as flor
        flor.log("x", 1)
    """)
    proc = run_script(proj, "train.py", "--kwargs", "n", check=False)
    assert proc.returncode == 1 and "--kwargs takes name=value pairs" in proc.stderr
    assert not (proj / ".flor").exists()  # no run was created


# ------------------------------------------------------------------ stores
def test_store_url_with_one_slash_is_refused(tmp_path):
    with pytest.raises(StoreError, match="write s3://b/f"):
        Store("s3:/b/f")
    proc = cli(tmp_path, "runs", env=clean_env(FLOR_STORE="s3:/b/f"))
    assert proc.returncode == 2 and "write s3://b/f" in proc.stderr
    assert not (tmp_path / "s3:").exists()


def test_unreachable_http_store_is_not_reported_as_missing(tmp_path):
    pytest.importorskip("aiohttp")
    proc = cli(tmp_path, "runs", "--store", "http://127.0.0.1:1/flor")
    assert proc.returncode == 2
    assert "unreachable" in proc.stderr and "127.0.0.1:1" in proc.stderr
    assert "no flor_ray store" not in proc.stderr


# --------------------------------------------------------------- propagate
def test_propagate_on_a_binary_file_names_it(tmp_path):
    (tmp_path / "today.py").write_text("import flor_ray as flor\nflor.log('x', 1)\n")
    (tmp_path / "old.pt").write_bytes(b"\x80\x02\xff\xfe binary")
    proc = cli(tmp_path, "propagate", "today.py", "old.pt")
    # (main's propagate reads the files with a check of its own; this test guards it)
    assert proc.returncode == 2 and "old.pt" in proc.stderr and "not UTF-8 text" in proc.stderr
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr

"""``flor-ray df`` prints without pandas what the pandas path prints, byte for byte.

One recorded store (two runs of a training-shaped script, then a real replay on the
local Ray that back-fills ``gnorm`` and re-logs the step loop's names as
``<name>__replay``) is queried through the command line's columns
(:func:`flor_ray.queries.dataframe.render_columns`) and through the frame
``flor.dataframe`` returns, written as pandas writes it (``to_csv``, ``to_json``,
``to_string``): the texts must be equal for every shape the store holds. Where the
renderer hands a column back to pandas (floats beyond fixed notation in a table), the
command line goes through pandas and prints the same text.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

import flor_ray
from flor_ray import cli
from flor_ray.errors import QueryError
from flor_ray.execution.driver import run_plan
from flor_ray.queries.dataframe import frame, render_columns
from flor_ray.store import Store

from conftest import clean_env, git, init_repo, run_script, write

TRAIN = '''
import argparse
import math

import flor_ray as flor


def lr_at(base, epoch, epochs):
    """Cosine annealing from ``base``."""
    return base * 0.5 * (1 + math.cos(math.pi * epoch / epochs))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--steps", type=int, default=3)
    opts, _ = p.parse_known_args()
    base = flor.arg("lr", 0.1)
    seed = flor.arg("seed", 0)
    flor.arg("opt", 'sgd, "nesterov"')
    flor.arg("warm", True)
    if base < 0.08:
        flor.arg("wd", 0.0005)
    w = 1.0 + seed
    phases = ['warm, "up"', "cos/anneal \\u00e9", "tail"]
    spikes = [float("nan"), float("inf"), -0.0, 1e-9, 1e20]
    for epoch in flor.loop("epoch", range(opts.epochs)):
        lr = lr_at(base, epoch, opts.epochs)
        for step in flor.loop("step", range(opts.steps)):
            def closure():
                return w * w + step

            flor.log("closure", closure())  # the optimizer calls it twice a step
            grad = 2 * w
            w -= lr * grad
            flor.log("closure", closure())
            flor.log("loss", w * w)
            #GNORM
        acc = 1.0 / (1.0 + w * w)
        flor.log("acc", acc)
        flor.log("seen", 2 ** 60 + 12345 * epoch + seed)
        flor.log("improved", epoch % 2 == 0)
        flor.log("phase", phases[epoch % 3])
        flor.log("spike", spikes[epoch % 5])
        if epoch % 2 == 0:  # logged on even epochs only: missing elsewhere
            flor.log("val", -acc)
            flor.log("count", 7 * epoch)
            flor.log("even", True)


if __name__ == "__main__":
    main()
'''

#: (names, where) the tests query, each a shape of the result
CASES = {
    "one name": (["acc"], None),
    "only replayed": (["gnorm"], None),
    "recorded and replayed": (["loss"], None),
    "several names, replayed beside recorded": (["loss", "gnorm", "acc"], None),
    "occurrence": (["closure"], None),
    "occurrence in a join, nested loops": (["acc", "closure", "loss"], None),
    "large ints, bools, strings": (["seen", "improved", "phase"], None),
    "nan, inf, -0.0, tiny and huge floats": (["spike"], None),
    "missing values": (["acc", "val", "count", "even"], None),
    "where": (["acc", "phase"], "lr < 0.08"),
    "where, one run": (["loss", "gnorm"], "seed = 0"),
}


@pytest.fixture(scope="module")
def st(tmp_path_factory, ray_local):
    repo = tmp_path_factory.mktemp("df-columns") / "proj"
    repo.mkdir()
    init_repo(repo)
    write(repo, "train.py", TRAIN)
    git(repo, "add", "train.py")
    git(repo, "-c", "user.name=d", "-c", "user.email=d@x", "commit", "-qm", "train")
    env = clean_env(FLOR_STORE=str(repo / ".flor"))
    run_script(repo, "train.py", env=env)
    run_script(repo, "train.py", "--kwargs", "lr=0.05", "seed=2", "warm=False", env=env)
    write(repo, "train.py", TRAIN.replace("#GNORM", 'flor.log("gnorm", abs(grad))'))
    store = Store(env["FLOR_STORE"])
    report = run_plan(flor_ray.plan_replay(["gnorm"], store=store, script=repo / "train.py"), progress=False)
    assert not report.failed, str(report)
    return store


def _pandas_text(df, fmt: str) -> str:
    """What the command line writes for a frame through pandas."""
    if fmt == "table":
        return cli._render_table(df) + "\n"
    if fmt == "csv":
        return df.to_csv(index=False)
    return df.to_json(orient="records", date_format="iso") + "\n"


def _cli_text(st, capsys, names, where, fmt) -> str:
    args = ["df", *names, "--store", st.url, "--format", fmt] + (["--where", where] if where else [])
    assert cli.main(args) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("fmt", ["table", "csv", "json"])
@pytest.mark.parametrize("case", list(CASES))
def test_df_prints_what_pandas_prints(st, capsys, case, fmt):
    names, where = CASES[case]
    df = flor_ray.dataframe(*names, where=where, store=st)
    assert len(df) and _cli_text(st, capsys, names, where, fmt) == _pandas_text(df, fmt)


def test_the_store_holds_every_shape(st):
    """The cases above are what they say (else the comparisons prove less)."""
    wide = flor_ray.dataframe("loss", "gnorm", "acc", store=st)
    assert {"loss", "loss__replay", "gnorm", "acc", "lr", "seed", "opt", "warm", "wd"} <= set(wide.columns)
    assert "gnorm__replay" not in wide and wide["gnorm"].notna().any() and wide["step"].isna().any()
    assert wide["wd"].isna().any() and wide["wd"].notna().any()  # an arg of one run only
    assert list(flor_ray.dataframe("closure", store=st)["occurrence"].unique()) == [0, 1]
    missing = flor_ray.dataframe("acc", "val", "count", "even", store=st)
    assert missing["val"].isna().any() and str(missing["count"].dtype) == "float64"
    assert str(missing["even"].dtype) == "object"
    spike = flor_ray.dataframe("spike", store=st)["spike"].tolist()
    assert any(math.isnan(v) for v in spike) and math.inf in spike and 1e20 in spike
    assert any(v == 0.0 and math.copysign(1, v) < 0 for v in spike)
    seen = flor_ray.dataframe("seen", store=st)["seen"]
    assert str(seen.dtype) == "int64" and seen.max() > 2 ** 60
    assert len(flor_ray.dataframe("acc", where="lr < 0.08", store=st)["run_id"].unique()) == 1


@pytest.mark.parametrize("fmt", ["table", "csv", "json"])
@pytest.mark.parametrize("case", [c for c in CASES if c != "nan, inf, -0.0, tiny and huge floats"])
def test_common_shapes_need_no_pandas(st, case, fmt):
    """Every case but the floats a table or JSON shows in pandas' own notation is
    printed by the renderer (the comparisons above then test it, not pandas twice)."""
    names, where = CASES[case]
    assert render_columns(frame(st, names, where), fmt) is not None


def test_floats_beyond_fixed_notation_go_through_pandas_in_a_table_only(st):
    fr = frame(st, ["spike"])
    assert render_columns(fr, "csv") is not None  # repr: what pandas writes
    assert render_columns(fr, "table") is None and render_columns(fr, "json") is None


def test_an_empty_result_prints_as_pandas_prints_it(st):
    fr = frame(st, [], where="lr > 5")
    df = flor_ray.dataframe(where="lr > 5", store=st)
    assert list(df.columns) == ["run_id", "version"] and not len(df)
    from flor_ray.queries import render

    cols = render_columns(fr, "csv")
    assert render.render_csv(cols) == df.to_csv(index=False)
    assert render.render_json(cols) == df.to_json(orient="records", date_format="iso")
    assert render.render_table(cols) + "\n" == _pandas_text(df, "table")


def test_no_match_is_the_same_error(st, capsys):
    with pytest.raises(QueryError) as api:
        flor_ray.dataframe("acc", where="lr > 5", store=st)
    assert cli.main(["df", "acc", "--where", "lr > 5", "--store", st.url]) == 2
    assert str(api.value) in capsys.readouterr().err


def test_a_file_gets_the_same_bytes(st, tmp_path):
    names = ["acc", "closure", "loss", "gnorm"]
    df = flor_ray.dataframe(*names, store=st)
    for fmt in ("csv", "json", "table"):
        out = tmp_path / f"x.{fmt}"
        assert cli.main(["df", *names, "--store", st.url, "--format", fmt, "-o", str(out)]) == 0
        want = _pandas_text(df, fmt)
        assert out.read_text() == (want[:-1] if fmt == "json" else want)  # JSON to a file: no newline


def test_the_command_line_imports_no_pandas(st):
    code = ("import json, sys\nfrom flor_ray.cli import main\nrc = main(sys.argv[1:])\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'pandas' "
            "or m == 'pyarrow.compute')), file=sys.stderr)\nsys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, "df", "acc", "closure", "loss", "gnorm", "--store", st.url,
                           "--format", "csv"], env=clean_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stderr.strip().splitlines()[-1]) == []
    assert proc.stdout == flor_ray.dataframe("acc", "closure", "loss", "gnorm", store=st).to_csv(index=False)


@pytest.mark.parametrize("fmt", ["table", "csv", "json"])
def test_repeated_values_print_as_pandas_prints_them(fmt):
    """Values repeated on many rows (an arg per run, a flag) are formatted once each:
    0.0 and -0.0, equal as keys, stay apart; NaN and missing values stay missing."""
    import numpy as np
    import pandas as pd

    from flor_ray.queries import render

    n = 40
    data = {
        "zeros": np.array([0.0, -0.0, 0.5, 0.25] * (n // 4)),
        "lr": np.array([0.1, 0.05] * (n // 2)),
        "nan": np.array([np.nan, 1.5] * (n // 2)),
        "big": np.array([2 ** 62, -(2 ** 62)] * (n // 2), dtype=np.int64),
        "flag": np.array([True, False] * (n // 2)),
        "word": np.array(['a, "b"', "c/d", None, "e"] * (n // 4), dtype=object),
        "maybe": np.array([True, np.nan] * (n // 2), dtype=object),
    }
    epoch = pd.array([None, *range(n - 1)], dtype="Int64")
    cols = [render.array_column(k, v) for k, v in data.items()]
    cols.append(render.array_column("epoch", np.asarray(epoch.fillna(0), dtype=np.int64), np.asarray(epoch.isna())))
    df = pd.DataFrame({**data, "epoch": epoch})
    assert all(c is not None and fmt in c.formats for c in cols)
    got = {"table": lambda: render.render_table(cols) + "\n", "csv": lambda: render.render_csv(cols),
           "json": lambda: render.render_json(cols) + "\n"}[fmt]()
    assert got == _pandas_text(df, fmt)

"""The command line at the scale of many runs, asserted without a clock: ``flor-ray
runs`` imports neither pandas nor pyarrow, duckdb or fsspec and prints what the pandas
path prints, byte for byte; :mod:`flor_ray.queries.render` agrees with pandas on
every value it accepts and hands the others back; a dry-run plan reads each code
version and the manifest once however many runs share them, and imports no Ray."""

from __future__ import annotations

import collections
import json
import random
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import flor_ray
from flor_ray import cli
from flor_ray.queries import render
from flor_ray.queries.cache import CACHE
from flor_ray.store import Store, layout

from conftest import REPO_ROOT, clean_env, init_repo

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import bench_store  # noqa: E402

HEAVY = ("pandas", "pyarrow", "duckdb", "fsspec", "numpy", "ray")
WHERE_ALL = "run_id IS NOT NULL"  # selects every run, through the pandas path

#: args of hand-written runs beside the synthetic ones: kinds the runs table mixes
ODD_ARGS = [
    {"lr": 0.125, "opt": "sgd, \"nesterov\"", "tag": "a/b é", "warm": True, "seed": -3},
    {"lr": 1e-3, "opt": None, "warm": False, "batch": 64},
    {"lr": 12.5, "tag": "ünï", "batch": 128, "seed": 7},
]


def _cli(repo: Path, env: dict, *args: str) -> tuple[str, list[str]]:
    """Run the real command line in a fresh interpreter: its stdout and the heavy
    modules it had imported by the end."""
    code = ("import json, sys\nfrom flor_ray.cli import main\nrc = main(sys.argv[1:])\n"
            f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})), file=sys.stderr)\n"
            "sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=repo, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, json.loads(proc.stderr.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def history(tmp_path_factory):
    """A recorded run, 11 synthetic runs of its version (one compacted file each, in
    the manifest) and 3 hand-written runs with mixed args (read from their run files)."""
    root = tmp_path_factory.mktemp("cli-speed")
    (root / "proj").mkdir()
    repo = init_repo(root / "proj")
    env = clean_env(FLOR_STORE=str(root / "store"))
    template = bench_store.record_template(repo, env)
    st = Store(env["FLOR_STORE"])
    bench_store.write_runs(st, template, 11, 3, 2)
    for i, args in enumerate(ODD_ARGS):
        rid = f"{template['run_id']}-odd{i}"
        st.write_json(layout.run_meta(rid), {**template, "run_id": rid, "args": args,
                                             "argv": ["train.py", "--x", str(i)],
                                             "started_at": f"2026-12-01T10:00:0{i}.{i * 250:03d}+01:00"})
    (repo / "today.py").write_text(bench_store.TODAY)
    CACHE.reset()
    return repo, env, st


def test_runs_imports_no_heavy_module_and_prints_what_pandas_prints(history):
    repo, env, st = history
    for fmt in ("table", "csv", "json"):
        fast, loaded = _cli(repo, env, "runs", "--format", fmt)
        assert loaded == [], f"flor-ray runs --format {fmt} imported {loaded}"
        slow, loaded = _cli(repo, env, "runs", "--where", WHERE_ALL, "--format", fmt)
        assert "pandas" in loaded  # the oracle did take the pandas path
        assert fast == slow, fmt
    assert len(fast) > 0 and len(json.loads(fast)) == 15
    assert "ünï" in _cli(repo, env, "runs")[0]


def test_runs_to_a_file_writes_the_same_bytes(history, tmp_path, capsys):
    repo, env, st = history
    for ext in ("csv", "json", "txt"):
        fast, slow = tmp_path / f"fast.{ext}", tmp_path / f"slow.{ext}"
        assert cli.main(["runs", "--store", st.url, "-o", str(fast)]) == 0
        assert cli.main(["runs", "--store", st.url, "--where", WHERE_ALL, "-o", str(slow)]) == 0
        assert fast.read_bytes() == slow.read_bytes(), ext
    err = capsys.readouterr().err
    assert err.count(f"wrote 15 rows to {fast}") == 1 and err.count(f"wrote 15 rows to {slow}") == 1


def test_runs_with_a_value_pandas_must_show_goes_through_pandas(history, tmp_path):
    repo, env, st = history
    odd = Store(str(tmp_path / "odd"))
    odd.ensure()
    for i, args in enumerate([{"layers": [64, 32]}, {"layers": "deep"}]):  # a list: pandas' own rendering
        meta = st.read_json(layout.run_meta(flor_ray.runs(store=st)["run_id"][0]))
        rid = f"20261202T000000-0dd00{i}"
        odd.write_json(layout.run_meta(rid), {**meta, "run_id": rid, "args": args})
    fast, loaded = _cli(repo, {**env, "FLOR_STORE": odd.url}, "runs")
    slow, _ = _cli(repo, {**env, "FLOR_STORE": odd.url}, "runs", "--where", WHERE_ALL)
    assert "pandas" in loaded and fast == slow and "[64, 32]" in fast


# ----------------------------------------------------------------- render
def _rows(rng: random.Random, n: int) -> list[dict]:
    strings = ["train.py", "a,b", 'say "hi"', "x/y", "é", "ünï code", "", " pad ", "NaN", "-1.5", "日本"]
    rows = []
    for i in range(n):
        mag = 10.0 ** rng.randint(-5, 5)  # within what render takes: 1e-6 <= |f| <= 1e6
        row = {
            "i": rng.randint(-10**6, 10**6),
            "f": rng.choice([-1, 1]) * rng.uniform(0.1, 1) * mag if rng.random() > 0.1 else float("nan"),
            "g": rng.choice([0.1, 0.25, 1.0, 2.0, 0.3333333333333333, 1e-6, 1e6, -0.0]),
            "b": rng.random() > 0.5,
            "s": rng.choice(strings + [None]) if i else "train.py",  # a column of None alone goes to pandas
            "n": rng.choice([1, 2, 3, None]) if i else 1,  # ints with a gap: pandas makes them floats
            "t": f"2026-0{rng.randint(1, 9)}-1{rng.randint(0, 9)}T0{rng.randint(0, 9)}:1{rng.randint(0, 9)}:3{i % 10}"
                 + rng.choice(["", ".5", ".125", ".123456", ".000"]) + rng.choice(["+00:00", "Z", "-05:00", ""]),
        }
        if rng.random() > 0.3:
            row["sometimes"] = rng.choice([1.5, 2, 0.001])
        if rng.random() > 0.3:
            row["flag"] = rng.random() > 0.5  # absent elsewhere: pandas' object column of bools and NaN
        rows.append(row)
    return rows


def _columns(rows: list[dict]) -> list[render.Column]:
    names = list(dict.fromkeys(k for r in rows for k in r))
    cols = [(render.time_column if n == "t" else render.column)(n, [r.get(n, render.MISSING) for r in rows])
            for n in names]
    assert all(c is not None for c in cols), [n for n, c in zip(names, cols) if c is None]
    return cols


@pytest.mark.parametrize("seed", range(6))
def test_render_agrees_with_pandas(seed):
    rng = random.Random(seed)
    rows = _rows(rng, rng.choice([1, 3, 40]))
    cols = _columns(rows)
    df = pd.DataFrame(rows)
    df["t"] = pd.to_datetime(df["t"], utc=True, errors="coerce", format="ISO8601")
    assert render.render_csv(cols) == df.to_csv(index=False)
    assert render.render_json(cols) == df.to_json(orient="records", date_format="iso")
    assert render.render_table(cols) == cli._render_table(df)


@pytest.mark.parametrize("values", [
    [1.5, 2e7], [1e-9, 1.0], [float("inf")], [[1, 2]], [{"a": 1}], [1, "a"], [True, 1], [True, None, render.MISSING],
    ["x" * 61], ["two\nlines"], [None, None], [2**60, 0.5],
])
def test_render_hands_back_what_it_does_not_print_as_pandas_does(values):
    assert render.column("c", values) is None


def test_render_times_it_cannot_parse_go_back_to_pandas():
    assert render.time_column("t", ["2026-12-01T10:00:00.1234567+00:00"]) is None  # nanoseconds
    assert render.time_column("t", ["yesterday"]) is None  # pandas: NaT
    got = render.time_column("t", ["2026-12-01T10:00:00+02:00", None])
    assert got.values[0].hour == 8 and got.values[1] is None


# ------------------------------------------------------------------ plan
def _plan_opens(st: Store, repo: Path, where: str | None) -> tuple[collections.Counter, str]:
    """The store files a dry-run plan opens (by kind) and its explanation."""
    opened: collections.Counter = collections.Counter()
    root = st.root + "/"
    active = [True]

    def hook(event, args):
        if active[0] and event == "open" and isinstance(args[0], str) and args[0].startswith(root):
            rel = args[0][len(root):]
            opened[rel if not rel.startswith(layout.LOGS) else layout.LOGS] += 1

    sys.addaudithook(hook)  # audit hooks stay for the process: this one goes quiet below
    try:
        CACHE.reset()
        plan = flor_ray.plan_replay("gnorm", store=st, where=where, script=str(repo / "today.py"),
                                    resources={"num_gpus": 0})
    finally:
        active[0] = False
    return opened, plan.explain()


def test_a_dry_run_plan_reads_each_version_and_the_manifest_once(history):
    repo, env, st = history
    few, few_plan = _plan_opens(st, repo, "seed < 2")
    every, every_plan = _plan_opens(st, repo, None)
    assert few_plan.count("Task[") == 3 and every_plan.count("Task[") == 15  # seeds 0, 1 and -3
    code = {k: v for k, v in every.items() if k.startswith((layout.CODE_VERSIONS, layout.CODE_OBJECTS))}
    assert code and code == {k: v for k, v in few.items() if k in code}, (code, few)
    assert all(n <= 2 for n in code.values()), code  # the version's manifest: its script and its files
    assert every.get(layout.MANIFEST) == 1, every
    runs_read = [k for k in every if k.startswith(layout.RUNS + "/")]
    assert len(runs_read) == len(ODD_ARGS), runs_read  # the sealed runs' files stand in the manifest


def test_a_dry_run_imports_no_ray(history):
    repo, env, st = history
    out, loaded = _cli(repo, env, "replay", "gnorm", "--script", "today.py", "--dry-run", "--num-gpus", "0")
    assert out.startswith("ReplayPlan[names=gnorm; runs=15;") and "ray" not in loaded


@pytest.mark.parametrize("seed", range(3))
def test_frames_print_as_pandas_prints_them(seed):
    rng = random.Random(seed)
    # no times or objects: a frame's columns are str, floats, ints and bools
    rows = [{k: v for k, v in r.items() if k not in ("t", "flag")} for r in _rows(rng, rng.choice([2, 40]))]
    df = pd.DataFrame(rows)
    df["epoch"] = pd.array(range(len(df)), dtype="Int64")  # the frame's loop columns are nullable integers
    cols = render.frame_columns(df)
    assert cols is not None and {"int", "float", "bool", "str"} <= {c.kind for c in cols}
    assert render.render_csv(cols) == df.to_csv(index=False)
    assert render.render_json(cols) == df.to_json(orient="records", date_format="iso")
    assert render.render_table(cols) == cli._render_table(df)
    df.loc[0, "epoch"] = pd.NA
    assert render.frame_columns(df) is None  # pandas' <NA>: its own rendering


def test_df_and_sql_print_what_pandas_prints(history, capsys):
    repo, env, st = history
    frame = flor_ray.dataframe("acc", where="seed BETWEEN 0 AND 5", store=st)  # the odd runs' args: objects
    query = ("SELECT run_id, count(*) AS n, max(value) AS best FROM logs WHERE name = 'acc' "
             "GROUP BY run_id ORDER BY run_id")
    result = flor_ray.sql(query, store=st)
    for args, df in ((["df", "acc", "--where", "seed BETWEEN 0 AND 5"], frame), (["sql", query], result),
                     (["df", "acc"], flor_ray.dataframe("acc", store=st))):  # the last one with objects: pandas
        for fmt, expected in (("table", cli._render_table(df) + "\n"), ("csv", df.to_csv(index=False)),
                              ("json", df.to_json(orient="records", date_format="iso") + "\n")):
            assert cli.main([*args, "--store", st.url, "--format", fmt]) == 0
            assert capsys.readouterr().out == expected, (args, fmt)
    assert render.frame_columns(result) is not None  # the fast path ran (the frames' args of other runs are None)
    assert render.frame_columns(frame.drop(columns=[c for c in frame if frame[c].dtype == object])) is not None

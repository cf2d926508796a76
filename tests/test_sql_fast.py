"""sql() through the reader (flor_ray.queries.sources): the same tables, rows and printed
text as the pyarrow/pandas path, on recorded runs with mixed argument types, replayed
values, loose parts and a consolidated segment; the sandbox still reads no file, the
store's own parts included; the command line prints without pandas."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pandas as pd
import pytest

import flor_ray
from flor_ray import cli
from flor_ray.errors import QueryError
from flor_ray.queries import sources
from flor_ray.queries import sql as query_sql
from flor_ray.store import Store

from conftest import clean_env, git, run_script, write

V1 = """
import argparse

import flor_ray as flor


def batches(n, seed):
    return [((seed * 7 + i) % 5) / 4.0 for i in range(n)]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    lr = flor.arg("lr", 0.1)
    n = flor.arg("n", 2)
    acc = 0.0
    for epoch in flor.loop("epoch", range(n)):
        for step in flor.loop("step", range(args.steps)):
            loss = sum(batches(4, epoch * 10 + step)) * lr
            flor.log("loss", loss)
        acc = min(1.0, acc + lr * 3)
        flor.log("acc", acc)
        flor.log("tag", f"e{epoch}")
        #NEW


main()
"""
# the second version names more arguments (a bool, a str): the first version's runs lack them
V2 = V1.replace('    n = flor.arg("n", 2)\n', '    n = flor.arg("n", 2)\n    flag = flor.arg("flag", True)\n'
                '    opt = flor.arg("opt", "sgd")\n')
NEW = 'flor.log("half", acc / 2)'


def _commit(repo: Path, text: str, msg: str) -> None:
    write(repo, "train.py", text)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", msg)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """Runs of two versions (ints, floats, strs, bools, keys missing from older runs), and
    one name back-filled by a replay: loose parts."""
    from flor_ray.execution.driver import LocalRunner, run_plan

    repo = tmp_path_factory.mktemp("sqlfast") / "proj"
    repo.mkdir()
    git(repo, "init", "-q")
    git(repo, "config", "user.email", "dev@example.com")
    git(repo, "config", "user.name", "Dev")
    _commit(repo, V1, "v1")
    run_script(repo)
    run_script(repo, "train.py", "--kwargs", "lr=0.5", "n=3")
    _commit(repo, V2, "v2")
    run_script(repo, "train.py", "--kwargs", "opt=adam")
    write(repo, "train.py", V2.replace("#NEW", NEW))
    st = Store(str(repo / ".flor"))
    plan = flor_ray.plan_replay(["half"], store=st, script=repo / "train.py")
    report = run_plan(plan, progress=False, runner=LocalRunner())
    assert not report.failed, str(report)
    return repo, st


@pytest.fixture(scope="module")
def consolidated(recorded, tmp_path_factory):
    """A copy of the recorded store with its parts consolidated into a segment."""
    import shutil

    from flor_ray.store.consolidation import consolidate

    repo, st = recorded
    copy = tmp_path_factory.mktemp("sqlfast-seg") / "store"
    shutil.copytree(st.root, copy)
    seg = Store(str(copy))
    consolidate(seg, min_runs=1, replay_grace_s=0)
    assert seg.find("logs/segments", ".parquet"), "nothing consolidated"
    return repo, seg


def _both(st: Store, query: str, monkeypatch) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The query's frame by the pyarrow path and by the reader, each on a new connection."""
    query_sql.connection(st).close()
    with monkeypatch.context() as m:
        m.setattr(sources, "available", lambda con: False)
        old = flor_ray.sql(query, store=st)
    query_sql.connection(st).close()
    new = flor_ray.sql(query, store=st)
    named = query_sql.named_tables(query_sql.connection(st).connect(), query)
    if named is None or named & query_sql._LOGS_GROUP:  # (a runs table only pandas types needs no reader)
        assert query_sql.connection(st).reader is not None, "the reader was not used"
    return old, new


SAME = [
    "DESCRIBE logs", "DESCRIBE logs_all", "DESCRIBE replay_mismatch", "DESCRIBE runs", "DESCRIBE output",
    "SELECT * FROM logs ORDER BY ALL", "SELECT * FROM logs_all ORDER BY ALL", "SELECT * FROM replay_mismatch",
    "SELECT * FROM runs ORDER BY run_id",
    "SELECT run_id, max(value) AS best FROM logs WHERE name = 'acc' GROUP BY run_id ORDER BY run_id",
    "SELECT name, source, count(*) AS n, sum(value) AS s FROM logs GROUP BY ALL ORDER BY ALL",
    "SELECT r.opt, r.flag, count(*) AS n FROM logs l JOIN runs r USING (run_id) WHERE l.iter0 IN (0, 2) "
    "AND l.value_str IS NULL GROUP BY ALL ORDER BY ALL",
    "SELECT * FROM logs WHERE name = 'half' AND run_id = (SELECT min(run_id) FROM runs) ORDER BY seq",
]


@pytest.mark.parametrize("query", SAME)
def test_loose_parts_read_alike(recorded, query, monkeypatch):
    _, st = recorded
    old, new = _both(st, query, monkeypatch)
    pd.testing.assert_frame_equal(old, new)


@pytest.mark.parametrize("query", SAME)
def test_segment_reads_alike(consolidated, query, monkeypatch):
    _, st = consolidated
    old, new = _both(st, query, monkeypatch)
    pd.testing.assert_frame_equal(old, new)


def test_the_tables_hold_what_was_recorded(recorded):
    _, st = recorded
    runs = flor_ray.sql("SELECT lr, n, flag, opt FROM runs ORDER BY started_at", store=st)
    assert runs["lr"].tolist() == [0.1, 0.5, 0.1] and runs["n"].tolist() == [2, 3, 2]
    assert runs["opt"].tolist()[2] == "adam" and runs["flag"].isna().tolist() == [True, True, False]
    half = flor_ray.sql("SELECT count(*) AS n FROM logs WHERE name = 'half'", store=st)["n"][0]
    assert half == 2 + 3 + 2  # one per epoch of every run, back-filled
    types = dict(flor_ray.sql("DESCRIBE runs", store=st)[["column_name", "column_type"]].values)
    assert types["started_at"] == "TIMESTAMP WITH TIME ZONE" and types["n"] == "BIGINT" and types["lr"] == "DOUBLE"


# ------------------------------------------------------------- runs table
def _meta(i: int, **args) -> dict:
    return {"run_id": f"r{i}", "project": "p", "script": "train.py", "version": "v1", "status": "finished",
            "started_at": f"2026-01-01T00:00:0{i}+00:00", "ended_at": None if i else "2026-01-01T01:00:00.5Z",
            "iterations": 3, "env": {"device": "cpu"}, "argv": ["train.py"], "args": args}


RUNS = {
    "ints": [_meta(0, a=1), _meta(1, a=2)],
    "int-missing": [_meta(0, a=1), _meta(1)],
    "int-none": [_meta(0, a=1), _meta(1, a=None)],
    "int-float": [_meta(0, lr=0.1), _meta(1, lr=1)],
    "float-inf": [_meta(0, lr=float("inf")), _meta(1, lr=0.5)],
    "float-nan": [_meta(0, lr=float("nan")), _meta(1, lr=0.5)],
    "bools": [_meta(0, b=True), _meta(1, b=False)],
    "bool-missing": [_meta(0, b=True), _meta(1)],
    "bool-none": [_meta(0, b=None), _meta(1), _meta(2, b=False)],
    "strs": [_meta(0, s="x"), _meta(1, s=None), _meta(2)],
    "int-str": [_meta(0, x=1), _meta(1, x="a")],
    "list": [_meta(0, x=[1, 2]), _meta(1, x=[3])],
    "all-none": [_meta(0, x=None), _meta(1, x=None)],
    "big-int": [_meta(0, x=2**60), _meta(1, x=1)],
    "huge-int": [_meta(0, x=2**70), _meta(1, x=1.5)],
    "named-like-a-column": [_meta(0, status=1), _meta(1, status=2)],
    "naive-and-micro-times": [dict(_meta(0), started_at="2026-01-01T00:00:00"),
                              dict(_meta(1), started_at="2026-01-01T00:00:00.123456Z")],
    "no-env-no-iterations": [dict(_meta(0), env=None, iterations=None), _meta(1)],
}


@pytest.mark.parametrize("case", list(RUNS))
def test_runs_table_is_the_frames(tmp_path, case, monkeypatch):
    """The runs table built without pandas has the frame's column names, types and values,
    or is the frame's where a type is pandas' to decide."""
    st = Store(str(tmp_path / "store"))
    st.ensure()
    for m in RUNS[case]:
        st.write_json(st.runs_rel(m["run_id"]), m)
    for query in ("DESCRIBE runs", "SELECT * FROM runs ORDER BY run_id"):
        old, new = _both(st, query, monkeypatch)
        pd.testing.assert_frame_equal(old, new)


def test_runs_values_takes_the_plain_cases():
    from flor_ray.queries.runs import runs_values

    for case in ("ints", "int-missing", "int-float", "bools", "bool-missing", "strs", "float-inf", "big-int"):
        assert runs_values(RUNS[case]) is not None, case
    for case in ("float-nan", "int-str", "list", "all-none", "huge-int"):
        assert runs_values(RUNS[case]) is None, case


def test_logs_columns_are_the_schemas():
    from flor_ray.store.logs import file_schemas

    file_schema, part_schema = file_schemas()
    names = [f.name for f in list(file_schema) + list(part_schema)]
    assert [n for n, _ in sources.LOGS_COLUMNS] == names


# ---------------------------------------------------------- printed text
PRINTED = [
    ("SELECT 1 AS i, 2::BIGINT AS b, -3::INTEGER AS c", True),
    ("SELECT * FROM (VALUES (1.5), (NULL), ('nan'::DOUBLE), (-0.0), (123456.25)) t(x)", True),
    ("SELECT * FROM (VALUES ('a', true), (NULL, false), ('x/y \"q\", z', true)) t(s, b)", True),
    ("SELECT run_id, max(value) AS best FROM logs WHERE name = 'acc' GROUP BY run_id ORDER BY run_id", True),
    ("SELECT run_id, version, name, value, iter0 FROM logs ORDER BY ALL LIMIT 12", True),
    ("SELECT name, count(*) AS n, max(value) AS top, min(value) / 3 AS low FROM logs GROUP BY name ORDER BY name", True),
    ("SELECT 'inf'::DOUBLE AS x", False),
    ("SELECT 1e300 AS x UNION ALL SELECT 1", False),
    ("SELECT 1e-9 AS x", False),
    ("SELECT 1.5::FLOAT AS f", False),
    ("SELECT 1 AS i UNION ALL SELECT NULL", False),
    ("SELECT true AS b UNION ALL SELECT NULL", False),
    ("SELECT NULL::VARCHAR AS s", False),
    ("SELECT 'a' || chr(10) || 'b' AS s", False),
    ("SELECT repeat('x', 70) AS s", False),
    ("SELECT 1 AS a, 2 AS a", False),
    ("SELECT * FROM runs ORDER BY run_id", False),  # timestamps: pandas prints them
    ("SELECT [1, 2] AS l, {'k': 1} AS s", False),
    ("SELECT sum(value_int) AS s FROM logs", False),  # HUGEINT
    ("SELECT 1.25::DECIMAL(4, 2) AS d", False),
    ("SELECT * FROM logs WHERE false", False),
    ("SELECT now() AS t", False),
]


def _printed(write, fmt: str) -> str:
    buf = io.StringIO()
    with redirect_stdout(buf):
        write(fmt)
    return buf.getvalue()


@pytest.mark.parametrize("query, fast", PRINTED, ids=[q for q, _ in PRINTED])
def test_printed_as_pandas_prints(recorded, query, fast, monkeypatch):
    _, st = recorded
    columns = query_sql.sql_columns(st, query)
    assert (columns is not None) == fast
    if columns is None:
        return
    df = flor_ray.sql(query, store=st)
    for fmt in ("table", "csv", "json"):
        # sys.stdout as redirect_stdout sets it: the writers look it up when they write
        monkeypatch.setattr(cli, "sys", sys)
        want = _printed(lambda f: cli._write_frame(df, f, None), fmt)
        got = _printed(lambda f: cli._write_columns(columns, f, None), fmt)
        assert got == want, fmt


def test_cli_prints_the_same_without_pandas(consolidated, tmp_path):
    repo, st = consolidated
    query = "SELECT run_id, max(value) AS best FROM logs WHERE name = 'acc' GROUP BY run_id ORDER BY run_id"
    code = ("import sys\nfrom flor_ray.cli import main\nrc = main()\n"
            "mods = sorted(m for m in ('pandas', 'pyarrow.dataset') if m in sys.modules)\n"
            "sys.stderr.write('MODULES ' + ' '.join(mods) + '\\n')\nsys.exit(rc)\n")
    outs = {}
    for fmt in ("table", "csv", "json"):
        proc = subprocess.run([sys.executable, "-c", code, "sql", query, "--format", fmt],
                              cwd=repo, env=clean_env(FLOR_STORE=st.root), capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert "MODULES \n" in proc.stderr, proc.stderr  # neither pandas nor pyarrow.dataset
        outs[fmt] = proc.stdout
    df = flor_ray.sql(query, store=st)
    assert outs["csv"] == df.to_csv(index=False)
    assert json.loads(outs["json"]) == json.loads(df.to_json(orient="records"))
    assert outs["table"].split() == df.to_string(index=False).split()


# ----------------------------------------------------------------- sandbox
FILES = "cannot read or write files, reach the network or load extensions"


def _store_files(st: Store) -> dict[str, Path]:
    root = Path(st.root)
    found = {p.relative_to(root).parts[0]: p for p in sorted(root.rglob("*")) if p.is_file()}
    part = next(root.glob("logs/**/*.parquet"))
    return {**found, "part": part}


@pytest.mark.parametrize("which", ["recorded", "consolidated"])
def test_no_file_of_the_store_is_readable(which, request):
    """The reader reads the parts; a query still opens no file, those parts included."""
    _, st = request.getfixturevalue(which)
    files = _store_files(st)
    assert {"runs", "code", "logs", "part"} <= set(files), files
    before = {k: p.read_bytes() for k, p in files.items()}
    for path in files.values():
        for query in (f"SELECT * FROM read_parquet('{path}')", f"SELECT * FROM read_csv('{path}')",
                      f"SELECT * FROM read_text('{path}')", f"SELECT * FROM read_blob('{path}')",
                      f"SELECT * FROM read_json('{path}')", f"SELECT * FROM glob('{path.parent}/*')",
                      f"SELECT * FROM read_parquet('{st.root}/logs/**/*.parquet')",
                      f"WITH x AS (COPY (SELECT 1 AS a) TO '{path}' (USE_TMP_FILE false)) SELECT 1"):
            with pytest.raises(QueryError, match=FILES):
                flor_ray.sql(query, store=st)
        for query, word in ((f"COPY (SELECT 1 AS a) TO '{path}'", "not COPY"), (f"ATTACH '{path}' AS d", "not ATTACH"),
                            (f"COPY logs FROM '{path}'", "not COPY")):
            with pytest.raises(QueryError, match=word):
                flor_ray.sql(query, store=st)
    assert {k: p.read_bytes() for k, p in files.items()} == before


def test_the_readers_tables_are_not_reachable(recorded):
    _, st = recorded
    flor_ray.sql("SELECT count(*) FROM logs", store=st)
    assert query_sql.connection(st).reader is not None
    for name in ("flor_runs", "flor_logs", "memory.main.flor_runs"):
        with pytest.raises(QueryError, match="SQL failed: Catalog Error"):
            flor_ray.sql(f"SELECT * FROM {name}", store=st)
    dbs = flor_ray.sql("SELECT database_name FROM duckdb_databases() ORDER BY 1", store=st)["database_name"].tolist()
    tables = flor_ray.sql("SELECT table_name FROM duckdb_tables()", store=st)["table_name"].tolist()
    assert "flor_runs" not in tables and "flor_logs" not in tables, (dbs, tables)
    settings = dict(flor_ray.sql("SELECT name, value FROM duckdb_settings()", store=st).values)
    assert settings["enable_external_access"] == "false" and settings["lock_configuration"] == "true"
    assert settings["allowed_paths"] in ("[]", "")  # no file of the store is let through


def test_no_temp_directory_is_open(recorded, tmp_path, monkeypatch):
    """DuckDB leaves its temp directory (<cwd>/.tmp) open when external access is off: closed too."""
    _, st = recorded
    (tmp_path / ".tmp").mkdir()
    monkeypatch.chdir(tmp_path)
    query_sql.connection(st).close()
    for query in ("WITH x AS (COPY (SELECT 42 AS a) TO '.tmp/x.csv') SELECT 1",
                  f"WITH x AS (COPY (SELECT 42 AS a) TO '{tmp_path}/.tmp/x.csv') SELECT 1",
                  f"SELECT * FROM glob('{tmp_path}/.tmp/*')"):
        with pytest.raises(QueryError, match=FILES):
            flor_ray.sql(query, store=st)
    assert not list((tmp_path / ".tmp").iterdir())
    settings = dict(flor_ray.sql("SELECT name, value FROM duckdb_settings()", store=st).values)
    assert settings["temp_directory"] == "" and settings["allowed_directories"] in ("[]", "")

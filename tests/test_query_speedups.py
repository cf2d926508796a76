"""Queries that got faster stay right: a cached SQL connection sees every change,
stays read-only and thread-safe, and dataframe() builds the same frame from files
in any order, split any way, older files included."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pandas as pd
import pytest

import flor_ray
from flor_ray.queries import sql as query_sql
from flor_ray.errors import QueryError
from flor_ray.record.rows import rows_to_table
from flor_ray.store.logs import table_to_parquet_bytes
from flor_ray.store import Store

from conftest import REPO_ROOT, clean_env


def _flush(st: Store, run_id: str, part: str, rows: list, *, seq_start: int = 0, source: str = "record",
           version: str = "v1", drop: tuple = ()) -> None:
    """Write one Parquet file of ``rows`` = [(epoch, step or None, name, value)]."""
    prefixes = [("epoch", (), None, 1)] + [("epoch/step", (e,), None, 2) for e in range(50)]
    table = rows_to_table(
        version=version, file="train.py", prefixes=prefixes,
        prefix_ids=[0 if s is None else 1 + e for e, s, _, _ in rows],
        lasts=[e if s is None else s for e, s, _, _ in rows],
        items=[], names=[n for _, _, n, _ in rows], values=[v for _, _, _, v in rows], seq_start=seq_start,
    )
    if drop:
        table = table.drop_columns(list(drop))
    st.write_bytes(f"logs/run_id={run_id}/source={source}/{part}.parquet", table_to_parquet_bytes(table))


def _run(st: Store, run_id: str, started: int, status: str = "finished", **args) -> None:
    st.write_json(st.runs_rel(run_id), {
        "run_id": run_id, "version": "v1", "status": status, "args": args, "argv": ["train.py"],
        "started_at": f"2026-01-01T00:00:{started:02d}+00:00",
    })


@pytest.fixture
def st(tmp_path) -> Store:
    s = Store(str(tmp_path / "store"))
    s.ensure()
    return s


def _count(st: Store, where: str = "TRUE") -> int:
    return int(flor_ray.sql(f"SELECT count(*) AS n FROM logs WHERE {where}", store=st)["n"][0])


# --------------------------------------------------------------------- sql()
@pytest.mark.parametrize("in_memory", [True, False], ids=["small-in-memory", "read-from-files"])
def test_sql_sees_every_change(st, monkeypatch, in_memory):
    if not in_memory:
        monkeypatch.setattr(query_sql, "SQL_MATERIALIZE_ROWS", 0)
    _run(st, "r1", 1, status="running", lr=0.1)
    _flush(st, "r1", "part-00000", [(0, s, "loss", float(s)) for s in range(3)])
    assert _count(st) == 3
    con = query_sql.connection(st).con
    assert _count(st) == 3 and query_sql.connection(st).con is con  # unchanged: reused

    _flush(st, "r1", "part-00001", [(1, s, "loss", 10.0 + s) for s in range(3)], seq_start=3)  # a new flush
    assert _count(st) == 6
    _flush(st, "r1", "t1", [(0, None, "gnorm", 0.5)], source="replay")  # a replay partition
    assert _count(st, "source = 'replay'") == 1
    _flush(st, "r1", "t1", [(0, None, "gnorm", 0.25), (1, None, "gnorm", 0.75)], source="replay")  # rerun task
    got = flor_ray.sql("SELECT value FROM logs WHERE name = 'gnorm' ORDER BY seq", store=st)
    assert got["value"].tolist() == [0.25, 0.75]

    _run(st, "r1", 1, status="finished", lr=0.1)  # the run's file rewritten
    _run(st, "r2", 2, lr=0.2)  # a new run
    _flush(st, "r2", "part-00000", [(0, 0, "loss", 1.0)])
    runs = flor_ray.sql("SELECT run_id, status, lr FROM runs ORDER BY run_id", store=st)
    assert runs.to_dict("list") == {"run_id": ["r1", "r2"], "status": ["finished", "finished"], "lr": [0.1, 0.2]}
    got = flor_ray.sql("SELECT run_id, count(*) AS n FROM logs JOIN runs USING (run_id) WHERE lr > 0.15 "
                       "GROUP BY run_id", store=st)
    assert got.to_dict("list") == {"run_id": ["r2"], "n": [1]}

    os.remove(st.path("logs/run_id=r1/source=record/part-00000.parquet"))  # a file deleted
    assert _count(st) == 3 + 2 + 1
    assert query_sql.connection(st).logs_kind == ("table" if in_memory else "view")


def test_sql_sees_a_recorded_run(repo):
    """Through real recordings: a second run is in the next query's answer."""
    from conftest import run_script, write

    write(repo, "train.py", "import flor_ray as flor\nfor e in flor.loop('epoch', range(3)):\n"
                            "    flor.log('x', e * flor.arg('k', 1))\n")
    run_script(repo)
    st = Store(str(repo / ".flor"))
    q = "SELECT sum(value) AS s, count(DISTINCT run_id) AS runs FROM logs"
    assert flor_ray.sql(q, store=st).to_dict("list") == {"s": [3.0], "runs": [1]}
    run_script(repo, "train.py", "--kwargs", "k=10")
    assert flor_ray.sql(q, store=st).to_dict("list") == {"s": [33.0], "runs": [2]}
    assert sorted(flor_ray.sql("SELECT k FROM runs", store=st)["k"]) == [1, 10]


def test_sql_stays_read_only(st):
    _run(st, "r1", 1)
    _flush(st, "r1", "part-00000", [(0, 0, "loss", 1.0), (0, 1, "loss", 2.0)])
    assert _count(st) == 2
    for bad, word in (("SELECT 1; DROP VIEW logs", "DROP"), ("SELECT 1; SET threads = 1", "SET"),
                      ("FROM logs; INSERT INTO logs_arrow SELECT * FROM logs_arrow", "INSERT"),
                      ("EXPLAIN ANALYZE DELETE FROM logs_arrow", "DELETE"),
                      ("WITH x AS (SELECT 1) INSERT INTO runs SELECT * FROM runs", "INSERT"),
                      ("CREATE TABLE t AS SELECT 1", "CREATE")):
        with pytest.raises(QueryError, match=f"runs queries only .*not {word}"):
            flor_ray.sql(bad, store=st)
        assert _count(st) == 2, bad  # nothing ran, the tables are intact
    # statements that leave state behind (PIVOT's types) work, and the next query too
    piv = flor_ray.sql("PIVOT (SELECT name, iter1, value FROM logs) ON iter1 USING sum(value)", store=st)
    assert piv.shape == (1, 3)
    assert flor_ray.sql("EXPLAIN SELECT * FROM logs", store=st).shape[0] >= 1
    assert _count(st) == 2
    with pytest.raises(QueryError, match="SQL failed"):  # a failing query leaves the connection usable
        flor_ray.sql("SELECT nosuch FROM logs", store=st)
    assert _count(st) == 2


def test_sql_from_threads(st):
    for r in range(3):
        _run(st, f"r{r}", r, lr=0.1 * (r + 1))
        _flush(st, f"r{r}", "part-00000", [(0, s, "loss", float(r * 100 + s)) for s in range(20)])
    queries = {
        "SELECT run_id, sum(value) AS s FROM logs GROUP BY run_id ORDER BY run_id": None,
        "SELECT count(*) AS n FROM logs JOIN runs USING (run_id) WHERE lr > 0.15": None,
    }
    for q in queries:
        queries[q] = flor_ray.sql(q, store=st)
    errors: list = []

    def work(i: int) -> None:
        try:
            for k in range(15):
                q = list(queries)[(i + k) % 2]
                pd.testing.assert_frame_equal(flor_ray.sql(q, store=st), queries[q])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors


def test_sql_names_a_file_broken_after_a_cached_query(st):
    _run(st, "r1", 1)
    _flush(st, "r1", "part-00000", [(0, 0, "loss", 1.0)])
    _flush(st, "r1", "part-00001", [(1, 0, "loss", 2.0)], seq_start=1)
    assert _count(st) == 2
    bad = st.path("logs/run_id=r1/source=record/part-00001.parquet")
    good = open(bad, "rb").read()
    with open(bad, "wb") as f:
        f.write(good[:60])
    from flor_ray.errors import DamagedFileWarning

    with pytest.warns(DamagedFileWarning, match="part-00001.parquet is not a Parquet file"):
        assert _count(st) == 1  # the damaged part is left out, named once
    with open(bad, "wb") as f:
        f.write(good)
    assert _count(st) == 2


def test_import_stays_light():
    code = ("import sys, flor_ray, flor_ray.store.logs, flor_ray.queries.sql, flor_ray.queries.dataframe; "
            "print(sorted(m for m in ('duckdb', 'pyarrow', 'pandas', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], env=clean_env(), cwd=REPO_ROOT, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------- dataframe()
def test_dataframe_orders_and_dedups_across_files(st):
    _run(st, "b-late", 2, lr=0.2)
    _run(st, "a-early", 1, lr=0.1)
    # flushes whose names do not follow the logging order, a context logged twice
    # (both values kept, in logging order) and two replay tasks that both number
    # their rows from 0
    _flush(st, "a-early", "part-00000", [(1, 0, "loss", 10.0), (1, 1, "loss", 11.0), (1, None, "acc", 0.9)],
           seq_start=4)
    _flush(st, "a-early", "part-00001", [(0, 0, "loss", 0.0), (0, 1, "loss", 1.0), (0, 1, "loss", 1.5),
                                         (0, None, "acc", 0.5)], seq_start=0)
    _flush(st, "a-early", "task-b", [(1, None, "gnorm", 3.0)], source="replay")
    _flush(st, "a-early", "task-a", [(0, None, "gnorm", 2.0)], source="replay")
    _flush(st, "b-late", "part-00000", [(0, 0, "loss", 5.0), (0, None, "acc", 0.7)])

    df = flor_ray.dataframe("loss", store=st)
    assert list(df.columns) == ["run_id", "version", "lr", "epoch", "step", "occurrence", "loss"]
    assert [str(t) for t in df.dtypes] == ["str", "str", "float64", "Int64", "Int64", "int64", "float64"]
    assert df["run_id"].tolist() == ["a-early"] * 5 + ["b-late"]  # runs in start order
    assert df["epoch"].tolist() == [0, 0, 0, 1, 1, 0] and df["step"].tolist() == [0, 1, 1, 0, 1, 0]
    assert df["occurrence"].tolist() == [0, 0, 1, 0, 0, 0]
    assert df["loss"].tolist() == [0.0, 1.0, 1.5, 10.0, 11.0, 5.0]

    wide = flor_ray.dataframe("acc", "gnorm", "loss", store=st)
    assert list(wide.columns) == ["run_id", "version", "lr", "epoch", "step", "occurrence", "acc", "gnorm", "loss"]
    a = wide[wide["run_id"] == "a-early"]
    assert a["step"].isna().tolist() == [True, False, False, False, True, False, False]
    assert "occurrence" not in flor_ray.dataframe("acc", "gnorm", store=st)  # one value per context
    assert a["gnorm"].dropna().tolist() == [2.0, 3.0] and a["acc"].dropna().tolist() == [0.5, 0.9]

    only_b = flor_ray.dataframe("loss", where="lr > 0.15", store=st)
    assert only_b["run_id"].tolist() == ["b-late"] and only_b["loss"].tolist() == [5.0]
    with pytest.raises(QueryError, match="no values logged under 'gnorm' in the runs where lr > 0.15"):
        flor_ray.dataframe("gnorm", where="lr > 0.15", store=st)


def test_dataframe_same_frame_however_files_are_split(tmp_path):
    """One history written as one file per run, or split and named against the logging
    order, gives the same frame; an older file without some columns reads as nulls."""
    rows = {f"r{r}": [(e, s, "loss", float(r * 1000 + e * 100 + s)) for e in range(4) for s in range(25)]
            + [(e, None, "acc", e / 10) for e in range(4)] for r in range(3)}
    frames = {}
    for layout in ("whole", "split", "old"):
        st = Store(str(tmp_path / layout))
        st.ensure()
        for i, (rid, rs) in enumerate(rows.items()):
            _run(st, rid, i, lr=0.1 * i)
            if layout == "whole":
                _flush(st, rid, "part-00000", rs)
            elif layout == "split":
                for k in range(4):
                    _flush(st, rid, f"part-{9 - k:05d}", rs[k * 26:(k + 1) * 26], seq_start=k * 26)
            else:
                _flush(st, rid, "part-00000", rs, drop=("value_str", "items", "iter3", "task"))
        frames[layout] = (flor_ray.dataframe("loss", store=st), flor_ray.dataframe("loss", "acc", store=st))
    for layout in ("split", "old"):
        for got, want in zip(frames[layout], frames["whole"]):
            pd.testing.assert_frame_equal(got, want, check_exact=True)
    loss, both = frames["whole"]
    assert len(loss) == 300 and loss["loss"].is_monotonic_increasing
    assert len(both) == 312 and both["acc"].notna().sum() == 12


def test_dataframe_value_types(st):
    _run(st, "r1", 1)
    prefixes = [("epoch", (), None, 1)]
    vals = {"f": [0.5, 1.5], "i": [3, 4], "b": [True, False], "s": ["x", "y"]}
    names = [n for n in vals for _ in range(2)]
    values = [v for vs in vals.values() for v in vs]
    table = rows_to_table(version="v1", file="t.py", prefixes=prefixes, prefix_ids=[0] * len(names),
                          lasts=[0, 1] * len(vals), items=[], names=names, values=values, seq_start=0)
    st.write_bytes("logs/run_id=r1/source=record/part-00000.parquet", table_to_parquet_bytes(table))
    for n, dtype in (("f", "float64"), ("i", "int64"), ("b", "bool"), ("s", "str")):
        df = flor_ray.dataframe(n, store=st)
        assert str(df[n].dtype) == dtype and df[n].tolist() == vals[n], n
    assert list(flor_ray.dataframe(store=st).columns) == ["run_id", "version", "epoch", "f", "i", "b", "s"]

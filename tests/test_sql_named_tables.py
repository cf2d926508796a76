"""sql() builds only the tables a query names (DuckDB's parse tree says which): a query on
``logs`` never builds the runs table of thousands of runs, and every other query answers
as when all tables are built, stale tables included (a query that reaches a table in a
way the parse tree does not name gets all of them)."""

from __future__ import annotations

import pandas as pd
import pytest

import flor_ray
from flor_ray.errors import QueryError
from flor_ray.queries import sql as query_sql
from flor_ray.queries.sandbox import connect
from flor_ray.store import Store

from conftest import git, run_script, write

SCRIPT = """
import flor_ray as flor

lr = flor.arg("lr", 0.1)
w = 1.0
for epoch in flor.loop("epoch", range(3)):
    w -= lr * 2 * w
    flor.log("loss", w * w)
    print("epoch", epoch, "loss", w * w)
"""


@pytest.mark.parametrize("query, named", [
    ("SELECT * FROM logs", {"logs"}),
    ("select 1; SELECT * FROM Runs", {"runs"}),
    ('SELECT (SELECT count(*) FROM "RUNS") AS n, * FROM logs_all', {"runs", "logs_all"}),
    ("WITH r AS (SELECT * FROM runs) SELECT * FROM output JOIN r USING (run_id)", {"runs", "output", "r"}),
    ("SELECT * FROM main.replay_mismatch", {"replay_mismatch"}),
    ("SELECT 42", set()),
    ("SELECT CAST(value AS INTEGER) AS v, [1, 2]::INT[] AS l FROM logs", {"logs"}),  # types are dicts in the tree
    ("FROM query_table('runs')", None),
    ("SELECT * FROM duckdb_tables()", None),
    ("DESCRIBE runs", None),
    ("SHOW TABLES", None),
    ("SELECT * FROM information_schema.tables", None),
    ("EXPLAIN SELECT * FROM runs", None),
    ("PIVOT runs ON status USING count(*)", None),
    ("SELEC nothing", None),
])
def test_named_tables_from_the_parse_tree(query, named):
    got = query_sql.named_tables(connect(), query)
    assert got == (None if named is None else frozenset(named))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    repo = tmp_path_factory.mktemp("named") / "proj"
    repo.mkdir()
    git(repo, "init", "-q")
    write(repo, "train.py", SCRIPT)
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=d", "-c", "user.email=d@x", "commit", "-qm", "v1")
    for lr in ("0.1", "0.2"):
        run_script(repo, "train.py", "--kwargs", f"lr={lr}")
    return repo, Store(str(repo / ".flor"))


def _fresh(st: Store):
    query_sql.connection(st).close()
    return query_sql.connection(st)


def test_a_query_on_logs_builds_neither_runs_nor_output(store):
    _, st = store
    state = _fresh(st)
    got = flor_ray.sql("SELECT run_id, max(value) AS best FROM logs WHERE name = 'loss' GROUP BY run_id", store=st)
    assert len(got) == 2
    assert state.logs_key is not None and state.runs_key is None and state.output_key is None
    both = flor_ray.sql("SELECT r.lr, count(*) AS n FROM logs JOIN runs r USING (run_id) GROUP BY ALL ORDER BY ALL",
                        store=st)
    assert both["lr"].tolist() == [0.1, 0.2] and both["n"].tolist() == [3, 3]
    assert state.runs_key is not None


@pytest.mark.parametrize("query", [
    "FROM query_table('runs') ORDER BY run_id",
    "SELECT table_name FROM duckdb_tables() ORDER BY ALL",
    "SELECT * FROM (DESCRIBE runs)",
    "SELECT count(*) AS n FROM output",
    "SELECT * FROM runs ORDER BY run_id",
])
def test_answers_as_with_every_table_built(store, query):
    _, st = store
    _fresh(st)
    flor_ray.sql("SELECT * FROM runs", store=st)
    flor_ray.sql("SELECT * FROM output", store=st)
    flor_ray.sql("SELECT * FROM logs", store=st)
    every = flor_ray.sql(query, store=st)
    _fresh(st)
    alone = flor_ray.sql(query, store=st)
    pd.testing.assert_frame_equal(alone, every)


def test_a_misspelt_table_names_the_tables_with_the_runs_columns(store):
    _, st = store
    _fresh(st)
    with pytest.raises(QueryError) as err:
        flor_ray.sql("SELECT * FROM lgos", store=st)
    msg = str(err.value)
    assert "lgos" in msg and "runs(" in msg and "lr" in msg.split("runs(", 1)[1], msg


# last: it records one more run into the module's store
def test_a_stale_table_is_never_read_by_a_query_that_reaches_it_unnamed(store):
    repo, st = store
    state = _fresh(st)
    assert len(flor_ray.sql("SELECT * FROM runs", store=st)) == 2
    run_script(repo, "train.py", "--kwargs", "lr=0.3")  # a third run: the runs table built is stale
    flor_ray.sql("SELECT count(*) AS n FROM logs", store=st)  # runs not named: not rebuilt, and dropped
    assert state.runs_key is None
    assert flor_ray.sql("FROM query_table('runs')", store=st)["lr"].sort_values().tolist() == [0.1, 0.2, 0.3]

"""The query sandbox and secrets: sql() and where predicates can read the store's tables
and nothing else, change nothing for the next query, and say what they refused;
credentials stay out of reprs, plans, task specs and the store, and a replay task takes
its own from its environment."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid

import pandas as pd
import pytest

import flor_ray
from flor_ray.store.credentials import redact, without_secrets
from flor_ray.errors import QueryError
from flor_ray.store import Store

from conftest import clean_env, git, start_script, write

SCRIPT = """
import argparse

import torch
from torch.utils.data import DataLoader, TensorDataset

import flor_ray as flor


def make_data(n):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=g)
    return TensorDataset(x, x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1 * torch.randn(n, generator=g))


def evaluate(model, loader):
    with torch.no_grad():
        return sum(float(torch.nn.functional.mse_loss(model(x).squeeze(1), y)) for x, y in loader) / len(loader)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    lr = flor.arg("lr", 0.1)
    torch.manual_seed(0)
    loader = DataLoader(make_data(64), batch_size=16, shuffle=True)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with flor.checkpointing(model=model, opt=opt, sched=sched):
        for epoch in flor.loop("epoch", range(args.epochs)):
            for x, y in flor.loop("step", loader):
                loss = torch.nn.functional.mse_loss(model(x).squeeze(1), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                flor.log("loss", loss.item())
            sched.step()
            flor.log("val", evaluate(model, loader))
            #WNORM


main()
"""
WNORM = 'flor.log("wnorm", float(model.weight.norm()))'
EPOCHS, STEPS = 3, 4


def _repo(root):
    root.mkdir()
    git(root, "init", "-q")
    git(root, "config", "user.email", "dev@example.com")
    git(root, "config", "user.name", "Dev")
    write(root, "train.py", SCRIPT)
    return root


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """Two runs (lr 0.1 and 0.05) in a local store, read by every sql/where test below."""
    repo = _repo(tmp_path_factory.mktemp("sandbox") / "proj")
    _wait([_start(repo), _start(repo, "--kwargs", "lr=0.05")])  # one version: its runs may start together
    return repo, Store(str(repo / ".flor"))


def _start(repo, *args, env=None) -> subprocess.Popen:
    return start_script(repo, "train.py", *args, env=env)


def _wait(procs) -> None:
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, f"{p.args} failed ({p.returncode}):\n{out}\n{err}"


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "written-by-a-query.csv"
    yield path
    assert not path.exists(), "a query wrote a file"


def _intact(st: Store) -> None:
    """Both tables hold what the runs recorded."""
    got = flor_ray.sql("SELECT (SELECT count(*) FROM runs) AS runs, count(*) AS logs, "
                       "count(*) FILTER (WHERE name = 'loss') AS loss FROM logs", store=st)
    assert got.to_dict("list") == {"runs": [2], "logs": [2 * EPOCHS * (STEPS + 1)], "loss": [2 * EPOCHS * STEPS]}


def _passwd() -> str:
    with open("/etc/passwd") as f:
        return f.readline().strip()


# ------------------------------------------------------------------ sql()
FILES = "cannot read or write files, reach the network or load extensions"
TABLES = "cannot change the tables"
ATTACKS = [
    ("SELECT * FROM read_csv('/etc/passwd', sep = ':')", FILES),
    ("SELECT * FROM read_blob('/proc/self/environ')", FILES),
    ("SELECT * FROM read_text('/etc/passwd')", FILES),
    ("SELECT * FROM sniff_csv('/etc/passwd')", FILES),
    ("SELECT * FROM glob('/etc/*')", FILES),
    ("SELECT * FROM read_csv('http://127.0.0.1:9/x.csv')", FILES),
    ("SELECT * FROM read_parquet('https://example.com/x.parquet')", FILES),
    ("SELECT * FROM read_parquet('s3://bucket/x.parquet')", FILES),
    ("SELECT * FROM duckdb_secrets()", FILES),
    ("WITH x AS (COPY (SELECT 1) TO '{marker}') SELECT 1", FILES),
    ("COPY (SELECT 1) TO '{marker}'", "not COPY: reading or writing files is not allowed"),
    ("COPY runs TO '{marker}'", "not COPY"),
    ("EXPLAIN ANALYZE COPY (SELECT 1) TO '{marker}'", "not COPY"),
    ("EXPLAIN (ANALYZE) COPY (SELECT 1) TO '{marker}'", "not COPY"),
    ("EXPORT DATABASE '{marker}'", "not EXPORT: writing files is not allowed"),
    ("ATTACH '{marker}' AS other", "not ATTACH"),
    ("ATTACH ':memory:' AS other", "not ATTACH"),
    ("INSTALL httpfs", "not INSTALL: installing or loading extensions is not allowed"),
    ("LOAD httpfs", "not LOAD"),
    ("SET enable_external_access = true", "not SET: changing settings is not allowed"),
    ("SET lock_configuration = false", "not SET"),
    ("RESET threads", "not RESET"),
    ("PRAGMA threads = 1", "not PRAGMA"),
    ("CREATE TABLE t AS SELECT 1", "not CREATE"),
    ("CREATE OR REPLACE VIEW runs AS SELECT 1 AS run_id", "not CREATE"),
    ("INSERT INTO runs SELECT * FROM runs", "not INSERT: changing the tables is not allowed"),
    ("UPDATE runs SET lr = 0", "not UPDATE"),
    ("DELETE FROM logs", "not DELETE"),
    ("DROP VIEW logs", "not DROP"),
    ("SELECT 1; DROP VIEW runs", "not DROP"),
    ("EXPLAIN ANALYZE DELETE FROM runs", "not DELETE"),
    ("BEGIN", "not BEGIN"),
    ("WITH x AS (DELETE FROM runs) SELECT 1", TABLES),
    ("WITH x AS (DELETE FROM logs RETURNING *) SELECT count(*) FROM x", TABLES),
    ("WITH x AS (UPDATE runs SET lr = 0) SELECT 1", TABLES),
    ("WITH x AS (INSERT INTO logs_arrow SELECT * FROM logs_arrow) SELECT 1", TABLES),
    ("SELECT * FROM query('DELETE FROM runs')", "SQL failed"),
    ("SELECT getenv('HOME')", "SQL failed"),
]


@pytest.mark.parametrize("query, message", ATTACKS, ids=[q for q, _ in ATTACKS])
def test_sql_refuses_what_is_not_a_query_and_says_what(recorded, marker, query, message):
    _, st = recorded
    with pytest.raises(QueryError) as err:
        flor_ray.sql(query.format(marker=marker), store=st)
    assert message in str(err.value), str(err.value)
    assert _passwd() not in str(err.value)
    _intact(st)


def test_sql_sees_no_python_variables_settings_or_environment(recorded, monkeypatch):
    _, st = recorded
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sandbox-env-secret")
    secret_frame = pd.DataFrame({"s": ["from the caller's frame"]})  # noqa: F841 - what a replacement scan would find
    with pytest.raises(QueryError, match="SQL failed: Catalog Error"):
        flor_ray.sql("SELECT * FROM secret_frame", store=st)
    settings = flor_ray.sql("SELECT name, value FROM duckdb_settings()", store=st)
    assert "sandbox-env-secret" not in settings.to_csv()
    locked = dict(zip(settings["name"], settings["value"]))
    assert locked["enable_external_access"] == "false" and locked["lock_configuration"] == "true"
    assert locked["autoinstall_known_extensions"] == "false" and locked["autoload_known_extensions"] == "false"


def test_sql_queries_still_work(recorded):
    """Joins of logs and runs, aggregates, windows, PIVOT, DESCRIBE, EXPLAIN ANALYZE."""
    _, st = recorded
    df = flor_ray.dataframe("loss", "val", store=st)
    per_run = flor_ray.sql("SELECT r.lr, count(*) AS n, avg(l.value) AS mean FROM logs l JOIN runs r USING (run_id) "
                           "WHERE l.name = 'loss' GROUP BY r.lr ORDER BY r.lr", store=st)
    want = df.dropna(subset=["loss"]).groupby("lr")["loss"].agg(["count", "mean"]).sort_index()
    assert per_run["lr"].tolist() == [0.05, 0.1] and per_run["n"].tolist() == want["count"].tolist()
    assert per_run["mean"].tolist() == pytest.approx(want["mean"].tolist(), rel=1e-12)
    best = flor_ray.sql("SELECT run_id, iter0, value, rank() OVER (PARTITION BY run_id ORDER BY value) AS r "
                        "FROM logs WHERE name = 'val' QUALIFY r = 1 ORDER BY run_id", store=st)
    vals = df.dropna(subset=["val"])
    assert best["value"].tolist() == [vals[vals.run_id == r]["val"].min() for r in sorted(vals.run_id.unique())]
    piv = flor_ray.sql("PIVOT (SELECT run_id, iter0, value FROM logs WHERE name = 'val') ON iter0 USING max(value)",
                       store=st)
    assert piv.shape == (2, 1 + EPOCHS)
    assert "lr" in flor_ray.sql("DESCRIBE runs", store=st)["column_name"].tolist()
    assert len(flor_ray.sql("EXPLAIN ANALYZE SELECT count(*) FROM logs", store=st)) == 1
    assert len(flor_ray.sql("SUMMARIZE logs", store=st)) > 5
    _intact(st)  # PIVOT's types and every other statement rolled back


# ------------------------------------------------------------------ where
BAD_WHERE = [
    ("1=1; COPY (SELECT 42) TO '{marker}'", "invalid where predicate"),
    ("lr > 0) UNION (SELECT run_id FROM runs", "invalid where predicate"),
    ("run_id IN (SELECT run_id FROM runs)", "a subquery is not allowed"),
    ("EXISTS (SELECT 1)", "a subquery is not allowed"),
    ("lr > (SELECT count(*) FROM read_csv('/etc/passwd'))", "reading files, the network or extensions is not allowed"),
    ("read_text('/etc/passwd') IS NOT NULL", "invalid where predicate"),
    ("current_setting('threads') = 2", "the function current_setting() is not allowed"),
    ("lr > 0, lr < 1", "invalid where predicate"),
    ("nosuch > 1", "columns are: run_id"),
]


@pytest.mark.parametrize("where, message", BAD_WHERE, ids=[w for w, _ in BAD_WHERE])
def test_where_is_one_checked_expression(recorded, marker, where, message):
    repo, st = recorded
    where = where.format(marker=marker)
    for call in (lambda: flor_ray.runs(where=where, store=st), lambda: flor_ray.dataframe("loss", where=where, store=st),
                 lambda: flor_ray.plan_replay(["wnorm"], where=where, store=st, script=repo / "train.py")):
        with pytest.raises(QueryError) as err:
            call()
        assert message in str(err.value) and "lr" in str(err.value), str(err.value)
        assert _passwd() not in str(err.value)
    _intact(st)


def test_where_predicates_that_select(recorded):
    _, st = recorded
    assert flor_ray.runs(where="lr > 0.07", store=st)["lr"].tolist() == [0.1]
    everything = "lower(status) = 'finished' AND lr BETWEEN 0.01 AND 1 AND run_id LIKE '%' AND argv IS NOT NULL"
    assert len(flor_ray.runs(where=everything, store=st)) == 2
    assert flor_ray.runs(where="runs.lr IN (0.05) OR started_at > now() + INTERVAL 1 DAY", store=st)["lr"].tolist() == [0.05]
    df = flor_ray.dataframe("val", where="CASE WHEN lr < 0.07 THEN true ELSE false END", store=st)
    assert set(df["lr"]) == {0.05} and len(df) == EPOCHS


# -------------------------------------------------------------------- CLI
def _cli(repo, *args):
    return subprocess.run([sys.executable, "-m", "flor_ray.cli", *args], cwd=repo, env=clean_env(),
                          capture_output=True, text=True)


def test_cli_refuses_attacks(recorded, marker):
    repo, st = recorded
    proc = _cli(repo, "sql", "SELECT * FROM read_csv('/etc/passwd', sep = ':')")
    assert proc.returncode == 2 and FILES in proc.stderr and _passwd() not in proc.stdout + proc.stderr
    proc = _cli(repo, "sql", f"WITH x AS (COPY (SELECT 1) TO '{marker}') SELECT 1")
    assert proc.returncode == 2 and FILES in proc.stderr
    proc = _cli(repo, "sql", "WITH x AS (DELETE FROM runs) SELECT 1")
    assert proc.returncode == 2 and TABLES in proc.stderr
    where = f"1=1; COPY (SELECT 42) TO '{marker}'"
    for args in (("runs", "--where", where), ("df", "loss", "--where", where),
                 ("replay", "wnorm", "--where", where, "--dry-run")):
        proc = _cli(repo, *args)
        assert proc.returncode == 2 and "invalid where predicate" in proc.stderr, proc.stderr
    proc = _cli(repo, "sql", "SELECT count(*) AS n FROM runs", "--format", "csv")
    assert proc.returncode == 0 and proc.stdout.split() == ["n", "2"]
    _intact(st)


# ----------------------------------------------------------------- secrets
KEY, SECRET = "AKIAFLORSANDBOXKEY", "flor-sandbox-secret-value"


def test_storage_options_are_redacted_and_left_out_of_specs():
    opts = {"key": KEY, "secret": SECRET, "anon": False,
            "client_kwargs": {"endpoint_url": "http://127.0.0.1:1", "aws_session_token": "tok-123"}}
    st = Store("s3://bucket/prefix", opts)
    for text in (repr(st), repr(st.storage_options), str(st.storage_options)):
        assert KEY not in text and SECRET not in text and "tok-123" not in text, text
    assert redact(opts)["client_kwargs"] == {"endpoint_url": "http://127.0.0.1:1", "aws_session_token": "<redacted>"}
    assert without_secrets(opts) == {"anon": False, "client_kwargs": {"endpoint_url": "http://127.0.0.1:1"}}
    assert dict(st.storage_options) == opts  # the driver keeps them to reach the store


@pytest.fixture(scope="module")
def s3_endpoint():
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    import boto3

    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                 region_name="us-east-1").create_bucket(Bucket="flor-sandbox")
    yield endpoint
    server.stop()


def test_replay_on_s3_keeps_secrets_out_of_plan_spec_and_store(tmp_path, s3_endpoint, monkeypatch):
    from flor_ray.execution.driver import LocalRunner, run_plan
    from flor_ray.planning.history import HISTORY_DIR

    creds = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    url = f"s3://flor-sandbox/{uuid.uuid4().hex}"
    spec_copy = tmp_path / "spec.json"
    # the recorded version copies the spec its replay is given (the task's temp dir is gone after)
    script = "import os, shutil\nif os.environ.get('FLOR_REPLAY'):\n    shutil.copy(os.environ['FLOR_REPLAY'], " \
             f"{str(spec_copy)!r})\n" + SCRIPT
    repo = _repo(tmp_path / "proj")
    write(repo, "train.py", script)
    hand = _repo(tmp_path / "hand")  # the oracle: the statement typed in by hand, run in full
    write(hand, "train.py", script.replace("#WNORM", WNORM))
    _wait([_start(repo, env=clean_env(FLOR_STORE=url, AWS_ENDPOINT_URL=s3_endpoint, **creds)), _start(hand)])
    want = flor_ray.dataframe("wnorm", store=str(hand / ".flor"))["wnorm"].tolist()

    write(repo, "train.py", script.replace("#WNORM", WNORM))
    opts = {"key": KEY, "secret": SECRET, "client_kwargs": {"endpoint_url": s3_endpoint, "region_name": "us-east-1"}}
    st = Store(url, opts)
    plan = flor_ray.plan_replay(["wnorm"], store=st, script=repo / "train.py")
    assert plan.pending
    for text in (repr(plan), plan.explain()):
        assert KEY not in text and SECRET not in text
    for k, v in creds.items():  # the task's own credentials: its environment
        monkeypatch.setenv(k, v)
    report = run_plan(plan, progress=False, runner=LocalRunner())
    assert not report.failed, str(report)
    spec = spec_copy.read_text()
    assert KEY not in spec and SECRET not in spec and s3_endpoint in spec
    assert json.loads(spec)["storage_options"] == {"client_kwargs": {"endpoint_url": s3_endpoint,
                                                                      "region_name": "us-east-1"}}
    assert KEY not in str(report) and SECRET not in str(report)
    got = flor_ray.dataframe("wnorm", store=st)["wnorm"].tolist()
    assert got == want and len(got) == EPOCHS  # bit for bit
    for path in st.find("", ""):  # runs, logs, code, checkpoints, replay history
        data = st.read_bytes(path)
        assert KEY.encode() not in data and SECRET.encode() not in data, path
    assert st.find(HISTORY_DIR, ".json"), "no replay history written"


def test_task_reads_secret_options_from_its_own_config(tmp_path, monkeypatch):
    """A worker whose FLOR_CONFIG names the store gets its secret options from there."""
    from flor_ray.store.credentials import task_options

    cfg = tmp_path / "flor.yaml"
    cfg.write_text(f"store: s3://bucket/p\nstorage_options:\n  key: {KEY}\n  secret: {SECRET}\n"
                   "  client_kwargs:\n    endpoint_url: http://ignored\n")
    monkeypatch.setenv("FLOR_CONFIG", str(cfg))
    spec_opts = {"client_kwargs": {"endpoint_url": "http://from-spec"}}
    assert task_options("s3://bucket/p", spec_opts) == {"key": KEY, "secret": SECRET, **spec_opts}
    assert task_options("s3://other/q", spec_opts) == spec_opts
    monkeypatch.delenv("FLOR_CONFIG")
    assert os.environ.get("FLOR_CONFIG") is None and task_options("s3://bucket/p", spec_opts) == spec_opts

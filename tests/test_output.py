"""Captured output: what recorded runs printed, kept with them and queried."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

import flor_ray
from flor_ray.errors import FlorError, QueryError
from flor_ray.execution.driver import LocalRunner, run_plan
from flor_ray.planning.plan import ClusterSnapshot
from flor_ray.store import Store

from conftest import clean_env, init_repo, start_script, write

HELPERS = '''
import torch


def evaluate(net, X, Y):
    net.eval()
    with torch.no_grad():
        return (net(X).argmax(1) == Y).float().mean().item()
'''

# Shaped like real training code: argparse, a DataLoader, lr annealing, a helper
# module, logging configured before the first flor call, a bar redrawn with \r.
TRAIN = '''
import argparse
import logging
import os
import signal
import sys

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import flor_ray as flor
from helpers import evaluate

parser = argparse.ArgumentParser()
parser.add_argument("--die-at", type=int, default=-1)
cli = parser.parse_args()
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
log = logging.getLogger("train")
attrs_before = (sys.stdout.isatty(), sys.stdout.encoding, sys.stdout.fileno(), sys.stderr.fileno())

torch.manual_seed(0)
lr = flor.arg("lr", 0.1)
epochs = flor.arg("epochs", 4)
attrs_after = (sys.stdout.isatty(), sys.stdout.encoding, sys.stdout.fileno(), sys.stderr.fileno())
print(f"stream attributes unchanged: {attrs_before == attrs_after}")
data_log = logging.getLogger("data")  # a handler made after the capture began: it writes to the tee
data_log.addHandler(logging.StreamHandler(sys.stdout))
data_log.propagate = False
data_log.warning("loader ready")
X = torch.randn(64, 6)
Y = (X[:, 0] - X[:, 2] > 0).long()
loader = DataLoader(TensorDataset(X, Y), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(1))
net = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 2))
opt = torch.optim.SGD(net.parameters(), lr=lr)
print(f"data: {len(X)} rows, {len(loader)} batches")

with flor.checkpointing(net=net, opt=opt):
    for epoch in flor.loop("epoch", range(epochs)):
        if epoch == cli.die_at:
            print(f"epoch {epoch} started", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        total = 0.0
        for step, (xb, yb) in enumerate(flor.loop("step", loader)):
            loss = nn.functional.cross_entropy(net(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
            flor.log("loss", loss.item())
            sys.stderr.write(f"\\r  {step + 1}/{len(loader)} [{'#' * (step + 1)}{' ' * (len(loader) - step - 1)}]")
        sys.stderr.write("\\n")
        acc = evaluate(net, X, Y)
        flor.log("val_acc", acc)
        print(f"epoch {epoch} train_loss={total / len(loader):.4f} acc={acc:.4f} lr={lr:g}")
        log.info("epoch %d done", epoch)
        if epoch == 1:
            lr /= 2
            for g in opt.param_groups:
                g["lr"] = lr
print("done")
'''


def _start(tmp_path_factory, name: str, *args: str, **env: str):
    """A fresh repository with the script, its recording started: (repo, process)."""
    repo = tmp_path_factory.mktemp(name) / "proj"
    repo.mkdir()
    init_repo(repo)
    write(repo, "helpers.py", HELPERS)
    write(repo, "train.py", TRAIN)
    # a flush at every epoch's end (the epochs take milliseconds): output follows the flushes
    env = {"FLOR_FLUSH_INTERVAL": "0", **env}
    proc = start_script(repo, "train.py", *args, env=clean_env(**env))
    return repo, proc


def _finished(repo, proc):
    """(repo, store, the completed process, run id) once the recording ended."""
    out, err = proc.communicate(timeout=600)
    done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    store = Store(str(repo / ".flor"))
    (run_id,) = [m.rsplit("/", 1)[-1].rsplit(".", 1)[0] for m in store.listdir("runs")]
    return repo, store, done, run_id


@pytest.fixture(scope="module")
def histories(tmp_path_factory):
    """Four recordings of the script, run at once: plain, killed in epoch 2, capped, capture off."""
    started = {
        "plain": _start(tmp_path_factory, "out"),
        "crash": _start(tmp_path_factory, "crash", "--die-at", "2"),
        "cap": _start(tmp_path_factory, "cap", FLOR_OUTPUT_MAX_BYTES="150"),
        "off": _start(tmp_path_factory, "off", FLOR_OUTPUT_MAX_BYTES="0"),
    }
    found = {k: _finished(*v) for k, v in started.items()}
    for k, (_, _, proc, _) in found.items():
        assert k == "crash" or proc.returncode == 0, f"{k}: {proc.stdout}\n{proc.stderr}"
    return found


@pytest.fixture(scope="module")
def recorded(histories):
    return histories["plain"]


def _cli(repo, *args, env=None):
    return subprocess.run([sys.executable, "-m", "flor_ray.cli", *args], cwd=repo, env=env or clean_env(),
                          capture_output=True, text=True)


def _meta(store, run_id):
    return store.read_json(f"runs/{run_id}.json")


def test_prints_and_logging_are_captured_with_their_loop_context(recorded):
    repo, store, proc, run_id = recorded
    df = flor_ray.output(run_id, store=store)
    assert list(df["line"]) == list(range(1, len(df) + 1))
    out = df[df["stream"] == "stdout"]
    # the terminal got exactly what the script printed, and the capture holds the same lines
    assert proc.stdout == "".join(t + "\n" for t in out["text"])
    assert "stream attributes unchanged: True" in proc.stdout
    first = out.iloc[0]
    assert first["loops"] == "" and first["text"] == "stream attributes unchanged: True"
    assert list(df["text"]).count("loader ready") == 1 and "loader ready" in list(out["text"])
    epochs = out[out["text"].str.startswith("epoch ")]
    assert list(epochs["loops"]) == ["epoch"] * 4 and list(epochs["iter0"]) == [0, 1, 2, 3]
    # logging was configured before the capture began: its records are the `log` stream,
    # formatted as the script's handler formats them, each in its epoch
    logs = df[df["stream"] == "log"]
    assert list(logs["text"]) == [f"INFO train: epoch {e} done" for e in range(4)]
    assert list(logs["iter0"]) == [0, 1, 2, 3]
    assert all(f"INFO train: epoch {e} done" in proc.stderr for e in range(4))
    # the \\r bar is stored as its final state, once per epoch, inside the epoch
    bars = df[df["stream"] == "stderr"]
    assert list(bars["text"]) == ["  4/4 [####]"] * 4 and list(bars["iter0"]) == [0, 1, 2, 3]
    assert proc.stderr.count("  1/4 [#   ]") == 4  # and the terminal saw every redraw
    info = _meta(store, run_id)["output_capture"]
    assert info["lines"] == info["kept_lines"] == len(df) and info["dropped_lines"] == 0
    parts = store.find(f"output/{run_id}", ".parquet")
    assert len(parts) >= 4  # one per flush: each outer iteration and the end
    raw = sum(len(t.encode()) + 1 for t in df["text"])
    assert info["kept_bytes"] == raw - len(df)


def test_a_crash_keeps_the_output_up_to_the_last_flush(histories):
    repo, store, proc, run_id = histories["crash"]
    assert proc.returncode == -9 and "epoch 2 started" in proc.stdout
    df = flor_ray.output(run_id, store=store)
    texts = list(df["text"])
    assert [t.split(" train_loss")[0] for t in texts if " train_loss=" in t] == ["epoch 0", "epoch 1"]
    assert "INFO train: epoch 1 done" in texts
    assert "epoch 2 started" not in texts  # printed after the last flush: lost with the process
    assert set(df["iter0"].dropna()) == {0, 1}


def test_the_cap_keeps_the_first_lines_and_counts_the_rest(histories, recorded):
    full = flor_ray.output(recorded[3], store=recorded[1])
    repo, store, _, run_id = histories["cap"]
    df = flor_ray.output(run_id, store=store)
    kept = sum(len(t.encode()) for t in df["text"])
    assert 0 < kept <= 150
    assert list(df["text"]) == list(full["text"][: len(df)])  # the head, in order
    info = _meta(store, run_id)["output_capture"]
    assert info["kept_lines"] == len(df) and info["dropped_lines"] == len(full) - len(df) > 0
    proc = _cli(repo, "output", run_id)
    assert proc.returncode == 0 and proc.stdout.splitlines() == list(df["text"])
    assert f"{info['dropped_lines']} later lines" in proc.stderr and "output_max_bytes=150" in proc.stderr


def test_output_capture_can_be_turned_off(histories, recorded):
    repo, store, proc, run_id = histories["off"]
    assert (proc.stdout, proc.stderr) == (recorded[2].stdout, recorded[2].stderr)  # the script printed the same
    assert store.find("output", ".parquet") == []
    assert "output_capture" not in _meta(store, run_id)
    assert len(flor_ray.output(run_id, store=store)) == 0
    cli = _cli(repo, "output", run_id)
    assert cli.returncode == 0 and cli.stdout == "" and "has no captured output" in cli.stderr
    with pytest.raises(FlorError, match="output_max_bytes=-1.*out of range"):
        from flor_ray.config import load_settings

        load_settings(output_max_bytes=-1)


def test_grep_and_iterations_on_the_command_line(recorded):
    repo, _, proc, run_id = recorded
    printed = [ln for ln in proc.stdout.splitlines() if " acc=" in ln]
    out = _cli(repo, "output", run_id, "--grep", r"acc=0\.\d+", "--iterations", "1:3")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == printed[1:3]
    last = _cli(repo, "output", run_id, "--iterations", "last", "--stream", "log")
    assert last.stdout.splitlines() == ["INFO train: epoch 3 done"]
    table = _cli(repo, "output", run_id, "--grep", "^done$", "--format", "json")
    (row,) = json.loads(table.stdout)
    assert row["text"] == "done" and row["loops"] == "" and row["stream"] == "stdout"
    bad = _cli(repo, "output", run_id, "--grep", "acc=(")
    assert bad.returncode == 2 and "not a valid regular expression" in bad.stderr and "Traceback" not in bad.stderr
    unknown = _cli(repo, "output", "20200101T000000-abcdef")
    assert unknown.returncode == 2 and "no run '20200101T000000-abcdef'" in unknown.stderr


def test_sql_has_an_output_table_beside_logs_and_runs(recorded):
    _, store, proc, run_id = recorded
    df = flor_ray.sql("SELECT stream, count(*) AS n FROM output GROUP BY stream ORDER BY stream", store=store)
    assert dict(zip(df["stream"], df["n"])) == {"log": 4, "stderr": 4, "stdout": len(proc.stdout.splitlines())}
    joined = flor_ray.sql(
        "SELECT o.iter0 AS epoch, o.text, l.value FROM output o JOIN logs l ON o.run_id = l.run_id "
        "AND o.iter0 = l.iter0 AND l.name = 'val_acc' JOIN runs r ON r.run_id = o.run_id "
        "WHERE o.text LIKE 'epoch %' AND o.stream = 'stdout' AND r.lr = 0.1 ORDER BY epoch", store=store)
    assert list(joined["epoch"]) == [0, 1, 2, 3]
    assert all(f"acc={v:.4f}" in t for t, v in zip(joined["text"], joined["value"]))
    cols = flor_ray.sql("DESCRIBE output", store=store)
    assert list(cols["column_name"]) == ["run_id", "stream", "line", "time", "loops", "iter0", "iter1", "iter2",
                                         "iter3", "text"]


def test_extract_back_fills_printed_values_without_a_replay(recorded):
    repo, store, _, run_id = recorded
    logged = flor_ray.dataframe("val_acc", store=store)
    got = flor_ray.output_metrics(run_id, ["acc", "train_loss"], store=store)
    assert list(got.columns) == ["run_id", "line", "stream", "epoch", "acc", "train_loss"]
    assert list(got["epoch"]) == [0, 1, 2, 3]
    assert list(got["acc"]) == [float(f"{v:.4f}") for v in logged.sort_values("epoch")["val_acc"]]
    merged = logged.merge(got[["run_id", "epoch", "train_loss"]], on=["run_id", "epoch"])
    assert len(merged) == 4 and merged["train_loss"].notna().all()
    assert not any("source=replay" in f for f in store.find("logs", ".parquet"))  # read, not replayed
    cli = _cli(repo, "output", "--extract", "--names", "lr", "--format", "csv")
    assert cli.returncode == 0, cli.stderr
    lines = cli.stdout.splitlines()
    assert lines[0] == "run_id,line,stream,epoch,lr"
    assert [ln.rsplit(",", 1)[1] for ln in lines[1:]] == ["0.1", "0.1", "0.05", "0.05"]  # lr /= 2 after epoch 1
    assert flor_ray.output_metrics(run_id, ["no_such_name"], store=store).empty


def test_a_replay_leaves_the_runs_output_unchanged(histories):
    repo, store, _, run_id = histories["cap"]  # its replay prints more than the cap let it keep
    before = {f: store.read_bytes(f) for f in store.find("output", ".parquet")}
    meta_before = _meta(store, run_id)["output_capture"]
    today = TRAIN.replace('        flor.log("val_acc", acc)\n',
                          '        flor.log("val_acc", acc)\n        flor.log("wnorm", net[0].weight.norm().item())\n')
    write(repo, "train.py", today)
    plan = flor_ray.plan_replay(["wnorm"], store=store, script=repo / "train.py", cluster=ClusterSnapshot(2))
    report = run_plan(plan, progress=False, runner=LocalRunner())
    assert not report.failed, str(report)
    assert len(flor_ray.dataframe("wnorm", store=store)["wnorm"].dropna()) == 4
    after = {f: store.read_bytes(f) for f in store.find("output", ".parquet")}
    assert after == before
    assert _meta(store, run_id)["output_capture"] == meta_before


@pytest.mark.parametrize("query, refused", [
    ("COPY output TO '{tmp}/out.csv'", "not COPY"),
    ("SELECT * FROM read_parquet('{part}')", "cannot read or write files"),
    ("SELECT o.text, f.content FROM output o, read_text('{part}') f", "cannot read or write files"),
    ("INSERT INTO output (text) VALUES ('forged')", "not INSERT"),
    ("WITH x AS (SELECT 1) DELETE FROM output", "changing the tables|cannot change the tables|not DELETE"),
    ("ATTACH '{tmp}/x.db' AS x", "not ATTACH"),
])
def test_the_sql_sandbox_still_refuses_file_access_through_output(recorded, tmp_path, query, refused):
    _, store, _, run_id = recorded
    part = store.path(store.find(f"output/{run_id}", ".parquet")[0])
    n = len(flor_ray.sql("SELECT * FROM output", store=store))
    with pytest.raises(QueryError, match=refused):
        flor_ray.sql(query.format(tmp=tmp_path, part=part), store=store)
    assert len(flor_ray.sql("SELECT * FROM output", store=store)) == n
    assert not (tmp_path / "out.csv").exists() and not (tmp_path / "x.db").exists()


def test_import_stays_light_and_the_capture_is_off_until_a_run_starts(tmp_path):
    code = textwrap.dedent("""
        import sys, flor_ray
        assert type(sys.stdout).__name__ != "_Tee" and type(sys.stderr).__name__ != "_Tee"
        import flor_ray.record.output
        print(sorted(m for m in ("pandas", "pyarrow", "duckdb", "torch", "ray") if m in sys.modules))
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=clean_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


LOGGING_SNIPPET = """
import logging, sys
from flor_ray.record.output import OutputCapture

parts = []
if sys.argv[1] == "on":
    cap = OutputCapture("r", lambda rel, data: parts.append(data), lambda: ("", ()), 10**6).install()
logging.warning("before any config %d", 1)   # logging's own basicConfig, to the (teed) stderr
logging.basicConfig(level=logging.INFO)        # a no-op, as without the capture
logging.info("not shown")
logging.getLogger("lib").error("lib error")
files = logging.getLogger("files")
files.addHandler(logging.FileHandler(sys.argv[2]))
files.propagate = False
files.error("to a file only")
print("progress 10%", end="\\r")
print("progress 100%")
if sys.argv[1] == "on":
    cap.close()
    import io, json, pyarrow as pa, pyarrow.parquet as pq
    rows = pa.concat_tables([pq.read_table(pa.BufferReader(d), use_threads=False) for d in parts])
    print(json.dumps(list(zip(rows["stream"].to_pylist(), rows["text"].to_pylist()))))
"""


def test_logging_and_the_terminal_behave_as_without_the_capture(tmp_path):
    runs = {}
    for mode in ("off", "on"):
        proc = subprocess.run([sys.executable, "-c", LOGGING_SNIPPET, mode, str(tmp_path / f"{mode}.log")],
                              env=clean_env(), capture_output=True)
        assert proc.returncode == 0, proc.stderr
        runs[mode] = proc
    off, on = runs["off"], runs["on"]
    assert on.stderr == off.stderr == b"WARNING:root:before any config 1\nERROR:lib:lib error\n"
    assert off.stdout == b"progress 10%\rprogress 100%\n" and on.stdout.startswith(off.stdout)
    assert json.loads(on.stdout[len(off.stdout):]) == [
        ["stderr", "WARNING:root:before any config 1"], ["stderr", "ERROR:lib:lib error"],
        ["log", "to a file only"], ["stdout", "progress 100%"]]
    assert (tmp_path / "on.log").read_text() == (tmp_path / "off.log").read_text() == "to a file only\n"


def test_the_web_ui_run_page_shows_the_captured_output(recorded, histories):
    from flor_ray.ui.api import run_detail

    _, store, proc, run_id = recorded
    text = run_detail(store, run_id)["output"]
    assert text.splitlines() == list(flor_ray.output(run_id, store=store)["text"])
    off_store, off_run = histories["off"][1], histories["off"][3]
    assert run_detail(off_store, off_run)["output"] is None  # the page says it has none

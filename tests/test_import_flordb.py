"""Moving over from FlorDB: a history recorded by the real FlorDB 4.0.1 package
(installed from the registry into a virtualenv of the test's own), imported into a
flor_ray store, then back-filled.

The oracle for the back-fill is FlorDB itself: each run's recorded code, with the
new statements typed in by hand, run again in full by FlorDB with the run's args.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

import pandas as pd
import pytest

import flor_ray
from flor_ray.errors import FlorDBImportError
from flor_ray.flordb.code import rewrite_imports
from flor_ray.flordb.importer import import_flordb, run_id_for
from flor_ray.store import Store

from conftest import clean_env, git, init_repo, write

FLORDB = "flordb==4.0.1"
#: the tests on the recorded history: a virtualenv with FlorDB from the registry, six FlorDB runs, a replay
slow = pytest.mark.slow

DATA = '''
import torch
from torch.utils.data import DataLoader, TensorDataset


def make_loader(n, batch_size, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] - x[:, 2] > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(seed + 1))
'''

V1 = '''
import argparse
import random

import torch
import torch.nn as nn

import flordb as flor
from data import make_loader


def build(hidden):
    return nn.Sequential(nn.Linear(8, hidden), nn.Tanh(), nn.Dropout(0.1), nn.Linear(hidden, 2))


def evaluate(net, loader):
    net.eval()
    with torch.no_grad():
        right = sum((net(x).argmax(1) == y).sum().item() for x, y in loader)
    return right / len(loader.dataset)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=0)
    cli, _ = parser.parse_known_args()
    torch.manual_seed(cli.seed)
    random.seed(cli.seed)
    lr = flor.arg("lr", 0.1)
    epochs = flor.arg("epochs", 3)
    hidden = flor.arg("hidden", 12)
    loader = make_loader(96, 16, cli.seed)
    net = build(hidden)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
    with flor.checkpointing(model=net, optimizer=opt):
        for epoch in flor.loop("epoch", range(epochs)):
            net.train()
            total = 0.0
            for x, y in flor.loop("step", loader):
                x = x + 0.01 * random.gauss(0.0, 1.0)
                loss = nn.functional.cross_entropy(net(x), y)
                opt.zero_grad()
                loss.backward()
                #CLIP
                opt.step()
                total += loss.item()
                flor.log("loss", loss.item())
            sched.step()
            flor.log("train_loss", total / len(loader))
            flor.log("acc", evaluate(net, loader))
            torch.save({"model": net.state_dict(), "epoch": epoch}, "ckpt.pt")


if __name__ == "__main__":
    main()
'''
# the second version clips gradients (a line the first never had)
V2 = V1.replace("#CLIP", "torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)  # keep steps small")
GNORM = 'flor.log("gnorm", net[0].weight.grad.norm().item())'
WNORM = 'flor.log("wnorm", net[0].weight.norm().item())'


def typed_in(src: str) -> str:
    """``src`` with the new statements typed in by hand where today's script has them."""
    out = []
    for line in src.splitlines():
        out.append(line)
        indent = line[: len(line) - len(line.lstrip())]
        if line.strip() == 'flor.log("loss", loss.item())':
            out.append(indent + GNORM)
        elif line.strip() == 'flor.log("acc", evaluate(net, loader))':
            out.append(indent + WNORM)
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------ FlorDB
@pytest.fixture(scope="session")
def flordb_python(tmp_path_factory) -> str:
    """A python with the registry's FlorDB 4.0.1, and this interpreter's packages
    (torch, numpy...) behind its own: FlorDB records with the torch that replays.
    ``FLORDB_TEST_PYTHON`` names such a python made before (to rerun the tests quickly)."""
    if os.environ.get("FLORDB_TEST_PYTHON"):
        return os.environ["FLORDB_TEST_PYTHON"]
    home = tmp_path_factory.mktemp("flordb-venv")
    # no pip of its own (ensurepip costs half a minute on a loaded machine): this
    # interpreter's pip installs into it (``pip --python``)
    venv.EnvBuilder(with_pip=False).create(home)
    python = str(home / "bin" / "python")
    site = subprocess.run([python, "-c", "import site; print(site.getsitepackages()[0])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    import site as _site

    Path(site, "_flor_ray_test.pth").write_text("\n".join(_site.getsitepackages()) + "\n")
    try:
        proc = subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "-q",
                               "--disable-pip-version-check", FLORDB], capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        pytest.skip(f"pip cannot install {FLORDB}: no answer from the registry within 900 s")
    if proc.returncode != 0:
        tail = " ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        pytest.skip(f"pip cannot install {FLORDB} from the registry: {tail}")
    return python


def flordb_env() -> dict:
    env = {k: v for k, v in clean_env().items() if k != "PYTHONPATH"}  # FlorDB's run sees no flor_ray
    return env


def start_flordb(python: str, repo: Path, *kwargs: str):
    """Start train.py under FlorDB with ``--kwargs``; :func:`finish_flordb` waits for it."""
    before = set(os.listdir(repo / ".flor" / "runs")) if (repo / ".flor" / "runs").is_dir() else set()
    args = ["--kwargs", *kwargs] if kwargs else []
    proc = subprocess.Popen([python, "train.py", *args], cwd=repo, env=flordb_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    return proc, repo, before


def finish_flordb(started) -> str:
    """The tstamp of the run FlorDB recorded."""
    proc, repo, before = started
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    new = sorted(set(os.listdir(repo / ".flor" / "runs")) - before)
    assert len(new) == 1, new
    return new[0][: -len(".jsonl")]


def run_flordb(python: str, repo: Path, *kwargs: str) -> str:
    return finish_flordb(start_flordb(python, repo, *kwargs))


def jsonl(repo: Path, tstamp: str) -> list[dict]:
    return [json.loads(line) for line in (repo / ".flor" / "runs" / f"{tstamp}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def history(tmp_path_factory, flordb_python):
    """Three FlorDB runs: two of the first version (other args), one of the second;
    then ``flor-ray import-flordb`` in the repository (the store: its ``.flor/``)."""
    repo = tmp_path_factory.mktemp("flordb") / "proj"
    repo.mkdir()
    init_repo(repo)
    write(repo, "data.py", DATA)
    write(repo, "train.py", V1)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "v1")
    runs = [run_flordb(flordb_python, repo, "lr=0.2", "epochs=2"), run_flordb(flordb_python, repo)]
    write(repo, "train.py", V2)
    runs.append(run_flordb(flordb_python, repo, "lr=0.05"))
    proc = subprocess.run([sys.executable, "-m", "flor_ray.cli", "import-flordb"], cwd=repo, env=clean_env(),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    write(repo.parent, "today.py", typed_in(V2).replace("import flordb as flor", "import flor_ray as flor"))
    return repo, Store(str(repo / ".flor")), runs, proc.stdout


@slow
def test_values_args_and_code_versions_arrive(history):
    repo, store, tstamps, out = history
    ids = [run_id_for("proj", t) for t in tstamps]
    assert out.startswith(f"imported 3 FlorDB run(s) into {store.url}") and all(i in out for i in ids)
    runs = flor_ray.runs(store=store).set_index("run_id")
    assert sorted(runs.index) == sorted(ids)
    logs = flor_ray.sql("SELECT run_id, name, loops, iter0, iter1, value, vtype, seq FROM logs ORDER BY run_id, seq",
                        store=store)
    for tstamp, rid in zip(tstamps, ids):
        records = jsonl(repo, tstamp)
        commit = git(repo, "log", "--all", "--format=%H", f"--grep=^FLOR::Auto-commit::{tstamp}$").split()
        assert len(commit) == 1
        body = git(repo, "log", "-1", "--format=%b", commit[0]).split()
        args = dict(kv.split("=", 1) for kv in body)
        # args: the names of the commit's body, with the values FlorDB logged (typed)
        logged_args = {r["name"]: r["value"] for r in records if r["type"] == 1 and not r["ctx"] and r["name"] in args}
        assert {k: str(v) for k, v in logged_args.items()} == args
        assert {k: runs.loc[rid, k] for k in args} == logged_args
        # values: every other flor.log record, in order, with its loop context
        want = [(r["name"], "/".join(s["name"] for s in r["ctx"] or ()), *(s["iteration"] for s in r["ctx"] or ()),
                 r["value"]) for r in records if r["type"] == 1 and r["name"] not in args]
        mine = logs[logs.run_id == rid]
        got = [(n, lp, *([int(i0)] if lp else []), *([int(i1)] if lp.count("/") else []), v)
               for n, lp, i0, i1, v in zip(mine.name, mine.loops, mine.iter0, mine.iter1, mine.value)]
        assert got == want and set(mine.vtype) == {"float"}
        # code: the run's commit, flordb's import made flor_ray's, outputs and FlorDB's records left out
        version = json.loads((repo / ".flor" / "code" / "versions" / f"{runs.loc[rid, 'version']}.json").read_text())
        assert store.read_json(f"runs/{rid}.json")["commit"] == commit[0]
        assert sorted(version["files"]) == [".gitignore", "data.py", "train.py"]
        old = git(repo, "show", f"{commit[0]}:train.py")
        assert (repo / ".flor" / "code" / "objects" / version["files"]["train.py"]).read_text() == old.replace(
            "import flordb as flor", "import flor_ray as flor")
        assert runs.loc[rid, "script"] == "train.py" and runs.loc[rid, "iterations"] == int(args["epochs"])
    assert runs.loc[ids[0], "version"] == runs.loc[ids[1], "version"] != runs.loc[ids[2], "version"]


@slow
def test_saved_files_are_kept_and_the_ids_are_deterministic(history):
    repo, store, tstamps, _ = history
    for t in tstamps:
        meta = store.read_json(f"runs/{run_id_for('proj', t)}.json")
        (saved,) = meta["saved_files"]
        original = next((repo / ".flor" / "obj_store" / t / ".latest").glob("*.pth")).read_bytes()
        assert saved["name"] == "ckpt.pt" and store.read_bytes(saved["path"]) == original
        assert saved["sha256"] == hashlib.sha256(original).hexdigest()
        assert meta["checkpoints"] == [] and meta["imported_from"]["tstamp"] == t
    assert run_id_for("proj", tstamps[0]) == run_id_for("proj", tstamps[0]) != run_id_for("other", tstamps[0])


@slow
def test_the_store_shares_flordbs_directory(history):
    """FlorDB's files in .flor/ are not the store's damage, and FlorDB's run files stay
    in git while the store's own files stay out."""
    from flor_ray.cli import main

    repo, store, tstamps, _ = history
    assert main(["check", "--store", store.url]) == 0
    flordb_file = subprocess.run(["git", "check-ignore", "-q", ".flor/runs/2099-01-01T00:00:00.jsonl"], cwd=repo)
    store_file = subprocess.run(["git", "check-ignore", "-q", f".flor/runs/{run_id_for('proj', tstamps[0])}.json"],
                                cwd=repo)
    assert (flordb_file.returncode, store_file.returncode) == (1, 0)


def test_records_flor_ray_cannot_hold_are_left_out_with_the_reason():
    """A FlorDB run is data: a name that is a column of the relation, a loop nested
    deeper than the relation keeps, loop items that were strings."""
    from flor_ray.flordb.importer import FlorDBRun, build_rows

    def rec(name, value, ctx=None):
        return {"projid": "p", "tstamp": "t", "filename": "f.py", "ctx": ctx, "name": name, "value": value, "type": 1}

    deep = [{"name": f"l{d}", "iteration": 0, "value": "0"} for d in range(5)]
    files = [{"name": "shard", "iteration": 1, "value": "b.csv"}]
    run = FlorDBRun("p", "t", "f.py", "x.jsonl", (rec("lr", 0.1), rec("value", 1), rec("deep", 2.0, deep),
                                                   rec("rows", 7, files), rec("lr", 0.2)))
    rows, args, notes = build_rows(run, ["lr"], "v", "f.py")
    assert args == {"lr": 0.1} and rows["names"] == ["rows", "lr"] and rows["values"] == [7, 0.2]
    assert rows["items"] == [(0, "b.csv")] and rows["lasts"] == [1, None]
    assert [n.split(":")[0] for n in notes] == ["'value' left out", "'deep' left out"]
    assert "is a column of the log relation" in notes[0] and "nested 5 loops deep" in notes[1]


def test_a_run_that_raised_is_imported_as_failed():
    """FlorDB keeps no status; the traceback it captured on stderr says the run failed
    (in its second epoch here, which did not complete)."""
    from flor_ray.flordb.importer import FlorDBRun, failure, timings

    def rec(name, value, kind, epoch):
        ctx = [{"name": "epoch", "iteration": epoch, "value": str(epoch)}]
        return {"projid": "p", "tstamp": "t", "filename": "t.py", "ctx": ctx, "name": name, "value": value,
                "type": kind}

    lines = ["Traceback (most recent call last):", '  File "t.py", line 5, in <module>', "ValueError: boom"]
    run = FlorDBRun("p", "t", "t.py", "x.jsonl", (rec("x", 0, 1, 0), rec("x", 1, 1, 1),
                                                 *(rec("io::stderr", line, 2, 1) for line in lines)))
    error = failure(run)
    assert (error["type"], error["message"], error["traceback"]) == ("ValueError", "boom", "\n".join(lines))
    assert timings(run, failed=True)[1:] == ("epoch", 1) and timings(run)[1:] == ("epoch", 2)


def _files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@slow
def test_importing_twice_adds_nothing(history):
    repo, store, tstamps, _ = history
    before = _files(repo / ".flor")
    report = import_flordb(repo)
    assert report.imported == () and sorted(report.already) == sorted(run_id_for("proj", t) for t in tstamps)
    assert _files(repo / ".flor") == before


@slow
def test_backfill_into_imported_runs_equals_flordb_rerun_with_the_statements(history, flordb_python, ray_local,
                                                                            tmp_path):
    repo, store, tstamps, _ = history
    plan = flor_ray.plan_replay(["wnorm", "gnorm"], store=store, script=repo.parent / "today.py")
    text = plan.explain()
    assert not plan.skipped and len(plan.tasks) == 3, text
    report = flor_ray.run_plan(plan, progress=False)
    assert not report.failed, str(report)
    assert report.fidelity.compared > 0 and report.fidelity.mismatched == 0, str(report)
    got = flor_ray.sql("SELECT run_id, name, iter0, iter1, value FROM logs WHERE name IN ('wnorm', 'gnorm') "
                       "ORDER BY run_id, name, iter0, iter1", store=store)
    # the oracle: FlorDB re-running each run's commit with the statements typed in, with the run's args
    started = []
    for t in tstamps:  # one copy of the repository per run, so that they run side by side
        oracle = tmp_path / f"oracle-{len(started)}"
        shutil.copytree(repo, oracle, ignore=shutil.ignore_patterns(".flor"))
        commit = git(oracle, "log", "--all", "--format=%H", f"--grep=^FLOR::Auto-commit::{t}$").strip()
        args = git(oracle, "log", "-1", "--format=%b", commit).split()
        git(oracle, "checkout", "-q", "-f", "-B", "oracle", commit)
        write(oracle, "train.py", typed_in(git(oracle, "show", f"{commit}:train.py")))
        started.append((t, args, start_flordb(flordb_python, oracle, *args)))
    for t, args, run in started:
        rerun = finish_flordb(run)
        want = sorted((r["name"], r["ctx"][0]["iteration"], r["ctx"][1]["iteration"] if len(r["ctx"]) > 1 else -1,
                       r["value"]) for r in jsonl(run[1], rerun) if r["name"] in ("wnorm", "gnorm"))
        mine = got[got.run_id == run_id_for("proj", t)]
        assert sorted((n, int(a), -1 if pd.isna(b) else int(b), v)
                      for n, a, b, v in zip(mine.name, mine.iter0, mine.iter1, mine.value)) == want
        assert len(want) == 7 * (2 if "epochs=2" in args else 3)  # 6 steps and 1 epoch-level value per epoch


@slow
def test_a_run_whose_commit_is_gone_is_imported_and_explained(history, tmp_path):
    """A project whose .flor/runs was copied from the machine that trained, without
    the branch: the values arrive; a replay says why it cannot run the run."""
    repo, _, tstamps, _ = history
    other = tmp_path / "copy"
    (other / ".flor" / "runs").mkdir(parents=True)
    shutil.copy(repo / ".flor" / "runs" / f"{tstamps[2]}.jsonl", other / ".flor" / "runs")
    git(other, "init", "-q")
    store = Store(str(tmp_path / "store"))
    report = import_flordb(other, store=store)
    rid = run_id_for("proj", tstamps[2])
    assert report.imported == (rid,) and "FLOR::Auto-commit::" in dict(report.not_replayable)[rid]
    assert len(flor_ray.dataframe("loss", store=store)) == 3 * 6
    plan = flor_ray.plan_replay(["wnorm"], store=store, script=repo.parent / "today.py")
    assert not plan.tasks
    assert f"Skip[run={rid}] cannot be replayed: FlorDB made no commit 'FLOR::Auto-commit::{tstamps[2]}'" in \
        plan.explain()


@slow
def test_a_clone_without_flordbs_branch_checked_out_imports_the_same_runs(history, tmp_path):
    """FlorDB commits its run files: a clone on main (no .flor/ in its tree) has the
    runs in the shadow branch's commits, and they arrive as from the original."""
    repo, store, tstamps, _ = history
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "--branch", "main", str(repo), str(clone)], check=True)
    assert not (clone / ".flor").exists()
    other = Store(str(tmp_path / "store"))
    report = import_flordb(clone, store=other)
    ids = sorted(run_id_for("proj", t) for t in tstamps)
    assert sorted(report.imported) == ids and not report.not_replayable
    query = ("SELECT run_id, name, loops, iter0, iter1, value, seq FROM logs WHERE source = 'record' "
             "ORDER BY run_id, seq")
    assert flor_ray.sql(query, store=other).equals(flor_ray.sql(query, store=store).query("run_id in @ids"))
    cols = ["run_id", "lr", "epochs", "hidden", "iterations"]
    mine, theirs = flor_ray.runs(store=other), flor_ray.runs(store=store)
    assert mine[cols].equals(theirs[cols])
    # the code too; without FlorDB's obj_store/ the file the runs saved is not known as an output, and stays
    for a, b in zip(mine["version"], theirs["version"]):
        va, vb = other.read_json(f"code/versions/{a}.json"), store.read_json(f"code/versions/{b}.json")
        assert va["files"]["train.py"] == vb["files"]["train.py"] and va["files"]["data.py"] == vb["files"]["data.py"]
        assert set(va["files"]) - set(vb["files"]) == {"ckpt.pt"}


@slow
def test_import_into_an_s3_store_and_again(history):
    """The store on object storage (a moto S3 server on 127.0.0.1): the same runs, rows
    and code as in the local store, and a second import adds nothing."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    from conftest import S3

    repo, local, tstamps, _ = history
    server = S3()
    try:
        server.client().create_bucket(Bucket="flordb")
        remote = server.store("s3://flordb/imported")
        first, second = import_flordb(repo, store=remote), import_flordb(repo, store=remote)
        ids = sorted(run_id_for("proj", t) for t in tstamps)
        assert sorted(first.imported) == ids and second.imported == () and sorted(second.already) == ids
        query = ("SELECT run_id, name, loops, iter0, iter1, value, seq FROM logs WHERE source = 'record' "
                 "ORDER BY run_id, seq")
        assert flor_ray.sql(query, store=remote).equals(flor_ray.sql(query, store=local))
        cols = ["run_id", "version", "lr", "epochs", "hidden", "iterations"]
        assert flor_ray.runs(store=remote)[cols].equals(flor_ray.runs(store=local)[cols])
        for v in set(flor_ray.runs(store=local)["version"]):
            manifest = local.read_json(f"code/versions/{v}.json")
            assert remote.read_json(f"code/versions/{v}.json") == manifest
            assert all(remote.read_bytes(f"code/objects/{b}") == local.read_bytes(f"code/objects/{b}")
                       for b in manifest["files"].values())
    finally:
        server.stop()


@slow
def test_bad_input_leaves_the_store_as_it_was(history, tmp_path):
    repo, store, tstamps, _ = history
    nothing = tmp_path / "empty"
    nothing.mkdir()
    target = Store(str(tmp_path / "new-store"))
    with pytest.raises(FlorDBImportError, match="is not a FlorDB project: there is no .flor/runs/"):
        import_flordb(nothing, store=target)
    assert not (tmp_path / "new-store").exists()
    # a project with one unreadable record: nothing of it is imported, the store unchanged
    broken = tmp_path / "broken"
    shutil.copytree(repo, broken)
    late = broken / ".flor" / "runs" / "2099-01-01T00:00:00.000000.jsonl"
    late.write_text(json.dumps({"projid": "proj", "tstamp": "2099-01-01T00:00:00.000000"})[:-8] + "\n")
    before = _files(broken / ".flor")
    with pytest.raises(FlorDBImportError, match=r"runs/2099-01-01T00:00:00.000000.jsonl:1 is not a JSON record"):
        import_flordb(broken)
    assert _files(broken / ".flor") == before
    proc = subprocess.run([sys.executable, "-m", "flor_ray.cli", "import-flordb", str(broken)], env=clean_env(),
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("flor-ray import-flordb: .flor/runs/2099-01-01T")
    assert "repair that line, or move the file out of .flor/runs/" in proc.stderr and _files(broken / ".flor") == before


def test_rewrite_imports_keeps_everything_else():
    src = textwrap.dedent("""\
        import os, flordb as flor  # the logger
        import flordb
        from flordb import log, loop
        import flordbx

        flor.log("x", 1)  # flordb stays in comments
        """).encode()
    assert rewrite_imports(src).decode() == textwrap.dedent("""\
        import os, flor_ray as flor  # the logger
        import flor_ray as flordb
        from flor_ray import log, loop
        import flordbx

        flor.log("x", 1)  # flordb stays in comments
        """)
    assert rewrite_imports(b"def broken(:\n  import flordb\n") == b"def broken(:\n  import flordb\n"


def test_flordb_verbs_commit_and_query_under_flor_ray(repo):
    """flor.commit() flushes the run's rows now; flor.query is flor.sql."""
    write(repo, "train.py", """
        import flor_ray as flor

        flor.log("ready", 1)
        before = len(flor.query("SELECT * FROM logs WHERE name = 'ready'"))
        flor.commit()
        after = flor.query("SELECT * FROM logs WHERE name = 'ready'")
        same = after.equals(flor.sql("SELECT * FROM logs WHERE name = 'ready'"))
        print(before, len(after), same)
        """)
    proc = subprocess.run([sys.executable, "train.py"], cwd=repo, env=clean_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["0", "1", "True"]
    assert "query" in flor_ray.__all__
    importlib.import_module("flor_ray.queries.sql")  # the query package loaded: the verb stays the verb
    assert callable(flor_ray.query) and flor_ray.query.__module__ == "flor_ray"

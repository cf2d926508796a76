"""What keeps recording cheap: the Arrow table without pandas, git without GitPython,
the snapshot's racy-git case, the checkpoint period's cost, FLOR_PROFILE; and the
record benchmark in quick mode."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flor_ray.config import Settings
from flor_ray.record.rows import rows_to_table
from flor_ray.record.loops import LoopRuntime
from flor_ray.record.session import RecordSession
from flor_ray.store.logs import ITER_COLS, schema
from flor_ray.store.logs import vtype_of as _vtype_of
from flor_ray.store import Store
from flor_ray.versions import find_repo_root, snapshot, tree_files

from conftest import REPO_ROOT, TRAIN_SCRIPT, clean_env, git, run_script, write


# ------------------------------------------------------------------ rows -> table
def relation_rows_to_table(
    *,
    version: str,
    file: str,
    prefixes: Sequence[tuple],
    prefix_ids: Sequence[int],
    lasts: Sequence[int | None],
    items: Sequence[tuple[int, Any]],
    names: Sequence[str],
    values: Sequence[Any],
    seq_start: int,
    task: str | None = None,
) -> "pa.Table":
    """The reference: the first (pyarrow.compute) implementation, kept here to check
    the numpy one against. Build one Parquet-ready table from buffered rows.

    Row ``r`` sits in loop context ``prefixes[prefix_ids[r]]`` = ``(loops, enclosing
    iterations, enclosing items, depth)`` at innermost iteration ``lasts[r]``;
    ``items`` lists ``(row, innermost item)`` where the item is worth keeping.
    Prefix columns are built once per prefix and gathered with ``take``, so a
    million rows cost a few vectorised passes.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    n = len(names)
    sch = schema()
    idx = pa.array(prefix_ids, type=pa.int32())
    last = pa.array(lasts, type=pa.int32())
    depth = pc.take(pa.array([p[3] for p in prefixes], pa.int32()), idx)
    zeros = pa.array(np.zeros(n, dtype=np.int32))
    cols: dict[str, Any] = {
        "version": pc.take(pa.array([version], pa.string()), zeros),
        "file": pc.take(pa.array([file], pa.string()), zeros),
        "loops": pc.take(pa.array([p[0] for p in prefixes], pa.string()), idx),
    }
    for d, col in enumerate(ITER_COLS):
        enclosing = pa.array([p[1][d] if len(p[1]) > d else None for p in prefixes], type=pa.int32())
        cols[col] = pc.if_else(pc.equal(depth, d + 1), last, pc.take(enclosing, idx))
    if items or any(p[2] is not None for p in prefixes):
        inner = dict(items)
        docs: list[str | None] = []
        for r in range(n):
            p = prefixes[prefix_ids[r]]
            it = inner.get(r)
            if p[2] is None and it is None:
                docs.append(None)
            else:
                docs.append(json.dumps([*(p[2] or (None,) * len(p[1])), it]))
        cols["items"] = pa.array(docs, pa.string())
    else:
        cols["items"] = pa.nulls(n, pa.string())
    cols["name"] = pa.array(names, type=pa.string())

    types = set(map(type, values))
    if types == {float}:
        vtype = pa.array(["float"] * n, pa.string())
        vf, vi, vs = pa.array(values, pa.float64()), pa.nulls(n, pa.int64()), pa.nulls(n, pa.string())
    elif types == {int}:
        vtype = pa.array(["int"] * n, pa.string())
        vf, vi, vs = pa.nulls(n, pa.float64()), pa.array(values, pa.int64()), pa.nulls(n, pa.string())
    else:
        vt = [_vtype_of(v) for v in values]
        vtype = pa.array(vt, pa.string())
        vf = pa.array([v if t == "float" else None for v, t in zip(values, vt)], pa.float64())
        vi = pa.array([int(v) if t in ("int", "bool") else None for v, t in zip(values, vt)], pa.int64())
        vs = pa.array([str(v) if t in ("str", "json") else None for v, t in zip(values, vt)], pa.string())
    cols["vtype"] = vtype
    cols["value_float"], cols["value_int"], cols["value_str"] = vf, vi, vs
    cols["seq"] = pa.array(np.arange(seq_start, seq_start + n, dtype=np.int64))
    cols["task"] = pc.take(pa.array([task], pa.string()), zeros)
    return pa.Table.from_arrays([cols[f.name] for f in sch], schema=sch)


def _same_tables(a, b) -> None:
    assert a.schema.equals(b.schema, check_metadata=True)
    for name in a.schema.names:
        x, y = a[name].to_pylist(), b[name].to_pylist()
        same = [u == v or (isinstance(u, float) and isinstance(v, float) and math.isnan(u) and math.isnan(v))
                for u, v in zip(x, y)]
        assert len(x) == len(y) and all(same), (name, x, y)


def _rows_of(body) -> dict:
    rt = LoopRuntime()
    body(rt)
    rows = rt.take_rows()
    assert rows is not None
    return rows


def _nested(rt):
    from flor_ray.store.values import JsonValue  # noqa: F401  # dicts become JSON values

    rt.log("setup", 1)
    rt.log("ünï", "çødé")
    for e in rt.loop("epoch", range(3)):
        rt.log("lr", 0.5)
        for s in rt.loop("step", ["a", "b"]):
            rt.log("s", s)
            for k in rt.loop("k", [5, 6]):
                rt.log("flag", k == 5)
                for z in rt.loop("z", range(2)):
                    rt.log("d", {"q": [z, e]})
                    rt.log("big", 2**40)
        rt.log("nan", float("nan"))
    rt.log("end", "done")


def _flat_floats(rt):
    for e in rt.loop("outer", range(2)):
        for i in rt.loop("inner", range(50)):
            rt.log("loss", 1.0 / (i + 1))


def _flat_ints(rt):
    for i in rt.loop("only", range(7)):
        rt.log("x", i)


def _outside_loops(rt):
    rt.log("a", 1)
    rt.log("b", True)


def _items_and_ranges(rt):
    for e in rt.loop("epoch", range(2, 4)):  # items differ from iteration numbers
        for w in rt.loop("word", ["x", "yy", "x"]):
            rt.log("w", w)
        for i in rt.loop("i", range(3)):
            rt.log("i_value", i)


@pytest.mark.parametrize("body", [_nested, _flat_floats, _flat_ints, _outside_loops, _items_and_ranges])
@pytest.mark.parametrize("task", [None, "t-1"])
def test_rows_table_matches_relation(body, task):
    rows = _rows_of(body)
    kw = dict(version="v" * 40, file="dir/train.py", task=task)
    _same_tables(rows_to_table(**kw, **rows), relation_rows_to_table(**kw, **rows))


def test_rows_table_imports_neither_pandas_nor_compute():
    code = (
        "import sys\n"
        "from flor_ray.record.loops import LoopRuntime\n"
        "from flor_ray.record.rows import rows_to_table\n"
        "from flor_ray.store.logs import table_to_parquet_bytes\n"
        "rt = LoopRuntime()\n"
        "for e in rt.loop('e', range(2)):\n"
        "    for s in rt.loop('s', ['a', 'b']):\n"
        "        rt.log('x', 1.5); rt.log('y', {'k': 1}); rt.log('z', None if False else 'q')\n"
        "table_to_parquet_bytes(rows_to_table(version='v', file='f', **rt.take_rows()))\n"
        "print([m for m in ('pandas', 'pyarrow.compute') if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=clean_env(), check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------ recording process
def test_recording_never_imports_pandas_gitpython_or_compute(repo):
    # registered before flor_ray's exit handler, so it runs after it: the whole run
    write(repo, "train.py", "import atexit, sys\n"
          "atexit.register(lambda: print([m for m in ('pandas', 'pyarrow.compute', 'git') if m in sys.modules]))\n"
          + TRAIN_SCRIPT)
    proc = run_script(repo, fork=False)  # a new process: what the recording itself imports
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    runs = json.loads(next((repo / ".flor" / "runs").glob("*.json")).read_text())
    assert runs["status"] == "finished" and len(runs["checkpoints"]) >= 1
    t = runs["timings"]
    assert len(t["checkpoint_write_cpu_s"]) == len(t["outer_s"])


# ------------------------------------------------------------------ versions
def test_snapshot_sees_an_edit_in_the_second_of_the_index(repo):
    """git trusts an index entry's stat data when the file is older than the index; a
    copy of the index with a fresh mtime would hide a same-size edit made in the
    second the index was written."""
    write(repo, "train.py", "x = 0\n")
    git(repo, "add", "train.py")
    git(repo, "commit", "-qm", "v1")
    index = repo / ".git" / "index"
    write(repo, "train.py", "x = 1\n")  # same size
    st = index.stat()
    os.utime(repo / "train.py", ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime as the index
    snap = snapshot(str(repo), "refs/flor/t")
    assert git(repo, "show", f"{snap.commit}:train.py") == "x = 1\n"
    assert git(repo, "rev-parse", "refs/flor/t") .strip() == snap.commit
    assert git(repo, "rev-parse", f"{snap.commit}^").strip() == git(repo, "rev-parse", "HEAD").strip()
    assert (repo / ".git" / "index").read_bytes() == index.read_bytes()


def test_snapshot_without_commits_and_files_listed_later(repo):
    write(repo, "a.py", "a\n")
    write(repo, "sub/b.txt", "b\n")
    snap = snapshot(str(repo), "refs/flor/u", list_files=False)
    assert snap.files == {}
    assert git(repo, "rev-list", "--count", snap.commit).strip() == "1"  # no parent: HEAD is unborn
    files = tree_files(str(repo), snap.tree)
    assert sorted(files) == ["a.py", "sub/b.txt"]
    assert snapshot(str(repo), "refs/flor/v").files == files


def test_find_repo_root_errors(tmp_path, repo):
    sub = repo / "a" / "b"
    sub.mkdir(parents=True)
    assert find_repo_root(sub / "x.py") == str(repo.resolve())
    from flor_ray.errors import RepositoryError

    with pytest.raises(RepositoryError, match="git init"):
        find_repo_root(tmp_path / "nowhere" / "x.py")
    bare = tmp_path / "bare.git"
    git(tmp_path, "init", "-q", "--bare", str(bare))
    with pytest.raises(RepositoryError, match="bare"):
        find_repo_root(bare / "x.py")


# ------------------------------------------------------------------ checkpoint period
def _session(settings: Settings) -> RecordSession:
    s = RecordSession(settings, argv=["x.py"])
    clock = getattr(s, "_import_clock", None)
    if clock is not None:  # never started: leave the interpreter's __import__ as it was
        clock.stop()
    return s


def _ended(write_cpu: float | None, capture: float = 0.001, seconds: float = 1.0, budget: float = 0.01) -> int:
    s = _session(Settings(checkpoint_budget=budget, checkpoint_max_period=16))
    s._ckpt_due = s._period_due = True  # the period, not a save of the script (own_saves), made it due
    s._checkpoint_objects = {"m": object()}
    s._pending_snap = {"iteration": 0}
    s._pending_cost = capture
    s._write_cpu_s = write_cpu
    s._submit_checkpoint = lambda snap: None
    s._flush = lambda: None
    s._outer_end(0, seconds, True)
    return s._ckpt_period


def test_checkpoint_period_counts_the_writers_cpu():
    assert _ended(None) == 1  # 0.1% of the epoch: every epoch
    assert _ended(0.0005) == 1
    assert _ended(0.05) == math.ceil(0.051 / (0.01 * 0.999))  # 5% of the epoch: every 6th
    assert _ended(5.0) == 16  # never beyond the maximum period


# ------------------------------------------------------------------ FLOR_PROFILE
def test_profile_accounting(repo, tmp_path):
    write(repo, "train.py", TRAIN_SCRIPT)
    out = tmp_path / "prof.json"
    run_script(repo, env=clean_env(FLOR_PROFILE=str(out)), fork=False)  # the costs of a new process
    p = json.loads(out.read_text())
    assert p["calls"]["log"] == 4 * 6 + 4  # loss per step, acc per epoch
    assert p["calls"]["arg"] == 2 and p["calls"]["start"] == 1 and p["calls"]["finish"] == 1
    assert p["calls"]["capture"] == p["calls"]["submit"] >= 1
    assert p["main_s"] > 0 and p["main_s"] == pytest.approx(
        sum(p["main"].get(k, 0.0) for k in ("arg", "log", "loop", "checkpointing", "commit", "finish")))
    assert set(p["start_parts"]) >= {"repo_root", "store", "snapshot"}
    assert p["writer"]["write"]["jobs"] == p["calls"]["submit"] and p["writer_cpu_s"] > 0
    # the run itself is recorded as usual
    runs = list((repo / ".flor" / "runs").glob("*.json"))
    assert len(runs) == 1 and json.loads(runs[0].read_text())["status"] == "finished"


def test_profile_off_changes_nothing():
    s = _session(Settings())
    assert type(s) is RecordSession and "log" not in vars(s) and "loop" not in vars(s)


# ------------------------------------------------------------------ the benchmark
@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("FLOR_SKIP_BENCH") == "1", reason="FLOR_SKIP_BENCH=1")
def test_bench_record_quick(tmp_path):
    """The benchmark runs end to end and its runs did the work they should; the bounds on
    recording's cost are in test_record_cost.py (ratios measured in one process) and in
    the accounting share below (flor_ray's own time over the training loop's, one process)."""
    results = tmp_path / "results"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOR_") and k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["BENCH_RESULTS_DIR"] = str(results)  # never the checkout's benchmarks/results
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "bench_record.py"), "--quick",
                           "--rounds", "1", "--workload", "2", "--repeats", "1", "--concurrent", "1",
                           "--allocator", "pinned", "--placebo"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    res = json.loads((results / "record.json").read_text())["quick"]
    o = res["overhead"]
    assert set(o["variants"]) >= {"plain", "flor"}
    fp = o["ratios"]["flor/plain"]
    assert len(fp["per_round_wall"]) == o["rounds"]
    assert o["same_final_loss"] and o["loss_rows_recorded"] == o["loss_rows_expected"]
    # flor_ray's own time by its accounting (the wall ratio of one quick round on a shared
    # machine says little). A quick run's 2 short epochs carry all of its fixed costs
    # (start, flushes with their fsync waits, checkpoints, the compaction at its end):
    # 9% alone on 2 cores, up to 59% after the rest of the suite has filled the disk's
    # queue, against 1% in the full benchmark, which holds the overhead target. This
    # bound fails a recording that costs more than the training it records.
    a = o["accounting"]
    assert a["runs"] == o["rounds"] and 0 < a["median_share_of_train_loop"] < 1.0
    f = res["flordb"]  # FlorDB ran wherever its virtualenv exists, and only there
    venv = REPO_ROOT / "benchmarks" / ".flordb-venv"
    if venv.exists():
        assert f["available"], f"FlorDB is installed in {venv} but did not run: {f['reason']}"
    else:
        assert not f["available"] and f["reason"].startswith(f"FlorDB not installed: no virtualenv at {venv}"), f
    if f["available"] and not f["errors"]:
        assert "flordb/plain" in o["ratios"] and "flor/flordb" in o["ratios"]
    assert "record overhead" in proc.stdout
    c = res["overhead_concurrent"]  # flor and plain side by side, one core each
    assert len(c["flor_plain"]) == 1 and len(c["control"]) == 1
    r = c["flor_plain"][0]
    assert r["wall"]["flor"] > 0 and r["wall"]["plain"] > 0
    assert "side by side" in proc.stdout
    # glibc's malloc thresholds pinned for every variant, and the placebo control:
    # flor_ray's footprint without its work
    assert o["allocator"] == "pinned" and "overhead_pinned" not in res
    assert o["glibc_tunables"] == "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824"
    assert set(o["variants"]) >= {"plain", "flor", "placebo"}
    for v in o["variants"].values():
        assert len(v["page_faults"]) == o["rounds"] and all(f > 1000 for f in v["page_faults"])
    assert len(o["ratios"]["placebo/plain"]["per_round_wall"]) == o["rounds"]
    assert "(pinned malloc)" in proc.stdout and "median minor page faults" in proc.stdout

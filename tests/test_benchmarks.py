"""Every benchmark script runs in --quick mode and writes its JSON, so none of them rots.

Each script runs in a subprocess, as a user would run it. FlorDB (the prior art)
is optional: the scripts use ``benchmarks/.flordb-venv`` when it exists and
otherwise record why FlorDB was not run; the FlorDB assertions below apply only
where it ran (the replay benchmark's FlorDB side only with ``BENCH_FLORDB=1``).
Each script writes the ``quick`` entry of its ``<name>.json`` into a temporary folder
(``BENCH_RESULTS_DIR``): a test run never rewrites the checkout's ``benchmarks/results``.
The quick modes take minutes: they are marked ``slow`` (``pytest -m 'not slow'`` leaves them out).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLORDB_VENV = ROOT / "benchmarks" / ".flordb-venv"


def _run(script: str, *args: str, timeout: float = 240) -> dict:
    results = Path(tempfile.mkdtemp(prefix="flor-bench-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOR_") and k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["BENCH_RESULTS_DIR"] = str(results)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    name = script[len("bench_"):-len(".py")]
    data = json.loads((results / f"{name}.json").read_text())
    assert "quick" in data
    return data["quick"]


def _flordb_ok(res: dict, skipped: bool = False) -> bool:
    """Whether FlorDB ran. It must have wherever its virtualenv exists and it was not
    skipped; otherwise the benchmark must say which of the two kept it out."""
    f = res["flordb"]
    assert set(f) >= {"available", "reason"}
    if skipped:
        assert not f["available"] and f["reason"] == "skipped (--flordb skip)", f
    elif FLORDB_VENV.exists():
        assert f["available"], f"FlorDB is installed in {FLORDB_VENV} but did not run: {f['reason']}"
    else:
        assert not f["available"] and f["reason"].startswith(f"FlorDB not installed: no virtualenv at {FLORDB_VENV}"), f
    return f["available"]


@pytest.mark.slow
def test_bench_replay_quick():
    # FlorDB's side of the replay benchmark records and replays a second history
    # (~1 minute more on 2 cores); opt in with BENCH_FLORDB=1
    with_flordb = os.environ.get("BENCH_FLORDB") == "1"
    res = _run("bench_replay.py", "--flordb", "auto" if with_flordb else "skip", timeout=420)
    assert res["mode"] == "quick"
    w = res["workloads"]["cnn"]
    s = w["summary"]
    for key in ("original_wall_s", "outer_replay_s", "outer_ratio", "inner_1_worker_s", "inner_2_workers_s",
                "speedup_2_vs_1", "estimate_err_max", "fidelity_mismatched", "failed_tasks"):
        assert key in s, key
    assert s["failed_tasks"] == 0 and s["fidelity_mismatched"] == 0
    assert w["flor_ray"]["outer"]["rows"] > 0
    # every plan is either calibrated by the store's replay history or not
    assert len(s["estimate_err_calibrated"]) + len(s["estimate_err_uncalibrated"]) == 4
    # (e) two training processes at once vs one by one on this machine
    # a ratio of wall times on 2 cores: at most 2 (plus noise); below 1 where each
    # process runs the recorded 2 intra-op threads and two of them oversubscribe the cores
    assert 0 < s["ceiling_2_vs_1"] < 2.5 and s["speedup_of_ceiling"] > 0
    if _flordb_ok(res, skipped=not with_flordb):
        assert "outer" in w["flordb"] and "wall_s" in w["flordb"]["outer"]
    else:
        assert not w["flordb"]["available"] and w["flordb"]["reason"]
    assert Path(res["png"]).exists()


@pytest.mark.slow
def test_bench_query_quick():
    res = _run("bench_query.py", "--sizes", "1e4,1e5", timeout=180)
    assert [e["rows"] for e in res["sizes"]] == [10_000, 100_000]
    for e in res["sizes"]:
        assert e["flor_ray"]["dataframe"]["rows_out"] == e["rows"]
        assert e["flor_ray"]["sql"]["rows_out"] == 10
        if _flordb_ok(res) and e["flordb"].get("ok"):
            assert e["flordb"]["dataframe"]["rows_out"] == e["rows"]
        else:
            assert e["flordb"].get("reason") or e["flordb"].get("error")
    assert Path(res["png"]).exists()


@pytest.mark.slow
def test_bench_scaling_quick():
    res = _run("bench_scaling.py", "--work", "4", "--max-w", "8", timeout=180)
    assert res["tasks"] >= 1000
    assert [r["w"] for r in res["widths"]] == [1, 2, 4, 8]
    for r in res["widths"]:
        assert r["tasks_done"] == r["tasks"] == res["tasks"] == r["unbatched"]["tasks_done"]
        assert set(r) >= {"makespan_s", "estimate_s", "ideal_s", "efficiency", "estimate_err", "occupancy"}
        assert r["unbatched"]["ray_tasks"] == r["tasks"] > r["ray_tasks"]  # the driver's batches
        assert r["slept_s"] <= r["slot_s"] + 1e-6
    assert res["widths"][-1]["makespan_s"] < res["widths"][0]["makespan_s"]
    assert Path(res["png"]).exists()


@pytest.mark.parametrize("workload", ["cnn", "lm"])
def test_workload_versions_differ_and_today_adds_statements(workload):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import workloads as wl
    finally:
        sys.path.pop(0)
    srcs = [wl.source(workload, v) for v in wl.VERSIONS]
    assert len(set(srcs)) == 3 and all("import flor_ray as flor" in s for s in srcs)
    today = wl.today(workload)
    assert f'flor.log("{wl.OUTER[workload]}"' in today and f'flor.log("{wl.INNER[workload]}"' in today
    fdb = wl.render(today, "flordb")
    assert "import flordb as flor" in fdb and "flor_ray" not in fdb
    for s in srcs + [today]:
        compile(s, f"{workload}.py", "exec")


def test_bench_record_instruction_counting():
    """The instruction-count mode's parts: valgrind's count of a real process (children
    included), and the fit that predicts the workload's count from three short runs."""
    import shutil

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_record as br

    # the fit recovers the costs that made the counts
    fixed, per_epoch, per_step = 9e9, 6e7, 1.3e8
    counts = {f"{e}x{s}": int(fixed + e * per_epoch + e * s * per_step) for e, s in br.IR_SHAPES}
    m = br.fit_instructions(counts, 8, 139)
    assert m["per_step"] == pytest.approx(per_step) and m["per_epoch"] == pytest.approx(per_epoch)
    assert m["predicted"] == pytest.approx(fixed + 8 * per_epoch + 8 * 139 * per_step)
    if shutil.which("valgrind") is None:
        pytest.skip("valgrind is not installed")
    tmp = Path(tempfile.mkdtemp(prefix="flor-ir-test-"))
    try:
        code = "echo BENCH loss=0.5; /bin/true"
        one, info = br._instructions(["/bin/sh", "-c", code], tmp, os.environ.copy(), tmp / "a")
        two, _ = br._instructions(["/bin/sh", "-c", code + "; /bin/true"], tmp, os.environ.copy(), tmp / "b")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert info == {"loss": 0.5}
    assert one > 1e5 and two > one  # the second child process is counted too

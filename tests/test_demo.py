"""The main job for a new user, end to end: `flor-ray demo DIR`, then the README's commands in DIR.

One demo run (one to two minutes on 2 cores: three recordings, a local Ray, two replays)
is shared by the module; every `flor-ray` line of the README's command-line block is
then run in its directory as a user would type it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO_ROOT, clean_env, git

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
PNG = b"\x89PNG\r\n\x1a\n"


def env() -> dict:
    e = clean_env(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    e.pop("RAY_ADDRESS", None)
    e["PATH"] = os.pathsep.join([str(BIN), e.get("PATH", "")])
    return e


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    if not (BIN / "flor-ray").exists():
        pytest.skip("the flor-ray console script is not installed next to this python (pip install -e .)")
    repo = tmp_path_factory.mktemp("demo") / "flor-ray-demo"
    t0 = time.time()
    proc = subprocess.run([str(BIN / "flor-ray"), "demo", str(repo)], env=env(), capture_output=True, text=True,
                          timeout=400, cwd=tmp_path_factory.getbasetemp())
    elapsed = time.time() - t0
    assert proc.returncode == 0, f"demo failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    (repo.parent / "demo.log").write_text(proc.stdout + "\n--- stderr\n" + proc.stderr)
    print(f"\nflor-ray demo took {elapsed:.0f}s; its output: {repo.parent / 'demo.log'}")
    return repo, proc.stdout, proc.stderr, elapsed


def test_demo_prints_plans_reports_and_the_side_by_side_table(demo):
    repo, out, err, elapsed = demo
    # three recordings, their checkpoints explained
    assert out.count("recorded in") == 3 and out.count("epoch 3: acc") == 3
    ck = re.findall(r"checkpoints after epochs ([\d, ]+|none)", out)
    assert len(ck) == 3
    every_epoch = all(c.strip() == "0, 1, 2, 3" for c in ck)
    assert every_epoch or "restore the nearest earlier checkpoint" in out  # else the fallback is explained
    # two plans with their estimates: wnorm skips training, gnorm re-executes it
    plans = re.findall(r"^ReplayPlan\[names=(\w+); runs=3;.*est\. makespan=[\d.]+s(?:; cold start=[\d.]+s)?"
                       r"(?:; \w+ x[\d.]+ from \d+ earlier tasks? at \d+/node)*\]$", out, re.M)
    assert plans == ["wnorm", "gnorm"]
    wnorm_plan = out[out.index("ReplayPlan[names=wnorm"):out.index("ReplayPlan[names=gnorm")]
    assert "restore+outer" in wnorm_plan  # skip tasks: checkpoints restored, training loop skipped
    gnorm_plan = out[out.index("ReplayPlan[names=gnorm"):]
    assert "re-execute" in gnorm_plan
    reports = re.findall(r"^replay: (\d+) done, (\d+) failed", out, re.M)
    assert len(reports) == 2 and all(f == "0" for _, f in reports)
    assert re.search(r"fidelity: \d+ recorded values recomputed, 0 mismatched", out)
    # the merged table: one row per run and epoch, recorded and hindsight columns side by side
    head = next(ln for ln in out.splitlines() if ln.split()[:2] == ["run_id", "version"] and "wnorm" in ln)
    cols = head.split()
    for c in ("lr", "epoch", "loss_mean", "acc", "wnorm", "gnorm_mean"):
        assert c in cols
    rows = [ln.split() for ln in out.splitlines() if re.match(r"^\d{8}T\d{6}-\w{6} [0-9a-f]{8} ", ln)]
    rows = [r for r in rows if len(r) == len(cols)]
    assert len(rows) == 12 and all(r[cols.index("wnorm")] != "NaN" and r[cols.index("gnorm_mean")] != "NaN"
                                   for r in rows)
    assert re.search(r"^done in \d+s: all tasks done; 0 fidelity mismatches\.", out, re.M)
    assert "Traceback" not in out + err
    assert elapsed < 400


def test_demo_leaves_a_usable_repository_and_plots(demo):
    repo, out, _, _ = demo
    for name in ("wnorm.png", "gnorm.png"):
        assert (repo / name).read_bytes()[:8] == PNG
    # the user's history is three plain commits; the runs' snapshots live on hidden refs
    assert git(repo, "log", "--format=%s").splitlines() == [
        "v3: learning-rate scheduler added", "v2: net renamed model, train step extracted", "v1: first version"]
    assert len(git(repo, "for-each-ref", "refs/flor").splitlines()) == 3
    assert git(repo, "status", "--porcelain").strip() == "M train.py"  # today's edit, uncommitted
    today = (repo / "train.py").read_text()
    assert 'flor.log("wnorm"' in today and 'flor.log("gnorm"' in today

    import flor_ray

    store = str(repo / ".flor")
    df = flor_ray.dataframe("acc", "wnorm", store=store)
    assert len(df[["run_id", "epoch"]].drop_duplicates()) == 12 and df["wnorm"].notna().all()
    assert (df["acc"] == df["acc__replay"]).all()  # the replay recomputed the recorded acc exactly
    steps = flor_ray.dataframe("gnorm", store=store)
    assert len(steps[["run_id", "epoch", "step"]].drop_duplicates()) == 3 * 4 * 256 and steps["gnorm"].notna().all()


def test_df_shows_each_run_and_epoch_once(demo):
    """`flor-ray df acc wnorm` in the demo: acc was recomputed by both replays (wnorm's and gnorm's tasks);
    the frame still has one row per (run, epoch)."""
    import flor_ray

    df = flor_ray.dataframe("acc", "wnorm", store=str(demo[0] / ".flor"))
    dup = df[df.duplicated(["run_id", "epoch"], keep=False)]
    assert dup.empty, f"flor_ray.dataframe repeats {len(dup)} rows (relation.dataframe dedup of replay rows):\n{dup}"


def _readme_cli_block() -> list[str]:
    text = (REPO_ROOT / "README.md").read_text()
    section = text[text.index("## Command line"):]
    block = section[section.index("```bash") + 7:]
    block = block[:block.index("```")]
    return [ln.split("  #")[0].strip() for ln in block.strip().splitlines() if ln.strip()]


def run_line(repo: Path, line: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", f"set -eo pipefail; {line}"], cwd=repo, env=env(), capture_output=True,
                          text=True, timeout=300)


def test_every_readme_cli_command_works_in_the_demo_repository(demo):
    repo = demo[0]
    lines = _readme_cli_block()
    assert lines[0].startswith("flor-ray demo ")  # the block starts with the demo this module ran
    commands = lines[1:]
    assert {c.split()[1] for c in commands if c.startswith("flor-ray")} >= {
        "runs", "df", "sql", "replay", "plot", "propagate"}
    outputs = {}
    for line in commands:
        proc = run_line(repo, line)
        assert proc.returncode == 0, f"README command failed: {line}\n{proc.stdout}\n{proc.stderr}"
        assert "Traceback" not in proc.stderr, line
        outputs[line] = proc.stdout
    assert outputs["flor-ray runs"].count("finished") == 3
    df_line = next(c for c in commands if c.startswith("flor-ray df acc"))
    assert "acc__replay" in outputs[df_line] and "wnorm" in outputs[df_line]
    csv_line = next(c for c in commands if "--format csv" in c)
    assert outputs[csv_line].splitlines()[0].startswith("run_id,")
    assert len(outputs[csv_line].splitlines()) == 1 + 2  # the two runs with lr = 0.1
    sql_line = next(c for c in commands if c.startswith("flor-ray sql"))
    assert "best" in outputs[sql_line] and len(outputs[sql_line].splitlines()) == 4
    dry = next(c for c in commands if "--dry-run" in c)
    assert "(0 to run)" in outputs[dry]  # the demo already back-filled gnorm
    rerun = next(c for c in commands if c.startswith("flor-ray replay") and "--dry-run" not in c)
    assert re.search(r"replay: 0 done, 0 failed, \d+ skipped", outputs[rerun])  # done tasks are not redone
    import pandas as pd

    steps = pd.read_parquet(repo / "steps.parquet")
    assert set(steps["lr"]) == {0.1} and steps["gnorm"].notna().all()
    assert (repo / "wnorm_by_version.png").read_bytes()[:8] == PNG
    patched = (repo / "v1_patched.py").read_text()
    assert 'flor.log("wnorm", net[0].weight.norm().item())' in patched  # renamed model -> net for v1


def test_readme_config_example_records_a_run(demo):
    """The README's FLOR_CONFIG example, with the repository's configs/local.yaml."""
    repo = demo[0]
    text = (REPO_ROOT / "README.md").read_text()
    line = next(ln for ln in text[text.index("## Configuration"):].splitlines() if ln.startswith("FLOR_CONFIG="))
    line = line.split("  #")[0].replace("configs/local.yaml", str(REPO_ROOT / "configs" / "local.yaml"))
    proc = run_line(repo, line)
    assert proc.returncode == 0, proc.stderr
    runs = json.loads(run_line(repo, "flor-ray runs --format json").stdout)
    assert len(runs) == 4 and runs[-1]["status"] == "finished"


def test_demo_refuses_a_foreign_non_empty_directory(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    proc = subprocess.run([sys.executable, "-m", "flor_ray.cli", "demo", str(tmp_path)], env=env(),
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "exists and is not empty" in proc.stderr
    assert (tmp_path / "mine.txt").read_text() == "keep me"
    assert shutil.which("git")

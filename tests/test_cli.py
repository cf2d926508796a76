"""The flor-ray command line on a real recorded store."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import SHARED, clean_env, git, run_script, write

SCRIPT = """
import flor_ray as flor
k = flor.arg("k", 2)
for epoch in flor.loop("epoch", range(3)):
    for step in flor.loop("step", range(2)):
        flor.log("x", epoch * 10 + step * k)
    flor.log("y", epoch + 0.5)
"""


def cli(repo, *args, check=True):
    proc = subprocess.run([sys.executable, "-m", "flor_ray.cli", *args], cwd=repo, env=clean_env(),
                          capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr)
    return proc


@pytest.fixture
def recorded(repo):
    write(repo, "train.py", SCRIPT)
    run_script(repo)
    run_script(repo, "train.py", "--kwargs", "k=5")
    return repo


def test_runs_df_sql(recorded):
    runs = json.loads(cli(recorded, "runs", "--format", "json").stdout)
    assert [r["k"] for r in runs] == [2, 5] and all(r["status"] == "finished" for r in runs)
    rows = json.loads(cli(recorded, "df", "x", "--where", "k = 5", "--format", "json").stdout)
    assert [r["x"] for r in rows] == [0, 5, 10, 15, 20, 25]
    out = cli(recorded, "sql", "SELECT name, sum(value) AS s FROM logs GROUP BY name ORDER BY name", "--format", "csv").stdout
    assert out.splitlines()[0] == "name,s" and out.splitlines()[2] == "y,9.0"
    assert out.splitlines()[1] == "x," + repr(float(sum(e * 10 + s * k for k in (2, 5) for e in range(3) for s in range(2))))


def test_replay_dry_run_prints_plan(recorded):
    write(recorded, "train.py", SCRIPT.replace('flor.log("y", epoch + 0.5)', 'flor.log("y", epoch + 0.5)\n    flor.log("z", epoch * 2)'))
    out = cli(recorded, "replay", "z", "--dry-run").stdout
    assert out.startswith("ReplayPlan[names=z; runs=2;")
    assert "Need[z -> outer:" in out and out.count("Task[") >= 2


@pytest.mark.parametrize(
    "args, message",
    [
        (("df", "nosuchname"), "no values logged under 'nosuchname'"),
        (("df", "x", "--where", "nosuchcol > 1"), "invalid where predicate"),
        (("sql", "SELECT * FROM nosuchtable"), "SQL failed"),
        (("replay", "nosuchname", "--dry-run"), "not logged by today's script"),
        (("runs", "--store", "/nonexistent/store"), "no flor_ray store"),
        (("replay", "x", "--iterations", "a:b", "--dry-run"), "not understood"),
    ],
)
def test_misuse_is_one_clear_line(recorded, args, message):
    proc = cli(recorded, *args, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_propagate_command(tmp_path):
    case = SHARED / "cases" / "propagation" / "01_basic_step_loss"
    if not case.exists():
        pytest.skip("shared cases not present")
    out = tmp_path / "patched.py"
    proc = subprocess.run([sys.executable, "-m", "flor_ray.cli", "propagate", str(case / "source.py"), str(case / "target.py"),
                           "-o", str(out)], env=clean_env(), capture_output=True, text=True, check=True)
    import ast

    assert ast.dump(ast.parse(out.read_text())) == ast.dump(ast.parse((case / "expected.py").read_text()))
    assert "loss" in proc.stderr

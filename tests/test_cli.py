"""The flor-ray command line on a real recorded store."""

from __future__ import annotations

import json
import shutil
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


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """Two runs, recorded once for the tests below that only read them (and write new files)."""
    repo = tmp_path_factory.mktemp("cli") / "proj"
    repo.mkdir()
    git(repo, "init", "-q")
    git(repo, "config", "user.email", "dev@example.com")
    git(repo, "config", "user.name", "Dev")
    write(repo, "train.py", SCRIPT)
    run_script(repo)
    run_script(repo, "train.py", "--kwargs", "k=5")
    return repo


@pytest.fixture
def recorded(shared, tmp_path):
    """The two runs' repository and store, copied, for a test that edits the script."""
    copy = tmp_path / "proj"
    shutil.copytree(shared, copy, symlinks=True)
    return copy


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
def test_misuse_is_one_clear_line(shared, args, message):
    proc = cli(shared, *args, check=False)
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


# ------------------------------------------------------------- new-user paths
COMMANDS = ["runs", "df", "sql", "replay", "propagate", "plot", "demo"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(tmp_path, command):
    proc = cli(tmp_path, command, "--help")
    assert proc.stdout.startswith(f"usage: flor-ray {command}") and "example:\n  flor-ray " + command in proc.stdout


def test_top_level_help_lists_every_command(tmp_path):
    out = cli(tmp_path, "--help").stdout
    for command in COMMANDS:
        assert f"\n    {command} " in out
    assert "--config FILE" in out and "examples" in out
    assert cli(tmp_path, "--version").stdout.startswith("flor-ray ")
    assert cli(tmp_path, check=False).returncode == 2  # no command: usage, not a traceback


def test_plot_by_run_and_by_version(shared):
    out = cli(shared, "plot", "x", "-o", "x.png").stdout
    assert out.strip() == "wrote x.png" and (shared / "x.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cli(shared, "plot", "y", "--by", "version")
    assert (shared / "y.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # default name: NAME.png
    cli(shared, "plot", "x", "--x", "step", "--where", "k = 5", "-o", "steps.png")
    assert (shared / "steps.png").stat().st_size > 1000


def test_output_file_takes_its_format_from_the_extension(shared):
    import pandas as pd

    proc = cli(shared, "df", "x", "-o", "x.parquet")
    assert "wrote 12 rows to x.parquet" in proc.stderr and proc.stdout == ""
    assert list(pd.read_parquet(shared / "x.parquet")["x"])[:3] == [0, 2, 10]
    cli(shared, "sql", "SELECT count(*) AS n FROM logs", "-o", "n.csv")
    assert (shared / "n.csv").read_text().splitlines() == ["n", "18"]
    table = cli(shared, "runs").stdout.splitlines()
    assert table[0].split()[:4] == ["run_id", "script", "version", "status"]
    assert len(table[1].split()[2]) == 8  # version ids cut for the terminal; full in csv/json
    assert len(json.loads(cli(shared, "runs", "--format", "json").stdout)[0]["version"]) == 40


def test_broken_pipe_is_not_an_error(shared):
    proc = subprocess.run(f"{sys.executable} -m flor_ray.cli df x --format csv | head -1", shell=True, cwd=shared,
                          env=clean_env(), capture_output=True, text=True)
    assert proc.stdout.startswith("run_id,") and "Traceback" not in proc.stderr and "Broken" not in proc.stderr


@pytest.mark.parametrize("where", ["before", "after"])
def test_verbose_before_or_after_the_command_shows_the_traceback(shared, where):
    args = ["--verbose", "df", "nosuchname"] if where == "before" else ["df", "nosuchname", "--verbose"]
    proc = cli(shared, *args, check=False)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "QueryError" in proc.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (("runs", "--bogus"), "flor-ray runs: error: unrecognized arguments: --bogus"),
        (("plot", "x", "--by", "epoch"), "invalid choice: 'epoch'"),
        (("df",), "the following arguments are required: NAME"),
        (("runs", "--format", "xml"), "invalid choice: 'xml'"),
        (("nosuchcommand",), "invalid choice: 'nosuchcommand'"),
    ],
)
def test_bad_flags_show_the_commands_usage(shared, args, message):
    proc = cli(shared, *args, check=False)
    assert proc.returncode == 2 and message in proc.stderr and "usage: flor-ray" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (("plot", "nosuchname"), "no values logged under 'nosuchname'"),
        (("plot", "x", "--x", "batch"), "no column 'batch' for the x axis"),
        (("propagate", "nosuch.py", "train.py"), "No such file or directory: 'nosuch.py'"),
        (("replay", "x", "--where", "k > 100", "--dry-run"), "no run matches"),
        (("--config", "nosuch.yaml", "runs"), "config file 'nosuch.yaml'"),
    ],
)
def test_more_misuse_is_one_clear_line(shared, args, message):
    proc = cli(shared, *args, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("flor-ray ") and "--verbose" in lines[1]


def test_no_store_outside_a_repository(tmp_path):
    for args in (("runs",), ("df", "x"), ("sql", "SELECT 1"), ("replay", "x", "--dry-run"), ("plot", "x")):
        proc = cli(tmp_path, *args, check=False)
        assert proc.returncode == 2, args
        assert "not inside a git repository" in proc.stderr and "--store" in proc.stderr, args


def test_no_store_yet_in_a_repository(repo):
    proc = cli(repo, "runs", check=False)
    assert proc.returncode == 2 and "no flor_ray store at" in proc.stderr and "record a run first" in proc.stderr


def test_store_option_and_env(shared, tmp_path):
    store = str(shared / ".flor")
    out = json.loads(cli(tmp_path, "runs", "--store", store, "--format", "json").stdout)
    assert len(out) == 2
    proc = subprocess.run([sys.executable, "-m", "flor_ray.cli", "df", "y", "--format", "csv"], cwd=tmp_path,
                          env=clean_env(FLOR_STORE=store), capture_output=True, text=True, check=True)
    assert proc.stdout.splitlines()[0].startswith("run_id,") and len(proc.stdout.splitlines()) == 7

"""Damage stays local: a damaged or foreign file of the store affects only its run.

Each test damages a private copy of one recorded store (three runs of a small
script), then checks that runs, queries and replay planning still serve the other
runs, that the damage is reported once naming the file, and that ``flor-ray check``
lists it and ``--repair`` moves it to the store's quarantine folder.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import flor_ray
from flor_ray.errors import DamagedFileWarning
from flor_ray.planning.plan import ClusterSnapshot
from flor_ray.store import Store

from conftest import clean_env, git, run_script, write

EPOCHS = 3
KS = (1, 2, 3)
#: damage is per file: the runs keep one record part per epoch (no compaction)
KEEP_PARTS = {"FLOR_COMPACT_AFTER": "0", "FLOR_FLUSH_INTERVAL": "0"}  # a part per epoch, kept

SCRIPT = '''
import argparse

import flor_ray as flor


def step_value(k, epoch, step):
    return k * (epoch + 1) + step


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=2)
    opts = p.parse_args()
    k = flor.arg("k", 1)
    total = 0
    for epoch in flor.loop("epoch", range({epochs})):
        for step in flor.loop("step", range(opts.steps)):
            total += step_value(k, epoch, step)
        flor.log("total", total)


if __name__ == "__main__":
    main()
'''.replace("{epochs}", str(EPOCHS))


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("damage") / "proj"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    write(repo, "train.py", SCRIPT)
    for k in KS:
        run_script(repo, "train.py", "--kwargs", f"k={k}", env=clean_env(**KEEP_PARTS))
    return repo


@pytest.fixture
def proj(recorded, tmp_path) -> Path:
    dst = tmp_path / "proj"
    shutil.copytree(recorded, dst, symlinks=True)
    write(dst, "train.py", SCRIPT.replace('flor.log("total", total)',
                                          'flor.log("total", total)\n        flor.log("twice", 2 * total)'))
    return dst


def st_of(repo: Path) -> Store:
    return Store(str(repo / ".flor"))


def run_ids(st: Store) -> dict[int, str]:
    runs = flor_ray.runs(store=st)
    return dict(zip(runs["k"], runs["run_id"]))


def cli(repo: Path, *args: str):
    return subprocess.run([sys.executable, "-m", "flor_ray.cli", *args], cwd=repo, env=clean_env(**KEEP_PARTS),
                          capture_output=True, text=True)


def _healthy_reads(repo: Path, st: Store, ks) -> None:
    """runs, dataframe, sql and replay planning serve exactly the runs of ``ks``."""
    assert sorted(flor_ray.runs(store=st)["k"]) == sorted(ks)
    df = flor_ray.dataframe("total", store=st)
    assert sorted(set(df["k"])) == sorted(ks) and len(df) == EPOCHS * len(ks)
    assert flor_ray.sql("SELECT 1 AS one", store=st)["one"][0] == 1
    n = flor_ray.sql("SELECT count(DISTINCT run_id) AS n FROM logs", store=st)["n"][0]
    assert n == len(ks)
    plan = flor_ray.plan_replay(["twice"], store=st, script=repo / "train.py", cluster=ClusterSnapshot(2.0))
    assert {t.run_id for t in plan.tasks} == set(run_ids(st).values())


def _damage_run_file(st: Store, rid: str, content: bytes) -> Path:
    p = Path(st.root) / "runs" / f"{rid}.json"
    p.write_bytes(content)
    return p


@pytest.mark.parametrize("content", [
    pytest.param(lambda meta: json.dumps({k: v for k, v in meta.items() if k != "run_id"}), id="no-run-id"),
    pytest.param(lambda meta: "[]", id="a-list"),
    pytest.param(lambda meta: json.dumps({**meta, "run_id": "../../../escape"}), id="id-escapes-the-store"),
    pytest.param(lambda meta: json.dumps(meta)[:40], id="truncated-json"),
    pytest.param(lambda meta: json.dumps({**meta, "args": [1]}), id="foreign-field-types"),
])
def test_damaged_run_file_leaves_out_only_its_run(proj, content):
    st = st_of(proj)
    ids = run_ids(st)
    meta = st.read_json(f"runs/{ids[2]}.json")
    bad = _damage_run_file(st, ids[2], content(meta).encode())
    with pytest.warns(DamagedFileWarning) as got:
        _healthy_reads(proj, st, (1, 3))
    assert len([w for w in got if bad.name in str(w.message)]) == 1  # reported once, naming the file
    proc = cli(proj, "runs")
    assert proc.returncode == 0 and ids[1] in proc.stdout and ids[2] not in proc.stdout
    assert f"warning: {bad}" in proc.stderr and "Traceback" not in proc.stderr


def test_zeroed_parquet_part_leaves_out_only_its_rows(proj):
    st = st_of(proj)
    ids = run_ids(st)
    part = Path(st.root) / f"logs/run_id={ids[3]}/source=record/part-00001.parquet"
    part.write_bytes(b"\0" * part.stat().st_size)
    with pytest.warns(DamagedFileWarning, match=part.name):
        assert flor_ray.sql("SELECT 1 AS one", store=st)["one"][0] == 1
    df = flor_ray.dataframe("total", store=st)
    assert sorted(df.loc[df["k"] == 3, "epoch"]) == [0, 2] and len(df) == 3 * EPOCHS - 1
    proc = cli(proj, "sql", "SELECT count(*) AS n FROM logs")
    assert proc.returncode == 0 and str(3 * EPOCHS - 1) in proc.stdout
    assert proc.stderr.count(part.name) == 1


def test_deleted_run_file_hides_its_rows_and_check_reports_them(proj):
    st = st_of(proj)
    ids = run_ids(st)
    (Path(st.root) / "runs" / f"{ids[1]}.json").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DamagedFileWarning)
        _healthy_reads(proj, st, (2, 3))
    proc = cli(proj, "check")
    assert proc.returncode == 1
    assert f"logs/run_id={ids[1]}" in proc.stdout


def test_check_lists_damage_and_repair_quarantines_it(proj):
    st = st_of(proj)
    ids = run_ids(st)
    clean = cli(proj, "check")
    assert clean.returncode == 0 and "no damaged files" in clean.stdout
    bad_run = _damage_run_file(st, ids[1], b"[]")
    part = Path(st.root) / f"logs/run_id={ids[2]}/source=record/part-00000.parquet"
    part.write_bytes(part.read_bytes()[:10])
    before = {p.relative_to(st.root) for p in Path(st.root).rglob("*") if p.is_file()}
    proc = cli(proj, "check")
    assert proc.returncode == 1, proc.stderr
    assert f"runs/{bad_run.name}" in proc.stdout and part.name in proc.stdout
    assert f"logs/run_id={ids[1]}" in proc.stdout  # rows of the run whose file is damaged
    assert "--repair" in proc.stdout
    proc = cli(proj, "check", "--repair")
    assert proc.returncode == 0, proc.stderr
    after = {p.relative_to(st.root) for p in Path(st.root).rglob("*") if p.is_file()}
    quarantined = {Path(*p.parts[2:]) for p in after if p.parts[0] == "quarantine"}
    assert quarantined and before == (after - {p for p in after if p.parts[0] == "quarantine"}) | quarantined
    assert Path(f"runs/{bad_run.name}") in quarantined and Path(part.relative_to(st.root)) in quarantined
    again = cli(proj, "check")
    assert again.returncode == 0 and "no damaged files" in again.stdout
    with warnings.catch_warnings():
        warnings.simplefilter("error", DamagedFileWarning)  # nothing left to warn about
        df = flor_ray.dataframe("total", store=st)
    assert sorted(set(df["k"])) == [2, 3]

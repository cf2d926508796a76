"""The slim manifest: sealed runs' per-epoch timings and logged names kept apart for the
planner (``manifest-plan.json``), segment footers naming what each origin logged, and a
plan that reads neither rows nor pyarrow where those facts stand, while stores written
as the code before wrote them (manifest format 1, segments without names, a crashed
run's loose parts) plan exactly as they did."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import flor_ray
from flor_ray.planning.cost import iter_cost, span_cost
from flor_ray.planning.plan import RunInfo
from flor_ray.planning.planner import _logged_per_run
from flor_ray.store import Store, layout
from flor_ray.store.consolidation import consolidate
from flor_ray.store.logs import read_logs
from flor_ray.store.manifest import (TIMINGS_ASIDE, read_manifest, read_plan_facts, seal_many)
from flor_ray.store.runs import load_runs, timings_left_out, with_timings
from flor_ray.store.segments import SEGMENT_KEY, _local_footer_value, segment_origins, stable_segments

from conftest import clean_env, git, init_repo, write

EPOCHS = 4

TRAIN = '''
import argparse
import os
import signal

import torch
from torch.utils.data import DataLoader, TensorDataset

import flor_ray as flor


def make_data(n):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return TensorDataset(x, x @ torch.tensor([1.0, -2.0, 0.5, 3.0]))


def evaluate(model, loader):
    with torch.no_grad():
        return sum(float(torch.nn.functional.mse_loss(model(x).squeeze(1), y)) for x, y in loader)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=EPOCHS)
    p.add_argument("--crash-at", type=int, default=-1)
    opts = p.parse_args()
    torch.manual_seed(0)
    lr = flor.arg("lr", 0.05)
    loader = DataLoader(make_data(32), batch_size=8, shuffle=True)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for epoch in flor.loop("epoch", range(opts.epochs)):
        if epoch == opts.crash_at:
            os.kill(os.getpid(), signal.SIGKILL)
        for x, y in flor.loop("step", loader):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x).squeeze(1), y)
            loss.backward()
            opt.step()
            flor.log("loss", loss.item())
        sched.step()
        flor.log("acc", evaluate(model, loader))
        EXTRA


if __name__ == "__main__":
    main()
'''.replace("EPOCHS", str(EPOCHS))

V1 = TRAIN.replace("        EXTRA\n", "")
V2 = TRAIN.replace("EXTRA", 'flor.log("wnorm", float(model.weight.norm()))')
TODAY = V2.replace("            flor.log(\"loss\", loss.item())\n",
                   "            flor.log(\"loss\", loss.item())\n"
                   "            flor.log(\"gnorm\", float(model.weight.grad.norm()))\n")


def _record(repo: Path, *args: str, check: bool = True) -> None:
    env = clean_env(FLOR_FLUSH_INTERVAL="0")  # a part per epoch: the run is compacted and sealed at its end
    proc = subprocess.run([sys.executable, "train.py", *args], cwd=repo, env=env, capture_output=True, text=True)
    assert not check or proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def history(tmp_path_factory) -> Path:
    """Two runs of v1 (loss, acc), one of v2 (and wnorm), then a v2 run killed in its
    third epoch (its loose parts, no manifest entry); today's script adds gnorm."""
    repo = tmp_path_factory.mktemp("slim") / "proj"
    repo.mkdir()
    init_repo(repo)
    write(repo, "train.py", V1)
    git(repo, "add", "train.py")
    git(repo, "commit", "-qm", "v1")
    _record(repo, "--kwargs", "lr=0.05")
    _record(repo, "--kwargs", "lr=0.1")
    write(repo, "train.py", V2)
    git(repo, "commit", "-qam", "v2")
    _record(repo, "--kwargs", "lr=0.2")
    _record(repo, "--kwargs", "lr=0.3", "--crash-at", "2", check=False)
    write(repo, "today.py", TODAY)
    return repo


def _copy(repo: Path, dest: Path) -> tuple[Path, Store]:
    """A copy of the repository and its store, whose sealed runs are sealed again (the
    copy's files have other stamps: the manifest would stand for none of them)."""
    shutil.copytree(repo, dest, symlinks=True)
    st = Store(str(dest / ".flor"))
    sealed = json.loads(st.read_bytes(layout.MANIFEST))["runs"]
    assert seal_many(st, {rid: st.read_json(layout.run_meta(rid)) for rid in sealed}) == list(sealed)
    return dest, st


def _as_main_wrote_it(st: Store) -> None:
    """Rewrite the manifest and segments as the code before the plan facts wrote them:
    manifest format 1 with each run's timings inside, no plan facts, footers without names."""
    facts = read_plan_facts(st)
    doc = json.loads(st.read_bytes(layout.MANIFEST))
    for rid, e in doc["runs"].items():
        del e["meta"][TIMINGS_ASIDE]
        e["meta"]["timings"] = dict(facts[rid].timings)
    doc["format"] = 1
    st.write_bytes(layout.MANIFEST, json.dumps(doc, separators=(",", ":")).encode())
    Path(st.path(layout.PLAN_FACTS)).unlink()
    for seg in stable_segments(st):
        path = st.path(seg.path)
        pf = pq.ParquetFile(path)
        meta = dict(pf.schema_arrow.metadata)
        footer = json.loads(meta[SEGMENT_KEY])
        del footer["names"]
        meta[SEGMENT_KEY] = json.dumps(footer, separators=(",", ":")).encode()
        tables = [pf.read_row_group(g).replace_schema_metadata(meta) for g in range(pf.num_row_groups)]
        with pq.ParquetWriter(path + ".tmp", pf.schema_arrow.with_metadata(meta)) as w:
            for t in tables:
                w.write_table(t)
        Path(path + ".tmp").replace(path)


def _plan(repo: Path, st: Store, names="gnorm"):
    plan = flor_ray.plan_replay(names, store=st, script=str(repo / "today.py"), resources={"num_gpus": 0})
    text = plan.explain().replace(str(repo), "<repo>")
    return text, [(t.key, t.run_id, t.estimate_s, t.names, t.mode, t.start, t.stop) for t in plan.tasks]


def _names_from_rows(st: Store, run_ids) -> dict[str, frozenset[str]]:
    t = read_logs(st, None, run_ids, sources=("record",), columns=["run_id", "name"])
    out: dict[str, set[str]] = {r: set() for r in run_ids}
    for rid, name in zip(t.column("run_id").to_pylist(), t.column("name").to_pylist()):
        out[rid].add(name)
    return {k: frozenset(v) for k, v in out.items()}


def _run_files(st: Store) -> dict[str, dict]:
    return {m["run_id"]: st.read_json(layout.run_meta(m["run_id"])) for m in load_runs(st)}


def test_the_manifest_leaves_the_timings_out_and_nothing_takes_it_for_none(history, tmp_path):
    repo, st = _copy(history, tmp_path / "p")
    doc = json.loads(st.read_bytes(layout.MANIFEST))
    assert doc["format"] == 2 and len(doc["runs"]) == 3  # the crashed run is not sealed
    assert all("timings" not in e["meta"] and TIMINGS_ASIDE in e["meta"] for e in doc["runs"].values())
    metas = load_runs(st)
    slim = [m for m in metas if timings_left_out(m)]
    assert len(slim) == 3 and len(metas) == 4
    with pytest.raises(ValueError, match="with_timings"):
        RunInfo.from_meta(slim[0])
    from flor_ray.demo import _checkpoint_note

    with pytest.raises(ValueError, match="with_timings"):
        _checkpoint_note(slim[0], 0.01)
    files = _run_files(st)
    full = with_timings(st, metas)
    assert [m["run_id"] for m in full] == [m["run_id"] for m in metas]
    for m in full:
        want = dict(files[m["run_id"]])
        if m["status"] == "incomplete":  # the crashed run, as liveness shows it
            want["status"] = "incomplete"
        assert m == want and len(m["timings"]["outer_s"]) == m["iterations"] > 0
        assert _checkpoint_note(m, 0.01).startswith(f"{m['iterations']} epochs of ")


def test_lost_plan_facts_are_read_from_the_run_files(history, tmp_path):
    repo, st = _copy(history, tmp_path / "p")
    before = _plan(repo, st)
    Path(st.path(layout.PLAN_FACTS)).write_text("{not json")  # lost to a crash, or damaged
    assert read_plan_facts(st) == {}
    files = _run_files(st)
    assert {m["run_id"]: m["timings"] for m in with_timings(st, load_runs(st))} == \
        {rid: f["timings"] for rid, f in files.items()}
    assert _plan(repo, st) == before


def test_a_store_written_as_before_plans_identically(history, tmp_path):
    repo, st = _copy(history, tmp_path / "slim")
    consolidate(st, merge_all=True, replay_grace_s=0)
    old_repo, old = _copy(repo, tmp_path / "old")
    _as_main_wrote_it(old)
    assert json.loads(old.read_bytes(layout.MANIFEST))["format"] == 1 and read_plan_facts(old) == {}
    assert all(o.names is None for s in stable_segments(old) for o in segment_origins(old, s))
    assert not any(timings_left_out(m) for m in load_runs(old))  # format 1: timings inside
    for names in ("gnorm", None):  # None: today's names some run lacks (wnorm for v1's runs, gnorm)
        mine, before = _plan(repo, st, names), _plan(old_repo, old, names)
        assert mine == before
    ids = [m["run_id"] for m in load_runs(st)]
    assert _logged_per_run(st, ids, read_plan_facts(st)) == _logged_per_run(old, ids, {}) == _names_from_rows(st, ids)


def test_sealing_into_a_manifest_of_format_1_keeps_its_runs(history, tmp_path):
    repo, st = _copy(history, tmp_path / "p")
    _as_main_wrote_it(st)
    files = _run_files(st)
    first = sorted(files)[0]
    assert seal_many(st, {first: files[first]}) == [first]
    doc = json.loads(st.read_bytes(layout.MANIFEST))
    assert doc["format"] == 2 and len(doc["runs"]) == 3
    facts = read_plan_facts(st)
    assert facts[first].names == frozenset({"loss", "acc"})
    assert {m["run_id"]: m for m in with_timings(st, load_runs(st)) if m["status"] != "incomplete"} == \
        {rid: f for rid, f in files.items() if f["status"] != "running"}
    assert len(read_manifest(st)) == 3


def test_names_come_from_the_facts_and_footers_without_reading_rows(history, tmp_path):
    repo, st = _copy(history, tmp_path / "p")
    metas = load_runs(st)
    crashed = next(m["run_id"] for m in metas if m["status"] == "incomplete")
    ids = [m["run_id"] for m in metas]
    facts = read_plan_facts(st)
    assert set(facts) == set(ids) - {crashed}
    rows = _names_from_rows(st, ids)
    assert {rid: f.names for rid, f in facts.items()} == {rid: rows[rid] for rid in facts}
    assert rows[crashed] == frozenset({"loss", "acc", "wnorm"})
    assert _logged_per_run(st, ids, facts) == rows  # the crashed run's from its rows
    consolidate(st, merge_all=True, replay_grace_s=0)
    (seg,) = stable_segments(st)
    assert _local_footer_value(st.path(seg.path)) == pq.read_metadata(st.path(seg.path)).metadata[SEGMENT_KEY]
    held = {o.run_id: frozenset(o.names) for o in segment_origins(st, seg)}
    assert held == {rid: rows[rid] for rid in held} and crashed not in held
    assert _logged_per_run(st, ids, {}) == rows  # from the footers alone
    # without the crashed run, a plan of sealed runs neither reads rows nor imports pyarrow
    shutil.rmtree(st.path(layout.log_folder(crashed, "record")).rsplit("/", 1)[0])
    Path(st.path(layout.run_meta(crashed))).unlink()
    code = ("import sys, flor_ray\n"
            f"p = flor_ray.plan_replay('gnorm', store={st.url!r}, script={str(repo / 'today.py')!r}, "
            "resources={'num_gpus': 0})\n"
            "print(len(p.tasks), sorted(m for m in ('pyarrow', 'pandas', 'fsspec') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=repo, env=clean_env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "3" and out.stdout.strip().endswith("[]"), out.stdout


def test_a_part_added_after_sealing_is_read_for_its_names(history, tmp_path):
    """Facts taken from other record files than a run now has (a spooled part uploaded
    later) are not used: the run's rows are read."""
    repo, st = _copy(history, tmp_path / "p")
    metas = load_runs(st)
    rid = next(m["run_id"] for m in metas if m["status"] == "finished")
    folder = st.path(layout.log_folder(rid, "record"))
    (compacted,) = sorted(Path(folder).iterdir())
    t = pq.read_table(compacted)
    late = pa.array(["late"] * t.num_rows).cast(t.schema.field("name").type)
    last = layout.part_flushes(f"{layout.log_folder(rid, 'record')}/{compacted.name}")[1]
    pq.write_table(t.set_column(t.schema.get_field_index("name"), "name", late),
                   Path(folder) / Path(layout.record_part(rid, last + 1)).name)
    ids = [m["run_id"] for m in metas]
    got = _logged_per_run(st, ids, read_plan_facts(st))
    assert got == _names_from_rows(st, ids) and "late" in got[rid]


def test_span_costs_are_the_sums_of_iteration_costs(history):
    st = Store(str(history / ".flor"))
    for run in (RunInfo.from_meta(m) for m in with_timings(st, load_runs(st))):
        n = len(run.outer_s)
        assert n > 0
        for skip in (False, True):
            for a in range(n + 2):
                for b in range(a, n + 3):  # past the recorded iterations: their mean
                    assert span_cost(run, a, b, skip) == sum(iter_cost(run, i, skip) for i in range(a, b))
            mean = sum(iter_cost(run, i, skip) for i in range(n)) / n
            assert iter_cost(run, n + 1, skip) == mean
        t = run.outer_s[0] - (run.checkpoint_s[0] if run.checkpoint_s else 0.0)
        assert iter_cost(run, 0, False) == max(t, 0.0)
        assert iter_cost(run, 0, True) == max(t - (run.inner_s[0] if run.inner_s else 0.0), 0.0)


@pytest.mark.parametrize("index_type", ["int8", "int16", "int32", "int64"])
def test_distinct_names_of_dictionary_chunks_are_those_referenced(index_type):
    import pyarrow as pa
    import pyarrow.compute as pc

    from flor_ray.store.segments import distinct_names

    dictionary = pa.array(["loss", "acc", "unused", None, "lr"])
    codes = pa.array([0, None, 1, 1, 4, 0, 3, None, 0, 1], type=index_type)
    whole = pa.DictionaryArray.from_arrays(codes, dictionary)
    chunks = [whole.slice(0, 2), whole.slice(3, 1), whole.slice(5, 0), whole.slice(6, 4)]  # not code 4
    table = pa.table({"name": pa.chunked_array(chunks, type=whole.type)})
    plain = pa.table({"name": pc.cast(table.column("name"), pa.string())})
    assert distinct_names(table) == distinct_names(plain) == ("acc", "loss")
    assert distinct_names(pa.table({"name": pa.chunked_array([whole])})) == ("acc", "loss", "lr")

"""Replay end to end on a local Ray: three versions, two runs each, two new statements.

The replayed values must equal, bit for bit, those of a full re-execution of each
old version with the statements typed in by hand.
"""

from __future__ import annotations

import os
import textwrap

import pytest

import flor_ray
from flor_ray.execution.driver import run_plan
from flor_ray.store.logs import read_logs
from flor_ray.store import Store

from conftest import clean_env, git, run_script, start_script, write

from histories import V1, V2, V3, plain, with_statements


def _start(repo, *args, env):
    return start_script(repo, "train.py", *args, env=env)


def _wait(procs):
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err


@pytest.fixture(scope="module")
def history(tmp_path_factory, ray_local):
    """Two runs (lr 0.05, 0.1) of each version, and the same runs with the statements
    typed in by hand (one store per version and lr). Runs of one version start
    together: each snapshots its code at its first flor call, before the next
    version is written."""
    repo = tmp_path_factory.mktemp("hist") / "proj"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    hands = {}
    for v, src in (("v1", V1), ("v2", V2), ("v3", V3)):
        write(repo, "train.py", plain(src))
        git(repo, "add", "train.py")
        git(repo, "-c", "user.name=d", "-c", "user.email=d@x", "commit", "-qm", v)
        procs = []
        for lr in ("0.05", "0.1"):
            procs.append(_start(repo, "--kwargs", f"lr={lr}", env=clean_env(FLOR_CHECKPOINT_BUDGET="0.2")))
            hand = repo.parent / f"hand-{v}-{lr}"  # the version with the statements typed in, re-run in full
            hand.mkdir()
            git(hand, "init", "-q")
            write(hand, "train.py", with_statements(src))
            hands[(v, float(lr))] = Store(str(hand / ".flor"))
            procs.append(_start(hand, "--kwargs", f"lr={lr}", env=clean_env()))
        _wait(procs)
    write(repo, "train.py", with_statements(V3).replace("#GNORM_MODEL", "").replace("#WNORM_MODEL", ""))
    return repo, Store(str(repo / ".flor")), hands


def _key_of_runs(store):
    """(version label, lr) of each recorded run: versions numbered in recording order."""
    runs = flor_ray.runs(store=store)
    labels = {ver: f"v{i + 1}" for i, ver in enumerate(dict.fromkeys(runs["version"]))}
    return {r: (labels[ver], float(lr)) for r, ver, lr in zip(runs["run_id"], runs["version"], runs["lr"])}


def _rows(t, key):
    return [(key(r), e, s if s == s else -1, v) for r, e, s, v in zip(t["run_id"], t["iter0"], t["iter1"], t["value_float"])]


def _values(store, name, source):
    t = read_logs(store, [name], sources=(source,)).to_pandas()
    keys = _key_of_runs(store)
    return sorted(_rows(t, keys.__getitem__))


def _hand_values(hands, name):
    out = []
    for k, st in hands.items():
        out += _rows(read_logs(st, [name], sources=("record",)).to_pandas(), lambda r, k=k: k)
    return sorted(out)


def test_outer_level_statement_skips_inner_loops(history):
    repo, store, hand = history
    plan = flor_ray.plan_replay(["wnorm"], store=store, script=repo / "train.py")
    text = plan.explain()
    assert text.startswith("ReplayPlan[names=wnorm; runs=6; iterations=all;")
    assert "Need[wnorm -> outer:" in text
    assert all(t.mode in ("skip", "reexec") for t in plan.tasks) and any(t.mode == "skip" for t in plan.tasks)
    assert not plan.skipped, text
    report = run_plan(plan, progress=False)
    assert not report.failed, str(report)
    assert _values(store, "wnorm", "replay") == _hand_values(hand, "wnorm")
    assert report.fidelity.compared > 0 and report.fidelity.mismatched == 0
    # a rerun of the same query does no work
    again = flor_ray.plan_replay(["wnorm"], store=store, script=repo / "train.py")
    assert not again.pending and "(0 to run)" in again.explain()


def test_inner_level_statement_reexecutes_bit_for_bit(history):
    repo, store, hand = history
    plan = flor_ray.plan_replay(["gnorm"], store=store, script=repo / "train.py")
    text = plan.explain()
    assert "Need[gnorm -> inner:" in text and not plan.skipped, text
    assert all(t.mode == "reexec" for t in plan.tasks)
    report = run_plan(plan, progress=False)
    assert not report.failed, str(report)
    assert _values(store, "gnorm", "replay") == _hand_values(hand, "gnorm")
    assert report.fidelity.mismatched == 0 and dict((n, c) for n, c, _ in report.fidelity.by_name)["loss"] == 6 * 4 * 6
    df = flor_ray.dataframe("loss", "gnorm", store=store)
    assert df["gnorm"].notna().sum() == 6 * 4 * 6 and "loss__replay" in df


def test_last_iteration_only(history):
    repo, store, hand = history
    plan = flor_ray.plan_replay(["wnorm"], store=store, script=repo / "train.py", iterations="last", where="lr = 0.1")
    assert len({t.run_id for t in plan.tasks}) == 3
    assert all(t.start == t.stop == 3 for t in plan.tasks)

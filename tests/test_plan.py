"""The planner is a pure function: plans and their explain() strings, no Ray, no store."""

from __future__ import annotations

import pickle

import pytest

from flor_ray.errors import PlanningError
from flor_ray.planning.plan import (
    CheckpointRef,
    ClusterSnapshot,
    Resources,
    RunInfo,
    VersionPatch,
    iteration_set,
)
from flor_ray.planning.make import make_plan


def run(rid, ckpts, n=6, device="cpu", version="v1"):
    return RunInfo(
        run_id=rid, version=version, script="train.py", args=(("lr", 0.1),), argv=(), cwd=".", iterations=n,
        checkpoints=tuple(CheckpointRef(i, 1, f"checkpoints/{rid}/{i:06d}.pt", 1000, "x") for i in ckpts),
        setup_s=2.0, outer_s=(10.0,) * n, inner_s=(9.0,) * n, device=device, logged=frozenset({"loss", "acc"}),
    )


PATCH = VersionPatch(
    "v1", "code", None, ("+wnorm at line 30 [epoch]",),
    (("loss", "inner", "in the step loop", ()), ("acc", "outer", "outer level", ()),
     ("wnorm", "outer", "outer level", ()), ("gnorm", "inner", "in the step loop", ()),
     ("best", "outer", "reads best_acc", ("best_acc",))),
    ("loss", "acc", "wnorm", "gnorm", "best"),
)


def plan(names, runs, iterations="all", cpus=2, **kw):
    return make_plan(names=names, where=None, iterations=iterations, runs=runs, patches={"v1": PATCH},
                     cluster=ClusterSnapshot(cpus), store_url="memory://s", **kw)


def test_outer_statement_skips_and_falls_back_where_checkpoints_are_missing():
    p = plan(["wnorm"], [run("r1", [0, 1, 3, 5])])
    lines = p.explain().splitlines()
    assert lines[0] == f"ReplayPlan[names=wnorm; runs=1; iterations=all; tasks=4 (4 to run); workers=2; est. makespan={p.makespan_s:.1f}s; cold start=2.5s]"
    assert lines[1] == "  Propagate[v1] +wnorm at line 30 [epoch]"
    assert lines[2] == "    Need[wnorm -> outer: outer level]"
    skip = [t for t in p.tasks if t.mode == "skip"]
    assert [c.iteration for t in skip for c in t.checkpoints] == [0, 1, 3, 5]
    fallback = [(t.start, t.stop, t.restore.iteration) for t in p.tasks if t.mode == "reexec"]
    assert fallback == [(2, 2, 1), (4, 4, 3)]
    assert "no checkpoint for iteration 2: re-executes from checkpoint 1" in p.explain()
    assert "no checkpoint for iteration 4: re-executes from checkpoint 3" in p.explain()
    assert set(skip[0].names) == {"wnorm", "acc"}  # acc is recomputed and compared, loss is not


def test_estimates_leave_out_the_recordings_checkpoint_capture():
    # each recorded epoch: 10 s, of which 9 s in the step loop and 0.5 s capturing
    # the checkpoint, which a replay never does (it restores one instead)
    import dataclasses

    from flor_ray.planning.cost import restore_cost

    base = run("r1", range(6))
    captured = dataclasses.replace(base, checkpoint_s=(0.5,) * 6)
    for names, per_iter in ((["wnorm"], 0.5), (["gnorm"], 9.5)):
        a, b = (plan(names, [r], cpus=1).tasks for r in (base, captured))
        assert len(a) == len(b) == 1
        iters = b[0].stop - b[0].start + 1
        assert a[0].estimate_s - b[0].estimate_s == pytest.approx(0.5 * iters, abs=2e-3)
        restore = sum(restore_cost(c) for c in b[0].checkpoints)
        assert b[0].estimate_s == pytest.approx(base.replay_setup_s + restore + per_iter * iters, abs=2e-3)


def test_inner_statement_reexecutes_in_balanced_segments():
    p = plan(["gnorm"], [run("r1", [0, 1, 2, 3, 4, 5])], cpus=3)
    segs = [(t.start, t.stop, t.restore.iteration if t.restore else None) for t in p.tasks]
    assert segs == [(0, 1, None), (2, 3, 1), (4, 5, 3)]
    assert all(t.mode == "reexec" and set(t.names) == {"gnorm", "loss", "acc"} for t in p.tasks)
    assert p.tasks[0].setup and not p.tasks[1].setup


def test_missing_checkpoint_falls_back_to_iteration_zero():
    p = plan(["gnorm"], [run("r1", [])], iterations="last")
    (t,) = p.tasks
    assert (t.start, t.stop, t.restore) == (5, 5, None)
    assert "no checkpoint at iteration 4: re-executes from iteration 0" in p.explain()


def test_loop_carried_state_replays_from_zero():
    (t,) = plan(["best"], [run("r1", [0, 1, 2, 3, 4, 5])], iterations="last").tasks
    assert (t.mode, t.start, t.restore) == ("reexec", 5, None) and "loop-carried best_acc" in t.note


def test_keys_are_deterministic_and_done_tasks_are_not_rerun():
    a = plan(["wnorm"], [run("r1", [0, 1, 3, 5])])
    b = plan(["wnorm"], [run("r1", [0, 1, 3, 5])], done_keys=frozenset(t.key for t in a.tasks))
    assert [t.key for t in a.tasks] == [t.key for t in b.tasks]
    assert not b.pending and "(0 to run)" in b.explain()
    assert pickle.loads(pickle.dumps(a)) == a


def test_gpu_hint_and_resources_override():
    p = plan(["wnorm"], [run("r1", [5], device="cuda")], iterations="last")
    assert p.tasks[0].num_gpus == 1.0 and "gpus=1" in p.explain()
    q = plan(["wnorm"], [run("r1", [5], device="cuda")], iterations="last", resources=Resources(num_cpus=2, num_gpus=0))
    assert q.tasks[0].num_gpus == 0 and q.tasks[0].num_cpus == 2


def test_unplaceable_version_is_reported_not_dropped():
    p = make_plan(names=["wnorm"], where=None, iterations="all", runs=[run("r1", [0], version="v0")],
                  patches={"v0": VersionPatch("v0", None, "wnorm reads 'model', undefined in this version")},
                  cluster=ClusterSnapshot(2))
    assert not p.tasks and p.skipped[0].reason.startswith("propagation failed: wnorm reads")
    assert "Skip[run=r1] propagation failed" in p.explain()


@pytest.mark.parametrize("spec, want", [("all", [0, 1, 2, 3]), ("last", [3]), ("1:3", [1, 2]), ("0,3", [0, 3]),
                                        (range(2), [0, 1]), ([-1], [3]), (2, [2])])
def test_iteration_specs(spec, want):
    assert iteration_set(spec, 4) == want


def test_bad_iteration_spec():
    with pytest.raises(PlanningError, match="not understood"):
        iteration_set("x:y", 4)


def test_calibration_scales_estimates_by_mode_concurrency_and_run():
    from flor_ray.planning.cost import Calibration, CalibrationSample as S

    runs = [run("r1", range(6)), run("r2", range(6))]
    base = plan(["gnorm"], runs, cpus=2)
    assert base.per_node == 2 and not base.calibrated
    cal = Calibration((
        S("r1", "train.py", "reexec", 2, 10.0, 13.0),   # r1's own history: x1.3
        S("old", "train.py", "reexec", 2, 20.0, 22.0),  # same script: r2 gets (13 + 22) / (10 + 20)
        S("r2", "train.py", "reexec", 1, 10.0, 30.0),   # r2 alone on a node: not comparable
        S("r2", "train.py", "skip", 2, 10.0, 30.0),     # another mode: not comparable
    ))
    p = plan(["gnorm"], runs, cpus=2, calibration=cal)
    want = {"r1": 1.3, "r2": 35 / 30}
    assert [t.key for t in p.tasks] == [t.key for t in base.tasks]
    for t, b in zip(p.tasks, base.tasks):
        assert t.factor == pytest.approx(want[t.run_id], abs=1e-4)
        assert t.estimate_s == pytest.approx(b.estimate_s * want[t.run_id], abs=1e-3)
    assert p.makespan_s > base.makespan_s
    mean = sum(want[t.run_id] for t in p.tasks) / len(p.tasks)
    assert p.explain().splitlines()[0].endswith(f"; reexec x{mean:.2f} from 2 earlier tasks at 2/node]")
    # one odd replay cannot wreck the next plan: the factor is bounded
    wild = plan(["gnorm"], runs, cpus=2, calibration=Calibration((S("r1", "train.py", "reexec", 2, 1.0, 100.0),)))
    assert {t.factor for t in wild.tasks if t.run_id == "r1"} == {3.0}
    # one worker: tasks run alone, so only the sample taken alone applies (r1 has
    # none of its own and takes its script's)
    alone = plan(["gnorm"], runs, cpus=1, calibration=cal)
    assert alone.per_node == 1
    assert {t.run_id: t.factor for t in alone.tasks} == {"r1": 3.0, "r2": 3.0}


def test_concurrency_of_finished_tasks_per_node():
    from flor_ray.execution.task import TaskResult
    from flor_ray.planning.history import concurrency

    rs = [TaskResult("a", "r", "done", 1, 10.0, node="n1", started_at=100.0),
          TaskResult("b", "r", "done", 1, 10.0, node="n1", started_at=105.0),   # half of it next to a
          TaskResult("c", "r", "done", 1, 4.0, node="n2", started_at=101.0),    # another node
          TaskResult("d", "r", "done", 1, 2.0, node="n1", started_at=101.0)]    # inside a
    c = concurrency(rs)
    assert c["a"] == pytest.approx(1 + 5 / 10 + 2 / 10)
    assert c["b"] == pytest.approx(1.5)
    assert c["c"] == pytest.approx(1.0)
    assert c["d"] == pytest.approx(2.0)

"""Setup-, after- and loop-carried statements, replayed inline (no Ray), against hand-typed re-runs."""

from __future__ import annotations

import pytest

import flor_ray
from flor_ray.execution.driver import PLAN_OVERHEAD_S, LocalRunner, run_plan
from flor_ray.planning.plan import ClusterSnapshot
from flor_ray.store.logs import read_logs
from flor_ray.store import Store

from conftest import clean_env, git, run_script, write

OLD = '''
import torch
import flor_ray as flor

torch.manual_seed(0)
net = torch.nn.Linear(4, 1)
opt = torch.optim.SGD(net.parameters(), lr=0.1)
X, Y = torch.randn(32, 4), torch.randn(32, 1)
#SETUP
best = 1e9
with flor.checkpointing(net=net, opt=opt):
    for epoch in flor.loop("epoch", range(5)):
        for step in flor.loop("step", range(4)):
            idx = torch.randint(0, 32, (8,))
            loss = ((net(X[idx]) - Y[idx]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        full = ((net(X) - Y) ** 2).mean().item()
        best = min(best, full)
        flor.log("full", full)
        #BEST
#AFTER
'''
NEW = {
    "#SETUP": 'flor.log("nparams", sum(p.numel() for p in net.parameters()))',
    "#BEST": 'flor.log("best", best)',
    "#AFTER": 'flor.log("final_bias", net.bias.item())',
}


def fill(src: str, which=NEW) -> str:
    for marker, stmt in NEW.items():
        src = src.replace(marker, stmt.replace("\n", "\n" + " " * 8) if marker in which else "")
    return src


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    repo = tmp_path_factory.mktemp("modes") / "proj"
    repo.mkdir()
    git(repo, "init", "-q")
    write(repo, "train.py", fill(OLD, ()))
    run_script(repo, env=clean_env(FLOR_CHECKPOINT_MAX_PERIOD="2"))
    hand = repo.parent / "hand"
    hand.mkdir()
    git(hand, "init", "-q")
    write(hand, "train.py", fill(OLD))
    run_script(hand, env=clean_env(FLOR_STORE=str(repo.parent / "hand-store")))
    write(repo, "train.py", fill(OLD))  # today's script
    return repo, Store(str(repo / ".flor")), Store(str(repo.parent / "hand-store"))


def _vals(store, name, source):
    t = read_logs(store, [name], sources=(source,)).to_pandas()
    return sorted(zip(t["iter0"].fillna(-1), t["value_float"].fillna(t["value_int"].astype(float))))


@pytest.mark.parametrize(
    "name, kind, mode",
    [("nparams", "setup", "setup"), ("final_bias", "after", "skip"), ("best", "outer", "skip")],
)
def test_statement_kinds_replay_exactly(recorded, name, kind, mode):
    repo, store, hand = recorded
    plan = flor_ray.plan_replay([name], store=store, script=repo / "train.py", cluster=ClusterSnapshot(2))
    text = plan.explain()
    assert f"Need[{name} -> {kind}:" in text
    assert {t.mode for t in plan.tasks} >= {mode}, text
    if kind == "after":  # only the loop's end: its last checkpoint, none of the iterations before
        (task,) = plan.tasks
        assert (task.mode, task.start, task.stop, task.after) == ("skip", 4, 4, True), text
        assert [c.iteration for c in task.checkpoints] == [4]
    if name == "best":
        assert "loop-carried state (best)" in text
        # the checkpoints hold the loop-carried `best`: no task needs to start from iteration 0
        assert all(t.checkpoints or t.restore is not None for t in plan.tasks), text
        assert all("best" in t.carried for t in plan.tasks)
    report = run_plan(plan, progress=False, runner=LocalRunner())
    assert not report.failed, str(report)
    assert _vals(store, name, "replay") == _vals(hand, name, "record")
    assert report.fidelity.mismatched == 0


def test_task_phases_account_for_the_wall_and_a_warm_zygote_skips_the_cold_start(recorded):
    repo, store, hand = recorded
    with LocalRunner() as runner:
        for _ in range(2):  # the second run finds the runner's zygote warm
            for f in store.find("logs", ".parquet"):
                if "/source=replay/" in f:
                    store.delete(f)
            plan = flor_ray.plan_replay(["final_bias"], store=store, script=repo / "train.py",
                                        cluster=ClusterSnapshot(2))
            assert plan.startup_s > 0 and "cold start=" in plan.explain().splitlines()[0]
            report = run_plan(plan, progress=False, runner=runner)
            assert not report.failed, str(report)
    for r in report.results:
        phases = dict(r.phases)
        assert {"prepare", "process", "start", "setup", "restore", "loop", "write"} <= set(phases), phases
        assert phases.get("zygote", 0.0) < 0.5, phases  # warm: no imports paid again
        assert abs(sum(phases.values()) - r.wall_s) < 0.05 * r.wall_s + 0.05, (phases, r.wall_s)
        assert phases["restore"] > 0  # skip mode restored the checkpoints
    assert report.estimate_s == round(plan.makespan_s + PLAN_OVERHEAD_S, 3)  # warm: no cold start expected
    assert "[prepare" in str(report) or "[process" in str(report)
    assert _vals(store, "final_bias", "replay") == _vals(hand, "final_bias", "record")


def test_replay_history_calibrates_the_next_plans_estimates(recorded):
    """Each replay writes its finished tasks' estimates and actual times to the store;
    the next plan of the same run and mode scales its estimates by actual/estimate."""
    import warnings

    from flor_ray.planning.history import HISTORY_DIR, load_calibration

    repo, store, hand = recorded
    for f in store.find(HISTORY_DIR):
        store.delete(f)

    def fresh_plan():
        for f in store.find("logs", ".parquet"):
            if "/source=replay/" in f:
                store.delete(f)
        # one slot: inline tasks run one at a time, so 1 task per node, as planned
        return flor_ray.plan_replay(["final_bias"], store=store, script=repo / "train.py", cluster=ClusterSnapshot(1))

    first = fresh_plan()
    assert first.per_node == 1 and not first.calibrated and all(t.factor == 1.0 for t in first.tasks)
    report = run_plan(first, progress=False, runner=LocalRunner())
    assert not report.failed, str(report)
    files = store.find(HISTORY_DIR, ".json")
    assert len(files) == 1
    samples = store.read_json(files[0])["tasks"]
    by_key = {r.key: r for r in report.results}
    assert len(samples) == len(first.tasks) == len(by_key)
    tasks = {t.key: t for t in first.tasks}
    for s in samples:
        t, r = tasks[s["task"]], by_key[s["task"]]
        assert (s["run_id"], s["mode"], s["per_node"], s["script"]) == (t.run_id, t.mode, 1, "train.py")
        assert s["base_s"] == pytest.approx(t.estimate_s, abs=1e-3)
        assert s["actual_s"] == pytest.approx(r.wall_s - dict(r.phases).get("zygote", 0.0), abs=1e-3)

    second = fresh_plan()
    modes = sorted({s["mode"] for s in samples})
    assert "skip" in modes  # final_bias is computed after the loop, from the last checkpoint
    factor, n = {}, {}
    for m in modes:
        of = [s for s in samples if s["mode"] == m]
        factor[m] = min(max(sum(s["actual_s"] for s in of) / sum(s["base_s"] for s in of), 0.5), 3.0)
        n[m] = len(of)
    assert {t.key for t in second.tasks} == {t.key for t in first.tasks}  # keys do not depend on estimates
    base = {t.key: t.estimate_s for t in first.tasks}
    for t in second.tasks:
        assert t.factor == pytest.approx(factor[t.mode], abs=1e-4)
        assert t.estimate_s == pytest.approx(base[t.key] * factor[t.mode], abs=2e-3)
    head = second.explain().splitlines()[0]
    for m in modes:
        assert f"; {m} x{factor[m]:.2f} from {n[m]} earlier task{'s' if n[m] > 1 else ''} at 1/node" in head

    # a damaged history file is skipped with a warning; the plan is made all the same
    store.write_bytes(f"{HISTORY_DIR}/99999999T000000-broken.json", b"{not json")
    with pytest.warns(UserWarning, match="skipping the replay history file"):
        third = fresh_plan()
    assert [t.estimate_s for t in third.tasks] == [t.estimate_s for t in second.tasks]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        store.delete(f"{HISTORY_DIR}/99999999T000000-broken.json")
        assert len(load_calibration(store).samples) == len(samples)


def test_after_the_loop_without_a_last_checkpoint_reexecutes_from_the_nearest(tmp_path):
    """A loop of unknown length checkpointed every other iteration: the end (iteration 5)
    has no checkpoint, so the one task re-executes it from checkpoint 4, nothing before."""
    old = fill(OLD, ()).replace('range(5)', '(e for e in range(6))')
    repo, hand = tmp_path / "proj", tmp_path / "hand"
    for where, src in ((repo, old), (hand, fill(OLD).replace('range(5)', '(e for e in range(6))'))):
        where.mkdir()
        git(where, "init", "-q")
        write(where, "train.py", src)
        run_script(where, env=clean_env(FLOR_CHECKPOINT_MAX_PERIOD="2"))
    store = Store(str(repo / ".flor"))
    (meta,) = flor_ray.runs(store=store).to_dict("records")
    ckpts = [c["iteration"] for c in store.read_json(f"runs/{meta['run_id']}.json")["checkpoints"]]
    assert 5 not in ckpts and 4 in ckpts, ckpts
    write(repo, "train.py", fill(OLD).replace('range(5)', '(e for e in range(6))'))
    plan = flor_ray.plan_replay(["final_bias"], store=store, script=repo / "train.py", cluster=ClusterSnapshot(2))
    (task,) = plan.tasks
    assert (task.mode, task.start, task.stop, task.restore.iteration, task.after) == ("reexec", 5, 5, 4, True)
    assert "no checkpoint for the last iteration 5: re-executes from checkpoint 4" in plan.explain()
    report = run_plan(plan, progress=False, runner=LocalRunner())
    assert not report.failed, str(report)
    hand_store = Store(str(hand / ".flor"))
    assert _vals(store, "final_bias", "replay") == _vals(hand_store, "final_bias", "record")
    assert _vals(hand_store, "final_bias", "record")

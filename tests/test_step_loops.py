"""Step-based training loops: ``flor.loop`` over ``itertools.count`` ended by ``break``,
and ``with flor.iteration("step", iter_num):`` in a ``while True:`` loop.

One module-scoped history records two scripts of tests/step_scripts/: count_train.py
(2,000 tiny steps, an eval every 250) and gpt_train.py (nanoGPT's train.py shape: a
cosine lr with warmup from ``iter_num``, gradient-accumulation micro-steps, an eval and
its own ``torch.save`` of a checkpoint dict every ``eval_interval`` steps, ``if iter_num
> max_iters: break``). The oracle of each replay is a full re-execution of the same
script with the statements typed in by hand, compared bit for bit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import flor_ray
from flor_ray.errors import FlorError
from flor_ray.analysis import analyze
from flor_ray.execution.driver import run_plan
from flor_ray.store.logs import read_logs
from flor_ray.store import Store, layout

from conftest import git, run_script, start_script, write

SCRIPTS = Path(__file__).parent / "step_scripts"
COUNT_STEPS, EVAL_EVERY = 2000, 250
GPT_ITERS, GPT_EVAL = 24, 6

WNORM = 'flor.log("wnorm", net[0].weight.norm().item())'
VAL_L1 = 'flor.log("val_l1", (net(X).squeeze(1) - Y).abs().mean().item())'
GRAD_NORM = 'flor.log("grad_norm", torch.stack([p.grad.norm() for p in model.parameters()]).norm().item())'
TRAIN_EVAL = 'flor.log("train_loss_eval", losses["train"])'


def _count_src(typed: bool) -> str:
    src = (SCRIPTS / "count_train.py").read_text()
    if typed:
        return src.replace("#WNORM", WNORM).replace("#EVAL", VAL_L1)
    return src.replace("        #WNORM\n", "").replace("            #EVAL\n", "")


def _gpt_src(typed: bool) -> str:
    src = (SCRIPTS / "gpt_train.py").read_text()
    if typed:
        return src.replace("#EVAL_HINDSIGHT", TRAIN_EVAL).replace("#GRAD_HINDSIGHT", GRAD_NORM)
    return src.replace("                #EVAL_HINDSIGHT\n", "").replace("            #GRAD_HINDSIGHT\n", "")


def _new_repo(path: Path) -> Path:
    path.mkdir(parents=True)
    git(path, "init", "-q", "-b", "main")
    return path


def _popen(repo: Path, script: str, *args: str):
    return start_script(repo, script, *args)


@pytest.fixture(scope="module")
def history(tmp_path_factory):
    """Each script recorded in its own repository (then today's version, with the new
    statements, written over it), and re-run in full with the statements typed in."""
    base = tmp_path_factory.mktemp("steps")
    out_rec, out_hand = base / "out-rec", base / "out-hand"
    scripts = {"count_train.py": (_count_src, ()), "gpt_train.py": (_gpt_src, ("--out_dir",))}
    procs, h = [], {"out": out_rec}
    for script, (src, out_flag) in scripts.items():
        repo, hand = _new_repo(base / script[:-3]), _new_repo(base / f"hand-{script[:-3]}")
        write(repo, script, src(False))
        git(repo, "add", ".")
        git(repo, "-c", "user.name=d", "-c", "user.email=d@x", "commit", "-qm", "step loop")
        write(hand, script, src(True))
        procs.append(_popen(repo, script, *(out_flag and (*out_flag, str(out_rec)))))
        procs.append(_popen(hand, script, *(out_flag and (*out_flag, str(out_hand)))))
        h[script] = {"repo": repo, "store": Store(str(repo / ".flor")), "hand": Store(str(hand / ".flor"))}
    for p in procs:
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, err
    for script, (src, _) in scripts.items():
        write(h[script]["repo"], script, src(True))  # today's version: the statements added
        h[script]["run"] = flor_ray.runs(store=h[script]["store"])["run_id"][0]
    return h


def _meta(store: Store, run_id: str) -> dict:
    return json.loads(store.read_bytes(layout.run_meta(run_id)))


def _values(store: Store, name: str, source: str, file: str) -> dict[int, float]:
    t = read_logs(store, [name], sources=(source,)).to_pandas()
    t = t[t["file"] == file]
    seen: dict[int, set[float]] = {}
    for step, v in zip(t["iter0"].astype(int), t["value_float"]):
        seen.setdefault(step, set()).add(v)
    # two replay tasks may both compute a step (a rerun over a wider range): never two values
    assert all(len(v) == 1 for v in seen.values()), f"{name}: steps with different values: {seen}"
    return {step: v.pop() for step, v in seen.items()}


# ------------------------------------------------------------------ recording
def test_a_loop_ended_by_break_keeps_its_last_iteration(history):
    store, run = history["count_train.py"]["store"], history["count_train.py"]["run"]
    meta = _meta(store, run)
    assert meta["status"] == "finished" and meta["outer_loop"] == "step"
    assert meta["iterations"] == COUNT_STEPS  # the step that hit `break` counts
    assert sorted(_values(store, "loss", "record", "count_train.py")) == list(range(COUNT_STEPS))
    assert sorted(_values(store, "val_mse", "record", "count_train.py")) == list(range(0, COUNT_STEPS, EVAL_EVERY))


def test_tiny_steps_are_checkpointed_every_k_steps_not_every_step(history):
    store, run = history["count_train.py"]["store"], history["count_train.py"]["run"]
    meta = _meta(store, run)
    its = [c["iteration"] for c in meta["checkpoints"]]
    # the adaptive policy, bounded by checkpoint_max_period (16): about one in 16
    assert 0 < len(its) <= COUNT_STEPS // 8, len(its)
    assert its == sorted(its) and its[0] == 0 and max(b - a for a, b in zip(its, its[1:])) <= 16
    assert len(store.find(layout.checkpoint_folder(run), ".pt")) == len(its)
    # rows are flushed every flush_interval_s, not once per step
    assert meta["flushes"] < COUNT_STEPS // 10, meta["flushes"]


def test_flor_iteration_records_the_steps_of_a_gpt_loop(history):
    store, run = history["gpt_train.py"]["store"], history["gpt_train.py"]["run"]
    meta = _meta(store, run)
    assert meta["status"] == "finished" and meta["outer_loop"] == "step"
    assert meta["iterations"] == GPT_ITERS + 1  # iter_num 0..max_iters, then `iter_num > max_iters: break`
    # steps of ~10 ms against a checkpoint of a few: the budget may allow one at most steps
    assert meta["checkpoints"] and {c["iteration"] for c in meta["checkpoints"]} <= set(range(GPT_ITERS + 1))
    assert sorted(_values(store, "loss", "record", "gpt_train.py")) == list(range(GPT_ITERS + 1))
    evals = list(range(0, GPT_ITERS + 1, GPT_EVAL))
    assert sorted(_values(store, "val_loss", "record", "gpt_train.py")) == evals
    assert (history["out"] / "ckpt.pt").exists()  # the script's own checkpoint, written while recording
    df = flor_ray.dataframe("lr", store=store)
    lrs = df[df["run_id"] == run].sort_values("step")["lr"].tolist()
    assert lrs[0] < lrs[6] and lrs[6] > lrs[-1]  # warmup, then the cosine decay


# --------------------------------------------------------------------- replay
@pytest.fixture(scope="module")
def count_last(history, ray_local):
    repo, store = history["count_train.py"]["repo"], history["count_train.py"]["store"]
    plan = flor_ray.plan_replay(["wnorm"], store=store, script=repo / "count_train.py", iterations="last")
    return plan, run_plan(plan, progress=False)


def test_replay_of_the_step_that_hit_break_starts_from_the_nearest_checkpoint(history, count_last):
    store, run = history["count_train.py"]["store"], history["count_train.py"]["run"]
    plan, report = count_last
    (task,) = plan.tasks
    nearest = max(c["iteration"] for c in _meta(store, run)["checkpoints"] if c["iteration"] < COUNT_STEPS - 1)
    assert (task.mode, task.start, task.stop) == ("reexec", COUNT_STEPS - 1, COUNT_STEPS - 1)
    assert task.restore is not None and task.restore.iteration == nearest
    assert f"re-execute {COUNT_STEPS - 1} restore@{nearest}" in plan.explain()
    assert not report.failed, str(report)
    got = _values(store, "wnorm", "replay", "count_train.py")
    want = _values(history["count_train.py"]["hand"], "wnorm", "record", "count_train.py")
    assert got == {COUNT_STEPS - 1: want[COUNT_STEPS - 1]}


def test_a_statement_under_an_eval_interval_backfills_only_where_it_ran(history, ray_local):
    repo, store = history["count_train.py"]["repo"], history["count_train.py"]["store"]
    plan = flor_ray.plan_replay(["val_l1"], store=store, script=repo / "count_train.py")
    assert "Need[val_l1 -> inner:" in plan.explain()
    report = run_plan(plan, progress=False)
    assert not report.failed, str(report)
    got = _values(store, "val_l1", "replay", "count_train.py")
    assert sorted(got) == list(range(0, COUNT_STEPS, EVAL_EVERY))
    assert got == _values(history["count_train.py"]["hand"], "val_l1", "record", "count_train.py")
    assert report.fidelity.compared > 0 and report.fidelity.mismatched == 0


@pytest.fixture(scope="module")
def gpt_replay(history, ray_local):
    """The last step alone (a mid-run restore, skipping the earlier steps' bodies), then every step."""
    repo, store = history["gpt_train.py"]["repo"], history["gpt_train.py"]["store"]
    (history["out"] / "ckpt.pt").unlink()
    last = flor_ray.plan_replay(["grad_norm"], store=store, script=repo / "gpt_train.py", iterations="last")
    last_report = run_plan(last, progress=False)
    full = flor_ray.plan_replay(["grad_norm", "train_loss_eval"], store=store, script=repo / "gpt_train.py")
    return last, last_report, full, run_plan(full, progress=False)


def test_gpt_last_step_replays_from_a_mid_run_checkpoint(history, gpt_replay):
    store, run = history["gpt_train.py"]["store"], history["gpt_train.py"]["run"]
    last, report, _, _ = gpt_replay
    (task,) = last.tasks
    assert task.restore is not None and task.restore.iteration > 0, last.explain()
    assert task.restore.iteration in {c["iteration"] for c in _meta(store, run)["checkpoints"]}
    assert f"re-execute {GPT_ITERS} restore@{task.restore.iteration}" in last.explain(), last.explain()
    assert not report.failed, str(report)
    assert report.fidelity.compared > 0 and report.fidelity.mismatched == 0, str(report)


def test_gpt_loop_replays_bit_for_bit_and_never_writes_the_users_checkpoint(history, gpt_replay):
    store, hand = history["gpt_train.py"]["store"], history["gpt_train.py"]["hand"]
    _, _, full, report = gpt_replay
    text = full.explain()
    assert "Need[grad_norm -> inner: 'grad_norm'" in text and "Need[train_loss_eval -> inner:" in text, text
    assert "+grad_norm at line" in text and "+train_loss_eval at line" in text, text
    assert not report.failed, str(report)
    got = _values(store, "grad_norm", "replay", "gpt_train.py")
    assert sorted(got) == list(range(GPT_ITERS + 1))
    assert got == _values(hand, "grad_norm", "record", "gpt_train.py")
    evals = _values(store, "train_loss_eval", "replay", "gpt_train.py")
    assert sorted(evals) == list(range(0, GPT_ITERS + 1, GPT_EVAL))  # only where the eval ran
    assert evals == _values(hand, "train_loss_eval", "record", "gpt_train.py")
    assert report.fidelity.mismatched == 0 and report.fidelity.compared > 0
    assert not (history["out"] / "ckpt.pt").exists()  # torch.save is a training side effect: not replayed


# ------------------------------------------------------------------- analysis
STEP_LOOP = '''
import flor_ray as flor
import torch

model = torch.nn.Linear(2, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
iter_num = 0
best = 1e9
with flor.checkpointing(model=model, opt=opt):
    while True:
        with flor.iteration("step", iter_num):
            lr = 0.1 / (1 + iter_num)
            for g in opt.param_groups:
                g["lr"] = lr
            loss = model(torch.ones(1, 2)).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if iter_num % 10 == 0:
                flor.log("lr", lr)
                best = min(best, loss.item())
            flor.log("const", 3)
        iter_num += 1
        if iter_num > 100:
            break
flor.log("best", best)
'''


def test_analysis_takes_the_loop_around_a_flor_iteration_as_the_outer_loop():
    a = analyze(STEP_LOOP)
    assert a.outer_loop == "step"
    assert set(a.loop_carried) >= {"iter_num", "best"}
    assert {s.name: s.loop_path for s in a.sites} == {"lr": ("step",), "const": ("step",), "best": ()}
    need = dict(a.needs)
    assert need["lr"].kind == "inner" and "iter_num" in need["lr"].carried  # carried, read before the restore
    assert need["const"].kind == "outer"  # reads nothing the skipped steps compute
    assert need["best"].kind in ("after", "inner") and "best" in need["best"].reads


def test_a_step_function_called_per_step_is_a_loop_of_its_own():
    src = '''
import flor_ray as flor

def train_step(i):
    with flor.iteration("step", i):
        flor.log("x", i * 2)

for i in range(5):
    train_step(i)
'''
    a = analyze(src)
    assert a.outer_loop == "step" and [s.loop_path for s in a.sites] == [("step",)]


# -------------------------------------------------------- the verb, no torch
def test_iteration_contexts_nesting_and_exceptions(repo):
    write(repo, "loop.py", '''
        import itertools
        import flor_ray as flor

        for epoch in flor.loop("epoch", range(2)):
            i = 0
            while i < 3:
                with flor.iteration("batch", i, value=f"b{i}"):
                    flor.log("x", epoch * 10 + i)
                i += 1
        step = 0
        while True:
            with flor.iteration("extra", step + 100):
                flor.log("y", step)
            step += 1
            if step == 2:
                break
    ''')
    run_script(repo, "loop.py")
    store = Store(str(repo / ".flor"))
    t = read_logs(store, ["x", "y"]).to_pandas().sort_values("seq")
    xs = t[t["name"] == "x"]
    assert xs["loops"].unique().tolist() == ["epoch/batch"]
    assert list(zip(xs["iter0"], xs["iter1"], xs["value_int"])) == [(e, b, e * 10 + b) for e in range(2) for b in range(3)]
    assert [json.loads(s) for s in xs["items"]][:2] == [[None, "b0"], [None, "b1"]]
    ys = t[t["name"] == "y"]
    assert ys["loops"].tolist() == ["extra"] * 2 and ys["iter0"].tolist() == [0, 1]
    meta = _meta(store, flor_ray.runs(store=store)["run_id"][0])
    assert meta["outer_loop"] == "epoch" and meta["iterations"] == 2  # "extra" is a second top-level loop

    write(repo, "bad.py", '''
        import flor_ray as flor
        with flor.iteration("step", "three"):
            pass
    ''')
    proc = run_script(repo, "bad.py", check=False)
    assert proc.returncode != 0 and "LoopError" in proc.stderr and "iteration's index as an int" in proc.stderr


def test_an_exception_inside_a_step_is_not_counted(repo):
    write(repo, "fail.py", '''
        import itertools
        import flor_ray as flor

        for s in flor.loop("step", itertools.count(5)):
            flor.log("v", s)
            if s == 9:
                raise ValueError("diverged")
    ''')
    proc = run_script(repo, "fail.py", check=False)
    assert proc.returncode != 0 and "diverged" in proc.stderr
    store = Store(str(repo / ".flor"))
    meta = _meta(store, flor_ray.runs(store=store)["run_id"][0])
    assert meta["status"] == "failed" and meta["iterations"] == 4  # steps 0..3 ended; step 4 raised
    t = read_logs(store, ["v"]).to_pandas()
    assert sorted(t["value_int"]) == [5, 6, 7, 8, 9]  # its rows are kept all the same


def test_iteration_is_a_flor_error_for_a_name_of_a_logged_value(repo):
    from flor_ray.record.loops import LoopRuntime

    rt = LoopRuntime()
    rt.log("step", 1.0)
    with pytest.raises(FlorError, match="name of a logged value"):
        with rt.iteration("step", 0):
            pass


def test_a_replay_skips_the_bodies_of_the_steps_it_does_not_run():
    """The mechanism ReplaySession uses: a step whose ``_outer_begin`` says no does not
    run its body, the code around the block does, and a tracer already set stays set."""
    from flor_ray.record.loops import LoopRuntime

    class EveryOther(LoopRuntime):
        def _outer_begin(self, i: int, length) -> bool:
            return i % 2 == 1

    def tracer(frame, event, arg):
        return None

    rt, ran, around = EveryOther(), [], []
    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        step = 0
        while step < 6:
            with rt.iteration("step", step):
                ran.append(step)
                rt.log("v", step)
            around.append(step)
            step += 1
        assert sys.gettrace() is tracer
    finally:
        sys.settrace(previous)
    assert ran == [1, 3, 5] and around == list(range(6))
    rows = rt.take_rows()
    assert rows["names"] == ["v"] * 3 and rows["values"] == [1, 3, 5]

    rt, ran = EveryOther(), []
    for step in range(4):
        with rt.iteration("step", step): ran.append(step)  # noqa: E701 - a body on the with's own line
    assert ran == [1, 3]

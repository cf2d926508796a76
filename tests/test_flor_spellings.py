"""One recogniser of flor calls: every spelling that propagation accepts is analysed alike.

The same small training script (argparse, a shuffling DataLoader, an annealed
learning rate) is written with ``import flor_ray as flor``, with ``import flor_ray
as fr`` and with FlorDB's ``from flor import log, loop, ...`` (a ``flor`` module of
the project serving flor_ray's verbs); today's version of each adds a step-level
``grad_norm`` and an epoch-level ``weight_norm``. Propagation places both in every
spelling, so the analysis of the patched code must find both, with the same needs;
recorded in their own repositories, the documented spelling and FlorDB's must get
the same replay plan.
"""

from __future__ import annotations

import re
import textwrap

import pytest

import flor_ray
from flor_ray.analysis import analyze
from flor_ray.planning.plan import ClusterSnapshot
from flor_ray.propagation import propagate_detailed
from flor_ray.propagation.project import logged_names
from flor_ray.store import Store

from conftest import clean_env, git, start_script, write

TRAIN = '''
import argparse

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

{imports}

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--hidden", type=int, default=12)
args = parser.parse_args()
torch.manual_seed(0)
X = torch.randn(64, 6)
Y = (X[:, 0] - X[:, 2] > 0).long()
loader = DataLoader(TensorDataset(X, Y), batch_size=16, shuffle=True)
net = nn.Sequential(nn.Linear(6, args.hidden), nn.ReLU(), nn.Linear(args.hidden, 2))
opt = torch.optim.SGD(net.parameters(), lr={f}arg("lr", 0.1), momentum=0.9)
sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)


def accuracy(m):
    with torch.no_grad():
        return (m(X).argmax(1) == Y).float().mean().item()


with {f}checkpointing(net=net, opt=opt, sched=sched):
    for epoch in {f}loop("epoch", range(args.epochs)):
        net.train()
        for x, y in {f}loop("step", loader):
            loss = nn.functional.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            #GRAD_NORM
            {f}log("loss", loss.item())
        sched.step()
        {f}log("acc", accuracy(net))
        #WEIGHT_NORM
'''

STATEMENTS = {
    "#GRAD_NORM": '{f}log("grad_norm", torch.stack([p.grad.norm() for p in net.parameters()]).norm().item())',
    "#WEIGHT_NORM": '{f}log("weight_norm", net[0].weight.norm().item())',
}

#: spelling -> (its imports, the prefix of a verb)
SPELLINGS = {
    "flor_ray as flor": ("import flor_ray as flor", "flor."),
    "flor_ray as fr": ("import flor_ray as fr", "fr."),
    "from flor import": ("from flor import arg, checkpointing, log, loop", ""),
}

#: the spellings recorded for the planner's test: the documented one and FlorDB's
RECORDED = ("flor_ray as flor", "from flor import")

#: FlorDB's module name, served by flor_ray, for the scripts that import from it
FLOR_SHIM = '"""FlorDB\'s module name for flor_ray\'s verbs."""\nfrom flor_ray import arg, checkpointing, log, loop  # noqa: F401\n'


def script(spelling: str, today: bool) -> str:
    imports, f = SPELLINGS[spelling]
    out = []
    for ln in TRAIN.format(imports=imports, f=f).splitlines():
        marker = ln.strip()
        if marker in STATEMENTS:
            if today:
                out.append(ln[: len(ln) - len(ln.lstrip())] + STATEMENTS[marker].format(f=f))
            continue
        out.append(ln)
    return "\n".join(out) + "\n"


def needs(source: str) -> dict[str, str]:
    a = analyze(source)
    return {n: a.need(n).kind for n in a.logged_names}


@pytest.mark.parametrize("spelling", sorted(SPELLINGS))
def test_the_analysis_sees_the_logs_that_propagation_sees(spelling):
    today = script(spelling, today=True)
    assert analyze(today).logged_names == ("grad_norm", "loss", "acc", "weight_norm")
    assert sorted(logged_names(today)) == sorted(analyze(today).logged_names)
    assert needs(today) == {"loss": "inner", "grad_norm": "inner", "acc": "outer", "weight_norm": "outer"}


@pytest.mark.parametrize("spelling", sorted(SPELLINGS))
def test_the_propagated_code_is_analysed_as_today_spells_it(spelling):
    res = propagate_detailed(script(spelling, today=True), script(spelling, today=False))
    assert sorted(n for p in res.placements for n in p.names) == ["grad_norm", "weight_norm"]
    _, f = SPELLINGS[spelling]
    assert f'{f}log("weight_norm"' in res.code
    assert needs(res.code) == needs(script(spelling, today=True))


def test_a_direct_import_is_one_spelling_among_others():
    aliased = textwrap.dedent('''
        from flor_ray import log as record, loop
        import torch
        total = 0.0
        for epoch in loop("epoch", range(3)):
            total += epoch
            record("total", total)
    ''')
    a = analyze(aliased)
    assert a.outer_loop == "epoch" and a.logged_names == logged_names(aliased) == ("total",)
    assert a.loop_carried == ("total",) and a.need("total").carried == ("total",)


@pytest.fixture(scope="module")
def histories(tmp_path_factory):
    """One recorded run per spelling of RECORDED (each in its own repository), today's script written."""
    base = tmp_path_factory.mktemp("spellings")
    repos, procs = {}, []
    for i, spelling in enumerate(RECORDED):
        repo = base / f"p{i}"
        repo.mkdir()
        git(repo, "init", "-q", "-b", "main")
        write(repo, "train.py", script(spelling, today=False))
        write(repo, "flor.py", FLOR_SHIM)
        git(repo, "add", "train.py", "flor.py")
        git(repo, "-c", "user.name=d", "-c", "user.email=d@x", "commit", "-qm", "v1")
        procs.append(start_script(repo, "train.py", "--hidden", "10", env=clean_env(FLOR_CHECKPOINT_BUDGET="1")))
        repos[spelling] = repo
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    for spelling, repo in repos.items():
        write(repo, "train.py", script(spelling, today=True))
    return repos


def _plan(repo):
    plan = flor_ray.plan_replay(["grad_norm", "weight_norm"], store=Store(str(repo / ".flor")),
                                script=repo / "train.py", cluster=ClusterSnapshot(2))
    text = plan.explain()
    kinds = dict(re.findall(r"Need\[(\w+) -> (\w+):", text))
    # what each task computes and which iterations: its segment bounds follow the
    # recorded timings, which differ from run to run
    covered: dict[tuple[str, tuple[str, ...]], list[int]] = {}
    for t in plan.tasks:
        covered.setdefault((t.mode, tuple(sorted(t.names))), []).extend(range(t.start, t.stop + 1))
    return plan, text, kinds, {k: sorted(v) for k, v in covered.items()}


def test_every_spelling_plans_the_same_replay(histories):
    plans = {s: _plan(repo) for s, repo in histories.items()}
    for spelling, (plan, text, kinds, tasks) in plans.items():
        assert not plan.refused and not plan.skipped, (spelling, text)
        assert kinds["grad_norm"] == "inner" and kinds["weight_norm"] == "outer", (spelling, text)
    _, _, kinds0, tasks0 = plans["flor_ray as flor"]
    assert tasks0
    for spelling, (_, text, kinds, tasks) in plans.items():
        assert (kinds, tasks) == (kinds0, tasks0), (spelling, text)

"""Skip or re-execute for statements in the project's other modules: the analysis
follows the script's calls into ``model.py`` and ``train.py``.

A recorded history of two versions of a project shaped like the field's (main.py
with argparse and DataLoaders, ``train_epoch``/``evaluate`` in train.py, an
``nn.Module`` in model.py); today's version adds statements to ``evaluate`` (after
its loop: skip mode), ``forward`` (applied in the step loop: re-execute), a helper
called by training and evaluation alike (re-execute) and ``Net.__init__`` (setup).
Each replayed value equals, bit for bit, what a full re-execution of the old version
with the statement typed in by hand logs. The cases where resolution fails (a
callback, a lambda, ``import *``, module state) are checked on the analysis alone.
"""

from __future__ import annotations

import subprocess
import textwrap

import pytest

import flor_ray
from flor_ray.analysis.project import module_needs, project_files
from flor_ray.execution.driver import run_plan
from flor_ray.store import Store
from flor_ray.store.logs import read_logs
from flor_ray.store.runs import load_runs

from conftest import clean_env, git, start_script, write

MAIN = '''
import argparse

import torch
from torch.utils.data import DataLoader, TensorDataset

import flor_ray as flor
from model import Net
from train import evaluate, train_epoch


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.1)
    args = parser.parse_args()
    torch.manual_seed(0)
    X = torch.randn(96, 6)
    Y = (X[:, 0] * X[:, 1] > 0).long()
    train_loader = DataLoader(TensorDataset(X[:64], Y[:64]), batch_size=16, shuffle=True)
    test_loader = DataLoader(TensorDataset(X[64:], Y[64:]), batch_size=16)
    net = Net({hidden})
    opt = torch.optim.SGD(net.parameters(), lr=flor.arg("lr", args.lr), momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
    with flor.checkpointing(net=net, opt=opt, sched=sched):
        for epoch in flor.loop("epoch", range(args.epochs)):
            train_epoch(net, train_loader, opt)
            sched.step()
            acc = evaluate(net, test_loader)
            flor.log("acc", acc)


if __name__ == "__main__":
    main()
'''

MODEL = '''
import torch
import torch.nn as nn

import flor_ray as flor


class Net(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.fc1 = nn.Linear(6, hidden)
        self.fc2 = nn.Linear(hidden, 2)
        #NPARAMS

    def forward(self, x):
        h = torch.{act}(self.fc1(x))
        #HNORM
        return self.fc2(h)
'''

TRAIN = '''
import torch
import torch.nn.functional as F

import flor_ray as flor


def batch_errors(out, y):
    wrong = (out.argmax(1) != y).float().sum()
    #ERRORS
    return wrong


def train_epoch(model, loader, opt):
    model.train()
    for x, y in flor.loop("step", loader):
        out = model(x)
        loss = F.cross_entropy(out, y)
        opt.zero_grad()
        loss.backward(){clip}
        opt.step()
        batch_errors(out.detach(), y)
        flor.log("loss", loss.item())


def evaluate(model, loader):
    model.eval()
    total = 0.0
    wrong = 0.0
    with torch.no_grad():
        for x, y in loader:
            out = model(x)
            total += F.cross_entropy(out, y, reduction="sum").item()
            wrong += batch_errors(out, y).item()
    #VLOSS
    return 1 - wrong / len(loader.dataset)
'''

STATEMENTS = {
    "#NPARAMS": 'flor.log("nparams", sum(p.numel() for p in self.parameters()))',
    "#HNORM": 'flor.log("hnorm", h.norm().item())',
    "#ERRORS": 'flor.log("errors", wrong.item())',
    "#VLOSS": 'flor.log("vloss", total / len(loader.dataset))',
}

VERSIONS = {
    "v1": {"hidden": 8, "act": "tanh", "clip": ""},
    "v2": {"hidden": 12, "act": "relu",
           "clip": "\n        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)"},
}


def _files(version: str) -> dict[str, str]:
    v = VERSIONS[version]
    return {"main.py": MAIN.format(hidden=v["hidden"]), "model.py": MODEL.format(act=v["act"]),
            "train.py": TRAIN.format(clip=v["clip"])}


def _typed_in(text: str) -> str:
    for marker, statement in STATEMENTS.items():
        text = text.replace(marker, statement)
    return text


def _plain(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if line.strip() not in STATEMENTS) + "\n"


def _record(where, files, typed: bool) -> subprocess.Popen:
    for name, text in files.items():
        write(where, name, _typed_in(text) if typed else _plain(text))
    return start_script(where, "main.py", env=clean_env(FLOR_CHECKPOINT_BUDGET="1"))


@pytest.fixture(scope="module")
def history(tmp_path_factory, ray_local):
    """Two recorded versions, each with a hand-typed re-execution; today: v2 with the statements."""
    repo = tmp_path_factory.mktemp("modneeds") / "proj"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    hands = {}
    for version in VERSIONS:
        files = _files(version)
        for name, text in files.items():
            write(repo, name, _plain(text))
        git(repo, "add", "-A")
        git(repo, "-c", "user.name=d", "-c", "user.email=d@x", "commit", "-qm", version)
        hand = repo.parent / f"hand-{version}"
        hand.mkdir()
        git(hand, "init", "-q")
        procs = [_record(repo, files, typed=False), _record(hand, files, typed=True)]
        for p in procs:
            _, err = p.communicate(timeout=300)
            assert p.returncode == 0, err
        hands[version] = Store(str(hand / ".flor"))
    for name, text in _files("v2").items():
        write(repo, name, _typed_in(text))
    store = Store(str(repo / ".flor"))
    metas = sorted(load_runs(store), key=lambda m: m["started_at"])
    runs = {"v1": metas[0]["run_id"], "v2": metas[1]["run_id"]}
    return repo, store, hands, runs


def _plan(repo, store, names):
    return flor_ray.plan_replay(names, script=str(repo / "main.py"), store=store.url)


def _needs(plan) -> dict[str, set[str]]:
    """The kind of each name's need, over the versions, from explain()'s Need lines."""
    out: dict[str, set[str]] = {}
    for line in plan.explain().splitlines():
        line = line.strip()
        if line.startswith("Need["):
            name, rest = line[len("Need["):].split(" -> ", 1)
            out.setdefault(name, set()).add(rest.split(":", 1)[0])
    return out


def _values(store: Store, name: str, source: str, run_id: str | None = None) -> list:
    t = read_logs(store, [name], [run_id] if run_id else None).to_pandas()
    t = t[t["source"] == source].sort_values(["iter0", "iter1", "seq"], na_position="first")
    return [f if vt == "float" else i for vt, f, i in zip(t["vtype"], t["value_float"], t["value_int"])]


def _exact(store, hands, runs, names, counts):
    for version, hand in hands.items():
        for name in names:
            want = _values(hand, name, "record")
            assert len(want) == counts[name], (version, name, want)
            assert _values(store, name, "replay", runs[version]) == want, (version, name)


def test_eval_statement_skips_and_init_statement_is_setup(history):
    repo, store, hands, runs = history
    plan = _plan(repo, store, ["vloss", "nparams", "acc"])
    text = plan.explain()
    # acc, logged by the script after evaluate(): train_epoch() runs the step loop in train.py,
    # and skip mode restores the model where that loop exits
    assert _needs(plan) == {"vloss": {"outer"}, "nparams": {"setup"}, "acc": {"outer"}}, text
    assert "model.py: +nparams" in text and "in __init__()" in text and "train.py: +vloss" in text
    assert "reached from line" in text and "acc = evaluate(net, test_loader)" in text
    assert plan.tasks and all(t.mode == "skip" for t in plan.tasks), text
    assert any(t.setup for t in plan.tasks), text  # the model is built before the loop: setup runs
    report = run_plan(plan, progress=False)
    assert report.ok, str(report)
    assert report.fidelity.mismatched == 0
    _exact(store, hands, runs, ["vloss", "nparams"], {"vloss": 3, "nparams": 1})
    for rid in runs.values():
        recorded = _values(store, "acc", "record", rid)
        assert len(recorded) == 3 and _values(store, "acc", "replay", rid) == recorded
    alone = _plan(repo, store, ["nparams"])  # values logged while the model is built: no iteration runs
    assert alone.tasks and all(t.mode == "setup" for t in alone.tasks), alone.explain()


def test_forward_and_shared_helper_re_execute(history):
    repo, store, hands, runs = history
    plan = _plan(repo, store, ["hnorm", "errors"])
    text = plan.explain()
    assert _needs(plan) == {"hnorm": {"inner"}, "errors": {"inner"}}, text
    assert "in Net.forward()" in text and "runs an inner flor.loop" in text
    assert plan.tasks and all(t.mode == "reexec" for t in plan.tasks), text
    report = run_plan(plan, progress=False)
    assert report.ok, str(report)
    assert report.fidelity.mismatched == 0
    # 3 epochs x 4 training batches; forward and the helper run in each evaluation's 2 batches too
    _exact(store, hands, runs, ["hnorm", "errors"], {"hnorm": 18, "errors": 18})


# -- the analysis alone: where the calls cannot be followed, re-execute with the reason

SCRIPT = '''
import torch
import flor_ray as flor
{imports}

net = torch.nn.Linear(2, 2)
opt = torch.optim.SGD(net.parameters(), lr=0.1)
{setup}
with flor.checkpointing(net=net, opt=opt):
    for epoch in flor.loop("epoch", range(3)):
        for x in flor.loop("step", [torch.ones(2)] * 4):
            net(x).sum().backward()
            opt.step()
{after}
'''

METRICS = '''
import flor_ray as flor

CALLS = 0


def count():
    global CALLS
    CALLS += 1


def score(model):
    s = float(model.weight.sum())
    flor.log("score", s)
    return s


def seen():
    flor.log("seen", CALLS)
'''


def _need(imports: str, after: str, setup: str = "", name: str = "score", metrics: str = METRICS):
    script = textwrap.dedent(SCRIPT).format(imports=imports, setup=setup, after=textwrap.indent(after, " " * 8))
    found = dict(module_needs(script, "main.py", {"main.py": script, "metrics.py": metrics}, ["metrics.py"],
                              [name]))
    return found[name]


def test_an_epoch_end_call_by_module_attribute_skips():
    need = _need("import metrics", "metrics.score(net)")
    assert need.kind == "outer", need.reason
    assert "line 14 of the script (metrics.score(net))" in need.reason


def test_a_call_inside_the_step_loop_re_executes():
    need = _need("from metrics import score", "score(net)\nfor x in flor.loop('eval', [1, 2]):\n    score(net)")
    assert need.kind == "inner", need.reason


def test_a_function_passed_as_a_value_re_executes():
    need = _need("from metrics import score", "hooks = [score]\nfor h in hooks:\n    h(net)")
    assert need.kind == "inner" and "as a value" in need.reason, need.reason


def test_a_call_in_a_lambda_re_executes():
    need = _need("import metrics", "", setup="later = lambda: metrics.score(net)")
    assert need.kind == "inner" and "lambda" in need.reason, need.reason


def test_a_star_import_re_executes():
    need = _need("from metrics import *", "score(net)")
    assert need.kind == "inner" and "imports *" in need.reason, need.reason


def test_module_state_that_calls_rebind_re_executes():
    need = _need("import metrics", "metrics.count()\nmetrics.seen()", name="seen")
    assert need.kind == "inner" and "module global 'CALLS'" in need.reason, need.reason


def test_a_module_function_never_called_re_executes():
    need = _need("import metrics", "print(epoch)")
    assert need.kind == "inner" and "finds no call" in need.reason, need.reason


def test_a_script_function_used_as_a_callback_re_executes():
    callback = "def report():\n    metrics.score(net)\n\n\ndef run(f):\n    f()\n"
    need = _need("import metrics", "run(report)", setup=callback)
    assert need.kind == "inner" and "report()" in need.reason, need.reason


def test_a_package_re_export_resolves_to_the_class():
    model = "import flor_ray as flor\nimport torch\n\n\nclass Net(torch.nn.Module):\n" \
            "    def __init__(self):\n        super().__init__()\n        flor.log('built', 1)\n"
    script = "import flor_ray as flor\nfrom models import Net\n\nnet = Net()\n" \
             "with flor.checkpointing(net=net):\n    for e in flor.loop('epoch', range(2)):\n        pass\n"
    files = {"main.py": script, "models/__init__.py": "from .net import Net\n", "models/net.py": model}
    need = dict(module_needs(script, "main.py", files, ["models/net.py"]))["built"]
    assert need.kind == "setup", need.reason


def test_a_transparent_decorator_keeps_skip_and_a_registering_one_re_executes():
    wrapped = METRICS.replace("def score(model):", "@torch.no_grad()\ndef score(model):").replace(
        "import flor_ray as flor", "import flor_ray as flor\nimport torch")
    assert _need("import metrics", "metrics.score(net)", metrics=wrapped).kind == "outer"
    registered = METRICS.replace("def score(model):", "@HOOKS.append\ndef score(model):").replace(
        "CALLS = 0", "CALLS = 0\nHOOKS = []")
    need = _need("import metrics", "metrics.score(net)", metrics=registered)
    assert need.kind == "inner" and "decorated" in need.reason, need.reason


def test_a_generator_re_executes():
    gen = METRICS.replace('    flor.log("score", s)\n    return s', '    flor.log("score", s)\n    yield s')
    need = _need("import metrics", "list(metrics.score(net))", metrics=gen)
    assert need.kind == "inner" and "generator" in need.reason, need.reason


def test_a_module_list_that_training_appends_to_re_executes():
    hist = METRICS + "\n\nHIST = []\n\n\ndef note(x):\n    HIST.append(x)\n\n\ndef last():\n" \
                     "    flor.log('last', len(HIST))\n"
    need = _need("import metrics", "metrics.last()", name="last", metrics=hist)
    assert need.kind == "inner" and "'HIST'" in need.reason, need.reason


def test_a_script_callback_that_applies_the_model_re_executes():
    model = "import flor_ray as flor\nimport torch\n\n\nclass Net(torch.nn.Module):\n" \
            "    def __init__(self):\n        super().__init__()\n        self.fc = torch.nn.Linear(2, 2)\n\n" \
            "    def forward(self, x):\n        flor.log('fwd', 1)\n        return self.fc(x)\n"
    script = ("import flor_ray as flor\nimport torch\nfrom model import Net\n\nmodel = Net()\n\n\n"
              "def probe():\n    return model(torch.ones(2))\n\n\nhooks = {'probe': probe}\n"
              "with flor.checkpointing(model=model):\n    for e in flor.loop('epoch', range(2)):\n"
              "        pass\n")
    need = dict(module_needs(script, "main.py", {"main.py": script, "model.py": model}, ["model.py"]))["fwd"]
    assert need.kind == "inner" and "probe()" in need.reason, need.reason


def test_a_namespace_package_resolves():
    helper = "import flor_ray as flor\n\n\ndef report(m):\n    flor.log('w', float(m.weight.sum()))\n"
    script = textwrap.dedent(SCRIPT).format(imports="import lib.metrics", setup="",
                                            after=" " * 8 + "lib.metrics.report(net)")
    files = {"main.py": script, "lib/metrics.py": helper}
    need = dict(module_needs(script, "main.py", files, ["lib/metrics.py"]))["w"]
    assert need.kind == "outer", need.reason


def test_state_a_module_training_loop_fills_makes_the_reader_re_execute():
    helpers = ("import flor_ray as flor\n\n\ndef fit(model, loader, stats):\n"
               "    for x in flor.loop('step', loader):\n        stats['n'] = stats.get('n', 0) + 1\n\n\n"
               "def report(model, stats):\n    flor.log('seen', stats['n'])\n\n\n"
               "def weights(model):\n    flor.log('w', float(model.weight.sum()))\n")
    script = ("import torch\nimport flor_ray as flor\nimport helpers\n\nnet = torch.nn.Linear(2, 2)\n"
              "stats = {}\nwith flor.checkpointing(net=net):\n    for e in flor.loop('epoch', range(2)):\n"
              "        helpers.fit(net, [1, 2], stats)\n        helpers.report(net, stats)\n"
              "        helpers.weights(net)\n")
    found = dict(module_needs(script, "main.py", {"main.py": script, "helpers.py": helpers}, ["helpers.py"]))
    assert found["seen"].kind == "inner" and "'stats'" in found["seen"].reason, found["seen"].reason
    assert found["w"].kind == "outer", found["w"].reason  # the model is restored where fit's loop exits


def test_a_module_used_as_a_value_re_executes():
    need = _need("import metrics", "getattr(metrics, 'score')(net)")
    assert need.kind == "inner" and "as a value" in need.reason, need.reason


def test_a_dataset_method_runs_where_the_loader_is_iterated():
    data = ("import flor_ray as flor\nimport torch\n\n\nclass Squares(torch.utils.data.Dataset):\n"
            "    def __len__(self):\n        return 4\n\n    def __getitem__(self, i):\n"
            "        flor.log('item', i)\n        return torch.ones(2) * i\n")
    script = ("import torch\nimport flor_ray as flor\nfrom data import Squares\n\nnet = torch.nn.Linear(2, 2)\n"
              "loader = torch.utils.data.DataLoader(Squares(), batch_size=2)\n"
              "with flor.checkpointing(net=net):\n    for e in flor.loop('epoch', range(2)):\n"
              "        for x in flor.loop('step', loader):\n            net(x).sum().backward()\n")
    need = dict(module_needs(script, "main.py", {"main.py": script, "data.py": data}, ["data.py"]))["item"]
    assert need.kind == "inner", need.reason


def test_a_script_class_applying_the_model_re_executes():
    model = "import flor_ray as flor\nimport torch\n\n\nclass Net(torch.nn.Module):\n" \
            "    def __init__(self):\n        super().__init__()\n        self.fc = torch.nn.Linear(2, 2)\n\n" \
            "    def forward(self, x):\n        flor.log('fwd', 1)\n        return self.fc(x)\n"
    script = ("import flor_ray as flor\nimport torch\nfrom model import Net\n\nmodel = Net()\n\n\n"
              "class Probe:\n    def run(self):\n        return model(torch.ones(2))\n\n\nprobe = Probe()\n"
              "with flor.checkpointing(model=model):\n    for e in flor.loop('epoch', range(2)):\n"
              "        probe.run()\n")
    need = dict(module_needs(script, "main.py", {"main.py": script, "model.py": model}, ["model.py"]))["fwd"]
    assert need.kind == "inner" and "run()" in need.reason, need.reason


class _Tree(dict):
    """A version's files that records which ones were read."""

    def __init__(self, files):
        super().__init__(files)
        self.read: set[str] = set()

    def __getitem__(self, path):
        self.read.add(path)
        return super().__getitem__(path)


def test_only_the_files_the_script_imports_are_read():
    script = "import flor_ray as flor\nfrom pkg.model import Net\nimport helpers\n"
    tree = _Tree({"main.py": script, "pkg/__init__.py": "", "pkg/model.py": "from . import layers\n",
                  "pkg/layers.py": "import torch\n", "helpers.py": "X = 1\n", "tools/plot.py": "import helpers\n",
                  ".venv/lib/helpers.py": "", "notes.txt": "x"})
    files = project_files(tree, "main.py", script, {"tools/plot.py": "import helpers\n"})
    assert set(files) == {"main.py", "pkg/__init__.py", "pkg/model.py", "pkg/layers.py", "helpers.py", "tools/plot.py"}
    assert tree.read == {"pkg/__init__.py", "pkg/model.py", "pkg/layers.py", "helpers.py"}

"""Recording from a real Jupyter kernel (ipykernel, driven by jupyter_client): a run
per ``with flor.run():`` block and per kernel session, the executed cells as the
code version, inline display, and replays of the recorded cells checked bit for bit
against a kernel that ran the cells with the statement typed in by hand."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("ipykernel", reason="recording from a kernel is tested under ipykernel (the test extra)")
jupyter_client = pytest.importorskip("jupyter_client", reason="the kernel is driven by jupyter_client (the test extra)")

import flor_ray  # noqa: E402
from flor_ray.errors import PlanningError  # noqa: E402
from flor_ray.execution.driver import LocalRunner, run_plan  # noqa: E402
from flor_ray.planning.plan import ClusterSnapshot, SkipKind  # noqa: E402
from flor_ray.store import Store  # noqa: E402
from flor_ray.store.logs import read_logs  # noqa: E402

from conftest import REPO_ROOT, clean_env, git, init_repo  # noqa: E402

HELPERS = '''
import torch


def make_data(n=48, seed=3):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 4, generator=g)
    return X, X @ torch.tensor([[1.0], [-2.0], [0.5], [0.0]]) + 0.1 * torch.randn(n, 1, generator=g)
'''

CELLS = [
    "import torch\nimport torch.nn as nn\nfrom torch.utils.data import DataLoader, TensorDataset\n"
    "import flor_ray as flor\nfrom helpers import make_data",
    textwrap.dedent('''
        X, Y = make_data()

        def make_net(seed):
            torch.manual_seed(seed)
            return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.1), nn.Linear(8, 1))

        def evaluate(net):
            net.eval()
            with torch.no_grad():
                out = nn.functional.mse_loss(net(X), Y).item()
            net.train()
            return out
    '''),
    "%matplotlib inline",
    # the block runs: {lr} and {extra} filled in
    textwrap.dedent('''
        with flor.run():
            lr = flor.arg("lr", {lr})
            net = make_net(0)
            opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
            loader = DataLoader(TensorDataset(X, Y), batch_size=8, shuffle=True,
                                generator=torch.Generator().manual_seed(1))
            with flor.checkpointing(model=net, optimizer=opt):
                for epoch in flor.loop("epoch", range(4)):
                    for x, y in flor.loop("step", loader):
                        opt.zero_grad()
                        loss = nn.functional.mse_loss(net(x), y)
                        loss.backward()
                        opt.step()
                        flor.log("loss", loss.item())
                    flor.log("val", evaluate(net)){extra}
    '''),
    'df = flor.dataframe("val")\ndf',
    None,  # the second block run
    'flor.plot("val")',
    "!echo from the shell",
    # the kernel-session run: flor calls outside any block
    'for k in flor.loop("round", range(2)):\n    flor.log("probe", evaluate(net) + k)',
]
NEW = '\n            flor.log("wnorm", net[0].weight.norm().item())'


def _cells(extra: str = "") -> list[str]:
    cells = list(CELLS)
    cells[3] = CELLS[3].format(lr=0.05, extra=extra)
    cells[5] = CELLS[3].format(lr=0.02, extra=extra)
    return cells


class Kernel:
    """A real ipykernel in ``cwd``; :meth:`run` executes a cell and returns its outputs."""

    def __init__(self, cwd: Path, env: dict):
        self.km = jupyter_client.KernelManager(kernel_name="python3")
        self.km.shutdown_wait_time = 60  # its atexit ends the session run: never signalled mid-write
        self.km.start_kernel(cwd=str(cwd), env=env)
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)

    def run(self, code: str) -> list[dict]:
        outputs: list[dict] = []

        def keep(msg: dict) -> None:
            if msg["msg_type"] in ("stream", "display_data", "execute_result", "error"):
                outputs.append({"type": msg["msg_type"], **msg["content"]})

        reply = self.kc.execute_interactive(code, timeout=120, output_hook=keep)
        if reply["content"]["status"] != "ok":
            raise AssertionError(f"cell failed: {code!r}: {reply['content'].get('evalue')} {outputs}")
        return outputs

    def shutdown(self, crash: bool = False) -> None:
        self.kc.stop_channels()
        # clean: the kernel's atexit ends its session run; crash: SIGKILL, nothing runs
        self.km.shutdown_kernel(now=crash)


def _record(tmp: Path, cells: list[str], store: Path, crash: bool = False) -> tuple[Path, list[list[dict]]]:
    tmp.mkdir()
    repo = init_repo(tmp)
    nb = repo / "nb"
    nb.mkdir()
    (nb / "helpers.py").write_text(HELPERS)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "helpers")
    env = clean_env(FLOR_STORE=str(store), JPY_SESSION_NAME=str(nb / "train.ipynb"))
    kernel = Kernel(nb, env)
    try:
        outs = [kernel.run(c) for c in cells]
    finally:
        kernel.shutdown(crash)
    return repo, outs


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A kernel that ran the cells (two block runs, then a session run), and one that ran them with
    the new statement typed in by hand (the oracle), each into its own store."""
    from concurrent.futures import ThreadPoolExecutor

    base = tmp_path_factory.mktemp("nb")
    with ThreadPoolExecutor(2) as pool:  # two kernels side by side: their start-ups and torch imports overlap
        # the oracle's kernel is killed at the end: what its session run recorded must be in its store
        hand_run = pool.submit(_record, base / "hand", _cells(NEW), base / "hand-store", True)
        repo, outs = _record(base / "proj", _cells(), base / "store")
        hand_run.result()
    store, hand = Store(str(base / "store")), Store(str(base / "hand-store"))
    return repo, store, hand, outs


def _runs(store: Store):
    return flor_ray.runs(store=store).sort_values("started_at").reset_index(drop=True)


def test_each_block_and_the_kernel_session_are_runs_with_their_cells_as_code(recorded):
    repo, store, _, _ = recorded
    runs = _runs(store)
    assert len(runs) == 3, runs
    assert list(runs["status"]) == ["finished"] * 3
    assert list(runs["lr"][:2]) == [0.05, 0.02]
    metas = [store.read_json(f"runs/{r}.json") for r in runs["run_id"]]
    assert {m["script"] for m in metas} == {"nb/.flor_notebook_train.py"}
    assert [m["block"].get("block") for m in metas] == [1, 2, None] and metas[2]["block"]["after_blocks"] == 2
    assert [m["notebook"]["cells"] for m in metas] == [[1, 2, 3, 4], [1, 2, 3, 4, 5, 6], list(range(1, 10))]
    assert metas[0]["notebook"]["path"].endswith("nb/train.ipynb")
    assert metas[2]["notebook"]["kernel_session"] and not metas[0]["notebook"]["kernel_session"]
    code = flor_ray.notebook_code(runs["run_id"][1], store=store)
    cells = _cells()
    pos = [code.index(f"# %% In[{n}]\n") for n in range(1, 7)]
    assert pos == sorted(pos) and "In[7]" not in code
    assert cells[0] in code and cells[5].strip() in code
    assert "pass  # %matplotlib" in code and "run_line_magic" not in code
    # the version is the repository's snapshot plus the cells' file, on the run's hidden ref
    tree = git(repo, "ls-tree", "-r", "--name-only", f"refs/flor/{runs['run_id'][1]}").split()
    assert set(tree) == {"nb/helpers.py", "nb/.flor_notebook_train.py"}
    assert git(repo, "status", "--porcelain") == ""  # the checkout is untouched
    # the session run's version grew with the cells it ran, and the kernel's shutdown ended it
    assert "# %% In[9]" in flor_ray.notebook_code(runs["run_id"][2], store=store)
    df = flor_ray.dataframe("val", "probe", store=store)
    counts = df.groupby("run_id")["val"].count()
    assert [counts[r] for r in runs["run_id"]] == [4, 4, 0]
    assert df["probe"].notna().sum() == 2


def test_dataframe_and_plot_display_inline_in_the_kernel(recorded):
    _, _, _, outs = recorded
    shown = outs[4][-1]
    assert shown["type"] == "execute_result" and "text/html" in shown["data"], outs[4]
    assert shown["data"]["text/plain"].count("\n") >= 4  # the first run's 4 epochs
    img = [o for o in outs[6] if o["type"] in ("execute_result", "display_data") and "image/png" in o["data"]]
    assert img, outs[6]


def test_a_new_statement_replays_into_the_block_runs_bit_for_bit(recorded, tmp_path):
    repo, store, hand, _ = recorded
    runs = _runs(store)
    today = tmp_path / "today.py"
    code = flor_ray.notebook_code(runs["run_id"][1], store=store)
    marker = '            flor.log("val", evaluate(net))'
    assert code.count(marker) == 2
    today.write_text(code.replace(marker, marker + NEW))
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(REPO_ROOT)
    try:
        plan = flor_ray.plan_replay(["wnorm"], store=store, script=today, cluster=ClusterSnapshot(2))
        text = plan.explain()
        assert {t.run_id for t in plan.tasks} == set(runs["run_id"][:2]), text
        refused = [s for s in plan.skipped if s.kind is SkipKind.NOT_REPLAYABLE]
        assert [s.run_id for s in refused] == [runs["run_id"][2]], text
        report = run_plan(plan, progress=False, runner=LocalRunner())
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old
    assert not report.failed, str(report)
    assert report.fidelity.mismatched == 0

    def values(st: Store, source: str) -> list[list[float]]:
        t = read_logs(st, ["wnorm"], sources=(source,)).to_pandas()
        order = {r: i for i, r in enumerate(_runs(st)["run_id"])}
        t = t.assign(o=t["run_id"].map(order)).sort_values(["o", "iter0"])
        return [list(g["value_float"]) for _, g in t.groupby("o")]

    replayed, by_hand = values(store, "replay"), values(hand, "record")
    assert len(replayed) == 2 and all(len(v) == 4 for v in replayed)
    assert replayed == by_hand[:2]  # bit for bit: floats compared exactly


def test_a_run_whose_cells_a_script_cannot_run_is_refused_with_the_reason(recorded, monkeypatch):
    repo, store, _, _ = recorded
    runs = _runs(store)
    monkeypatch.chdir(repo)  # no script=: the cells are no file of the checkout, and the error says what to do
    with pytest.raises(PlanningError, match=r"recorded in a notebook.*flor\.notebook_code"):
        flor_ray.plan_replay(["wnorm"], store=store)
    meta = store.read_json(f"runs/{runs['run_id'][2]}.json")
    why = meta["replay_refused"]
    assert "cell In[8]" in why and "!echo from the shell" in why, why
    assert "replay_refused" not in store.read_json(f"runs/{runs['run_id'][0]}.json")


def test_a_killed_kernel_loses_nothing_of_its_session_run(recorded):
    _, _, hand, _ = recorded
    runs = _runs(hand)
    assert list(runs["status"]) == ["finished", "finished", "incomplete"], runs  # never ended: the kernel was killed
    session = runs["run_id"][2]
    # each cell's end flushed its rows and its code before the kernel went idle
    assert hand.read_json(f"runs/{session}.json")["notebook"]["cells"] == list(range(1, 10))
    assert "# %% In[9]" in flor_ray.notebook_code(session, store=hand)
    probe = flor_ray.dataframe("probe", store=hand)
    assert probe["probe"].notna().sum() == 2


def test_a_script_never_imports_ipython(repo):
    from conftest import run_script, write

    write(repo, "train.py", """
        import sys
        import flor_ray as flor
        for i in flor.loop("epoch", range(2)):
            flor.log("x", i)
        assert not any(m.split(".")[0] in ("IPython", "ipykernel", "jupyter_client") for m in sys.modules)
    """)
    run_script(repo, fork=False)  # a new process: what the recording itself imports

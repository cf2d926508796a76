"""``flor-ray demo``: the whole idea on a small real history, in one to two minutes.

It makes a git repository with a small torch training script, records runs of three
versions that differ the way real histories do (a renamed variable, the train step
moved into a function, a learning-rate scheduler added), adds two new log statements
to today's version, and back-fills them on a local Ray: ``wnorm`` at the epoch level
(each task restores a checkpoint per epoch and skips the training loop) and ``gnorm``
inside the train step (each task re-executes training from a checkpoint). It prints
each plan with its estimate, the report, recorded and hindsight columns side by side
per run and epoch, and writes PNG plots. The directory stays behind so the user can
try the CLI on it.

The epochs are made heavy enough (8192 samples, 256 steps, about 0.4 s on one core)
that a checkpoint costs well under the default 1% budget, so every epoch is
checkpointed; where a machine is so fast that it is not, the demo says so and the
plan falls back to the nearest earlier checkpoint.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["run_demo", "V1", "V2", "V3", "with_statements", "plain", "HISTORY"]

MARKER = ".flor-ray-demo"  # marks a directory the demo made, so that a rerun may replace it
N, BATCH = 8192, 32  # 256 steps per epoch: ~0.4 s on one core, ~500x a checkpoint of this model
STEPS = N // BATCH

HEAD = f'''
import random

import torch
import torch.nn as nn

import flor_ray as flor

torch.manual_seed(0)
random.seed(0)
lr = flor.arg("lr", 0.05)
epochs = flor.arg("epochs", 4)
X = torch.randn({N}, 8)
Y = (X[:, 0] - X[:, 2] > 0).long()
'''

# v1: `net`, train step inline
V1 = HEAD + f'''
net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 2))
opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)

with flor.checkpointing(net=net, opt=opt):
    for epoch in flor.loop("epoch", range(epochs)):
        net.train()
        perm = torch.randperm({N})
        for step in flor.loop("step", range({STEPS})):
            idx = perm[step * {BATCH} : step * {BATCH} + {BATCH}]
            loss = nn.functional.cross_entropy(net(X[idx]), Y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            #GNORM_NET
            flor.log("loss", loss.item())
        net.eval()
        with torch.no_grad():
            acc = (net(X).argmax(1) == Y).float().mean().item()
        flor.log("acc", acc)
        #WNORM_NET
        print(f"epoch {{epoch}}: acc {{acc:.3f}}")
'''

# v2: renamed to `model`; the train step extracted into a function
V2 = HEAD + f'''
model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 2))
opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)


def train_step(idx):
    loss = nn.functional.cross_entropy(model(X[idx]), Y[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
    #GNORM_MODEL
    return loss


with flor.checkpointing(model=model, opt=opt):
    for epoch in flor.loop("epoch", range(epochs)):
        model.train()
        perm = torch.randperm({N})
        for step in flor.loop("step", range({STEPS})):
            loss = train_step(perm[step * {BATCH} : step * {BATCH} + {BATCH}])
            flor.log("loss", loss.item())
        model.eval()
        with torch.no_grad():
            acc = (model(X).argmax(1) == Y).float().mean().item()
        flor.log("acc", acc)
        #WNORM_MODEL
        print(f"epoch {{epoch}}: acc {{acc:.3f}}")
'''

# v3 = today's shape: a learning-rate scheduler added
V3 = V2.replace(
    "opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)\n",
    "opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)\n"
    "scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)\n",
).replace("with flor.checkpointing(model=model, opt=opt):", "with flor.checkpointing(model=model, opt=opt, scheduler=scheduler):").replace(
    '        flor.log("acc", acc)\n        #WNORM_MODEL\n',
    '        flor.log("acc", acc)\n        scheduler.step()\n        #WNORM_MODEL\n',
)

#: (commit message, source, learning rate of its run)
HISTORY = [
    ("v1: first version", V1, "0.05"),
    ("v2: net renamed model, train step extracted", V2, "0.1"),
    ("v3: learning-rate scheduler added", V3, "0.1"),
]

GNORM = 'flor.log("gnorm", sum(p.grad.norm() ** 2 for p in {m}.parameters()).item())'
WNORM = 'flor.log("wnorm", {m}[0].weight.norm().item())'


def with_statements(src: str) -> str:
    """The version with both statements typed in by hand."""
    for m in ("net", "model"):
        src = src.replace(f"#GNORM_{m.upper()}", GNORM.format(m=m)).replace(f"#WNORM_{m.upper()}", WNORM.format(m=m))
    return src


def plain(src: str) -> str:
    """The version as recorded: without the placeholder lines for the new statements."""
    return "\n".join(ln for ln in src.splitlines() if not ln.strip().startswith("#")) + "\n"


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=flor-ray demo", "-c", "user.email=demo@localhost",
                    "-c", "commit.gpgsign=false", *args], cwd=repo, check=True, capture_output=True)


def _say(msg: str) -> None:
    print(f"\n== {msg}", flush=True)


def _record(repo: Path, env: dict, lr: str) -> float:
    """Run ``python train.py --kwargs lr=...`` as a user would; its output indented."""
    from .errors import FlorError

    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "train.py", "--kwargs", f"lr={lr}"], cwd=repo, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        print("   |", line.rstrip(), flush=True)
        tail = (tail + [line.rstrip()])[-15:]
    if proc.wait() != 0:
        raise FlorError(f"recording `python train.py --kwargs lr={lr}` in {str(repo)!r} failed "
                        f"(exit {proc.returncode}): {tail[-1] if tail else 'no output'}; "
                        "see the output above, or run it by hand in that directory")
    return time.time() - t0


def _checkpoint_note(meta: dict, budget: float) -> str:
    """Where a run checkpointed, and why, from its manifest and timings (``meta`` as
    :func:`flor_ray.store.runs.with_timings` gives it)."""
    from .store.runs import timings_left_out

    if timings_left_out(meta):
        raise ValueError(f"run {meta.get('run_id')}'s timings were left out of its metadata: use with_timings")
    its = [m["iteration"] for m in meta.get("checkpoints") or []]
    n = int(meta.get("iterations") or 0)
    t = meta.get("timings") or {}
    outer = list(t.get("outer_s") or [])
    cks = list(t.get("checkpoint_s") or [])
    taken = [(c, o) for c, o in zip(cks, outer) if c]
    epoch_s = sum(outer) / len(outer) if outer else 0.0
    shares = sorted(c / max(o - c, 1e-9) for c, o in taken)
    typical = shares[len(shares) // 2] if shares else 0.0
    note = (f"{n} epochs of {epoch_s:.2f}s; a checkpoint cost about {100 * typical:.2f}% of an epoch "
            f"(budget {100 * budget:g}%): checkpoints after epochs {', '.join(map(str, its)) or 'none'}")
    missing = [i for i in range(n) if i not in its]
    if missing:
        note += (f"\n     (on this machine, now, checkpoints cost too much next to these short epochs, so the period "
                 f"adapted; replays of epochs {', '.join(map(str, missing))} restore the nearest earlier checkpoint "
                 "and re-execute from there. FLOR_CHECKPOINT_BUDGET=0.05 would checkpoint more often)")
    return note


def run_demo(directory: str | os.PathLike = "flor-ray-demo", gnorm: bool = True) -> Path:
    """Build the demo repository in ``directory`` (new or empty) and walk through it."""
    t0 = time.time()
    repo = _new_demo_repo(directory)
    # the demo's runs go to the repository's own .flor/, whatever FLOR_STORE or a config file say;
    # the other FLOR_* settings (FLOR_CHECKPOINT_BUDGET...) apply to its recordings as to any
    env = {k: v for k, v in os.environ.items() if k not in ("FLOR_STORE", "FLOR_CONFIG", "FLOR_REPLAY")}
    store = str(repo / ".flor")
    budget = _checkpoint_budget(env)
    _record_history(repo, env)
    _show_runs(store, budget)
    _write_today(repo)
    reports = _backfill(repo, store, gnorm)
    _show_results(repo, store, gnorm)
    _conclude(repo, reports, time.time() - t0)
    return repo


def _new_demo_repo(directory: str | os.PathLike) -> Path:
    """``directory`` as a new git repository, refused where it would hold the user's own files."""
    from .errors import FlorError

    repo = Path(directory).expanduser().resolve()
    if shutil.which("git") is None:
        raise FlorError("the demo needs git (flor_ray snapshots each run's code in git); install git and rerun")
    here = Path.cwd().resolve()
    if repo == here or repo in here.parents:
        raise FlorError(f"the demo directory {str(repo)!r} holds the current directory; run the demo from "
                        "elsewhere or pass a new directory")
    if (repo / MARKER).is_file():  # a previous demo, made here: start it over (`make demo` twice)
        print(f"replacing the previous demo in {repo}")
        shutil.rmtree(repo)
    elif repo.exists() and (not repo.is_dir() or any(repo.iterdir())):
        raise FlorError(f"demo directory {str(repo)!r} exists and is not empty; pass a new directory, "
                        f"e.g. `flor-ray demo {repo.parent / (repo.name + '-2')}`")
    print(f"flor-ray demo in {repo}: a git repository, a small torch training script, three versions of it.")
    repo.mkdir(parents=True, exist_ok=True)
    (repo / MARKER).write_text("made by `flor-ray demo`; a later demo in this directory replaces it\n")
    _git(repo, "init", "-q")
    _git(repo, "symbolic-ref", "HEAD", "refs/heads/main")
    (repo / ".gitignore").write_text(f"__pycache__/\n*.png\n{MARKER}\n")
    return repo


def _record_history(repo: Path, env: dict[str, str]) -> None:
    _say("1. record three versions of train.py, each with `python train.py --kwargs lr=...`")
    for title, src, lr in HISTORY:
        (repo / "train.py").write_text(plain(src))
        _git(repo, "add", "train.py", ".gitignore")
        _git(repo, "commit", "-qm", title)
        print(f"-- commit {title!r}; record it with lr={lr}", flush=True)
        secs = _record(repo, env, lr)
        print(f"   recorded in {secs:.1f}s", flush=True)


def _checkpoint_budget(env: dict[str, str]) -> float:
    """The budget the recordings will use, to say why they checkpoint where they do."""
    from .config import ENV_VARS, Settings, _coerce

    raw = env.get(ENV_VARS["checkpoint_budget"])
    return _coerce("checkpoint_budget", raw, "environment") if raw else Settings().checkpoint_budget


def _show_runs(store: str, budget: float) -> None:
    import flor_ray

    from .api import resolve_store
    from .store.runs import load_runs, with_timings

    _say("2. the runs (`flor-ray runs`)")
    runs = flor_ray.runs(store=store)
    print(runs.assign(version=runs["version"].str[:8])[["run_id", "version", "status", "lr", "iterations"]]
          .to_string(index=False))
    st = resolve_store(store)
    for meta in with_timings(st, load_runs(st)):
        print(f"   {meta['run_id']}: {_checkpoint_note(meta, budget)}")


def _write_today(repo: Path) -> None:
    today = with_statements(V3)
    (repo / "train.py").write_text(today)
    _say("3. months later, today's train.py (not committed) logs two values nobody recorded:")
    for line in today.splitlines():
        if "wnorm" in line or "gnorm" in line:
            where = "epoch level" if "wnorm" in line else "inside the train step, every step"
            print(f"    {line.strip()}    # {where}")


def _backfill(repo: Path, store: str, gnorm: bool) -> list:
    """Plan, explain and run the back-fill of wnorm (and gnorm) on a Ray this demo starts if none is up."""
    import ray

    import flor_ray

    from .errors import FlorError
    from .execution.driver import run_plan

    started_ray = False
    if not ray.is_initialized():
        try:
            where = _start_ray()
        except Exception as exc:  # noqa: BLE001 - Ray's own error, named for the user
            raise FlorError(f"could not start or reach Ray: {type(exc).__name__}: {exc}; check `ray status`, "
                            "unset RAY_ADDRESS for a local Ray, or rerun with --verbose") from exc
        started_ray = True
        print(f"\n{where}", flush=True)
    reports = []
    try:
        steps = [("wnorm", "epoch level: each task restores the run's checkpoints and skips the training loop")]
        if gnorm:
            steps.append(("gnorm", "inside the inner loop: tasks re-execute training from a checkpoint"))
        for i, (name, why) in enumerate(steps):
            _say(f"4{'ab'[i]}. back-fill {name} into every run ({why}); "
                 f"the plan (`flor-ray replay {name} --dry-run`), then the run")
            plan = flor_ray.plan_replay([name], store=store, script=repo / "train.py")
            print(plan.explain(), flush=True)
            report = run_plan(plan)
            print(report, flush=True)
            reports.append(report)
    finally:
        if started_ray:
            ray.shutdown()
    return reports


def _show_results(repo: Path, store: str, gnorm: bool) -> None:
    import flor_ray

    from .queries.plot import plot_metric

    _say("5. recorded and hindsight values side by side, per run and epoch (`flor-ray df acc wnorm`)")
    table = _side_by_side(store, gnorm)
    print(table.to_string(index=False))
    print("   recorded: loss_mean (mean over the epoch's steps), acc; hindsight (back-filled): wnorm"
          + (", gnorm_mean" if gnorm else "")
          + (";\n   acc__replay: acc recomputed by the replay, compared with the recording (fidelity)"
             if "acc__replay" in table else ""))
    pngs = [plot_metric(flor_ray.dataframe("wnorm", store=store), "wnorm", repo / "wnorm.png")]
    if gnorm:
        pngs.append(plot_metric(flor_ray.dataframe("gnorm", store=store), "gnorm", repo / "gnorm.png", by="version"))
    _say("6. plots: " + ", ".join(pngs))


def _conclude(repo: Path, reports: list, seconds: float) -> None:
    """The summary and what to try next; a failed replay task fails the demo."""
    from .errors import FlorError

    failed = sum(len(r.failed) for r in reports)
    mism = sum(r.fidelity.mismatched for r in reports)
    status = "all tasks done" if not failed else f"{failed} task(s) FAILED (see the reports above)"
    print(f"\ndone in {seconds:.0f}s: {status}; {mism} fidelity mismatches.\n"
          f"The repository stays in {repo}. Try, there:\n"
          "  flor-ray runs\n"
          "  flor-ray df acc wnorm\n"
          "  flor-ray sql \"SELECT name, count(*) AS n FROM logs GROUP BY name ORDER BY name\"\n"
          "  flor-ray replay gnorm --dry-run\n"
          "  flor-ray plot wnorm --by version -o wnorm_by_version.png\n"
          "  git log --oneline; git show-ref | grep refs/flor   # your history, and the runs' snapshots")
    if failed:
        raise FlorError(f"the demo's replay had {failed} failed task(s); the reports above say why")


def _start_ray() -> str:
    """RAY_ADDRESS's cluster if set; else a new local Ray of this process, bound to 127.0.0.1.

    ``address="local"`` so that the demo never attaches to a Ray that someone started
    on this machine with ``ray start`` (what a bare ``ray.init()`` does).
    """
    import logging

    import ray

    if os.environ.get("RAY_ADDRESS"):
        from .execution.driver import ensure_ray

        ensure_ray()
        return f"connected to the Ray cluster at RAY_ADDRESS={os.environ['RAY_ADDRESS']}"
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # bind 127.0.0.1 only
    pkg_parent = str(Path(__file__).resolve().parents[1])  # workers import this flor_ray
    env_vars = {"PYTHONPATH": os.pathsep.join(filter(None, [pkg_parent, os.environ.get("PYTHONPATH")]))}
    ray.init(address="local", runtime_env={"env_vars": env_vars}, include_dashboard=False, log_to_driver=False,
             logging_level=logging.ERROR)
    cpus = int(ray.cluster_resources().get("CPU", 0))
    return f"started a local Ray for the demo: 127.0.0.1 only, {cpus} CPU(s), each replay task taking as many CPUs as its run had threads"


def _side_by_side(store: str, gnorm: bool):
    """One row per (run, epoch): lr, recorded loss (mean of steps) and acc, hindsight wnorm/gnorm."""
    import flor_ray

    ep = flor_ray.dataframe("acc", "wnorm", store=store)
    cols = ["run_id", "version", "lr", "epoch"]
    keep = cols + [c for c in ("acc", "acc__replay", "wnorm") if c in ep]
    ep = ep[keep].drop_duplicates(["run_id", "epoch"], keep="last")  # one row per run and epoch, whatever else replayed acc
    steps = flor_ray.dataframe("loss", *(["gnorm"] if gnorm else []), store=store)
    means = steps.groupby(["run_id", "epoch"], sort=False)[[c for c in ("loss", "gnorm") if c in steps]].mean()
    means = means.rename(columns=lambda c: f"{c}_mean").reset_index()
    out = ep.merge(means, on=["run_id", "epoch"], how="left")
    out["version"] = out["version"].str[:8]
    order = cols + ["loss_mean", "acc"] + [c for c in ("acc__replay", "wnorm", "gnorm_mean") if c in out]
    return out[order]

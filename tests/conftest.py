"""Shared fixtures: real git repositories in temp dirs, scripts run as real processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# the S3 request counter is the benchmarks' (bench_store --s3 counts with it too)
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
from _common import Counting  # noqa: E402,F401
SHARED = REPO_ROOT.parent / "shared"

# A tiny but real training script: a torch MLP with dropout, SGD with momentum,
# shuffling from torch, python and numpy RNGs, step- and epoch-level logs.
TRAIN_SCRIPT = textwrap.dedent(
    '''
    import random

    import numpy as np
    import torch
    import torch.nn as nn

    import flor_ray as flor

    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    lr = flor.arg("lr", 0.05)
    epochs = flor.arg("epochs", 4)
    X = torch.randn(96, 8)
    Y = (X[:, 0] + X[:, 1] > 0).long()
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 2))
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)

    with flor.checkpointing(net=net, opt=opt):
        for epoch in flor.loop("epoch", range(epochs)):
            net.train()
            perm = torch.randperm(96)
            offset = random.randint(0, 3) + int(np.random.randint(0, 2))
            for step in flor.loop("step", range(6)):
                idx = perm[(step * 16 + offset) % 80 : (step * 16 + offset) % 80 + 16]
                loss = nn.functional.cross_entropy(net(X[idx]), Y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                flor.log("loss", loss.item())
            net.eval()
            with torch.no_grad():
                acc = (net(X).argmax(1) == Y).float().mean().item()
            flor.log("acc", acc)
    '''
)


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    r = tmp_path / "proj"
    r.mkdir()
    return init_repo(r)


def init_repo(path: Path) -> Path:
    """``path`` as a new git repository on branch main, with a committer set."""
    git(path, "init", "-q", "-b", "main")
    git(path, "config", "user.email", "dev@example.com")
    git(path, "config", "user.name", "Dev")
    return path


def clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOR_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    env.update(extra)
    return env


#: the suite's fork server of scripts (tests/script_zygote.py), started on first use
_ZYGOTE: list = []


def start_script(repo: Path, script: str = "train.py", *args: str, env: dict | None = None,
                 fork: bool | None = None):
    """``python script args...`` in ``repo``, its stdout and stderr captured as text: a
    ``subprocess.Popen`` or, forked from the suite's warm zygote, an object with the
    same ``args``, ``pid``, ``returncode``, ``poll``, ``wait``, ``communicate`` and ``kill``.
    ``fork`` None: forked when that is as faithful as a new process (the environment
    differs from ``clean_env()`` only in variables read at run time) and the suite
    was not run with ``FLOR_TEST_FORK=0``; False: a plain process (tests that time
    imports or the process's start, or look at what the process imported)."""
    env = env or clean_env()
    if fork is None:
        fork = os.environ.get("FLOR_TEST_FORK", "1") != "0" and hasattr(os, "fork")
    if fork:
        from script_zygote import Zygote

        if not _ZYGOTE:
            _ZYGOTE.append(Zygote(clean_env()))
        differs = _ZYGOTE[0].differs(env)
        if not differs:
            proc = _ZYGOTE[0].start(repo, script, args, env)
            if proc is not None:
                _launched("fork", repo, script)
                return proc
        _launched(f"new process ({' '.join(differs) or 'the zygote failed'})", repo, script)
    else:
        _launched("new process", repo, script)
    return subprocess.Popen([sys.executable, script, *args], cwd=repo, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _launched(how: str, repo: Path, script: str) -> None:
    """FLOR_TEST_FORK_LOG=path: a line per script started, forked or not (to see which tests fork)."""
    log = os.environ.get("FLOR_TEST_FORK_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{how}\t{os.environ.get('PYTEST_CURRENT_TEST', '').split(' ')[0]}\t{repo}/{script}\n")


def run_script(repo: Path, script: str = "train.py", *args: str, env: dict | None = None, check: bool = True,
               fork: bool | None = None, timeout: float | None = None) -> subprocess.CompletedProcess:
    """Run ``python script args...`` in ``repo`` to its end (:func:`start_script`)."""
    proc = start_script(repo, script, *args, env=env, fork=fork)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if check and done.returncode != 0:
        raise AssertionError(f"{script} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done


def write(repo: Path, name: str, text: str) -> Path:
    p = repo / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(textwrap.dedent(text))
    return p


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray for the session (num_cpus=2), bound to 127.0.0.1."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    from flor_ray.execution.driver import ensure_ray

    if not ray.is_initialized():
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
        # replay tasks take store credentials from their environment, never from the plan:
        # these are the ones the moto S3 servers of the tests accept
        creds = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": creds})
    ensure_ray()
    yield ray
    ray.shutdown()


class S3:
    """A moto S3 server on 127.0.0.1 that can be stopped and started again on one port
    (its buckets kept), for stores that fail and come back."""

    def __init__(self):
        import socket

        from moto.server import ThreadedMotoServer

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self._cls = ThreadedMotoServer
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server = None
        self.start()

    def start(self):
        self.server = self._cls(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self):
        self.server.stop()

    def env(self, **extra) -> dict:
        return clean_env(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1",
                         AWS_ENDPOINT_URL=self.endpoint, **extra)

    def store(self, url: str):
        from flor_ray.store import Store

        return Store(url, {"key": "test", "secret": "test",
                           "client_kwargs": {"endpoint_url": self.endpoint, "region_name": "us-east-1"}})

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="test",
                            aws_secret_access_key="test", region_name="us-east-1")


def reads_during(store, work, want: int) -> list[bool]:
    """Run ``work()`` on a thread while reading the store's ``loss`` rows in a loop (the
    dataframe and an SQL count): every read holds each (run, epoch, step) exactly once.
    Whether each read began while ``work`` ran; ``work``'s exception is raised here."""
    import flor_ray
    from flor_ray.queries.cache import CACHE

    done = threading.Event()
    errors: list[BaseException] = []

    def run():
        try:
            work()
        except BaseException as exc:  # noqa: BLE001 - raised below, on the test's thread
            errors.append(exc)
        finally:
            done.set()

    seen: list[bool] = []
    worker = threading.Thread(target=run)
    worker.start()
    while not done.is_set() or not seen:
        during = not done.is_set()
        CACHE.reset()
        df = flor_ray.dataframe("loss", store=store)
        assert len(df) == want and not df.duplicated(["run_id", "epoch", "step"]).any()
        CACHE.reset()
        n = flor_ray.sql("SELECT count(*) AS n, count(DISTINCT (run_id, iter0, iter1)) AS d FROM logs "
                         "WHERE name = 'loss'", store=store)
        assert (int(n["n"][0]), int(n["d"][0])) == (want, want)
        seen.append(during)
    worker.join()
    if errors:
        raise errors[0]
    return seen


# ------------------------------------------------------------- the checkout stays as it was
# A test writes under tmp_path, never into the checkout: the session fails when a file
# that git does not ignore appeared or changed in it during the run. Source files
# (.py and the project's text files) are left out of the check: a developer may edit
# them while the suite runs.
_EDITED_BY_HAND = {".py", ".md", ".toml", ".cfg", ".txt", ".yaml", ".yml", ".html", ".js", ".css"}


def _checkout_status() -> set[str] | None:
    """``git status``'s entries (untracked or modified, not ignored); None outside a git checkout."""
    proc = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "-z"], cwd=REPO_ROOT,
                          capture_output=True, text=True)
    return set(filter(None, proc.stdout.split("\0"))) if proc.returncode == 0 else None


def _checkout_changes(before: set[str], since: float) -> list[str]:
    """The entries of ``git status`` that the run added, for files written since ``since``."""
    out = []
    for entry in sorted((_checkout_status() or set()) - before):
        path = REPO_ROOT / entry[3:]
        try:
            written = path.stat().st_mtime
        except OSError:  # deleted: a test removed a file of the checkout
            out.append(entry)
            continue
        if written >= since and path.suffix not in _EDITED_BY_HAND:
            out.append(entry)
    return out


def pytest_sessionstart(session):
    import time

    session.config._flor_checkout = (_checkout_status(), time.time())  # type: ignore[attr-defined]


def pytest_sessionfinish(session, exitstatus):
    before, started = getattr(session.config, "_flor_checkout", (None, 0.0))
    if before is None:  # not a git checkout (an unpacked archive): nothing to compare
        return
    changed = _checkout_changes(before, started)
    if changed:
        sys.stderr.write("\ntests wrote into the checkout (write under tmp_path instead):\n  "
                         + "\n  ".join(changed) + "\n")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED

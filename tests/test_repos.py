"""Recording in repositories as users have them, and trusting the code a replay runs.

Shapes: the store listed in ``.gitignore`` or in a global excludes file, no commit
yet, a detached HEAD, the script in a subdirectory (run from there and from the
root), a submodule, a linked worktree, symlinks, 20,000 untracked files. The
``.gitignore`` and subdirectory shapes are replayed on the local Ray and compared,
value for value, with full runs of the script with the statements typed in by hand;
the others check the snapshot's files and that materialising the version gives them
back. Then the code trust: a planted cache directory never runs, a tampered blob in
the store is a clear error, and a recording that cannot start leaves no ref.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import flor_ray
from flor_ray.errors import ConfigError
from flor_ray.execution.cache import cache_root, checked_copy
from flor_ray.execution.driver import LocalRunner, run_plan
from flor_ray.store.logs import read_logs
from flor_ray.store import Store
from flor_ray.versions import TamperedFile, blob_id, materialize, read_file, read_version

from conftest import clean_env, git, init_repo, run_script, start_script, write

# ---------------------------------------------------------------- scripts
HELPERS = '''
import torch
from torch.utils.data import DataLoader, TensorDataset


def make_loader(n, batch, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 4, generator=g)
    Y = (X[:, 0] > X[:, 1]).long()
    return DataLoader(TensorDataset(X, Y), batch_size=batch, shuffle=True)


def train_step(net, opt, xb, yb):
    loss = torch.nn.functional.cross_entropy(net(xb), yb)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()
'''

TRAIN = '''
import argparse
from pathlib import Path

import torch
import torch.nn as nn

import flor_ray as flor
from helpers import make_loader, train_step

parser = argparse.ArgumentParser()
parser.add_argument("--batch", type=int, default=16)
args = parser.parse_args()
seed = int(Path("seed.txt").read_text())  # relative to the working directory
torch.manual_seed(seed)
loader = make_loader(64, args.batch, seed)
net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
opt = torch.optim.SGD(net.parameters(), lr=flor.arg("lr", 0.1), momentum=0.9)
sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)

with flor.checkpointing(net=net, opt=opt, sched=sched):
    for epoch in flor.loop("epoch", range(3)):
        net.train()
        for xb, yb in flor.loop("step", loader):
            flor.log("loss", train_step(net, opt, xb, yb))
        sched.step()
        #NEW
'''
NEW = ('flor.log("wnorm", net[0].weight.norm().item())\n'
       '        flor.log("bnorm", net[2].bias.norm().item())')
TODAY = TRAIN.replace("#NEW", NEW)

# light scripts (no torch) for the shapes that are only recorded and materialised
LIGHT = '''
import argparse

import flor_ray as flor
from util import scale

parser = argparse.ArgumentParser()
parser.add_argument("--n", type=int, default=3)
args = parser.parse_args()
for epoch in flor.loop("epoch", range(args.n)):
    flor.log("x", scale(epoch))
'''
UTIL = "def scale(x):\n    return 2 * x\n"


def _popen(cwd: Path, script: str, env: dict | None = None) -> subprocess.Popen:
    return start_script(cwd, script, env=env)


def _wait(procs) -> None:
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, f"{out}\n{err}"


def _init(path: Path) -> Path:
    path.mkdir(parents=True)
    init_repo(path)
    return path


def _commit(repo: Path, msg: str = "code") -> None:
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", msg)


def _ignored_layout(root: Path, train: str) -> None:
    write(root, ".gitignore", ".flor/\n__pycache__/\n")
    write(root, "train.py", train)
    write(root, "helpers.py", HELPERS)
    write(root, "seed.txt", "3\n")


def _subdir_layout(root: Path, train: str) -> None:
    write(root, ".gitignore", "__pycache__/\n")
    write(root, "src/train.py", train)
    write(root, "src/helpers.py", HELPERS)
    write(root, "src/seed.txt", "5\n")  # read when run from src/
    write(root, "seed.txt", "7\n")  # read when run from the root


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, ray_local):
    """Two repositories recorded (the store in .gitignore; the script in src/ run from
    there and from the root), each with a twin recording the statements typed in."""
    base = tmp_path_factory.mktemp("repos")
    ign, ign_hand = _init(base / "ignored"), _init(base / "ignored-hand")
    sub, sub_hand = _init(base / "subdir"), _init(base / "subdir-hand")
    _ignored_layout(ign, TRAIN)
    _ignored_layout(ign_hand, TODAY)
    _subdir_layout(sub, TRAIN)
    _subdir_layout(sub_hand, TODAY)
    for r in (ign, ign_hand, sub, sub_hand):
        _commit(r)
    status = git(ign, "status", "--porcelain")
    env = clean_env(FLOR_CHECKPOINT_BUDGET="0.5")
    _wait([_popen(ign, "train.py", env), _popen(ign_hand, "train.py"),
           _popen(sub / "src", "train.py", env), _popen(sub_hand / "src", "train.py")])
    _wait([_popen(sub, "src/train.py", env), _popen(sub_hand, "src/train.py")])
    write(ign, "train.py", TODAY)
    write(sub, "src/train.py", TODAY)
    return {"ignored": (ign, ign_hand), "subdir": (sub, sub_hand), "status_before": status}


def _store(repo: Path) -> Store:
    return Store(str(repo / ".flor"))


def _by_cwd(store: Store, name: str, source: str) -> list:
    """(run's cwd, epoch, value) of each row of ``name``."""
    cwd = {m["run_id"]: m["cwd"] for m in (store.read_json(f"runs/{p}") for p in store.listdir("runs"))}
    t = read_logs(store, [name], sources=(source,)).to_pandas()
    return sorted(zip(map(cwd.get, t["run_id"]), t["iter0"], t["value_float"]))


def _replay(repo: Path, script: str, name: str, **kw):
    plan = flor_ray.plan_replay([name], store=_store(repo), script=repo / script)
    assert plan.pending, plan.explain()
    report = run_plan(plan, progress=False, **kw)
    assert not report.failed, str(report)
    return plan, report


# ------------------------------------------------------- record and replay
def test_store_in_gitignore_records_and_replays(recorded):
    repo, hand = recorded["ignored"]
    st = _store(repo)
    runs = flor_ray.runs(store=st)
    assert list(runs["status"]) == ["finished"]
    meta = st.read_json(f"runs/{runs.loc[0, 'run_id']}.json")
    assert meta["left_out_of_snapshot"] == [] and meta["cwd"] == "."
    files = git(repo, "ls-tree", "-r", "--name-only", meta["ref"]).split()
    assert sorted(files) == [".gitignore", "helpers.py", "seed.txt", "train.py"]
    assert sorted(read_version(st, meta["version"])["files"]) == sorted(files)
    write(repo, "train.py", TRAIN)
    assert git(repo, "status", "--porcelain") == recorded["status_before"]  # the snapshot touched nothing
    write(repo, "train.py", TODAY)
    plan, report = _replay(repo, "train.py", "wnorm")
    assert _by_cwd(st, "wnorm", "replay") == _by_cwd(Store(str(hand / ".flor")), "wnorm", "record")
    assert report.fidelity.mismatched == 0


def test_script_in_a_subdirectory_run_from_there_and_from_the_root(recorded):
    repo, hand = recorded["subdir"]
    st = _store(repo)
    metas = [st.read_json(f"runs/{p}") for p in st.listdir("runs")]
    assert sorted(m["cwd"] for m in metas) == [".", "src"]
    assert {m["script"] for m in metas} == {"src/train.py"} and len({m["version"] for m in metas}) == 1
    _replay(repo, "src/train.py", "wnorm")
    got, want = _by_cwd(st, "wnorm", "replay"), _by_cwd(Store(str(hand / ".flor")), "wnorm", "record")
    assert got == want and len(got) == 6
    assert {v for c, _, v in got if c == "."}.isdisjoint({v for c, _, v in got if c == "src"})  # two seeds


# ------------------------------------------------------------- code trust
def test_planted_cache_directory_never_runs(recorded, tmp_path, monkeypatch):
    repo, hand = recorded["ignored"]
    st = _store(repo)
    version = flor_ray.runs(store=st).loc[0, "version"]
    monkeypatch.setenv("FLOR_CACHE_DIR", str(tmp_path / "cache"))
    marker = tmp_path / "planted-ran"
    planted = materialize(st, version, tmp_path / "cache" / version)
    (planted / "helpers.py").write_text(f"open({str(marker)!r}, 'w').close()\n" + HELPERS)
    os.chmod(tmp_path / "cache", 0o700)
    _replay(repo, "train.py", "bnorm", runner=LocalRunner())
    assert not marker.exists()
    assert (planted / "helpers.py").read_bytes() == read_file(st, version, "helpers.py")  # rebuilt
    assert _by_cwd(st, "bnorm", "replay") == _by_cwd(Store(str(hand / ".flor")), "bnorm", "record")


@pytest.mark.parametrize("how", ["other owner", "group writable", "a symlink"])
def test_unsafe_cache_entry_is_rebuilt(recorded, tmp_path, monkeypatch, how):
    repo, _ = recorded["ignored"]
    st = _store(repo)
    version = flor_ray.runs(store=st).loc[0, "version"]
    root = tmp_path / "cache"
    monkeypatch.setenv("FLOR_CACHE_DIR", str(root))
    elsewhere = materialize(st, version, tmp_path / "elsewhere")
    (elsewhere / "helpers.py").write_text("raise SystemExit('planted')\n")
    root.mkdir(mode=0o700)
    if how == "a symlink":
        (root / version).symlink_to(elsewhere)
    else:
        shutil.copytree(elsewhere, root / version)
        if how == "other owner":
            if os.getuid() != 0:
                pytest.skip("giving a directory to another user needs root")
            os.chown(root / version, 65534, 65534)
        else:
            os.chmod(root / version, 0o777)
    work = checked_copy(st, version, tmp_path / "work")
    assert (work / "helpers.py").read_bytes() == read_file(st, version, "helpers.py")
    st_entry = os.lstat(root / version)
    assert st_entry.st_uid == os.getuid() and not st_entry.st_mode & 0o022 and not (root / version).is_symlink()
    assert (elsewhere / "helpers.py").read_text() == "raise SystemExit('planted')\n"  # not written through


def test_cache_is_per_user_and_private(recorded, tmp_path, monkeypatch):
    repo, _ = recorded["ignored"]
    st = _store(repo)
    version = flor_ray.runs(store=st).loc[0, "version"]
    monkeypatch.delenv("FLOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "flor_ray" / "versions"
    checked_copy(st, version, tmp_path / "work")
    st_root = os.stat(cache_root())
    assert st_root.st_mode & 0o777 == 0o700 and st_root.st_uid == os.getuid()
    assert sorted(os.listdir(cache_root())) == [version]  # its temporary build dir renamed into place
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "flor_ray" / "versions"
    if os.getuid() == 0:  # a cache root of another user is refused, not used
        shared = tmp_path / "shared"
        shared.mkdir()
        os.chown(shared, 65534, 65534)
        monkeypatch.setenv("FLOR_CACHE_DIR", str(shared))
        with pytest.raises(ConfigError, match="not a directory of this user.*FLOR_CACHE_DIR"):
            checked_copy(st, version, tmp_path / "work2")
        assert os.listdir(shared) == []


def test_tampered_blob_in_the_store_is_a_clear_error(recorded, tmp_path, monkeypatch):
    repo, _ = recorded["ignored"]
    copy = tmp_path / "store"
    shutil.copytree(repo / ".flor", copy)
    for d in copy.glob("logs/*/source=replay"):
        shutil.rmtree(d)
    st = Store(str(copy))
    version = flor_ray.runs(store=st).loc[0, "version"]
    sha = read_version(st, version)["files"]["helpers.py"]
    marker = tmp_path / "planted-ran"
    (copy / "code" / "objects" / sha).write_text(f"open({str(marker)!r}, 'w').close()\n" + HELPERS)
    with pytest.raises(TamperedFile, match=r"'helpers.py' of code version .* was changed or corrupted.*git cat-file"):
        read_file(st, version, "helpers.py")
    monkeypatch.setenv("FLOR_CACHE_DIR", str(tmp_path / "cache"))
    plan = flor_ray.plan_replay(["bnorm"], store=st, script=repo / "train.py")
    report = run_plan(plan, progress=False, runner=LocalRunner())
    assert report.failed and all("TamperedFile" in r.error and "helpers.py" in r.error for r in report.failed)
    assert not marker.exists() and os.listdir(tmp_path / "cache") == []


# ------------------------------------------------- shapes, recorded only
def _record(cwd: Path, script: str = "train.py", env: dict | None = None, store: Path | None = None):
    proc = run_script(cwd, script, env=env or clean_env())
    st = Store(str(store or cwd / ".flor"))
    rid = flor_ray.runs(store=st)["run_id"].iloc[-1]
    return st, st.read_json(f"runs/{rid}.json"), proc


def _assert_materializes(st: Store, meta: dict, root: Path, tmp_path: Path, expect: set[str]) -> Path:
    """The version holds exactly ``expect`` and materialises to the files of ``root``."""
    files = read_version(st, meta["version"])["files"]
    assert set(files) == expect
    out = materialize(st, meta["version"], tmp_path / "materialized")
    for path in expect:
        assert (out / path).read_bytes() == (root / path).read_bytes(), path
    return out


def _light(repo: Path) -> None:
    write(repo, "train.py", LIGHT)
    write(repo, "util.py", UTIL)


def test_store_in_a_global_excludes_file(repo, tmp_path):
    _light(repo)
    (tmp_path / "ignore").write_text(".flor/\n")
    (tmp_path / "gitconfig").write_text(f"[core]\n\texcludesFile = {tmp_path / 'ignore'}\n")
    env = clean_env(GIT_CONFIG_GLOBAL=str(tmp_path / "gitconfig"))
    st, meta, _ = _record(repo, env=env)
    st2, meta2, _ = _record(repo, env=env)
    assert meta["status"] == meta2["status"] == "finished" and meta["version"] == meta2["version"]
    _assert_materializes(st, meta, repo, tmp_path, {"train.py", "util.py"})


def test_no_commit_yet(repo, tmp_path):
    _light(repo)
    st, meta, _ = _record(repo)
    assert git(repo, "rev-list", "--parents", "-n1", meta["ref"]).split() == [meta["commit"]]  # no parent
    assert subprocess.run(["git", "rev-parse", "-q", "--verify", "HEAD"], cwd=repo, capture_output=True).returncode
    assert not (repo / ".git" / "index").exists()  # the user's index was never written
    _assert_materializes(st, meta, repo, tmp_path, {"train.py", "util.py"})


def test_detached_head(repo, tmp_path):
    _light(repo)
    _commit(repo, "one")
    write(repo, "util.py", UTIL.replace("2 * x", "3 * x"))
    _commit(repo, "two")
    git(repo, "checkout", "-q", "--detach", "HEAD~1")
    head = git(repo, "rev-parse", "HEAD").strip()
    write(repo, "util.py", UTIL.replace("2 * x", "4 * x"))  # an edit on top of the detached commit
    st, meta, _ = _record(repo)
    assert git(repo, "rev-parse", f"{meta['ref']}^").strip() == head == git(repo, "rev-parse", "HEAD").strip()
    assert subprocess.run(["git", "symbolic-ref", "-q", "HEAD"], cwd=repo).returncode == 1  # still detached
    out = _assert_materializes(st, meta, repo, tmp_path, {"train.py", "util.py"})
    assert "4 * x" in (out / "util.py").read_text()
    assert list(flor_ray.dataframe("x", store=st)["x"]) == [0, 4, 8]


def test_submodule_commit_and_files_are_recorded(repo, tmp_path):
    lib = _init(tmp_path / "mathlib")
    write(lib, "ops.py", "def scale(x):\n    return 5 * x\n")
    _commit(lib)
    git(repo, "-c", "protocol.file.allow=always", "submodule", "add", "-q", str(lib), "lib")
    write(repo, "train.py", LIGHT.replace("from util import scale", "from lib.ops import scale"))
    write(repo, ".gitignore", ".flor/\n__pycache__/\n")
    _commit(repo)
    sub = repo / "lib"
    write(sub, "ops.py", "def scale(x):\n    return 6 * x\n")
    _commit(sub, "a newer commit in the submodule, not yet in the superproject")
    sub_head = git(sub, "rev-parse", "HEAD").strip()
    write(sub, "ops.py", "def scale(x):\n    return 7 * x\n")  # uncommitted: not recorded
    st, meta, _ = _record(repo)
    assert list(flor_ray.dataframe("x", store=st)["x"]) == [0, 7, 14]
    tree = git(repo, "ls-tree", meta["ref"], "lib").split()
    assert tree[:3] == ["160000", "commit", sub_head]  # the submodule's commit (gitlink)
    manifest = read_version(st, meta["version"])
    assert manifest["submodules"] == {"lib": {"commit": sub_head, "files": True}}
    assert set(manifest["files"]) == {".gitignore", ".gitmodules", "train.py", "lib/ops.py"}
    out = materialize(st, meta["version"], tmp_path / "materialized")
    assert (out / "lib/ops.py").read_text() == "def scale(x):\n    return 6 * x\n"  # its committed files
    assert git(repo, "status", "--porcelain") == " M lib\n"  # untouched

    # a clone without the submodule checked out records too, and says what is missing
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(repo), str(clone))
    _light(clone)  # a script that does not need the submodule
    st2, meta2, _ = _record(clone)
    assert meta2["status"] == "finished"
    subs = read_version(st2, meta2["version"])["submodules"]
    assert subs["lib"]["files"] is False and "git submodule update --init" in subs["lib"]["why"]


def test_linked_worktree(repo, tmp_path):
    _light(repo)
    write(repo, ".gitignore", ".flor/\n__pycache__/\n")
    _commit(repo)
    wt = tmp_path / "wt"
    git(repo, "worktree", "add", "-q", "-b", "feature", str(wt))
    write(wt, "util.py", UTIL.replace("2 * x", "9 * x"))
    before = (git(repo, "status", "--porcelain"), git(wt, "status", "--porcelain"),
              (repo / ".git" / "index").read_bytes())
    st, meta, _ = _record(wt)
    assert (git(repo, "status", "--porcelain"), git(wt, "status", "--porcelain"),
            (repo / ".git" / "index").read_bytes()) == before
    common = git(wt, "rev-parse", "--git-common-dir").strip()
    assert Path(wt, common).resolve() == (repo / ".git").resolve()
    assert meta["ref"] in git(repo, "for-each-ref", "refs/flor")  # hidden refs live in the common dir
    assert git(repo, "rev-parse", f"{meta['ref']}^").strip() == git(wt, "rev-parse", "HEAD").strip()
    out = _assert_materializes(st, meta, wt, tmp_path, {".gitignore", "train.py", "util.py"})
    assert "9 * x" in (out / "util.py").read_text()


def test_symlinks_inside_kept_outside_left_out(repo, tmp_path):
    _light(repo)
    write(repo, "configs/base.yaml", "lr: 0.1\n")
    write(tmp_path / "outside.txt", "", "secret\n")
    links = {"alias.py": "train.py", "conf": "configs", "passwd": "/etc/passwd",
             "up.txt": "../outside.txt", "here": ".", "escape": "here/.."}
    for name, target in links.items():
        os.symlink(target, repo / name)
    st, meta, _ = _record(repo)
    manifest = read_version(st, meta["version"])
    assert manifest["links"] == links and {manifest["modes"][n] for n in links} == {"120000"}
    out = materialize(st, meta["version"], tmp_path / "materialized")
    assert os.readlink(out / "alias.py") == "train.py" and os.readlink(out / "conf") == "configs"
    assert (out / "conf" / "base.yaml").read_text() == "lr: 0.1\n" and os.readlink(out / "here") == "."
    for name in ("passwd", "up.txt", "escape"):
        assert not os.path.lexists(out / name), name
    notes = json.loads((out / ".flor-version.json").read_text())["notes"]
    assert sorted(n.split()[1] for n in notes) == ["escape", "passwd", "up.txt"]
    assert all("outside the code tree" in n for n in notes)


def test_twenty_thousand_untracked_files_are_capped(repo, tmp_path):
    _light(repo)
    data = repo / "data"
    data.mkdir()
    for i in range(20_000):
        (data / f"{i:05d}.txt").write_bytes(b"%d\n" % i)
    st, meta, proc = _record(repo)
    left = 20_000 - (1000 - 2)  # the two .py files go first
    assert f"flor_ray: {left} untracked files" in proc.stderr
    assert "snapshot_max_untracked_files=1000" in proc.stderr and "FLOR_SNAPSHOT_MAX_UNTRACKED_FILES" in proc.stderr
    assert meta["left_out_of_snapshot_count"] == left and len(meta["left_out_of_snapshot"]) == 100
    files = set(read_version(st, meta["version"])["files"])
    assert {"train.py", "util.py"} <= files and len(files) == 1000
    assert not files & set(meta["left_out_of_snapshot"])
    assert len(st.listdir("code/objects")) < 1001  # the rest never reached the store

    # the settings move the caps (on a smaller tree: the 20,000 files were the point above)
    shutil.rmtree(data)
    for i in range(30):
        write(repo, f"data/{i:02d}.txt", "x\n")
    st, meta, proc = _record(repo, env=clean_env(FLOR_SNAPSHOT_MAX_UNTRACKED_FILES="10"))
    assert meta["left_out_of_snapshot_count"] == 22 and "flor_ray: 22 untracked files" in proc.stderr
    assert sorted(read_version(st, meta["version"])["files"])[:3] == ["data/00.txt", "data/01.txt", "data/02.txt"]
    shutil.rmtree(data)
    write(repo, "data/weights.bin", "0" * 100)
    st, meta, proc = _record(repo, env=clean_env(FLOR_SNAPSHOT_MAX_UNTRACKED_TOTAL_BYTES=str(len(LIGHT) + len(UTIL))))
    assert set(read_version(st, meta["version"])["files"]) == {"train.py", "util.py"}
    assert meta["left_out_of_snapshot"] == ["data/weights.bin"] and "flor_ray: 1 untracked files" in proc.stderr


# ------------------------------------------------------------ no orphans
def test_a_run_that_fails_to_start_leaves_no_ref(repo, tmp_path):
    """Ctrl-C between the snapshot and the run's first metadata write: no ref stays.
    (A store that cannot be written does not stop a start: the run spools, see the next test.)"""
    _light(repo)
    st, meta, _ = _record(repo)
    refs = git(repo, "for-each-ref", "refs/flor")
    interrupted = textwrap.dedent('''
        import runpy, sys
        from flor_ray.record.session import RecordSession

        def interrupt(self):  # the user's Ctrl-C, right after the snapshot was taken
            raise KeyboardInterrupt
        RecordSession._write_meta = interrupt
        sys.argv = ["train.py"]
        runpy.run_path("train.py", run_name="__main__")
    ''')
    proc = subprocess.run([sys.executable, "-c", interrupted], cwd=repo, env=clean_env(), capture_output=True,
                          text=True)
    assert proc.returncode != 0 and "KeyboardInterrupt" in proc.stderr
    assert git(repo, "for-each-ref", "refs/flor") == refs


def test_a_store_that_cannot_be_written_at_start_still_records_with_its_ref(repo, tmp_path):
    _light(repo)
    _record(repo)
    before = len(git(repo, "for-each-ref", "refs/flor").splitlines())
    shutil.rmtree(repo / ".flor" / "runs")
    (repo / ".flor" / "runs").write_text("not a directory\n")  # the run's metadata cannot be written
    proc = run_script(repo, env=clean_env(FLOR_SPOOL=str(tmp_path / "spool")))
    assert "spool" in proc.stderr
    assert len(git(repo, "for-each-ref", "refs/flor").splitlines()) == before + 1  # the run's own snapshot
    assert list((tmp_path / "spool").iterdir())  # its metadata and rows, for `flor-ray spool upload`


def test_snapshot_to_a_taken_ref_leaves_it_alone(repo):
    from flor_ray.errors import RepositoryError
    from flor_ray.versions import snapshot

    _light(repo)
    first = snapshot(str(repo), "refs/flor/taken")
    write(repo, "util.py", UTIL.replace("2", "3"))
    with pytest.raises(RepositoryError, match="git snapshot"):
        snapshot(str(repo), "refs/flor/taken")
    assert git(repo, "rev-parse", "refs/flor/taken").strip() == first.commit
    assert blob_id((repo / "util.py").read_bytes()) == git(repo, "hash-object", "util.py").strip()

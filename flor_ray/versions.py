"""Code versions: a git snapshot per run on a hidden ref, mirrored into the store.

At run start the working tree (tracked files plus untracked files that git does not
ignore) is written as a commit on ``refs/flor/<run_id>`` whose parent is ``HEAD``.
It goes through a temporary index file, so the user's ``HEAD``, branch, index and
files are never touched, and the store and oversized untracked files are left out.
The version of a run is the snapshot's *tree* id: two runs of the same code share a
version. The files are also copied into the store, content-addressed by their git
blob ids, so that a replay on any machine needs only the store URL.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Mapping

from .errors import RepositoryError, StoreError

if TYPE_CHECKING:  # pragma: no cover
    from .store import Store

__all__ = ["Snapshot", "find_repo_root", "snapshot", "upload", "read_version", "read_file", "materialize"]

_IDENTITY = {
    "GIT_AUTHOR_NAME": "flor_ray",
    "GIT_AUTHOR_EMAIL": "flor_ray@localhost",
    "GIT_COMMITTER_NAME": "flor_ray",
    "GIT_COMMITTER_EMAIL": "flor_ray@localhost",
}


@dataclass(frozen=True)
class Snapshot:
    repo_root: str
    commit: str
    tree: str
    ref: str
    files: Mapping[str, str] = field(default_factory=dict)  # path -> blob id
    left_out: tuple[str, ...] = ()


class _GitError(Exception):
    def __init__(self, args: Iterable[str], stderr: str):
        super().__init__(f"git {' '.join(args)}: {stderr.strip()}")
        self.stderr = stderr


def _git(cwd: str, *args: str, env: Mapping[str, str] | None = None) -> str:
    """Run ``git args`` in ``cwd``; its stdout. The git binary directly: importing
    GitPython alone costs ~0.1 s, on the training thread at a run's first flor call."""
    full_env = None if env is None else {**os.environ, **env}
    try:
        proc = subprocess.run(["git", *args], cwd=cwd, env=full_env, capture_output=True, encoding="utf-8",
                              errors="surrogateescape")  # paths as os.fsdecode makes them
    except FileNotFoundError as exc:
        if exc.filename == "git":
            raise RepositoryError("flor_ray snapshots each run's code with git, and git is not installed "
                                  "(or not on PATH); install it and retry") from None
        raise _GitError(args, str(exc)) from exc
    except OSError as exc:  # cwd gone, not a directory...
        raise _GitError(args, str(exc)) from exc
    if proc.returncode != 0:
        raise _GitError(args, proc.stderr or f"exit status {proc.returncode}")
    return proc.stdout


def find_repo_root(path: str | os.PathLike) -> str:
    p = Path(path).resolve()
    start = p if p.is_dir() else p.parent
    try:
        top = _git(str(start), "rev-parse", "--show-toplevel").strip()
    except _GitError as exc:
        if "work tree" in exc.stderr:  # a bare repository, or inside a .git directory
            raise RepositoryError(f"{str(p)!r} is in a bare git repository; run the script from a checkout") from None
        raise RepositoryError(
            f"{str(p)!r} is not inside a git repository; flor_ray records the exact code of "
            "each run as a git snapshot: run `git init` in your project (no commit needed) and retry"
            f" (git said: {exc.stderr.strip()[:300]})"
        ) from None
    if not top:
        raise RepositoryError(f"{str(p)!r} is in a bare git repository; run the script from a checkout")
    return str(Path(top).resolve())


def snapshot(
    repo_root: str,
    ref: str,
    *,
    exclude: Iterable[str] = (),
    max_untracked_bytes: int = 10 * 1024 * 1024,
    message: str = "flor_ray snapshot",
    list_files: bool = True,
) -> Snapshot:
    """Commit the working tree to ``ref`` without touching HEAD, index or files.

    Six short git processes (about 20 ms on a small repository): where the index and
    HEAD are, the untracked files (to leave out big ones), ``add -A`` into a copy of
    the index, ``write-tree``, ``commit-tree`` and ``update-ref``; then ``ls-tree``
    for ``files`` unless ``list_files`` is false (:func:`upload` lists them itself:
    a recording leaves that to its background writer).
    """
    excl = [e.strip("/") for e in exclude if e and not e.startswith("..")]
    tmp_index = None
    try:
        out = _git(repo_root, "rev-parse", "--absolute-git-dir", "--git-path", "index", "--revs-only", "HEAD^{commit}")
        lines = out.splitlines()
        git_dir, real_index = lines[0], os.path.join(repo_root, lines[1])
        head = lines[2].strip() if len(lines) > 2 else ""  # empty: no commit yet
        untracked = _git(repo_root, "ls-files", "--others", "--exclude-standard", "-z").split("\0")
        left_out = []
        for rel in untracked:
            if not rel or any(rel == e or rel.startswith(e + "/") for e in excl):
                continue
            try:
                if os.path.getsize(os.path.join(repo_root, rel)) > max_untracked_bytes:
                    left_out.append(rel)
            except OSError:
                continue
        fd, tmp_index = tempfile.mkstemp(prefix="flor-index-", dir=git_dir)
        os.close(fd)
        if os.path.exists(real_index):
            # reuse git's stat cache (fast on big trees), keeping the index's mtime: git
            # trusts an entry's stat data only if the file is older than the index file,
            # and a fresh mtime here would hide edits made in the second the index was
            # written (same size, same whole-second mtime)
            shutil.copy2(real_index, tmp_index)
        else:
            os.unlink(tmp_index)
        env = {"GIT_INDEX_FILE": tmp_index, **_IDENTITY}
        specs = ["."] + [f":(exclude,top){e}" for e in excl + left_out]
        _git(repo_root, "add", "-A", "--", *specs, env=env)
        tree = _git(repo_root, "write-tree", env=env).strip()
        parents = ["-p", head] if head else []
        commit = _git(repo_root, "commit-tree", tree, *parents, "-m", message, env=env).strip()
        _git(repo_root, "update-ref", ref, commit)
        files = tree_files(repo_root, tree) if list_files else {}
    except (_GitError, OSError, IndexError) as exc:
        raise RepositoryError(f"git snapshot of {repo_root!r} failed: {exc}") from exc
    finally:
        if tmp_index is not None and os.path.exists(tmp_index):
            os.unlink(tmp_index)
    return Snapshot(repo_root, commit, tree, ref, files, tuple(left_out))


def tree_files(repo_root: str, tree: str) -> dict[str, str]:
    """Path -> blob id of every file in ``tree``."""
    files = {}
    for line in _git(repo_root, "ls-tree", "-r", "-z", tree).split("\0"):
        if not line:
            continue
        meta, path = line.split("\t", 1)
        mode, kind, sha = meta.split()
        if kind == "blob":
            files[path] = sha
    return files


def _read_blobs(repo_root: str, shas: list[str]) -> Iterator[tuple[str, bytes]]:
    """(sha, content) of each blob, through one ``git cat-file --batch`` process."""
    if not shas:
        return
    proc = subprocess.Popen(["git", "cat-file", "--batch"], cwd=repo_root, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdin is not None and proc.stdout is not None

    def feed() -> None:  # a thread: a large batch would fill both pipes otherwise
        try:
            proc.stdin.write("".join(s + "\n" for s in shas).encode())
            proc.stdin.close()
        except OSError:
            pass

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        for sha in shas:
            header = proc.stdout.readline().split()
            if len(header) != 3 or header[1] != b"blob":
                raise StoreError(f"git cat-file could not read blob {sha}: {b' '.join(header).decode(errors='replace')}")
            data = proc.stdout.read(int(header[2]))
            proc.stdout.read(1)  # the newline after the content
            yield sha, data
    finally:  # also on an early exit: never leave git (or the feeder) blocked on a pipe
        proc.stdout.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        feeder.join()


def upload(store: "Store", snap: Snapshot) -> None:
    """Write the snapshot's files (missing blobs only) and its manifest to the store."""
    rel = f"code/versions/{snap.tree}.json"
    if store.exists(rel):
        return
    files = dict(snap.files) or tree_files(snap.repo_root, snap.tree)
    have = set(store.listdir("code/objects"))
    for sha, data in _read_blobs(snap.repo_root, sorted(set(files.values()) - have)):
        store.write_bytes(f"code/objects/{sha}", data)
    store.write_json(rel, {"tree": snap.tree, "commit": snap.commit, "files": files})


def read_version(store: "Store", version: str) -> dict:
    from .store import safe_component

    safe_component("version", version)
    try:
        return store.read_json(f"code/versions/{version}.json")
    except FileNotFoundError as exc:
        raise StoreError(
            f"code version {version} is not in the store {store.url!r} (its upload did not finish); "
            "the run cannot be replayed from this store"
        ) from exc


def read_file(store: "Store", version: str, path: str) -> bytes:
    files = read_version(store, version)["files"]
    if path not in files:
        raise StoreError(f"version {version} has no file {path!r}; files: {', '.join(sorted(files)[:20])}")
    return store.read_bytes(f"code/objects/{files[path]}")


def materialize(store: "Store", version: str, dest: str | os.PathLike) -> Path:
    """Write every file of ``version`` under ``dest`` (a fresh directory)."""
    dest = Path(dest)
    manifest = read_version(store, version)
    for path, sha in manifest["files"].items():
        target = (dest / path).resolve()
        if not str(target).startswith(str(dest.resolve())):
            raise StoreError(f"version {version} holds a path {path!r} outside its tree")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(store.read_bytes(f"code/objects/{sha}"))
    (dest / ".flor-version.json").write_text(json.dumps({"version": version}))
    return dest

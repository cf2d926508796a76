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
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping

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


def find_repo_root(path: str | os.PathLike) -> str:
    import git

    p = Path(path).resolve()
    start = p if p.is_dir() else p.parent
    try:
        repo = git.Repo(start, search_parent_directories=True)
    except (git.InvalidGitRepositoryError, git.NoSuchPathError) as exc:
        raise RepositoryError(
            f"{str(p)!r} is not inside a git repository; flor_ray records the exact code of "
            "each run as a git snapshot: run `git init` in your project (no commit needed) and retry"
        ) from exc
    if repo.bare or repo.working_tree_dir is None:
        raise RepositoryError(f"{str(p)!r} is in a bare git repository; run the script from a checkout")
    return str(Path(repo.working_tree_dir).resolve())


def snapshot(
    repo_root: str,
    ref: str,
    *,
    exclude: Iterable[str] = (),
    max_untracked_bytes: int = 10 * 1024 * 1024,
    message: str = "flor_ray snapshot",
) -> Snapshot:
    """Commit the working tree to ``ref`` without touching HEAD, index or files."""
    import git

    repo = git.Repo(repo_root)
    excl = [e.strip("/") for e in exclude if e and not e.startswith("..")]
    untracked = repo.git.ls_files("--others", "--exclude-standard", "-z").split("\0")
    left_out = []
    for rel in untracked:
        if not rel or any(rel == e or rel.startswith(e + "/") for e in excl):
            continue
        try:
            if os.path.getsize(os.path.join(repo_root, rel)) > max_untracked_bytes:
                left_out.append(rel)
        except OSError:
            continue
    fd, tmp_index = tempfile.mkstemp(prefix="flor-index-", dir=repo.git_dir)
    os.close(fd)
    try:
        real_index = os.path.join(repo.git_dir, "index")
        if os.path.exists(real_index):
            shutil.copyfile(real_index, tmp_index)  # reuse git's stat cache: fast on big trees
        else:
            os.unlink(tmp_index)
        env = {"GIT_INDEX_FILE": tmp_index, **_IDENTITY}
        specs = ["."] + [f":(exclude,top){e}" for e in excl + left_out]
        repo.git.add("-A", "--", *specs, env=env)
        tree = repo.git.write_tree(env=env)
        parents = ["-p", repo.head.commit.hexsha] if repo.head.is_valid() else []
        commit = repo.git.commit_tree(tree, *parents, "-m", message, env=env)
        repo.git.update_ref(ref, commit)
        files = {}
        for line in repo.git.ls_tree("-r", "-z", tree).split("\0"):
            if not line:
                continue
            meta, path = line.split("\t", 1)
            mode, kind, sha = meta.split()
            if kind == "blob":
                files[path] = sha
    except git.GitCommandError as exc:
        raise RepositoryError(f"git snapshot of {repo_root!r} failed: {exc.stderr or exc}") from exc
    finally:
        if os.path.exists(tmp_index):
            os.unlink(tmp_index)
    return Snapshot(repo_root, commit, tree, ref, files, tuple(left_out))


def upload(store: "Store", snap: Snapshot) -> None:
    """Write the snapshot's files (missing blobs only) and its manifest to the store."""
    import git

    rel = f"code/versions/{snap.tree}.json"
    if store.exists(rel):
        return
    repo = git.Repo(snap.repo_root)
    have = set(store.listdir("code/objects"))
    for sha in sorted(set(snap.files.values()) - have):
        store.write_bytes(f"code/objects/{sha}", repo.odb.stream(bytes.fromhex(sha)).read())
    store.write_json(rel, {"tree": snap.tree, "commit": snap.commit, "files": dict(snap.files)})


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

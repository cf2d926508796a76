"""Code versions: a git snapshot per run on a hidden ref, mirrored into the store.

At run start the working tree (tracked files plus untracked files that git does not
ignore) is written as a commit on ``refs/flor/<run_id>`` whose parent is ``HEAD``.
It goes through a temporary index file, so the user's ``HEAD``, branch, index and
files are never touched; the store and oversized untracked files are left out, and
so are untracked files past a count and a total size (a forgotten dataset or
virtualenv would otherwise be copied at every run start). The version of a run is
the snapshot's *tree* id: two runs of the same code share a version. The files are
also copied into the store, content-addressed by their git blob ids, so that a
replay on any machine needs only the store URL; every blob read back is checked
against its id.

A submodule is recorded as git records it, by its commit (the gitlink), and the
files of that commit are copied into the store under the submodule's path, so a
replay has them; its uncommitted edits are not recorded. Symlinks are kept as
symlinks and materialised only when they point inside the tree.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Mapping

from .codetree import TamperedFile, blob_id, write_files
from .config import SNAPSHOT_LEFT_OUT_LISTED, SNAPSHOT_MAX_SUBMODULE_DEPTH, Settings
from .errors import RepositoryError, StoreError
from .store import layout

if TYPE_CHECKING:  # pragma: no cover
    from .store import Store

__all__ = ["Snapshot", "Listing", "find_repo_root", "snapshot", "discard", "upload", "list_version", "blob_id",
           "read_version", "read_file", "materialize", "write_files", "TamperedFile"]

_IDENTITY = {
    "GIT_AUTHOR_NAME": "flor_ray",
    "GIT_AUTHOR_EMAIL": "flor_ray@localhost",
    "GIT_COMMITTER_NAME": "flor_ray",
    "GIT_COMMITTER_EMAIL": "flor_ray@localhost",
}
#: Kept first when the untracked files are capped: the code and configs a script
#: imports or reads, before data files that happen to sit in the tree.
_CODE_SUFFIXES = frozenset(".py .pyi .pyx .pxd .c .h .cc .cpp .hpp .cu .cuh .sh .yaml .yml .toml .cfg .ini".split())
_LINK = "120000"


@dataclass(frozen=True)
class Snapshot:
    repo_root: str
    commit: str
    tree: str
    ref: str
    files: Mapping[str, str] = field(default_factory=dict)  # path -> blob id
    left_out: tuple[str, ...] = ()  # the first SNAPSHOT_LEFT_OUT_LISTED untracked files left out
    left_out_count: int = 0  # all of them
    left_out_bytes: int = 0


@dataclass(frozen=True)
class _Untracked:
    """The untracked files a snapshot takes, and those it leaves out (sorted)."""

    kept: tuple[str, ...]
    left_out: tuple[str, ...]
    left_out_bytes: int
    capped: bool  # some were left out by the count or total cap, not only by size





class _GitError(Exception):
    def __init__(self, args: Iterable[str], stderr: str):
        super().__init__(f"git {' '.join(args)}: {stderr.strip()}")
        self.stderr = stderr


def _git(cwd: str, *args: str, env: Mapping[str, str] | None = None, input: str | None = None) -> str:
    """Run ``git args`` in ``cwd``; its stdout. The git binary directly: importing
    GitPython alone costs ~0.1 s, on the training thread at a run's first flor call."""
    full_env = None if env is None else {**os.environ, **env}
    try:
        proc = subprocess.run(["git", *args], cwd=cwd, env=full_env, capture_output=True, encoding="utf-8",
                              errors="surrogateescape", input=input)  # paths as os.fsdecode makes them
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


def _priority(path: str) -> tuple:
    """Sort key of an untracked file when they are capped: code first, shallow first."""
    return (os.path.splitext(path)[1] not in _CODE_SUFFIXES, path.count("/"), path)


def _choose_untracked(repo_root: str, listed: Iterable[str], excl: list[str], max_file_bytes: int,
                      max_files: int, max_total_bytes: int) -> _Untracked:
    """Which untracked files the snapshot takes: each under ``max_file_bytes``, then at
    most ``max_files`` of them and ``max_total_bytes`` in all, by :func:`_priority`."""
    candidates, left_out, left_bytes = [], [], 0
    for rel in listed:
        path = rel.rstrip("/")  # "dir/": a nested repository, taken as a gitlink
        if not path or any(path == e or path.startswith(e + "/") for e in excl):
            continue
        full = os.path.join(repo_root, path)
        try:
            st = os.lstat(full)
        except OSError:  # gone since git listed it
            continue
        size = st.st_size if stat.S_ISREG(st.st_mode) else 0
        if rel.endswith("/") and not _has_commit(full):
            left_out.append(path)  # git cannot record a repository without a commit
        elif size > max_file_bytes:
            left_out.append(path)
            left_bytes += size
        else:
            candidates.append((_priority(path), path, size))
    candidates.sort()
    kept, total, capped = [], 0, False
    for _, path, size in candidates:
        if len(kept) >= max_files or total + size > max_total_bytes:
            left_out.append(path)
            left_bytes += size
            capped = True
        else:
            kept.append(path)
            total += size
    return _Untracked(tuple(kept), tuple(sorted(left_out)), left_bytes, capped)


def _has_commit(path: str) -> bool:
    try:
        _git(path, "rev-parse", "--verify", "-q", "HEAD^{commit}")
        return True
    except _GitError:
        return False


def _warn_left_out(chosen: _Untracked, limits: Mapping[str, int]) -> None:
    """Tell the user (stderr) that a replay will not see some of their files."""
    if not chosen.capped:
        return  # only files over snapshot_max_file_bytes: data next to the script, kept quiet
    n, mb = len(chosen.left_out), chosen.left_out_bytes / 1e6
    sample = ", ".join(chosen.left_out[:5]) + (", ..." if n > 5 else "")
    settings = ", ".join(f"{k}={v}" for k, v in limits.items())
    sys.stderr.write(
        f"flor_ray: {n} untracked files ({mb:.1f} MB) were left out of this run's code snapshot ({sample}): "
        f"more than the limits {settings}; a replay of this run will not see them. List data and outputs in "
        ".gitignore, commit the code the script needs, or raise the limits (FLOR_SNAPSHOT_MAX_UNTRACKED_FILES, "
        "FLOR_SNAPSHOT_MAX_UNTRACKED_TOTAL_BYTES or the config file). The run's metadata lists them "
        "(left_out_of_snapshot).\n"
    )


def snapshot(
    repo_root: str,
    ref: str,
    *,
    exclude: Iterable[str] = (),
    max_untracked_bytes: int = Settings.snapshot_max_file_bytes,
    max_untracked_files: int = Settings.snapshot_max_untracked_files,
    max_untracked_total_bytes: int = Settings.snapshot_max_untracked_total_bytes,
    message: str = "flor_ray snapshot",
    list_files: bool = True,
    extra: Mapping[str, str] | None = None,
    replace: str | None = None,
) -> Snapshot:
    """Commit the working tree to ``ref`` without touching HEAD, index or files.

    Seven short git processes (about 20 ms on a small repository): where the index
    and HEAD are, the untracked files, ``add -u`` (tracked files, submodule commits)
    and ``update-index --add`` of the untracked files taken into a copy of the index,
    ``write-tree``, ``commit-tree`` and ``update-ref``; then ``ls-tree`` for ``files``
    unless ``list_files`` is false (:func:`upload` lists them itself: a recording
    leaves that to its background writer). The untracked files are named to git one
    by one rather than through ``add -A`` and exclude pathspecs: an exclude that names
    an ignored path (a store listed in ``.gitignore``) makes ``add`` fail, and
    thousands of excludes make its matching quadratic. Nothing is left behind on a
    failure: the ref is deleted again if a later step fails.

    ``extra`` adds files that are not in the working tree (path -> text: a notebook's
    executed cells as a script, :mod:`flor_ray.record.notebook`), written over any file
    of that path. ``replace``: the commit ``ref`` holds now, moved to the new snapshot
    (a notebook run's code grows with the cells it runs); None: the ref must not exist.
    """
    excl = [e.strip("/") for e in exclude if e and not e.startswith("..")]
    tmp_index, commit = None, ""
    try:
        out = _git(repo_root, "rev-parse", "--absolute-git-dir", "--git-path", "index", "--revs-only", "HEAD^{commit}")
        lines = out.splitlines()
        git_dir, real_index = lines[0], os.path.join(repo_root, lines[1])  # a linked worktree has its own
        head = lines[2].strip() if len(lines) > 2 else ""  # empty: no commit yet
        listed = _git(repo_root, "ls-files", "--others", "--exclude-standard", "-z").split("\0")
        chosen = _choose_untracked(repo_root, listed, excl, max_untracked_bytes, max_untracked_files,
                                   max_untracked_total_bytes)
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
        _git(repo_root, "add", "-u", env=env)
        if chosen.kept:  # --remove: a file deleted since it was listed is no error
            _git(repo_root, "update-index", "--add", "--remove", "-z", "--stdin", env=env,
                 input="".join(p + "\0" for p in chosen.kept))
        for path, text in sorted((extra or {}).items()):
            sha = _git(repo_root, "hash-object", "-w", "--no-filters", "--stdin", input=text).strip()
            _git(repo_root, "update-index", "--add", "--cacheinfo", f"100644,{sha},{path}", env=env)
        tree = _git(repo_root, "write-tree", env=env).strip()
        parents = ["-p", head] if head else []
        commit = _git(repo_root, "commit-tree", tree, *parents, "-m", message, env=env).strip()
        _git(repo_root, "update-ref", ref, commit, replace or "")  # "": the ref must not exist yet
        files = tree_files(repo_root, tree) if list_files else {}
    except BaseException as exc:
        if commit and replace is None:
            _drop_ref(repo_root, ref, commit)
        if isinstance(exc, (_GitError, OSError, IndexError)):
            raise RepositoryError(f"git snapshot of {repo_root!r} failed: {exc}") from exc
        raise
    finally:
        if tmp_index is not None and os.path.exists(tmp_index):
            os.unlink(tmp_index)
    _warn_left_out(chosen, {"snapshot_max_untracked_files": max_untracked_files,
                            "snapshot_max_untracked_total_bytes": max_untracked_total_bytes})
    return Snapshot(repo_root, commit, tree, ref, files, chosen.left_out[:SNAPSHOT_LEFT_OUT_LISTED],
                    len(chosen.left_out), chosen.left_out_bytes)


def _drop_ref(repo_root: str, ref: str, commit: str) -> None:
    """Delete ``ref`` if it still points at ``commit`` (best effort: a cleanup)."""
    try:
        _git(repo_root, "update-ref", "-d", ref, commit)
    except (_GitError, RepositoryError):
        pass


def discard(snap: Snapshot) -> None:
    """Undo :func:`snapshot`'s ref, for a recording that failed to start."""
    _drop_ref(snap.repo_root, snap.ref, snap.commit)


def _ls_tree(root: str, treeish: str) -> Iterator[tuple[str, str, str, str]]:
    """(mode, kind, id, path) of every entry of ``treeish``, recursively."""
    for line in _git(root, "ls-tree", "-r", "-z", "--full-tree", treeish).split("\0"):
        if line:
            meta, path = line.split("\t", 1)
            mode, kind, sha = meta.split()
            yield mode, kind, sha, path


def tree_files(repo_root: str, tree: str) -> dict[str, str]:
    """Path -> blob id of every file in ``tree`` (a submodule's files not included)."""
    return {path: sha for _, kind, sha, path in _ls_tree(repo_root, tree) if kind == "blob"}


@dataclass(frozen=True)
class Listing:
    """What a version holds, as the store's manifest records it."""

    files: Mapping[str, str]  # path -> blob id; a submodule's files under its path
    modes: Mapping[str, str]  # path -> git mode, where not a plain file (100755, 120000)
    links: Mapping[str, str]  # symlink path -> its target
    submodules: Mapping[str, Mapping[str, object]]  # path -> {"commit", "files": bool, "why"}
    sources: Mapping[str, frozenset[str]]  # repository root -> the blob ids read from it

    def manifest(self, tree: str, commit: str) -> dict:
        return {"tree": tree, "commit": commit, "files": dict(self.files), "modes": dict(self.modes),
                "links": dict(self.links), "submodules": {k: dict(v) for k, v in self.submodules.items()}}


def list_version(repo_root: str, tree: str) -> Listing:
    """The files of ``tree``, with those of its submodules' recorded commits."""
    files: dict[str, str] = {}
    modes: dict[str, str] = {}
    subs: dict[str, dict] = {}
    sources: dict[str, set[str]] = {}
    link_blobs: dict[str, dict[str, str]] = {}  # root -> path -> blob id

    def collect(root: str, treeish: str, prefix: str, depth: int) -> None:
        for mode, kind, sha, path in _ls_tree(root, treeish):
            full = prefix + path
            if kind == "blob":
                files[full] = sha
                sources.setdefault(root, set()).add(sha)
                if mode != "100644":
                    modes[full] = mode
                if mode == _LINK:
                    link_blobs.setdefault(root, {})[full] = sha
            elif kind == "commit":  # a gitlink: take the files of that commit from the checkout
                sub = os.path.join(root, path)
                why = ""
                if depth >= SNAPSHOT_MAX_SUBMODULE_DEPTH:
                    why = f"submodules nested deeper than {SNAPSHOT_MAX_SUBMODULE_DEPTH}"
                elif not os.path.exists(os.path.join(sub, ".git")):
                    why = "not checked out (git submodule update --init)"
                else:
                    try:
                        collect(sub, sha, full + "/", depth + 1)
                    except _GitError:
                        why = "its commit is not in the checkout (git submodule update)"
                subs[full] = {"commit": sha, "files": not why, **({"why": why} if why else {})}

    collect(repo_root, tree, "", 0)
    links = {}
    for root, by_path in link_blobs.items():
        texts = dict(_read_blobs(root, sorted(set(by_path.values()))))
        links.update({p: os.fsdecode(texts[sha]) for p, sha in by_path.items()})
    return Listing(files, modes, links, subs, {r: frozenset(s) for r, s in sources.items()})


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
            if len(data) != int(header[2]):  # git was ended mid-blob (a signal to the process group)
                raise StoreError(f"git cat-file stopped after {len(data)} of the {header[2]} bytes of blob {sha}")
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
    rel = layout.code_version(snap.tree)
    if store.exists(rel):
        return
    listing = list_version(snap.repo_root, snap.tree)
    have = set(store.listdir(layout.CODE_OBJECTS))
    for root, shas in listing.sources.items():
        for sha, data in _read_blobs(root, sorted(shas - have)):
            store.write_bytes(layout.code_object(sha), data)
            have.add(sha)
    store.write_json(rel, listing.manifest(snap.tree, snap.commit))


#: versions kept read (a version is named by its tree id, so its manifest never changes)
_VERSIONS_KEEP = 256
_versions: dict[tuple[str, str, str], dict] = {}
_versions_lock = threading.Lock()


def read_version(store: "Store", version: str) -> dict:
    """A version's manifest (``files``: path -> blob id), read from the store once per process."""
    from .store import safe_component

    safe_component("version", version)
    key = (*store.key, version)
    with _versions_lock:
        doc = _versions.get(key)
    if doc is None:
        doc = _read_version(store, version)
        with _versions_lock:
            _versions[key] = doc
            while len(_versions) > _VERSIONS_KEEP:
                _versions.pop(next(iter(_versions)))
    return {**doc, "files": dict(doc.get("files") or {})}  # the caller's own copy


def _read_version(store: "Store", version: str) -> dict:
    try:
        return store.read_json(layout.code_version(version))
    except FileNotFoundError as exc:
        raise StoreError(
            f"code version {version} is not in the store {store.url!r} (its upload did not finish); "
            "the run cannot be replayed from this store"
        ) from exc


def _store_blob(store: "Store", version: str, path: str, sha: str) -> bytes:
    """The content of ``path`` of ``version`` from the store, checked against its id."""
    if not (isinstance(sha, str) and len(sha) == 40 and all(c in "0123456789abcdef" for c in sha)):
        raise StoreError(f"code version {version} in the store {store.url!r} names file {path!r} by {sha!r}, "
                         "not a git blob id: its manifest is corrupted; re-record the run")
    try:
        data = store.read_bytes(layout.code_object(sha))
    except FileNotFoundError as exc:
        raise StoreError(f"file {path!r} of code version {version} is missing from the store {store.url!r} "
                         f"(code/objects/{sha}); its upload did not finish: re-record the run") from exc
    if blob_id(data) != sha:
        raise TamperedFile(
            f"file {path!r} of code version {version} in the store {store.url!r} was changed or corrupted: "
            f"code/objects/{sha} does not hash to its id, so this code is not run. Restore it from the "
            f"repository that recorded it (`git cat-file blob {sha} > <store>/code/objects/{sha}`) or "
            "re-record the run", path, sha)
    return data


class VersionFiles(Mapping):
    """A version's Python files as ``path -> text``, each read from the store (and
    checked against its id) only when asked for: propagation pairs today's files by
    path first and reads other files only to find a renamed one."""

    def __init__(self, store: "Store", version: str):
        self.store, self.version = store, version
        self._ids = {p: sha for p, sha in read_version(store, version)["files"].items() if p.endswith(".py")}
        self._texts: dict[str, str] = {}

    def __getitem__(self, path: str) -> str:
        if path not in self._texts:
            if path not in self._ids:
                raise KeyError(path)
            self._texts[path] = _store_blob(self.store, self.version, path, self._ids[path]).decode(errors="replace")
        return self._texts[path]

    def __iter__(self):
        return iter(self._ids)

    def __len__(self) -> int:
        return len(self._ids)


def read_file(store: "Store", version: str, path: str) -> bytes:
    files = read_version(store, version)["files"]
    if path not in files:
        raise StoreError(f"version {version} has no file {path!r}; files: {', '.join(sorted(files)[:20])}")
    return _store_blob(store, version, path, files[path])


def materialize(store: "Store", version: str, dest: str | os.PathLike, manifest: Mapping | None = None) -> Path:
    """Write every file of ``version`` under ``dest`` (a fresh directory), each checked
    against its blob id; ``.flor-version.json`` there says which symlinks were left out."""
    dest = Path(dest)
    manifest = manifest if manifest is not None else read_version(store, version)
    notes = write_files(dest, manifest, lambda path, sha: _store_blob(store, version, path, sha), version)
    (dest / ".flor-version.json").write_text(json.dumps({"version": version, "notes": notes}))
    return dest

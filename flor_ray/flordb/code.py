"""The code of FlorDB's runs: its auto-commits, as flor_ray versions.

FlorDB 4.0.1 commits the working tree when a run ends (``git add -A`` on its shadow
branch ``flor.branch``...), with the subject ``FLOR::Auto-commit::<tstamp>`` and a
``k=v`` line per ``flor.arg`` in the body. The flor_ray version of such a commit
holds its files except ``.flor/`` and ``.<branch>.cmd`` (FlorDB's own records), the
files the project's runs saved with ``torch.save`` (outputs, not code: FlorDB's
``obj_store`` indexes name them, where the project has them) and files over the
snapshot size limit. In its Python files ``import flordb`` is made
``import flor_ray`` (libcst: everything else kept byte for byte), so that a replay
runs the old code under flor_ray. Its id is the git tree id of what it holds, as
for recorded runs.
"""

from __future__ import annotations

import hashlib
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..codetree import blob_id
from ..errors import FlorError
from ..record.args import take_kwargs
from ..store import layout
from ..versions import _read_blobs, list_version

__all__ = ["AutoCommit", "Version", "AUTO_COMMIT", "auto_commits", "git_out", "rewrite_imports", "import_version",
           "write_version", "locate_script", "argv_of"]

AUTO_COMMIT = "FLOR::Auto-commit::"


@dataclass(frozen=True)
class AutoCommit:
    """FlorDB's commit of one run: the code it ran and its args (as text)."""

    commit: str
    tree: str
    args: Mapping[str, str]


@dataclass(frozen=True)
class Version:
    """An imported code version: its manifest and the blobs the store may lack."""

    version: str
    manifest: Mapping[str, Any]
    rewritten: Mapping[str, bytes]  # blob id -> content, for the rewritten files
    read_from: Mapping[str, str]  # blob id -> repository root to read it from


def git_out(cwd: Path, *args: str) -> str | None:
    """``git args`` in ``cwd``: its stdout, or None where git fails (not a repository...)."""
    try:
        proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, encoding="utf-8",
                              errors="surrogateescape")
    except OSError:
        return None
    return proc.stdout if proc.returncode == 0 else None


def auto_commits(root: Path) -> dict[str, AutoCommit]:
    """tstamp -> FlorDB's auto-commit of that run, from every ref of the repository."""
    out = git_out(root, "log", "--all", f"--grep=^{AUTO_COMMIT}", "--format=%H%x00%T%x00%B%x1e")
    found: dict[str, AutoCommit] = {}
    for entry in (out or "").split("\x1e"):
        parts = entry.strip("\n").split("\x00")
        if len(parts) < 3 or not parts[2].startswith(AUTO_COMMIT):
            continue
        lines = parts[2].strip().splitlines()
        args = {}
        for line in lines[1:]:
            k, eq, v = line.strip().partition("=")
            if eq and k.strip():
                args[k.strip()] = v.strip()
        found.setdefault(lines[0][len(AUTO_COMMIT):].strip(), AutoCommit(parts[0], parts[1], args))
    return found


def _transformer():
    """A libcst transformer that makes ``flordb`` imports ``flor_ray`` ones (built on
    first use: libcst is not imported with flor_ray)."""
    import libcst as cst

    class FlorRayImports(cst.CSTTransformer):
        def leave_Import(self, orig, node):
            names = []
            for a in node.names:
                if isinstance(a.name, cst.Name) and a.name.value == "flordb":
                    asname = a.asname or cst.AsName(name=cst.Name("flordb"),
                                                    whitespace_before_as=cst.SimpleWhitespace(" "),
                                                    whitespace_after_as=cst.SimpleWhitespace(" "))
                    a = a.with_changes(name=cst.Name("flor_ray"), asname=asname)
                names.append(a)
            return node.with_changes(names=names)

        def leave_ImportFrom(self, orig, node):
            if not node.relative and isinstance(node.module, cst.Name) and node.module.value == "flordb":
                return node.with_changes(module=cst.Name("flor_ray"))
            return node

    return FlorRayImports()


def rewrite_imports(source: bytes) -> bytes:
    """``source`` with ``import flordb [as x]`` / ``from flordb import ...`` made flor_ray's;
    everything else (comments, formatting) kept. Unparsable code is returned as it is."""
    if b"flordb" not in source:
        return source
    import libcst as cst

    try:
        module = cst.parse_module(source)
    except (cst.ParserSyntaxError, UnicodeDecodeError, ValueError):
        return source
    return module.visit(_transformer()).bytes


def _tree_id(entries: Mapping[str, tuple[str, str]]) -> str:
    """The git tree id of ``path -> (mode, object id)``, as ``git write-tree`` would make it."""
    nested: dict = {}
    for path, entry in entries.items():
        *dirs, name = path.split("/")
        node = nested
        for d in dirs:
            node = node.setdefault(d, {})
        node[name] = entry

    def write(node: dict) -> str:
        parts = []
        for name in sorted(node, key=lambda n: n + "/" if isinstance(node[n], dict) else n):
            mode, sha = ("40000", write(node[name])) if isinstance(node[name], dict) else node[name]
            parts.append(f"{mode} {name}".encode("utf-8", "surrogateescape") + b"\0" + bytes.fromhex(sha))
        body = b"".join(parts)
        return hashlib.sha1(b"tree %d\0" % len(body) + body).hexdigest()

    return write(nested)


def import_version(root: Path, ac: AutoCommit, leave_out: frozenset[str], max_bytes: int) -> Version:
    """The flor_ray version of FlorDB's commit: its files without ``.flor/``, the runs'
    saved outputs and files over ``max_bytes``, flordb imports rewritten."""
    listing = list_version(str(root), ac.tree)
    root_of = {sha: r for r, shas in listing.sources.items() for sha in shas}
    subs = tuple(listing.submodules)
    files, dropped = {}, []
    for path, sha in listing.files.items():
        if path.startswith(".flor/") or path in leave_out or _launcher(path):
            dropped.append(path)
        else:
            files[path] = sha
    sizes = _blob_sizes(root_of, files.values())
    for path in [p for p, sha in files.items() if sizes.get(sha, 0) > max_bytes]:
        dropped.append(path)
        del files[path]
    def in_submodule(p: str) -> bool:  # recorded by its commit: its files are as that commit has them
        return any(p.startswith(s + "/") for s in subs)

    py = {p: sha for p, sha in files.items()
          if p.endswith(".py") and listing.modes.get(p) != "120000" and not in_submodule(p)}
    rewritten: dict[str, bytes] = {}
    by_root: dict[str, list[str]] = {}
    for sha in set(py.values()):
        by_root.setdefault(root_of[sha], []).append(sha)
    texts = {sha: data for r, shas in by_root.items() for sha, data in _read_blobs(r, sorted(shas))}
    changed = []
    for path, sha in py.items():
        new = rewrite_imports(texts[sha])
        if new != texts[sha]:
            files[path] = blob_id(new)
            rewritten[files[path]] = new
            changed.append(path)
    modes = {p: m for p, m in listing.modes.items() if p in files}
    top = {p: (modes.get(p, "100644"), sha) for p, sha in files.items() if not in_submodule(p)}
    top.update({s: ("160000", str(info["commit"])) for s, info in listing.submodules.items()})
    vid = _tree_id(top)
    manifest = {"tree": vid, "commit": ac.commit, "files": files, "modes": modes,
                "links": {p: t for p, t in listing.links.items() if p in files},
                "submodules": {k: dict(v) for k, v in listing.submodules.items()},
                "imported_from": {"tool": "flordb", "commit": ac.commit, "tree": ac.tree,
                                  "rewritten": sorted(changed), "left_out": sorted(dropped)}}
    read_from = {sha: root_of[sha] for sha in files.values() if sha not in rewritten}
    return Version(vid, manifest, rewritten, read_from)


def _launcher(path: str) -> bool:
    """FlorDB's ``.<branch>.cmd`` at the root: the latest run's command line, which
    every run rewrites (in a version it would make each run a version of its own)."""
    return "/" not in path and path.startswith(".") and path.endswith(".cmd")


def _blob_sizes(root_of: Mapping[str, str], shas) -> dict[str, int]:
    """Blob id -> size, one ``git cat-file --batch-check`` per repository (no content read)."""
    by_root: dict[str, list[str]] = {}
    for sha in set(shas):
        by_root.setdefault(root_of[sha], []).append(sha)
    out = {}
    for r, group in by_root.items():
        proc = subprocess.run(["git", "cat-file", "--batch-check=%(objectname) %(objectsize)"], cwd=r,
                              input="".join(s + "\n" for s in group), capture_output=True, text=True)
        for line in proc.stdout.splitlines():
            sha, _, size = line.partition(" ")
            if size.isdigit():
                out[sha] = int(size)
    return out


def locate_script(version: Version, filename: str) -> tuple[str, str | None]:
    """The path of FlorDB's ``filename`` (a script's base name) in the version, or why not."""
    found = sorted(p for p in version.manifest["files"] if p.rsplit("/", 1)[-1] == filename)
    rewritten = [p for p in found if p in version.manifest["imported_from"]["rewritten"]]
    if len(found) == 1 or len(rewritten) == 1:
        return (found if len(found) == 1 else rewritten)[0], None
    commit = version.manifest["commit"][:10]
    if not found:
        return filename, f"its commit {commit} holds no file named {filename!r}, the script FlorDB recorded"
    return filename, (f"its commit {commit} holds {len(found)} files named {filename!r} ({', '.join(found[:4])}) "
                      "and FlorDB recorded only the base name of the script")


def argv_of(root: Path, ac: AutoCommit, tstamp: str) -> list[str]:
    """The run's command-line words after the script, without ``--kwargs``, from the
    ``.<branch>.cmd`` file FlorDB committed with it (when that file is this run's)."""
    listed = git_out(root, "ls-tree", "--name-only", ac.commit) or ""
    for name in listed.splitlines():
        if not (name.startswith(".") and name.endswith(".cmd")):
            continue
        text = git_out(root, "show", f"{ac.commit}:{name}") or ""
        lines = text.splitlines()
        if len(lines) >= 2 and lines[0].strip() == tstamp:
            try:
                words = shlex.split(lines[1])[2:]
                take_kwargs(words)
            except (ValueError, FlorError):
                return []
            return words
    return []


def write_version(store, v: Version, have: set[str]) -> None:
    """Write the version's missing blobs (``have``: those the store holds), then its manifest."""
    rel = layout.code_version(v.version)
    if store.exists(rel):
        return
    for sha, data in v.rewritten.items():
        if sha not in have:
            store.write_bytes(layout.code_object(sha), data)
            have.add(sha)
    by_root: dict[str, list[str]] = {}
    for sha, r in v.read_from.items():
        if sha not in have:
            by_root.setdefault(r, []).append(sha)
    for r, shas in by_root.items():
        for sha, data in _read_blobs(r, sorted(set(shas))):
            store.write_bytes(layout.code_object(sha), data)
            have.add(sha)
    store.write_json(rel, v.manifest)

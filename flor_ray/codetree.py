"""A version's files written to disk: each checked against its git blob id, symlinks
kept only where they stay inside the tree.

The content comes from a ``read(path, blob id)`` callable (the store, or this
machine's cache of materialised versions), which checks it; symlink targets come
from the manifest itself and are checked here. Files are written first and symlinks
last, so no write ever goes through a link.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path, PurePosixPath
from typing import Callable, Mapping

from .errors import StoreError

__all__ = ["TamperedFile", "blob_id", "write_files"]

_LINK, _EXEC = "120000", "100755"


class TamperedFile(StoreError):
    """A file whose content does not hash to the blob id its version names."""

    def __init__(self, message: str, path: str, sha: str):
        super().__init__(message)
        self.path, self.sha = path, sha


def blob_id(data: bytes) -> str:
    """The git blob id of ``data`` (SHA-1 of ``blob <len>\\0`` + data): ~1 ms per MB."""
    h = hashlib.sha1(b"blob %d\0" % len(data))
    h.update(data)
    return h.hexdigest()


def _inside(root: Path, path: str, version: str) -> Path:
    parts = PurePosixPath(path).parts
    if not parts or path.startswith("/") or ".." in parts:
        raise StoreError(f"version {version} holds a path {path!r} outside its tree; its manifest is corrupted")
    return root.joinpath(*parts)


def write_files(dest: Path, manifest: Mapping, read: Callable[[str, str], bytes], version: str) -> list[str]:
    """Write the manifest's files under ``dest`` (fresh), ``read(path, blob id)`` giving
    each file's checked content; symlinks last, and only those that stay in the tree.
    Returns a note per symlink left out."""
    root = Path(dest).resolve()
    modes, links = manifest.get("modes") or {}, manifest.get("links") or {}
    pending, made = [], set()
    for path, sha in sorted(manifest["files"].items()):
        target = _inside(root, path, version)
        if modes.get(path) == _LINK:
            text = links.get(path)
            if not isinstance(text, str) or blob_id(os.fsencode(text)) != sha:
                raise TamperedFile(f"symlink {path!r} of code version {version} does not match its blob id "
                                   f"{sha}: the version's manifest was changed; re-record the run", path, sha)
            pending.append((path, target, text))
            continue
        data = read(path, sha)
        if target.parent not in made:
            target.parent.mkdir(parents=True, exist_ok=True)
            made.add(target.parent)
        target.write_bytes(data)
        if modes.get(path) == _EXEC:
            target.chmod(target.stat().st_mode | 0o111)
    return _make_links(root, pending)


def _within(root: Path, path: str) -> bool:
    return path == str(root) or path.startswith(str(root) + os.sep)


def _make_links(root: Path, pending: list[tuple[str, Path, str]]) -> list[str]:
    notes, made = [], []
    for path, target, text in pending:
        lexical = os.path.normpath(os.path.join(os.path.dirname(path), text))
        if os.path.isabs(text) or lexical == ".." or lexical.startswith(".." + os.sep):
            notes.append(f"symlink {path} -> {text} left out: it points outside the code tree")
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.symlink(text, target)
        except FileExistsError:
            notes.append(f"symlink {path} -> {text} left out: a file of the version has its path")
            continue
        made.append((path, target, text))
    while True:  # a link through other links can still leave the tree (a -> b/.., b -> .)
        out = [m for m in made if not _within(root, os.path.realpath(m[1]))]
        if not out:
            return notes
        for m in out:
            os.unlink(m[1])
            made.remove(m)
            notes.append(f"symlink {m[0]} -> {m[2]} left out: it resolves outside the code tree")

"""The files a replayed script sees and writes: the recorded run's, never the user's.

A replay runs in a scratch copy of the recorded code version (the run's snapshot of
its working tree at its start), so a relative path already reads the files as the
recorded run found them and writes into the copy, which is discarded. Inside the
replayed process :class:`ReplayFiles` extends that to the paths that leave it:

* **The repository by an absolute path.** A path under the recorded run's repository
  root (``/home/me/proj/out/ckpt.pt``, from a recorded ``--out`` argument; a store
  kept in the repository aside) is mapped to the same path in the scratch copy for
  ``open`` to write (so ``Path.write_text``/``write_bytes`` and ``np.save`` too),
  ``os.mkdir``, ``os.replace``/``os.rename`` and ``os.remove``; and to read (``open``,
  ``os.stat``, so ``os.path.exists`` and ``Path.exists``) where the copy has the file,
  or it is one of the script's own checkpoint files: a dataset kept in the
  repository but not in its snapshot is read where it is. A replay leaves the
  working tree as it was.
* **The script's own checkpoint files** (the paths the recording saw it
  ``torch.save`` to, :mod:`flor_ray.record.own_files`), wherever they are. A file
  that did not exist before the recorded run first saved to it reads as absent
  (``os.path.exists`` is False, ``open`` raises ``FileNotFoundError``): a script that
  resumes from ``ckpt.pt`` when it exists replays the recorded run from its start,
  whatever the user's latest training left there. A file that did exist is read if
  it is still the one the recorded run found (the snapshot's copy, or outside the
  repository the same size and modification time); otherwise reading it is a
  :class:`ReplayFileError`, since the replay cannot see what the run resumed from.
* ``torch.save`` does nothing in a replay (a replay restores flor's checkpoints and
  skips most iterations: its saves would not be the recording's). A file the
  recording read back with ``torch.load`` after saving it (the best model, loaded
  after the loop) is read, at the same place in the script, as the bytes the
  recording kept of it (:mod:`flor_ray.record.own_files`), checked by their sha256.
  Reading back any other file that the replay itself ``torch.save``d is a
  :class:`ReplayFileError` rather than a read of an older file. A file the recording
  saved to outside the repository is never written by the replay: opened for
  writing, it is a private copy of the replay.

Writes outside the repository (``/tmp``, a dataset cache, ``~/.cache``) go where
the script sends them, as the recording's did: a replay that downloads a dataset
shares the cache, and a replay must not hide files that the script's libraries
write and read back through paths these hooks do not see (``tarfile``, C code).
"""

from __future__ import annotations

import builtins
import errno
import io
import os
from typing import Any, Callable, Mapping

from ..errors import FlorError

__all__ = ["ReplayFileError", "ReplayFiles"]

_WRITES = set("wax+")


class ReplayFileError(FlorError):
    """A replayed script reads a file whose recorded content the replay cannot show."""


class ReplayFiles:
    """The hooks of one replayed process (installed once, by :meth:`install`)."""

    def __init__(self, tree: str, facts: Mapping[str, Any] | None, run_id: str, keep: tuple[str, ...] = ()):
        self.tree = os.path.abspath(tree)
        #: flor's own folders under the repository (a store kept in it): not mapped
        self.keep = tuple(os.path.abspath(k) for k in keep)
        facts = facts or {}
        root = facts.get("repo_root")
        self.root = os.path.abspath(root) if root else None
        self.saved: dict[str, dict] = dict(facts.get("saved") or {})
        self.names = {os.path.basename(p) for p in self.saved}
        self.run_id = run_id
        self.written: set[str] = set()  # written by this replay: read back as it is
        self.discarded: set[str] = set()  # torch.saved by this replay (not written)
        self._real: dict[str, Any] = {}
        self.notes: dict[str, str] = {}  # for the task's report: the user's files this replay hid
        #: the recording's reads of its own saves, by path (where the script was, the bytes' sha256)
        self.read_back: dict[str, list[dict]] = {}
        for entry in facts.get("read_back") or ():
            if isinstance(entry, dict) and isinstance(entry.get("path"), str):
                self.read_back.setdefault(entry["path"], []).append(entry)
        self.position: Callable[[], list] | None = None  # where the script is (the worker's)
        self.fetch: Callable[[str], bytes] | None = None  # a store file's bytes
        self._served: dict[tuple, int] = {}  # (path, position) -> reads served there
        self._private: str | None = None  # the served copies and the outside files opened for writing
        self._outside: dict[str, str] = {}  # a saved-to path outside the repository -> its private copy

    # -------------------------------------------------------------- the rules
    def mapped(self, path: Any, write: bool = True) -> Any:
        """``path`` with the recorded repository's root replaced by the scratch copy's:
        always to write, to read only where the copy has the file or it is one of the
        script's own checkpoint files (else the user's file is read, as a dataset kept
        in the repository but not in the snapshot)."""
        if isinstance(path, int):
            return path
        p = os.fspath(path)
        if isinstance(p, str) and self._outside:
            moved = self._outside.get(os.path.abspath(p))
            if moved is not None:
                return moved
        if write and isinstance(p, str) and self.saved and self._outside_saved(p):
            return self._private_path(os.path.abspath(p))
        root = self.root
        if not isinstance(p, str) or root is None or not p.startswith(root) or root == self.tree:
            return path
        rest = p[len(root):]
        if rest and rest[0] != os.sep:
            return path
        if any(p == k or p.startswith(k + os.sep) for k in self.keep):
            return path
        mine = self.tree + rest
        if write or os.path.basename(p) in self.names:
            return mine
        try:
            self._real["stat"](mine)
        except OSError:
            return path
        return mine

    def _outside_saved(self, p: str) -> bool:
        """A path the recording torch.saved to, outside the repository (and the scratch copy)."""
        a = os.path.abspath(p)
        if a not in self.saved:
            return False
        inside = [d for d in (self.root, self.tree) if d]
        return not any(a == d or a.startswith(d + os.sep) for d in inside)

    def _folder(self) -> str:
        if self._private is None:
            import shutil
            import tempfile
            import weakref

            self._private = tempfile.mkdtemp(prefix="flor-replay-files-")
            weakref.finalize(self, shutil.rmtree, self._private, True)
        return self._private

    def _private_path(self, a: str) -> str:
        """The replay's own file for ``a``, a saved-to path outside the repository."""
        import hashlib

        moved = os.path.join(self._folder(), hashlib.sha1(a.encode()).hexdigest()[:16] + "-" + os.path.basename(a))
        self._outside[a] = moved
        return moved

    def served(self, target: Any, count: bool = True) -> str | None:
        """The local copy of the bytes the recording read at ``target`` here (the same
        place in the script), or None where it read none there. ``count``: a read (the
        n-th read here gets the n-th recorded one, where they differ)."""
        if not self.read_back or self.position is None or isinstance(target, int):
            return None
        p = os.fspath(target)
        if not isinstance(p, str):
            return None
        recorded = self._recorded(os.path.abspath(p))
        entries = self.read_back.get(recorded)
        if not entries:
            return None
        where = list(self.position())
        here = [e for e in entries if e.get("at") == where]
        if not here:
            return None
        key = (recorded, tuple(where))
        n = self._served.get(key, 0)
        if len({e.get("sha256") for e in here}) == 1:
            entry = here[0]
        elif n < len(here):
            entry = here[n]
        else:
            raise ReplayFileError(
                f"the replayed script of run {self.run_id} reads {recorded} {n + 1} times at {where}, where the "
                f"recording read it {len(here)} times with different contents: the replay cannot tell which to show")
        if count:
            self._served[key] = n + 1
        return self._copy_of(entry, recorded)

    def _copy_of(self, entry: Mapping[str, Any], recorded: str) -> str:
        import hashlib

        digest = str(entry.get("sha256"))
        local = os.path.join(self._folder(), f"read-{digest}{os.path.splitext(recorded)[1]}")
        if self._exists(local):
            return local
        try:
            data = self.fetch(str(entry["stored"])) if self.fetch is not None else None
        except Exception as exc:  # noqa: BLE001 - said with the file's name; the task fails
            raise ReplayFileError(f"run {self.run_id} read back {recorded}, and its kept copy "
                                  f"{entry.get('stored')} cannot be read: {exc}") from exc
        if data is None or hashlib.sha256(data).hexdigest() != digest:
            raise ReplayFileError(f"run {self.run_id} read back {recorded}, and its kept copy {entry.get('stored')} "
                                  "is not the bytes it read (damaged): the replay cannot show the script that file")
        with self._real["open"](local + ".tmp", "wb") as f:
            f.write(data)
        self._real["replace"](local + ".tmp", local)
        return local

    def _recorded(self, a: str) -> str:
        """The recording's name of the absolute path ``a`` of this replay."""
        if self.root is not None and (a == self.tree or a.startswith(self.tree + os.sep)):
            return self.root + a[len(self.tree):]
        return a

    def check(self, target: Any, reading: bool) -> None:
        """Raise where ``target`` (mapped) must not be read (``reading``) or seen."""
        if isinstance(target, int) or not self.names:
            return
        p = os.fspath(target)
        if not isinstance(p, str) or os.path.basename(p) not in self.names:
            return
        a = os.path.abspath(p)
        info = self.saved.get(self._recorded(a))
        if info is not None and info.get("opened") and a in self.written:
            if reading:  # a torch.save into a file the replay opened: nothing was written
                raise ReplayFileError(
                    f"the replayed script of run {self.run_id} reads {p}, which it torch.saved earlier in this "
                    "replay, at a place where the recording did not torch.load it; a replay does not write "
                    "torch.save files (it skips most iterations): log the value from the objects in memory instead")
            return
        if info is None or a in self.written or (info.get("opened") and "existed" not in info):
            return  # not a saved-to path, the replay's own file, or nothing known of its start
        if a in self.discarded:
            if reading:
                raise ReplayFileError(
                    f"the replayed script of run {self.run_id} reads {p}, which it torch.saved earlier in this "
                    "replay; a replay does not write torch.save files (it skips most iterations, so they would "
                    "not be the recording's): log the value from the objects in memory instead")
            return
        if not info.get("existed"):
            if a not in self.notes and self._exists(self._recorded(a)):
                self.notes[a] = (f"run {self.run_id}: {self._recorded(a)} read as absent, as when the run started "
                                 "(the file there now is a later one; left as it is)")
            raise FileNotFoundError(errno.ENOENT, f"absent when run {self.run_id} started (flor_ray replay)", p)
        self._same_as_recorded(p, a, info)

    def _exists(self, a: str) -> bool:
        try:
            self._real["stat"](a)
        except OSError:
            return False
        return True

    def _same_as_recorded(self, p: str, a: str, info: Mapping[str, Any]) -> None:
        inside = a.startswith(self.tree + os.sep)
        try:
            st = self._real["stat"](a)
        except OSError:
            st = None
        if inside and st is not None:
            return  # the snapshot's copy: the file as the run found it at its start
        if st is not None and (st.st_size, st.st_mtime_ns) == (info.get("bytes"), info.get("mtime_ns")):
            return
        how = ("was left out of the run's code snapshot (ignored by git or too big)" if inside else
               "has changed since the run started" if st is not None else "is gone")
        raise ReplayFileError(
            f"run {self.run_id} found {self._recorded(a)} when it started (it may have resumed from it), and the "
            f"file {how}: the replay cannot show the script that file; replay a run that started without it, "
            "or keep resume files in the repository's snapshot")

    # -------------------------------------------------------------- the hooks
    def install(self) -> None:
        if getattr(builtins.open, "_flor_replay", False):
            return
        real = self._real
        real.update(open=builtins.open, io_open=io.open, stat=os.stat, mkdir=os.mkdir, replace=os.replace,
                    rename=os.rename, remove=os.remove, unlink=os.unlink)

        def _open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            writing = bool(_WRITES & set(mode))
            if not writing and self.read_back:
                copy = self.served(file)
                if copy is not None:
                    return real["open"](copy, mode, *args, **kwargs)
            target = self.mapped(file, writing)
            if writing:
                if not isinstance(target, int):
                    self.written.add(os.path.abspath(os.fspath(target)))
            else:
                self.check(target, True)
            return real["open"](target, mode, *args, **kwargs)

        def _stat(path: Any, *args: Any, **kwargs: Any) -> Any:
            if args or kwargs.get("dir_fd") is not None:
                return real["stat"](path, *args, **kwargs)
            if self.read_back:
                copy = self.served(path, count=False)
                if copy is not None:
                    return real["stat"](copy, **kwargs)
            target = self.mapped(path, False)
            self.check(target, False)
            return real["stat"](target, **kwargs)

        def _moved(name: str):
            def move(src: Any, dst: Any, *args: Any, **kwargs: Any) -> Any:
                s, d = self.mapped(src), self.mapped(dst)
                if not isinstance(s, int) and os.path.abspath(os.fspath(s)) in self.discarded:
                    self.discarded.add(os.path.abspath(os.fspath(d)))  # an atomic torch.save's rename
                    return None
                if not isinstance(d, int):
                    self.written.add(os.path.abspath(os.fspath(d)))
                return real[name](s, d, *args, **kwargs)
            return move

        def _one(name: str):
            def call(path: Any, *args: Any, **kwargs: Any) -> Any:
                return real[name](self.mapped(path), *args, **kwargs)
            return call

        _open._flor_replay = True  # type: ignore[attr-defined]
        builtins.open = io.open = _open  # type: ignore[assignment]
        os.stat = _stat  # type: ignore[assignment]
        os.replace, os.rename = _moved("replace"), _moved("rename")  # type: ignore[assignment]
        os.mkdir, os.remove, os.unlink = _one("mkdir"), _one("remove"), _one("unlink")  # type: ignore[assignment]

    def discarding_save(self, f: Any) -> None:
        """``torch.save(obj, f)`` in the replay: nothing written, the path remembered."""
        if isinstance(f, (str, os.PathLike)):
            self.discarded.add(os.path.abspath(os.fspath(self.mapped(f))))


def tree_of(script: str, argv0: str) -> str:
    """The scratch copy's root: the replayed script's path less its path in the repository."""
    a = os.path.abspath(argv0)
    rel = os.path.normpath(script)
    if a.endswith(os.sep + rel):
        return a[: -len(rel) - 1]
    return os.path.dirname(a)


def load_facts(store: Any, run_id: str) -> dict | None:
    """The recorded run's ``own_files`` (None where its metadata cannot be read)."""
    try:
        meta = store.read_json(store.runs_rel(run_id))
    except Exception:  # noqa: BLE001 - no facts: only the repository mapping is lost
        return None
    facts = meta.get("own_files") if isinstance(meta, dict) else None
    return facts if isinstance(facts, dict) else None


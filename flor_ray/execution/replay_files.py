"""The files a replayed script sees and writes: the recorded run's, never the user's.

A replay runs in a scratch copy of the recorded code version (the run's snapshot of
its working tree at its start), so a relative path already reads the files as the
recorded run found them and writes into the copy, which is discarded. Inside the
replayed process :class:`ReplayFiles` extends that to the paths that leave it:

* **Files git ignores, by a relative path.** The scratch copy holds the snapshot only,
  so a dataset the repository keeps but git ignores (``./data``, ``./cora``) is read,
  listed (``os.listdir``, ``os.scandir``, so ``glob`` and ``os.walk``) and probed
  (``os.stat``, ``os.lstat``) in the recorded repository where the copy lacks it,
  and only as the recorded run could have found it: a file changed since the run
  started (a later run's checkpoint, a regenerated dataset) reads as absent, and the
  task's report says so. Writes stay in the copy.
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
import sys
from typing import Any, Callable, Mapping

from ..errors import FlorError

__all__ = ["ReplayFileError", "ReplayFiles"]

_WRITES = set("wax+")
_STAMP_SLACK_S = 0.02
_NOTES_KEPT = 50


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
        #: when the recorded run's process started (seconds since the epoch): the user's files
        #: changed later are not what it found; None (older metadata): any is read
        started = facts.get("process_started")
        self.started: float | None = (float(started) if isinstance(started, (int, float))
                                      else _epoch(facts.get("run_started")))
        self._changed: dict[str, str] = {}  # a path of the copy -> the user's file there, changed since

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
        if not isinstance(p, str) or root is None or root == self.tree:
            return path
        a = os.path.abspath(p)
        if a == self.tree or a.startswith(self.tree + os.sep):  # a relative path, most often
            return path if write else self._read_through(a, path)
        if not p.startswith(root):
            return path
        rest = p[len(root):]
        if rest and rest[0] != os.sep:
            return path
        if self._kept(p):
            return path
        mine = self.tree + rest
        if write or os.path.basename(p) in self.names:
            return mine
        try:
            self._real["stat"](mine)
        except OSError:
            if self._as_found(p):
                return path
            if self._exists(p):
                self._changed[mine] = p
            return mine
        return mine

    def _kept(self, a: str) -> bool:
        """Inside one of flor's own folders under the repository (a store kept in it)."""
        return any(a == k or a.startswith(k + os.sep) for k in self.keep)

    def _theirs(self, a: str) -> str | None:
        """The recorded repository's path of ``a``, a path in the scratch copy."""
        if self.root is None or self.root == self.tree:
            return None
        theirs = self.root + a[len(self.tree):]
        return None if self._kept(theirs) else theirs

    def _read_through(self, a: str, path: Any) -> Any:
        """A read in the scratch copy: the copy's file, else the recorded repository's as
        the run found it (a file git ignores), else the copy's path (absent)."""
        if os.path.basename(a) in self.names:
            return path  # the script's own checkpoint files: the rules of check()
        try:
            self._real["stat"](a)
            return path
        except OSError:
            pass
        theirs = self._theirs(a)
        if theirs is None:
            return path
        if self._as_found(theirs):
            return theirs
        if self._exists(theirs):  # there, but changed since the run started
            self._changed[a] = theirs
        return path

    def _room(self, target: Any) -> None:
        """Before a write in the scratch copy: the folders above it that the copy lacks and
        the recorded repository has (folders git ignores), made in the copy."""
        if isinstance(target, int) or self.root is None or self.root == self.tree:
            return
        t = os.fspath(target)
        if not isinstance(t, str):
            return
        a = os.path.dirname(os.path.abspath(t))
        missing = []
        while a.startswith(self.tree + os.sep) and not self._exists(a):
            theirs = self._theirs(a)
            if theirs is None or not self._isdir(theirs):
                return  # not a folder of the repository's: the write fails as it would
            missing.append(a)
            a = os.path.dirname(a)
        for folder in reversed(missing):
            try:
                self._real["mkdir"](folder)
            except FileExistsError:
                pass

    def _refuse_changed(self, target: Any) -> None:
        """Opening a file git ignores that changed since the run started: said, not absent."""
        if not self._changed or isinstance(target, int):
            return
        a = os.path.abspath(os.fspath(target))
        theirs = self._changed.get(a)
        if theirs is not None and not self._exists(a):
            raise ReplayFileError(
                f"the replayed script of run {self.run_id} reads {theirs}, which git ignores (it is not in the "
                "run's code snapshot) and which has changed since the run started: the replay cannot show the "
                "script the file the run read; put it back as it was, or replay only runs recorded since it changed")

    def _as_found(self, theirs: str, st: Any = None) -> bool:
        """Whether the user's ``theirs`` is there as the recorded run could have found it:
        a folder, or a file not changed since the run started (else it reads as absent,
        and the task's report says so)."""
        import stat as stat_kind

        if st is None:
            try:
                st = self._real["stat"](theirs)
            except OSError:
                return False
        # the process start is known to 10 ms: a file made just before it (`prep.py && train.py`) counts
        if self.started is None or stat_kind.S_ISDIR(st.st_mode) or st.st_mtime <= self.started + _STAMP_SLACK_S:
            return True
        if theirs not in self.notes and len(self.notes) < _NOTES_KEPT:  # a listing may meet thousands
            self.notes[theirs] = (f"run {self.run_id}: {theirs} read as absent: it changed after the run started "
                                  "(a later run's file, or data made again), so it is not what the run found")
        return False

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

    def _folders(self, path: Any) -> tuple[Any, str | None]:
        """A listed folder: the path to list in the scratch copy (or as given), and the
        recorded repository's same folder where the copy may lack some of it (else None)."""
        p = os.fspath(path)
        if not isinstance(p, str) or self.root is None or self.root == self.tree:
            return path, None
        a = os.path.abspath(p)
        if a == self.tree or a.startswith(self.tree + os.sep):
            return path, self._theirs(a)
        if (a == self.root or a.startswith(self.root + os.sep)) and not self._kept(a):
            return self.tree + a[len(self.root):], a
        return path, None

    def _extra(self, theirs: str, have: set[str]) -> list[Any]:
        """The entries of the user's folder ``theirs`` that the copy lacks, as the run could
        have found them (``os.DirEntry``)."""
        out = []
        try:
            with self._real["scandir"](theirs) as it:
                for e in it:
                    if e.name in have or self._kept(e.path):
                        continue
                    try:
                        st = e.stat(follow_symlinks=True)
                    except OSError:
                        continue
                    if self._as_found(e.path, st):
                        out.append(e)
        except OSError:
            return []
        return out

    def listdir(self, path: Any = ".") -> list[Any]:
        if isinstance(path, (int, bytes)):
            return self._real["listdir"](path)
        mine, theirs = self._folders(path)
        try:
            names = self._real["listdir"](mine)
        except (FileNotFoundError, NotADirectoryError):
            if theirs is None or not self._isdir(theirs):
                raise
            names = []
        if theirs is not None:
            names += [e.name for e in self._extra(theirs, set(names))]
        return names

    def scandir(self, path: Any = ".") -> Any:
        if isinstance(path, (int, bytes)):
            return self._real["scandir"](path)
        mine, theirs = self._folders(path)
        if theirs is None:
            return self._real["scandir"](mine)
        try:
            own = list(self._real["scandir"](mine))
        except (FileNotFoundError, NotADirectoryError):
            if not self._isdir(theirs):
                raise
            own = []
        prefix = os.fspath(path)
        extra = [_Entry(e, os.path.join(prefix, e.name)) for e in self._extra(theirs, {e.name for e in own})]
        return _Listing(own + extra)

    def _isdir(self, p: str) -> bool:
        import stat as stat_kind

        try:
            return stat_kind.S_ISDIR(self._real["stat"](p).st_mode)
        except OSError:
            return False

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
        real.update(open=builtins.open, io_open=io.open, stat=os.stat, lstat=os.lstat, mkdir=os.mkdir,
                    replace=os.replace, rename=os.rename, remove=os.remove, unlink=os.unlink, listdir=os.listdir,
                    scandir=os.scandir)

        def _open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            writing = bool(_WRITES & set(mode))
            if not writing and self.read_back:
                copy = self.served(file)
                if copy is not None:
                    return real["open"](copy, mode, *args, **kwargs)
            target = self.mapped(file, writing)
            if writing:
                if not isinstance(target, int):
                    self._room(target)
                    self.written.add(os.path.abspath(os.fspath(target)))
            else:
                self.check(target, True)
                self._refuse_changed(target)
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

        def _lstat(path: Any, *args: Any, **kwargs: Any) -> Any:
            if args or kwargs.get("dir_fd") is not None:
                return real["lstat"](path, *args, **kwargs)
            target = self.mapped(path, False)
            self.check(target, False)
            return real["lstat"](target, **kwargs)

        def _moved(name: str):
            def move(src: Any, dst: Any, *args: Any, **kwargs: Any) -> Any:
                s, d = self.mapped(src), self.mapped(dst)
                if not isinstance(s, int) and os.path.abspath(os.fspath(s)) in self.discarded:
                    self.discarded.add(os.path.abspath(os.fspath(d)))  # an atomic torch.save's rename
                    return None
                if not isinstance(d, int):
                    self._room(d)
                    self.written.add(os.path.abspath(os.fspath(d)))
                return real[name](s, d, *args, **kwargs)
            return move

        def _one(name: str):
            def call(path: Any, *args: Any, **kwargs: Any) -> Any:
                target = self.mapped(path)
                if name == "mkdir" and not args and kwargs.get("dir_fd") is None:
                    self._room(target)
                return real[name](target, *args, **kwargs)
            return call

        _open._flor_replay = True  # type: ignore[attr-defined]
        builtins.open = io.open = _open  # type: ignore[assignment]
        # numpy's text readers (loadtxt, genfromtxt) open through the `open` it held at import
        datasource = sys.modules.get("numpy.lib._datasource")
        openers = getattr(getattr(datasource, "_file_openers", None), "_file_openers", None)
        if isinstance(openers, dict) and openers.get(None) is real["open"]:
            openers[None] = _open
        os.stat, os.lstat = _stat, _lstat  # type: ignore[assignment]
        os.listdir, os.scandir = self.listdir, self.scandir  # type: ignore[assignment]
        os.replace, os.rename = _moved("replace"), _moved("rename")  # type: ignore[assignment]
        os.mkdir, os.remove, os.unlink = _one("mkdir"), _one("remove"), _one("unlink")  # type: ignore[assignment]

    def discarding_save(self, f: Any) -> None:
        """``torch.save(obj, f)`` in the replay: nothing written, the path remembered."""
        if isinstance(f, (str, os.PathLike)):
            self.discarded.add(os.path.abspath(os.fspath(self.mapped(f))))


class _Entry:
    """An ``os.DirEntry`` of the user's folder under the name the script listed it by."""

    def __init__(self, entry: Any, path: str):
        self._entry, self.name, self.path = entry, entry.name, path

    def __fspath__(self) -> str:
        return self.path

    def __repr__(self) -> str:
        return f"<DirEntry {self.name!r}>"

    def is_dir(self, *, follow_symlinks: bool = True) -> bool:
        return self._entry.is_dir(follow_symlinks=follow_symlinks)

    def is_file(self, *, follow_symlinks: bool = True) -> bool:
        return self._entry.is_file(follow_symlinks=follow_symlinks)

    def is_symlink(self) -> bool:
        return self._entry.is_symlink()

    def is_junction(self) -> bool:
        return False

    def stat(self, *, follow_symlinks: bool = True) -> Any:
        return self._entry.stat(follow_symlinks=follow_symlinks)

    def inode(self) -> int:
        return self._entry.inode()


class _Listing:
    """What ``os.scandir`` returns: an iterator of entries that is its own context manager."""

    def __init__(self, entries: list[Any]):
        self._it = iter(entries)

    def __iter__(self) -> "_Listing":
        return self

    def __next__(self) -> Any:
        return next(self._it)

    def __enter__(self) -> "_Listing":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._it = iter(())


def _epoch(text: Any) -> float | None:
    """An ISO time (a run's ``started_at``) as seconds since the epoch; None if it is not one."""
    import datetime as dt

    if not isinstance(text, str):
        return None
    try:
        return dt.datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


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
    if not isinstance(facts, dict):
        return None
    return {**facts, "run_started": meta.get("started_at")}


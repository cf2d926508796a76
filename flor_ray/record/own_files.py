"""What a recording knows of the script's own checkpoint files, for its replays.

Once ``flor.checkpointing`` has been entered the recording sees each ``torch.save(obj,
f)``, ``f`` a path or a file opened on one; before the run's first save to a path it
notes whether the file existed then and, if so, its size and modification time. That
is what the script could have found there at its start (a resume-at-start script loads
it when it exists), and it goes into the run's metadata (``own_files``) with the
repository's root. (A file opened for writing is already truncated when ``torch.save``
sees it: its path is noted as absent at the start.)

A replay (:mod:`flor_ray.execution.replay_files`) then shows the script the
files as the recorded run found them: a path the recording saved to but which did
not exist before its first save reads as absent, so a replay never resumes from the
user's latest checkpoint by accident.

**Read back.** A replay writes no ``torch.save`` file (it skips most iterations), so a
script that loads what it saved earlier in the run (the best model, loaded after the
loop for a test score) could not be replayed. So when the recording's ``torch.load``
reads a file that the run saved, the file's bytes as read are kept in the store
(``checkpoints/<run>/saved/``, named by their sha256, once per content) with where the
script was (:meth:`~flor_ray.record.loops.LoopRuntime._file_position`), and the
replay's read of that path at the same place gets exactly those bytes.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

__all__ = ["FileFacts", "install_save_hook"]


def path_of(f: Any) -> str | None:
    """The absolute path that ``torch.save``/``torch.load`` are given: a path, or a file
    object's name; None for a buffer or a file descriptor."""
    if not isinstance(f, (str, os.PathLike)):
        f = getattr(f, "name", None)
        if not isinstance(f, (str, os.PathLike)):
            return None
    try:
        return os.path.abspath(os.fspath(f))
    except (TypeError, ValueError):
        return None


class FileFacts:
    """The run's saved-to paths (absolute) -> the file before the run's first save to it,
    and the files it read back (:meth:`loading`). ``position``: where the script is;
    ``keep(digest, suffix, data)``: the store path the bytes were written to."""

    def __init__(self, repo_root: str, position: Callable[[], list] | None = None,
                 keep: Callable[[str, str, bytes], str] | None = None, process_started: float | None = None):
        self.repo_root = os.path.abspath(repo_root)
        #: when the recorded process started (seconds since the epoch): a replay shows the
        #: script only files that have not changed since (:mod:`flor_ray.execution.replay_files`)
        self.process_started = process_started
        self.saved: dict[str, dict] = {}
        self.read_back: list[dict] = []
        self.position, self.keep = position, keep
        self._kept: dict[str, str] = {}  # digest -> store path

    def saving(self, f: Any) -> None:
        path = path_of(f)
        if path is None or path in self.saved:
            return
        if not isinstance(f, (str, os.PathLike)):  # opened for writing: what was there is unknown
            self.saved[path] = {"opened": True}
            return
        try:
            st = os.stat(path)
        except OSError:
            self.saved[path] = {"existed": False}
        else:
            self.saved[path] = {"existed": True, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}

    def loading(self, f: Any, opener: Callable[..., Any]) -> None:
        """``torch.load(f)``: a file the run saved earlier is kept, as it is now."""
        path = path_of(f)
        if path is None or path not in self.saved or self.keep is None or self.position is None:
            return
        import hashlib

        with opener(path, "rb") as fh:
            data = fh.read()
        digest = hashlib.sha256(data).hexdigest()
        rel = self._kept.get(digest)
        if rel is None:
            suffix = os.path.splitext(path)[1]
            rel = self.keep(digest, suffix if suffix[1:].isalnum() and len(suffix) <= 9 else "", data)
            self._kept[digest] = rel
        self.read_back.append({"path": path, "at": list(self.position()), "sha256": digest, "bytes": len(data),
                               "stored": rel})

    def as_meta(self) -> dict:
        out = {"repo_root": self.repo_root, "saved": {k: dict(v) for k, v in self.saved.items()}}
        if self.process_started is not None:
            out["process_started"] = self.process_started
        if self.read_back:
            out["read_back"] = [dict(r) for r in self.read_back]
        return out


def install_save_hook(watch: Callable[[], Any], facts: Callable[[], FileFacts | None]) -> None:
    """Route ``torch.save`` through the session: ``facts()`` notes the path, ``watch()``
    (a :class:`.own_saves.SaveWatch`, or None outside ``flor.checkpointing``) may take
    the save as a checkpoint; and ``torch.load``, whose reads of the run's own saves
    ``facts()`` keeps. Once per process; torch must be imported."""
    torch = sys.modules.get("torch")
    if torch is None or getattr(torch.save, "_flor_watched", False):
        return
    real = torch.save
    real_load = torch.load
    opener = open  # the real one: a replay's hooks are never installed in a recording

    def load(f: Any, *args: Any, **kwargs: Any) -> Any:
        known = facts()
        if known is not None:
            try:
                known.loading(f, opener)
            except Exception as exc:  # noqa: BLE001 - the script's load goes on; its replays will lack the file
                import warnings

                warnings.warn(f"flor_ray could not keep {path_of(f)}, which the run reads back, for its replays "
                              f"({type(exc).__name__}: {exc}); a replay that reads it will be refused",
                              stacklevel=2)
        return real_load(f, *args, **kwargs)

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> Any:
        known = facts()
        if known is not None:
            known.saving(f)
        w = watch()
        if w is None:
            return real(obj, f, *args, **kwargs)
        return w.saved(obj, f, real, args, kwargs)

    save._flor_watched = True  # type: ignore[attr-defined]
    save.__wrapped__ = real  # type: ignore[attr-defined]
    save.__doc__ = real.__doc__
    torch.save = save
    load.__wrapped__ = real_load  # type: ignore[attr-defined]
    load.__doc__ = real_load.__doc__
    torch.load = load

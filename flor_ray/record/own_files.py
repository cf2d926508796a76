"""What a recording knows of the script's own checkpoint files, for its replays.

While ``flor.checkpointing`` is active the recording sees each ``torch.save(obj,
path)``; before the run's first save to a path it notes whether the file existed
then and, if so, its size and modification time. That is what the script could have
found there at its start (a resume-at-start script loads it when it exists), and it
goes into the run's metadata (``own_files``) with the repository's root.

A replay (:mod:`flor_ray.execution.replay_files`) then shows the script the
files as the recorded run found them: a path the recording saved to but which did
not exist before its first save reads as absent, so a replay never resumes from the
user's latest checkpoint by accident.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

__all__ = ["FileFacts", "install_save_hook"]


class FileFacts:
    """The run's saved-to paths (absolute) -> the file before the run's first save to it."""

    def __init__(self, repo_root: str):
        self.repo_root = os.path.abspath(repo_root)
        self.saved: dict[str, dict] = {}

    def saving(self, f: Any) -> None:
        if not isinstance(f, (str, os.PathLike)):
            return
        path = os.path.abspath(os.fspath(f))
        if path in self.saved:
            return
        try:
            st = os.stat(path)
        except OSError:
            self.saved[path] = {"existed": False}
        else:
            self.saved[path] = {"existed": True, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}

    def as_meta(self) -> dict:
        return {"repo_root": self.repo_root, "saved": {k: dict(v) for k, v in self.saved.items()}}


def install_save_hook(watch: Callable[[], Any], facts: Callable[[], FileFacts | None]) -> None:
    """Route ``torch.save`` through the session: ``facts()`` notes the path, ``watch()``
    (a :class:`.own_saves.SaveWatch`, or None outside ``flor.checkpointing``) may take
    the save as a checkpoint. Once per process; torch must be imported."""
    torch = sys.modules.get("torch")
    if torch is None or getattr(torch.save, "_flor_watched", False):
        return
    real = torch.save

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

"""A recording's start: the script and its repository, the store, the run id, the
code snapshot and the run's first metadata, taken at the first flor call.

Each step is a function the session's ``start`` calls in turn, timing each as a part
of the start (``start_parts`` in the profile, see :mod:`.profile`). This module imports
the store's and git's modules: the session imports it at the first verb and times
that import as the start's first part.
"""

from __future__ import annotations

import datetime as _dt
import os
import secrets
import socket
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..config import TRACEBACK_KEPT_CHARS, Settings
from ..errors import RepositoryError
from ..store import Store
from ..versions import Snapshot, find_repo_root, snapshot
from .host import environment, now_iso, pid_start_ticks

__all__ = ["ScriptInRepo", "locate_script", "open_store", "new_run_id", "take_snapshot", "run_meta",
           "install_excepthook"]

#: the layout of a run's metadata file, written into it so that a reader of a later
#: layout can tell an old file from a damaged one
STORE_FORMAT = 1


@dataclass(frozen=True)
class ScriptInRepo:
    """The recorded script: its repository's root and its path relative to it."""

    repo_root: str
    script: str


def locate_script(argv: list[str]) -> ScriptInRepo:
    script = argv[0] if argv else ""
    if not script or not os.path.isfile(script):
        raise RepositoryError(
            f"flor_ray records scripts run as `python path/to/script.py`; sys.argv[0] is {script!r}, "
            "not a file (interactive sessions and `python -c` cannot be replayed)"
        )
    script_path = Path(script).resolve()
    repo_root = find_repo_root(script_path)
    return ScriptInRepo(repo_root, script_path.relative_to(repo_root).as_posix())


def open_store(settings: Settings, repo_root: str) -> Store:
    """The configured store, or ``<repo>/.flor``; created when it does not exist yet."""
    store = Store(settings.store or os.path.join(repo_root, ".flor"), settings.storage_options)
    store.ensure()
    return store


def new_run_id() -> str:
    """``<UTC time>-<6 hex digits>``: sorts by start time, unique among runs started in one second."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(3)


def take_snapshot(settings: Settings, store: Store, where: ScriptInRepo, run_id: str,
                  extra: dict[str, str] | None = None, replace: str | None = None) -> Snapshot:
    """The working tree on ``refs/flor/<run_id>``, leaving out a store kept inside it;
    ``extra`` and ``replace`` as :func:`flor_ray.versions.snapshot` takes them (a notebook's cells)."""
    exclude = []
    if store.is_local:
        store_root = Path(store.root).resolve()
        if store_root == Path(where.repo_root) or Path(where.repo_root) in store_root.parents:
            exclude.append(store_root.relative_to(where.repo_root).as_posix())
    return snapshot(
        where.repo_root,
        f"refs/flor/{run_id}",
        exclude=exclude,
        max_untracked_bytes=settings.snapshot_max_file_bytes,
        max_untracked_files=settings.snapshot_max_untracked_files,
        max_untracked_total_bytes=settings.snapshot_max_untracked_total_bytes,
        message=f"flor_ray run {run_id} of {where.script}",
        list_files=False,  # the writer lists them, off the training thread
        extra=extra,
        replace=replace,
    )


def run_meta(run_id: str, where: ScriptInRepo, snap: Snapshot, argv: list[str]) -> dict[str, Any]:
    """The run's first metadata: what ran, where, from which code version."""
    repo_root = where.repo_root
    return {
        "run_id": run_id,
        "project": Path(repo_root).name,
        "script": where.script,
        "version": snap.tree,
        "commit": snap.commit,
        "ref": snap.ref,
        "left_out_of_snapshot": list(snap.left_out),
        "left_out_of_snapshot_count": snap.left_out_count,
        "argv": argv[1:],
        "cwd": os.path.relpath(os.getcwd(), repo_root) if os.getcwd().startswith(repo_root) else None,
        "status": "running",
        "started_at": now_iso(),
        "ended_at": None,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_start": pid_start_ticks(),
        "env": environment(),
        "store_format": STORE_FORMAT,
    }


#: [recorder of the latest run, the hook installed]: a process that records several runs
#: (``with flor.run():`` blocks) hooks once, and an uncaught exception goes to the run recording
_HOOKED: list = []


def install_excepthook(record: Callable[[dict], None]) -> None:
    """Hand an uncaught exception to ``record`` (as a dict), then let Python report it."""
    if _HOOKED and sys.excepthook is _HOOKED[1]:
        _HOOKED[0] = record
        return
    prev = sys.excepthook

    def hook(tp, val, tb):
        _HOOKED[0]({
            "type": tp.__name__,
            "message": str(val),
            "traceback": "".join(traceback.format_exception(tp, val, tb))[-TRACEBACK_KEPT_CHARS:],
        })
        prev(tp, val, tb)

    _HOOKED[:] = [record, hook]
    sys.excepthook = hook

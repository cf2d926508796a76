"""Writes of a recording that never stop its training.

A store that fills up, turns read-only or stops answering mid-run must not kill a
training that may have run for days. :class:`SpoolingWriter` tries each write a few
times with backoff; when the store stays unavailable it keeps rows and metadata in a
local spool folder (same store-relative paths) and skips checkpoints (a replay then
starts from an earlier one), warns once on stderr, and keeps the list of what was
spooled or lost for the run's metadata. ``flor-ray spool upload`` moves a spool into
its store later (:func:`upload_spool`).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import StoreError
from ..store import layout, write_local

if TYPE_CHECKING:  # pragma: no cover
    from ..store import Store

__all__ = ["SpoolingWriter", "Lost", "default_spool_dir", "upload_spool", "spool_folders"]

_INFO = "spool.json"
#: While the store is down, a write tries it again at most this often (seconds): a
#: store that comes back gets the rest of the run, and a dead one costs one attempt
#: per interval instead of the full backoff on every flush.
PROBE_EVERY_S = 10.0


def default_spool_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "flor_ray", "spool")


@dataclass(frozen=True)
class Lost:
    """A write that reached neither the store nor the spool."""

    path: str
    error: str

    def as_dict(self) -> dict:
        return {"path": self.path, "error": self.error}


class SpoolingWriter:
    """Store writes for one recording run: retried, then spooled or skipped."""

    def __init__(self, store: "Store", run_id: str, spool_dir: str | None, retries: int = 3):
        self.store = store
        self.run_id = run_id
        self.folder = os.path.join(os.path.abspath(os.path.expanduser(spool_dir or default_spool_dir())), run_id)
        self.retries = max(int(retries), 1)
        self._lock = threading.Lock()
        self._down_at: float | None = None  # monotonic time of the last failed attempt
        self._warned = False
        self._spooled: set[str] = set()
        self._lost: list[Lost] = []
        self.last_error: str | None = None

    @property
    def down(self) -> bool:
        return self._down_at is not None

    def write(self, rel: str, data: bytes, durable: bool = False, spill: bool = True) -> bool:
        """Write ``rel``; True when it is in the store.

        Otherwise ``spill`` keeps it in the spool (rows, metadata) or, without it,
        records it as lost (checkpoints: a replay starts from an earlier one).
        """
        err = self._try_store(rel, data, durable)
        if err is None:
            if rel in self._spooled:  # the store holds a newer copy now
                with self._lock:
                    self._spooled.discard(rel)
                try:
                    os.unlink(os.path.join(self.folder, rel))
                except OSError:
                    pass
            return True
        self._warn(err)
        if spill:
            try:
                self._spill(rel, data)
                return False
            except OSError as exc:
                err = f"{err}; the spool {self.folder} failed too: {exc}"
        with self._lock:
            self._lost.append(Lost(rel, err))
        return False

    def _try_store(self, rel: str, data: bytes, durable: bool) -> str | None:
        """None on success, else the last error (as text)."""
        with self._lock:
            down_at = self._down_at
        if down_at is not None and time.monotonic() - down_at < PROBE_EVERY_S:
            return f"not tried: the store was unavailable ({self.last_error})"
        attempts = 1 if down_at is not None else self.retries
        for k in range(attempts):
            try:
                self.store.write_bytes(rel, data, durable=durable)
            except StoreError as exc:
                self.last_error = str(exc)
                if k + 1 < attempts:
                    time.sleep(0.05 * 4**k)
                continue
            with self._lock:
                self._down_at = None
            return None
        with self._lock:
            self._down_at = time.monotonic()
        return self.last_error

    def _spill(self, rel: str, data: bytes) -> None:
        info = os.path.join(self.folder, _INFO)
        if not os.path.exists(info):
            write_local(info, json.dumps({"store": self.store.url, "run_id": self.run_id}).encode())
        write_local(os.path.join(self.folder, rel), data)
        with self._lock:
            self._spooled.add(rel)

    def _warn(self, err: str) -> None:
        with self._lock:
            if self._warned:
                return
            self._warned = True
        sys.stderr.write(
            f"flor_ray: run {self.run_id}: cannot write the store {self.store.url} ({err.strip()}); "
            f"training goes on: rows and metadata are spooled to {self.folder} (upload them with "
            f"`flor-ray spool upload {self.folder}` once the store is back), checkpoints are skipped "
            "while it stays unavailable\n"
        )

    def record(self) -> dict:
        """What this run spooled or lost, for its metadata (empty when nothing was)."""
        with self._lock:
            spooled = sorted(r for r in self._spooled if not r.startswith(layout.RUNS + "/"))
            lost = [x.as_dict() for x in self._lost]
        out: dict = {}
        if spooled:
            out["spooled"] = {"folder": self.folder, "files": spooled}
        if lost:
            out["lost"] = lost
        return out


# ------------------------------------------------------------------ uploads
def spool_folders(spool_dir: str | None) -> list[str]:
    """The run folders of a spool directory (each holds a ``spool.json``)."""
    root = Path(os.path.expanduser(spool_dir or default_spool_dir()))
    if (root / _INFO).is_file():
        return [str(root)]
    if not root.is_dir():
        return []
    return sorted(str(p) for p in root.iterdir() if (p / _INFO).is_file())


def upload_spool(folder: str, store: "Store | None" = None) -> list[str]:
    """Move one run's spool into its store: rows first, the run's metadata last.

    Returns the store-relative paths written. The metadata says when the spool was
    uploaded; the folder is removed once everything is in the store.
    """
    from ..store import Store

    base = Path(folder)
    try:
        info = json.loads((base / _INFO).read_text())
    except (OSError, ValueError) as exc:
        raise StoreError(f"{folder} is not a flor_ray spool folder ({exc}); pass a folder that holds {_INFO}") from exc
    store = store or Store(info["store"])
    store.check()
    run_id = info["run_id"]
    meta_rel = store.runs_rel(run_id)
    files = sorted(
        p.relative_to(base).as_posix() for p in base.rglob("*")
        if p.is_file() and p.name != _INFO and not p.name.startswith(".")
    )
    written = []
    for rel in files:
        if rel != meta_rel:
            store.write_bytes(rel, (base / rel).read_bytes(), durable=True)
            written.append(rel)
    if meta_rel in files:
        meta = json.loads((base / meta_rel).read_text())
    else:
        meta = store.read_json(meta_rel)
    if isinstance(meta.get("spooled"), dict):
        meta["spooled"]["uploaded_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")
    store.write_json(meta_rel, meta)
    written.append(meta_rel)
    shutil.rmtree(base)
    return written

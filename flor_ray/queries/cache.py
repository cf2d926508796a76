"""The caches of queries, in one object: the parsed run files and the DuckDB
connections of each store, kept while a store's listing stays the same.

A process forked from one that queried (a replay zygote, a multiprocessing worker)
starts with empty caches: :meth:`QueryCache.reset` runs in the child after a fork.
The parent's connections are never touched there (their threads stayed behind);
they are kept referenced so that no finaliser closes them.
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Callable, TypeVar

from ..store.runs import ParsedRun, RunFiles, cached_runs

if TYPE_CHECKING:  # pragma: no cover
    from ..store import Store

#: a kept connection: anything with a ``lock`` and a ``close()``
Connection = TypeVar("Connection")

__all__ = ["QueryCache", "CACHE", "store_key"]

#: stores whose parsed run files are kept (least recently used dropped)
RUNS_KEEP = 8
#: stores whose DuckDB connections are kept (least recently used dropped)
SQL_KEEP = 4


def store_key(store: "Store") -> tuple:
    """What identifies a store's caches: :attr:`flor_ray.store.Store.key`."""
    return store.key


class QueryCache:
    """Every query cache of this process, each keyed by :func:`store_key`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: dict[tuple, dict[str, ParsedRun]] = {}
        self._sql: dict[tuple, object] = {}
        self._abandoned: list = []  # connections inherited through fork(): never touched again

    def runs(self, store: "Store") -> RunFiles:
        """The store's runs (:func:`flor_ray.store.runs.cached_runs`), reading only the
        run files that are new or rewritten since the last call."""
        key = store_key(store)
        with self._lock:
            old = self._runs.get(key)
        found = cached_runs(store, old)
        with self._lock:
            self._runs.pop(key, None)
            self._runs[key] = found.parsed  # most recently used last
            while len(self._runs) > RUNS_KEEP:
                self._runs.pop(next(iter(self._runs)))
        return found

    def sql_connection(self, store: "Store", new: Callable[[], Connection]) -> Connection:
        """The store's kept DuckDB connection (``new()`` the first time)."""
        key = store_key(store)
        dropped = []
        with self._lock:
            state = self._sql.pop(key, None) or new()
            self._sql[key] = state  # most recently used last
            while len(self._sql) > SQL_KEEP:
                dropped.append(self._sql.pop(next(iter(self._sql))))
        for old in dropped:
            with old.lock:
                old.close()
        return state

    def reset(self) -> None:
        """Forget everything (in a forked child: the parent's connections are left alone)."""
        self._lock = threading.Lock()  # the parent's may have been held by another thread
        self._abandoned.extend(self._sql.values())
        self._sql = {}
        self._runs = {}


CACHE = QueryCache()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=CACHE.reset)

"""Listings of a store's files with a change stamp each, for the caches of queries.

Queries list the store on every call (a run or a replay task may have added a file
since the last one) and keep what they derived from the files (parsed run files,
DuckDB tables) for as long as the listing stays the same. A listing entry's stamp
changes whenever its file is rewritten: every write is a new file renamed into place
(new inode, new mtime) or a new object (new etag / mtime).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:  # pragma: no cover
    from . import Store

__all__ = ["Entry", "list_files"]

_STAMP_KEYS = ("mtime", "LastModified", "last_modified", "ETag", "etag", "md5", "generation", "version_id", "created")


class Entry(NamedTuple):
    """One listed file: store-relative path, size in bytes, change stamp."""

    path: str
    size: int | None
    stamp: Any


def list_files(store: "Store", rel: str, suffix: str, recursive: bool = True) -> tuple[Entry, ...]:
    """The files below ``rel`` ending in ``suffix``, sorted by path.

    The files of :meth:`Store.find` (``recursive``) or of :meth:`Store.listdir`
    (otherwise), store-relative and without hidden temporaries; one ``os.scandir`` per
    folder on local disks, one listing call on object stores.
    """
    out = _list_local(store, rel, suffix, recursive) if store.is_local else _list_remote(store, rel, suffix, recursive)
    out.sort(key=lambda f: f.path)
    return tuple(out)


def _list_local(store: "Store", rel: str, suffix: str, recursive: bool) -> list[Entry]:
    root = store.root
    out = []
    folders = [store.path(rel)]
    while folders:
        folder = folders.pop()
        try:
            entries = os.scandir(folder)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as exc:
            raise store._wrap(f"listing {rel}", exc) from exc
        with entries:
            for e in entries:
                try:
                    if e.is_dir():  # follows links, as fsspec's find does
                        if recursive:
                            folders.append(e.path)
                        continue
                    if e.name.startswith((".", "_")) or not e.name.endswith(suffix):
                        continue
                    st = e.stat()
                except FileNotFoundError:  # removed while listing
                    continue
                out.append(Entry(e.path[len(root) + 1:], st.st_size, (st.st_mtime_ns, st.st_ino)))
    return out


def _list_remote(store: "Store", rel: str, suffix: str, recursive: bool) -> list[Entry]:
    base = store.path(rel)
    root = store.root
    try:
        found = store.infos(base, recursive)
    except FileNotFoundError:
        return []
    except Exception as exc:
        raise store._wrap(f"listing {rel}", exc) from exc
    out = []
    for p, info in found.items():
        p = p.rstrip("/")
        name = p.rsplit("/", 1)[-1]
        if name.startswith((".", "_")) or not p.endswith(suffix):
            continue
        stamp = tuple(str(info[k]) for k in _STAMP_KEYS if info.get(k) is not None)
        out.append(Entry(p[len(root) + 1:] if p.startswith(root) else p, info.get("size"), stamp))
    return out

"""Private local copies of an object store's Parquet files, for the SQL reader.

On an object store the reader (:mod:`flor_ray.queries.sources`) cannot open the parts
itself: DuckDB reaches S3 only through its httpfs extension, which is downloaded at
run time and is refused here. Reading them through pyarrow instead costs a command
line the import of pyarrow (and numpy) and a copy of every column a query asks for
into Arrow. When the files a relation is made of are small together
(:data:`FETCH_BYTES`), each is fetched whole with one GET into a temporary folder of
this process, and DuckDB's own Parquet reader reads the copies with the columns and
filters of each query pushed down, as on a local store.

A copy is kept while the listing names the same file (path, size, change stamp), so a
new listing (one more run, one more replay partition) fetches only what is new. The
folder is removed when its :class:`LocalCopies` is closed or collected, and at exit.
"""

from __future__ import annotations

import os
import weakref
from typing import TYPE_CHECKING, Mapping, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from ..store import Store
    from ..store.segments import Piece

__all__ = ["FETCH_BYTES", "LocalCopies", "NoLocalRoom", "fetchable"]

#: the most bytes of files fetched whole for one relation: beyond it pyarrow reads only
#: the columns a query asks for, by ranges (a GET of 64 MiB is about half a second on S3)
FETCH_BYTES = 64 << 20
#: concurrent GETs when a relation has many files (loose parts of runs not consolidated)
_THREADS = 8


class NoLocalRoom(OSError):
    """The copies cannot be written here (no temporary folder, a full disk): the caller
    reads the store through pyarrow instead."""


def _files(pieces: "Sequence[Piece]") -> dict[str, tuple]:
    """Each file of ``pieces`` and what identifies its content in a listing: (size, stamp)."""
    return {p.file: (p.file_size, p.file_stamp) for p in pieces}


def fetchable(pieces: "Sequence[Piece]") -> bool:
    """Whether the files of ``pieces`` have known sizes within :data:`FETCH_BYTES` together."""
    sizes = [size for size, _ in _files(pieces).values()]
    return bool(sizes) and None not in sizes and sum(sizes) <= FETCH_BYTES


class LocalCopies:
    """The local copies of one store's files, by store-relative path."""

    def __init__(self) -> None:
        self.folder: str | None = None
        self._held: dict[str, tuple[tuple, str]] = {}  # path -> ((size, stamp), local path)
        self._count = 0
        self._finalizer: weakref.finalize | None = None

    def paths(self, store: "Store", pieces: "Sequence[Piece]") -> dict[str, str]:
        """The local path of each file of ``pieces``, fetching those not held (or changed
        since); copies of files no longer among them are removed. Raises
        ``FileNotFoundError`` for a file gone since the listing (a compacted part: the
        caller lists again) and ``OSError`` for one that changed size since."""
        want = _files(pieces)
        for rel in [r for r, (ident, _) in self._held.items() if want.get(r) != ident]:
            self._drop(rel)
        missing = [rel for rel in want if rel not in self._held]
        if missing:
            try:
                folder = self._folder()
            except OSError as exc:
                raise NoLocalRoom(f"no temporary folder for the copies: {exc}") from exc
            if len(missing) == 1:
                fetched = [store.read_bytes(missing[0])]
            else:
                from concurrent.futures import ThreadPoolExecutor

                with ThreadPoolExecutor(min(_THREADS, len(missing))) as pool:
                    fetched = list(pool.map(store.read_bytes, missing))
            for rel, data in zip(missing, fetched):
                size = want[rel][0]
                if len(data) != size:
                    raise OSError(f"{store.full_url(rel)} changed since it was listed "
                                  f"({len(data)} bytes, listed as {size})")
                self._count += 1
                local = os.path.join(folder, f"{self._count}.parquet")
                try:
                    with open(local, "wb") as f:
                        f.write(data)
                except OSError as exc:
                    raise NoLocalRoom(f"writing a copy of {rel} in {folder}: {exc}") from exc
                self._held[rel] = (want[rel], local)
        return {rel: self._held[rel][1] for rel in want}

    def _folder(self) -> str:
        import shutil
        import tempfile

        if self.folder is None or not os.path.isdir(self.folder):
            self.folder = tempfile.mkdtemp(prefix="flor-ray-sql-")
            self._held.clear()
            if self._finalizer is not None:
                self._finalizer.detach()
            self._finalizer = weakref.finalize(self, shutil.rmtree, self.folder, True)
        return self.folder

    def _drop(self, rel: str) -> None:
        _, local = self._held.pop(rel)
        try:
            os.unlink(local)
        except FileNotFoundError:
            pass

    def clear(self) -> None:
        """Remove every copy and the folder."""
        self._held.clear()
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None
        self.folder = None

    def held(self) -> Mapping[str, str]:
        return {rel: local for rel, (_, local) in self._held.items()}

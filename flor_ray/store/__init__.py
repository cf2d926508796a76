"""The store: everything a replay needs, under one fsspec URL.

Where each thing lives is :mod:`flor_ray.store.layout`'s to say. Every write is atomic: on local disks a temporary file (``.``-prefixed, which every
reader ignores) is renamed into place; on object stores one PUT makes the object
appear whole or not at all. Paths built from user input go through
:func:`~flor_ray.store.layout.safe_component`, so an id can never escape the store.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from typing import Any, Iterable, Mapping

from ..errors import StoreError, StoreNotFoundError
from . import layout
from .credentials import StorageOptions
from .layout import MARKER, safe_component

__all__ = ["Store", "safe_component", "MARKER", "STORE_FORMAT"]

STORE_FORMAT = 1
#: attempts of one S3 request by s3fs (timeouts, throttling): 2 ride out one lost
#: request and bound a silent endpoint's cost at 2 read timeouts
S3_ATTEMPTS = 2
#: exceptions that mean a bug in the code, not a store that failed
_BUGS = (TypeError, AttributeError, NameError, AssertionError, IndexError, UnboundLocalError)
_MALFORMED = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/+")


def _bounded_waits(protocol: str, options: dict) -> None:
    """Connect and read timeouts (config.py says why these numbers) for network stores.

    Without them a server that accepts connections and never answers blocks every
    call for minutes (s3fs: 5 retries of botocore's 5 attempts of 15 s each). The
    user's own options win.
    """
    from ..config import load_settings

    s = load_settings()
    if protocol in ("s3", "s3a"):
        conf = dict(options.get("config_kwargs") or {})
        conf.setdefault("connect_timeout", s.connect_timeout_s)
        conf.setdefault("read_timeout", s.read_timeout_s)
        conf.setdefault("retries", {"max_attempts": 1})  # s3fs retries on its own, with backoff
        options["config_kwargs"] = conf
    elif protocol in ("http", "https"):
        import aiohttp

        client = dict(options.get("client_kwargs") or {})
        client.setdefault("timeout", aiohttp.ClientTimeout(sock_connect=s.connect_timeout_s, sock_read=s.read_timeout_s))
        options["client_kwargs"] = client
    elif protocol in ("gs", "gcs"):
        options.setdefault("timeout", s.read_timeout_s)


#: a consolidation removes each folder it empties once: a writer meeting that makes it again
_MAKE_FOLDER_ATTEMPTS = 10


def write_local(path: str, data: bytes, durable: bool = False) -> None:
    """Write a local file atomically: a ``.``-prefixed temporary renamed into place
    (``durable``: fsync'ed first); a failure (disk full, read-only) leaves no temporary."""
    d = os.path.dirname(path)
    tmp = os.path.join(d, f".tmp-{uuid.uuid4().hex}")
    try:
        for attempt in range(_MAKE_FOLDER_ATTEMPTS):
            try:
                os.makedirs(d, exist_ok=True)
                f = open(tmp, "wb")
                break
            except (FileNotFoundError, FileExistsError):  # a consolidation removed the folder it emptied
                if attempt == _MAKE_FOLDER_ATTEMPTS - 1:  # just now (makedirs: between its mkdir and its check)
                    raise
        with f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


class Store:
    """A store at an fsspec URL. Cheap to build; picklable (holds the URL only)."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None):
        if not isinstance(url, str) or not url.strip():
            raise StoreError(f"store URL must be a non-empty string, got {url!r}")
        bad = _MALFORMED.match(url)
        if bad and "://" not in url:  # `s3:/b/f` would silently be a local folder named `s3:`
            raise StoreError(f"store URL {url!r} is not a URL (a scheme needs '://'): write "
                             f"{bad.group(1)}://{url[len(bad.group(0)):].lstrip('/')}, or ./{url} for a local folder")
        self.url = layout.store_url(url)
        #: fsspec options; their repr hides secrets, and replay tasks never get the secret ones
        self.storage_options = StorageOptions(storage_options or {})
        self._fs = None
        self._root: str | None = None
        self._lean: Any = False  # False: not decided yet; None: s3fs reads too

    # pickling: ship the URL, rebuild the filesystem on the other side
    def __getstate__(self) -> dict:
        return {"url": self.url, "storage_options": self.storage_options}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["url"], state["storage_options"])

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    # ------------------------------------------------------------------ basics
    @property
    def fs(self):
        if self._fs is None:
            import fsspec

            options = dict(self.storage_options)
            protocol = fsspec.utils.get_protocol(self.url)
            if protocol not in ("file", "local", "memory"):
                # other processes (replay tasks, other runs) add files all the time: a cached
                # listing would hide them, and s3fs answers info()/open() from the cached
                # listing of the parent, so a partition just written reads as missing
                options.setdefault("use_listings_cache", False)
                _bounded_waits(protocol, options)
            try:
                self._fs, self._root = fsspec.core.url_to_fs(self.url, **options)
            except (ImportError, ValueError) as exc:
                raise StoreError(f"cannot open store URL {self.url!r}: {exc}") from exc
            self._root = self._root.rstrip("/")
            if protocol in ("s3", "s3a") and "retries" not in self.storage_options:
                # s3fs's own retries of timeouts: 2 attempts in all, so a silent endpoint
                # costs 2 read timeouts (and a 0.1 s backoff), not 5
                self._fs.retries = S3_ATTEMPTS
        return self._fs

    @property
    def key(self) -> tuple:
        """What identifies this store for the process's caches: its URL and options."""
        return (self.url, json.dumps(self.storage_options, sort_keys=True, default=str))

    @property
    def _plain_local(self) -> bool:
        """A folder named by its path (no scheme): read and listed with ``os`` alone,
        so the commands that only read JSON do not pay for importing fsspec."""
        return "://" not in self.url and self.url != "/"

    @property
    def reader(self):
        """The lean S3 reader of this store (:mod:`flor_ray.store.s3read`), or None where
        s3fs reads it too (what that module's docstring lists)."""
        if self._lean is False:
            self._lean = None
            if self.url.startswith("s3://"):
                from .s3read import for_store

                self._lean = for_store(self.url, self.storage_options)
        return self._lean

    @property
    def root(self) -> str:
        if self._root is None:
            if self._plain_local:
                self._root = self.url  # what fsspec's local filesystem makes of the absolute path
            elif self.reader is not None:
                self._root = self.url[len("s3://"):].rstrip("/")  # what s3fs makes of the URL
            else:
                self.fs
        assert self._root is not None
        return self._root

    @property
    def is_local(self) -> bool:
        if self._plain_local:
            return True
        if self.reader is not None:
            return False
        protocol = self.fs.protocol
        protos = (protocol,) if isinstance(protocol, str) else tuple(protocol)
        return "file" in protos or "local" in protos

    def path(self, *parts: str) -> str:
        """Absolute path (in the filesystem's terms) of a store-relative path."""
        for p in parts:
            if p.startswith("/") or ".." in p.split("/"):
                raise StoreError(f"store path {p!r} escapes the store")
        return "/".join([self.root, *parts])

    def full_url(self, *parts: str) -> str:
        return "/".join([self.url, *parts])

    def _wrap(self, what: str, exc: Exception) -> StoreError:
        if isinstance(exc, TypeError) and "keyword argument" in str(exc) and self.storage_options:
            return StoreError(f"the backend of store {self.url!r} refuses its storage_options "
                              f"({', '.join(sorted(self.storage_options))}): {exc}; fix storage_options in the config file")
        if isinstance(exc, _BUGS):  # a bug (ours or a backend's), never dressed as an unreachable store
            raise exc
        return StoreError(f"{what} in store {self.url!r} failed: {type(exc).__name__}: {exc}{self._timeout_hint(exc)}")

    def _timeout_hint(self, exc: BaseException) -> str:
        """For a timeout: which endpoint did not answer and which setting bounds the wait."""
        chain = []
        e: BaseException | None = exc
        while e is not None and len(chain) < 8:
            chain.append(e)
            e = e.__cause__ or e.__context__
        names = " ".join(type(c).__name__ for c in chain).lower()
        if "timeout" not in names:
            return ""
        from ..config import load_settings

        s = load_settings()
        connect = "connect" in names
        setting = (f"connect_timeout_s={s.connect_timeout_s:g} (FLOR_CONNECT_TIMEOUT)" if connect
                   else f"read_timeout_s={s.read_timeout_s:g} (FLOR_READ_TIMEOUT)")
        return (f"; the endpoint {self.endpoint()} did not {'accept a connection' if connect else 'answer'} "
                f"within {setting}: check that it is up, or raise the setting")

    def endpoint(self) -> str:
        """Where the store's requests go, as far as the options and environment say."""
        client = self.storage_options.get("client_kwargs") or {}
        given = self.storage_options.get("endpoint_url") or client.get("endpoint_url")
        if self.url.startswith(("s3://", "s3a://")):
            given = given or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            return str(given or "the AWS S3 endpoint")
        return str(given or self.url)

    # ----------------------------------------------------------------- writing
    def write_bytes(self, rel: str, data: bytes, durable: bool = False) -> None:
        """Write ``data`` at ``rel`` atomically (readers see all of it or nothing).

        Atomic against crashes of the writing process (temp file + rename). With
        ``durable`` the data is also fsync'ed before the rename, against a crash of
        the machine; checkpoints use it (they are written in the background), the
        per-iteration row flushes do not (an fsync costs more than the flush).
        """
        path = self.path(rel)
        try:
            if self.is_local:
                write_local(path, data, durable)
            else:
                self.fs.pipe_file(path, data)
        except OSError as exc:
            raise self._wrap(f"writing {rel}", exc) from exc
        except Exception as exc:  # botocore / aiohttp errors are not OSErrors
            raise self._wrap(f"writing {rel}", exc) from exc

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=1, sort_keys=True, default=str).encode())

    def delete(self, rel: str) -> None:
        try:
            self.fs.rm(self.path(rel), recursive=True)
        except FileNotFoundError:
            pass

    # ----------------------------------------------------------------- reading
    def read_bytes(self, rel: str) -> bytes:
        try:
            if self._plain_local:
                with open(self.path(rel), "rb") as f:
                    return f.read()
            if self.reader is not None:
                return self.reader.get(self.path(rel))
            return self.fs.cat_file(self.path(rel))
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise self._wrap(f"reading {rel}", exc) from exc

    def read_json(self, rel: str) -> Any:
        data = self.read_bytes(rel)
        try:
            return json.loads(data)
        except ValueError as exc:
            raise StoreError(f"{self.full_url(rel)} is not valid JSON (truncated or corrupted): {exc}") from exc

    def exists(self, rel: str) -> bool:
        try:
            if self._plain_local:
                return os.path.exists(self.path(rel))
            if self.reader is not None:
                return self.reader.exists(self.path(rel))
            return self.fs.exists(self.path(rel))
        except Exception as exc:
            raise self._wrap(f"checking {rel}", exc) from exc

    def listdir(self, rel: str) -> list[str]:
        """Names (not paths) directly under ``rel``; hidden temporaries left out."""
        try:
            # a local store lists without fsspec (its import is a tenth of a second of a CLI call)
            if self._plain_local:
                entries = os.listdir(self.path(rel))
            elif self.reader is not None:
                entries = [e["name"] for e in self.reader.list(self.path(rel))]
            else:
                entries = self.fs.ls(self.path(rel), detail=False)
        except (FileNotFoundError, NotADirectoryError):
            return []
        except Exception as exc:
            raise self._wrap(f"listing {rel}", exc) from exc
        names = (e.rstrip("/").rsplit("/", 1)[-1] for e in entries)
        return sorted(n for n in names if n and not n.startswith((".", "_")))

    def sizes(self, rel: str) -> dict[str, int]:
        """Store-relative path -> size in bytes of each file directly under ``rel``:
        one listing (one request on an object store), however many files."""
        try:
            entries = (self.reader.list(self.path(rel)) if self.reader is not None
                       else self.fs.ls(self.path(rel), detail=True))
        except FileNotFoundError:
            return {}
        except Exception as exc:
            raise self._wrap(f"listing {rel}", exc) from exc
        out = {}
        for e in entries:
            name = e["name"].rstrip("/").rsplit("/", 1)[-1]
            if e.get("type") != "directory" and name and not name.startswith((".", "_")):
                out[f"{rel.rstrip('/')}/{name}"] = int(e.get("size") or 0)
        return out

    def infos(self, path: str, recursive: bool = False) -> dict[str, dict]:
        """fsspec's info dict of each file below ``path`` (a path of :meth:`path`), by
        its path: ``find(detail=True)``, or with ``recursive`` false ``ls(detail=True)``
        less the folders; by the lean S3 reader where it applies. Raises the backend's
        errors (``FileNotFoundError`` for a folder that is not there, on s3fs)."""
        if self.reader is not None:
            return {e["name"]: e for e in self.reader.list(path, recursive) if e["type"] != "directory"}
        if recursive:
            return self.fs.find(path, detail=True)
        return {e["name"]: e for e in self.fs.ls(path, detail=True) if e.get("type") != "directory"}

    def find(self, rel: str, suffix: str = "") -> list[str]:
        """Store-relative paths of all files below ``rel`` ending in ``suffix``."""
        base = self.path(rel)
        try:
            found = ([e["name"] for e in self.reader.list(base, recursive=True)] if self.reader is not None
                     else self.fs.find(base))
        except FileNotFoundError:
            return []
        except Exception as exc:
            raise self._wrap(f"listing {rel}", exc) from exc
        out = []
        for p in found:
            name = p.rsplit("/", 1)[-1]
            if name.startswith((".", "_")) or not p.endswith(suffix):
                continue
            out.append(p[len(self.root) + 1 :] if p.startswith(self.root) else p)
        return sorted(out)

    # ------------------------------------------------------------------- marker
    def ensure(self) -> None:
        """Create the store if needed (writes the marker); clear error if unreachable."""
        try:
            if self.exists(MARKER):
                return
            if self.is_local:  # a store inside a repository ignores itself
                self.write_bytes(".gitignore", b"# written by flor_ray: the store is not source code\n*\n")
            self.write_json(MARKER, {"format": STORE_FORMAT, "tool": "flor_ray"})
        except StoreError as exc:
            raise StoreError(
                f"store {self.url!r} is unreachable or not writable ({exc}); "
                "check FLOR_STORE / --store and the credentials or endpoint"
            ) from exc

    def check(self) -> "Store":
        """Raise :class:`StoreNotFoundError` unless a store was written here."""
        try:
            ok = self.exists(MARKER)
            if not ok and self.url.startswith(("http://", "https://")):
                self._probe_http()
        except StoreError as exc:
            raise StoreError(f"store {self.url!r} is unreachable: {exc}") from exc
        if not ok:
            raise StoreNotFoundError(self.url)
        return self

    def _probe_http(self) -> None:
        """fsspec's HTTP ``exists`` says False for a server that is down: ask again, for the reason."""
        try:
            self.fs.cat_file(self.path(MARKER))
        except FileNotFoundError:
            return
        except Exception as exc:
            raise self._wrap(f"reading {MARKER}", exc) from exc

    # ------------------------------------------------------------ arrow access
    def arrow_fs(self):
        """A pyarrow filesystem and root path for datasets over this store."""
        import pyarrow.fs as pafs

        if self.is_local:
            return pafs.LocalFileSystem(), self.root
        if self.reader is not None:
            from .s3arrow import LeanHandler

            return pafs.PyFileSystem(LeanHandler(self)), self.root
        return pafs.PyFileSystem(pafs.FSSpecHandler(self.fs)), self.root

    def runs_rel(self, run_id: str) -> str:
        """The metadata file of a run (:func:`flor_ray.store.layout.run_meta`)."""
        return layout.run_meta(run_id)

    def iter_run_ids(self) -> Iterable[str]:
        """The ids of the run files of the store (unread: some may be damaged)."""
        for name in self.listdir(layout.RUNS):
            rid = layout.run_id_of_meta(name)
            if rid is not None:
                yield rid

"""The per-user cache of materialised code versions, and the checked copy a task runs.

A replay task runs code from the store. Each machine keeps a version's files once,
under ``$FLOR_CACHE_DIR``, else ``$XDG_CACHE_HOME/flor_ray/versions``, else
``~/.cache/flor_ray/versions``: a directory of the current user, mode 0700, so that
no other account can plant files in it. A version directory is built in a temporary
directory and renamed into place; one that is not a plain directory of ours, or that
others can write, is rebuilt.

Every task copies the version into its own work directory, hashing each file as it
copies and comparing it with the blob id in the store's manifest; a file that does
not match (edited in the cache, a half-written build) makes the task rebuild the
version from the store, which is itself checked blob by blob. The copy already reads
every byte, and SHA-1 adds ~1 ms per MB (a few hundred KB of code: well under a
millisecond, next to the ~0.2 s a replayed process takes to start), so the files are
re-hashed at every run rather than trusted through a "verified" marker that a later
edit would not invalidate. Files in the cache that the manifest does not name are
never copied.
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, Mapping

from ..errors import ConfigError, StoreError

__all__ = ["cache_root", "checked_copy"]


def cache_root() -> Path:
    """This user's cache of materialised versions (read at each call: a Ray worker's
    environment may differ from the driver's)."""
    if os.environ.get("FLOR_CACHE_DIR"):
        return Path(os.environ["FLOR_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "flor_ray" / "versions"


def _own_root(root: Path) -> Path:
    """``root``, created 0700; an error if it is not a directory of this user."""
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = os.lstat(root)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise ConfigError(
            f"the replay cache {str(root)!r} is not a directory of this user (uid {os.getuid()}, its owner "
            f"uid {st.st_uid}): code planted there could run as you. Point FLOR_CACHE_DIR at a directory of "
            "your own, or remove that one")
    if st.st_mode & 0o077:  # ours: close it (what others put in it is checked file by file)
        os.chmod(root, 0o700)
    return root


def _usable(target: Path) -> bool:
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o022


def _discard(root: Path, target: Path) -> None:
    """Move ``target`` out of the way (a rename: tasks reading it keep their files)."""
    aside = root / f".stale-{target.name[:12]}-{secrets.token_hex(4)}"
    try:
        os.rename(target, aside)
    except FileNotFoundError:
        return
    except OSError:  # not renamable: a planted symlink or file, or a dir of someone else
        if os.path.islink(target) or not os.path.isdir(target):
            os.unlink(target)
            return
        raise
    if os.path.islink(aside) or not os.path.isdir(aside):
        os.unlink(aside)
    else:
        shutil.rmtree(aside, ignore_errors=True)


def _build(store, version: str, manifest: Mapping[str, Any], root: Path, target: Path) -> None:
    from ..versions import materialize

    tmp = Path(tempfile.mkdtemp(prefix=f".{version[:8]}-", dir=root))  # 0700
    try:
        materialize(store, version, tmp, manifest)
        os.rename(tmp, target)
    except OSError:
        if not target.exists():
            raise
        # another task on this machine won the race; its copy is checked like any other
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class _Mismatch(Exception):
    pass


def _copy(base: Path, manifest: Mapping[str, Any], version: str, dest: Path) -> None:
    from ..versions import blob_id, write_files

    def read(path: str, sha: str) -> bytes:
        try:
            data = (base / path).read_bytes()
        except OSError as exc:
            raise _Mismatch(path) from exc
        if blob_id(data) != sha:
            raise _Mismatch(path)
        return data

    write_files(dest, manifest, read, version)


def checked_copy(store, version: str, dest: Path) -> Path:
    """Copy ``version``'s files into ``dest`` (created here), each checked against its
    blob id, from this machine's cache (built or rebuilt from the store as needed)."""
    from ..versions import read_version

    manifest = read_version(store, version)
    root = _own_root(cache_root())
    target = root / version
    for attempt in range(2):
        if not _usable(target):
            _discard(root, target)
            _build(store, version, manifest, root, target)
        dest.mkdir()
        try:
            _copy(target, manifest, version, dest)
            return dest
        except _Mismatch as exc:
            shutil.rmtree(dest)
            _discard(root, target)
            if attempt:
                raise StoreError(
                    f"file {exc.args[0]!r} of code version {version} changed in the replay cache {str(target)!r} "
                    "right after it was rebuilt from the store: something on this machine is writing there; "
                    "stop it or point FLOR_CACHE_DIR elsewhere") from None
    raise AssertionError("unreachable")  # pragma: no cover

"""Defaults, in one place, each with the reason for its number.

Precedence (lowest first): these defaults < a YAML config file (the ``config_file``
argument, ``flor-ray --config FILE``, or ``FLOR_CONFIG``) < environment variables
(``FLOR_STORE``, ``FLOR_CHECKPOINT_BUDGET``... see :data:`ENV_VARS`) < explicit
arguments. ``configs/local.yaml`` lists every setting with its default and reason.
Only the standard library is used here (PyYAML is imported when a file is read), so
that ``import flor_ray`` stays light.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from .errors import ConfigError

__all__ = ["Settings", "load_settings", "DEFAULTS_DOC", "ENV_VARS", "MAX_NAME_LEN", "TRACEBACK_KEPT_CHARS",
           "SNAPSHOT_LEFT_OUT_LISTED", "SNAPSHOT_MAX_SUBMODULE_DEPTH", "CARRIED_MAX_ELEMENTS", "CARRIED_MAX_DEPTH",
           "CARRIED_MAX_OBJECTS", "CARRIED_MAX_REASONS", "OUTPUT_MAX_LINE_CHARS"]

# ------------------------------------------------------------------ fixed limits
# Numbers that are not settings: changing them changes what a store holds.

#: Longest log, loop or arg name: names become column headers in ``dataframe`` and the
#: command line's tables, where 200 characters is already several lines.
MAX_NAME_LEN = 200
#: Characters of a failed run's traceback kept in its metadata (the end, where the
#: error is): enough for ~100 frames, small enough to keep the runs table light.
TRACEBACK_KEPT_CHARS = 8000
#: How many left-out paths a run's metadata lists (the count is always exact): a
#: forgotten dataset of 20,000 files would otherwise make every metadata write slow.
SNAPSHOT_LEFT_OUT_LISTED = 100
#: Submodules nested deeper than this are not copied into the store: real projects nest
#: one or two levels, and a submodule that contains itself would otherwise never end.
SNAPSHOT_MAX_SUBMODULE_DEPTH = 8
#: Loop-carried state a checkpoint captures (record/carried.py), per name of the scope:
#: at most this many plain elements (a list of floats grows by one per epoch: 100,000
#: epochs is more than any run, and a few MB at most) ...
CARRIED_MAX_ELEMENTS = 100_000
#: ... attribute levels walked below the name (a config object holding a namespace of
#: settings is 2-3 deep; deeper is a model or data, which checkpointing's objects hold) ...
CARRIED_MAX_DEPTH = 4
#: ... and objects walked below it, so that a capture stays a memory copy of plain values.
CARRIED_MAX_OBJECTS = 200
#: A printed line longer than this (characters) is kept as several lines: a script that
#: writes megabytes without a newline (a tensor's repr, a progress bar without \r)
#: must not hold them all in memory as one pending line.
OUTPUT_MAX_LINE_CHARS = 64 * 1024
#: Names a checkpoint lists as not captured, with the reason: enough to explain a replay,
#: few enough to keep the run's metadata small in a scope with thousands of names.
CARRIED_MAX_REASONS = 64


@dataclass(frozen=True)
class Settings:
    #: Store URL; ``None`` means ``<repository root>/.flor``.
    store: str | None = None
    #: fsspec storage options for the store (endpoint, credentials...).
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    #: Share of training time that checkpointing may add on the training thread.
    #: The record-overhead target is 2% in all; checkpoints take half of it, logging
    #: and flushing the other half. A larger budget checkpoints more often, which
    #: makes replays start closer to the iterations they need.
    checkpoint_budget: float = 0.01
    #: Upper bound on the checkpoint period (outer iterations between checkpoints),
    #: so that a replay never re-executes more than this many iterations to reach
    #: any iteration, however expensive checkpoints are.
    checkpoint_max_period: int = 16
    #: Seconds between two flushes of a recording's rows and metadata, at outer
    #: iteration ends. A flush (a Parquet file and the run's JSON, each an atomic,
    #: fsynced write) costs ~5-40 ms; epochs of a second or more flush at every end, as
    #: before, while a step loop of 2 ms steps would otherwise spend most of its time
    #: flushing. A crash loses at most this much of the rows.
    flush_interval_s: float = 0.25
    #: Untracked files larger than this are left out of the code snapshot (data,
    #: weights a script wrote next to itself); tracked files are always kept.
    snapshot_max_file_bytes: int = 10 * 1024 * 1024
    #: At most this many untracked files go into the code snapshot (code and configs
    #: first, then shallow paths first). Untracked code is a few new modules, rarely
    #: more than a hundred files; thousands of untracked, unignored files are a dataset,
    #: outputs or a virtualenv, which git would hash on the training thread at run start
    #: (~20,000 files: seconds) and the store would copy per version. A warning names
    #: what was left out; the run's metadata lists it.
    snapshot_max_untracked_files: int = 1000
    #: At most this many bytes of untracked files in all, for the same reason: 64 MiB
    #: hashes in ~0.1 s and holds any source tree with room to spare.
    snapshot_max_untracked_total_bytes: int = 64 * 1024 * 1024
    #: Relative tolerance when comparing replayed with recorded floats. 0 = exact,
    #: the right default on CPU where replay is bit-for-bit.
    fidelity_rtol: float = 0.0
    #: Ray task retries for a replay segment (worker crash, node loss).
    max_retries: int = 3
    #: Local folder where a recording spools its rows and metadata while the store
    #: cannot be written (disk full, read-only, endpoint down); ``None`` means
    #: ``~/.cache/flor_ray/spool``: off the store's filesystem, which may be the full one.
    spool_dir: str | None = None
    #: Attempts per store write before a recording spools (rows, metadata) or skips
    #: (checkpoints) it. Backoff 0.05 s, 0.2 s, 0.8 s...: 3 attempts ride out a
    #: blip and wait ~0.25 s, which a training loop never notices.
    write_retries: int = 3
    #: Seconds to open a connection to the store's endpoint. A reachable endpoint
    #: answers a TCP handshake in milliseconds, even across regions; 10 s leaves room
    #: for a loaded network without making a dead endpoint look like a hang.
    connect_timeout_s: float = 10.0
    #: Seconds to wait for a reply from the store's endpoint. Large objects stream in
    #: chunks, so this bounds the wait between bytes, not a transfer; 30 s covers a slow
    #: S3-compatible server under load.
    read_timeout_s: float = 30.0
    #: Seconds to reach a Ray cluster's GCS (``--address``) before giving up. A live
    #: head answers at once; 15 s covers a head that is still starting.
    ray_connect_timeout_s: float = 15.0
    #: Bytes of printed text (stdout, stderr, logging records) kept with a run; 0 turns
    #: the capture off. 8 MiB holds ~80,000 lines of 100 characters: every epoch summary
    #: of any run and the per-step lines of most, about 1-2 MB in the store once
    #: compressed. A script printing a line per step for a million steps would otherwise
    #: store ~100 MB per run. Lines past the cap are counted, not kept (the run's
    #: traceback is kept in its metadata whatever the cap).
    output_max_bytes: int = 8 * 1024 * 1024
    #: A run that ends with at least this many record parts (one per flush) has them
    #: compacted into one file (0: never). Every part is a file to list and open, on
    #: object stores a request each: 2 compacts any run that has more than one.
    compact_after: int = 2
    #: When a run ends and at least this many ended runs have files of their own (not
    #: yet in a segment), those files are merged into one segment (0: never; see
    #: flor_ray/store/consolidation.py). A query then opens a few segments instead of
    #: a file per run: 32 keeps at most 31 runs loose and costs a recording about one
    #: consolidation in 32.
    consolidate_after: int = 32

    def replace(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **changes)


DEFAULTS_DOC = {f.name: f.default for f in dataclasses.fields(Settings) if f.name != "storage_options"}

#: The environment variable of each setting (``storage_options`` has none: credentials
#: come from the backend's own variables, e.g. ``AWS_*`` for s3fs).
ENV_VARS = {
    "store": "FLOR_STORE",
    "checkpoint_budget": "FLOR_CHECKPOINT_BUDGET",
    "checkpoint_max_period": "FLOR_CHECKPOINT_MAX_PERIOD",
    "flush_interval_s": "FLOR_FLUSH_INTERVAL",
    "snapshot_max_file_bytes": "FLOR_SNAPSHOT_MAX_FILE_BYTES",
    "snapshot_max_untracked_files": "FLOR_SNAPSHOT_MAX_UNTRACKED_FILES",
    "snapshot_max_untracked_total_bytes": "FLOR_SNAPSHOT_MAX_UNTRACKED_TOTAL_BYTES",
    "fidelity_rtol": "FLOR_FIDELITY_RTOL",
    "max_retries": "FLOR_MAX_RETRIES",
    "spool_dir": "FLOR_SPOOL",
    "write_retries": "FLOR_WRITE_RETRIES",
    "connect_timeout_s": "FLOR_CONNECT_TIMEOUT",
    "read_timeout_s": "FLOR_READ_TIMEOUT",
    "ray_connect_timeout_s": "FLOR_RAY_CONNECT_TIMEOUT",
    "output_max_bytes": "FLOR_OUTPUT_MAX_BYTES",
    "compact_after": "FLOR_COMPACT_AFTER",
    "consolidate_after": "FLOR_CONSOLIDATE_AFTER",
}

# The valid range of each number, as (test, what a valid value is).
_RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    "checkpoint_budget": (lambda v: 0 < v <= 1, "a share of training time in (0, 1], e.g. 0.01 for 1%"),
    "checkpoint_max_period": (lambda v: v >= 1, "a whole number of outer iterations >= 1"),
    "flush_interval_s": (lambda v: v >= 0, "a number of seconds >= 0 (0 = flush at every outer iteration)"),
    "snapshot_max_file_bytes": (lambda v: v >= 0, "a number of bytes >= 0"),
    "snapshot_max_untracked_files": (lambda v: v >= 0, "a number of files >= 0"),
    "snapshot_max_untracked_total_bytes": (lambda v: v >= 0, "a number of bytes >= 0"),
    "fidelity_rtol": (lambda v: v >= 0, "a relative tolerance >= 0 (0 = exact)"),
    "max_retries": (lambda v: v >= 0, "a number of retries >= 0"),
    "write_retries": (lambda v: v >= 1, "a number of attempts >= 1"),
    "connect_timeout_s": (lambda v: v > 0, "a number of seconds > 0"),
    "read_timeout_s": (lambda v: v > 0, "a number of seconds > 0"),
    "ray_connect_timeout_s": (lambda v: v > 0, "a number of seconds > 0"),
    "output_max_bytes": (lambda v: v >= 0, "a number of bytes >= 0 (0 turns output capture off)"),
    "compact_after": (lambda v: v >= 0, "a number of record parts >= 0 (0: never compact)"),
    "consolidate_after": (lambda v: v >= 0, "a number of runs >= 0 (0: never consolidate)"),
}


def _known() -> str:
    return ", ".join(f.name for f in dataclasses.fields(Settings))


def _coerce(name: str, raw: Any, source: str = "") -> Any:
    """``raw`` (from YAML, an environment string or an argument) as the setting's type."""
    where = f" (from {source})" if source else ""
    fld = {f.name: f for f in dataclasses.fields(Settings)}.get(name)
    if fld is None:
        raise ConfigError(f"unknown setting {name!r}{where}; known settings: {_known()}")
    if name == "storage_options":
        if raw is None:
            return {}
        if not isinstance(raw, Mapping):
            raise ConfigError(f"storage_options{where} must be a mapping of fsspec options, "
                              f"e.g. {{endpoint_url: http://127.0.0.1:9000}}; got {type(raw).__name__}")
        return dict(raw)
    if name in ("store", "spool_dir"):
        if raw is None or raw == "":
            return None
        if not isinstance(raw, (str, os.PathLike)):
            raise ConfigError(f"{name}{where} must be a URL or path string, got {raw!r}")
        return os.fspath(raw)
    default = fld.default
    kind = type(default)
    article = "an" if kind is int else "a"
    if raw is None or isinstance(raw, bool):  # YAML `yes`/`~` are never numbers here
        raise ConfigError(f"setting {name}={raw!r}{where} is not {article} {kind.__name__}; the default is {default!r}")
    try:
        if kind is int:
            num = float(raw) if isinstance(raw, str) else raw
            if isinstance(raw, str) and raw.strip().lstrip("+-").isdigit():
                value: Any = int(raw)
            elif isinstance(num, (int, float)) and float(num).is_integer():
                value = int(num)
            else:
                raise ValueError(raw)
        else:
            value = float(raw)
            if not math.isfinite(value):
                raise ValueError(raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"setting {name}={raw!r}{where} is not {article} {kind.__name__}; "
            f"the default is {default!r}"
        ) from exc
    ok, what = _RANGES[name]
    if not ok(value):
        raise ConfigError(f"setting {name}={raw!r}{where} is out of range: use {what}")
    return value


def _read_file(path: str | os.PathLike, how: str) -> dict[str, Any]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} ({how}) does not exist; fix the path or create it "
                          "from configs/local.yaml")
    import yaml  # lazy: only needed when a file is given

    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        first = str(exc).replace("\n", " ")
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {first}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {str(p)!r} cannot be read: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping of settings (name: value), "
                          f"not a {type(data).__name__}; see configs/local.yaml")
    return {str(k): _coerce(str(k), v, f"config file {str(p)!r}") for k, v in data.items()}


def load_settings(config_file: str | os.PathLike | None = None, **overrides: Any) -> Settings:
    """Defaults < config file (argument or ``FLOR_CONFIG``) < environment < overrides.

    Overrides that are ``None`` are ignored, so callers can pass optional arguments
    straight through. Every bad file, name or value raises :class:`ConfigError` with a
    message that names where the value came from.
    """
    values: dict[str, Any] = {}
    if config_file:
        values.update(_read_file(config_file, "config_file argument / --config"))
    elif os.environ.get("FLOR_CONFIG"):
        values.update(_read_file(os.environ["FLOR_CONFIG"], "FLOR_CONFIG"))
    for name, env in ENV_VARS.items():
        if os.environ.get(env):
            values[name] = _coerce(name, os.environ[env], f"environment {env}")
    for k, v in overrides.items():
        if v is not None:
            values[k] = _coerce(k, v, "argument")
    return Settings(**values)

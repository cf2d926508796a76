"""Where each thing lives in a store: the one module that builds store paths.

Layout (``SCHEMA_VERSION`` in :mod:`flor_ray.store.logs` versions the log files)::

    <url>/flor-store.json                       marker: store format version
    <url>/runs/<run_id>.json                    one run's metadata (rewritten whole)
    <url>/logs/run_id=<id>/source=record/part-<flush>.parquet   recorded rows, one file per flush
    <url>/logs/run_id=<id>/source=record/compact-<first>-<last>.parquet   flushes first..last, compacted
    <url>/logs/run_id=<id>/source=replay/<task>.parquet   rows of one replay task
    <url>/logs/segments/seg-<time>-<rand>.parquet   rows of many runs' files, consolidated
    <url>/checkpoints/<run_id>/<iteration>.pt   checkpoint of one outer iteration (a full copy,
                                                or a skeleton referencing the run's objects)
    <url>/checkpoints/<run_id>/objects/<sha256> one tensor of the run's checkpoints, stored once
    <url>/code/versions/<commit>.json           a version: {path: blob id}
    <url>/code/objects/<blob id>                file contents, content-addressed
    <url>/output/<run_id>/part-<n>.parquet      printed lines of a recording, one file per flush
    <url>/replays/<time>-<id>.json              timings of one replay (plan calibration)
    <url>/quarantine/<time>/<path>              damaged files moved aside by ``flor-ray check``
    <url>/manifest.json                         sealed runs' metadata and parts (a cache, checked)
    <url>/manifest-plan.json                    sealed runs' timings and logged names (the planner's)

Every path is store-relative (``/``-separated). Components built from user input go
through :func:`safe_component`, so an id can never escape the store.
"""

from __future__ import annotations

import os
import re

from ..errors import InvalidNameError

__all__ = [
    "MARKER", "RUNS", "LOGS", "CHECKPOINTS", "CODE_VERSIONS", "CODE_OBJECTS", "REPLAYS", "QUARANTINE",
    "safe_component", "store_url", "run_meta", "run_id_of_meta", "log_folder", "record_part", "replay_part",
    "part_run_id", "part_run_folder", "part_source", "part_task", "checkpoint", "checkpoint_folder",
    "checkpoint_objects", "checkpoint_object", "saved_file", "kind_of", "run_of",
    "code_version", "code_object", "replay_history", "quarantined", "OUTPUT", "output_folder", "output_part",
    "output_run_id", "compacted_part", "part_flushes", "MANIFEST", "PLAN_FACTS", "SEGMENTS", "segment", "is_segment",
]

MARKER = "flor-store.json"
RUNS = "runs"
LOGS = "logs"
CHECKPOINTS = "checkpoints"
CODE_VERSIONS = "code/versions"
CODE_OBJECTS = "code/objects"
REPLAYS = "replays"
OUTPUT = "output"
QUARANTINE = "quarantine"
MANIFEST = "manifest.json"
PLAN_FACTS = "manifest-plan.json"
SEGMENTS = "logs/segments"
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=-]{0,199}$")
_RUN_DIR = "run_id="
_SOURCE_DIR = "source="


def safe_component(kind: str, value: object) -> str:
    """Check that ``value`` can be one path component inside the store."""
    if not isinstance(value, str) or not _SAFE.match(value) or ".." in value:
        raise InvalidNameError(
            kind,
            value,
            "use letters, digits, '.', '_', '-' and '=' only (no '/', no '..'); "
            "it names a path inside the store",
        )
    return value


def store_url(url: str) -> str:
    """The canonical form of a store URL (what :attr:`Store.url` holds): an object
    store's URL without its trailing ``/``, a local folder as an absolute path."""
    return url.rstrip("/") if "://" in url else os.path.abspath(os.path.expanduser(url))


# ------------------------------------------------------------------- runs
def run_meta(run_id: str, checked: bool = True) -> str:
    """The metadata file of a run (``checked``: the id is checked to be one path
    component; a name listed from the store itself needs no check)."""
    return f"{RUNS}/{safe_component('run id', run_id) if checked else run_id}.json"


def run_id_of_meta(rel_or_name: str) -> str | None:
    """The run id a metadata file (path or name) is named after; None if not ``.json``."""
    name = rel_or_name.rsplit("/", 1)[-1]
    return name[: -len(".json")] if name.endswith(".json") else None


# ------------------------------------------------------------------- logs
def log_folder(run_id: str, source: str) -> str:
    """The folder of one run's rows from one source (``record``, ``replay`` ...)."""
    return f"{LOGS}/{_RUN_DIR}{run_id}/{_SOURCE_DIR}{source}"


def record_part(run_id: str, flush: int) -> str:
    """The Parquet part a recording writes at its ``flush``-th flush."""
    return f"{log_folder(run_id, 'record')}/part-{flush:05d}.parquet"


def compacted_part(run_id: str, first: int, last: int) -> str:
    """The Parquet file that replaces a run's record parts of flushes ``first..last``."""
    return f"{log_folder(run_id, 'record')}/compact-{first:05d}-{last:05d}.parquet"


_PART_NAME = re.compile(r"^(?:part-(\d+)|compact-(\d+)-(\d+))\.parquet$")


def part_flushes(rel: str) -> tuple[int, int] | None:
    """The flushes (first, last) a record part holds: ``part-7`` (7, 7), ``compact-0-19``
    (0, 19); None for another name."""
    m = _PART_NAME.match(rel.rsplit("/", 1)[-1])
    if m is None:
        return None
    if m.group(1) is not None:
        return int(m.group(1)), int(m.group(1))
    return int(m.group(2)), int(m.group(3))


def segment(name: str) -> str:
    """A segment file (rows of many runs, :mod:`flor_ray.store.segments`) named ``name``
    (``seg-<time>-<rand>``, without ``.parquet``)."""
    return f"{SEGMENTS}/{safe_component('segment', name)}.parquet"


def is_segment(rel: str) -> bool:
    """Whether ``rel`` is a segment file."""
    return rel.startswith(SEGMENTS + "/") and rel.endswith(".parquet")


def replay_part(run_id: str, task_key: str, source: str = "replay") -> str:
    """The one Parquet part of a replay task (``source``: where the fidelity check put it)."""
    return f"{log_folder(run_id, source)}/{task_key}.parquet"


def part_run_folder(rel: str) -> str | None:
    """``logs/run_id=<id>`` of a path below ``logs/``; None when it is not in a run's folder."""
    bits = rel.split("/")
    return "/".join(bits[:2]) if len(bits) > 2 and bits[1].startswith(_RUN_DIR) else None


def part_run_id(rel: str) -> str | None:
    """The run id of a path below ``logs/run_id=<id>/``; None elsewhere."""
    folder = part_run_folder(rel)
    return None if folder is None else folder.split("/")[1][len(_RUN_DIR):]


def part_source(rel: str) -> str | None:
    """The source (``record``, ``replay``, ...) of a log part; None outside a source folder."""
    bits = rel.split("/")
    return bits[2][len(_SOURCE_DIR):] if len(bits) > 3 and bits[2].startswith(_SOURCE_DIR) else None


def part_task(rel: str) -> str:
    """The task key a replay part is named after (its file name without ``.parquet``)."""
    name = rel.rsplit("/", 1)[-1]
    return name[: -len(".parquet")] if name.endswith(".parquet") else name


# ------------------------------------------------------------- checkpoints
def checkpoint_folder(run_id: str) -> str:
    return f"{CHECKPOINTS}/{run_id}"


def checkpoint(run_id: str, iteration: int) -> str:
    """The checkpoint file of one outer iteration of a run."""
    return f"{checkpoint_folder(run_id)}/{iteration:06d}.pt"


def saved_file(run_id: str, name: str) -> str:
    """A file a run saved itself (FlorDB's copies, imported): kept with the run, not a checkpoint."""
    return f"{checkpoint_folder(run_id)}/saved/{safe_component('saved file', name)}"


def checkpoint_objects(run_id: str) -> str:
    """The folder of the tensors a run's checkpoints share (content-addressed)."""
    return f"{checkpoint_folder(run_id)}/objects"


def checkpoint_object(run_id: str, digest: str) -> str:
    """One tensor of a run's checkpoints, named by the sha256 of its dtype, shape and bytes."""
    return f"{checkpoint_objects(run_id)}/{digest}"


# ------------------------------------------------------------------ output
def output_folder(run_id: str) -> str:
    """The folder of a run's captured output (printed lines)."""
    return f"{OUTPUT}/{safe_component('run id', run_id)}"


def output_part(run_id: str, flush: int) -> str:
    """The Parquet part of captured output a recording writes at its ``flush``-th output flush."""
    return f"{output_folder(run_id)}/part-{flush:05d}.parquet"


def output_run_id(rel: str) -> str | None:
    """The run id of a path below ``output/<run_id>/``; None elsewhere."""
    bits = rel.split("/")
    return bits[1] if len(bits) > 2 and bits[0] == OUTPUT else None


# -------------------------------------------------------------------- code
def code_version(tree: str) -> str:
    """The manifest of a code version ({path: blob id})."""
    return f"{CODE_VERSIONS}/{tree}.json"


def code_object(blob: str) -> str:
    """A file's contents, named by its blob id."""
    return f"{CODE_OBJECTS}/{blob}"


# ----------------------------------------------------------------- others
def replay_history(name: str) -> str:
    """One replay's timings file (``name``: the file's name, ``.json`` included)."""
    return f"{REPLAYS}/{name}"


def kind_of(rel: str) -> str:
    """What a store path holds, for ``flor-ray du``: logs, checkpoints, checkpoint
    objects, code, runs, output, replays, quarantine, or other."""
    bits = rel.split("/")
    if bits[0] == CHECKPOINTS:
        return "checkpoint objects" if len(bits) > 3 and bits[2] == "objects" else "checkpoints"
    if bits[0] in (RUNS, LOGS, OUTPUT, REPLAYS, QUARANTINE):
        return bits[0]
    return "code" if bits[0] == CODE_VERSIONS.split("/")[0] else "other"


def run_of(rel: str) -> str | None:
    """The run a store path belongs to (its metadata, rows or checkpoints); None otherwise."""
    bits = rel.split("/")
    if bits[0] == RUNS and len(bits) == 2:
        return run_id_of_meta(bits[1])
    if bits[0] == CHECKPOINTS and len(bits) > 2:
        return bits[1]
    return part_run_id(rel) if bits[0] == LOGS else None


def quarantined(stamp: str, rel: str) -> str:
    """Where ``flor-ray check --repair`` moves the damaged ``rel``."""
    return f"{QUARANTINE}/{stamp}/{rel}"

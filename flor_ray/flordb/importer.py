"""Moving over from FlorDB: a FlorDB project's history into a flor_ray store.

What FlorDB 4.0.1 keeps in the git repository of a project, and what becomes of it:

- ``.flor/runs/<tstamp>.jsonl``: one JSON record per value, ``{projid, tstamp,
  filename, ctx: [{name, iteration, value}], name, value, type}``; type 1 is
  ``flor.log`` and ``flor.arg``, 2 captured output, 3 ``time::*`` profiling, 4
  ``flor::start`` (the earlier run's checkpoint a run started from). FlorDB commits
  these files too: a run missing from the working tree (recorded on another branch,
  or a clone) is read from its commit. Type 1 rows
  become the run's recorded rows, typed as JSON kept them; its ``flor.arg`` values
  become the run's args; the time rows become its timings (for replay estimates).
- a commit per run on the shadow branch (``flor.branch``...), subject
  ``FLOR::Auto-commit::<tstamp>``, ``k=v`` per ``flor.arg`` in its body: the run's
  code version (see :mod:`flor_ray.flordb.code`) and the names of its args. A run
  without one is imported with its values, and a replay says why it cannot run it.
- ``.flor/obj_store/<tstamp>/``: copies of the files the run saved, copied into the
  store and listed in the run's ``saved_files``. They hold no RNG states, so they are
  not replay checkpoints: an imported run replays from iteration 0.
- ``.flor/<projid>.db``: a cache FlorDB rebuilds from the JSONL files; not read.

A run is FlorDB's (projid, tstamp); its flor_ray id is derived from both
(:func:`run_id_for`), so importing twice adds nothing the second time. Everything is
read and checked before the first write: a directory that is not a FlorDB project,
or a record that cannot be read, stops with a :class:`FlorDBImportError` and the
store as it was.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..api import resolve_store
from ..config import load_settings
from ..errors import FlorDBImportError, FlorError, StoreError
from ..record.names import check_name
from ..record.rows import rows_to_table
from ..store import layout
from ..store.logs import MAX_LOOP_DEPTH, table_to_parquet_bytes
from ..store.values import convert
from .code import (AUTO_COMMIT, AutoCommit, Version, git_out, argv_of, auto_commits, import_version,
                   locate_script, write_version)

__all__ = ["import_flordb", "run_id_for", "ImportReport", "FlorDBRun", "build_rows", "failure", "timings"]

LOG, IO, TIME, START = 1, 2, 3, 4
_RECORD_KEYS = ("projid", "tstamp", "filename", "ctx", "name", "value", "type")
_FLOAT = re.compile(r"-?(\d+\.\d*|\.\d+|\d+)(e[-+]?\d+)?|nan|-?inf")


@dataclass(frozen=True)
class FlorDBRun:
    projid: str
    tstamp: str
    filename: str
    source: str  # the JSONL file, relative to the project root, or <commit>:<path> where git holds it
    records: tuple[Mapping[str, Any], ...]


@dataclass(frozen=True)
class PlannedRun:
    run_id: str
    tstamp: str
    meta: Mapping[str, Any]
    rows: Mapping[str, Any] | None  # rows_to_table's arguments; None: no rows
    saved: tuple[tuple[str, str], ...]  # (local file, store-relative path)
    version: Version | None


@dataclass(frozen=True)
class ImportReport:
    store_url: str
    imported: tuple[str, ...]  # run ids
    already: tuple[str, ...]
    not_replayable: tuple[tuple[str, str], ...]  # (run id, why)
    notes: tuple[str, ...] = field(default=())

    def __str__(self) -> str:
        lines = [f"imported {len(self.imported)} FlorDB run(s) into {self.store_url}"
                 + (f"; {len(self.already)} already there" if self.already else "")]
        lines += [f"  {rid}" for rid in self.imported]
        lines += [f"  {rid}: not replayable: {why}" for rid, why in self.not_replayable]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# ------------------------------------------------------------------ reading
def find_project(path: str | os.PathLike) -> Path:
    """The root of the FlorDB project holding ``path``: its git repository's root, where
    ``.flor/runs/*.jsonl`` or FlorDB's auto-commits are."""
    p = Path(path).resolve()
    if not p.is_dir():
        raise FlorDBImportError(f"{str(p)!r} is not a directory; pass the directory of a FlorDB project")
    top = git_out(p, "rev-parse", "--show-toplevel")
    root = Path(top.strip()).resolve() if top and top.strip() else p
    for candidate in dict.fromkeys([p, root]):
        if any((candidate / ".flor" / "runs").glob("*.jsonl")):
            return candidate
    if top and auto_commits(root):
        return root
    raise FlorDBImportError(
        f"{str(p)!r} is not a FlorDB project: there is no .flor/runs/*.jsonl under {str(root)!r} and no "
        f"'{AUTO_COMMIT}' commit in its repository; pass the directory where FlorDB recorded (the git "
        "repository of the scripts that imported flordb)")


def read_runs(root: Path, commits: Mapping[str, AutoCommit]) -> list[FlorDBRun]:
    """Every run of ``.flor/runs/``, then those that only FlorDB's commits hold (a run of
    another branch, a clone), each record checked."""
    runs = []
    for path in sorted((root / ".flor" / "runs").glob("*.jsonl")):
        rel = path.relative_to(root).as_posix()
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise FlorDBImportError(f"cannot read the FlorDB run file {rel}: {exc}; fix its permissions or "
                                    "move it out of .flor/runs/, then import again") from exc
        runs.extend(_parse_run(text, rel))
    have = {r.tstamp for r in runs}
    for tstamp, ac in sorted(commits.items()):
        rel = f".flor/runs/{tstamp}.jsonl"
        text = None if tstamp in have else git_out(root, "show", f"{ac.commit}:{rel}")
        if text is not None:
            runs.extend(_parse_run(text, f"{ac.commit[:10]}:{rel}"))
    return runs


def _parse_run(text: str, rel: str) -> list[FlorDBRun]:
    records = [_record(line, f"{rel}:{n}") for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not records:
        return []
    first = records[0]
    for n, r in enumerate(records, 1):
        if (r["projid"], r["tstamp"]) != (first["projid"], first["tstamp"]):
            raise FlorDBImportError(
                f"{rel} mixes runs: record {n} is of run {r['projid']}/{r['tstamp']}, the first of "
                f"{first['projid']}/{first['tstamp']}; a FlorDB run file holds one run: split or remove it")
    return [FlorDBRun(first["projid"], first["tstamp"], first["filename"], rel, tuple(records))]


def _record(line: str, where: str) -> dict:
    fix = ("repair that line, or move the file out of .flor/runs/ (keep a copy: it is the run's only record), "
           "then import again")
    try:
        rec = json.loads(line)
    except ValueError as exc:
        raise FlorDBImportError(f"{where} is not a JSON record ({exc}); {fix}") from exc
    if not isinstance(rec, dict) or any(k not in rec for k in _RECORD_KEYS):
        missing = [k for k in _RECORD_KEYS if not isinstance(rec, dict) or k not in rec]
        raise FlorDBImportError(f"{where} is not a FlorDB log record (missing {', '.join(missing)}); {fix}")
    ok = (all(isinstance(rec[k], str) and rec[k] for k in ("projid", "tstamp", "filename", "name"))
          and isinstance(rec["type"], int) and (rec["ctx"] is None or isinstance(rec["ctx"], list)))
    for seg in rec["ctx"] or ():
        ok = ok and isinstance(seg, dict) and isinstance(seg.get("name"), str) and (
            seg.get("iteration") is None or isinstance(seg.get("iteration"), int))
    if not ok:
        raise FlorDBImportError(f"{where} has a field of the wrong type (projid, tstamp, filename and name are "
                                f"strings, type an int, ctx a list of {{name, iteration, value}}); {fix}")
    return rec


def run_id_for(projid: str, tstamp: str) -> str:
    """The flor_ray run id of FlorDB's run (projid, tstamp): its start time, then a hash of both."""
    digest = hashlib.sha256(f"flordb\0{projid}\0{tstamp}".encode()).hexdigest()[:6]
    try:
        when = _dt.datetime.fromisoformat(tstamp).strftime("%Y%m%dT%H%M%S")
    except ValueError:
        when = "flordb"
    return f"{when}-{digest}"


# --------------------------------------------------------------------- rows
def _item(seg: Mapping[str, Any]) -> Any:
    """The loop item flor_ray would have kept (an int other than the iteration, or a
    str) from FlorDB's ``str(item)``; FlorDB wrote floats, bools and containers as text too."""
    v, i = seg.get("value"), seg.get("iteration")
    if v is None or v == str(i) or not isinstance(v, str):
        return None
    if re.fullmatch(r"-?\d+", v):
        return int(v) if int(v) != i else None
    if v in ("True", "False", "None") or v[:1] in "[{(" or _FLOAT.fullmatch(v):
        return None
    return v


def build_rows(run: FlorDBRun, arg_names: Sequence[str], version: str, script: str):
    """(rows for rows_to_table or None, args, notes) of one run's type-1 records."""
    args: dict[str, Any] = {}
    rows: dict[str, Any] = {"prefixes": [], "prefix_ids": [], "lasts": [], "items": [], "names": [], "values": []}
    prefix_ids: dict[tuple, int] = {}
    left_out: dict[str, str] = {}
    for rec in run.records:
        if rec["type"] != LOG:
            continue
        name, ctx = rec["name"], rec["ctx"] or []
        if not ctx and name in arg_names and name not in args:
            args[name] = rec["value"]
            continue
        try:
            check_name("log", name)
            for seg in ctx:
                check_name("loop", seg["name"])
            if len(ctx) > MAX_LOOP_DEPTH:
                raise FlorError(f"it is nested {len(ctx)} loops deep; flor_ray keeps {MAX_LOOP_DEPTH}")
            value = convert(name, rec["value"])
        except FlorError as exc:
            left_out.setdefault(name, str(exc))
            continue
        items = tuple(_item(s) for s in ctx)
        enc_items = items[:-1] if any(x is not None for x in items[:-1]) else None
        key = ("/".join(s["name"] for s in ctx), tuple(s["iteration"] for s in ctx[:-1]), enc_items, len(ctx))
        if key not in prefix_ids:
            prefix_ids[key] = len(rows["prefixes"])
            rows["prefixes"].append(key)
        if ctx and items[-1] is not None:
            rows["items"].append((len(rows["names"]), items[-1]))
        rows["prefix_ids"].append(prefix_ids[key])
        rows["lasts"].append(ctx[-1]["iteration"] if ctx else None)
        rows["names"].append(name)
        rows["values"].append(value)
    notes = [f"{n!r} left out: {why}" for n, why in left_out.items()]
    if not rows["names"]:
        return None, args, notes
    return {**rows, "version": version, "file": script, "seq_start": 0}, args, notes


def failure(run: FlorDBRun) -> dict | None:
    """The uncaught exception that ended the run, from the traceback FlorDB captured on stderr."""
    err = [r["value"] for r in run.records
           if r["type"] == IO and r["name"] == "io::stderr" and isinstance(r["value"], str)]
    starts = [i for i, line in enumerate(err) if line.startswith("Traceback (most recent call last)")]
    if not starts:
        return None
    tb = err[starts[-1]:]
    kind, _, message = tb[-1].partition(": ")
    return {"type": kind.strip() or "Exception", "message": message, "traceback": "\n".join(tb)[-8000:]}


def timings(run: FlorDBRun, failed: bool = False) -> tuple[dict, str | None, int]:
    """flor_ray's timings from FlorDB's time rows, the outer loop's name, its completed
    iterations (a failed run's last one did not complete, unless its loop had ended)."""
    outer = next((r["ctx"][0]["name"] for r in run.records if r["type"] in (LOG, TIME) and r["ctx"]), None)
    top = {r["name"]: r["value"] for r in run.records if r["type"] == TIME and not r["ctx"]}
    inner: dict[int, float] = {}
    seen: set[int] = set()
    for r in run.records:
        ctx = r["ctx"] or []
        if ctx and ctx[0]["name"] == outer and isinstance(ctx[0]["iteration"], int):
            seen.add(ctx[0]["iteration"])
            if r["type"] == TIME and len(ctx) == 1 and r["name"] == "time::loop":
                inner[ctx[0]["iteration"]] = inner.get(ctx[0]["iteration"], 0.0) + float(r["value"])
    n = max(seen) + (0 if failed else 1) if seen else 0
    if isinstance(top.get("time::iter::n"), int) and outer is not None:  # written when the outer loop ended
        n = top["time::iter::n"]
    mean = top.get("time::iter") if outer is not None else None
    t = {"setup_s": _num(top.get("time::setup")), "start_s": None, "setup_imports_s": 0.0,
         "outer_s": [float(mean)] * n if _num(mean) is not None else [],
         "inner_s": [inner.get(i, 0.0) for i in range(n)] if inner else [],
         "inner_n": [], "checkpoint_s": [], "checkpoint_write_cpu_s": [],
         "teardown_s": _num(top.get("time::teardown")), "script_s": _num(top.get("time::script"))}
    return t, outer, n


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _arg_value(text: str) -> Any:
    try:
        v = json.loads(text)
    except ValueError:
        return text
    return v if isinstance(v, (int, float, bool, str)) else text


def saved_files(root: Path, tstamp: str, run_id: str) -> tuple[list[dict], list[tuple[str, str]], set[str]]:
    """A run's copies in ``.flor/obj_store/<tstamp>/``: (entries for its metadata,
    (local file, store path) pairs, the project paths the run saved to)."""
    shelf = root / ".flor" / "obj_store" / tstamp
    entries, copies, paths = [], [], set()
    index = shelf / ".latest" / "index.json"
    found: list[tuple[str, Path, str, str]] = []  # (name, file, kind, backend)
    if index.is_file():
        try:
            saved = json.loads(index.read_text())
            for name, e in saved.items():
                found.append((name, index.parent / e["file"], "the run's last save of the file", e["backend"]))
                src = (e.get("source") or {}).get("path")
                if isinstance(src, str):
                    paths.add(src)
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            raise FlorDBImportError(f"{index.relative_to(root)} is not FlorDB's index of saved files ({exc}); "
                                    "repair it or move it away, then import again") from exc
    backends = {".pth": "state_dict", ".pt": "state_dict", ".npy": "numpy", ".parquet": "pandas", ".pkl": "pickle"}
    if shelf.is_dir():
        for f in sorted(shelf.iterdir()):
            if f.is_file() and f.suffix in backends:
                found.append((f.name, f, "an iteration snapshot of an older FlorDB", backends[f.suffix]))
    for name, f, kind, backend in found:
        if not f.is_file():
            continue
        data = f.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        rel = layout.saved_file(run_id, digest[:16] + (f.suffix if re.fullmatch(r"[.][a-z]{1,8}", f.suffix) else ""))
        entries.append({"name": name, "kind": kind, "backend": backend, "path": rel, "bytes": len(data),
                        "sha256": digest})
        copies.append((str(f), rel))
    return entries, copies, paths


# ----------------------------------------------------------------- planning
def plan_run(root: Path, run: FlorDBRun, ac: AutoCommit | None, version: Version | None,
             saved: tuple[list[dict], list[tuple[str, str]]]) -> PlannedRun:
    """Everything one run's import writes, read and checked; nothing written yet."""
    run_id = run_id_for(run.projid, run.tstamp)
    script, refused = run.filename, None
    if ac is None:
        refused = (f"FlorDB made no commit '{AUTO_COMMIT}{run.tstamp}' for it in {root} (detached HEAD, or its "
                   "branch is gone): its code is unknown; fetch the branch that holds it and import again")
    else:
        assert version is not None
        script, refused = locate_script(version, run.filename)
    start = next((r for r in run.records if r["type"] == START), None)
    if start is not None and refused is None:
        refused = ("it started from a checkpoint of an earlier FlorDB run (flor::start "
                   f"{str(start['value'])[:120]}), a state flor_ray cannot restore")
    arg_names = list(ac.args) if ac else []
    rows, args, notes = build_rows(run, arg_names, version.version if version else "", script)
    for k, text in (ac.args if ac else {}).items():
        args.setdefault(k, _arg_value(text))
    args = {k: args[k] for k in arg_names}
    error = failure(run)
    t, outer, n = timings(run, failed=error is not None)
    started = _iso(run.tstamp)
    ended = None
    if started and t["script_s"] is not None:
        ended = (_dt.datetime.fromisoformat(started) + _dt.timedelta(seconds=t["script_s"])).isoformat(
            timespec="milliseconds")
    meta = {
        "run_id": run_id, "project": run.projid, "script": script, "version": version.version if version else "",
        "commit": ac.commit if ac else None, "ref": None, "left_out_of_snapshot": [],
        "left_out_of_snapshot_count": 0, "argv": argv_of(root, ac, run.tstamp) if ac else [], "cwd": None,
        "status": "failed" if error else "finished", "started_at": started, "ended_at": ended, "host": None,
        "pid": None,
        "env": {"device": "cpu"}, "store_format": 1, "args": args, "outer_loop": outer, "iterations": n,
        "timings": t, "checkpoints": [], "checkpoint_period": None, "flushes": 1 if rows else 0,
        "saved_files": saved[0], "updated_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds"),
        "imported_from": {"tool": "flordb", "projid": run.projid, "tstamp": run.tstamp, "file": run.source,
                          "records": len(run.records), "rows": len(rows["names"]) if rows else 0,
                          "output_lines": sum(r["type"] == IO for r in run.records), "notes": notes},
    }
    if refused:
        meta["replay_refused"] = refused
    if error:
        meta["error"] = error
    return PlannedRun(run_id, run.tstamp, meta, rows, tuple(saved[1]), version)


def _iso(tstamp: str) -> str | None:
    """FlorDB's local-time tstamp as an ISO time in UTC, like flor_ray's ``started_at``."""
    try:
        return _dt.datetime.fromisoformat(tstamp).astimezone(_dt.timezone.utc).isoformat(timespec="milliseconds")
    except ValueError:
        return None


# ------------------------------------------------------------------ writing
def write_run(store, p: PlannedRun, have: set[str]) -> None:
    """Write one planned run; its metadata last, so the run appears whole or not at all."""
    try:
        if p.version is not None:
            write_version(store, p.version, have)
        for local, rel in p.saved:
            store.write_bytes(rel, Path(local).read_bytes(), durable=True)
        if p.rows is not None:
            table = rows_to_table(**p.rows)
            store.write_bytes(layout.record_part(p.run_id, 0), table_to_parquet_bytes(table))
        store.write_json(store.runs_rel(p.run_id), dict(p.meta))
    except BaseException:
        # its rows and saved files; code objects are shared by content with other runs: kept
        for rel in (layout.log_folder(p.run_id, "record"), layout.checkpoint_folder(p.run_id)):
            try:
                store.delete(rel)
            except Exception:  # noqa: BLE001 - best effort; the original error is raised
                pass
        raise


def _already(store, run_id: str, run: FlorDBRun) -> bool:
    """Whether this FlorDB run is already in the store (a run id taken by another run is an error)."""
    rel = store.runs_rel(run_id)
    if not store.exists(rel):
        return False
    try:
        meta = store.read_json(rel)
        origin = meta.get("imported_from") or {}
    except (StoreError, AttributeError):
        origin = {}
    if (origin.get("tool"), origin.get("projid"), origin.get("tstamp")) == ("flordb", run.projid, run.tstamp):
        return True
    raise FlorDBImportError(f"the store {store.url!r} already holds a run {run_id} that is not FlorDB's run "
                            f"{run.projid}/{run.tstamp}; import into another store (--store URL)")


def import_flordb(path: str | os.PathLike = ".", store: Any = None) -> ImportReport:
    """Import the FlorDB project at ``path`` into ``store`` (resolved as every command
    does, from the project's directory); runs already imported are left as they are."""
    root = find_project(path)
    commits = auto_commits(root)
    runs = read_runs(root, commits)
    if not runs:
        raise FlorDBImportError(f"the FlorDB project {str(root)!r} has no records in .flor/runs/*.jsonl or its "
                                "commits; record a run with FlorDB first, or pass another directory")
    st = resolve_store(store, cwd=root)
    max_bytes = load_settings().snapshot_max_file_bytes
    todo = [r for r in runs if not _already(st, run_id_for(r.projid, r.tstamp), r)]
    saved = {r.tstamp: saved_files(root, r.tstamp, run_id_for(r.projid, r.tstamp)) for r in todo}
    outputs = frozenset(p for s in saved.values() for p in s[2])
    versions: dict[str, Version] = {}
    planned = []
    for r in todo:
        ac = commits.get(r.tstamp)
        if ac is not None and ac.tree not in versions:
            versions[ac.tree] = import_version(root, ac, outputs, max_bytes)
        planned.append(plan_run(root, r, ac, versions.get(ac.tree) if ac else None, saved[r.tstamp][:2]))
    if planned:
        fresh = st.is_local and not st.exists(layout.MARKER)
        st.ensure()
        if fresh and Path(st.root).resolve() == (root / ".flor").resolve():
            # the store shares FlorDB's .flor/: its own files stay out of git, FlorDB's run files
            # stay in (FlorDB commits them; "*" alone would hide them from its `git add -A`)
            st.write_bytes(".gitignore", b"# written by flor_ray: the store is not source code; FlorDB's "
                                         b"runs/*.jsonl are FlorDB's\n*\n!runs/\nruns/*\n!runs/*.jsonl\n")
        have = set(st.listdir(layout.CODE_OBJECTS))
        for p in planned:
            write_run(st, p, have)
    return ImportReport(
        st.url, tuple(p.run_id for p in planned), tuple(run_id_for(r.projid, r.tstamp) for r in runs if r not in todo),
        tuple((p.run_id, p.meta["replay_refused"]) for p in planned if "replay_refused" in p.meta),
        tuple(f"{p.run_id}: {n}" for p in planned for n in p.meta["imported_from"]["notes"]))

"""Gather the planner's inputs (store, repository, cluster) and call
:func:`~flor_ray.planning.make.make_plan`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from ..errors import ClusterError, PlanningError, QueryError, RepositoryError
from .make import make_plan
from .plan import (ClusterSnapshot, DamagedCheckpoint, Plan, Refused, ReplayedPart, Resources, RunInfo, SkipKind,
                   SkippedRun, VersionPatch)

if TYPE_CHECKING:  # pragma: no cover
    from ..store import Store

__all__ = ["plan_replay", "cluster_snapshot", "propagate_versions", "damaged_checkpoints"]


def cluster_snapshot() -> ClusterSnapshot:
    """Resources of the connected Ray cluster, else of this machine (Ray not started)."""
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        res = ray.cluster_resources()
        alive = [n for n in ray.nodes() if n.get("Alive")]
        node_cpus = max((float((n.get("Resources") or {}).get("CPU", 0)) for n in alive), default=0.0)
        return ClusterSnapshot(float(res.get("CPU", 1)), float(res.get("GPU", 0)), len(alive), node_cpus or None)
    return ClusterSnapshot(float(os.cpu_count() or 1), float(_local_gpus()), 1)


def _local_gpus() -> int:
    """GPUs a local Ray would find here: NVIDIA's driver entries, as CUDA_VISIBLE_DEVICES limits them."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    try:
        return len(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        return 0


def check_fits(plan, cluster: ClusterSnapshot) -> None:
    """Refuse at planning a plan whose tasks ask more than the cluster has (they would wait forever)."""
    pending = [t for t in plan.tasks if not t.done]
    if not pending:
        return
    gpus = max(t.num_gpus for t in pending)
    if gpus > cluster.num_gpus:
        raise ClusterError(
            f"tasks need {gpus:g} GPU; the cluster has {cluster.num_gpus:g}: pass --num-gpus 0 "
            "(resources={'num_gpus': 0}) or connect to a cluster with GPUs"
        )
    cpus = max(t.num_cpus for t in pending)
    if cpus > cluster.num_cpus:
        raise ClusterError(
            f"tasks need {cpus:g} CPUs; the cluster has {cluster.num_cpus:g}: pass --num-cpus "
            f"{cluster.num_cpus:g} or less, or connect to a larger cluster"
        )


def _logged_per_run(store, run_ids: Sequence[str], facts: Mapping[str, Any],
                    pieces: Sequence[Any] | None = None) -> dict[str, frozenset[str]]:
    """Names each run's recording logged: from the plan facts of a sealed run whose
    record files are those the facts were taken from, else from a segment's footer
    (:class:`~flor_ray.store.segments.Origin` ``names``), else from the names of its
    rows (older stores, a crashed run's loose parts, a run still recording): only those
    runs' rows are read. ``pieces``: the relation's pieces of at least these runs
    (:func:`~flor_ray.store.logs.list_pieces`), listed here when None or gone since."""
    from ..store.damage import healthy_pieces
    from ..store.logs import list_pieces

    if not run_ids:
        return {}
    want = frozenset(run_ids)
    for attempt in range(64):
        if pieces is None:
            pieces = list_pieces(store, list(run_ids), ("record",))
        record = healthy_pieces(store, [p for p in pieces if p.source == "record" and p.run_id in want], want)
        try:
            return _record_names(store, run_ids, record, facts)
        except FileNotFoundError:  # compacted or consolidated since the listing: list again
            if attempt == 63:
                raise
            pieces = None
    raise AssertionError("unreachable")


def _record_names(store, run_ids: Sequence[str], record: Sequence[Any],
                  facts: Mapping[str, Any]) -> dict[str, frozenset[str]]:
    """:func:`_logged_per_run` from the runs' healthy ``record`` pieces."""
    by_run: dict[str, list] = {}
    for p in record:
        by_run.setdefault(p.run_id, []).append(p)
    out: dict[str, set[str]] = {r: set() for r in run_ids}
    unknown = []
    for rid, ps in by_run.items():
        f = facts.get(rid)
        if f is not None and f.names is not None and {(p.origin, p.origin_size, p.stamp) for p in ps} == f.parts:
            out[rid] |= f.names
            continue
        for p in ps:
            if p.names is not None:
                out[rid] |= set(p.names)
            else:
                unknown.append(p)
    if unknown:
        from ..store.segments import piece_names

        for p, names in zip(unknown, piece_names(store, unknown)):
            out[p.run_id] |= names
    return {k: frozenset(v) for k, v in out.items()}


def replayed_parts(store, run_ids: Sequence[str], pieces: Sequence[Any] | None = None,
                   ) -> tuple[frozenset[str], tuple[ReplayedPart, ...]]:
    """The keys of the runs' finished replay partitions (kept apart ones too), and
    what each trusted one holds, read from its footer (in parallel: one small read
    per partition, a round trip each on object stores); ``pieces``: the relation's
    pieces of at least these runs (:func:`~flor_ray.store.logs.list_pieces`; None: listed here).

    A partition without that footer (an older task) or with an unreadable one holds
    nothing as far as the planner knows: its values are de-duplicated at query time,
    and the query names a damaged file.
    """
    from concurrent.futures import ThreadPoolExecutor

    from ..store.logs import MISMATCH_SOURCE, TASK_META_KEY, parts_of_runs

    keys: set[str] = set()
    trusted: list = []
    sources = ("replay", MISMATCH_SOURCE)
    if pieces is None:
        pieces = parts_of_runs(store, run_ids, sources)
    want = set(run_ids)
    for piece in pieces:
        if piece.source not in sources or piece.run_id not in want:
            continue
        keys.add(piece.task)
        if piece.source == "replay":
            trusted.append(piece)

    def footer(piece) -> "ReplayedPart | None":
        try:
            if piece.in_segment:  # the footer the task wrote, kept by the segment
                meta = piece.task_footer
            else:
                import pyarrow.parquet as pq  # only for loose partitions: a plan of segments never imports it

                fs, root = store.arrow_fs()
                with fs.open_input_file(f"{root}/{piece.file}") as fh:
                    meta = (pq.read_metadata(fh).metadata or {}).get(TASK_META_KEY)
            d = json.loads(meta) if meta else None
        except (OSError, ValueError):  # pyarrow's ArrowInvalid is a ValueError
            return None
        if not d:
            return None
        return ReplayedPart(piece.run_id, d["task"], d.get("patch") or "", frozenset(d.get("names") or ()),
                            frozenset(d.get("iterations") or ()), bool(d.get("setup")), bool(d.get("after")))

    if sum(not p.in_segment for p in trusted) < 2:
        found = [footer(t) for t in trusted]
    else:
        with ThreadPoolExecutor(min(len(trusted), 16)) as pool:
            found = list(pool.map(footer, trusted))
    return frozenset(keys), tuple(p for p in found if p is not None)


def today_modules(script: Path) -> dict[str, tuple[str, tuple[str, ...]]]:
    """The Python files of today's repository around ``script`` that log a flor name,
    as ``path relative to the repository -> (text, the names it logs)``; the script
    itself is not among them. Empty outside a git repository."""
    from ..propagation.project import logged_names
    from ..versions import find_repo_root

    try:
        root = Path(find_repo_root(script.parent))
    except RepositoryError:
        return {}
    out = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if path.resolve() == script.resolve() or any(
                part.startswith(".") or part in ("__pycache__", "venv", "node_modules") for part in rel.parts[:-1]):
            continue
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue  # not source: nothing to propagate from it
        logged = logged_names(text)
        if logged:
            out[rel.as_posix()] = (text, logged)
    return out


def _module_patches(store, version: str, modules: Mapping[str, tuple[str, tuple[str, ...]]],
                    names: Sequence[str] | None) -> tuple[tuple, tuple, tuple, tuple]:
    """Today's other modules propagated into one version: (files, placements, the names placed, refused)."""
    from ..propagation.project import propagate_project
    from ..versions import VersionFiles

    if not modules:
        return (), (), (), ()
    old = VersionFiles(store, version)
    files, placements, placed, refused = [], [], [], []
    texts = {p: text for p, (text, _) in modules.items()}
    for fp in propagate_project(texts, old, names, logged={p: ns for p, (_, ns) in modules.items()}):
        where = fp.target or fp.path
        if fp.refused:
            refused.extend(Refused(version, n, f"in {fp.path}: {fp.refused}") for n in fp.new_names)
            continue
        res = fp.result
        for n, why in res.refused_names.items():
            refused.append(Refused(version, n, f"in {where}: {why}"))
        if not res.placements:
            continue
        files.append((where, res.code))
        for p in res.placements:
            placements.append(f"{where}: +{','.join(p.names)} at line {p.line}"
                              + (f" in {p.function}()" if p.function else ""))
            placed.extend(p.names)
    return tuple(files), tuple(placements), tuple(dict.fromkeys(placed)), tuple(refused)


def _project_tree(store, version: str, script: str, code: str, files: tuple) -> dict[str, str]:
    """The version's files that its patched script imports, directly or through each other
    (the patched modules substituted); empty when they cannot be read (the script is then
    analysed alone, and the task that materialises the version reports the damage)."""
    from ..analysis.project import project_files
    from ..errors import FlorError
    from ..versions import VersionFiles

    try:
        return project_files(VersionFiles(store, version), script, code, dict(files))
    except (FlorError, OSError):
        return {}


def _module_needs(code: str, script: str, version: str, files: tuple, placed: tuple, tree: Mapping[str, str],
                  training_carried: Sequence[str]) -> tuple[tuple[str, str, str, tuple[str, ...]], ...]:
    """The needs of the statements placed in modules: those of their call sites in the script."""
    from ..analysis.project import module_needs

    if not placed:
        return ()
    found = module_needs(code, script, tree or dict(files), [p for p, _ in files], placed,
                         filename=f"{script}@{version[:8]}")
    # re-executed training reads what the script's training reads, whatever the statement reads
    return tuple((n, nd.kind, nd.reason, tuple(sorted(set(nd.carried) | (set(training_carried)
                                                                          if nd.kind == "inner" else set()))))
                 for n, nd in found)


def propagate_versions(store, today: str, targets: Iterable[tuple[str, str]], names: Sequence[str] | None,
                       modules: Mapping[str, tuple[str, tuple[str, ...]]] | None = None,
                       ) -> dict[tuple[str, str], VersionPatch]:
    """Propagate today's statements of ``names`` (None: all new ones) into each
    ``(version, script)`` of ``targets``, and those of today's other ``modules`` into
    their counterparts; analyse the result. A statement that cannot be placed refuses
    its names in that version only; today's other statements are not injected."""
    from ..propagation import PropagationError, propagate_detailed
    from ..versions import read_file
    from ..analysis import analyze
    from ..analysis.project import analyze_in_project

    patches: dict[tuple[str, str], VersionPatch] = {}
    for version, script in dict.fromkeys(targets):
        try:
            old = read_file(store, version, script).decode()
        except Exception as exc:  # noqa: BLE001 - becomes a skipped run with the reason
            patches[version, script] = VersionPatch(version, None, f"cannot read {script} of this version: {exc}",
                                                    script=script)
            continue
        try:
            res = propagate_detailed(today, old, names, partial=True)
        except PropagationError as exc:
            patches[version, script] = VersionPatch(version, None, str(exc), script=script)
            continue
        an = analyze(res.code, filename=f"{script}@{version[:8]}")
        placements = tuple(
            f"+{','.join(p.names)} at line {p.line}" + (f" [{' > '.join(p.loops)}]" if p.loops else "")
            + (f" renamed {', '.join(f'{a}->{b}' for a, b in p.renames)}" if p.renames else "")
            for p in res.placements
        )
        why = res.refused_names
        refused = tuple(Refused(version, n, why[n]) for n in (names if names is not None else why) if n in why)
        try:
            files, m_places, placed, m_refused = _module_patches(store, version, modules or {}, names)
        except Exception as exc:  # noqa: BLE001 - the version's modules unreadable: their names refused
            files, m_places, placed = (), (), ()
            m_refused = tuple(Refused(version, n, f"cannot read this version's modules: {exc}")
                              for n in _names_of(modules or {}, names))
        tree = _project_tree(store, version, script, res.code, files)
        if len(tree) > 1:  # the script's calls into its modules followed (a train_epoch() running the step loop)
            an = analyze_in_project(res.code, script, tree, filename=f"{script}@{version[:8]}")
        needs = tuple((n, nd.kind, nd.reason, tuple(nd.carried)) for n, nd in an.needs)
        m_needs = _module_needs(res.code, script, version, files, placed, tree, an.training_carried)
        patches[version, script] = VersionPatch(
            version, res.code, None, placements + m_places, needs + m_needs,
            tuple(an.logged_names) + tuple(n for n, *_ in m_needs), tuple(an.loop_carried),
            tuple(an.training_carried), refused + m_refused, files, script=script,
            # a module's statement is taken as logged in the loop: its rows planned as before
            only_after=tuple(n for n, nd in an.needs if nd.kind == "after" and not nd.in_loop))
    return patches


def _names_of(modules: Mapping[str, tuple[str, tuple[str, ...]]], names: Sequence[str] | None) -> list[str]:
    found = dict.fromkeys(n for _, logged in modules.values() for n in logged)
    return [n for n in found if names is None or n in names]


def damaged_checkpoints(store, runs: Sequence[RunInfo]) -> list[DamagedCheckpoint]:
    """Checkpoints of the runs' manifests that are missing from the store or not of
    their recorded size: one listing per checkpoint folder, no checkpoint read (a
    corrupted file of the right size is found by the task that restores it)."""
    from ..store import layout
    from ..store.listing import list_files
    from ..store.logs import LIST_ALL_FROM

    out: list[DamagedCheckpoint] = []
    every: dict[str, int] | None = None  # many runs: one listing of all checkpoints
    if sum(1 for r in runs if r.checkpoints) > LIST_ALL_FROM:
        every = {e.path: int(e.size or 0) for e in list_files(store, layout.CHECKPOINTS, "")}
    for r in runs:
        listed: dict[str, dict[str, int]] = {}
        for c in r.checkpoints:
            folder = c.path.rsplit("/", 1)[0] if "/" in c.path else ""
            if every is not None and c.path.startswith(layout.CHECKPOINTS + "/"):
                size = every.get(c.path)
            else:
                if folder not in listed:
                    listed[folder] = store.sizes(folder)
                size = listed[folder].get(c.path)
            if size is None:
                out.append(DamagedCheckpoint(r.run_id, c.iteration, c.path, "is missing"))
            elif c.bytes is not None and size != c.bytes:
                out.append(DamagedCheckpoint(r.run_id, c.iteration, c.path, f"has {size} bytes, {c.bytes} recorded"))
    return out


def collected_checkpoints(metas: Sequence[Mapping[str, Any]]) -> list[DamagedCheckpoint]:
    """The checkpoints ``flor-ray gc`` deleted from the runs (their tombstones)."""
    from ..store.retention import GC_REASON, tombstones

    return [DamagedCheckpoint(m["run_id"], t["iteration"], str(t.get("path")),
                              f"{GC_REASON} ({t.get('policy')}, {t.get('at')})")
            for m in metas for t in tombstones(m)]


def _check_resources(resources: Any) -> Resources:
    """Resources from a Resources, a mapping or None, with a clear error otherwise."""
    if resources is None:
        return Resources()
    if isinstance(resources, Resources):
        values = {"num_cpus": resources.num_cpus, "num_gpus": resources.num_gpus, "memory": resources.memory}
    elif isinstance(resources, Mapping):
        unknown = sorted(set(resources) - {"num_cpus", "num_gpus", "memory"})
        if unknown:
            raise PlanningError(
                f"unknown resources {', '.join(map(repr, unknown))}; use num_cpus, num_gpus and memory (bytes)"
            )
        values = dict(resources)
    else:
        raise PlanningError(
            f"resources must be a mapping like {{'num_cpus': 2, 'num_gpus': 1}}, got {type(resources).__name__}"
        )
    for key, v in values.items():
        if v is None:  # the default: num_cpus from the recording, num_gpus from its device
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (key == "num_cpus" and v <= 0):
            raise PlanningError(
                f"resources[{key!r}]={v!r} is not a valid amount; give a number"
                + (" > 0" if key == "num_cpus" else " >= 0")
            )
    return Resources(**values)


def plan_replay(
    names: str | Sequence[str] | None = None,
    *,
    store: "Store",
    where: str | None = None,
    iterations: Any = "all",
    script: str | os.PathLike | None = None,
    resources: Resources | Mapping[str, Any] | None = None,
    cluster: ClusterSnapshot | None = None,
    include_running: bool = False,
) -> Plan:
    """Plan a replay over ``store`` (checked); see :func:`flor_ray.replay`.

    A run that is still recording is left out with the reason unless
    ``include_running``: its last iterations are not there yet, and what is replayed
    now is not replayed again once it has finished.
    """
    from ..analysis import analyze
    from ..config import load_settings
    from .history import load_calibration

    settings = load_settings()
    names = _check_names(names)
    resources = _check_resources(resources)
    metas = _selected_runs(store, where)
    path, today = _today_script(script, metas)
    today_an = analyze(today, filename=str(path))
    modules = today_modules(path)
    today_names = list(dict.fromkeys([*today_an.logged_names, *_names_of(modules, None)]))
    from ..store.logs import list_pieces
    from ..store.manifest import read_plan_facts
    from ..store.runs import with_timings

    facts = read_plan_facts(store)
    run_ids = [m["run_id"] for m in metas]
    pieces = list_pieces(store, run_ids)  # the relation's pieces of the runs: for the names and the replays
    logged = _logged_per_run(store, run_ids, facts, pieces)
    names = _requested(names, today_names, logged, metas, path)
    running = [] if include_running else [m for m in metas if m.get("status") == "running"]
    refused = [m for m in metas if m.get("replay_refused") and m not in running]  # e.g. imported without its code
    metas = [m for m in metas if m not in running and m not in refused]
    modules = {p: m for p, m in modules.items() if set(m[1]) & set(names)}
    runs = [RunInfo.from_meta(m, logged.get(m["run_id"], frozenset())) for m in with_timings(store, metas, facts)]
    runs, other_script = _of_todays_script(store, runs, path)
    patches = propagate_versions(store, today, [(r.version, r.script) for r in runs], names, modules)
    done, replayed = replayed_parts(store, [r.run_id for r in runs], pieces)
    cluster = cluster or cluster_snapshot()
    plan = make_plan(
        names=names, where=where, iterations=iterations, runs=runs, patches=patches, cluster=cluster,
        resources=resources, done_keys=done, store_url=store.url, storage_options=store.storage_options,
        retries=settings.max_retries, calibration=load_calibration(store),
        damaged=damaged_checkpoints(store, runs) + collected_checkpoints(metas), replayed=replayed,
        skipped_runs=[SkippedRun(m["run_id"], m["version"],
                                 f"still recording (pid {m.get('pid')} on {m.get('host')}): replay it once it has "
                                 "finished, or pass include_running=True (--include-running)", SkipKind.RUNNING)
                      for m in running]
        + [SkippedRun(m["run_id"], m["version"], f"cannot be replayed: {m['replay_refused']}",
                      SkipKind.NOT_REPLAYABLE) for m in refused] + other_script,
    )
    check_fits(plan, cluster)
    if not plan.tasks and plan.skipped and all(s.kind is SkipKind.OUT_OF_RANGE for s in plan.skipped):
        raise PlanningError(
            f"iterations={iterations!r} is out of range for every selected run ({plan.skipped[0].reason}); "
            "use 'all', 'last' or numbers within the runs' iterations"
        )
    return plan


def _of_todays_script(store: "Store", runs: Sequence[RunInfo], script: Path) -> tuple[list[RunInfo], list[SkippedRun]]:
    """The runs that today's ``script`` is a later version of, and the others skipped.

    A run recorded by another file is left out when its version also holds today's
    script (two scripts side by side, e.g. ``train.py`` and ``finetune.py``): today's
    statement belongs to the one it was typed into. Where its version has no file at
    today's path, the run's script is taken as today's under an earlier name."""
    from ..versions import find_repo_root, read_version

    try:
        rel = Path(os.path.relpath(script.resolve(), Path(find_repo_root(script.parent)).resolve())).as_posix()
    except Exception:  # noqa: BLE001 - not in a repository: nothing to compare paths with
        return list(runs), []
    holds: dict[str, bool] = {}  # version -> it has a file at today's path (read once a version)

    def beside(version: str) -> bool:
        if version not in holds:
            try:
                holds[version] = rel in read_version(store, version)["files"]
            except Exception:  # noqa: BLE001 - an unreadable version: its task reports it
                holds[version] = False
        return holds[version]

    kept, skipped = [], []
    for r in runs:
        if r.script == rel or not beside(r.version):
            kept.append(r)
            continue
        skipped.append(SkippedRun(
            r.run_id, r.version, f"recorded by {r.script}, not by today's {rel} (its version holds both): replay "
            f"it with script='{r.script}' (--script {r.script})", SkipKind.OTHER_SCRIPT))
    return kept, skipped


def _check_names(names: Any) -> list[str] | None:
    """The requested names as a list (None: every new one), or a QueryError."""
    if isinstance(names, str):
        names = [names]
    if names is None:
        return None
    if not isinstance(names, (list, tuple)):
        raise QueryError(f"names must be a log name or a list of them, got {type(names).__name__} {names!r}")
    names = list(names)
    if not names or any(not isinstance(n, str) or not n for n in names):
        raise QueryError(f"names must be non-empty strings, got {names!r}")
    return names


def _selected_runs(store: "Store", where: str | None) -> list[dict]:
    """The store's runs that ``where`` selects, oldest first; an error when none."""
    from ..queries.runs import select_runs
    from ..store.runs import load_runs

    metas = load_runs(store)
    if not metas:
        raise QueryError(f"the store {store.url!r} holds no runs yet; record a run first")
    selected = set(select_runs(store, where, metas))
    metas = [m for m in metas if m["run_id"] in selected]
    if not metas:
        raise QueryError(f"no run matches where={where!r}; see the runs with `flor-ray runs`")
    return metas


def _today_script(script: str | os.PathLike | None, metas: Sequence[Mapping[str, Any]]) -> tuple[Path, str]:
    """Today's script and its text: the argument, else the latest run's script in this checkout."""
    if script is None:
        from ..versions import find_repo_root

        try:
            root = find_repo_root(os.getcwd())
        except RepositoryError as exc:
            raise PlanningError(
                "no script= given and the current directory is not in the repository of the runs; "
                "pass script='path/to/train.py' (today's version, holding the new flor.log statements)"
            ) from exc
        if metas and metas[-1].get("notebook"):
            raise PlanningError(
                f"run {metas[-1]['run_id']} was recorded in a notebook, whose cells are no file of the checkout: "
                f"write them to one (flor.notebook_code({metas[-1]['run_id']!r}, 'today.py')), add the new "
                "flor.log statements there and pass script='today.py'")
        script = Path(root) / metas[-1]["script"]
    path = Path(script)
    if not path.is_file():
        raise PlanningError(f"today's script {str(path)!r} does not exist; pass script= with the path of the training script")
    try:
        return path, path.read_text()
    except UnicodeDecodeError as exc:
        raise PlanningError(f"today's script {str(path)!r} is not UTF-8 text ({exc.reason}); pass the .py file") from exc


def _requested(names: list[str] | None, today_names: Sequence[str], logged: Mapping[str, frozenset[str]],
               metas: Sequence[Mapping[str, Any]], path: Path) -> list[str]:
    """The names to replay: those given (each logged today), else today's names some run lacks."""
    if names is None:
        names = [n for n in today_names if any(n not in logged.get(m["run_id"], ()) for m in metas)]
        if not names:
            raise QueryError(
                f"every name logged by {path.name} (and the modules of its repository) is already in every "
                "selected run; name the statements to replay explicitly"
            )
        return names
    unknown = [n for n in names if n not in today_names]
    if unknown:
        raise QueryError(
            f"{', '.join(map(repr, unknown))} not logged by today's script {str(path)!r} or a module of "
            f"its repository; add flor.log({unknown[0]!r}, ...) first (they log: "
            f"{', '.join(today_names) or 'nothing'})"
        )
    return names

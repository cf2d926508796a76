"""The driver: submit a plan's tasks to Ray, show progress, collect a report."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

from .task import ReplayProcessKilled, TaskResult, run_task

if TYPE_CHECKING:  # pragma: no cover
    from ..planning.plan import DamagedCheckpoint, Plan, Refused

__all__ = ["Report", "Fidelity", "TaskFidelity", "Conflict", "run_plan", "ensure_ray", "compare_fidelity", "find_conflicts"]


@dataclass(frozen=True)
class TaskFidelity:
    """One task's check: its recomputed recorded values against the recording."""

    key: str
    run_id: str
    compared: int
    mismatched: int


@dataclass(frozen=True)
class Fidelity:
    compared: int = 0
    mismatched: int = 0
    by_name: tuple[tuple[str, int, int], ...] = ()  # (name, compared, mismatched)
    examples: tuple[str, ...] = ()
    by_task: tuple[TaskFidelity, ...] = ()
    #: (run_id, what of its recorded numerics a task could not reproduce), see flor_ray.numerics
    numerics: tuple[tuple[str, str], ...] = ()

    @property
    def mismatched_runs(self) -> tuple[str, ...]:
        """Runs with a task whose values are kept apart (SQL: replay_mismatch)."""
        return tuple(sorted({t.run_id for t in self.by_task if t.mismatched}))

    def numerics_lines(self) -> list[str]:
        """The numerics differences, as the likely cause where that run's values mismatched."""
        out = []
        for rid, why in self.numerics:
            lead = "likely cause" if rid in self.mismatched_runs else "numerics"
            out.append(f"  {lead}: run={rid}: {why}")
        return out


@dataclass(frozen=True)
class Conflict:
    """Replay tasks that hold different values for one identity (run, name, loop
    context, occurrence); queries show the earliest task's."""

    run_id: str
    name: str
    context: str
    values: tuple[Any, ...]  # per task, earliest first
    tasks: tuple[str, ...]


@dataclass(frozen=True)
class Report:
    results: tuple[TaskResult, ...]
    skipped_runs: tuple[tuple[str, str], ...]
    fidelity: Fidelity
    wall_s: float
    estimate_s: float
    refused: tuple["Refused", ...] = ()  # requested names left out, per version
    damaged: tuple["DamagedCheckpoint", ...] = ()  # checkpoints the plan routed around
    conflicts: tuple[Conflict, ...] = ()

    @property
    def fallbacks(self) -> tuple[str, ...]:
        """Damaged checkpoints the tasks found and routed around, one line each."""
        return tuple(n for r in self.results for n in r.notes)

    @property
    def ok(self) -> bool:
        """No task failed, every recomputed recorded value matched, no replayed value
        disagrees with another replay of it."""
        return (all(r.status != "failed" for r in self.results) and self.fidelity.mismatched == 0
                and not self.conflicts)

    @property
    def failed(self) -> tuple[TaskResult, ...]:
        return tuple(r for r in self.results if r.status == "failed")

    @property
    def rows(self) -> int:
        return sum(r.rows for r in self.results)

    def __str__(self) -> str:
        n = {s: sum(r.status == s for r in self.results) for s in ("done", "failed", "skipped")}
        lines = [
            f"replay: {n['done']} done, {n['failed']} failed, {n['skipped']} skipped; {self.rows} rows; "
            f"wall {self.wall_s:.1f}s (estimate {self.estimate_s:.1f}s)"
        ]
        for r in self.results:
            est = f"est {r.estimate_s:.1f}s" if r.estimate_s else ""
            line = f"  {r.status:7s} {r.key[:8]} run={r.run_id} rows={r.rows} {r.wall_s:.1f}s {est}"
            if r.phases:
                line += "  [" + " ".join(f"{k} {v:.1f}s" for k, v in r.phases if v >= 0.05) + "]"
            if r.error:
                line += f"  {r.error}"
            lines.append(line)
            lines.extend(f"    {n}" for n in r.notes)
        for d in self.damaged:
            lines.append(f"  run {d.run_id} iteration {d.iteration}: checkpoint {d.path} {d.reason}; planned around it")
        for x in self.refused:
            lines.append(f"  skipped {x.name} in version {x.version[:8]} ({x.runs} run{'s' if x.runs != 1 else ''}): {x.reason}")
        for rid, why in self.skipped_runs:
            lines.append(f"  skipped run={rid}: {why}")
        f = self.fidelity
        lines.append(f"fidelity: {f.compared} recorded values recomputed, {f.mismatched} mismatched")
        for name, c, m in f.by_name:
            lines.append(f"  {name}: {c} compared, {m} mismatched")
        lines.extend(f"  e.g. {e}" for e in f.examples)
        lines.extend(f.numerics_lines())
        for t in f.by_task:
            if t.mismatched:
                lines.append(f"  kept apart: task {t.key[:8]} run={t.run_id} ({t.mismatched} of {t.compared} recorded "
                             "values differ): its values are not back-filled; see SQL's replay_mismatch")
        if f.mismatched_runs:
            lines.append(f"  runs affected: {', '.join(f.mismatched_runs)}")
        if self.conflicts:
            lines.append(f"conflicts: {len(self.conflicts)} replayed value(s) differ from an earlier replay "
                         "(queries show the earliest; SQL's logs_all has every row)")
            for c in self.conflicts[:5]:
                vals = ", ".join(f"{v!r} (task {k[:8]})" for v, k in zip(c.values, c.tasks))
                lines.append(f"  {c.name} run={c.run_id} {c.context}: {vals}")
        return "\n".join(lines)


def check_reachable(address: str, timeout_s: float) -> None:
    """Fail fast, naming the address, unless a TCP connection to it opens in time.

    ``ray.init`` to an address where nothing listens retries for minutes and does not
    answer Ctrl-C meanwhile; a socket connect is bounded and interruptible.
    """
    import socket

    from ..errors import ClusterError

    if address in ("local", "auto"):
        return
    target = address[len("ray://"):] if address.startswith("ray://") else address
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"Ray address {address!r} is not host:port (e.g. 10.0.0.5:6379 or ray://10.0.0.5:10001); "
                           "fix --address / RAY_ADDRESS, or unset them for a local Ray")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ClusterError(
            f"cannot reach the Ray cluster at {address} within ray_connect_timeout_s={timeout_s:g} "
            f"(FLOR_RAY_CONNECT_TIMEOUT): {type(exc).__name__}: {exc.strerror or exc}; start it (`ray start "
            "--head`), fix --address / RAY_ADDRESS, or unset them for a local Ray"
        ) from exc
    _check_grpc(address, f"{host}:{port}", timeout_s)


def _check_grpc(address: str, target: str, timeout_s: float) -> None:
    """Something listens there: it must also speak gRPC, as Ray's GCS and client
    server do. ``ray.init`` to a port that accepts and never answers (another
    service, a stuck process) waits without end; an HTTP/2 handshake is bounded."""
    import grpc

    from ..errors import ClusterError

    channel = grpc.insecure_channel(target)
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout_s)
    except grpc.FutureTimeoutError:
        raise ClusterError(
            f"{address} accepts connections but does not answer as a Ray cluster (no gRPC handshake within "
            f"ray_connect_timeout_s={timeout_s:g}, FLOR_RAY_CONNECT_TIMEOUT): check the port (the head's GCS, "
            "6379 by default, or ray://HOST:10001), or unset --address / RAY_ADDRESS for a local Ray"
        ) from None
    finally:
        channel.close()


def ensure_ray(address: str | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        from ..config import load_settings

        check_reachable(address, load_settings().ray_connect_timeout_s)
    kwargs: dict[str, Any] = {}
    if not address:
        # a new local Ray for this driver only (never silently join a cluster that
        # someone else started on the machine): loopback, no dashboard
        address = "local"
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        # idle workers are kept: each holds a warm zygote (its imports of torch...),
        # which a killed worker would have to pay again for its next task
        kwargs = {"log_to_driver": False, "include_dashboard": False,
                  "_system_config": {"kill_idle_workers_interval_ms": 0}}
    # runtime_env: workers import flor_ray from where the driver does
    pkg_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env_vars = {"PYTHONPATH": os.pathsep.join(filter(None, [pkg_parent, os.environ.get("PYTHONPATH")]))}
    ray.init(address=address, runtime_env={"env_vars": env_vars}, **kwargs)


#: workers (node:pid) of this driver's Ray whose zygote has started: a plan whose
#: slots are all warm does not pay the plan's cold start
_WARM: set[str] = set()
RAY_START_S = 5.0  # a local Ray started for the replay (measured 4-7 s on a 2-core machine)
#: per plan, on the driver: submitting the tasks, then the fidelity check and the
#: replay history once they are done (0.12-0.2 s on a 2-core machine)
PLAN_OVERHEAD_S = 0.15


def _expected_s(plan: "Plan", inline: bool) -> float:
    """The plan's makespan and the driver's own work plus, unless enough workers
    are warm, its cold start."""
    from . import task as task_mod

    if not plan.pending:
        return 0.0
    if inline:
        warm = task_mod._ZYGOTE is not None and task_mod._ZYGOTE.poll() is None
    else:
        warm = len(_WARM) >= min(plan.slots, len(plan.pending))
    return plan.makespan_s + PLAN_OVERHEAD_S + (0.0 if warm or not task_mod.FORK else plan.startup_s)


def _remote():
    import ray

    return ray.remote(run_task)


class _Progress:
    def __init__(self, total: int, estimate: float, enabled: bool):
        self.total, self.estimate, self.enabled = total, estimate, enabled and total > 0
        self.t0 = time.time()
        self.done = 0

    def update(self, done: int) -> None:
        changed = done != self.done
        self.done = done
        if not self.enabled or not (changed or sys.stderr.isatty()):
            return
        el = time.time() - self.t0
        left = max(self.estimate - el, 0.0) if done < self.total else 0.0
        if done:
            left = el / done * (self.total - done)
        width = 24
        fill = int(width * done / self.total)
        sys.stderr.write(f"{chr(13) if sys.stderr.isatty() else ''}replay [{'#' * fill}{'.' * (width - fill)}] {done}/{self.total} tasks "
                         f"{el:.0f}s elapsed, ~{left:.0f}s left " + ("" if sys.stderr.isatty() else "\n"))
        sys.stderr.flush()
        if done == self.total and sys.stderr.isatty():
            sys.stderr.write("\n")


def run_plan(plan: "Plan", *, progress: bool = True, ray_address: str | None = None, inline: bool = False) -> Report:
    t0 = time.time()
    results: list[TaskResult] = []
    pending = plan.pending
    ray_start = 0.0
    if not inline and pending:
        import ray

        if not ray.is_initialized():
            _WARM.clear()  # a new Ray: new workers, cold zygotes
            if not (ray_address or os.environ.get("RAY_ADDRESS")):
                ray_start = RAY_START_S  # ensure_ray starts a local one below
    expected = _expected_s(plan, inline) + ray_start
    for t in plan.tasks:
        if t.done:
            results.append(TaskResult(t.key, t.run_id, "skipped", 0, 0.0, t.estimate_s, error="already done"))
    bar = _Progress(len(pending), expected, progress)
    calls = []
    for t in pending:
        run = plan.run_info(t.run_id)
        spec = t.spec(plan.store_url, plan.storage_options, run)
        files = plan.patch(t.version).files(run.script)
        calls.append((t, (spec, files, list(run.argv), run.cwd, t.estimate_s)))
    if inline or not calls:
        for i, (t, args) in enumerate(calls):
            try:
                results.append(run_task(*args))
            except ReplayProcessKilled as exc:
                results.append(TaskResult(t.key, t.run_id, "failed", 0, 0.0, t.estimate_s, error=str(exc)))
            bar.update(i + 1)
    else:
        import ray

        ensure_ray(ray_address)
        fn = _remote()
        refs = {}
        # longest first: what the makespan estimate (LPT list scheduling) assumes
        for t, args in sorted(calls, key=lambda c: -c[0].estimate_s):
            opts: dict[str, Any] = {"num_cpus": t.num_cpus, "num_gpus": t.num_gpus, "max_retries": plan.retries,
                                    "retry_exceptions": [ReplayProcessKilled], "name": f"flor-replay-{t.key[:12]}"}
            if t.memory:
                opts["memory"] = t.memory
            refs[fn.options(**opts).remote(*args)] = t
        _collect(refs, results, bar, plan.retries)
    _WARM.update(r.worker for r in results if r.worker)
    if pending:
        from ..planning.history import record_history
        from ..store import Store

        record_history(Store(plan.store_url, plan.storage_options), plan, results)
    fid = compare_fidelity(plan, [r for r in results if r.status in ("done", "skipped")])
    _keep_apart(plan, fid)
    conflicts = find_conflicts(plan, sorted({r.run_id for r in results if r.status in ("done", "skipped")}))
    return Report(tuple(results), tuple((s.run_id, s.reason) for s in plan.skipped), fid,
                  round(time.time() - t0, 3), round(expected, 3), plan.refused, plan.damaged, conflicts)


def _keep_apart(plan: "Plan", fid: Fidelity) -> None:
    """Move the partitions of tasks that failed their fidelity check out of the
    back-filled values (to ``source=replay_mismatch``): copied first, then removed."""
    from ..store import Store, layout
    from ..store.logs import MISMATCH_SOURCE

    st = Store(plan.store_url, plan.storage_options)
    for t in fid.by_task:
        if not t.mismatched:
            continue
        src = layout.replay_part(t.run_id, t.key)
        if not st.exists(src):
            continue  # kept apart already (a rerun finds it done)
        st.write_bytes(layout.replay_part(t.run_id, t.key, MISMATCH_SOURCE), st.read_bytes(src))
        st.delete(src)


def find_conflicts(plan: "Plan", run_ids: Sequence[str]) -> tuple[Conflict, ...]:
    """Identities of the plan's names in these runs whose replayed values differ
    between tasks (trusted partitions only), tasks in the order queries rank them."""
    from ..store import Store, layout
    from ..store.logs import ITER_COLS, log_parts, parts_in_order, read_logs

    st = Store(plan.store_url, plan.storage_options)
    if not run_ids:
        return ()
    t = read_logs(st, list(plan.names), run_ids, sources=("replay",))
    if t.num_rows == 0:
        return ()
    d = t.to_pandas()
    if d["task"].nunique() < 2:
        return ()
    files, order = parts_in_order(log_parts(st), list(run_ids))
    rank = {layout.part_task(f): int(o) for f, o in zip(files, order)}
    ctx = ["run_id", "name", "loops", *ITER_COLS, "items"]
    d = d.assign(_rank=d["task"].map(rank).fillna(len(rank))).sort_values(["_rank", "seq"], kind="stable")
    d["_occ"] = d.groupby(ctx + ["task"], dropna=False).cumcount()
    d = d[d.groupby(ctx + ["_occ"], dropna=False)["task"].transform("nunique") > 1]
    out = []
    for key, g in d.groupby(ctx + ["_occ"], dropna=False, sort=True):
        g = g.drop_duplicates("task")
        vals = [f if vt == "float" else (int(i) if vt == "int" else bool(i)) if vt in ("int", "bool") else s_
                for vt, f, i, s_ in zip(g["vtype"], g["value_float"], g["value_int"], g["value_str"])]
        if all(v == vals[0] or (v != v and vals[0] != vals[0]) for v in vals[1:]):
            continue
        rec = dict(zip(ctx + ["_occ"], key))
        where = ", ".join(f"{n}={rec[ITER_COLS[i]]}" for i, n in enumerate(x for x in str(rec["loops"]).split("/") if x))
        out.append(Conflict(rec["run_id"], rec["name"], where + (f" #{rec['_occ']}" if rec["_occ"] else ""),
                            tuple(vals), tuple(g["task"])))
    return tuple(out)


def _collect(refs: dict, results: list, bar: _Progress, retries: int) -> None:
    """Wait for the tasks' results; Ctrl-C or SIGTERM cancels the rest and re-raises.

    A cancelled task's partial output is never visible: partitions are written whole
    (temporary + rename, or one PUT) at the task's end.
    """
    import ray

    waiting = list(refs)
    done = 0
    with _signals_interrupt():
        try:
            while waiting:
                ready, waiting = ray.wait(waiting, num_returns=1, timeout=1.0)
                for ref in ready:
                    t = refs[ref]
                    try:
                        results.append(ray.get(ref))
                    except Exception as exc:  # noqa: BLE001 - retries exhausted: report, never drop
                        results.append(TaskResult(t.key, t.run_id, "failed", 0, 0.0, t.estimate_s,
                                                  error=f"task lost after {retries} retries: {type(exc).__name__}: {exc}"))
                    done += 1
                bar.update(done)
        except KeyboardInterrupt:
            for ref in waiting:
                try:
                    ray.cancel(ref, force=True)
                except Exception:  # noqa: BLE001 - already finished or gone: nothing to cancel
                    pass
            sys.stderr.write(f"\nreplay: interrupted; {len(waiting)} unfinished tasks cancelled, "
                             f"{done} finished ones kept (a rerun runs only the rest)\n")
            raise


class _signals_interrupt:
    """SIGTERM as Ctrl-C (KeyboardInterrupt) on the main thread, for the block's duration."""

    def __enter__(self):
        import signal
        import threading

        self._old = None
        if threading.current_thread() is threading.main_thread():
            def stop(signum, frame):
                raise KeyboardInterrupt(f"signal {signum}")

            self._old = signal.signal(signal.SIGTERM, stop)
        return self

    def __exit__(self, *exc) -> None:
        import signal

        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def compare_fidelity(plan: "Plan", results: Sequence[TaskResult], rtol: float | None = None) -> Fidelity:
    """Compare every recomputed value that the run also recorded, per task.

    A value's identity is (run, name, loop context, occurrence): the k-th value a
    task logged in a context is compared with the k-th one the run recorded there.
    """
    from ..config import load_settings
    from ..store.logs import ITER_COLS, MISMATCH_SOURCE, read_logs
    from ..store import Store

    if rtol is None:
        rtol = load_settings().fidelity_rtol
    keys = {r.key for r in results}
    run_ids = sorted({r.run_id for r in results})
    notes = tuple(dict.fromkeys((r.run_id, why) for r in results for why in r.numerics))
    if not run_ids:
        return Fidelity()
    st = Store(plan.store_url, plan.storage_options)
    t = read_logs(st, None, run_ids, sources=("record", "replay", MISMATCH_SOURCE)).to_pandas()
    if t.empty:
        return Fidelity(numerics=notes)
    rep = t[(t["source"] != "record") & (t["task"].isin(keys))]
    rec = t[t["source"] == "record"]
    cols = ["run_id", "loops", *ITER_COLS, "items", "name"]
    rep = rep.assign(_k=rep.sort_values("seq").groupby(cols + ["task"], dropna=False).cumcount())
    rec = rec.assign(_k=rec.sort_values("seq").groupby(cols, dropna=False).cumcount())
    m = rep.merge(rec, on=cols + ["_k"], suffixes=("_rep", "_rec"))
    by: dict[str, list[int]] = {}
    per_task: dict[tuple[str, str], list[int]] = {}
    examples = []
    for row in m.itertuples(index=False):
        d = row._asdict()
        same = _same_value(d, rtol)
        for acc in (by.setdefault(d["name"], [0, 0]), per_task.setdefault((d["task_rep"], d["run_id"]), [0, 0])):
            acc[0] += 1
            acc[1] += not same
        if not same and len(examples) < 5:
            ctx = ", ".join(f"{n}={d[ITER_COLS[i]]}" for i, n in enumerate(filter(None, str(d["loops"]).split("/"))))
            a = (d["value_float_rep"], d["value_int_rep"], d["value_str_rep"])
            b = (d["value_float_rec"], d["value_int_rec"], d["value_str_rec"])
            examples.append(f"{d['name']} run={d['run_id']} {ctx}: recorded {b}, replayed {a}")
    return Fidelity(
        sum(c for c, _ in by.values()),
        sum(m_ for _, m_ in by.values()),
        tuple((n, c, m_) for n, (c, m_) in sorted(by.items())),
        tuple(examples),
        tuple(TaskFidelity(k, r, c, m_) for (k, r), (c, m_) in sorted(per_task.items())),
        notes,
    )


def _same_value(d: dict, rtol: float) -> bool:
    """A replayed value equals the recorded one (floats: within ``rtol``, NaN = NaN)."""
    import math

    vt = d["vtype_rec"]
    a = (d["value_float_rep"], d["value_int_rep"], d["value_str_rep"])
    b = (d["value_float_rec"], d["value_int_rec"], d["value_str_rec"])
    if vt == "float" and d["vtype_rep"] == "float":
        x, y = a[0], b[0]
        return x == y or (math.isnan(x) and math.isnan(y)) or (rtol > 0 and abs(x - y) <= rtol * max(abs(x), abs(y)))
    return d["vtype_rep"] == vt and all((p == q) or (p != p and q != q) for p, q in zip(a, b))

"""The driver: hand a plan's tasks to a runner (Ray, or this process), show progress,
collect a report."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Protocol, Sequence

from .fidelity import compare_fidelity, keep_apart
from .report import Report, find_conflicts
from .spec import TaskSpec
from .task import ReplayProcessKilled, TaskResult, Zygote, fork_enabled, run_task

if TYPE_CHECKING:  # pragma: no cover
    from ..planning.plan import Plan, Task
    from .batches import Batching

__all__ = ["run_plan", "Runner", "RayRunner", "LocalRunner", "ray_runner", "Call", "ensure_ray", "check_reachable",
           "PLAN_OVERHEAD_S", "RAY_START_S"]


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


RAY_START_S = 5.0  # a local Ray started for the replay (measured 4-7 s on a 2-core machine)
#: per plan, on the driver: submitting the tasks, then the fidelity check and the
#: replay history once they are done (0.12-0.2 s on a 2-core machine)
PLAN_OVERHEAD_S = 0.15


@dataclass(frozen=True)
class Call:
    """One pending task as a runner hands it to :func:`~flor_ray.execution.task.run_task`."""

    task: "Task"
    spec: TaskSpec
    files: Mapping[str, str]  # path in the version's tree -> patched code
    argv: tuple[str, ...]
    cwd: str | None

    @property
    def args(self) -> tuple:
        return (self.spec, dict(self.files), list(self.argv), self.cwd, self.task.estimate_s)


class Runner(Protocol):
    """Where a plan's tasks run: :class:`RayRunner` or :class:`LocalRunner`."""

    def cold_start_s(self, plan: "Plan") -> float:
        """What the plan pays before its first task beyond its makespan (a Ray to
        start, zygotes to warm)."""

    def run(self, plan: "Plan", calls: Sequence[Call], bar: "_Progress") -> list[TaskResult]:
        """Every call's result, failed ones included."""


class LocalRunner:
    """The tasks one after another in this process, without Ray (tests, debugging).
    Its zygote stays warm from one plan to the next until :meth:`close`."""

    def __init__(self) -> None:
        self.zygote = Zygote()

    def cold_start_s(self, plan: "Plan") -> float:
        return 0.0 if self.zygote.warm or not fork_enabled() else plan.startup_s

    def run(self, plan: "Plan", calls: Sequence[Call], bar: "_Progress") -> list[TaskResult]:
        results = []
        for i, c in enumerate(calls):
            try:
                results.append(run_task(*c.args, zygote=self.zygote))
            except ReplayProcessKilled as exc:
                results.append(TaskResult(c.task.key, c.task.run_id, "failed", 0, 0.0, c.task.estimate_s,
                                          error=str(exc)))
            bar.update(i + 1)
        return results

    def close(self) -> None:
        self.zygote.close()

    def __enter__(self) -> "LocalRunner":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class RayRunner:
    """The tasks on Ray at ``address`` (None: ``RAY_ADDRESS``, else a local Ray of
    this driver's own), longest first, each asking the plan's resources; short ones
    share Ray tasks as ``batching`` says (:mod:`flor_ray.execution.batches`)."""

    def __init__(self, address: str | None = None, batching: "Batching | None" = None) -> None:
        from .batches import BATCHING

        self.address = address
        #: how short tasks share Ray tasks (NO_BATCHING: one Ray task per task)
        self.batching = batching or BATCHING
        #: workers (node:pid) whose zygote has started: a plan whose slots are all
        #: warm does not pay the plan's cold start
        self.warm: set[str] = set()

    def cold_start_s(self, plan: "Plan") -> float:
        import ray

        start = 0.0
        if not ray.is_initialized():
            self.warm.clear()  # a new Ray: new workers, cold zygotes
            if not (self.address or os.environ.get("RAY_ADDRESS")):
                start = RAY_START_S  # ensure_ray starts a local one
        warm = len(self.warm) >= min(plan.slots, len(plan.pending))
        return start + (0.0 if warm or not fork_enabled() else plan.startup_s)

    def run(self, plan: "Plan", calls: Sequence[Call], bar: "_Progress") -> list[TaskResult]:
        from .batches import pack, run_packed

        ensure_ray(self.address)
        opts = [_options(c.task) for c in calls]
        # longest first (what the makespan estimate, LPT list scheduling, assumes); short
        # tasks share Ray tasks (flor_ray.execution.batches)
        batches = pack([c.task.estimate_s for c in calls], plan.slots, self.batching,
                       groups=[tuple(sorted(o.items())) for o in opts])
        results: list[TaskResult] = []

        def done(o) -> None:
            if o.error is None:
                results.append(o.value)
            else:  # retries exhausted, or a failure that is no task's own: reported, never dropped
                t = calls[o.index].task
                results.append(TaskResult(t.key, t.run_id, "failed", 0, 0.0, t.estimate_s,
                                          error=f"task lost after {plan.retries} retries: "
                                                f"{type(o.error).__name__}: {o.error}"))
            bar.update(len(results))

        def name(b) -> str:
            key = calls[b.items[0]].task.key[:12]
            return f"flor-replay-{key}" + (f"+{len(b.items) - 1}" if len(b.items) > 1 else "")

        with _signals_interrupt():
            try:
                run_packed(run_task, [c.args for c in calls], batches, options=opts.__getitem__,
                           retries=plan.retries, retry_exceptions=(ReplayProcessKilled,), on_done=done, name=name,
                           report_s=self.batching.report_s)
            except KeyboardInterrupt:
                sys.stderr.write(f"\nreplay: interrupted; {len(calls) - len(results)} unfinished tasks cancelled, "
                                 f"{len(results)} finished ones kept (a rerun runs only the rest)\n")
                raise
        self.warm.update(r.worker for r in results if r.worker)
        return results


def _options(t: "Task") -> dict[str, Any]:
    """A task's Ray resources."""
    opts: dict[str, Any] = {"num_cpus": t.num_cpus, "num_gpus": t.num_gpus}
    if t.memory:
        opts["memory"] = t.memory
    return opts


#: one RayRunner per address for this driver: the warm workers it knows of belong to
#: the driver's Ray, which outlives any one replay
_RAY_RUNNERS: dict[str | None, RayRunner] = {}


def ray_runner(address: str | None = None) -> RayRunner:
    """This driver's runner for the Ray at ``address`` (see :class:`RayRunner`)."""
    if address not in _RAY_RUNNERS:
        _RAY_RUNNERS[address] = RayRunner(address)
    return _RAY_RUNNERS[address]


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


def run_plan(plan: "Plan", *, runner: Runner | None = None, progress: bool = True) -> Report:
    """Run the plan's pending tasks on ``runner`` (None: :func:`ray_runner`), record
    their timings in the store's replay history, check fidelity, report."""
    t0 = time.time()
    pending = plan.pending
    results = [TaskResult(t.key, t.run_id, "skipped", 0, 0.0, t.estimate_s, error="already done")
               for t in plan.tasks if t.done]
    expected = 0.0
    if pending:
        runner = runner or ray_runner()
        expected = plan.makespan_s + PLAN_OVERHEAD_S + runner.cold_start_s(plan)
    bar = _Progress(len(pending), expected, progress)
    calls = []
    for t in pending:
        run = plan.run_info(t.run_id)
        files = plan.patch(t.version, run.script).files(run.script)
        calls.append(Call(t, TaskSpec.of(plan, t), files, run.argv, run.cwd))
    if calls:
        results += runner.run(plan, calls, bar)
        from ..planning.history import record_history
        from ..store import Store

        record_history(Store(plan.store_url, plan.storage_options), plan, results)
    fid = compare_fidelity(plan, [r for r in results if r.status in ("done", "skipped")])
    keep_apart(plan, fid)
    conflicts = find_conflicts(plan, sorted({r.run_id for r in results if r.status in ("done", "skipped")}))
    return Report(tuple(results), tuple((s.run_id, s.reason) for s in plan.skipped), fid,
                  round(time.time() - t0, 3), round(expected, 3), plan.refused, plan.damaged, conflicts)


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



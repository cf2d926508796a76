"""Short tasks packed into Ray tasks of several segments each, and run on Ray.

Ray costs each task a few milliseconds beyond its work (a worker lease, the push
to the worker, the result's way back to the driver): 3-8 ms measured on a loaded
2-core machine, which caps a driver at roughly 100-300 tasks a second. A sweep of
a thousand segments of a few milliseconds to a few hundred each pays it a
thousand times, and at 8 or 16 slots the driver's rate rather than the work sets
the makespan. So a task shorter than :attr:`Batching.solo_s` shares one Ray task
with others: the plan's tasks, longest first, are cut into batches by guided
self-scheduling (a batch is worth the remaining work's share per slot, divided by
:attr:`Batching.per_slot`, never less than :attr:`Batching.min_s`): the first
batches are long, so there are few Ray tasks, and the last ones short, so that
the slots finish together. Each Ray task still costs a worker's turn from one
task to the next, measured 40-45 ms on a 2-core machine under a load of 15-25,
which is why the batches are as few as balance allows. A task worth :attr:`Batching.solo_s` or more stays a
Ray task of its own, as does every task of a plan whose slots outnumber them.

A batch is a Ray streaming generator that yields each segment's outcome as it
finishes, so a segment's result reaches the driver at once and failures stay per
segment: a segment that raises is that segment's failure; one whose process was
killed (a retryable exception), or the one running when the batch's worker died,
is resubmitted alone with the retries it has left; the batch's segments not yet
started are resubmitted alone with all of theirs. No segment runs twice unless a
retry reruns it, and none is lost.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterator, Sequence

__all__ = ["Batching", "Batch", "Outcome", "pack", "run_packed", "BATCHING", "NO_BATCHING"]


@dataclass(frozen=True)
class Batching:
    """How short tasks share Ray tasks (see the module's docstring)."""

    #: a task estimated this long or longer is a Ray task of its own (Ray's few ms are
    #: under 2% of it); 0 turns batching off
    solo_s: float = 0.5
    #: the shortest batch worth making (a few times Ray's cost of a task on a loaded
    #: machine, where a worker's turn from one Ray task to the next took 30-50 ms)
    min_s: float = 0.1
    #: batches per slot of the remaining work (guided self-scheduling's factor): 1
    #: measured best at 16 slots (71 Ray tasks for 1,000, efficiency 0.90-0.92, against
    #: 119 and 0.83-0.89 with 2); the estimate errors of short tasks mostly cancel
    #: within a batch
    per_slot: float = 1.0
    #: a batch sends its finished tasks' results back at least this far apart (each
    #: sending costs about a millisecond): a task longer than this is reported at its
    #: end, shorter ones together
    report_s: float = 0.1


BATCHING = Batching()
NO_BATCHING = Batching(solo_s=0.0)


@dataclass(frozen=True)
class Batch:
    """Tasks (indices into the caller's list) that run one after another in one Ray task."""

    items: tuple[int, ...]
    estimate_s: float


@dataclass(frozen=True)
class Outcome:
    """One task's end: its function's value, or the exception that ended it (after
    its retries, when ``error`` is retryable)."""

    index: int
    value: Any = None
    error: BaseException | None = None


def pack(estimates: Sequence[float], slots: int, policy: Batching = BATCHING,
         groups: Sequence[Hashable] | None = None) -> list[Batch]:
    """The tasks cut into batches, longest batch first; tasks of different ``groups``
    (their resource requests) never share a batch."""
    by_group: dict[Hashable, list[int]] = {}
    for i in range(len(estimates)):
        by_group.setdefault(groups[i] if groups is not None else None, []).append(i)
    batches: list[Batch] = []
    for items in by_group.values():
        batches += _guided(items, estimates, max(1, slots), policy)
    return sorted(batches, key=lambda b: -b.estimate_s)


def _guided(items: list[int], estimates: Sequence[float], slots: int, policy: Batching) -> list[Batch]:
    order = sorted(items, key=lambda i: -estimates[i])
    if policy.solo_s <= 0 or len(order) <= slots:
        return [Batch((i,), estimates[i]) for i in order]
    remaining = sum(estimates[i] for i in order)
    out: list[Batch] = []
    cur: list[int] = []
    acc = target = 0.0
    for i in order:
        e = estimates[i]
        if e >= policy.solo_s:
            out.append(Batch((i,), e))
            remaining -= e
            continue
        if not cur:
            target = max(policy.min_s, remaining / (policy.per_slot * slots))
        cur.append(i)
        acc += e
        if acc >= target:
            out.append(Batch(tuple(cur), acc))
            remaining -= acc
            cur, acc = [], 0.0
    if cur:
        out.append(Batch(tuple(cur), acc))
    return out


def _batch(fn: Callable, arglist: list[tuple], report_s: float) -> Iterator[list[tuple[Any, BaseException | None]]]:
    """Ray side: the tasks in order, each one's (value, None) or (None, exception),
    sent back as soon as ``report_s`` has passed since the last sending (each task
    at its end, when tasks take longer than that), and at the end."""
    import pickle
    import time

    done: list[tuple[Any, BaseException | None]] = []
    last = time.monotonic()
    for args in arglist:
        try:
            done.append((fn(*args), None))
        except Exception as exc:  # noqa: BLE001 - the task's failure, sent back as its outcome
            try:
                pickle.dumps(exc)
            except Exception:  # noqa: BLE001 - an exception that cannot cross to the driver
                exc = RuntimeError(f"{type(exc).__name__}: {exc}")
            done.append((None, exc))
        if time.monotonic() - last >= report_s:
            yield done
            done, last = [], time.monotonic()
    if done:
        yield done


@dataclass
class _Sent:
    """A Ray task in flight: its tasks, how many have reported, their retries left."""

    items: tuple[int, ...]
    retries: int
    batch: bool
    pos: int = 0


def run_packed(fn: Callable, args: Sequence[tuple], batches: Sequence[Batch], *,
               options: Callable[[int], dict], retries: int, retry_exceptions: tuple[type, ...] = (),
               on_done: Callable[[Outcome], None], name: Callable[[Batch], str] | None = None,
               report_s: float = BATCHING.report_s) -> None:
    """Run ``fn(*args[i])`` for every task of ``batches`` on Ray and hand each task's
    :class:`Outcome` to ``on_done`` as it ends (completion order). ``options(i)``: the
    Ray options of task ``i`` (a batch takes its first task's). KeyboardInterrupt
    cancels what is still running and re-raises."""
    import ray

    solo, batch = _remote(fn), _remote(_batch)
    sent: dict[Any, _Sent] = {}

    def send(b: Batch, left: int) -> None:
        opts = dict(options(b.items[0]))
        if name is not None:
            opts["name"] = name(b)
        if len(b.items) == 1:
            h = solo.options(**opts, max_retries=left,
                             retry_exceptions=list(retry_exceptions) or False).remote(*args[b.items[0]])
        else:  # retried per task here, not by Ray as a whole
            h = batch.options(**opts, max_retries=0).remote(fn, [args[i] for i in b.items], report_s)
        sent[h] = _Sent(b.items, left, len(b.items) > 1)

    def lost(s: _Sent, exc: BaseException) -> None:
        """The batch's worker died: the first task it had not reported (the one running,
        unless it died between a task's end and its report) alone with one retry fewer,
        the ones after it alone with all of theirs."""
        i = s.items[s.pos]
        if s.retries > 0:
            send(Batch((i,), 0.0), s.retries - 1)
        else:
            on_done(Outcome(i, error=exc))
        for j in s.items[s.pos + 1:]:
            send(Batch((j,), 0.0), s.retries)

    for b in batches:
        send(b, retries)
    try:
        while sent:
            ready, _ = ray.wait(list(sent), num_returns=1, timeout=1.0)
            for h in ready:
                _collect_one(h, sent, lost, on_done, retry_exceptions, send)
    except KeyboardInterrupt:
        _cancel(list(sent))
        raise


#: how long an interrupted replay waits for Ray to take its cancellations
CANCEL_WAIT_S = 10.0


def _cancel(handles: list) -> None:
    """Cancel ``handles`` (force: their workers killed), on a thread that the interrupt
    waits for at most :data:`CANCEL_WAIT_S`: a worker or raylet that does not answer must
    not hold Ctrl-C. A local Ray goes with the driver in any case."""
    import threading

    import ray

    def cancel() -> None:
        for h in handles:
            try:
                ray.cancel(h, force=True)
            except Exception:  # noqa: BLE001 - already finished or gone: nothing to cancel
                pass

    t = threading.Thread(target=cancel, name="flor-cancel", daemon=True)
    t.start()
    t.join(CANCEL_WAIT_S)


@functools.lru_cache(maxsize=None)
def _remote(fn: Callable):
    """One Ray remote function per function: Ray exports its code to the workers once."""
    import ray

    return ray.remote(fn)


def _collect_one(h, sent: dict, lost, on_done, retry_exceptions: tuple, send) -> None:
    import ray

    s = sent[h]
    if not s.batch:
        del sent[h]
        try:
            out = Outcome(s.items[0], value=ray.get(h))
        except Exception as exc:  # noqa: BLE001 - retries exhausted: reported, never dropped
            out = Outcome(s.items[0], error=exc)
        on_done(out)
        return
    try:
        ref = next(h)
    except StopIteration:
        del sent[h]
        return
    try:
        done = ray.get(ref)
    except Exception as err:  # noqa: BLE001 - the batch's worker died: its tasks go on alone
        del sent[h]
        if s.pos < len(s.items):
            lost(s, err)
        return
    for value, exc in done:
        i = s.items[s.pos]
        if exc is not None and isinstance(exc, retry_exceptions) and s.retries > 0:
            send(Batch((i,), 0.0), s.retries - 1)
        else:
            on_done(Outcome(i, value=value, error=exc))
        s.pos += 1

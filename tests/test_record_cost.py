"""What recording costs the training thread, as ratios against the same work without
flor_ray measured in this process: CPU time of this thread (``time.thread_time``),
the best of several interleaved rounds, so that other processes on a shared machine
slow both sides alike and the ratio, not a wall-clock window, is what is bounded."""

from __future__ import annotations

import time

from flor_ray.record.loops import LoopRuntime

ROUNDS = 7


def _best_ratio(flor, bare, *args) -> float:
    """min CPU(flor) / min CPU(bare) over interleaved rounds."""
    best = {flor: float("inf"), bare: float("inf")}
    for _ in range(ROUNDS):
        for fn in (bare, flor):
            t = time.thread_time()
            fn(*args)
            best[fn] = min(best[fn], time.thread_time() - t)
    return best[flor] / best[bare]


def _train_step(x: float) -> float:
    """A stand-in for a (very short) training step: ~15 us of Python arithmetic."""
    for _ in range(400):
        x = (x * 1.0000001 + 1e-9) % 7.0
    return x


def _bare_training(epochs: int, steps: int) -> list:
    x, accs = 0.5, []
    for _ in range(epochs):
        for _ in range(steps):
            x = _train_step(x)
        accs.append(x)
    return accs


def _flor_training(epochs: int, steps: int) -> list:
    rt, x = LoopRuntime(), 0.5
    for _ in rt.loop("epoch", range(epochs)):
        for _ in rt.loop("step", range(steps)):
            x = _train_step(x)
            rt.log("loss", x)
            rt.log("lr", 0.1)
        rt.log("acc", x)
        rt.take_rows()  # what a flush takes from the buffers, per epoch
    return [x]


def test_loops_and_logs_cost_a_small_share_of_even_a_short_step():
    # two logs per ~15 us step cost ~3% today; half the step time would mean that
    # flor.loop or flor.log got an order of magnitude slower
    ratio = _best_ratio(_flor_training, _bare_training, 10, 200)
    assert ratio < 1.5, f"flor.loop + 2 flor.log per step cost {ratio - 1:.0%} of a 15 us step"


def _bare_appends(n: int) -> None:
    a, b, c, d = [], [], [], []
    for i in range(n):
        a.append(i)
        b.append(None)
        c.append("loss")
        d.append(0.5)


def _flor_logs(n: int) -> None:
    rt = LoopRuntime()
    log = rt.fast_log
    for _ in range(n):
        log("loss", 0.5)


def test_a_log_costs_about_four_list_appends():
    # a log appends to four row buffers after a type check (about twice the loop of four
    # bare appends, the call included); six times would be a per-call dict, lock or conversion
    ratio = _best_ratio(_flor_logs, _bare_appends, 100_000)
    assert ratio < 6, f"a flor.log costs {ratio:.1f}x four list appends"
    rt = LoopRuntime()
    for _ in range(3):
        rt.log("loss", 0.5)
    rows = rt.take_rows()
    assert rows["names"] == ["loss"] * 3 and rows["values"] == [0.5] * 3  # the work measured is the log's

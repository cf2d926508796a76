"""The set-up's import time, which replay tasks (forked from a warm zygote) do not pay."""

from __future__ import annotations

import builtins
import sys
import threading

from flor_ray.planning.plan import TASK_OVERHEAD_S, RunInfo
from flor_ray.record.imports import ImportClock


def test_import_clock_counts_main_thread_imports_of_new_modules_only(tmp_path, monkeypatch):
    (tmp_path / "slow_mod_main.py").write_text("import time\ntime.sleep(0.2)\n")
    (tmp_path / "slow_mod_thread.py").write_text("import time\ntime.sleep(2.0)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    before = builtins.__import__
    clock = ImportClock().start()
    try:
        t = threading.Thread(target=lambda: __import__("slow_mod_thread"))
        t.start()
        t.join()
        import slow_mod_main  # noqa: F401
        import slow_mod_main as again  # noqa: F401  - already loaded: free
    finally:
        total = clock.stop()
        sys.modules.pop("slow_mod_main", None)
        sys.modules.pop("slow_mod_thread", None)
    assert builtins.__import__ is before
    # the main thread's 0.2 s import counts, the other thread's 2 s import does not (the
    # bounds leave a loaded machine 1.8 s of slack without letting the thread's in)
    assert 0.2 <= total < 2.0, total


def test_replay_setup_excludes_the_recorded_imports():
    meta = {"run_id": "r", "version": "v", "script": "train.py", "iterations": 2,
            "timings": {"setup_s": 6.0, "start_s": 3.0, "setup_imports_s": 2.5, "outer_s": [1.0, 1.0],
                        "checkpoint_s": [0.25, None]}}
    run = RunInfo.from_meta(meta)
    assert run.checkpoint_s == (0.25, 0.0)  # the capture a replay leaves out
    assert run.imports_s == 5.5  # paid once per worker (its zygote)
    assert abs(run.replay_setup_s - (TASK_OVERHEAD_S + 0.5)) < 1e-9  # paid by every task
    old = RunInfo.from_meta({**meta, "timings": {"setup_s": 6.0, "outer_s": [1.0, 1.0]}})
    assert old.imports_s == 1.5 and abs(old.replay_setup_s - (TASK_OVERHEAD_S + 4.5)) < 1e-9

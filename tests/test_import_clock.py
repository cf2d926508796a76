"""The set-up's import time, which replay tasks (forked from a warm zygote) do not pay;
and what ``import flor_ray`` itself loads (the set-up a script pays for flor_ray)."""

from __future__ import annotations

import builtins
import subprocess
import sys
import threading

from flor_ray.planning.plan import TASK_OVERHEAD_S, RunInfo
from flor_ray.record.imports import ImportClock

from conftest import clean_env


def test_import_clock_counts_main_thread_imports_of_new_modules_only(tmp_path, monkeypatch):
    (tmp_path / "slow_mod_main.py").write_text("import time\ntime.sleep(0.2)\n")
    (tmp_path / "slow_mod_thread.py").write_text("import time\ntime.sleep(0.5)\n")
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
    # the main thread's import of a new module is timed, once (its own `import time`
    # inside is part of it); the other thread's import and the second one are not
    assert clock.timed == ["slow_mod_main"], clock.timed
    assert total >= 0.2  # the module's own sleep: a lower bound that load cannot break


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


#: heavy packages a script must not pay for by importing flor_ray (its verbs import
#: what they need, when they are first called)
HEAVY = ("ray", "torch", "pyarrow", "duckdb", "libcst", "pandas", "numpy", "fsspec", "git", "yaml", "matplotlib")


def _imported_by(code: str, *argv: str) -> tuple[set[str], set[str]]:
    """The flor_ray modules and the HEAVY packages loaded by ``code`` in a fresh interpreter."""
    probe = code + "\nimport sys\nprint(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in "
    probe += repr(("flor_ray",) + HEAVY) + ")))"
    out = subprocess.run([sys.executable, "-c", probe, *argv], env=clean_env(), capture_output=True, text=True,
                         check=True).stdout.split()
    return {m for m in out if m.startswith("flor_ray")}, {m.split(".")[0] for m in out if not m.startswith("flor_ray")}


def test_import_flor_ray_loads_its_errors_only():
    ours, heavy = _imported_by("import flor_ray")
    assert ours == {"flor_ray", "flor_ray.errors"} and heavy == set()


def test_import_flor_ray_with_kwargs_adds_only_their_parser():
    ours, heavy = _imported_by("import flor_ray, sys; assert sys.argv[1:] == ['--x'], sys.argv", "--kwargs", "lr=0.1",
                               "--x")
    assert ours == {"flor_ray", "flor_ray.errors", "flor_ray.record", "flor_ray.record.args"} and heavy == set()


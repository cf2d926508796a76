"""One replay task: materialise the patched version, run its segment, report a value.

This runs inside a Ray worker (or inline for tests and debugging). The script runs
in its own process (``sys.executable``) in a fresh directory holding the version's
files from the store, never in the user's checkout. The task returns a
:class:`TaskResult` in every case; only a crash of the worker itself (killed
process, lost node) escapes, and Ray retries those.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .spec import TaskSpec

__all__ = ["TaskResult", "run_task", "ReplayProcessKilled", "Zygote", "fork_enabled"]

def fork_enabled() -> bool:
    """Fork replayed scripts from a warm zygote (torch etc. imported once per worker)
    instead of starting ``python script.py`` per task; FLOR_REPLAY_FORK=0 turns it
    off. Read at each task: a Ray worker's environment is its own, not the driver's."""
    return os.environ.get("FLOR_REPLAY_FORK", "1") != "0" and hasattr(os, "fork")


class ReplayProcessKilled(RuntimeError):
    """The replayed script's process died from a signal (OOM killer, kill -9): a
    failure of the machine rather than of the script, so Ray retries the task."""


def _end(proc: "subprocess.Popen") -> None:
    """End a zygote: its stdin closed, it leaves its request loop and exits."""
    try:
        proc.stdin.close()
        proc.wait(timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        proc.kill()
        proc.wait()
    proc.stdout.close()


class Zygote:
    """A warm fork server of replayed scripts (:mod:`flor_ray.execution.zygote`),
    started and waited for on first use, restarted when it has died, ended by
    :meth:`close` or when this object is collected."""

    def __init__(self) -> None:
        self._proc: "subprocess.Popen | None" = None
        self._end: "weakref.finalize | None" = None

    @property
    def warm(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _started(self, env: dict) -> "subprocess.Popen | None":
        if not self.warm:
            self.close()
            proc = subprocess.Popen(
                [sys.executable, "-m", "flor_ray.execution.zygote"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
            )
            self._proc, self._end = proc, weakref.finalize(self, _end, proc)
            if not proc.stdout.readline():  # its "ready" line, once the imports are done
                self.close()
        return self._proc

    def run(self, req: Mapping[str, Any], timings: dict) -> int | None:
        """The forked script's exit code; None when the zygote cannot serve it."""
        t = time.time()
        z = self._started({k: v for k, v in req["env"].items() if k not in ("FLOR_REPLAY", "FLOR_T_START")})
        timings["zygote"] = time.time() - t
        try:
            z.stdin.write(json.dumps(req) + "\n")
            z.stdin.flush()
            line = z.stdout.readline()
        except (AttributeError, BrokenPipeError, OSError):
            line = ""
        return int(json.loads(line)["code"]) if line else None

    def close(self) -> None:
        """End the server; a later run starts a new one."""
        end, self._proc, self._end = self._end, None, None
        if end is not None:
            end()


#: a Ray worker process runs many tasks and keeps nothing else between them: its
#: zygote is the process's (a LocalRunner passes its own)
_WORKER_ZYGOTE = Zygote()


def _run_script(script: Path, argv: list[str], cwd: Path, env: dict, out: Path, err: Path,
                timeout_s: float | None, timings: dict, numerics: Mapping[str, Any] | None = None,
                zygote: Zygote | None = None) -> int:
    """Run the script to completion; its exit code (negative: killed by that signal).
    ``zygote`` None: a plain process."""
    if zygote is not None:
        req = {"script": str(script), "argv": argv, "cwd": str(cwd), "env": env, "stdout": str(out), "stderr": str(err),
               "numerics": numerics}
        code = zygote.run(req, timings)
        if code is not None:
            return code
        # the zygote died: fall back to a plain process for this task
    with open(out, "w") as fo, open(err, "w") as fe:
        proc = subprocess.run([sys.executable, str(script), *argv], cwd=cwd, env=env, stdout=fo, stderr=fe,
                              timeout=timeout_s)
    return proc.returncode


@dataclass(frozen=True)
class TaskResult:
    key: str
    run_id: str
    status: str  # "done" | "failed" | "skipped"
    rows: int = 0
    wall_s: float = 0.0
    estimate_s: float = 0.0
    error: str | None = None
    traceback: str | None = None
    node: str | None = None
    user_error: bool = False
    #: where the time went, in seconds: ``prepare`` (store checks, code materialised),
    #: ``zygote`` (starting this worker's fork server, once per worker), ``process``
    #: (starting the replayed process and reading its results), then the replayed
    #: process's own ``start`` (imports up to the first flor call), ``setup``,
    #: ``restore``, ``loop``, ``after`` and ``write``
    phases: tuple[tuple[str, float], ...] = ()
    worker: str | None = None  # "node:pid" of the process that ran the task (its zygote stays warm)
    started_at: float | None = None  # its start, seconds since the epoch (the history's concurrency)
    #: what the task did differently from its plan (a damaged checkpoint routed around)
    notes: tuple[str, ...] = ()
    #: what of the recording's numerics the replay could not reproduce (flor_ray.numerics.differences)
    numerics: tuple[str, ...] = ()


def _run_around_damage(spec: TaskSpec, spec_path: Path, call: tuple, timings: dict,
                       zygote: Zygote | None) -> int:
    """Run the script; while it fails on a damaged checkpoint (the session wrote
    the damage marker), run it again with that checkpoint routed around. Time spent
    in the failed attempts goes to the ``fallback`` phase. Each attempt finds a new
    damaged checkpoint, so this ends within the checkpoints the task may use."""
    damaged: list[dict] = []
    damage = Path(spec.damage_marker)
    limit = len(spec.fallbacks) + len(spec.checkpoints) + 1
    while True:
        spec_path.write_text(dataclasses.replace(spec, damaged=tuple(damaged)).to_json())
        call[3]["FLOR_T_START"] = repr(time.time())
        t, attempt = time.time(), {}
        code = _run_script(*call, attempt, spec.numerics, zygote)
        if "zygote" in attempt:
            timings["zygote"] = timings.get("zygote", 0.0) + attempt["zygote"]
        if code < 0 or not damage.exists() or len(damaged) >= limit:
            return code
        found = json.loads(damage.read_text())
        damage.unlink()
        if any(d["path"] == found["path"] for d in damaged):
            return code  # routed around already, yet reported again: not a damage this can fix
        damaged.append(found)
        timings["fallback"] = timings.get("fallback", 0.0) + time.time() - t - attempt.get("zygote", 0.0)


def run_task(spec: TaskSpec, files: Mapping[str, str], argv: list[str], cwd: str | None,
             estimate_s: float = 0.0, timeout_s: float | None = None, zygote: Zygote | None = None) -> TaskResult:
    """Replay one segment: the version's tree with ``files`` (path -> patched code:
    the script, and modules holding injected statements) written over it. The
    script is forked from ``zygote`` (None: this process's) unless forking is off."""
    import socket

    from ..store.credentials import task_options
    from ..store import Store
    from .cache import checked_copy

    t0 = time.time()
    node = socket.gethostname()
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        try:
            node = ray.util.get_node_ip_address()
        except Exception:  # noqa: BLE001 - the hostname will do
            pass
    key, run_id = spec.task, spec.run_id
    store = Store(spec.store, task_options(spec.store, spec.storage_options))
    try:
        if store.exists(spec.output):
            return TaskResult(key, run_id, "skipped", 0, time.time() - t0, estimate_s,
                              error="already done (its partition exists)", node=node)
        with tempfile.TemporaryDirectory(prefix=f"flor-task-{key[:8]}-") as tmp:
            work = checked_copy(store, spec.version, Path(tmp) / "tree")
            for rel, text in files.items():
                safe = (work / rel).resolve()
                if not safe.is_relative_to(work.resolve()):  # a path from the plan escaping the tree
                    raise ValueError(f"patched file {rel!r} is outside the version's tree")
                safe.parent.mkdir(parents=True, exist_ok=True)
                safe.write_text(text)
            script = work / spec.script
            spec_path = Path(tmp) / "spec.json"
            done_path = Path(tmp) / "done.json"
            damage_path = Path(tmp) / "damaged.json"
            from .. import numerics

            # the recording's thread variables, not this worker's (Ray sets OMP_NUM_THREADS
            # to the task's CPUs): torch reads them when it starts its thread pool. FLOR_CONFIG
            # stays: the replayed process reads the store's credentials from it too
            env = numerics.replay_env(spec.numerics, {k: v for k, v in os.environ.items()
                                                             if not k.startswith("FLOR_") or k == "FLOR_CONFIG"})
            env["FLOR_REPLAY"] = str(spec_path)
            run_dir = work / cwd if cwd else script.parent
            out, err = Path(tmp) / "stdout.txt", Path(tmp) / "stderr.txt"
            timings = {"prepare": time.time() - t0}
            spec = dataclasses.replace(spec, done_marker=str(done_path), damage_marker=str(damage_path))
            code = _run_around_damage(spec, spec_path, (script, list(argv), run_dir, env, out, err, timeout_s),
                                      timings, (zygote or _WORKER_ZYGOTE) if fork_enabled() else None)
            wall = time.time() - t0
            if code < 0:
                raise ReplayProcessKilled(f"the replayed script of task {key} was killed by signal {-code}")
            if code != 0 or not done_path.exists():
                tail = (err.read_text(errors="replace") or out.read_text(errors="replace"))[-4000:]
                last = next((ln for ln in reversed(tail.strip().splitlines()) if ln.strip()), "no output")
                user = "flor_ray" not in last.split(":")[0]
                return TaskResult(key, run_id, "failed", 0, wall, estimate_s,
                                  error=f"the replayed script exited with {code}: {last}",
                                  traceback=tail, node=node, user_error=user)
            done = json.loads(done_path.read_text())
            inner = done.get("phases") or {}
            outer = {**timings, "process": max(wall - sum(timings.values()) - sum(inner.values()), 0.0)}
            phases = tuple((k, round(v, 4)) for k, v in (*outer.items(), *inner.items()))
            return TaskResult(key, run_id, "done", done["rows"], wall, estimate_s, node=node, phases=phases,
                              worker=f"{node}:{os.getpid()}", started_at=t0, notes=tuple(done.get("notes") or ()),
                              numerics=tuple(done.get("numerics") or ()))
    except ReplayProcessKilled:
        raise  # Ray retries it (driver: retry_exceptions)
    except Exception as exc:  # noqa: BLE001 - a failure is a value, never lost
        return TaskResult(key, run_id, "failed", 0, time.time() - t0, estimate_s,
                          error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(), node=node)

"""A warm process that forks replayed scripts, so heavy imports are paid once.

Every replay task runs the user's script in a process of its own. Starting
``python script.py`` costs the interpreter start plus the imports of torch, numpy
and pyarrow: seconds, often more than the segment's own work. A zygote imports
them once per Ray worker, then serves requests (one JSON line on stdin each): it
forks a child that becomes the replayed script (``runpy`` as ``__main__``, its own
working directory, environment, ``sys.argv``, stdout and stderr files) and answers
with the child's exit code. The child starts from a clean flor_ray state: nothing
of a session exists in the zygote, and flor_ray's import-time reading of the
process (``--kwargs``, replay mode from ``FLOR_REPLAY``) is done for the child.

Fork is safe here because the zygote is single-threaded: it never runs torch
operations (the thread pools start on first use) and touches no CUDA.
"""

from __future__ import annotations

import json
import os
import sys
import time

__all__ = ["serve", "PRELOAD"]

PRELOAD = (
    "numpy",
    "torch",
    "torch.optim",
    "torch._dynamo",  # what the first optimizer constructed imports: about as long again as torch
    "pandas",  # pyarrow imports it on the first table built
    "pyarrow",
    "pyarrow.parquet",
    "pyarrow.compute",
    "fsspec",
    "flor_ray",
    "flor_ray.numerics",
    "flor_ray.store.logs",
    "flor_ray.record.rows",
    "flor_ray.record.session",
    "flor_ray.record.loops",
    "flor_ray.record.checkpoint",
    "flor_ray.execution.worker",
)


def _child(req: dict) -> None:
    import runpy

    out = os.open(req["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    err = os.open(req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(err, 2)
    for fd in (out, err, null):
        os.close(fd)
    sys.stdin = open(os.devnull)
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    os.environ["FLOR_T_START"] = repr(time.time())  # the process starts now (for the task's phases)
    # torch was imported by the zygote under its own environment: its thread counts
    # and flags are set to the recording's here, before the script's code runs
    # (torch.set_num_threads works in this child: the zygote never started a pool)
    from flor_ray import numerics

    numerics.restore(req.get("numerics"))
    script = req["script"]
    sys.argv = [script, *req["argv"]]
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    code = 0
    try:
        # what importing flor_ray reads of the process (--kwargs taken out of argv; a
        # replay's session, its view of files, from FLOR_REPLAY) is read again for this
        # child, before the script's first line
        import importlib

        importlib.reload(sys.modules["flor_ray"])
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        if exc.code is None:
            code = 0
        elif isinstance(exc.code, int):
            code = exc.code
        else:
            sys.stderr.write(f"{exc.code}\n")
            code = 1
    except BaseException as exc:  # noqa: BLE001 - reported as `python script.py` would
        exc.__traceback__ = _script_frames(exc.__traceback__)  # what the hook prints
        sys.excepthook(type(exc), exc, exc.__traceback__)
        code = 1
    # as at a normal exit: non-daemon threads joined, then the atexit handlers (the
    # session's flush); the interpreter's teardown (module by module, with torch
    # loaded: seconds) is skipped
    import atexit
    import threading

    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed stream has nothing to flush
            pass
    os._exit(code)


def _script_frames(tb):
    """The traceback from the script's first frame, as ``python script.py`` prints it
    (none for a script that does not compile): this module's and runpy's frames left out."""
    while tb is not None and (tb.tb_frame.f_code is _child.__code__
                              or tb.tb_frame.f_globals.get("__name__") == "runpy"):
        tb = tb.tb_next
    return tb


def serve() -> None:
    for mod in PRELOAD:
        try:
            __import__(mod)
        except Exception:  # noqa: BLE001 - a missing optional module is imported by the child if needed
            pass
    reply = sys.stdout
    reply.write(json.dumps({"ready": True}) + "\n")  # the imports are done
    reply.flush()
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(req)
        _, status = os.waitpid(pid, 0)
        reply.write(json.dumps({"code": os.waitstatus_to_exitcode(status), "pid": pid}) + "\n")
        reply.flush()


if __name__ == "__main__":
    serve()

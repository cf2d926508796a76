"""Helpers shared by the benchmark scripts (not part of flor_ray).

FlorDB 4.0.1, the prior art, is installed into its own virtualenv
(``benchmarks/.flordb-venv``) so that it never shares a site-packages with
flor_ray; it gets torch from flor_ray's virtualenv through a ``.pth`` file (its
own requirements do not include torch).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: where the scripts write their JSON and PNGs; BENCH_RESULTS_DIR redirects them (the
#: test suite's quick runs write to a temporary folder, never into the checkout)
RESULTS_DIR = Path(os.environ.get("BENCH_RESULTS_DIR") or ROOT / "benchmarks" / "results")
FLORDB_VENV = ROOT / "benchmarks" / ".flordb-venv"
FLORDB_VERSION = "4.0.1"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOR_") and k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout


def make_repo(parent: Path, name: str) -> Path:
    repo = parent / name
    repo.mkdir(parents=True)
    git(repo, "init", "-q", "-b", "main")
    git(repo, "config", "user.email", "bench@example.com")
    git(repo, "config", "user.name", "Bench")
    return repo


def shown(path: Path) -> str:
    """A results path as the JSON records it: relative to the checkout when inside it."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def save_results(name: str, mode: str, res: dict) -> Path:
    """Merge ``res`` under ``mode`` into ``RESULTS_DIR/<name>.json`` (quick and full both kept)."""
    path = RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        saved = {}
    saved[mode] = res
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(saved, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


def flordb_python() -> Path:
    return FLORDB_VENV / "bin" / "python"


def flordb_env(**extra: str) -> dict:
    """Environment for FlorDB processes: its venv first on PATH (its replay runs ``python``)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("FLOR_") and k not in ("PYTHONPATH", "VIRTUAL_ENV", "RAY_ADDRESS")}
    env["PATH"] = os.pathsep.join([str(FLORDB_VENV / "bin"), env.get("PATH", "")])
    env["VIRTUAL_ENV"] = str(FLORDB_VENV)
    env["FLOR_CAPTURE"] = "0"
    env.update(extra)
    return env


def ensure_flordb(policy: str) -> dict:
    """FlorDB's availability: {"available": bool, "reason": str, "version": str|None, "install_s": float|None}.

    policy: ``skip`` (never use it), ``auto`` (use the venv if it works, never install),
    ``install`` (create the venv and ``pip install flordb==4.0.1`` if needed).
    """
    if policy == "skip":
        return {"available": False, "reason": "skipped (--flordb skip)", "version": None, "install_s": None}
    py = flordb_python()
    install_s = None
    if not _flordb_works(py) and policy == "install":
        t = time.perf_counter()
        try:
            if FLORDB_VENV.exists():
                shutil.rmtree(FLORDB_VENV)
            subprocess.run([sys.executable, "-m", "venv", str(FLORDB_VENV)], check=True, capture_output=True, text=True)
            (FLORDB_VENV / ".gitignore").write_text("*\n")
            proc = subprocess.run([str(py), "-m", "pip", "install", "-q", f"flordb=={FLORDB_VERSION}"],
                                  capture_output=True, text=True, timeout=900)
            if proc.returncode != 0:
                return {"available": False, "version": None, "install_s": time.perf_counter() - t,
                        "reason": f"pip install flordb=={FLORDB_VERSION} failed: {(proc.stderr or proc.stdout)[-1500:]}"}
        except (subprocess.SubprocessError, OSError) as exc:
            return {"available": False, "version": None, "install_s": time.perf_counter() - t,
                    "reason": f"creating {FLORDB_VENV} failed: {exc}"}
        install_s = time.perf_counter() - t
    if not (FLORDB_VENV / "bin" / "python").exists():
        return {"available": False, "version": None, "install_s": install_s,
                "reason": f"FlorDB not installed: no virtualenv at {FLORDB_VENV}; "
                          "run the benchmark with --flordb install to create it"}
    _link_torch()
    ok = _flordb_works(py)
    if not ok:
        return {"available": False, "version": None, "install_s": install_s,
                "reason": f"FlorDB in {FLORDB_VENV} cannot import flordb and torch: {_flordb_error(py)}"}
    return {"available": True, "reason": "", "version": ok, "install_s": install_s}


def _link_torch() -> None:
    """Give FlorDB's venv torch/numpy from flor_ray's venv (appended to sys.path, after its own packages)."""
    import sysconfig

    ours = sysconfig.get_paths()["purelib"]
    for site in (FLORDB_VENV / "lib").glob("python*/site-packages"):
        pth = site / "zz_flor_ray_bench_torch.pth"
        if not pth.exists():
            pth.write_text(ours + "\n")


_PROBE = "import importlib.metadata as m, torch; print(m.version('flordb'))"


def _flordb_works(py: Path):
    if not py.exists():
        return None
    proc = subprocess.run([str(py), "-c", _PROBE], capture_output=True, text=True, cwd="/", env=flordb_env())
    return proc.stdout.strip() if proc.returncode == 0 else None


def _flordb_error(py: Path) -> str:
    proc = subprocess.run([str(py), "-c", _PROBE], capture_output=True, text=True, cwd="/", env=flordb_env())
    return (proc.stderr.strip().splitlines() or ["?"])[-1]


def timed_run(cmd, cwd: Path, env: dict, timeout: float | None = None, stdin: str | None = None):
    """(wall seconds, CompletedProcess); raises on timeout only through the returned process (rc 124)."""
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, input=stdin)
    except subprocess.TimeoutExpired as exc:
        proc = subprocess.CompletedProcess(cmd, 124, exc.stdout or "", (exc.stderr or "") + f"\n[timeout after {timeout}s]")
        if isinstance(proc.stdout, bytes):
            proc.stdout = proc.stdout.decode(errors="replace")
        if isinstance(proc.stderr, bytes):
            proc.stderr = proc.stderr.decode(errors="replace")
    return time.perf_counter() - t, proc


class Counting:
    """Counts the requests a WSGI app (a moto S3 server) answers, by kind (LIST, GET, PUT, ...)."""

    def __init__(self, app):
        import threading

        self.app, self.counts, self.lock = app, {}, threading.Lock()

    def __call__(self, environ, start_response):
        method, query, path = environ["REQUEST_METHOD"], environ.get("QUERY_STRING", ""), environ["PATH_INFO"]
        kind = "LIST" if method == "GET" and ("list-type" in query or path.strip("/").count("/") == 0) else method
        with self.lock:
            self.counts[kind] = self.counts.get(kind, 0) + 1
        return self.app(environ, start_response)

    def take(self) -> dict:
        with self.lock:
            out, self.counts = self.counts, {}
        return out


class MotoS3:
    """An S3-compatible server (moto) on 127.0.0.1 in this process, its requests counted;
    ``env()`` is what a flor_ray process needs to reach it."""

    def __init__(self, bucket: str):
        import logging
        import socket

        import boto3
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line a request otherwise

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{port}"
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self.server.start()
        self.counting = Counting(self.server._server.app)
        self.server._server.app = self.counting
        boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                     region_name="us-east-1").create_bucket(Bucket=bucket)
        self.bucket = bucket

    def env(self) -> dict:
        return {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_ENDPOINT_URL": self.endpoint}

    def objects(self, prefix: str) -> int:
        import boto3

        pages = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                             region_name="us-east-1").get_paginator("list_objects_v2")
        return sum(page.get("KeyCount", 0) for page in pages.paginate(Bucket=self.bucket, Prefix=prefix))

    def stop(self) -> None:
        self.server.stop()

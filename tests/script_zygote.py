"""A fork server for the tests' recordings: ``python script.py`` without paying the
imports of torch, numpy and pyarrow each time.

The suite runs hundreds of training scripts; each plain process spends seconds of CPU
importing torch (and torch._dynamo at the first optimizer, pandas and pyarrow at the
first table). This server imports them once (the product's replay zygote's
``PRELOAD``) under the suite's standard environment (``conftest.clean_env()``), then
forks a child per request that becomes the script through the product's own
``flor_ray.execution.zygote._child`` (its cwd, environment, argv, ``sys.path[0]``,
stdout and stderr files, ``runpy`` as ``__main__``, exit code and traceback,
threads joined and atexit run). Requests come on a unix socket, several at once:
tests start recordings side by side.

A request is forked only when it is as faithful as a new process: its environment
differs from the server's only in variables that nothing imported in advance reads
at import (:func:`Zygote.forkable`). Anything else runs as a plain process, and so
does everything when ``FLOR_TEST_FORK=0``.

What still tells a forked script from a new process: ``sys.argv[0]`` is the script's
absolute path (``__file__`` and tracebacks are as `python script.py` has them),
``FLOR_T_START`` is set, the parent is the server, the children share the server's
``str`` hash seed, and what was imported in advance is in ``sys.modules`` and was
not timed (tests of import costs, start times or imports use ``fork=False``).

Run as ``python script_zygote.py SOCKET`` (the server); imported, the client.
"""

from __future__ import annotations

import json
import locale
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref

#: variables read by the child at run time only (flor_ray reads FLOR_* when a session
#: starts, and what its import reads the product's child reads again; botocore, Ray and
#: git are not imported in advance; pytest names the current test; breakpoint() reads
#: PYTHONBREAKPOINT at each call, and Ray sets it in the tests' process): a difference
#: in these keeps a request forkable
RUNTIME_PREFIXES = ("FLOR_", "AWS_", "RAY_", "GIT_", "PYTEST_CURRENT_TEST", "PYTHONBREAKPOINT")


# ------------------------------------------------------------------------------ server
def _child(req: dict, keep: list) -> None:
    for obj in keep:  # the server's socket and the other children's handles
        try:
            obj.close() if hasattr(obj, "close") else os.close(obj)
        except OSError:
            pass
    np = sys.modules.get("numpy")
    if np is not None:  # a new process seeds numpy's global generator from the OS, not from its parent
        np.random.seed()
    from flor_ray.execution import zygote

    zygote._child(req)  # never returns


def _reply(conn: socket.socket, msg: dict) -> None:
    try:
        conn.sendall((json.dumps(msg) + "\n").encode())
    except OSError:  # the test gave up on it
        pass


def _read_request(conn: socket.socket) -> dict:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = conn.recv(1 << 16)
        if not chunk:
            raise EOFError
        buf += chunk
    return json.loads(buf)


def serve(path: str) -> None:
    import select

    from flor_ray.execution.zygote import PRELOAD

    for mod in PRELOAD:
        try:
            __import__(mod)
        except Exception:  # noqa: BLE001 - a missing optional module is imported by the child if needed
            pass
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    children: dict[int, tuple[int, socket.socket]] = {}  # pidfd -> (pid, the requester's connection)
    while True:
        ready, _, _ = select.select([listener, 0, *children], [], [])
        if 0 in ready and not os.read(0, 1 << 10):  # the test session ended
            return
        for fd in ready:
            if fd in children:
                pid, conn = children.pop(fd)
                _, status = os.waitpid(pid, 0)
                os.close(fd)
                _reply(conn, {"code": os.waitstatus_to_exitcode(status)})
                conn.close()
        if listener in ready:
            conn, _ = listener.accept()
            try:
                req = _read_request(conn)
            except (EOFError, OSError, ValueError):
                conn.close()
                continue
            sys.stdout.flush()
            pid = os.fork()
            if pid == 0:
                _child(req, [listener, conn, *children, *(c for _, c in children.values())])
            children[os.pidfd_open(pid)] = (pid, conn)
            _reply(conn, {"pid": pid})


# ------------------------------------------------------------------------------ client
def _text(data: bytes) -> str:
    """Bytes as ``subprocess`` decodes them with ``text=True``."""
    return data.decode(locale.getpreferredencoding(False)).replace("\r\n", "\n").replace("\r", "\n")


class Forked:
    """A script forked by the server, with the part of ``subprocess.Popen`` the tests
    use: ``args``, ``pid``, ``returncode``, ``poll``, ``wait``, ``communicate`` (text),
    ``send_signal``/``terminate``/``kill``."""

    def __init__(self, sock: socket.socket, args: list[str], out: str, err: str):
        self.args, self._sock, self._out, self._err = args, sock, out, err
        self._buf = b""
        self.returncode: int | None = None
        self.pid = int(self._line(None)["pid"])

    def _line(self, timeout: float | None) -> dict:
        self._sock.settimeout(timeout)
        while b"\n" not in self._buf:
            try:
                chunk = self._sock.recv(1 << 10)
            except (socket.timeout, BlockingIOError):  # BlockingIOError: timeout 0
                raise subprocess.TimeoutExpired(self.args, timeout) from None
            if not chunk:
                raise ConnectionError("the script zygote ended before the script did")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.returncode = int(self._line(timeout)["code"])
            self._sock.close()
        return self.returncode

    def poll(self) -> int | None:
        try:
            return self.wait(0)
        except subprocess.TimeoutExpired:
            return None

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        texts = []
        for path in (self._out, self._err):
            try:
                with open(path, "rb") as f:
                    texts.append(_text(f.read()))
                os.unlink(path)
            except FileNotFoundError:  # read by an earlier call: Popen answers empty then too
                texts.append("")
        return texts[0], texts[1]

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def _end(proc: subprocess.Popen, tmp: str) -> None:
    try:
        proc.stdin.close()  # the server leaves its loop
        proc.wait(10)  # reaped: its children's CPU time is counted as the session's
    except (OSError, subprocess.TimeoutExpired):
        proc.kill()
        proc.wait()
    proc.stdout.close()
    for name in os.listdir(tmp):
        os.unlink(os.path.join(tmp, name))
    os.rmdir(tmp)


class Zygote:
    """The server, started on first use with ``env`` (and again if it died)."""

    def __init__(self, env: dict):
        self.env = dict(env)
        self._proc: subprocess.Popen | None = None
        self._n = 0

    def differs(self, env: dict) -> list[str]:
        """The variables that keep ``env`` from being forked (empty: forkable)."""
        keys = (set(env) | set(self.env))
        return sorted(k for k in keys if not k.startswith(RUNTIME_PREFIXES) and env.get(k) != self.env.get(k))

    def _started(self) -> bool:
        if self._proc is not None and self._proc.poll() is None:
            return True
        self._tmp = tempfile.mkdtemp(prefix="flor-test-zygote-")
        self._sock = os.path.join(self._tmp, "sock")
        log = open(os.path.join(self._tmp, "server.log"), "w")
        self._proc = subprocess.Popen([sys.executable, __file__, self._sock], env=self.env, stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=log, text=True)
        log.close()
        self._end = weakref.finalize(self, _end, self._proc, self._tmp)
        if self._proc.stdout.readline() != "ready\n":
            self._end()
            self._proc = None
            return False
        return True

    def start(self, cwd, script: str, args: tuple[str, ...], env: dict) -> Forked | None:
        """The script forked; None when the server cannot serve it (then a plain process)."""
        if not self._started():
            return None
        self._n += 1
        stem = os.path.join(self._tmp, f"{os.getpid()}-{self._n}-{time.monotonic_ns()}")
        cwd = os.path.abspath(cwd)
        # absolute, as ``__file__`` and tracebacks name a script run as `python script.py`
        req = {"script": os.path.join(cwd, script), "argv": list(args), "cwd": cwd, "env": env,
               "stdout": stem + ".out", "stderr": stem + ".err"}
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self._sock)
            sock.sendall((json.dumps(req) + "\n").encode())
            return Forked(sock, [sys.executable, script, *args], req["stdout"], req["stderr"])
        except (OSError, ValueError, KeyError):
            sock.close()
            return None


if __name__ == "__main__":
    serve(sys.argv[1])

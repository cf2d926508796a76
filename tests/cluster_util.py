"""A two-node Ray cluster in two network namespaces joined by a veth pair.

ns1 (10.213.0.1) runs the Ray head, its dashboard and an S3 server (moto); ns2
(10.213.0.2) runs a Ray worker node. Every process is started inside a namespace,
so teardown kills exactly the processes in our two namespaces (``ip netns pids``),
never other Ray instances on the machine (``ray stop`` would kill those too), then
deletes the namespaces.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

HEAD_IP, WORKER_IP = "10.213.0.1", "10.213.0.2"
S3_PORT = 5055
BIN = Path(sys.executable).parent


def sh(*args: str, check: bool = True, timeout: float = 120, env: dict | None = None,
       cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def netns_unavailable() -> str | None:
    """Why namespaces cannot be used here, or None."""
    if shutil.which("ip") is None:
        return "the `ip` tool (iproute2) is not installed"
    name = f"florprobe{os.getpid()}"
    proc = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if proc.returncode != 0:
        return f"`ip netns add` is not permitted here: {proc.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


class Cluster:
    def __init__(self, base: Path, env: dict):
        tag = uuid.uuid4().hex[:6]
        self.ns1, self.ns2 = f"flor1{tag}", f"flor2{tag}"
        self.veth1, self.veth2 = f"fv1{tag}", f"fv2{tag}"
        self.base = base
        # short temp dirs: Ray's unix socket paths must stay under 107 bytes
        self.tmp1, self.tmp2 = Path(f"/tmp/fr1{tag}"), Path(f"/tmp/fr2{tag}")
        self.env = dict(env)
        self.env["PATH"] = f"{BIN}{os.pathsep}{self.env.get('PATH', '')}"
        self.env["RAY_AUTH_MODE"] = "token"
        # a two-node cluster: the local Ray of the other tests may have set it to 0 in
        # this process's environment, and a worker node then refuses to join
        self.env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
        self.s3_endpoint = f"http://{HEAD_IP}:{S3_PORT}"
        self.env.update(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1",
                        AWS_ENDPOINT_URL=self.s3_endpoint)
        self._s3: subprocess.Popen | None = None

    # ------------------------------------------------------------------ helpers
    def run(self, ns: str, *args: str, check: bool = True, timeout: float = 180, cwd=None, **extra: str):
        return sh("ip", "netns", "exec", ns, *args, check=check, timeout=timeout, env={**self.env, **extra}, cwd=cwd)

    # --------------------------------------------------------------- lifecycle
    def start(self) -> "Cluster":
        sh("ip", "netns", "add", self.ns1)
        sh("ip", "netns", "add", self.ns2)
        sh("ip", "link", "add", self.veth1, "type", "veth", "peer", "name", self.veth2)
        sh("ip", "link", "set", self.veth1, "netns", self.ns1)
        sh("ip", "link", "set", self.veth2, "netns", self.ns2)
        for ns, dev, ip in ((self.ns1, self.veth1, HEAD_IP), (self.ns2, self.veth2, WORKER_IP)):
            sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{ip}/24", "dev", dev)
            sh("ip", "netns", "exec", ns, "ip", "link", "set", dev, "up")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        # S3 on the head's address, reachable from both nodes
        self._s3 = subprocess.Popen(
            ["ip", "netns", "exec", self.ns1, str(BIN / "moto_server"), "-H", HEAD_IP, "-p", str(S3_PORT)],
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.run(self.ns1, sys.executable, "-c", _WAIT_S3.format(endpoint=self.s3_endpoint), timeout=60)
        sh(str(BIN / "ray"), "get-auth-token", "--generate", env=self.env, check=False)
        self.run(self.ns1, str(BIN / "ray"), "start", "--head", f"--node-ip-address={HEAD_IP}", "--port=6379",
                 "--num-cpus=2", f"--temp-dir={self.tmp1}", "--include-dashboard=true",
                 f"--dashboard-host={HEAD_IP}", "--disable-usage-stats")
        self.run(self.ns2, str(BIN / "ray"), "start", f"--address={HEAD_IP}:6379", f"--node-ip-address={WORKER_IP}",
                 "--num-cpus=2", f"--temp-dir={self.tmp2}", "--disable-usage-stats")
        return self

    def stop(self) -> None:
        for ns in (self.ns1, self.ns2):
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
        if self._s3 is not None:
            self._s3.wait(timeout=10)
        time.sleep(0.5)
        for ns in (self.ns1, self.ns2):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        for d in (self.tmp1, self.tmp2):
            shutil.rmtree(d, ignore_errors=True)

    def __enter__(self) -> "Cluster":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


_WAIT_S3 = """
import time, urllib.request
for _ in range(200):
    try:
        urllib.request.urlopen("{endpoint}", timeout=1)
        break
    except Exception as exc:
        if getattr(exc, "code", None):
            break
        time.sleep(0.2)
else:
    raise SystemExit("S3 server did not come up")
import boto3
boto3.client("s3", endpoint_url="{endpoint}").create_bucket(Bucket="flor-cluster")
"""

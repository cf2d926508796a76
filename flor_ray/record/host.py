"""What a recording reads of its process and host: the clocks its timings use, the
process's start, and the Python / numpy / torch environment of the run."""

from __future__ import annotations

import datetime as _dt
import os
import sys
import time

__all__ = ["PartTimer", "now_iso", "process_start_time", "pid_start_ticks", "environment"]


class PartTimer:
    """Adds the seconds since the previous mark to ``parts[name]``."""

    def __init__(self, parts: dict[str, float]):
        self.parts = parts
        self._t = time.perf_counter()

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.parts[name] = self.parts.get(name, 0.0) + now - self._t
        self._t = now


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def process_start_time() -> float:
    """Wall-clock start of this process (Linux /proc), for the set-up timing."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:  # 10 ms resolution (/proc/stat's btime has whole seconds)
            uptime = float(f.read().split()[0])
        return time.time() - max(uptime - ticks / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError):
        return time.time()


def pid_start_ticks() -> int | None:
    try:
        with open("/proc/self/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def environment() -> dict:
    """Python, platform and, when imported, torch's and numpy's versions and the device."""
    import platform

    env = {"python": platform.python_version(), "platform": platform.platform(), "device": "cpu"}
    torch = sys.modules.get("torch")
    if torch is not None:
        env["torch"] = torch.__version__
        try:
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                env["device"] = "cuda"
                env["gpu"] = torch.cuda.get_device_name()
        except Exception:
            pass
    np = sys.modules.get("numpy")
    if np is not None:
        env["numpy"] = np.__version__
    return env

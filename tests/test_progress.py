"""The recording progress line: drawn on a terminal for a silent script, cleared before its output."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
import time

from conftest import clean_env, write


def _run_in_pty(repo, env) -> str:
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "train.py"], cwd=repo, env=env, stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    chunks = []
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            data = os.read(master, 4096)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=30)
    os.close(master)
    return b"".join(chunks).decode(errors="replace")


SCRIPT = """
import time
import flor_ray as flor
for epoch in flor.loop("epoch", range(3)):
    for step in flor.loop("step", range(12)):
        time.sleep(0.1)
        flor.log("s", step)
print("done training")
"""


def test_progress_line_on_a_terminal(repo):
    write(repo, "train.py", SCRIPT)
    out = _run_in_pty(repo, clean_env())
    assert "flor_ray " in out and "epoch " in out and "step " in out and "/12" in out
    assert "\r\x1b[K" in out  # drawn in place and cleared
    assert "done training" in out


def test_no_progress_when_disabled_or_not_a_terminal(repo):
    write(repo, "train.py", SCRIPT)
    out = _run_in_pty(repo, clean_env(FLOR_PROGRESS="0"))
    assert "step " not in out and "done training" in out
    proc = subprocess.run([sys.executable, "train.py"], cwd=repo, env=clean_env(), capture_output=True, text=True)
    assert proc.stderr == "" and proc.stdout == "done training\n"

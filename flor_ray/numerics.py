"""The numerics environment: what decides a run's floating-point results besides its code.

The same code on the same data gives other bits when a float reduction is split
another way: torch splits its reductions and MKL its matrix products by the number
of intra-op threads, which a Ray task with ``num_cpus=1`` gets set to 1
(``OMP_NUM_THREADS=1``) while the recording ran with the machine's default. So a
run records, at its first outer iteration (torch is loaded by then), the thread
counts, the thread variables of the OpenMP/MKL/BLAS runtimes, torch's
deterministic-algorithm and matmul/cuDNN/TF32 flags, the default dtype, the CPU's
vector capability and, for CUDA runs, the GPU model and the CUDA/cuDNN versions.
Every replay process restores what can be restored before the script's code runs
(:func:`replay_env` for the environment, :func:`restore` for torch's settings) and
names what cannot (:func:`differences`): another GPU, another CPU capability,
another torch, fewer cores than recorded threads.

This module imports nothing heavy: torch is used only when the process has
already imported it.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Mapping

__all__ = ["capture", "restore", "replay_env", "differences", "describe", "threads", "restored", "THREAD_VARS"]

#: environment variables read by the thread runtimes and math libraries at start
#: (libgomp reads OMP_* when torch loads it; MKL_CBWR fixes MKL's code path;
#: CUBLAS_WORKSPACE_CONFIG is what deterministic cuBLAS needs)
THREAD_VARS = (
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS", "OMP_DYNAMIC", "MKL_DYNAMIC", "MKL_CBWR", "CUBLAS_WORKSPACE_CONFIG",
    "NVIDIA_TF32_OVERRIDE", "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE",
)

#: torch's per-backend float32 precision (torch >= 2.9): "ieee", "tf32", "bf16" or "none"
_PRECISION_BACKENDS = ("", "cuda.matmul", "cudnn", "cudnn.conv", "cudnn.rnn", "mkldnn", "mkldnn.matmul",
                       "mkldnn.conv", "mkldnn.rnn")

#: legacy flags: (key, getter path, setter); each read in its own try, since torch
#: refuses some legacy getters once the per-backend precision API has been used
_FLAGS = (
    ("cudnn_deterministic", "backends.cudnn.deterministic"),
    ("cudnn_benchmark", "backends.cudnn.benchmark"),
    ("cudnn_allow_tf32", "backends.cudnn.allow_tf32"),
    ("cuda_matmul_allow_tf32", "backends.cuda.matmul.allow_tf32"),
    ("cuda_matmul_allow_fp16_reduction", "backends.cuda.matmul.allow_fp16_reduced_precision_reduction"),
    ("cuda_matmul_allow_bf16_reduction", "backends.cuda.matmul.allow_bf16_reduced_precision_reduction"),
)

_RESTORED = False


def _attr(obj: Any, path: str) -> Any:
    for p in filter(None, path.split(".")):
        obj = getattr(obj, p)
    return obj


def _set_attr(obj: Any, path: str, value: Any) -> None:
    head, _, last = path.rpartition(".")
    setattr(_attr(obj, head), last, value)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or None


def capture() -> dict:
    """This process's numerics as a plain (JSON-able) dict; only the environment
    and the machine when torch is not imported."""
    out: dict[str, Any] = {
        "env": {k: os.environ[k] for k in THREAD_VARS if k in os.environ},
        "cores": _cores(),
        "cpu": _cpu_model(),
    }
    torch = sys.modules.get("torch")
    if torch is None or not hasattr(torch, "get_num_threads"):
        return out
    out["torch"] = torch.__version__
    out["intra_op_threads"] = torch.get_num_threads()
    # reads the setting without starting the inter-op pool (a started pool would
    # make a later fork of this process hang on its first parallel region)
    out["inter_op_threads"] = torch.get_num_interop_threads()
    out["deterministic"] = torch.are_deterministic_algorithms_enabled()
    out["deterministic_warn_only"] = torch.is_deterministic_algorithms_warn_only_enabled()
    out["default_dtype"] = str(torch.get_default_dtype()).replace("torch.", "")
    for key, path in (("float32_matmul_precision", None), *_FLAGS):
        try:
            out[key] = torch.get_float32_matmul_precision() if path is None else bool(_attr(torch, path))
        except (RuntimeError, AttributeError):
            out[key] = None
    prec = {}
    for b in _PRECISION_BACKENDS:
        try:
            prec[b or "default"] = str(_attr(torch.backends, b).fp32_precision)
        except (AttributeError, RuntimeError):
            pass
    out["fp32_precision"] = prec
    try:
        out["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        out["cpu_capability"] = None
    try:
        if torch.cuda.is_initialized():
            cap = torch.cuda.get_device_capability()
            out["cuda"] = {"device": torch.cuda.get_device_name(), "capability": f"{cap[0]}.{cap[1]}",
                           "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    except Exception:  # noqa: BLE001 - a broken CUDA set-up records no GPU
        pass
    return out


def threads(recorded: Mapping[str, Any] | None) -> int | None:
    """The recorded intra-op thread count, or None."""
    n = (recorded or {}).get("intra_op_threads")
    return int(n) if isinstance(n, int) and n > 0 else None


def replay_env(recorded: Mapping[str, Any] | None, env: Mapping[str, str]) -> dict:
    """``env`` with the recorded thread variables: those the recording had are set,
    the others removed (Ray sets OMP_NUM_THREADS to a task's CPUs). Where the
    recording had no OMP_NUM_THREADS, it is set to the recorded thread count, so
    that torch starts its pool at that size even in a plain ``python script.py``."""
    out = dict(env)
    if not recorded or "env" not in recorded:
        return out
    for k in THREAD_VARS:
        out.pop(k, None)
    out.update(recorded["env"])
    n = threads(recorded)
    if n and "OMP_NUM_THREADS" not in out:
        out["OMP_NUM_THREADS"] = str(n)
    return out


def restore(recorded: Mapping[str, Any] | None) -> None:
    """Apply the recorded torch settings in this process (before the script's code:
    the script's own settings, being code, then apply on top as they did when
    recording). Settings already equal are left alone; what cannot be set is left
    for :func:`differences` to name."""
    global _RESTORED
    torch = sys.modules.get("torch")
    if not recorded or torch is None or "intra_op_threads" not in recorded:
        return
    _RESTORED = True
    here = capture()
    if here.get("intra_op_threads") != recorded["intra_op_threads"]:
        torch.set_num_threads(int(recorded["intra_op_threads"]))
    if recorded.get("inter_op_threads") and here.get("inter_op_threads") != recorded["inter_op_threads"]:
        try:
            torch.set_num_interop_threads(int(recorded["inter_op_threads"]))
        except RuntimeError:  # the pool has started: reported by differences()
            pass
    det, wo = recorded.get("deterministic"), bool(recorded.get("deterministic_warn_only"))
    if det is not None and (det, wo) != (here.get("deterministic"), here.get("deterministic_warn_only")):
        torch.use_deterministic_algorithms(bool(det), warn_only=wo)
    dtype = getattr(torch, str(recorded.get("default_dtype")), None)
    if isinstance(dtype, torch.dtype) and recorded.get("default_dtype") != here.get("default_dtype"):
        torch.set_default_dtype(dtype)
    # the per-backend precision first: it is what torch reads; legacy flags only
    # where they still differ (setting both kinds is allowed, reading may not be)
    for b, v in (recorded.get("fp32_precision") or {}).items():
        if (here.get("fp32_precision") or {}).get(b, v) != v:
            try:
                _attr(torch.backends, "" if b == "default" else b).fp32_precision = v
            except (AttributeError, RuntimeError, ValueError):
                pass
    now = capture()
    for key, path in _FLAGS:
        v = recorded.get(key)
        if v is not None and now.get(key) is not None and now[key] != v:
            try:
                _set_attr(torch, path, bool(v))
            except (AttributeError, RuntimeError):
                pass
    prec = recorded.get("float32_matmul_precision")
    if prec is not None and now.get("float32_matmul_precision") not in (None, prec):
        try:
            torch.set_float32_matmul_precision(prec)
        except RuntimeError:
            pass


def restored() -> bool:
    """Whether :func:`restore` ran in this process (the zygote's child restores before the script)."""
    return _RESTORED


def _fmt(v: Any) -> str:
    return "unset" if v is None else str(v)


def differences(recorded: Mapping[str, Any] | None, here: Mapping[str, Any]) -> list[str]:
    """What differs between the recording's numerics and ``here`` (a :func:`capture`
    of the replay process, after :func:`restore`): each a sentence naming the likely
    cause of values that differ from the recording."""
    if not recorded or "intra_op_threads" not in recorded or "intra_op_threads" not in here:
        return []
    out = []
    n, m = recorded["intra_op_threads"], here["intra_op_threads"]
    if n != m:
        out.append(f"recorded with {n} intra-op thread{'s' if n != 1 else ''}, replayed with {m} (the script "
                   "sets them from the machine, or they could not be restored): float reductions are split another way")
    elif n > here.get("cores", n):
        out.append(f"recorded with {n} intra-op threads; this node has {here['cores']} cores: "
                   f"the {n} threads are restored, oversubscribed (slower)")
    for key, what in (("torch", "torch"), ("cpu_capability", "CPU vector capability")):
        if recorded.get(key) and here.get(key) and recorded[key] != here[key]:
            out.append(f"recorded with {what} {recorded[key]}, replayed with {here[key]}: other kernels")
    rc, hc = recorded.get("cuda"), here.get("cuda")
    if rc and not hc:
        out.append(f"recorded on GPU {rc.get('device')}, replayed without CUDA")
    elif rc and hc:
        for key, what in (("device", "GPU"), ("cuda", "CUDA"), ("cudnn", "cuDNN")):
            if rc.get(key) != hc.get(key):
                out.append(f"recorded with {what} {rc.get(key)}, replayed with {hc.get(key)}: other kernels")
    for key in ("inter_op_threads", "deterministic", "default_dtype", "float32_matmul_precision",
                *(k for k, _ in _FLAGS)):
        if recorded.get(key) is not None and here.get(key) is not None and recorded[key] != here[key]:
            out.append(f"{key} was {_fmt(recorded[key])} when recording, {_fmt(here[key])} in the replay")
    for b, v in (recorded.get("fp32_precision") or {}).items():
        w = (here.get("fp32_precision") or {}).get(b)
        if w is not None and w != v:
            out.append(f"fp32_precision of {b} was {v} when recording, {w} in the replay")
    return out


def describe(recorded: Mapping[str, Any] | None) -> str:
    """One line for explain(): ``threads=2 interop=2 OMP_NUM_THREADS=unset ...``."""
    if not recorded or "intra_op_threads" not in recorded:
        return "not recorded"
    env = recorded.get("env") or {}
    parts = [f"threads={recorded['intra_op_threads']}", f"interop={recorded.get('inter_op_threads')}",
             f"OMP_NUM_THREADS={_fmt(env.get('OMP_NUM_THREADS'))}",
             f"deterministic={'on' if recorded.get('deterministic') else 'off'}",
             f"dtype={recorded.get('default_dtype')}"]
    # the cuDNN defaults (tf32) say nothing on a CPU run
    prec = {k: v for k, v in (recorded.get("fp32_precision") or {}).items()
            if v not in ("none", "ieee") and (recorded.get("cuda") or not k.startswith("cud"))}
    if prec:
        parts.append("fp32_precision " + ",".join(f"{k}={v}" for k, v in sorted(prec.items())))
    if recorded.get("cpu_capability"):
        parts.append(f"cpu={recorded['cpu_capability']}")
    if recorded.get("cuda"):
        c = recorded["cuda"]
        parts.append(f"gpu={c.get('device')} cuda={c.get('cuda')} cudnn={c.get('cudnn')}")
    return " ".join(parts)

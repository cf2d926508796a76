"""Checkpoint capture, serialisation and restore (objects' state plus every RNG).

A checkpoint of outer iteration ``e`` is captured right after the last inner
``flor.loop`` of that iteration exits (or at the iteration's end when it has no
inner loop). That is the point where a replay that skips the inner loops resumes:
the outer-level code that follows (evaluation, ``scheduler.step()``...) then runs
for real, exactly once, as it did in the recording.

A checkpoint also holds the loop-carried state of the scope that iterates the outer
loop (plain values, ``torch.Generator`` states, DataLoader iterator positions; see
:mod:`.carried`), which a replay writes back where it restores the checkpoint.

Capture happens on the training thread and only clones tensors (a memory copy);
``torch.save`` runs later on the background writer.
"""

from __future__ import annotations

import io
import math
import random
import sys
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from ..errors import CheckpointError, CheckpointingError

if TYPE_CHECKING:  # pragma: no cover
    from ..config import Settings
    from ..store import Store

__all__ = ["capture", "serialize", "deserialize", "restore", "check_objects", "checkpoint_period", "verify_written",
           "manifest_entry"]

FORMAT = 1


def checkpoint_period(cost_s: float, train_s: float, settings: "Settings") -> int:
    """Outer iterations between checkpoints, so that a checkpoint's cost (``cost_s``:
    capture plus the writer's CPU) stays within the budget's share of the training
    time (``train_s``, one iteration's), and the period within its maximum."""
    budget = max(settings.checkpoint_budget, 1e-6)
    period = math.ceil(cost_s / (budget * max(train_s, 1e-9)))
    return max(1, min(settings.checkpoint_max_period, period))


def manifest_entry(snap: Mapping[str, Any], rel: str, data: bytes, stored: Any = None) -> dict:
    """The run metadata's entry for checkpoint ``snap``, written to ``rel`` as ``data``
    (given ``stored``, a :class:`.ckpt_objects.Stored`: a skeleton and its objects)."""
    import hashlib

    entry = {
        "iteration": snap["iteration"],
        "inner_exits": snap["inner_exits"],
        "path": rel,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    if stored is not None:  # what this checkpoint added to the store, skeleton included
        entry.update({"format": 2, "objects": stored.objects, "new_objects": stored.new_objects,
                      "stored_bytes": len(data) + stored.new_bytes})
    if snap.get("from_save"):  # taken from the script's own torch.save (own_saves)
        entry["from_save"] = snap["from_save"]
    scope = snap.get("scope")
    if scope is not None:  # what the planner may rely on when a replay restores it
        entry["carried"] = list(scope["captured"])
        entry["not_carried"] = dict(scope["missing"])
    return entry


def check_objects(objects: Mapping[str, Any]) -> None:
    for name, obj in objects.items():
        if not (callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))):
            raise CheckpointingError(
                f"flor.checkpointing({name}=...) got a {type(obj).__name__}, which has no "
                "state_dict()/load_state_dict(); pass modules, optimizers, LR schedulers, "
                "GradScalers or your own object with those two methods"
            )


def _clone(x: Any) -> Any:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return x.detach().to("cpu", copy=True)
    if isinstance(x, dict):
        return type(x)((k, _clone(v)) for k, v in x.items()) if type(x) is not dict else {k: _clone(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clone(v) for v in x]
    if isinstance(x, tuple):
        return tuple(_clone(v) for v in x)
    return x


def capture_rng() -> dict:
    state: dict[str, Any] = {"python": random.getstate()}
    np = sys.modules.get("numpy")
    if np is not None:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)]
    torch = sys.modules.get("torch")
    if torch is not None:
        state["torch"] = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if "torch" in state:
        import torch

        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


def capture(objects: Mapping[str, Any], iteration: int, inner_exits: int, scope: Any = None) -> dict:
    """A snapshot in memory: cloned states, RNG states and, given the frame that
    iterates the outer loop (``scope``), its loop-carried values (training thread)."""
    snap = {
        "format": FORMAT,
        "iteration": iteration,
        "inner_exits": inner_exits,
        "objects": {name: _clone(obj.state_dict()) for name, obj in objects.items()},
        "rng": capture_rng(),
    }
    if scope is not None:
        from .carried import capture_scope

        snap["scope"] = capture_scope(scope, objects.values())
    return snap


def serialize(snapshot: Mapping[str, Any]) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(dict(snapshot), buf)
    return buf.getvalue()


def deserialize(data: bytes, where: str, read: Any = None) -> dict:
    """Load a checkpoint with ``weights_only=True``: tensors and plain containers only;
    a skeleton's objects (format 2) are read with ``read`` (store path -> bytes)."""
    import pickle

    import torch

    try:
        snap = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, KeyError) as exc:
        raise CheckpointError(
            f"checkpoint {where} cannot be loaded ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "it is truncated, corrupted or holds objects other than tensors and plain containers; "
            "replay from an earlier checkpoint (it is skipped automatically) or re-record",
            path=where,
        ) from exc
    if isinstance(snap, dict) and snap.get("format") == 2 and read is not None:
        from .ckpt_objects import join

        joined = join(snap, read, where)
        if "save" in joined:  # the script's own save holds the big tensors (own_saves)
            joined["objects"] = _from_save(joined, where)
        return {**joined, "format": FORMAT}
    if not isinstance(snap, dict) or snap.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {where} is not a flor_ray checkpoint of format {FORMAT}", path=where)
    return snap


def _from_save(snap: dict, where: str) -> dict:
    """The object states of a checkpoint taken from the script's save: its skeleton's
    states with each key path into the saved dict replaced by that tensor."""
    import pickle

    import torch

    from .own_saves import resolve_in_save

    raw = snap.pop("save")
    try:
        saved = torch.load(io.BytesIO(raw.numpy().tobytes()), weights_only=True, map_location="cpu")
        return resolve_in_save(snap["objects"], saved)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise CheckpointError(
            f"checkpoint {where} (taken from the script's torch.save of {snap.get('from_save')}) cannot be "
            f"loaded ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); replay from an "
            "earlier checkpoint (it is skipped automatically) or re-record", path=where) from exc


def restore(objects: Mapping[str, Any], snapshot: Mapping[str, Any], where: str = "", scope: Any = None,
            carried: Iterable[str] = ()) -> None:
    """Load the objects' states, then (given the replay's outer-loop frame) the
    ``carried`` names, iterator positions and generator states, then the RNGs: a
    DataLoader iterator's re-draw touches generators that are restored after it."""
    saved = snapshot["objects"]
    missing = sorted(set(objects) - set(saved))
    if missing:
        raise CheckpointError(
            f"checkpoint {where} holds no state for {', '.join(missing)} (it has {', '.join(sorted(saved))}); "
            "the checkpointing(...) names of the replayed script must match the recorded ones",
            path=where,
        )
    for name, obj in objects.items():
        obj.load_state_dict(saved[name])
    if scope is not None and snapshot.get("scope"):
        from .carried import restore_scope

        restore_scope(scope, snapshot["scope"], carried, where)
    restore_rng(snapshot["rng"])


def verify_written(store: "Store", manifest: Iterable[dict]) -> list[str]:
    """Mark each written checkpoint of ``manifest`` verified when the store holds all
    its bytes; the problems found, one line each."""
    problems = []
    for m in manifest:
        try:
            size = store.fs.size(store.path(m["path"]))
        except Exception as exc:  # noqa: BLE001 - reported by the caller
            size = f"unreadable ({exc})"
        m["verified"] = size == m["bytes"]
        if not m["verified"]:
            problems.append(f"checkpoint {m['path']} has {size} bytes, expected {m['bytes']}")
    return problems

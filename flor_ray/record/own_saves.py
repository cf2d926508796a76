"""The script's own ``torch.save`` checkpoints, taken as flor's (``from_saves``).

Many scripts ``torch.save({'epoch': e, 'model': model.state_dict(), 'optimizer':
opt.state_dict()}, args.ckpt)`` every epoch. With
``flor.checkpointing(from_saves=True, model=model, optimizer=opt)`` the recording
takes such a save as the checkpoint of its outer iteration instead of copying the
objects' tensors itself:

* at the last inner ``flor.loop``'s exit (where flor's checkpoint of the iteration
  is taken, see :mod:`.checkpoint`) nothing is copied: each checkpointed object's
  ``state_dict()`` is walked, its tensors of at least ``MIN_OBJECT_BYTES`` are
  *printed* (the tensor and its version counter, which every in-place update bumps)
  and the rest (numbers, an LR scheduler's state, small tensors) is copied, with the
  RNG states and the loop-carried values of :mod:`.carried`;
* at a ``torch.save(obj, path)`` later in that iteration, each printed tensor is
  looked up in ``obj`` by its storage (a ``state_dict()`` shares the parameters'
  memory): found with an unchanged version, it is the iteration's state. The save is
  serialised once, into memory, written to ``path`` as the script asked and handed
  to the background writer as one object of the run (:mod:`.ckpt_objects`); the
  checkpoint's skeleton names, for each printed tensor, its key path in the saved
  dict. What the save lacks (the RNG states, loader positions, an optimizer's
  learning rate that ``scheduler.step()`` changed before the save) comes from the
  copy taken at the inner loop's exit, so a restore is exactly flor's own checkpoint.

A save that lacks a printed tensor, holds one changed since the inner loop, or holds
a value that ``torch.load(weights_only=True)`` refuses (an ``argparse.Namespace``)
is written as the script asked and not used; the iteration then has no checkpoint,
one message says why, and flor takes its own checkpoints for the rest of the run.
An iteration without an inner ``flor.loop`` has its checkpoint at its end, after
the save, and is checkpointed by flor as without ``from_saves``.

Without ``from_saves``, the same lookup runs on the first saves of a run: when two
outer iterations each save the checkpointed objects' state, one message proposes
``from_saves=True``.

The saved file differs from what ``torch.save(obj, path)`` alone writes only in its
zip archive's folder name (``archive/``), which ``torch.load`` ignores.
"""

from __future__ import annotations

import io
import os
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from .ckpt_objects import MIN_OBJECT_BYTES, map_leaves

__all__ = ["IN_SAVE", "SaveWatch", "resolve_in_save"]

IN_SAVE = "__flor_in_save__"  # a printed tensor: its index at the inner exit, its key path in the save
_SAFE_LEAVES = (int, float, bool, str, bytes, complex, type(None))
_NO_SAVE = object()


@dataclass(frozen=True)
class Armed:
    """What the inner loop's exit left for the iteration's save to complete."""

    iteration: int
    inner_exits: int
    objects: dict  # states, printed tensors replaced by {IN_SAVE: n}
    prints: tuple  # (tensor, version) by n
    rng: dict
    scope: Any


def _key(t: Any) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device)


def _printable(t: Any) -> bool:
    import torch

    return (t.layout == torch.strided and not t.is_quantized and t.device.type != "meta"
            and t.numel() * t.element_size() >= MIN_OBJECT_BYTES)


def _light(x: Any, prints: list) -> Any:
    """``x`` with its big tensors printed and the rest copied (small tensors cloned)."""
    torch = sys.modules["torch"]
    if isinstance(x, torch.Tensor):
        if _printable(x):
            prints.append((x, x._version))
            return {IN_SAVE: len(prints) - 1}
        return x.detach().to("cpu", copy=True)
    if isinstance(x, dict):
        items = [(k, _light(v, prints)) for k, v in x.items()]
        return dict(items) if type(x) is dict else type(x)(items)
    if isinstance(x, list):
        return [_light(v, prints) for v in x]
    if isinstance(x, tuple):
        return tuple(_light(v, prints) for v in x)
    return x


def index_save(obj: Any) -> tuple[dict, str | None]:
    """The tensors of a saved object by storage -> key path, and why ``torch.load(
    weights_only=True)`` would refuse it (None: it loads)."""
    torch = sys.modules["torch"]
    found: dict = {}
    why: list[str] = []

    def walk(x: Any, path: tuple) -> None:
        if isinstance(x, torch.Tensor):
            if x.layout == torch.strided and x.device.type != "meta":
                found.setdefault(_key(x), path)
            return
        if type(x) in (dict, OrderedDict):
            for k, v in x.items():
                if not isinstance(k, (str, int)):
                    why.append(f"a {type(k).__name__} key")
                    return
                walk(v, path + (k,))
        elif type(x) in (list, tuple):
            for i, v in enumerate(x):
                walk(v, path + (i,))
        elif not isinstance(x, _SAFE_LEAVES) and not isinstance(x, (torch.dtype, torch.device, torch.Size)):
            why.append(f"a {type(x).__name__} at {'/'.join(map(str, path)) or 'its top'}")

    walk(obj, ())
    return found, (why[0] if why else None)


def resolve_in_save(objects: dict, saved: Any) -> dict:
    """The checkpoint's object states with each {IN_SAVE: key path} replaced by the
    tensor at that path of the loaded save (cloned when a path is used twice)."""
    used: set = set()

    def get(path: list) -> Any:
        x = saved
        for k in path:
            x = x[k]
        if tuple(path) in used:
            return x.clone()
        used.add(tuple(path))
        return x

    return map_leaves(objects, _in_save, lambda x: get(x[IN_SAVE]))


def _in_save(x: Any) -> bool:
    return isinstance(x, dict) and IN_SAVE in x


def _placed(x: Any, paths: list) -> Any:
    """The armed states with each printed tensor's index replaced by its key path."""
    return map_leaves(x, _in_save, lambda v: {IN_SAVE: list(paths[v[IN_SAVE]])})


def _say(text: str) -> None:
    sys.stderr.write(f"flor_ray: {text}\n")


class SaveWatch:
    """One ``flor.checkpointing`` block's view of the script's ``torch.save`` calls.

    ``submit`` takes a finished snapshot (the session's checkpoint writer); the
    session calls :meth:`arm` at the inner loop's exit and :meth:`end` at the
    iteration's end."""

    def __init__(self, objects: Mapping[str, Any], from_saves: bool, submit: Callable[[dict], None]):
        self.objects = dict(objects)
        self.from_saves = from_saves
        self.trusting = from_saves  # False after a save that could not be used
        self._submit = submit
        self._armed: Armed | None = None
        self._used: int | None = None  # the iteration whose checkpoint a save gave
        self._why: str | None = None  # why the armed iteration's saves were not used
        self._told = False
        self._proposal_iters: set[int] = set()
        self._proposal_checks = 0
        self._iteration: int | None = None
        self.save_s = 0.0  # the lookups' time on the training thread (the serialisation is the script's)

    # ---------------------------------------------------------- the session's calls
    def arm(self, iteration: int, inner_exits: int, scope: Any) -> None:
        from .checkpoint import capture_rng

        prints: list = []
        objects = {name: _light(obj.state_dict(), prints) for name, obj in self.objects.items()}
        carried = None
        if scope is not None:
            from .carried import capture_scope

            carried = capture_scope(scope, self.objects.values())
        self._armed = Armed(iteration, inner_exits, objects, tuple(prints), capture_rng(), carried)
        self._why = None

    def end(self, iteration: int) -> float | None:
        """The iteration ends: the training thread's time in the save's lookups when a
        save gave its checkpoint; None (said once: flor checkpoints by itself from now on)
        when none did."""
        spent, self.save_s = self.save_s, 0.0
        armed, self._armed = self._armed, None
        if armed is None:
            return None
        if self._used == iteration:
            return spent
        why = self._why or "the script did not torch.save the checkpointed objects after the training loop"
        self.trusting = False
        if not self._told:
            self._told = True
            _say(f"flor.checkpointing(from_saves=True): iteration {iteration} has no checkpoint ({why}); "
                 "flor takes its own checkpoints for the rest of the run")
        return None

    def outer_begin(self, iteration: int) -> None:
        self._iteration = iteration

    # ------------------------------------------------------------- torch.save
    def saved(self, obj: Any, f: Any, save: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        """Run the script's ``torch.save(obj, f, ...)``, taking it as the armed
        iteration's checkpoint where it holds the state (module doc)."""
        if not isinstance(f, (str, os.PathLike)):  # a file object or buffer (flor's own writer's, too)
            return save(obj, f, *args, **kwargs)
        armed = self._armed
        if armed is not None and self._used != armed.iteration and self.trusting:
            if args or kwargs:
                self._why = "its torch.save passes options other than the object and the path"
            else:
                snap = self._complete(armed, obj)
                if snap is not None:
                    return self._save_and_submit(snap, obj, f, save)
        elif not self.from_saves and self._iteration is not None:
            self._maybe_propose(obj, f)
        return save(obj, f, *args, **kwargs)

    def _complete(self, armed: Armed, obj: Any) -> dict | None:
        t0 = time.perf_counter()
        try:
            found, why = index_save(obj)
            if why is not None:
                self._why = f"its save holds {why}, which torch.load(weights_only=True) refuses"
                return None
            paths = []
            for t, version in armed.prints:
                path = found.get(_key(t))
                if path is None or t._version != version:
                    self._why = ("its save lacks some of the checkpointed state" if path is None else
                                 "its save holds state changed after the training loop")
                    return None
                paths.append(path)
            return {"format": 1, "iteration": armed.iteration, "inner_exits": armed.inner_exits,
                    "objects": _placed(armed.objects, paths), "rng": armed.rng,
                    **({"scope": armed.scope} if armed.scope is not None else {})}
        finally:
            self.save_s += time.perf_counter() - t0

    def _save_and_submit(self, snap: dict, obj: Any, f: Any, save: Callable[..., Any]) -> None:
        import torch

        buf = io.BytesIO()
        save(obj, buf)
        view = buf.getbuffer()
        with open(f, "wb") as out:  # the script's file, as torch.save(obj, f) writes it
            out.write(view)
        snap["save"] = torch.frombuffer(view, dtype=torch.uint8) if len(view) else torch.empty(0, dtype=torch.uint8)
        snap["from_save"] = os.fspath(f)
        self._used = snap["iteration"]
        self._submit(snap)

    def _maybe_propose(self, obj: Any, f: Any) -> None:
        """Two iterations saving the checkpointed objects' state: propose from_saves (once)."""
        if self._told or self._proposal_checks >= 4 or self._iteration in self._proposal_iters:
            return
        self._proposal_checks += 1
        found, why = index_save(obj)
        prints: list = []
        for o in self.objects.values():
            _light(o.state_dict(), prints)
        if why is not None or not prints or any(_key(t) not in found for t, _ in prints):
            return
        self._proposal_iters.add(self._iteration)
        if len(self._proposal_iters) >= 2:
            self._told = True
            names = ", ".join(f"{k}={k}" for k in self.objects)
            where = os.fspath(f) if isinstance(f, (str, os.PathLike)) else "a file object"
            _say(f"this script torch.saves the state of {', '.join(self.objects)} every iteration (to {where}); "
                 f"`with flor.checkpointing(from_saves=True, {names}):` would take those saves as flor's "
                 "checkpoints instead of copying the same tensors again")

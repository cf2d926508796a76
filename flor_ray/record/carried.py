"""Loop-carried state of the outer loop's scope, captured with each checkpoint.

Training code carries state from one outer iteration to the next that no
``state_dict`` holds: an ``lr`` annealed with ``lr /= 4``, ``best_val_loss``, a
``global_step``, the ``torch.Generator`` a sampler draws from, the position of an
endless batch iterator. A replay that restores a mid-run checkpoint must restore
these as well, or it trains differently from the recording.

What is captured: every name bound in the scope that iterates the outer
``flor.loop`` (a function's locals and its module's globals, or a module's
globals), whatever the analysis would say of it. The recording has no analysis of
its script (parsing it would cost the training thread a libcst import and a parse)
and a frame holds a few dozen names, so taking the cheap ones costs microseconds;
the replay then writes back only the names that *its* analysis finds loop-carried
(so a path derived from ``__file__`` or a ``time.time()`` stamp is never forced onto
the replay). Per name, the capture holds:

* plain values (numbers, strings, None, numpy and 0-dim torch scalars, and
  lists, tuples and dicts of them, ``CARRIED_MAX_ELEMENTS`` at most) by value;
* objects with a ``__dict__`` (a ``BatchLoader``, a DataLoader, a sampler, an
  ``argparse.Namespace``): walked attribute by attribute, ``CARRIED_MAX_DEPTH`` deep: plain
  attributes by value, ``torch.Generator`` states, DataLoader iterators' positions;
* objects that ``flor.checkpointing`` holds, modules, functions, classes and
  datasets: nothing (restored by the checkpoint, or constant).

A DataLoader iterator's position is replayed by re-drawing: the hook below keeps,
for every iterator, the states of its loader's generators at the moment the
iterator was made; a restore sets them back, re-initialises the replay's iterator
in place, draws the recorded number of index batches from its sampler (indices
only: no sample is loaded), then restores the generators' current states. That is
exact for a single-process iterator over a map-style dataset whose sampler is
sequential or draws from its own generator.

Anything else (an open file, a Python generator, a tensor, a multi-process
iterator) is not captured; the checkpoint's summary names it with the reason, and
the planner replays from iteration 0 when such a name is loop-carried.
"""

from __future__ import annotations

import os
import sys
import types
from typing import Any, Iterable, Mapping

from ..config import CARRIED_MAX_DEPTH, CARRIED_MAX_ELEMENTS, CARRIED_MAX_OBJECTS, CARRIED_MAX_REASONS

__all__ = ["scope_frame", "install_loader_hook", "capture_scope", "restore_scope"]

_PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_STATIC = (types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType, type,
           types.BuiltinMethodType, staticmethod, classmethod, property)


def _library(filename: str) -> bool:
    return (filename.startswith(_PKG_DIR) or "site-packages" in filename or "dist-packages" in filename
            or filename.startswith("<frozen"))


def scope_frame(frame: types.FrameType | None) -> types.FrameType | None:
    """The user's frame that iterates the outer loop: the first caller outside
    flor_ray and installed libraries (``tqdm(flor.loop(...))`` is iterated by tqdm)."""
    while frame is not None and _library(frame.f_code.co_filename):
        frame = frame.f_back
    return frame


# ------------------------------------------------------------------ plain values
class _TooBig(Exception):
    pass


def _encode(v: Any, budget: list[int]) -> tuple | None:
    """A tagged copy of a plain value that ``torch.load(weights_only=True)`` accepts,
    or None when ``v`` is not plain."""
    budget[0] -= 1
    if budget[0] < 0:
        raise _TooBig
    t = type(v)
    if v is None or t is bool or t is int or t is float or t is str:
        if t is str:
            budget[0] -= len(v) // 64
        return ("v", v)
    if t is list or t is tuple:
        out = []
        for x in v:
            e = _encode(x, budget)
            if e is None:
                return None
            out.append(e)
        return ("l" if t is list else "t", out)
    if t is dict:
        items = []
        for k, x in v.items():
            ek, ex = _encode(k, budget), _encode(x, budget)
            if ek is None or ex is None:
                return None
            items.append([ek, ex])
        return ("d", items)
    np = sys.modules.get("numpy")
    if np is not None and isinstance(v, np.generic) and v.dtype.kind in "biuf" and v.dtype.itemsize <= 8:
        return ("np", v.dtype.str, v.item())  # float16/32/64 and ints round-trip exactly
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(v, torch.Tensor) and v.dim() == 0 and not v.is_sparse:
        return ("pt", v.detach().to("cpu", copy=True), str(v.device), bool(v.requires_grad))
    return None


def _decode(e: Any) -> Any:
    tag = e[0]
    if tag == "v":
        return e[1]
    if tag == "l":
        return [_decode(x) for x in e[1]]
    if tag == "t":
        return tuple(_decode(x) for x in e[1])
    if tag == "d":
        return {_decode(k): _decode(x) for k, x in e[1]}
    if tag == "np":
        import numpy as np

        return np.dtype(e[1]).type(e[2])
    if tag == "pt":
        x = e[1].to(e[2])
        return x.requires_grad_(True) if e[3] and x.is_floating_point() else x
    raise ValueError(f"unknown carried-value tag {tag!r}")


# ------------------------------------------------------------ DataLoader hook
def _resolve(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


_LOADER_GENERATORS = ("generator", "sampler.generator", "batch_sampler.sampler.generator")


def _origin(loader: Any) -> dict:
    """The loader's generator states as an iterator is made, and whether its order can be re-drawn."""
    import torch
    from torch.utils.data import SequentialSampler

    states, seen = [], set()
    for rel in _LOADER_GENERATORS:
        g = _resolve(loader, rel)
        if isinstance(g, torch.Generator) and id(g) not in seen:
            seen.add(id(g))
            states.append([rel, g.get_state()])
    bs = getattr(loader, "batch_sampler", None)
    sampler = getattr(bs, "sampler", None) if bs is not None else getattr(loader, "sampler", None)
    reason = None
    if not isinstance(sampler, SequentialSampler):
        gen = getattr(sampler, "generator", "absent")
        if gen is None:
            reason = ("a DataLoader iterator whose sampler draws from the global torch RNG (pass "
                      "generator=torch.Generator() to the DataLoader to make its position replayable)")
        elif not isinstance(gen, torch.Generator):
            reason = f"a DataLoader iterator over a {type(sampler).__name__}, whose order flor_ray cannot re-draw"
    return {"states": states, "reason": reason}


def install_loader_hook() -> None:
    """Remember each DataLoader iterator's loader and starting generator states (idempotent;
    only once torch is imported: flor_ray never imports it for this)."""
    dl = sys.modules.get("torch.utils.data.dataloader")
    if dl is None:
        return
    base = dl._BaseDataLoaderIter
    if getattr(base.__init__, "_flor_hook", False):
        return
    original = base.__init__

    def __init__(self, loader, *args, **kwargs):
        try:
            origin = _origin(loader)
        except Exception as exc:  # noqa: BLE001 - an odd loader is simply not replayable
            origin = {"states": [], "reason": f"a DataLoader iterator flor_ray cannot inspect ({exc})"}
        original(self, loader, *args, **kwargs)
        self._flor_origin = origin
        self._flor_loader = loader

    __init__._flor_hook = True  # type: ignore[attr-defined]
    __init__.__wrapped__ = original  # type: ignore[attr-defined]
    base.__init__ = __init__


# ------------------------------------------------------------------- capture
class _Walk:
    def __init__(self, protected: Iterable[Any]) -> None:
        self.protected = {id(o) for o in protected}
        self.attrs: dict[str, Any] = {}
        self.generators: dict[str, Any] = {}
        self.iterators: dict[str, dict] = {}
        self.seen: dict[int, str] = {}  # id -> the first path it was found at
        self.count = 0

    def obj(self, x: Any, path: str, depth: int) -> str | None:
        """None when everything ``x`` carries is captured (or needs no capture), else why not."""
        if id(x) in self.protected or isinstance(x, _STATIC):
            return None
        if id(x) in self.seen:
            return None
        self.seen[id(x)] = path
        self.count += 1
        if self.count > CARRIED_MAX_OBJECTS or depth > CARRIED_MAX_DEPTH:
            return "too many objects to capture"
        torch = sys.modules.get("torch")
        if torch is not None:
            special = self._torch(torch, x, path, depth)
            if special is not False:
                return special
        if isinstance(x, types.GeneratorType):
            return "a generator, whose position cannot be captured"
        if hasattr(x, "readable") and hasattr(x, "fileno"):
            return f"an open file ({type(x).__name__})"
        d = getattr(x, "__dict__", None)
        if not isinstance(d, dict) or type(x).__module__ == "builtins":
            return f"a {type(x).__name__}, which flor_ray cannot capture"
        for k, v in list(d.items()):
            sub = f"{path}.{k}"
            try:
                e = _encode(v, [CARRIED_MAX_ELEMENTS])
            except _TooBig:
                return f"{sub} is too large to capture"
            if e is not None:
                self.attrs[sub] = e
                continue
            why = self.obj(v, sub, depth + 1)
            if why is not None:
                return why if why.startswith(sub) else f"{sub} is {why}"
        return None

    def _torch(self, torch: Any, x: Any, path: str, depth: int) -> str | None | bool:
        """Torch types: None (captured or constant), a reason, or False (not a torch type)."""
        if isinstance(x, torch.Generator):
            self.generators[path] = x.get_state()
            return None
        if isinstance(x, torch.Tensor):
            return f"a Tensor of shape {tuple(x.shape)}"
        if isinstance(x, torch.nn.Module):
            stateless = next(iter(x.parameters()), None) is None and next(iter(x.buffers()), None) is None
            return None if stateless else f"a {type(x).__name__} that flor.checkpointing does not hold"
        if isinstance(x, torch.optim.Optimizer) or hasattr(x, "get_last_lr"):
            return f"a {type(x).__name__} that flor.checkpointing does not hold"
        data = sys.modules.get("torch.utils.data")
        if data is not None:
            if isinstance(x, data.Dataset):
                return None  # datasets are read, not advanced
            dl = sys.modules.get("torch.utils.data.dataloader")
            if dl is not None and isinstance(x, dl._BaseDataLoaderIter):
                return self._iterator(x, path, depth)
        return False

    def _iterator(self, it: Any, path: str, depth: int) -> str | None:
        if type(it).__name__ != "_SingleProcessDataLoaderIter":
            return "a DataLoader iterator with worker processes, whose position cannot be re-drawn"
        origin = getattr(it, "_flor_origin", None)
        if origin is None:
            return "a DataLoader iterator made before flor_ray's first call, whose start is unknown"
        if origin["reason"]:
            return origin["reason"]
        if getattr(it, "_dataset_kind", 0) != 0:
            return "a DataLoader iterator over an IterableDataset, whose position cannot be re-drawn"
        self.iterators[path] = {"yielded": int(it._num_yielded), "origin": origin["states"],
                                "loader": id(getattr(it, "_flor_loader", None))}  # made a path below
        return self.obj(it._index_sampler, f"{path}._index_sampler", depth + 1)  # its generators


def _scope_items(frame: types.FrameType) -> tuple[dict, set[str]]:
    """Names bound in the frame (locals first), and which of them are module globals."""
    glb = frame.f_globals
    loc = frame.f_locals
    if loc is glb:
        return dict(glb), set(glb)
    out = dict(glb)
    out.update(loc)
    return out, set(glb) - set(loc)


#: what IPython binds in a kernel's namespace (its history, outputs, shell): no cell's
#: state, and a replayed script never has them (reading one refuses the run's replay)
_IPYTHON_NAMES = frozenset({"In", "Out", "_ih", "_oh", "_dh", "_i", "_ii", "_iii", "_", "exit", "quit", "get_ipython"})


def _ipython_name(name: str) -> bool:
    return name in _IPYTHON_NAMES or (name[:1] == "_" and name.lstrip("_i").isdigit())


def capture_scope(frame: types.FrameType, protected: Iterable[Any]) -> dict:
    """What the outer loop's scope carries (training thread; cheap copies only)."""
    names, globals_ = _scope_items(frame)
    if "get_ipython" in names:  # a kernel's cells: leave IPython's own names out
        names = {k: v for k, v in names.items() if not _ipython_name(k)}
    walk = _Walk(protected)
    values: dict[str, Any] = {}
    captured: list[str] = []
    missing: dict[str, str] = {}
    for name, v in names.items():
        if name.startswith("__") or id(v) in walk.protected or isinstance(v, _STATIC):
            continue
        try:
            e = _encode(v, [CARRIED_MAX_ELEMENTS])
        except _TooBig:
            e, why = None, f"too large to capture (over {CARRIED_MAX_ELEMENTS} elements)"
        else:
            why = None if e is not None else walk.obj(v, name, 1)
        if e is not None:
            values[name] = e
            captured.append(name)
        elif why is None:
            captured.append(name)
        elif len(missing) < CARRIED_MAX_REASONS:
            missing[name] = why
    for entry in walk.iterators.values():
        # the loader by its path: a replay's iterator made before flor_ray's first call was never hooked
        entry["loader"] = walk.seen.get(entry["loader"])
    return {"values": values, "attrs": walk.attrs, "generators": walk.generators, "iterators": walk.iterators,
            "globals": sorted(n for n in captured if n in globals_), "captured": sorted(captured),
            "missing": missing}


# ------------------------------------------------------------------- restore
def _write_frame(frame: types.FrameType, updates: Mapping[str, Any], globals_: set[str]) -> None:
    if not updates:
        return
    glb = frame.f_globals
    if frame.f_locals is glb:
        glb.update(updates)
        return
    local = {k: v for k, v in updates.items() if k not in globals_}
    glb.update({k: v for k, v in updates.items() if k in globals_})
    if not local:
        return
    if sys.version_info >= (3, 13):  # PEP 667: f_locals writes through
        for k, v in local.items():
            frame.f_locals[k] = v
        return
    import ctypes

    frame.f_locals.update(local)
    ctypes.pythonapi.PyFrame_LocalsToFast(ctypes.py_object(frame), ctypes.c_int(0))


def _lookup(frame: types.FrameType, path: str) -> Any:
    root, _, rest = path.partition(".")
    loc = frame.f_locals
    obj = loc[root] if root in loc else frame.f_globals.get(root)
    return _resolve(obj, rest) if rest and obj is not None else obj


def _set_attr(obj: Any, attr: str, value: Any) -> None:
    cur = getattr(obj, attr, None)
    if type(cur) is type(value) and not hasattr(value, "dim"):
        try:
            if cur == value:
                return  # equal already (a DataLoader refuses some attributes once made)
        except Exception:  # noqa: BLE001 - odd __eq__: set it
            pass
    try:
        setattr(obj, attr, value)
    except (AttributeError, ValueError, TypeError):
        vars(obj)[attr] = value


def _redraw(frame: types.FrameType, it: Any, entry: Mapping[str, Any], where: str, path: str) -> None:
    from ..errors import CheckpointError

    loader = getattr(it, "_flor_loader", None)
    if loader is None and entry.get("loader") and hasattr(it, "_next_index"):
        loader = _lookup(frame, entry["loader"])
    if loader is None:
        raise CheckpointError(
            f"checkpoint {where} holds the position of the DataLoader iterator {path}, but the replayed "
            f"script has {type(it).__name__} there; replay from iteration 0 (iterations=...) or re-record",
            path=where,
        )
    for rel, state in entry["origin"]:
        _resolve(loader, rel).set_state(state)
    type(it).__init__(it, loader)
    for _ in range(int(entry["yielded"])):
        it._next_index()  # the sampler's indices only: no sample is loaded
    it._num_yielded = int(entry["yielded"])


def restore_scope(frame: types.FrameType, scope: Mapping[str, Any], names: Iterable[str], where: str = "") -> None:
    """Write the captured loop-carried ``names`` back into the replay's outer scope;
    re-draw DataLoader iterators; set every captured generator's state."""
    wanted = set(names) & set(scope.get("captured", ()))
    _write_frame(frame, {n: _decode(e) for n, e in scope.get("values", {}).items() if n in wanted},
                 set(scope.get("globals", ())))
    for path, e in scope.get("attrs", {}).items():
        if path.split(".", 1)[0] in wanted:
            parent, _, attr = path.rpartition(".")
            obj = _lookup(frame, parent)
            if obj is not None:
                _set_attr(obj, attr, _decode(e))
    for path, entry in scope.get("iterators", {}).items():
        it = _lookup(frame, path)
        if it is not None or path.split(".", 1)[0] in wanted:
            _redraw(frame, it, entry, where, path)
    for path, state in scope.get("generators", {}).items():
        g = _lookup(frame, path)
        if g is not None and hasattr(g, "set_state"):
            g.set_state(state)

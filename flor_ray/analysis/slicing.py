"""Backward slices over the driver's units: reaching definitions, loop-carried values.

A backward slice from a log statement follows reaching definitions, including loop
back edges; a definition reached through the outer loop's back edge is a
*loop-carried* value. :class:`Slicing` is mixed into the analyzer, whose driver
units (``units``, ``defs``, ``outer``, ``ckpt_names`` ...) it reads.
"""

from __future__ import annotations

import builtins
import functools
from collections import defaultdict, deque
from dataclasses import dataclass, field

import libcst as cst

from .results import sorted_tuple
from .scan import iter_calls
from .units import Unit


@dataclass
class Slice:
    reads: set[str] = field(default_factory=set)
    carried: set[str] = field(default_factory=set)
    inner_hits: list[tuple[str, Unit]] = field(default_factory=list)
    grad_units: list[Unit] = field(default_factory=list)
    stale: list[tuple[str, Unit]] = field(default_factory=list)


class Slicing:
    """Regions of the driver (setup, outer body, inner loops) and slices over it."""

    def _regions(self) -> None:
        """Classify driver units: setup, outer body (inner or not), after."""
        outer = self.outer
        self.in_body: dict[int, bool] = {}
        self.inner: dict[int, bool] = {}
        self.plain: dict[int, bool] = {}
        spans: list[tuple[int, int]] = []
        for u in self.units:
            body = outer is not None and (outer.id, "loop") in u.chain
            self.in_body[u.pos] = body
            inner_loop = plain_loop = False
            if body:
                after = False
                for cid, br in u.chain:
                    if cid == outer.id:
                        after = True
                        continue
                    if after and br == "loop":
                        if self.drv.loops[cid].flor:
                            inner_loop = True
                        else:
                            plain_loop = True
            self.inner[u.pos] = body and (inner_loop or u.calls_loop)
            self.plain[u.pos] = body and plain_loop and not self.inner[u.pos]
        for loop in self.drv.loops.values():
            if outer is not None and loop.flor and loop.id != outer.id and self.in_body.get(loop.start, False):
                spans.append((loop.start, loop.end))
        for u in self.units:
            if self.in_body[u.pos] and u.calls_loop:
                spans.append((u.pos, u.pos))
        self.first_inner = min((s for s, _ in spans), default=None)
        self.last_inner = max((e for _, e in spans), default=None)

    def _before_restore(self, u: Unit) -> bool:
        """Outer-level code that skip mode runs before it restores the iteration's
        checkpoint (when the last inner loop exits, or at the iteration's end when
        there is none): it runs on state that nothing restored, and what training it
        does there (``optimizer.step(closure)``, one step of a step loop) starts from
        the wrong weights."""
        if not self.in_body[u.pos] or self.inner[u.pos]:
            return False
        return self.last_inner is None or u.pos < self.last_inner

    def _reaching(self, name: str, u: Unit) -> tuple[list[Unit], bool]:
        ds = self.defs.get(name, [])
        kill: Unit | None = None
        for d in ds:
            if d.pos < u.pos and name in d.strong and u.chain[: len(d.chain)] == d.chain:
                kill = d
        lo = kill.pos if kill is not None else -1
        reach = [d for d in ds if lo <= d.pos < u.pos]
        carried = False
        for cid, br in reversed(u.chain):
            if br != "loop":
                continue
            if kill is not None and (cid, "loop") in kill.chain:
                break
            back = [d for d in ds if d.pos >= u.pos and (cid, "loop") in d.chain]
            reach += back
            if self.outer is not None and cid == self.outer.id and back:
                carried = True
        return reach, carried

    def _relevant(self, name: str) -> bool:
        """Script variables: not modules, not builtins (unless the script rebinds them)."""
        if self.is_module(name):
            return False
        return name in self.defs or not hasattr(builtins, name)

    def _slice(self, seeds: list[tuple[Unit, frozenset[str]]], start_inner: bool) -> Slice:
        res = Slice()
        seen: set[int] = set()
        # Breadth first, so that the first inner-loop hit is the nearest one (the one a reason should name).
        work: deque[tuple[Unit, frozenset[str]]] = deque()

        def push(u: Unit, names: frozenset[str]) -> None:
            work.append((u, names))
            for g in u.guards:
                if g not in seen:
                    seen.add(g)
                    push(self.units[g], self.units[g].uses)

        for u, names in seeds:
            seen.add(u.pos)
            push(u, names)
        while work:
            u, names = work.popleft()
            if u.grad:
                res.grad_units.append(u)
            for n in sorted(names):
                if not self._relevant(n):
                    continue
                res.reads.add(n)
                ckpt = n in self.ckpt_names
                if ckpt and not start_inner and self._before_restore(u):
                    res.stale.append((n, u))
                defs, carried = self._reaching(n, u)
                if carried and not ckpt and n not in self.drv.outer_targets and n not in self._aliases_only:
                    res.carried.add(n)
                for d in defs:
                    if self.inner[d.pos]:
                        if ckpt and not start_inner:
                            continue  # restored by the checkpoint
                        if not ckpt:
                            res.inner_hits.append((n, d))
                    elif ckpt and not start_inner and not self.in_body[u.pos] and self._before_restore(d):
                        # read after the loop: the last iteration's checkpoint, restored after this
                        # outer-level code (a training step in a helper) ran, is what the loop leaves
                        continue
                    if d.pos not in seen:
                        seen.add(d.pos)
                        push(d, d.uses)
        return res

    @functools.cached_property
    def _checkpointed_aliases(self) -> frozenset[str]:
        """Parameters of the script's functions that every call passes a checkpointed
        object: ``def make_step(m, optimizer)`` called as ``make_step(model, opt)``.
        A closure made there that steps ``optimizer`` mutates ``opt`` itself, whose
        state the checkpoint restores; the parameter is no loop-carried value."""
        bound: dict[str, set[str | None]] = defaultdict(set)
        for fname, defs in self.callable.items():
            params = [[p.name.value for p in (*d.params.posonly_params, *d.params.params)] for d in defs]
            for node in iter_calls(self.module, fname):
                for k, a in enumerate(node.args):
                    where = a.keyword.value if a.keyword else (params[0][k] if params and k < len(params[0]) else None)
                    if where is not None:
                        bound[where].add(a.value.value if isinstance(a.value, cst.Name) else None)
        return frozenset(p for p, args in bound.items() if args and args <= self.ckpt_names)

    @functools.cached_property
    def _aliases_only(self) -> frozenset[str]:
        """Names that cannot be loop-carried values of the scope that runs the outer
        loop: parameters aliasing a checkpointed object that this scope never binds."""
        return self._checkpointed_aliases - frozenset().union(*(u.strong for u in self.units))

    def _loop_carried(self) -> tuple[str, ...]:
        out: set[str] = set()
        for u in self.units:
            if not self.in_body[u.pos]:
                continue
            for n in u.uses:
                if not self._relevant(n) or n in self.ckpt_names or n in self.drv.outer_targets \
                        or n in self._aliases_only:
                    continue
                if self._reaching(n, u)[1]:
                    out.add(n)
        return tuple(sorted(out))

    def _training_carried(self) -> tuple[str, ...]:
        """Loop-carried names that flow into checkpointed state (``lr`` through
        ``g["lr"] = lr``, a batch iterator through ``loss.backward()``)."""
        seeds = [(u, u.uses) for u in self.units if self.in_body[u.pos] and (u.strong | u.weak) & self.ckpt_names]
        return sorted_tuple(self._slice(seeds, True).carried) if seeds else ()

"""Needs: what a replay must execute to compute each logged name, and why.

Skip mode restores a checkpoint where the last inner loop exits (at the end of an
iteration without inner loops); outer-level code before that point runs on state
nothing restored, so a statement there that reads checkpointed or loop-carried
state re-executes the iteration from the checkpoint before it. Everything errs
towards re-execution. :class:`Needs` is mixed into the analyzer after
:class:`~flor_ray.analysis.slicing.Slicing`, whose slices it reads.
"""

from __future__ import annotations

import dataclasses

import libcst as cst

from .results import Need, carried_note, combine, sorted_tuple
from .units import Summary, Unit, Walker


class Needs:
    """The need of each log site: at a driver unit, or inside a script function."""

    def _where(self, d: Unit) -> str:
        if d.calls_loop:
            loops = sorted(c for c in d.all_callees if self.summaries.get(c, Summary()).has_loop)
            if not loops and self.loop_calls is not None:
                loops = sorted(c for c in d.ext_calls if self.loop_calls(c))
            return f"in a call of {loops[0] if loops else 'a function'}(), which runs an inner flor.loop"
        names = [self.drv.loops[c].name or "?" for c, br in d.chain if br == "loop" and self.drv.loops[c].flor and self.outer and c != self.outer.id]
        return f"inside the inner loop {names[-1]!r}" if names else "inside an inner loop"

    def _need_at(self, s: Unit, vuses: frozenset[str], name: str, line: int, label: str | None = None) -> Need:
        """The need of a log statement (or of a call that leads to one) at driver unit ``s``."""
        need = self._need_of_site(s, vuses, name, line, label)
        if self.outer is not None and self.in_body[s.pos]:
            need = dataclasses.replace(need, in_loop=True)
        return need

    def _need_of_site(self, s: Unit, vuses: frozenset[str], name: str, line: int, label: str | None) -> Need:
        what = label or f"{name!r} (line {line})"
        outer = self.outer
        if outer is None:
            res = self._slice([(s, vuses)], True)
            return Need("setup", f"{what}: the script has no flor.loop, so replay runs it once, start to end.", sorted_tuple(res.reads))
        oname = outer.name or "?"
        if not self.in_body[s.pos] and s.pos < outer.start:
            res = self._slice([(s, vuses)], False)
            return Need("setup", f"{what} is logged before the outer loop {oname!r}: replay only runs the script up to that loop.", sorted_tuple(res.reads))
        body = self.in_body[s.pos]
        if body and (self.inner[s.pos] or self.plain[s.pos]):
            res = self._slice([(s, vuses)], True)
            if self.inner[s.pos]:
                why = f"{what} is logged {self._where(s)}: that loop must re-execute."
            else:
                why = (
                    f"{what} is logged inside a plain (non-flor) loop nested in the outer loop {oname!r}; "
                    "flor_ray cannot tell it from a training loop, so it re-executes to be safe."
                )
            return Need("inner", why + carried_note(res.carried), sorted_tuple(res.reads), sorted_tuple(res.carried))
        res = self._slice([(s, vuses)], False)
        if res.inner_hits:
            n, d = res.inner_hits[0]
            verb = "written" if n in d.strong else "mutated"
            why = (
                f"{what} depends on {n!r}, which is {verb} {self._where(d)} (line {d.line}: {self.code(d.node)}); "
                "skipping that loop would give a wrong value, so the inner loops must re-execute."
            )
            full = self._slice([(s, vuses)], True)
            return Need("inner", why + carried_note(full.carried), sorted_tuple(full.reads), sorted_tuple(full.carried))
        if res.stale:
            n, d = res.stale[0]
            where = "between inner loops" if self.first_inner is not None and d.pos > self.first_inner else (
                "before the inner loops" if self.first_inner is not None else "in an iteration without inner loops")
            restores = ("when the last inner loop exits" if self.first_inner is not None
                        else "at the end of the iteration")
            why = (
                f"{what} reads the checkpointed {n!r} {where} (line {d.line}: {self.code(d.node)}); skip mode "
                f"restores the checkpoint only {restores}, so the iteration must re-execute from the checkpoint before it."
            )
            return Need("inner", why + carried_note(res.carried), sorted_tuple(res.reads), sorted_tuple(res.carried))
        if body and res.carried and self._before_restore(s):
            why = (
                f"{what} reads loop-carried {', '.join(sorted(res.carried))} before the point where skip mode "
                "restores the checkpoint, so the iteration must re-execute from the checkpoint before it."
            )
            return Need("inner", why + carried_note(res.carried), sorted_tuple(res.reads), sorted_tuple(res.carried))
        if res.grad_units:
            d = min(res.grad_units, key=lambda x: x.pos)
            why = (
                f"{what} reads gradients (line {d.line}: {self.code(d.node)}); checkpoints hold state_dicts, "
                "not gradients, so the inner loops must re-execute."
            )
            return Need("inner", why + carried_note(res.carried), sorted_tuple(res.reads), sorted_tuple(res.carried))
        if body:
            why = (
                f"{what} is computed at the level of the outer loop {oname!r} from values no inner loop writes: "
                "skip mode can restore each checkpoint and run only the outer-level code."
            )
            return Need("outer", why + carried_note(res.carried), sorted_tuple(res.reads), sorted_tuple(res.carried))
        why = (
            f"{what} is logged after the outer loop {oname!r} from values no inner loop writes: "
            "skip mode through the last iteration suffices."
        )
        return Need("after", why + carried_note(res.carried), sorted_tuple(res.reads), sorted_tuple(res.carried))

    def _need_in_function(self, fname: str, name: str, line: int, in_loop: bool, in_flor_loop: bool) -> Need:
        what = f"{name!r} (line {line}, in {fname}())"
        anchors = [u for u in self.units if fname in u.all_callees]
        if not anchors:
            return Need(
                "inner",
                f"{what}: flor_ray finds no call of {fname}() on the script's path (a method, a callback, or "
                "an indirect call), so it cannot bound what must run and re-executes the inner loops.",
            )
        parts: list[Need] = []
        for a in anchors:
            label = f"{what}, called at line {a.line}"
            need = self._need_at(a, a.uses, name, line, label=label)
            if need.kind in ("outer",) and (in_loop or in_flor_loop):
                need = Need(
                    "inner",
                    f"{label} is logged inside a loop of {fname}(), nested in the outer loop; "
                    "flor_ray re-executes to be safe." + carried_note(set(need.carried)),
                    need.reads,
                    need.carried,
                )
            parts.append(need)
        return combine(name, [(p, line) for p in parts], merge_reason=False)

    def _fwalk(self, fdef: cst.FunctionDef) -> Walker:
        """A function body's units under the final summaries (cached: several sites ask)."""
        walker = self._walks.get(id(fdef))
        if walker is None:
            walker = Walker(self, driver=False)
            walker.walk(walker._block(fdef.body), (), (), (), fdef.name.value, ())
            self._walks[id(fdef)] = walker
        return walker

    def _paths(self, fname: str, visiting: frozenset[str]) -> set[tuple[str, ...]]:
        """Loop paths at the call sites of ``fname``: driver units, then callers' callers."""
        out = {u.flor_path for u in self.units if fname in u.callees}
        if fname in visiting:
            return out
        for caller, defs in self.callable.items():
            if caller in self.drv.inlined:
                continue
            for fdef in defs:
                local = {u.flor_path for u in self._fwalk(fdef).units if fname in u.callees}
                if local:
                    for p in self._paths(caller, visiting | {fname}):
                        out |= {p + q for q in local}
        return out

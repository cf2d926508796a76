"""Propagation: decide where each new log statement goes, then splice.

For every ``flor.log`` call of today's file whose name the old file never logs:

1. the *unit* is the statement that holds it, widened to the outermost enclosing
   statement that is itself new (a whole new ``if step % 100 == 0:`` block, a whole
   new ``for g in opt.param_groups:`` loop), but never across a ``def`` or ``class``:
   a log inside a function the old version lacks would never run there (its call
   site is new too), so it cannot be placed with confidence and is refused;
2. its *anchor* is the nearest preceding sibling with a counterpart in the matching
   block of the target (it goes right after it, or right after the statement of
   that block that holds it when the old version nested it deeper, e.g. under
   ``if (step + 1) % k == 0:``), else the nearest following one (right before it),
   else the start of that block (always the start when it is first in its block
   today; a new ``else:`` branch of a matched if/for/while is created); when the
   enclosing block itself has no counterpart (code moved into ``def main()``, a
   step extracted into a function) the neighbours' counterparts decide alone; when the names do not fit
   there but do right after the predecessor's counterpart in another block (the old
   version had the step extracted into a function), it goes there;
3. every name it reads must be bound there in the target; a name (or a
   ``self.net``-style attribute) that the matching shows was only renamed is
   rewritten, an ambiguous or unknown one is refused; ``flor.log`` is re-spelled the
   target's way (``fr.log``, or ``log`` imported with ``from flor_ray import log``).

A statement whose log call wraps an expression (``x = flor.log("x", f())``) and
whose old version is the same statement without the wrapper replaces it in place.
All refusals are collected and raised together, each naming its log; with
``partial=True`` they come back in :attr:`PropagationResult.refused` instead and
the statements that could be placed are injected. ``names=`` restricts the
injected statements to those logging the given names: today's other new
statements are left out, and cannot make the call fail.
"""

from __future__ import annotations

import ast
import gc
from dataclasses import dataclass, field
from typing import Any, Iterable

from flor_ray.analysis.calls import FlorCalls, literal_first_arg
from flor_ray.errors import PropagationError

from . import _flow, _inject
from ._inject import Edits
from ._match import Matching
from ._naming import Naming
from ._result import AlreadyLogged, CannotPlace, Placed, PropagationResult, Refused, logs_text
from ._scope import Visibility, free_reads
from ._syntax import parse_ast, parse_cst
from ._tree import FUNCS, SNode, Tree, build, resolve_scope


@dataclass
class _Planned:
    names: tuple[str, ...]
    stmt: Any  # the libcst node spliced into the target
    owner: SNode  # target node whose suite receives it
    renames: dict[str, str] = field(default_factory=dict)  # as reported
    wrapped: bool = False


def propagate(source: str, target: str, names: Iterable[str] | None = None) -> str:
    """``target`` with the new log statements of ``source`` injected (see module doc)."""
    return propagate_detailed(source, target, names).code


def propagate_detailed(source: str, target: str, names: Iterable[str] | None = None, *,
                       partial: bool = False) -> PropagationResult:
    """Like :func:`propagate`, with where each statement went, renames and skipped names.

    ``names``: inject only the statements that log one of these names (None: every
    new one). ``partial``: a statement that cannot be placed is returned in
    ``refused`` (with the names it logs and why) instead of failing the call.
    """
    # Two ``ast`` trees and their labels are tens of thousands of small objects, none
    # of them in a reference cycle that outlives the call; the cyclic collector would
    # walk them again and again while they are built (about a quarter of the time on
    # 200-line files). It is paused for the call only, and restored as it was.
    paused = gc.isenabled()
    if paused:
        gc.disable()
    try:
        return _propagate(source, target, None if names is None else frozenset(names), partial)
    finally:
        if paused:
            gc.enable()


def _propagate(source: str, target: str, wanted: frozenset[str] | None, partial: bool) -> PropagationResult:
    src_ast = parse_ast(source, "source")
    tgt_ast = parse_ast(target, "target")
    src = build(src_ast, FlorCalls.of(src_ast), grouped=False)
    tgt = build(tgt_ast, FlorCalls.of(tgt_ast))
    old_names = {n for n in tgt.log_names if n is not None}
    already = tuple(AlreadyLogged(n) for n in dict.fromkeys(
        n for n in src.log_names if n is not None and n in old_names and (wanted is None or n in wanted)))
    if wanted is None:
        nothing_new = all(n is not None and n in old_names for n in src.log_names)
    else:  # a statement with a non-literal name cannot log a wanted name: not looked at
        nothing_new = not any(n in wanted and n not in old_names for n in src.log_names if n is not None)
    if nothing_new:
        return PropagationResult(code=target, outcomes=already)  # nothing new: byte-identical
    return _Planner(source, target, src, tgt, old_names, wanted, partial).run(already)


class _Planner:
    def __init__(self, source: str, target: str, src: Tree, tgt: Tree, old_names: set[str],
                 wanted: frozenset[str] | None = None, partial: bool = False):
        self.src, self.tgt = src, tgt
        self.target = target
        self.old_names = old_names
        self.wanted = wanted
        self.partial = partial
        self.lines = _inject.split_lines(source)
        self.matching = Matching(self.src, self.tgt)
        self.naming = Naming(self.src, self.tgt, self.matching, Visibility(self.tgt))
        self.edits = Edits()
        self.planned: list[_Planned] = []
        # source unit pre -> (target owner, suite key, position) where it was put
        self.slots: dict[int, tuple[SNode, str, int]] = {}
        self.failures: list[Refused] = []

    # ------------------------------------------------------------------ driver

    def run(self, already: tuple[AlreadyLogged, ...]) -> PropagationResult:
        units: dict[int, list[str]] = {}
        for node in self.src.nodes[1:]:
            if not node.has_log and not node.compound:
                continue
            try:
                self._classify(node, units)
            except CannotPlace as exc:
                names = [n for n in map(literal_first_arg, self._calls(node)) if self._is_new(n)]
                self.failures.append(Refused(tuple(dict.fromkeys(names)), str(exc)))  # type: ignore[arg-type]
        for pre in sorted(units):
            unit = self.src.nodes[pre]
            names = tuple(dict.fromkeys(units[pre]))
            try:
                self._place(unit, names)
            except CannotPlace as exc:
                self.failures.append(Refused(names, str(exc)))
        if self.failures and not self.partial:
            reasons = tuple(f.reason for f in self.failures)
            err = PropagationError("cannot propagate into the target version: " + "; ".join(reasons))
            err.failures = reasons  # type: ignore[attr-defined]
            raise err
        refused = tuple(self.failures)
        if not self.edits:
            return PropagationResult(code=self.target, outcomes=already + refused)
        return self._finish(already, refused)

    def _is_new(self, name: str | None) -> bool:
        """A name to inject: not logged by the target, and asked for."""
        return name is not None and name not in self.old_names and (self.wanted is None or name in self.wanted)

    def _calls(self, node: SNode) -> list[ast.Call]:
        syntax = self.src.syntax
        if not node.compound:
            parts: list[ast.AST] = list(node.stmts)
        else:  # only the header: the body's statements are nodes of their own
            head = node.first
            parts = [getattr(head, f) for f in ("test", "iter", "target") if hasattr(head, f)]
            parts += [i.context_expr for i in getattr(head, "items", ())]
        return [c for p in parts for c in ast.walk(p) if syntax.is_log_call(c)]  # type: ignore[misc]

    def _classify(self, node: SNode, units: dict[int, list[str]]) -> None:
        calls = self._calls(node)
        if not calls:
            return
        names = [literal_first_arg(c) for c in calls]
        new = [n for n in names if self._is_new(n)]
        counterpart = self.matching.target_of(node)
        exact = counterpart is not None and counterpart.alpha == node.alpha
        if exact and not node.compound:
            if new:
                self._wrap(node, counterpart, tuple(dict.fromkeys(new)))  # type: ignore[arg-type]
            return
        if None in names and self.wanted is None:
            call = calls[names.index(None)]
            arg = ast.get_source_segment("".join(self.lines), call.args[0]) if call.args else "?"
            raise CannotPlace(
                f"the flor.log call at source line {call.lineno} has a non-literal name ({arg}); "
                "propagation needs a string literal such as flor.log(\"loss\", ...)"
            )
        if not new:
            return
        if node.compound:
            raise CannotPlace(
                f"{logs_text(new)} at source line {node.first.lineno} sits in the header of a "
                f"`{node.kind.lower()}` statement; move it to a statement of its own"
            )
        units.setdefault(self._unit(node, new).pre, []).extend(new)

    def _unit(self, node: SNode, names: list[str]) -> SNode:
        """The outermost new statement around ``node`` (loops included, never a new def)."""
        unit = node
        while True:
            parent = unit.parent
            assert parent is not None
            if parent.parent is None or self.matching.target_of(parent) is not None:
                return unit
            if self.matching.matched_descendants(parent) > 0:
                return unit  # an existing block whose counterpart was not found: use neighbours
            if parent.is_def:
                what = "function" if isinstance(parent.first, FUNCS) else "class"
                raise CannotPlace(
                    f"{logs_text(names)} at source line {node.first.lineno} cannot be placed: its "
                    f"enclosing {what} `{_header(self.lines, parent)}` (source line "
                    f"{parent.first.lineno}) has no counterpart in the target version, so "
                    "nothing there would call it"
                )
            unit = parent

    # ------------------------------------------------------------------ placing

    def _place(self, unit: SNode, names: tuple[str, ...]) -> None:
        first_error: CannotPlace | None = None
        for slot in self._slots(unit, names):
            try:
                owner, key, position = slot
                kids = owner.suite(key) or []
                if owner.suite(key) is None:  # a new else branch runs after the whole body
                    after = owner.last
                else:
                    after = kids[position - 1].last if position > 0 else owner.pre
                    moved = self._by_data_flow(unit, names, owner, key, position)
                    if moved != position:
                        slot, position = (owner, key, moved), moved
                        after = kids[position - 1].last if position > 0 else owner.pre
                how = self.naming.renames(unit, names, owner, after, self._where(owner, kids, position))
            except CannotPlace as exc:
                first_error = first_error or exc
                continue
            stmt = _inject.rename(
                _inject.parse_unit(_inject.unit_text(self.lines, unit), names), how)
            self.edits.insert(owner, key, position, stmt)
            self.slots[unit.pre] = slot
            self.planned.append(_Planned(names, stmt, owner, how.reported()))
            return
        assert first_error is not None
        raise first_error

    def _slots(self, unit: SNode, names: tuple[str, ...]) -> list[tuple[SNode, str, int]]:
        """Where ``unit`` may go, best first (see the module docstring)."""
        parent = unit.parent
        assert parent is not None
        t_parent = self.matching.target_of(parent)
        siblings = parent.suite(unit.key) or []

        def in_block(t: SNode) -> bool:
            return t_parent is None or (t.parent is t_parent and t.key == unit.key)

        slot: tuple[SNode, str, int] | None = None
        nearest: tuple[SNode, str, int] | None = None  # the predecessor's counterpart, anywhere
        for sib in reversed(siblings[:unit.index]):
            t = self.matching.target_of(sib)
            if t is None:
                continue
            here = (t.parent, t.key, t.index + 1)
            nearest = nearest or here  # type: ignore[assignment]
            if in_block(t):
                slot = here  # type: ignore[assignment]
                break
            holder = _child_holding(t_parent, unit.key, t)
            if holder is not None:
                # the counterpart sits deeper in the matching block (the old version
                # wrapped it in ``if (step + 1) % k == 0:`` or ``with autocast():``):
                # stay at today's level, right after the statement that holds it
                slot = (t_parent, unit.key, holder.index + 1)  # type: ignore[assignment]
                break
        if slot is None and unit.index == 0 and t_parent is not None \
                and t_parent.suite(unit.key) is not None:
            # no predecessor at all: first in the block, even if the old block starts
            # with statements that today's lacks
            slot = (t_parent, unit.key, _first_position(t_parent, unit.key))
        if slot is None:
            for sib in siblings[unit.index + 1:]:
                t = self.matching.target_of(sib)
                if t is not None and in_block(t):
                    slot = (t.parent, t.key, t.index)  # type: ignore[assignment]
                    break
        if slot is None and t_parent is not None and t_parent.suite(unit.key) is not None:
            slot = (t_parent, unit.key, _first_position(t_parent, unit.key))
        if slot is None and t_parent is not None and unit.key == "orelse" \
                and t_parent.kind == parent.kind and isinstance(t_parent.first, _ELSE_OWNERS) \
                and t_parent.suite("orelse") is None:
            # a new ``else:`` branch of a matched if/for/while: the old version gets one
            slot = (t_parent, "orelse", 0)
        # The predecessor's counterpart in another block (the step extracted into a
        # function in the old version) is a fallback, used only if the names fit there.
        slots = [s for s in (slot, nearest) if s is not None]
        if not slots:
            if t_parent is not None:
                raise CannotPlace(
                    f"{logs_text(names)} at source line {unit.line} cannot be placed: the target's "
                    f"`{_header(self.lines, parent)}` has no `{unit.key}` block"
                )
            raise CannotPlace(
                f"{logs_text(names)} at source line {unit.line} cannot be placed: its enclosing "
                f"`{_header(self.lines, parent)}` (source line {parent.first.lineno}) has no "
                "counterpart in the target version, and neither have its neighbours"
            )
        return slots if len(slots) < 2 or slots[0] != slots[1] else slots[:1]

    def _by_data_flow(self, unit: SNode, names: tuple[str, ...], owner: SNode, key: str,
                      position: int) -> int:
        """The structural slot, moved within its block to where the inputs are final."""
        kids = owner.suite(key) or []
        reads = self._target_reads(unit)
        rng = _flow.position_range(kids, reads, self._sides(kids, unit, reads, position))
        if rng.empty:
            lines = sorted({kids[j].first.lineno for j, _ in rng.before + rng.after})
            inputs = sorted({n for _, n in rng.before + rng.after})
            raise CannotPlace(
                f"{logs_text(names)} at source line {unit.line} cannot be placed: the target changes "
                f"{', '.join(f'`{n}`' for n in inputs)} at lines {', '.join(map(str, lines))} in an "
                "order that today's version does not have, so no place there reads today's value; "
                "add it to that version by hand"
            )
        return rng.clamp(position)

    def _target_reads(self, unit: SNode) -> set[str]:
        """The names the unit reads, as the target spells them (every candidate of a rename)."""
        syntax = self.src.syntax
        at = unit.parent if unit.is_def else unit
        out: set[str] = set()
        for name in free_reads(unit.stmts):
            if name in syntax.modules or name in syntax.direct_map:
                continue
            scope = resolve_scope(name, at, self.matching.src_locals)  # type: ignore[arg-type]
            seen = self.matching.evidence.get((scope, name), {})
            out.update([name] if name in seen or not seen else seen)
        return out

    def _sides(self, kids: list[SNode], unit: SNode, reads: set[str], position: int) -> list[str | None]:
        """For each kid of the target block: does it run before or after ``unit`` today?"""
        matched = [self._side(kid, unit) for kid in kids]
        today = unit.parent.suite(unit.key) or []  # type: ignore[union-attr]
        src_reads = set(free_reads(unit.stmts))
        sides: list[str | None] = []
        for j, side in enumerate(matched):
            if side is None:
                prev = next((matched[k] for k in range(j - 1, -1, -1) if matched[k]), "before")
                nxt = next((matched[k] for k in range(j + 1, len(kids)) if matched[k]), "after")
                if prev == nxt:
                    side = prev
                else:  # between the neighbours' counterparts: what does today do there?
                    lo = max((i for i, s in enumerate(today[:unit.index]) if self._matched_in(s)), default=-1)
                    hi = min((i for i, s in enumerate(today) if i > unit.index and self._matched_in(s)),
                             default=len(today))
                    earlier = any(_flow.changed_names(s.stmts) & src_reads for s in today[lo + 1:unit.index])
                    later = any(_flow.changed_names(s.stmts) & src_reads for s in today[unit.index + 1:hi])
                    if earlier != later:
                        side = "before" if earlier else "after"
                    else:
                        side = "before" if j < position else "after"
            sides.append(side)
        return sides

    def _matched_in(self, node: SNode) -> bool:
        return any(n.pre in self.matching.s2t for n in self.src.nodes[node.pre:node.last + 1])

    def _side(self, kid: SNode, unit: SNode) -> str | None:
        """Whether ``kid``'s counterpart runs before or after ``unit`` in today's block."""
        matched = [self.matching.t2s.get(kid.pre)]
        if matched[0] is None:  # an unmatched wrapper (``with no_grad():``) of matched code
            matched = [self.matching.t2s.get(n.pre) for n in self.tgt.nodes[kid.pre + 1:kid.last + 1]]
        sides = set()
        for s in matched:
            while s is not None and not (s.parent is unit.parent and s.key == unit.key):
                s = s.parent
            if s is not None:
                sides.add("before" if s.index < unit.index else "after")
        return sides.pop() if len(sides) == 1 else None

    def _wrap(self, node: SNode, t: SNode, names: tuple[str, ...]) -> None:
        """The old statement, wrapped in today's log call(s)."""
        where = f"line {t.first.lineno}"
        how = self.naming.spelling(node, t.parent, t.pre - 1, names, where)  # type: ignore[arg-type]
        how.names.update({a: b for a, b in zip(node.names, t.names) if a != b})
        how.attrs.update({(ba, aa): ab for (ba, aa), (_, ab) in zip(node.attrs, t.attrs) if aa != ab})
        stmt = _inject.rename(
            _inject.parse_unit(_inject.unit_text(self.lines, node), names), how)
        self.edits.replaces[t.pre] = stmt
        self.planned.append(_Planned(names, stmt, t.parent, how.reported(), wrapped=True))  # type: ignore[arg-type]

    def _where(self, owner: SNode, kids: list[SNode], position: int) -> str:
        if owner.parent is not None and not kids:
            return f"in a new else branch of the block at line {owner.first.lineno}"
        if position > 0:
            return f"after line {kids[position - 1].first.end_lineno}"
        if owner.parent is None:
            return "at the top of the file"
        return f"at the start of the block at line {owner.first.lineno}"

    # ------------------------------------------------------------------ output

    def _finish(self, already: tuple[AlreadyLogged, ...], refused: tuple[Refused, ...]) -> PropagationResult:
        spliced = _inject.splice(self.target, self.tgt.nodes, self.edits)
        if spliced is not None:
            code, lines = spliced
        else:  # a one-line suite grows into a block, an elif gets a sibling: libcst
            module_cst = parse_cst(self.target, "target")
            ctree = build(ast.parse(self.target), self.tgt.syntax, module_cst, light=True)
            module, made = _inject.apply(ctree.root, ctree.nodes, self.edits)
            code = module.code
            by_id = _lines_of(code, module, self.tgt.syntax, {id(n) for n in made.values()} | {
                id(p.stmt) for p in self.planned})
            lines = {id(p.stmt): by_id[id(made.get(id(p.stmt), p.stmt))] for p in self.planned}
        placements = []
        renames: dict[str, str] = {}
        for p in self.planned:
            chain = [p.owner] + p.owner.ancestors()
            loops = tuple(
                name for n in reversed(chain)
                if n.parent is not None and isinstance(n.first, (ast.For, ast.AsyncFor))
                and (name := self.tgt.syntax.loop_name(n.first.iter)) is not None  # type: ignore[attr-defined]
            )
            func = next((n.first.name for n in chain  # type: ignore[attr-defined]
                         if n.parent is not None and isinstance(n.first, FUNCS)), None)
            for a, b in p.renames.items():
                renames.setdefault(a, b)
            placements.append(Placed(
                names=p.names,
                statement=_inject.statement_code(p.stmt),
                line=lines[id(p.stmt)],
                loops=loops,
                function=func,
                renames=tuple(p.renames.items()),
                wrapped=p.wrapped,
            ))
        placements.sort(key=lambda p: p.line)
        return PropagationResult(code=code, outcomes=already + tuple(placements) + refused,
                                 renames=tuple(renames.items()))


_ELSE_OWNERS = (ast.If, ast.For, ast.AsyncFor, ast.While)


def _child_holding(owner: SNode | None, key: str, node: SNode) -> SNode | None:
    """The statement of ``owner``'s ``key`` block that contains ``node``, if any.

    Never a ``def``/``class``: code after a definition runs before its body does.
    """
    if owner is None:
        return None
    for a in node.ancestors()[:-1]:
        if a.parent is owner and a.key == key:
            return None if a.is_def else a
    return None


def _first_position(owner: SNode, key: str) -> int:
    """Index of the first statement of a block, past a docstring and future imports."""
    kids = owner.suite(key) or []
    i = 0
    while i < len(kids):
        head = kids[i].first
        docstring = (i == 0 and key == "body" and isinstance(head, ast.Expr)
                     and isinstance(head.value, ast.Constant) and isinstance(head.value.value, str))
        future = owner.parent is None and isinstance(head, ast.ImportFrom) and head.module == "__future__"
        if not (docstring or future):
            break
        i += 1
    return i


def _lines_of(code: str, module: Any, syntax: FlorCalls, wanted: set[int]) -> dict[int, int]:
    """1-based line of each wanted libcst statement in the rendered code."""
    tree: Tree = build(ast.parse(code), syntax, module, light=True)
    return {id(n.cst): n.line for n in tree.nodes[1:] if id(n.cst) in wanted}


def _header(lines: list[str], node: SNode) -> str:
    text = lines[node.first.lineno - 1].strip()
    return text[:-1] if text.endswith(":") else text

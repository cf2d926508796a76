"""Propagation: decide where each new log statement goes, then splice.

For every ``flor.log`` call of today's file whose name the old file never logs:

1. the *unit* is the statement that holds it, widened to the outermost enclosing
   block that is itself new (a whole new ``if step % 100 == 0:`` block), but never
   across a function or loop: a log inside a function or ``for`` that the old
   version lacks cannot be placed with confidence and is refused;
2. its *anchor* is the nearest preceding sibling with a counterpart in the matching
   block of the target (it goes right after it), else the nearest following one
   (right before it), else the start of that block; when the enclosing block itself
   has no counterpart (code moved into ``def main()``, a step extracted into a
   function) the neighbours' counterparts decide alone; when the names do not fit
   there but do right after the predecessor's counterpart in another block (the old
   version had the step extracted into a function), it goes there;
3. every name it reads must be bound there in the target; a name that the matching
   shows was only renamed is rewritten, an ambiguous or unknown one is refused.

A statement whose log call wraps an expression (``x = flor.log("x", f())``) and
whose old version is the same statement without the wrapper replaces it in place.
All refusals are collected and raised together, each naming its log.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from typing import Any

from flor_ray.errors import PropagationError

from . import _inject
from ._inject import Edits
from ._match import Matching
from ._result import Placement, PropagationResult
from ._scope import Visibility, free_reads
from ._syntax import LogSyntax, literal_first_arg, parse_ast, parse_cst
from ._tree import FUNCS, SNode, Tree, build, resolve_scope


class _Refused(Exception):
    """One statement that cannot be placed (collected, then raised together)."""


@dataclass
class _Planned:
    names: tuple[str, ...]
    stmt: Any  # the libcst node spliced into the target
    owner: SNode  # target node whose suite receives it
    renames: dict[str, str] = field(default_factory=dict)
    wrapped: bool = False


def propagate(source: str, target: str) -> str:
    """``target`` with the new log statements of ``source`` injected (see module doc)."""
    return propagate_detailed(source, target).code


def propagate_detailed(source: str, target: str) -> PropagationResult:
    """Like :func:`propagate`, with where each statement went, renames and skipped names."""
    src_ast = parse_ast(source, "source")
    tgt_ast = parse_ast(target, "target")
    src_syntax, tgt_syntax = LogSyntax.of(src_ast), LogSyntax.of(tgt_ast)
    old_names = {
        name for node in ast.walk(tgt_ast)
        if tgt_syntax.is_log_call(node) and (name := literal_first_arg(node)) is not None  # type: ignore[arg-type]
    }
    src_calls = sorted((n for n in ast.walk(src_ast) if src_syntax.is_log_call(n)),
                       key=lambda c: (c.lineno, c.col_offset))
    src_names = [literal_first_arg(c) for c in src_calls]  # type: ignore[arg-type]
    skipped = tuple(dict.fromkeys(n for n in src_names if n is not None and n in old_names))
    if all(n is not None and n in old_names for n in src_names):
        return PropagationResult(code=target, skipped=skipped)  # nothing new: byte-identical

    tgt_cst = parse_cst(target, "target")
    planner = _Planner(source, src_ast, src_syntax, tgt_ast, tgt_syntax, tgt_cst, old_names)
    return planner.run(skipped)


class _Planner:
    def __init__(self, source: str, src_ast: ast.Module, src_syntax: LogSyntax,
                 tgt_ast: ast.Module, tgt_syntax: LogSyntax, tgt_cst: Any, old_names: set[str]):
        self.src = build(src_ast, src_syntax)
        self.tgt = build(tgt_ast, tgt_syntax, tgt_cst)
        self.old_names = old_names
        self.lines = source.splitlines(keepends=True)
        self.matching = Matching(self.src, self.tgt)
        self.visibility = Visibility(self.tgt)
        self.edits = Edits()
        self.planned: list[_Planned] = []
        # source unit pre -> (target owner, suite key, position) where it was put
        self.slots: dict[int, tuple[SNode, str, int]] = {}
        self.failures: list[str] = []

    # ------------------------------------------------------------------ driver

    def run(self, skipped: tuple[str, ...]) -> PropagationResult:
        units: dict[int, list[str]] = {}
        for node in self.src.nodes[1:]:
            if not node.has_log and not node.compound:
                continue
            try:
                self._classify(node, units)
            except _Refused as exc:
                self.failures.append(str(exc))
        for pre in sorted(units):
            unit = self.src.nodes[pre]
            try:
                self._place(unit, tuple(dict.fromkeys(units[pre])))
            except _Refused as exc:
                self.failures.append(str(exc))
        if self.failures:
            err = PropagationError(
                "cannot propagate into the target version: " + "; ".join(self.failures)
            )
            err.failures = tuple(self.failures)  # type: ignore[attr-defined]
            raise err
        if not self.edits:
            return PropagationResult(code=self.tgt.root.cst.code, skipped=skipped)
        return self._finish(skipped)

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
        new = [n for n in names if n is not None and n not in self.old_names]
        counterpart = self.matching.target_of(node)
        exact = counterpart is not None and counterpart.alpha == node.alpha
        if exact and not node.compound:
            if new:
                self._wrap(node, counterpart, tuple(dict.fromkeys(new)))  # type: ignore[arg-type]
            return
        if None in names:
            call = calls[names.index(None)]
            arg = ast.get_source_segment("".join(self.lines), call.args[0]) if call.args else "?"
            raise _Refused(
                f"the flor.log call at source line {call.lineno} has a non-literal name ({arg}); "
                "propagation needs a string literal such as flor.log(\"loss\", ...)"
            )
        if not new:
            return
        if node.compound:
            raise _Refused(
                f"{_logs(new)} at source line {node.first.lineno} sits in the header of a "
                f"`{node.kind.lower()}` statement; move it to a statement of its own"
            )
        units.setdefault(self._unit(node, new).pre, []).extend(new)

    def _unit(self, node: SNode, names: list[str]) -> SNode:
        """The outermost new statement around ``node`` (never a new def or loop)."""
        unit = node
        while True:
            parent = unit.parent
            assert parent is not None
            if parent.parent is None or self.matching.target_of(parent) is not None:
                return unit
            if self.matching.matched_descendants(parent) > 0:
                return unit  # an existing block whose counterpart was not found: use neighbours
            if parent.is_def or parent.is_loop:
                what = "function" if parent.is_def else "loop"
                raise _Refused(
                    f"{_logs(names)} at source line {node.first.lineno} cannot be placed: its "
                    f"enclosing {what} `{_header(self.lines, parent)}` (source line "
                    f"{parent.first.lineno}) has no counterpart in the target version"
                )
            unit = parent

    # ------------------------------------------------------------------ placing

    def _place(self, unit: SNode, names: tuple[str, ...]) -> None:
        first_error: _Refused | None = None
        for slot in self._slots(unit, names):
            try:
                owner, key, position = slot
                kids = owner.suite(key) or []
                after = kids[position - 1].last if position > 0 else owner.pre
                mapping = self._renames(unit, names, owner, after, self._where(owner, kids, position))
            except _Refused as exc:
                first_error = first_error or exc
                continue
            stmt = _inject.rename(
                _inject.parse_unit(_inject.unit_text(self.lines, unit), names), mapping)
            self.edits.insert(owner, key, position, stmt)
            self.slots[unit.pre] = slot
            self.planned.append(_Planned(names, stmt, owner, mapping))
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
            if sib.pre in self.slots:
                slot = self.slots[sib.pre]
                break
            t = self.matching.target_of(sib)
            if t is None:
                continue
            here = (t.parent, t.key, t.index + 1)
            nearest = nearest or here  # type: ignore[assignment]
            if in_block(t):
                slot = here  # type: ignore[assignment]
                break
        if slot is None:
            for sib in siblings[unit.index + 1:]:
                t = self.matching.target_of(sib)
                if t is not None and in_block(t):
                    slot = (t.parent, t.key, t.index)  # type: ignore[assignment]
                    break
        if slot is None and t_parent is not None and t_parent.suite(unit.key) is not None:
            slot = (t_parent, unit.key, _first_position(t_parent, unit.key))
        # The predecessor's counterpart in another block (the step extracted into a
        # function in the old version) is a fallback, used only if the names fit there.
        slots = [s for s in (slot, nearest) if s is not None]
        if not slots:
            if t_parent is not None:
                raise _Refused(
                    f"{_logs(names)} at source line {unit.line} cannot be placed: the target's "
                    f"`{_header(self.lines, parent)}` has no `{unit.key}` block"
                )
            raise _Refused(
                f"{_logs(names)} at source line {unit.line} cannot be placed: its enclosing "
                f"`{_header(self.lines, parent)}` (source line {parent.first.lineno}) has no "
                "counterpart in the target version, and neither have its neighbours"
            )
        return slots if len(slots) < 2 or slots[0] != slots[1] else slots[:1]

    def _wrap(self, node: SNode, t: SNode, names: tuple[str, ...]) -> None:
        """The old statement, wrapped in today's log call(s)."""
        mapping = {a: b for a, b in zip(node.names, t.names) if a != b}
        where = f"line {t.first.lineno}"
        src_alias = self._flor_alias_renames(node, t.parent, t.pre - 1, names, where)  # type: ignore[arg-type]
        mapping.update(src_alias)
        stmt = _inject.rename(
            _inject.parse_unit(_inject.unit_text(self.lines, node), names), mapping)
        new = _inject.replacement(t.cst, stmt)
        self.edits.replaces[t.pre] = new
        self.planned.append(_Planned(names, new, t.parent, mapping, wrapped=True))  # type: ignore[arg-type]

    def _where(self, owner: SNode, kids: list[SNode], position: int) -> str:
        if position > 0:
            return f"after line {kids[position - 1].first.end_lineno}"
        if owner.parent is None:
            return "at the top of the file"
        return f"at the start of the block at line {owner.first.lineno}"

    # ------------------------------------------------------------------ names

    def _flor_alias_renames(self, unit: SNode, owner: SNode, after: int,
                            names: tuple[str, ...], where: str) -> dict[str, str]:
        visible = self.visibility.names_at(owner, after)
        out: dict[str, str] = {}
        for name in free_reads(unit.stmts):
            if name in visible or name not in self.src.syntax.modules:
                continue
            alias = sorted(a for a in self.tgt.syntax.modules if a in visible)
            if not alias:
                raise _Refused(
                    f"{_logs(names)} cannot be placed {where} of the target: the target does "
                    f"not import flor_ray as a module there (add `import flor_ray as {name}`)"
                )
            out[name] = alias[0]
        return out

    def _renames(self, unit: SNode, names: tuple[str, ...], owner: SNode, after: int,
                 where: str) -> dict[str, str]:
        visible = self.visibility.names_at(owner, after)
        mapping = self._flor_alias_renames(unit, owner, after, names, where)
        src_locals = self.matching.src_locals
        at = unit.parent if unit.is_def else unit
        for name in free_reads(unit.stmts):
            if name in visible or name in mapping:
                continue
            scope = resolve_scope(name, at, src_locals)  # type: ignore[arg-type]
            seen = self.matching.evidence.get((scope, name), {})
            cands = sorted(m for m in seen if m != name)
            if name in seen or not cands:
                raise _Refused(
                    f"{_logs(names)} at source line {unit.line} cannot be placed {where} of the "
                    f"target: it reads `{name}`, which is not defined in the target at that point"
                )
            if len(cands) > 1:
                raise _Refused(
                    f"{_logs(names)} at source line {unit.line} cannot be placed: it reads "
                    f"`{name}`, which corresponds to several names in the target "
                    f"({', '.join(cands)}); the rename is ambiguous"
                )
            old = cands[0]
            rivals = sorted(
                other for (sc, other), seen2 in self.matching.evidence.items()
                if sc == scope and other != name and old in seen2
            )
            if rivals:
                raise _Refused(
                    f"{_logs(names)} at source line {unit.line} cannot be placed: it reads "
                    f"`{name}`, which looks renamed to `{old}`, but `{old}` also stands for "
                    f"{', '.join(f'`{r}`' for r in rivals)}; the rename is ambiguous"
                )
            if old not in visible:
                raise _Refused(
                    f"{_logs(names)} at source line {unit.line} cannot be placed {where} of the "
                    f"target: it reads `{name}` (called `{old}` there), which is not defined "
                    "at that point"
                )
            mapping[name] = old
        return mapping

    # ------------------------------------------------------------------ output

    def _finish(self, skipped: tuple[str, ...]) -> PropagationResult:
        module = _inject.apply(self.tgt.root, self.tgt.nodes, self.edits)
        code = module.code
        lines = _lines_of(code, module, self.tgt.syntax, {id(p.stmt) for p in self.planned})
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
            placements.append(Placement(
                names=p.names,
                statement=_inject.statement_code(p.stmt),
                line=lines[id(p.stmt)],
                loops=loops,
                function=func,
                renames=tuple(p.renames.items()),
                wrapped=p.wrapped,
            ))
        placements.sort(key=lambda p: p.line)
        return PropagationResult(code=code, placements=tuple(placements),
                                 renames=tuple(renames.items()), skipped=skipped)


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


def _lines_of(code: str, module: Any, syntax: LogSyntax, wanted: set[int]) -> dict[int, int]:
    """1-based line of each wanted libcst statement in the rendered code."""
    tree: Tree = build(ast.parse(code), syntax, module, light=True)
    return {id(n.cst): n.line for n in tree.nodes[1:] if id(n.cst) in wanted}


def _logs(names: "list[str] | tuple[str, ...]") -> str:
    return ", ".join(f"flor.log({n!r})" for n in names)


def _header(lines: list[str], node: SNode) -> str:
    text = lines[node.first.lineno - 1].strip()
    return text[:-1] if text.endswith(":") else text

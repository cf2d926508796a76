"""Placement by data flow: where, in a block of the target, the inputs of a new
statement hold what they hold at the statement today.

Structure matching proposes a slot (right after the counterpart of the statement's
textual predecessor). That slot is only right if no statement of the target's block
that changes one of the inputs runs on the wrong side of it: today's
``eval_loss /= len(loader.dataset); flor.log("eval_loss", eval_loss)`` placed right
after the old version's ``hits = 0`` would log the initial 0 every epoch, because the
old loop that accumulates ``eval_loss`` and its differently spelled division come
later. So each statement of the block that binds or mutates an input is put on one
side of the new statement:

* a statement matched to today's code is on the side its counterpart is on;
* an unmatched one between two matched statements on the same side is on that side;
* an unmatched one between the counterparts of today's neighbours before and after
  the new statement is a rewritten version of today's change between them: before
  the statement if today changes the input between the earlier neighbour and the
  statement (today's ``val_loss = run_epoch(...)`` is the old ``val_loss =
  evaluate(...)``), after it if today changes it between the statement and the later
  neighbour; a change that today's code does not make there at all (an old
  ``loss = 0`` reset) stays on the side of the structural slot, so the statement
  keeps reading what the old code computed.

The statement then goes after every changer on the *before* side and before every
changer on the *after* side; the structural slot is kept when it already lies in
that range. When no position satisfies both (the sides interleave), the place is
ambiguous and the statement is refused, naming the lines. A statement's place is
decided by its own inputs alone, never by other statements propagated with it.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass

from ._tree import SNode

# Methods that change their receiver in place: containers and torch's ``*_`` methods
# (``total.add_(x)``). Other calls are assumed to leave the receiver's value alone;
# a statement reading a value such a call changes is still placed by the others.
_MUTATORS = frozenset({
    "append", "extend", "insert", "pop", "remove", "clear", "update", "setdefault",
    "add", "discard", "popitem", "sort", "reverse",
})
_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)


def changed_names(stmts: tuple[ast.stmt, ...]) -> frozenset[str]:
    """Names that ``stmts`` (with their nested blocks, not nested defs) bind or mutate."""
    out: set[str] = set()
    todo: list[ast.AST] = list(stmts)
    while todo:
        node = todo.pop()
        if isinstance(node, _SCOPES):  # its body runs later, when called
            if not isinstance(node, ast.Lambda):
                out.add(node.name)
            continue
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            out.add(node.id)
        elif isinstance(node, (ast.Attribute, ast.Subscript)) and isinstance(node.ctx, (ast.Store, ast.Del)):
            root = _root(node)
            if root is not None:
                out.add(root)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            attr = node.func.attr
            if attr in _MUTATORS or (attr.endswith("_") and not attr.startswith("_")):
                root = _root(node.func.value)
                if root is not None:
                    out.add(root)
        todo.extend(ast.iter_child_nodes(node))
    return frozenset(out)


def _root(node: ast.AST) -> str | None:
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


@dataclass(frozen=True)
class Range:
    """Positions ``lo..hi`` (inclusive) of a block where a statement may be inserted."""

    lo: int
    hi: int
    before: tuple[tuple[int, str], ...]  # (block index, input) of changers that must run first
    after: tuple[tuple[int, str], ...]  # changers that must run after

    def clamp(self, position: int) -> int:
        return min(max(position, self.lo), self.hi)

    @property
    def empty(self) -> bool:
        return self.lo > self.hi


def position_range(kids: list[SNode], reads: set[str], sides: list[str | None]) -> Range:
    """Where in ``kids`` a statement reading ``reads`` may go, given each kid's side."""
    before: list[tuple[int, str]] = []
    after: list[tuple[int, str]] = []
    for j, kid in enumerate(kids):
        for name in sorted(changed_names(kid.stmts) & reads):
            (before if sides[j] == "before" else after).append((j, name))
    lo = max((j + 1 for j, _ in before), default=0)
    hi = min((j for j, _ in after), default=len(kids))
    return Range(lo, hi, tuple(before), tuple(after))

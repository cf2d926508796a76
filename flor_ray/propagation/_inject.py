"""Cutting a statement out of today's file and splicing it into the old one.

The unit is cut from the source *text* (its lines, the comments right above it
and its trailing comment), dedented, and parsed alone with libcst; its nested
blocks then take the target's indentation when rendered, which is how a 4-space
statement lands correctly in a 2-space file. The target is never re-rendered from
scratch: only the blocks that receive a statement are rebuilt, with
``with_changes``, and every other node (comments and formatting included) is the
object libcst parsed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import libcst as cst

from flor_ray.errors import PropagationError

from ._tree import SNode, cst_block


@dataclass
class Edits:
    """Planned edits of the target, keyed by target node ``pre``."""

    # (owner pre, suite key) -> {position in the suite -> statements to insert there}
    inserts: dict[tuple[int, str], dict[int, list[Any]]] = field(default_factory=dict)
    replaces: dict[int, Any] = field(default_factory=dict)

    def insert(self, owner: SNode, key: str, position: int, stmt: Any) -> None:
        self.inserts.setdefault((owner.pre, key), {}).setdefault(position, []).append(stmt)

    def __bool__(self) -> bool:
        return bool(self.inserts or self.replaces)


# --------------------------------------------------------------------------- cutting


def _char_col(line: str, byte_col: int) -> int:
    return len(line.encode("utf-8")[:byte_col].decode("utf-8", errors="ignore"))


def unit_text(lines: list[str], node: SNode) -> str:
    """The source text of ``node``, dedented, with the comment lines right above it."""
    head = node.first
    start = node.line
    first = lines[start - 1]
    if start == head.lineno:
        col = _char_col(first, head.col_offset)
    else:  # decorated: start at the "@"
        col = len(first) - len(first.lstrip())
    end = max(s.end_lineno or s.lineno for s in node.stmts)
    indent = first[:col]
    out: list[str] = []
    if indent.strip() == "":
        above = start - 2
        while above >= 0 and lines[above].strip().startswith("#") and lines[above].startswith(indent) \
                and not lines[above][len(indent):len(indent) + 1].isspace():
            out.insert(0, lines[above][len(indent):])
            above -= 1
    out.append(first[col:])
    for line in lines[start:end]:
        out.append(line[len(indent):] if indent and line.startswith(indent) else line)
    text = "".join(out)
    return text if text.endswith("\n") else text + "\n"


def parse_unit(text: str, log_names: tuple[str, ...]) -> Any:
    try:
        stmt = cst.parse_statement(text)
    except cst.ParserSyntaxError as exc:  # pragma: no cover - dedent of odd multi-line strings
        raise PropagationError(
            f"cannot cut the statement logging {', '.join(map(repr, log_names))} out of the source "
            f"file ({exc.message}); put it on lines of its own and retry"
        ) from exc
    # keep comments written above it, drop blank lines
    leading = [ln for ln in stmt.leading_lines if ln.comment is not None]
    return stmt.with_changes(leading_lines=leading)


class _Rename(cst.CSTTransformer):
    """Renames identifiers, never attribute names, keywords or parameter names."""

    def __init__(self, mapping: dict[str, str]):
        super().__init__()
        self.mapping = mapping

    def leave_Name(self, original: cst.Name, updated: cst.Name) -> cst.Name:
        new = self.mapping.get(updated.value)
        return updated.with_changes(value=new) if new else updated

    def leave_Attribute(self, original: cst.Attribute, updated: cst.Attribute) -> cst.Attribute:
        return updated.with_changes(attr=original.attr)

    def leave_Arg(self, original: cst.Arg, updated: cst.Arg) -> cst.Arg:
        return updated.with_changes(keyword=original.keyword)

    def leave_Param(self, original: cst.Param, updated: cst.Param) -> cst.Param:
        return updated.with_changes(name=original.name)

    def leave_ImportAlias(self, original: cst.ImportAlias, updated: cst.ImportAlias) -> cst.ImportAlias:
        return original


def rename(stmt: Any, mapping: dict[str, str]) -> Any:
    return stmt.visit(_Rename(mapping)) if mapping else stmt


def statement_code(stmt: Any) -> str:
    return cst.Module(body=[stmt]).code.rstrip("\n")


# --------------------------------------------------------------------------- splicing


def apply(root: SNode, nodes: list[SNode], edits: Edits) -> cst.Module:
    """A new libcst module: the target with ``edits`` applied."""
    dirty: set[int] = set()
    for pre in [owner for owner, _ in edits.inserts] + list(edits.replaces):
        node: SNode | None = nodes[pre]
        while node is not None and node.pre not in dirty:
            dirty.add(node.pre)
            node = node.parent

    def rebuild(node: SNode) -> Any:
        if node.pre not in dirty:
            return node.cst
        if node.pre in edits.replaces:
            return edits.replaces[node.pre]
        changed: dict[str, list[Any]] = {}
        for key, kids in node.suites:
            new_kids = [rebuild(k) for k in kids]
            ins = edits.inserts.get((node.pre, key), {})
            if not ins and all(a is k.cst for a, k in zip(new_kids, kids)):
                continue
            merged: list[Any] = []
            for i in range(len(kids) + 1):
                merged.extend(ins.get(i, ()))
                if i < len(kids):
                    merged.append(new_kids[i])
            changed[key] = merged
        return _with_suites(node, changed)

    return rebuild(root)


def _as_line(stmt: Any) -> Any:
    if isinstance(stmt, cst.SimpleStatementSuite):
        return cst.SimpleStatementLine(body=stmt.body, trailing_whitespace=stmt.trailing_whitespace)
    return stmt


def _new_block(old: Any, stmts: list[Any]) -> Any:
    if isinstance(old, cst.IndentedBlock):
        return old.with_changes(body=stmts)
    # a one-line suite (``if x: y``) or an ``elif`` grows into an indented block
    return cst.IndentedBlock(body=[_as_line(s) for s in stmts])


def _with_suites(node: SNode, changed: dict[str, list[Any]]) -> Any:
    out = node.cst
    if node.parent is None:
        return out.with_changes(body=changed["body"]) if changed else out
    for key, stmts in changed.items():
        old = cst_block(out, key)
        block = _new_block(old, stmts) if not isinstance(old, cst.If) or len(stmts) > 1 else None
        if key == "body":
            out = out.with_changes(body=block)
        elif key == "orelse":
            if isinstance(out.orelse, cst.If) and len(stmts) == 1:  # the elif itself changed
                out = out.with_changes(orelse=stmts[0])
            elif isinstance(out.orelse, cst.If):  # a statement beside an elif: else: if ...
                out = out.with_changes(orelse=cst.Else(body=block))
            else:
                out = out.with_changes(orelse=out.orelse.with_changes(body=block))
        elif key == "finalbody":
            out = out.with_changes(finalbody=out.finalbody.with_changes(body=block))
        else:
            i = int(key[len("handler"):])
            handlers = list(out.handlers)
            handlers[i] = handlers[i].with_changes(body=block)
            out = out.with_changes(handlers=handlers)
    return out


def replacement(old: Any, new_line: Any) -> Any:
    """``new_line`` in place of ``old``, keeping old's comments above and beside it."""
    if isinstance(old, cst.SimpleStatementSuite):
        return old.with_changes(body=new_line.body)
    return new_line.with_changes(leading_lines=old.leading_lines,
                                 trailing_whitespace=old.trailing_whitespace)

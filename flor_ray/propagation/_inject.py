"""Cutting a statement out of today's file and splicing it into the old one.

The unit is cut from the source *text* (its lines, the comments right above it
and its trailing comment), dedented, and parsed alone with libcst; its nested
blocks then take the target's indentation when rendered, which is how a 4-space
statement lands correctly in a 2-space file. The target is never re-rendered: its
text is spliced line by line (:func:`splice`), so every byte of it that is not an
edit survives (comments and formatting included). Only the rare edits that change
the shape of a target block (a one-line ``if x: y`` growing into a block, a
statement beside an ``elif``, the top of the file) go through libcst
(:func:`apply`): the blocks that change are rebuilt with ``with_changes`` and every
other node is the object libcst parsed.
"""

from __future__ import annotations

import ast
import itertools
import re
from dataclasses import dataclass, field
from typing import Any

import libcst as cst

from flor_ray.errors import PropagationError

from ._tree import COMPOUND, SNode, cst_block


@dataclass
class Edits:
    """Planned edits of the target, keyed by target node ``pre``."""

    # (owner pre, suite key) -> {position in the suite -> statements to insert there}
    inserts: dict[tuple[int, str], dict[int, list[Any]]] = field(default_factory=dict)
    # target node pre -> today's statement (a ``SimpleStatementLine``) that replaces it
    replaces: dict[int, Any] = field(default_factory=dict)
    # target if/for/while pre -> statements of the ``else:`` branch it gets
    new_else: dict[int, list[Any]] = field(default_factory=dict)

    def insert(self, owner: SNode, key: str, position: int, stmt: Any) -> None:
        if owner.suite(key) is None:
            assert key == "orelse"
            self.new_else.setdefault(owner.pre, []).append(stmt)
            return
        self.inserts.setdefault((owner.pre, key), {}).setdefault(position, []).append(stmt)

    def __bool__(self) -> bool:
        return bool(self.inserts or self.replaces or self.new_else)


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
    body = [first[col:]]
    for line in lines[start:end]:
        body.append(line[len(indent):] if indent and line.startswith(indent) else line)
    last = node.stmts[-1]
    if not isinstance(last, COMPOUND) and last.end_col_offset is not None:
        # a statement that shares its line (``opt.step(); flor.log(...)``): cut it out,
        # keeping a trailing comment but not the statements after it
        tail_line = lines[(last.end_lineno or last.lineno) - 1]
        cut = _char_col(tail_line, last.end_col_offset)
        rest = tail_line[cut:]
        if rest.strip() and not rest.strip().startswith("#"):
            comment = rest[rest.index("#"):] if "#" in rest and _only_code_before_hash(rest) else ""
            drop = len(tail_line) - cut
            body[-1] = body[-1][:len(body[-1]) - drop] if drop else body[-1]
            body[-1] = body[-1].rstrip() + ("  " + comment.rstrip("\r\n") if comment else "") + "\n"
    out.extend(body)
    text = "".join(out)
    return text if text.endswith("\n") else text + "\n"


def _only_code_before_hash(rest: str) -> bool:
    """Whether the ``#`` in the rest of a line starts a comment (not inside a string)."""
    before = rest[:rest.index("#")]
    return before.count('"') % 2 == 0 and before.count("'") % 2 == 0


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


@dataclass
class Respelling:
    """How an injected statement is rewritten for the target.

    ``names``: identifiers renamed (today's name -> the old name); ``attrs``: attributes
    renamed, keyed by today's ``(base, attr)`` (``("self", "net")`` -> ``"model"``);
    ``to_name``: ``flor.log`` spelled as an imported name there (``(module, verb)`` ->
    local name); ``to_attr``: an imported ``log`` spelled through a module there
    (local name -> ``(module, verb)``).
    """

    names: dict[str, str] = field(default_factory=dict)
    attrs: dict[tuple[str, str], str] = field(default_factory=dict)
    to_name: dict[tuple[str, str], str] = field(default_factory=dict)
    to_attr: dict[str, tuple[str, str]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.names or self.attrs or self.to_name or self.to_attr)

    def reported(self) -> dict[str, str]:
        """What the result details say was renamed (flor spellings are not renames)."""
        out = dict(self.names)
        out.update({f"{b}.{a}": f"{self.names.get(b, b)}.{new}" for (b, a), new in self.attrs.items()})
        return out


class _Respell(cst.CSTTransformer):
    """Applies a :class:`Respelling`; never touches keywords, parameters or imports."""

    def __init__(self, how: Respelling):
        super().__init__()
        self.how = how
        self.skip: set[int] = set()  # Name nodes that are not identifiers being read

    def visit_Attribute(self, node: cst.Attribute) -> None:
        self.skip.add(id(node.attr))

    def visit_Arg(self, node: cst.Arg) -> None:
        if node.keyword is not None:
            self.skip.add(id(node.keyword))

    def visit_Param(self, node: cst.Param) -> None:
        self.skip.add(id(node.name))

    def visit_ImportAlias(self, node: cst.ImportAlias) -> bool:
        return False

    def leave_Name(self, original: cst.Name, updated: cst.Name) -> Any:
        if id(original) in self.skip:
            return updated
        spelled = self.how.to_attr.get(original.value)
        if spelled is not None:
            return cst.Attribute(value=cst.Name(spelled[0]), attr=cst.Name(spelled[1]))
        new = self.how.names.get(original.value)
        return updated.with_changes(value=new) if new else updated

    def leave_Attribute(self, original: cst.Attribute, updated: cst.Attribute) -> Any:
        if isinstance(original.value, cst.Name):
            key = (original.value.value, original.attr.value)
            local = self.how.to_name.get(key)
            if local is not None:
                return cst.Name(local)
            attr = self.how.attrs.get(key)
            if attr is not None:
                return updated.with_changes(attr=cst.Name(attr))
        return updated


def rename(stmt: Any, how: Respelling) -> Any:
    return stmt.visit(_Respell(how)) if how else stmt


def statement_code(stmt: Any) -> str:
    return cst.Module(body=[stmt]).code.rstrip("\n")


# --------------------------------------------------------------------------- splicing


def apply(root: SNode, nodes: list[SNode], edits: Edits) -> tuple[cst.Module, dict[int, Any]]:
    """A new libcst module: the target with ``edits`` applied (the slow, general path).

    Also returns, for each replaced statement, ``id(today's statement)`` -> the node
    that stands in the new module.
    """
    made: dict[int, Any] = {}
    dirty: set[int] = set()
    for pre in [owner for owner, _ in edits.inserts] + list(edits.replaces) + list(edits.new_else):
        node: SNode | None = nodes[pre]
        while node is not None and node.pre not in dirty:
            dirty.add(node.pre)
            node = node.parent

    def rebuild(node: SNode) -> Any:
        if node.pre not in dirty:
            return node.cst
        if node.pre in edits.replaces:
            stmt = edits.replaces[node.pre]
            made[id(stmt)] = replacement(node.cst, stmt)
            return made[id(stmt)]
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
        out = _with_suites(node, changed)
        if node.pre in edits.new_else:
            block = cst.IndentedBlock(body=[_as_line(s) for s in edits.new_else[node.pre]])
            out = out.with_changes(orelse=cst.Else(body=block))
        return out

    return rebuild(root), made


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


# --------------------------------------------------------------------------- text splicing
#
# Parsing a 200-line target with libcst and rendering it again is about two thirds
# of propagation time. Every edit but a few rare shapes is a set of whole lines put
# between two lines of the target (or one statement's text swapped for another), so
# the target text is spliced directly and libcst only renders the small injected
# statements. The rare shapes (a one-line suite ``if x: y`` that must grow into a
# block, a statement beside an ``elif``, the very top of the file) return ``None``
# and take :func:`apply`.

_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+$")


def split_lines(text: str) -> list[str]:
    """Lines with their endings, split the way Python's tokenizer counts them.

    ``str.splitlines`` also splits on form feeds and U+2028 inside strings and
    comments, which would put ``ast`` line numbers out of step.
    """
    return _LINE.findall(text)


def _ws(line: str) -> str:
    return line[:len(line) - len(line.lstrip(" \t"))]


def _blank_or_comment(line: str) -> bool:
    stripped = line.strip()
    return not stripped or stripped.startswith("#")


def detect_indent(lines: list[str], tree_nodes: list[SNode]) -> str:
    """The target's indentation unit (what libcst calls ``default_indent``)."""
    for node in tree_nodes[1:]:
        if not node.compound or not node.suites or not node.suites[0][1]:
            continue
        head = lines[node.first.lineno - 1]
        kid = node.suites[0][1][0]
        body = lines[kid.first.lineno - 1]
        if kid.first.lineno == node.first.lineno:
            continue
        outer, inner = _ws(head), _ws(body)
        if inner.startswith(outer) and len(inner) > len(outer):
            return inner[len(outer):]
    return "    "


def detect_newline(lines: list[str]) -> str:
    for line in lines:
        if line.endswith("\r\n"):
            return "\r\n"
        if line.endswith(("\n", "\r")):
            return line[-1]
    return "\n"


def _block_indent(lines: list[str], kids: list[SNode]) -> str | None:
    """The indentation of a block's statements; None for a one-line suite or an elif."""
    head = kids[0].first
    decos = getattr(head, "decorator_list", None)
    if decos:
        lineno, col = decos[0].lineno, decos[0].col_offset - 1  # the "@"
    else:
        lineno, col = head.lineno, head.col_offset
    line = lines[lineno - 1]
    prefix = line[:_char_col(line, col)]
    if prefix.strip():
        return None
    if isinstance(head, ast.If) and line[len(prefix):].startswith("elif"):
        return None
    return prefix


def _render(stmt: Any, indent: str, unit: str, newline: str) -> tuple[list[str], int]:
    """``stmt`` as target lines at ``indent``; and how many comment lines come first."""
    code = cst.Module(body=[stmt], default_indent=unit, default_newline=newline).code
    keep: set[int] = set()  # 1-based lines inside multi-line strings: left as they are
    if '"""' in code or "'''" in code or "\\" in code:
        for node in ast.walk(ast.parse(code)):
            if isinstance(node, (ast.Constant, ast.JoinedStr)) and node.end_lineno \
                    and node.end_lineno > node.lineno:
                keep.update(range(node.lineno + 1, node.end_lineno + 1))
    out = []
    for i, line in enumerate(split_lines(code), 1):
        out.append(line if i in keep or not line.strip() else indent + line)
    comments = sum(1 for ln in getattr(stmt, "leading_lines", ()) if ln.comment is not None)
    return out, comments


def splice(text: str, nodes: list[SNode], edits: Edits) -> tuple[str, dict[int, int]] | None:
    """The target text with ``edits`` applied, and the 1-based line of each new statement.

    Lines are keyed by ``id`` of the statement planned (inserted, or replacing one).
    ``None`` when an edit needs libcst's restructuring (see above).
    """
    lines = split_lines(text)
    chunks = _Chunks(lines, detect_indent(lines, nodes), detect_newline(lines))
    if not chunks.inserts(nodes, edits) or not chunks.new_elses(nodes, edits):
        return None
    swaps: dict[int, tuple[int, int, int, Any]] = {}  # first line -> (col, last line, end col, stmt)
    for pre, stmt in edits.replaces.items():
        node = nodes[pre]
        first, last = node.stmts[0], node.stmts[-1]
        swaps[first.lineno - 1] = (first.col_offset, (last.end_lineno or last.lineno) - 1,
                                   last.end_col_offset or 0, stmt)
    code, where = chunks.assemble(swaps)
    if text and not text.endswith(("\n", "\r")) and code.endswith(("\n", "\r")):
        code = code.rstrip("\r\n") if code.endswith(chunks.newline) else code
    return code, where


class _Chunks:
    """Rendered statements to put between the target's lines, keyed by boundary (the
    0-based index of the line a chunk goes before), each with its sort key."""

    def __init__(self, lines: list[str], unit: str, newline: str):
        self.lines, self.unit, self.newline = lines, unit, newline
        self.at: dict[int, list[tuple[tuple[float, int], Any, list[str], int]]] = {}
        self._seq = itertools.count()

    def add(self, idx: int, depth: float, stmt: Any, rendered: list[str], comments: int) -> None:
        self.at.setdefault(idx, []).append(((-depth, next(self._seq)), stmt, rendered, comments))

    def inserts(self, nodes: list[SNode], edits: Edits) -> bool:
        """The statements inserted into existing blocks; False for a shape left to libcst."""
        lines = self.lines
        for (owner_pre, key), by_pos in edits.inserts.items():
            owner = nodes[owner_pre]
            kids = owner.suite(key) or []
            if not kids:
                return False
            indent = _block_indent(lines, kids)
            if indent is None:
                return False
            for position, stmts in by_pos.items():
                if position > 0:
                    idx = max(s.end_lineno or s.lineno for s in kids[position - 1].stmts)
                    # comments indented deeper than this block close the block above (libcst's footer)
                    while idx < len(lines) and lines[idx].strip().startswith("#") \
                            and len(_ws(lines[idx])) > len(indent):
                        idx += 1
                elif owner.parent is None:
                    return False
                else:
                    idx = kids[0].line - 1
                    while idx > 0 and _blank_or_comment(lines[idx - 1]):
                        idx -= 1
                depth = len(owner.ancestors())
                for stmt in stmts:
                    self.add(idx, depth, stmt, *_render(stmt, indent, self.unit, self.newline))
        return True

    def new_elses(self, nodes: list[SNode], edits: Edits) -> bool:
        """The new ``else:`` branches; False for a shape left to libcst."""
        lines = self.lines
        for owner_pre, stmts in edits.new_else.items():
            owner = nodes[owner_pre]
            head = lines[owner.first.lineno - 1]
            col = _char_col(head, owner.first.col_offset)
            if head[:col].strip():
                return False
            outer = head[:col]
            idx = max(s.end_lineno or s.lineno for s in owner.stmts)
            while idx < len(lines) and lines[idx].strip().startswith("#") and len(_ws(lines[idx])) > len(outer):
                idx += 1
            body = _block_indent(lines, owner.suites[0][1])
            inner = body if body is not None else outer + self.unit
            # at the same boundary: the if's own body first, then its else, then what follows the if
            depth = len(owner.ancestors()) - 0.5
            for k, stmt in enumerate(stmts):
                rendered, comments = _render(stmt, inner, self.unit, self.newline)
                if k == 0:
                    rendered = [outer + "else:" + self.newline] + rendered
                    comments += 1
                self.add(idx, depth, stmt, rendered, comments)
        return True

    def assemble(self, swaps: dict[int, tuple[int, int, int, Any]]) -> tuple[str, dict[int, int]]:
        """The target's lines with the chunks between them and the swapped statements."""
        lines, newline, unit = self.lines, self.newline, self.unit
        out: list[str] = []
        where: dict[int, int] = {}
        i = 0
        while i <= len(lines):
            for _, stmt, rendered, comments in sorted(self.at.get(i, ()), key=lambda e: e[0]):
                if out and not out[-1].endswith(("\n", "\r")):
                    out[-1] += newline
                where[id(stmt)] = len(out) + 1 + comments
                out.extend(rendered)
            if i == len(lines):
                break
            if i in swaps:
                col, last, end_col, stmt = swaps[i]
                head, tail = lines[i], lines[last]
                body = stmt.with_changes(leading_lines=[], trailing_whitespace=cst.TrailingWhitespace())
                code = cst.Module(body=[body], default_indent=unit, default_newline=newline).code
                code = code.rstrip("\r\n").replace(newline, newline + _ws(head))
                where[id(stmt)] = len(out) + 1
                joined = head[:_char_col(head, col)] + code + tail[_char_col(tail, end_col):]
                out.extend(split_lines(joined))
                i = last + 1
                continue
            out.append(lines[i])
            i += 1
        return "".join(out), where

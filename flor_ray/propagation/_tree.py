"""The statement trees that the matcher compares.

One :class:`SNode` per statement: a compound statement (def, class, for, while, if,
with, try) owns named suites ("body", "orelse", "handler0", "finalbody") of child
nodes; simple statements sharing a line (``a; b``) form one node, as libcst's
``SimpleStatementLine`` does. Labels come from a whitespace-free serialisation of
the ``ast`` so that reformatting (quotes, line breaks, indentation, ``0.`` vs
``0.0``) never breaks a match, and a second, alpha-normalised label (identifiers
masked) lets renamed statements match and yield rename evidence. For the target,
each node also carries its libcst node, found by walking the libcst and ``ast``
trees in parallel (cheaper than libcst's position metadata).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from typing import Any

import libcst as cst

from flor_ray.analysis.calls import FlorCalls, literal_first_arg

COMPOUND = (
    ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.For, ast.AsyncFor,
    ast.While, ast.If, ast.With, ast.AsyncWith, ast.Try,
) + ((ast.TryStar,) if hasattr(ast, "TryStar") else ())
DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
FUNCS = (ast.FunctionDef, ast.AsyncFunctionDef)
LOOPS = (ast.For, ast.AsyncFor, ast.While)

_NAME = "\x00"  # marks a name token in the serialisation
_SKIP_FIELDS = frozenset({"ctx", "type_comment", "kind"})


@dataclass(eq=False)
class SNode:
    """One statement (or one line of simple statements) of a file."""

    stmts: tuple[ast.stmt, ...]
    parent: SNode | None
    key: str  # the parent's suite that holds this node
    index: int  # position in that suite
    cst: Any = None  # libcst statement (target only)
    suites: list[tuple[str, list[SNode]]] = field(default_factory=list)
    pre: int = 0  # preorder number
    last: int = 0  # largest preorder number in the subtree
    tokens: tuple[str, ...] = ()  # header (compound) or whole statement (simple)
    names: tuple[str, ...] = ()  # identifiers in ``tokens``, in order
    alpha: tuple[str, ...] = ()  # ``tokens`` with identifiers masked
    attrs: tuple[tuple[str, str], ...] = ()  # ``base.attr`` reads (``self.net``), in order
    alpha2: tuple[str, ...] = ()  # ``alpha`` with those attribute names masked too
    binds: frozenset[str] = frozenset()  # names this node binds in its enclosing scope
    params: frozenset[str] = frozenset()  # a def's parameters (bound in its own scope)
    hash: int = 0  # exact subtree hash
    ahash: int = 0  # alpha-normalised subtree hash
    has_log: bool = False  # the statement itself holds a flor.log call

    @property
    def first(self) -> ast.stmt:
        return self.stmts[0]

    @property
    def kind(self) -> str:
        head = self.stmts[0]
        if not isinstance(head, COMPOUND):
            return "Simple"
        return type(head).__name__.replace("Async", "")

    @property
    def compound(self) -> bool:
        return isinstance(self.stmts[0], COMPOUND)

    @property
    def is_def(self) -> bool:
        return isinstance(self.stmts[0], DEFS)

    @property
    def is_loop(self) -> bool:
        return isinstance(self.stmts[0], LOOPS)

    @property
    def size(self) -> int:
        return self.last - self.pre

    def children(self) -> list[SNode]:
        return [c for _, kids in self.suites for c in kids]

    def suite(self, key: str) -> list[SNode] | None:
        for k, kids in self.suites:
            if k == key:
                return kids
        return None

    def ancestors(self) -> list[SNode]:
        out, node = [], self.parent
        while node is not None:
            out.append(node)
            node = node.parent
        return out

    def contains(self, other: SNode) -> bool:
        return self.pre <= other.pre <= self.last

    @property
    def line(self) -> int:
        head = self.stmts[0]
        decos = getattr(head, "decorator_list", None)
        return min([head.lineno] + [d.lineno for d in decos or ()])


@dataclass(eq=False)
class Tree:
    root: SNode
    nodes: list[SNode]  # in preorder; nodes[i].pre == i
    syntax: FlorCalls
    # the first argument of every log call, in file order: the literal name or None
    log_names: list[str | None] = field(default_factory=list)


# --------------------------------------------------------------------------- suites


def ast_suites(stmt: ast.stmt) -> list[tuple[str, list[ast.stmt]]]:
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.With, ast.AsyncWith)):
        return [("body", stmt.body)]
    if isinstance(stmt, (ast.For, ast.AsyncFor, ast.While, ast.If)):
        return [("body", stmt.body)] + ([("orelse", stmt.orelse)] if stmt.orelse else [])
    if isinstance(stmt, COMPOUND):  # try / try*
        out = [("body", stmt.body)]
        out += [(f"handler{i}", h.body) for i, h in enumerate(stmt.handlers)]  # type: ignore[attr-defined]
        if stmt.orelse:  # type: ignore[attr-defined]
            out.append(("orelse", stmt.orelse))  # type: ignore[attr-defined]
        if stmt.finalbody:  # type: ignore[attr-defined]
            out.append(("finalbody", stmt.finalbody))  # type: ignore[attr-defined]
        return out
    return []


def cst_block(node: Any, key: str) -> Any:
    """The libcst block (or, for ``elif``, the nested ``If``) behind a suite key."""
    if key == "body":
        return node.body
    if key == "orelse":
        return node.orelse if isinstance(node.orelse, cst.If) else node.orelse.body
    if key == "finalbody":
        return node.finalbody.body
    return node.handlers[int(key[len("handler"):])].body


def cst_children(block: Any) -> list[Any]:
    if isinstance(block, (cst.SimpleStatementSuite, cst.If)):
        return [block]  # a one-line suite, or the ``If`` of an ``elif``
    return list(block.body)


def _width(child: Any) -> int:
    if isinstance(child, (cst.SimpleStatementLine, cst.SimpleStatementSuite)):
        return len(child.body)
    return 1


def _group_ast(stmts: list[ast.stmt]) -> list[tuple[ast.stmt, ...]]:
    groups: list[list[ast.stmt]] = []
    for stmt in stmts:
        if (
            groups
            and not isinstance(stmt, COMPOUND)
            and not isinstance(groups[-1][-1], COMPOUND)
            and stmt.lineno == groups[-1][-1].end_lineno
        ):
            groups[-1].append(stmt)
        else:
            groups.append([stmt])
    return [tuple(g) for g in groups]


def _group_with_cst(stmts: list[ast.stmt], block: Any) -> list[tuple[tuple[ast.stmt, ...], Any]]:
    out, i = [], 0
    for child in cst_children(block):
        n = _width(child)
        out.append((tuple(stmts[i:i + n]), child))
        i += n
    if i != len(stmts):  # pragma: no cover - would be a libcst/ast disagreement
        raise AssertionError("libcst and ast disagree on the statements of a block")
    return out


# --------------------------------------------------------------------------- build


def build(module: ast.Module, syntax: FlorCalls, cst_module: cst.Module | None = None,
          light: bool = False, grouped: bool = True) -> Tree:
    """The statement tree of a module; ``light`` skips labels (used to find lines).

    ``grouped=False`` (today's file) gives every statement a node of its own, so that
    ``opt.step(); flor.log("loss", l)`` yields the log alone as the unit, with
    ``opt.step()`` as its predecessor.
    """
    root = SNode(stmts=(ast.Pass(),), parent=None, key="", index=0, cst=cst_module)
    nodes: list[SNode] = [root]
    ser = None if light else _Serializer(syntax)

    def fill(node: SNode, suites: list[tuple[str, list[ast.stmt]]], cst_node: Any) -> None:
        for key, stmts in suites:
            if cst_node is not None:
                block = cst_node if node is root else cst_block(cst_node, key)
                groups = _group_with_cst(stmts, block)
            elif grouped:
                groups = [(g, None) for g in _group_ast(stmts)]
            else:
                groups = [((st,), None) for st in stmts]
            kids: list[SNode] = []
            for index, (group, child_cst) in enumerate(groups):
                kid = SNode(stmts=group, parent=node, key=key, index=index, cst=child_cst)
                kid.pre = len(nodes)
                nodes.append(kid)
                kids.append(kid)
                if ser is not None:
                    ser.label(kid)
                if isinstance(group[0], COMPOUND):
                    fill(kid, ast_suites(group[0]), child_cst)
                kid.last = len(nodes) - 1
            node.suites.append((key, kids))

    fill(root, [("body", module.body)], cst_module)
    root.last = len(nodes) - 1
    log_names: list[str | None] = []
    if ser is not None:
        for node in reversed(nodes):  # children before parents
            kids = tuple((k, tuple(c.hash for c in cs)) for k, cs in node.suites)
            akids = tuple((k, tuple(c.ahash for c in cs)) for k, cs in node.suites)
            node.hash = hash((node.kind, node.tokens, kids))
            node.ahash = hash((node.kind, node.alpha, akids))
        log_names = ser.logs
    return Tree(root, nodes, syntax, log_names)


# --------------------------------------------------------------------------- labels


class _Serializer:
    """Turns statements into token tuples, collecting names and bindings on the way.

    Nested ``flor.log(name, value)`` calls are serialised as ``value``, so that
    ``loss = flor.log("loss", f(x))`` today matches ``loss = f(x)`` in the old
    version: the statement has a counterpart and the log is wrapped in place.
    """

    def __init__(self, syntax: FlorCalls):
        self.syntax = syntax
        self.logs: list[str | None] = []  # every log call's literal name (None: not literal)

    def _saw_log(self, call: ast.Call) -> None:
        self.has_log = True
        self.logs.append(literal_first_arg(call))

    def label(self, node: SNode) -> None:
        self.out: list[str] = []
        self.name_pos: list[int] = []
        self.attr_pos: list[int] = []
        self.attr_pairs: list[tuple[str, str]] = []
        self.stores: set[str] = set()
        self.has_log = False
        head = node.stmts[0]
        params: set[str] = set()
        binds: set[str] = set()
        if isinstance(head, COMPOUND):
            self.out.append(type(head).__name__.replace("Async", ""))
            if isinstance(head, FUNCS):
                self.out.append("def:" + head.name)
                self._ser(head.args)
                params = set(self.stores)
                self.stores.clear()
                for sub in (*head.decorator_list, head.returns):
                    if sub is not None:
                        self._ser(sub)
                binds.add(head.name)
            elif isinstance(head, ast.ClassDef):
                self.out.append("class:" + head.name)
                for sub in (*head.bases, *head.keywords, *head.decorator_list):
                    self._ser(sub)
                binds.add(head.name)
            elif isinstance(head, (ast.For, ast.AsyncFor)):
                self._ser(head.target)
                self._ser(head.iter)
            elif isinstance(head, (ast.While, ast.If)):
                self._ser(head.test)
            elif isinstance(head, (ast.With, ast.AsyncWith)):
                for item in head.items:
                    self._ser(item)
            else:  # try
                for h in head.handlers:  # type: ignore[attr-defined]
                    self.out.append("except")
                    if h.type is not None:
                        self._ser(h.type)
                    if h.name:
                        self.stores.add(h.name)
        else:
            for stmt in node.stmts:
                if isinstance(stmt, ast.Expr) and self.syntax.is_log_call(stmt.value):
                    self._saw_log(stmt.value)  # type: ignore[arg-type]
                    self.out.append("Expr")
                    self._ser_call(stmt.value)  # type: ignore[arg-type]
                else:
                    self._ser(stmt)
                if isinstance(stmt, ast.Import):
                    binds.update(a.asname or a.name.split(".")[0] for a in stmt.names)
                elif isinstance(stmt, ast.ImportFrom):
                    binds.update(a.asname or a.name for a in stmt.names if a.name != "*")
                elif isinstance(stmt, (ast.Global, ast.Nonlocal)):
                    binds.update(stmt.names)
                self.out.append(";")
        node.tokens = tuple(self.out)
        node.names = tuple(self.out[i][1:] for i in self.name_pos)
        alpha = list(self.out)
        for i in self.name_pos:
            alpha[i] = _NAME
        node.alpha = tuple(alpha)
        for i in self.attr_pos:
            alpha[i] = _NAME
        node.alpha2 = tuple(alpha)
        node.attrs = tuple(self.attr_pairs)
        node.binds = frozenset(binds | self.stores)
        node.params = frozenset(params)
        node.has_log = self.has_log

    def _ser_call(self, call: ast.Call) -> None:
        self.out.append("Call(")
        verb = self.syntax.verb_of(call.func)
        if verb is not None:  # ``flor.log``, ``fr.log`` and an imported ``log`` are one callee
            self.out.append("flor_ray." + verb)
        else:
            self._ser(call.func)
        for a in call.args:
            self._ser(a)
        for k in call.keywords:
            self._ser(k)
        self.out.append(")")

    def _ser(self, node: Any) -> None:
        out = self.out
        if isinstance(node, ast.Name):
            if isinstance(node.ctx, ast.Store):
                self.stores.add(node.id)
            self.name_pos.append(len(out))
            out.append(_NAME + node.id)
            return
        if isinstance(node, ast.arg):
            self.stores.add(node.arg)
            self.name_pos.append(len(out))
            out.append(_NAME + node.arg)
            if node.annotation is not None:
                self._ser(node.annotation)
            return
        if isinstance(node, ast.Constant):
            out.append(repr(node.value))
            return
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            out.append("Attribute(")
            self._ser(node.value)
            self.attr_pos.append(len(out))
            self.attr_pairs.append((node.value.id, node.attr))
            out.append(repr(node.attr))
            out.append(")")
            return
        if isinstance(node, ast.Call):
            if self.syntax.is_log_call(node):
                self._saw_log(node)
                value = node.args[1] if len(node.args) > 1 else next(
                    (k.value for k in node.keywords if k.arg == "value"), None)
                if value is not None:
                    self._ser(value)
                    return
            self._ser_call(node)
            return
        if isinstance(node, (ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            saved = set(self.stores)  # names bound inside these are not visible outside
            self._generic(node)
            self.stores = saved
            return
        if isinstance(node, ast.MatchAs) or isinstance(node, ast.MatchStar):
            if node.name:
                self.stores.add(node.name)
        elif isinstance(node, ast.MatchMapping) and node.rest:
            self.stores.add(node.rest)
        self._generic(node)

    def _generic(self, node: ast.AST) -> None:
        out = self.out
        out.append(type(node).__name__ + "(")
        for name in node._fields:
            if name in _SKIP_FIELDS:
                continue
            value = getattr(node, name, None)
            if isinstance(value, list):
                out.append("[")
                for item in value:
                    if isinstance(item, ast.AST):
                        self._ser(item)
                    else:
                        out.append(repr(item))
                out.append("]")
            elif isinstance(value, ast.AST):
                self._ser(value)
            else:
                out.append(repr(value))
        out.append(")")


# --------------------------------------------------------------------------- scopes


def scope_of(node: SNode) -> SNode:
    """The def/class whose scope holds the names ``node`` binds (root for module)."""
    parent = node.parent
    while parent is not None and parent.parent is not None and not parent.is_def:
        parent = parent.parent
    return parent if parent is not None else node


def enclosing_scope_at(owner: SNode) -> SNode:
    """The scope in which code placed inside ``owner``'s suites runs."""
    node: SNode | None = owner
    while node is not None and node.parent is not None and not node.is_def:
        node = node.parent
    return node if node is not None else owner


def local_names(tree: Tree) -> dict[int, set[str]]:
    """Names bound anywhere in each scope (keyed by the scope node's ``pre``)."""
    out: dict[int, set[str]] = {0: set()}
    for node in tree.nodes[1:]:
        out.setdefault(scope_of(node).pre, set()).update(node.binds)
        if node.is_def:
            out.setdefault(node.pre, set()).update(node.params)
    return out


def resolve_scope(name: str, at: SNode, locals_: dict[int, set[str]]) -> int:
    """The ``pre`` of the scope that a read of ``name`` inside ``at``'s suites resolves to."""
    node: SNode | None = at
    while node is not None and node.parent is not None:
        if node.is_def and isinstance(node.first, FUNCS) and name in locals_.get(node.pre, ()):
            return node.pre
        node = node.parent
    return 0

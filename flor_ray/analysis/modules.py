"""The project's Python files as seen by :mod:`.project`: what each defines, imports,
references and logs, and how a dotted name in one of them resolves to a def of another.

Files are read with :mod:`ast` (no execution). A *reference* is one chain of names
(``utils.evaluate``, ``Net``, ``self.encode``) with where it stands: the top-level
def that holds it, whether it is called there, and whether it sits in code that runs
later than its def (a lambda, a generator expression, a nested def).
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass, field

from .calls import FlorCalls, literal_first_arg
from .scan import MUTATORS

__all__ = ["FileScan", "ModuleSite", "Params", "Ref", "Use", "scan_file"]


@dataclass(frozen=True)
class Ref:
    """A module of the project (``qual`` None) or one of its defs: ``f``, ``C`` or ``C.m``."""

    path: str
    qual: str | None = None

    def show(self) -> str:
        return f"{self.path}" if self.qual is None else f"{self.qual}() of {self.path}"


@dataclass(frozen=True)
class Use:
    """One reference of a chain of names in a file."""

    parts: tuple[str, ...]
    line: int
    call: bool  # the callee of a call
    owner: str | None  # the top-level def holding it ("f", "C.m"); None at module level or in a class body
    inner: str | None  # the innermost def holding it (its bare name)
    method: bool  # the innermost def is a method (defined in a class body)
    lazy: bool  # in a lambda, a generator expression or a def nested in ``owner``: runs later, elsewhere


@dataclass(frozen=True)
class ModuleSite:
    """One ``flor.log`` with a literal name in a module."""

    path: str
    name: str
    line: int
    owner: str | None
    nested: bool  # in a def nested in ``owner``, or a lambda
    in_loop: bool  # in a loop of its own def


@dataclass
class FileScan:
    """What one file defines, imports, references and logs."""

    path: str
    defs: set[str] = field(default_factory=set)  # "f", "C", "C.m"
    classes: dict[str, list[tuple[str, ...]]] = field(default_factory=dict)  # class -> its bases' chains
    imports: list[tuple[str, str, str | None, int]] = field(default_factory=list)  # (bound, module, name, level)
    uses: list[Use] = field(default_factory=list)
    sites: list[ModuleSite] = field(default_factory=list)
    globals_written: set[str] = field(default_factory=set)  # names some def declares ``global``
    self_written: dict[str, set[str]] = field(default_factory=dict)  # class -> attrs set outside __init__
    self_read: dict[str, set[str]] = field(default_factory=dict)  # owner -> attrs of self it reads
    #: decorators that may do more than wrap the call (register the def, make it a property):
    #: by the def's qualname and by its bare name
    opaque: set[str] = field(default_factory=set)
    fdefs: dict[str, ast.AST] = field(default_factory=dict)  # every def by its qualname, and by its bare name
    module_level: set[str] = field(default_factory=set)  # names the module's top level assigns
    mutated: set[str] = field(default_factory=set)  # names defs mutate (x.append(...), x[k] = v)
    loops: list[tuple[str | None, int]] = field(default_factory=list)  # flor.loop calls: (owner, line)
    stars: list[tuple[str, int, int]] = field(default_factory=list)  # ``from m import *``: (module, level, line)

    def is_generator(self, name: str) -> bool:
        """Whether the def ``name`` yields: its body runs where it is iterated, not where it is called."""
        fdef = self.fdefs.get(name)
        return fdef is not None and any(isinstance(n, (ast.Yield, ast.YieldFrom)) for n in _own_nodes(fdef))

    def params(self, qual: str) -> "Params":
        return _params(self.fdefs[qual])


#: decorators that only wrap the call: the body still runs where the def is called
TRANSPARENT = frozenset({"no_grad", "inference_mode", "enable_grad", "set_grad_enabled", "autocast", "wraps",
                         "staticmethod", "classmethod", "cache", "lru_cache"})


def _chain(node: ast.AST) -> tuple[str, ...] | None:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return tuple(reversed(parts))


class _Scanner(ast.NodeVisitor):
    """Fills a :class:`FileScan`; ``stack`` holds ("class"|"def"|"lazy", name) frames."""

    def __init__(self, scan: FileScan, calls: FlorCalls) -> None:
        self.scan, self.calls = scan, calls
        self.stack: list[tuple[str, str]] = []
        self.loops = 0  # loops of the innermost def

    # -- where a node stands
    def _owner(self) -> tuple[str | None, bool]:
        """The top-level def's qualname, and whether the node is nested deeper than it."""
        names: list[str] = []
        for i, (kind, name) in enumerate(self.stack):
            if kind == "class":
                names.append(name)
                continue
            if kind == "def":
                return ".".join(names + [name]), i < len(self.stack) - 1
            return None, True
        return None, False

    def _use(self, parts: tuple[str, ...], node: ast.AST, call: bool) -> None:
        owner, nested = self._owner()
        defs = [(i, n) for i, (k, n) in enumerate(self.stack) if k == "def"]
        inner = defs[-1][1] if defs else None
        method = bool(defs) and defs[-1][0] > 0 and self.stack[defs[-1][0] - 1][0] == "class"
        lazy = nested or any(k == "lazy" for k, _ in self.stack)
        self.scan.uses.append(Use(parts, getattr(node, "lineno", 0), call, owner, inner, method, lazy))
        if parts[0] == "self" and len(parts) > 1 and owner is not None:
            self.scan.self_read.setdefault(owner, set()).add(parts[1])

    # -- scopes
    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        for d in node.decorator_list:
            self.visit(d)
        if not any(k != "class" for k, _ in self.stack):
            qual = ".".join([n for _, n in self.stack] + [node.name])
            self.scan.defs.add(qual)
            self.scan.classes[qual] = [c for c in (_chain(b) for b in node.bases) if c]
        for b in node.bases:
            if _chain(b) is None:
                self.visit(b)
        self.stack.append(("class", node.name))
        for stmt in node.body:
            self.visit(stmt)
        self.stack.pop()

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        for d in node.decorator_list:
            self.visit(d)
        self.visit(node.args)
        if node.returns is not None:
            self.visit(node.returns)
        owner, nested = self._owner()
        qual = ".".join([n for _, n in self.stack] + [node.name])
        if owner is None and not nested:
            self.scan.defs.add(qual)
            self.scan.fdefs[qual] = node
        self.scan.fdefs.setdefault(node.name, node)
        chains = [_chain(d.func if isinstance(d, ast.Call) else d) for d in node.decorator_list]
        if any(c is None or c[-1] not in TRANSPARENT for c in chains):
            self.scan.opaque |= {qual, node.name}
        self.stack.append(("def", node.name))
        loops, self.loops = self.loops, 0
        for stmt in node.body:
            self.visit(stmt)
        self.loops = loops
        self.stack.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def _lazy(self, node: ast.AST) -> None:
        self.stack.append(("lazy", ""))
        self.generic_visit(node)
        self.stack.pop()

    visit_Lambda = _lazy
    visit_GeneratorExp = _lazy

    def _loop(self, node: ast.AST) -> None:
        self.loops += 1
        self.generic_visit(node)
        self.loops -= 1

    visit_For = visit_While = visit_AsyncFor = _loop

    # -- names
    def visit_Assign(self, node: ast.Assign) -> None:
        if not self.stack:
            for t in node.targets:
                self.scan.module_level |= {n.id for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif any(k == "def" for k, _ in self.stack):
            for t in node.targets:
                if isinstance(t, (ast.Subscript, ast.Attribute)):
                    root = _chain(t.value) if isinstance(t, ast.Subscript) else _chain(t)
                    if root:
                        self.scan.mutated.add(root[0])
        self.generic_visit(node)

    def visit_Global(self, node: ast.Global) -> None:
        self.scan.globals_written.update(node.names)

    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            self.scan.imports.append((a.asname or a.name.split(".")[0], a.name if a.asname else a.name.split(".")[0],
                                      None, 0))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        for a in node.names:
            if a.name != "*":
                self.scan.imports.append((a.asname or a.name, node.module or "", a.name, node.level))
            else:
                self.scan.stars.append((node.module or "", node.level, node.lineno))

    def visit_Call(self, node: ast.Call) -> None:
        if self.calls.is_log_call(node):
            name = literal_first_arg(node)
            owner, nested = self._owner()
            if name is not None:
                lazy = nested or any(k == "lazy" for k, _ in self.stack)
                self.scan.sites.append(ModuleSite(self.scan.path, name, node.lineno, owner, lazy, self.loops > 0))
        if self.calls.is_loop_call(node):
            self.scan.loops.append((self._owner()[0], node.lineno))
        parts = _chain(node.func)
        if parts is not None and len(parts) > 1 and parts[-1] in MUTATORS and any(k == "def" for k, _ in self.stack):
            self.scan.mutated.add(parts[0])
        if parts is not None:
            self._use(parts, node, True)
        else:
            self.visit(node.func)
        for a in (*node.args, *node.keywords):
            self.visit(a)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        parts = _chain(node)
        if parts is None:
            self.generic_visit(node)
            return
        owner, _ = self._owner()
        if isinstance(node.ctx, ast.Store):
            if parts[0] == "self" and owner is not None and "." in owner and not owner.endswith(".__init__"):
                self.scan.self_written.setdefault(owner.rsplit(".", 1)[0], set()).add(parts[1])
            return
        self._use(parts, node, False)

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Load):
            self._use((node.id,), node, False)


@dataclass(frozen=True)
class Params:
    """What a def may do to its arguments, as far as its own body says."""

    names: tuple[str, ...]
    star: bool
    mutated: frozenset[str]
    passed: tuple[tuple[tuple[str, ...], str], ...]  # (callee chain, parameter it is given)


def _params(fdef: ast.FunctionDef | ast.AsyncFunctionDef) -> Params:
    """The parameters a def mutates by the analysis' rules for unread callees: a mutating or
    statement-level method call (``p.append(x)``, ``p.step()``), a store into it (``p[k] = v``),
    an in-place function (``f_(p)``); a local bound from a parameter counts as that parameter."""
    a = fdef.args
    names = tuple(x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs))
    alias = {n: n for n in names}
    mutated: set[str] = set()
    passed: list[tuple[tuple[str, ...], str]] = []
    nodes = sorted(_all_nodes(fdef), key=lambda n: (getattr(n, "lineno", 0), getattr(n, "col_offset", 0)))
    statement_calls = {id(n.value) for n in nodes if isinstance(n, ast.Expr)}
    for node in nodes:
        if isinstance(node, ast.Assign):
            root = _root(node.value)
            for t in node.targets:
                if isinstance(t, ast.Name) and root in alias:
                    alias[t.id] = alias[root]
                elif isinstance(t, (ast.Subscript, ast.Attribute)) and _root(t) in alias:
                    mutated.add(alias[_root(t)])
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)) and isinstance(node.target, (ast.Subscript,
                                                                                          ast.Attribute)):
            if _root(node.target) in alias:
                mutated.add(alias[_root(node.target)])
        elif isinstance(node, ast.Call):
            chain = _chain(node.func)
            if isinstance(node.func, ast.Attribute) and _root(node.func.value) in alias and (
                    node.func.attr in MUTATORS or node.func.attr.endswith("_") or id(node) in statement_calls):
                mutated.add(alias[_root(node.func.value)])
            for arg in (*node.args, *(k.value for k in node.keywords)):
                if _root(arg) in alias and chain is not None:
                    passed.append((chain, alias[_root(arg)]))
    star = a.vararg is not None or a.kwarg is not None
    return Params(names, star, frozenset(mutated), tuple(passed))


def _root(node: ast.AST) -> str | None:
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Starred)):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def _all_nodes(node: ast.AST):
    todo = list(ast.iter_child_nodes(node))
    while todo:
        sub = todo.pop()
        yield sub
        todo.extend(ast.iter_child_nodes(sub))


def _own_nodes(fdef: ast.AST):
    """The nodes of a def's body, not those of the defs, lambdas and classes nested in it."""
    todo = list(ast.iter_child_nodes(fdef))
    while todo:
        node = todo.pop()
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            todo.extend(ast.iter_child_nodes(node))


@functools.lru_cache(maxsize=512)  # a file is the same in many versions; scans are never changed
def scan_file(path: str, text: str) -> FileScan | None:
    """The scan of one file; None when it does not parse (nothing of it can be followed)."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return None
    scan = FileScan(path)
    _Scanner(scan, FlorCalls.of(tree)).visit(tree)
    return scan

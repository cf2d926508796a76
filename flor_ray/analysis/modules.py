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
import posixpath
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from .calls import FlorCalls, literal_first_arg
from .scan import MUTATORS

__all__ = ["FileScan", "ModuleIndex", "ModuleSite", "Params", "Project", "Ref", "Use", "scan_file"]


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


def _dotted(path: str, base: str) -> str | None:
    """The module name of ``path`` for an import system rooted at directory ``base``."""
    if base and not path.startswith(base + "/"):
        return None
    rel = path[len(base) + 1:] if base else path
    parts = rel[: -len(".py")].split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts) if parts and all(p.isidentifier() for p in parts) else None


#: the path of a namespace package (a folder of modules without ``__init__.py``)
NAMESPACE = "<namespace>:"


class ModuleIndex:
    """Module names of a tree's paths: an import resolves against the script's directory
    (what ``python train.py`` puts on ``sys.path``) and against the repository root;
    relative imports against the importing file's package."""

    def __init__(self, paths: Iterable[str], script: str) -> None:
        self.script = script
        self.by_name: dict[str, str] = {}
        self.root_name: dict[str, str] = {}
        paths = list(paths)
        for base in (posixpath.dirname(script), ""):
            for path in paths:
                name = _dotted(path, base)
                if name:
                    self.by_name.setdefault(name, path)
                    if base == "":
                        self.root_name[path] = name

    def module(self, name: str) -> str | None:
        return self.by_name.get(name)

    def _import_base(self, path: str, module: str, level: int) -> str:
        if not level:
            return module
        pkg = self.root_name.get(path, "").split(".")
        if not path.endswith("__init__.py"):
            pkg = pkg[:-1]
        pkg = pkg[: len(pkg) - (level - 1)] if level > 1 else pkg
        return ".".join([p for p in pkg if p] + ([module] if module else []))

    def imported(self, path: str, scan: FileScan) -> set[str]:
        """The paths of the project's modules that the imports of ``path`` load (packages too)."""
        out: set[str] = set()
        wanted = [(m, n, lv) for _, m, n, lv in scan.imports] + [(m, None, lv) for m, lv, _ in scan.stars]
        for module, name, level in wanted:
            base = self._import_base(path, module, level)
            parts = base.split(".") if base else []
            names = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
            names += [f"{base}.{name}" if base else name] if name else []
            out |= {p for p in map(self.module, names) if p is not None}
        return out


class Project(ModuleIndex):
    """The project's files, and the resolution of names across them."""

    def __init__(self, texts: Mapping[str, str], script: str) -> None:
        self.scans: dict[str, FileScan] = {}
        for path, text in texts.items():
            scan = scan_file(path, text)
            if scan is not None:
                self.scans[path] = scan
        super().__init__(self.scans, script)
        self._bindings: dict[str, dict[str, Ref]] = {}
        self._resolved: dict[tuple, Ref | None] = {}
        self._targets: dict[str, list[tuple[Use, Ref]]] = {}

    def bindings(self, path: str) -> dict[str, Ref]:
        """Names bound at the top of ``path`` to the project's modules and defs."""
        if path in self._bindings:
            return self._bindings[path]
        scan = self.scans[path]
        out = {d: Ref(path, d) for d in scan.defs if "." not in d}
        for bound, module, name, level in scan.imports:
            base = self._import_base(path, module, level)
            if name is None:
                target = self.module(base)
                if target is not None:
                    out[bound] = Ref(target)
                elif any(n.startswith(base + ".") for n in self.by_name):  # a namespace package
                    out[bound] = Ref(NAMESPACE + base)
                continue
            sub = self.module(f"{base}.{name}" if base else name)
            target = self.module(base)
            if sub is not None:
                out[bound] = Ref(sub)
            elif target is not None:
                out[bound] = Ref(target, name)
        self._bindings[path] = out
        return out

    def canonical(self, ref: Ref, depth: int = 0) -> Ref | None:
        """The def a re-exported name stands for (``from .model import Net`` in a package)."""
        if ref.qual is None or ref.qual in self.scans[ref.path].defs or depth > 8:
            return ref
        head, *rest = ref.qual.split(".")
        again = self.bindings(ref.path).get(head)
        if again is None or again == ref:
            return None
        for part in rest:
            again = self.member(again, part, depth + 1)
            if again is None:
                return None
        return self.canonical(again, depth + 1)

    def member(self, ref: Ref, attr: str, depth: int = 0) -> Ref | None:
        if ref.path.startswith(NAMESPACE):
            name = f"{ref.path[len(NAMESPACE):]}.{attr}"
            sub = self.module(name)
            if sub is not None:
                return Ref(sub)
            return Ref(NAMESPACE + name) if any(n.startswith(name + ".") for n in self.by_name) else None
        if ref.qual is None:
            name = self.root_name.get(ref.path)
            sub = self.module(f"{name}.{attr}") if name else None
            if sub is not None:
                return Ref(sub)
            return self.canonical(Ref(ref.path, attr), depth) if attr in self.bindings(ref.path) else None
        if ref.qual in self.scans[ref.path].classes:
            return Ref(ref.path, f"{ref.qual}.{attr}")
        return None

    def targets(self, path: str) -> list[tuple[Use, Ref]]:
        """The references of ``path`` that name the project's modules and defs, with what they name."""
        if path not in self._targets:
            found = ((use, self.resolve(path, use)) for use in self.scans[path].uses)
            self._targets[path] = [(use, ref) for use, ref in found if ref is not None]
        return self._targets[path]

    def resolve(self, path: str, use: Use) -> Ref | None:
        """The module or def a reference in ``path`` names, when it is the project's."""
        key = (path, use.parts, use.owner if use.parts[0] == "self" else None)
        if key not in self._resolved:
            self._resolved[key] = self._resolve(path, use)
        return self._resolved[key]

    def _resolve(self, path: str, use: Use) -> Ref | None:
        parts = use.parts
        if parts[0] == "self" and use.owner and "." in use.owner and len(parts) > 1:
            ref: Ref | None = Ref(path, f"{use.owner.rsplit('.', 1)[0]}.{parts[1]}")
            parts = parts[2:]
            return ref if not parts else None
        ref = self.bindings(path).get(parts[0])
        if ref is None:
            return None
        ref = self.canonical(ref)
        for part in parts[1:]:
            if ref is None or (ref.qual is not None and ref.qual not in self.scans[ref.path].classes):
                return ref  # an attribute of a function's result: the function is what is named
            ref = self.member(ref, part)
        return ref

    def family(self, cls: Ref) -> set[Ref]:
        """``cls`` and the classes of the project derived from it."""
        out = {cls}
        grew = True
        while grew:
            grew = False
            for path, scan in self.scans.items():
                for name, bases in scan.classes.items():
                    ref = Ref(path, name)
                    if ref in out:
                        continue
                    for b in bases:
                        use = Use(b, 0, False, None, None, False, False)
                        if self.resolve(path, use) in out:
                            out.add(ref)
                            grew = True
                            break
        return out

    def is_class(self, ref: Ref) -> bool:
        return ref.qual is not None and ref.qual in self.scans[ref.path].classes

    def mutated_params(self, ref: Ref) -> Params | None:
        """What calling the def ``ref`` may mutate of its arguments (None: not a def of the project).

        A class: every argument (its methods may keep and change them). A parameter passed on
        to a def of the project or to an in-place function counts as mutated."""
        scan = self.scans.get(ref.path)
        if scan is None or ref.qual is None or ref.qual not in scan.defs:
            return None
        if ref.qual in scan.classes:
            return Params((), True, frozenset(), ())
        own = scan.params(ref.qual)
        more = {p for callee, p in own.passed if callee[-1].endswith("_") or self._is_def(ref, callee)}
        return Params(own.names, own.star, own.mutated | more, own.passed)

    def _is_def(self, ref: Ref, callee: tuple[str, ...]) -> bool:
        target = self.resolve(ref.path, Use(callee, 0, True, ref.qual, None, False, False))
        return target is not None and target.qual is not None

    def scan_of(self, ref: Ref) -> FileScan | None:
        return self.scans.get(ref.path)

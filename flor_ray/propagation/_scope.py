"""Which names an injected statement reads, and which names the target has there.

A statement may only be injected where every name it reads is bound: an injected
``flor.log("lr", scheduler.get_last_lr()[0])`` in a version that never built a
scheduler would crash the replay hours later, so it is refused up front. The rules are
Python's, simplified to what can be known statically:

* in the scope where the statement lands (the function, or the module), a name must
  be bound by a statement that comes earlier in the file, or be a parameter;
* names of enclosing functions and of the module count wherever they are bound
  (they are bound by the time the function runs); class bodies are not enclosing
  scopes for their methods;
* builtins are always visible, and names the statement binds itself before reading
  them (``g = norm(p); flor.log("g", g)`` inside a new block, comprehension
  variables) are not reads from outside.
"""

from __future__ import annotations

import ast
import builtins

from ._tree import FUNCS, SNode, Tree, scope_of

BUILTINS = frozenset(dir(builtins)) | {"__name__", "__file__", "__doc__", "__spec__",
                                       "__loader__", "__package__", "__builtins__"}


def free_reads(stmts: tuple[ast.stmt, ...]) -> list[str]:
    """Names read by ``stmts`` before (or without) being bound by them, in order."""
    finder = _FreeNames()
    for stmt in stmts:
        finder.visit(stmt)
    return list(dict.fromkeys(finder.free))


class _FreeNames(ast.NodeVisitor):
    def __init__(self) -> None:
        self.scopes: list[set[str]] = [set()]
        self.free: list[str] = []

    def _bound(self, name: str) -> bool:
        return any(name in s for s in self.scopes)

    def _bind_target(self, target: ast.AST) -> None:
        for node in ast.walk(target):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                self.scopes[-1].add(node.id)
        for node in ast.walk(target):  # subscripts/attributes in targets read names
            if isinstance(node, (ast.Attribute, ast.Subscript)):
                self.visit(node.value)
                if isinstance(node, ast.Subscript):
                    self.visit(node.slice)

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Load) and not self._bound(node.id):
            self.free.append(node.id)
        elif isinstance(node.ctx, ast.Store):
            self.scopes[-1].add(node.id)

    def visit_Assign(self, node: ast.Assign) -> None:
        self.visit(node.value)
        for t in node.targets:
            self._bind_target(t)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        self.visit(node.value)
        if isinstance(node.target, ast.Name):
            if not self._bound(node.target.id):
                self.free.append(node.target.id)
            self.scopes[-1].add(node.target.id)
        else:
            self._bind_target(node.target)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:
            self.visit(node.value)
        self._bind_target(node.target)

    def visit_NamedExpr(self, node: ast.NamedExpr) -> None:
        self.visit(node.value)
        self.scopes[-1].add(node.target.id)

    def visit_For(self, node: ast.For) -> None:
        self.visit(node.iter)
        self._bind_target(node.target)
        for stmt in node.body + node.orelse:
            self.visit(stmt)

    visit_AsyncFor = visit_For  # type: ignore[assignment]

    def visit_withitem(self, node: ast.withitem) -> None:
        self.visit(node.context_expr)
        if node.optional_vars is not None:
            self._bind_target(node.optional_vars)

    def visit_ExceptHandler(self, node: ast.ExceptHandler) -> None:
        if node.type is not None:
            self.visit(node.type)
        if node.name:
            self.scopes[-1].add(node.name)
        for stmt in node.body:
            self.visit(stmt)

    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            self.scopes[-1].add(a.asname or a.name.split(".")[0])

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        for a in node.names:
            self.scopes[-1].add(a.asname or a.name)

    def _comprehension(self, node: ast.AST, elts: list[ast.AST]) -> None:
        gens: list[ast.comprehension] = node.generators  # type: ignore[attr-defined]
        self.visit(gens[0].iter)  # evaluated in the enclosing scope
        self.scopes.append(set())
        for i, gen in enumerate(gens):
            if i:
                self.visit(gen.iter)
            self._bind_target(gen.target)
            for cond in gen.ifs:
                self.visit(cond)
        for elt in elts:
            self.visit(elt)
        self.scopes.pop()

    def visit_ListComp(self, node: ast.ListComp) -> None:
        self._comprehension(node, [node.elt])

    visit_SetComp = visit_ListComp  # type: ignore[assignment]
    visit_GeneratorExp = visit_ListComp  # type: ignore[assignment]

    def visit_DictComp(self, node: ast.DictComp) -> None:
        self._comprehension(node, [node.key, node.value])

    def _params(self, args: ast.arguments) -> set[str]:
        every = args.posonlyargs + args.args + args.kwonlyargs
        every += [a for a in (args.vararg, args.kwarg) if a is not None]
        return {a.arg for a in every}

    def visit_Lambda(self, node: ast.Lambda) -> None:
        for d in node.args.defaults + [d for d in node.args.kw_defaults if d is not None]:
            self.visit(d)
        self.scopes.append(self._params(node.args))
        self.visit(node.body)
        self.scopes.pop()

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        for d in node.decorator_list + node.args.defaults:
            self.visit(d)
        self.scopes[-1].add(node.name)
        self.scopes.append(self._params(node.args))
        for stmt in node.body:
            self.visit(stmt)
        self.scopes.pop()

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        for d in node.decorator_list + node.bases:
            self.visit(d)
        self.scopes[-1].add(node.name)
        self.scopes.append(set())
        for stmt in node.body:
            self.visit(stmt)
        self.scopes.pop()

    def visit_Global(self, node: ast.Global) -> None:
        self.scopes[-1].update(node.names)

    visit_Nonlocal = visit_Global  # type: ignore[assignment]


class Visibility:
    """Answers "is ``name`` bound at this point of the target?"."""

    def __init__(self, tree: Tree):
        self.tree = tree
        # scope pre -> [(binding statement pre, name)]
        self._bindings: dict[int, list[tuple[int, str]]] = {0: []}
        self._all: dict[int, set[str]] = {0: set()}
        for node in tree.nodes[1:]:
            scope = scope_of(node).pre
            self._bindings.setdefault(scope, []).extend((node.pre, n) for n in node.binds)
            self._all.setdefault(scope, set()).update(node.binds)
            if node.is_def:
                self._bindings.setdefault(node.pre, []).extend((node.pre, n) for n in node.params)
                self._all.setdefault(node.pre, set()).update(node.params)

    def names_at(self, owner: SNode, position: int) -> set[str]:
        """Names visible to a statement placed inside ``owner`` after node ``position``.

        ``position`` is the preorder number of the last statement executed before
        the placed one (``owner.pre`` when it goes first in the block).
        """
        chain = [owner] + owner.ancestors()
        scopes = [n for n in chain if n.parent is None or n.is_def]
        direct, outer = scopes[0], scopes[1:]
        names = set(BUILTINS)
        names.update(n for pre, n in self._bindings.get(direct.pre, ()) if pre <= position)
        for scope in outer:
            if scope.parent is None or isinstance(scope.first, FUNCS):
                names |= self._all.get(scope.pre, set())
        return names

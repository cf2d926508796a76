"""The one recogniser of flor calls, shared by the analysis and by propagation.

A call is a flor call because of what its callee is bound to, not because of its
spelling: today's script may say ``import flor_ray as flor`` and ``flor.log(...)``
while an old one said ``from flor import log`` and ``log(...)``. Each file is read
with its own imports. The rule of which imports count lives in
:meth:`FlorCalls.from_imports`; the two front ends only list the imports of an
``ast`` tree (propagation) or of libcst nodes (the analysis).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from functools import cached_property
from typing import Iterable

import libcst as cst
import libcst.helpers  # noqa: F401 - cst.helpers.get_full_name_for_node

__all__ = ["FLOR_MODULES", "FlorCalls", "Imported", "imported_cst"]

#: Module names whose verbs are recognised; ``flor`` keeps FlorDB scripts working.
FLOR_MODULES = frozenset({"flor_ray", "flor"})


@dataclass(frozen=True)
class Imported:
    """One name an import binds: ``import module as bound`` (``name`` None) or
    ``from module import name as bound`` (``relative`` for ``from .module``)."""

    module: str
    name: str | None
    bound: str
    relative: bool = False


@dataclass(frozen=True)
class FlorCalls:
    """How one file spells ``flor_ray``: module aliases and directly imported verbs.

    ``direct`` maps each local name bound by ``from flor_ray import verb [as name]``
    to its verb, so that ``log(...)`` in one version and ``flor.log(...)`` in the
    other are recognised as the same call, and an injected statement can be
    re-spelled the target's way.
    """

    modules: frozenset[str]
    log_functions: frozenset[str]
    loop_functions: frozenset[str]
    direct: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_imports(cls, imports: Iterable[Imported]) -> "FlorCalls":
        modules: set[str] = set()
        direct: dict[str, str] = {}
        for imp in imports:
            if imp.name is None:
                if imp.module in FLOR_MODULES:
                    modules.add(imp.bound)
            elif imp.module in FLOR_MODULES and not imp.relative and imp.name != "*":
                direct[imp.bound] = imp.name
        logs = {k for k, v in direct.items() if v == "log"}
        loops = {k for k, v in direct.items() if v == "loop"}
        if not modules and not logs:
            # A snippet without imports: assume the documented spelling.
            modules.add("flor")
        return cls(frozenset(modules), frozenset(logs), frozenset(loops), tuple(sorted(direct.items())))

    @classmethod
    def of(cls, tree: ast.Module) -> "FlorCalls":
        """The recogniser of a parsed file (imports anywhere in it count)."""
        return cls.from_imports(_imported_ast(tree))

    @cached_property  # frozen dataclass: cached_property writes __dict__ directly
    def direct_map(self) -> dict[str, str]:
        return dict(self.direct)

    @cached_property
    def names(self) -> frozenset[str]:
        """Every local name bound to flor_ray or one of its verbs."""
        return self.modules | frozenset(self.direct_map)

    def verb_of(self, func: ast.AST) -> str | None:
        """``"log"`` for ``flor.log``/``fr.log``/an imported ``log``; None for other callees."""
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id in self.modules:
            return func.attr
        if isinstance(func, ast.Name):
            return self.direct_map.get(func.id)
        return None

    def verb_of_cst(self, func: cst.BaseExpression) -> str | None:
        """:meth:`verb_of` for a libcst callee."""
        if isinstance(func, cst.Attribute) and isinstance(func.value, cst.Name) and func.value.value in self.modules:
            return func.attr.value
        if isinstance(func, cst.Name):
            return self.direct_map.get(func.value)
        return None

    def _is_call_to(self, node: ast.AST, verb: str, direct: frozenset[str]) -> bool:
        if not isinstance(node, ast.Call):
            return False
        func = node.func
        if isinstance(func, ast.Attribute):
            return func.attr == verb and isinstance(func.value, ast.Name) and func.value.id in self.modules
        return isinstance(func, ast.Name) and func.id in direct

    def is_log_call(self, node: ast.AST) -> bool:
        return self._is_call_to(node, "log", self.log_functions)

    def loop_name(self, node: ast.AST) -> str | None:
        """The name of a ``flor.loop("name", ...)`` call found in a for-loop's iterable."""
        for sub in ast.walk(node):
            if self._is_call_to(sub, "loop", self.loop_functions):
                name = literal_first_arg(sub)  # type: ignore[arg-type]
                if name is not None:
                    return name
        return None


def literal_first_arg(call: ast.Call) -> str | None:
    """The log/loop name when it is a string literal, else ``None``."""
    arg: ast.AST | None = call.args[0] if call.args else None
    if arg is None:
        arg = next((k.value for k in call.keywords if k.arg == "name"), None)
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    return None


def _imported_ast(tree: ast.Module) -> list[Imported]:
    out: list[Imported] = []
    # imports are statements: walking statements only is several times cheaper
    # than ast.walk over every expression of the file
    stack: list[ast.stmt] = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import):
            out += [Imported(a.name, None, a.asname or a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out += [Imported(node.module, a.name, a.asname or a.name, bool(node.level)) for a in node.names]
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):
            sub = getattr(node, field, None)
            if isinstance(sub, list):
                for item in sub:
                    if isinstance(item, ast.stmt):
                        stack.append(item)
                    elif hasattr(item, "body"):  # except handlers, match cases
                        stack.extend(item.body)
    return out


def imported_cst(node: cst.Import | cst.ImportFrom) -> list[Imported]:
    """The names one libcst import statement binds (none for ``from m import *``)."""
    if isinstance(node, cst.Import):
        out = []
        for alias in node.names:
            dotted = cst.helpers.get_full_name_for_node(alias.name) or ""
            out.append(Imported(dotted, None, _bound(alias) or dotted.split(".")[0]))
        return out
    if isinstance(node.names, cst.ImportStar):
        return []
    mod = cst.helpers.get_full_name_for_node(node.module) if node.module else ""
    out = []
    for alias in node.names:
        name = cst.helpers.get_full_name_for_node(alias.name) or ""
        out.append(Imported(mod or "", name, _bound(alias) or name, bool(node.relative)))
    return out


def _bound(alias: cst.ImportAlias) -> str | None:
    return alias.asname.name.value if alias.asname and isinstance(alias.asname.name, cst.Name) else None

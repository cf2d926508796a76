"""Parsing both versions and recognising ``flor.log`` calls in them.

Each file is read with its own import aliases: today's script may say
``import flor_ray as flor`` while the old one said ``import flor_ray as fr``, so a
call is a log call because of what its callee is bound to, not because of its
spelling. ``ast`` is used for analysis (it is an order of magnitude faster than
libcst's parser); libcst is used only on the target, where formatting must survive.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from functools import cached_property

import libcst as cst

from flor_ray.errors import PropagationError

# Module names whose ``log``/``loop`` we recognise; ``flor`` keeps FlorDB scripts working.
_FLOR_MODULES = frozenset({"flor_ray", "flor"})


@dataclass(frozen=True)
class LogSyntax:
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
    def of(cls, tree: ast.Module) -> "LogSyntax":
        modules: set[str] = set()
        direct: dict[str, str] = {}
        # imports are statements: walking statements only is several times cheaper
        # than ast.walk over every expression of the file
        stack: list[ast.stmt] = list(tree.body)
        while stack:
            node = stack.pop()
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in _FLOR_MODULES:
                        modules.add(alias.asname or alias.name)
            elif isinstance(node, ast.ImportFrom) and node.module in _FLOR_MODULES and not node.level:
                for alias in node.names:
                    if alias.name != "*":
                        direct[alias.asname or alias.name] = alias.name
            for field in ("body", "orelse", "finalbody", "handlers", "cases"):
                sub = getattr(node, field, None)
                if isinstance(sub, list):
                    for item in sub:
                        if isinstance(item, ast.stmt):
                            stack.append(item)
                        elif hasattr(item, "body"):  # except handlers, match cases
                            stack.extend(item.body)
        logs = {k for k, v in direct.items() if v == "log"}
        loops = {k for k, v in direct.items() if v == "loop"}
        if not modules and not logs:
            # A snippet without imports: assume the documented spelling.
            modules.add("flor")
        return cls(frozenset(modules), frozenset(logs), frozenset(loops), tuple(sorted(direct.items())))

    @cached_property  # frozen dataclass: cached_property writes __dict__ directly
    def direct_map(self) -> dict[str, str]:
        return dict(self.direct)

    def verb_of(self, func: ast.AST) -> str | None:
        """``"log"`` for ``flor.log``/``fr.log``/an imported ``log``; None for other callees."""
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id in self.modules:
            return func.attr
        if isinstance(func, ast.Name):
            return self.direct_map.get(func.id)
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


def parse_ast(code: str, which: str) -> ast.Module:
    if not isinstance(code, str):
        raise PropagationError(f"{which} must be a str of Python code, got {type(code).__name__}")
    try:
        return ast.parse(code)
    except SyntaxError as exc:
        raise PropagationError(
            f"cannot parse the {which} file: syntax error at line {exc.lineno}: {exc.msg}; "
            f"fix the {which} version before propagating"
        ) from exc


def parse_cst(code: str, which: str) -> cst.Module:
    try:
        return cst.parse_module(code)
    except cst.ParserSyntaxError as exc:
        raise PropagationError(
            f"cannot parse the {which} file with libcst: syntax error at line {exc.raw_line}: "
            f"{exc.message}"
        ) from exc

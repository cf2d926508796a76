"""The analyzer: one pass over a parsed script, composed of the package's parts.

:func:`analyze` parses; :class:`Analyzer` summarises the script's functions, walks
the driver (the module, with the function that holds the outer loop inlined),
classifies its units into regions and computes the need of every log site.
"""

from __future__ import annotations

from collections import defaultdict

import libcst as cst
from libcst.metadata import MetadataWrapper, PositionProvider

from flor_ray.errors import PlanningError

from .calls import FlorCalls, Imported, imported_cst
from .needs import Needs
from .results import LogSite, Need, ScriptAnalysis, combine
from .slicing import Slicing
from .summaries import fixpoint
from .units import Summary, Unit, Walker

__all__ = ["analyze"]


def analyze(source: str, *, filename: str = "<script>") -> ScriptAnalysis:
    """Analyse a (patched) training script; see the module docstring for the model."""
    try:
        module = cst.parse_module(source)
    except cst.ParserSyntaxError as exc:
        raise PlanningError(
            f"cannot analyse {filename}: it does not parse ({exc.message} at line {exc.raw_line}); "
            "fix the script or the propagated patch first"
        ) from exc
    return Analyzer(module, filename).run()


class Declarations(cst.CSTVisitor):
    """One pass over the module: its imports (import-bound names), defs and ``with`` statements.

    Methods (defs directly in a class body) are listed in ``all`` but are not
    ``callable`` by a bare name.
    """

    def __init__(self) -> None:
        self.imported: list[Imported] = []
        self.modules: set[str] = set()
        self.stack: list[str] = []
        self.callable: dict[str, list[cst.FunctionDef]] = defaultdict(list)
        self.all: list[cst.FunctionDef] = []
        self.withs: list[cst.With] = []

    def visit_With(self, node: cst.With) -> None:
        self.withs.append(node)

    def visit_Import(self, node: cst.Import) -> None:
        self._imports(node)

    def visit_ImportFrom(self, node: cst.ImportFrom) -> None:
        self._imports(node)

    def _imports(self, node: cst.Import | cst.ImportFrom) -> None:
        found = imported_cst(node)
        self.imported += found
        self.modules |= {i.bound for i in found}

    def visit_ClassDef(self, node: cst.ClassDef) -> None:
        self.stack.append("class")

    def leave_ClassDef(self, original_node: cst.ClassDef) -> None:
        self.stack.pop()

    def visit_FunctionDef(self, node: cst.FunctionDef) -> None:
        self.all.append(node)
        if not self.stack or self.stack[-1] != "class":
            self.callable[node.name.value].append(node)
        self.stack.append("def")

    def leave_FunctionDef(self, original_node: cst.FunctionDef) -> None:
        self.stack.pop()

    # Expressions hold no imports or defs worth a visit (lambdas aside, which bind nothing we use).
    def visit_SimpleStatementLine(self, node: cst.SimpleStatementLine) -> bool:
        return any(isinstance(s, (cst.Import, cst.ImportFrom)) for s in node.body)


class Analyzer(Needs, Slicing):
    """One analysis of one module: summaries, the driver walk, regions, then the needs."""

    def __init__(self, module: cst.Module, filename: str) -> None:
        # The module was parsed here and is never mutated: skipping the defensive deep
        # copy halves the cost of metadata resolution on a typical script.
        self.wrapper = MetadataWrapper(module, unsafe_skip_copy=True)
        self.module = self.wrapper.module
        self.filename = filename
        self.positions = self.wrapper.resolve(PositionProvider)
        found = Declarations()
        self.module.visit(found)
        self.calls = FlorCalls.from_imports(found.imported)
        self.modules = found.modules
        self.flor_names = self.calls.names
        self.callable: dict[str, list[cst.FunctionDef]] = dict(found.callable)
        self.all_functions = found.all
        self.withs = found.withs
        self.summaries: dict[str, Summary] = {}
        self._walks: dict[int, Walker] = {}

    # -- helpers
    def line(self, node: cst.CSTNode) -> int:
        try:
            return self.positions[node].start.line
        except KeyError:
            return 0

    def code(self, node: cst.CSTNode | None) -> str:
        if node is None:
            return ""
        try:
            text = self.module.code_for_node(node).strip().splitlines()[0]
        except (IndexError, Exception):  # noqa: BLE001 - a display string only
            return ""
        return text if len(text) <= 60 else text[:57] + "..."

    def api(self, func: cst.BaseExpression) -> str | None:
        """``"log"``/``"loop"``/... when ``func`` names a flor_ray function."""
        return self.calls.verb_of_cst(func)

    def is_module(self, name: str) -> bool:
        return name in self.modules or name in self.flor_names

    # -- main
    def run(self) -> ScriptAnalysis:
        fixpoint(self)
        drv = Walker(self, driver=True)
        drv.walk(self.module.body, (), (), (), None, ())
        self.drv = drv
        self.units = drv.units
        self.outer = drv.outer
        self.checkpointed = self._checkpointed()
        self.ckpt_names = frozenset(c for c in self.checkpointed if c.isidentifier())
        for u in self.units:
            if u.backward:  # gradients of the checkpointed models (which the next step applies)
                u.weak = u.weak | self.ckpt_names
        self.defs: dict[str, list[Unit]] = defaultdict(list)
        for u in self.units:
            for n in u.strong | u.weak:
                self.defs[n].append(u)
        self._regions()

        sites: list[LogSite] = []
        per_name: dict[str, list[tuple[Need, int]]] = defaultdict(list)
        order: list[str] = []
        for u in self.units:
            for name, line, vuses in u.logs:
                sites.append(LogSite(name, line, u.flor_path, u.function))
                if name is None:
                    continue
                if name not in per_name:
                    order.append(name)
                per_name[name].append((self._need_at(u, vuses, name, line), line))
        for fdef in self.all_functions:
            fname = fdef.name.value
            if fname in drv.inlined:
                continue
            for u in self._fwalk(fdef).units:
                in_loop = any(br == "loop" for _, br in u.chain)
                for name, line, _ in u.logs:
                    paths = self._paths(fname, frozenset())
                    path = next(iter(paths)) + u.flor_path if len(paths) == 1 else None
                    sites.append(LogSite(name, line, path, fname))
                    if name is None:
                        continue
                    if name not in per_name:
                        order.append(name)
                    per_name[name].append((self._need_in_function(fname, name, line, in_loop, bool(u.flor_path)), line))
        sites.sort(key=lambda s: s.line)
        needs = tuple((name, combine(name, per_name[name])) for name in order)
        return ScriptAnalysis(
            outer_loop=self.outer.name if self.outer else None,
            checkpointed=self.checkpointed,
            sites=tuple(sites),
            loop_carried=self._loop_carried(),
            needs=needs,
            filename=self.filename,
            training_carried=self._training_carried(),
        )

    def _checkpointed(self) -> tuple[str, ...]:
        """Expressions passed to ``with flor.checkpointing(...)``, in order, deduplicated."""
        out: list[str] = []
        for node in self.withs:
            for item in node.items:
                call = item.item
                if isinstance(call, cst.Call) and self.api(call.func) == "checkpointing":
                    for arg in call.args:
                        text = self.module.code_for_node(arg.value).strip()
                        if not arg.star and text not in out:
                            out.append(text)
        return tuple(out)

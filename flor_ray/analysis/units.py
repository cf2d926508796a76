"""Linearising a script into units: simple statements and compound-statement headers.

Every unit knows the names it reads, the names it rebinds (*strong* definitions,
which kill older values) and the objects it may mutate (*weak* definitions), the
chain of enclosing branches and loops, and the ``flor.log`` calls it holds.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import libcst as cst

from .scan import MUTATORS, SETTERS, Scan, first_arg, last_name, root_of, scan_of, str_literal, target_names, value_args

if TYPE_CHECKING:
    from .analyzer import Analyzer


@dataclass
class Summary:
    """What calling a script function does, as seen from its caller."""

    params: tuple[str, ...] = ()
    star_params: bool = False
    free_reads: frozenset[str] = frozenset()
    mutated_params: frozenset[str] = frozenset()
    mutated_free: frozenset[str] = frozenset()
    reads_grad: bool = False
    has_loop: bool = False
    callees: frozenset[str] = frozenset()
    backward: bool = False
    #: dotted callees outside the script (``utils.evaluate``, ``Net``), transitively
    ext_calls: frozenset[str] = frozenset()


@dataclass
class Unit:
    """A simple statement or compound-statement header, in execution order."""

    pos: int
    line: int
    chain: tuple[tuple[int, str], ...]
    guards: tuple[int, ...]
    function: str | None
    flor_path: tuple[str, ...]
    uses: frozenset[str] = frozenset()
    strong: frozenset[str] = frozenset()
    weak: frozenset[str] = frozenset()
    grad: bool = False
    callees: frozenset[str] = frozenset()  # direct calls of script functions
    all_callees: frozenset[str] = frozenset()  # transitive
    calls_loop: bool = False  # calls a script function that runs a flor.loop
    flor_loop_call: bool = False
    backward: bool = False  # calls .backward(): writes the gradients of every checkpointed model
    node: cst.CSTNode | None = None  # rendered lazily, only for the reasons that quote it
    logs: tuple[tuple[str | None, int, frozenset[str]], ...] = ()
    #: dotted names of the calls of functions the script does not define (``utils.evaluate``,
    #: ``Net``, ``model``), its callees' included: what :mod:`.project` resolves into modules
    ext_calls: frozenset[str] = frozenset()


@dataclass
class Loop:
    id: int
    flor: bool
    name: str | None
    start: int
    end: int
    line: int


class Walker:
    """Linearises statements into :class:`Unit` values.

    In driver mode it also finds the outer loop and inlines the function that holds
    it at its call, so that one sequence covers setup, the loop and what follows.
    """

    def __init__(self, an: Analyzer, *, driver: bool) -> None:
        self.an = an
        self.driver = driver
        self.units: list[Unit] = []
        self.loops: dict[int, Loop] = {}
        self.outer: Loop | None = None
        self.outer_targets: frozenset[str] = frozenset()
        self.loop_targets: dict[int, frozenset[str]] = {}  # a for loop's target names (a step loop's outer)
        self.inlined: set[str] = set()
        self._ids = itertools.count()
        #: names bound to a part of another object (``g`` in ``for g in opt.param_groups``,
        #: ``params = model.parameters()``): mutating them mutates that object
        self.alias: dict[str, str] = {}

    # -- statements
    def walk(
        self,
        body: Sequence[cst.BaseStatement],
        chain: tuple[tuple[int, str], ...],
        guards: tuple[int, ...],
        path: tuple[str, ...],
        function: str | None,
        stack: tuple[str, ...],
    ) -> None:
        for stmt in body:
            self._stmt(stmt, chain, guards, path, function, stack)

    def _block(self, node: cst.BaseSuite) -> Sequence[cst.BaseStatement]:
        if isinstance(node, cst.IndentedBlock):
            return node.body
        return [cst.SimpleStatementLine(body=node.body)] if isinstance(node, cst.SimpleStatementSuite) else []

    def _stmt(self, stmt, chain, guards, path, function, stack) -> None:
        if isinstance(stmt, cst.SimpleStatementLine):
            self._line(stmt, chain, guards, path, function, stack)
        elif isinstance(stmt, cst.If):
            self._if(stmt, chain, guards, path, function, stack)
        elif isinstance(stmt, cst.For):
            self._for(stmt, chain, guards, path, function, stack)
        elif isinstance(stmt, cst.While):
            self._while(stmt, chain, guards, path, function, stack)
        elif isinstance(stmt, cst.With):
            self._with(stmt, chain, guards, path, function, stack)
        elif isinstance(stmt, (cst.Try, cst.TryStar)):
            self._try(stmt, chain, guards, path, function, stack)
        elif isinstance(stmt, (cst.FunctionDef, cst.ClassDef)):
            self._add(stmt, chain, guards, path, function, strong=frozenset({stmt.name.value}), node_for_line=stmt, scan=Scan())
        else:  # match statements and anything newer: one opaque unit, reads and may mutate all it names
            scan = scan_of(stmt)
            self._add(stmt, chain, guards, path, function, scan=scan, weak=frozenset(scan.loads), node_for_line=stmt)

    def _line(self, stmt: cst.SimpleStatementLine, chain, guards, path, function, stack) -> None:
        for small in stmt.body:
            target = self._inline_target(small, stack)
            if target is not None:
                scan = scan_of(small)
                self._add(small, chain, guards, path, function, uses=frozenset(scan.loads), node_for_line=small)
                self.inlined.add(target)
                fdef = self.an.callable[target][0]
                self.walk(self._block(fdef.body), chain, guards, path, target, stack + (target,))
            else:
                self._small(small, chain, guards, path, function)

    def _if(self, stmt: cst.If, chain, guards, path, function, stack) -> None:
        test = self._expr_unit(stmt.test, stmt, chain, guards, path, function)
        cid = next(self._ids)
        self.walk(self._block(stmt.body), chain + ((cid, "if"),), guards + (test,), path, function, stack)
        if isinstance(stmt.orelse, cst.If):
            self._stmt(stmt.orelse, chain + ((cid, "else"),), guards + (test,), path, function, stack)
        elif isinstance(stmt.orelse, cst.Else):
            self.walk(self._block(stmt.orelse.body), chain + ((cid, "else"),), guards + (test,), path, function, stack)

    def _for(self, stmt: cst.For, chain, guards, path, function, stack) -> None:
        an = self.an
        scan = scan_of(stmt.iter)
        loop_name, is_flor = None, False
        for call in scan.calls:
            if an.api(call.func) == "loop":
                is_flor = True
                arg = first_arg(call)
                loop_name = str_literal(arg) if arg is not None else None
                break
        it = self._add(stmt.iter, chain, guards, path, function, scan=scan, node_for_line=stmt)
        cid = next(self._ids)
        inner_path = path + ((loop_name or "?"),) if is_flor else path
        loop = Loop(cid, is_flor, loop_name, it, it, an.line(stmt))
        self.loops[cid] = loop
        is_outer = self.driver and is_flor and self.outer is None
        if is_outer:
            self.outer = loop
        body_chain = chain + ((cid, "loop"),)
        tgt = self._add(
            stmt.target, body_chain, guards + (it,), inner_path, function,
            uses=frozenset(scan.loads), strong=frozenset(target_names(stmt.target)), node_for_line=stmt,
        )
        self.loop_targets[cid] = self.units[tgt].strong
        if is_outer:
            self.outer_targets = self.units[tgt].strong
        self._bind_alias(stmt.target, stmt.iter)
        self.walk(self._block(stmt.body), body_chain, guards + (it,), inner_path, function, stack)
        loop.end = len(self.units) - 1
        if stmt.orelse is not None:
            self.walk(self._block(stmt.orelse.body), chain + ((cid, "else"),), guards + (it,), path, function, stack)

    def _while(self, stmt: cst.While, chain, guards, path, function, stack) -> None:
        cid = next(self._ids)
        body_chain = chain + ((cid, "loop"),)
        test = self._expr_unit(stmt.test, stmt, body_chain, guards, path, function)
        loop = Loop(cid, False, None, test, test, self.an.line(stmt))
        self.loops[cid] = loop
        self.walk(self._block(stmt.body), body_chain, guards + (test,), path, function, stack)
        loop.end = len(self.units) - 1
        if stmt.orelse is not None:
            self.walk(self._block(stmt.orelse.body), chain + ((cid, "else"),), guards + (test,), path, function, stack)

    def _with(self, stmt: cst.With, chain, guards, path, function, stack) -> None:
        step: cst.Call | None = None
        for item in stmt.items:
            scan = scan_of(item.item)
            strong = frozenset(target_names(item.asname.name)) if item.asname else frozenset()
            self._add(item.item, chain, guards, path, function, scan=scan, strong=strong, node_for_line=stmt)
            if isinstance(item.item, cst.Call) and self.an.api(item.item.func) == "iteration":
                step = item.item
        if step is not None:
            self._iteration(stmt, step, chain, guards, path, function, stack)
        else:
            self.walk(self._block(stmt.body), chain, guards, path, function, stack)

    def _iteration(self, stmt: cst.With, call: cst.Call, chain, guards, path, function, stack) -> None:
        """``with flor.iteration(name, ...):``: one iteration of a loop the script drives.

        Outside any flor loop, the loop that repeats the block (the innermost enclosing
        ``while``/``for``) is the outer loop, named after the iteration: its back edges
        carry the values from step to step, and the code of its body outside the block
        runs in every iteration of a replay, skipped or not. A block that no loop
        repeats (one training step in a function the script calls per step) is a loop
        of its own. Nested in a flor loop, the block only names its logs' context: a
        replay runs its body like any plain loop's."""
        arg = first_arg(call)
        name = (str_literal(arg) if arg is not None else None) or "?"
        body_chain = chain
        if not path:  # no flor loop around it
            enclosing = [cid for cid, br in chain if br == "loop"]
            if enclosing:
                loop = self.loops[enclosing[-1]]
            else:
                cid = next(self._ids)
                start = len(self.units)
                loop = Loop(cid, False, None, start, start, self.an.line(stmt))
                self.loops[cid] = loop
                body_chain = chain + ((cid, "loop"),)
            loop.flor, loop.name = True, name
            if self.driver and self.outer is None:
                self.outer = loop
                self.outer_targets = self.loop_targets.get(loop.id, frozenset())
        self.walk(self._block(stmt.body), body_chain, guards, path + (name,), function, stack)
        if body_chain is not chain:
            self.loops[body_chain[-1][0]].end = len(self.units) - 1

    def _try(self, stmt: cst.Try | cst.TryStar, chain, guards, path, function, stack) -> None:
        self.walk(self._block(stmt.body), chain, guards, path, function, stack)
        cid = next(self._ids)
        for i, handler in enumerate(stmt.handlers):
            hchain = chain + ((cid, f"except{i}"),)
            strong = frozenset(target_names(handler.name.name)) if handler.name else frozenset()
            self._add(handler.type, hchain, guards, path, function, scan=scan_of(handler.type), strong=strong, node_for_line=handler)
            self.walk(self._block(handler.body), hchain, guards, path, function, stack)
        if stmt.orelse is not None:
            self.walk(self._block(stmt.orelse.body), chain + ((cid, "else"),), guards, path, function, stack)
        if stmt.finalbody is not None:
            self.walk(self._block(stmt.finalbody.body), chain, guards, path, function, stack)

    def _inline_target(self, small: cst.BaseSmallStatement, stack: tuple[str, ...]) -> str | None:
        if not self.driver or self.outer is not None:
            return None
        for call in scan_of(small).calls:
            if isinstance(call.func, cst.Name):
                name = call.func.value
                summ = self.an.summaries.get(name)
                if summ and summ.has_loop and name not in stack and len(self.an.callable.get(name, ())) == 1:
                    return name
        return None

    def _expr_unit(self, expr, stmt, chain, guards, path, function) -> int:
        return self._add(expr, chain, guards, path, function, scan=scan_of(expr), node_for_line=stmt)

    def _small(self, small: cst.BaseSmallStatement, chain, guards, path, function) -> None:
        strong: set[str] = set()
        weak: set[str] = set()
        scan = Scan()
        stmt_call: cst.Call | None = None
        if isinstance(small, cst.Assign):
            for t in small.targets:
                self._assign_target(t.target, strong, weak, scan)
            small.value.visit(scan)
            if len(small.targets) == 1:
                self._bind_alias(small.targets[0].target, small.value)
        elif isinstance(small, cst.AnnAssign):
            if small.value is not None:
                self._assign_target(small.target, strong, weak, scan)
                small.value.visit(scan)
        elif isinstance(small, cst.AugAssign):
            if isinstance(small.target, cst.Name):
                strong.add(small.target.value)
                scan.loads.add(small.target.value)
            else:
                self._assign_target(small.target, strong, weak, scan)
            small.value.visit(scan)
        elif isinstance(small, cst.Expr):
            small.value.visit(scan)
            if isinstance(small.value, cst.Call):
                stmt_call = small.value
        elif isinstance(small, (cst.Import, cst.ImportFrom)):
            if isinstance(small, cst.Import):
                for alias in small.names:
                    dotted = cst.helpers.get_full_name_for_node(alias.name) or ""
                    strong.add(alias.asname.name.value if alias.asname and isinstance(alias.asname.name, cst.Name) else dotted.split(".")[0])
            elif not isinstance(small.names, cst.ImportStar):
                for alias in small.names:
                    name = cst.helpers.get_full_name_for_node(alias.name) or ""
                    strong.add(alias.asname.name.value if alias.asname and isinstance(alias.asname.name, cst.Name) else name)
        elif isinstance(small, cst.Del):
            weak |= target_names(small.target)
            small.visit(scan)
        elif isinstance(small, (cst.Global, cst.Nonlocal)):
            pass
        else:
            small.visit(scan)
        self._add(small, chain, guards, path, function, scan=scan, strong=frozenset(strong), weak=frozenset(weak), stmt_call=stmt_call, node_for_line=small)

    def _bind_alias(self, target: cst.BaseExpression, value: cst.BaseExpression) -> None:
        if not isinstance(target, cst.Name):
            return
        root = root_of(value)
        if root is not None and root != target.value and not self.an.is_module(root):
            self.alias[target.value] = self.alias.get(root, root)
        else:
            self.alias.pop(target.value, None)

    def _assign_target(self, node: cst.BaseExpression, strong: set[str], weak: set[str], scan: Scan) -> None:
        if isinstance(node, cst.Name):
            strong.add(node.value)
        elif isinstance(node, (cst.Tuple, cst.List)):
            for el in node.elements:
                self._assign_target(el.value, strong, weak, scan)
        elif isinstance(node, cst.StarredElement):
            self._assign_target(node.value, strong, weak, scan)
        else:  # x[i] = v, obj.attr = v: a mutation of the object `x` / `obj` names
            root = root_of(node)
            if root is not None:
                weak.add(root)
            node.visit(scan)

    # -- units
    def _add(
        self,
        node: cst.CSTNode | None,
        chain,
        guards,
        path,
        function,
        *,
        scan: Scan | None = None,
        uses: frozenset[str] | None = None,
        strong: frozenset[str] = frozenset(),
        weak: frozenset[str] = frozenset(),
        stmt_call: cst.Call | None = None,
        node_for_line: cst.CSTNode,
    ) -> int:
        an = self.an
        pos = len(self.units)
        unit = Unit(pos, an.line(node_for_line), chain, guards, function, path)
        unit.node = node_for_line
        if scan is None:
            unit.uses, unit.strong, unit.weak = uses or frozenset(), strong, weak
            self.units.append(unit)
            return pos
        fx = _Effects(set(scan.loads), set(weak) | scan.walrus, scan.grad)
        for call in scan.calls:
            self._call(call, call is stmt_call, fx, unit)
        weak_s = fx.weak | {self.alias[w] for w in fx.weak if w in self.alias}
        unit.uses = frozenset(fx.loads)
        unit.strong = strong
        unit.weak = frozenset(weak_s - set(an.flor_names))
        unit.backward = fx.backward
        unit.grad = fx.grad
        unit.callees = frozenset(fx.callees)
        unit.all_callees = frozenset(fx.all_callees)
        unit.calls_loop = fx.calls_loop
        unit.logs = tuple(fx.logs)
        unit.ext_calls = frozenset(fx.ext)
        self.units.append(unit)
        return pos

    def _call(self, call: cst.Call, is_stmt: bool, fx: _Effects, unit: Unit) -> None:
        """What one call of a unit reads, writes and logs, added to ``fx``."""
        an = self.an
        api = an.api(call.func)
        if api == "loop":
            unit.flor_loop_call = True
            return
        if api == "log":
            arg = first_arg(call)
            name = str_literal(arg) if arg is not None else None
            vuses: set[str] = set()
            for v in value_args(call):
                vuses |= scan_of(v).loads
            fx.logs.append((name, an.line(call), frozenset(vuses)))
            return
        if api is not None:
            return
        func = call.func
        if isinstance(func, cst.Name) and func.value in an.summaries:
            summ = an.summaries[func.value]
            fx.callees.add(func.value)
            fx.all_callees |= {func.value} | summ.callees
            fx.loads |= summ.free_reads
            fx.weak |= summ.mutated_free
            fx.grad |= summ.reads_grad
            fx.calls_loop |= summ.has_loop
            fx.backward |= summ.backward
            fx.weak |= mutated_args(call, summ)
            fx.ext |= summ.ext_calls
        elif isinstance(func, cst.Name) and func.value == "next" and call.args:
            first = root_of(call.args[0].value)  # next(it) advances the iterator
            if first is not None and not an.is_module(first):
                fx.weak.add(first)
        elif isinstance(func, cst.Attribute):
            self._method_call(call, func, is_stmt, fx)
        if not (isinstance(func, cst.Name) and func.value in an.summaries):
            dotted = dotted_name(func)
            if dotted is not None:
                fx.ext.add(dotted)
                summ = an.project_calls(dotted) if an.project_calls is not None else None
                if summ is not None:  # a def of the project's other modules
                    fx.weak |= mutated_args(call, summ)
        fname = last_name(func)
        if fname and fname.endswith("_") and not fname.startswith("__") and call.args:
            first = root_of(call.args[0].value)
            if first is not None and not an.is_module(first):
                fx.weak.add(first)

    def _method_call(self, call: cst.Call, func: cst.Attribute, is_stmt: bool, fx: _Effects) -> None:
        root = root_of(func.value)
        attr = func.attr.value
        fx.backward |= attr == "backward"
        if root is None or self.an.is_module(root):
            return
        if attr in MUTATORS or is_stmt or (attr.endswith("_") and not attr.startswith("__")):
            fx.weak.add(root)
        if is_stmt and attr in SETTERS:
            # The receiver's old state is not read; keep it only if an argument reads it.
            arg_loads: set[str] = set()
            for a in call.args:
                arg_loads |= scan_of(a.value).loads
            inner = func.value
            while isinstance(inner, cst.Attribute):
                inner = inner.value
            if root not in arg_loads and isinstance(inner, cst.Name):
                fx.loads.discard(root)


@dataclass
class _Effects:
    """What the calls of one unit do, accumulated call by call."""

    loads: set[str]
    weak: set[str]
    grad: bool
    callees: set[str] = field(default_factory=set)
    all_callees: set[str] = field(default_factory=set)
    calls_loop: bool = False
    backward: bool = False
    logs: list[tuple[str | None, int, frozenset[str]]] = field(default_factory=list)
    ext: set[str] = field(default_factory=set)


def dotted_name(node: cst.BaseExpression) -> str | None:
    """``a.b.c`` for a chain of attributes of a name; None for any other callee."""
    parts: list[str] = []
    while isinstance(node, cst.Attribute):
        parts.append(node.attr.value)
        node = node.value
    if not isinstance(node, cst.Name):
        return None
    parts.append(node.value)
    return ".".join(reversed(parts))


def mutated_args(call: cst.Call, summ: Summary) -> set[str]:
    """Caller-side names whose objects a call to a script function may mutate."""
    if not summ.mutated_params:
        return set()
    out: set[str] = set()
    positional = 0
    for arg in call.args:
        root = root_of(arg.value)
        if arg.star:
            if root:
                out.add(root)
            continue
        if arg.keyword is not None:
            param = arg.keyword.value
            if param not in summ.params and summ.star_params and root:  # into **kwargs
                out.add(root)
        else:
            param = summ.params[positional] if positional < len(summ.params) else None
            positional += 1
            if param is None and summ.star_params and root:
                out.add(root)
        if param in summ.mutated_params and root:
            out.add(root)
    return out


"""Static analysis of a training script: how much of it must re-run to compute a log.

The replay engine restores checkpoints taken right after the last inner
``flor.loop`` of each outer iteration. In *skip* mode it runs the outer-level code
of every iteration, skips the inner loops and restores the checkpoint where the
last inner loop would exit; in *re-execute* mode the inner loops run for real from
the nearest checkpoint. Which mode a log statement needs is a question about data
flow, so this module answers it from the source alone (libcst, no execution):

* the script is linearised into *units* (simple statements and compound-statement
  headers) in execution order, with the chain of enclosing branches and loops of
  each unit; the function that holds the outer loop (``main()``...) is inlined at
  its module-level call, so that setup, the loop and the code after it form one
  sequence;
* every unit knows the names it reads, the names it rebinds (*strong* definitions,
  which kill older values) and the objects it may mutate (*weak* definitions:
  ``hist.append(x)``, ``x[i] = v``, ``opt.step()``, calls of script functions that
  mutate their arguments or globals);
* a backward slice from the log statement follows reaching definitions, including
  loop back edges; a definition reached through the outer loop's back edge is a
  *loop-carried* value. Checkpoints capture the plain ones (and generators, loader
  positions); the planner checks that the checkpoints it restores hold every
  carried name the statement reads and, when iterations re-execute, every one the
  training code reads (:attr:`ScriptAnalysis.training_carried`: the slice of each
  write of checkpointed state, where ``loss.backward()`` writes the models'
  gradients and ``g["lr"] = lr`` in ``for g in opt.param_groups`` writes ``opt``);
* skip mode restores a checkpoint where the last inner loop exits (at the end of
  an iteration without inner loops); outer-level code before that point runs on
  state nothing restored, so a statement there that reads checkpointed or
  loop-carried state re-executes the iteration from the checkpoint before it.

Everything here errs towards re-execution: skipping wrongly yields wrong values,
re-executing wrongly only costs time. Each :class:`Need` says why in a sentence
that ``explain()`` can print.
"""

from __future__ import annotations

import functools

import builtins
import itertools
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Literal, Mapping, Sequence

import libcst as cst
import libcst.helpers  # noqa: F401 - cst.helpers.get_full_name_for_node
from libcst.metadata import MetadataWrapper, PositionProvider

from flor_ray.errors import PlanningError, QueryError

__all__ = [
    "LogSite",
    "Need",
    "NeedKind",
    "ScriptAnalysis",
    "UnknownLogNameError",
    "analyze",
]

NeedKind = Literal["setup", "outer", "after", "inner"]

#: How demanding each kind is, for a name logged at several sites. "after" ranks
#: above "outer" because it needs every iteration (in skip mode) and the code after
#: the loop, whereas an "outer" value can be computed per checkpoint segment.
_RANK: Mapping[str, int] = {"setup": 0, "outer": 1, "after": 2, "inner": 3}

#: Attribute or function names whose use reads gradients, which state_dicts omit.
_GRAD_NAMES = frozenset({"grad", "clip_grad_norm_", "clip_grad_value_", "clip_grad_norm", "clip_grad_value"})
#: Names containing "grad" that do not read gradient values.
_NOT_GRAD_READS = frozenset(
    {"no_grad", "enable_grad", "set_grad_enabled", "zero_grad", "requires_grad", "requires_grad_"}
)
#: Methods that mutate their receiver even when their result is used.
_MUTATORS = frozenset(
    {
        "append", "extend", "insert", "update", "pop", "popitem", "add", "remove", "discard",
        "clear", "setdefault", "sort", "reverse", "step", "backward", "load_state_dict",
        "put", "push", "appendleft", "extendleft", "write", "fill_", "send",
        # reading advances a file or an iterator: the next read depends on this one
        "next", "__next__", "read", "readline", "readlines", "seek", "truncate",
    }
)
#: Methods that set their receiver's state from their arguments only: the call does
#: not read the previous state, so it makes nothing loop-carried by itself.
_SETTERS = frozenset({"train", "eval", "zero_grad", "set_epoch", "requires_grad_"})


class UnknownLogNameError(QueryError, KeyError):
    """A name passed to :meth:`ScriptAnalysis.need` that no ``flor.log`` call logs."""

    def __init__(self, name: str, logged: Sequence[str], filename: str = "<script>"):
        self.name, self.logged, self.filename = name, tuple(logged), filename
        known = ", ".join(repr(n) for n in self.logged) or "none"
        ValueError.__init__(
            self,
            f"no flor.log({name!r}, ...) in {filename}; the names logged there are: {known}. "
            "Add the statement to the script (or propagate it) before planning a replay of it",
        )

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0])


@dataclass(frozen=True)
class LogSite:
    """One ``flor.log`` call.

    ``loop_path`` lists the enclosing ``flor.loop`` names, outermost first; for a call
    inside a function it is the path at the function's call site, or ``None`` when the
    function is called from several loop contexts or from nowhere that flor_ray sees.
    ``name`` is ``None`` when the log name is not a string literal.
    """

    name: str | None
    line: int
    loop_path: tuple[str, ...] | None
    function: str | None


@dataclass(frozen=True)
class Need:
    """What a replay must execute to compute one logged name.

    ``kind``: "setup" (run up to the outer loop), "outer" (skip mode: inner loops
    skipped, checkpoint restored), "after" (after the outer loop, skip mode) or
    "inner" (inner loops must re-execute). ``reads``: the names the backward slice
    reads. ``carried``: loop-carried names in that slice; a mid-run checkpoint cannot
    restore them, so the planner must replay from the first iteration.
    """

    kind: NeedKind
    reason: str
    reads: tuple[str, ...] = ()
    carried: tuple[str, ...] = ()


@dataclass(frozen=True)
class ScriptAnalysis:
    """The result of :func:`analyze`: a picklable value, independent of libcst trees."""

    outer_loop: str | None
    checkpointed: tuple[str, ...]
    sites: tuple[LogSite, ...]
    loop_carried: tuple[str, ...]
    needs: tuple[tuple[str, Need], ...] = field(default=(), repr=False)
    filename: str = "<script>"
    #: loop-carried names that the training code reads (the backward slice of every
    #: write of checkpointed state in the outer loop): a replay that re-executes
    #: iterations from a mid-run checkpoint must restore them
    training_carried: tuple[str, ...] = ()

    @property
    def logged_names(self) -> tuple[str, ...]:
        """Literal log names, in order of first appearance."""
        return tuple(name for name, _ in self.needs)

    def need(self, name: str) -> Need:
        """The most demanding need over every site that logs ``name``."""
        for logged, need in self.needs:
            if logged == name:
                return need
        raise UnknownLogNameError(name, self.logged_names, self.filename)


def analyze(source: str, *, filename: str = "<script>") -> ScriptAnalysis:
    """Analyse a (patched) training script; see the module docstring for the model."""
    try:
        module = cst.parse_module(source)
    except cst.ParserSyntaxError as exc:
        raise PlanningError(
            f"cannot analyse {filename}: it does not parse ({exc.message} at line {exc.raw_line}); "
            "fix the script or the propagated patch first"
        ) from exc
    return _Analyzer(module, filename).run()


# --------------------------------------------------------------------------- internals


@dataclass
class _Summary:
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


@dataclass
class _Unit:
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


@dataclass
class _Loop:
    id: int
    flor: bool
    name: str | None
    start: int
    end: int
    line: int


class _Scan(cst.CSTVisitor):
    """Names read by an expression, its calls, ``.grad`` reads and walrus targets."""

    def __init__(self) -> None:
        self.loads: set[str] = set()
        self.walrus: set[str] = set()
        self.grad = False
        self.calls: list[cst.Call] = []

    def visit_Name(self, node: cst.Name) -> bool:
        self.loads.add(node.value)
        return False

    def visit_Attribute(self, node: cst.Attribute) -> bool:
        if node.attr.value in _GRAD_NAMES:
            self.grad = True
        node.value.visit(self)
        return False

    def visit_Arg(self, node: cst.Arg) -> bool:
        node.value.visit(self)
        return False

    def visit_Call(self, node: cst.Call) -> bool:
        self.calls.append(node)
        fname = _last_name(node.func)
        if fname and "grad" in fname and fname not in _NOT_GRAD_READS:
            self.grad = True
        return True

    def visit_NamedExpr(self, node: cst.NamedExpr) -> bool:
        self.walrus.update(_target_names(node.target))
        node.value.visit(self)
        return False

    def _scoped(self, node: cst.CSTNode, bound: set[str]) -> bool:
        sub = _Scan()
        for child in node.children:
            child.visit(sub)
        self.loads |= sub.loads - bound
        self.walrus |= sub.walrus
        self.grad |= sub.grad
        self.calls += sub.calls
        return False

    def _comp(self, node: cst.CSTNode, for_in: cst.CompFor) -> bool:
        bound: set[str] = set()
        comp: cst.CompFor | None = for_in
        while comp is not None:
            bound |= _target_names(comp.target)
            comp = comp.inner_for_in
        return self._scoped(node, bound)

    def visit_ListComp(self, node: cst.ListComp) -> bool:
        return self._comp(node, node.for_in)

    def visit_SetComp(self, node: cst.SetComp) -> bool:
        return self._comp(node, node.for_in)

    def visit_GeneratorExp(self, node: cst.GeneratorExp) -> bool:
        return self._comp(node, node.for_in)

    def visit_DictComp(self, node: cst.DictComp) -> bool:
        return self._comp(node, node.for_in)

    def visit_Lambda(self, node: cst.Lambda) -> bool:
        ps = node.params
        bound = {p.name.value for p in (*ps.posonly_params, *ps.params, *ps.kwonly_params)}
        for star in (ps.star_arg, ps.star_kwarg):
            if isinstance(star, cst.Param):
                bound.add(star.name.value)
        return self._scoped(node, bound)


def _scan(node: cst.CSTNode | None) -> _Scan:
    scan = _Scan()
    if node is not None:
        node.visit(scan)
    return scan


def _last_name(node: cst.BaseExpression) -> str | None:
    if isinstance(node, cst.Name):
        return node.value
    if isinstance(node, cst.Attribute):
        return node.attr.value
    return None


def _root(node: cst.BaseExpression) -> str | None:
    """The variable an expression hangs off: ``a`` for ``a.b[0].c()``.

    A method's result is taken to alias its receiver (``model.parameters()``), but
    the result of calling a bare name is a fresh value: ``criterion(out, y)`` in
    ``criterion(out, y).backward()`` is not a mutation of ``criterion``.
    """
    while True:
        if isinstance(node, cst.Name):
            return node.value
        if isinstance(node, (cst.Attribute, cst.Subscript)):
            node = node.value
        elif isinstance(node, cst.Call) and not isinstance(node.func, cst.Name):
            node = node.func
        else:
            return None


def _target_names(node: cst.CSTNode) -> set[str]:
    if isinstance(node, cst.Name):
        return {node.value}
    if isinstance(node, (cst.Tuple, cst.List)):
        out: set[str] = set()
        for el in node.elements:
            out |= _target_names(el.value)
        return out
    if isinstance(node, cst.StarredElement):
        return _target_names(node.value)
    return set()


def _str_literal(node: cst.BaseExpression) -> str | None:
    if isinstance(node, cst.SimpleString):
        value = node.evaluated_value
        return value if isinstance(value, str) else None
    if isinstance(node, cst.ConcatenatedString):
        value = node.evaluated_value
        return value if isinstance(value, str) else None
    return None


def _first_arg(call: cst.Call) -> cst.BaseExpression | None:
    for arg in call.args:
        if arg.keyword is None and not arg.star:
            return arg.value
        if arg.keyword is not None and arg.keyword.value == "name":
            return arg.value
    return None


def _value_args(call: cst.Call) -> list[cst.BaseExpression]:
    """The arguments of ``flor.log(name, value)`` other than the name."""
    out, positional = [], 0
    for arg in call.args:
        if arg.keyword is None and not arg.star:
            positional += 1
            if positional == 1:
                continue
        elif arg.keyword is not None and arg.keyword.value == "name":
            continue
        out.append(arg.value)
    return out


class _Declarations(cst.CSTVisitor):
    """One pass over the module: how it refers to flor_ray, import-bound names, defs.

    Methods (defs directly in a class body) are listed in ``all`` but are not
    ``callable`` by a bare name.
    """

    def __init__(self) -> None:
        self.aliases: set[str] = set()
        self.direct: dict[str, str] = {}
        self.modules: set[str] = set()
        self.saw_flor = False
        self.stack: list[str] = []
        self.callable: dict[str, list[cst.FunctionDef]] = defaultdict(list)
        self.all: list[cst.FunctionDef] = []
        self.withs: list[cst.With] = []

    def visit_With(self, node: cst.With) -> None:
        self.withs.append(node)

    def visit_Import(self, node: cst.Import) -> None:
        for alias in node.names:
            dotted = cst.helpers.get_full_name_for_node(alias.name) or ""
            bound = alias.asname.name.value if alias.asname and isinstance(alias.asname.name, cst.Name) else dotted.split(".")[0]
            self.modules.add(bound)
            if dotted == "flor_ray":
                self.saw_flor = True
                self.aliases.add(bound)

    def visit_ImportFrom(self, node: cst.ImportFrom) -> None:
        mod = cst.helpers.get_full_name_for_node(node.module) if node.module else ""
        if isinstance(node.names, cst.ImportStar):
            return
        for alias in node.names:
            name = cst.helpers.get_full_name_for_node(alias.name) or ""
            bound = alias.asname.name.value if alias.asname and isinstance(alias.asname.name, cst.Name) else name
            self.modules.add(bound)
            if mod == "flor_ray":
                self.saw_flor = True
                self.direct[bound] = name

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


class _Walker:
    """Linearises statements into :class:`_Unit` values.

    In driver mode it also finds the outer loop and inlines the function that holds
    it at its call, so that one sequence covers setup, the loop and what follows.
    """

    def __init__(self, an: _Analyzer, *, driver: bool) -> None:
        self.an = an
        self.driver = driver
        self.units: list[_Unit] = []
        self.loops: dict[int, _Loop] = {}
        self.outer: _Loop | None = None
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

    def _stmt(self, stmt, chain, guards, path, function, stack) -> None:  # noqa: C901 - one dispatch
        an = self.an
        if isinstance(stmt, cst.SimpleStatementLine):
            for small in stmt.body:
                target = self._inline_target(small, stack)
                if target is not None:
                    scan = _scan(small)
                    self._add(small, chain, guards, path, function, uses=frozenset(scan.loads), node_for_line=small)
                    self.inlined.add(target)
                    fdef = an.callable[target][0]
                    self.walk(self._block(fdef.body), chain, guards, path, target, stack + (target,))
                else:
                    self._small(small, chain, guards, path, function)
        elif isinstance(stmt, cst.If):
            test = self._expr_unit(stmt.test, stmt, chain, guards, path, function)
            cid = next(self._ids)
            self.walk(self._block(stmt.body), chain + ((cid, "if"),), guards + (test,), path, function, stack)
            if isinstance(stmt.orelse, cst.If):
                self._stmt(stmt.orelse, chain + ((cid, "else"),), guards + (test,), path, function, stack)
            elif isinstance(stmt.orelse, cst.Else):
                self.walk(self._block(stmt.orelse.body), chain + ((cid, "else"),), guards + (test,), path, function, stack)
        elif isinstance(stmt, cst.For):
            scan = _scan(stmt.iter)
            loop_name, is_flor = None, False
            for call in scan.calls:
                if an.api(call.func) == "loop":
                    is_flor = True
                    arg = _first_arg(call)
                    loop_name = _str_literal(arg) if arg is not None else None
                    break
            it = self._add(stmt.iter, chain, guards, path, function, scan=scan, node_for_line=stmt)
            cid = next(self._ids)
            inner_path = path + ((loop_name or "?"),) if is_flor else path
            loop = _Loop(cid, is_flor, loop_name, it, it, an.line(stmt))
            self.loops[cid] = loop
            is_outer = self.driver and is_flor and self.outer is None
            if is_outer:
                self.outer = loop
            body_chain = chain + ((cid, "loop"),)
            tgt = self._add(
                stmt.target, body_chain, guards + (it,), inner_path, function,
                uses=frozenset(scan.loads), strong=frozenset(_target_names(stmt.target)), node_for_line=stmt,
            )
            self.loop_targets[cid] = self.units[tgt].strong
            if is_outer:
                self.outer_targets = self.units[tgt].strong
            self._bind_alias(stmt.target, stmt.iter)
            self.walk(self._block(stmt.body), body_chain, guards + (it,), inner_path, function, stack)
            loop.end = len(self.units) - 1
            if stmt.orelse is not None:
                self.walk(self._block(stmt.orelse.body), chain + ((cid, "else"),), guards + (it,), path, function, stack)
        elif isinstance(stmt, cst.While):
            cid = next(self._ids)
            body_chain = chain + ((cid, "loop"),)
            test = self._expr_unit(stmt.test, stmt, body_chain, guards, path, function)
            loop = _Loop(cid, False, None, test, test, an.line(stmt))
            self.loops[cid] = loop
            self.walk(self._block(stmt.body), body_chain, guards + (test,), path, function, stack)
            loop.end = len(self.units) - 1
            if stmt.orelse is not None:
                self.walk(self._block(stmt.orelse.body), chain + ((cid, "else"),), guards + (test,), path, function, stack)
        elif isinstance(stmt, cst.With):
            self._with(stmt, chain, guards, path, function, stack)
        elif isinstance(stmt, (cst.Try, cst.TryStar)):
            self.walk(self._block(stmt.body), chain, guards, path, function, stack)
            cid = next(self._ids)
            for i, handler in enumerate(stmt.handlers):
                hchain = chain + ((cid, f"except{i}"),)
                strong = frozenset(_target_names(handler.name.name)) if handler.name else frozenset()
                self._add(handler.type, hchain, guards, path, function, scan=_scan(handler.type), strong=strong, node_for_line=handler)
                self.walk(self._block(handler.body), hchain, guards, path, function, stack)
            if stmt.orelse is not None:
                self.walk(self._block(stmt.orelse.body), chain + ((cid, "else"),), guards, path, function, stack)
            if stmt.finalbody is not None:
                self.walk(self._block(stmt.finalbody.body), chain, guards, path, function, stack)
        elif isinstance(stmt, (cst.FunctionDef, cst.ClassDef)):
            self._add(stmt, chain, guards, path, function, strong=frozenset({stmt.name.value}), node_for_line=stmt, scan=_Scan())
        else:  # match statements and anything newer: one opaque unit, reads and may mutate all it names
            scan = _scan(stmt)
            self._add(stmt, chain, guards, path, function, scan=scan, weak=frozenset(scan.loads), node_for_line=stmt)

    def _with(self, stmt: cst.With, chain, guards, path, function, stack) -> None:
        step: cst.Call | None = None
        for item in stmt.items:
            scan = _scan(item.item)
            strong = frozenset(_target_names(item.asname.name)) if item.asname else frozenset()
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
        arg = _first_arg(call)
        name = (_str_literal(arg) if arg is not None else None) or "?"
        body_chain = chain
        if not path:  # no flor loop around it
            enclosing = [cid for cid, br in chain if br == "loop"]
            if enclosing:
                loop = self.loops[enclosing[-1]]
            else:
                cid = next(self._ids)
                start = len(self.units)
                loop = _Loop(cid, False, None, start, start, self.an.line(stmt))
                self.loops[cid] = loop
                body_chain = chain + ((cid, "loop"),)
            loop.flor, loop.name = True, name
            if self.driver and self.outer is None:
                self.outer = loop
                self.outer_targets = self.loop_targets.get(loop.id, frozenset())
        self.walk(self._block(stmt.body), body_chain, guards, path + (name,), function, stack)
        if body_chain is not chain:
            self.loops[body_chain[-1][0]].end = len(self.units) - 1

    def _inline_target(self, small: cst.BaseSmallStatement, stack: tuple[str, ...]) -> str | None:
        if not self.driver or self.outer is not None:
            return None
        for call in _scan(small).calls:
            if isinstance(call.func, cst.Name):
                name = call.func.value
                summ = self.an.summaries.get(name)
                if summ and summ.has_loop and name not in stack and len(self.an.callable.get(name, ())) == 1:
                    return name
        return None

    def _expr_unit(self, expr, stmt, chain, guards, path, function) -> int:
        return self._add(expr, chain, guards, path, function, scan=_scan(expr), node_for_line=stmt)

    def _small(self, small: cst.BaseSmallStatement, chain, guards, path, function) -> None:
        strong: set[str] = set()
        weak: set[str] = set()
        scan = _Scan()
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
            weak |= _target_names(small.target)
            small.visit(scan)
        elif isinstance(small, (cst.Global, cst.Nonlocal)):
            pass
        else:
            small.visit(scan)
        self._add(small, chain, guards, path, function, scan=scan, strong=frozenset(strong), weak=frozenset(weak), stmt_call=stmt_call, node_for_line=small)

    def _bind_alias(self, target: cst.BaseExpression, value: cst.BaseExpression) -> None:
        if not isinstance(target, cst.Name):
            return
        root = _root(value)
        if root is not None and root != target.value and not self.an.is_module(root):
            self.alias[target.value] = self.alias.get(root, root)
        else:
            self.alias.pop(target.value, None)

    def _assign_target(self, node: cst.BaseExpression, strong: set[str], weak: set[str], scan: _Scan) -> None:
        if isinstance(node, cst.Name):
            strong.add(node.value)
        elif isinstance(node, (cst.Tuple, cst.List)):
            for el in node.elements:
                self._assign_target(el.value, strong, weak, scan)
        elif isinstance(node, cst.StarredElement):
            self._assign_target(node.value, strong, weak, scan)
        else:  # x[i] = v, obj.attr = v: a mutation of the object `x` / `obj` names
            root = _root(node)
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
        scan: _Scan | None = None,
        uses: frozenset[str] | None = None,
        strong: frozenset[str] = frozenset(),
        weak: frozenset[str] = frozenset(),
        stmt_call: cst.Call | None = None,
        node_for_line: cst.CSTNode,
    ) -> int:
        an = self.an
        pos = len(self.units)
        unit = _Unit(pos, an.line(node_for_line), chain, guards, function, path)
        unit.node = node_for_line
        if scan is None:
            unit.uses, unit.strong, unit.weak = uses or frozenset(), strong, weak
            self.units.append(unit)
            return pos
        loads = set(scan.loads)
        weak_s = set(weak) | scan.walrus
        grad = scan.grad
        callees: set[str] = set()
        all_callees: set[str] = set()
        calls_loop = False
        backward = False
        logs: list[tuple[str | None, int, frozenset[str]]] = []
        for call in scan.calls:
            api = an.api(call.func)
            if api == "loop":
                unit.flor_loop_call = True
                continue
            if api == "log":
                arg = _first_arg(call)
                name = _str_literal(arg) if arg is not None else None
                vuses: set[str] = set()
                for v in _value_args(call):
                    vuses |= _scan(v).loads
                logs.append((name, an.line(call), frozenset(vuses)))
                continue
            if api is not None:
                continue
            func = call.func
            if isinstance(func, cst.Name) and func.value in an.summaries:
                summ = an.summaries[func.value]
                callees.add(func.value)
                all_callees |= {func.value} | summ.callees
                loads |= summ.free_reads
                weak_s |= summ.mutated_free
                grad |= summ.reads_grad
                calls_loop |= summ.has_loop
                backward |= summ.backward
                weak_s |= _mutated_args(call, summ)
            elif isinstance(func, cst.Name) and func.value == "next" and call.args:
                first = _root(call.args[0].value)  # next(it) advances the iterator
                if first is not None and not an.is_module(first):
                    weak_s.add(first)
            elif isinstance(func, cst.Attribute):
                root = _root(func.value)
                attr = func.attr.value
                is_stmt = call is stmt_call
                backward |= attr == "backward"
                if root is not None and not an.is_module(root):
                    if attr in _MUTATORS or is_stmt or (attr.endswith("_") and not attr.startswith("__")):
                        weak_s.add(root)
                    if is_stmt and attr in _SETTERS:
                        # The receiver's old state is not read; keep it only if an argument reads it.
                        arg_loads: set[str] = set()
                        for a in call.args:
                            arg_loads |= _scan(a.value).loads
                        inner = func.value
                        while isinstance(inner, cst.Attribute):
                            inner = inner.value
                        if root not in arg_loads and isinstance(inner, cst.Name):
                            loads.discard(root)
            fname = _last_name(func)
            if fname and fname.endswith("_") and not fname.startswith("__") and call.args:
                first = _root(call.args[0].value)
                if first is not None and not an.is_module(first):
                    weak_s.add(first)
        weak_s |= {self.alias[w] for w in weak_s if w in self.alias}
        unit.uses = frozenset(loads)
        unit.strong = strong
        unit.weak = frozenset(weak_s - set(an.flor_names))
        unit.backward = backward
        unit.grad = grad
        unit.callees = frozenset(callees)
        unit.all_callees = frozenset(all_callees)
        unit.calls_loop = calls_loop
        unit.logs = tuple(logs)
        self.units.append(unit)
        return pos


def _mutated_args(call: cst.Call, summ: _Summary) -> set[str]:
    """Caller-side names whose objects a call to a script function may mutate."""
    if not summ.mutated_params:
        return set()
    out: set[str] = set()
    positional = 0
    for arg in call.args:
        root = _root(arg.value)
        if arg.star:
            if root:
                out.add(root)
            continue
        if arg.keyword is not None:
            param = arg.keyword.value
        else:
            param = summ.params[positional] if positional < len(summ.params) else None
            positional += 1
            if param is None and summ.star_params and root:
                out.add(root)
        if param in summ.mutated_params and root:
            out.add(root)
    return out


@dataclass
class _Slice:
    reads: set[str] = field(default_factory=set)
    carried: set[str] = field(default_factory=set)
    inner_hits: list[tuple[str, _Unit]] = field(default_factory=list)
    grad_units: list[_Unit] = field(default_factory=list)
    stale: list[tuple[str, _Unit]] = field(default_factory=list)


class _Analyzer:
    def __init__(self, module: cst.Module, filename: str) -> None:
        # The module was parsed here and is never mutated: skipping the defensive deep
        # copy halves the cost of metadata resolution on a typical script.
        self.wrapper = MetadataWrapper(module, unsafe_skip_copy=True)
        self.module = self.wrapper.module
        self.filename = filename
        self.positions = self.wrapper.resolve(PositionProvider)
        found = _Declarations()
        self.module.visit(found)
        self.aliases = found.aliases if found.saw_flor else {"flor"}
        self.direct = found.direct
        self.modules = found.modules
        self.flor_names = frozenset(self.aliases | set(self.direct))
        self.callable: dict[str, list[cst.FunctionDef]] = dict(found.callable)
        self.all_functions = found.all
        self.withs = found.withs
        self.summaries: dict[str, _Summary] = {}
        self._walks: dict[int, _Walker] = {}

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
        if isinstance(func, cst.Attribute) and isinstance(func.value, cst.Name) and func.value.value in self.aliases:
            return func.attr.value
        if isinstance(func, cst.Name) and func.value in self.direct:
            return self.direct[func.value]
        return None

    def is_module(self, name: str) -> bool:
        return name in self.modules or name in self.flor_names

    # -- function summaries
    def _summarize(self, fdef: cst.FunctionDef) -> _Summary:
        walker = _Walker(self, driver=False)
        walker.walk(walker._block(fdef.body), (), (), (), fdef.name.value, ())
        ps = fdef.params
        params = tuple(p.name.value for p in (*ps.posonly_params, *ps.params, *ps.kwonly_params))
        star = isinstance(ps.star_arg, cst.Param) or ps.star_kwarg is not None
        # Locals: parameters and every name the body binds (assignments, loop and
        # with targets, imports, nested defs). libcst's ScopeProvider would give the
        # same sets but costs more than the rest of the analysis together, and
        # comprehension variables are already kept out of ``uses`` by ``_Scan``.
        local: set[str] = set(params)
        for u in walker.units:
            local |= u.strong
        declared: set[str] = set()
        for node in _iter_small(fdef):
            if isinstance(node, (cst.Global, cst.Nonlocal)):
                declared |= {n.name.value for n in node.names}
        local -= declared
        uses: set[str] = set()
        weak: set[str] = set()
        strong: set[str] = set()
        grad = has_loop = backward = False
        callees: set[str] = set()
        for u in walker.units:
            backward |= u.backward
            uses |= u.uses
            weak |= u.weak
            strong |= u.strong
            grad |= u.grad
            has_loop |= u.calls_loop or u.flor_loop_call
            callees |= u.all_callees
        has_loop |= any(loop.flor for loop in walker.loops.values())
        return _Summary(
            params=params,
            star_params=star,
            free_reads=frozenset(n for n in uses - local if not self.is_module(n)),
            mutated_params=frozenset(weak & set(params)),
            mutated_free=frozenset(n for n in (weak - local) | (strong & declared) if not self.is_module(n)),
            reads_grad=grad,
            has_loop=has_loop,
            callees=frozenset(callees),
            backward=backward,
        )

    def _fixpoint(self) -> None:
        """Summaries of calls depend on summaries of callees: iterate until stable."""
        self.summaries = {name: _Summary() for name in self.callable}
        for _ in range(len(self.callable) + 2):
            new: dict[str, _Summary] = {}
            for name, defs in self.callable.items():
                parts = [self._summarize(d) for d in defs]
                merged = parts[0]
                for p in parts[1:]:
                    merged = _Summary(
                        merged.params, merged.star_params or p.star_params,
                        merged.free_reads | p.free_reads, merged.mutated_params | p.mutated_params,
                        merged.mutated_free | p.mutated_free, merged.reads_grad or p.reads_grad,
                        merged.has_loop or p.has_loop, merged.callees | p.callees,
                        merged.backward or p.backward,
                    )
                new[name] = merged
            if new == self.summaries:
                break
            self.summaries = new

    # -- main
    def run(self) -> ScriptAnalysis:
        self._fixpoint()
        drv = _Walker(self, driver=True)
        drv.walk(self.module.body, (), (), (), None, ())
        self.drv = drv
        self.units = drv.units
        self.outer = drv.outer
        self.checkpointed = self._checkpointed()
        self.ckpt_names = frozenset(c for c in self.checkpointed if c.isidentifier())
        for u in self.units:
            if u.backward:  # gradients of the checkpointed models (which the next step applies)
                u.weak = u.weak | self.ckpt_names
        self.defs: dict[str, list[_Unit]] = defaultdict(list)
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
        needs = tuple((name, _combine(name, per_name[name])) for name in order)
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

    def _regions(self) -> None:
        """Classify driver units: setup, outer body (inner or not), after."""
        outer = self.outer
        self.in_body: dict[int, bool] = {}
        self.inner: dict[int, bool] = {}
        self.plain: dict[int, bool] = {}
        spans: list[tuple[int, int]] = []
        for u in self.units:
            body = outer is not None and (outer.id, "loop") in u.chain
            self.in_body[u.pos] = body
            inner_loop = plain_loop = False
            if body:
                after = False
                for cid, br in u.chain:
                    if cid == outer.id:
                        after = True
                        continue
                    if after and br == "loop":
                        if self.drv.loops[cid].flor:
                            inner_loop = True
                        else:
                            plain_loop = True
            self.inner[u.pos] = body and (inner_loop or u.calls_loop)
            self.plain[u.pos] = body and plain_loop and not self.inner[u.pos]
        for loop in self.drv.loops.values():
            if outer is not None and loop.flor and loop.id != outer.id and self.in_body.get(loop.start, False):
                spans.append((loop.start, loop.end))
        for u in self.units:
            if self.in_body[u.pos] and u.calls_loop:
                spans.append((u.pos, u.pos))
        self.first_inner = min((s for s, _ in spans), default=None)
        self.last_inner = max((e for _, e in spans), default=None)

    def _before_restore(self, u: _Unit) -> bool:
        """Outer-level code that skip mode runs before it restores the iteration's
        checkpoint (when the last inner loop exits, or at the iteration's end when
        there is none): it runs on state that nothing restored, and what training it
        does there (``optimizer.step(closure)``, one step of a step loop) starts from
        the wrong weights."""
        if not self.in_body[u.pos] or self.inner[u.pos]:
            return False
        return self.last_inner is None or u.pos < self.last_inner

    def _reaching(self, name: str, u: _Unit) -> tuple[list[_Unit], bool]:
        ds = self.defs.get(name, [])
        kill: _Unit | None = None
        for d in ds:
            if d.pos < u.pos and name in d.strong and u.chain[: len(d.chain)] == d.chain:
                kill = d
        lo = kill.pos if kill is not None else -1
        reach = [d for d in ds if lo <= d.pos < u.pos]
        carried = False
        for cid, br in reversed(u.chain):
            if br != "loop":
                continue
            if kill is not None and (cid, "loop") in kill.chain:
                break
            back = [d for d in ds if d.pos >= u.pos and (cid, "loop") in d.chain]
            reach += back
            if self.outer is not None and cid == self.outer.id and back:
                carried = True
        return reach, carried

    def _relevant(self, name: str) -> bool:
        """Script variables: not modules, not builtins (unless the script rebinds them)."""
        if self.is_module(name):
            return False
        return name in self.defs or not hasattr(builtins, name)

    def _slice(self, seeds: list[tuple[_Unit, frozenset[str]]], start_inner: bool) -> _Slice:
        res = _Slice()
        seen: set[int] = set()
        # Breadth first, so that the first inner-loop hit is the nearest one (the one a reason should name).
        work: deque[tuple[_Unit, frozenset[str]]] = deque()

        def push(u: _Unit, names: frozenset[str]) -> None:
            work.append((u, names))
            for g in u.guards:
                if g not in seen:
                    seen.add(g)
                    push(self.units[g], self.units[g].uses)

        for u, names in seeds:
            seen.add(u.pos)
            push(u, names)
        while work:
            u, names = work.popleft()
            if u.grad:
                res.grad_units.append(u)
            for n in sorted(names):
                if not self._relevant(n):
                    continue
                res.reads.add(n)
                ckpt = n in self.ckpt_names
                if ckpt and not start_inner and self._before_restore(u):
                    res.stale.append((n, u))
                defs, carried = self._reaching(n, u)
                if carried and not ckpt and n not in self.drv.outer_targets and n not in self._aliases_only:
                    res.carried.add(n)
                for d in defs:
                    if self.inner[d.pos]:
                        if ckpt and not start_inner:
                            continue  # restored by the checkpoint
                        if not ckpt:
                            res.inner_hits.append((n, d))
                    if d.pos not in seen:
                        seen.add(d.pos)
                        push(d, d.uses)
        return res

    @functools.cached_property
    def _checkpointed_aliases(self) -> frozenset[str]:
        """Parameters of the script's functions that every call passes a checkpointed
        object: ``def make_step(m, optimizer)`` called as ``make_step(model, opt)``.
        A closure made there that steps ``optimizer`` mutates ``opt`` itself, whose
        state the checkpoint restores; the parameter is no loop-carried value."""
        bound: dict[str, set[str | None]] = defaultdict(set)
        for fname, defs in self.callable.items():
            params = [[p.name.value for p in (*d.params.posonly_params, *d.params.params)] for d in defs]
            for node in _iter_calls(self.module, fname):
                for k, a in enumerate(node.args):
                    where = a.keyword.value if a.keyword else (params[0][k] if params and k < len(params[0]) else None)
                    if where is not None:
                        bound[where].add(a.value.value if isinstance(a.value, cst.Name) else None)
        return frozenset(p for p, args in bound.items() if args and args <= self.ckpt_names)

    @functools.cached_property
    def _aliases_only(self) -> frozenset[str]:
        """Names that cannot be loop-carried values of the scope that runs the outer
        loop: parameters aliasing a checkpointed object that this scope never binds."""
        return self._checkpointed_aliases - frozenset().union(*(u.strong for u in self.units))

    def _loop_carried(self) -> tuple[str, ...]:
        out: set[str] = set()
        for u in self.units:
            if not self.in_body[u.pos]:
                continue
            for n in u.uses:
                if not self._relevant(n) or n in self.ckpt_names or n in self.drv.outer_targets \
                        or n in self._aliases_only:
                    continue
                if self._reaching(n, u)[1]:
                    out.add(n)
        return tuple(sorted(out))

    def _training_carried(self) -> tuple[str, ...]:
        """Loop-carried names that flow into checkpointed state (``lr`` through
        ``g["lr"] = lr``, a batch iterator through ``loss.backward()``)."""
        seeds = [(u, u.uses) for u in self.units if self.in_body[u.pos] and (u.strong | u.weak) & self.ckpt_names]
        return _t(self._slice(seeds, True).carried) if seeds else ()

    # -- needs
    def _where(self, d: _Unit) -> str:
        if d.calls_loop:
            loops = sorted(c for c in d.all_callees if self.summaries.get(c, _Summary()).has_loop)
            return f"in a call of {loops[0] if loops else 'a function'}(), which runs an inner flor.loop"
        names = [self.drv.loops[c].name or "?" for c, br in d.chain if br == "loop" and self.drv.loops[c].flor and self.outer and c != self.outer.id]
        return f"inside the inner loop {names[-1]!r}" if names else "inside an inner loop"

    def _need_at(self, s: _Unit, vuses: frozenset[str], name: str, line: int, label: str | None = None) -> Need:
        """The need of a log statement (or of a call that leads to one) at driver unit ``s``."""
        what = label or f"{name!r} (line {line})"
        outer = self.outer
        if outer is None:
            res = self._slice([(s, vuses)], True)
            return Need("setup", f"{what}: the script has no flor.loop, so replay runs it once, start to end.", _t(res.reads))
        oname = outer.name or "?"
        if not self.in_body[s.pos] and s.pos < outer.start:
            res = self._slice([(s, vuses)], False)
            return Need("setup", f"{what} is logged before the outer loop {oname!r}: replay only runs the script up to that loop.", _t(res.reads))
        body = self.in_body[s.pos]
        if body and (self.inner[s.pos] or self.plain[s.pos]):
            res = self._slice([(s, vuses)], True)
            if self.inner[s.pos]:
                why = f"{what} is logged {self._where(s)}: that loop must re-execute."
            else:
                why = (
                    f"{what} is logged inside a plain (non-flor) loop nested in the outer loop {oname!r}; "
                    "flor_ray cannot tell it from a training loop, so it re-executes to be safe."
                )
            return Need("inner", why + _carried_note(res.carried), _t(res.reads), _t(res.carried))
        res = self._slice([(s, vuses)], False)
        if res.inner_hits:
            n, d = res.inner_hits[0]
            verb = "written" if n in d.strong else "mutated"
            why = (
                f"{what} depends on {n!r}, which is {verb} {self._where(d)} (line {d.line}: {self.code(d.node)}); "
                "skipping that loop would give a wrong value, so the inner loops must re-execute."
            )
            full = self._slice([(s, vuses)], True)
            return Need("inner", why + _carried_note(full.carried), _t(full.reads), _t(full.carried))
        if res.stale:
            n, d = res.stale[0]
            where = "between inner loops" if self.first_inner is not None and d.pos > self.first_inner else (
                "before the inner loops" if self.first_inner is not None else "in an iteration without inner loops")
            restores = ("when the last inner loop exits" if self.first_inner is not None
                        else "at the end of the iteration")
            why = (
                f"{what} reads the checkpointed {n!r} {where} (line {d.line}: {self.code(d.node)}); skip mode "
                f"restores the checkpoint only {restores}, so the iteration must re-execute from the checkpoint before it."
            )
            return Need("inner", why + _carried_note(res.carried), _t(res.reads), _t(res.carried))
        if body and res.carried and self._before_restore(s):
            why = (
                f"{what} reads loop-carried {', '.join(sorted(res.carried))} before the point where skip mode "
                "restores the checkpoint, so the iteration must re-execute from the checkpoint before it."
            )
            return Need("inner", why + _carried_note(res.carried), _t(res.reads), _t(res.carried))
        if res.grad_units:
            d = min(res.grad_units, key=lambda x: x.pos)
            why = (
                f"{what} reads gradients (line {d.line}: {self.code(d.node)}); checkpoints hold state_dicts, "
                "not gradients, so the inner loops must re-execute."
            )
            return Need("inner", why + _carried_note(res.carried), _t(res.reads), _t(res.carried))
        if body:
            why = (
                f"{what} is computed at the level of the outer loop {oname!r} from values no inner loop writes: "
                "skip mode can restore each checkpoint and run only the outer-level code."
            )
            return Need("outer", why + _carried_note(res.carried), _t(res.reads), _t(res.carried))
        why = (
            f"{what} is logged after the outer loop {oname!r} from values no inner loop writes: "
            "skip mode through the last iteration suffices."
        )
        return Need("after", why + _carried_note(res.carried), _t(res.reads), _t(res.carried))

    def _need_in_function(self, fname: str, name: str, line: int, in_loop: bool, in_flor_loop: bool) -> Need:
        what = f"{name!r} (line {line}, in {fname}())"
        anchors = [u for u in self.units if fname in u.all_callees]
        if not anchors:
            return Need(
                "inner",
                f"{what}: flor_ray finds no call of {fname}() on the script's path (a method, a callback, or "
                "an indirect call), so it cannot bound what must run and re-executes the inner loops.",
            )
        parts: list[Need] = []
        for a in anchors:
            label = f"{what}, called at line {a.line}"
            need = self._need_at(a, a.uses, name, line, label=label)
            if need.kind in ("outer",) and (in_loop or in_flor_loop):
                need = Need(
                    "inner",
                    f"{label} is logged inside a loop of {fname}(), nested in the outer loop; "
                    "flor_ray re-executes to be safe." + _carried_note(set(need.carried)),
                    need.reads,
                    need.carried,
                )
            parts.append(need)
        return _combine(name, [(p, line) for p in parts], merge_reason=False)

    def _fwalk(self, fdef: cst.FunctionDef) -> _Walker:
        """A function body's units under the final summaries (cached: several sites ask)."""
        walker = self._walks.get(id(fdef))
        if walker is None:
            walker = _Walker(self, driver=False)
            walker.walk(walker._block(fdef.body), (), (), (), fdef.name.value, ())
            self._walks[id(fdef)] = walker
        return walker

    def _paths(self, fname: str, visiting: frozenset[str]) -> set[tuple[str, ...]]:
        """Loop paths at the call sites of ``fname``: driver units, then callers' callers."""
        out = {u.flor_path for u in self.units if fname in u.callees}
        if fname in visiting:
            return out
        for caller, defs in self.callable.items():
            if caller in self.drv.inlined:
                continue
            for fdef in defs:
                local = {u.flor_path for u in self._fwalk(fdef).units if fname in u.callees}
                if local:
                    for p in self._paths(caller, visiting | {fname}):
                        out |= {p + q for q in local}
        return out


def _iter_calls(module: cst.Module, fname: str):
    """Every call ``fname(...)`` of the module."""
    todo: list[cst.CSTNode] = [module]
    while todo:
        node = todo.pop()
        if isinstance(node, cst.Call) and isinstance(node.func, cst.Name) and node.func.value == fname:
            yield node
        todo.extend(node.children)


def _iter_small(node: cst.CSTNode):
    class V(cst.CSTVisitor):
        def __init__(self) -> None:
            self.found: list[cst.CSTNode] = []

        def visit_Global(self, n: cst.Global) -> None:
            self.found.append(n)

        def visit_Nonlocal(self, n: cst.Nonlocal) -> None:
            self.found.append(n)

    v = V()
    node.visit(v)
    return v.found


def _t(names: set[str]) -> tuple[str, ...]:
    return tuple(sorted(names))


def _carried_note(carried: set[str] | tuple[str, ...]) -> str:
    if not carried:
        return ""
    names = ", ".join(sorted(carried))
    return (
        f" It reads loop-carried state ({names}): a replay restores it from the checkpoints that captured it "
        "(plain values, generators, DataLoader positions); without one, replay starts from the first iteration."
    )


def _combine(name: str, needs: list[tuple[Need, int]], merge_reason: bool = True) -> Need:
    """Most demanding kind wins; reads and carried names are unioned over the sites."""
    best, _ = max(needs, key=lambda nl: (_RANK[nl[0].kind], -nl[1]))
    reads = sorted({r for n, _ in needs for r in n.reads})
    carried = sorted({c for n, _ in needs for c in n.carried})
    reason = best.reason
    if len(needs) > 1 and merge_reason:
        lines = ", ".join(str(line) for _, line in sorted(needs, key=lambda nl: nl[1]))
        reason = f"{name!r} is logged at {len(needs)} sites (lines {lines}); the most demanding: {reason}"
    if carried and not best.carried:
        reason += _carried_note(carried)
    return Need(best.kind, reason, tuple(reads), tuple(carried))

"""Reading expressions: the names they read, the calls they make, ``.grad`` reads."""

from __future__ import annotations

import libcst as cst

#: Attribute or function names whose use reads gradients, which state_dicts omit.
GRAD_NAMES = frozenset({"grad", "clip_grad_norm_", "clip_grad_value_", "clip_grad_norm", "clip_grad_value"})
#: Names containing "grad" that do not read gradient values.
NOT_GRAD_READS = frozenset(
    {"no_grad", "enable_grad", "set_grad_enabled", "zero_grad", "requires_grad", "requires_grad_"}
)
#: Methods that mutate their receiver even when their result is used.
MUTATORS = frozenset(
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
SETTERS = frozenset({"train", "eval", "zero_grad", "set_epoch", "requires_grad_"})


class Scan(cst.CSTVisitor):
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
        if node.attr.value in GRAD_NAMES:
            self.grad = True
        node.value.visit(self)
        return False

    def visit_Arg(self, node: cst.Arg) -> bool:
        node.value.visit(self)
        return False

    def visit_Call(self, node: cst.Call) -> bool:
        self.calls.append(node)
        fname = last_name(node.func)
        if fname and "grad" in fname and fname not in NOT_GRAD_READS:
            self.grad = True
        return True

    def visit_NamedExpr(self, node: cst.NamedExpr) -> bool:
        self.walrus.update(target_names(node.target))
        node.value.visit(self)
        return False

    def _scoped(self, node: cst.CSTNode, bound: set[str]) -> bool:
        sub = Scan()
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
            bound |= target_names(comp.target)
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


def scan_of(node: cst.CSTNode | None) -> Scan:
    scan = Scan()
    if node is not None:
        node.visit(scan)
    return scan


def last_name(node: cst.BaseExpression) -> str | None:
    if isinstance(node, cst.Name):
        return node.value
    if isinstance(node, cst.Attribute):
        return node.attr.value
    return None


def root_of(node: cst.BaseExpression) -> str | None:
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


def target_names(node: cst.CSTNode) -> set[str]:
    if isinstance(node, cst.Name):
        return {node.value}
    if isinstance(node, (cst.Tuple, cst.List)):
        out: set[str] = set()
        for el in node.elements:
            out |= target_names(el.value)
        return out
    if isinstance(node, cst.StarredElement):
        return target_names(node.value)
    return set()


def str_literal(node: cst.BaseExpression) -> str | None:
    if isinstance(node, cst.SimpleString):
        value = node.evaluated_value
        return value if isinstance(value, str) else None
    if isinstance(node, cst.ConcatenatedString):
        value = node.evaluated_value
        return value if isinstance(value, str) else None
    return None


def first_arg(call: cst.Call) -> cst.BaseExpression | None:
    for arg in call.args:
        if arg.keyword is None and not arg.star:
            return arg.value
        if arg.keyword is not None and arg.keyword.value == "name":
            return arg.value
    return None


def value_args(call: cst.Call) -> list[cst.BaseExpression]:
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


def iter_calls(module: cst.Module, fname: str):
    """Every call ``fname(...)`` of the module."""
    todo: list[cst.CSTNode] = [module]
    while todo:
        node = todo.pop()
        if isinstance(node, cst.Call) and isinstance(node.func, cst.Name) and node.func.value == fname:
            yield node
        todo.extend(node.children)


def iter_small(node: cst.CSTNode):
    """The ``global`` and ``nonlocal`` statements under ``node``."""
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


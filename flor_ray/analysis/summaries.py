"""Function summaries: what calling a script function does, as seen from its caller.

A call's summary depends on the summaries of its callees, so they are computed
together by iterating to a fixpoint. The walk that summarises a body reads the
summaries held by the analyzer, so :func:`fixpoint` updates them in place.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import libcst as cst

from .scan import iter_small
from .units import Summary, Walker

if TYPE_CHECKING:
    from .analyzer import Analyzer


def summarize(an: Analyzer, fdef: cst.FunctionDef) -> Summary:
    """What calling ``fdef`` does, under the summaries ``an`` holds for its callees."""
    walker = Walker(an, driver=False)
    walker.walk(walker._block(fdef.body), (), (), (), fdef.name.value, ())
    ps = fdef.params
    params = tuple(p.name.value for p in (*ps.posonly_params, *ps.params, *ps.kwonly_params))
    star = isinstance(ps.star_arg, cst.Param) or ps.star_kwarg is not None
    # Locals: parameters and every name the body binds (assignments, loop and
    # with targets, imports, nested defs). libcst's ScopeProvider would give the
    # same sets but costs more than the rest of the analysis together, and
    # comprehension variables are already kept out of ``uses`` by ``Scan``.
    local: set[str] = set(params)
    for u in walker.units:
        local |= u.strong
    declared: set[str] = set()
    for node in iter_small(fdef):
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
    return Summary(
        params=params,
        star_params=star,
        free_reads=frozenset(n for n in uses - local if not an.is_module(n)),
        mutated_params=frozenset(weak & set(params)),
        mutated_free=frozenset(n for n in (weak - local) | (strong & declared) if not an.is_module(n)),
        reads_grad=grad,
        has_loop=has_loop,
        callees=frozenset(callees),
        backward=backward,
    )


def fixpoint(an: Analyzer) -> dict[str, Summary]:
    """Summaries of calls depend on summaries of callees: iterate until stable."""
    an.summaries = {name: Summary() for name in an.callable}
    for _ in range(len(an.callable) + 2):
        new: dict[str, Summary] = {}
        for name, defs in an.callable.items():
            parts = [summarize(an, d) for d in defs]
            merged = parts[0]
            for p in parts[1:]:
                merged = Summary(
                    merged.params, merged.star_params or p.star_params,
                    merged.free_reads | p.free_reads, merged.mutated_params | p.mutated_params,
                    merged.mutated_free | p.mutated_free, merged.reads_grad or p.reads_grad,
                    merged.has_loop or p.has_loop, merged.callees | p.callees,
                    merged.backward or p.backward,
                )
            new[name] = merged
        if new == an.summaries:
            break
        an.summaries = new
    return an.summaries

"""The needs of statements in the project's other modules: follow the script's calls.

A statement in ``model.py`` runs wherever the script's code calls into it: in
``Net.__init__`` where the script builds the model, in ``forward`` wherever the
model is applied (the step loop), in ``utils.evaluate`` where the epoch ends. Its
need is that of those *call sites* in the script, computed as for a statement of
the script there (:meth:`~flor_ray.analysis.needs.Needs._need_at`), the most
demanding one winning.

Resolution is static and conservative:

* the defs whose call may run the statement are closed over the project's calls
  (a helper called by ``train`` and ``evaluate`` is reached from both), by name,
  module attribute (``utils.evaluate``), ``self.method`` and construction
  (``Net(...)`` runs ``Net.__init__``, and those of the classes derived from it);
* a method other than ``__init__`` runs through instances: every statement of the
  script that reads a value derived from an instance (``model = Net()``,
  ``net = model.to(device)``, ``opt = SGD(net.parameters())``, ``train(net, ...)``)
  is a call site, since any of them may call it;
* where a def of that set is used as a value (stored, passed, re-exported by
  ``import *``), called from a lambda, a generator expression, a nested def or a
  method of the script's classes, the call sites cannot be bounded: the statement
  re-executes the inner loops, as it does when no call site is found at all, or
  when it reads module globals or instance attributes that other calls rebind
  (state no checkpoint holds).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import libcst as cst

from .analyzer import Analyzer
from .calls import imported_cst
from .index import ModuleIndex, Project
from .modules import ModuleSite, Ref, Use, scan_file
from .results import Need, ScriptAnalysis, carried_note, combine
from .units import Summary

__all__ = ["analyze_in_project", "module_needs", "project_files"]


@dataclass
class Reach:
    """What may run a statement: calling one of ``refs`` (a module ref: importing it),
    or calling a method of an instance of one of ``classes``."""

    refs: set[Ref] = field(default_factory=set)
    classes: set[Ref] = field(default_factory=set)
    unknown: list[str] = field(default_factory=list)


#: folders whose files are not the project's code
_NOT_PROJECT = ("__pycache__", "venv", "node_modules", "site-packages")


def project_files(tree: Mapping[str, str], script: str, source: str,
                  patched: Mapping[str, str] | None = None) -> dict[str, str]:
    """The files of a version's ``tree`` (``path -> text``, read lazily) that the script at
    ``script`` (text ``source``) imports, directly or through each other: only what it
    loads can run. ``patched`` files are substituted, and kept even when nothing imports them."""
    patched = dict(patched or {})
    paths = [p for p in tree if p.endswith(".py")
             and not any(part.startswith(".") or part in _NOT_PROJECT for part in p.split("/")[:-1])]
    index = ModuleIndex(paths, script)
    out = {script: source}
    todo = [script]
    while todo:
        path = todo.pop()
        scan = scan_file(path, out[path])
        for found in sorted(index.imported(path, scan)) if scan is not None else ():
            if found not in out:
                out[found] = patched[found] if found in patched else tree[found]
                todo.append(found)
    return {**out, **patched}


def module_needs(source: str, script: str, files: Mapping[str, str], patched: Iterable[str],
                 names: Iterable[str] | None = None, *, filename: str | None = None) -> tuple[tuple[str, Need], ...]:
    """The need of every statement of ``names`` (None: all) logged in the ``patched``
    files, for the (patched) script ``source`` at path ``script`` of a tree whose
    Python files are ``files`` (``path -> text``, the patched ones included)."""
    project = Project({**files, script: source}, script)
    loops = _loop_defs(project)
    an = _analyzer(project, source, loops, filename)
    an.run()
    wanted = None if names is None else set(names)
    per_name: dict[str, list[tuple[Need, int]]] = defaultdict(list)
    for path in patched:
        scan = project.scans.get(path)
        for site in scan.sites if scan is not None else ():
            if wanted is None or site.name in wanted:
                per_name[site.name].append((_site_need(an, project, site, loops), site.line))
    return tuple((n, combine(n, sites, merge_reason=len(sites) > 1)) for n, sites in per_name.items())


def analyze_in_project(source: str, script: str, files: Mapping[str, str], *,
                       filename: str | None = None) -> ScriptAnalysis:
    """:func:`~flor_ray.analysis.analyze` of the script at path ``script`` of a tree whose
    Python files are ``files``, following its calls into the project's modules: a call of a
    module def that runs a flor.loop is an inner loop, and a module def mutates the
    arguments its body mutates."""
    project = Project({**files, script: source}, script)
    return _analyzer(project, source, _loop_defs(project), filename).run()


def _analyzer(project: Project, source: str, loops: set[Ref], filename: str | None) -> Analyzer:
    script = project.script

    def project_def(dotted: str) -> Summary | None:
        ref = project.resolve(script, _call_use(dotted))
        params = project.mutated_params(ref) if ref is not None else None
        if params is None:
            return None
        if not params.names and params.star:  # a class: any argument
            return Summary(star_params=True, mutated_params=frozenset({"*"}))
        return Summary(params=params.names, star_params=params.star, mutated_params=params.mutated)

    return Analyzer(cst.parse_module(source), filename or script, project_calls=project_def,
                    loop_calls=lambda dotted: project.resolve(script, _call_use(dotted)) in loops)


def _call_use(dotted: str) -> Use:
    return Use(tuple(dotted.split(".")), 0, True, None, None, False, False)


def _loop_defs(project: Project) -> set[Ref]:
    """The defs of the project's modules that run a flor.loop, and the defs that call them."""
    out = {Ref(path, owner) for path, scan in project.scans.items() if path != project.script
           for owner, _ in scan.loops if owner is not None}
    grew = bool(out)
    while grew:
        grew = False
        for path in project.scans:
            if path == project.script:
                continue
            for use, target in project.targets(path):
                if use.call and use.owner is not None and target in out and Ref(path, use.owner) not in out:
                    out.add(Ref(path, use.owner))
                    grew = True
    return out


def _loop_reasons(an: Analyzer, project: Project, reach: Reach, loops: set[Ref]) -> list[str]:
    """A module's flor.loop that flor_ray does not see from the script, or one on the way to the statement."""
    if an.outer is None:
        found = sorted(p for p, scan in project.scans.items() if scan.loops and p != project.script)
        return [f"the script has no flor.loop of its own and {found[0]} runs one"] if found else []
    on_way = sorted((r for r in reach.refs & loops), key=lambda r: (r.path, r.qual or ""))
    return [f"{on_way[0].show()} runs an inner flor.loop on the way to it"] if on_way else []


def _site_need(an: Analyzer, project: Project, site: ModuleSite, loops: set[Ref]) -> Need:
    where = f", in {site.owner}()" if site.owner else ", run when the module is imported"
    what = f"{site.name!r} (line {site.line} of {site.path}{where})"
    reach = _reach(project, site)
    units, unknown = _script_sites(an, project, reach)
    unknown = reach.unknown + unknown + _state_outside_checkpoints(project, site, reach)
    looped = _loop_reasons(an, project, reach, loops)
    if looped and not unknown:
        return Need("inner", f"{what}: {looped[0]}: that loop must re-execute.")
    unknown += looped
    if unknown:
        return Need("inner", f"{what}: {unknown[0]}; flor_ray cannot bound where it runs, so the inner loops "
                             "re-execute from the checkpoint before each segment.")
    if not units:
        return Need("inner", f"{what}: flor_ray finds no call of it on the script's path (a callback, an indirect "
                             "call, or a module the script does not import), so the inner loops re-execute.")
    parts = []
    headers = {loop.start: loop for loop in an.drv.loops.values()}
    for u in units:
        loop = headers.get(u.pos)
        if loop is not None and (loop.id, "loop") not in u.chain and u.pos + 1 < len(an.units):
            u = an.units[u.pos + 1]  # iterating runs in the loop (a dataset's __getitem__, an iterator's __next__)
        label = f"{what}, reached from line {u.line} of the script ({an.code(u.node)})"
        need = an._need_at(u, u.uses, site.name, site.line, label=label)
        if need.kind == "outer" and site.in_loop:
            need = Need("inner", f"{label} is logged inside a loop of {site.owner}(), nested in the outer loop; "
                                 "flor_ray re-executes to be safe." + carried_note(need.carried),
                        need.reads, need.carried)
        parts.append((need, u.line))
    return combine(site.name, parts, merge_reason=False)


def _start(project: Project, site: ModuleSite, reach: Reach) -> None:
    """The defs whose call runs the statement directly."""
    if site.nested:
        reach.unknown.append(f"it sits in a lambda or a def nested in {site.owner or 'the module'}, which may run "
                             "wherever that function is passed")
    if site.owner is None:
        reach.refs.add(Ref(site.path))
    elif site.owner.rsplit(".", 1)[0] in project.scans[site.path].classes:
        _add_method(project, Ref(site.path, site.owner), reach)
    else:
        reach.refs.add(Ref(site.path, site.owner))


def _add_method(project: Project, method: Ref, reach: Reach) -> None:
    """A method reached: by ``self.m`` (its own ref), construction for ``__init__``, else instances."""
    cls, name = method.qual.rsplit(".", 1)
    family = project.family(Ref(method.path, cls))
    reach.refs |= {Ref(c.path, f"{c.qual}.{name}") for c in family}
    if name in ("__init__", "__new__"):
        reach.refs |= family
    else:
        reach.classes |= family


def _reach(project: Project, site: ModuleSite) -> Reach:
    """Close the defs that may run ``site`` over the calls of the project's modules."""
    reach = Reach()
    _start(project, site, reach)
    seen: set[tuple[str, Use]] = set()
    grew = True
    while grew:
        grew = False
        for path in project.scans:
            if path == project.script:
                continue
            for use, target in project.targets(path):
                if (path, use) in seen or not (target in reach.refs or target in reach.classes):
                    continue
                seen.add((path, use))
                grew |= _caller_reached(project, path, use, target, reach)
            grew |= _imports_reached(project, path, reach)
    _stars(project, reach)
    for ref in sorted((r for r in reach.refs if r.qual is not None), key=lambda r: (r.path, r.qual)):
        scan = project.scan_of(ref)
        if scan is not None and ref.qual in scan.opaque:
            reach.unknown.append(f"{ref.show()} is decorated, and a decorator may register it to be called elsewhere")
        if scan is not None and scan.is_generator(ref.qual):
            reach.unknown.append(f"{ref.show()} is a generator: its body runs where it is iterated, not called")
    return reach


def _caller_reached(project: Project, path: str, use: Use, target: Ref, reach: Reach) -> bool:
    """Add the def holding ``use`` (a reference of ``target``) to ``reach``; True when it grew."""
    instance_class = target in reach.classes and target not in reach.refs
    if use.lazy:
        reach.unknown.append(f"{target.show()} is used in a lambda, a generator expression or a nested def "
                             f"(line {use.line} of {path}), which may run wherever it is passed")
        return False
    if use.owner is None and instance_class:
        reach.unknown.append(f"{path} uses {target.show()} at import time (line {use.line}): an instance made or "
                             "kept there may be called anywhere")
        return False
    if not use.call and not instance_class:
        reach.unknown.append(f"{target.show()} is used as a value at line {use.line} of {path} (stored, passed "
                             "or decorated), so flor_ray cannot see where it is called")
        return False
    before = (len(reach.refs), len(reach.classes))
    if use.owner is None:
        reach.refs.add(Ref(path))
    elif use.owner.rsplit(".", 1)[0] in project.scans[path].classes:
        _add_method(project, Ref(path, use.owner), reach)
    else:
        reach.refs.add(Ref(path, use.owner))
    return before != (len(reach.refs), len(reach.classes))


def _imports_reached(project: Project, path: str, reach: Reach) -> bool:
    """Importing ``path`` runs a reached module's top level when it imports that module."""
    if Ref(path) in reach.refs:
        return False
    scan = project.scans[path]
    for bound, module, name, level in scan.imports:
        base = project._import_base(path, module, level)
        hits = {project.module(base), project.module(f"{base}.{name}") if name else None}
        if any(h is not None and Ref(h) in reach.refs for h in hits):
            reach.refs.add(Ref(path))
            return True
    return False


def _stars(project: Project, reach: Reach) -> None:
    """``from m import *`` of a module holding a reached def, or the module used as a value
    (``getattr(utils, name)``, ``vars(utils)``), hides its uses by name."""
    holders = {r.path for r in reach.refs | reach.classes if r.qual is not None}
    for path in project.scans:
        for use, target in project.targets(path):
            if target.qual is None and target.path in holders and not use.call:
                reach.unknown.append(f"{path} uses the module {target.path} as a value (line {use.line}), so "
                                     "flor_ray cannot follow calls of its names")
    for path, scan in project.scans.items():
        for module, level, line in scan.stars:
            target = project.module(project._import_base(path, module, level))
            if target in holders:
                reach.unknown.append(f"{path} imports * from {target} (line {line}), so flor_ray cannot follow "
                                     "calls of its names")


def _script_sites(an: Analyzer, project: Project, reach: Reach) -> tuple[list, list[str]]:
    """The driver units of the script that may run a reached def, and what cannot be followed."""
    script = project.script
    hits = reach.refs | reach.classes

    def resolves(dotted: str, into: set[Ref]) -> bool:
        return project.resolve(script, _call_use(dotted)) in into

    bound = {n for n, ref in project.bindings(script).items() if project.canonical(ref) in hits}
    sites: set[int] = set()
    tainted: set[str] = set()
    for _ in range(3 if reach.classes else 1):  # values flow along the loop's back edges
        for u in an.units:
            called = any(resolves(d, reach.refs) for d in u.ext_calls) or _imports_into(project, u, reach)
            if called:
                sites.add(u.pos)
            if reach.classes and (called or u.uses & (tainted | bound) or any(resolves(d, hits) for d in u.ext_calls)):
                tainted |= (u.strong | u.weak) - an.flor_names
    if reach.classes:
        sites |= {u.pos for u in an.units if u.uses & tainted}
    unknown = _script_unknowns(project, reach, {f for f, summ in an.summaries.items() if summ.free_reads & tainted})
    unknown += [f"the script's method {use.inner}() uses {use.parts[0]!r} (line {use.line}), which holds an instance "
                "whose methods are reached, and flor_ray does not follow the calls of methods"
                for use in project.scans[script].uses if use.method and use.parts[0] in tainted][:1]
    return [u for u in an.units if u.pos in sites], unknown


def _imports_into(project: Project, u, reach: Reach) -> bool:
    if not isinstance(u.node, (cst.Import, cst.ImportFrom)):
        return False
    for imp in imported_cst(u.node):
        level = len(u.node.relative) if isinstance(u.node, cst.ImportFrom) else 0
        base = project._import_base(project.script, imp.module, level)
        for name in (base, f"{base}.{imp.name}" if imp.name else None):
            path = project.module(name) if name else None
            if path is not None and Ref(path) in reach.refs:
                return True
    return False


def _script_unknowns(project: Project, reach: Reach, readers: set[str]) -> list[str]:
    """Where the script's references into ``reach`` cannot be followed by its analysis.

    ``readers``: the script's functions that read an instance whose methods are reached.
    """
    scan = project.scans[project.script]
    out: list[str] = []
    hit_functions: set[str] = set(readers)
    for use, target in project.targets(project.script):
        if not (target in reach.refs or target in reach.classes):
            continue
        instance_class = target in reach.classes and target not in reach.refs
        if use.lazy:
            out.append(f"the script uses {target.show()} in a lambda or a generator expression (line {use.line}), "
                       "which may run wherever it is passed")
        elif use.method:
            out.append(f"the script uses {target.show()} in the method {use.inner}() (line {use.line}), whose "
                       "calls flor_ray does not follow")
        elif not use.call and not instance_class:
            out.append(f"the script uses {target.show()} as a value at line {use.line} (stored or passed), so "
                       "flor_ray cannot see where it is called")
        elif use.inner is not None:
            hit_functions.add(use.inner)
    for _ in range(len(hit_functions) + 1):  # functions of the script that call those functions
        more = {u.inner for u in scan.uses if u.call and len(u.parts) == 1 and u.parts[0] in hit_functions
                and u.inner is not None and u.inner not in hit_functions}
        if not more:
            break
        hit_functions |= more
    for use in scan.uses:
        if len(use.parts) == 1 and use.parts[0] in hit_functions and (not use.call or use.lazy):
            out.append(f"the script's {use.parts[0]}(), which calls into it, is used as a value at line {use.line}, "
                       "so flor_ray cannot see where it is called")
    out += [f"the script's {f}() calls into it and is decorated, so flor_ray cannot see where it is called"
            for f in sorted(hit_functions & scan.opaque)]
    out += [f"the script's {f}() calls into it and is a generator, whose body runs where it is iterated"
            for f in sorted(hit_functions) if scan.is_generator(f)]
    return out


def _state_outside_checkpoints(project: Project, site: ModuleSite, reach: Reach) -> list[str]:
    """Module globals and instance attributes that calls rebind or mutate: skipping those
    calls would leave them stale, and checkpoints do not hold them."""
    if site.owner is None:
        return []
    out = []
    for ref in sorted(_callees(project, Ref(site.path, site.owner)), key=lambda r: (r.path, r.qual or "")):
        scan = project.scans[ref.path]
        reads = {u.parts[0] for u in scan.uses if u.owner == ref.qual}
        stale = sorted(reads & (scan.globals_written | (scan.mutated & scan.module_level)))
        if stale:
            out.append(f"{ref.show()} reads the module global {stale[0]!r}, which a function of {ref.path} "
                       "rebinds or mutates; checkpoints do not hold module globals")
    if "." in site.owner:
        written = set()
        for cls in reach.classes:
            written |= project.scans[cls.path].self_written.get(cls.qual, set())
        attrs = sorted(project.scans[site.path].self_read.get(site.owner, set()) & written)
        if attrs:
            out.append(f"it reads self.{attrs[0]}, which a method other than __init__ assigns; checkpoints hold "
                       "state_dicts, not such attributes")
    return out


def _callees(project: Project, start: Ref) -> set[Ref]:
    """``start`` and the project's defs it calls, transitively (the values it computes flow from them)."""
    out, todo = {start}, [start]
    while todo:
        ref = todo.pop()
        for use, target in project.targets(ref.path) if ref.path in project.scans else ():
            if use.owner != ref.qual or not use.call:
                continue
            if target.qual is not None and target.path in project.scans \
                    and target.path != project.script and target not in out:
                out.add(target)
                todo.append(target)
    return out

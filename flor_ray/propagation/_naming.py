"""Names in an injected statement: how the target spells flor_ray there, and renames.

An injected statement reads names of today's file; each must be bound at its
place in the target. ``flor.log`` is re-spelled the target's way (``fr.log``, or
``log`` imported with ``from flor_ray import log``); a name (or a ``self.net``-style
attribute) that the matching shows was only renamed is rewritten; an ambiguous or
unknown one is refused.
"""

from __future__ import annotations

import ast

from ._inject import Respelling
from ._match import Matching
from ._result import CannotPlace, logs_text
from ._scope import Visibility, free_reads
from ._tree import SNode, Tree, resolve_scope


class Naming:
    """The respelling of one unit at one place of the target."""

    def __init__(self, src: Tree, tgt: Tree, matching: Matching, visibility: Visibility):
        self.src, self.tgt = src, tgt
        self.matching = matching
        self.visibility = visibility

    def spelling(self, unit: SNode, owner: SNode, after: int,
                  names: tuple[str, ...], where: str) -> Respelling:
        """How the unit's ``flor_ray`` calls are spelled in the target at that point."""
        visible = self.visibility.names_at(owner, after)
        src, tgt = self.src.syntax, self.tgt.syntax
        t_modules = sorted(m for m in tgt.modules if m in visible)
        t_direct: dict[str, str] = {}  # verb -> local name imported in the target
        for local, verb in sorted(tgt.direct_map.items()):
            if local in visible:
                t_direct.setdefault(verb, local)
        how = Respelling()
        reads = free_reads(unit.stmts)

        def missing(verb: str) -> CannotPlace:
            return CannotPlace(
                f"{logs_text(names)} cannot be placed {where} of the target: the target does not "
                f"import flor_ray (or its `{verb}`) there; add `import flor_ray as flor`"
            )

        for name in reads:
            if name in src.modules:
                if name in tgt.modules and name in visible:
                    continue
                verbs = _verbs_through(unit.stmts, name)
                if t_modules:
                    how.names[name] = t_modules[0]
                    continue
                for verb in verbs or ["log"]:
                    if verb is None or verb not in t_direct:
                        raise missing(verb or "module")
                    how.to_name[(name, verb)] = t_direct[verb]
            elif name in src.direct_map:
                verb = src.direct_map[name]
                if tgt.direct_map.get(name) == verb and name in visible:
                    continue
                if verb in t_direct:
                    how.names[name] = t_direct[verb]
                elif t_modules:
                    how.to_attr[name] = (t_modules[0], verb)
                else:
                    raise missing(verb)
        return how

    def renames(self, unit: SNode, names: tuple[str, ...], owner: SNode, after: int,
                 where: str) -> Respelling:
        visible = self.visibility.names_at(owner, after)
        how = self.spelling(unit, owner, after, names, where)
        handled = set(how.names) | set(how.to_attr) | {m for m, _ in how.to_name}
        mapping = how.names
        src_locals = self.matching.src_locals
        at = unit.parent if unit.is_def else unit
        reads = free_reads(unit.stmts)
        for name in reads:
            if name in visible or name in handled:
                continue
            scope = resolve_scope(name, at, src_locals)  # type: ignore[arg-type]
            seen = self.matching.evidence.get((scope, name), {})
            cands = sorted(m for m in seen if m != name)
            if name in seen or not cands:
                raise CannotPlace(
                    f"{logs_text(names)} at source line {unit.line} cannot be placed {where} of the "
                    f"target: it reads `{name}`, which is not defined in the target at that point"
                )
            if len(cands) > 1:
                raise CannotPlace(
                    f"{logs_text(names)} at source line {unit.line} cannot be placed: it reads "
                    f"`{name}`, which corresponds to several names in the target "
                    f"({', '.join(cands)}); the rename is ambiguous"
                )
            old = cands[0]
            rivals = sorted(
                other for (sc, other), seen2 in self.matching.evidence.items()
                if sc == scope and other != name and old in seen2
            )
            if rivals:
                raise CannotPlace(
                    f"{logs_text(names)} at source line {unit.line} cannot be placed: it reads "
                    f"`{name}`, which looks renamed to `{old}`, but `{old}` also stands for "
                    f"{', '.join(f'`{r}`' for r in rivals)}; the rename is ambiguous"
                )
            if old not in visible:
                raise CannotPlace(
                    f"{logs_text(names)} at source line {unit.line} cannot be placed {where} of the "
                    f"target: it reads `{name}` (called `{old}` there), which is not defined "
                    "at that point"
                )
            mapping[name] = old
        self._attr_renames(unit, names, set(reads), how)
        return how

    def _attr_renames(self, unit: SNode, names: tuple[str, ...], reads: set[str],
                      how: Respelling) -> None:
        """``self.net`` today where the matched lines say ``self.model`` then."""
        evidence = self.matching.attr_evidence
        for base, attr in _attribute_reads(unit.stmts, reads):
            dotted = f"{base}.{attr}"
            seen = evidence.get(dotted)
            if not seen or dotted in seen:
                continue
            cands = sorted(seen)
            if len(cands) > 1:
                raise CannotPlace(
                    f"{logs_text(names)} at source line {unit.line} cannot be placed: it reads "
                    f"`{dotted}`, which corresponds to several attributes in the target "
                    f"({', '.join(cands)}); the rename is ambiguous"
                )
            old = cands[0]
            rivals = sorted(d for d, seen2 in evidence.items() if d != dotted and old in seen2)
            if rivals:
                raise CannotPlace(
                    f"{logs_text(names)} at source line {unit.line} cannot be placed: it reads "
                    f"`{dotted}`, which looks renamed to `{old}`, but `{old}` also stands for "
                    f"{', '.join(f'`{r}`' for r in rivals)}; the rename is ambiguous"
                )
            old_base, _, old_attr = old.partition(".")
            if old_base == how.names.get(base, base):
                how.attrs[(base, attr)] = old_attr


def _verbs_through(stmts: tuple[ast.stmt, ...], module: str) -> list[str | None]:
    """The ``flor_ray`` verbs used as ``module.verb``; None for a bare use of ``module``."""
    verbs: list[str | None] = []
    attrs: set[int] = set()
    for stmt in stmts:
        for node in ast.walk(stmt):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id == module:
                verbs.append(node.attr)
                attrs.add(id(node.value))
        for node in ast.walk(stmt):
            if isinstance(node, ast.Name) and node.id == module and id(node) not in attrs:
                verbs.append(None)
    return list(dict.fromkeys(verbs))


def _attribute_reads(stmts: tuple[ast.stmt, ...], free: set[str]) -> list[tuple[str, str]]:
    """``(base, attr)`` of every ``base.attr`` whose base is read from outside."""
    out = []
    for stmt in stmts:
        for node in ast.walk(stmt):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id in free:
                out.append((node.value.id, node.attr))
    return list(dict.fromkeys(out))

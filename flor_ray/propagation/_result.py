"""What propagation returns: small frozen, picklable values and their rendering.

Each new statement of today's file comes out as an outcome, as LibCST's codemods
return ``TransformSuccess`` or ``TransformFailure``: :class:`Placed` (injected, and
where) or :class:`Refused` (not placed, and why); each name that the target logs
already comes out as :class:`AlreadyLogged` (nothing to do).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union


@dataclass(frozen=True)
class Placed:
    """One statement injected into the old version.

    ``line`` is 1-based in the patched code; ``loops`` are the enclosing
    ``flor.loop`` names there, outermost first; ``function`` the enclosing def.
    ``wrapped`` is true when the statement replaced its old counterpart (a
    ``x = flor.log("x", f())`` whose old version was ``x = f()``) instead of
    being inserted next to it.
    """

    names: tuple[str, ...]
    statement: str
    line: int
    loops: tuple[str, ...] = ()
    function: str | None = None
    renames: tuple[tuple[str, str], ...] = ()
    wrapped: bool = False


@dataclass(frozen=True)
class Refused:
    """A statement of today's file that could not be placed: the new names it logs
    (empty for a call whose name is not a literal) and why."""

    names: tuple[str, ...]
    reason: str


@dataclass(frozen=True)
class AlreadyLogged:
    """A name of today's file that the target logs already: left as it is there."""

    name: str


Outcome = Union[Placed, Refused, AlreadyLogged]


@dataclass(frozen=True)
class PropagationResult:
    """The patched target and the outcome of each statement.

    A :class:`Refused` outcome is returned only with ``partial=True``; otherwise
    refusals raise.
    """

    code: str
    outcomes: tuple[Outcome, ...] = ()
    renames: tuple[tuple[str, str], ...] = ()  # (today's name, old name)

    @property
    def placements(self) -> tuple[Placed, ...]:
        return tuple(o for o in self.outcomes if isinstance(o, Placed))

    @property
    def refused(self) -> tuple[Refused, ...]:
        return tuple(o for o in self.outcomes if isinstance(o, Refused))

    @property
    def skipped(self) -> tuple[str, ...]:
        """The log names the target already logs."""
        return tuple(o.name for o in self.outcomes if isinstance(o, AlreadyLogged))

    @property
    def refused_names(self) -> dict[str, str]:
        """Each name of a refused statement -> the reason (the first, when several)."""
        out: dict[str, str] = {}
        for r in self.refused:
            for n in r.names:
                out.setdefault(n, r.reason)
        return out

    @property
    def changed(self) -> bool:
        return bool(self.placements)

    @property
    def rename_map(self) -> dict[str, str]:
        return dict(self.renames)


class CannotPlace(Exception):
    """One statement that cannot be placed: collected, then raised together or
    returned as :class:`Refused`."""


def logs_text(names: "list[str] | tuple[str, ...]") -> str:
    return ", ".join(f"flor.log({n!r})" for n in names)


def format_placements(result: PropagationResult) -> str:
    """One line per placement, then renames and skipped names, for the CLI."""
    out: list[str] = []
    for p in result.placements:
        where = f"[{' > '.join(p.loops)}] " if p.loops else ""
        func = f"in {p.function}(): " if p.function else ""
        lines = p.statement.splitlines() or [""]
        text = lines[0] + (" ..." if len(lines) > 1 else "")
        mark = "~" if p.wrapped else "+"
        out.append(f"{mark} line {p.line} {where}{func}{text}")
    for today, old in result.renames:
        out.append(f"  renamed {today} -> {old} (the old version's name)")
    for name in result.skipped:
        out.append(f"= {name!r} already logged in target, skipped")
    for r in result.refused:
        out.append(f"! {', '.join(map(repr, r.names)) or 'a statement'} not placed: {r.reason}")
    if not result.placements:
        out.append("no new log statements to propagate")
    return "\n".join(out)

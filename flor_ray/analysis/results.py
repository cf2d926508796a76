"""What the analysis returns: needs, log sites and the script's analysis, as values.

Also how the needs of several sites that log one name combine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Mapping, Sequence

from flor_ray.errors import QueryError

__all__ = ["LogSite", "Need", "NeedKind", "ScriptAnalysis", "UnknownLogNameError"]

NeedKind = Literal["setup", "outer", "after", "inner"]

#: How demanding each kind is, for a name logged at several sites. "after" ranks
#: above "outer" because it needs every iteration (in skip mode) and the code after
#: the loop, whereas an "outer" value can be computed per checkpoint segment.
RANK: Mapping[str, int] = {"setup": 0, "outer": 1, "after": 2, "inner": 3}


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
    #: logged inside the outer loop at one of its sites (rows each iteration), whatever the kind
    in_loop: bool = False


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


def sorted_tuple(names: set[str]) -> tuple[str, ...]:
    return tuple(sorted(names))


def carried_note(carried: set[str] | tuple[str, ...]) -> str:
    if not carried:
        return ""
    names = ", ".join(sorted(carried))
    return (
        f" It reads loop-carried state ({names}): a replay restores it from the checkpoints that captured it "
        "(plain values, generators, DataLoader positions); without one, replay starts from the first iteration."
    )


def combine(name: str, needs: list[tuple[Need, int]], merge_reason: bool = True) -> Need:
    """Most demanding kind wins; reads and carried names are unioned over the sites."""
    best, _ = max(needs, key=lambda nl: (RANK[nl[0].kind], -nl[1]))
    reads = sorted({r for n, _ in needs for r in n.reads})
    carried = sorted({c for n, _ in needs for c in n.carried})
    reason = best.reason
    if len(needs) > 1 and merge_reason:
        lines = ", ".join(str(line) for _, line in sorted(needs, key=lambda nl: nl[1]))
        reason = f"{name!r} is logged at {len(needs)} sites (lines {lines}); the most demanding: {reason}"
    if carried and not best.carried:
        reason += carried_note(carried)
    return Need(best.kind, reason, tuple(reads), tuple(carried), any(n.in_loop for n, _ in needs))

"""Propagation of new ``flor.log`` statements into old versions of a script.

``propagate(source, target)`` injects every statement of today's ``source`` that
logs a name the old ``target`` never logs, at the place in ``target`` that
corresponds to its place in ``source``, keeping everything else of ``target``
byte for byte (the target text is spliced; comments and formatting survive). Places are found by
structural matching of the two statement trees (GumTree-style), not by a line
diff, so reformatting, reordering, renamed variables, changed loop headers and
code moved into or out of functions do not get in the way. A statement that
cannot be placed with confidence raises :class:`~flor_ray.errors.PropagationError`
naming its log and the reason; nothing is guessed. ``propagate_detailed(...,
names=[...], partial=True)`` injects only the statements of those names and
returns the refused ones with their reasons instead of raising. A result lists an
outcome per statement or name: :class:`Placed`, :class:`Refused` or
:class:`AlreadyLogged`.
"""

from flor_ray.errors import PropagationError

from ._propagate import propagate, propagate_detailed
from ._result import AlreadyLogged, Outcome, Placed, PropagationResult, Refused, format_placements

__all__ = [
    "propagate",
    "propagate_detailed",
    "format_placements",
    "AlreadyLogged",
    "Outcome",
    "Placed",
    "PropagationResult",
    "Refused",
    "PropagationError",
]

"""``flor.arg``'s inputs: FlorDB-style ``--kwargs name=value`` taken from the command
line, and the cast of each override to its default's type."""

from __future__ import annotations

import sys
from typing import Any

from ..errors import ArgCastError, ArgDefaultError, KwargsError

__all__ = ["take_kwargs", "arg_default", "cast_arg"]


def _kwarg_pair(given: str) -> tuple[str, str]:
    name, eq, value = given.partition("=")
    if not eq or not name.strip():
        raise KwargsError(given)
    return name, value


def take_kwargs(argv: list[str]) -> dict[str, str]:
    """Remove FlorDB-style ``--kwargs a=1 b=2`` from ``argv`` (in place); return them.

    ``--kwargs`` takes the ``name=value`` words that follow it, up to the next word
    starting with ``-``; a word without ``=`` there, or none at all, is refused
    (it would otherwise be left in argv for the script's own parser to trip on).
    """
    out: dict[str, str] = {}
    i = 0
    while i < len(argv):
        if argv[i] == "--kwargs":
            j = i + 1
            while j < len(argv) and not argv[j].startswith("-"):
                k, v = _kwarg_pair(argv[j])
                out[k] = v
                j += 1
            if j == i + 1:
                raise KwargsError(argv[j] if j < len(argv) else "")
            del argv[i:j]
        elif argv[i].startswith("--kwargs="):
            k, v = _kwarg_pair(argv[i][len("--kwargs="):])
            out[k] = v
            del argv[i]
        else:
            i += 1
    return out


def arg_default(name: str, default: Any) -> Any:
    """``default`` as a plain int, float, bool, str or None (numpy scalars unwrapped)."""
    if default is None or type(default) in (int, float, bool, str):
        return default
    np = sys.modules.get("numpy")
    if np is not None and isinstance(default, (np.integer, np.floating, np.bool_, np.str_)):
        return default.item()
    raise ArgDefaultError(name, default)


def cast_arg(name: str, raw: str, default: Any) -> Any:
    t = type(default)
    try:
        if default is None or t is str:
            return raw
        if t is bool:
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on", "t", "y"):
                return True
            if low in ("0", "false", "no", "off", "f", "n"):
                return False
            raise ValueError(raw)
        if t is int:
            return int(raw)
        if t is float:
            return float(raw)
    except ValueError as exc:
        raise ArgCastError(name, raw, default) from exc
    raise ArgCastError(name, raw, default)

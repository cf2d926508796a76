"""What a log, loop or arg name may be: the rules ``flor.log``, ``flor.loop`` and
``flor.arg`` check before anything is recorded (shared by recording and replay)."""

from __future__ import annotations

from typing import Any

from ..config import MAX_NAME_LEN
from ..errors import InvalidNameError
from ..store.logs import MAX_LOOP_DEPTH

__all__ = ["RESERVED_NAMES", "check_name"]

#: the log relation's columns (and SQL's ``value``): a log or loop name among them would
#: shadow the column in ``dataframe`` and ``sql``
RESERVED_NAMES = frozenset({
    "run_id", "version", "source", "file", "loops", "items", "name", "vtype", "value",
    "value_float", "value_int", "value_str", "seq", "task", *(f"iter{d}" for d in range(MAX_LOOP_DEPTH)),
})


def check_name(kind: str, name: Any) -> str:
    if type(name) is not str:
        raise InvalidNameError(kind, name, f"it is a {type(name).__name__}; use a string such as 'loss' or 'epoch'")
    if not name.strip():
        raise InvalidNameError(kind, name, "use a non-empty string such as 'loss' or 'val_acc'")
    if len(name) > MAX_NAME_LEN:
        raise InvalidNameError(kind, f"{name[:40]}...", f"it is {len(name)} characters long; the limit is "
                               f"{MAX_NAME_LEN}: use a shorter name")
    bad = next((c for c in name if c in "/\n\r\t" or not c.isprintable()), None)
    if bad is not None:
        why = ("'/' separates loop names in the relation" if bad == "/"
               else f"it holds the control character {bad!r}, which tables and the command line cannot show")
        raise InvalidNameError(kind, name, f"{why}; use letters, digits, '_', '.' or '-' (e.g. "
                               f"{''.join(c if c.isalnum() else '_' for c in name)!r})")
    if kind in ("log", "loop") and name in RESERVED_NAMES:
        raise InvalidNameError(kind, name, f"{name!r} is a column of the log relation (dataframe and sql would "
                               f"show the column, not your {kind}); pick another name, e.g. {name + '_'!r}")
    return name

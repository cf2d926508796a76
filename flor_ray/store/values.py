"""Typed log values: what ``flor.log`` accepts and how it is stored.

Values keep their type in the relation (FlorDB stores every value as TEXT). The
common types (float, int, bool, str) take a fast path in ``Session.log``; this module
handles the rest: numpy and torch scalars, one-element tensors, small JSON-able
containers and ``None``.
"""

from __future__ import annotations

import json
import math
from typing import Any

from ..errors import UnsupportedValueError

__all__ = ["JsonValue", "convert", "MAX_JSON_BYTES", "INT64_MIN", "INT64_MAX"]

#: Largest JSON document stored for one list/dict value. Bigger values are arrays
#: or tensors in disguise and belong in a file, not in a log relation.
MAX_JSON_BYTES = 64 * 1024
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class JsonValue(str):
    """A JSON document standing for a list, dict or None (type tag for the writer)."""

    __slots__ = ()


def _jsonable(name: str, value: Any, depth: int = 0) -> Any:
    if depth > 8:
        raise UnsupportedValueError(name, value, "nested more than 8 levels")
    t = type(value)
    if value is None or t in (bool, str):
        return value
    if t is int:
        return value
    if t is float:
        if not math.isfinite(value):
            return repr(value)  # JSON has no NaN/inf; keep them readable
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(name, v, depth + 1) for v in value]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, (str, int, float, bool)):
                raise UnsupportedValueError(name, value, f"dict key {k!r} is not a string or number")
            out[str(k)] = _jsonable(name, v, depth + 1)
        return out
    scalar = _scalar(value)
    if scalar is not _NO:
        return _jsonable(name, scalar, depth + 1)
    raise UnsupportedValueError(name, value, f"element of type {t.__name__} inside a container")


_NO = object()


def _scalar(value: Any) -> Any:
    """Python scalar for numpy / torch scalars and one-element tensors, else _NO."""
    mod = type(value).__module__ or ""
    if mod.startswith("numpy"):
        if getattr(value, "ndim", None) == 0 or getattr(value, "size", None) == 1:
            return value.item() if getattr(value, "ndim", 0) == 0 else value.reshape(()).item()
        return _NO
    if mod.startswith("torch"):
        numel = getattr(value, "numel", None)
        if numel is not None and numel() == 1:
            return value.item()
        return _NO
    return _NO


def convert(name: str, value: Any) -> Any:
    """Return the value to store: a float, int, bool, str or :class:`JsonValue`."""
    t = type(value)
    if t is float or t is bool or t is str:
        return value
    if t is int:
        if INT64_MIN <= value <= INT64_MAX:
            return value
        raise UnsupportedValueError(name, value, "integer outside the int64 range; log it as a float or str")
    if value is None:
        return JsonValue("null")
    scalar = _scalar(value)
    if scalar is not _NO:
        return convert(name, scalar)
    if isinstance(value, (list, tuple, dict)):
        doc = json.dumps(_jsonable(name, value), separators=(",", ":"))
        if len(doc) > MAX_JSON_BYTES:
            raise UnsupportedValueError(name, value, f"{len(doc)} bytes as JSON, more than {MAX_JSON_BYTES}")
        return JsonValue(doc)
    if isinstance(value, bool):  # numpy.bool_ handled above; subclasses of bool
        return bool(value)
    if isinstance(value, int):
        return convert(name, int(value))
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str(value)
    why = ""
    if (type(value).__module__ or "").startswith(("torch", "numpy")):
        why = "more than one element; log .item() of a reduction, or .tolist() of a small tensor"
    raise UnsupportedValueError(name, value, why)

"""Tables printed exactly as pandas prints them (``to_string(index=False)`` as the
command line shows it, ``to_csv(index=False)``, ``to_json(orient="records",
date_format="iso")``), from columns of Python values, without importing pandas.

``import pandas`` costs more than a ``flor-ray runs`` may take, so the commands that
can build their rows from JSON alone print them here. Only the values whose pandas
rendering is pinned down below are taken: :func:`column` answers None for anything
else (nested values, mixed types, huge or tiny floats, control characters, long
strings that pandas would cut), and the caller then goes through pandas, so the
output is the same either way.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterable, Sequence

__all__ = ["Column", "MISSING", "column", "time_column", "frame_columns", "render_table", "render_csv", "render_json"]

#: a key absent from a row (pandas fills NaN, as it does for None in these kinds)
MISSING = object()

#: pandas' display.precision and display.max_colwidth, as the command line sets them
_DIGITS = 6
_MAX_COLWIDTH = 60
_NUMBER = re.compile(r"^\s*[+-]?[0-9]+\.[0-9]*$")  # pandas' _NUMBER_WITH_DECIMAL_RE
_CONTROL = re.compile(r"[\x00-\x1f]")
_NUMERIC = ("int", "float", "bool")
#: the ISO 8601 forms pandas and Python parse alike (to the microsecond: pandas keeps nanoseconds)
_ISO = re.compile(r"^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(?:\.\d{1,6})?(?:Z|[+-]\d{2}:\d{2})?$")


@dataclass(frozen=True)
class Column:
    """One column: its name, its kind (``int``, ``float``, ``bool``, ``bools`` (with NaN), ``str``, ``time``)
    and its values (None where pandas holds NaN / NaT; aware UTC datetimes for ``time``)."""

    name: str
    kind: str
    values: tuple


def column(name: str, values: Sequence[Any]) -> Column | None:
    """The column pandas infers from these row values (``MISSING``: no key), or None
    when they fall outside what this module renders as pandas does."""
    if not isinstance(name, str) or _CONTROL.search(name) or len(name) > _MAX_COLWIDTH:
        return None
    present = [v for v in values if v is not MISSING and v is not None]
    if not present:
        return None
    missing = len(present) < len(values)
    if all(isinstance(v, bool) for v in present):
        if not missing:
            return Column(name, "bool", tuple(values))
        # pandas: an object column, NaN where the key is absent (an explicit None shows as "None")
        return None if None in values else Column(name, "bools", tuple(None if v is MISSING else v for v in values))
    if all(isinstance(v, int) and not isinstance(v, bool) for v in present) and not missing:
        return Column(name, "int", tuple(values)) if all(-2**63 <= v < 2**63 for v in present) else None
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        if any(isinstance(v, int) and abs(v) > 2**53 for v in present):
            return None
        out = tuple(None if v is MISSING or v is None else float(v) for v in values)
        return Column(name, "float", out) if all(_plain_float(v) for v in out if v is not None) else None
    if all(isinstance(v, str) for v in present):
        if any(_CONTROL.search(v) or len(v) > _MAX_COLWIDTH for v in present):
            return None
        return Column(name, "str", tuple(None if v is MISSING else v for v in values))
    return None


def frame_columns(df: Any) -> list[Column] | None:
    """A pandas frame's columns, by dtype, for the renderers here (faster than pandas'
    own ``to_string``); None when a column is of a dtype or holds a value they leave
    to pandas (objects, times, categories, missing values of nullable integers)."""
    if not len(df) or not df.columns.is_unique:
        return None
    out = []
    for name in df.columns:
        if not isinstance(name, str) or _CONTROL.search(name) or len(name) > _MAX_COLWIDTH:
            return None
        s = df[name]
        dtype = str(s.dtype)
        if dtype == "str":
            values = [v if isinstance(v, str) else None for v in s.tolist()]
            if any(v is not None and (_CONTROL.search(v) or len(v) > _MAX_COLWIDTH) for v in values) \
                    or all(v is None for v in values):
                return None
            out.append(Column(name, "str", tuple(values)))
        elif dtype == "float64":
            values = s.tolist()
            if not all(_plain_float(v) for v in values):
                return None
            out.append(Column(name, "float", tuple(values)))
        elif dtype in ("int64", "int32", "Int64", "Int32"):  # the nullable ones without a missing value
            if dtype[0] == "I" and s.hasnans:
                return None
            out.append(Column(name, "int", tuple(s.tolist())))
        elif dtype == "bool":
            out.append(Column(name, "bool", tuple(s.tolist())))
        else:
            return None
    return out


def _plain_float(v: float) -> bool:
    """Within the range every renderer here writes in fixed notation, as pandas does."""
    if math.isnan(v):
        return True
    a = abs(v)
    return a == 0.0 or (10.0 ** -_DIGITS <= a <= 1e6)


def time_column(name: str, values: Sequence[Any]) -> Column | None:
    """``pd.to_datetime(values, utc=True, errors="coerce", format="ISO8601")`` as a
    column; None for a value that Python's ISO parser does not read (pandas might)."""
    out = []
    for v in values:
        if v is None or v is MISSING:
            out.append(None)
            continue
        if not isinstance(v, str) or not _ISO.match(v):
            return None
        try:
            t = datetime.fromisoformat(v)
        except ValueError:
            return None
        t = t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)
        if not 1970 <= t.year <= 9999:
            return None
        out.append(t)
    return Column(name, "time", tuple(out))


def _seconds(t: datetime, sep: str) -> str:
    """``t.strftime(f"%Y-%m-%d{sep}%H:%M:%S")``, a few times faster."""
    return f"{t.year:04d}-{t.month:02d}-{t.day:02d}{sep}{t.hour:02d}:{t.minute:02d}:{t.second:02d}"


# ------------------------------------------------------------------- table
def _table_cells(c: Column) -> list[str]:
    if c.kind == "float":
        cells = ["NaN" if v is None or math.isnan(v) else f"{v:.{_DIGITS}f}" for v in c.values]
        return _trim_zeros(cells)
    if c.kind == "time":
        return ["NaN" if v is None else _seconds(v, " ") for v in c.values]
    if c.kind in ("str", "bools"):
        return ["NaN" if v is None else str(v) for v in c.values]
    return [str(v) for v in c.values]  # int, bool


def _trim_zeros(cells: list[str]) -> list[str]:
    """pandas' ``_trim_zeros_float``: the trailing zeros all numbers share, less one."""
    is_num = [_NUMBER.match(x) is not None for x in cells]
    if not any(is_num):
        return cells
    while all(x.endswith("0") for x, n in zip(cells, is_num) if n):
        cells = [x[:-1] if n else x for x, n in zip(cells, is_num)]
    return [x + "0" if n and x.endswith(".") else x for x, n in zip(cells, is_num)]


def render_table(columns: Sequence[Column]) -> str:
    """``df.to_string(index=False)`` (right-justified, one space between columns)."""
    if not columns or not columns[0].values:
        return "(no rows)"
    cols = []
    for c in columns:
        cells = _table_cells(c)
        head = " " + c.name if c.kind in _NUMERIC else c.name  # pandas' label of a numeric column
        width = max(len(head), max(len(x) for x in cells))
        cols.append([head.rjust(width)] + [x.rjust(width) for x in cells])
    return "\n".join(" ".join(row) for row in zip(*cols))


# --------------------------------------------------------------------- csv
def _csv_cells(c: Column) -> list[str]:
    if c.kind == "float":
        return ["" if v is None or math.isnan(v) else repr(v) for v in c.values]
    if c.kind == "time":
        micros = [v.microsecond for v in c.values if v is not None]
        digits = 0 if not any(micros) else 3 if all(us % 1000 == 0 for us in micros) else 6  # pandas: the finest needed
        return ["" if v is None else _seconds(v, " ") + (f".{v.microsecond:06d}"[:digits + 1] if digits else "")
                + "+00:00" for v in c.values]
    if c.kind in ("str", "bools"):
        return ["" if v is None else str(v) for v in c.values]
    return [str(v) for v in c.values]


def render_csv(columns: Sequence[Column]) -> str:
    """``df.to_csv(index=False)``."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([c.name for c in columns])
    w.writerows(zip(*(_csv_cells(c) for c in columns)) if columns else ())
    return buf.getvalue()


# -------------------------------------------------------------------- json
def _json_str(s: str) -> str:
    return json.dumps(s).replace("/", "\\/")  # ujson escapes the slash, as pandas' encoder does


def _json_float(v: float | None) -> str:
    """pandas' encoder at ``double_precision=10``: ten decimals, trailing zeros dropped."""
    if v is None or math.isnan(v):
        return "null"
    if v == 0.0:
        return "0.0"  # -0.0 too
    text = f"{v:.10f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def _json_cells(c: Column) -> list[str]:
    if c.kind == "float":
        return [_json_float(v) for v in c.values]
    if c.kind == "time":
        return ["null" if v is None else f'"{_seconds(v, "T")}.{v.microsecond // 1000:03d}Z"' for v in c.values]
    if c.kind == "str":
        return ["null" if v is None else _json_str(v) for v in c.values]
    if c.kind in ("bool", "bools"):
        return ["null" if v is None else "true" if v else "false" for v in c.values]
    return [str(v) for v in c.values]


def render_json(columns: Sequence[Column]) -> str:
    """``df.to_json(orient="records", date_format="iso")``."""
    keys = [_json_str(c.name) + ":" for c in columns]
    rows: Iterable[tuple[str, ...]] = zip(*(_json_cells(c) for c in columns)) if columns else ()
    return "[" + ",".join("{" + ",".join(k + v for k, v in zip(keys, row)) + "}" for row in rows) + "]"


# ------------------------------------------------------------- for sql()
#: the longest column name or string value the renderers here show as pandas does
MAX_NAME_WIDTH = _MAX_COLWIDTH


def plain_float(v: float) -> bool:
    """Whether a float64 value renders here as pandas renders it (NaN included)."""
    return _plain_float(v)


def plain_str(s: str) -> bool:
    """Whether a string (value or column name) renders here as pandas renders it."""
    return not _CONTROL.search(s) and len(s) <= _MAX_COLWIDTH

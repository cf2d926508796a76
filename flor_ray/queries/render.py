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
from itertools import repeat
from typing import Any, Sequence

__all__ = ["Column", "MISSING", "column", "array_column", "none_column", "time_column", "frame_columns", "printable", "render_table",
           "render_csv", "render_json"]

#: a key absent from a row (pandas fills NaN, as it does for None in these kinds)
MISSING = object()

#: pandas' display.precision and display.max_colwidth, as the command line sets them
_DIGITS = 6
_MAX_COLWIDTH = 60
_NUMBER = re.compile(r"^\s*[+-]?[0-9]+\.[0-9]*$")  # pandas' _NUMBER_WITH_DECIMAL_RE
_CONTROL = re.compile(r"[\x00-\x1f]")
_NUMERIC = ("int", "ints", "float", "bool")
_FORMATS = ("table", "csv", "json")
_CSV_QUOTE = re.compile(r'[,"\r\n]')
#: the ISO 8601 forms pandas and Python parse alike (to the microsecond: pandas keeps nanoseconds)
_ISO = re.compile(r"^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(?:\.\d{1,6})?(?:Z|[+-]\d{2}:\d{2})?$")


@dataclass(frozen=True)
class Column:
    """One column: its name, its kind (``int``, ``ints`` (nullable: None is ``<NA>``), ``float``,
    ``bool``, ``bools`` (objects: NaN among them), ``str``, ``time``, ``none`` (objects, all
    None)), its values (None where
    pandas holds NaN / NaT; aware UTC datetimes for ``time``) and the formats in which
    they print as pandas prints them (:func:`printable`)."""

    name: str
    kind: str
    values: Sequence[Any]
    formats: tuple = _FORMATS


def printable(columns: Sequence[Column], fmt: str) -> bool:
    """Whether every column prints in ``fmt`` as pandas prints it."""
    return all(fmt in c.formats for c in columns)


def array_column(name: str, values: Any, mask: Any = None) -> Column | None:
    """The column of a numpy array as pandas shows it in a frame (``mask``: the
    missing entries of a nullable integer array), or None for a dtype or value left to
    pandas. Floats beyond fixed notation (or infinite) print as pandas does in CSV
    only, or also in JSON when merely infinite; strings that pandas would cut or that
    hold control characters, in CSV only."""
    import numpy as np

    if not isinstance(name, str) or _CONTROL.search(name) or len(name) > _MAX_COLWIDTH:
        return None
    kind = values.dtype.kind
    if kind in "iu":
        if mask is not None and mask.any():
            return Column(name, "ints", [None if m else v for v, m in zip(values.tolist(), mask.tolist())])
        return Column(name, "int", values.tolist())
    if kind == "b":
        return Column(name, "bool", values.tolist())
    if kind == "f" and values.dtype.itemsize == 8:
        a = np.abs(values)
        plain = (a == 0.0) | ((a >= 10.0 ** -_DIGITS) & (a <= 1e6)) | np.isnan(values)
        formats = _FORMATS if plain.all() else ("csv", "json") if (plain | np.isinf(values)).all() else ("csv",)
        return Column(name, "float", values.tolist(), formats)
    if kind != "O":
        return None
    out = [None if v is None or (isinstance(v, float) and v != v) else v for v in values.tolist()]
    present = set(type(v) for v in out) - {type(None)}
    if present == {str}:
        odd = [v for v in set(out) if v is not None and (_CONTROL.search(v) or len(v) > _MAX_COLWIDTH)]
        return Column(name, "str", out, ("csv",) if odd else _FORMATS)
    if present == {bool}:
        return Column(name, "bools", out)
    return None


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


def none_column(name: str, n: int) -> Column | None:
    """A column of ``n`` None, as pandas holds a list of None (objects: ``None`` in a table)."""
    if not isinstance(name, str) or _CONTROL.search(name) or len(name) > _MAX_COLWIDTH:
        return None
    return Column(name, "none", [None] * n)


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
        cells = _formatted(c.values, f"{{:.{_DIGITS}f}}".format, "NaN")
        return _trim_zeros(cells)
    if c.kind == "time":
        return ["NaN" if v is None else _seconds(v, " ") for v in c.values]
    if c.kind in ("str", "bools"):
        return _strings(c.values, "NaN")
    if c.kind == "ints":
        return ["<NA>" if v is None else str(v) for v in c.values]
    return list(map(str, c.values))  # int, bool, none


def _formatted(values: Sequence[Any], fmt, missing: str) -> list[str]:
    """``fmt`` of each float, ``missing`` for None and NaN (``nan`` is the only cell NaN formats to)."""
    if None in values:
        values = [math.nan if v is None else v for v in values]
    distinct = set(values)
    if len(distinct) * 2 < len(values) and 0.0 not in distinct:  # one value per run on its rows: each once
        # (not with zeros: 0.0 and -0.0 are one key)
        text = {v: fmt(v) for v in distinct}
        cells = [text[v] for v in values]
    else:
        cells = list(map(fmt, values))
    return [missing if x == "nan" else x for x in cells] if "nan" in cells else cells


def _strings(values: Sequence[Any], missing: str) -> list[str]:
    """Each value as ``str`` does, ``missing`` for None."""
    if None not in values and all(type(v) is str for v in set(values)):
        return list(values)
    return [missing if v is None else str(v) for v in values]


def _trim_zeros(cells: list[str]) -> list[str]:
    """pandas' ``_trim_zeros_float``: the trailing zeros all numbers share, less one.

    Every cell here is a number in fixed notation or ``NaN``, so the zeros all share
    are the fewest any number ends with (a number's zeros end at its decimal point)."""
    nums = set(cells)
    nums.discard("NaN")
    if not nums or any("n" in x for x in nums):  # inf: pandas' own rules
        return _trim_zeros_slowly(cells)
    cut = 0
    while cut < _DIGITS and all(x.endswith("0" * (cut + 1)) for x in nums):  # stops at the first that does not
        cut += 1
    if not cut:
        return cells
    return [x if x == "NaN" else x[:-cut] + "0" if x[-cut - 1] == "." else x[:-cut] for x in cells]


def _trim_zeros_slowly(cells: list[str]) -> list[str]:
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
        width = max(len(head), max(map(len, cells)))
        cols.append([head.rjust(width), *map(str.rjust, cells, repeat(width))])
    return "\n".join(map(" ".join, zip(*cols)))


# --------------------------------------------------------------------- csv
def _csv_cells(c: Column) -> list[str]:
    if c.kind == "float":
        return _formatted(c.values, repr, "")  # pandas writes each float as Python's repr does
    if c.kind == "time":
        micros = [v.microsecond for v in c.values if v is not None]
        digits = 0 if not any(micros) else 3 if all(us % 1000 == 0 for us in micros) else 6  # pandas: the finest needed
        return ["" if v is None else _seconds(v, " ") + (f".{v.microsecond:06d}"[:digits + 1] if digits else "")
                + "+00:00" for v in c.values]
    if c.kind in ("str", "bools"):
        cells = _strings(c.values, "")
        distinct = set(cells)
        if not _CSV_QUOTE.search("".join(distinct)):  # one pass over them all: none needs quotes
            return cells
        quote = {x: _csv_quoted(x) for x in distinct if _CSV_QUOTE.search(x)}
        return [quote.get(x, x) for x in cells]
    if c.kind == "ints":
        return ["" if v is None else str(v) for v in c.values]
    if c.kind == "none":
        return [""] * len(c.values)
    return list(map(str, c.values))


def _csv_quoted(x: str) -> str:
    """A field as the csv module's minimal quoting writes it (the fields it quotes hold one of ``_CSV_QUOTE``)."""
    return '"' + x.replace('"', '""') + '"'


def render_csv(columns: Sequence[Column]) -> str:
    """``df.to_csv(index=False)``."""
    if len(columns) < 2:  # a row of one empty field is quoted: the csv module's own rules
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow([c.name for c in columns])
        w.writerows(zip(*(_csv_cells(c) for c in columns)) if columns else ())
        return buf.getvalue()
    head = ",".join(_csv_quoted(c.name) if _CSV_QUOTE.search(c.name) else c.name for c in columns) + "\n"
    rows = "\n".join(map(",".join, zip(*(_csv_cells(c) for c in columns))))
    return head + rows + "\n" if rows else head


# -------------------------------------------------------------------- json
def _json_str(s: str) -> str:
    return json.dumps(s).replace("/", "\\/")  # ujson escapes the slash, as pandas' encoder does


def _json_float(v: float | None) -> str:
    """pandas' encoder at ``double_precision=10``: ten decimals, trailing zeros dropped."""
    if v is None or math.isnan(v) or math.isinf(v):
        return "null"
    if v == 0.0:
        return "0.0"  # -0.0 too
    text = f"{v:.10f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def _json_floats(values: Sequence[Any]) -> list[str]:
    """:func:`_json_float` of each value, in passes over all of them."""
    cells = [x.rstrip("0") for x in _formatted(values, "{:.10f}".format, "null")]
    cells = [x + "0" if x[-1] == "." else x for x in cells]
    if "-0.0" in cells or "inf" in cells or "-inf" in cells:  # -0.0 (the only value that formats so here), inf
        cells = ["0.0" if x == "-0.0" else "null" if x == "inf" or x == "-inf" else x for x in cells]
    return cells


def _json_cells(c: Column) -> list[str]:
    if c.kind == "float":
        return _json_floats(c.values)
    if c.kind == "time":
        return ["null" if v is None else f'"{_seconds(v, "T")}.{v.microsecond // 1000:03d}Z"' for v in c.values]
    if c.kind == "str":
        text = {v: _json_str(v) for v in set(c.values) if v is not None}
        return ["null" if v is None else text[v] for v in c.values]
    if c.kind in ("bool", "bools"):
        return ["null" if v is None else "true" if v else "false" for v in c.values]
    if c.kind in ("ints", "none"):
        return ["null" if v is None else str(v) for v in c.values]
    return list(map(str, c.values))


def render_json(columns: Sequence[Column]) -> str:
    """``df.to_json(orient="records", date_format="iso")``."""
    if not columns or not len(columns[0].values):
        return "[]"
    keyed = [list(map((_json_str(c.name) + ":").__add__, _json_cells(c))) for c in columns]
    return "[{" + "},{".join(map(",".join, zip(*keyed))) + "}]"


# ------------------------------------------------------------- for sql()
#: the longest column name or string value the renderers here show as pandas does
MAX_NAME_WIDTH = _MAX_COLWIDTH


def plain_float(v: float) -> bool:
    """Whether a float64 value renders here as pandas renders it (NaN included)."""
    return _plain_float(v)


def plain_str(s: str) -> bool:
    """Whether a string (value or column name) renders here as pandas renders it."""
    return not _CONTROL.search(s) and len(s) <= _MAX_COLWIDTH

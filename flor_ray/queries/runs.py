"""The runs table of queries: one row per run, a column per ``flor.arg``, and the
runs a ``where`` predicate selects."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import QueryError
from ..store.runs import load_runs
from .sandbox import select_where

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from ..store import Store
    from .render import Column

__all__ = ["runs_frame", "runs_columns", "select_runs", "runs_values"]

_RUN_COLS = (
    "run_id",
    "project",
    "script",
    "version",
    "status",
    "started_at",
    "ended_at",
    "iterations",
    "device",
    "argv",
)


def _rows(metas: list[dict]) -> list[dict]:
    rows = []
    for m in metas:
        row = {c: m.get(c) for c in _RUN_COLS}
        row["argv"] = " ".join(m.get("argv") or [])
        row["device"] = (m.get("env") or {}).get("device")
        for k, v in (m.get("args") or {}).items():
            row[k if k not in _RUN_COLS else f"arg_{k}"] = v
        rows.append(row)
    return rows


def runs_frame(store: "Store", metas: list[dict] | None = None) -> "pd.DataFrame":
    """The runs table: fixed columns plus one column per ``flor.arg`` name."""
    import pandas as pd

    metas = load_runs(store) if metas is None else metas
    rows = _rows(metas)
    df = pd.DataFrame(rows, columns=None if rows else list(_RUN_COLS))
    for c in ("started_at", "ended_at"):
        if c in df:
            df[c] = pd.to_datetime(df[c], utc=True, errors="coerce", format="ISO8601")
    return df


def _typed(name: str, values: list) -> "tuple[str, list] | None":
    """The DuckDB type and values of one column as :func:`runs_frame` registered in DuckDB
    gives them; None where that is not pinned down here (the caller takes the frame)."""
    from .render import MISSING, time_column

    if name in ("started_at", "ended_at"):
        c = time_column(name, values)
        return None if c is None else ("TIMESTAMPTZ", list(c.values))
    present = [v for v in values if v is not MISSING and v is not None]
    if not present:
        return None
    complete = len(present) == len(values)
    kinds = {type(v) for v in present}
    if kinds == {bool}:  # pandas: an object column, its NaN and None read by DuckDB as NULL
        return "BOOLEAN", [None if v is MISSING else v for v in values]
    if kinds == {int}:
        if not all(-2**63 <= v < 2**63 for v in present):
            return None
        if complete:
            return "BIGINT", list(values)
    if kinds <= {int, float}:
        if any(isinstance(v, int) and abs(v) > 2**53 for v in present) or any(v != v for v in present):
            return None
        return "DOUBLE", [None if v is MISSING or v is None else float(v) for v in values]
    if kinds == {str}:
        return "VARCHAR", [None if v is MISSING else v for v in values]
    return None


def runs_values(metas: list[dict]) -> "tuple[list[str], list[str], list[list]] | None":
    """The runs table without pandas: its column names, DuckDB types and a list of values
    per column, the same as :func:`runs_frame` in DuckDB; None when a column's type or a
    value is one that only pandas decides (mixed types, nested values, all missing, ...)."""
    from .render import MISSING

    rows = _rows(metas)
    if not rows:
        return None
    names = list(dict.fromkeys(k for r in rows for k in r))  # pandas: keys in order of first appearance
    types, values = [], []
    for name in names:
        typed = _typed(name, [r.get(name, MISSING) for r in rows])
        if typed is None:
            return None
        types.append(typed[0])
        values.append(typed[1])
    return names, types, values


def runs_columns(store: "Store", metas: list[dict] | None = None) -> "list[Column] | None":
    """:func:`runs_frame` as the columns of :mod:`flor_ray.queries.render` (no pandas:
    JSON in, text out); None when a value needs pandas to be shown as it shows it."""
    from .render import MISSING, column, time_column

    rows = _rows(load_runs(store) if metas is None else metas)
    if not rows:
        return None
    names = list(dict.fromkeys(k for r in rows for k in r))  # pandas: keys in order of first appearance
    out = []
    for name in names:
        values = [r.get(name, MISSING) for r in rows]
        c = time_column(name, values) if name in ("started_at", "ended_at") else column(name, values)
        if c is None:
            return None
        out.append(c)
    return out


def select_runs(store: "Store", where: str | None, metas: list[dict] | None = None) -> list[str]:
    """Run ids whose row of the runs table satisfies the SQL predicate ``where``.

    ``where`` is one boolean expression over the runs table's columns, parsed and
    checked by :func:`flor_ray.queries.sandbox.select_where` and run in its sandbox.
    """
    metas = load_runs(store) if metas is None else metas
    if not where:
        return [m["run_id"] for m in metas]
    if not isinstance(where, str):
        raise QueryError(f"where must be an SQL predicate string, got {type(where).__name__}")
    keep = select_where(runs_frame(store, metas), where)
    return [m["run_id"] for m in metas if m["run_id"] in keep]

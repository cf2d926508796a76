"""The query sandbox: DuckDB connections that see the store's tables and nothing else.

A sandboxed connection is locked before any table is registered: no file or network
access (``enable_external_access`` off, so read_csv, read_blob, COPY, EXPORT, ATTACH,
INSTALL and http/s3 URLs fail inside DuckDB itself; no temp directory either, which
DuckDB would otherwise leave open: a query too large for memory fails instead of
spilling), no extension auto-install or auto-load, no Python replacement scans (a query
cannot read the caller's variables), and a configuration that no SET, RESET or PRAGMA
can change. The tables are Arrow data registered from Python: streams from a second,
private DuckDB (:mod:`flor_ray.queries.sources`, which reads a local store's listed
parts and holds the runs table, and which no user's SQL reaches), or data that pyarrow
read from the store's listing; so the sandboxed engine never opens a file, the store's
own parts included. Registered tables are views, so no INSERT, UPDATE or DELETE can
change them, inside a WITH or not. Every query runs in a transaction that is rolled
back, so nothing a statement might leave behind reaches the next query. Statements
other than queries are refused before they run, with a message naming what is not
allowed.

A ``where`` predicate is parsed by DuckDB as exactly one expression over the runs
table, checked node by node against what a predicate needs (columns, literals,
comparisons, boolean and arithmetic operators, IN, BETWEEN, LIKE, IS NULL, CASE, casts,
a list of pure functions), and run as the statement DuckDB renders from the checked
tree: it is never pasted into SQL text.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any, Iterable

from ..errors import QueryError

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = ["connect", "check_query", "run_query", "fetch_rows", "refusal", "select_where", "QUERY_WORDS"]

#: what sql() runs: DuckDB parses DESCRIBE, SHOW, SUMMARIZE, FROM, VALUES, UNPIVOT and
#: WITH ... SELECT as SELECT statements, PIVOT as a MULTI statement
QUERY_WORDS = ("SELECT", "WITH", "FROM", "DESCRIBE", "SHOW", "SUMMARIZE", "PIVOT", "UNPIVOT", "VALUES", "EXPLAIN")

#: set before any table exists; the last one makes the others permanent
_LOCKDOWN = (
    "SET enable_progress_bar = false",
    "SET python_enable_replacements = false",
    "SET autoinstall_known_extensions = false",
    "SET autoload_known_extensions = false",
    # the default temp directory (<cwd>/.tmp) stays open to queries when external access is off
    "SET temp_directory = ''",
    "SET enable_external_access = false",
    "SET lock_configuration = true",
)

# what a refused statement would have done, by DuckDB statement type
_WHAT = {
    "INSERT": "changing the tables", "UPDATE": "changing the tables", "DELETE": "changing the tables",
    "CREATE": "creating tables, views, macros, types or secrets", "DROP": "dropping tables or views",
    "ALTER": "changing the tables", "COPY": "reading or writing files", "EXPORT": "writing files",
    "ATTACH": "attaching databases", "DETACH": "detaching databases", "LOAD": "installing or loading extensions",
    "SET": "changing settings", "PRAGMA": "changing settings or importing databases",
    "TRANSACTION": "transaction control", "CALL": "calling table functions and pragmas",
    "VACUUM": "maintenance statements", "PREPARE": "prepared statements", "EXECUTE": "prepared statements",
}


def connect():
    """A new in-memory DuckDB connection, locked down (see the module docstring)."""
    import duckdb

    con = duckdb.connect()
    for statement in _LOCKDOWN:
        con.execute(statement)
    return con


def _not_a_query(word: str, kind: str) -> QueryError:
    what = _WHAT.get(kind, "anything but reading the tables")
    return QueryError(
        f"sql() runs queries only ({', '.join(QUERY_WORDS)}), not {word}: {what} is not allowed; "
        "the tables are read-only views of the store, which only recording and replay write"
    )


_EXPLAIN = re.compile(r"^\s*EXPLAIN\s*(\([^)]*\))?\s*(ANALY[SZ]E\b)?", re.IGNORECASE)
# the statements whose first word says more than DuckDB's type (INSTALL parses as LOAD, RESET as SET)
_WORDS = {"INSTALL", "LOAD", "RESET", "SET", "PRAGMA", "USE", "IMPORT", "FORCE", "BEGIN", "COMMIT", "ROLLBACK",
          "CHECKPOINT", "ANALYZE", "DEALLOCATE"}


def check_query(con, query: str) -> None:
    """Raise a :class:`QueryError` naming the first statement of ``query`` that is not a query.

    Statement types come from DuckDB's parser (a parse error is raised as DuckDB's own).
    This check is for the message: what the sandbox lets a query do is the same either way.
    """
    import duckdb

    for st in con.extract_statements(query):
        text = st.query.strip().lstrip("(")
        first = (text.split(None, 1) or [""])[0].upper().rstrip(";")
        kind = st.type.name
        if st.type == duckdb.StatementType.SELECT:
            continue
        if st.type == duckdb.StatementType.MULTI and first == "PIVOT":
            continue
        if st.type == duckdb.StatementType.EXPLAIN:
            inner = _EXPLAIN.sub("", text, count=1)
            try:
                check_query(con, inner)
            except duckdb.Error:  # an EXPLAIN form not split here: DuckDB runs it, sandboxed
                pass
            continue
        raise _not_a_query(first if first in _WORDS else kind, kind)


def run_query(con, query: str) -> "pd.DataFrame":
    """Run ``query`` on a sandboxed connection inside a transaction that is rolled back."""
    con.begin()
    try:
        return con.execute(query).df()
    finally:
        con.rollback()


def fetch_rows(con, query: str) -> tuple[list[str], list[str], list[tuple]]:
    """:func:`run_query`'s answer as column names, DuckDB type names and Python rows (no pandas)."""
    con.begin()
    try:
        result = con.execute(query)
        desc = result.description or []
        return [d[0] for d in desc], [str(d[1]) for d in desc], result.fetchall()
    finally:
        con.rollback()


def refusal(exc: Exception, what: str = "sql()") -> QueryError | None:
    """The message for a DuckDB error that the sandbox raised; None for any other error."""
    import duckdb

    first = (str(exc).splitlines() or [""])[0]
    if isinstance(exc, duckdb.PermissionException):
        return QueryError(
            f"{what} cannot read or write files, reach the network or load extensions ({first}); "
            "query the tables logs, runs and output, e.g. SELECT name, count(*) FROM logs GROUP BY name"
        )
    low = first.lower()
    if "configuration has been locked" in low:
        return QueryError(f"{what} cannot change settings (SET, RESET, PRAGMA): {first}")
    if ("can only delete from base table" in low or "can only update base table" in low
            or "is not an table" in low or "is not a table" in low):
        return QueryError(
            f"{what} cannot change the tables (INSERT, UPDATE, DELETE, also inside WITH or EXPLAIN ANALYZE): "
            f"they are read-only views of the store ({first})"
        )
    return None


# ------------------------------------------------------------------- where
#: functions a where predicate may call: DuckDB's names for operators (LIKE is ``~~``,
#: ILIKE ``~~*``, GLOB ``~~~``, SIMILAR TO ``regexp_full_match``, INTERVAL n DAY ``to_days``)
#: and pure scalar functions of strings, numbers and times
WHERE_FUNCTIONS = frozenset({
    "+", "-", "*", "/", "//", "%", "**", "^", "||",
    "~~", "!~~", "~~*", "!~~*", "~~~", "!~~~", "like_escape", "not_like_escape", "ilike_escape", "not_ilike_escape",
    "regexp_matches", "regexp_full_match", "contains", "starts_with", "ends_with", "prefix", "suffix",
    "lower", "upper", "lcase", "ucase", "length", "strlen", "trim", "ltrim", "rtrim", "substring", "substr",
    "left", "right", "concat", "replace", "split_part", "strpos", "instr", "position",
    "abs", "round", "floor", "ceil", "ceiling", "trunc", "sign", "sqrt", "ln", "log", "log10", "log2", "exp",
    "pow", "power", "greatest", "least", "isnan", "isinf", "isfinite", "mod",
    "date_trunc", "date_part", "datepart", "extract", "strftime", "strptime", "epoch", "epoch_ms", "year",
    "month", "day", "hour", "minute", "second", "now", "current_timestamp", "current_date", "today",
    "to_days", "to_hours", "to_minutes", "to_seconds", "to_milliseconds", "to_weeks", "to_months", "to_years",
    "date_diff", "datediff", "age", "to_timestamp", "nullif", "ifnull",
})
_WHERE_OPERATORS = frozenset({"OPERATOR_NOT", "OPERATOR_IS_NULL", "OPERATOR_IS_NOT_NULL", "COMPARE_IN",
                              "COMPARE_NOT_IN", "OPERATOR_COALESCE", "OPERATOR_NULLIF"})
_WHERE_CLASSES = frozenset({"CONJUNCTION", "COMPARISON", "BETWEEN", "CONSTANT", "CAST", "CASE", "TYPE"})
_NAMED = {"SUBQUERY": "a subquery", "WINDOW": "a window function", "STAR": "*", "LAMBDA": "a lambda",
          "PARAMETER": "a parameter", "COLUMNS": "COLUMNS(...)", "POSITIONAL_REFERENCE": "a positional reference"}


def _where_error(where: str, why: str, columns: Iterable[str]) -> QueryError:
    return QueryError(
        f"invalid where predicate {where!r}: {why}; it is one boolean expression over the runs table "
        "(columns, literals, comparisons, AND/OR/NOT, arithmetic, IN, BETWEEN, LIKE, IS NULL, CASE, casts, "
        f"functions such as lower, abs, round, now), whose columns are: {', '.join(columns)}"
    )


def _where_failed(where: str, exc: Exception, columns: Iterable[str]) -> QueryError:
    import duckdb

    first = (str(exc).splitlines() or [""])[0]
    if isinstance(exc, duckdb.PermissionException):
        first = f"reading files, the network or extensions is not allowed ({first})"
    return _where_error(where, first, columns)


def _walk(node: Any, columns: set[str]) -> str | None:
    """What in the parsed expression ``node`` is not allowed in a where predicate, or None."""
    if isinstance(node, list):
        for item in node:
            why = _walk(item, columns)
            if why:
                return why
        return None
    if not isinstance(node, dict):
        return None
    cls = node.get("class")
    if cls is not None:
        kind = node.get("type")
        if cls == "COLUMN_REF":
            names = [str(n) for n in node.get("column_names") or []]
            qualified_ok = len(names) == 1 or (len(names) == 2 and names[0].lower() == "runs")
            if not names or not qualified_ok or names[-1].lower() not in columns:
                return f"{'.'.join(names)} is not a column of the runs table"
        elif cls == "FUNCTION":
            name = str(node.get("function_name", "")).lower()
            if node.get("schema") or node.get("catalog") or name not in WHERE_FUNCTIONS:
                return f"the function {name}() is not allowed"
        elif cls == "OPERATOR":
            if kind not in _WHERE_OPERATORS:
                return f"the operator {kind} is not allowed"
        elif cls not in _WHERE_CLASSES:
            return f"{_NAMED.get(cls, cls.lower())} is not allowed"
    for key, value in node.items():
        if key != "class":
            why = _walk(value, columns)
            if why:
                return why
    return None


def select_where(runs: "pd.DataFrame", where: str) -> set[str]:
    """The ``run_id`` of each row of ``runs`` for which the predicate ``where`` holds."""
    import duckdb

    columns = [str(c) for c in runs.columns]
    con = connect()
    try:
        con.register("runs", runs)
        try:
            rel = con.table("runs").filter(where)  # DuckDB's parser: exactly one expression
            parsed = json.loads(con.execute("SELECT json_serialize_sql(?)", [rel.sql_query()]).fetchall()[0][0])
        except duckdb.Error as exc:
            raise _where_failed(where, exc, columns) from exc
        statements = parsed.get("statements") or []
        node = statements[0].get("node", {}) if len(statements) == 1 else {}
        shape = (node.get("type"), (node.get("from_table") or {}).get("table_name"), node.get("modifiers"),
                 node.get("group_expressions"), node.get("having"), node.get("qualify"), node.get("sample"))
        if parsed.get("error") or shape != ("SELECT_NODE", "runs", [], [], None, None, None) \
                or (node.get("cte_map") or {}).get("map") or node.get("where_clause") is None:
            raise _where_error(where, "it is not one expression", columns)
        why = _walk(node["where_clause"], {c.lower() for c in columns})
        if why:
            raise _where_error(where, why, columns)
        checked = con.execute("SELECT json_deserialize_sql(?)", [json.dumps(parsed)]).fetchall()[0][0]
        try:
            return {r[0] for r in con.sql(checked).project("run_id").fetchall()}
        except duckdb.Error as exc:
            raise _where_failed(where, exc, columns) from exc
    finally:
        con.close()

"""``flor.sql``: DuckDB SQL over the log relation, the runs table and the captured
output (:mod:`flor_ray.queries.output`), sandboxed.

``logs`` / ``logs_all`` / ``replay_mismatch`` are views over ``logs_arrow`` (the
Parquet parts, read by DuckDB's own Parquet reader in a private connection,
:mod:`flor_ray.queries.sources`: a local store's files, or an object store's fetched
whole as local copies, :mod:`flor_ray.queries.copies`; else through pyarrow; when small,
its rows in memory), and ``runs`` the runs table; both are kept per store
(:mod:`flor_ray.queries.cache`) and built again when a listing of the store differs.
:func:`sql_columns` gives the command line the answer without pandas.
"""

from __future__ import annotations

import json
import threading
from typing import TYPE_CHECKING, Any

from ..errors import QueryError
from ..store.logs import MISMATCH_SOURCE, dataset, file_schemas, log_parts, unreadable
from .cache import CACHE
from .dataframe import LISTINGS
from .output import output_listing, register_output
from . import copies, sources
from .runs import runs_frame, runs_values
from .sandbox import check_query, connect, fetch_rows, refusal, run_query

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from .render import Column

    from ..store import Store

__all__ = ["sql", "sql_columns", "connection", "SqlConnection", "SQL_MATERIALIZE_ROWS"]

_CTX = "name, loops, iter0, iter1, iter2, iter3, items"
#: ``logs_all``: every row of every partition (kept-apart ones too) with a typed
#: ``value``; ``logs``: recorded rows, and each replayed value once, the earliest
#: task's of its identity (run, name, loop context, occurrence); ``replay_mismatch``:
#: the rows of tasks that failed their fidelity check, next to the recorded values.
_VALUE_VIEWS = (
    "CREATE OR REPLACE VIEW logs_all AS SELECT *, "
    "CASE vtype WHEN 'float' THEN value_float WHEN 'int' THEN value_int::DOUBLE "
    "WHEN 'bool' THEN value_int::DOUBLE END AS value FROM logs_arrow",
    "CREATE OR REPLACE VIEW logs AS SELECT * FROM logs_all WHERE source = 'record' UNION ALL "
    "SELECT * EXCLUDE (_occ, _pick) FROM (SELECT l.*, row_number() OVER ("
    f"PARTITION BY l.run_id, {', '.join('l.' + c for c in _CTX.split(', '))}, l._occ "
    "ORDER BY o.written NULLS LAST, l.task) AS _pick FROM ("
    f"SELECT *, row_number() OVER (PARTITION BY run_id, task, {_CTX} ORDER BY seq) AS _occ "
    "FROM logs_all WHERE source = 'replay') l LEFT JOIN flor_replay_order o ON o.task = l.task) WHERE _pick = 1",
    "CREATE OR REPLACE VIEW replay_mismatch AS WITH "
    f"m AS (SELECT *, row_number() OVER (PARTITION BY run_id, task, {_CTX} ORDER BY seq) AS _occ "
    f"FROM logs_all WHERE source = '{MISMATCH_SOURCE}'), "
    "r AS (SELECT run_id, name, loops, iter0, iter1, iter2, iter3, items, vtype, value_float, value_int, value_str, "
    f"row_number() OVER (PARTITION BY run_id, {_CTX} ORDER BY seq) AS _occ FROM logs_all "
    f"WHERE source = 'record' AND run_id IN (SELECT run_id FROM m)) "
    "SELECT m.* EXCLUDE (_occ), r.value_float AS recorded_float, r.value_int AS recorded_int, "
    "r.value_str AS recorded_str, (r.name IS NOT NULL AND (m.vtype IS DISTINCT FROM r.vtype "
    "OR m.value_float IS DISTINCT FROM r.value_float OR m.value_int IS DISTINCT FROM r.value_int "
    "OR m.value_str IS DISTINCT FROM r.value_str)) AS mismatched FROM m LEFT JOIN r ON m.run_id = r.run_id "
    "AND m.name = r.name AND m._occ = r._occ AND "
    + " AND ".join(f"m.{c} IS NOT DISTINCT FROM r.{c}" for c in _CTX.split(", ")[1:]),
)


def _create_views(con, pieces) -> None:
    """The views over ``logs_arrow``, and the order of the replay partitions among
    ``pieces`` that ``logs`` keeps the earliest of (the same as dataframe()'s)."""
    replays = sorted((p for p in pieces if p.source == "replay"), key=lambda p: (p.stamp[:1], p.origin))
    keys = [p.task.replace("'", "''") for p in replays]
    rows = ", ".join(f"('{k}', {i})" for i, k in enumerate(keys))
    con.execute("CREATE OR REPLACE TABLE flor_replay_order AS "
                + (f"SELECT * FROM (VALUES {rows}) t(task, written)" if rows
                   else "SELECT NULL::VARCHAR AS task, NULL::BIGINT AS written WHERE false"))
    for view in _VALUE_VIEWS:
        con.execute(view)


#: a relation up to this many rows is read into memory (~300 bytes a row) when its
#: tables are built, so that later queries do not open every file again
SQL_MATERIALIZE_ROWS = 100_000
#: files larger than this in all (a few KiB a file aside) are not tried: more rows
_SQL_MATERIALIZE_BYTES = 4 << 20



def _sql_error(exc: Exception, columns) -> QueryError:
    return QueryError(
        f"SQL failed: {str(exc).splitlines()[0]}; tables: logs(run_id, source, version, file, "
        "loops, iter0..iter3, items, name, vtype, value, value_float, value_int, value_str, seq, task), "
        "logs_all (every row, replayed values as often as tasks wrote them), replay_mismatch (rows kept apart "
        f"by the fidelity check, with recorded_* and mismatched), output(run_id, stream, line, time, loops, "
        f"iter0..iter3, text: captured printed lines) and runs({', '.join(map(str, columns))})"
    )


class SqlConnection:
    """One store's sandboxed DuckDB connection (:mod:`flor_ray.queries.sandbox`), kept between
    :func:`sql` calls, and its reader (:mod:`flor_ray.queries.sources`).

    ``logs_arrow``, ``runs`` and ``output`` are scans of Arrow data given from Python: the
    reader's streams over the parts (a local store's, or local copies of an object
    store's) and over the runs table it holds, or Arrow data read by pyarrow (an object
    store's relation too large to copy, a segment read in part, a value only pandas types). They are built from a listing of the store and registered again when a later
    listing differs (a new run, a new flush, a replay partition, a rewritten or deleted
    file). Used under ``lock`` only.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.con: Any = None
        self.reader: Any = None  # the private connection that reads the parts (never sees a user's SQL)
        self.logs_key: Any = None  # the listing the logs tables were built from
        #: "table": the rows in memory; "view": read from the files by each query
        self.logs_kind: str | None = None
        self.runs_key: Any = None
        self.runs_columns: tuple[str, ...] = ()
        self.output_key: Any = None  # the listing the output table was built from
        self.copies = copies.LocalCopies()  # an object store's files the reader reads

    def connect(self):
        if self.con is None:
            self.con = connect()
        return self.con

    def reading(self):
        """The reader: an in-memory DuckDB that only flor_ray's own statements reach."""
        if self.reader is None:
            import duckdb

            self.reader = duckdb.connect(config={"autoinstall_known_extensions": "false",
                                                 "autoload_known_extensions": "false"})
        return self.reader

    def close(self) -> None:
        cons, self.con, self.reader = (self.con, self.reader), None, None
        self.logs_key = self.logs_kind = self.runs_key = self.output_key = None
        self.runs_columns = ()
        self.copies.clear()
        for con in cons:
            if con is not None:
                try:
                    con.close()
                except Exception:  # noqa: BLE001 - closing a connection that is going anyway
                    pass

    def _register(self, name: str, source: Any) -> None:
        con = self.connect()
        try:
            con.unregister(name)
        except Exception:  # noqa: BLE001 - nothing registered under the name yet
            pass
        if sources.is_reader_source(source):
            sources.register(con, name, source)
        else:
            con.register(name, source)

    def forget(self, name: str) -> None:
        """Unregister a table that a query does not read and that may be stale, so that
        a query naming it after all meets no table (and is run again with all of them)
        rather than old rows."""
        key = {"runs": "runs_key", "logs_arrow": "logs_key", "output": "output_key"}[name]
        if getattr(self, key) is None:
            return
        setattr(self, key, None)
        try:
            self.connect().unregister(name)
        except Exception:  # noqa: BLE001 - nothing registered under the name
            pass

    def ensure_runs(self, store: "Store", metas: list[dict], key) -> None:
        if self.runs_key != key:
            self.set_runs(store, metas, key)

    def set_runs(self, store: "Store", metas: list[dict], key) -> None:
        con = self.connect()
        self.runs_key = None
        typed = runs_values(metas) if sources.available(con) else None
        if typed is not None:  # without pandas: the reader holds the same table
            table = sources.runs_table(self.reading(), "flor_runs", *typed)
            self._register("runs", table.source)
            self.runs_columns, self.runs_key = table.columns, key
            return
        import duckdb

        runs = runs_frame(store, metas)
        # as Arrow (a registered DataFrame is converted again by every query), unless a
        # column does not convert: then the DataFrame, failing only where it is used
        con.register("flor_runs_frame", runs)
        try:
            table = con.sql("SELECT * FROM flor_runs_frame").to_arrow_table()
        except duckdb.Error:
            table = runs
        finally:
            con.unregister("flor_runs_frame")
        self._register("runs", table)
        self.runs_columns, self.runs_key = tuple(runs.columns), key

    def set_logs(self, store: "Store", pieces) -> None:
        con = self.connect()
        self.logs_key = self.logs_kind = None
        n_files = len({p.file for p in pieces})
        small = sum(p.origin_size or 0 for p in pieces) <= _SQL_MATERIALIZE_BYTES + 8192 * n_files
        if sources.available(con) and (not pieces or store.is_local or copies.fetchable(pieces)):
            reader = self.reading()
            # an object store's files are read as local copies, fetched whole
            fetch = None if store.is_local else (lambda wanted: self.copies.paths(store, wanted))
            try:
                select = (sources.parts_select(reader, store, pieces, fetch) if pieces
                          else sources.empty_select(sources.LOGS_COLUMNS))
            except copies.NoLocalRoom:  # no room for the copies here: pyarrow reads the store
                self.copies.clear()
                select = None
            if select is not None:
                self.logs_kind = "view" if pieces else "table"
                if pieces and small and reader.execute(
                        f"SELECT count(*) FROM ({select})").fetchone()[0] <= SQL_MATERIALIZE_ROWS:
                    reader.execute(f"CREATE OR REPLACE TABLE flor_logs AS {select}")
                    select, self.logs_kind = "SELECT * FROM flor_logs", "table"
                    self.copies.clear()  # the rows are in memory
                names = [n for n, _ in sources.LOGS_COLUMNS]
                self._register("logs_arrow", sources.ReaderSource(reader, select, names))
                _create_views(con, pieces)
                self.logs_key = pieces
                return
        self._set_logs_arrow(store, pieces, small)

    def _set_logs_arrow(self, store: "Store", pieces, small: bool) -> None:
        """:meth:`set_logs` through pyarrow: an object store, or a segment read in part."""
        import pyarrow as pa

        from ..store.logs import read_pieces

        con = self.connect()
        if not pieces:
            file_schema, part_schema = file_schemas()
            source: Any = pa.schema(list(file_schema) + list(part_schema)).empty_table()
        else:  # a lazy Arrow dataset (projections and filters pushed down), or its rows
            # dictionary-encoded, as in the files: DuckDB scans the codes, not millions of
            # equal strings (as fast as its own Parquet reader on the 10^6-row benchmark)
            file_schema, part_schema = file_schemas(dictionary=True)
            if sources.available(con):  # the pieces scanned by pyarrow's Parquet reader
                known = [p.rows for p in pieces]  # a segment's pieces say their rows, loose files not
                many = None not in known and sum(known) > SQL_MATERIALIZE_ROWS
                source = read_pieces(store, pieces, dictionary=True) if small and not many else None
                if source is None or source.num_rows > SQL_MATERIALIZE_ROWS:
                    source = sources.PiecesSource(store, pieces, pa.schema(list(file_schema) + list(part_schema)))
            else:
                source = dataset(store, pieces, file_schema, part_schema, True)
                if source is None:  # a segment only partly read: its pieces, in memory
                    source = read_pieces(store, pieces, dictionary=True)
                elif small and source.count_rows() <= SQL_MATERIALIZE_ROWS:
                    source = source.to_table()
        self._register("logs_arrow", source)
        self.logs_kind = "view" if pieces and not isinstance(source, pa.Table) else "table"
        _create_views(con, pieces)
        self.logs_key = pieces


def connection(store: "Store") -> SqlConnection:
    """The store's kept connection (in :data:`flor_ray.queries.cache.CACHE`)."""
    return CACHE.sql_connection(store, SqlConnection)


def sql(store: "Store", query: str) -> "pd.DataFrame":
    """Run DuckDB SQL with ``logs`` (the long relation) and ``runs`` as tables.

    Queries only, in the sandbox of :mod:`flor_ray.queries.sandbox`: no file, network,
    extension or setting is reachable, and no statement changes the tables. The
    connection and its tables are kept per store and reused while a listing of the
    store shows the same files (names, sizes, change stamps), so a small query costs a
    listing and the query itself; a new run, flush or replay partition is seen by the
    next call. A relation of up to :data:`SQL_MATERIALIZE_ROWS` rows is held in memory,
    larger ones are read from the Parquet files by every query.
    """
    return _run(store, query, frame=True)


def sql_columns(store: "Store", query: str) -> "list[Column] | None":
    """:func:`sql`'s answer as the columns of :mod:`flor_ray.queries.render` (the command
    line prints them without pandas), or None when :func:`sql`'s frame prints a column
    otherwise (a type or value that render leaves to pandas, no rows): then call :func:`sql`."""
    return _run(store, query, frame=False)


def _run(store: "Store", query: str, frame: bool) -> Any:
    import duckdb

    store.check()
    if not isinstance(query, str) or not query.strip():
        raise QueryError("sql() needs a query string, e.g. \"SELECT name, count(*) FROM logs GROUP BY name\"")
    metas, runs_listing, _ = CACHE.runs(store)
    runs_key = (runs_listing, tuple(m.get("status") for m in metas))
    listing = log_parts(store, runs={m["run_id"] for m in metas})
    for _ in range(LISTINGS - 1):
        try:
            return _query(store, query, metas, runs_key, listing, frame)
        except (QueryError, duckdb.Error, OSError, ValueError):
            # a part compacted away since the listing reads as missing or unreadable:
            # the query runs again on a new listing; the same listing, the same error
            again = log_parts(store, runs={m["run_id"] for m in metas})
            if again == listing:
                raise
            listing = again
    return _query(store, query, metas, runs_key, listing, frame)


#: what builds each table a query may name: the logs group (one listing of the parts), runs, output
_LOGS_GROUP = frozenset({"logs", "logs_all", "replay_mismatch", "logs_arrow", "flor_replay_order"})
#: table references through which a query reaches tables it does not name
#: (``query_table('runs')``, ``duckdb_tables()``; ``SHOW``, ``DESCRIBE``, ``SUMMARIZE``)
_INDIRECT = frozenset({"TABLE_FUNCTION", "SHOW_REF"})


def named_tables(con, query: str) -> frozenset[str] | None:
    """The tables ``query`` names (lower case), read from DuckDB's own parse tree
    (``json_serialize_sql``), so that a query builds only the tables it reads: the runs
    table of thousands of runs costs a query on ``logs`` alone more than its scan.
    None when the tree does not tell them all: a statement it does not serialize
    (``EXPLAIN``, ``PIVOT ...``), a table function, a ``SHOW``/``DESCRIBE``, a table of
    another schema (``information_schema``): then every table is built."""
    import duckdb

    try:
        tree = json.loads(con.execute("SELECT json_serialize_sql(?)", [query]).fetchall()[0][0])
    except (duckdb.Error, ValueError, TypeError):
        return None
    if not isinstance(tree, dict) or tree.get("error"):
        return None
    names: set[str] = set()
    todo: list[Any] = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, dict):
            kind = node.get("type")  # a table reference's, an expression's, or a type (a dict)
            if not isinstance(kind, str):
                kind = None
            if kind in _INDIRECT:
                return None
            if kind == "BASE_TABLE":
                if str(node.get("schema_name") or "main").lower() != "main" or node.get("catalog_name") not in (None, ""):
                    return None
                names.add(str(node.get("table_name", "")).lower())
            todo.extend(node.values())
        elif isinstance(node, list):
            todo.extend(node)
    return frozenset(names)


def _query(store: "Store", query: str, metas: list[dict], runs_key, listing, frame: bool,
           all_tables: bool = False) -> Any:
    """:func:`sql` on the parts of ``listing`` (``frame``: a DataFrame, else :func:`sql_columns`'s),
    with the tables the query names (``all_tables``: all of them)."""
    import duckdb

    named = None
    files = sorted({p.file for p in listing})
    state = connection(store)
    with state.lock:
        try:
            con = state.connect()
            check_query(con, query)
            named = None if all_tables else named_tables(con, query)
            if named is None or "runs" in named:
                state.ensure_runs(store, metas, runs_key)
            elif state.runs_key != runs_key:
                state.forget("runs")
            if named is None or named & _LOGS_GROUP:
                if state.logs_key != listing:
                    state.set_logs(store, listing)
            elif state.logs_key != listing:
                state.forget("logs_arrow")
            if named is None or "output" in named:
                outputs = output_listing(store, {m["run_id"] for m in metas})
                if state.output_key != outputs:
                    state.output_key = None
                    reader = state.reading() if sources.available(con) else None
                    register_output(con, store, outputs, reader)
                    state.output_key = outputs
            else:
                state.forget("output")
            return run_query(con, query) if frame else _columns(*fetch_rows(con, query))
        except QueryError:
            raise
        except duckdb.CatalogException as exc:
            if named is None:
                raise refusal(exc) or _sql_error(exc, state.runs_columns) from exc
        except (duckdb.IOException, duckdb.InvalidInputException) as exc:
            if "parquet" in str(exc).lower() or "thrift" in str(exc).lower():
                raise unreadable(store, files, exc) from exc
            raise refusal(exc) or _sql_error(exc, state.runs_columns) from exc
        except duckdb.FatalException as exc:  # the database is unusable: a new one next time
            columns = state.runs_columns
            state.close()
            raise _sql_error(exc, columns) from exc
        except duckdb.Error as exc:
            raise refusal(exc) or _sql_error(exc, state.runs_columns) from exc
        except (OSError, ValueError) as exc:  # a corrupted file met by the Arrow scan
            raise unreadable(store, files, exc) from exc
    # a name it was not given (a misspelt table, or one named_tables missed): once more with
    # every table built, for the answer or for the error that lists the tables there are
    return _query(store, query, metas, runs_key, listing, frame, all_tables=True)


#: DuckDB's result types that ``.df()`` gives the dtype :func:`~flor_ray.queries.render.frame_columns`
#: takes, and that kind (an integer or boolean with a NULL is a nullable dtype: left to pandas)
_KINDS = {"BIGINT": "int", "INTEGER": "int", "DOUBLE": "float", "VARCHAR": "str", "BOOLEAN": "bool"}


def _columns(names: list[str], types: list[str], rows: list[tuple]) -> "list[Column] | None":
    """``frame_columns(result.df())`` from the result's rows, or None where that is None."""
    from .render import MAX_NAME_WIDTH, Column, plain_float, plain_str

    if not rows or len(set(names)) < len(names):
        return None
    out = []
    for k, (name, kind) in enumerate(zip(names, (_KINDS.get(t) for t in types))):
        if kind is None or not isinstance(name, str) or not plain_str(name) or len(name) > MAX_NAME_WIDTH:
            return None
        values = tuple(r[k] for r in rows)
        if kind == "float":
            values = tuple(float("nan") if v is None else v for v in values)
            if not all(plain_float(v) for v in values):
                return None
        elif kind == "str":
            if all(v is None for v in values) or not all(v is None or plain_str(v) for v in values):
                return None
        elif None in values:
            return None
        out.append(Column(name, kind, values))
    return out

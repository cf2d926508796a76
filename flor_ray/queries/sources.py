"""The tables of ``flor.sql`` read by a second, private DuckDB connection (the reader),
without pandas, pyarrow.dataset or a copy through Python values.

The sandboxed connection (:mod:`flor_ray.queries.sandbox`) never opens a file: it scans
Arrow streams that a :class:`ReaderSource` hands it. The reader, an in-memory DuckDB
that only flor_ray's own statements reach, reads exactly the listed Parquet parts of a
local store (or their local copies, :mod:`flor_ray.queries.copies`) with DuckDB's Parquet reader (the columns and the simple filters of each
scan pushed down), or holds the runs table built from the runs' metadata. A user's query
cannot name the reader: it is another database, and ATTACH is refused in the sandbox.

The scan's source protocol is DuckDB's (``duckdb._sources``, DuckDB 2.0); where it is
not there, :func:`available` is false and the callers keep their pyarrow path.
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

__all__ = ["available", "ReaderSource", "PiecesSource", "register", "quote", "literal", "RunsTable", "runs_table"]


def _base() -> type | None:
    """DuckDB 2.0's base class of the sources its Arrow scan reads; None in a DuckDB without it."""
    try:
        from duckdb._sources import ArrowScanSource
    except ImportError:  # pragma: no cover - an older DuckDB: the pyarrow path
        return None
    return ArrowScanSource


def available(con: Any) -> bool:
    """Whether ``con`` scans a :class:`ReaderSource` (DuckDB's source protocol is there)."""
    return hasattr(con, "_register_arrow_source") and _base() is not None


def quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


# ------------------------------------------------------- Arrow C schema
class _ArrowSchema(ctypes.Structure):
    _fields_ = (("format", ctypes.c_char_p), ("name", ctypes.c_char_p), ("metadata", ctypes.c_char_p),
                ("flags", ctypes.c_int64), ("n_children", ctypes.c_int64), ("children", ctypes.c_void_p),
                ("dictionary", ctypes.c_void_p), ("release", ctypes.c_void_p), ("private_data", ctypes.c_void_p))


class _ArrowArrayStream(ctypes.Structure):
    _fields_ = (("get_schema", ctypes.c_void_p), ("get_next", ctypes.c_void_p), ("get_last_error", ctypes.c_void_p),
                ("release", ctypes.c_void_p), ("private_data", ctypes.c_void_p))


_GET_SCHEMA = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(_ArrowArrayStream), ctypes.POINTER(_ArrowSchema))
_RELEASE_SCHEMA = ctypes.CFUNCTYPE(None, ctypes.POINTER(_ArrowSchema))
_API = ctypes.PyDLL(None)  # the interpreter's own C API (PyCapsule_*), called with the GIL held
_API.PyCapsule_GetPointer.restype = ctypes.c_void_p
_API.PyCapsule_GetPointer.argtypes = (ctypes.py_object, ctypes.c_char_p)
_API.PyCapsule_New.restype = ctypes.py_object
_API.PyCapsule_New.argtypes = (ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p)
_SCHEMAS: dict[int, _ArrowSchema] = {}  # the structs of live schema capsules, kept from the collector
_SCHEMAS_LOCK = threading.Lock()


@ctypes.CFUNCTYPE(None, ctypes.c_void_p)
def _free_schema(capsule: int) -> None:
    """The capsule's destructor: release the schema (unless its consumer moved it), drop the struct."""
    ptr = _API.PyCapsule_GetPointer(ctypes.cast(capsule, ctypes.py_object), b"arrow_schema")
    struct = _ArrowSchema.from_address(ptr)
    if struct.release:
        _RELEASE_SCHEMA(struct.release)(ctypes.pointer(struct))
    with _SCHEMAS_LOCK:
        _SCHEMAS.pop(ptr, None)


def _schema_capsule(stream: object) -> object:
    """The ``arrow_schema`` capsule of an ``arrow_array_stream`` capsule (its own copy of the schema)."""
    ptr = _API.PyCapsule_GetPointer(stream, b"arrow_array_stream")
    st = _ArrowArrayStream.from_address(ptr)
    out = _ArrowSchema()
    if _GET_SCHEMA(st.get_schema)(ctypes.pointer(st), ctypes.pointer(out)) != 0:
        raise RuntimeError("the reader's Arrow stream gave no schema")
    with _SCHEMAS_LOCK:
        _SCHEMAS[ctypes.addressof(out)] = out
    return _API.PyCapsule_New(ctypes.addressof(out), b"arrow_schema", ctypes.cast(_free_schema, ctypes.c_void_p))


# --------------------------------------------------------------- source
#: the constant types whose SQL text (``Node.fragment``) the reader reads back as the same value
_EXACT_LITERALS = frozenset({"VARCHAR", "INTEGER", "BIGINT", "BOOLEAN"})


def _exact(node: Any) -> bool:
    from duckdb._sources import nodes

    if isinstance(node, nodes.Lit):
        return node.type in _EXACT_LITERALS and not isinstance(node.value, float)
    if isinstance(node, nodes.Col):
        return len(node.parts) == 1
    kids = node._children() if isinstance(node, nodes.Node) else None
    if kids is None:
        return False
    return all(_exact(k) for k in kids) and (not isinstance(node, nodes.In) or all(_exact(v) for v in node.values))


class _Reading:
    """A table of the reader (``select``: a query over its tables or the store's parts) as
    the sandbox scans it: each scan a fresh stream of the asked columns, with the asked
    filters applied by the reader (DuckDB itself: the same semantics)."""

    schema_is_stable = True
    one_shot = False

    def __init__(self, reader: Any, select: str, columns: Sequence[str]) -> None:
        self.obj = None
        self.reader, self.select, self.columns = reader, select, tuple(columns)
        self._lock = threading.Lock()

    def _sql(self, columns: Sequence[int] | None, filters: Sequence[Any], limit: str = "") -> str:
        cols = "*" if columns is None else ", ".join(quote(self.columns[i]) for i in columns) or "NULL AS _none"
        where = " AND ".join(f.fragment() for f in filters)
        return f"SELECT {cols} FROM ({self.select}) _t" + (f" WHERE {where}" if where else "") + limit

    def _stream(self, sql: str) -> object:
        with self._lock:  # one reader cursor per stream: scans may run on several threads
            cursor = self.reader.cursor()
        return cursor.sql(sql).__arrow_c_stream__()

    def __arrow_c_schema__(self) -> object:
        return _schema_capsule(self._stream(self._sql(None, (), " LIMIT 0")))

    def accepts(self, predicate: Any) -> bool:
        try:
            return _exact(predicate)
        except Exception:  # noqa: BLE001 - a node of a kind not known here: the engine filters it
            return False

    def stream(self, columns: Sequence[int] | None, filters: Sequence[Any]) -> tuple[object, bool]:
        return self._stream(self._sql(columns, filters)), columns is not None


_CLASSES: dict[type, type] = {}


def _scan_source(kind: type) -> type:
    """``kind`` made DuckDB's scan source too (the class made on first use:
    ``import flor_ray.queries.sql`` does not import duckdb)."""
    if kind not in _CLASSES:
        _CLASSES[kind] = type(kind.__name__.lstrip("_") + "Source", (kind, _base()), {})
    return _CLASSES[kind]


def ReaderSource(reader: Any, select: str, columns: Sequence[str]) -> Any:  # noqa: N802 - reads as the class
    """A :class:`_Reading` that is also DuckDB's scan source."""
    return _scan_source(_Reading)(reader, select, columns)


def is_reader_source(obj: Any) -> bool:
    return isinstance(obj, (_Reading, _Pieces))


class _Pieces:
    """The pieces of an object store's relation as the sandbox scans them: each scan
    reads the asked columns of the pieces with pyarrow's Parquet reader (the Arrow data
    dictionary-encoded as in the files; the rows filtered by DuckDB), without
    ``pyarrow.dataset``, whose import costs a command line more than the scan (it
    imports pandas). A local store's parts are the reader's (:func:`parts_select`)."""

    schema_is_stable = True
    one_shot = False

    def __init__(self, store: Any, pieces: Sequence[Any], schema: Any) -> None:
        self.obj = None
        self.store, self.pieces, self.schema = store, tuple(pieces), schema

    def __arrow_c_schema__(self) -> object:
        return self.schema.__arrow_c_schema__()

    def accepts(self, predicate: Any) -> bool:
        """A filter on the run or the source (``logs`` keeps ``source = 'record'``): a
        piece's rows share both, so it is applied to the pieces, before any is read."""
        try:
            return _piece_values(predicate) is not None
        except Exception:  # noqa: BLE001 - a node of a kind not known here: the engine filters it
            return False

    def stream(self, columns: Sequence[int] | None, filters: Sequence[Any]) -> tuple[object, bool]:
        import pyarrow as pa

        from ..store.logs import read_relation

        pieces = list(self.pieces)
        for f in filters:
            column, values = _piece_values(f)
            pieces = [p for p in pieces if getattr(p, column) in values]
        if columns is not None and not columns:  # count(*): the rows, no column
            n = read_relation(self.store, pieces, ["seq"]).num_rows
            return pa.table({"_none": pa.nulls(n)}).__arrow_c_stream__(), True
        names = None if columns is None else [self.schema.names[i] for i in columns]
        return read_relation(self.store, pieces, names).__arrow_c_stream__(), \
            columns is not None


def _piece_values(node: Any) -> tuple[str, frozenset] | None:
    """``(column, values)`` of ``run_id``/``source`` ``=`` or ``IN`` string constants; else None."""
    from duckdb._sources import nodes

    if isinstance(node, nodes.Binary) and node.op == "=":
        col, lits = node.left, [node.right]
    elif isinstance(node, nodes.In):
        col, lits = node.operand, list(node.values)
    else:
        return None
    if not (isinstance(col, nodes.Col) and col.parts in (("run_id",), ("source",))):
        return None
    if not all(isinstance(v, nodes.Lit) and v.type == "VARCHAR" and isinstance(v.value, str) for v in lits):
        return None
    return col.parts[0], frozenset(v.value for v in lits)


def PiecesSource(store: Any, pieces: Sequence[Any], schema: Any) -> Any:  # noqa: N802 - reads as the class
    """A :class:`_Pieces` that is also DuckDB's scan source."""
    return _scan_source(_Pieces)(store, pieces, schema)


def register(con: Any, name: str, source: Any) -> None:
    """Put ``source`` under ``name`` on the sandboxed connection (a view over the scan)."""
    con._register_arrow_source(name, source)


# ----------------------------------------------------------------- runs
@dataclass(frozen=True)
class RunsTable:
    """The runs table as the reader holds it: its column names and the source over it."""

    columns: tuple[str, ...]
    source: ReaderSource


def runs_table(reader: Any, table: str, names: Sequence[str], types: Sequence[str],
               values: Sequence[list]) -> RunsTable:
    """Create ``table`` in the reader from one Python list per column (``types``: DuckDB's)."""
    cols = ", ".join(f"unnest(${k + 1}::{t}[]) AS {quote(n)}" for k, (n, t) in enumerate(zip(names, types)))
    if names:
        reader.execute(f"CREATE OR REPLACE TABLE {table} AS SELECT {cols}", list(values))
    else:
        reader.execute(f"CREATE OR REPLACE TABLE {table} AS SELECT NULL::VARCHAR AS run_id WHERE false")
    return RunsTable(tuple(names), ReaderSource(reader, f"SELECT * FROM {table}", names))


# ----------------------------------------------------------------- logs
#: the relation's columns as the sandbox sees them (:func:`flor_ray.store.logs.file_schemas`
#: in DuckDB's types; a test holds the two together), without importing pyarrow
LOGS_COLUMNS = (("version", "VARCHAR"), ("file", "VARCHAR"), ("loops", "VARCHAR"), ("iter0", "INTEGER"),
                ("iter1", "INTEGER"), ("iter2", "INTEGER"), ("iter3", "INTEGER"), ("items", "VARCHAR"),
                ("name", "VARCHAR"), ("vtype", "VARCHAR"), ("value_float", "DOUBLE"), ("value_int", "BIGINT"),
                ("value_str", "VARCHAR"), ("seq", "BIGINT"), ("task", "VARCHAR"), ("run_id", "VARCHAR"),
                ("source", "VARCHAR"))


def parts_select(reader: Any, store: Any, pieces: Sequence[Any],
                 fetch: Callable[[Sequence[Any]], Mapping[str, str]] | None = None) -> str | None:
    """A query of the reader over the parts of ``pieces`` (loose files, with the run and
    source their listing gave them, and whole segments) in the relation's columns, a
    column an older file lacks as nulls; None when a segment is wanted only in part.
    ``fetch``: the local path of each file of the pieces (copies of an object store's,
    :mod:`flor_ray.queries.copies`); None: the files are the local store's own."""
    import os

    from ..store.segments import whole_segments

    if not whole_segments(store, pieces):
        return None
    paths = fetch(pieces) if fetch is not None else None

    def where(p: Any) -> str:
        return paths[p.file] if paths is not None else os.path.join(store.root, p.file)

    loose = {where(p): p for p in pieces if not p.in_segment}
    segs = sorted({where(p) for p in pieces if p.in_segment})
    if loose:  # each loose file's run and source, as the listing read them from its folders
        paths = sorted(loose)
        reader.execute("CREATE OR REPLACE TABLE flor_parts AS SELECT unnest($1::VARCHAR[]) AS path, "
                       "unnest($2::VARCHAR[]) AS run_id, unnest($3::VARCHAR[]) AS source",
                       [paths, [loose[f].run_id for f in paths], [loose[f].source for f in paths]])
    selects = []
    for files, own in ((sorted(loose), False), (segs, True)):
        if not files:
            continue
        scan = (f"read_parquet([{', '.join(literal(f) for f in files)}], union_by_name = true, "
                f"hive_partitioning = false{'' if own else ', filename = true'})")
        have = {r[0] for r in reader.execute(f"DESCRIBE SELECT * FROM {scan}").fetchall()}
        cols = []
        for n, t in LOGS_COLUMNS:
            if not own and n in ("run_id", "source"):
                cols.append(f"_p.{quote(n)}")
            else:
                cols.append(f"CAST(_f.{quote(n)} AS {t}) AS {quote(n)}" if n in have else f"NULL::{t} AS {quote(n)}")
        join = "" if own else " JOIN flor_parts _p ON _p.path = _f.filename"
        selects.append(f"SELECT {', '.join(cols)} FROM {scan} _f{join}")
    return " UNION ALL ".join(selects)


def empty_select(columns: Sequence[tuple[str, str]]) -> str:
    return "SELECT " + ", ".join(f"NULL::{t} AS {quote(n)}" for n, t in columns) + " WHERE false"

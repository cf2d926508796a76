"""The scan under :func:`flor_ray.queries.dataframe.dataframe`: a query's Parquet parts
read into flat numpy arrays, and each series (name, source) put in loop order with
vectorised passes (no per-row Python).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from ..store.logs import ITER_COLS, schema, unreadable

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import pyarrow as pa

    from ..store import Store
    from ..store.segments import Piece

#: the columns dataframe() reads from each file (a corrupted page in any of them is
#: reported), and those read dictionary-encoded
_DF_COLS = ("loops", *ITER_COLS, "name", "vtype", "value_float", "value_int", "value_str", "seq")
_DF_DICT_COLS = ("loops", "name", "vtype")
NO_ITER = -(2 ** 31)  # a null iteration in the sort keys: before every real iteration


@dataclass
class Scan:
    """The rows a dataframe reads, as flat arrays in file order (see :func:`scan_parts`).

    ``task``: each row's task order (0: recorded), set by the dataframe from the parts' order.
    """

    rid_dict: list  # the sorted run ids; ``run`` indexes it
    file: Any
    run: Any
    src: Any  # 1: a replayed row
    name: Any
    name_vals: list
    vtype: Any
    vtype_vals: list
    loops: Any
    loop_vals: list
    iters: list  # per depth: int32 codes or None (all null)
    seq: Any
    value_float: "Numbers"
    value_int: "Numbers"
    value_str: Any  # Arrow, every row read (``str_rows`` picks the scan's)
    str_rows: Any = None  # None: the scan's rows are all the rows read
    task: Any = None


@dataclass(frozen=True)
class Numbers:
    """A numeric column of the scan's rows: ``values`` (NaN or 0 where null) and
    ``valid`` (None: no null)."""

    values: Any
    valid: Any = None

    def at(self, rows) -> "Numbers":
        valid = None if self.valid is None else self.valid[rows]
        return Numbers(self.values[rows], None if valid is None or valid.all() else valid)

    def to_numpy(self) -> "np.ndarray":
        """As Arrow's ``to_numpy`` gives them: nulls make ints floats, NaN."""
        import numpy as np

        if self.valid is None:
            return self.values
        out = self.values.astype(np.float64)
        out[~self.valid] = np.nan
        return out

    def to_pylist(self) -> list:
        import numpy as np

        out = self.values.tolist()
        if self.valid is not None:
            for i in np.flatnonzero(~self.valid).tolist():
                out[i] = None
        return out


def read_files(store: "Store", pieces: "Sequence[Piece]") -> list:
    """The :data:`_DF_COLS` of each piece (a ``pa.Table`` each, in order), read in parallel.

    One ``ParquetFile`` per file (a segment once, whichever of its row groups are
    wanted), no dataset machinery: the partition columns come from the pieces. A
    column missing from an older file reads as nulls.
    """
    import pyarrow as pa

    from ..store.segments import piece_tables

    want = schema()
    dict_t = pa.dictionary(pa.int32(), pa.string())

    def read(pf, row_groups) -> "pa.Table":
        have = set(pf.schema_arrow.names)
        cols_in = [c for c in _DF_COLS if c in have]
        t = (pf.read(columns=cols_in, use_threads=False) if row_groups is None
             else pf.read_row_groups(row_groups, columns=cols_in, use_threads=True))
        cols = []
        for c in _DF_COLS:
            typ = want.field(c).type
            if c not in have:
                cols.append(pa.nulls(t.num_rows, typ))
                continue
            col = t.column(c)
            if c in _DF_DICT_COLS:
                if col.type != dict_t:
                    col = col.cast(pa.string()).dictionary_encode()
            elif col.type != typ:
                col = col.cast(typ)
            cols.append(col)
        return pa.Table.from_arrays(cols, names=list(_DF_COLS))

    return piece_tables(store, pieces, read, _DF_DICT_COLS)


#: numpy dtypes of the fixed-width Arrow types the scan reads
_NP_TYPES = {"int8": "int8", "int16": "int16", "int32": "int32", "int64": "int64", "uint8": "uint8",
             "uint16": "uint16", "uint32": "uint32", "uint64": "uint64", "float": "float32", "double": "float64"}


def np_of(arr, fill: Any = None) -> "np.ndarray":
    """A fixed-width or boolean Arrow array (chunked or not) as numpy, nulls as ``fill``
    (None: as Arrow's ``to_numpy`` gives them, ints as floats with NaN)."""
    values, valid = _np_parts(arr)
    if valid is None:
        return values
    if fill is None:
        return Numbers(values, valid).to_numpy()
    out = values.copy()
    out[~valid] = fill
    return out


def numbers_of(arr) -> "Numbers":
    """A numeric Arrow column as :class:`Numbers`: NaN (floats) or 0 (ints) where null."""
    import numpy as np

    values, valid = _np_parts(arr)
    if valid is not None:
        values = values.copy()
        values[~valid] = np.nan if values.dtype.kind == "f" else 0
    return Numbers(values, valid)


def _np_parts(arr) -> tuple:
    """(values, validity or None) of a fixed-width or boolean Arrow array, read from
    its buffers: pyarrow's own ``to_numpy`` (and ``pa.array``, ``fill_null``, ``is_valid``)
    import pandas or pyarrow.compute, which cost a command line more than its query."""
    import numpy as np
    import pyarrow as pa

    if isinstance(arr, pa.ChunkedArray):
        arr = arr.chunk(0) if arr.num_chunks == 1 else pa.concat_arrays(arr.chunks) if arr.num_chunks \
            else pa.nulls(0, arr.type)
    n, off, bufs = len(arr), arr.offset, arr.buffers()

    def bits(buf):
        b = np.zeros(0, np.uint8) if buf is None else np.frombuffer(buf, np.uint8)
        return np.unpackbits(b, bitorder="little")[off:off + n].astype(bool)

    if pa.types.is_boolean(arr.type):
        vals = bits(bufs[1])
    else:
        dtype = np.dtype(_NP_TYPES[str(arr.type)])
        vals = np.zeros(0, dtype) if bufs[1] is None else np.frombuffer(bufs[1], dtype)[off:off + n]
    if len(vals) < n:  # an all-null array may carry no values
        vals = np.zeros(n, vals.dtype)
    if not arr.null_count:
        return vals, None
    valid = bits(bufs[0])
    if len(valid) < n:
        valid = np.zeros(n, bool)
    return vals, valid


def arrow_indices(rows) -> "pa.Array":
    """Row indices for ``take`` (``pa.array`` would import pandas, see :func:`np_of`)."""
    import numpy as np
    import pyarrow as pa

    rows = np.ascontiguousarray(rows, dtype=np.int64)
    return pa.Array.from_buffers(pa.int64(), len(rows), [None, pa.py_buffer(rows)])


def _dict_codes(col) -> tuple:
    """(int32 codes, values) of a dictionary-encoded column whose chunks share one
    dictionary; nulls get -1."""
    import numpy as np

    arr = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    return np_of(arr.indices, -1).astype(np.int32, copy=False), arr.dictionary.to_pylist()


def _iter_values(col) -> "np.ndarray | None":
    """An iteration column as int32 with nulls as :data:`NO_ITER`; None when all null."""
    import numpy as np

    if col.null_count == len(col):
        return None
    return np_of(col, NO_ITER).astype(np.int32, copy=False)


def scan_parts(store: "Store", files: "Sequence[Piece]", names: Sequence[str] | None) -> "Scan | None":
    """The rows of ``names`` (all names: None) in ``files`` (pieces), as flat arrays in piece order.

    Returns None when no row is left; else run/source/name/vtype/loops codes per row,
    ``iters`` (per depth: int32 or None when all null), ``seq``, the numeric values as
    :class:`Numbers` and the strings as Arrow (taken only when a series needs them). Run codes index the sorted run ids of ``files`` (``rid_dict``); loop path
    codes follow the unified dictionaries of all files, in file order (the numbering
    that breaks ties between paths with equal iterations, as it always did).
    """
    import numpy as np
    import pyarrow as pa

    try:
        tables = read_files(store, files)
    except FileNotFoundError:
        raise  # compacted or rewritten since the listing: the caller lists again
    except (OSError, pa.ArrowInvalid) as exc:
        raise unreadable(store, sorted({p.file for p in files}), exc) from exc
    runs_of = [p.run_id for p in files]
    rid_dict = sorted(set(runs_of))
    run_code = {r: i for i, r in enumerate(rid_dict)}
    counts = [t.num_rows for t in tables]
    t = pa.concat_tables(tables).unify_dictionaries()
    if t.num_rows == 0:
        return None
    name, name_vals = _dict_codes(t.column("name"))
    if names is not None:
        wanted = list(dict.fromkeys(names))
        at = {n: i for i, n in enumerate(wanted)}
        lut = np.asarray([at.get(v, -1) for v in name_vals] + [-1], dtype=np.int32)
        name, name_vals = lut[name], wanted
    sel = None
    if (name < 0).any():
        sel = np.flatnonzero(name >= 0)
        if not len(sel):
            return None
        name = name[sel]

    def rows(a):
        return a if sel is None else a[sel]

    def numbers(c):
        col = numbers_of(t.column(c))
        return col if sel is None else col.at(sel)

    vtype, vtype_vals = _dict_codes(t.column("vtype"))
    vtype = rows(vtype)
    if (vtype < 0).any():  # no type recorded: read as the string column
        vtype = np.where(vtype < 0, len(vtype_vals), vtype).astype(np.int32)
        vtype_vals = [*vtype_vals, None]
    loops, loop_vals = _dict_codes(t.column("loops"))
    seq = t.column("seq")
    iters = []
    for c in ITER_COLS:
        it = _iter_values(t.column(c))
        iters.append(None if it is None else rows(it))
    return Scan(
        rid_dict=rid_dict,
        file=rows(np.repeat(np.arange(len(files), dtype=np.int32), counts)),
        run=rows(np.repeat(np.asarray([run_code[r] for r in runs_of], dtype=np.int32), counts)),
        src=rows(np.repeat(np.asarray([p.source == "replay" for p in files], dtype=np.int8), counts)),
        name=name,
        name_vals=name_vals,
        vtype=vtype,
        vtype_vals=vtype_vals,
        loops=rows(loops),
        loop_vals=loop_vals,
        iters=iters,
        seq=rows(np_of(seq, 0)),
        value_float=numbers("value_float"),
        value_int=numbers("value_int"),
        value_str=t.column("value_str"),
        str_rows=sel,
    )


def first_seen(codes: "np.ndarray") -> list[int]:
    """The codes present in ``codes``, in the order of their first row."""
    import numpy as np

    if not len(codes):
        return []
    # a code first appears at row 0 or where the code changes: only those rows are looked at
    starts = codes[np.concatenate(([0], np.flatnonzero(codes[1:] != codes[:-1]) + 1))]
    present, first = np.unique(starts, return_index=True)
    return [int(c) for _, c in sorted(zip(first, present)) if c >= 0]


def _sorted_by(keys) -> bool:
    """Whether rows are in lexicographic order of ``keys`` (vectorised, O(n) per key)."""
    undecided = None
    for k in keys:
        a, b = k[:-1], k[1:]
        if undecided is None:
            if (b < a).any():
                return False
            undecided = b == a
        else:
            if (undecided & (b < a)).any():
                return False
            undecided &= b == a
        if not undecided.any():
            return True
    return True


@dataclass(frozen=True)
class Series:
    """One (name, source) of a dataframe: its rows in result order and their identities.

    ``rows``: indices into the scan (None: all rows, as they are); ``occ``: each row's
    occurrence, its index among the values of its (run, loop context) in logging order
    (None: one value per context); ``dups`` / ``dup_of``: rows of later replay tasks
    that repeat the identity (run, context, occurrence) of a kept row, and that row.
    """

    rows: Any
    occ: Any = None
    dups: Any = None
    dup_of: Any = None


def series_rows(rank, seq, iters, loops, task=None) -> Series:
    """Rows of one (name, source) in context order, every value kept once.

    Rows are put in (run, task, logging order), where they usually already are, so
    that the rows of one loop context become neighbours even when they come from
    several files (replay tasks number their rows from 0); if the loop contexts are
    then out of order they are sorted (stable: task and logging order kept within a
    context). ``task`` orders the replay tasks (earliest first; None: one source of
    rows, a recording): of an identity that several tasks hold, the earliest one's
    row is kept and the others are returned as duplicates.
    """
    import numpy as np

    first = [rank, seq] if task is None else [rank, task, seq]
    order = None
    if not _sorted_by(first):
        order = np.lexsort(tuple(reversed(first)))
    keys = [rank, *iters]
    if order is not None:
        keys, loops = [k[order] for k in keys], loops[order]
        task = None if task is None else task[order]
    if not _sorted_by(keys):
        again = np.lexsort((loops, *reversed(keys)))  # stable: task and seq order kept within a context
        order = again if order is None else order[again]
        keys, loops = [k[again] for k in keys], loops[again]
        task = None if task is None else task[again]
    n = len(rank)
    if n < 2:
        return Series(order)
    same = loops[1:] == loops[:-1]
    for k in keys:
        same &= k[1:] == k[:-1]
    if not same.any():
        return Series(order)
    same_task = same if task is None else same & (task[1:] == task[:-1])
    idx = np.arange(n)
    starts = np.ones(n, dtype=bool)
    starts[1:] = ~same_task
    occ = idx - np.maximum.accumulate(np.where(starts, idx, 0))
    base = idx if order is None else order
    if task is None or not (same & ~same_task).any():
        return Series(order, occ)
    ctx_start = np.ones(n, dtype=bool)
    ctx_start[1:] = ~same
    ident = (np.cumsum(ctx_start) - 1) * (int(occ.max()) + 1) + occ
    uniq, firsts = np.unique(ident, return_index=True)  # within a context the earliest task comes first
    keep = np.sort(firsts)
    dup = np.ones(n, dtype=bool)
    dup[firsts] = False
    dup_pos = np.flatnonzero(dup)
    kept_occ = occ[keep]
    return Series(base[keep], kept_occ if kept_occ.any() else None, base[dup_pos],
                   base[firsts[np.searchsorted(uniq, ident[dup_pos])]])


def differ(a, b) -> "np.ndarray":
    """Elementwise: the values differ (NaN equals NaN)."""
    import numpy as np

    if a.dtype.kind == "f" and b.dtype.kind == "f":
        return ~((a == b) | (np.isnan(a) & np.isnan(b)))
    return np.asarray([not (x == y or (x != x and y != y)) for x, y in zip(a.tolist(), b.tolist())], dtype=bool)


def values_of(scan: Scan, rows, kinds: set[str]):
    """The values of ``rows`` as a numpy array, typed by the kinds of the series (as
    Arrow's ``to_numpy`` gives them: nulls make ints floats with NaN)."""
    import numpy as np

    def col(c):
        x = getattr(scan, c)
        return x if rows is None else x.at(rows)

    def strings():
        arr = scan.value_str
        at = scan.str_rows if rows is None else rows if scan.str_rows is None else scan.str_rows[rows]
        if at is None:
            return arr.to_pylist()
        if arr.null_count == len(arr):
            return [None] * len(at)
        return arr.take(arrow_indices(at)).to_pylist()  # Arrow's take (imports pyarrow.compute): strings only

    if kinds <= {"float"}:
        return col("value_float").to_numpy()
    if kinds <= {"int"}:
        return col("value_int").to_numpy()
    if kinds <= {"int", "float"}:
        f, i = col("value_float"), col("value_int")
        if f.valid is None:
            return f.values
        out = np.where(f.valid, f.values, i.values.astype(np.float64))
        if i.valid is not None:
            out[~f.valid & ~i.valid] = np.nan
        return out
    if kinds <= {"bool"}:
        return col("value_int").to_numpy().astype(bool)
    if kinds <= {"str"}:
        texts = strings()
        strs = np.empty(len(texts), dtype=object)
        strs[:] = texts
        return strs
    vt = np.asarray(scan.vtype_vals, dtype=object)[scan.vtype if rows is None else scan.vtype[rows]]
    decoded = [
        f if t == "float" else int(i) if t == "int" else bool(i) if t == "bool"
        else json.loads(s_) if t == "json" else s_
        for t, f, i, s_ in zip(vt, col("value_float").to_pylist(), col("value_int").to_pylist(), strings())
    ]
    vals = np.empty(len(decoded), dtype=object)  # lists stay elements, not a 2-D array
    vals[:] = decoded
    return vals

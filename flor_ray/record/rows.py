"""Buffered rows to an Arrow table, built from numpy buffers.

The one builder of log-relation tables (schema: :mod:`flor_ray.store.logs`), for
recording and replay alike; a test checks it against a plain
``pyarrow.compute`` reference on every shape of input. It uses
``pa.Array.from_buffers`` only. The reason is import cost, paid on the training thread at a recording's first flush:
``pa.array(...)`` on any Python list or numpy array imports pandas (pyarrow asks it
whether the input is one of its arrays), and pandas imports ``pyarrow.compute``:
about 0.6 s of CPU that a recording otherwise never needs. Gathers (the loop
context of a prefix, repeated over its rows) are numpy fancy indexing.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa

__all__ = ["rows_to_table"]


def _validity(null):
    """Arrow validity bitmap of a boolean null mask (None when nothing is null)."""
    import numpy as np
    import pyarrow as pa

    if null is None or not null.any():
        return None
    return pa.py_buffer(np.packbits(~null, bitorder="little"))


def _num(values, dtype, atype: "pa.DataType", null=None) -> "pa.Array":
    import numpy as np
    import pyarrow as pa

    arr = np.ascontiguousarray(values, dtype=dtype)
    return pa.Array.from_buffers(atype, len(arr), [_validity(null), pa.py_buffer(arr)])


def _strs(strings: Sequence[str | None]) -> "pa.Array":
    """A string array from a list of str / None (few distinct values are encoded once)."""
    import numpy as np
    import pyarrow as pa

    n = len(strings)
    distinct = set(strings)
    if len(distinct) * 4 <= n:
        enc = {s: (b"" if s is None else s.encode()) for s in distinct}
        parts = list(map(enc.__getitem__, strings))
    else:
        parts = [b"" if s is None else s.encode() for s in strings]
    lens = np.fromiter(map(len, parts), dtype=np.int64, count=n)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    if offsets[-1] >= 2**31:  # beyond 32-bit offsets: pyarrow returns a chunked array
        return pa.array(list(strings), pa.string())
    null = np.fromiter((s is None for s in strings), dtype=bool, count=n) if None in distinct else None
    return pa.Array.from_buffers(
        pa.string(), n, [_validity(null), pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(b"".join(parts))]
    )


def _const_str(value: str | None, n: int) -> "pa.Array":
    import numpy as np
    import pyarrow as pa

    if value is None:
        return pa.nulls(n, pa.string())
    b = value.encode()
    if n * len(b) >= 2**31:
        return _strs([value] * n)
    offsets = np.arange(0, (n + 1) * len(b), len(b), dtype=np.int32) if b else np.zeros(n + 1, dtype=np.int32)
    return pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(offsets), pa.py_buffer(b * n)])


def rows_to_table(
    *,
    version: str,
    file: str,
    prefixes: Sequence[tuple],
    prefix_ids: Sequence[int],
    lasts: Sequence[int | None],
    items: Sequence[tuple[int, Any]],
    names: Sequence[str],
    values: Sequence[Any],
    seq_start: int,
    task: str | None = None,
) -> "pa.Table":
    """Row ``r`` sits in loop context ``prefixes[prefix_ids[r]]`` = ``(loops, enclosing
    iterations, enclosing items, depth)`` at innermost iteration ``lasts[r]``;
    ``items`` lists ``(row, innermost item)`` where the item is worth keeping."""
    import numpy as np
    import pyarrow as pa

    from ..store.logs import ITER_COLS, schema, vtype_of

    n = len(names)
    sch = schema()
    idx = np.asarray(prefix_ids, dtype=np.intp).reshape(n)
    depth = np.array([p[3] for p in prefixes], dtype=np.int32)[idx]
    last = np.array(lasts, dtype=np.float64).reshape(n)  # None -> nan
    last_null = np.isnan(last)
    last_i = np.where(last_null, 0, last).astype(np.int32)
    loops = [p[0] for p in prefixes]
    cols: dict[str, Any] = {
        "version": _const_str(version, n),
        "file": _const_str(file, n),
        "loops": _const_str(loops[0], n) if len(set(loops)) == 1 else _strs(np.array(loops, dtype=object)[idx].tolist()),
    }
    for d, col in enumerate(ITER_COLS):
        enc = np.array([p[1][d] if len(p[1]) > d and p[1][d] is not None else np.nan for p in prefixes],
                       dtype=np.float64).reshape(len(prefixes))[idx]
        enc_null = np.isnan(enc)
        here = depth == d + 1
        null = np.where(here, last_null, enc_null)
        vals = np.where(here, last_i, np.where(enc_null, 0, enc).astype(np.int32))
        cols[col] = _num(vals, np.int32, pa.int32(), null)
    if items or any(p[2] is not None for p in prefixes):
        inner = dict(items)
        docs: list[str | None] = []
        for r in range(n):
            p = prefixes[prefix_ids[r]]
            it = inner.get(r)
            if p[2] is None and it is None:
                docs.append(None)
            else:
                docs.append(json.dumps([*(p[2] or (None,) * len(p[1])), it]))
        cols["items"] = _strs(docs)
    else:
        cols["items"] = pa.nulls(n, pa.string())
    cols["name"] = _strs(names)

    types = set(map(type, values))
    if types == {float}:
        vtype = _const_str("float", n)
        vf, vi, vs = _num(values, np.float64, pa.float64()), pa.nulls(n, pa.int64()), pa.nulls(n, pa.string())
    elif types == {int}:
        vtype = _const_str("int", n)
        vf, vi, vs = pa.nulls(n, pa.float64()), _num(values, np.int64, pa.int64()), pa.nulls(n, pa.string())
    else:
        vt = [vtype_of(v) for v in values]
        vtype = _strs(vt)
        is_f = np.fromiter((t == "float" for t in vt), dtype=bool, count=n)
        is_i = np.fromiter((t in ("int", "bool") for t in vt), dtype=bool, count=n)
        vf = _num([v if t == "float" else 0.0 for v, t in zip(values, vt)], np.float64, pa.float64(), ~is_f)
        vi = _num([int(v) if t in ("int", "bool") else 0 for v, t in zip(values, vt)], np.int64, pa.int64(), ~is_i)
        vs = _strs([str(v) if t in ("str", "json") else None for v, t in zip(values, vt)])
    cols["vtype"] = vtype
    cols["value_float"], cols["value_int"], cols["value_str"] = vf, vi, vs
    cols["seq"] = _num(np.arange(seq_start, seq_start + n, dtype=np.int64), np.int64, pa.int64())
    cols["task"] = _const_str(task, n)
    return pa.Table.from_arrays([cols[f.name] for f in sch], schema=sch)

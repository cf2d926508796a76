"""Reading captured output: a run's printed lines, ``k=v`` values extracted from them,
and the ``output`` table of ``flor.sql``.

The parts are those :mod:`flor_ray.record.output` writes, ``output/<run_id>/part-<n>.parquet``
(columns :data:`COLUMNS`). Values extracted from printed lines need no replay: a
script that printed ``acc=0.91`` each epoch but never logged it has ``acc`` here, one
row per printed line with its run and loop iterations.
"""

from __future__ import annotations

import re
import warnings
from typing import TYPE_CHECKING, Any, Iterable

from ..errors import DamagedFileWarning, QueryError, UnknownRunError
from ..store import layout
from ..store.listing import Entry, list_files
from ..store.logs import MAX_LOOP_DEPTH

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from ..store import Store

__all__ = ["COLUMNS", "output_listing", "output_frame", "output_metrics", "extract_values", "register_output",
           "OUTPUT_MATERIALIZE_BYTES"]

COLUMNS = ("run_id", "stream", "line", "time", "loops", *(f"iter{k}" for k in range(MAX_LOOP_DEPTH)), "text")
_STREAMS = ("stdout", "stderr", "log")
#: output parts up to this many bytes in all are read into memory for SQL; more are
#: read from the files by each query (8 MiB of text per run is ~1-2 MB compressed)
OUTPUT_MATERIALIZE_BYTES = 16 << 20
#: ``name=value`` / ``name: value`` with a number: ``loss=0.25``, ``acc: 91.2``, ``lr=1e-3``
_PAIR = re.compile(r"(?<![\w.\-])([A-Za-z_][\w.\-/]*)\s*[=:]\s*"
                   r"([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|[-+]?nan|[-+]?inf)(?![\w.])")


def _schema():
    import pyarrow as pa

    return pa.schema([("run_id", pa.string()), ("stream", pa.string()), ("line", pa.int64()),
                      ("time", pa.timestamp("us", tz="UTC")), ("loops", pa.string()),
                      *((f"iter{k}", pa.int64()) for k in range(MAX_LOOP_DEPTH)), ("text", pa.string())])


def output_listing(store: "Store", run_ids: Iterable[str] | None = None) -> tuple[Entry, ...]:
    """The output parts of the store (of ``run_ids`` only, when given), sorted by path."""
    parts = list_files(store, layout.OUTPUT, ".parquet")
    if run_ids is None:
        return parts
    keep = set(run_ids)
    return tuple(e for e in parts if layout.output_run_id(e.path) in keep)


def _read_table(store: "Store", entries: Iterable[Entry]):
    """The rows of these parts as one Arrow table; a damaged part is left out with a warning."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema, tables = _schema(), []
    for e in entries:
        try:
            # an Arrow buffer read on this thread: pyarrow 26 can abort the process at exit
            # after a threaded read from a Python file object (a small part gains nothing)
            data = pa.BufferReader(store.read_bytes(e.path))
            tables.append(pq.read_table(data, use_threads=False).select(list(COLUMNS)).cast(schema))
        except (OSError, ValueError, KeyError, pa.ArrowException) as exc:
            warnings.warn(f"output part {store.full_url(e.path)} is unreadable ({exc}); left out", DamagedFileWarning,
                          stacklevel=3)
    return pa.concat_tables(tables) if tables else schema.empty_table()


#: :func:`_schema` in DuckDB's types
_DUCK_COLUMNS = (("run_id", "VARCHAR"), ("stream", "VARCHAR"), ("line", "BIGINT"), ("time", "TIMESTAMPTZ"),
                 ("loops", "VARCHAR"), *((f"iter{k}", "BIGINT") for k in range(MAX_LOOP_DEPTH)), ("text", "VARCHAR"))


def register_output(con: Any, store: "Store", entries: tuple[Entry, ...], reader: Any = None) -> None:
    """Register the ``output`` table on a sandboxed connection: the parts' rows, in
    memory when small, else a lazy Arrow dataset (the engine itself opens no file);
    no part and a ``reader`` (:mod:`flor_ray.queries.sources`): its empty table, without pyarrow."""
    if not entries and reader is not None:
        from . import sources

        try:
            con.unregister("output")
        except Exception:  # noqa: BLE001 - nothing registered under the name yet
            pass
        sources.register(con, "output", sources.ReaderSource(reader, sources.empty_select(_DUCK_COLUMNS),
                                                             [n for n, _ in _DUCK_COLUMNS]))
        return
    if sum(e.size or 0 for e in entries) <= OUTPUT_MATERIALIZE_BYTES:
        source: Any = _read_table(store, entries)
    else:
        import pyarrow.dataset as ds

        fs, root = store.arrow_fs()
        source = ds.dataset([f"{root}/{e.path}" for e in entries], schema=_schema(), format="parquet", filesystem=fs)
    con.register("output", source)


# ------------------------------------------------------------------ reads
def _runs(store: "Store", run_id: str | None) -> list[dict]:
    from .cache import CACHE

    metas = CACHE.runs(store).metas
    if run_id is None:
        return metas
    found = [m for m in metas if m.get("run_id") == run_id]
    if not found:
        raise UnknownRunError(run_id, store.url)
    return found


def _keep_iterations(df: "pd.DataFrame", metas: list[dict], iterations: Any) -> "pd.DataFrame":
    """The lines printed in the asked outer iterations ('all', 'last', 3, '0:5', '1,4')."""
    from ..planning.plan import iteration_set

    keep = []
    for m in metas:
        n = int(m.get("iterations") or 0)
        mine = df["run_id"] == m["run_id"]
        keep.append(mine & df["iter0"].isin(iteration_set(iterations, n)))
    if not keep:
        return df.iloc[:0]
    mask = keep[0]
    for k in keep[1:]:
        mask = mask | k
    return df[mask]


def output_frame(store: "Store", run_id: str | None = None, grep: str | None = None, iterations: Any = None,
                 stream: str | None = None) -> "pd.DataFrame":
    """The captured lines of ``run_id`` (every run: None), in printed order.

    ``grep``: a regular expression searched in each line; ``iterations``: only the
    lines printed in those outer iterations (as ``flor.replay``'s); ``stream``:
    ``stdout``, ``stderr`` or ``log``.
    """
    store.check()
    metas = _runs(store, run_id)
    if stream is not None and stream not in _STREAMS:
        raise QueryError(f"stream={stream!r} is not a captured stream; use one of {', '.join(_STREAMS)}")
    pattern = None
    if grep is not None:
        try:
            pattern = re.compile(grep)
        except re.error as exc:
            raise QueryError(f"grep pattern {grep!r} is not a valid regular expression ({exc}); "
                             "e.g. 'loss=' or 'acc[=:]'") from exc
    df = _read_table(store, output_listing(store, [m["run_id"] for m in metas])).to_pandas()
    if stream is not None:
        df = df[df["stream"] == stream]
    if pattern is not None:
        df = df[df["text"].map(lambda t: pattern.search(t) is not None)]
    if iterations is not None and iterations != "all":
        df = _keep_iterations(df, metas, iterations)
    order = {m["run_id"]: k for k, m in enumerate(metas)}
    df = df.assign(_o=df["run_id"].map(order)).sort_values(["_o", "line"], kind="stable").drop(columns="_o")
    for k in range(MAX_LOOP_DEPTH):
        df[f"iter{k}"] = df[f"iter{k}"].astype("Int64")
    return df.reset_index(drop=True)


# --------------------------------------------------------------- extract
def extract_values(text: str) -> dict[str, float]:
    """The ``name=number`` / ``name: number`` pairs of one printed line (the first of each name)."""
    out: dict[str, float] = {}
    for name, value in _PAIR.findall(text):
        out.setdefault(name, float(value))
    return out


def _loop_columns(df: "pd.DataFrame") -> tuple["pd.DataFrame", list[str]]:
    """A column per loop name (``epoch``, ``step``) holding that loop's iteration."""
    cols: dict[str, list] = {}
    iters = list(zip(*(df[f"iter{k}"] for k in range(MAX_LOOP_DEPTH))))
    for row, loops in enumerate(df["loops"]):
        for k, name in enumerate(loops.split("/") if loops else ()):
            cols.setdefault(name, [None] * len(df))[row] = iters[row][k]
    names = list(cols)
    out = df.copy()
    for name in names:
        out[name] = cols[name]
        out[name] = out[name].astype("Int64")
    return out, names


def output_metrics(store: "Store", run_id: str | None = None, names: Iterable[str] | None = None,
                   grep: str | None = None, iterations: Any = None) -> "pd.DataFrame":
    """``k=v`` values of printed lines as a frame: one row per line that printed any,
    columns ``run_id``, ``line``, ``stream``, a column per loop (its iteration), then
    one per name (float). ``names``: only those (a line without them is left out). A
    name that is also a loop's is suffixed ``__printed``."""
    import pandas as pd

    lines = output_frame(store, run_id, grep=grep, iterations=iterations)
    wanted = list(names) if names is not None else None
    found = [extract_values(t) for t in lines["text"]]
    if wanted is not None:
        found = [{k: v for k, v in f.items() if k in wanted} for f in found]
    keep = [k for k, f in enumerate(found) if f]
    lines, found = lines.iloc[keep].reset_index(drop=True), [found[k] for k in keep]
    framed, loops = _loop_columns(lines)
    base = framed[["run_id", "line", "stream", *loops]]
    values = pd.DataFrame.from_records(found, columns=wanted) if found or wanted else pd.DataFrame()
    values.columns = [f"{c}__printed" if c in loops or c in ("run_id", "line", "stream") else c
                      for c in values.columns]
    return pd.concat([base, values.astype("float64")], axis=1)


# -------------------------------------------------------------- command
def add_arguments(sp: Any) -> None:
    """``flor-ray output``'s own options (the parser has --store, --format and -o)."""
    sp.add_argument("run", nargs="?", metavar="RUN", help="a run id, as `flor-ray runs` lists it (optional with "
                                                          "--extract: every run)")
    sp.add_argument("--grep", metavar="PATTERN", help="only lines matching this regular expression")
    sp.add_argument("--iterations", metavar="SPEC", help="only lines printed in these outer iterations: 'last', "
                                                         "'3', '0:5' or '1,4,7'")
    sp.add_argument("--stream", choices=_STREAMS, help="only this stream (log: logging records no stream showed)")
    sp.add_argument("--extract", action="store_true",
                    help="a table of the name=number / name: number values of the lines, one row per line, a column "
                         "per loop and per name (values the script printed but never logged)")
    sp.add_argument("--names", nargs="+", metavar="NAME", help="with --extract: only these names")


def run_command(a: Any, write_frame: Any) -> int:
    """``flor-ray output``: the lines as printed, or a frame (--format/-o, --extract)."""
    import sys

    from ..api import resolve_store

    store = resolve_store(a.store)
    if a.extract:
        write_frame(output_metrics(store, a.run, names=a.names, grep=a.grep, iterations=a.iterations),
                    a.format, a.output)
        return 0
    if a.run is None:
        raise QueryError("flor-ray output needs a run id (see `flor-ray runs`), or --extract for every run")
    df = output_frame(store, a.run, grep=a.grep, iterations=a.iterations, stream=a.stream)
    if a.format or a.output:
        write_frame(df, a.format, a.output)
    else:
        for text in df["text"]:
            sys.stdout.write(text + "\n")
    meta = _runs(store, a.run)[0]
    info = meta.get("output_capture")
    if info is None:
        sys.stderr.write(f"run {a.run} has no captured output (recorded with output_max_bytes=0, or by a flor_ray "
                         "without output capture)\n")
    elif info.get("dropped_lines"):
        sys.stderr.write(f"{info['dropped_lines']} later lines of run {a.run} were not kept: its output reached "
                         f"output_max_bytes={info.get('max_bytes')} (FLOR_OUTPUT_MAX_BYTES)\n")
    return 0


def output_text(store: "Store", run_id: str, last: int = 1000) -> str | None:
    """The last ``last`` captured lines of a run as one text (the web UI's run page); None without any."""
    df = output_frame(store, run_id)
    if not len(df):
        return None
    skipped = max(len(df) - last, 0)
    head = f"[{skipped} earlier lines: flor-ray output {run_id}]\n" if skipped else ""
    return head + "\n".join(df["text"].iloc[skipped:])

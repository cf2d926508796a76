"""flor_ray: multiversion hindsight logging for ML training, on Ray.

Record with ``flor.log``, ``flor.arg``, ``flor.loop`` and ``flor.checkpointing``;
later add a ``flor.log`` statement to today's script and back-fill it into every
past run with ``flor.replay``; query with ``flor.dataframe`` or ``flor.sql``.

Importing this package is cheap and does one thing only: when the command line
holds FlorDB-style ``--kwargs name=value ...`` it takes them out of ``sys.argv``
(so that the script's own argparse never sees them) for ``flor.arg`` to read.
No run, file, thread or git call happens until a verb is first called.
"""

from __future__ import annotations

import os as _os
import sys as _sys
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from .errors import FlorError

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = [
    "log",
    "arg",
    "loop",
    "iteration",
    "checkpointing",
    "run",
    "commit",
    "dataframe",
    "runs",
    "sql",
    "query",
    "plan_replay",
    "run_plan",
    "replay",
    "checkpoints",
    "load_checkpoint",
    "output",
    "output_metrics",
    "plot",
    "notebook_code",
    "FlorError",
    "__version__",
]
__version__ = "0.1.0"

_KWARGS: dict[str, str] = {}
if any(a == "--kwargs" or a.startswith("--kwargs=") for a in _sys.argv):
    from .record.args import take_kwargs as _take_kwargs

    _KWARGS = _take_kwargs(_sys.argv)

_SESSION: Any = None
_BLOCKS = 0  # the `with flor.run():` blocks this process has entered


def _session():
    """The process's session, made on first use: replay mode when FLOR_REPLAY is set,
    profiled (its calls timed, see flor_ray.record.profile) when FLOR_PROFILE is."""
    global _SESSION
    if _SESSION is None:
        spec = _os.environ.get("FLOR_REPLAY")
        if spec:
            from .execution.blocks import replay_session

            _SESSION = replay_session(spec)
        else:
            _SESSION = _record_session({"after_blocks": _BLOCKS} if _BLOCKS else None)
    return _SESSION


def _record_session(block: Any):
    from .config import load_settings
    from .record.profile import hooks_from_environment
    from .record.session import RecordSession

    return RecordSession(load_settings(), _KWARGS, hooks=hooks_from_environment(), block=block)


class _RunBlock:
    """``with flor.run():``, see :func:`run`."""

    def __enter__(self) -> "_RunBlock":
        global _SESSION, _BLOCKS
        if _os.environ.get("FLOR_REPLAY"):
            from .execution.blocks import BlockRouter

            session = _SESSION or _session()
            if not isinstance(session, BlockRouter):  # a run recorded before any block: it ends here
                _SESSION = session = BlockRouter({"after_blocks": 0}, lambda: None, replay=session)
            session.enter_block()
            _BLOCKS += 1
            return self
        if getattr(_SESSION, "block", None) and _SESSION.block.get("block") and not _SESSION._finished:
            raise FlorError("`with flor.run():` inside another one; a run cannot hold another run: end the first")
        if _SESSION is not None:
            _SESSION.end_by_block()  # a kernel-session run (calls outside the blocks) ends here
        _BLOCKS += 1
        _SESSION = _record_session({"block": _BLOCKS})
        globals()["log"] = _first_log
        _SESSION.start()
        return self

    def __exit__(self, tp, val, tb) -> bool:
        global _SESSION
        session = _SESSION
        if _os.environ.get("FLOR_REPLAY"):
            if tp is None or not issubclass(tp, SystemExit):
                session.exit_block()
            return False
        _SESSION = None
        globals()["log"] = _first_log
        if tp is not None and session is not None:
            import traceback

            from .config import TRACEBACK_KEPT_CHARS

            session._record_error({"type": tp.__name__, "message": str(val),
                                   "traceback": "".join(traceback.format_exception(tp, val, tb))[-TRACEBACK_KEPT_CHARS:]})
        if session is not None:
            session.finish()
        return False


def run() -> _RunBlock:
    """Context manager: the block is one run, e.g. a notebook cell's ``with flor.run():``
    around its training. The run starts at the block's start (its code: the script,
    or in IPython / Jupyter the repository snapshot plus the cells run so far) and
    ends at its end; flor calls outside blocks make a run of their own, which the next
    block ends (in a kernel: the kernel session's run, ended at shutdown otherwise)."""
    return _RunBlock()


def log(name: str, value: Any) -> Any:
    """Record ``value`` under ``name`` in the current loop context; returns ``value``.

    After the first call the module attribute ``flor_ray.log`` is rebound to the
    session's own method, so ``flor.log(...)`` in a hot loop costs one call.
    """
    session = _SESSION or _session()
    out = session.log(name, value)
    globals()["log"] = session.fast_log
    return out


_first_log = log  # flor.log before its first call rebinds it: a new run (flor.run()) starts there again


def arg(name: str, default: Any) -> Any:
    """A recorded hyper-parameter; ``--kwargs name=value`` overrides the default."""
    return (_SESSION or _session()).arg(name, default)


def loop(name: str, iterable: Iterable[Any]) -> Iterator[Any]:
    """Iterate ``iterable`` as loop ``name``; the outermost loop sets checkpoints."""
    return (_SESSION or _session()).loop(name, iterable)


def iteration(name: str, idx: int | None = None, value: Any = None):
    """Context manager around one iteration of a loop the script drives itself.

    ``with flor.iteration("step", iter_num):`` in a ``while`` loop (FlorDB's name and
    signature): logs inside get the context ``step=<n>``; at the top level each block
    is an outer iteration (counted, checkpointed by the adaptive policy, replayed
    from the nearest checkpoint). See :mod:`flor_ray.record.steps`.
    """
    return (_SESSION or _session()).iteration(name, idx, value)


def checkpointing(**objects: Any):
    """Context manager: checkpoint these objects (and every RNG) per outer iteration.

    ``from_saves=True``: where the script ``torch.save``s the objects' state each
    iteration, take that save as the checkpoint instead of copying the same tensors
    again (see :mod:`flor_ray.record.own_saves`)."""
    return (_SESSION or _session()).checkpointing(**objects)


def commit() -> None:
    """Flush buffered rows to the store now (they are also flushed at outer-iteration ends,
    at most every ``flush_interval_s``).

    FlorDB's ``flor.commit()`` flushes and makes a git commit; flor_ray snapshots the
    code when a run starts, so here it only flushes."""
    if _SESSION is not None:
        _SESSION.commit()


def _store(store: Any = None):
    from .api import resolve_store

    spec = _os.environ.get("FLOR_REPLAY")
    if store is None and spec:  # a query in replayed code (a notebook's cell) reads the store being replayed
        from .execution.spec import TaskSpec

        with open(spec) as f:
            return TaskSpec.from_json(f.read()).open_store()
    return resolve_store(store)


def dataframe(*names: str, where: str | None = None, store: Any = None) -> "pd.DataFrame":
    """One row per (run, loop context), a column per loop, log name and arg.

    A name logged several times in one context adds an ``occurrence`` column (one
    row per value, in logging order); see :func:`flor_ray.queries.dataframe.dataframe`.
    """
    from .queries.dataframe import dataframe as _df

    return _df(_store(store), names, where)


def runs(where: str | None = None, store: Any = None) -> "pd.DataFrame":
    """The runs table (one row per run, a column per arg)."""
    from .queries.runs import runs_frame, select_runs

    st = _store(store).check()
    df = runs_frame(st)
    if where:
        keep = set(select_runs(st, where))
        df = df[df["run_id"].isin(keep)].reset_index(drop=True)
    return df


def sql(query: str, store: Any = None) -> "pd.DataFrame":
    """DuckDB SQL over tables ``logs`` (long relation) and ``runs``."""
    from .queries.sql import sql as _sql

    return _sql(_store(store), query)


def query(sql_query: str, store: Any = None) -> "pd.DataFrame":
    """``flor.query``: FlorDB's name for :func:`sql`."""
    return sql(sql_query, store=store)


def checkpoints(run_id: str, store: Any = None) -> "pd.DataFrame":
    """A run's checkpoints: iteration, bytes, time written, verified, path."""
    from .queries.checkpoints import checkpoint_table

    return checkpoint_table(_store(store).check(), run_id)


def load_checkpoint(run_id: str, iteration: Any = "last", *, store: Any = None, rng: bool = False,
                    **objects: Any):
    """Restore the state a run checkpointed at ``iteration`` into ``objects``.

    ``flor.load_checkpoint(run_id, 3, model=net, optimizer=opt)``: the names are those
    the run gave ``flor.checkpointing``; ``iteration`` is a number or ``"last"``;
    ``rng=True`` also restores the python/numpy/torch RNG states.
    """
    from .queries.checkpoints import load_checkpoint as _load

    return _load(_store(store).check(), run_id, iteration, objects, rng=rng)


def output(run_id: str | None = None, *, grep: str | None = None, iterations: Any = None, stream: str | None = None,
           store: Any = None) -> "pd.DataFrame":
    """What a run printed (every run: None): one row per line, with its stream, line
    number, time and loop context; ``grep`` a regular expression, ``iterations`` as
    replay's ('last', 3, '0:5'), ``stream`` stdout, stderr or log."""
    from .queries.output import output_frame

    return output_frame(_store(store), run_id, grep=grep, iterations=iterations, stream=stream)


def output_metrics(run_id: str | None = None, names: Iterable[str] | None = None, *, grep: str | None = None,
                   iterations: Any = None, store: Any = None) -> "pd.DataFrame":
    """The ``name=number`` values of printed lines (values printed but never logged),
    one row per line: run_id, line, stream, a column per loop, a column per name."""
    from .queries.output import output_metrics as _metrics

    return _metrics(_store(store), run_id, names=names, grep=grep, iterations=iterations)


def plot(name: str, *, by: str = "run", x: str | None = None, where: str | None = None, store: Any = None,
         path: str | None = None):
    """A line plot of a numeric name across iterations, a line per run (or per version):
    shown inline in Jupyter, written as a PNG when ``path`` is given (see
    :func:`flor_ray.queries.plot.plot_metric`)."""
    from .queries.plot import Plot

    return Plot.of(dataframe(name, where=where, store=store), name, by=by, x=x, path=path)


def notebook_code(run_id: str, path: str | None = None, store: Any = None) -> str:
    """The code a run recorded as its script (for a notebook run: its executed cells);
    written to ``path`` when given: add a statement there and replay with ``script=path``."""
    from .api import recorded_script

    return recorded_script(_store(store), run_id, path)


def plan_replay(names=None, **kwargs: Any):
    """Plan a hindsight-logging query (see :func:`flor_ray.api.plan_replay`)."""
    from .api import plan_replay as _plan

    return _plan(names, **kwargs)


def run_plan(plan, **kwargs: Any):
    """Run a plan from :func:`plan_replay` (on Ray unless ``runner=`` says otherwise,
    see :func:`flor_ray.execution.driver.run_plan`); returns the report."""
    from .execution.driver import run_plan as _run

    return _run(plan, **kwargs)


def replay(names=None, **kwargs: Any):
    """Plan and run a hindsight-logging query (see :func:`flor_ray.api.replay`); returns the report."""
    from .api import replay as _replay

    return _replay(names, **kwargs)


if _os.environ.get("FLOR_REPLAY") and _SESSION is None:
    # a replayed script: the files it opens are the recorded run's from its first line
    # on (its resume-at-start code runs before any flor call; execution/replay_files.py)
    _session()

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
    "FlorError",
    "__version__",
]
__version__ = "0.1.0"

_KWARGS: dict[str, str] = {}
if any(a == "--kwargs" or a.startswith("--kwargs=") for a in _sys.argv):
    from .record.args import take_kwargs as _take_kwargs

    _KWARGS = _take_kwargs(_sys.argv)

_SESSION: Any = None


def _session():
    """The process's session, made on first use: replay mode when FLOR_REPLAY is set,
    profiled (its calls timed, see flor_ray.record.profile) when FLOR_PROFILE is."""
    global _SESSION
    if _SESSION is None:
        from .config import load_settings

        spec = _os.environ.get("FLOR_REPLAY")
        if spec:
            from .execution.worker import ReplaySession

            _SESSION = ReplaySession.from_spec_file(spec)
        else:
            from .record.profile import hooks_from_environment
            from .record.session import RecordSession

            _SESSION = RecordSession(load_settings(), _KWARGS, hooks=hooks_from_environment())
    return _SESSION


def log(name: str, value: Any) -> Any:
    """Record ``value`` under ``name`` in the current loop context; returns ``value``.

    After the first call the module attribute ``flor_ray.log`` is rebound to the
    session's own method, so ``flor.log(...)`` in a hot loop costs one call.
    """
    session = _SESSION or _session()
    out = session.log(name, value)
    globals()["log"] = session.fast_log
    return out


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

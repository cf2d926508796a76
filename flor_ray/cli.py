"""``flor-ray``: the command line (also the entry point for ``ray job submit``).

Every command has ``--help``. Exit codes: 0 success; 1 a replay with failed tasks,
damage found by ``check`` (without ``--repair``), or an internal error; 2 a usage
error or an error that the message says how to fix (unknown names, no store, bad
predicate, bad config); 130 interrupted. An error is one
line on stderr, ``flor-ray <command>: <what is wrong and what to do>``, plus a hint to
rerun with ``--verbose`` (accepted before or after the command) for the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, Sequence

from .errors import FlorError
from .flordb import add_command as _add_flordb_commands
from .cli_store import add_store_commands

__all__ = ["main", "build_parser"]

_FORMATS = ("table", "csv", "json", "parquet")
_EXAMPLES = """\
examples (in the repository whose runs you recorded; try them after `flor-ray demo DIR`):
  flor-ray runs
  flor-ray df acc wnorm --where "lr > 0.05"
  flor-ray sql "SELECT name, count(*) AS n FROM logs GROUP BY name"
  flor-ray output RUN --grep "acc="
  flor-ray replay wnorm --dry-run
  flor-ray replay wnorm
  flor-ray plot wnorm --by version -o wnorm.png
  flor-ray propagate today.py old.py -o patched.py
  flor-ray propagate src/ old-src/ --diff
  flor-ray ui
  flor-ray demo /tmp/flor-ray-demo
"""


class _CliError(FlorError):
    """A misuse of the command line that argparse cannot see (e.g. parquet to a terminal)."""


# ----------------------------------------------------------------- output
def _short_table(df):
    """A copy that reads well in a terminal: short version ids, timestamps to the second."""
    import pandas as pd

    out = df.copy()
    if "version" in out:
        out["version"] = out["version"].map(lambda v: v[:8] if isinstance(v, str) else v)
    for c in out.columns:
        if pd.api.types.is_datetime64_any_dtype(out[c]):
            out[c] = out[c].dt.strftime("%Y-%m-%d %H:%M:%S")
    return out


def _format_of(fmt: str | None, output: str | None) -> str:
    """The output format: as given, else from the output file's extension, else a table."""
    if fmt is None:
        ext = os.path.splitext(output or "")[1].lower().lstrip(".")
        fmt = {"csv": "csv", "json": "json", "parquet": "parquet", "pq": "parquet"}.get(ext, "table")
    if fmt == "parquet" and output is None and sys.stdout.isatty():
        raise _CliError("parquet is binary and stdout is a terminal; redirect it (> out.parquet) or pass "
                        "-o out.parquet")
    return fmt


def _write_frame(df, fmt: str | None, output: str | None) -> None:
    """Print or save a frame: ``table`` (terminal), ``csv``, ``json`` (records) or ``parquet``."""
    fmt = _format_of(fmt, output)
    if fmt != "parquet":
        from .queries.render import frame_columns

        columns = frame_columns(df)
        if columns is not None:  # the same text as pandas writes, in a fraction of its time
            return _write_columns(columns, fmt, output)
    if output:
        if fmt == "table":
            with open(output, "w") as f:
                f.write(_render_table(df) + "\n")
        elif fmt == "csv":
            df.to_csv(output, index=False)
        elif fmt == "json":
            df.to_json(output, orient="records", date_format="iso")
        else:
            df.to_parquet(output, index=False)
        sys.stderr.write(f"wrote {len(df)} rows to {output}\n")
        return
    if fmt == "csv":
        df.to_csv(sys.stdout, index=False)
    elif fmt == "json":
        sys.stdout.write(df.to_json(orient="records", date_format="iso") + "\n")
    elif fmt == "parquet":
        sys.stdout.flush()
        df.to_parquet(sys.stdout.buffer, index=False)
    else:
        print(_render_table(df))


def _write_columns(columns, fmt: str, output: str | None) -> None:
    """:func:`_write_frame` for the columns of :mod:`flor_ray.queries.render` (no
    pandas), in a text format: the same text, byte for byte."""
    from dataclasses import replace

    from .queries import render

    if fmt == "table":
        columns = [replace(c, values=tuple(v[:8] if isinstance(v, str) else v for v in c.values))
                   if c.name == "version" else c for c in columns]
        text = render.render_table(columns) + "\n"
    elif fmt == "csv":
        text = render.render_csv(columns)
    else:
        text = render.render_json(columns) + ("" if output else "\n")
    if output:
        with open(output, "w") as f:
            f.write(text)
        sys.stderr.write(f"wrote {len(columns[0].values) if columns else 0} rows to {output}\n")
    else:
        sys.stdout.write(text)


def _render_table(df) -> str:
    import pandas as pd

    if not len(df):
        return "(no rows)"
    with pd.option_context("display.max_columns", None, "display.width", 10_000, "display.max_colwidth", 60):
        return _short_table(df).to_string(index=False)


# --------------------------------------------------------------- commands
def cmd_runs(a) -> int:
    import flor_ray

    fmt = _format_of(a.format, a.output)
    if not a.where and fmt != "parquet":  # the common case, without pandas (see queries/render.py)
        from .api import resolve_store
        from .queries.runs import runs_columns

        columns = runs_columns(resolve_store(a.store).check())
        if columns is not None:
            if fmt == "table" and not a.output:
                columns = [c for c in columns if c.name not in ("argv", "project")]
            _write_columns(columns, fmt, a.output)
            return 0
    df = flor_ray.runs(where=a.where, store=a.store)
    if (a.format or "table") == "table" and not a.output:
        df = df[[c for c in df.columns if c not in ("argv", "project")]]
    _write_frame(df, a.format, a.output)
    return 0


def cmd_df(a) -> int:
    import flor_ray

    fmt = _format_of(a.format, a.output)
    if fmt == "parquet":
        _write_frame(flor_ray.dataframe(*a.names, where=a.where, store=a.store), fmt, a.output)
        return 0
    from .queries.dataframe import frame, render_columns, to_pandas

    result = frame(flor_ray._store(a.store), a.names, a.where, stacklevel=3)
    columns = render_columns(result, fmt)  # the same text as pandas writes, without importing it
    if columns is None:  # a shape or value only pandas prints as it does (see render_columns)
        _write_frame(to_pandas(result), fmt, a.output)
    else:
        _write_columns(columns, fmt, a.output)
    return 0


def cmd_sql(a) -> int:
    import flor_ray

    fmt = _format_of(a.format, a.output)
    if fmt != "parquet":  # the result's rows printed without pandas (see queries/render.py)
        from .queries.sql import sql_columns

        columns = sql_columns(flor_ray._store(a.store), a.query)
        if columns is not None:
            _write_columns(columns, fmt, a.output)
            return 0
    _write_frame(flor_ray.sql(a.query, store=a.store), a.format, a.output)
    return 0


def cmd_replay(a) -> int:
    import flor_ray

    resources = {}
    if a.num_cpus is not None:
        resources["num_cpus"] = a.num_cpus
    if a.num_gpus is not None:
        resources["num_gpus"] = a.num_gpus
    if a.address or os.environ.get("RAY_ADDRESS"):  # plan for that cluster's resources
        from .execution.driver import ensure_ray

        ensure_ray(a.address)
    plan = flor_ray.plan_replay(a.names or None, where=a.where, iterations=a.iterations or "all",
                                script=a.script, store=a.store, resources=resources or None,
                                include_running=a.include_running)
    print(plan.explain(), flush=True)
    if a.dry_run:
        return 0
    from .execution.driver import ray_runner, run_plan

    report = run_plan(plan, runner=ray_runner(a.address), progress=not a.quiet)
    print(report)
    return 0 if report.ok else 1


def cmd_output(a) -> int:
    from .queries.output import run_command

    return run_command(a, _write_frame)


def cmd_checkpoints(a) -> int:
    import flor_ray

    _write_frame(flor_ray.checkpoints(a.run, store=a.store), a.format, a.output)
    return 0


def _read_text(path) -> str:
    try:
        return path.read_text()
    except UnicodeDecodeError as exc:
        raise _CliError(f"{str(path)!r} is not UTF-8 text ({exc.reason}); propagate Python source files") from exc


_SKIP_DIRS = {".git", ".flor", "__pycache__", ".venv", "venv", "node_modules"}


def _python_tree(root) -> dict[str, str]:
    """``relative path -> text`` of the Python files under ``root``."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if not any(part in _SKIP_DIRS for part in rel.parts[:-1]):
            out[rel.as_posix()] = _read_text(path)
    return out


def cmd_propagate(a) -> int:
    from pathlib import Path

    from .propagation import format_placements, propagate_detailed
    from .propagation.project import unified_diff

    source, target = Path(a.source), Path(a.target)
    if source.is_dir() or target.is_dir():
        if not (source.is_dir() and target.is_dir()):
            raise _CliError("give two files, or two directories (today's tree, then an old tree)")
        return _propagate_trees(a, source, target)
    old = _read_text(target)
    res = propagate_detailed(_read_text(source), old)
    if a.diff:
        sys.stdout.write(unified_diff(old, res.code, target.name))
    elif a.output:
        Path(a.output).write_text(res.code)
    else:
        sys.stdout.write(res.code)
    sys.stderr.write(format_placements(res) + "\n")
    return 0


def _propagate_trees(a, source, target) -> int:
    from pathlib import Path

    from .propagation import format_placements
    from .propagation.project import propagate_project, unified_diff

    if not (a.diff or a.output):
        raise _CliError("for two directories, pass --diff to print the patch or -o DIR to write the patched files")
    old = _python_tree(target)
    patches = propagate_project(_python_tree(source), old)
    if not patches:
        sys.stderr.write("nothing to propagate: every name logged today is logged by the old tree's files\n")
    refused = 0
    for fp in patches:
        head = f"{fp.path}" + (f" -> {fp.target}" if fp.target and fp.target != fp.path else "")
        if fp.refused:
            refused += 1
            sys.stderr.write(f"{head}: refused: {fp.refused}\n")
            continue
        refused += bool(fp.result.refused)
        sys.stderr.write(f"{head} ({fp.pairing}):\n" + format_placements(fp.result) + "\n")
        if a.diff:
            sys.stdout.write(unified_diff(old[fp.target], fp.result.code, fp.target))
        if a.output:
            out = Path(a.output) / fp.target
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(fp.result.code)
    return 1 if refused else 0  # the patches that could be made are written all the same


def cmd_plot(a) -> int:
    import flor_ray

    from .queries.plot import plot_metric

    df = flor_ray.dataframe(a.name, where=a.where, store=a.store)
    out = a.output or f"{a.name}.png"
    plot_metric(df, a.name, out, by="run_id" if a.by == "run" else a.by, x=a.x)
    print(f"wrote {out}")
    return 0


def cmd_ui(a) -> int:
    from .api import resolve_store
    from .ui.server import serve

    serve(resolve_store(a.store), host=a.host, port=a.port, quiet=not a.verbose, ray_address=a.address)
    return 0


def cmd_demo(a) -> int:
    from .demo import run_demo

    run_demo(a.dir, gnorm=not a.skip_gnorm)
    return 0


# ----------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = _root_parser()
    add = _command_adder(p.add_subparsers(dest="command", metavar="COMMAND", required=True))
    for group in (_add_query_commands, _add_replay_commands, _add_tool_commands, add_store_commands,
                  _add_flordb_commands):
        group(add)
    return p


def _root_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(
        prog="flor-ray",
        description="Multiversion hindsight logging for ML training, on Ray: list runs, query logged values, "
                    "back-fill new flor.log statements into past runs, plot.",
        epilog=_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--verbose", "-v", action="store_true", help="show the full traceback on errors")
    p.add_argument("--config", metavar="FILE",
                   help="YAML settings file (see configs/local.yaml); same as FLOR_CONFIG=FILE. "
                        "Precedence: defaults < file < FLOR_* environment < command-line options")
    p.add_argument("--version", action="version", version=f"flor-ray {__version__}")
    return p


def _command_adder(sub: Any) -> Callable[..., argparse.ArgumentParser]:
    """``add(name, fn, help, example, store=True, fmt=False)``: a sub-command with the shared options."""

    def add(name, fn, help, example, store=True, fmt=False):
        sp = sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".",
                            epilog=f"example:\n  {example}", formatter_class=argparse.RawDescriptionHelpFormatter)
        sp.set_defaults(fn=fn, parser=sp)
        if store:
            sp.add_argument("--store", metavar="URL",
                            help="store URL, e.g. s3://bucket/flor (default: FLOR_STORE, else store: of the config "
                                 "file, else .flor/ of this git repository)")
        if fmt:
            sp.add_argument("--format", choices=_FORMATS, default=None,
                            help="output format (default: from -o's extension, else a table)")
            sp.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")
        # accepted after the command too; SUPPRESS keeps a value given before it
        sp.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        sp.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        return sp

    return add


def _add_query_commands(add: Callable[..., argparse.ArgumentParser]) -> None:
    sp = add("runs", cmd_runs, "list the recorded runs: id, version, status, timings, one column per flor.arg",
             'flor-ray runs --where "lr > 0.05" --format csv', fmt=True)
    sp.add_argument("--where", help="one SQL boolean expression over the runs table's columns, e.g. \"lr > 0.01\"")

    sp = add("df", cmd_df, "logged values, one row per run and loop iteration, one column per name "
             "(<name> recorded, <name>__replay replayed; an occurrence column where a name logged several "
             "values in one iteration; <name>__conflict where replays disagree)",
             "flor-ray df acc wnorm --where \"lr > 0.05\"", fmt=True)
    sp.add_argument("names", nargs="+", metavar="NAME", help="log names, e.g. acc loss")
    sp.add_argument("--where", help="one SQL boolean expression over the runs table's columns, e.g. \"lr > 0.01\"")

    sp = add("sql", cmd_sql, "run a read-only DuckDB query over the tables logs (one row per value), runs and "
             "output (no files, network, extensions or settings)",
             "flor-ray sql \"SELECT run_id, max(value) FROM logs WHERE name = 'acc' GROUP BY run_id\"", fmt=True)
    sp.add_argument("query", help="a SELECT over logs, runs and output")

    from .queries.output import add_arguments

    add_arguments(add("output", cmd_output, "what a run printed (stdout, stderr, logging), as printed or as a table; "
                      "--extract: its name=value numbers", "flor-ray output RUN --grep acc --iterations 0:5", fmt=True))


def _add_replay_commands(add: Callable[..., argparse.ArgumentParser]) -> None:
    sp = add("replay", cmd_replay, "back-fill new log statements of today's script into past runs, on Ray",
             "flor-ray replay wnorm --where \"lr > 0.05\" --dry-run")
    sp.add_argument("names", nargs="*", metavar="NAME",
                    help="log names (default: every name today's script logs that the runs did not)")
    sp.add_argument("--where", help="SQL predicate selecting runs, e.g. \"lr > 0.01\"")
    sp.add_argument("--iterations", metavar="SPEC", help="'all' (default), 'last', '3', '0:5' or '1,4,7'")
    sp.add_argument("--script", help="today's script (default: the latest run's script in this checkout)")
    sp.add_argument("--dry-run", action="store_true", help="print the plan and its estimate, run nothing")
    sp.add_argument("--include-running", action="store_true",
                    help="replay runs that are still recording too (default: skipped with the reason)")
    sp.add_argument("--num-cpus", type=float, metavar="N",
                    help="CPUs per task (default: the run's recorded intra-op threads, at most a node's CPUs)")
    sp.add_argument("--num-gpus", type=float, metavar="N", help="GPUs per task (default: 1 for runs recorded on CUDA)")
    sp.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else a local Ray)")
    sp.add_argument("--quiet", "-q", action="store_true", help="no progress bar")

    sp = add("checkpoints", cmd_checkpoints, "list a run's checkpoints: iteration, size, time written, path "
             "(restore one in Python with flor.load_checkpoint(RUN, ITERATION, model=...))",
             "flor-ray checkpoints 20261201T101500-a1b2c3", fmt=True)
    sp.add_argument("run", metavar="RUN", help="a run id, as `flor-ray runs` lists it")

    sp = add("propagate", cmd_propagate, "inject today's new log statements into an old version of a file, "
             "or of every file of a project", "flor-ray propagate today.py old.py -o patched.py  |  "
             "flor-ray propagate src/ old-src/ --diff", store=False)
    sp.add_argument("source", help="today's file (or directory), with the new flor.log statements")
    sp.add_argument("target", help="the old version (a file, or a directory for a directory)")
    sp.add_argument("-o", "--output", metavar="PATH",
                    help="write the patched target here (a directory for two directories; default: stdout)")
    sp.add_argument("--diff", action="store_true", help="print the patch as a unified diff per file instead")

    sp = add("plot", cmd_plot, "plot a logged name across iterations as a PNG, one line per run or per version",
             "flor-ray plot wnorm --by version -o wnorm.png")
    sp.add_argument("name", metavar="NAME", help="a numeric log name, recorded or back-filled")
    sp.add_argument("--by", choices=["run", "version"], default="run",
                    help="one line per run (default) or per code version (the mean of its runs)")
    sp.add_argument("--x", metavar="LOOP", help="the loop on the x axis (default: epoch, else step); "
                                                "values of inner loops are averaged per x")
    sp.add_argument("--where", help="SQL predicate over the runs table")
    sp.add_argument("-o", "--output", metavar="FILE", help="PNG to write (default: NAME.png)")


def _add_tool_commands(add: Callable[..., argparse.ArgumentParser]) -> None:
    sp = add("ui", cmd_ui, "serve a local web page over the store: runs, charts, run and replay pages",
             "flor-ray ui --port 8765")
    sp.add_argument("--port", type=int, default=8765, help="TCP port (default 8765; 0: a free one)")
    sp.add_argument("--host", default="127.0.0.1",
                    help="address to bind (default 127.0.0.1; any other address requires the printed token)")
    sp.add_argument("--address", help="Ray address for replays started from the page (default: RAY_ADDRESS, "
                                      "else a local Ray)")

    sp = add("demo", cmd_demo, "record 3 versions of a small torch script in a new git repository, then "
             "back-fill new metrics into them on a local Ray (1-2 minutes)", "flor-ray demo /tmp/flor-ray-demo",
             store=False)
    sp.add_argument("dir", nargs="?", default="flor-ray-demo", metavar="DIR",
                    help="a new or empty directory; it is left behind to try the other commands in "
                         "(default: ./flor-ray-demo)")
    sp.add_argument("--skip-gnorm", action="store_true",
                    help="back-fill only the epoch-level wnorm, not the step-level gnorm (faster)")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and not isinstance(exc, FlorError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename!r}" if exc.filename else exc.strerror
    text = " ".join(str(exc).split()) if isinstance(exc, FlorError) else str(exc).strip().splitlines()[0:1]
    if isinstance(text, list):
        text = text[0] if text else ""
    return text or type(exc).__name__


def _warnings_as_lines(name: str) -> None:
    """flor_ray's own warnings as one line each, ``flor-ray <command>: warning: ...``."""
    import warnings

    from .errors import DamagedFileWarning

    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, DamagedFileWarning):
            sys.stderr.write(f"{name}: warning: {message}\n")
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    a, extra = parser.parse_known_args(argv)
    if extra:  # report it with the command's own usage, not the top-level one
        a.parser.error(f"unrecognized arguments: {' '.join(extra)} (see `flor-ray {a.command} --help`)")
    verbose = getattr(a, "verbose", False)
    name = f"flor-ray {a.command}"
    _warnings_as_lines(name)
    try:
        if a.config:
            from .config import load_settings

            load_settings(a.config)  # fail here, once, with the file's own message
            # every part (store, planner, workers started from here) reads FLOR_CONFIG
            os.environ["FLOR_CONFIG"] = os.path.abspath(a.config)
        return a.fn(a)
    except KeyboardInterrupt:
        sys.stderr.write(f"\n{name}: interrupted\n")
        return 130
    except BrokenPipeError:  # `flor-ray df x | head`: the reader left; not an error
        try:  # Python's recipe: point stdout at devnull so the flush at exit cannot fail again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 0
    except (FlorError, OSError) as exc:
        if verbose:
            raise
        hint = "" if isinstance(exc, FlorError) else " (check the path)"
        sys.stderr.write(f"{name}: {_describe(exc)}{hint}\n(run with --verbose for the traceback)\n")
        return 2
    except Exception as exc:  # noqa: BLE001 - a bug: say so, keep the traceback behind --verbose
        if verbose:
            raise
        if type(exc).__module__.split(".")[0] == "ray":
            sys.stderr.write(f"{name}: Ray failed: {type(exc).__name__}: {_describe(exc)}; check `ray status` and "
                             "RAY_ADDRESS (unset it for a local Ray)\n(run with --verbose for the traceback)\n")
            return 2
        import traceback

        sys.stderr.write("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
        sys.stderr.write(f"{name}: internal error: {type(exc).__name__}: {_describe(exc)}\n"
                         "this is a bug in flor_ray, not in your input: please report it with the traceback above\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())

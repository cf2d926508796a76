"""``flor-ray``: the command line (also the entry point for ``ray job submit``)."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .errors import FlorError

__all__ = ["main"]


def _print_frame(df, fmt: str) -> None:
    if fmt == "csv":
        df.to_csv(sys.stdout, index=False)
    elif fmt == "json":
        sys.stdout.write(df.to_json(orient="records", date_format="iso") + "\n")
    elif fmt == "parquet":
        df.to_parquet(sys.stdout.buffer, index=False)
    else:
        import pandas as pd

        with pd.option_context("display.max_rows", 200, "display.max_columns", 50, "display.width", 200):
            print(df.to_string(index=False) if len(df) else "(no rows)")


def _iterations(raw: str | None):
    if raw is None or raw in ("all", "last"):
        return raw or "all"
    return raw


def cmd_runs(a) -> int:
    import flor_ray

    df = flor_ray.runs(where=a.where, store=a.store)
    cols = [c for c in df.columns if c not in ("argv", "project")]
    _print_frame(df[cols], a.format)
    return 0


def cmd_df(a) -> int:
    import flor_ray

    _print_frame(flor_ray.dataframe(*a.names, where=a.where, store=a.store), a.format)
    return 0


def cmd_sql(a) -> int:
    import flor_ray

    _print_frame(flor_ray.sql(a.query, store=a.store), a.format)
    return 0


def cmd_replay(a) -> int:
    import flor_ray

    resources = {}
    if a.num_cpus is not None:
        resources["num_cpus"] = a.num_cpus
    if a.num_gpus is not None:
        resources["num_gpus"] = a.num_gpus
    plan = flor_ray.plan_replay(a.names or None, where=a.where, iterations=_iterations(a.iterations),
                                script=a.script, store=a.store, resources=resources or None)
    print(plan.explain())
    if a.dry_run:
        return 0
    report = plan.run(progress=not a.quiet, ray_address=a.address)
    print(report)
    return 0 if report.ok else 1


def cmd_propagate(a) -> int:
    from pathlib import Path

    from .propagation import format_placements, propagate_detailed

    res = propagate_detailed(Path(a.source).read_text(), Path(a.target).read_text())
    if a.output:
        Path(a.output).write_text(res.code)
    else:
        sys.stdout.write(res.code)
    sys.stderr.write(format_placements(res) + "\n")
    return 0


def cmd_demo(a) -> int:
    from .demo import run_demo

    run_demo(a.dir)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flor-ray", description="Multiversion hindsight logging for ML training, on Ray.")
    p.add_argument("--verbose", action="store_true", help="show the full traceback on errors")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, store=True, fmt=False):
        if store:
            sp.add_argument("--store", help="store URL (default: FLOR_STORE, else .flor/ of this repository)")
        if fmt:
            sp.add_argument("--format", choices=["table", "csv", "json", "parquet"], default="table")
        sp.add_argument("--verbose", action="store_true", help=argparse.SUPPRESS)

    sp = sub.add_parser("runs", help="list the recorded runs")
    sp.add_argument("--where", help="SQL predicate over the runs table, e.g. \"lr > 0.01\"")
    common(sp, fmt=True)
    sp.set_defaults(fn=cmd_runs)

    sp = sub.add_parser("df", help="one row per run and loop context, a column per name")
    sp.add_argument("names", nargs="+")
    sp.add_argument("--where", help="SQL predicate over the runs table")
    common(sp, fmt=True)
    sp.set_defaults(fn=cmd_df)

    sp = sub.add_parser("sql", help="SQL over tables logs and runs (DuckDB)")
    sp.add_argument("query")
    common(sp, fmt=True)
    sp.set_defaults(fn=cmd_sql)

    sp = sub.add_parser("replay", help="back-fill new log statements into past runs")
    sp.add_argument("names", nargs="*", help="log names (default: every new name of today's script)")
    sp.add_argument("--where", help="SQL predicate selecting runs")
    sp.add_argument("--iterations", help="'all' (default), 'last', '3', '0:5' or '1,4,7'")
    sp.add_argument("--script", help="today's script (default: the latest run's script in this checkout)")
    sp.add_argument("--dry-run", action="store_true", help="print the plan only")
    sp.add_argument("--num-cpus", type=float, help="CPUs per task (default 1)")
    sp.add_argument("--num-gpus", type=float, help="GPUs per task (default: 1 for runs recorded on CUDA)")
    sp.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else a local Ray)")
    sp.add_argument("--quiet", action="store_true", help="no progress bar")
    common(sp)
    sp.set_defaults(fn=cmd_replay)

    sp = sub.add_parser("propagate", help="inject today's new log statements into an old version of a file")
    sp.add_argument("source", help="today's file, with the new flor.log statements")
    sp.add_argument("target", help="the old version")
    sp.add_argument("-o", "--output", help="write the patched target here (default: stdout)")
    common(sp, store=False)
    sp.set_defaults(fn=cmd_propagate)

    sp = sub.add_parser("demo", help="record 3 versions of a small training script, then back-fill a new metric")
    sp.add_argument("dir", nargs="?", default="flor-ray-demo", help="a new directory for the demo repository")
    common(sp, store=False)
    sp.set_defaults(fn=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        return a.fn(a)
    except FlorError as exc:
        if a.verbose:
            raise
        sys.stderr.write(f"flor-ray {a.command}: {exc}\n(run with --verbose for the traceback)\n")
        return 2
    except (FileNotFoundError, PermissionError) as exc:
        if a.verbose:
            raise
        sys.stderr.write(f"flor-ray {a.command}: {exc}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""Moving over from FlorDB: ``flor-ray import-flordb`` brings a FlorDB project's history
into a flor_ray store (:mod:`.importer`), the code of its runs as flor_ray versions
(:mod:`.code`)."""

from __future__ import annotations

from typing import Any, Callable

__all__ = ["add_command"]


def _command(a) -> int:
    from .importer import import_flordb  # as every command: its machinery is imported when it runs

    print(import_flordb(a.path, store=a.store))
    return 0


def add_command(add: Callable[..., Any]) -> None:
    """``flor-ray import-flordb [PATH]``, through the command line's ``add`` (flor_ray.cli)."""
    sp = add("import-flordb", _command, "import a FlorDB project's history (its runs' logged values and args, the "
             "code of its auto-commits, the files its runs saved) into the store; importing again adds only new "
             "runs", "flor-ray import-flordb ~/my-flordb-project")
    sp.add_argument("path", nargs="?", default=".", metavar="PATH",
                    help="the FlorDB project: its git repository, holding .flor/runs/ (default: .)")

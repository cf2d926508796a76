"""Entry points that need the store or the repository (kept out of ``__init__``):
resolve the store, plan over it, hand the plan to the executor."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import load_settings
from .errors import RepositoryError
from .store import Store

if TYPE_CHECKING:  # pragma: no cover
    from .execution.driver import Runner
    from .execution.report import Report
    from .planning.plan import Plan

__all__ = ["resolve_store", "plan_replay", "replay", "recorded_script"]


def resolve_store(store: Any = None, cwd: str | os.PathLike | None = None,
                  config: str | os.PathLike | None = None) -> Store:
    """A Store from, highest first: the ``store`` argument, ``FLOR_STORE``, ``store:`` of
    the config file (``config`` or ``FLOR_CONFIG``), else ``.flor`` of the repository
    that holds ``cwd``. ``storage_options`` come from the config file."""
    if isinstance(store, Store):
        return store
    settings = load_settings(config, store=store)
    if settings.store:
        return Store(settings.store, settings.storage_options)
    from .versions import find_repo_root

    here = Path(cwd or os.getcwd())
    try:
        root = find_repo_root(here)
    except RepositoryError as exc:
        raise RepositoryError(
            f"no store given and {str(here)!r} is not inside a git repository: pass store=..., "
            "--store URL or set FLOR_STORE"
        ) from exc
    return Store(os.path.join(root, ".flor"), settings.storage_options)


def plan_replay(names=None, *, store: Any = None, **kwargs: Any) -> "Plan":
    """The plan of a replay over the resolved store (see
    :func:`flor_ray.planning.planner.plan_replay` for the arguments); runs nothing."""
    from .planning.planner import plan_replay as _plan

    return _plan(names, store=resolve_store(store).check(), **kwargs)


def replay(names=None, *, runner: "Runner | None" = None, progress: bool = True, **kwargs: Any) -> "Report":
    """Plan a replay and hand the plan to the executor: ``runner`` (None: Ray, see
    :func:`flor_ray.execution.driver.ray_runner`); the report."""
    from .execution.driver import run_plan

    return run_plan(plan_replay(names, **kwargs), runner=runner, progress=progress)


def recorded_script(store: Store, run_id: str, path: str | os.PathLike | None = None) -> str:
    """The text of the script ``run_id`` recorded (a notebook run: its cells), from the
    store; also written to ``path`` when given."""
    from .errors import UnknownRunError
    from .store import layout, safe_component
    from .versions import read_file

    safe_component("run_id", run_id)
    try:
        meta = store.check().read_json(layout.run_meta(run_id))
    except FileNotFoundError:
        raise UnknownRunError(run_id, store.url) from None
    text = read_file(store, meta["version"], meta["script"]).decode()
    if path is not None:
        Path(path).write_text(text)
    return text

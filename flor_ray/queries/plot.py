"""Line plots of a metric across iterations, one line per run or per version.

matplotlib is imported here, with the Agg backend, so that importing flor_ray never
touches a display. Rows that share a line and an x value (a step-level metric plotted
per epoch, or several runs of one version) are averaged, and the y label says so.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ..errors import QueryError

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = ["plot_metric", "BY"]

#: ``by`` choices: the column that makes one line each, and how its legend label is cut.
BY = {"run_id": 24, "run": 24, "version": 8}


def plot_metric(df: "pd.DataFrame", name: str, path: str | os.PathLike, by: str = "run_id",
                x: str | None = None) -> str:
    """Write a PNG of ``name`` against ``x`` (default: epoch, else step), a line per ``by``.

    ``by`` is ``"run_id"`` (alias ``"run"``) or ``"version"``. Returns the path written.
    """
    import pandas as pd

    if by not in BY:
        raise QueryError(f"cannot plot by {by!r}; choose one of: run, version")
    col = "run_id" if by == "run" else by
    if name not in df:
        cols = [c for c in df.columns if c not in ("run_id", "version")]
        raise QueryError(f"no column {name!r} to plot; columns: {', '.join(map(str, cols)) or '(none)'}")
    if col not in df:
        raise QueryError(f"no column {col!r} to group the lines by; pass a frame from flor_ray.dataframe")
    data = df[df[name].notna()]
    if data.empty:
        raise QueryError(f"{name!r} has no values to plot; back-fill it first with `flor-ray replay {name}`")
    values = pd.to_numeric(data[name], errors="coerce")
    if values.isna().all():
        raise QueryError(f"{name!r} holds no numbers (e.g. {data[name].iloc[0]!r}); only numeric values can be plotted")
    data = data.assign(**{name: values})[lambda d: d[name].notna()]
    if x is None:
        x = next((c for c in ("epoch", "step") if c in data and data[c].notna().any()), None)
    elif x not in data:
        raise QueryError(f"no column {x!r} for the x axis; columns: {', '.join(map(str, data.columns))}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    averaged = False
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for key, part in data.groupby(col, sort=False):
        if x:
            part = part[part[x].notna()]
            agg = part.groupby(part[x].astype(float), sort=True)[name].agg(["mean", "size"])
            averaged |= bool((agg["size"] > 1).any())
            xs, ys = list(agg.index), list(agg["mean"])
        else:
            xs, ys = list(range(len(part))), list(part[name].astype(float))
        label = str(key)[: BY[by]]
        if col == "version" and "run_id" in part:
            n = part["run_id"].nunique()
            label += f" ({n} run{'s' if n != 1 else ''})"
        ax.plot(xs, ys, marker="o" if len(xs) <= 50 else None, label=label)
    if x:
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # iterations are whole numbers
    ax.set_xlabel(x or "row")
    ax.set_ylabel(f"{name} (mean per {x})" if averaged else name)
    ax.set_title(f"{name} per {'run' if col == 'run_id' else col}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)

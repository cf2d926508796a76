"""Line plots of a metric across iterations, one line per run or per version.

matplotlib is imported here, and only its ``Figure`` and Agg canvas are used: never
pyplot, whose backend is the user's (a notebook's inline one stays as it is), and
importing flor_ray never touches a display. :class:`Plot` shows itself inline in
Jupyter (a PNG through ``_repr_png_``, whatever matplotlib's backend). Rows that share a line and an x value (a step-level metric plotted
per epoch, or several runs of one version) are averaged, and the y label says so.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ..errors import QueryError

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = ["plot_metric", "figure_of", "Plot", "BY"]

#: ``by`` choices: the column that makes one line each, and how its legend label is cut.
BY = {"run_id": 24, "run": 24, "version": 8}


def plot_metric(df: "pd.DataFrame", name: str, path: str | os.PathLike, by: str = "run_id",
                x: str | None = None) -> str:
    """Write a PNG of ``name`` against ``x`` (default: epoch, else step), a line per ``by``.

    ``by`` is ``"run_id"`` (alias ``"run"``) or ``"version"``. Returns the path written.
    """
    figure_of(df, name, by, x).savefig(path)
    return str(path)


class Plot:
    """A plot of one name: ``figure`` (a matplotlib Figure), its PNG, shown inline by IPython."""

    def __init__(self, figure, path: str | None = None):
        self.figure, self.path = figure, path

    @classmethod
    def of(cls, df: "pd.DataFrame", name: str, by: str = "run", x: str | None = None,
           path: str | os.PathLike | None = None) -> "Plot":
        fig = figure_of(df, name, "run_id" if by == "run" else by, x)
        if path is not None:
            fig.savefig(path)
        return cls(fig, None if path is None else str(path))

    def png(self) -> bytes:
        import io

        buf = io.BytesIO()
        self.figure.savefig(buf, format="png")
        return buf.getvalue()

    def _repr_png_(self) -> bytes:
        return self.png()

    def __repr__(self) -> str:
        return f"<flor_ray plot {self.figure.axes[0].get_title()!r}" + (f" in {self.path}>" if self.path else ">")


def figure_of(df: "pd.DataFrame", name: str, by: str = "run_id", x: str | None = None):
    """The Figure of :func:`plot_metric`, drawn on an Agg canvas without pyplot."""
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

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    averaged = False
    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
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
    return fig

"""Line plots of a metric per run across iterations (matplotlib, Agg backend)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .errors import QueryError

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = ["plot_metric"]


def plot_metric(df: "pd.DataFrame", name: str, path: str | os.PathLike, by: str = "run_id",
                x: str | None = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if name not in df:
        raise QueryError(f"no column {name!r} to plot; columns: {', '.join(df.columns)}")
    data = df[df[name].notna()]
    if x is None:
        x = next((c for c in ("epoch", "step") if c in data and data[c].notna().any()), None)
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for key, part in data.groupby(by, sort=False):
        xs = part[x].astype(float) if x else range(len(part))
        ax.plot(list(xs), list(part[name].astype(float)), marker="o", label=str(key)[:24])
    ax.set_xlabel(x or "row")
    ax.set_ylabel(name)
    ax.set_title(f"{name} per {by}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)

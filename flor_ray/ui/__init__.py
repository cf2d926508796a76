"""``flor-ray ui``: a local web page over a store (runs, charts, run and replay pages).

:mod:`.server` serves JSON endpoints and the static page; :mod:`.api` turns store
reads into JSON through the same query layer (and SQL sandbox) as the command line;
:mod:`.jobs` holds replays planned or started from the page. Nothing here imports
pandas, duckdb or ray until a request needs them.
"""

from __future__ import annotations

__all__ = ["serve"]


def serve(*args, **kwargs):
    """Start the UI server (see :func:`flor_ray.ui.server.serve`)."""
    from .server import serve as _serve

    return _serve(*args, **kwargs)

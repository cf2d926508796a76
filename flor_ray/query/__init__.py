"""The query side: dataframe, SQL (sandboxed), plots and past checkpoints, over a store.

The package is also ``flor.query(sql)``, FlorDB's name for ``flor.sql``: the verb and
this package share the attribute ``flor_ray.query`` (Python binds a package's name in
its parent when it is imported), so calling the package runs the query.
"""

import sys as _sys
import types as _types


class _CallablePackage(_types.ModuleType):
    """This package's module type: a module that can be called."""

    def __call__(self, sql_query: str, store=None):
        """``flor.query(sql, store=None)``: :func:`flor_ray.sql` (the facade, already imported)."""
        return _sys.modules["flor_ray"].sql(sql_query, store=store)


_sys.modules[__name__].__class__ = _CallablePackage

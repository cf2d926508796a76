"""The project's error hierarchy.

One root class, :class:`FlorError`; every subclass keeps the offending values on the
instance and builds a message that says what is wrong and what to do. Where callers
already catch a builtin (``ValueError``, ``KeyError``...), the subclass inherits it too.
Only bad input and unusable surroundings raise these; an exception of the user's
training code propagates as itself, and a bug of flor_ray as a plain Python error
with its traceback.
"""

from __future__ import annotations

__all__ = [
    "FlorError",
    "InvalidNameError",
    "UnsupportedValueError",
    "ArgCastError",
    "LoopError",
    "CheckpointingError",
    "CheckpointError",
    "RetentionError",
    "StoreError",
    "StoreNotFoundError",
    "RepositoryError",
    "QueryError",
    "UnknownRunError",
    "PlanningError",
    "PropagationError",
    "ConfigError",
    "DamagedFileWarning",
    "ClusterError",
    "KwargsError",
    "ArgDefaultError",
    "FlorDBImportError",
]


class FlorError(Exception):
    """Root of every error raised by flor_ray."""


class InvalidNameError(FlorError, ValueError):
    """A log, arg or loop name that is not a usable identifier."""

    def __init__(self, kind: str, name: object, why: str = ""):
        self.kind, self.name = kind, name
        hint = why or "use a non-empty string such as 'loss' or 'val_acc'"
        super().__init__(f"invalid {kind} name {name!r}: {hint}")


class UnsupportedValueError(FlorError, TypeError):
    """A value passed to ``flor.log`` that has no typed representation."""

    def __init__(self, name: str, value: object, why: str = ""):
        self.name, self.value = name, value
        detail = f" ({why})" if why else ""
        super().__init__(
            f"flor.log({name!r}, ...) got a value of type {type(value).__name__}{detail}; "
            "log an int, float, bool, str, a numpy/torch scalar or one-element tensor, "
            "or a small list/dict of those (e.g. loss.item() instead of loss)"
        )


class ArgCastError(FlorError, ValueError):
    """A ``--kwargs name=value`` override that cannot be cast to the default's type."""

    def __init__(self, name: str, raw: str, default: object):
        self.name, self.raw, self.default = name, raw, default
        super().__init__(
            f"--kwargs {name}={raw!r} cannot be cast to {type(default).__name__} "
            f"(the type of flor.arg({name!r}, {default!r})); pass a value of that type"
        )


class LoopError(FlorError, TypeError):
    """Misuse of ``flor.loop``."""


class CheckpointingError(FlorError, RuntimeError):
    """Misuse of ``flor.checkpointing`` (nesting, objects without state)."""


class CheckpointError(FlorError, RuntimeError):
    """A checkpoint that is missing, truncated or corrupted in the store."""

    def __init__(self, message: str, path: str | None = None):
        self.path = path
        super().__init__(message)


class StoreError(FlorError, OSError):
    """The store cannot be reached or holds something unexpected."""


class StoreNotFoundError(StoreError, FileNotFoundError):
    """A store URL under which no store was ever written."""

    def __init__(self, url: str):
        self.url = url
        super().__init__(
            f"no flor_ray store at {url!r}: record a run first (any script that calls "
            "flor.log/arg/loop), or point FLOR_STORE / --store at an existing store"
        )


class RepositoryError(FlorError, RuntimeError):
    """The script does not live in a usable git repository."""


class QueryError(FlorError, ValueError):
    """A bad query: an invalid ``where`` predicate, unknown names, bad SQL."""


class UnknownRunError(QueryError, KeyError):
    """A run id that the store does not hold."""

    def __init__(self, run_id: str, store_url: str):
        self.run_id, self.store_url = run_id, store_url
        ValueError.__init__(
            self,
            f"no run {run_id!r} in the store {store_url!r}; list runs with `flor-ray runs`",
        )

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0])


class PlanningError(FlorError, ValueError):
    """A replay query that cannot be planned."""


class PropagationError(FlorError, ValueError):
    """A new log statement that cannot be placed in an old version with confidence."""


class ConfigError(FlorError, ValueError):
    """A configuration file or value that cannot be used."""


class DamagedFileWarning(UserWarning):
    """A damaged or foreign file of the store, left out of what is being read."""


class ClusterError(FlorError, ConnectionError):
    """The Ray cluster cannot be reached, or lacks what a plan asks for."""


class KwargsError(FlorError, ValueError):
    """A ``--kwargs`` word that is not ``name=value``."""

    def __init__(self, given: str):
        self.given = given
        what = f"got {given!r}" if given else "got nothing after it"
        super().__init__(f"--kwargs takes name=value pairs (e.g. --kwargs lr=0.01 epochs=5); {what}: "
                         "write each override as name=value")


class ArgDefaultError(FlorError, TypeError):
    """A ``flor.arg`` default of a type that ``--kwargs`` cannot override."""

    def __init__(self, name: str, default: object):
        self.name, self.default = name, default
        super().__init__(
            f"flor.arg({name!r}, default) got a default of type {type(default).__name__} ({default!r:.60}); "
            "give an int, float, bool, str or None default (e.g. float(x)), which --kwargs can override"
        )


class FlorDBImportError(FlorError, ValueError):
    """A FlorDB project that cannot be imported: not one, or records that cannot be read."""


class RetentionError(FlorError, ValueError):
    """``flor-ray gc`` was given no policy, or one it cannot follow."""

"""Defaults, in one place, each with the reason for its number.

Precedence (lowest first): these defaults < a YAML config file (``FLOR_CONFIG`` or
``configs/local.yaml`` style files passed explicitly) < environment variables <
explicit arguments. Only the standard library is used here so that ``import
flor_ray`` stays light.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigError

__all__ = ["Settings", "load_settings", "DEFAULTS_DOC"]


@dataclass(frozen=True)
class Settings:
    #: Store URL; ``None`` means ``<repository root>/.flor``.
    store: str | None = None
    #: fsspec storage options for the store (endpoint, credentials...).
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    #: Share of training time that checkpointing may add on the training thread.
    #: The record-overhead target is 2% in all; checkpoints take half of it, logging
    #: and flushing the other half. A larger budget checkpoints more often, which
    #: makes replays start closer to the iterations they need.
    checkpoint_budget: float = 0.01
    #: Upper bound on the checkpoint period (outer iterations between checkpoints),
    #: so that a replay never re-executes more than this many iterations to reach
    #: any iteration, however expensive checkpoints are.
    checkpoint_max_period: int = 16
    #: Untracked files larger than this are left out of the code snapshot (data,
    #: weights a script wrote next to itself); tracked files are always kept.
    snapshot_max_file_bytes: int = 10 * 1024 * 1024
    #: Relative tolerance when comparing replayed with recorded floats. 0 = exact,
    #: the right default on CPU where replay is bit-for-bit.
    fidelity_rtol: float = 0.0
    #: Ray task retries for a replay segment (worker crash, node loss).
    max_retries: int = 3

    def replace(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **changes)


DEFAULTS_DOC = {f.name: f.default for f in dataclasses.fields(Settings) if f.name != "storage_options"}

_ENV = {
    "store": "FLOR_STORE",
    "checkpoint_budget": "FLOR_CHECKPOINT_BUDGET",
    "checkpoint_max_period": "FLOR_CHECKPOINT_MAX_PERIOD",
    "snapshot_max_file_bytes": "FLOR_SNAPSHOT_MAX_FILE_BYTES",
    "fidelity_rtol": "FLOR_FIDELITY_RTOL",
    "max_retries": "FLOR_MAX_RETRIES",
}


def _coerce(name: str, raw: Any) -> Any:
    fld = {f.name: f for f in dataclasses.fields(Settings)}.get(name)
    if fld is None:
        known = ", ".join(sorted(_ENV) + ["storage_options"])
        raise ConfigError(f"unknown setting {name!r}; known settings: {known}")
    default = fld.default if fld.default is not dataclasses.MISSING else None
    if name == "storage_options":
        if not isinstance(raw, Mapping):
            raise ConfigError("storage_options must be a mapping of fsspec options")
        return dict(raw)
    if raw is None or default is None:
        return None if raw in (None, "") else str(raw)
    try:
        if isinstance(default, bool):
            return str(raw).lower() in ("1", "true", "yes", "on")
        return type(default)(raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"setting {name}={raw!r} is not a {type(default).__name__}") from exc


def load_settings(config_file: str | os.PathLike | None = None, **overrides: Any) -> Settings:
    """Defaults < config file (argument or ``FLOR_CONFIG``) < environment < overrides."""
    values: dict[str, Any] = {}
    path = config_file or os.environ.get("FLOR_CONFIG")
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist; fix FLOR_CONFIG or the --config path")
        import yaml  # lazy: only needed when a file is given

        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {exc}") from exc
        if not isinstance(data, Mapping):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping of settings")
        for k, v in data.items():
            values[k] = _coerce(k, v)
    for name, env in _ENV.items():
        if os.environ.get(env):
            values[name] = _coerce(name, os.environ[env])
    for k, v in overrides.items():
        if v is not None:
            values[k] = _coerce(k, v)
    return Settings(**values)

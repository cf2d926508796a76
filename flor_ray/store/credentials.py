"""Secrets in storage options: kept out of reprs, task specs, logs and the store.

A storage option is secret when its name holds one of :data:`SECRET_WORDS` (``key``,
``secret``, ``token``, ``password``, ``credentials``...), at any depth (``client_kwargs``
of s3fs included). The driver keeps them to reach the store itself; a replay task gets
the other options only and takes credentials from its own environment: the
filesystem's variables and files (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``,
``~/.aws``, an instance role for s3fs), or the ``storage_options`` of the config file
that ``FLOR_CONFIG`` names on that machine, for the same store.
"""

from __future__ import annotations

from typing import Any, Mapping

from . import layout

__all__ = ["SECRET_WORDS", "is_secret", "redact", "without_secrets", "StorageOptions", "task_options"]

#: parts of option names that hold credentials (matched case-insensitively)
SECRET_WORDS = ("key", "secret", "token", "password", "passwd", "credential", "auth", "session")
REDACTED = "<redacted>"


def is_secret(name: object) -> bool:
    low = str(name).lower()
    return any(w in low for w in SECRET_WORDS)


def redact(options: Mapping[str, Any]) -> dict:
    """A copy for showing: each secret value replaced by ``<redacted>``, at any depth."""
    return {k: REDACTED if is_secret(k) else redact(v) if isinstance(v, Mapping) else v
            for k, v in options.items()}


def without_secrets(options: Mapping[str, Any]) -> dict:
    """A copy without the secret options, at any depth (what a task spec carries)."""
    return {k: without_secrets(v) if isinstance(v, Mapping) else v for k, v in options.items() if not is_secret(k)}


def _secrets_only(options: Mapping[str, Any]) -> dict:
    out = {}
    for k, v in options.items():
        if is_secret(k):
            out[k] = v
        elif isinstance(v, Mapping) and (inner := _secrets_only(v)):
            out[k] = inner
    return out


def _merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


class StorageOptions(dict):
    """fsspec storage options whose repr shows secret values as ``<redacted>``."""

    def __repr__(self) -> str:
        return repr(redact(self))

    def __reduce__(self):  # pickles as a plain dict would, keeping the class
        return (StorageOptions, (dict(self),))


def task_options(store_url: str, options: Mapping[str, Any]) -> dict:
    """The options of a task's store: ``options`` (from its spec, no secrets) plus the
    secret options of this machine's config file (``FLOR_CONFIG``) when it names the
    same store or none."""
    from ..config import load_settings

    try:
        settings = load_settings()
    except Exception:  # noqa: BLE001 - a broken config on a worker: the environment's credentials only
        return dict(options)
    if not settings.storage_options:
        return dict(options)
    if settings.store is not None and layout.store_url(settings.store) != store_url:
        return dict(options)
    return _merge(options, _secrets_only(settings.storage_options))

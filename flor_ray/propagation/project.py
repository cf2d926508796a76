"""Propagation over a whole project: today's tree against an old version's tree.

Training code is rarely one file: a statement may sit in ``model.py``'s ``forward``
or a ``data.py`` helper. Every Python file of today's tree that logs a name its
old counterpart does not is propagated into that counterpart: the file of the same
path, else the old file that today's one was renamed from (git's rule: the most
similar old file that today's tree no longer has, at least half similar), else the
file is refused with the reason. Trees are mappings ``path -> text``, so the same
code serves the command line (two directories) and the planner (versions read from
the store).
"""

from __future__ import annotations

import ast
import difflib
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from flor_ray.analysis.calls import FlorCalls
from flor_ray.errors import PropagationError

from ._propagate import propagate_detailed
from ._result import PropagationResult

__all__ = ["FilePatch", "logged_names", "pair_files", "propagate_project", "unified_diff"]

#: git's default rename threshold: a file at least half similar to a vanished one
#: is the same file renamed
RENAME_SIMILARITY = 0.5


@dataclass(frozen=True)
class FilePatch:
    """One file of today's tree with new statements, and what became of them."""

    path: str  # in today's tree
    target: str | None  # its counterpart in the old tree
    pairing: str  # "same path", "renamed from ... (similarity 0.83)" or why there is none
    new_names: tuple[str, ...]  # names today's file logs that the counterpart does not
    result: PropagationResult | None = None
    refused: str | None = None  # why nothing of this file could be propagated


def logged_names(code: str) -> tuple[str, ...]:
    """Literal names of the ``flor.log`` calls of a file (any spelling of the import)."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return ()
    syntax = FlorCalls.of(tree)
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and syntax.is_log_call(node) and node.args \
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            names.append(node.args[0].value)
    return tuple(dict.fromkeys(names))


def _similarity(a: str, b: str) -> float:
    return difflib.SequenceMatcher(None, a.splitlines(), b.splitlines(), autojunk=False).ratio()


def pair_files(today: Mapping[str, str], old: Mapping[str, str], paths: Iterable[str]) -> dict[str, tuple[str | None, str]]:
    """For each of ``paths`` (today's): its old counterpart and how it was found."""
    vanished = [p for p in old if p not in today and p.endswith(".py")]
    out: dict[str, tuple[str | None, str]] = {}
    for path in paths:
        if path in old:
            out[path] = (path, "same path")
            continue
        scored = sorted(((_similarity(today[path], old[p]), p) for p in vanished), reverse=True)
        if scored and scored[0][0] >= RENAME_SIMILARITY and (len(scored) < 2 or scored[1][0] < scored[0][0]):
            score, was = scored[0]
            out[path] = (was, f"renamed from {was} (similarity {score:.2f})")
        elif scored and scored[0][0] >= RENAME_SIMILARITY:
            tied = ", ".join(p for s, p in scored if s == scored[0][0])
            out[path] = (None, f"no file {path} in the old version, and {tied} are equally similar to it")
        else:
            out[path] = (None, f"no file {path} in the old version, and none similar enough to be its old name")
    return out


def propagate_project(today: Mapping[str, str], old: Mapping[str, str], names: Iterable[str] | None = None,
                      logged: Mapping[str, Sequence[str]] | None = None) -> tuple[FilePatch, ...]:
    """Propagate every file of ``today`` holding new statements into its counterpart.

    ``logged``: the names each of today's files logs, where the caller has them
    already (the planner propagates the same files into every version)."""
    wanted = None if names is None else set(names)
    candidates: dict[str, tuple[str, ...]] = {}
    for path, code in sorted(today.items()):
        if not path.endswith(".py"):
            continue
        mine = [n for n in (logged[path] if logged is not None else logged_names(code))
                if wanted is None or n in wanted]
        if mine:
            candidates[path] = tuple(mine)
    pairs = pair_files(today, old, candidates)
    patches = []
    for path, mine in candidates.items():
        target, pairing = pairs[path]
        new = tuple(n for n in mine if target is None or n not in logged_names(old[target]))
        if not new:
            continue
        if target is None:
            patches.append(FilePatch(path, None, pairing, new, refused=pairing))
            continue
        try:  # one statement that cannot be placed costs only its own names
            result = propagate_detailed(today[path], old[target], new, partial=True)
        except PropagationError as exc:  # the file itself: not Python, say
            patches.append(FilePatch(path, target, pairing, new, refused=str(exc)))
            continue
        patches.append(FilePatch(path, target, pairing, new, result=result))
    return tuple(patches)


def unified_diff(old: str, new: str, path: str) -> str:
    """The patch as people review it: ``--- a/path`` / ``+++ b/path``."""
    return "".join(difflib.unified_diff(old.splitlines(keepends=True), new.splitlines(keepends=True),
                                        fromfile=f"a/{path}", tofile=f"b/{path}"))

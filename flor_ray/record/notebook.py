"""Recording from IPython / Jupyter: the kernel's executed cells as the run's code.

A kernel has no script file: the code lives in IPython's history, one transformed
cell per execution (``In[n]``, magics already turned into ``get_ipython()`` calls).
A notebook run's code version is the repository snapshot plus one reserved file,
``<kernel's directory>/.flor_notebook_<notebook>.py``: every cell the kernel ran,
in the order it ran them, each under a ``# %% In[n]`` marker. A replay runs that
file as a script from the same directory (so ``from model import Net`` resolves as
it did in the kernel), and propagation treats it as any other file.

What a plain Python process cannot run makes the run *refused* for replay, with the
reason (``replay_refused`` in its metadata, shown by ``plan.explain()``): an IPython
magic or ``!`` shell line other than display settings, a cell that reads a name no
earlier cell defines (the kernel had it from elsewhere: a startup file, an execution
kept out of the history, ``Out``/``_`` and the other names IPython injects), a cell
that raised or was interrupted while a kernel-session run was recording. A cell that
did not compile ran nothing and is kept as comments.

Nothing here imports IPython: the shell is found through ``sys.modules``, so a
script that is not in a kernel pays nothing.
"""

from __future__ import annotations

import ast
import builtins
import os
import re
import symtable
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

__all__ = ["kernel_shell", "NotebookPlace", "CellsScript", "CellsRecorder", "locate", "render", "display",
           "SCRIPT_PREFIX"]

#: the recorded cells' file name starts with this (then the notebook's name and .py)
SCRIPT_PREFIX = ".flor_notebook_"
#: line magics that only change what the kernel displays: a replay leaves them out
DISPLAY_MAGICS = frozenset({"matplotlib", "config", "precision", "pprint", "who", "whos", "pwd", "history",
                            "lsmagic", "pinfo", "pinfo2", "psearch", "pdoc", "pdef", "psource"})
#: names IPython puts in the user's namespace or builtins; a plain Python script has none
IPYTHON_NAMES = frozenset({"get_ipython", "In", "Out", "_ih", "_oh", "_dh", "_i", "_ii", "_iii", "_", "__", "___",
                           "exit", "quit", "__IPYTHON__", "__session__", "__vsc_ipynb_file__"})
_IPY_NUMBERED = re.compile(r"_i{0,3}\d+$")
_MODULE_NAMES = frozenset({"__name__", "__doc__", "__builtins__", "__spec__", "__loader__", "__package__",
                           "__annotations__"})
_BUILTINS = (frozenset(dir(builtins)) | _MODULE_NAMES) - IPYTHON_NAMES - {"display"}
#: the methods that transformed cells call for ``%magic``, ``%%magic`` and ``!cmd``
_MAGIC_CALLS = {"run_line_magic": "%", "run_cell_magic": "%%", "system": "!", "getoutput": "!", "magic": "%"}
#: how many refusal reasons a run's metadata lists (then a count)
REASONS_LISTED = 3


def display(*objs: Any, **kwargs: Any) -> None:
    """IPython's ``display()`` where no kernel runs (a replay of recorded cells): nothing to show."""


def kernel_shell() -> Any:
    """IPython's running shell (a Jupyter kernel or the ``ipython`` REPL) when the code
    runs in its cells, else None: a script under ``%run`` or ``ipython script.py`` has
    its ``__main__.__file__`` and is recorded as a script. Never imports IPython: only a
    process that has it loaded can be running cells."""
    if getattr(sys.modules.get("__main__"), "__file__", None):
        return None
    mod = sys.modules.get("IPython")
    get = getattr(mod, "get_ipython", None)
    shell = get() if get is not None else None
    return shell if shell is not None and hasattr(shell, "history_manager") else None


@dataclass(frozen=True)
class NotebookPlace:
    """Where a kernel records: its repository, its directory in it, the cells' file, the notebook."""

    repo_root: str
    script: str  # the cells' file, relative to the repository
    notebook: str | None  # the notebook's path as the front end told the kernel, when it did


def notebook_path(shell: Any) -> str | None:
    """The notebook's path: Jupyter server's ``JPY_SESSION_NAME``, else VS Code's
    ``__vsc_ipynb_file__`` or the ``__session__`` a kernel was given."""
    ns = getattr(shell, "user_ns", None) or {}
    for found in (os.environ.get("JPY_SESSION_NAME"), ns.get("__vsc_ipynb_file__"), ns.get("__session__")):
        if isinstance(found, str) and found:
            return found
    return None


def locate(shell: Any) -> NotebookPlace:
    """The kernel's repository (around its working directory) and the cells' file."""
    from ..versions import find_repo_root

    cwd = Path(os.getcwd()).resolve()
    root = find_repo_root(cwd)
    nb = notebook_path(shell)
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(nb).stem) if nb else "kernel"
    rel = (cwd / f"{SCRIPT_PREFIX}{stem}.py").relative_to(root).as_posix()
    return NotebookPlace(root, rel, nb)


@dataclass(frozen=True)
class CellsScript:
    """The executed cells as one script, and why a replay cannot run it (empty: it can)."""

    text: str
    cells: tuple[int, ...]  # their execution numbers
    refused: tuple[str, ...] = ()

    @property
    def refusal(self) -> str | None:
        """The reasons as one line for the run's metadata, None when replayable."""
        if not self.refused:
            return None
        more = len(self.refused) - REASONS_LISTED
        return "; ".join(self.refused[:REASONS_LISTED]) + (f"; and {more} more" if more > 0 else "")


def _magic_of(node: ast.AST) -> tuple[str, str] | None:
    """(kind, name) when ``node`` calls IPython for a magic or a shell line: ``%``, ``%%`` or ``!``."""
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
        return None
    inner = node.func.value
    if not (isinstance(inner, ast.Call) and isinstance(inner.func, ast.Name) and inner.func.id == "get_ipython"):
        return None
    kind = _MAGIC_CALLS.get(node.func.attr)
    if kind is None:
        return None
    first = node.args[0] if node.args else None
    name = first.value if isinstance(first, ast.Constant) and isinstance(first.value, str) else "?"
    return kind, (name.split()[0] if kind != "!" and name.strip() else name.strip())


def _module_bindings(stmt: ast.stmt) -> tuple[set[str], bool]:
    """The module-level names a top-level statement binds (not those of nested scopes),
    and whether it star-imports (then any name may be bound)."""
    bound: set[str] = set()
    star = False
    todo: list[ast.AST] = [stmt]
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
            todo.extend(node.decorator_list)
            continue
        if isinstance(node, (ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            continue
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            bound.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for a in node.names:
                star |= a.name == "*"
                bound.add(a.asname or a.name.split(".")[0])
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
        elif isinstance(node, (ast.MatchAs, ast.MatchStar)) and node.name:
            bound.add(node.name)
        todo.extend(ast.iter_child_nodes(node))
    return bound, star


def _module_reads(stmt: ast.stmt) -> list[ast.Name]:
    """Names a top-level statement reads at module level (nested scopes left out)."""
    out: list[ast.Name] = []
    todo: list[ast.AST] = [stmt]
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):  # what runs at the def itself
            todo += [*node.decorator_list, *node.args.defaults, *(d for d in node.args.kw_defaults if d)]
            continue
        if isinstance(node, ast.ClassDef):
            todo += [*node.decorator_list, *node.bases, *(k.value for k in node.keywords)]
            continue
        if isinstance(node, (ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            continue
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            out.append(node)
        todo.extend(ast.iter_child_nodes(node))
    return out


def _scope_reads(text: str) -> tuple[set[str], set[str]]:
    """(globals read inside functions, classes and comprehensions; module names they bind
    through ``global``) of one cell, from Python's own symbol tables."""
    reads: set[str] = set()
    binds: set[str] = set()
    todo = list(symtable.symtable(text, "<cell>", "exec").get_children())
    while todo:
        table = todo.pop()
        for sym in table.get_symbols():
            if sym.is_global() and sym.is_referenced():
                reads.add(sym.get_name())
            if sym.is_declared_global() and sym.is_assigned():
                binds.add(sym.get_name())
        todo.extend(table.get_children())
    return reads, binds


def _ipython_name(name: str) -> bool:
    return name in IPYTHON_NAMES or bool(_IPY_NUMBERED.match(name))


@dataclass(frozen=True)
class _Cell:
    number: int
    source: str
    tree: ast.Module | None  # None: it did not compile


def _check_names(cells: list[_Cell]) -> tuple[list[str], bool]:
    """Reasons for reads of names that no earlier cell defines; whether ``display`` is read."""
    reasons: list[str] = []
    bound: set[str] = set()
    star = False
    late_reads: list[tuple[int, str]] = []  # (cell, name) read inside functions: checked at the end
    uses_display = False
    for cell in cells:
        if cell.tree is None:
            continue
        scope_reads, scope_binds = _scope_reads(cell.source)
        bound |= scope_binds
        late_reads += [(cell.number, n) for n in sorted(scope_reads)]
        for stmt in cell.tree.body:
            names, stars = _module_bindings(stmt)
            star |= stars
            for node in _module_reads(stmt):
                n = node.id
                if n == "get_ipython":  # its calls are checked as magics
                    continue
                if n == "display" and n not in bound and n not in names:
                    uses_display = True
                elif not (n in bound or n in names or n in _BUILTINS or star):
                    reasons.append(_unknown_name(cell.number, node.lineno, n))
            bound |= names
    for number, n in late_reads:
        if n == "get_ipython":
            continue
        if n == "display" and n not in bound:
            uses_display = True
        elif not (n in bound or n in _BUILTINS or star):
            reasons.append(_unknown_name(number, None, n))
    return list(dict.fromkeys(reasons)), uses_display


def _unknown_name(cell: int, line: int | None, name: str) -> str:
    where = f"cell In[{cell}]" + (f" line {line}" if line else "")
    if _ipython_name(name):
        return (f"{where} reads {name!r}, which IPython provides and a replayed script does not have; "
                "use your own variables")
    return (f"{where} reads {name!r}, which no earlier recorded cell defines (the kernel had it from elsewhere: "
            "a startup file, an execution kept out of the history, %run); define it in a cell, restart the "
            "kernel and record again")


def _lines_without_magics(cell: _Cell, reasons: list[str]) -> list[str]:
    """The cell's lines, display magics turned into ``pass``; other magics added to ``reasons``."""
    lines = cell.source.splitlines()
    if cell.tree is None:
        return ["# (did not compile: it ran nothing) " + ln for ln in lines]
    for node in ast.walk(cell.tree):
        if not isinstance(node, ast.stmt):
            continue
        found = next((m for m in map(_magic_of, ast.walk(node)) if m), None) if isinstance(node, ast.Expr) else None
        if found and found[0] == "%" and found[1] in DISPLAY_MAGICS and _magic_of(node.value):
            first, last = node.lineno - 1, (node.end_lineno or node.lineno) - 1
            indent = lines[first][: len(lines[first]) - len(lines[first].lstrip())]
            lines[first] = f"{indent}pass  # %{found[1]}: changes only what the kernel shows, not replayed"
            for k in range(first + 1, last + 1):
                lines[k] = ""
    magic_shells = set()
    for node in ast.walk(cell.tree):
        found = _magic_of(node)
        if found:
            magic_shells.add(id(node.func.value))  # type: ignore[attr-defined]
        if found and not (found[0] == "%" and found[1] in DISPLAY_MAGICS):
            kind, name = found
            what = f"the shell command !{name}" if kind == "!" else f"the IPython magic {kind}{name}"
            reasons.append(f"cell In[{cell.number}] line {node.lineno} runs {what}, which a replay (the cells run "
                           "as a plain Python script) cannot run; do it outside the kernel, or in Python")
    for node in ast.walk(cell.tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "get_ipython"
                and id(node) not in magic_shells):
            reasons.append(f"cell In[{cell.number}] line {node.lineno} calls get_ipython(), the kernel's shell, "
                           "which a replayed script does not have")
    return lines


def render(history: Iterable[tuple[int, str]], notebook: str | None, extra_reasons: Iterable[str] = ()) -> CellsScript:
    """The cells (execution number, transformed source) as one script, with why a replay must refuse it."""
    cells = []
    for number, source in history:
        try:
            tree: ast.Module | None = ast.parse(source)
            symtable.symtable(source, "<cell>", "exec")
        except (SyntaxError, ValueError):
            tree = None
        cells.append(_Cell(number, source, tree))
    reasons: list[str] = []
    body: list[str] = []
    for cell in cells:
        body.append(f"# %% In[{cell.number}]")
        body += _lines_without_magics(cell, reasons)
        body.append("")
    name_reasons, uses_display = _check_names(cells)
    reasons += name_reasons + list(extra_reasons)
    head = [
        "# flor_ray: the cells this notebook's kernel ran, in the order it ran them: the code of a notebook run.",
        f"# notebook: {notebook or 'unknown (the front end did not say)'}",
        "# A replay runs this file as a script, in the directory the kernel ran in.",
    ]
    if uses_display:
        head.append("from flor_ray.record.notebook import display  # IPython's display(): nothing to show in a replay")
    text = "\n".join(head + [""] + body).rstrip() + "\n"
    return CellsScript(text, tuple(c.number for c in cells), tuple(dict.fromkeys(reasons)))


class CellsRecorder:
    """The cells of one kernel as a run's code; for a kernel-session run, the cells it
    goes on running (and those that raised while it recorded, which a replay cannot
    reproduce) until it ends."""

    def __init__(self, shell: Any, place: NotebookPlace, follow: bool):
        self.shell, self.place, self.follow = shell, place, follow
        self.errors: list[str] = []
        self.on_cell_end: Any = None  # the session's refresh, called after each cell
        self._rendered = 0
        self._dirty = False  # a cell raised since the last script()
        self._hooked = False
        if follow:
            shell.events.register("post_run_cell", self._after_cell)
            self._hooked = True

    def _history(self) -> list[tuple[int, str]]:
        hist = self.shell.history_manager.input_hist_parsed
        return [(n, hist[n]) for n in range(1, len(hist))]

    def script(self) -> CellsScript:
        hist = self._history()
        self._rendered, self._dirty = len(hist), False
        return render(hist, self.place.notebook, self.errors)

    def grew(self) -> bool:
        """Whether the kernel ran cells (or one raised) since the last :meth:`script`."""
        return len(self.shell.history_manager.input_hist_parsed) - 1 != self._rendered or self._dirty

    def _after_cell(self, result: Any) -> None:
        err = getattr(result, "error_in_exec", None)
        if err is not None:
            n = getattr(result, "execution_count", None)
            self.errors.append(f"cell In[{n}] raised {type(err).__name__} while the run recorded; a replay runs "
                               "every cell to its end, so it cannot stop where the kernel did")
            self._dirty = True
        if self.on_cell_end is not None:
            self.on_cell_end()

    def close(self) -> None:
        if self._hooked:
            self._hooked = False
            try:
                self.shell.events.unregister("post_run_cell", self._after_cell)
            except ValueError:
                pass

"""Propagation judged on code nobody here wrote: the git history of public training
scripts (a bare mirror given by its path; nothing of it is committed here).

For each file of :data:`PROBES`, today's version (the newest in the mirror) gets the
probe statements, each right after an anchor line; every older version of the file
(each distinct content in ``git log --follow``) is a target. Since none of those
versions imported flor_ray, each gets ``import flor_ray as flor`` after its imports,
as a flor_ray user's copy would have. Each probe is propagated alone and all
together, and every outcome is judged by rules that do not use the propagation's
own matching:

* *placed right*: the output parses, keeps every line of the target in order, and
  the statement sits in the function of today's name (when the target has it), under
  as many loops as today (at least as many where today's function was inlined at its
  call site), right after the statement a careful engineer would put it after (each
  probe's ``expect``: ``val_loss = evaluate(...)`` however the old version spells it);
* *placed wrong*: any of those fails;
* *refused*: a PropagationError that names the probe.

"The old version computes the value" means that it has the ``expect`` statement and
binds every name the probe reads in the function of today's name (or the module).
The targets: no statement placed wrong; at least 90% placed right where the old
version computes the value.
"""

from __future__ import annotations

import ast
import builtins
import difflib
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flor_ray.propagation import PropagationError, propagate_detailed  # noqa: E402


@dataclass(frozen=True)
class Probe:
    name: str
    anchor: str  # regex of the line of today's version the statement goes after
    statement: str  # at the anchor's indentation
    # regex (searched in its source text) of the statement that a careful engineer
    # puts it right after in an old version
    expect: str


# Statements a user of these scripts would add, at the place a careful engineer would.
PROBES: dict[str, tuple[Probe, ...]] = {
    "mnist/main.py": (
        Probe("loss", r"^\s*loss\.backward\(\)", 'flor.log("loss", loss.item())', expect=r"^loss\.backward\(\)"),
        Probe("test_loss", r"^\s*test_loss /= len\(test_loader\.dataset\)", 'flor.log("test_loss", test_loss)',
              expect=r"^test_loss\s*(/=|=\s*test_loss\s*/)"),
        Probe("test_acc", r"^\s*test_loss /= len\(test_loader\.dataset\)",
              'flor.log("test_acc", correct / len(test_loader.dataset))',
              # reads only `correct`: right anywhere after the loop that counts it
              expect=r"^(test_loss\s*(/=|=\s*test_loss\s*/)|for .* in test_loader|with torch\.no_grad\(\))"),
    ),
    "word_language_model/main.py": (
        Probe("loss", r"^\s*loss\.backward\(\)", 'flor.log("loss", loss.item())', expect=r"^loss\.backward\(\)"),
        Probe("cur_loss", r"^\s*cur_loss = total_loss / args\.log_interval", 'flor.log("cur_loss", cur_loss)',
              expect=r"^cur_loss = "),
        Probe("lr", r"^\s*epoch_start_time = time\.time\(\)", 'flor.log("lr", lr)',
              expect=r"epoch_start_time = time\.time\(\)"),
        Probe("val_loss", r"^\s*val_loss = evaluate\(val_data\)", 'flor.log("val_loss", val_loss)',
              expect=r"^val_loss = evaluate\("),
        Probe("test_loss", r"^\s*test_loss = evaluate\(test_data\)", 'flor.log("test_loss", test_loss)',
              expect=r"^test_loss = evaluate\("),
    ),
    "imagenet/main.py": (
        Probe("acc1", r"^\s*acc1 = validate\(val_loader", 'flor.log("acc1", acc1)', expect=r"^(acc1|prec1) = validate\("),
        Probe("best_acc1", r"^\s*best_acc1 = max\(acc1, best_acc1\)", 'flor.log("best_acc1", best_acc1)',
              expect=r"^best_(acc1|prec1) = max\("),
        Probe("train_loss", r"^\s*loss = criterion\(output, target\)", 'flor.log("train_loss", loss.item())',
              expect=r"^loss = criterion\("),
    ),
}

_BUILTINS = frozenset(dir(builtins))


def git(mirror: str, *args: str) -> str:
    return subprocess.run(["git", "--git-dir", mirror, *args], check=True, capture_output=True,
                          text=True, errors="replace").stdout


def history(mirror: str, path: str) -> list[tuple[str, str, str]]:
    """(commit, path then, content) of each distinct version, newest first."""
    out = git(mirror, "log", "--follow", "--name-only", "--format=@%H", "--", path)
    seen: set[str] = set()
    versions = []
    commit = None
    for line in out.splitlines():
        if line.startswith("@"):
            commit = line[1:]
        elif line.strip() and commit:
            try:
                text = git(mirror, "show", f"{commit}:{line.strip()}")
            except subprocess.CalledProcessError:
                continue  # deleted in that commit
            if text not in seen:
                seen.add(text)
                versions.append((commit, line.strip(), text))
    return versions


def with_flor(code: str) -> str:
    """``code`` with ``import flor_ray as flor`` after its leading imports."""
    tree = ast.parse(code)
    last = 0
    for stmt in tree.body:
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            last = stmt.end_lineno or stmt.lineno
        elif not (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)):
            break
    lines = code.splitlines(keepends=True)
    return "".join(lines[:last]) + "import flor_ray as flor\n" + "".join(lines[last:])


def with_probes(code: str, probes: tuple[Probe, ...]) -> str:
    lines = code.splitlines(keepends=True)
    for probe in reversed(probes):  # bottom-up keeps earlier anchors' line numbers
        at = next(i for i, line in enumerate(lines) if re.search(probe.anchor, line))
        indent = re.match(r"\s*", lines[at]).group(0)
        end = _statement_end(code, at + 1)
        lines.insert(end, f"{indent}{probe.statement}\n")
    return "".join(lines)


def _statement_end(code: str, line: int) -> int:
    """0-based index of the line after the statement that starts on 1-based ``line``."""
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.stmt) and node.lineno == line:
            return node.end_lineno or line
    return line


# --------------------------------------------------------------------------- judging


@dataclass
class Site:
    """Where a probe's statement sits in a file."""

    function: str  # enclosing def name, "<module>" at top level
    loops: int  # enclosing for/while statements within that function
    block: list  # the statements of its block
    index: int  # its position there
    reads: set = field(default_factory=set)


def find_site(tree: ast.Module, name: str) -> Site | None:
    def walk(body: list, function: str, loops: int) -> Site | None:
        for i, stmt in enumerate(body):
            if isinstance(stmt, ast.Expr) and _logs(stmt) == name:
                reads = {n.id for n in ast.walk(stmt) if isinstance(n, ast.Name)} - {"flor"} - _BUILTINS
                return Site(function, loops, body, i, reads)
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inner = (stmt.name, 0)
            else:
                inner = (function, loops + isinstance(stmt, (ast.For, ast.AsyncFor, ast.While)))
            for block in _blocks(stmt):
                found = walk(block, *inner)
                if found:
                    return found
        return None

    return walk(tree.body, "<module>", 0)


def _blocks(stmt: ast.stmt) -> list[list]:
    out = [getattr(stmt, f) for f in ("body", "orelse", "finalbody")
           if isinstance(getattr(stmt, f, None), list)]
    out += [h.body for h in getattr(stmt, "handlers", ())]
    out += [c.body for c in getattr(stmt, "cases", ())]
    return out


def _logs(stmt: ast.stmt) -> str | None:
    call = stmt.value if isinstance(stmt, ast.Expr) else None
    if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr == "log" \
            and call.args and isinstance(call.args[0], ast.Constant):
        return call.args[0].value
    return None


def _bound_in(scope: ast.AST) -> set[str]:
    """Parameters and every name bound anywhere in ``scope``."""
    names: set[str] = set()
    if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef)):
        names |= {a.arg for a in ast.walk(scope.args) if isinstance(a, ast.arg)}
    for node in ast.walk(scope):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, ast.Global):
            names |= set(node.names)
    return names


def _module_names(tree: ast.Module) -> set[str]:
    """Names bound at module level (not inside its functions)."""
    names: set[str] = set()
    for stmt in tree.body:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(stmt.name)
        else:
            names |= _bound_in(ast.Module(body=[stmt], type_ignores=[]))
    return names


def computes(target: str, probe: Probe, today: Site) -> bool:
    """The old version has the statement the probe goes after, and every name it reads
    is bound in the function of today's name (or, without one, anywhere)."""
    if not any(re.search(probe.expect, line.strip()) for line in target.splitlines()):
        return False
    tree = ast.parse(target)
    fn = next((n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
               and n.name == today.function), None)
    return today.reads <= _bound_in(fn if fn is not None else tree) | _module_names(tree)


def judge(target: str, output: str, tree_out: ast.Module, today: Site, probe: Probe) -> str | None:
    """None when placed right, else why it is wrong."""
    t_lines, o_lines = target.splitlines(), output.splitlines()
    ops = difflib.SequenceMatcher(None, t_lines, o_lines, autojunk=False).get_opcodes()
    if any(tag not in ("equal", "insert") for tag, *_ in ops):
        return "a line of the target was changed or lost"
    site = find_site(tree_out, probe.name)
    if site is None:
        return "the statement is not in the output"
    has_fn = today.function == "<module>" or any(
        isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == today.function
        for n in ast.walk(tree_out))
    if has_fn and site.function != today.function:
        return f"in {site.function}(), today in {today.function}()"
    # where today's function is gone, its body was inlined at the call site, in loops of its own
    if site.loops < today.loops or (has_fn and site.loops != today.loops):
        return f"under {site.loops} loops, today {today.loops}"
    before = [s for s in site.block[:site.index] if _logs(s) is None or _logs(s) not in PROBE_NAMES]
    if not before:
        return "first in its block, not after the statement that computes its input"
    prev = o_lines[before[-1].lineno - 1].strip()
    if not re.search(probe.expect, prev):
        return f"after `{prev[:60]}`, not after /{probe.expect}/"
    return None


PROBE_NAMES = frozenset(p.name for ps in PROBES.values() for p in ps)


@dataclass
class FileReport:
    path: str
    versions: int = 0
    unparsable: int = 0
    right: int = 0
    refused: int = 0
    refused_computed: int = 0
    computed: int = 0
    wrong: list = field(default_factory=list)
    alone_differs: list = field(default_factory=list)
    refusals: list = field(default_factory=list)  # where the old version computes the value


def run_file(mirror: str, path: str, probes: tuple[Probe, ...], limit: int | None = None) -> FileReport:
    versions = history(mirror, path)
    today_text = with_probes(with_flor(versions[0][2]), probes)
    today_tree = ast.parse(today_text)
    sites = {p.name: find_site(today_tree, p.name) for p in probes}
    report = FileReport(path)
    for commit, old_path, text in versions[1:limit and limit + 1]:
        try:
            target = with_flor(text)
        except SyntaxError:
            report.unparsable += 1
            continue
        report.versions += 1
        together = _outcomes(today_text, target, [p.name for p in probes])
        for probe in probes:
            alone = _outcomes(with_probes(with_flor(versions[0][2]), (probe,)), target, [probe.name])
            verdict = _verdict(target, alone[probe.name], sites[probe.name], probe)
            if _verdict(target, together[probe.name], sites[probe.name], probe) != verdict:
                report.alone_differs.append((commit[:10], probe.name))
            computed = verdict == "right" or computes(target, probe, sites[probe.name])
            report.computed += computed
            if verdict == "refused":
                report.refused += 1
                report.refused_computed += computed
                if computed:
                    report.refusals.append((commit[:10], probe.name, str(alone[probe.name])[:300]))
            elif verdict == "right":
                report.right += 1
            else:
                report.wrong.append((commit[:10], old_path, probe.name, verdict))
    return report


def _outcomes(source: str, target: str, names: list[str]) -> dict[str, object]:
    """name -> (output, tree) or the refusal's message."""
    try:
        res = propagate_detailed(source, target)
    except PropagationError as exc:
        failures = getattr(exc, "failures", (str(exc),))
        out = {}
        for n in names:
            out[n] = next((f for f in failures if f"'{n}'" in f), None)
        if all(v is None for v in out.values()):
            out = {n: str(exc) for n in names}
        placed = [n for n, v in out.items() if v is None]
        if placed:  # the others were refused: the placed ones are judged alone
            for n in placed:
                out[n] = _outcomes(_drop(source, set(names) - {n}), target, [n])[n]
        return out
    tree = ast.parse(res.code)
    return {n: (res.code, tree) for n in names}


def _drop(source: str, names: set[str]) -> str:
    lines = source.splitlines(keepends=True)
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Expr) and _logs(node) in names:
            lines[node.lineno - 1] = ""
    return "".join(lines)


def _verdict(target: str, outcome: object, today: Site, probe: Probe) -> str:
    if isinstance(outcome, str):
        return "refused"
    code, tree = outcome  # type: ignore[misc]
    why = judge(target, code, tree, today, probe)
    return "right" if why is None else why


def run(mirror: str, limit: int | None = None) -> list[FileReport]:
    return [run_file(mirror, path, probes, limit) for path, probes in PROBES.items()]


def summary(reports: list[FileReport]) -> dict:
    rows = []
    for r in reports:
        rows.append({
            "file": r.path, "versions": r.versions, "unparsable": r.unparsable,
            "statements": r.right + r.refused + len(r.wrong), "placed_right": r.right, "refused": r.refused,
            "placed_wrong": len(r.wrong), "computed": r.computed,
            "right_where_computed": r.right / r.computed if r.computed else None,
            "refused_where_computed": r.refused_computed,
            "wrong": [list(w) for w in r.wrong], "refusals": [list(x) for x in r.refusals],
            "alone_differs": [list(a) for a in r.alone_differs],
        })
    computed = sum(r.computed for r in reports)
    right = sum(r.right for r in reports)
    return {
        "files": rows,
        "placed_wrong": sum(len(r.wrong) for r in reports),
        "right_where_computed": right / computed if computed else None,
        "alone_differs": sum(len(r.alone_differs) for r in reports),
    }


if __name__ == "__main__":  # python benchmarks/field_corpus.py MIRROR [LIMIT]
    import json

    print(json.dumps(summary(run(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else None)), indent=1))

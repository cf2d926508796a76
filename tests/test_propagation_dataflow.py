"""Placement by data flow: a statement goes where its inputs hold today's values, and
its place never depends on which other statements are propagated with it."""

from __future__ import annotations

import ast
import difflib
import textwrap
from pathlib import Path

import pytest

from flor_ray.propagation import PropagationError, propagate, propagate_detailed
from flor_ray.propagation._flow import changed_names

_HERE = Path(__file__).resolve().parent
_ROOTS = (_HERE.parent.parent / "shared" / "cases" / "propagation", _HERE / "propagation_cases")
_CASES = sorted(p for root in _ROOTS if root.is_dir() for p in root.iterdir() if (p / "expected.py").is_file())


def d(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def _log_names(stmt: ast.stmt) -> list[str]:
    return [c.args[0].value for c in ast.walk(stmt)
            if isinstance(c, ast.Call) and isinstance(c.func, ast.Attribute) and c.func.attr == "log"
            and c.args and isinstance(c.args[0], ast.Constant)]


def _only(source: str, keep: str, new: set[str]) -> str:
    """``source`` without the new log statements other than ``keep``'s."""
    tree = ast.parse(source)
    lines = source.splitlines(True)
    blocks = {id(s): block for node in ast.walk(tree) for f in ("body", "orelse", "finalbody")
              if isinstance(block := getattr(node, f, None), list) for s in block}
    for node in ast.walk(tree):
        if isinstance(node, ast.Expr) and any(n in new and n != keep for n in _log_names(node)):
            indent = lines[node.lineno - 1][: node.col_offset]
            for k in range(node.lineno - 1, node.end_lineno or node.lineno):
                lines[k] = ""
            if len(blocks.get(id(node), ())) < 2:  # the block would be empty
                lines[node.lineno - 1] = indent + "pass\n"
    return "".join(lines)


def _insert_points(target: str, out: str) -> dict[str, list[int]]:
    """Inserted line (stripped) -> the target line indices it was inserted before."""
    t, o = target.splitlines(), out.splitlines()
    points: dict[str, list[int]] = {}
    for tag, i1, _, j1, j2 in difflib.SequenceMatcher(None, t, o, autojunk=False).get_opcodes():
        if tag == "insert":
            for j in range(j1, j2):
                points.setdefault(o[j].strip(), []).append(i1)
    return points


def test_each_statement_alone_goes_where_it_goes_with_the_others():
    checked = 0
    for case in _CASES:
        source, target = (case / "source.py").read_text(), (case / "target.py").read_text()
        together = propagate_detailed(source, target)
        new = {n for p in together.placements for n in p.names}
        if len(new) < 2:
            continue
        checked += 1
        points = _insert_points(target, together.code)
        for name in sorted(new):
            alone = propagate_detailed(_only(source, name, new), target)
            for line, where in _insert_points(target, alone.code).items():
                assert set(where) <= set(points.get(line, ())), (case.name, name, line, where)
    assert checked >= 10  # the case folders hold that many files with several new statements


OLD = d('''
    import flor_ray as flor
    from lib import evaluate, loader, model, opt, step

    val_loss = float("inf")
    for epoch in flor.loop("epoch", range(5)):
        for batch in flor.loop("step", loader):
            step(model, opt, batch)
        started = epoch * 2
        val_loss = evaluate(model, loader, full=True)
        print(epoch, val_loss)
''')


def test_input_bound_by_an_unmatched_call_goes_after_that_binding():
    new = d('''
        import flor_ray as flor
        from lib import loader, model, opt, run_eval, step

        for epoch in flor.loop("epoch", range(5)):
            for batch in flor.loop("step", loader):
                step(model, opt, batch)
            started = epoch * 2
            val_loss = run_eval(model, loader)
            flor.log("val_loss", val_loss)
            print(epoch, val_loss)
    ''')
    out = propagate(new, OLD)
    assert out.splitlines()[8:10] == [
        "    val_loss = evaluate(model, loader, full=True)",
        '    flor.log("val_loss", val_loss)',
    ]


def test_a_reset_after_the_use_stays_after_the_statement():
    old = d('''
        import flor_ray as flor
        from lib import batches, train_step

        running = 0.0
        for epoch in flor.loop("epoch", range(3)):
            for i, b in enumerate(flor.loop("step", batches)):
                running = running + train_step(b)
                if i % 100 == 99:
                    print("[%d] %.3f" % (i, running / 100))
                    running = 0.0
    ''')
    new = d('''
        import flor_ray as flor
        from lib import batches, train_step

        running = 0.0
        for epoch in flor.loop("epoch", range(3)):
            for i, b in enumerate(flor.loop("step", batches)):
                running += train_step(b)
                if i % 100 == 99:
                    flor.log("running_loss", running / 100)
                    print(f"[{i}] {running / 100:.3f}")
                    running = 0.0
    ''')
    lines = propagate(new, old).splitlines()
    at = lines.index('            flor.log("running_loss", running / 100)')
    assert lines[at + 1].strip().startswith("print(") and lines[at + 2].strip() == "running = 0.0"


def test_an_order_the_target_does_not_share_is_refused_with_the_lines():
    old = d('''
        import flor_ray as flor
        from lib import a, b, data

        for epoch in flor.loop("epoch", range(3)):
            x = b(data, 2)
            y = 1
            x = a(data, 1)
            print(x, y)
    ''')
    new = d('''
        import flor_ray as flor
        from lib import a, b, data

        for epoch in flor.loop("epoch", range(3)):
            x = a(data, 1)
            flor.log("x", x)
            y = 1
            x = b(data, 2)
            print(x, y)
    ''')
    with pytest.raises(PropagationError) as exc:
        propagate(new, old)
    msg = str(exc.value)
    assert "flor.log('x')" in msg and "lines 5, 7" in msg and "`x`" in msg


def test_changed_names_sees_nested_rebinding_and_in_place_mutation():
    tree = ast.parse(d('''
        for x, y in data:
            total += f(x)
            hist[y] = 1
            acc.add_(x)
            seen.append(y)
            model.eval()
            def inner():
                never = 1
    '''))
    assert changed_names(tuple(tree.body)) == {"x", "y", "total", "hist", "acc", "seen", "inner"}


def _field_history(tmp_path: Path) -> str:
    """A bare git history of one script in three versions, like a public repository's."""
    import subprocess

    work = tmp_path / "work"
    work.mkdir()

    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=work, check=True, capture_output=True)

    git("init", "-q", "-b", "main")
    git("config", "user.email", "dev@example.com")
    git("config", "user.name", "Dev")
    versions = [
        # oldest: the value is computed, spelled otherwise, and the matched neighbour
        # (`correct = 0`) comes before the loop that accumulates it
        '''import torch\n\ndef test(model, loader):\n    test_loss = 0\n    correct = 0\n'''
        '''    for x, y in loader:\n        out = model(x)\n        test_loss += float(out.sum())\n'''
        '''        correct += int((out.argmax(1) == y).sum())\n'''
        '''    test_loss = test_loss / len(loader)\n    print(test_loss, correct)\n''',
        # a version that never computes a test loss
        '''import torch\n\ndef test(model, loader):\n    correct = 0\n    for x, y in loader:\n'''
        '''        correct += int((model(x).argmax(1) == y).sum())\n    print(correct)\n''',
        # today
        '''import torch\n\ndef test(model, loader):\n    test_loss = 0\n    correct = 0\n'''
        '''    with torch.no_grad():\n        for x, y in loader:\n            out = model(x)\n'''
        '''            test_loss += out.sum().item()\n            correct += (out.argmax(1) == y).sum().item()\n'''
        '''    test_loss /= len(loader.dataset)\n    print(f"{test_loss:.4f} {correct}")\n''',
    ]
    for i, text in enumerate(versions):
        (work / "train.py").write_text(text)
        git("add", "train.py")
        git("commit", "-q", "-m", f"v{i}")
    bare = tmp_path / "mirror.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(bare)], check=True, capture_output=True)
    return str(bare)


def test_field_corpus_judges_each_version(tmp_path: Path):
    import sys

    sys.path.insert(0, str(_HERE.parent / "benchmarks"))
    try:
        from field_corpus import Probe, run_file
    finally:
        sys.path.pop(0)
    probe = Probe("test_loss", r"^\s*test_loss /= len\(loader\.dataset\)", 'flor.log("test_loss", test_loss)',
                  expect=r"^test_loss\s*(/=|=\s*test_loss\s*/)")
    report = run_file(_field_history(tmp_path), "train.py", (probe,))
    assert report.versions == 2
    assert report.wrong == []
    assert (report.right, report.computed) == (1, 1)  # placed after `test_loss = test_loss / ...`
    assert report.refused == 1 and report.refusals == []  # the version without a test loss

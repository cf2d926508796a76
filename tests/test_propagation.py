"""Propagation tests: before/after source strings, then the shared case folders."""

from __future__ import annotations

import ast
import io
import pickle
import textwrap
import tokenize
from pathlib import Path

import pytest

from flor_ray.errors import FlorError
from flor_ray.propagation import (
    Placed,
    PropagationError,
    PropagationResult,
    format_placements,
    propagate,
    propagate_detailed,
)


def d(code: str) -> str:
    return textwrap.dedent(code).lstrip("\n")


def same_ast(a: str, b: str) -> bool:
    return ast.dump(ast.parse(a)) == ast.dump(ast.parse(b))


def comments(code: str) -> list[str]:
    toks = tokenize.generate_tokens(io.StringIO(code).readline)
    return [t.string for t in toks if t.type == tokenize.COMMENT]


OLD = d('''
    import torch
    import flor_ray as flor

    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    with flor.checkpointing(model=model, optimizer=opt):
        for epoch in flor.loop("epoch", range(10)):
            model.train()
            for x, y in flor.loop("step", loader):
                opt.zero_grad()
                loss = crit(model(x), y)
                loss.backward()
                opt.step()
            acc = evaluate(model)
            flor.log("acc", acc)
''')


def with_lines(code: str, after: str, new: str) -> str:
    """``code`` with ``new`` (already indented) inserted after the line ``after``."""
    lines = code.splitlines(keepends=True)
    i = next(k for k, ln in enumerate(lines) if ln.strip() == after)
    return "".join(lines[:i + 1] + [new if new.endswith("\n") else new + "\n"] + lines[i + 1:])


# --------------------------------------------------------------------------- basics


def test_inserts_after_predecessor_in_step_loop():
    new = with_lines(OLD, "opt.step()", '            flor.log("loss", loss.item())')
    assert propagate(new, OLD) == new


def test_first_in_block_when_no_predecessor():
    new = with_lines(OLD, 'for x, y in flor.loop("step", loader):', '            flor.log("bs", len(x))')
    assert propagate(new, OLD) == new


def test_whole_new_if_block_is_the_unit():
    block = '            if epoch % 2 == 0:\n                flor.log("loss", loss.item())'
    new = with_lines(OLD, "opt.step()", block)
    res = propagate_detailed(new, OLD)
    assert res.code == new
    assert res.placements[0].statement.startswith("if epoch % 2 == 0:")
    assert res.placements[0].names == ("loss",)


def test_new_block_is_not_merged_into_an_unrelated_if():
    old = with_lines(OLD, "opt.step()", "            if x is None:\n                continue")
    new = with_lines(old, "continue", '            if epoch % 5 == 0:\n                flor.log("loss", loss.item())')
    out = propagate(new, old)
    assert same_ast(out, new)


def test_no_new_statement_returns_target_byte_identical():
    odd = OLD.replace("opt.step()", "opt.step( )   # keep   me").replace('"epoch"', "'epoch'")
    res = propagate_detailed(OLD, odd)
    assert res.code == odd and res.placements == () and res.skipped == ("acc",)


def test_name_logged_elsewhere_in_target_is_skipped():
    moved = OLD.replace('        flor.log("acc", acc)\n', "").replace(
        "opt.step()", 'opt.step()\n            flor.log("acc", 0)')
    assert propagate(OLD, moved) == moved


def test_comments_and_formatting_of_target_survive():
    old = OLD.replace("opt.step()", "opt.step()  # update\n            # after the update")
    old = old.replace("model = Net()", "model = Net( )   # the net")
    new = with_lines(OLD, "opt.step()", '            flor.log("loss", loss.item())  # new!')
    out = propagate(new, old)
    assert all(c in comments(out) for c in comments(old))
    assert "opt.step()  # update\n            flor.log(\"loss\", loss.item())  # new!\n            # after the update" in out
    assert "model = Net( )   # the net" in out


def test_comment_right_above_the_new_statement_comes_along():
    new = with_lines(OLD, "opt.step()", '            # per-step loss\n            flor.log("loss", loss.item())')
    assert propagate(new, OLD) == new


def test_consecutive_new_statements_keep_their_order():
    new = with_lines(OLD, "opt.step()", '            flor.log("a", 1)\n            flor.log("b", 2)\n            flor.log("c", 3)')
    res = propagate_detailed(new, OLD)
    assert res.code == new
    assert [p.names for p in res.placements] == [("a",), ("b",), ("c",)]
    assert [p.line for p in res.placements] == [15, 16, 17]


# --------------------------------------------------------------------------- details


def test_placement_details_line_loops_function():
    src = d('''
        import flor_ray as flor

        def train(model, loader):
            for epoch in flor.loop("epoch", range(3)):
                for batch in flor.loop("step", loader):
                    loss = model(batch)
                    flor.log("loss", loss)
                flor.log("done", epoch)
    ''')
    old = src.replace('            flor.log("loss", loss)\n', "").replace('        flor.log("done", epoch)\n', "")
    res = propagate_detailed(src, old)
    assert res.code == src
    loss, done = res.placements
    assert (loss.names, loss.line, loss.loops, loss.function) == (("loss",), 7, ("epoch", "step"), "train")
    assert (done.line, done.loops) == (8, ("epoch",))
    assert loss.statement == 'flor.log("loss", loss)'


def test_result_is_frozen_and_picklable():
    new = with_lines(OLD, "opt.step()", '            flor.log("loss", loss.item())')
    res = propagate_detailed(new, OLD)
    assert isinstance(res, PropagationResult) and isinstance(res.placements[0], Placed)
    assert pickle.loads(pickle.dumps(res)) == res
    with pytest.raises(AttributeError):
        res.code = ""  # type: ignore[misc]


def test_format_placements_renders_one_line_each():
    new = with_lines(OLD, "opt.step()", '            flor.log("loss", loss.item())')
    text = format_placements(propagate_detailed(new, OLD))
    assert text.splitlines()[0] == '+ line 15 [epoch > step] flor.log("loss", loss.item())'
    assert "'acc' already logged in target" in text


# --------------------------------------------------------------------------- drift


def test_reordered_neighbours():
    old = OLD.replace("            loss.backward()\n            opt.step()\n",
                      "            opt.step()\n            loss.backward()\n")
    assert old != OLD
    new = with_lines(OLD, "opt.step()", '            flor.log("loss", loss.item())')
    out = propagate(new, old)
    assert 'opt.step()\n            flor.log("loss", loss.item())\n            loss.backward()' in out


def test_extra_and_missing_neighbours():
    old = OLD.replace("opt.zero_grad()", "opt.zero_grad()\n            print('old only')")
    new = with_lines(OLD.replace("            loss.backward()\n", ""), "opt.step()",
                     '            sched.step()\n            flor.log("loss", loss.item())')
    out = propagate(new, old)
    # the predecessor (sched.step) is new, so it goes after the nearest matched one
    assert 'opt.step()\n            flor.log("loss", loss.item())' in out
    assert "sched.step()" not in out and "print('old only')" in out


def test_reformatted_target_takes_its_indentation():
    old = d("""
        import flor_ray as flor
        for epoch in flor.loop('epoch', range(3)):
          for x in flor.loop('step', data):
            y = f(x,
                  2)
            if y: print('big')
          z = g( y )
    """)
    new = d("""
        import flor_ray as flor

        for epoch in flor.loop("epoch", range(3)):
            for x in flor.loop("step", data):
                y = f(x, 2)
                if y > 100:
                    flor.log("y", y)
                if y:
                    print("big")
            z = g(y)
            flor.log("z", z)
    """)
    out = propagate(new, old)
    assert out == d("""
        import flor_ray as flor
        for epoch in flor.loop('epoch', range(3)):
          for x in flor.loop('step', data):
            y = f(x,
                  2)
            if y > 100:
              flor.log("y", y)
            if y: print('big')
          z = g( y )
          flor.log("z", z)
    """)


def test_renamed_variable_is_renamed_and_reported():
    new = with_lines(OLD, "opt.step()", '            flor.log("loss", loss.item())\n'
                     '            flor.log("wnorm", net.weight.norm().item())').replace("model", "net")
    res = propagate_detailed(new, OLD)
    assert 'flor.log("wnorm", model.weight.norm().item())' in res.code
    assert ("net", "model") in res.renames
    assert res.placements[1].renames == (("net", "model"),)
    assert "renamed net -> model" in format_placements(res)


def test_renamed_loop_variables():
    new = OLD.replace("for x, y in", "for inputs, targets in").replace("model(x), y", "model(inputs), targets")
    new = with_lines(new, "opt.step()", '            flor.log("n", len(inputs))')
    out = propagate(new, OLD)
    assert 'opt.step()\n            flor.log("n", len(x))' in out


def test_ambiguous_rename_raises():
    old = d('''
        import flor_ray as flor
        for epoch in flor.loop("epoch", range(3)):
            a = f(p)
            b = g(q)
    ''')
    new = d('''
        import flor_ray as flor
        for epoch in flor.loop("epoch", range(3)):
            a = f(x)
            b = g(x)
            flor.log("x", x.mean())
    ''')
    with pytest.raises(PropagationError, match="ambiguous") as exc:
        propagate(new, old)
    assert "'x'" in str(exc.value)


def test_loop_header_changed():
    old = OLD.replace('flor.loop("step", loader)', "loader").replace('flor.loop("epoch", range(10))', "range(n_epochs)")
    new = with_lines(OLD, "opt.step()", '            flor.log("loss", loss.item())')
    res = propagate_detailed(new, old)
    assert 'opt.step()\n            flor.log("loss", loss.item())' in res.code
    assert res.placements[0].loops == ()  # the old loops are not flor.loop loops


def test_code_moved_into_main_in_source():
    body = OLD.split("\n", 2)[2]  # drop the imports
    src = "import torch\nimport flor_ray as flor\n\n\ndef main():\n" + textwrap.indent(body, "    ")
    src += '\n\nif __name__ == "__main__":\n    main()\n'
    src = with_lines(src, "opt.step()", '                flor.log("loss", loss.item())')
    src = with_lines(src, 'flor.log("acc", acc)', '            flor.log("acc2", acc * 2)')
    out = propagate(src, OLD)
    expect = with_lines(OLD, "opt.step()", '            flor.log("loss", loss.item())')
    expect = with_lines(expect, 'flor.log("acc", acc)', '        flor.log("acc2", acc * 2)')
    assert out == expect


def test_code_moved_out_of_main_in_source():
    body = OLD.split("\n", 2)[2]
    old = "import torch\nimport flor_ray as flor\n\n\ndef main():\n" + textwrap.indent(body, "    ")
    old += '\n\nif __name__ == "__main__":\n    main()\n'
    new = with_lines(OLD, "opt.step()", '            flor.log("loss", loss.item())')
    res = propagate_detailed(new, old)
    assert with_lines(old, "opt.step()", '                flor.log("loss", loss.item())') == res.code
    assert res.placements[0].function == "main"


def test_train_step_extracted_in_source_inline_in_target():
    new = d('''
        import flor_ray as flor
        from utils import Net, crit, grad_norm, loader, make_opt

        def train_step(model, opt, x, y):
            opt.zero_grad()
            loss = crit(model(x), y)
            loss.backward()
            opt.step()
            flor.log("gnorm", grad_norm(model))
            return loss

        net = Net()
        opt = make_opt(net)
        for epoch in flor.loop("epoch", range(10)):
            for x, y in flor.loop("step", loader):
                loss = train_step(net, opt, x, y)
    ''')
    old = d('''
        import flor_ray as flor
        from utils import Net, crit, grad_norm, loader, make_opt

        net = Net()
        opt = make_opt(net)
        for epoch in flor.loop("epoch", range(10)):
            for x, y in flor.loop("step", loader):
                opt.zero_grad()
                loss = crit(net(x), y)
                loss.backward()
                opt.step()
    ''')
    res = propagate_detailed(new, old)
    assert res.code == old.replace("opt.step()", 'opt.step()\n        flor.log("gnorm", grad_norm(net))')
    assert res.renames == (("model", "net"),)


def test_alias_import_flor_ray_plain_and_from_import():
    old = OLD.replace("import flor_ray as flor", "import flor_ray").replace("flor.", "flor_ray.")
    new = with_lines(old, "opt.step()", '            flor_ray.log("loss", loss.item())')
    assert propagate(new, old) == new
    old2 = OLD.replace("import flor_ray as flor", "import flor_ray as flor\nfrom flor_ray import log")
    new2 = with_lines(old2, "opt.step()", '            log("loss", loss.item())')
    assert propagate(new2, old2) == new2


def test_alias_differs_between_versions():
    old = OLD.replace("import flor_ray as flor", "import flor_ray as fr").replace("flor.", "fr.")
    new = with_lines(OLD, "opt.step()", '            flor.log("loss", loss.item())')
    res = propagate_detailed(new, old)
    assert 'opt.step()\n            fr.log("loss", loss.item())' in res.code


def test_wrapped_log_replaces_its_old_statement():
    new = OLD.replace("loss = crit(model(x), y)", 'loss = flor.log("loss", crit(model(x), y))')
    old = OLD.replace("loss = crit(model(x), y)", "loss = crit(model(x), y)  # the loss")
    res = propagate_detailed(new, old)
    assert 'loss = flor.log("loss", crit(model(x), y))  # the loss' in res.code
    assert res.code.count("crit(") == 1 and res.placements[0].wrapped


def test_unit_may_read_names_it_binds_itself_and_comprehension_vars():
    block = ('            if epoch % 2 == 0:\n                norms = [p.norm() for p in model.parameters()]\n'
             '                flor.log("norm", sum(n.item() for n in norms))')
    new = with_lines(OLD, "opt.step()", block)
    assert propagate(new, OLD) == new


def test_insert_after_one_line_if():
    old = OLD.replace("opt.step()", "opt.step()\n            if loss > 9: print('big')")
    new = with_lines(old, "if loss > 9: print('big')", '            flor.log("loss", loss.item())')
    assert propagate(new, old) == new


def test_log_in_else_and_except_blocks():
    old = d('''
        import flor_ray as flor
        for epoch in flor.loop("epoch", range(3)):
            try:
                v = run()
            except ValueError as e:
                print(e)
            if v:
                a = 1
            else:
                b = 2
    ''')
    new = old.replace("print(e)", 'print(e)\n        flor.log("err", str(e))').replace(
        "b = 2", 'b = 2\n        flor.log("b", b)')
    assert propagate(new, old) == new


def test_docstring_stays_first():
    old = d('''
        import flor_ray as flor
        from utils import count

        def fit(model):
            """Fit."""
            model.train()
    ''')
    new = d('''
        import flor_ray as flor
        from utils import count

        def fit(model):
            """Fit the model."""
            flor.log("params", count(model))
            model.go()
    ''')
    assert propagate(new, old) == old.replace('"""Fit."""', '"""Fit."""\n    flor.log("params", count(model))')


# --------------------------------------------------------------------------- failures


def test_undefined_name_raises_naming_the_log():
    new = with_lines(OLD, "opt.step()", '            flor.log("lr", sched.get_last_lr()[0])')
    with pytest.raises(PropagationError, match=r"'lr'.*`sched`") as exc:
        propagate(new, OLD)
    assert isinstance(exc.value, FlorError) and isinstance(exc.value, ValueError)


def test_name_bound_only_later_in_target_is_not_visible():
    new = with_lines(OLD, "model.train()", '        flor.log("acc0", acc)')
    with pytest.raises(PropagationError, match="'acc0'.*`acc`"):
        propagate(new, OLD)


def test_new_loop_is_injected_whole():
    block = ('            for g in opt.param_groups:\n'
             '                flor.log("lr", g["lr"])')
    new = with_lines(OLD, "opt.step()", block)
    res = propagate_detailed(new, OLD)
    assert res.code == new
    assert res.placements[0].statement.startswith("for g in opt.param_groups:")


def test_new_loop_reading_an_undefined_name_raises():
    new = with_lines(OLD, 'flor.log("acc", acc)',
                     '        for xv, yv in flor.loop("val_step", val_loader):\n'
                     '            flor.log("val_loss", crit(model(xv), yv).item())')
    with pytest.raises(PropagationError, match=r"'val_loss'.*`val_loader`"):
        propagate(new, OLD)


def test_enclosing_function_without_counterpart_raises():
    new = OLD + d('''

        def report(m):
            flor.log("report", m)
    ''')
    with pytest.raises(PropagationError, match=r"'report'.*function `def report\(m\)`"):
        propagate(new, OLD)


def test_non_literal_log_name_raises():
    new = with_lines(OLD, "opt.step()", '            flor.log(metric_name, loss.item())')
    with pytest.raises(PropagationError, match="non-literal name \\(metric_name\\)"):
        propagate(new, OLD)


def test_existing_non_literal_log_is_not_an_error():
    old = with_lines(OLD, "opt.step()", '            flor.log(metric_name, loss.item())')
    new = with_lines(old, "loss.backward()", '            flor.log("l", loss.item())')
    assert propagate(new, old) == new


@pytest.mark.parametrize("which", ["source", "target"])
def test_syntax_error_names_file_and_line(which):
    broken = OLD.replace("opt.step()", "opt.step(")
    args = (broken, OLD) if which == "source" else (OLD.replace('"acc"', '"acc1"'), broken)
    with pytest.raises(PropagationError, match=rf"{which} file: syntax error at line \d+"):
        propagate(*args)


def test_all_failures_are_reported_together():
    new = with_lines(OLD, "opt.step()", '            flor.log("a", aa)\n            flor.log("b", bb)')
    with pytest.raises(PropagationError) as exc:
        propagate(new, OLD)
    assert "'a'" in str(exc.value) and "'b'" in str(exc.value)
    assert len(exc.value.failures) == 2  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- case folders

_HERE = Path(__file__).resolve().parent
_SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "cases" / "propagation"
_CASES = sorted(p for root in (_SHARED, _HERE / "propagation_cases") if root.is_dir()
                for p in root.iterdir() if (p / "source.py").is_file())


@pytest.mark.skipif(not _CASES, reason="no propagation case folders found")
@pytest.mark.parametrize("case", _CASES, ids=lambda p: f"{p.parent.parent.name}/{p.name}")
def test_case_folder(case: Path):
    source = (case / "source.py").read_text()
    target = (case / "target.py").read_text()
    if (case / "expected_error.txt").exists():
        with pytest.raises(PropagationError) as exc:
            propagate(source, target)
        assert (case / "expected_error.txt").read_text().strip() in str(exc.value)
        return
    out = propagate(source, target)
    assert ast.dump(ast.parse(out)) == ast.dump(ast.parse((case / "expected.py").read_text()))
    kept = comments(out)
    assert all(c in kept for c in comments(target))


def test_train_step_inline_in_source_extracted_in_target():
    old = d('''
        import flor_ray as flor
        from utils import Net, crit, loader, make_opt

        def train_step(model, opt, x, y):
            opt.zero_grad()
            loss = crit(model(x), y)
            loss.backward()
            opt.step()
            return loss.item()

        net = Net()
        opt = make_opt(net)
        for epoch in flor.loop("epoch", range(10)):
            for x, y in flor.loop("step", loader):
                x = x.cuda()
                value = train_step(net, opt, x, y)
                flor.log("x_mean", x.mean())
    ''')
    new = d('''
        import flor_ray as flor
        from utils import Net, crit, loader, make_opt

        net = Net()
        opt = make_opt(net)
        for epoch in flor.loop("epoch", range(10)):
            for x, y in flor.loop("step", loader):
                x = x.cuda()
                opt.zero_grad()
                loss = crit(net(x), y)
                loss.backward()
                opt.step()
                flor.log("loss", loss.item())
                flor.log("x_mean", x.mean())
    ''')
    res = propagate_detailed(new, old)
    # `loss` only exists inside train_step in the old version: it goes there
    assert res.code == old.replace("    opt.step()\n", '    opt.step()\n    flor.log("loss", loss.item())\n')
    assert res.placements[0].function == "train_step" and res.placements[0].loops == ()


def test_elif_tabs_crlf_and_missing_final_newline_survive():
    old = ('import flor_ray as flor\nfor e in flor.loop("epoch", range(3)):\n\tx = "héllo"; y = 2\n'
           '\tif x:\n\t\tz = 1\n\telif y:\n\t\tz = 2\n\tw = z')
    new = ('import flor_ray as flor\nfor e in flor.loop("epoch", range(3)):\n    x = "héllo"; y = 2\n'
           '    if x:\n        z = 1\n    elif y:\n        z = 2\n        flor.log("z2", z)\n    w = z\n'
           '    flor.log("w", w)\n')
    want = old.replace("\t\tz = 2", '\t\tz = 2\n\t\tflor.log("z2", z)') + '\n\tflor.log("w", w)'
    assert propagate(new, old) == want
    crlf = propagate(new.replace("\n", "\r\n"), old.replace("\n", "\r\n"))
    assert crlf == want.replace("\n", "\r\n")


def test_error_is_picklable_with_its_failures():
    new = with_lines(OLD, "opt.step()", '            flor.log("lr", sched.lr)')
    with pytest.raises(PropagationError) as exc:
        propagate(new, OLD)
    again = pickle.loads(pickle.dumps(exc.value))
    assert str(again) == str(exc.value) and again.failures == exc.value.failures  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- spellings, attributes


def test_flor_log_in_source_imported_log_in_target():
    old = d('''
        from flor_ray import log, loop
        for e in loop("epoch", range(3)):
            loss = step()
            log("acc", 1)
    ''')
    new = d('''
        import flor_ray as flor
        for e in flor.loop("epoch", range(3)):
            loss = step()
            flor.log("loss", loss)
            flor.log("acc", 1)
    ''')
    assert propagate(new, old) == old.replace('    log("acc", 1)', '    log("loss", loss)\n    log("acc", 1)')
    # and the other way round
    assert propagate(old.replace('log("acc", 1)', 'log("acc", 1)\n    log("l2", loss)'), new) == \
        new + '    flor.log("l2", loss)\n'


def test_target_without_flor_import_raises():
    old = "for e in range(3):\n    loss = step()\n"
    new = "from flor_ray import log\nfor e in range(3):\n    loss = step()\n    log('loss', loss)\n"
    with pytest.raises(PropagationError, match="'loss'.*import flor_ray"):
        propagate(new, old)


LIT = d('''
    import flor_ray as flor

    class Module:
        def __init__(self):
            self.model = Net()
            self.opt = SGD(self.model.parameters())

        def training_step(self, batch):
            x, y = batch
            out = self.model(x)
            loss = crit(out, y)
            self.opt.step()
            return loss
''')


def test_attribute_rename_is_applied_and_reported():
    new = LIT.replace("self.model", "self.net").replace(
        "self.opt.step()\n", "self.opt.step()\n        flor.log('wn', self.net.fc.weight.norm().item())\n")
    res = propagate_detailed(new, LIT)
    assert res.code == LIT.replace(
        "self.opt.step()\n", "self.opt.step()\n        flor.log('wn', self.model.fc.weight.norm().item())\n")
    assert ("self.net", "self.model") in res.renames


def test_ambiguous_attribute_rename_raises():
    old = LIT.replace("self.opt = SGD(self.model.parameters())",
                      "self.ema = Net()\n        self.opt = SGD(self.ema.parameters())")
    new = LIT.replace("self.model", "self.net").replace(
        "self.opt.step()\n", "self.opt.step()\n        flor.log('wn', self.net.fc.weight.norm().item())\n")
    with pytest.raises(PropagationError, match="'wn'.*ambiguous"):
        propagate(new, old)


def test_insert_into_one_line_suite_grows_a_block():
    old = d('''
        import flor_ray as flor
        for e in flor.loop("epoch", range(3)):
            if e > 1: print(e)  # big
            z = 1
    ''')
    new = d('''
        import flor_ray as flor
        for e in flor.loop("epoch", range(3)):
            if e > 1:
                print(e)
                flor.log("e", e)
            z = 1
    ''')
    res = propagate_detailed(new, old)
    assert same_ast(res.code, new) and "# big" in res.code and res.placements[0].line == 5


def test_gc_state_is_restored():
    import gc

    gc.disable()
    try:
        propagate(with_lines(OLD, "opt.step()", '            flor.log("loss", loss.item())'), OLD)
        assert not gc.isenabled()
    finally:
        gc.enable()
    propagate(with_lines(OLD, "opt.step()", '            flor.log("loss", loss.item())'), OLD)
    assert gc.isenabled()


def test_new_else_branch_is_created_in_order_with_neighbours():
    old = d('''
        import flor_ray as flor
        best = 1e9
        for epoch in flor.loop("epoch", range(10)):
            val = evaluate()
            if val < best:
                best = val  # improved
            # after the if
            flor.log("val", val)
    ''')
    new = d('''
        import flor_ray as flor
        best = 1e9
        for epoch in flor.loop("epoch", range(10)):
            val = evaluate()
            if val < best:
                best = val
                flor.log("best", best)
            else:
                flor.log("no_improve", epoch)
            flor.log("gap", val - best)
            flor.log("val", val)
    ''')
    res = propagate_detailed(new, old)
    assert same_ast(res.code, new)
    assert all(c in comments(res.code) for c in comments(old))
    assert [p.line for p in res.placements] == [7, 9, 10]
    one_line = old.replace("    if val < best:\n        best = val  # improved\n", "    if val < best: best = val\n")
    assert same_ast(propagate(new, one_line), new)


def test_log_sharing_a_line_is_cut_out_alone():
    old = 'import flor_ray as flor\nfor e in flor.loop("epoch", range(3)):\n    loss = f()\n    opt.step()\n'
    new = ('import flor_ray as flor\nfor e in flor.loop("epoch", range(3)):\n    loss = f()\n'
           '    opt.step(); flor.log("loss", loss); x = 1  # both\n')
    out = propagate(new, old)
    assert out.count("opt.step()") == 1 and "x = 1" not in out
    assert out == old + '    flor.log("loss", loss)  # both\n'

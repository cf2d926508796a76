"""A kernel's executed cells as a script (flor_ray.record.notebook.render): what a
replay can run, and the reason it refuses what it cannot. Cells are given as IPython
transforms them (``%magic`` -> ``get_ipython().run_line_magic(...)``), as ``_ih`` holds them."""

from __future__ import annotations

import subprocess
import sys

from flor_ray.record.notebook import render

from conftest import clean_env

TRAINING = [
    (1, "import torch\nimport flor_ray as flor\nfrom helpers import make_data\n"),
    (2, "get_ipython().run_line_magic('matplotlib', 'inline')\nX, Y = make_data()\n"),
    (3, "def loss_of(w):\n    return ((X @ w - Y) ** 2).mean()\n"),
    (4, "w = torch.zeros(4, 1)\nfor epoch in flor.loop('epoch', range(3)):\n    flor.log('loss', loss_of(w).item())\n"),
]


def test_cells_become_one_script_in_their_order_and_display_magics_are_left_out(tmp_path):
    cells = render(TRAINING, "nb/train.ipynb")
    assert cells.refused == () and cells.refusal is None and cells.cells == (1, 2, 3, 4)
    text = cells.text
    marks = [text.index(f"# %% In[{n}]\n") for n in (1, 2, 3, 4)]
    assert marks == sorted(marks) and "# notebook: nb/train.ipynb" in text
    assert "get_ipython" not in text and "pass  # %matplotlib" in text
    # the script runs as plain Python (helpers.py next to it, as next to the kernel)
    (tmp_path / "helpers.py").write_text("import torch\ndef make_data():\n    return torch.ones(5, 4), torch.ones(5, 1)\n")
    (tmp_path / "cells.py").write_text(text.replace("import flor_ray as flor\n", "") .replace(
        "for epoch in flor.loop('epoch', range(3)):\n    flor.log('loss', loss_of(w).item())",
        "print(loss_of(w).item())"))
    out = subprocess.run([sys.executable, "cells.py"], cwd=tmp_path, env=clean_env(), capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "1.0", out.stderr


def test_magics_and_shell_lines_refuse_with_the_cell_and_line():
    cells = render(TRAINING + [(5, "x = 1\nget_ipython().system('nvidia-smi')\n"),
                               (6, "get_ipython().run_line_magic('pip', 'install tqdm')\n"),
                               (7, "files = get_ipython().getoutput('ls')\n"),
                               (8, "ns = get_ipython().user_ns\n")], None)
    why = cells.refused
    assert any("In[5] line 2" in r and "!nvidia-smi" in r for r in why), why
    assert any("In[6] line 1" in r and "%pip" in r for r in why), why
    assert any("In[7] line 1" in r and "!ls" in r for r in why), why
    assert any("In[8] line 1" in r and "get_ipython()" in r for r in why), why
    assert cells.refusal.endswith("and 1 more")  # three listed, then a count


def test_names_the_kernel_had_from_elsewhere_refuse_and_defined_ones_do_not():
    ok = render(TRAINING + [(5, "class Model(torch.nn.Module):\n    scale = 2\n\nm = [loss_of(w) for _ in range(2)]\n"),
                            (6, "try:\n    import missing\nexcept ImportError as err:\n    e = err\n"),
                            (7, "def later():\n    return defined_after\ndefined_after = 1\n")], None)
    assert ok.refused == (), ok.refused
    bad = render(TRAINING + [(5, "print(lr)\n"), (6, "def f():\n    return batch_size\n"), (7, "print(Out[4])\n"),
                             (8, "y = _ + 1\n"), (9, "print(later_var)\nlater_var = 3\n")], None)
    why = " | ".join(bad.refused)
    for part in ("In[5] line 1 reads 'lr'", "In[6] reads 'batch_size'", "In[7] line 1 reads 'Out', which IPython",
                 "In[8] line 1 reads '_', which IPython",
                 "In[9] line 1 reads 'later_var'"):  # statements in their order: read before the cell binds it
        assert part in why, why


def test_a_cell_that_did_not_compile_is_kept_as_comments_and_display_is_provided():
    cells = render([(1, "x = 1\n"), (2, "def broken(:\n    pass\n"), (3, "display(x)\n")], None)
    assert cells.refused == ()
    assert "# (did not compile: it ran nothing) def broken(:" in cells.text
    assert "from flor_ray.record.notebook import display" in cells.text
    compile(cells.text, "cells.py", "exec")

"""Propagation over a project: every module of today's tree into its old counterpart."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import clean_env
from flor_ray.propagation.project import logged_names, pair_files, propagate_project


def d(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


OLD_MODEL = d('''
    import torch.nn as nn


    class RNNModel(nn.Module):
        def __init__(self, ntoken, nhid):
            super().__init__()
            self.encoder = nn.Embedding(ntoken, nhid)
            self.rnn = nn.LSTM(nhid, nhid)
            self.decoder = nn.Linear(nhid, ntoken)

        def forward(self, input, hidden):
            emb = self.encoder(input)
            output, hidden = self.rnn(emb, hidden)
            return self.decoder(output), hidden
''')

NEW_MODEL = d('''
    import torch.nn as nn

    import flor_ray as flor


    class RNNModel(nn.Module):
        """An LSTM language model."""

        def __init__(self, ntoken, nhid, dropout=0.2):
            super().__init__()
            self.drop = nn.Dropout(dropout)
            self.encoder = nn.Embedding(ntoken, nhid)
            self.rnn = nn.LSTM(nhid, nhid)
            self.decoder = nn.Linear(nhid, ntoken)

        def forward(self, input, hidden):
            emb = self.drop(self.encoder(input))
            output, hidden = self.rnn(emb, hidden)
            flor.log("hnorm", hidden[0].norm().item())
            return self.decoder(output), hidden
''')

OLD_MAIN = d('''
    import flor_ray as flor
    from model import RNNModel

    model = RNNModel(100, 32)
    for epoch in flor.loop("epoch", range(3)):
        flor.log("epoch_seen", epoch)
''')

NEW_DATA = d('''
    import torch

    import flor_ray as flor


    def batchify(data, bsz):
        nbatch = data.size(0) // bsz
        data = data[: nbatch * bsz]
        flor.log("nbatch", nbatch)
        return data.view(bsz, -1).t().contiguous()
''')

OLD_DATA = d('''
    import torch

    import flor_ray as flor


    def batchify(data, bsz):
        # Work out how cleanly we can divide the dataset into bsz parts.
        nbatch = data.size(0) // bsz
        data = data.narrow(0, 0, nbatch * bsz)
        return data.view(bsz, -1).t().contiguous()
''')


def test_each_module_goes_into_its_counterpart_renamed_files_included():
    today = {"main.py": OLD_MAIN, "model.py": NEW_MODEL, "lm/data.py": NEW_DATA}
    old = {"main.py": OLD_MAIN, "model.py": OLD_MODEL.replace("import torch.nn as nn\n",
                                                              "import torch.nn as nn\n\nimport flor_ray as flor\n"),
           "data_utils.py": OLD_DATA}
    patches = {p.path: p for p in propagate_project(today, old)}
    assert set(patches) == {"model.py", "lm/data.py"}  # main.py logs nothing new
    model = patches["model.py"]
    assert (model.target, model.pairing, model.new_names) == ("model.py", "same path", ("hnorm",))
    assert model.result.placements[0].function == "forward"
    lines = [line.strip() for line in model.result.code.splitlines()]
    assert lines.index('flor.log("hnorm", hidden[0].norm().item())') == \
        lines.index("output, hidden = self.rnn(emb, hidden)") + 1
    data = patches["lm/data.py"]
    assert data.target == "data_utils.py" and data.pairing.startswith("renamed from data_utils.py")
    assert "# Work out how cleanly" in data.result.code  # the old file's comments survive
    lines = [line.strip() for line in data.result.code.splitlines()]
    assert lines.index('flor.log("nbatch", nbatch)') == lines.index("data = data.narrow(0, 0, nbatch * bsz)") + 1


def test_a_file_without_counterpart_is_refused_with_the_reason_and_others_still_go():
    today = {"model.py": NEW_MODEL, "extras/probe.py": 'import flor_ray as flor\nflor.log("x", 1)\n'}
    old = {"model.py": OLD_MODEL.replace("import torch.nn as nn\n", "import torch.nn as nn\nimport flor_ray as flor\n")}
    patches = {p.path: p for p in propagate_project(today, old)}
    assert patches["extras/probe.py"].refused.startswith("no file extras/probe.py in the old version")
    assert patches["model.py"].result is not None
    only = propagate_project(today, old, names=["hnorm"])
    assert [p.path for p in only] == ["model.py"]


def test_logged_names_knows_every_spelling():
    assert logged_names('from flor_ray import log as L\nL("a", 1)\n') == ("a",)
    assert logged_names('import flor_ray as fr\nfr.log("b", 2)\nfr.log("b", 3)\n') == ("b",)
    assert logged_names("not python (") == ()


def test_pairing_refuses_a_tie():
    pairs = pair_files({"new.py": "a\nb\n"}, {"x.py": "a\nb\n", "y.py": "a\nb\n"}, ["new.py"])
    assert pairs["new.py"][0] is None and "equally similar" in pairs["new.py"][1]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flor_ray.cli", "propagate", *args], cwd=cwd,
                          env=clean_env(), capture_output=True, text=True)


def test_cli_propagates_two_directories_as_a_diff_or_into_a_folder(tmp_path):
    today, old = tmp_path / "today", tmp_path / "old"
    for root, files in ((today, {"model.py": NEW_MODEL, "main.py": OLD_MAIN}),
                        (old, {"model.py": OLD_MODEL.replace("import torch.nn as nn\n",
                                                             "import torch.nn as nn\nimport flor_ray as flor\n"),
                               "main.py": OLD_MAIN})):
        root.mkdir()
        for name, text in files.items():
            (root / name).write_text(text)
    out = _cli(str(today), str(old), "--diff", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("--- a/model.py\n+++ b/model.py\n")
    assert '+        flor.log("hnorm", hidden[0].norm().item())' in out.stdout
    assert "model.py (same path):" in out.stderr
    dest = tmp_path / "patched"
    assert _cli(str(today), str(old), "-o", str(dest), cwd=tmp_path).returncode == 0
    assert [p.name for p in dest.iterdir()] == ["model.py"]
    assert (old / "model.py").read_text() != (dest / "model.py").read_text()
    refused = _cli(str(today), str(old / "model.py"), cwd=tmp_path)
    assert refused.returncode == 2 and "two directories" in refused.stderr


def test_cli_diff_of_two_files_and_a_binary_file(tmp_path):
    (tmp_path / "new.py").write_text(NEW_DATA)
    (tmp_path / "old.py").write_text(OLD_DATA)
    out = _cli("new.py", "old.py", "--diff", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("--- a/old.py\n+++ b/old.py\n") and '+    flor.log("nbatch", nbatch)' in out.stdout
    (tmp_path / "blob.py").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    bad = _cli("blob.py", "old.py", cwd=tmp_path)
    assert bad.returncode == 2 and "is not UTF-8 text" in bad.stderr and "Traceback" not in bad.stderr


def test_a_statement_that_cannot_be_placed_costs_only_its_names():
    # `dropped` is computed by a new statement that logs nothing, so it is not propagated
    today_model = NEW_MODEL.replace('        flor.log("hnorm", hidden[0].norm().item())\n',
                                    '        flor.log("hnorm", hidden[0].norm().item())\n'
                                    '        dropped = self.drop(output)\n'
                                    '        flor.log("dnorm", dropped.norm().item())\n')
    assert "dnorm" in today_model
    old = {"model.py": OLD_MODEL.replace("import torch.nn as nn\n", "import torch.nn as nn\nimport flor_ray as flor\n")}
    (patch,) = propagate_project({"model.py": today_model}, old)
    assert [p.names for p in patch.result.placements] == [("hnorm",)]
    assert patch.result.refused_names.keys() == {"dnorm"}
    (only,) = propagate_project({"model.py": today_model}, old, names=["hnorm"])
    assert only.new_names == ("hnorm",) and not only.result.refused

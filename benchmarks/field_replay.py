"""Hindsight logging judged on code nobody here wrote: training scripts of
pytorch/examples, from a bare mirror given by its path (nothing of it is committed here).

Each case's script is instrumented as its user would (``flor.checkpointing`` around
the training loop, ``flor.loop`` over the epochs, ``flor.log`` of what the user
watched), its data cut or made up so that a run takes seconds on a CPU, and its runs
recorded, version after version of the file's git history where the case says so.
Then today's script (the newest version) adds statements the recordings never had,
they are propagated into every old version and replayed, and each replayed value is
compared bit for bit with a full re-execution of the same run with the statements
typed in by hand.

* ``word_language_model``: the newest version, an LSTM and a GRU run. Today's
  statements: the annealed learning rate and a weight norm in the loop; a test
  perplexity and a norm of the best model after it, which the script loads back from
  the file it ``torch.save``d.
* ``gcn``: every version of ``gcn/main.py`` (a graph made up in Cora's file format, in a
  folder git ignores, read by a relative path; the script's download is left out).
  Today's statements: the test loss after the loop (replayed first, alone: only the
  loop's end), then a gradient norm and the train accuracy inside ``train_iter``, a
  helper the loop calls.

    python benchmarks/field_replay.py /path/to/pytorch-examples.git [--case gcn]
"""

from __future__ import annotations

import argparse
import math
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, clean_env, git, save_results  # noqa: E402

sys.path.insert(0, str(ROOT))


def show(mirror: str, rev: str, path: str) -> str:
    return subprocess.run(["git", "--git-dir", mirror, "show", f"{rev}:{path}"], check=True, capture_output=True,
                          text=True).stdout


def _need(text: str, anchors: tuple[str, ...], what: str) -> None:
    """Stop where ``text`` (ending in a newline) lacks a line the instrumentation follows."""
    missing = [a for a in anchors if a not in text]
    if missing:
        raise SystemExit(f"this version of {what} lacks the lines the instrumentation follows: {missing}")


def _indent(text: str) -> str:
    return "\n".join("    " + line if line.strip() else line for line in text.split("\n")).rstrip()


# ------------------------------------------------------------- word language model
WLM_INSIDE = ['flor.log("lr_now", lr)', 'flor.log("dec_norm", model.decoder.weight.norm().item())']
WLM_AFTER = ['flor.log("test_ppl", math.exp(test_loss))', 'flor.log("emb_norm", model.encoder.weight.norm().item())']


def wlm_instrument(text: str, typed: bool) -> str:
    anchors = ("import data\n", "try:\n    for epoch in range(1, args.epochs+1):",
               "        val_loss = evaluate(val_data)\n", "# Load the best saved model.",
               "print('=' * 89)\n\nif len(args.onnx_export)")
    text = text if text.endswith("\n") else text + "\n"
    _need(text, anchors, "word_language_model/main.py")
    text = text.replace("import data\n", "import data\nimport flor_ray as flor\n", 1)
    a, b = text.index(anchors[1]), text.index(anchors[3])
    inside = "".join(f"        {s}\n" for s in WLM_INSIDE) if typed else ""
    body = (text[a:b].replace("for epoch in range(1, args.epochs+1):",
                              'for epoch in flor.loop("epoch", range(1, args.epochs+1)):')
            .replace(anchors[2], anchors[2] + '        flor.log("val_loss", val_loss)\n')
            .replace("            lr /= 4.0\n", "            lr /= 4.0\n" + inside))
    text = text[:a] + "with flor.checkpointing(model=model):\n" + _indent(body) + "\n\n" + text[b:]
    after = 'flor.log("test_loss", test_loss)\n' + ("".join(f"{s}\n" for s in WLM_AFTER) if typed else "")
    return text.replace("print('=' * 89)\n\nif len(args.onnx_export)", "print('=' * 89)\n" + after
                        + "\nif len(args.onnx_export)", 1)


def wlm_data(repo: Path, mirror: str, rev: str) -> None:
    data = repo / "data" / "wikitext-2"
    data.mkdir(parents=True, exist_ok=True)
    valid = show(mirror, rev, "word_language_model/data/wikitext-2/valid.txt").splitlines(keepends=True)
    test = show(mirror, rev, "word_language_model/data/wikitext-2/test.txt").splitlines(keepends=True)
    # the mirror keeps no train.txt (too large): the start of valid.txt stands in for it
    (data / "train.txt").write_text("".join(valid[:400]))
    (data / "valid.txt").write_text("".join(valid[400:600]))
    (data / "test.txt").write_text("".join(test[:200]))


# ----------------------------------------------------------------------------- gcn
def gcn_instrument(text: str, typed: bool) -> str:
    loop = "    for epoch in range(args.epochs):\n"
    val = "    loss_val, acc_val = test(model, criterion, input, target, mask_val)\n"
    result = "    print(f'Test set results: loss {loss_test:.4f} accuracy {acc_test:.4f}')\n"
    anchors = ("import argparse\n", "    cora_url = ", "tgz_object.extractall()\n", loop,
               "\n    loss_test, acc_test = test(", val, "    loss.backward()\n", result)
    text = text if text.endswith("\n") else text + "\n"  # the newest version ends without one
    _need(text, anchors, "gcn/main.py")
    a, b = text.index(anchors[1]), text.index(anchors[2]) + len(anchors[2])
    text = text[:a] + text[b:]  # the dataset is on disk: no download
    text = text.replace("import argparse\n", "import argparse\n\nimport flor_ray as flor\n", 1)
    i, j = text.index(loop), text.index(anchors[4])
    body = text[i:j].replace(loop, '    for epoch in flor.loop("epoch", range(args.epochs)):\n')
    text = text[:i] + "    with flor.checkpointing(model=gcn, optimizer=optimizer):\n" + _indent(body) + "\n" + text[j:]
    text = text.replace(val, val + '    flor.log("loss_val", loss_val)\n'
                        + ('    flor.log("acc_train_h", acc_train)\n' if typed else ""))
    if typed:
        text = text.replace("    loss.backward()\n", "    loss.backward()\n    flor.log(\"grad_norm\", "
                            "float(sum(p.grad.norm() ** 2 for p in model.parameters()) ** 0.5))\n")
    return text.replace(result, result + '    flor.log("acc_test", acc_test)\n'
                        + ('    flor.log("loss_test_h", loss_test)\n' if typed else ""))


def gcn_data(repo: Path, mirror: str, rev: str) -> None:
    """A graph in Cora's files: 1,700 papers of 7 classes with 64 word features, 4,000 citations."""
    import random

    folder = repo / "cora"
    if folder.exists():  # made once, before the first run: each run finds the same files
        return
    folder.mkdir()
    rng = random.Random(7)
    ids = rng.sample(range(10_000, 99_999), 1700)
    classes = [f"Class_{k}" for k in range(7)]
    rows = []
    for pid in ids:
        label = rng.randrange(7)
        words = [int(rng.random() < (0.25 if (w % 7) == label else 0.05)) for w in range(64)]
        rows.append("\t".join([str(pid), *map(str, words), classes[label]]))
    (folder / "cora.content").write_text("\n".join(rows) + "\n")
    cites = [f"{rng.choice(ids)}\t{rng.choice(ids)}" for _ in range(4000)]
    (folder / "cora.cites").write_text("\n".join(cites) + "\n")


@dataclass(frozen=True)
class Case:
    folder: str
    script: str
    modules: tuple[str, ...]  # the script's modules in the same folder
    instrument: Callable[[str, bool], str]
    data: Callable[[Path, str, str], None]
    ignore: str  # the project's .gitignore: its data and saves
    runs: dict[str, list[str]]
    names: tuple[str, ...]
    all_versions: bool  # every version of the script in the mirror's history, or the newest only
    queries: tuple[tuple[str, ...], ...] = ()  # the replays, one after the other (default: all names at once)


CASES = {
    "word_language_model": Case(
        "word_language_model", "main.py", ("model.py", "data.py"), wlm_instrument, wlm_data,
        "*.pt\n.flor/\n__pycache__/\n",
        {"lstm": ["--epochs", "4", "--emsize", "24", "--nhid", "24", "--nlayers", "1", "--bptt", "12",
                  "--log-interval", "1000", "--model", "LSTM"],
         "gru": ["--epochs", "4", "--emsize", "24", "--nhid", "24", "--nlayers", "1", "--bptt", "12",
                 "--log-interval", "1000", "--model", "GRU", "--lr", "10"]},
        ("lr_now", "dec_norm", "test_ppl", "emb_norm"), False),
    "gcn": Case(
        "gcn", "main.py", (), gcn_instrument, gcn_data, "cora/\n.flor/\n__pycache__/\n",
        {"default": ["--epochs", "12", "--val-every", "100"]},
        ("grad_norm", "acc_train_h", "loss_test_h"), True,
        # the test loss alone first: only the loop's end is replayed for it
        (("loss_test_h",), ("grad_norm", "acc_train_h"))),
}


def versions(mirror: str, case: Case) -> list[str]:
    """The commits whose script the case records, oldest first."""
    if not case.all_versions:
        return [subprocess.run(["git", "--git-dir", mirror, "rev-parse", "HEAD"], check=True, capture_output=True,
                               text=True).stdout.strip()]
    out = subprocess.run(["git", "--git-dir", mirror, "log", "--format=%H", "--reverse", "--",
                          f"{case.folder}/{case.script}"], check=True, capture_output=True, text=True).stdout
    return out.split()


def record(case: Case, mirror: str, repo: Path, revs: list[str], typed: bool, env: dict) -> list[tuple]:
    """Each version committed and its runs recorded, in order: the (version, run) of each run."""
    repo.mkdir(parents=True)
    git(repo, "init", "-q", "-b", "main")
    (repo / ".gitignore").write_text(case.ignore)
    order = []
    for k, rev in enumerate(revs):
        (repo / case.script).write_text(case.instrument(show(mirror, rev, f"{case.folder}/{case.script}"), typed))
        for f in case.modules:
            (repo / f).write_text(show(mirror, rev, f"{case.folder}/{f}"))
        case.data(repo, mirror, rev)
        git(repo, "add", "-A")
        git(repo, "commit", "-qm", f"{case.folder} at {rev[:8]}")
        for key, args in case.runs.items():
            proc = subprocess.run([sys.executable, case.script, *args], cwd=repo, env=env, capture_output=True,
                                  text=True, timeout=600)
            if proc.returncode != 0:
                raise RuntimeError(f"recording {rev[:8]} {key} failed: {proc.stderr[-2000:]}")
            order.append((k, key))
    return order


def _value(row) -> object:
    """The logged value of a row as its type stores it (``lr`` starts as the int 20)."""
    v = {"float": row.value_float, "int": row.value_int, "bool": row.value_int}.get(row.vtype, row.value_str)
    return repr(v)  # a NaN equals itself as text


def values(repo: Path, names: tuple[str, ...], source: str, order: list[tuple]) -> dict:
    """Each run's values of ``names`` (name, epoch or -1 after the loop, type, value), by (version, run)."""
    import flor_ray
    from flor_ray.store import Store
    from flor_ray.store.logs import read_logs

    store = Store(str(repo / ".flor"))
    t = read_logs(store, list(names), sources=(source,)).to_pandas()
    runs = flor_ray.runs(store=store).sort_values("started_at")["run_id"].tolist()
    assert len(runs) == len(order), (runs, order)
    out: dict = {}
    for run_id, key in zip(runs, order):
        rows = t[t["run_id"] == run_id]
        out[key] = sorted((r.name, -1 if math.isnan(r.iter0) else int(r.iter0), r.vtype, _value(r))
                          for r in rows.itertuples())
    return out


def check(name: str, case: Case, mirror: str, base: Path) -> dict:
    revs = versions(mirror, case)
    t0 = time.perf_counter()
    proj, hand = base / name / "proj", base / name / "hand"
    order = record(case, mirror, proj, revs, False, clean_env())
    record(case, mirror, hand, revs, True, clean_env(FLOR_CHECKPOINT_MAX_PERIOD="1"))
    record_s = time.perf_counter() - t0
    today = case.instrument(show(mirror, revs[-1], f"{case.folder}/{case.script}"), True)
    (proj / case.script).write_text(today)  # today's script, not committed
    t0 = time.perf_counter()
    for names in case.queries or (case.names,):
        proc = subprocess.run([sys.executable, "-m", "flor_ray.cli", "replay", *names, "--script", case.script],
                              cwd=proj, env=clean_env(), capture_output=True, text=True, timeout=1800)
        print(proc.stdout[-4000:])
        if proc.returncode != 0:
            raise SystemExit(f"the replay of {name} failed: {proc.stderr[-3000:]}")
    replay_s = time.perf_counter() - t0
    got, want = values(proj, case.names, "replay", order), values(hand, case.names, "record", order)
    runs = {}
    for key in order:
        label = f"{revs[key[0]][:8]} {key[1]}"
        runs[label] = {n: {"values": len([v for v in want[key] if v[0] == n]),
                           "equal": [v for v in got[key] if v[0] == n] == [v for v in want[key] if v[0] == n]}
                       for n in case.names}
        for n, c in runs[label].items():
            print(f"{name} {label:18s} {n:12s} {c['values']:3d} values  {'equal' if c['equal'] else 'DIFFERENT'}")
    exact = all(c["equal"] and c["values"] > 0 for run in runs.values() for c in run.values())
    values_n = sum(c["values"] for run in runs.values() for c in run.values())
    print(f"{name}: {values_n} values, bit for bit equal to the hand-typed re-execution: {exact}")
    return {"versions": [r[:8] for r in revs], "runs": runs, "values": values_n, "exact": exact,
            "record_s": round(record_s, 1), "replay_s": round(replay_s, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mirror", help="a bare git mirror of pytorch/examples")
    ap.add_argument("--case", choices=sorted(CASES), action="append", help="only these (default: all)")
    a = ap.parse_args()
    head = subprocess.run(["git", "--git-dir", a.mirror, "rev-parse", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    base = Path(tempfile.mkdtemp(prefix="field-replay-"))
    exact = True
    try:
        for name in a.case or sorted(CASES):
            result = check(name, CASES[name], a.mirror, base)
            save_results("field_replay", name, {"mirror_head": head, **result})
            exact = exact and result["exact"]
    finally:
        shutil.rmtree(base, ignore_errors=True)
    if not exact:
        raise SystemExit(1)


if __name__ == "__main__":
    main()

"""Hindsight logging judged on code nobody here wrote: pytorch/examples' word language
model (``word_language_model/main.py``, ``model.py``, ``data.py`` of a bare mirror's
newest commit, given by its path; nothing of it is committed here).

The script is instrumented as its user would: ``flor.checkpointing(model=model)``
around the training ``try``, ``flor.loop`` over the epochs, ``flor.log`` of the
validation and test losses. Its corpus is cut to a few hundred lines so that a run
takes seconds on a CPU. Two runs are recorded (LSTM and GRU), then today's script adds
statements inside the loop (the annealed learning rate, a weight norm) and after it (a
test perplexity and a norm of the best model, which the script loads back from the
file it ``torch.save``d). The replayed values are compared bit for bit with a full
re-execution of each run with the statements typed in by hand.

    python benchmarks/field_replay.py /path/to/pytorch-examples.git
"""

from __future__ import annotations

import argparse
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, clean_env, git, save_results  # noqa: E402

sys.path.insert(0, str(ROOT))

FOLDER = "word_language_model"
RUNS = {"lstm": ["--model", "LSTM"], "gru": ["--model", "GRU", "--lr", "10"]}
SMALL = ["--epochs", "4", "--emsize", "24", "--nhid", "24", "--nlayers", "1", "--bptt", "12", "--log-interval", "1000"]
INSIDE = ['flor.log("lr_now", lr)', 'flor.log("dec_norm", model.decoder.weight.norm().item())']
AFTER = ['flor.log("test_ppl", math.exp(test_loss))', 'flor.log("emb_norm", model.encoder.weight.norm().item())']
NAMES = ["lr_now", "dec_norm", "test_ppl", "emb_norm"]


def show(mirror: str, path: str) -> str:
    return subprocess.run(["git", "--git-dir", mirror, "show", f"HEAD:{path}"], check=True, capture_output=True,
                          text=True).stdout


def instrument(text: str, typed: bool) -> str:
    """``main.py`` as its user would record it (``typed``: with today's statements too)."""
    anchors = ("import data\n", "try:\n    for epoch in range(1, args.epochs+1):",
               "        val_loss = evaluate(val_data)\n", "# Load the best saved model.",
               "print('=' * 89)\n\nif len(args.onnx_export)")
    missing = [a for a in anchors if a not in text]
    if missing:
        raise SystemExit(f"this version of {FOLDER}/main.py lacks the lines the instrumentation follows: {missing}")
    text = text.replace("import data\n", "import data\nimport flor_ray as flor\n", 1)
    a, b = text.index(anchors[1]), text.index(anchors[3])
    inside = "".join(f"        {s}\n" for s in INSIDE) if typed else ""
    body = (text[a:b].replace("for epoch in range(1, args.epochs+1):",
                              'for epoch in flor.loop("epoch", range(1, args.epochs+1)):')
            .replace(anchors[2], anchors[2] + '        flor.log("val_loss", val_loss)\n')
            .replace("            lr /= 4.0\n", "            lr /= 4.0\n" + inside))
    body = "\n".join("    " + line if line.strip() else line for line in body.split("\n")).rstrip()
    text = text[:a] + "with flor.checkpointing(model=model):\n" + body + "\n\n" + text[b:]
    after = 'flor.log("test_loss", test_loss)\n' + ("".join(f"{s}\n" for s in AFTER) if typed else "")
    return text.replace("print('=' * 89)\n\nif len(args.onnx_export)", "print('=' * 89)\n" + after
                        + "\nif len(args.onnx_export)", 1)


def project(base: Path, mirror: str, name: str, typed: bool) -> Path:
    repo = base / name
    data = repo / "data" / "wikitext-2"
    data.mkdir(parents=True)
    git(repo, "init", "-q", "-b", "main")
    (repo / "main.py").write_text(instrument(show(mirror, f"{FOLDER}/main.py"), typed))
    for f in ("model.py", "data.py"):
        (repo / f).write_text(show(mirror, f"{FOLDER}/{f}"))
    valid = show(mirror, f"{FOLDER}/data/wikitext-2/valid.txt").splitlines(keepends=True)
    test = show(mirror, f"{FOLDER}/data/wikitext-2/test.txt").splitlines(keepends=True)
    # the mirror keeps no train.txt (too large): the start of valid.txt stands in for it
    (data / "train.txt").write_text("".join(valid[:400]))
    (data / "valid.txt").write_text("".join(valid[400:600]))
    (data / "test.txt").write_text("".join(test[:200]))
    (repo / ".gitignore").write_text("*.pt\n.flor/\n__pycache__/\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "word language model")
    return repo


def record(repo: Path, env: dict) -> float:
    t0 = time.perf_counter()
    for args in RUNS.values():
        proc = subprocess.run([sys.executable, "main.py", *SMALL, *args], cwd=repo, env=env, capture_output=True,
                              text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"recording {args} failed: {proc.stderr[-2000:]}")
    return time.perf_counter() - t0


def _value(row) -> object:
    """The logged value of a row as its type stores it (``lr`` starts as the int 20)."""
    v = {"float": row.value_float, "int": row.value_int, "bool": row.value_int}.get(row.vtype, row.value_str)
    return repr(v)  # a NaN equals itself as text


def values(repo: Path, source: str) -> dict:
    """Each run's values of :data:`NAMES` (name, epoch or -1 after the loop, type, value), by its key in :data:`RUNS`."""
    import flor_ray
    from flor_ray.store import Store
    from flor_ray.store.logs import read_logs

    store = Store(str(repo / ".flor"))
    t = read_logs(store, NAMES, sources=(source,)).to_pandas()
    runs = flor_ray.runs(store=store)
    out: dict = {}
    for key, args in RUNS.items():
        (run_id,) = [r.run_id for r in runs.itertuples() if str(r.argv).endswith(" ".join(args))]
        rows = t[t["run_id"] == run_id]
        out[key] = sorted((r.name, -1 if math.isnan(r.iter0) else int(r.iter0), r.vtype, _value(r))
                          for r in rows.itertuples())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mirror", help="a bare git mirror of pytorch/examples")
    a = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="field-replay-"))
    try:
        check(a.mirror, base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def check(mirror: str, base: Path) -> None:
    env = clean_env()
    proj, hand = project(base, mirror, "proj", False), project(base, mirror, "hand", True)
    record_s = record(proj, env) + record(hand, clean_env(FLOR_CHECKPOINT_MAX_PERIOD="1"))
    (proj / "main.py").write_text(instrument(show(mirror, f"{FOLDER}/main.py"), True))  # today's, not committed
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "flor_ray.cli", "replay", *NAMES, "--script", "main.py"],
                          cwd=proj, env=env, capture_output=True, text=True, timeout=1200)
    replay_s = time.perf_counter() - t0
    print(proc.stdout[-3000:])
    if proc.returncode != 0:
        raise SystemExit(f"the replay failed: {proc.stderr[-3000:]}")
    got, want = values(proj, "replay"), values(hand, "record")
    checked = {}
    for run in RUNS:
        by_name = {n: ([v for v in got[run] if v[0] == n], [v for v in want[run] if v[0] == n]) for n in NAMES}
        checked[run] = {n: {"values": len(w), "equal": g == w} for n, (g, w) in by_name.items()}
        for n, c in checked[run].items():
            print(f"{run:5s} {n:9s} {c['values']:3d} values  {'equal' if c['equal'] else 'DIFFERENT'}")
    exact = all(c["equal"] and c["values"] > 0 for run in checked.values() for c in run.values())
    head = subprocess.run(["git", "--git-dir", mirror, "rev-parse", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    print(f"bit for bit equal to the hand-typed re-execution: {exact}")
    save_results("field_replay", "word_language_model", {"mirror_head": head, "runs": checked, "exact": exact,
                                  "record_s": round(record_s, 1), "replay_s": round(replay_s, 1)})
    if not exact:
        raise SystemExit(1)


if __name__ == "__main__":
    main()

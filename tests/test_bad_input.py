"""Bad input across the public API and the CLI: one clear error, nothing written.

Each case must raise a :class:`flor_ray.errors.FlorError` subclass (or exit 2 from
the CLI with one line), whose message says what is wrong, and must leave the store
byte for byte as it was (a listing of every file with its size and mtime is compared
before and after). These complement tests/test_record.py and tests/test_cli.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import flor_ray
from flor_ray import errors
from flor_ray.store import Store

from conftest import clean_env, git, run_script, write

SCRIPT = """
import flor_ray as flor

k = flor.arg("k", 2)
for epoch in flor.loop("epoch", range(3)):
    for step in flor.loop("step", range(2)):
        flor.log("x", epoch * 10 + step * k)
    flor.log("y", epoch + 0.5)
"""
TODAY = SCRIPT + '    flor.log("z", epoch * 2)\n'


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    repo = tmp_path_factory.mktemp("bad") / "proj"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    write(repo, "train.py", SCRIPT)
    run_script(repo)
    write(repo, "train.py", TODAY)
    return repo


def listing(root: Path) -> dict:
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            st = p.stat()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture
def unchanged(recorded):
    """Yields the store; afterwards asserts that nothing in it (or in refs/flor) changed."""
    store = recorded / ".flor"
    before, refs = listing(store), git(recorded, "for-each-ref", "refs/flor")
    yield Store(str(store))
    assert listing(store) == before, "the store was written"
    assert git(recorded, "for-each-ref", "refs/flor") == refs


def plan(recorded, st, **kw):
    kw.setdefault("script", recorded / "train.py")
    return flor_ray.plan_replay(kw.pop("names", ["z"]), store=st, **kw)


# (label, call(recorded, store), error class, words the message must hold)
API_CASES = [
    ("where: unknown column", lambda r, s: plan(r, s, where="nosuch > 1"), errors.QueryError,
     ["invalid where predicate", "columns are", "k"]),
    ("where: a second statement", lambda r, s: plan(r, s, where="k = 2; DROP TABLE runs"), errors.QueryError,
     ["invalid where predicate"]),
    ("where: not a string", lambda r, s: plan(r, s, where=5), errors.QueryError, ["SQL predicate string"]),
    ("where: unknown run id", lambda r, s: plan(r, s, where="run_id = '20990101T000000-abcdef'"), errors.QueryError,
     ["no run matches", "flor-ray runs"]),
    ("names: not logged by today's script", lambda r, s: plan(r, s, names=["nosuch"]), errors.QueryError,
     ["not logged by today's script", "flor.log('nosuch'"]),
    ("names: empty list", lambda r, s: plan(r, s, names=[]), errors.QueryError, ["non-empty strings"]),
    ("names: None inside", lambda r, s: plan(r, s, names=[None]), errors.QueryError, ["non-empty strings"]),
    ("iterations: float", lambda r, s: plan(r, s, iterations=3.5), errors.PlanningError, ["not understood", "'last'"]),
    ("iterations: bad range text", lambda r, s: plan(r, s, iterations="1:x"), errors.PlanningError, ["not understood"]),
    ("iterations: non-integers", lambda r, s: plan(r, s, iterations=["a"]), errors.PlanningError, ["integers"]),
    ("script: does not exist", lambda r, s: plan(r, s, script=r / "nope.py"), errors.PlanningError,
     ["does not exist", "script="]),
    ("script: a directory", lambda r, s: plan(r, s, script=r), errors.PlanningError, ["does not exist"]),
    ("script: does not parse", lambda r, s: plan(r, s, script=write(r.parent, "broken.py", "def (:\n")),
     errors.PlanningError, ["does not parse"]),
    ("store: a directory with no store", lambda r, s: flor_ray.plan_replay(["z"], store=str(r.parent / "empty"),
                                                                           script=r / "train.py"),
     errors.StoreNotFoundError, ["no flor_ray store", "FLOR_STORE"]),
    ("store: unknown protocol", lambda r, s: flor_ray.runs(store="nosuchproto://bucket/x"), errors.StoreError,
     ["nosuchproto"]),
    ("store: empty URL", lambda r, s: Store(""), errors.StoreError, ["non-empty"]),
    ("dataframe: unknown name", lambda r, s: flor_ray.dataframe("nosuch", store=s), errors.QueryError,
     ["no values logged under 'nosuch'"]),
    ("dataframe: name not a string", lambda r, s: flor_ray.dataframe(5, store=s), errors.QueryError, ["non-empty strings"]),
    ("dataframe: unknown run id", lambda r, s: flor_ray.dataframe("x", where="run_id = 'nope'", store=s),
     errors.QueryError, ["run_id = 'nope'"]),
    ("runs: unbalanced where", lambda r, s: flor_ray.runs(where="(", store=s), errors.QueryError,
     ["invalid where predicate"]),
    ("sql: empty query", lambda r, s: flor_ray.sql("  ", store=s), errors.QueryError, ["needs a query"]),
    ("sql: unknown table", lambda r, s: flor_ray.sql("SELECT * FROM nosuch", store=s), errors.QueryError,
     ["SQL failed", "tables"]),
    ("store: run id escaping the store", lambda r, s: s.runs_rel("../../etc/passwd"), errors.InvalidNameError,
     ["no '/'", "'..'"]),
    ("store: path escaping the store", lambda r, s: s.read_bytes("../../outside"), errors.StoreError, ["escapes"]),
    ("store: version id escaping the store",
     lambda r, s: __import__("flor_ray.versions").versions.read_version(s, "../../x"), errors.InvalidNameError,
     ["invalid version name"]),
]


@pytest.mark.parametrize("label, call, exc, words", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_bad_input(recorded, unchanged, label, call, exc, words):
    with pytest.raises(exc) as info:
        call(recorded, unchanged)
    msg = str(info.value)
    for w in words:
        assert w in msg, f"{label}: {w!r} not in {msg!r}"


def test_tampered_run_ids_cannot_escape_the_store(recorded, tmp_path):
    """A runs/<id>.json whose run_id or checkpoint path points outside the store."""
    import shutil

    copy = tmp_path / "store"
    shutil.copytree(recorded / ".flor", copy)
    st = Store(str(copy))
    (rid,) = list(st.iter_run_ids())
    meta = st.read_json(f"runs/{rid}.json")
    st.write_json(f"runs/{rid}.json", {**meta, "run_id": "../../evil"})
    before = listing(copy)
    # the run file is damage: left out (named once), never followed outside the store
    with pytest.warns(errors.DamagedFileWarning, match=f"runs/{rid}.json its run_id '../../evil' is not a valid"):
        with pytest.raises(errors.QueryError, match="holds no runs"):
            plan(recorded, st)
    st.write_json(f"runs/{rid}.json", {**meta, "version": "../../x"})
    before = listing(copy)
    p = plan(recorded, st)  # the run is skipped with the reason, never read outside the store
    assert not p.tasks and "invalid version name" in p.skipped[0].reason
    assert listing(copy) == before
    assert not (tmp_path / "evil").exists() and not (tmp_path.parent / "evil").exists()


# ------------------------------------------------------------ planner input
PLAN_CASES = [
    ("names: not a list", lambda r, s: plan(r, s, names=123), errors.QueryError,
     "plan_replay(names=123) raises TypeError from list(123)"),
    ("iterations: out of range", lambda r, s: plan(r, s, iterations=[99]), errors.PlanningError,
     "iterations=[99] on 3-epoch runs silently plans a set-up-only task instead of an error"),
    ("iterations: empty range", lambda r, s: plan(r, s, iterations="2:1"), errors.PlanningError,
     "iterations='2:1' selects nothing and silently plans a set-up-only task"),
    ("resources: unknown key", lambda r, s: plan(r, s, resources={"cpus": 1}), errors.PlanningError,
     "Resources(**{'cpus': 1}) raises TypeError"),
    ("resources: negative CPUs", lambda r, s: plan(r, s, resources={"num_cpus": -1}), errors.PlanningError,
     "num_cpus=-1 is accepted; Ray rejects it only when the tasks are submitted"),
    ("resources: CPUs not a number", lambda r, s: plan(r, s, resources={"num_cpus": "x"}), errors.PlanningError,
     "num_cpus='x' raises TypeError from a comparison inside make_plan"),
    ("resources: not a mapping", lambda r, s: plan(r, s, resources=5), errors.PlanningError,
     "resources=5 raises AttributeError"),
    ("script: not UTF-8", lambda r, s: plan(r, s, script=_binary(r)), errors.PlanningError,
     "a script that is not UTF-8 raises UnicodeDecodeError from Path.read_text"),
]


def _binary(repo: Path) -> Path:
    p = repo.parent / "binary.py"
    p.write_bytes(b"\xff\xfe\x00 not text")
    return p


@pytest.mark.parametrize(
    "label, call, exc, what",
    PLAN_CASES,
    ids=[c[0] for c in PLAN_CASES],
)
def test_planner_bad_input(recorded, unchanged, label, call, exc, what):
    """Each once a bug (`what` says how it failed before); now a clear error, nothing written."""
    with pytest.raises(exc) as info:
        call(recorded, unchanged)
    assert len(str(info.value)) > 30


# ---------------------------------------------------------------- recording
@pytest.mark.parametrize(
    "body, message",
    [
        ("flor.arg('lr', [0.1])", "give an int, float, bool, str or None default"),
        ("flor.arg('a/b', 1)", "invalid arg name"),
        ("flor.loop('', range(3))", "invalid loop name"),
        ("flor.checkpointing(model=object()).__enter__()", "has no state_dict"),
    ],
)
def test_recording_misuse_writes_nothing(recorded, unchanged, body, message):
    """Misuse caught before the run starts: no run, no snapshot ref, no store change."""
    write(recorded, "bad.py", "import flor_ray as flor\n" + body + "\n")
    try:
        proc = run_script(recorded, "bad.py", check=False)
    finally:
        (recorded / "bad.py").unlink()
    assert proc.returncode != 0 and message in proc.stderr and "flor_ray.errors" in proc.stderr


def test_script_outside_the_repository_writes_nothing(recorded, unchanged, tmp_path):
    outside = write(tmp_path, "train.py", SCRIPT)
    proc = subprocess.run([sys.executable, str(outside)], cwd=recorded, env=clean_env(), capture_output=True, text=True)
    assert proc.returncode != 0 and "RepositoryError" in proc.stderr and "git init" in proc.stderr


def test_python_c_is_refused_and_writes_nothing(recorded, unchanged):
    proc = subprocess.run([sys.executable, "-c", "import flor_ray as flor; flor.log('x', 1)"], cwd=recorded,
                          env=clean_env(), capture_output=True, text=True)
    assert proc.returncode != 0 and "RepositoryError" in proc.stderr and "python path/to/script.py" in proc.stderr


# ---------------------------------------------------------------------- CLI
def cli(repo, *args, env=None):
    return subprocess.run([sys.executable, "-m", "flor_ray.cli", *args], cwd=repo, env=env or clean_env(),
                          capture_output=True, text=True)


@pytest.mark.parametrize(
    "args, message",
    [
        (("replay", "z", "--where", "nosuch = 1", "--dry-run"), "invalid where predicate"),
        (("replay", "z", "--script", "nope.py", "--dry-run"), "does not exist"),
        (("replay", "z", "--iterations", "x", "--dry-run"), "not understood"),
        (("df", "x", "--store", "nosuchproto://b/x"), "nosuchproto"),
        (("sql", "SELECT 1", "--store", "/nonexistent/store"), "no flor_ray store"),
        (("runs", "--where", "run_id = 'nope' AND"), "invalid where predicate"),
    ],
)
def test_cli_bad_input_is_one_line_and_writes_nothing(recorded, unchanged, args, message):
    proc = cli(recorded, *args)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_cli_bad_config_is_one_line(recorded, unchanged):
    proc = cli(recorded, "runs", env=clean_env(FLOR_CONFIG=str(recorded.parent / "missing.yaml")))
    assert proc.returncode == 2 and "missing.yaml" in proc.stderr and "Traceback" not in proc.stderr
